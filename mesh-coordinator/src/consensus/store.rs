//! The Raft log of one replica: hard state, the latest snapshot (with the
//! state machine's bytes, so a lagging follower can be sent it) and the
//! entries after it.
//!
//! In memory, optionally backed by a directory:
//! - `snapshot`: the latest snapshot (protobuf), replaced atomically
//!   (write to a temporary file, fsync, rename, fsync the directory);
//! - `log`: records appended since that snapshot, each `[len u32][crc32
//!   u32][kind u8][protobuf]`, kind 1 a hard state, kind 2 an entry. An entry
//!   at index `i` replaces any entry at `i` or later, exactly as an append
//!   does in memory, so replaying the file rebuilds the log. A torn record at
//!   the tail (a crash mid-write) ends the replay and is cut off.
//!
//! [`RaftStore::sync`] fsyncs the log; the replica calls it after every
//! `Ready` that must be durable, before it sends the messages that promise
//! it (votes, append acknowledgements). A snapshot rewrites the log with
//! the hard state and the entries it did not cover.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

const KIND_HARD_STATE: u8 = 1;
const KIND_ENTRY: u8 = 2;
/// A record longer than this is corruption, not data.
const MAX_RECORD: usize = 256 << 20;

#[derive(Debug)]
struct Core {
    hard: HardState,
    conf: ConfState,
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
    disk: Option<Disk>,
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    log: File,
    dirty: bool,
}

/// A replica's Raft storage; clones share it (the `RawNode` owns one, the
/// replica keeps another to write through).
#[derive(Debug, Clone)]
pub struct RaftStore {
    core: Arc<RwLock<Core>>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(format!("{what} {}: {e}", path.display()).into()))
}

impl Core {
    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }
    fn first_index(&self) -> u64 {
        self.snap_index() + 1
    }
    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.snap_index(), |e| e.index)
    }

    /// In memory: replaces every entry at `ents[0].index` or later.
    fn append_mem(&mut self, ents: &[Entry]) -> Result<(), String> {
        let Some(first) = ents.first() else { return Ok(()) };
        if first.index < self.first_index() {
            return Err(format!("append at {} overwrites the snapshot at {}", first.index, self.snap_index()));
        }
        if first.index > self.last_index() + 1 {
            return Err(format!("append at {} leaves a gap after {}", first.index, self.last_index()));
        }
        let keep = (first.index - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
        Ok(())
    }
}

impl RaftStore {
    /// A fresh in-memory log whose first configuration is `voters`.
    pub fn in_memory(voters: &[u64]) -> Self {
        Self::from_core(Core {
            hard: HardState::default(),
            conf: conf_of(voters),
            snapshot: Snapshot::default(),
            entries: Vec::new(),
            disk: None,
        })
    }

    /// Opens (or creates) the log in `dir`. A new directory starts with
    /// `voters` as its configuration; an existing one keeps its own.
    pub fn open(dir: &Path, voters: &[u64]) -> raft::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let snap_path = dir.join("snapshot");
        let snapshot = match std::fs::read(&snap_path) {
            Ok(bytes) => Snapshot::parse_from_bytes(&bytes).map_err(|e| {
                raft::Error::Store(StorageError::Other(format!("{} is corrupt: {e}", snap_path.display()).into()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => return Err(io_err("reading", &snap_path, e)),
        };
        let conf = if snapshot.get_metadata().index > 0 {
            snapshot.get_metadata().get_conf_state().clone()
        } else {
            conf_of(voters)
        };
        let hard = HardState {
            term: snapshot.get_metadata().term,
            commit: snapshot.get_metadata().index,
            ..HardState::default()
        };
        let mut core = Core { hard, conf, snapshot, entries: Vec::new(), disk: None };

        let log_path = dir.join("log");
        let valid_len = match File::open(&log_path) {
            Ok(f) => replay(&mut core, f).map_err(|e| io_err("reading", &log_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err("opening", &log_path, e)),
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&log_path)
            .map_err(|e| io_err("opening", &log_path, e))?;
        // Cut a torn tail so new records follow the last whole one.
        log.set_len(valid_len).map_err(|e| io_err("truncating", &log_path, e))?;
        core.disk = Some(Disk { dir: dir.to_path_buf(), log, dirty: false });
        Ok(Self::from_core(core))
    }

    fn from_core(core: Core) -> Self {
        Self { core: Arc::new(RwLock::new(core)) }
    }

    fn rl(&self) -> RwLockReadGuard<'_, Core> {
        self.core.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn wl(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The latest snapshot (its data is the state machine at its index).
    pub fn snapshot_now(&self) -> Snapshot {
        self.rl().snapshot.clone()
    }

    pub fn snapshot_index(&self) -> u64 {
        self.rl().snap_index()
    }

    pub fn hard_state(&self) -> HardState {
        self.rl().hard.clone()
    }

    /// Entries held after the snapshot.
    pub fn entry_count(&self) -> usize {
        self.rl().entries.len()
    }

    /// Appends entries from a `Ready` (replacing a conflicting suffix).
    pub fn append(&self, ents: &[Entry]) -> raft::Result<()> {
        let mut core = self.wl();
        core.append_mem(ents).map_err(|e| raft::Error::Store(StorageError::Other(e.into())))?;
        if let Some(disk) = core.disk.as_mut() {
            for e in ents {
                disk.write(KIND_ENTRY, &e.write_to_bytes().map_err(raft::Error::CodecError)?)?;
            }
        }
        Ok(())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> raft::Result<()> {
        let mut core = self.wl();
        core.hard = hs.clone();
        if let Some(disk) = core.disk.as_mut() {
            disk.write(KIND_HARD_STATE, &hs.write_to_bytes().map_err(raft::Error::CodecError)?)?;
        }
        Ok(())
    }

    /// Records a new commit index (from a `LightReady`).
    pub fn set_commit(&self, commit: u64) -> raft::Result<()> {
        let mut hs = self.hard_state();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> raft::Result<()> {
        let mut core = self.wl();
        if let Some(disk) = core.disk.as_mut().filter(|d| d.dirty) {
            disk.log.sync_data().map_err(|e| io_err("syncing", &disk.dir.join("log"), e))?;
            disk.dirty = false;
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> raft::Result<()> {
        let mut core = self.wl();
        let meta = snap.get_metadata();
        if meta.index < core.snap_index() {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        core.snapshot = snap.clone();
        core.conf = meta.get_conf_state().clone();
        core.hard.term = core.hard.term.max(meta.term);
        core.hard.commit = core.hard.commit.max(meta.index);
        // Entries after the snapshot that agree with it may stay; a follower
        // receiving a snapshot has none worth keeping.
        core.entries.clear();
        rewrite(&mut core)
    }

    /// Compacts the log into a snapshot of the state machine at `index`
    /// (which must be applied): `data` is the state machine's bytes.
    pub fn compact(&self, index: u64, data: Vec<u8>) -> raft::Result<()> {
        let mut core = self.wl();
        if index <= core.snap_index() {
            return Ok(());
        }
        if index > core.last_index() || index > core.hard.commit {
            return Err(raft::Error::Store(StorageError::Other(
                format!("compacting to {index} past the committed log ({})", core.hard.commit).into(),
            )));
        }
        let offset = core.first_index();
        let term = core.entries[(index - offset) as usize].term;
        let mut meta = SnapshotMetadata { index, term, ..SnapshotMetadata::default() };
        meta.set_conf_state(core.conf.clone());
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = data.into();
        core.snapshot = snap;
        core.entries.drain(..(index + 1 - offset) as usize);
        rewrite(&mut core)
    }
}

fn conf_of(voters: &[u64]) -> ConfState {
    ConfState { voters: voters.to_vec(), ..ConfState::default() }
}

impl Disk {
    fn write(&mut self, kind: u8, body: &[u8]) -> raft::Result<()> {
        let mut rec = Vec::with_capacity(body.len() + 9);
        rec.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(body);
        rec.extend_from_slice(&crc.finalize().to_le_bytes());
        rec.push(kind);
        rec.extend_from_slice(body);
        self.log.write_all(&rec).map_err(|e| io_err("appending to", &self.dir.join("log"), e))?;
        self.dirty = true;
        Ok(())
    }
}

/// Replays the log file into `core`; returns the length of its whole records.
fn replay(core: &mut Core, f: File) -> std::io::Result<u64> {
    let mut r = BufReader::new(f);
    let mut valid = 0u64;
    loop {
        let mut head = [0u8; 8];
        if read_full(&mut r, &mut head)? < 8 {
            return Ok(valid);
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_RECORD {
            return Ok(valid);
        }
        let mut rec = vec![0u8; len];
        if read_full(&mut r, &mut rec)? < len || crc32fast::hash(&rec) != crc {
            return Ok(valid);
        }
        let ok = match rec[0] {
            KIND_HARD_STATE => HardState::parse_from_bytes(&rec[1..]).map(|hs| core.hard = hs).is_ok(),
            KIND_ENTRY => match Entry::parse_from_bytes(&rec[1..]) {
                // Entries the snapshot already covers are skipped.
                Ok(e) if e.index <= core.snap_index() => true,
                Ok(e) => core.append_mem(std::slice::from_ref(&e)).is_ok(),
                Err(_) => false,
            },
            _ => false,
        };
        if !ok {
            return Ok(valid);
        }
        valid += 8 + len as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes the snapshot file and a fresh log (hard state + entries) in its
/// place, each atomically.
fn rewrite(core: &mut Core) -> raft::Result<()> {
    let Some(dir) = core.disk.as_ref().map(|d| d.dir.clone()) else { return Ok(()) };
    let snap = core.snapshot.write_to_bytes().map_err(raft::Error::CodecError)?;
    write_atomically(&dir.join("snapshot"), &snap)?;
    let tmp = dir.join("log.tmp");
    let file = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    let mut fresh = Disk { dir: dir.clone(), log: file, dirty: false };
    fresh.write(KIND_HARD_STATE, &core.hard.write_to_bytes().map_err(raft::Error::CodecError)?)?;
    for e in &core.entries {
        fresh.write(KIND_ENTRY, &e.write_to_bytes().map_err(raft::Error::CodecError)?)?;
    }
    fresh.log.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
    let log_path = dir.join("log");
    std::fs::rename(&tmp, &log_path).map_err(|e| io_err("renaming", &tmp, e))?;
    sync_dir(&dir)?;
    let log = OpenOptions::new().append(true).open(&log_path).map_err(|e| io_err("opening", &log_path, e))?;
    core.disk = Some(Disk { dir, log, dirty: false });
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> raft::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err("writing", &tmp, e))?;
    f.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("renaming", &tmp, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> raft::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing", dir, e))
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.rl();
        Ok(RaftState::new(core.hard.clone(), core.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.rl();
        if low < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > core.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = core.first_index();
        let mut ents = core.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let core = self.rl();
        if idx == core.snap_index() {
            return Ok(core.snapshot.get_metadata().term);
        }
        if idx < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > core.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(core.entries[(idx - core.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let core = self.rl();
        if core.snap_index() < request_index {
            // The leader compacts often enough; until then, raft retries.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(core.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec().into(), ..Entry::default() }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..HardState::default() }
    }

    #[test]
    fn append_replaces_a_conflicting_suffix_and_refuses_gaps() {
        let s = RaftStore::in_memory(&[1, 2, 3]);
        s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")]).unwrap();
        s.append(&[entry(2, 2, b"x")]).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert!(s.append(&[entry(5, 2, b"gap")]).is_err());
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn the_log_survives_a_reopen_with_its_hard_state_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RaftStore::open(dir.path(), &[1, 2, 3]).unwrap();
            s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 2, b"c"), entry(4, 2, b"d")]).unwrap();
            s.set_hard_state(&hs(2, 3, 3)).unwrap();
            s.sync().unwrap();
            s.compact(2, b"state at 2".to_vec()).unwrap();
            s.append(&[entry(4, 3, b"d'")]).unwrap();
            s.set_hard_state(&hs(3, 1, 4)).unwrap();
            s.sync().unwrap();
        }
        let s = RaftStore::open(dir.path(), &[9]).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (3, 1, 4));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3], "the stored configuration wins");
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (3, 4));
        assert_eq!(s.term(2).unwrap(), 1, "the snapshot keeps the term of its index");
        let ents = s.entries(3, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(
            ents.iter().map(|e| (e.index, e.term, e.data.to_vec())).collect::<Vec<_>>(),
            vec![(3, 2, b"c".to_vec()), (4, 3, b"d'".to_vec())]
        );
        assert_eq!(&s.snapshot(2, 0).unwrap().data[..], b"state at 2");
        assert!(matches!(s.entries(2, 3, None, GetEntriesContext::empty(false)), Err(raft::Error::Store(_))));
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_log_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RaftStore::open(dir.path(), &[1]).unwrap();
            s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            s.sync().unwrap();
        }
        // A crash in the middle of the third record.
        let path = dir.path().join("log");
        let len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, KIND_ENTRY, 7]).unwrap();
        drop(f);
        {
            let s = RaftStore::open(dir.path(), &[1]).unwrap();
            assert_eq!(s.last_index().unwrap(), 2);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "the torn record is cut off");
            s.append(&[entry(3, 1, b"c")]).unwrap();
            s.sync().unwrap();
        }
        let s = RaftStore::open(dir.path(), &[1]).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
    }

    #[test]
    fn a_snapshot_from_the_leader_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open(dir.path(), &[1, 2, 3]).unwrap();
        s.append(&[entry(1, 1, b"a")]).unwrap();
        let mut meta = SnapshotMetadata { index: 10, term: 4, ..SnapshotMetadata::default() };
        meta.set_conf_state(conf_of(&[1, 2, 3]));
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = b"leader state".to_vec().into();
        s.apply_snapshot(&snap).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
        drop(s);
        let s = RaftStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
        assert_eq!(s.hard_state().commit, 10);
        assert_eq!(&s.snapshot_now().data[..], b"leader state");
    }
}
