//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Full jitter (a uniform delay between zero and the exponential ceiling) spreads a fleet of
//! drones that lost their queen at the same instant, so a restarted queen is not hit by all
//! of them in the same millisecond. The cap keeps a drone from sleeping through a queen
//! that has long been back.

use std::time::Duration;

use rand::Rng;

/// The ceiling of the first retry (100 ms): a blip in the network costs almost nothing.
pub const DEFAULT_BASE: Duration = Duration::from_millis(100);

/// Each failed attempt doubles the ceiling.
pub const DEFAULT_FACTOR: u32 = 2;

/// No retry waits longer than 5 s, so a drone is back within seconds of its queen, and
/// well within the queen's heartbeat timeout, which is what lets it keep its leases.
pub const DEFAULT_CAP: Duration = Duration::from_secs(5);

/// The backoff rule; pure, so the delays are unit-tested without sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    factor: u32,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_BASE, DEFAULT_FACTOR, DEFAULT_CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, factor: u32, cap: Duration) -> Self {
        Backoff { base, factor, cap }
    }

    /// This backoff with its cap lowered to a third of the queen's heartbeat timeout (never
    /// below the base): a drone retries at least three times within the window in which a
    /// restarted queen keeps its leases for it.
    pub fn capped_for(&self, heartbeat_timeout: Duration) -> Backoff {
        let cap = DEFAULT_CAP.min(heartbeat_timeout / 3).max(self.base);
        Backoff { cap, ..*self }
    }

    /// The longest wait before retry number `attempt` (0 for the first retry):
    /// `min(cap, base * factor^attempt)`, without overflowing however many attempts failed.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let growth = self.factor.checked_pow(attempt).unwrap_or(u32::MAX);
        self.base
            .checked_mul(growth)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The wait before retry number `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn the_ceiling_doubles_from_the_base() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(2), Duration::from_millis(400));
        assert_eq!(b.ceiling(5), Duration::from_millis(3200));
    }

    #[test]
    fn the_ceiling_is_capped_and_never_overflows() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(6), DEFAULT_CAP, "6400 ms must be capped to 5 s");
        assert_eq!(b.ceiling(64), DEFAULT_CAP);
        assert_eq!(b.ceiling(u32::MAX), DEFAULT_CAP);
    }

    #[test]
    fn jitter_stays_between_zero_and_the_ceiling_and_actually_varies() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..20 {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                let d = b.delay(attempt, &mut rng);
                assert!(
                    d <= b.ceiling(attempt),
                    "{d:?} above {:?}",
                    b.ceiling(attempt)
                );
                seen.insert(d);
            }
            // A constant delay would mean no jitter: drones would retry in lockstep.
            assert!(
                seen.len() > 10,
                "attempt {attempt}: only {} distinct delays",
                seen.len()
            );
        }
    }

    #[test]
    fn delays_grow_on_average_until_the_cap() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(42);
        let mean = |attempt: u32, rng: &mut StdRng| {
            let total: Duration = (0..500).map(|_| b.delay(attempt, rng)).sum();
            total / 500
        };
        let m0 = mean(0, &mut rng);
        let m3 = mean(3, &mut rng);
        let m10 = mean(10, &mut rng);
        assert!(m0 < m3 && m3 < m10, "{m0:?} {m3:?} {m10:?}");
        // Full jitter over [0, 5 s] averages about 2.5 s.
        assert!(
            m10 > Duration::from_secs(2) && m10 < Duration::from_secs(3),
            "{m10:?}"
        );
    }

    #[test]
    fn the_cap_fits_three_tries_into_the_heartbeat_timeout() {
        let b = Backoff::default();
        assert_eq!(
            b.capped_for(Duration::from_secs(6)).ceiling(30),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.capped_for(Duration::from_secs(60)).ceiling(30),
            DEFAULT_CAP
        );
        assert_eq!(
            b.capped_for(Duration::from_millis(90)).ceiling(30),
            DEFAULT_BASE
        );
    }
}
