//! Reconnect backoff: the first attempt after a stable connection is immediate, then
//! exponential with jitter, capped. The default cap is 1 s, below upstream's 10 s: the agent
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
}

impl Default for BackoffPolicy {
    /// 250 ms base, 1 s cap, 1 s to count as stable: retries at 0, ≤0.25, ≤0.5, ≤1, ≤1 s…,
    /// so a director back after any outage is reached again within about 1 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(1),
            stable_after: Duration::from_secs(1),
        }
    }
}

/// Backoff state: counts consecutive failed attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    /// Fresh state: the first delay is zero.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// The delay to wait before the next attempt, and counts that attempt. Zero first; then
    /// `d = min(cap, base·2^(n-1))` and a uniformly random delay in `[d/2, d]` ("equal jitter",
    /// so agents of a whole deployment do not reconnect in lockstep).
    pub fn next_delay(&mut self) -> Duration {
        let n = self.failures;
        self.failures = n.saturating_add(1);
        if n == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32
            .checked_shl(n.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        let d = self.policy.base.saturating_mul(factor).min(self.policy.cap);
        let half = d / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if nanos == 0 {
            0
        } else {
            random_u64() % (nanos + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Call when a connection ended; resets if it was stable (see [`BackoffPolicy`]).
    pub fn connection_ended(&mut self, lasted: Duration) {
        if lasted >= self.policy.stable_after {
            self.failures = 0;
        }
    }
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
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
