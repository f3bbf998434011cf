//! How a running attempt ends: an outcome reported under the current fence, a failure,
//! a lease lost with its drone, or the queen-side attempt deadline. Each is one lifecycle
//! event; this room takes the task out of the running room, applies the event, and puts
//! the task where its new state says (G3, G8 in docs/GUARANTEES.md).

use rand::Rng;
use serde_json::Value;
use shared::api::TaskState;
use shared::protocol::{Ack, AckStatus, QueenMessage};
use shared::{DroneId, Fence, TaskId};

use super::lifecycle::{self, Event, Moved};
use super::{Core, Now};
use crate::rules::{self, QuarantineRules, Verdict};
use crate::task::Task;

/// What a drone reported: a result, or (error, retryable, partial result).
pub(super) type Reported = Result<Value, (String, bool, Option<Value>)>;

impl Core {
    /// A drone reported the outcome of an attempt. Only the lease holder's report under
    /// the current fence is recorded; anything else is acked `stale` and changes nothing.
    pub(super) fn outcome(
        &mut self,
        drone_id: DroneId,
        task_id: TaskId,
        fence: Fence,
        outcome: Reported,
        now: Now,
    ) {
        // Only the lease holder may record: a fence is a small number another drone could
        // guess, so an outcome from any other drone is stale whatever fence it carries.
        let current = self
            .ledger
            .tasks
            .get(&task_id)
            .filter(|t| t.lease.as_ref().is_some_and(|l| l.drone == drone_id))
            .map(|t| (t.state, t.fence));
        let verdict = rules::judge_outcome(current, fence);
        let Some(drone) = self.fleet.drones.get_mut(&drone_id) else {
            return;
        };
        drone.cancelling.remove(&task_id);
        drone.reported.insert(task_id);
        if drone.leases.get(&task_id).is_some_and(|l| l.fence == fence) {
            drone.leases.remove(&task_id);
        }
        // A stopped suspect that reports at last no longer holds the drone alone.
        drone.settle_isolation();
        let conn = drone.conn.clone();
        self.dispatch.slot_may_have_freed(drone_id);
        let status = match verdict {
            Verdict::Stale => {
                self.metrics.stale_completions.inc();
                tracing::info!(task_id = %task_id, drone = %drone_id, fence = %fence, current = ?current, "stale outcome ignored");
                AckStatus::Stale
            }
            Verdict::Record => {
                self.fleet.orphans.remove(&task_id);
                let event = match outcome {
                    Ok(result) => Event::Complete { result },
                    Err((error, retryable, result)) => {
                        self.failure(error, retryable, result, Some(drone_id))
                    }
                };
                self.end_running(task_id, event, now);
                AckStatus::Recorded
            }
        };
        // Acked once everything before it is durable, the outcome included.
        let ack = QueenMessage::Ack(Ack {
            task_id,
            fence,
            status,
        });
        self.fx.send_when_durable(Vec::new(), &conn, ack);
    }

    /// A failed attempt as an event, with a jitter sample for its backoff.
    fn failure(
        &mut self,
        error: String,
        retryable: bool,
        result: Option<Value>,
        drone: Option<DroneId>,
    ) -> Event {
        Event::AttemptFailed {
            error,
            retryable,
            result,
            drone,
            policy: self.ledger.retry,
            jitter: self.ledger.rng.random(),
        }
    }

    /// The quarantine settings, with the correlation window.
    pub(super) fn quarantine_rules(&self) -> QuarantineRules {
        QuarantineRules {
            suspect_after: self.cfg.tasks.suspect_after_lost,
            convict_after: self.cfg.tasks.max_lost_attempts,
            window: self.loss_window(),
        }
    }

    /// A running task's lease is gone (drone died, went silent, dropped it): requeue it
    /// (as a suspect once it lost too many), hold a suspect whose lone drone died for its
    /// verdict, or fail it when that was its last attempt (lost leases count, G8).
    pub(super) fn lose_lease(&mut self, id: TaskId, reason: &str, loss: Loss, now: Now) {
        let rules = self.quarantine_rules();
        // Only a suspect alone on a drone that died can be evidence; for it, ask whether
        // other drones were lost around the same time (since its own previous loss).
        let correlated = match self.ledger.tasks.get(&id) {
            Some(t) if loss.co_tenants == 0 && t.is_suspect() => {
                let previous = t.suspicion.as_ref().and_then(|s| s.losses.last());
                !loss.drone_died
                    || t.lease.as_ref().is_some_and(|l| {
                        let after = previous.and_then(|p| mono_of(p.at, now));
                        self.fleet
                            .lost_together(l.drone, loss.at, after, rules.window)
                    })
            }
            _ => false,
        };
        let ago = now.mono.saturating_duration_since(loss.at);
        let lost_at = now.wall - chrono::Duration::from_std(ago).unwrap_or_default();
        let event = Event::LeaseLost {
            reason: reason.to_string(),
            co_tenants: loss.co_tenants,
            correlated,
            lost_at,
            rules,
        };
        self.end_running(id, event, now);
    }

    /// A suspect held after its lone drone died has waited out the window: other drones
    /// lost around that death make it inconclusive (the task runs again, alone); none
    /// make it evidence, and enough evidence quarantines the task.
    pub(super) fn deliver_verdict(&mut self, id: TaskId, now: Now) {
        let Some(mut task) = self.ledger.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        let rules = self.quarantine_rules();
        // The awaited loss (the last), judged against the losses since the one before it.
        let losses = task
            .suspicion
            .as_ref()
            .map(|s| s.losses.as_slice())
            .unwrap_or_default();
        let (previous, last) = match losses {
            [.., previous, last] => (Some(previous), Some(last)),
            [last] => (None, Some(last)),
            [] => (None, None),
        };
        let drone = last.and_then(|l| l.drone);
        let correlated = last.zip(drone).is_some_and(|(last, d)| {
            let at = mono_of(last.at, now).unwrap_or(now.mono);
            let after = previous.and_then(|p| mono_of(p.at, now));
            self.fleet.lost_together(d, at, after, rules.window)
        });
        let event = Event::Verdict { correlated, rules };
        match lifecycle::apply(&mut task, event, now.wall) {
            Ok(moved) => {
                if moved == Moved::Waiting {
                    tracing::info!(task_id = %id, "other drones were lost around the suspect's lone drone: not held against it; it runs again, alone");
                }
                self.observe(&task, moved, drone);
                self.place(task, now);
            }
            Err(refused) => {
                tracing::error!(task_id = %id, %refused, "a verdict could not be delivered");
                self.ledger.tasks.insert(Box::new(task));
            }
        }
    }

    /// Attempts past their queen-side deadline (`timeout_ms` plus the heartbeat timeout)
    /// without a report fail, and their drone is told to stop them.
    pub(super) fn expire_attempts(&mut self, now: Now) {
        while let Some((id, fence)) = self.dispatch.pop_expired_deadline(now.mono) {
            let holder = match self.ledger.tasks.get(&id) {
                Some(t) if t.state == TaskState::Running && t.fence == fence => {
                    t.lease.as_ref().map(|l| l.drone)
                }
                _ => continue,
            };
            if let Some(drone) = self.fleet.holder(holder) {
                let msg = drone.stop(id, fence, "attempt timed out");
                drone.conn.send(msg);
            }
            self.fleet.orphans.remove(&id);
            let error = "timed out: no report from the drone within timeout_ms".to_string();
            let event = self.failure(error, true, None, holder);
            self.end_running(id, event, now);
        }
    }

    /// A running attempt ends by `event`: the task leaves the running room, the
    /// lifecycle moves it, and it goes where its new state says.
    fn end_running(&mut self, id: TaskId, event: Event, now: Now) {
        if self.ledger.tasks.state(&id) != Some(TaskState::Running) {
            return;
        }
        let Some(mut task) = self.ledger.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        self.end_attempt(&task, now);
        let drone = task.lease.as_ref().map(|l| l.drone);
        let moved = match lifecycle::apply(&mut task, event, now.wall) {
            Ok(moved) => moved,
            Err(refused) => {
                // Every attempt-ending event is allowed on a running task.
                tracing::error!(task_id = %id, %refused, "an attempt could not be ended");
                self.ledger.tasks.insert(Box::new(task));
                return;
            }
        };
        self.observe(&task, moved, drone);
        self.place(task, now);
    }

    /// The log line and counters of an attempt that ended.
    fn observe(&self, task: &Task, moved: Moved, drone: Option<DroneId>) {
        let (id, fence, attempt) = (task.id, task.fence, task.attempts);
        let error = task.errors.last().map_or("", |e| e.error.as_str());
        let queue = [task.queue.as_str()];
        if matches!(
            moved,
            Moved::Requeued | Moved::Suspected | Moved::Awaiting(_) | Moved::LostLastAttempt
        ) {
            self.metrics.lease_expirations.inc();
        }
        match moved {
            Moved::Succeeded => {
                tracing::debug!(task_id = %id, fence = %fence, attempt, "task succeeded");
            }
            Moved::RetryAt(at) => {
                self.metrics.retried.with_label_values(&queue).inc();
                tracing::info!(task_id = %id, fence = %fence, attempt, error, retry_at = %at, "attempt failed; retry scheduled");
            }
            Moved::Failed => {
                tracing::info!(task_id = %id, fence = %fence, attempt, error, "task failed");
            }
            Moved::Requeued => {
                self.metrics.requeued.with_label_values(&queue).inc();
                tracing::warn!(task_id = %id, drone = ?drone, fence = %fence, error, "lease lost; task requeued");
            }
            Moved::Suspected => {
                self.metrics.requeued.with_label_values(&queue).inc();
                self.metrics.suspected.with_label_values(&queue).inc();
                tracing::warn!(task_id = %id, drone = ?drone, fence = %fence, lost = task.lost, error, "lease lost too often to rule the task out; requeued as a suspect: it runs alone on a drone from now on");
            }
            Moved::Awaiting(until) => {
                self.metrics.requeued.with_label_values(&queue).inc();
                tracing::warn!(task_id = %id, drone = ?drone, fence = %fence, error, until = %until, "a suspect's lone drone was lost with no other drone lost so far; the task waits for the verdict");
            }
            Moved::Quarantined => {
                self.metrics.quarantined.with_label_values(&queue).inc();
                tracing::error!(task_id = %id, drone = ?drone, fence = %fence, lost = task.lost, "a suspect's isolated attempt lost its drone, with no other drone lost around it: the task kills its drones; quarantined as failed");
            }
            Moved::LostLastAttempt => {
                tracing::warn!(task_id = %id, drone = ?drone, fence = %fence, error, "lease lost on the last attempt; task failed");
            }
            Moved::Granted | Moved::Cancelled | Moved::Waiting | Moved::Revived { .. } => {}
        }
    }

    /// Bookkeeping when a running attempt ends, however it ends (outcome, timeout, lost
    /// lease, cancel): its deadline goes, its queue has one task fewer running.
    pub(super) fn end_attempt(&mut self, task: &Task, now: Now) {
        // `isolating` is only ever a suspect's, and a suspect stays one until it finishes.
        if !self.dispatch.suspects.is_empty() {
            if let Some(drone) = self.fleet.holder(task.lease.as_ref().map(|l| l.drone)) {
                // Unless the drone is still stopping it: that attempt may yet kill it.
                if drone.settle_isolation() {
                    let id = drone.id;
                    self.dispatch.slot_may_have_freed(id);
                }
            }
        }
        if let Some(started) = task.started_at {
            let secs = (now.wall - started).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.metrics
                .run_duration
                .with_label_values(&[task.queue.as_str()])
                .observe(secs.max(0.0));
        }
        self.dispatch.attempt_ended(task);
    }
}

/// How a lease was lost, as the fleet saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loss {
    /// The other tasks its drone held (running or being stopped) when it was lost.
    pub co_tenants: u32,
    /// When the drone was lost.
    pub at: tokio::time::Instant,
    /// False when the drone lives on (it stopped reporting the task) or its fate is
    /// unknown (it never came back after a restart of the queen): no evidence either way.
    pub drone_died: bool,
}

/// A wall-clock time of this run as a monotonic instant (`None` if it is in the future
/// or before the clock's start).
fn mono_of(at: chrono::DateTime<chrono::Utc>, now: Now) -> Option<tokio::time::Instant> {
    let ago = (now.wall - at).to_std().ok()?;
    now.mono.checked_sub(ago)
}

/// Keeps results bounded: a larger one is replaced by a marked, truncated preview.
pub fn cap_result(result: Value, max_bytes: usize) -> Value {
    let text = result.to_string();
    if text.len() <= max_bytes {
        return result;
    }
    let mut cut = max_bytes.saturating_sub(128).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    serde_json::json!({
        "truncated": true,
        "original_bytes": text.len(),
        "preview": &text[..cut],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_results_are_kept_and_large_ones_truncated_and_marked() {
        let small = serde_json::json!({"ok": true});
        assert_eq!(cap_result(small.clone(), 1024), small);
        let big = serde_json::json!({"stdout": "é".repeat(5000)});
        let capped = cap_result(big, 1024);
        assert_eq!(capped["truncated"], true);
        assert!(capped["preview"].as_str().is_some_and(|p| p.len() <= 1024));
    }
}
