//! G2, G3 and G6 when a drone dies or hangs mid-task: its lease is requeued to another drone
//! in bounded time, the task's outcome is recorded once, and a dead drone's task processes
//! die with it.

use std::path::Path;

use hive_tests::execlog::{shell_quote, Phase};
use hive_tests::{echo, pid_alive, pid_state, wait_until, Hive, DEADLINE};
use shared::api::{TaskState, TaskView};
use shared::TaskId;

/// A task body that, on attempt 1 only, starts a grandchild (`sleep 30 &`), publishes both
/// pids (written then renamed, so a reader never sees half a pid) and waits; later attempts
/// finish at once.
fn slow_first_attempt(dir: &Path) -> String {
    let pid = shell_quote(&dir.join("pid").to_string_lossy());
    let gpid = shell_quote(&dir.join("gpid").to_string_lossy());
    format!(
        "if [ \"$HIVE_ATTEMPT\" = 1 ]; then\n\
           sleep 30 &\n\
           echo $! > {gpid}.tmp && mv {gpid}.tmp {gpid}\n\
           echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\n\
           wait\n\
         fi\n\
         echo \"attempt $HIVE_ATTEMPT ok\""
    )
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits until attempt 1 runs and has published its pids; returns (task record, sh pid,
/// grandchild pid).
fn wait_first_attempt_running(hive: &Hive, id: TaskId) -> (TaskView, i32, i32) {
    let (pid, gpid) = wait_until(DEADLINE, "attempt 1 to start and publish its pids", || {
        Some((read_pid(&hive.path("pid"))?, read_pid(&hive.path("gpid"))?))
    });
    let view = hive.wait_task(id, "running attempt 1", |t| {
        t.state == TaskState::Running && t.attempts == 1
    });
    assert!(
        pid_alive(pid) && pid_alive(gpid),
        "task processes {pid}/{gpid} should be running"
    );
    (view, pid, gpid)
}

/// Guards against (1) a dead drone's task staying `running` forever (G2), (2) the retry not
/// happening elsewhere, and (3) the dead drone's task processes living on as orphans that
/// keep doing work the queen has already handed to someone else (G6). A drone is `kill -9`ed
/// while its task (`sh` with a `sleep 30` grandchild) runs; the task must be requeued to the
/// other drone and succeed there on attempt 2, with the lost lease recorded as attempt 1's
/// error, and both the `sh` and the `sleep` must be gone.
#[test]
fn a_task_on_a_killed_drone_is_requeued_and_its_processes_die() {
    let mut hive = Hive::start();
    hive.start_drone("d1", 1);
    hive.start_drone("d2", 1);
    let spec = hive.exec_log().task(&slow_first_attempt(hive.dir()));
    let id = hive.api().submit(&spec).id;

    let (running, pid, gpid) = wait_first_attempt_running(&hive, id);
    let victim = running
        .lease
        .as_ref()
        .expect("a running task has a lease")
        .drone_name
        .clone();
    let victim_id = running.lease.as_ref().map(|l| l.drone);
    hive.drone(&victim).kill9();

    wait_until(
        DEADLINE,
        "the killed drone's task process and its grandchild to die",
        || {
            let alive: Vec<i32> = [pid, gpid].into_iter().filter(|p| pid_alive(*p)).collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still alive: {alive:?}"))
            }
        },
    );

    let done = hive.wait_task(id, "succeeded", |t| t.state.is_terminal());
    assert_eq!(done.state, TaskState::Succeeded, "{done:#?}");
    assert_eq!(done.attempts, 2, "{done:#?}");
    assert!(
        done.fence > running.fence,
        "the retry must run under a newer fence: {done:#?}"
    );
    assert_eq!(
        done.errors.len(),
        1,
        "attempt 1's lost lease is kept: {done:#?}"
    );
    assert_eq!(done.errors[0].attempt, 1);
    assert_eq!(done.errors[0].fence, running.fence);
    assert_eq!(
        done.errors[0].drone, victim_id,
        "the error names the dead drone"
    );
    let result = done.result.as_ref().expect("a result");
    assert_eq!(result["exit_code"], 0, "{result}");
    assert!(
        result["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("attempt 2 ok")),
        "{result}"
    );

    // The log shows what really ran: attempt 1 started and never finished, attempt 2 did both.
    let runs = hive.exec_log().by_task().remove(&id).unwrap_or_default();
    let seen: Vec<(u32, u64, Phase)> = runs.iter().map(|e| (e.attempt, e.fence, e.phase)).collect();
    assert_eq!(
        seen,
        vec![
            (1, running.fence.0, Phase::Start),
            (2, done.fence.0, Phase::Start),
            (2, done.fence.0, Phase::Done)
        ],
        "exec log:\n{}",
        hive.exec_log().dump()
    );
}

/// Guards against a hung drone (SIGSTOP: connected but silent) pinning its task forever, and
/// against its late report overwriting the real outcome (G3). The frozen drone's lease is
/// requeued after the heartbeat timeout and the task succeeds on the other drone; when the
/// frozen drone is thawed, its stale attempt must be stopped and the task's record must not
/// change.
#[test]
fn a_task_on_a_frozen_drone_is_requeued_and_the_thawed_drone_changes_nothing() {
    let mut hive = Hive::start();
    // Each drone carries its own name as a label, so a task can be sent to one of them.
    hive.start_drone_with("d1", 1, &["--label", "d1"]);
    hive.start_drone_with("d2", 1, &["--label", "d2"]);
    let spec = hive.exec_log().task(&slow_first_attempt(hive.dir()));
    let id = hive.api().submit(&spec).id;

    let (running, pid, gpid) = wait_first_attempt_running(&hive, id);
    let victim = running
        .lease
        .as_ref()
        .expect("a running task has a lease")
        .drone_name
        .clone();
    hive.drone(&victim).sigstop();
    let frozen = hive.drone(&victim).pid();
    wait_until(DEADLINE, "the drone to be stopped", || {
        pid_state(frozen) == Some('T')
    });

    let done = hive.wait_task(id, "succeeded on the other drone", |t| {
        t.state.is_terminal()
    });
    assert_eq!(done.state, TaskState::Succeeded, "{done:#?}");
    assert_eq!(done.attempts, 2, "{done:#?}");
    // The frozen drone's processes are not its to kill while it is frozen: they still run.
    assert!(
        pid_alive(pid),
        "attempt 1 is still running under the frozen drone"
    );

    hive.drone(&victim).sigcont();
    hive.wait_drone_connected(&victim);
    wait_until(
        DEADLINE,
        "the thawed drone to stop its stale attempt",
        || !pid_alive(pid) && !pid_alive(gpid),
    );
    // Give the thawed drone's report of its stopped attempt every chance to (wrongly) land
    // first: run a task pinned to that drone (by label) after the attempt died, then check.
    let mut barrier = echo(serde_json::json!("barrier"));
    barrier.labels = vec![victim.clone()];
    let barrier = hive.api().submit(&barrier).id;
    let barrier = hive.wait_task(barrier, "the barrier task to finish", |t| {
        t.state.is_terminal()
    });
    assert_eq!(
        barrier.state,
        TaskState::Succeeded,
        "the thawed drone works again: {barrier:#?}"
    );
    let after = hive.api().task(id);
    assert_eq!(after, done, "a stale attempt changed the finished task");
    hive.queen.assert_running();
}
