//! G2, G3 and G8 for tasks that do not simply succeed: attempts are bounded (failed
//! attempts and lost leases alike) with every attempt's error kept, a cancelled or timed-out
//! task's processes are killed, and a cancelled task's record never changes again.

use std::path::Path;
use std::time::Duration;

use hive_tests::execlog::{shell_quote, Phase};
use hive_tests::hive::lingering;
use hive_tests::{echo, named_hello, pid_alive, wait_until, Execution, FakeDrone, Hive, DEADLINE};
use serde_json::json;
use shared::api::{TaskSpec, TaskState};
use shared::TaskId;

/// A body that starts a `sleep 30` grandchild, publishes both pids and waits.
fn long_running(dir: &Path) -> String {
    let pid = shell_quote(&dir.join("pid").to_string_lossy());
    let gpid = shell_quote(&dir.join("gpid").to_string_lossy());
    format!(
        "sleep 30 &\n\
         echo $! > {gpid}.tmp && mv {gpid}.tmp {gpid}\n\
         echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\n\
         wait"
    )
}

/// Waits until the task's processes published their pids; returns them.
fn wait_pids(hive: &Hive) -> [i32; 2] {
    let read = |name: &str| {
        std::fs::read_to_string(hive.path(name))
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()
    };
    let pids = wait_until(DEADLINE, "the task to publish its pids", || {
        Some([read("pid")?, read("gpid")?])
    });
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "task processes {pids:?} should be running"
    );
    pids
}

fn wait_dead(pids: [i32; 2], what: &str) {
    wait_until(DEADLINE, what, || {
        let alive: Vec<i32> = pids.into_iter().filter(|p| pid_alive(*p)).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("still alive: {alive:?}"))
        }
    });
}

/// Runs an echo task to completion on the hive's only drone: once it is done, everything
/// that drone sent before it (e.g. a late outcome) has been handled by the queen.
fn barrier(hive: &Hive) {
    let id = hive.api().submit(&echo(json!("barrier"))).id;
    let v = hive.wait_task(id, "the barrier task to finish", |t| t.state.is_terminal());
    assert_eq!(v.state, TaskState::Succeeded, "{v:#?}");
}

/// Guards against a failing task retrying forever or losing its history (G8): a command
/// that always exits 3, with `max_attempts` 3, runs exactly three times (each under a newer
/// fence), then is `failed` with one error per attempt and the last attempt's output.
#[test]
fn a_failing_task_runs_max_attempts_times_and_keeps_every_error() {
    let mut hive = Hive::start();
    hive.start_drone("d1", 2);
    let spec = TaskSpec {
        max_attempts: Some(3),
        ..hive.exec_log().task("echo boom >&2; exit 3")
    };
    let id = hive.api().submit(&spec).id;
    let v = hive.wait_task(id, "terminal", |t| t.state.is_terminal());
    assert_eq!(v.state, TaskState::Failed, "{v:#?}");
    assert_eq!(v.attempts, 3, "{v:#?}");
    let attempts: Vec<u32> = v.errors.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3], "one error per attempt: {v:#?}");
    assert!(
        v.errors.windows(2).all(|w| w[0].fence < w[1].fence),
        "fences grow: {v:#?}"
    );
    let result = v
        .result
        .as_ref()
        .expect("the last attempt's output is kept");
    assert_eq!(result["exit_code"], 3, "{result}");
    assert!(
        result["stderr"]
            .as_str()
            .is_some_and(|s| s.contains("boom")),
        "{result}"
    );

    let runs = hive.exec_log().by_task().remove(&id).unwrap_or_default();
    let seen: Vec<(u32, Phase)> = runs.iter().map(|e| (e.attempt, e.phase)).collect();
    assert_eq!(
        seen,
        vec![(1, Phase::Start), (2, Phase::Start), (3, Phase::Start)],
        "{}",
        hive.exec_log().dump()
    );
    // Nothing runs it again.
    barrier(&hive);
    assert_eq!(hive.exec_log().starts(id), 3);
    hive.check(DEADLINE);
}

/// Guards against lost leases escaping the attempt bound (G8 "lost leases count"): a task
/// whose drones keep dying under it — two fake drones that each take it and vanish — is
/// `failed` after `max_attempts` 2, with both lost leases in its history, instead of being
/// requeued forever.
#[test]
fn lost_leases_count_as_attempts() {
    let mut hive = Hive::start();
    let addr = hive.queen.drones_addr;
    let kind = "fake-kind";
    let a = FakeDrone::connect(addr, named_hello("fake-a", &[kind], 1));
    let spec = TaskSpec {
        kind: kind.into(),
        max_attempts: Some(2),
        ..TaskSpec::default()
    };
    let id = hive.api().submit(&spec).id;
    let first = a.expect_assign(Duration::from_secs(10));
    let b = FakeDrone::connect(addr, named_hello("fake-b", &[kind], 1));
    drop(a);
    let second = b.expect_assign(DEADLINE);
    assert_eq!((second.task_id, second.attempt), (id, 2));
    drop(b);

    let v = hive.wait_task(id, "terminal", |t| t.state.is_terminal());
    assert_eq!(v.state, TaskState::Failed, "{v:#?}");
    assert_eq!(v.attempts, 2, "{v:#?}");
    let fences: Vec<_> = v.errors.iter().map(|e| (e.attempt, e.fence)).collect();
    assert_eq!(fences, vec![(1, first.fence), (2, second.fence)], "{v:#?}");
    hive.check(DEADLINE);
}

/// Guards against a cancelled task running on (its drone never told, or the kill missing a
/// grandchild) and against the killed attempt's report turning `cancelled` into something
/// else (G3: a terminal state never changes). A running `sh` with a `sleep 30` grandchild is
/// cancelled through the API; both processes must die, and the record must stay as the
/// cancel left it; a second cancel is refused.
#[test]
fn cancelling_a_running_task_kills_its_processes_and_sticks() {
    let mut hive = Hive::start();
    hive.start_drone("d1", 2);
    let id = hive
        .api()
        .submit(&hive.exec_log().task(&long_running(hive.dir())))
        .id;
    let pids = wait_pids(&hive);
    hive.wait_task(id, "running", |t| t.state == TaskState::Running);

    let cancelled = hive
        .api()
        .try_cancel(id)
        .unwrap_or_else(|e| panic!("cancel failed: {e}"));
    assert_eq!(cancelled.state, TaskState::Cancelled, "{cancelled:#?}");
    wait_dead(pids, "the cancelled task's process and grandchild to die");
    barrier(&hive);
    let after = hive.api().task(id);
    assert_eq!(after.state, TaskState::Cancelled, "{after:#?}");
    assert_eq!(
        (after.attempts, after.fence),
        (cancelled.attempts, cancelled.fence),
        "{after:#?}"
    );
    assert_eq!(
        after.result, cancelled.result,
        "the killed attempt's report changed the result"
    );
    assert_eq!(
        after.errors, cancelled.errors,
        "the killed attempt's report changed the errors"
    );

    let again = hive.api().try_cancel(id);
    assert!(
        again
            .as_ref()
            .err()
            .and_then(|e| e.status())
            .is_some_and(|s| (400..500).contains(&s)),
        "{again:?}"
    );
    assert_eq!(hive.exec_log().starts(id), 1);
    hive.check(DEADLINE);
}

/// Scenario 7 of the chaos suite. Guards against a hung task holding a slot forever (G2) or
/// escaping its attempt bound (G8): a task that hangs (`sleep 30` in a child process) with
/// `timeout_ms` 300 and `max_attempts` 2 is killed past its timeout — shell and child —,
/// retried under a newer fence, killed again, then `failed` with both timeouts in its error
/// history; the slot is free again afterwards.
#[test]
fn a_hung_task_is_killed_past_its_timeout_retried_then_failed() {
    let mut hive = Hive::start();
    hive.start_drone("d1", 1);
    let spec = TaskSpec {
        timeout_ms: Some(300),
        max_attempts: Some(2),
        ..hive.exec_log().task(&hive.exec_log().child("sleep 30"))
    };
    let id: TaskId = hive.api().submit(&spec).id;
    let v = hive.wait_task(id, "terminal", |t| t.state.is_terminal());
    assert_eq!(v.state, TaskState::Failed, "{v:#?}");
    assert_eq!((v.attempts, v.errors.len()), (2, 2), "{v:#?}");
    assert!(
        v.errors.iter().all(|e| e.error.contains("timed out")),
        "both attempts end by their timeout: {v:#?}"
    );
    let runs: Vec<Execution> = hive
        .exec_log()
        .executions()
        .into_iter()
        .filter(|r| r.task == id)
        .collect();
    let seen: Vec<(u32, bool, usize)> = runs
        .iter()
        .map(|r| (r.attempt, r.done_at.is_some(), r.pids.len()))
        .collect();
    assert_eq!(
        seen,
        vec![(1, false, 2), (2, false, 2)],
        "two runs, each a shell and its child, neither finished: {runs:#?}"
    );
    assert!(runs[0].fence < runs[1].fence, "{runs:#?}");
    for r in &runs {
        wait_until(
            DEADLINE,
            &format!("attempt {}'s processes to die", r.attempt),
            || lingering(r).is_empty(),
        );
    }
    // The slot is free again.
    barrier(&hive);
    hive.check(DEADLINE);
}
