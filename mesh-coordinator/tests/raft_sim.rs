//! A deterministic simulation of several coordinator replicas: virtual time,
//! a fake network that drops, delays, duplicates, reorders and partitions,
//! replicas that crash and restart from their logs, and clients proposing
//! commands to whichever replica they pick. Seeded: a failing seed replays
//! exactly (Raft's own election randomness is overridden from the seed).
//!
//! Checked throughout every run:
//! - at most one leader per term;
//! - no region is ever assigned to two servers under one epoch, on any
//!   replica, at any time;
//! - every replica applies the same entry at each log index (so no
//!   committed entry is lost or replaced across leader changes);
//!
//! and at the end, once the network heals: every replica holds the same
//! state, and every proposal a client saw committed is in it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use glam::IVec3;
use mesh_coordinator::consensus::{Applied, ProposalId, RaftStore, Replica, Timing};
use mesh_coordinator::state::{
    Addresses, Bootstrap, Command, CoordinatorState, Load, Policy, Response, TransferRequest,
};
use raft::StateRole;
use raft::eraftpb::{Message, MessageType};
use shared::region::{RegionKey, RegionTree};
use shared::{EntityId, Epoch, ServerId, TickClock};

const MS: u64 = 1_000_000;
/// Virtual Unix time of the simulation's start.
const T0: u64 = 1_800_000_000_000 * MS;
const TICK_MS: u64 = 10;

#[derive(Debug, Clone, Copy)]
struct Faults {
    drop: f64,
    duplicate: f64,
    max_delay_ms: u64,
    partitions: bool,
    crashes: bool,
}

struct InFlight {
    at: u64,
    to: u64,
    msg: Message,
}

struct Node {
    replica: Option<Replica>,
    store: RaftStore,
    last_timeout: usize,
    /// Term, role and election_elapsed at the last reseed check.
    last_timer: (u64, StateRole, usize),
    next_seq: u64,
    /// Region → highest epoch this incarnation has seen.
    epochs: BTreeMap<RegionKey, Epoch>,
}

struct Sim {
    rng: fastrand::Rng,
    now_ms: u64,
    nodes: BTreeMap<u64, Node>,
    net: Vec<InFlight>,
    faults: Faults,
    /// Replica → its side of the current partition.
    side: BTreeMap<u64, u8>,
    partition_until: u64,
    timing: Timing,
    // Invariant bookkeeping.
    leaders: BTreeMap<u64, u64>,
    owners: BTreeMap<(RegionKey, Epoch), Option<ServerId>>,
    log: BTreeMap<u64, (u64, ProposalId)>,
    acknowledged: Vec<(ProposalId, u64)>,
    pending: HashMap<ProposalId, ()>,
    servers_seen: Vec<ServerId>,
    leader_changes: u64,
    crashes: u64,
}

fn initial() -> CoordinatorState {
    let policy = Policy { startup_grace_ms: 200, ..Policy::default() };
    let mut s = CoordinatorState::new(policy, RegionTree::grid(IVec3::ZERO, 2, 2, 1), TickClock::new(0));
    s.world_seed = 5;
    s
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Sim {
    fn new(seed: u64, n: u64, faults: Faults) -> Self {
        let voters: Vec<u64> = (1..=n).collect();
        let timing = Timing { election_ticks: 10, heartbeat_ticks: 2, snapshot_every: 40 };
        let mut sim = Sim {
            rng: fastrand::Rng::with_seed(seed),
            now_ms: 0,
            nodes: BTreeMap::new(),
            net: Vec::new(),
            faults,
            side: BTreeMap::new(),
            partition_until: 0,
            timing,
            leaders: BTreeMap::new(),
            owners: BTreeMap::new(),
            log: BTreeMap::new(),
            acknowledged: Vec::new(),
            pending: HashMap::new(),
            servers_seen: Vec::new(),
            leader_changes: 0,
            crashes: 0,
        };
        for id in voters.iter().copied() {
            let store = RaftStore::in_memory(&voters);
            sim.nodes.insert(
                id,
                Node {
                    replica: None,
                    store,
                    last_timeout: 0,
                    last_timer: (0, StateRole::Follower, 0),
                    next_seq: 1,
                    epochs: BTreeMap::new(),
                },
            );
            sim.boot(id);
        }
        sim
    }

    fn boot(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        let state = Arc::new(Mutex::new(initial()));
        let replica = Replica::new(id, node.store.clone(), initial(), state, self.timing, &logger()).expect("replica");
        node.replica = Some(replica);
        node.last_timeout = 0;
        node.last_timer = (u64::MAX, StateRole::Follower, 0);
        node.epochs.clear();
        self.reseed(id);
    }

    fn unix_now(&self) -> u64 {
        T0 + self.now_ms * MS
    }

    /// Replaces Raft's thread-random election timeout with a seeded one.
    fn reseed(&mut self, id: u64) {
        let timing = self.timing;
        let draw = self.rng.usize(timing.election_ticks..2 * timing.election_ticks);
        let node = self.nodes.get_mut(&id).expect("node");
        let Some(r) = node.replica.as_mut() else { return };
        // Raft redrew its timeout (from the thread's RNG) if it reset the
        // timer: override it. The reset is told by term, role or the timer
        // going back, never by the value drawn, which may equal ours.
        let timer = (r.term(), r.role(), r.election_elapsed());
        let (term, role, elapsed) = node.last_timer;
        let reset = timer.0 != term || timer.1 != role || timer.2 < elapsed;
        node.last_timer = timer;
        if reset || r.election_timeout() != node.last_timeout {
            r.set_election_timeout(draw);
            node.last_timeout = draw;
        }
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.side.get(&a) == self.side.get(&b)
    }

    fn step_ms(&mut self) {
        self.now_ms += 1;
        let now = self.now_ms;
        self.maybe_fault();
        // Deliver what is due, in arrival order (ties by insertion).
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|m| (m.at, m.msg.from, m.msg.index, m.msg.get_msg_type() as i32));
        for m in due {
            if !self.connected(m.msg.from, m.to) {
                continue;
            }
            if let Some(r) = self.nodes.get_mut(&m.to).and_then(|n| n.replica.as_mut()) {
                let _ = r.step(m.msg);
            }
            self.reseed(m.to);
        }
        if now.is_multiple_of(TICK_MS) {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                if let Some(r) = self.nodes.get_mut(&id).and_then(|n| n.replica.as_mut()) {
                    r.tick();
                }
                self.reseed(id);
            }
        }
        if self.rng.f64() < 0.08 {
            self.client_proposal();
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.ready(id);
        }
    }

    fn maybe_fault(&mut self) {
        let now = self.now_ms;
        if self.faults.partitions {
            if now >= self.partition_until && !self.side.is_empty() {
                self.side.clear();
            }
            if self.side.is_empty() && self.rng.f64() < 0.0015 {
                for &id in self.nodes.keys() {
                    self.side.insert(id, u8::from(self.rng.bool()));
                }
                self.partition_until = now + self.rng.u64(200..2_000);
            }
        }
        if self.faults.crashes && self.rng.f64() < 0.0008 {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            let id = ids[self.rng.usize(..ids.len())];
            let node = self.nodes.get_mut(&id).expect("node");
            if node.replica.take().is_some() {
                self.crashes += 1;
                // In-flight messages to it are lost with it.
                self.net.retain(|m| m.to != id);
            }
        }
        if self.faults.crashes && self.rng.f64() < 0.004 {
            let down: Vec<u64> = self.nodes.iter().filter(|(_, n)| n.replica.is_none()).map(|(id, _)| *id).collect();
            if let Some(&id) = down.first() {
                self.boot(id);
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for msg in msgs {
            let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            if self.rng.f64() < self.faults.drop || !self.connected(msg.from, msg.to) {
                // What the transport does when a send fails.
                if snapshot && let Some(r) = self.nodes.get_mut(&msg.from).and_then(|n| n.replica.as_mut()) {
                    r.report_unreachable(msg.to);
                    r.report_snapshot(msg.to, false);
                }
                continue;
            }
            if snapshot && let Some(r) = self.nodes.get_mut(&msg.from).and_then(|n| n.replica.as_mut()) {
                r.report_snapshot(msg.to, true);
            }
            let copies = if self.rng.f64() < self.faults.duplicate { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.now_ms + 1 + self.rng.u64(0..=self.faults.max_delay_ms);
                self.net.push(InFlight { at, to: msg.to, msg: msg.clone() });
            }
        }
    }

    fn ready(&mut self, id: u64) {
        let unix_now = self.unix_now();
        let Some(r) = self.nodes.get_mut(&id).and_then(|n| n.replica.as_mut()) else { return };
        let out = r.process_ready().expect("ready");
        let role = r.role();
        let term = r.term();
        if role == StateRole::Leader {
            let previous = self.leaders.insert(term, id);
            assert!(previous.is_none() || previous == Some(id), "two leaders in term {term}: {previous:?} and {id}");
        }
        if let Some((StateRole::Leader, _, _)) = out.role_change {
            self.leader_changes += 1;
            // What the process's driver does: the term's first entry.
            let node = self.nodes.get_mut(&id).expect("node");
            let r = node.replica.as_mut().expect("replica");
            let (bootstrapped, policy) = {
                let s = r.state();
                (s.is_bootstrapped(), s.policy.clone())
            };
            let bootstrap =
                (!bootstrapped).then_some(Bootstrap { clock_epoch: unix_now, policy, world_seed: 5, restore: None });
            let seq = node.next_seq;
            node.next_seq += 1;
            let _ = r.propose(
                ProposalId { replica: id, seq },
                &Command::NewLeader { replica: id, now: unix_now, bootstrap },
            );
        }
        for a in &out.applied {
            self.check_applied(id, a);
        }
        if out.snapshot_installed || !out.applied.is_empty() {
            self.check_assignments(id);
        }
        self.send(out.messages);
    }

    fn check_applied(&mut self, id: u64, a: &Applied) {
        match self.log.get(&a.index) {
            Some(&(term, pid)) => assert_eq!(
                (term, pid),
                (a.term, a.id),
                "replica {id} applied a different entry at index {} than another replica did",
                a.index
            ),
            None => {
                self.log.insert(a.index, (a.term, a.id));
            }
        }
        if a.id.replica == id && self.pending.remove(&a.id).is_some() {
            self.acknowledged.push((a.id, a.index));
        }
        if let Ok(Response::Registered { server }) = &a.result
            && !self.servers_seen.contains(server)
        {
            self.servers_seen.push(*server);
        }
    }

    fn check_assignments(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        let r = node.replica.as_ref().expect("replica");
        let s = r.state();
        for (region, a) in s.assignments() {
            let owner = *self.owners.entry((*region, a.epoch)).or_insert(a.server);
            assert_eq!(
                owner, a.server,
                "region {region} epoch {} has two owners: {owner:?} and {:?} (replica {id})",
                a.epoch, a.server
            );
            let seen = node.epochs.entry(*region).or_insert(a.epoch);
            assert!(a.epoch >= *seen, "region {region}: epoch went back from {seen} to {} on replica {id}", a.epoch);
            *seen = a.epoch;
        }
    }

    fn client_proposal(&mut self) {
        let live: Vec<u64> = self.nodes.iter().filter(|(_, n)| n.replica.is_some()).map(|(id, _)| *id).collect();
        if live.is_empty() {
            return;
        }
        let id = live[self.rng.usize(..live.len())];
        let now = self.unix_now();
        let pick = self.rng.u8(0..100);
        let servers = self.servers_seen.clone();
        let node = self.nodes.get_mut(&id).expect("node");
        let r = node.replica.as_mut().expect("replica");
        let cmd = match pick {
            0..10 if servers.len() < 6 => Command::Register {
                name: format!("gs-{}", servers.len()),
                addresses: Addresses::default(),
                cert_sha256: String::new(),
                capacity_players: 100,
                version: "sim".into(),
                now,
            },
            0..60 if !servers.is_empty() => {
                Command::Heartbeat { server: servers[(pick as usize) % servers.len()], load: Load::default(), now }
            }
            60..72 => {
                // A transfer as a source server would ask it, from this
                // replica's (possibly stale) view.
                let s = r.state();
                let owned: Vec<(RegionKey, ServerId, Epoch)> =
                    s.assignments().iter().filter_map(|(k, a)| a.server.map(|srv| (*k, srv, a.epoch))).collect();
                let Some(&(from_region, from, epoch)) = owned.first() else { return };
                let Some(&(to_region, _, _)) = owned.iter().find(|(_, srv, _)| *srv != from) else { return };
                let entity = EntityId(u64::from(pick));
                let entity_epoch = s.entity_authority(entity).map_or(Epoch(0), |a| a.epoch);
                Command::RequestTransfer(TransferRequest {
                    entity,
                    from,
                    from_region,
                    from_region_epoch: epoch,
                    entity_epoch,
                    to_region,
                    not_before_tick: 0,
                    now,
                })
            }
            // Operator writes and load reports, from this replica's view:
            // they must keep every invariant whatever the interleaving.
            72..82 => {
                let s = r.state();
                let leaves: Vec<RegionKey> = s.assignments().keys().copied().collect();
                let leaf = leaves[(pick as usize * 7) % leaves.len()];
                match pick {
                    72..76 => Command::SplitRegion { region: leaf, now },
                    76..78 => match leaf.parent() {
                        Some(region) => Command::MergeRegion { region, now },
                        None => return,
                    },
                    78..81 if !servers.is_empty() => {
                        Command::MoveRegion { region: leaf, to: servers[(pick as usize) % servers.len()], now }
                    }
                    81 if !servers.is_empty() => {
                        let server = servers[self.rng.usize(..servers.len())];
                        Command::Drain { server, undo: self.rng.bool(), now }
                    }
                    _ => return,
                }
            }
            82..88 if !servers.is_empty() => {
                let server = servers[(pick as usize) % servers.len()];
                let s = r.state();
                let regions: Vec<(RegionKey, u32)> =
                    s.regions_of(server).map(|(k, _)| (*k, self.rng.u32(0..30))).collect();
                let players = regions.iter().map(|(_, n)| n).sum();
                let load = Load { players, cpu: self.rng.f32(), ..Load::default() };
                Command::Report { server, load, regions, now }
            }
            _ => Command::Tick { now },
        };
        let pid = ProposalId { replica: id, seq: node.next_seq };
        node.next_seq += 1;
        if r.propose(pid, &cmd).is_ok() {
            self.pending.insert(pid, ());
        }
    }

    /// Heals the network, restarts every replica and runs until they agree.
    fn settle(&mut self) {
        self.faults = Faults { drop: 0.0, duplicate: 0.0, max_delay_ms: 5, partitions: false, crashes: false };
        self.side.clear();
        let down: Vec<u64> = self.nodes.iter().filter(|(_, n)| n.replica.is_none()).map(|(id, _)| *id).collect();
        for id in down {
            self.boot(id);
        }
        for _ in 0..20_000 {
            self.step_ms();
            let applied: Vec<u64> = self.nodes.values().map(|n| n.replica.as_ref().expect("up").applied()).collect();
            let commit = self.nodes.values().map(|n| n.replica.as_ref().expect("up").commit_index()).max();
            let has_leader = self.nodes.values().any(|n| n.replica.as_ref().expect("up").role() == StateRole::Leader);
            if has_leader && applied.iter().all(|a| Some(*a) == commit) {
                break;
            }
        }
    }

    fn check_final(&self) {
        let states: Vec<CoordinatorState> =
            self.nodes.values().map(|n| n.replica.as_ref().expect("up").state().clone()).collect();
        let applied: Vec<u64> = self.nodes.values().map(|n| n.replica.as_ref().expect("up").applied()).collect();
        assert!(applied.windows(2).all(|w| w[0] == w[1]), "replicas did not converge: applied {applied:?}");
        for s in &states[1..] {
            assert!(s == &states[0], "replicas hold different states at the same applied index");
        }
        for (pid, index) in &self.acknowledged {
            assert!(*index <= applied[0], "acknowledged {pid:?} at {index} is past the final log");
            assert_eq!(self.log.get(index).map(|e| e.1), Some(*pid), "acknowledged {pid:?} lost at {index}");
        }
    }
}

fn run(seed: u64, n: u64, faults: Faults, ms: u64) -> Sim {
    let mut sim = Sim::new(seed, n, faults);
    for _ in 0..ms {
        sim.step_ms();
    }
    sim.settle();
    sim.check_final();
    sim
}

const HARSH: Faults = Faults { drop: 0.05, duplicate: 0.02, max_delay_ms: 30, partitions: true, crashes: true };

#[test]
fn three_replicas_survive_drops_partitions_and_crashes() {
    let mut commits = 0;
    let mut changes = 0;
    let mut crashes = 0;
    for seed in 0..12 {
        let sim = run(seed, 3, HARSH, 20_000);
        commits += sim.acknowledged.len();
        changes += sim.leader_changes;
        crashes += sim.crashes;
    }
    // The faults really happened, and work still got done.
    println!("12 runs: {commits} acknowledged commits, {changes} elections won, {crashes} crashes");
    assert!(changes > 12, "only {changes} leader elections in 12 runs");
    assert!(crashes > 5, "only {crashes} crashes in 12 runs");
    assert!(commits > 1_000, "only {commits} acknowledged commits in 12 runs");
}

#[test]
fn five_replicas_survive_the_same() {
    for seed in 100..104 {
        run(seed, 5, HARSH, 15_000);
    }
}

#[test]
fn a_calm_network_elects_one_leader_and_commits_everything() {
    let calm = Faults { drop: 0.0, duplicate: 0.0, max_delay_ms: 2, partitions: false, crashes: false };
    let sim = run(7, 3, calm, 5_000);
    assert!(sim.leaders.len() <= 2, "calm network, several terms: {:?}", sim.leaders);
    assert!(sim.pending.is_empty(), "every proposal to a live replica commits when the network is calm");
    let state = sim.nodes[&1].replica.as_ref().expect("up").state().clone();
    assert!(state.is_bootstrapped());
    assert!(state.assignments().values().all(|a| a.server.is_some()), "regions placed");
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = run(42, 3, HARSH, 8_000);
    let b = run(42, 3, HARSH, 8_000);
    for (k, v) in &a.log {
        if b.log.get(k) != Some(v) {
            panic!("first diff at {k}: {v:?} vs {:?}", b.log.get(k));
        }
    }
    assert_eq!(a.log, b.log);
    assert_eq!(a.leaders, b.leaders);
    assert_eq!(a.acknowledged, b.acknowledged);
}

#[test]
fn a_replica_restarted_from_its_log_catches_up_by_snapshot() {
    let calm = Faults { drop: 0.0, duplicate: 0.0, max_delay_ms: 2, partitions: false, crashes: false };
    let mut sim = Sim::new(9, 3, calm);
    for _ in 0..1_000 {
        sim.step_ms();
    }
    // Replica 3 goes away while the log moves far past a snapshot.
    sim.nodes.get_mut(&3).expect("node").replica = None;
    sim.net.retain(|m| m.to != 3);
    for _ in 0..6_000 {
        sim.step_ms();
    }
    let leader_snap = sim.nodes.values().filter_map(|n| n.replica.as_ref()).map(|r| r.store().snapshot_index()).max();
    assert!(leader_snap > Some(sim.nodes[&3].store.snapshot_index() + 40), "the others compacted past replica 3");
    sim.settle();
    sim.check_final();
    assert!(sim.nodes[&3].store.snapshot_index() > 0, "replica 3 caught up through a snapshot");
}
