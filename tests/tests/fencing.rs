//! G3 and G4 at the protocol level, with fake drones that misbehave on purpose: an outcome
//! carrying an old lease's fence is acknowledged `stale` and changes nothing, fences keep
//! growing across queen restarts, and a stale lease is never re-attached next to the live one.

use std::time::{Duration, Instant};

use hive_tests::{named_hello, FakeDrone, DEADLINE};
use serde_json::json;
use shared::api::{TaskSpec, TaskState, TaskView};
use shared::protocol::{AckStatus, DroneMessage, Held, QueenMessage};
use shared::{Fence, TaskId};

/// A kind no real drone runs, so only the fake drones are offered these tasks.
const KIND: &str = "fake-kind";

/// How long the queen takes to answer a message when healthy is milliseconds.
const REPLY: Duration = Duration::from_secs(10);

fn fake_task() -> TaskSpec {
    TaskSpec {
        kind: KIND.into(),
        payload: json!({"n": 1}),
        max_attempts: Some(5),
        ..TaskSpec::default()
    }
}

/// Waits for the queen's ack of an outcome for `task` with `fence`.
fn expect_ack(drone: &FakeDrone, task: TaskId, fence: Fence) -> AckStatus {
    drone.expect(
        REPLY,
        &format!("an ack for {task} fence {fence}"),
        |m| match m {
            QueenMessage::Ack(a) if a.task_id == task && a.fence == fence => Some(a.status),
            _ => None,
        },
    )
}

/// The parts of a record an outcome could change.
fn outcome_of(v: &TaskView) -> (TaskState, u32, Fence, Option<serde_json::Value>, usize) {
    (
        v.state,
        v.attempts,
        v.fence,
        v.result.clone(),
        v.errors.len(),
    )
}

/// Guards against a drone that went silent (partitioned, paused) coming back and recording
/// the outcome of a lease that was already given to someone else (G3), and against the queen
/// holding two live leases for one task (G4). Fake drone A takes the task and goes silent;
/// within the heartbeat timeout (+ an interval, + slack for a loaded machine) the task is
/// leased to B under a newer fence. A reconnects with the same drone id claiming the task:
/// it is not re-attached, and its completion and failure with the old fence are acked
/// `stale` and change nothing. B's completion is recorded; after that no report, old or
/// current fence, changes the finished task.
#[test]
fn a_silent_drone_coming_back_with_an_old_fence_changes_nothing() {
    let hive = hive_tests::hive_builder!().start();
    let addr = hive.queen.drones_addr;
    let a_hello = named_hello("fake-a", &[KIND], 1);
    let a = FakeDrone::connect(addr, a_hello.clone());
    let id = hive.api().submit(&fake_task()).id;
    let first = a.expect_assign(REPLY);
    assert_eq!((first.task_id, first.attempt), (id, 1));

    a.go_silent();
    let silent_since = Instant::now();
    let b = FakeDrone::connect(addr, named_hello("fake-b", &[KIND], 1));
    let second = b.expect_assign(DEADLINE);
    let requeued_after = silent_since.elapsed();
    assert_eq!((second.task_id, second.attempt), (id, 2));
    assert!(
        second.fence > first.fence,
        "a new lease must carry a newer fence: {first:?} then {second:?}"
    );
    let bound =
        Duration::from_millis(a.welcome.heartbeat_timeout_ms + a.welcome.heartbeat_interval_ms)
            + Duration::from_secs(3);
    assert!(
        requeued_after <= bound,
        "requeued only after {requeued_after:?} (bound {bound:?})"
    );
    drop(a);

    // A comes back on a new connection, same drone id, still claiming its old lease.
    let mut again = a_hello.clone();
    again.held = vec![Held {
        task_id: id,
        fence: first.fence,
    }];
    let a = FakeDrone::connect(addr, again);
    let running = hive.wait_task(id, "running on B", |t| t.state == TaskState::Running);
    assert_eq!(running.fence, second.fence);
    assert_eq!(
        running.lease.as_ref().map(|l| l.drone),
        Some(b.id),
        "{running:#?}"
    );
    let views = hive.api().drones();
    let holders: Vec<&str> = views
        .iter()
        .filter(|v| v.running.contains(&id))
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        holders,
        vec!["fake-b"],
        "exactly one live lease: {views:#?}"
    );

    a.complete(id, first.fence, json!({"from": "A, too late"}));
    assert_eq!(expect_ack(&a, id, first.fence), AckStatus::Stale);
    a.fail(id, first.fence, "A failing too late");
    assert_eq!(expect_ack(&a, id, first.fence), AckStatus::Stale);
    a.release(id);
    let after_stale = hive.api().task(id);
    assert_eq!(
        outcome_of(&after_stale),
        outcome_of(&running),
        "a stale report changed the task: {after_stale:#?}"
    );
    assert!(
        after_stale
            .errors
            .iter()
            .all(|e| !e.error.contains("too late")),
        "{after_stale:#?}"
    );

    b.complete(id, second.fence, json!({"from": "B"}));
    assert_eq!(expect_ack(&b, id, second.fence), AckStatus::Recorded);
    b.release(id);
    let done = hive.api().task(id);
    assert_eq!(done.state, TaskState::Succeeded, "{done:#?}");
    assert_eq!(done.result, Some(json!({"from": "B"})));

    // A terminal state never changes again, whoever reports and with whatever fence.
    a.complete(id, first.fence, json!({"from": "A, much too late"}));
    assert_eq!(expect_ack(&a, id, first.fence), AckStatus::Stale);
    b.complete(id, second.fence, json!({"from": "B, twice"}));
    assert_eq!(expect_ack(&b, id, second.fence), AckStatus::Stale);
    b.fail(id, second.fence, "B failing after success");
    assert_eq!(expect_ack(&b, id, second.fence), AckStatus::Stale);
    assert_eq!(hive.api().task(id), done, "a finished task changed");
}

/// Guards against a drone that dropped a task (stopped reporting it) recording a late
/// outcome after the task was requeued (G3). Fake drone A takes the task, then heartbeats
/// without it and drains (takes nothing new); the queen requeues the task to B; A's late
/// completion on its still-open connection is `stale` and B's outcome is the task's.
#[test]
fn a_late_report_for_a_dropped_lease_is_stale() {
    let hive = hive_tests::hive_builder!().start();
    let addr = hive.queen.drones_addr;
    let a = FakeDrone::connect(addr, named_hello("fake-a", &[KIND], 1));
    let id = hive.api().submit(&fake_task()).id;
    let first = a.expect_assign(REPLY);
    a.send(&DroneMessage::Drain).expect("send drain");
    a.release(id);

    let b = FakeDrone::connect(addr, named_hello("fake-b", &[KIND], 1));
    let second = b.expect_assign(DEADLINE);
    assert_eq!(second.task_id, id);
    assert!(second.fence > first.fence);

    a.complete(id, first.fence, json!({"from": "A"}));
    assert_eq!(expect_ack(&a, id, first.fence), AckStatus::Stale);
    let v = hive.api().task(id);
    assert_eq!(
        (v.state, v.fence, v.result.clone()),
        (TaskState::Running, second.fence, None),
        "{v:#?}"
    );

    b.fail(id, second.fence, "B's attempt failed");
    assert_eq!(expect_ack(&b, id, second.fence), AckStatus::Recorded);
    let v = hive.wait_task(id, "the failure recorded", |t| {
        t.errors.iter().any(|e| e.error == "B's attempt failed")
    });
    assert!(
        !v.state.is_terminal(),
        "attempt 2 of 5 failed: the task is retried: {v:#?}"
    );
    assert_ne!(v.result, Some(json!({"from": "A"})), "{v:#?}");
}

/// Guards against fences repeating after a queen restart (G3 "never repeats, across restarts
/// too"): a lease granted before a `kill -9` must never be confused with one granted after.
/// A takes the task, the queen is killed and restarted, A does not come back in time, and the
/// task is leased to B with a fence above A's; A's late completion is then `stale`.
#[test]
fn fences_keep_growing_across_a_queen_restart() {
    let mut hive = hive_tests::hive_builder!().start();
    let addr = hive.queen.drones_addr;
    let a_hello = named_hello("fake-a", &[KIND], 1);
    let a = FakeDrone::connect(addr, a_hello.clone());
    let id = hive.api().submit(&fake_task()).id;
    let first = a.expect_assign(REPLY);
    let v = hive.wait_task(id, "running on A", |t| t.state == TaskState::Running);
    assert_eq!(v.fence, first.fence);

    // The lease is still A's when the queen dies; A never comes back on its own.
    hive.queen.kill9();
    drop(a);
    hive.queen.restart();
    let b = FakeDrone::connect(addr, named_hello("fake-b", &[KIND], 1));
    let second = b.expect_assign(DEADLINE);
    assert_eq!(second.task_id, id);
    assert!(
        second.fence > first.fence,
        "fence repeated or went back after a restart: {first:?} then {second:?}"
    );
    assert_eq!(second.attempt, 2, "the lost lease counts as an attempt");

    let mut again = a_hello;
    again.held = vec![Held {
        task_id: id,
        fence: first.fence,
    }];
    let a = FakeDrone::connect(addr, again);
    a.complete(id, first.fence, json!({"from": "A"}));
    assert_eq!(expect_ack(&a, id, first.fence), AckStatus::Stale);
    b.complete(id, second.fence, json!({"from": "B"}));
    assert_eq!(expect_ack(&b, id, second.fence), AckStatus::Recorded);
    let v = hive.api().task(id);
    assert_eq!(
        (v.state, v.result.clone()),
        (TaskState::Succeeded, Some(json!({"from": "B"}))),
        "{v:#?}"
    );
}
