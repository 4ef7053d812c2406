//! The one backoff policy: every wait-and-try-again loop of the bridge (publisher and consumer
//! reconnects, in-place retries of an IPN, PayPal postbacks, alert deliveries) uses [`Backoff`].
//!
//! Doubling from `min` up to `max`, saturating (never overflowing `Duration`), with "equal
//! jitter": each wait is drawn from the upper half of the current step, so processes that failed
//! together (every worker after a broker restart) do not retry in lock-step, and no wait is
//! shorter than half the step.

use std::time::Duration;

/// A doubling, capped, jittered sequence of waits.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Waits from `min`, doubling up to `max` (a `max` below `min` is taken as `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The next wait: between half the current step and the step, which then doubles.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = self.step.saturating_mul(2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=spread))
    }

    /// Starts again from `min` (after a success).
    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// Sleeps for [`Backoff::next_wait`].
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_their_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        for step in [1, 2, 4, 8, 8, 8] {
            let wait = backoff.next_wait();
            let step = Duration::from_secs(step);
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for a step of {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_secs(1));
    }

    #[test]
    fn huge_steps_saturate_instead_of_overflowing() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..200 {
            let _ = backoff.next_wait();
        }
        assert!(backoff.next_wait() >= Duration::MAX / 2);
    }

    #[test]
    fn jitter_spreads_processes_that_failed_together() {
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(10), Duration::from_secs(60)).next_wait())
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }
}
