//! The control-plane half of the handoff protocol, as a deterministic state
//! machine in the manner of quinn-proto's `Connection`: events and the
//! current time go in ([`HandoffDriver::handle`],
//! [`HandoffDriver::handle_timeout`]), actions come out
//! ([`HandoffDriver::poll_action`]), and [`HandoffDriver::poll_timeout`] says
//! when it next wants the time. No tokio, tonic or clock inside: `control.rs`
//! performs the actions over gRPC and feeds the answers back; the in-process
//! mesh tests (`sim/mesh_tests.rs`) perform them against the coordinator's
//! state machine and the other simulations, in virtual time. Both run this
//! code.
//!
//! What it decides, for the transfers this server's simulation asks for:
//! - a transfer request's answer: committed, or refused, and whether the
//!   refusal is final (see [`Refusal::class`], the one place a refusal's
//!   class is decided);
//! - a handoff's delivery: sent to the target, sent again every
//!   [`RETRY_AFTER_MS`] after a transient failure, until the target takes
//!   it (or answers that it already has it: an earlier attempt got
//!   through), refuses it for good, is declared dead by the coordinator,
//!   or [`HANDOFF_DEADLINE_MS`] pass; then the completion is reported, or
//!   the entity is taken back from the coordinator (reclaim);
//! - a transfer given up before it took effect (cancel) and an orphaned
//!   transfer resumed by this server (the target side's report).
//!
//! Invariant: every handoff the simulation hands in ends exactly once, as a
//! completion report ([`Action::Complete`]) or a reclaim
//! ([`Action::Reclaim`]); never both, never twice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use shared::{EntityId, Epoch, ServerId};

use crate::sim::messages::{CommittedTransfer, HandoffState, SimIn, SimOut};

/// Milliseconds on the caller's clock (monotonic; any origin).
pub type Millis = u64;

/// How long a source keeps trying to deliver a handoff to a live target
/// before it takes the entity back.
pub const HANDOFF_DEADLINE_MS: Millis = 10_000;

/// The pause between two attempts to deliver a handoff.
pub const RETRY_AFTER_MS: Millis = 200;

/// Why a party said no, typed. The stable names ([`Refusal::label`]) are
/// what logs and metrics show, and what the wire's refusal codes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    // The coordinator, asked for a transfer.
    /// This server was declared dead: it must register again.
    Fenced,
    /// The region is held under a newer epoch than the request's.
    StaleRegionEpoch,
    /// The entity is held by somebody, or under an epoch, other than the
    /// request's.
    StaleEntityEpoch,
    /// The target region is this server's own.
    SameServer,
    /// The target region is no longer a leaf of the map (it split or
    /// merged): the next map names the right one.
    UnknownRegion,
    /// The target region has no live owner right now.
    NoOwner,
    /// The coordinator is not ready, or the command did not commit.
    NotCommitted,
    /// The coordinator does not know the server or transfer named.
    Unknown,
    /// The coordinator is out of room (ids, directory).
    Exhausted,
    /// The target's server does not know a component of the entity alike
    /// (a rolling upgrade): asked again after a back-off, as the target
    /// may be upgraded or the region move; never a reason to drop it.
    SchemaMismatch,
    // The target, handed an entity.
    /// The handoff is addressed to another server.
    WrongServer,
    /// The target holds the region under another epoch than the handoff's.
    TargetStaleEpoch,
    /// The target holds the entity already, under this transfer's epoch or
    /// a newer one: an earlier attempt got through.
    AlreadyHeld,
    /// The target's simulation did not take it in time.
    Busy,
    /// The target could not read the handoff.
    BadRequest,
    // Neither: the answer never came.
    /// No connection, a timeout, a reset.
    Unreachable,
}

/// What a refusal means for the one who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A decision: asking again will not change it.
    Permanent,
    /// An outage or a race: the same request may succeed later.
    Transient,
    /// Not a refusal at all: the thing asked for has happened.
    AlreadyDone,
}

impl Refusal {
    /// The one function that decides a refusal's class.
    pub fn class(self) -> Class {
        use Refusal::*;
        match self {
            Fenced | StaleRegionEpoch | StaleEntityEpoch | SameServer | WrongServer | TargetStaleEpoch | BadRequest => {
                Class::Permanent
            }
            UnknownRegion | NoOwner | NotCommitted | Unknown | Exhausted | SchemaMismatch | Busy | Unreachable => {
                Class::Transient
            }
            AlreadyHeld => Class::AlreadyDone,
        }
    }

    pub fn label(self) -> &'static str {
        use Refusal::*;
        match self {
            Fenced => "fenced",
            StaleRegionEpoch => "stale_region_epoch",
            StaleEntityEpoch => "stale_entity_epoch",
            SameServer => "same_server",
            UnknownRegion => "unknown_region",
            NoOwner => "no_owner",
            NotCommitted => "not_committed",
            Unknown => "unknown",
            Exhausted => "exhausted",
            SchemaMismatch => "schema_mismatch",
            WrongServer => "wrong_server",
            TargetStaleEpoch => "stale_epoch",
            AlreadyHeld => "already_held",
            Busy => "sim_busy",
            BadRequest => "bad_request",
            Unreachable => "unreachable",
        }
    }

    pub const ALL: [Refusal; 16] = [
        Refusal::Fenced,
        Refusal::StaleRegionEpoch,
        Refusal::StaleEntityEpoch,
        Refusal::SameServer,
        Refusal::UnknownRegion,
        Refusal::NoOwner,
        Refusal::NotCommitted,
        Refusal::Unknown,
        Refusal::Exhausted,
        Refusal::SchemaMismatch,
        Refusal::WrongServer,
        Refusal::TargetStaleEpoch,
        Refusal::AlreadyHeld,
        Refusal::Busy,
        Refusal::BadRequest,
        Refusal::Unreachable,
    ];

    pub fn from_label(label: &str) -> Option<Refusal> {
        Self::ALL.into_iter().find(|r| r.label() == label)
    }
}

/// A refusal with the words that came with it (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub detail: String,
}

impl Refused {
    pub fn new(refusal: Refusal, detail: impl Into<String>) -> Self {
        Self { refusal, detail: detail.into() }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.refusal.label(), self.detail)
    }
}

/// A transfer to ask the coordinator for.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferAsk {
    pub entity: EntityId,
    pub from_region: shared::RegionKey,
    pub from_region_epoch: Epoch,
    pub entity_epoch: Epoch,
    pub to_region: shared::RegionKey,
    pub position: glam::DVec3,
    pub not_before_tick: shared::Tick,
    /// The entity's components, as this server's schema names them.
    pub components: Vec<shared::component::SchemaEntry>,
}

/// Why an entity is taken back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimFor {
    /// A committed handoff that could not be delivered.
    Undelivered,
    /// A transfer the simulation gave up before it took effect (the entity
    /// stopped short of the line).
    Cancel { entity: EntityId },
}

/// What the driver wants done.
#[derive(Debug)]
pub enum Action {
    /// Ask the coordinator for a transfer; answer with
    /// [`Event::TransferAnswered`].
    RequestTransfer(TransferAsk),
    /// Send this handoff to its target (`state.to`); answer with
    /// [`Event::HandoffAnswered`].
    SendHandoff(Box<HandoffState>),
    /// Tell the coordinator the handoff was delivered. Fire and forget.
    Complete { transfer_id: u64 },
    /// Ask the coordinator for the entity back; answer with
    /// [`Event::ReclaimAnswered`].
    Reclaim { transfer_id: u64, error: String, why: ReclaimFor },
    /// Tell the coordinator whether this server resumed an orphaned
    /// transfer. Fire and forget.
    ReportOrphan { transfer_id: u64, adopted: bool },
    /// A message for this server's simulation.
    ToSim(SimIn),
    /// Count this in `authority_transfers_total{result}`.
    Count(&'static str),
}

/// What happened.
#[derive(Debug)]
pub enum Event {
    /// The simulation asked for something (the transfer messages of
    /// [`SimOut`]; others are ignored).
    Sim(SimOut),
    /// The coordinator's answer to [`Action::RequestTransfer`].
    TransferAnswered { entity: EntityId, answer: Result<CommittedTransfer, Refused> },
    /// The target's answer to [`Action::SendHandoff`] (`Unreachable` when
    /// none came).
    HandoffAnswered { transfer_id: u64, answer: Result<(), Refused> },
    /// The coordinator's answer to [`Action::Reclaim`]: the entity's new
    /// epoch, `None` when it did not give the entity back, or an error
    /// when it could not be asked.
    ReclaimAnswered { transfer_id: u64, answer: Result<Option<Epoch>, String> },
    /// The coordinator's answer to the reclaim of a cancel
    /// ([`ReclaimFor::Cancel`]): as for [`Event::ReclaimAnswered`].
    CancelAnswered { entity: EntityId, answer: Result<Option<Epoch>, String> },
    /// The servers the coordinator has declared dead (from the newest map).
    Dead(BTreeSet<ServerId>),
}

/// One handoff being delivered.
#[derive(Debug)]
struct Delivery {
    state: Box<HandoffState>,
    /// Past this, a failed attempt ends the delivery.
    deadline: Millis,
    /// When to send again; `None` while an attempt is in flight.
    retry_at: Option<Millis>,
    last_error: String,
}

/// The handoff protocol of one game server. See the module doc.
#[derive(Debug, Default)]
pub struct HandoffDriver {
    deliveries: BTreeMap<u64, Delivery>,
    /// Handoffs that failed, waiting for the coordinator's reclaim answer.
    reclaiming: BTreeMap<u64, Box<HandoffState>>,
    dead: BTreeSet<ServerId>,
    actions: VecDeque<Action>,
}

impl HandoffDriver {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`HandoffDriver::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.deliveries.values().filter_map(|d| d.retry_at).min()
    }

    /// Handoffs being delivered or taken back.
    pub fn in_flight(&self) -> usize {
        self.deliveries.len() + self.reclaiming.len()
    }

    /// The handoffs it holds: being delivered, or being taken back.
    pub fn states(&self) -> impl Iterator<Item = &HandoffState> {
        self.deliveries.values().map(|d| &*d.state).chain(self.reclaiming.values().map(|s| &**s))
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        for d in self.deliveries.values_mut() {
            if d.retry_at.is_some_and(|t| t <= now) {
                d.retry_at = None;
                self.actions.push_back(Action::Count("handoff_retried"));
                self.actions.push_back(Action::SendHandoff(d.state.clone()));
            }
        }
    }

    pub fn handle(&mut self, now: Millis, event: Event) {
        match event {
            Event::Sim(out) => self.sim_asked(now, out),
            Event::TransferAnswered { entity, answer } => {
                let msg = match answer {
                    Ok(transfer) => SimIn::TransferCommitted { entity, transfer },
                    Err(r) => {
                        self.actions.push_back(Action::Count("refused"));
                        SimIn::TransferRefused {
                            entity,
                            permanent: r.refusal.class() == Class::Permanent,
                            reason: r.to_string(),
                        }
                    }
                };
                self.actions.push_back(Action::ToSim(msg));
            }
            Event::HandoffAnswered { transfer_id, answer } => self.answered(now, transfer_id, answer),
            Event::ReclaimAnswered { transfer_id, answer } => {
                let Some(state) = self.reclaiming.remove(&transfer_id) else { return };
                match answer {
                    Ok(Some(entity_epoch)) => {
                        self.actions.push_back(Action::ToSim(SimIn::Reclaimed { state, entity_epoch }))
                    }
                    Ok(None) => tracing::warn!(transfer = transfer_id, "the coordinator did not give the entity back"),
                    Err(error) => {
                        self.actions.push_back(Action::Count("lost"));
                        tracing::error!(transfer = transfer_id, %error, "the entity could not be taken back");
                    }
                }
            }
            Event::CancelAnswered { entity, answer } => {
                let entity_epoch = answer.unwrap_or_else(|error| {
                    tracing::warn!(%entity, %error, "could not give up a transfer");
                    None
                });
                self.actions.push_back(Action::ToSim(SimIn::TransferCancelled { entity, entity_epoch }));
            }
            Event::Dead(dead) => {
                self.dead = dead;
                // A target declared dead while no attempt is in flight: stop
                // waiting for the next one. (One in flight ends with its
                // answer, which a dead target gives soon enough.)
                let gone: Vec<u64> = self
                    .deliveries
                    .iter()
                    .filter(|(_, d)| d.retry_at.is_some() && self.dead.contains(&d.state.to))
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    if let Some(d) = self.deliveries.remove(&id) {
                        let error = format!("the target died ({})", d.last_error);
                        self.fail(d.state, error);
                    }
                }
            }
        }
    }

    fn sim_asked(&mut self, now: Millis, out: SimOut) {
        match out {
            SimOut::RequestTransfer {
                entity,
                from_region,
                from_region_epoch,
                entity_epoch,
                to_region,
                position,
                not_before_tick,
                components,
            } => self.actions.push_back(Action::RequestTransfer(TransferAsk {
                entity,
                from_region,
                from_region_epoch,
                entity_epoch,
                to_region,
                position,
                not_before_tick,
                components,
            })),
            SimOut::Handoff(state) => {
                let id = state.transfer_id;
                if self.deliveries.contains_key(&id) || self.reclaiming.contains_key(&id) {
                    tracing::warn!(transfer = id, "a handoff already being delivered was handed in again");
                    return;
                }
                self.actions.push_back(Action::SendHandoff(state.clone()));
                let d =
                    Delivery { state, deadline: now + HANDOFF_DEADLINE_MS, retry_at: None, last_error: String::new() };
                self.deliveries.insert(id, d);
            }
            SimOut::CancelTransfer { entity, transfer_id } => self.actions.push_back(Action::Reclaim {
                transfer_id,
                error: "the entity did not pass the line".into(),
                why: ReclaimFor::Cancel { entity },
            }),
            SimOut::OrphanResolved { transfer_id, adopted } => {
                self.actions.push_back(Action::ReportOrphan { transfer_id, adopted })
            }
            SimOut::Ghosts { .. } | SimOut::Presence { .. } | SimOut::Hint { .. } | SimOut::Interact { .. } => {}
        }
    }

    fn answered(&mut self, now: Millis, transfer_id: u64, answer: Result<(), Refused>) {
        let Some(d) = self.deliveries.get_mut(&transfer_id) else { return };
        let failed = match answer {
            Ok(()) => None,
            Err(r) => match r.refusal.class() {
                Class::AlreadyDone => None,
                Class::Permanent => Some(format!("target refused: {r}")),
                Class::Transient if self.dead.contains(&d.state.to) => Some(format!("the target died ({r})")),
                Class::Transient if now >= d.deadline => {
                    Some(format!("the target was unreachable for {} s ({r})", HANDOFF_DEADLINE_MS / 1000))
                }
                Class::Transient => {
                    d.last_error = r.to_string();
                    d.retry_at = Some(now + RETRY_AFTER_MS);
                    return;
                }
            },
        };
        let Some(d) = self.deliveries.remove(&transfer_id) else { return };
        match failed {
            None => {
                self.actions.push_back(Action::Count("delivered"));
                self.actions.push_back(Action::Complete { transfer_id });
            }
            Some(error) => self.fail(d.state, error),
        }
    }

    fn fail(&mut self, state: Box<HandoffState>, error: String) {
        self.actions.push_back(Action::Count("failed"));
        tracing::error!(transfer = state.transfer_id, entity = %state.entity, to = %state.to, %error, "handoff failed: taking it back");
        let transfer_id = state.transfer_id;
        self.reclaiming.insert(transfer_id, state);
        self.actions.push_back(Action::Reclaim { transfer_id, error, why: ReclaimFor::Undelivered });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::RegionKey;

    /// Every refusal's class, pinned case by case: a change here changes
    /// what the protocol does.
    #[test]
    fn each_refusal_has_its_class() {
        use Class::*;
        let expected = [
            (Refusal::Fenced, Permanent),
            (Refusal::StaleRegionEpoch, Permanent),
            (Refusal::StaleEntityEpoch, Permanent),
            (Refusal::SameServer, Permanent),
            (Refusal::UnknownRegion, Transient),
            (Refusal::NoOwner, Transient),
            (Refusal::NotCommitted, Transient),
            (Refusal::Unknown, Transient),
            (Refusal::Exhausted, Transient),
            (Refusal::SchemaMismatch, Transient),
            (Refusal::WrongServer, Permanent),
            (Refusal::TargetStaleEpoch, Permanent),
            (Refusal::AlreadyHeld, AlreadyDone),
            (Refusal::Busy, Transient),
            (Refusal::BadRequest, Permanent),
            (Refusal::Unreachable, Transient),
        ];
        assert_eq!(expected.len(), Refusal::ALL.len());
        for (r, class) in expected {
            assert_eq!(r.class(), class, "{r:?}");
            assert_eq!(Refusal::from_label(r.label()), Some(r), "labels are unique");
        }
    }

    fn state(id: u64, to: u32) -> Box<HandoffState> {
        Box::new(HandoffState {
            transfer_id: id,
            from: ServerId(1),
            to: ServerId(to),
            entity: EntityId((1 << 40) | id),
            entity_epoch: Epoch(1),
            to_region: RegionKey::root(1, 0, 0),
            to_region_epoch: Epoch(1),
            effective_tick: 10,
            pos: glam::DVec3::ZERO,
            yaw: 0.0,
            vel: glam::Vec3::ZERO,
            player: None,
            last_applied_input: 0,
            pending_inputs: vec![],
            prop: None,
            crossed_tick: None,
            components: Default::default(),
        })
    }

    fn drain(d: &mut HandoffDriver) -> Vec<String> {
        std::iter::from_fn(|| d.poll_action())
            .map(|a| match a {
                Action::SendHandoff(s) => format!("send {}", s.transfer_id),
                Action::Complete { transfer_id } => format!("complete {transfer_id}"),
                Action::Reclaim { transfer_id, .. } => format!("reclaim {transfer_id}"),
                Action::ToSim(SimIn::Reclaimed { state, entity_epoch }) => {
                    format!("reclaimed {} {}", state.transfer_id, entity_epoch.0)
                }
                Action::ToSim(SimIn::TransferRefused { permanent, .. }) => format!("refused permanent={permanent}"),
                Action::Count(c) => format!("count {c}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn refused(r: Refusal) -> Result<(), Refused> {
        Err(Refused::new(r, "test"))
    }

    #[test]
    fn a_delivered_handoff_is_completed_once() {
        let mut d = HandoffDriver::new();
        d.handle(0, Event::Sim(SimOut::Handoff(state(7, 2))));
        assert_eq!(drain(&mut d), ["send 7"]);
        d.handle(5, Event::HandoffAnswered { transfer_id: 7, answer: Ok(()) });
        assert_eq!(drain(&mut d), ["count delivered", "complete 7"]);
        // A late duplicate answer changes nothing.
        d.handle(6, Event::HandoffAnswered { transfer_id: 7, answer: refused(Refusal::Busy) });
        assert!(drain(&mut d).is_empty());
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn already_held_is_delivered_not_reclaimed() {
        let mut d = HandoffDriver::new();
        d.handle(0, Event::Sim(SimOut::Handoff(state(7, 2))));
        drain(&mut d);
        d.handle(5, Event::HandoffAnswered { transfer_id: 7, answer: refused(Refusal::AlreadyHeld) });
        assert_eq!(drain(&mut d), ["count delivered", "complete 7"]);
    }

    #[test]
    fn a_busy_target_is_retried_until_it_takes_it() {
        let mut d = HandoffDriver::new();
        d.handle(0, Event::Sim(SimOut::Handoff(state(7, 2))));
        drain(&mut d);
        d.handle(100, Event::HandoffAnswered { transfer_id: 7, answer: refused(Refusal::Busy) });
        assert!(drain(&mut d).is_empty());
        assert_eq!(d.poll_timeout(), Some(100 + RETRY_AFTER_MS));
        d.handle_timeout(299);
        assert!(drain(&mut d).is_empty(), "not before its time");
        d.handle_timeout(300);
        assert_eq!(drain(&mut d), ["count handoff_retried", "send 7"]);
        assert_eq!(d.poll_timeout(), None, "no timer while an attempt is in flight");
        d.handle(400, Event::HandoffAnswered { transfer_id: 7, answer: Ok(()) });
        assert_eq!(drain(&mut d), ["count delivered", "complete 7"]);
    }

    #[test]
    fn a_permanent_refusal_takes_the_entity_back() {
        let mut d = HandoffDriver::new();
        d.handle(0, Event::Sim(SimOut::Handoff(state(7, 2))));
        drain(&mut d);
        d.handle(5, Event::HandoffAnswered { transfer_id: 7, answer: refused(Refusal::TargetStaleEpoch) });
        assert_eq!(drain(&mut d), ["count failed", "reclaim 7"]);
        d.handle(9, Event::ReclaimAnswered { transfer_id: 7, answer: Ok(Some(Epoch(4))) });
        assert_eq!(drain(&mut d), ["reclaimed 7 4"]);
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn an_unreachable_target_is_given_up_at_the_deadline() {
        let mut d = HandoffDriver::new();
        d.handle(0, Event::Sim(SimOut::Handoff(state(7, 2))));
        drain(&mut d);
        let mut now = 0;
        let mut sends = 1;
        loop {
            now += 2_000; // every attempt times out after 2 s
            d.handle(now, Event::HandoffAnswered { transfer_id: 7, answer: refused(Refusal::Unreachable) });
            let acts = drain(&mut d);
            if acts.contains(&"reclaim 7".to_owned()) {
                break;
            }
            assert!(acts.is_empty(), "{acts:?}");
            now = d.poll_timeout().expect("a retry");
            d.handle_timeout(now);
            assert_eq!(drain(&mut d), ["count handoff_retried", "send 7"]);
            sends += 1;
        }
        assert!((HANDOFF_DEADLINE_MS..HANDOFF_DEADLINE_MS + 2_500).contains(&now), "given up at {now} ms");
        assert_eq!(sends, 5);
        // Lost only when the coordinator cannot be asked either.
        d.handle(now, Event::ReclaimAnswered { transfer_id: 7, answer: Err("no leader".into()) });
        assert_eq!(drain(&mut d), ["count lost"]);
    }

    #[test]
    fn a_dead_target_ends_the_wait_for_a_retry() {
        let mut d = HandoffDriver::new();
        d.handle(0, Event::Sim(SimOut::Handoff(state(7, 2))));
        d.handle(0, Event::Sim(SimOut::Handoff(state(8, 3))));
        drain(&mut d);
        d.handle(50, Event::HandoffAnswered { transfer_id: 7, answer: refused(Refusal::Unreachable) });
        // Server 3's attempt is still in flight: it ends with its answer.
        d.handle(60, Event::Dead([ServerId(2), ServerId(3)].into()));
        assert_eq!(drain(&mut d), ["count failed", "reclaim 7"]);
        d.handle(70, Event::HandoffAnswered { transfer_id: 8, answer: refused(Refusal::Unreachable) });
        assert_eq!(drain(&mut d), ["count failed", "reclaim 8"]);
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn a_refused_request_says_whether_it_is_final() {
        let mut d = HandoffDriver::new();
        let entity = EntityId((1 << 40) | 3);
        for (r, permanent) in
            [(Refusal::StaleEntityEpoch, true), (Refusal::NoOwner, false), (Refusal::NotCommitted, false)]
        {
            d.handle(0, Event::TransferAnswered { entity, answer: Err(Refused::new(r, "x")) });
            assert_eq!(drain(&mut d), ["count refused".to_owned(), format!("refused permanent={permanent}")]);
        }
    }
}
