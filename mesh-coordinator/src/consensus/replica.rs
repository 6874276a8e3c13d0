//! One Raft replica of the coordinator's state machine, without I/O or
//! clocks: the owner loop (tick / step / propose / `Ready` / advance) as
//! pure calls. The process drives it from a thread with a real clock and a
//! gRPC transport ([`crate::node`]); the tests drive several from one loop
//! with virtual time and a fake network.
//!
//! Log entries are `bincode((proposer, seq, Command))`: the replica that
//! proposed an entry answers its caller when it applies it, wherever the
//! leader was (a follower's proposal is forwarded to the leader by Raft).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use raft::eraftpb::{EntryType, Message, Snapshot};
use raft::{Config, RawNode, ReadState, StateRole, Storage};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use super::store::RaftStore;
use crate::state::{Command, CommandError, CoordinatorState, Event, Response};

/// Raft timing, in ticks of the driver's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A follower that hears no leader for a random 1–2× this starts an election.
    pub election_ticks: usize,
    /// The leader heartbeats this often.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (log compaction).
    pub snapshot_every: u64,
}

/// An election after 8 to 16 silent ticks (320–640 ms at the default
/// `--raft-tick-ms` of 40), a leader heartbeat every 2 ticks, a snapshot
/// every 2,000 applied entries.
impl Default for Timing {
    fn default() -> Self {
        Self { election_ticks: 8, heartbeat_ticks: 2, snapshot_every: 2_000 }
    }
}

/// A proposal's identity: the replica that made it and its sequence there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProposalId {
    pub replica: u64,
    pub seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LogEntry {
    id: ProposalId,
    cmd: Command,
}

fn encode_entry(id: ProposalId, cmd: &Command) -> Vec<u8> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        id: ProposalId,
        cmd: &'a Command,
    }
    bincode::serde::encode_to_vec(Borrowed { id, cmd }, bincode::config::standard()).expect("commands serialise")
}

/// A committed command, applied to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub index: u64,
    pub term: u64,
    pub id: ProposalId,
    pub kind: &'static str,
    pub result: Result<Response, CommandError>,
    pub events: Vec<Event>,
}

/// What one `Ready` produced.
#[derive(Debug, Default)]
pub struct Output {
    /// To send to the other replicas (after the log was made durable).
    pub messages: Vec<Message>,
    pub applied: Vec<Applied>,
    /// Answers to [`Replica::read_index`]: (context, index to wait for).
    pub read_states: Vec<ReadState>,
    /// The role changed in this `Ready`: (role, leader id, term).
    pub role_change: Option<(StateRole, u64, u64)>,
    /// A snapshot from the leader replaced the state machine.
    pub snapshot_installed: bool,
}

/// Why a proposal could not be made here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader is known")]
    NoLeader,
    #[error("raft refused the proposal: {0}")]
    Refused(String),
}

pub struct Replica {
    id: u64,
    raw: RawNode<RaftStore>,
    store: RaftStore,
    state: Arc<Mutex<CoordinatorState>>,
    applied: u64,
    timing: Timing,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("id", &self.id).field("applied", &self.applied).finish_non_exhaustive()
    }
}

impl Replica {
    /// A replica over `store`. The state machine starts from the store's
    /// snapshot if it has one, else from `initial` (which must be the same
    /// on every replica). `state` is shared with readers.
    pub fn new(
        id: u64,
        store: RaftStore,
        initial: CoordinatorState,
        state: Arc<Mutex<CoordinatorState>>,
        timing: Timing,
        logger: &slog::Logger,
    ) -> anyhow::Result<Self> {
        let snap = store.snapshot_now();
        let applied = snap.get_metadata().index;
        let machine = if applied > 0 {
            CoordinatorState::from_bytes(&snap.data)
                .map_err(|e| anyhow::anyhow!("the Raft snapshot at index {applied}: {e}"))?
        } else {
            initial
        };
        *state.lock().unwrap_or_else(PoisonError::into_inner) = machine;
        let config = Config {
            id,
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Config::default()
        };
        config.validate().map_err(|e| anyhow::anyhow!("raft configuration: {e}"))?;
        let raw = RawNode::new(&config, store.clone(), logger)?;
        let mut replica = Self { id, raw, store, state, applied, timing };
        // A lone voter need not wait out an election timeout.
        if replica.voters() == [id] {
            replica.raw.campaign()?;
        }
        Ok(replica)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn voters(&self) -> Vec<u64> {
        self.store.initial_state().map(|s| s.conf_state.voters).unwrap_or_default()
    }

    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The leader this replica knows of (0: none).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn state(&self) -> MutexGuard<'_, CoordinatorState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn store(&self) -> &RaftStore {
        &self.store
    }

    /// The current randomised election timeout, in ticks. Raft draws it from
    /// the thread's RNG; a deterministic simulation overrides it from its own
    /// seeded one with [`Replica::set_election_timeout`] whenever it changes.
    pub fn election_timeout(&self) -> usize {
        self.raw.raft.randomized_election_timeout()
    }

    /// Ticks since the election timer was last reset. Raft redraws the
    /// timeout only when it resets the timer (always with a change of term
    /// or role, or a drop of this count), which is how a simulation knows
    /// when to override the draw, whatever value Raft drew.
    pub fn election_elapsed(&self) -> usize {
        self.raw.raft.election_elapsed
    }

    /// Sets the randomised election timeout (`election_ticks..2 * election_ticks`).
    pub fn set_election_timeout(&mut self, ticks: usize) {
        self.raw.raft.set_randomized_election_timeout(ticks);
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from another replica. Messages from unknown peers or stale
    /// terms are Raft's to ignore; the error is only worth a debug line.
    pub fn step(&mut self, m: Message) -> Result<(), raft::Error> {
        self.raw.step(m)
    }

    pub fn propose(&mut self, id: ProposalId, cmd: &Command) -> Result<(), ProposeError> {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        self.raw.propose(Vec::new(), encode_entry(id, cmd)).map_err(|e| match e {
            raft::Error::ProposalDropped => ProposeError::NoLeader,
            e => ProposeError::Refused(e.to_string()),
        })
    }

    /// Asks for a linearizable read point; the answer comes back in
    /// [`Output::read_states`] with the same `ctx`.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    pub fn report_snapshot(&mut self, peer: u64, ok: bool) {
        let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(peer, status);
    }

    /// Handles the pending `Ready`: persists (and fsyncs) what must be
    /// durable, applies committed entries, compacts the log now and then.
    /// Send `Output::messages` only after this returns.
    pub fn process_ready(&mut self) -> raft::Result<Output> {
        let mut out = Output::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            out.role_change = Some((ss.raft_state, ss.leader_id, self.raw.raft.term));
        }
        out.messages = ready.take_messages();
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot())?;
            out.snapshot_installed = true;
        }
        out.read_states = ready.take_read_states();
        let committed = ready.take_committed_entries();
        self.apply_entries(committed, &mut out);
        self.store.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.store.set_hard_state(hs)?;
        }
        self.store.sync()?;
        out.messages.extend(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit)?;
            self.store.sync()?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out);
        self.raw.advance_apply();
        self.maybe_compact()?;
        Ok(out)
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> raft::Result<()> {
        let index = snap.get_metadata().index;
        match CoordinatorState::from_bytes(&snap.data) {
            Ok(machine) => {
                self.store.apply_snapshot(snap)?;
                *self.state() = machine;
                self.applied = index;
                Ok(())
            }
            Err(e) => {
                error!(index, error = %e, "the leader sent a snapshot this build cannot read");
                Err(raft::Error::Store(raft::StorageError::Other(e.into())))
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<raft::eraftpb::Entry>, out: &mut Output) {
        if entries.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                // A new leader's empty entry; membership is static (no
                // configuration changes are ever proposed).
                continue;
            }
            match bincode::serde::decode_from_slice::<LogEntry, _>(&e.data, bincode::config::standard()) {
                Ok((LogEntry { id, cmd }, _)) => {
                    let kind = cmd.kind();
                    let (result, events) = state.apply(cmd);
                    out.applied.push(Applied { index: e.index, term: e.term, id, kind, result, events });
                }
                // Every replica skips the same entry: the state machines agree.
                Err(err) => warn!(index = e.index, error = %err, "a log entry this build cannot read; skipped"),
            }
        }
    }

    fn maybe_compact(&mut self) -> raft::Result<()> {
        let snap_index = self.store.snapshot_index();
        if self.applied >= snap_index + self.timing.snapshot_every {
            let data = self.state().to_bytes();
            self.store.compact(self.applied, data)?;
        }
        Ok(())
    }
}
