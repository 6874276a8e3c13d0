//! The coordinator's authority transfers: those in flight, which are live
//! protocol state (a retried request, a completion, a reclaim and an
//! orphan's resolution look them up), and those that ended, a bounded
//! history the API shows. Only [`Transfers::commit`] adds a transfer and
//! only [`Transfers::set_outcome`] changes one.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{CommandError, TransferOutcome, TransferRecord};

/// Transfers in flight at most. A commit past it is refused
/// ([`CommandError::TooManyTransfers`]); the source asks again later. A
/// healthy mesh has about one in flight per player crossing a face right
/// now, and each ends within seconds (delivered, returned, adopted or
/// lost), so this is reached only when something stopped ending them.
pub const MAX_IN_FLIGHT: usize = 100_000;

impl TransferOutcome {
    /// Whether nothing more can happen to the transfer.
    /// `Committed` (not yet reported), `Failed` (reported undelivered: the
    /// source may still take the entity back) and `Orphaned` (the target
    /// may still resume it) are in flight.
    pub fn ended(self) -> bool {
        matches!(
            self,
            TransferOutcome::Delivered | TransferOutcome::Returned | TransferOutcome::Adopted | TransferOutcome::Lost
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfers {
    /// Transfers not yet ended, by id. Invariant: no outcome here has
    /// [`TransferOutcome::ended`]; at most [`MAX_IN_FLIGHT`]; a transfer
    /// leaves only by ending, never to make room.
    in_flight: BTreeMap<u64, TransferRecord>,
    /// Ended transfers, in the order they ended: the latest ones, as many
    /// as the policy's `transfer_log_len`. Invariant: every outcome here
    /// has ended; no id is also in `in_flight`.
    history: VecDeque<TransferRecord>,
    /// Transfers ever committed.
    total: u64,
    /// The id of the next commit: above every id here.
    next_id: u64,
}

impl Default for Transfers {
    fn default() -> Self {
        Self { in_flight: BTreeMap::new(), history: VecDeque::new(), total: 0, next_id: 1 }
    }
}

impl Transfers {
    /// Rebuilds the set from a format-3 log (a bounded deque of every
    /// transfer, ended or not). Its in-flight transfers are kept whatever
    /// their age; the history keeps the newest `history_len`.
    pub(super) fn from_log(log: impl IntoIterator<Item = TransferRecord>, total: u64, next_id: u64) -> Self {
        let mut t = Self { total, next_id, ..Self::default() };
        for r in log {
            t.next_id = t.next_id.max(r.id + 1);
            if r.outcome.ended() {
                t.history.push_back(r);
            } else {
                t.in_flight.insert(r.id, r);
            }
        }
        t
    }

    /// Transfers ever committed.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// The transfers not yet ended, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &TransferRecord> {
        self.in_flight.values()
    }

    /// Every transfer known, in flight and recently ended, oldest (by id)
    /// first.
    pub fn recent(&self) -> Vec<&TransferRecord> {
        let mut all: Vec<&TransferRecord> = self.in_flight.values().chain(&self.history).collect();
        all.sort_unstable_by_key(|t| t.id);
        all
    }

    /// The newest `n` (by id), newest first.
    pub fn newest(&self, n: usize) -> Vec<&TransferRecord> {
        let mut all = self.recent();
        all.reverse();
        all.truncate(n);
        all
    }

    /// The newest id committed (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.next_id.saturating_sub(1)
    }

    /// Transfers with an id above `after`, the newest `max` of them,
    /// oldest first, in bounded work: the in-flight ones by range, the
    /// ended ones among the newest `4 * max` to end (a transfer committed
    /// after `after` that already ended did so recently).
    pub fn after(&self, after: u64, max: usize) -> Vec<&TransferRecord> {
        let mut v: Vec<&TransferRecord> = self
            .in_flight
            .range(after.saturating_add(1)..)
            .rev()
            .take(max)
            .map(|(_, t)| t)
            .chain(self.history.iter().rev().take(max.saturating_mul(4)).filter(|t| t.id > after))
            .collect();
        v.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
        v.truncate(max);
        v.reverse();
        v
    }

    /// The transfer `id` if it is still in flight.
    pub fn in_flight_get(&self, id: u64) -> Option<&TransferRecord> {
        self.in_flight.get(&id)
    }

    /// The `n` transfers that ended last, the last first.
    pub fn recently_ended(&self, n: usize) -> impl Iterator<Item = &TransferRecord> {
        self.history.iter().rev().take(n)
    }

    /// The transfer `id`, in flight or recently ended.
    pub fn get(&self, id: u64) -> Option<&TransferRecord> {
        self.in_flight.get(&id).or_else(|| self.history.iter().rev().find(|t| t.id == id))
    }

    /// Commits a transfer: `make` builds the record from its id.
    pub fn commit(&mut self, make: impl FnOnce(u64) -> TransferRecord) -> Result<TransferRecord, CommandError> {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Err(CommandError::TooManyTransfers(MAX_IN_FLIGHT));
        }
        let record = make(self.next_id);
        debug_assert!(record.id == self.next_id && !record.outcome.ended());
        self.next_id += 1;
        self.total += 1;
        self.in_flight.insert(record.id, record.clone());
        Ok(record)
    }

    /// Sets an in-flight transfer's outcome (and error, if given). An
    /// ended one moves to the history, which keeps the newest
    /// `history_len`. Returns false if `id` is not in flight.
    pub fn set_outcome(
        &mut self,
        id: u64,
        outcome: TransferOutcome,
        error: Option<String>,
        history_len: usize,
    ) -> bool {
        let Some(t) = self.in_flight.get_mut(&id) else { return false };
        t.outcome = outcome;
        if let Some(e) = error {
            t.error = e;
        }
        if outcome.ended()
            && let Some(t) = self.in_flight.remove(&id)
        {
            self.history.push_back(t);
            while self.history.len() > history_len {
                self.history.pop_front();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::region::RegionKey;
    use shared::{EntityId, Epoch, ServerId};

    fn record(id: u64) -> TransferRecord {
        TransferRecord {
            id,
            entity: EntityId(id),
            from: ServerId(1),
            to: ServerId(2),
            from_region: RegionKey::root(0, 0, 0),
            to_region: RegionKey::root(1, 0, 0),
            entity_epoch: Epoch(1),
            to_region_epoch: Epoch(1),
            effective_tick: 9,
            committed_at: 0,
            outcome: TransferOutcome::Committed,
            error: String::new(),
        }
    }

    #[test]
    fn an_in_flight_transfer_outlives_any_amount_of_history() {
        let mut t = Transfers::default();
        let first = t.commit(record).unwrap();
        // With a history of 4, a fifth and sixth (and many more) transfers
        // end; the first, still in flight, stays findable.
        for _ in 0..20 {
            let r = t.commit(record).unwrap();
            assert!(t.set_outcome(r.id, TransferOutcome::Delivered, None, 4));
        }
        assert_eq!(t.get(first.id).map(|r| r.outcome), Some(TransferOutcome::Committed));
        assert_eq!(t.in_flight().map(|r| r.id).collect::<Vec<_>>(), [first.id]);
        let recent: Vec<u64> = t.recent().iter().map(|r| r.id).collect();
        assert_eq!(recent, [1, 18, 19, 20, 21]);
        assert_eq!(t.newest(3).iter().map(|r| r.id).collect::<Vec<_>>(), [21, 20, 19]);
        assert_eq!(t.newest(10).last().map(|r| r.id), Some(1));
        assert_eq!(t.total(), 21);
        // It ends like any other; then it is history, and ages out.
        assert!(t.set_outcome(first.id, TransferOutcome::Returned, Some("x".into()), 4));
        assert!(!t.set_outcome(first.id, TransferOutcome::Lost, None, 4), "an ended transfer does not change");
        assert_eq!(t.get(first.id).map(|r| r.error.as_str()), Some("x"));
        for _ in 0..4 {
            let r = t.commit(record).unwrap();
            t.set_outcome(r.id, TransferOutcome::Delivered, None, 4);
        }
        assert_eq!(t.get(first.id), None);
    }

    #[test]
    fn non_final_outcomes_stay_in_flight() {
        let mut t = Transfers::default();
        let r = t.commit(record).unwrap();
        for o in [TransferOutcome::Failed, TransferOutcome::Orphaned] {
            assert!(t.set_outcome(r.id, o, None, 0));
            assert_eq!(t.in_flight_len(), 1, "{o:?}");
        }
        assert!(t.set_outcome(r.id, TransferOutcome::Adopted, None, 0));
        assert_eq!((t.in_flight_len(), t.get(r.id)), (0, None));
    }

    #[test]
    fn a_full_in_flight_set_refuses_by_name() {
        let mut t = Transfers::default();
        for _ in 0..MAX_IN_FLIGHT {
            t.commit(record).unwrap();
        }
        let e = t.commit(record).unwrap_err();
        assert_eq!(e.reason(), "transfers_full");
        // One ends: room again.
        t.set_outcome(1, TransferOutcome::Delivered, None, 10);
        assert!(t.commit(record).is_ok());
    }
}
