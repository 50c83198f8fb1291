//! Reconnect backoff: the first attempt after a stable connection waits a random delay in
//! `[0, spread]` (the agents of a node that just went away must not all handshake with the
//! remaining nodes in the same instant), then exponential with jitter, capped. The very first
//! attempt at start is immediate. The default cap is 1 s, below upstream's 10 s: the agent
//! must be subscribed again within 2 s of the director's NATS becoming reachable, whatever the
//! outage's length, and an attempt during an outage costs a lookup and a refused dial. Jitter
//! (each delay uniform in [d/2, d]) spreads a fleet's reconnects over half a second.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay before the second consecutive attempt (before jitter); doubles after each failure.
    pub base: Duration,
    /// No delay exceeds this.
    pub cap: Duration,
    /// A connection that lasted at least this long resets the backoff, so the next attempt is
    /// immediate. A shorter one (a server accepting then dropping us) does not, which stops
    /// a flapping server from causing a tight reconnect loop.
    pub stable_after: Duration,
    /// The first attempt after a stable connection ended waits a uniformly random delay up to
    /// this: a fleet whose server went away reconnects spread over this window instead of in
    /// one burst.
    pub spread: Duration,
}

impl Default for BackoffPolicy {
    /// 250 ms base, 1 s cap, 1 s to count as stable, 500 ms spread: retries at ≤0.5 (0 at
    /// start), ≤0.25, ≤0.5, ≤1, ≤1 s…, so a director back after any outage is reached again
    /// within about 1 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(1),
            stable_after: Duration::from_secs(1),
            spread: Duration::from_millis(500),
        }
    }
}

/// Backoff state: counts consecutive failed attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    /// The next zero-failure attempt follows a connection that ended: spread it.
    after_connection: bool,
}

impl Backoff {
    /// Fresh state: the first delay is zero.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            after_connection: false,
        }
    }

    /// The delay to wait before the next attempt, and counts that attempt. Zero first (a
    /// uniformly random delay in `[0, spread]` when a stable connection just ended); then
    /// `d = min(cap, base·2^(n-1))` and a uniformly random delay in `[d/2, d]` ("equal jitter",
    /// so agents of a whole deployment do not reconnect in lockstep).
    pub fn next_delay(&mut self) -> Duration {
        let n = self.failures;
        self.failures = n.saturating_add(1);
        if n == 0 {
            let spread = std::mem::take(&mut self.after_connection);
            return if spread {
                uniform_up_to(self.policy.spread)
            } else {
                Duration::ZERO
            };
        }
        let factor = 1u32
            .checked_shl(n.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        let d = self.policy.base.saturating_mul(factor).min(self.policy.cap);
        let half = d / 2;
        half + uniform_up_to(half)
    }

    /// Call when a connection ended; resets if it was stable (see [`BackoffPolicy`]), and
    /// then the next attempt is spread.
    pub fn connection_ended(&mut self, lasted: Duration) {
        if lasted >= self.policy.stable_after {
            self.failures = 0;
            self.after_connection = true;
        }
    }
}

/// When a bus connected anywhere but its first endpoint (its "home", the first of
/// [`crate::dial_order`]) goes back there. After a node of a cluster went away, its agents
/// spread over the others; without a way back, the node returns empty, and after every node
/// restarted the one ready first holds most of the fleet, so that losing it next moves most of
/// the fleet at once. Each agent away from home waits a uniformly random delay in
/// `[min, max]`, tries its home alone, and if it answers (and is one cluster with the current
/// server) moves there make-before-break; otherwise it stays and tries again after another
/// such delay. A fleet thus comes back to its spread within `max`, at a rate of about
/// `agents ÷ (max − min)` a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnHome {
    /// Shortest wait after connecting away from home (and between tries).
    pub min: Duration,
    /// Longest wait; the window is what spreads a fleet's moves.
    pub max: Duration,
}

impl Default for ReturnHome {
    /// 60–300 s: long past a node's restart, and 1,000 agents move at about 4 a second.
    fn default() -> Self {
        Self {
            min: Duration::from_secs(60),
            max: Duration::from_secs(300),
        }
    }
}

impl ReturnHome {
    /// One wait, uniform in `[min, max]` (`min` alone when `max` is not above it).
    pub fn draw(&self) -> Duration {
        self.min + uniform_up_to(self.max.saturating_sub(self.min))
    }
}

/// A uniformly random duration in `[0, max]` (nanosecond steps).
fn uniform_up_to(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random_u64() % nanos.saturating_add(1))
}

/// Jitter source without a rand dependency: std's `RandomState` is seeded randomly per thread
/// and each instance is distinct. Plenty for spreading reconnects.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_capped_jittered_and_resets() {
        let p = BackoffPolicy::default();
        let mut b = Backoff::new(p);
        assert_eq!(b.next_delay(), Duration::ZERO);
        let mut expected = p.base;
        for _ in 0..40 {
            let d = b.next_delay();
            let full = expected.min(p.cap);
            assert!(
                d >= full / 2 && d <= full,
                "{d:?} not in [{:?}, {full:?}]",
                full / 2
            );
            expected = expected.saturating_mul(2);
        }
        b.connection_ended(Duration::from_millis(100));
        assert!(
            b.next_delay() >= p.cap / 2,
            "short connection must not reset"
        );
        b.connection_ended(p.stable_after);
        assert!(
            b.next_delay() <= p.spread,
            "after a stable connection the first attempt is spread"
        );
        assert!(b.next_delay() <= p.base, "then the schedule starts again");
    }

    #[test]
    fn the_first_attempt_at_start_is_immediate_and_reconnects_spread_over_the_window() {
        let p = BackoffPolicy::default();
        assert_eq!(Backoff::new(p).next_delay(), Duration::ZERO);
        // Many agents whose connection ended at once: their first attempts fill the window
        // (ten 50 ms buckets), none beyond it.
        let mut buckets = [0u32; 10];
        for _ in 0..2000 {
            let mut b = Backoff::new(p);
            assert_eq!(b.next_delay(), Duration::ZERO);
            b.connection_ended(p.stable_after);
            let d = b.next_delay();
            assert!(d <= p.spread, "{d:?}");
            let i = (d.as_millis() / 50).min(9) as usize;
            buckets[i] += 1;
        }
        // The mean is 200 a bucket; a spread that works keeps every bucket well below 3×.
        assert!(buckets.iter().all(|&n| n > 100 && n < 320), "{buckets:?}");
        // No spread configured: immediate, as before.
        let mut b = Backoff::new(BackoffPolicy {
            spread: Duration::ZERO,
            ..p
        });
        b.next_delay();
        b.connection_ended(p.stable_after);
        assert_eq!(b.next_delay(), Duration::ZERO);
    }

    #[test]
    fn return_home_waits_fill_their_window() {
        let w = ReturnHome {
            min: Duration::from_millis(1000),
            max: Duration::from_millis(1500),
        };
        let mut buckets = [0u32; 10];
        for _ in 0..2000 {
            let d = w.draw();
            assert!(d >= w.min && d <= w.max, "{d:?}");
            buckets[((d.as_millis() - 1000) / 50).min(9) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 100 && n < 320), "{buckets:?}");
        // A degenerate window is its minimum, never below it nor a panic.
        let flat = ReturnHome {
            min: Duration::from_secs(2),
            max: Duration::from_secs(1),
        };
        assert_eq!(flat.draw(), Duration::from_secs(2));
        let d = ReturnHome::default();
        assert!(d.min >= Duration::from_secs(30) && d.max > d.min);
    }
}
