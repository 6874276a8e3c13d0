//! Mesh time: every game server ticks on the same wall-clock grid.
//!
//! Tick `n` starts `n / 90` s after a mesh-wide epoch that the coordinator
//! hands out at registration, so servers can agree that something takes effect
//! "at tick N" without a round trip. Times are Unix nanoseconds; the grid is
//! computed with integer arithmetic, so it never drifts.

use serde::{Deserialize, Serialize};

/// Simulation rate, ticks per second.
pub const TICK_HZ: u32 = 90;

/// A tick number on the mesh grid.
pub type Tick = u64;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The mesh's tick grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickClock {
    /// Unix time of the start of tick 0, nanoseconds.
    pub epoch_unix_nanos: u64,
    pub hz: u32,
}

impl TickClock {
    pub fn new(epoch_unix_nanos: u64) -> Self {
        Self { epoch_unix_nanos, hz: TICK_HZ }
    }

    /// Length of one tick, nanoseconds (rounded down; the grid itself is exact).
    pub fn tick_nanos(&self) -> u64 {
        (NANOS_PER_SEC / u128::from(self.hz)) as u64
    }

    /// Unix time at which tick `n` starts.
    pub fn tick_start(&self, n: Tick) -> u64 {
        let offset = u128::from(n) * NANOS_PER_SEC / u128::from(self.hz);
        self.epoch_unix_nanos + offset as u64
    }

    /// The tick in progress at Unix time `t` (0 before the epoch).
    pub fn tick_at(&self, t: u64) -> Tick {
        let since = u128::from(t.saturating_sub(self.epoch_unix_nanos));
        // Largest n with tick_start(n) = floor(n * 1e9 / hz) <= since, that is
        // n * 1e9 < (since + 1) * hz.
        (((since + 1) * u128::from(self.hz) - 1) / NANOS_PER_SEC) as Tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grid_does_not_drift() {
        let c = TickClock::new(1_000);
        assert_eq!(c.tick_start(0), 1_000);
        assert_eq!(c.tick_start(90), 1_000 + 1_000_000_000);
        assert_eq!(c.tick_start(90 * 3600), 1_000 + 3600 * 1_000_000_000);
        assert_eq!(c.tick_at(0), 0);
    }

    proptest! {
        #[test]
        fn tick_at_inverts_tick_start(epoch in 0u64..1 << 62, n in 0u64..1 << 32, into in 0u64..11_111_111) {
            let c = TickClock::new(epoch);
            prop_assert_eq!(c.tick_at(c.tick_start(n)), n);
            let t = c.tick_start(n) + into.min(c.tick_start(n + 1) - c.tick_start(n) - 1);
            prop_assert_eq!(c.tick_at(t), n);
        }
    }
}
