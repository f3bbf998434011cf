//! A stalled queen (SIGSTOP: what a VM pause, a swap storm or a starved CPU look like to
//! it) must not judge drones on silence it could not observe. Its drones heartbeat the
//! whole time; their frames wait unread in its sockets. On resuming, the queen gives each
//! drone a fresh heartbeat timeout instead of expiring it: no lease is lost, no task runs
//! twice. A drone that really died during the stall is still found out after the resume,
//! within the usual lease bound.

use std::time::{Duration, Instant};

use hive_tests::process::log_lines;
use hive_tests::{wait_until, Hive, DEADLINE};
use shared::api::{TaskState, TaskView};
use shared::TaskId;

/// The lease bound of `Hive::start` (FAST_LEASES): a heartbeat timeout of 1 s plus one
/// 200 ms heartbeat interval (G2, docs/GUARANTEES.md).
const LEASE_BOUND: Duration = Duration::from_millis(1_200);

/// On top of the bound: polling, and a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

/// Leases for the stall test: a heartbeat every 500 ms, a 2 s timeout.
const STALL_LEASES: [(&str, &str); 2] = [
    ("HIVE_LEASES__HEARTBEAT_INTERVAL_MS", "500"),
    ("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "2000"),
];

/// How long the queen stays stopped: four heartbeat timeouts of `STALL_LEASES`, and
/// several of `Hive::start`'s.
const STALL: Duration = Duration::from_secs(8);

/// Submits `n` exec tasks that each sleep `secs`, and waits until all run attempt 1.
fn running_tasks(hive: &Hive, n: usize, secs: u32) -> Vec<TaskView> {
    let ids: Vec<TaskId> = (0..n)
        .map(|_| {
            hive.api()
                .submit(&hive.exec_log().task(&format!("sleep {secs}")))
                .id
        })
        .collect();
    ids.iter()
        .map(|id| {
            hive.wait_task(*id, "running attempt 1", |t| {
                t.state == TaskState::Running && t.attempts == 1
            })
        })
        .collect()
}

/// Holds the queen stopped for `STALL` (the fault's length, not a wait for a condition)
/// while `during` runs, then lets it go on.
fn stall_queen(hive: &mut Hive, during: impl FnOnce(&mut Hive)) -> Instant {
    hive.queen.sigstop();
    let stopped = Instant::now();
    during(hive);
    if let Some(left) = STALL.checked_sub(stopped.elapsed()) {
        std::thread::sleep(left);
    }
    hive.queen.sigcont();
    Instant::now()
}

#[test]
fn a_stalled_queen_loses_no_lease_of_a_live_drone_and_runs_each_task_once() {
    let mut hive = STALL_LEASES
        .iter()
        .fold(Hive::builder(), |b, (k, v)| b.env(k, v))
        .start();
    hive.start_drone("a", 4);
    let before = running_tasks(&hive, 4, 12);
    stall_queen(&mut hive, |_| {});
    for old in &before {
        let done = hive.wait_task(old.id, "succeeded", |t| t.state.is_terminal());
        assert_eq!(
            (done.state, done.attempts, done.fence),
            (TaskState::Succeeded, 1, old.fence),
            "the stall cost a task its lease: {done:#?}"
        );
        assert!(done.errors.is_empty(), "{done:#?}");
    }
    let stalls = log_lines(hive.queen.log(), "the queen stalled", &[]);
    assert!(!stalls.is_empty(), "the queen did not notice its own stall");
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.rerun_tasks, 0, "{summary}");
    assert_eq!(summary.lost_leases, 0, "{summary}");
}

#[test]
fn a_drone_killed_while_the_queen_is_stalled_is_found_out_after_it_resumes() {
    let mut hive = Hive::start();
    hive.start_drone("victim", 2);
    let before = running_tasks(&hive, 2, 3);
    hive.start_drone("b", 2);
    let resumed = stall_queen(&mut hive, |hive| hive.drone("victim").kill9());
    let moved = wait_until(
        DEADLINE,
        "both leases of the killed drone to be requeued",
        || {
            before
                .iter()
                .all(|o| hive.api().task(o.id).fence > o.fence)
                .then(|| resumed.elapsed())
        },
    );
    assert!(
        moved <= LEASE_BOUND + SLACK,
        "the dead drone's leases were requeued {moved:?} after the queen resumed (bound {LEASE_BOUND:?} + {SLACK:?})"
    );
    for old in &before {
        let done = hive.wait_task(old.id, "succeeded on b", |t| t.state.is_terminal());
        assert_eq!(
            (done.state, done.attempts),
            (TaskState::Succeeded, 2),
            "{done:#?}"
        );
        assert!(done.errors[0].error.starts_with("lease lost"), "{done:#?}");
    }
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.lost_leases, 2, "{summary}");
}
