//! Per-queue controls: pause, a concurrency limit (tasks running across the hive) and a
//! rate limit (tasks started per second, as a token bucket). Pure: callers pass `now`.

use std::time::Duration;

use tokio::time::Instant;

/// What an operator set for a queue; durable.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSettings {
    /// Running tasks finish; nothing new is leased.
    pub paused: bool,
    /// Most tasks of this queue running at once across the hive.
    pub max_running: Option<u32>,
    /// Most tasks of this queue started per second.
    pub rate_per_s: Option<f64>,
}

/// A queue's settings and the live numbers that enforce them.
#[derive(Debug, Clone, Default)]
pub struct QueueState {
    pub settings: QueueSettings,
    pub running: u32,
    bucket: Option<Bucket>,
}

/// A token bucket holding at most one second's worth of starts (at least one), so a rate
/// limit allows a small burst after idling but never more than a second's quota.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl QueueState {
    pub fn new(settings: QueueSettings) -> QueueState {
        QueueState {
            settings,
            running: 0,
            bucket: None,
        }
    }

    fn burst(rate: f64) -> f64 {
        rate.max(1.0)
    }

    fn tokens(&self, rate: f64, now: Instant) -> f64 {
        match self.bucket {
            None => Self::burst(rate),
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                (b.tokens + elapsed * rate).min(Self::burst(rate))
            }
        }
    }

    /// Whether a task of this queue may start now.
    pub fn may_start(&self, now: Instant) -> bool {
        if self.settings.paused {
            return false;
        }
        if self
            .settings
            .max_running
            .is_some_and(|max| self.running >= max)
        {
            return false;
        }
        match self.settings.rate_per_s {
            Some(rate) => self.tokens(rate, now) >= 1.0,
            None => true,
        }
    }

    /// Records a start (call only after `may_start`).
    pub fn started(&mut self, now: Instant) {
        self.running += 1;
        if let Some(rate) = self.settings.rate_per_s {
            let tokens = self.tokens(rate, now) - 1.0;
            self.bucket = Some(Bucket { tokens, at: now });
        }
    }

    /// Records that one running task of this queue stopped running.
    pub fn ended(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// When a rate-limited queue will next have a token (None: not rate-limited or ready).
    pub fn next_token(&self, now: Instant) -> Option<Instant> {
        let rate = self.settings.rate_per_s?;
        let have = self.tokens(rate, now);
        (have < 1.0).then(|| now + Duration::from_secs_f64((1.0 - have) / rate))
    }

    pub fn set(&mut self, settings: QueueSettings) {
        if settings.rate_per_s != self.settings.rate_per_s {
            self.bucket = None;
        }
        self.settings = settings;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_queue_starts_nothing() {
        let q = QueueState::new(QueueSettings {
            paused: true,
            ..Default::default()
        });
        assert!(!q.may_start(Instant::now()));
    }

    #[test]
    fn the_concurrency_limit_counts_running_tasks() {
        let now = Instant::now();
        let mut q = QueueState::new(QueueSettings {
            max_running: Some(2),
            ..Default::default()
        });
        q.started(now);
        assert!(q.may_start(now));
        q.started(now);
        assert!(!q.may_start(now));
        q.ended();
        assert!(q.may_start(now));
    }

    #[test]
    fn the_rate_limit_refills_over_time() {
        let t0 = Instant::now();
        let mut q = QueueState::new(QueueSettings {
            rate_per_s: Some(2.0),
            ..Default::default()
        });
        // A burst of one second's quota, then one start per half second.
        q.started(t0);
        q.started(t0);
        assert!(!q.may_start(t0));
        let next = q.next_token(t0).expect("rate limited");
        assert_eq!(next - t0, Duration::from_millis(500));
        assert!(!q.may_start(t0 + Duration::from_millis(499)));
        assert!(q.may_start(t0 + Duration::from_millis(500)));
        // Idling never banks more than a second's quota.
        let later = t0 + Duration::from_secs(60);
        q.started(later);
        q.started(later);
        assert!(!q.may_start(later));
    }
}
