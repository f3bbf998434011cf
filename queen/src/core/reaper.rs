//! Retention: finished tasks past `retention.finished_max_age_s`, or beyond
//! `retention.finished_max_count`, are purged in bounded batches so a purge never stalls
//! dispatch.

use std::time::Duration;

use tokio::time::Instant;

use super::{Core, Now};
use crate::store::Mutation;

/// Most expired finished tasks purged per purge pass, so a purge never stalls dispatch.
const PURGE_BATCH: usize = 1_000;
/// Pause between purge batches while a backlog remains: keeps purging from competing
/// with dispatch for the writer.
const PURGE_BACKLOG_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct Reaper {
    next_purge: Instant,
}

impl Reaper {
    pub fn new(now: Now) -> Reaper {
        Reaper {
            next_purge: now.mono,
        }
    }
}

impl Core {
    pub(super) fn purge_if_due(&mut self, now: Now) {
        if now.mono < self.reaper.next_purge {
            return;
        }
        self.reaper.next_purge =
            now.mono + Duration::from_millis(self.cfg.retention.purge_interval_ms);
        self.purge(now);
    }

    /// One batch of expired finished tasks, oldest first.
    fn purge(&mut self, now: Now) {
        let age = chrono::Duration::seconds(
            self.cfg
                .retention
                .finished_max_age_s
                .min(i64::MAX as u64 / 1000) as i64,
        );
        let cutoff = (now.wall - age).timestamp_millis();
        let max_count = self.cfg.retention.finished_max_count;
        let total: u64 = self.ledger.finished_counts.values().sum();
        let over = if max_count > 0 {
            total.saturating_sub(max_count)
        } else {
            0
        };
        // The retention index is oldest first, so the tasks past the age limit are also
        // the first to go when there are too many.
        let Ok(mut expired) = self.read(self.lookup.expired(cutoff, PURGE_BATCH), "expired tasks")
        else {
            return;
        };
        if (expired.len() as u64) < over {
            let limit = over.min(PURGE_BATCH as u64) as usize;
            let Ok(by_count) = self.read(self.lookup.expired(i64::MAX, limit), "expired tasks")
            else {
                return;
            };
            expired = by_count;
        }
        // A task retried since its finished record was read is active again.
        expired.retain(|e| !self.ledger.tasks.contains(&e.id));
        if expired.len() >= PURGE_BATCH {
            // A backlog: come back soon rather than after a whole purge interval.
            self.reaper.next_purge = now.mono + PURGE_BACKLOG_PAUSE;
        }
        if expired.is_empty() {
            return;
        }
        tracing::info!(
            count = expired.len(),
            "purging finished tasks past retention"
        );
        let mut mutations = Vec::with_capacity(expired.len());
        for e in expired {
            let n = self
                .ledger
                .finished_counts
                .entry((e.entry.queue.clone(), e.entry.state))
                .or_default();
            *n = n.saturating_sub(1);
            mutations.push(Mutation::Purge {
                count: *n,
                expired: e,
            });
        }
        self.fx.write(mutations);
    }
}
