//! The invariant checker every chaos scenario ends with: what the queen says (task records
//! read through the API), what really ran (the execution log), what the test did (the tasks
//! the queen acknowledged, the drones it killed, froze or cut off) — held against the
//! guarantees of docs/GUARANTEES.md.
//!
//! Gathering the evidence takes waiting and I/O and lives in [`crate::hive::Hive::check`];
//! judging it is [`violations`], a pure function with unit tests that show every rule
//! firing. The rules:
//!
//! - **G1** every acknowledged task is known to the queen.
//! - **G2** every acknowledged task is terminal within the scenario's bound.
//! - **G3** a terminal record never changes (it is read twice, around a quiet period and a
//!   barrier task on every live drone); a `succeeded` exec task has a run that finished
//!   under the record's final fence; every run's fence is one the record accounts for (its
//!   final fence or the fence of an attempt in its error history) with the same attempt
//!   number; no fence ran twice.
//! - **G4** the queen never listed one task under two drones at once (sampled during the
//!   scenario); and a run under an *older* fence that finished successfully — its outcome
//!   necessarily not recorded — or whose lease was declared lost, happened on a drone
//!   that was killed, stopped, frozen, cut off or otherwise died. On a healthy drone either
//!   one means the queen let a second lease run while the first was alive.
//! - **G6** no process of any run (its shell and the children it logged) is left alive
//!   once its task is terminal — after its drone died, or after its lease moved on; and no
//!   run wrote a line more than [`ORPHAN_MARGIN_S`] after its drone was dead (a task that
//!   outlived its drone and finished on its own leaves no process behind, but its line).
//! - **G8** attempts ≤ `max_attempts` (as the spec asked, else the queen's default), no
//!   more runs than that, and every attempt's error kept: a `failed` task has one error per
//!   attempt, a `succeeded` one per earlier attempt, numbered in order with growing fences.
//!
//! Duplicate runs (a task run under more than one fence) are counted in the [`Summary`];
//! the G4 rule is what allows them only where a drone died or was cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use shared::api::{AttemptError, LossVerdict, TaskState, TaskView};
use shared::TaskId;

use crate::drone::Harm;
use crate::execlog::Execution;
#[cfg(test)]
use crate::execlog::Phase;

/// The queen's `[tasks] max_attempts` when not configured (queen `DEFAULT_MAX_ATTEMPTS`;
/// the tests package does not link the queen, so a change there must be mirrored here —
/// the checker says so loudly if the records disagree).
pub const QUEEN_DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// How long after its drone's death a task process may still write a line: the drone's
/// supervisor hears of the death from the kernel and kills the groups in well under a millisecond
/// when healthy; this covers a loaded machine and the log's 10 ms clock.
pub const ORPHAN_MARGIN_S: f64 = 0.25;

/// One drone process the scenario started, and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct DroneLife {
    pub name: String,
    pub pid: i32,
    /// What the test did to it.
    pub harms: Vec<Harm>,
    /// It is no longer running (killed by the test, or it died by itself, e.g. a poison
    /// task killed it).
    pub exited: bool,
    /// When it was dead for sure (seconds since boot), if it died.
    pub died_at: Option<f64>,
}

impl DroneLife {
    /// Whether the queen may rightly have given up this process's leases.
    pub fn disturbed(&self) -> bool {
        self.exited || !self.harms.is_empty()
    }
}

/// Everything the checker judges.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Acknowledged tasks and the `max_attempts` their specs asked for.
    pub acked: BTreeMap<TaskId, Option<u32>>,
    /// The queen's configured default `max_attempts`.
    pub default_max_attempts: u32,
    /// Acknowledged tasks the queen does not know, with what it answered.
    pub missing: BTreeMap<TaskId, String>,
    /// The records when all were terminal (or the bound ran out).
    pub first: BTreeMap<TaskId, TaskView>,
    /// The records again, after the quiet period and the barriers.
    pub second: BTreeMap<TaskId, TaskView>,
    /// Every run in the execution log.
    pub runs: Vec<Execution>,
    /// Every drone process the scenario started.
    pub drones: Vec<DroneLife>,
    /// Runs with a process still alive (pids), after waiting for them to go.
    pub lingering: Vec<(Execution, Vec<i32>)>,
    /// What the lease sampler saw: a task listed under two drones at once.
    pub double_leases: Vec<String>,
    /// Problems found while gathering (a drone that never reconnected, a barrier that did
    /// not run...).
    pub gathering: Vec<String>,
}

/// A broken rule, and the tasks it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub task: Option<TaskId>,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.task {
            Some(t) => write!(f, "[{}] task {t}: {}", self.rule, self.what),
            None => write!(f, "[{}] {}", self.rule, self.what),
        }
    }
}

/// What a passing check saw, for scenario-specific assertions and the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub tasks: usize,
    pub by_state: BTreeMap<String, usize>,
    pub runs: usize,
    /// Tasks run under more than one fence.
    pub rerun_tasks: usize,
    /// Runs under an older fence that finished successfully (their outcome not recorded).
    pub duplicate_completions: usize,
    /// Attempt errors that are lost leases.
    pub lost_leases: usize,
    /// Tasks the queen quarantined (failed as what kills its drones).
    pub quarantined: usize,
    pub drones_started: usize,
    pub drones_disturbed: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tasks {:?}; {} runs, {} tasks re-run, {} duplicate completions, {} lost leases, {} quarantined; {} drone processes ({} killed/cut off)",
            self.tasks,
            self.by_state,
            self.runs,
            self.rerun_tasks,
            self.duplicate_completions,
            self.lost_leases,
            self.quarantined,
            self.drones_started,
            self.drones_disturbed
        )
    }
}

fn is_lost_lease(error: &str) -> bool {
    error.starts_with("lease lost")
}

/// The error history of `rec`, one entry per attempt: without the queen's closing note on a
/// task it failed early because its attempts kept losing their drones (`quarantined: ...`,
/// `tasks.max_lost_attempts`). That note is the reason the task ended, not an attempt's
/// outcome, and repeats the last attempt's number and fence; it is accepted only last, on a
/// `failed` task, right after that attempt's lost lease.
fn attempt_errors(rec: &TaskView) -> &[AttemptError] {
    match rec.errors.as_slice() {
        [rest @ .., lost, note]
            if rec.state == TaskState::Failed
                && note.error.starts_with("quarantined")
                && is_lost_lease(&lost.error)
                && (note.attempt, note.fence) == (lost.attempt, lost.fence) =>
        {
            &rec.errors[..rest.len() + 1]
        }
        all => all,
    }
}

/// Judges the evidence: every violation found, and the summary.
pub fn violations(ev: &Evidence) -> (Vec<Violation>, Summary) {
    let mut out = Vec::new();
    let mut v = |rule: &'static str, task: Option<TaskId>, what: String| {
        out.push(Violation { rule, task, what });
    };
    let drone_of: BTreeMap<i32, &DroneLife> = ev.drones.iter().map(|d| (d.pid, d)).collect();
    // A run on a pid no drone of ours had (e.g. read while its drone was dying) counts as
    // disturbed: it can only excuse, never accuse.
    let disturbed = |pid: Option<i32>| match pid.and_then(|p| drone_of.get(&p)) {
        Some(d) => d.disturbed(),
        None => true,
    };
    let drone_name = |pid: Option<i32>| {
        pid.and_then(|p| drone_of.get(&p)).map_or_else(
            || format!("unknown drone pid {pid:?}"),
            |d| format!("drone {} (pid {})", d.name, d.pid),
        )
    };
    let mut runs_of: BTreeMap<TaskId, Vec<&Execution>> = BTreeMap::new();
    for r in &ev.runs {
        runs_of.entry(r.task).or_default().push(r);
    }
    let mut summary = Summary {
        tasks: ev.acked.len(),
        runs: ev.runs.len(),
        drones_started: ev.drones.len(),
        drones_disturbed: ev.drones.iter().filter(|d| d.disturbed()).count(),
        ..Summary::default()
    };

    for (id, err) in &ev.missing {
        v(
            "G1",
            Some(*id),
            format!("acknowledged but unknown to the queen: {err}"),
        );
    }
    for (&id, &asked) in &ev.acked {
        if ev.missing.contains_key(&id) {
            continue;
        }
        let Some(first) = ev.first.get(&id) else {
            v("G1", Some(id), "acknowledged but never read back".into());
            continue;
        };
        let rec = ev.second.get(&id).unwrap_or(first);
        *summary.by_state.entry(rec.state.to_string()).or_default() += 1;
        if !first.state.is_terminal() {
            v(
                "G2",
                Some(id),
                format!("still {} when the bound ran out", first.state),
            );
            continue;
        }
        if rec != first {
            v(
                "G3",
                Some(id),
                format!(
                    "a terminal record changed: {} attempt {} fence {} result {:?} -> {} attempt {} fence {} result {:?}",
                    first.state, first.attempts, first.fence, first.result, rec.state, rec.attempts, rec.fence, rec.result
                ),
            );
        }

        // G8: the bound, and the history.
        let expected = asked.unwrap_or(ev.default_max_attempts);
        if rec.max_attempts != expected {
            v(
                "G8",
                Some(id),
                format!(
                    "max_attempts is {} but the spec asked for {expected}",
                    rec.max_attempts
                ),
            );
        }
        if rec.attempts > rec.max_attempts {
            v(
                "G8",
                Some(id),
                format!(
                    "{} attempts, max_attempts {}",
                    rec.attempts, rec.max_attempts
                ),
            );
        }
        let errors = attempt_errors(rec);
        let want_errors = match rec.state {
            TaskState::Succeeded => Some(rec.attempts.saturating_sub(1) as usize),
            TaskState::Failed => Some(rec.attempts as usize),
            _ => None,
        };
        if let Some(want) = want_errors {
            let numbers: Vec<u32> = errors.iter().map(|e| e.attempt).collect();
            let in_order: Vec<u32> = (1..=want as u32).collect();
            if numbers != in_order {
                v(
                    "G8",
                    Some(id),
                    format!(
                        "{} after {} attempts must keep errors for attempts {in_order:?}, has {numbers:?}",
                        rec.state, rec.attempts
                    ),
                );
            }
        } else if errors.len() > rec.attempts as usize {
            v(
                "G8",
                Some(id),
                format!("{} errors for {} attempts", errors.len(), rec.attempts),
            );
        }
        if errors.windows(2).any(|w| w[0].fence >= w[1].fence)
            || errors.iter().any(|e| e.fence > rec.fence)
        {
            v(
                "G3",
                Some(id),
                format!(
                    "error fences {:?} must grow and stay at or below the final fence {}",
                    errors.iter().map(|e| e.fence.0).collect::<Vec<_>>(),
                    rec.fence
                ),
            );
        }
        if rec.state == TaskState::Failed && errors.last().is_some_and(|e| e.fence != rec.fence) {
            v(
                "G3",
                Some(id),
                format!(
                    "failed, but the last error is not from the final fence {}",
                    rec.fence
                ),
            );
        }
        summary.lost_leases += rec
            .errors
            .iter()
            .filter(|e| is_lost_lease(&e.error))
            .count();
        // Quarantine convicts only on evidence: the lost lease that ended the task was an
        // isolated attempt's (the task alone on a drone that died by itself).
        if rec.state == TaskState::Failed
            && rec
                .errors
                .last()
                .is_some_and(|e| e.error.contains("quarantined"))
        {
            summary.quarantined += 1;
            let convicted = rec
                .suspicion
                .as_ref()
                .and_then(|s| s.losses.last())
                .is_some_and(|l| l.verdict == LossVerdict::Isolated && l.fence == rec.fence);
            if !convicted {
                v(
                    "Q",
                    Some(id),
                    format!(
                        "quarantined without an isolated lost lease under its final fence {}: {:?}",
                        rec.fence, rec.suspicion
                    ),
                );
            }
        }

        // What really ran.
        let runs = runs_of.get(&id).map(Vec::as_slice).unwrap_or_default();
        if runs.len() > 1 {
            summary.rerun_tasks += 1;
        }
        if runs.len() > rec.max_attempts as usize {
            v(
                "G8",
                Some(id),
                format!(
                    "ran under {} fences, max_attempts {}",
                    runs.len(),
                    rec.max_attempts
                ),
            );
        }
        if rec.state == TaskState::Succeeded && !runs.is_empty() {
            let finished_here = runs
                .iter()
                .any(|r| r.fence == rec.fence.0 && r.done_at.is_some());
            if !finished_here {
                v(
                    "G3",
                    Some(id),
                    format!(
                        "succeeded under fence {} but no run under that fence finished",
                        rec.fence
                    ),
                );
            }
            if let Some(code) = rec.result.as_ref().and_then(|r| r.get("exit_code")) {
                if code != 0 {
                    v("G3", Some(id), format!("succeeded with exit code {code}"));
                }
            }
        }
        for r in runs {
            if r.starts > 1 {
                v(
                    "G3",
                    Some(id),
                    format!(
                        "fence {} started {} times: one lease ran twice",
                        r.fence, r.starts
                    ),
                );
            }
            let accounted = if r.fence == rec.fence.0 {
                Some(rec.attempts)
            } else {
                errors
                    .iter()
                    .find(|e| e.fence.0 == r.fence)
                    .map(|e| e.attempt)
            };
            match accounted {
                None if rec.state != TaskState::Cancelled => v(
                    "G3",
                    Some(id),
                    format!(
                        "ran under fence {} (attempt {}) on {}, a lease the record does not account for (final fence {}, error fences {:?})",
                        r.fence,
                        r.attempt,
                        drone_name(r.drone_pid),
                        rec.fence,
                        rec.errors.iter().map(|e| e.fence.0).collect::<Vec<_>>()
                    ),
                ),
                Some(attempt) if attempt != r.attempt => v(
                    "G3",
                    Some(id),
                    format!(
                        "fence {} ran as attempt {} but the record calls it attempt {attempt}",
                        r.fence, r.attempt
                    ),
                ),
                _ => {}
            }
            let lost = rec
                .errors
                .iter()
                .find(|e| e.fence.0 == r.fence)
                .filter(|e| is_lost_lease(&e.error));
            if let Some(e) = lost {
                if !disturbed(r.drone_pid) {
                    v(
                        "G4",
                        Some(id),
                        format!(
                            "fence {} ran on healthy {} but its lease was declared lost ({})",
                            r.fence,
                            drone_name(r.drone_pid),
                            e.error
                        ),
                    );
                }
            }
            if r.fence >= rec.fence.0 {
                continue;
            }
            // An older lease's run.
            if r.done_at.is_some() {
                summary.duplicate_completions += 1;
                if !disturbed(r.drone_pid) {
                    v(
                        "G4",
                        Some(id),
                        format!(
                            "fence {} finished successfully on healthy {} although the task moved on to fence {}: two live leases",
                            r.fence,
                            drone_name(r.drone_pid),
                            rec.fence
                        ),
                    );
                }
            }
        }
    }
    for r in &ev.runs {
        let died = r
            .drone_pid
            .and_then(|p| drone_of.get(&p))
            .and_then(|d| d.died_at);
        if let (Some(died), Some((phase, at))) = (died, r.last) {
            if at > died + ORPHAN_MARGIN_S {
                v(
                    "G6",
                    Some(r.task),
                    format!(
                        "fence {} (attempt {}) wrote its {phase:?} line {:.2} s after {} was dead: a task process outlived its drone",
                        r.fence,
                        r.attempt,
                        at - died,
                        drone_name(r.drone_pid)
                    ),
                );
            }
        }
    }
    for (run, pids) in &ev.lingering {
        let drone = run.drone_pid.and_then(|p| drone_of.get(&p));
        let why = match drone {
            Some(d) if d.exited => "its drone died",
            Some(_) => "its task is terminal (its drone was never told to stop it, or did not)",
            None => "its drone is unknown",
        };
        v(
            "G6",
            Some(run.task),
            format!(
                "processes {pids:?} of fence {} (attempt {}) on {} still run although {why}",
                run.fence,
                run.attempt,
                drone_name(run.drone_pid)
            ),
        );
    }
    for d in &ev.double_leases {
        v("G4", None, d.clone());
    }
    for g in &ev.gathering {
        v("check", None, g.clone());
    }
    (out, summary)
}

/// The failure report: the violations, then each involved task's record and runs.
pub fn report(ev: &Evidence, found: &[Violation], exec_lines: impl Fn(TaskId) -> String) -> String {
    const MAX_SHOWN: usize = 40;
    const MAX_TASKS: usize = 8;
    let mut s = String::new();
    let _ = writeln!(s, "{} invariant violation(s):", found.len());
    for f in found.iter().take(MAX_SHOWN) {
        let _ = writeln!(s, "  {f}");
    }
    if found.len() > MAX_SHOWN {
        let _ = writeln!(s, "  ... and {} more", found.len() - MAX_SHOWN);
    }
    let tasks: BTreeSet<TaskId> = found.iter().filter_map(|f| f.task).collect();
    for id in tasks.iter().take(MAX_TASKS) {
        let _ = writeln!(s, "--- task {id} ---");
        if let Some(first) = ev.first.get(id) {
            let _ = writeln!(s, "record:\n{}", pretty(first));
        }
        if let Some(second) = ev.second.get(id).filter(|r| Some(*r) != ev.first.get(id)) {
            let _ = writeln!(s, "record when read again:\n{}", pretty(second));
        }
        let _ = writeln!(
            s,
            "exec log lines (task attempt fence phase pid drone-pid):\n{}",
            exec_lines(*id)
        );
    }
    if tasks.len() > MAX_TASKS {
        let _ = writeln!(s, "... and {} more tasks", tasks.len() - MAX_TASKS);
    }
    let _ = writeln!(s, "drone processes:");
    for d in &ev.drones {
        let _ = writeln!(
            s,
            "  {} pid {}: harms {:?}, exited {}",
            d.name, d.pid, d.harms, d.exited
        );
    }
    s
}

/// A record as JSON, with long results cut so a report stays readable.
fn pretty(v: &TaskView) -> String {
    let mut v = v.clone();
    if let Some(r) = &v.result {
        let text = r.to_string();
        if text.len() > 400 {
            v.result = Some(serde_json::Value::String(format!("{}...", &text[..400])));
        }
    }
    v.payload = serde_json::Value::String("<payload>".into());
    serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{v:?} ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    const HEALTHY: i32 = 100;
    const KILLED: i32 = 200;

    /// A record, built from JSON so fields the API grows later take their defaults.
    fn record(
        id: TaskId,
        state: TaskState,
        attempts: u32,
        fence: u64,
        errors: &[(u32, u64, &str)],
    ) -> TaskView {
        let errors: Vec<serde_json::Value> = errors
            .iter()
            .map(|(attempt, fence, error)| {
                serde_json::json!({
                    "attempt": attempt, "fence": fence, "error": error, "at": Utc::now(),
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "id": id, "queue": "default", "kind": "exec", "payload": null, "priority": 0,
            "state": state, "attempts": attempts, "max_attempts": 3, "fence": fence,
            "result": {"exit_code": 0}, "errors": errors, "created_at": Utc::now(),
        }))
        .expect("a valid task record")
    }

    /// Lost-lease evidence with these verdicts, one attempt (and fence) each.
    fn evidence(verdicts: &[LossVerdict]) -> shared::api::Suspicion {
        shared::api::Suspicion {
            suspect_since: Some(Utc::now()),
            losses: verdicts
                .iter()
                .zip(1u32..)
                .map(|(v, n)| shared::api::LostLease {
                    attempt: n,
                    fence: shared::Fence(u64::from(n)),
                    drone: None,
                    co_tenants: 0,
                    verdict: *v,
                    at: Utc::now(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_quarantine_needs_an_isolated_loss_under_the_final_fence() {
        let id = TaskId::generate();
        let lost = "lease lost: drone did not come back in time";
        let quarantined = "lease lost: drone did not come back in time; quarantined: 1 isolated attempt(s) lost their drone";
        let judge = |verdicts: &[LossVerdict]| {
            let mut rec = record(
                id,
                TaskState::Failed,
                2,
                2,
                &[(1, 1, lost), (2, 2, quarantined)],
            );
            rec.suspicion = Some(evidence(verdicts));
            let ev = Evidence {
                acked: [(id, Some(3))].into(),
                default_max_attempts: 3,
                first: [(id, rec.clone())].into(),
                second: [(id, rec)].into(),
                ..Evidence::default()
            };
            rules(&ev)
        };
        assert!(judge(&[LossVerdict::Shared, LossVerdict::Isolated]).is_empty());
        assert_eq!(judge(&[LossVerdict::Shared, LossVerdict::Shared]), ["Q"]);
        assert_eq!(
            judge(&[LossVerdict::Isolated, LossVerdict::Inconclusive]),
            ["Q"]
        );
        assert_eq!(
            judge(&[LossVerdict::Isolated]),
            ["Q"],
            "not the final fence's"
        );
    }

    fn run(task: TaskId, fence: u64, attempt: u32, done: bool, drone: i32, at: usize) -> Execution {
        Execution {
            task,
            fence,
            attempt,
            starts: 1,
            started_at: at,
            done_at: done.then_some(at + 1),
            pids: vec![1000 + at as i32],
            drone_pid: Some(drone),
            last: Some((if done { Phase::Done } else { Phase::Start }, at as f64)),
        }
    }

    /// One task that lost its first lease on a killed drone (whose run still finished)
    /// and succeeded on a healthy one: every rule holds.
    fn healthy_evidence() -> (Evidence, TaskId) {
        let id = TaskId::generate();
        let rec = record(
            id,
            TaskState::Succeeded,
            2,
            5,
            &[(1, 4, "lease lost: drone died")],
        );
        let ev = Evidence {
            acked: [(id, None)].into(),
            default_max_attempts: 3,
            first: [(id, rec.clone())].into(),
            second: [(id, rec)].into(),
            runs: vec![
                run(id, 4, 1, true, KILLED, 0),
                run(id, 5, 2, true, HEALTHY, 2),
            ],
            drones: vec![
                DroneLife {
                    name: "h".into(),
                    pid: HEALTHY,
                    harms: vec![],
                    exited: false,
                    died_at: None,
                },
                DroneLife {
                    name: "k".into(),
                    pid: KILLED,
                    harms: vec![Harm::Killed],
                    exited: true,
                    died_at: Some(1.0),
                },
            ],
            ..Evidence::default()
        };
        (ev, id)
    }

    fn rules(ev: &Evidence) -> Vec<&'static str> {
        violations(ev).0.into_iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_clean_run_passes_and_counts_the_duplicate() {
        let (ev, _) = healthy_evidence();
        let (found, summary) = violations(&ev);
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(summary.rerun_tasks, 1);
        assert_eq!(summary.duplicate_completions, 1);
        assert_eq!(summary.lost_leases, 1);
    }

    #[test]
    fn each_rule_fires() {
        let (base, id) = healthy_evidence();

        let mut ev = base.clone();
        ev.missing.insert(id, "HTTP 404".into());
        assert_eq!(rules(&ev), ["G1"]);

        let mut ev = base.clone();
        ev.first.get_mut(&id).expect("task").state = TaskState::Running;
        assert_eq!(rules(&ev), ["G2"]);

        let mut ev = base.clone();
        ev.second.get_mut(&id).expect("task").result = Some(serde_json::json!({"exit_code": 1}));
        assert!(rules(&ev).contains(&"G3"), "a changed terminal record");

        // The recorded outcome's fence never finished.
        let mut ev = base.clone();
        ev.runs[1].done_at = None;
        assert_eq!(rules(&ev), ["G3"]);

        // A run under a fence the record does not know.
        let mut ev = base.clone();
        ev.runs.push(run(id, 3, 1, false, HEALTHY, 9));
        assert!(rules(&ev).contains(&"G3"));

        // The older lease finished on a healthy drone: two live leases.
        let mut ev = base.clone();
        ev.runs[0].drone_pid = Some(HEALTHY);
        assert_eq!(rules(&ev), ["G4", "G4"]);

        let mut ev = base.clone();
        ev.double_leases
            .push("task x listed under d1 and d2".into());
        assert_eq!(rules(&ev), ["G4"]);

        let mut ev = base.clone();
        ev.lingering.push((ev.runs[0].clone(), vec![1000]));
        assert_eq!(rules(&ev), ["G6"]);

        // The killed drone's run wrote its done line well after the drone died.
        let mut ev = base.clone();
        ev.runs[0].last = Some((Phase::Done, 1.0 + 2.0 * ORPHAN_MARGIN_S));
        assert_eq!(rules(&ev), ["G6"]);

        // Too many attempts; a lost error; a wrong bound.
        let mut ev = base.clone();
        for r in [ev.first.get_mut(&id), ev.second.get_mut(&id)]
            .into_iter()
            .flatten()
        {
            r.attempts = 4;
        }
        assert!(rules(&ev).contains(&"G8"));
        let mut ev = base.clone();
        for r in [ev.first.get_mut(&id), ev.second.get_mut(&id)]
            .into_iter()
            .flatten()
        {
            r.errors.clear();
        }
        assert!(rules(&ev).contains(&"G8"));
        let mut ev = base;
        ev.acked.insert(id, Some(7));
        assert_eq!(rules(&ev), ["G8"]);
    }

    #[test]
    fn a_quarantine_note_closes_a_failed_history_and_nothing_else() {
        let id = TaskId::generate();
        let lost = "lease lost: drone did not come back in time";
        let note = "quarantined: 2 attempts ended with the drone lost";
        let judge = |state, errors: &[(u32, u64, &str)]| {
            let mut rec = record(id, state, 2, 2, errors);
            rec.suspicion = Some(evidence(&[LossVerdict::Shared, LossVerdict::Isolated]));
            let ev = Evidence {
                acked: [(id, Some(3))].into(),
                default_max_attempts: 3,
                first: [(id, rec.clone())].into(),
                second: [(id, rec)].into(),
                ..Evidence::default()
            };
            rules(&ev)
        };
        let closed = [(1, 1, lost), (2, 2, lost), (2, 2, note)];
        assert!(judge(TaskState::Failed, &closed).is_empty());
        // Not last, not after a lost lease of the same attempt, or a second outcome of an
        // attempt: an extra error.
        assert!(!judge(
            TaskState::Failed,
            &[(1, 1, lost), (2, 2, note), (2, 2, lost)]
        )
        .is_empty());
        assert!(!judge(
            TaskState::Failed,
            &[(1, 1, lost), (2, 2, "exit 3"), (2, 2, note)]
        )
        .is_empty());
        assert!(!judge(
            TaskState::Failed,
            &[(1, 1, lost), (2, 2, lost), (2, 2, lost)]
        )
        .is_empty());
    }
}
