//! Reconnect backoff. The very first attempt at start is immediate, then exponential with
//! jitter, capped. The default cap is 1 s, below upstream's 10 s: the agent must be subscribed
//! again within 2 s of the director's NATS becoming reachable, whatever the outage's length,
//! and an attempt during an outage costs a lookup and a refused dial.
//!
//! After a stable connection ended the schedule is periodic instead: the first attempt waits a
//! uniformly random delay in `[0, spread]` and every later one about one `cap` (within its last
//! fiftieth). A lost connection is an event the whole fleet shares: every agent of a node that went
//! away, or of a cluster that restarted, starts retrying in the same instant. The first draw
//! gives each agent its own phase, and near-fixed periods keep those phases apart, so that the
//! node that listens first meets the fleet's retries spread over a whole period. Short early
//! intervals would instead squeeze them all into the first 125–250 ms after it is back.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay before the second consecutive attempt (before jitter); doubles after each failure.
    pub base: Duration,
    /// No delay exceeds this.
    pub cap: Duration,
    /// A connection that lasted at least this long resets the backoff: the next attempt is
    /// spread and the later ones periodic. A shorter one (a server accepting then dropping us)
    /// does not, which stops a flapping server from causing a tight reconnect loop.
    pub stable_after: Duration,
    /// The first attempt after a stable connection ended waits a uniformly random delay up to
    /// this: a fleet whose server went away reconnects spread over this window instead of in
    /// one burst. Later attempts of that outage come about one `cap` apart, so a spread equal
    /// to the cap spreads them over a whole period.
    pub spread: Duration,
}

impl Default for BackoffPolicy {
    /// 250 ms base, 1 s cap, 1 s to count as stable, 1 s spread: at start retries at 0, ≤0.25,
    /// ≤0.5, ≤1, ≤1 s…; after a lost connection at ≤1 s and then every 0.98–1 s. A director back
    /// after any outage is reached again within about 1 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(1),
            stable_after: Duration::from_secs(1),
            spread: Duration::from_secs(1),
        }
    }
}

/// Backoff state: counts consecutive failed attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    /// A connection just ended: the next attempt draws a fresh phase.
    after_connection: bool,
    /// A stable connection has ended before: retries are periodic (see the module doc).
    periodic: bool,
}

impl Backoff {
    /// Fresh state: the first delay is zero.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            after_connection: false,
            periodic: false,
        }
    }

    /// The delay to wait before the next attempt, and counts that attempt.
    /// - At start: zero, then `d = min(cap, base·2^(n-1))` and a uniformly random delay in
    ///   `[d/2, d]` ("equal jitter", so agents of a whole deployment do not reconnect in
    ///   lockstep).
    /// - Right after a stable connection ended: uniformly random in `[0, spread]`; from then
    ///   on `d` is the cap and the delay uniformly random in `[d·49/50, d]`, which keeps the
    ///   phase that draw gave (a wider jitter would blur the agents that failed early into
    ///   the ones still on their first attempt).
    /// - Right after a short connection ended (one that did not reset the count): uniformly
    ///   random in `[0, d]`, a fresh phase over a whole step. The agents a node accepted and
    ///   then lost in the same instant (a cluster stopping node after node) must not retry in
    ///   lockstep either.
    pub fn next_delay(&mut self) -> Duration {
        let n = self.failures;
        self.failures = n.saturating_add(1);
        let ended = std::mem::take(&mut self.after_connection);
        if n == 0 {
            return if ended {
                uniform_up_to(self.policy.spread)
            } else {
                Duration::ZERO
            };
        }
        let d = if self.periodic {
            self.policy.cap
        } else {
            let factor = 1u32
                .checked_shl(n.saturating_sub(1).min(31))
                .unwrap_or(u32::MAX);
            self.policy.base.saturating_mul(factor).min(self.policy.cap)
        };
        let jitter = match (ended, self.periodic) {
            (true, _) => d,
            (false, true) => d / 50,
            (false, false) => d / 2,
        };
        d - jitter + uniform_up_to(jitter)
    }

    /// Call when a connection ended. A stable one (see [`BackoffPolicy`]) resets the count:
    /// the next attempt is spread and the later ones periodic. A short one does not, so a
    /// server that accepts and drops cannot cause a tight loop; the next attempt still draws
    /// a fresh phase.
    pub fn connection_ended(&mut self, lasted: Duration) {
        self.after_connection = true;
        if lasted >= self.policy.stable_after {
            self.failures = 0;
            self.periodic = true;
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
        assert!(b.next_delay() <= p.cap, "a fresh phase within the step");
        assert!(
            b.next_delay() >= p.cap / 2,
            "short connection must not reset"
        );
        b.connection_ended(p.stable_after);
        assert!(
            b.next_delay() <= p.spread,
            "after a stable connection the first attempt is spread"
        );
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= p.cap - p.cap / 50 && d <= p.cap,
                "after a lost connection the retries are periodic: {d:?}"
            );
        }
        // A flapping server (short connections) keeps the period: a fresh phase within one
        // cap, then the period again; it never resets to an immediate attempt.
        b.connection_ended(Duration::from_millis(10));
        assert!(b.next_delay() <= p.cap);
        assert!(b.next_delay() >= p.cap - p.cap / 50);
    }

    #[test]
    fn agents_that_lose_a_short_connection_together_retry_spread_over_a_step() {
        // A cluster stopped node after node: the agents that had just moved to the second node
        // lose that connection in one instant, before it counted as stable.
        let p = BackoffPolicy::default();
        let mut buckets = [0u32; 10];
        for _ in 0..2000 {
            let mut b = Backoff::new(p);
            b.next_delay();
            b.connection_ended(p.stable_after);
            b.next_delay();
            b.connection_ended(Duration::from_millis(300));
            let d = b.next_delay();
            assert!(d <= p.cap, "{d:?}");
            buckets[(d.as_nanos() * 10 / p.cap.as_nanos()).min(9) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 100 && n < 400), "{buckets:?}");
        // At start, before any stable connection, a short one redraws within the current step.
        let mut b = Backoff::new(p);
        assert_eq!(b.next_delay(), Duration::ZERO);
        b.connection_ended(Duration::from_millis(10));
        assert!(b.next_delay() <= p.base);
        assert!(b.next_delay() >= p.base);
    }

    #[test]
    fn a_fleet_that_lost_its_server_meets_a_returning_node_spread_over_a_period() {
        // 2,000 agents lose their connection at t = 0; the first node listens again at `back`,
        // an instant no agent knows. Each agent's first attempt at or after `back` is where it
        // lands. Those landings must fill one period in 100 ms buckets, none above 2× the mean
        // (the exponential start would put them all in the first 250 ms).
        let p = BackoffPolicy::default();
        for back in [Duration::from_millis(370), Duration::from_millis(2_430)] {
            let mut buckets = [0u32; 10];
            for _ in 0..2000 {
                let mut b = Backoff::new(p);
                b.next_delay();
                b.connection_ended(p.stable_after);
                let mut t = Duration::ZERO;
                while t < back {
                    t += b.next_delay();
                }
                let i = ((t - back).as_millis() / 100) as usize;
                assert!(i < 10, "landed {:?} after the node was back", t - back);
                buckets[i] += 1;
            }
            // The last bucket is the jitter's ramp (about half the others), not a gap.
            assert!(
                buckets.iter().all(|&n| n > 50 && n < 400),
                "{back:?}: {buckets:?}"
            );
        }
    }

    #[test]
    fn the_first_attempt_at_start_is_immediate_and_reconnects_spread_over_the_window() {
        let p = BackoffPolicy::default();
        assert_eq!(Backoff::new(p).next_delay(), Duration::ZERO);
        // Many agents whose connection ended at once: their first attempts fill the window
        // (ten buckets), none beyond it.
        let mut buckets = [0u32; 10];
        for _ in 0..2000 {
            let mut b = Backoff::new(p);
            assert_eq!(b.next_delay(), Duration::ZERO);
            b.connection_ended(p.stable_after);
            let d = b.next_delay();
            assert!(d <= p.spread, "{d:?}");
            let i = (d.as_nanos() * 10 / p.spread.as_nanos()).min(9) as usize;
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
