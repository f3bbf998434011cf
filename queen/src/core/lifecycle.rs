//! The task lifecycle as a state machine: every change of a task's state is one
//! [`Event`] applied by [`apply`], a pure function of (task, event, now) built on the rules
//! in `rules.rs`. The core decides which event happened and moves the task between its
//! rooms (ready queues, timers, leases, the finished set); this file decides what the
//! event does to the task and refuses what a state does not allow. Nothing else in the
//! queen writes `task.state`, except recovery's [`normalize_waiting`] and the in-memory
//! due-time promotion, which are transitions of this file too.
//!
//! ```text
//!            submit ─┬─▶ pending ◀──────── due ───────── scheduled ◀─┐
//!                    ├─▶ scheduled                                    │ attempt failed,
//!                    └─▶ blocked ── dependencies met ─▶ pending|scheduled   retryable
//!   pending ── grant (fence+1, attempts+1) ─▶ running ── complete ─▶ succeeded
//!   running ── attempt failed ─┬─ attempts left ─▶ scheduled (retry at backoff)
//!                              └─ final ─────────▶ failed
//!   running ── lease lost ─┬─ attempts left ─▶ pending (requeued; a suspect after
//!                          │                   suspect_after_lost losses: runs alone)
//!                          ├─ a suspect alone, its drone died by itself so far ─▶
//!                          │      scheduled (awaiting the verdict for the window)
//!                          └─ last attempt ──▶ failed
//!   scheduled|pending ── verdict ─┬─ isolated losses reach max_lost ─▶ failed (quarantined)
//!                                 └─ otherwise ─▶ pending
//!   pending|scheduled|blocked|running ── cancel ─▶ cancelled
//!   failed|cancelled ── retry ─▶ pending, or blocked while a dependency has not
//!                                succeeded yet   (a terminal task changes only so)
//! ```

use chrono::{DateTime, Utc};
use serde_json::Value;
use shared::api::{AttemptError, LossVerdict, LostLease, TaskState};
use shared::DroneId;

use crate::rules::{self, AfterFailure, AfterLostLease, QuarantineRules, RetryPolicy};
use crate::task::{Lease, Task};

/// Something that happens to a task.
#[derive(Debug, Clone)]
pub enum Event {
    /// A drone is given the task: a new attempt under a new fence.
    Grant { drone: DroneId, drone_name: String },
    /// The current attempt reported success.
    Complete { result: Value },
    /// The current attempt failed (reported, or timed out on the queen's side).
    AttemptFailed {
        error: String,
        retryable: bool,
        result: Option<Value>,
        drone: Option<DroneId>,
        policy: RetryPolicy,
        /// A uniform sample in [0, 1) for the backoff's jitter.
        jitter: f64,
    },
    /// The current attempt's drone died, went silent or dropped it. `co_tenants`: the
    /// other tasks that drone held when it was lost; `correlated`: other drones, which
    /// this task never ran on, were lost around the same time.
    LeaseLost {
        reason: String,
        co_tenants: u32,
        correlated: bool,
        /// When the drone was lost (before `now` when it had a grace to come back in).
        lost_at: DateTime<Utc>,
        rules: QuarantineRules,
    },
    /// The window around a suspect's lone lost lease has passed: `correlated` says whether
    /// other drones were lost around it after all.
    Verdict {
        correlated: bool,
        rules: QuarantineRules,
    },
    /// An operator, or a dependency that did not succeed, cancels the task.
    Cancel { reason: String },
    /// A scheduled task's time came.
    Due,
    /// Every dependency of a blocked task succeeded.
    DependenciesMet,
    /// An operator runs a failed or cancelled task again; `blocked` when some of its
    /// dependencies have not succeeded yet (it waits for them again).
    Retry { blocked: bool },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Grant { .. } => "grant",
            Event::Complete { .. } => "complete",
            Event::AttemptFailed { .. } => "attempt failed",
            Event::LeaseLost { .. } => "lease lost",
            Event::Verdict { .. } => "verdict",
            Event::Cancel { .. } => "cancel",
            Event::Due => "due",
            Event::DependenciesMet => "dependencies met",
            Event::Retry { .. } => "retry",
        }
    }
}

/// What an event did, beyond the new state (which is `task.state`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Moved {
    Granted,
    Succeeded,
    /// The attempt failed and the task runs again at this time.
    RetryAt(DateTime<Utc>),
    /// The attempt failed for good.
    Failed,
    /// The lease was lost and the task is runnable again at once.
    Requeued,
    /// The lease was lost once too often to rule the task out: runnable again at once,
    /// as a suspect (alone on a drone).
    Suspected,
    /// A suspect's lone attempt lost its drone: it waits until this time for the verdict.
    Awaiting(DateTime<Utc>),
    /// Isolated attempts lost their drone: the task is what kills drones.
    Quarantined,
    /// The lease was lost on the last allowed attempt.
    LostLastAttempt,
    Cancelled,
    /// Due, or unblocked: waiting again, in `task.state`.
    Waiting,
    /// Retried: `was` is the terminal state it left.
    Revived {
        was: TaskState,
    },
}

/// An event the task's state does not allow; the task is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {state} task cannot take `{event}`")]
pub struct Refused {
    pub state: TaskState,
    pub event: &'static str,
}

/// Applies `event` to `task` at `now`, or refuses it and leaves the task as it was.
pub fn apply(task: &mut Task, event: Event, now: DateTime<Utc>) -> Result<Moved, Refused> {
    use TaskState::*;
    let refused = Refused {
        state: task.state,
        event: event.name(),
    };
    match (task.state, event) {
        (Pending, Event::Grant { drone, drone_name }) => {
            task.state = Running;
            task.attempts += 1;
            task.fence = task.fence.next();
            task.lease = Some(Box::new(Lease { drone, drone_name }));
            task.started_at = Some(now);
            task.run_at = None;
            Ok(Moved::Granted)
        }
        (Running, Event::Complete { result }) => {
            task.state = Succeeded;
            task.result = Some(Box::new(result));
            finish(task, now);
            Ok(Moved::Succeeded)
        }
        (
            Running,
            Event::AttemptFailed {
                error,
                retryable,
                result,
                drone,
                policy,
                jitter,
            },
        ) => {
            task.errors.push(AttemptError {
                attempt: task.attempts,
                fence: task.fence,
                drone,
                error,
                at: now,
            });
            task.lease = None;
            if result.is_some() {
                task.result = result.map(Box::new);
            }
            let policy = policy.with(task.retry.as_deref());
            match rules::after_failure(
                task.attempts,
                task.max_attempts,
                retryable,
                now,
                &policy,
                jitter,
            ) {
                AfterFailure::Retry { at } => {
                    task.state = Scheduled;
                    task.run_at = Some(at);
                    Ok(Moved::RetryAt(at))
                }
                AfterFailure::Fail => {
                    task.state = Failed;
                    finish(task, now);
                    Ok(Moved::Failed)
                }
            }
        }
        (
            Running,
            Event::LeaseLost {
                reason,
                co_tenants,
                correlated,
                lost_at,
                rules,
            },
        ) => {
            task.lost += 1;
            let drone = task.lease.as_ref().map(|l| l.drone);
            task.errors.push(AttemptError {
                attempt: task.attempts,
                fence: task.fence,
                drone,
                error: format!("lease lost: {reason}"),
                at: now,
            });
            task.lease = None;
            let suspicion = task.suspicion.get_or_insert_with(Box::default);
            let suspect = suspicion.is_suspect();
            let verdict = rules::judge_loss(suspect, co_tenants, correlated);
            suspicion.losses.push(LostLease {
                attempt: task.attempts,
                fence: task.fence,
                drone,
                co_tenants,
                verdict,
                at: lost_at.min(now),
            });
            match rules::after_lost_lease(
                task.attempts,
                task.max_attempts,
                task.lost,
                suspect,
                verdict,
                rules,
            ) {
                AfterLostLease::Requeue => {
                    task.state = Pending;
                    Ok(Moved::Requeued)
                }
                AfterLostLease::Suspect => {
                    suspicion.suspect_since = Some(now);
                    task.state = Pending;
                    Ok(Moved::Suspected)
                }
                AfterLostLease::Await => {
                    let window =
                        chrono::Duration::from_std(rules.window).unwrap_or(chrono::Duration::MAX);
                    let at = lost_at
                        .min(now)
                        .checked_add_signed(window)
                        .unwrap_or(now)
                        .max(now);
                    task.state = Scheduled;
                    task.run_at = Some(at);
                    Ok(Moved::Awaiting(at))
                }
                AfterLostLease::Fail => {
                    task.state = Failed;
                    finish(task, now);
                    Ok(Moved::LostLastAttempt)
                }
            }
        }
        (Scheduled | Pending, Event::Verdict { correlated, rules })
            if task.suspicion.as_ref().is_some_and(|s| s.awaiting()) =>
        {
            let Some(suspicion) = task.suspicion.as_mut() else {
                return Err(refused);
            };
            if let Some(last) = suspicion.losses.last_mut() {
                last.verdict = if correlated {
                    LossVerdict::Inconclusive
                } else {
                    LossVerdict::Isolated
                };
            }
            let isolated = suspicion.isolated_losses();
            task.run_at = None;
            if !correlated && rules::convicted(isolated, rules) {
                // One error per attempt: the verdict goes on the lost attempt's entry.
                if let Some(last) = task.errors.last_mut() {
                    last.error = format!(
                        "{}; quarantined: {isolated} isolated attempt(s) lost their drone with no other drone lost around them (tasks.max_lost_attempts = {})",
                        last.error, rules.convict_after
                    );
                }
                task.state = Failed;
                finish(task, now);
                Ok(Moved::Quarantined)
            } else {
                task.state = Pending;
                Ok(Moved::Waiting)
            }
        }
        (Pending | Scheduled | Blocked | Running, Event::Cancel { reason }) => {
            task.state = Cancelled;
            task.cancel_reason = Some(reason);
            finish(task, now);
            Ok(Moved::Cancelled)
        }
        (Scheduled, Event::Due) => {
            // Not written back: a restart derives `pending` from `run_at` having passed.
            task.state = Pending;
            task.run_at = None;
            Ok(Moved::Waiting)
        }
        (Blocked, Event::DependenciesMet) => {
            task.state = Pending;
            normalize_waiting(task, now);
            Ok(Moved::Waiting)
        }
        (was @ (Failed | Cancelled), Event::Retry { blocked }) => {
            // A fresh set of attempts; the fence keeps growing and the error history stays.
            task.state = if blocked { Blocked } else { Pending };
            task.attempts = 0;
            task.lost = 0;
            task.suspicion = None;
            task.result = None;
            task.checkpoint = None;
            task.cancel_reason = None;
            task.finished_at = None;
            task.run_at = None;
            task.lease = None;
            Ok(Moved::Revived { was })
        }
        _ => Err(refused),
    }
}

/// A task entering a terminal state holds no lease and knows when it ended.
fn finish(task: &mut Task, now: DateTime<Utc>) {
    task.lease = None;
    task.finished_at = Some(now);
}

/// A waiting task as it is after a restart (or once unblocked): pending once its `run_at`
/// has passed, scheduled before.
pub fn normalize_waiting(task: &mut Task, now: DateTime<Utc>) {
    normalize_parts(&mut task.state, &mut task.run_at, now);
}

/// [`normalize_waiting`] on the two fields it reads, for a recovered index entry too.
pub fn normalize_parts(
    state: &mut TaskState,
    run_at: &mut Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) {
    if !matches!(state, TaskState::Pending | TaskState::Scheduled) {
        return;
    }
    if run_at.is_some_and(|at| at > now) {
        *state = TaskState::Scheduled;
    } else {
        *state = TaskState::Pending;
        *run_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::api::{LossVerdict, TaskSpec};
    use shared::{Fence, TaskId};
    use std::time::Duration;
    use TaskState::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
        factor: 2.0,
        jitter: 0.0,
    };

    fn task_in(state: TaskState, now: DateTime<Utc>) -> Task {
        let spec = TaskSpec {
            kind: "echo".into(),
            max_attempts: Some(3),
            ..Default::default()
        };
        let mut t = Task::from_spec(spec, TaskId::generate(), now, &Default::default())
            .expect("valid spec");
        t.state = state;
        t.fence = Fence(4);
        match state {
            Running => {
                t.attempts = 1;
                t.lease = Some(Box::new(Lease {
                    drone: DroneId::generate(),
                    drone_name: "d".into(),
                }));
            }
            Scheduled => t.run_at = Some(now + chrono::Duration::seconds(5)),
            Succeeded | Failed | Cancelled => t.finished_at = Some(now),
            _ => {}
        }
        t
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Grant {
                drone: DroneId::generate(),
                drone_name: "d".into(),
            },
            Event::Complete {
                result: serde_json::json!({"ok": true}),
            },
            Event::AttemptFailed {
                error: "boom".into(),
                retryable: true,
                result: None,
                drone: None,
                policy: POLICY,
                jitter: 0.5,
            },
            Event::LeaseLost {
                reason: "drone died".into(),
                co_tenants: 0,
                correlated: false,
                lost_at: Utc::now(),
                rules: RULES,
            },
            Event::Verdict {
                correlated: false,
                rules: RULES,
            },
            Event::Cancel {
                reason: "operator".into(),
            },
            Event::Due,
            Event::DependenciesMet,
            Event::Retry { blocked: false },
        ]
    }

    /// Every (state, event) pair, and the state it leads to (None: refused). A task with
    /// attempts left and a retryable failure, as built by `task_in`.
    fn table(state: TaskState, event: &str) -> Option<TaskState> {
        match (state, event) {
            (Pending, "grant") => Some(Running),
            (Running, "complete") => Some(Succeeded),
            (Running, "attempt failed") => Some(Scheduled),
            (Running, "lease lost") => Some(Pending),
            (Pending | Scheduled | Blocked | Running, "cancel") => Some(Cancelled),
            (Scheduled, "due") => Some(Pending),
            (Blocked, "dependencies met") => Some(Pending),
            (Failed | Cancelled, "retry") => Some(Pending),
            _ => None,
        }
    }

    #[test]
    fn every_state_and_event_pair_does_what_the_table_says_and_nothing_else() {
        let now = Utc::now();
        let mut allowed = 0;
        for state in TaskState::ALL {
            for event in events() {
                let name = event.name();
                let mut task = task_in(state, now);
                let before = task.clone();
                let got = apply(&mut task, event, now);
                match table(state, name) {
                    Some(to) => {
                        allowed += 1;
                        assert!(got.is_ok(), "{state} + {name} must be allowed: {got:?}");
                        assert_eq!(task.state, to, "{state} + {name}");
                        // Invariants of every allowed step.
                        assert!(task.fence >= before.fence, "fences only grow");
                        assert_eq!(
                            task.fence > before.fence,
                            name == "grant",
                            "only a grant moves the fence ({state} + {name})"
                        );
                        assert_eq!(
                            task.lease.is_some(),
                            task.state == Running,
                            "a lease exactly while running ({state} + {name})"
                        );
                        assert_eq!(
                            task.finished_at.is_some(),
                            task.state.is_terminal(),
                            "finished_at exactly when terminal ({state} + {name})"
                        );
                        if before.state.is_terminal() {
                            assert_eq!(name, "retry", "a terminal task changes only by retry");
                        }
                    }
                    None => {
                        assert_eq!(
                            got,
                            Err(Refused { state, event: name }),
                            "{state} + {name} must be refused"
                        );
                        assert_eq!(task, before, "a refused event changes nothing");
                    }
                }
            }
        }
        assert_eq!(allowed, 12, "the table's allowed pairs were all walked");
    }

    #[test]
    fn a_grant_opens_a_new_attempt_under_a_new_fence() {
        let now = Utc::now();
        let mut t = task_in(Pending, now);
        let drone = DroneId::generate();
        let got = apply(
            &mut t,
            Event::Grant {
                drone,
                drone_name: "w1".into(),
            },
            now,
        );
        assert_eq!(got, Ok(Moved::Granted));
        assert_eq!((t.attempts, t.fence), (1, Fence(5)));
        assert_eq!(t.lease.as_ref().map(|l| l.drone), Some(drone));
        assert_eq!(t.started_at, Some(now));
    }

    #[test]
    fn a_failure_retries_with_backoff_until_attempts_run_out_then_fails() {
        let now = Utc::now();
        let fail = |retryable| Event::AttemptFailed {
            error: "boom".into(),
            retryable,
            result: Some(serde_json::json!({"partial": 1})),
            drone: None,
            policy: POLICY,
            jitter: 0.0,
        };
        let mut t = task_in(Running, now);
        let got = apply(&mut t, fail(true), now);
        // Attempt 1 of 3, base 1 s, no jitter: exactly 1 s later.
        assert_eq!(got, Ok(Moved::RetryAt(now + chrono::Duration::seconds(1))));
        assert_eq!(t.run_at, Some(now + chrono::Duration::seconds(1)));
        assert_eq!(t.errors.len(), 1);
        assert_eq!(
            t.result.as_deref(),
            Some(&serde_json::json!({"partial": 1}))
        );
        let mut last = task_in(Running, now);
        last.attempts = 3;
        assert_eq!(apply(&mut last, fail(true), now), Ok(Moved::Failed));
        assert_eq!(last.state, Failed);
        let mut fatal = task_in(Running, now);
        assert_eq!(apply(&mut fatal, fail(false), now), Ok(Moved::Failed));
    }

    const RULES: QuarantineRules = QuarantineRules {
        suspect_after: 2,
        convict_after: 1,
        window: Duration::from_secs(10),
    };

    /// The drone was lost 300 ms before `now` (it had a grace to come back in).
    fn lost(co_tenants: u32, correlated: bool, now: DateTime<Utc>) -> Event {
        Event::LeaseLost {
            reason: "drone died".into(),
            co_tenants,
            correlated,
            lost_at: now - chrono::Duration::milliseconds(300),
            rules: RULES,
        }
    }

    fn verdict(correlated: bool) -> Event {
        Event::Verdict {
            correlated,
            rules: RULES,
        }
    }

    /// Runs the task again (the grant's bookkeeping, without the lifecycle's checks).
    fn rerun(t: &mut Task) {
        t.state = Running;
        t.attempts += 1;
        t.fence = t.fence.next();
    }

    fn verdicts(t: &Task) -> Vec<LossVerdict> {
        t.suspicion
            .as_ref()
            .map(|s| s.losses.iter().map(|l| l.verdict).collect())
            .unwrap_or_default()
    }

    #[test]
    fn lost_leases_make_a_suspect_and_only_a_lone_loss_judged_after_the_window_quarantines() {
        let now = Utc::now();
        let mut t = task_in(Running, now);
        t.max_attempts = 10;
        // Two losses beside other tasks: requeued, then a suspect; nothing convicts.
        assert_eq!(apply(&mut t, lost(3, false, now), now), Ok(Moved::Requeued));
        assert_eq!((t.state, t.lost), (Pending, 1));
        assert_eq!(t.errors[0].error, "lease lost: drone died");
        assert!(!t.is_suspect());
        rerun(&mut t);
        assert_eq!(
            apply(&mut t, lost(1, false, now), now),
            Ok(Moved::Suspected)
        );
        assert!(t.is_suspect() && t.state == Pending);
        // Alone, but its drone was lost with others: inconclusive, requeued at once.
        rerun(&mut t);
        assert_eq!(apply(&mut t, lost(0, true, now), now), Ok(Moved::Requeued));
        // Alone on a drone that died by itself so far: it waits out the window.
        rerun(&mut t);
        // Judged a window after the drone was lost, not after the lease was given up.
        let until = now - chrono::Duration::milliseconds(300) + chrono::Duration::seconds(10);
        assert_eq!(
            apply(&mut t, lost(0, false, now), now),
            Ok(Moved::Awaiting(until))
        );
        assert_eq!((t.state, t.run_at), (Scheduled, Some(until)));
        // A verdict is only for a task awaiting one.
        let mut other = task_in(Scheduled, now);
        assert!(apply(&mut other, verdict(false), now).is_err());
        // Nothing else was lost around it: convicted.
        assert_eq!(apply(&mut t, verdict(false), until), Ok(Moved::Quarantined));
        assert_eq!(t.state, Failed);
        assert!(
            t.errors[3]
                .error
                .contains("quarantined: 1 isolated attempt"),
            "{:?}",
            t.errors
        );
        assert_eq!(
            verdicts(&t),
            [
                LossVerdict::Shared,
                LossVerdict::Shared,
                LossVerdict::Inconclusive,
                LossVerdict::Isolated
            ]
        );
    }

    #[test]
    fn a_lone_loss_with_other_drones_lost_after_it_is_not_held_against_the_task() {
        let now = Utc::now();
        let mut t = task_in(Running, now);
        t.max_attempts = 10;
        apply(&mut t, lost(2, false, now), now).expect("requeued");
        rerun(&mut t);
        apply(&mut t, lost(2, false, now), now).expect("suspected");
        rerun(&mut t);
        assert!(matches!(
            apply(&mut t, lost(0, false, now), now),
            Ok(Moved::Awaiting(_))
        ));
        // Other drones went down in the window after it: a mass failure.
        assert_eq!(apply(&mut t, verdict(true), now), Ok(Moved::Waiting));
        assert_eq!((t.state, t.run_at), (Pending, None));
        assert_eq!(verdicts(&t)[2], LossVerdict::Inconclusive);
    }

    #[test]
    fn a_task_alone_by_chance_is_not_convicted_and_the_last_attempt_fails() {
        let now = Utc::now();
        let mut t = task_in(Running, now);
        // Not a suspect: alone on its drone by chance is no evidence.
        assert_eq!(apply(&mut t, lost(0, false, now), now), Ok(Moved::Requeued));
        rerun(&mut t);
        assert_eq!(
            apply(&mut t, lost(0, false, now), now),
            Ok(Moved::Suspected)
        );
        rerun(&mut t);
        // Its third attempt was its last: it fails for its attempts (G8).
        assert_eq!(t.attempts, 3);
        assert_eq!(
            apply(&mut t, lost(0, false, now), now),
            Ok(Moved::LostLastAttempt)
        );
        assert_eq!(t.state, Failed);
    }

    #[test]
    fn a_retry_clears_the_suspicion() {
        let now = Utc::now();
        let mut t = task_in(Running, now);
        t.max_attempts = 10;
        apply(&mut t, lost(0, false, now), now).expect("requeued");
        rerun(&mut t);
        apply(&mut t, lost(0, false, now), now).expect("suspected");
        rerun(&mut t);
        apply(&mut t, lost(0, false, now), now).expect("awaiting");
        apply(&mut t, verdict(false), now).expect("quarantined");
        assert_eq!(t.state, Failed);
        apply(&mut t, Event::Retry { blocked: false }, now).expect("retried");
        assert!(t.suspicion.is_none() && t.lost == 0);
    }

    #[test]
    fn a_retry_starts_a_fresh_set_of_attempts_and_keeps_fence_and_history() {
        let now = Utc::now();
        let mut t = task_in(Failed, now);
        t.attempts = 3;
        t.lost = 1;
        t.errors.push(AttemptError {
            attempt: 3,
            fence: Fence(4),
            drone: None,
            error: "boom".into(),
            at: now,
        });
        assert_eq!(
            apply(&mut t, Event::Retry { blocked: false }, now),
            Ok(Moved::Revived { was: Failed })
        );
        assert_eq!(
            (t.state, t.attempts, t.lost, t.fence),
            (Pending, 0, 0, Fence(4))
        );
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.finished_at, None);
        let mut waiting = task_in(Cancelled, now);
        apply(&mut waiting, Event::Retry { blocked: true }, now).expect("allowed");
        assert_eq!(waiting.state, Blocked);
    }

    #[test]
    fn an_unblocked_task_waits_for_its_run_at() {
        let now = Utc::now();
        let mut t = task_in(Blocked, now);
        t.run_at = Some(now + chrono::Duration::seconds(10));
        assert_eq!(
            apply(&mut t, Event::DependenciesMet, now),
            Ok(Moved::Waiting)
        );
        assert_eq!(t.state, Scheduled);
        let mut late = task_in(Blocked, now);
        late.run_at = Some(now - chrono::Duration::seconds(10));
        apply(&mut late, Event::DependenciesMet, now).expect("allowed");
        assert_eq!((late.state, late.run_at), (Pending, None));
    }
}
