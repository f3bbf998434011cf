//! Lease and retry rules, pure: they take `now` (and a jitter sample) and return
//! decisions. No sockets, no clocks, no storage — so every rule is unit-tested with
//! explicit time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::api::{LossVerdict, TaskState};
use shared::protocol::Held;
use shared::{DroneId, Fence, TaskId};
use tokio::time::Instant;

/// Retry backoff: `base * factor^(attempt-1)`, capped at `max`, then reduced by up to
/// `jitter` (a fraction) at random so a burst of failures does not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub factor: f64,
    /// 0: exact delays; 0.5 (the default): between half and all of the delay.
    pub jitter: f64,
}

/// The default growth per attempt.
pub const DEFAULT_RETRY_FACTOR: f64 = 2.0;
/// The default jitter fraction.
pub const DEFAULT_RETRY_JITTER: f64 = 0.5;

impl RetryPolicy {
    /// The delay before the retry that follows attempt number `attempt` (1-based).
    /// `sample` is a uniform sample in [0, 1).
    pub fn delay(&self, attempt: u32, sample: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(1_000) as i32;
        let raw = self.base.as_secs_f64() * self.factor.max(1.0).powi(exp);
        let capped = raw.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped * (1.0 - jitter + jitter * sample.clamp(0.0, 1.0)))
    }

    /// This policy with a task's own settings applied over it.
    pub fn with(&self, spec: Option<&shared::api::RetrySpec>) -> RetryPolicy {
        let Some(spec) = spec else { return *self };
        RetryPolicy {
            base: spec.initial_ms.map_or(self.base, Duration::from_millis),
            max: spec.max_ms.map_or(self.max, Duration::from_millis),
            factor: spec.factor.unwrap_or(self.factor),
            jitter: spec.jitter.unwrap_or(self.jitter),
        }
    }
}

/// What happens to a task after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AfterFailure {
    /// Runnable again at this instant.
    Retry { at: DateTime<Utc> },
    /// Attempts are used up, or retrying cannot help: the task is `failed`.
    Fail,
}

/// Decides the fate of a task whose attempt number `attempts` failed (G8, docs/GUARANTEES.md).
pub fn after_failure(
    attempts: u32,
    max_attempts: u32,
    retryable: bool,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
    jitter: f64,
) -> AfterFailure {
    if !retryable || attempts >= max_attempts {
        return AfterFailure::Fail;
    }
    let delay = policy.delay(attempts, jitter);
    let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
    AfterFailure::Retry {
        at: now
            .checked_add_signed(delay)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

/// What happens to a task whose lease was lost (drone died, hung or was cut off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLostLease {
    /// Back to `pending` at once: the drone, not the task, failed.
    Requeue,
    /// Back to `pending`, as a suspect: it lost its drone too often to be sure it is not
    /// what kills them, so its next attempts run alone on a drone.
    Suspect,
    /// A suspect alone on a drone that died, with no other drone lost so far: it waits
    /// out the correlation window (`scheduled`), then is judged (see [`convicted`]).
    Await,
    /// The lost lease was its last allowed attempt.
    Fail,
}

/// The quarantine settings (`[tasks] suspect_after_lost`, `max_lost_attempts`) and the
/// correlation window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantineRules {
    /// Lost leases, anywhere, that make a task a suspect.
    pub suspect_after: u32,
    /// Isolated losses that convict a suspect.
    pub convict_after: u32,
    /// Drones lost within this of each other were lost together.
    pub window: Duration,
}

/// How a lost lease counts, from where the attempt ran: `co_tenants` is how many other
/// tasks the drone held, `correlated` whether other drones were lost around the same time
/// (or the drone did not die). Only a suspect's attempt alone on a drone that died by
/// itself can be evidence against the task, and it is judged only once the window has
/// passed (`Awaiting`).
pub fn judge_loss(suspect: bool, co_tenants: u32, correlated: bool) -> LossVerdict {
    match (co_tenants, suspect, correlated) {
        (1.., _, _) => LossVerdict::Shared,
        (0, false, _) => LossVerdict::Alone,
        (0, true, true) => LossVerdict::Inconclusive,
        (0, true, false) => LossVerdict::Awaiting,
    }
}

/// `lost` counts lost leases including this one; `suspect` is whether the task was a
/// suspect before it; `verdict` is this loss's.
pub fn after_lost_lease(
    attempts: u32,
    max_attempts: u32,
    lost: u32,
    suspect: bool,
    verdict: LossVerdict,
    rules: QuarantineRules,
) -> AfterLostLease {
    if attempts >= max_attempts {
        AfterLostLease::Fail
    } else if verdict == LossVerdict::Awaiting {
        AfterLostLease::Await
    } else if !suspect && lost >= rules.suspect_after {
        AfterLostLease::Suspect
    } else {
        AfterLostLease::Requeue
    }
}

/// Whether a suspect with `isolated` isolated losses (its last one judged) is convicted:
/// it kills its drones, and is quarantined (failed) instead of running again.
pub fn convicted(isolated: u32, rules: QuarantineRules) -> bool {
    isolated >= rules.convict_after
}

/// Whether an outcome reported with `fence` is the task's outcome (G3, docs/GUARANTEES.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Record,
    Stale,
}

/// Only the current lease's fence, on a task that is still running, records an outcome.
/// Everything else — an older fence, a task requeued or finished, an unknown task — is
/// stale and changes nothing.
pub fn judge_outcome(current: Option<(TaskState, Fence)>, reported: Fence) -> Verdict {
    match current {
        Some((TaskState::Running, fence)) if fence == reported => Verdict::Record,
        _ => Verdict::Stale,
    }
}

/// Whether a drone last heard from at `last_seen` has gone silent for too long.
pub fn is_silent(last_seen: Instant, now: Instant, timeout: Duration) -> bool {
    now.saturating_duration_since(last_seen) > timeout
}

/// A lease as the queen tracks it on a connected drone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveLease {
    pub fence: Fence,
    /// The number of the `assign` that granted it on the current connection (0 for a
    /// lease re-attached from a hello, which the drone has necessarily seen).
    pub ordinal: u64,
}

/// How a heartbeat's list of held tasks compares with the queen's view of that drone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    /// Leases the drone should have (it has seen their assign) but does not report: lost.
    pub missing: Vec<TaskId>,
    /// Tasks the drone reports that are not its current leases and that the queen has not
    /// already told it to drop: it must be told to cancel them.
    pub foreign: Vec<Held>,
    /// Previously foreign or finished tasks the drone no longer reports.
    pub released: Vec<TaskId>,
}

/// Compares a heartbeat with the queen's leases for that drone. `known` are tasks the
/// drone may legitimately still hold without a lease: ones it was told to cancel, or ones
/// whose outcome it reported and awaits an ack for.
pub fn reconcile(
    leases: &HashMap<TaskId, LiveLease>,
    known: &HashSet<TaskId>,
    held: &[Held],
    assigns_seen: u64,
) -> Reconciliation {
    // A drone may hold two attempts of one task (a new lease running while the old
    // attempt's outcome awaits its ack), so match on (task, fence), not on task alone.
    let held_pairs: HashSet<(TaskId, Fence)> = held.iter().map(|h| (h.task_id, h.fence)).collect();
    let held_ids: HashSet<TaskId> = held.iter().map(|h| h.task_id).collect();
    let mut out = Reconciliation::default();
    for (id, lease) in leases {
        let reported = held_pairs.contains(&(*id, lease.fence));
        if !reported && lease.ordinal <= assigns_seen {
            out.missing.push(*id);
        }
    }
    for h in held {
        let ours = leases.get(&h.task_id).is_some_and(|l| l.fence == h.fence);
        if !ours && !known.contains(&h.task_id) {
            out.foreign.push(*h);
        }
    }
    for id in known {
        if !held_ids.contains(id) {
            out.released.push(*id);
        }
    }
    out.missing.sort();
    out.released.sort();
    out
}

/// What a hello's held task means for an orphaned lease (one whose drone disconnected,
/// or any running lease after a queen restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reattach {
    /// The drone still runs the current lease: keep it, no second run (G5, docs/GUARANTEES.md).
    Keep,
    /// Not this lease (older fence, other drone, task moved on): tell the drone to stop.
    Cancel,
}

pub fn reattach(
    task: Option<(TaskState, Fence, Option<DroneId>)>,
    drone: DroneId,
    held_fence: Fence,
) -> Reattach {
    match task {
        Some((TaskState::Running, fence, Some(holder)))
            if fence == held_fence && holder == drone =>
        {
            Reattach::Keep
        }
        _ => Reattach::Cancel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
        factor: DEFAULT_RETRY_FACTOR,
        jitter: DEFAULT_RETRY_JITTER,
    };

    #[test]
    fn a_task_s_own_policy_overrides_the_defaults() {
        let spec = shared::api::RetrySpec {
            initial_ms: Some(100),
            factor: Some(3.0),
            max_ms: None,
            jitter: Some(0.0),
        };
        let p = POLICY.with(Some(&spec));
        assert_eq!(p.delay(1, 0.7), Duration::from_millis(100));
        assert_eq!(p.delay(3, 0.7), Duration::from_millis(900));
        assert_eq!(POLICY.with(None), POLICY);
    }

    #[test]
    fn backoff_doubles_per_attempt_and_is_capped() {
        assert_eq!(POLICY.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(POLICY.delay(2, 1.0), Duration::from_secs(2));
        assert_eq!(POLICY.delay(4, 1.0), Duration::from_secs(8));
        assert_eq!(POLICY.delay(10, 1.0), Duration::from_secs(60));
        assert_eq!(POLICY.delay(u32::MAX, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_spreads_between_half_and_the_full_delay() {
        assert_eq!(POLICY.delay(3, 0.0), Duration::from_secs(2));
        let mid = POLICY.delay(3, 0.5);
        assert!(mid > Duration::from_secs(2) && mid < Duration::from_secs(4));
    }

    #[test]
    fn a_failed_attempt_retries_until_attempts_run_out() {
        let now = Utc::now();
        match after_failure(1, 3, true, now, &POLICY, 1.0) {
            AfterFailure::Retry { at } => assert_eq!(at - now, chrono::Duration::seconds(1)),
            other => panic!("expected a retry, got {other:?}"),
        }
        assert_eq!(
            after_failure(3, 3, true, now, &POLICY, 1.0),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(1, 3, false, now, &POLICY, 1.0),
            AfterFailure::Fail
        );
    }

    const Q: QuarantineRules = QuarantineRules {
        suspect_after: 2,
        convict_after: 1,
        window: Duration::from_secs(10),
    };

    #[test]
    fn a_lost_lease_counts_as_an_attempt() {
        let shared = LossVerdict::Shared;
        assert_eq!(
            after_lost_lease(1, 3, 1, false, shared, Q),
            AfterLostLease::Requeue
        );
        assert_eq!(
            after_lost_lease(2, 2, 1, false, shared, Q),
            AfterLostLease::Fail
        );
        // The last attempt fails for its attempts (G8), whatever the evidence.
        let awaiting = LossVerdict::Awaiting;
        assert_eq!(
            after_lost_lease(3, 3, 3, true, awaiting, Q),
            AfterLostLease::Fail
        );
    }

    #[test]
    fn lost_leases_make_a_suspect_and_only_its_lone_losses_wait_for_a_verdict() {
        use LossVerdict::*;
        // The second loss anywhere makes a suspect; a suspect is not made twice.
        assert_eq!(
            after_lost_lease(2, 10, 2, false, Shared, Q),
            AfterLostLease::Suspect
        );
        assert_eq!(
            after_lost_lease(5, 10, 5, true, Shared, Q),
            AfterLostLease::Requeue
        );
        // Inconclusive losses, however many, never wait for a verdict.
        assert_eq!(
            after_lost_lease(9, 10, 9, true, Inconclusive, Q),
            AfterLostLease::Requeue
        );
        assert_eq!(
            after_lost_lease(3, 10, 3, true, Awaiting, Q),
            AfterLostLease::Await
        );
        assert!(convicted(1, Q));
        assert!(!convicted(
            1,
            QuarantineRules {
                convict_after: 2,
                ..Q
            }
        ));
    }

    #[test]
    fn only_a_suspect_alone_on_a_drone_that_died_by_itself_awaits_a_verdict() {
        assert_eq!(judge_loss(true, 3, false), LossVerdict::Shared);
        assert_eq!(judge_loss(false, 1, true), LossVerdict::Shared);
        assert_eq!(judge_loss(false, 0, false), LossVerdict::Alone);
        assert_eq!(judge_loss(true, 0, true), LossVerdict::Inconclusive);
        assert_eq!(judge_loss(true, 0, false), LossVerdict::Awaiting);
    }

    #[test]
    fn only_the_current_fence_of_a_running_task_records() {
        assert_eq!(
            judge_outcome(Some((TaskState::Running, Fence(2))), Fence(2)),
            Verdict::Record
        );
        assert_eq!(
            judge_outcome(Some((TaskState::Running, Fence(3))), Fence(2)),
            Verdict::Stale
        );
        assert_eq!(
            judge_outcome(Some((TaskState::Pending, Fence(2))), Fence(2)),
            Verdict::Stale
        );
        assert_eq!(
            judge_outcome(Some((TaskState::Succeeded, Fence(2))), Fence(2)),
            Verdict::Stale
        );
        assert_eq!(judge_outcome(None, Fence(1)), Verdict::Stale);
    }

    #[test]
    fn silence_is_measured_against_the_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        assert!(!is_silent(t0, t0 + Duration::from_secs(5), timeout));
        assert!(is_silent(t0, t0 + Duration::from_millis(5_001), timeout));
        // A clock that appears to go backwards never expires anyone.
        assert!(!is_silent(t0 + Duration::from_secs(1), t0, timeout));
    }

    fn held(id: TaskId, fence: u64) -> Held {
        Held {
            task_id: id,
            fence: Fence(fence),
        }
    }

    #[test]
    fn a_seen_lease_missing_from_a_heartbeat_is_lost_but_one_in_flight_is_not() {
        let (a, b) = (TaskId::generate(), TaskId::generate());
        let leases = HashMap::from([
            (
                a,
                LiveLease {
                    fence: Fence(1),
                    ordinal: 1,
                },
            ),
            (
                b,
                LiveLease {
                    fence: Fence(4),
                    ordinal: 2,
                },
            ),
        ]);
        let r = reconcile(&leases, &HashSet::new(), &[], 1);
        assert_eq!(
            r.missing,
            vec![a],
            "b's assign was not yet seen by the drone"
        );
        let r = reconcile(&leases, &HashSet::new(), &[held(a, 1)], 2);
        assert_eq!(r.missing, vec![b]);
        let r = reconcile(&leases, &HashSet::new(), &[held(a, 1), held(b, 4)], 2);
        assert_eq!(r, Reconciliation::default());
    }

    #[test]
    fn an_old_fence_in_a_heartbeat_is_foreign_and_a_released_one_frees_its_slot() {
        let (a, c) = (TaskId::generate(), TaskId::generate());
        let leases = HashMap::from([(
            a,
            LiveLease {
                fence: Fence(2),
                ordinal: 0,
            },
        )]);
        // The drone still runs a's previous lease: wrong fence, so foreign, and a is missing.
        let r = reconcile(&leases, &HashSet::new(), &[held(a, 1)], 0);
        assert_eq!(r.foreign, vec![held(a, 1)]);
        assert_eq!(r.missing, vec![a]);
        // c was already told to cancel: not foreign again; once gone it is released.
        let known = HashSet::from([c]);
        let r = reconcile(&HashMap::new(), &known, &[held(c, 1)], 0);
        assert!(r.foreign.is_empty() && r.released.is_empty());
        let r = reconcile(&HashMap::new(), &known, &[], 0);
        assert_eq!(r.released, vec![c]);
    }

    #[test]
    fn two_attempts_of_one_task_in_a_heartbeat_do_not_hide_the_current_lease() {
        let a = TaskId::generate();
        let leases = HashMap::from([(
            a,
            LiveLease {
                fence: Fence(2),
                ordinal: 1,
            },
        )]);
        let known = HashSet::from([a]);
        for held_list in [[held(a, 2), held(a, 1)], [held(a, 1), held(a, 2)]] {
            let r = reconcile(&leases, &known, &held_list, 1);
            assert!(r.missing.is_empty(), "{r:?}");
            assert!(r.foreign.is_empty() && r.released.is_empty(), "{r:?}");
        }
    }

    #[test]
    fn a_hello_reattaches_only_the_current_lease_of_the_same_drone() {
        let d = DroneId::generate();
        let other = DroneId::generate();
        let running = |f, h| Some((TaskState::Running, Fence(f), Some(h)));
        assert_eq!(reattach(running(3, d), d, Fence(3)), Reattach::Keep);
        assert_eq!(reattach(running(3, d), d, Fence(2)), Reattach::Cancel);
        assert_eq!(reattach(running(3, other), d, Fence(3)), Reattach::Cancel);
        assert_eq!(
            reattach(Some((TaskState::Pending, Fence(3), None)), d, Fence(3)),
            Reattach::Cancel
        );
        assert_eq!(reattach(None, d, Fence(1)), Reattach::Cancel);
    }
}
