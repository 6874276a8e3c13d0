//! Raft replication of the coordinator's state machine (TiKV's raft-rs).
//!
//! - [`store`]: the log of one replica, in memory or on disk.
//! - [`replica`]: the owner loop as pure calls (no I/O, no clock), driven by
//!   [`crate::node`] in the process and by the simulation tests.
//! - [`transport`]: Raft messages between replicas over gRPC (port 7946).

pub mod replica;
pub mod store;
pub mod transport;

pub use replica::{Applied, Output, ProposalId, ProposeError, Replica, Timing};
pub use store::RaftStore;

/// A slog logger (what raft-rs logs to) that forwards to `tracing`.
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

#[derive(Debug)]
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV as _;
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        let fields = kv.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}{fields}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{fields}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{fields}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{fields}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{fields}"),
        }
        Ok(())
    }
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}
