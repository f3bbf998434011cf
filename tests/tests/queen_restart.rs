//! G5 and G6 across a queen `kill -9`: drones keep running their tasks through the outage,
//! reconnect, and the restarted queen re-attaches their leases instead of running the tasks
//! again; outcomes finished during the outage are delivered from the drones' outboxes.

use std::collections::BTreeSet;

use hive_tests::execlog::Phase;
use hive_tests::{wait_until, Hive, DEADLINE};
use shared::api::TaskState;
use shared::TaskId;

/// Heartbeat timeout for these scenarios: how long a restarted queen waits for drones to
/// come back and re-attach. Above the drone's 5 s reconnect backoff cap, so a correct drone
/// always makes it whatever its jitter; nothing waits for it when things work.
const REATTACH_WINDOW_MS: &str = "6000";

fn hive_with_two_drones() -> Hive {
    let mut hive = hive_tests::hive_builder!()
        .env("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", REATTACH_WINDOW_MS)
        .start();
    hive.start_drone("d1", 2);
    hive.start_drone("d2", 2);
    hive
}

/// Submits four exec tasks running `body` and waits until all four are running and have
/// logged their start.
fn start_four(hive: &Hive, body: &str) -> Vec<TaskId> {
    let ids: Vec<TaskId> = (0..4)
        .map(|_| hive.api().submit(&hive.exec_log().task(body)).id)
        .collect();
    wait_until(DEADLINE, "all four tasks to start", || {
        let started: BTreeSet<TaskId> = hive
            .exec_log()
            .entries()
            .into_iter()
            .filter(|e| e.phase == Phase::Start)
            .map(|e| e.task)
            .collect();
        ids.iter().all(|id| started.contains(id))
    });
    for id in &ids {
        hive.wait_task(*id, "running", |t| t.state == TaskState::Running);
    }
    ids
}

/// Asserts each task succeeded on its first attempt and really ran exactly once, then runs
/// the invariant checker.
fn assert_ran_once(hive: &mut Hive, ids: &[TaskId]) {
    let views = hive.wait_all_succeeded(DEADLINE, ids);
    let log = hive.exec_log().by_task();
    for v in &views {
        assert_eq!(v.attempts, 1, "re-attached task ran again: {v:#?}");
        assert!(v.errors.is_empty(), "{v:#?}");
        let runs: Vec<(u32, u64, Phase)> = log
            .get(&v.id)
            .map(|es| es.iter().map(|e| (e.attempt, e.fence, e.phase)).collect())
            .unwrap_or_default();
        assert_eq!(
            runs,
            vec![(1, v.fence.0, Phase::Start), (1, v.fence.0, Phase::Done)],
            "task {} must run exactly once; exec log:\n{}",
            v.id,
            hive.exec_log().dump()
        );
    }
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.rerun_tasks, 0, "{summary}");
}

/// Guards against a restarted queen forgetting which drone runs what and running tasks a
/// second time (G5), or losing them. Four tasks sleeping ~3 s run on two drones; the queen is
/// `kill -9`ed and restarted on the same data dir and ports while they run. The drones
/// reconnect and report the tasks in their hello; each task must succeed on attempt 1 and
/// the execution log must show exactly one run of each.
#[test]
fn running_tasks_are_reattached_after_a_queen_restart_and_run_once() {
    let mut hive = hive_with_two_drones();
    let ids = start_four(&hive, "sleep 3");
    hive.queen.kill9();
    hive.queen.restart();
    hive.wait_drone_connected("d1");
    hive.wait_drone_connected("d2");
    // Re-attached, not requeued: still running, first attempt, same lease holder.
    for id in &ids {
        let v = hive.api().task(*id);
        assert!(
            v.state == TaskState::Running || v.state == TaskState::Succeeded,
            "{v:#?}"
        );
        assert_eq!(v.attempts, 1, "{v:#?}");
    }
    assert_ran_once(&mut hive, &ids);
}

/// Guards against outcomes lost while the queen is away (G6): the tasks finish while the
/// queen is dead, the drones keep the outcomes in their outboxes, reconnect when the queen is
/// back, and deliver them. Every task must end `succeeded` on attempt 1, having run once.
#[test]
fn outcomes_finished_while_the_queen_is_down_are_delivered_after_restart() {
    let mut hive = hive_with_two_drones();
    let ids = start_four(&hive, "sleep 0.5");
    hive.queen.kill9();
    wait_until(
        DEADLINE,
        "all four tasks to finish while the queen is down",
        || {
            let done: BTreeSet<TaskId> = hive
                .exec_log()
                .entries()
                .into_iter()
                .filter(|e| e.phase == Phase::Done)
                .map(|e| e.task)
                .collect();
            ids.iter().all(|id| done.contains(id))
        },
    );
    hive.queen.restart();
    assert_ran_once(&mut hive, &ids);
}

/// Guards against a graceful stop (SIGTERM, e.g. a deploy) being worse than a crash: the
/// queen must exit cleanly (status 0) while drones run tasks, and after it starts again the
/// running tasks are re-attached and run once, exactly as after `kill -9`.
#[test]
fn a_graceful_stop_and_restart_keeps_running_tasks() {
    let mut hive = hive_with_two_drones();
    let ids = start_four(&hive, "sleep 2");
    let status = hive.queen.stop();
    assert!(
        status.success(),
        "the queen did not stop cleanly on SIGTERM: {status}"
    );
    hive.queen.restart();
    assert_ran_once(&mut hive, &ids);
}
