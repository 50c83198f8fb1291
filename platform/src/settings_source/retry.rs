//! Retries with exponential backoff and jitter: thousands of VMs booting against a metadata
//! service that is down must neither hammer it in step nor wait forever.
//!
//! The wait before retry `n` (1-based) is drawn from `[d/2, d]` with
//! `d = min(max_delay, initial_delay · 2^(n-1))` ("equal jitter": spread, yet never back to
//! back); at most `attempts` tries, and no try starts after `max_elapsed`.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use super::error::FetchError;

/// How often and how patiently one request is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (at least one is always made).
    pub attempts: u32,
    /// The base of the first wait.
    pub initial_delay: Duration,
    /// The base of any wait is at most this.
    pub max_delay: Duration,
    /// No wait ends later than this after the first try started.
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// For the metadata service: upstream's 10 tries, waits of 0.125–0.25 s growing to 2–4 s,
    /// about 12–24 s of waiting in all, never past one minute.
    pub const METADATA: RetryPolicy = RetryPolicy {
        attempts: 10,
        initial_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(4),
        max_elapsed: Duration::from_secs(60),
    };

    /// For a CD-ROM to show its medium: about upstream's five half-second checks.
    pub const DEVICE: RetryPolicy = RetryPolicy {
        attempts: 6,
        initial_delay: Duration::from_millis(500),
        max_delay: Duration::from_millis(500),
        max_elapsed: Duration::from_secs(10),
    };

    /// The wait before retry `retry` (1 for the second try), given a random number.
    pub fn delay_before(&self, retry: u32, random: u64) -> Duration {
        let shift = retry.saturating_sub(1).min(30);
        let base = self
            .initial_delay
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let half = base / 2;
        let spread = (base - half).as_nanos().min(u128::from(u64::MAX)) as u64;
        let jitter = if spread == 0 {
            0
        } else {
            random % (spread + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Runs `op` (given the try number, from 1) until it succeeds, fails for good, or the
    /// policy is spent; the error of the last try is returned, wrapped in
    /// [`FetchError::GaveUp`] when there was more than one.
    pub(crate) fn run<T>(
        &self,
        what: &str,
        mut op: impl FnMut(u32) -> Result<T, Verdict>,
    ) -> Result<T, FetchError> {
        let start = Instant::now();
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        loop {
            let error = match op(attempt) {
                Ok(v) => return Ok(v),
                Err(Verdict::Final(e)) => return Err(gave_up(e, attempt)),
                Err(Verdict::Retry(e)) => e,
            };
            let delay = self.delay_before(attempt, random());
            if attempt >= attempts || start.elapsed() + delay > self.max_elapsed {
                return Err(gave_up(error, attempt));
            }
            tracing::warn!(
                what = %super::error::redact_url(what),
                attempt,
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "settings source: retrying"
            );
            std::thread::sleep(delay);
            attempt += 1;
        }
    }
}

fn gave_up(e: FetchError, attempts: u32) -> FetchError {
    if attempts > 1 {
        FetchError::GaveUp {
            attempts,
            last: Box::new(e),
        }
    } else {
        e
    }
}

/// Whether a failed try is worth another.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A passing fault (no answer, 5xx, 429, 408).
    Retry(FetchError),
    /// Another try would give the same answer.
    Final(FetchError),
}

/// A random number for the jitter: std's hasher keys are random per process and differ for
/// each `RandomState`, so no generator crate is needed for this.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy = RetryPolicy {
        attempts: 10,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1600),
        max_elapsed: Duration::from_secs(60),
    };

    #[test]
    fn waits_double_up_to_the_cap_and_stay_within_half_to_full() {
        let bases = [100, 200, 400, 800, 1600, 1600, 1600, 1600, 1600];
        for (i, base) in bases.iter().enumerate() {
            let retry = i as u32 + 1;
            let base = Duration::from_millis(*base);
            assert_eq!(P.delay_before(retry, 0), base / 2, "retry {retry}");
            for r in [1u64, 7, 12_345, 987_654_321, u64::MAX] {
                let d = P.delay_before(retry, r);
                assert!(
                    d >= base / 2 && d <= base,
                    "retry {retry} random {r}: {d:?}"
                );
            }
            let top = (base - base / 2).as_nanos() as u64;
            assert_eq!(P.delay_before(retry, top), base);
        }
    }

    #[test]
    fn huge_retry_numbers_and_zero_delays_do_not_overflow() {
        assert!(P.delay_before(u32::MAX, u64::MAX) <= P.max_delay);
        let zero = RetryPolicy {
            initial_delay: Duration::ZERO,
            ..P
        };
        assert_eq!(zero.delay_before(5, 99), Duration::ZERO);
    }

    #[test]
    fn the_default_policies_are_bounded() {
        for p in [RetryPolicy::METADATA, RetryPolicy::DEVICE] {
            let worst: Duration = (1..p.attempts).map(|n| p.delay_before(n, u64::MAX)).sum();
            assert!(worst <= p.max_elapsed, "{p:?}: {worst:?}");
        }
        let m = RetryPolicy::METADATA;
        let least: Duration = (1..m.attempts).map(|n| m.delay_before(n, 0)).sum();
        assert!(least >= Duration::from_secs(10), "{least:?}");
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_elapsed: Duration::from_secs(5),
        }
    }

    fn fault() -> FetchError {
        FetchError::Unsupported("T")
    }

    #[test]
    fn run_counts_tries_and_stops_on_success_or_final() {
        let mut n = 0;
        let r = quick(4).run("x", |_| {
            n += 1;
            Err::<(), _>(Verdict::Retry(fault()))
        });
        assert_eq!(n, 4);
        assert!(
            matches!(r, Err(FetchError::GaveUp { attempts: 4, .. })),
            "{r:?}"
        );

        let mut n = 0;
        let r = quick(4).run("x", |a| {
            n += 1;
            if a < 3 {
                Err(Verdict::Retry(fault()))
            } else {
                Ok(a)
            }
        });
        assert_eq!((n, r.ok()), (3, Some(3)));

        let mut n = 0;
        let r = quick(4).run("x", |_| {
            n += 1;
            Err::<(), _>(Verdict::Final(fault()))
        });
        assert_eq!(n, 1);
        assert!(matches!(r, Err(FetchError::Unsupported(_))), "{r:?}");

        // Zero attempts still tries once.
        let mut n = 0;
        let _ = quick(0).run("x", |_| {
            n += 1;
            Err::<(), _>(Verdict::Retry(fault()))
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn run_stops_when_the_next_wait_would_pass_the_deadline() {
        let p = RetryPolicy {
            attempts: 100,
            initial_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(1),
        };
        let mut n = 0;
        let r = p.run("x", |_| {
            n += 1;
            Err::<(), _>(Verdict::Retry(fault()))
        });
        assert_eq!(n, 1);
        assert!(r.is_err());
    }
}
