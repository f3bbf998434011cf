//! Scheduling controls against an in-process queen: queue pause/resume and limits,
//! retrying finished tasks, poison-pill quarantine — each surviving a restart.

mod common;

use std::time::Duration;

use common::{fast_config, hello, wait_until_async, FakeDrone, TestQueen};
use serde_json::json;
use shared::api::{LossVerdict, QueuesResponse, TaskState};
use shared::protocol::{AckStatus, DroneMessage, QueenMessage, TaskFailed};
use shared::{DroneId, Fence};

async fn finish(d: &mut FakeDrone, a: &shared::protocol::Assign) {
    d.complete(a.task_id, a.fence, json!(null)).await;
    let status = d
        .expect("an ack", |m| match m {
            QueenMessage::Ack(ack) if ack.task_id == a.task_id => Some(ack.status),
            _ => None,
        })
        .await;
    assert_eq!(status, AckStatus::Recorded);
}

async fn queues(q: &TestQueen) -> QueuesResponse {
    let (status, body) = q.call("GET", "/v1/queues", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("queues")
}

/// Guards pause: a paused queue leases nothing (other queues still run), stays paused
/// across a restart, and runs again once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_leases_nothing_until_resumed_even_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let (status, body) = q.call("POST", "/v1/queues/slow/pause", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true);
    let held_back = q
        .submit(json!({"kind": "echo", "queue": "slow", "priority": 10}))
        .await;
    q.stop().await;

    let q = TestQueen::start(fast_config(dir.path())).await;
    let other = q.submit(json!({"kind": "echo", "queue": "fast"})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 4, vec![])).await;
    let a = d.expect_assign().await;
    assert_eq!(
        a.task_id, other.id,
        "the paused queue's task must not be leased, despite its priority"
    );
    finish(&mut d, &a).await;
    let view = queues(&q).await;
    let slow = view
        .queues
        .iter()
        .find(|v| v.name == "slow")
        .expect("slow queue listed");
    assert!(slow.paused);
    assert_eq!(slow.pending, 1);
    let (status, _) = q.call("POST", "/v1/queues/slow/resume", None).await;
    assert_eq!(status, 200);
    let a = d.expect_assign().await;
    assert_eq!(a.task_id, held_back.id);
    q.stop().await;
}

/// Guards the concurrency limit: never more than max_running of a queue at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_never_runs_more_than_its_concurrency_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let (status, body) = q
        .call("POST", "/v1/queues/q1", Some(json!({"max_running": 1})))
        .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..3 {
        q.submit(json!({"kind": "echo", "queue": "q1"})).await;
    }
    let marker = q
        .submit(json!({"kind": "echo", "queue": "unlimited"}))
        .await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 8, vec![])).await;
    // Two assigns arrive at once: one of q1 and the unlimited one; the unlimited one is
    // dispatched in the same pass, so seeing it proves q1 had its chance.
    let (a1, a2) = (d.expect_assign().await, d.expect_assign().await);
    let (limited, free) = if a1.task_id == marker.id {
        (a2, a1)
    } else {
        (a1, a2)
    };
    assert_eq!(free.task_id, marker.id);
    let v = queues(&q).await;
    let q1 = v.queues.iter().find(|v| v.name == "q1").expect("q1");
    assert_eq!((q1.running, q1.pending, q1.max_running), (1, 2, Some(1)));
    // Each completion lets exactly one more q1 task start.
    let mut current = limited;
    for _ in 0..2 {
        finish(&mut d, &current).await;
        current = d.expect_assign().await;
        let v = queues(&q).await;
        assert_eq!(
            v.queues.iter().find(|v| v.name == "q1").map(|v| v.running),
            Some(1)
        );
    }
    finish(&mut d, &current).await;
    let (status, body) = q
        .call("POST", "/v1/queues/q1", Some(json!({"max_running": 0})))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = q
        .call("POST", "/v1/queues/q1", Some(json!({"max_runing": 2})))
        .await;
    assert_eq!(status, 400);
    q.stop().await;
}

/// Guards the rate limit: starts are spread to the configured rate (a lower bound on time,
/// which a slow machine can only make longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_queue_spreads_its_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let (status, body) = q.call("POST", "/v1/queues/r/", None).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = q
        .call("POST", "/v1/queues/r", Some(json!({"rate_per_s": 4.0})))
        .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..6 {
        q.submit(json!({"kind": "echo", "queue": "r"})).await;
    }
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 8, vec![])).await;
    d.expect_assign().await;
    let t0 = tokio::time::Instant::now();
    for _ in 0..5 {
        d.expect_assign().await;
        d.heartbeat(vec![]).await;
    }
    // A burst of 4 (one second's quota), then one start per 250 ms: the 6th start comes at
    // least 500 ms after the 1st.
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "6 starts in {:?}",
        t0.elapsed()
    );
    q.stop().await;
}

/// Guards retry: a failed task runs again with a fresh set of attempts, a new fence and
/// its error history kept; only failed or cancelled tasks can be retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_can_be_retried_and_keeps_its_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "max_attempts": 1})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;
    d.send(DroneMessage::TaskFailed(TaskFailed {
        task_id: a.task_id,
        fence: a.fence,
        error: "first life".into(),
        result: None,
        retryable: true,
    }))
    .await;
    q.wait_task(t.id, "failed", |t| t.state == TaskState::Failed)
        .await;
    let (status, body) = q
        .call("POST", &format!("/v1/tasks/{}/retry", t.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "pending");
    let again = d.expect_assign().await;
    assert_eq!(
        (again.task_id, again.fence, again.attempt),
        (t.id, Fence(2), 1)
    );
    let (status, _) = q
        .call("POST", &format!("/v1/tasks/{}/retry", t.id), None)
        .await;
    assert_eq!(status, 409, "a running task cannot be retried");
    finish(&mut d, &again).await;
    let done = q.task(t.id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.errors.len(), 1, "the first life's error is kept");
    let (status, _) = q
        .call("POST", &format!("/v1/tasks/{}/retry", t.id), None)
        .await;
    assert_eq!(status, 409, "a succeeded task cannot be retried");
    let (status, _) = q
        .call(
            "POST",
            &format!("/v1/tasks/{}/retry", shared::TaskId::generate()),
            None,
        )
        .await;
    assert_eq!(status, 404);
    q.stop().await;
    let q = TestQueen::start(fast_config(dir.path())).await;
    assert_eq!(q.task(t.id).await.state, TaskState::Succeeded);
    q.stop().await;
}

/// Guards poison-pill quarantine: a task whose drone is lost (alone) becomes a suspect
/// after `suspect_after_lost` losses, and an isolated attempt that loses its drone too
/// quarantines it, even with attempts left; the evidence is in the task record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_killing_its_drone_is_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.tasks.suspect_after_lost = 1;
    cfg.tasks.max_lost_attempts = 1;
    // The verdict waits max(loss_correlation_ms, 2 x heartbeat timeout): 2 s here.
    cfg.leases.heartbeat_timeout_ms = 1_000;
    cfg.tasks.loss_correlation_ms = 0;
    let q = TestQueen::start(cfg).await;
    let t = q.submit(json!({"kind": "echo", "max_attempts": 10})).await;
    for _ in 0..2 {
        let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
        let a = d.expect_assign().await;
        assert_eq!(a.task_id, t.id);
        drop(d); // the drone "dies"
        q.wait_task(t.id, "lease lost", |t| t.state != TaskState::Running)
            .await;
    }
    let awaiting = q.task(t.id).await;
    assert_eq!(
        awaiting.state,
        TaskState::Scheduled,
        "waits for its verdict"
    );
    let done = q
        .wait_task(t.id, "the verdict", |t| t.state.is_terminal())
        .await;
    assert_eq!(done.state, TaskState::Failed);
    assert_eq!(done.attempts, 2);
    assert!(
        done.errors
            .last()
            .is_some_and(|e| e.error.contains("quarantined")),
        "{:?}",
        done.errors
    );
    let suspicion = done.suspicion.expect("the evidence is kept");
    assert!(suspicion.suspect_since.is_some());
    let verdicts: Vec<LossVerdict> = suspicion.losses.iter().map(|l| l.verdict).collect();
    assert_eq!(verdicts, [LossVerdict::Alone, LossVerdict::Isolated]);
    q.stop().await;
}

/// Guards dependencies within a batch: refs resolve, cycles are refused, a child runs only
/// after its parent succeeded, and all of it survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_refs_order_work_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let cycle = json!({"tasks": [
        {"kind": "echo", "ref": "a", "depends_on": ["b"]},
        {"kind": "echo", "ref": "b", "depends_on": ["a"]},
    ]});
    let (status, body) = q.call("POST", "/v1/tasks/batch", Some(cycle)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("cycle"),
        "{body}"
    );

    // The child is listed first: the reply keeps the client's order anyway.
    let batch = json!({"tasks": [
        {"kind": "echo", "ref": "child", "depends_on": ["parent"], "payload": "child"},
        {"kind": "echo", "ref": "parent", "payload": "parent"},
    ]});
    let (status, body) = q.call("POST", "/v1/tasks/batch", Some(batch)).await;
    assert_eq!(status, 201, "{body}");
    let resp: shared::api::BatchResponse = serde_json::from_value(body).expect("batch");
    let (child, parent) = (&resp.tasks[0], &resp.tasks[1]);
    assert_eq!(child.payload, json!("child"));
    assert_eq!(child.state, TaskState::Blocked);
    assert_eq!(child.depends_on, vec![parent.id]);
    q.stop().await;

    let q = TestQueen::start(fast_config(dir.path())).await;
    assert_eq!(
        q.task(child.id).await.state,
        TaskState::Blocked,
        "blocked survives a restart"
    );
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 2, vec![])).await;
    let a = d.expect_assign().await;
    assert_eq!(a.task_id, parent.id, "only the parent is runnable");
    finish(&mut d, &a).await;
    let a = d.expect_assign().await;
    assert_eq!(
        a.task_id, child.id,
        "the child runs once its parent succeeded"
    );
    finish(&mut d, &a).await;
    q.stop().await;
}

async fn scheduled_runs(q: &TestQueen) -> Vec<shared::api::TaskView> {
    let (status, body) = q.call("GET", "/v1/tasks?queue=cron&limit=1000", None).await;
    assert_eq!(status, 200, "{body}");
    let page: shared::api::TaskPage = serde_json::from_value(body).expect("page");
    page.tasks
}

/// Guards periodic schedules: invalid ones are refused, a schedule fires once per tick
/// (distinct idempotency keys), survives a restart, and stops when deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_tick_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    for (bad, needle) in [
        (
            json!({"name": "x", "cron": "* * *", "task": {"kind": "echo"}}),
            "fields",
        ),
        (
            json!({"name": "x", "every_ms": 5, "task": {"kind": "echo"}}),
            "every_ms",
        ),
        (
            json!({"name": "x", "task": {"kind": "echo"}}),
            "exactly one",
        ),
        (
            json!({"name": "x", "every_ms": 1000, "task": {"kind": "exec", "payload": {}}}),
            "cmd",
        ),
        (
            json!({"name": "bad name", "every_ms": 1000, "task": {"kind": "echo"}}),
            "schedule name",
        ),
    ] {
        let (status, body) = q.call("POST", "/v1/schedules", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains(needle),
            "{bad} -> {body}"
        );
    }
    let spec = json!({"name": "tick", "every_ms": 1000, "task": {"kind": "echo", "queue": "cron"}});
    let (status, body) = q.call("POST", "/v1/schedules", Some(spec)).await;
    assert_eq!(status, 201, "{body}");
    wait_until_async(
        Duration::from_secs(10),
        "the schedule to fire twice",
        || async {
            let runs = scheduled_runs(&q).await.len();
            if runs >= 2 {
                Ok(())
            } else {
                Err(format!("{runs} runs"))
            }
        },
    )
    .await;
    q.stop().await;

    let q = TestQueen::start(fast_config(dir.path())).await;
    let (_, body) = q.call("GET", "/v1/schedules", None).await;
    assert_eq!(body["schedules"][0]["name"], "tick", "{body}");
    let before = scheduled_runs(&q).await.len();
    wait_until_async(
        Duration::from_secs(10),
        "the schedule to fire after the restart",
        || async {
            let runs = scheduled_runs(&q).await.len();
            if runs > before {
                Ok(())
            } else {
                Err(format!("{runs} runs, {before} before the restart"))
            }
        },
    )
    .await;
    let (status, _) = q.call("DELETE", "/v1/schedules/tick", None).await;
    assert_eq!(status, 200);
    let (status, _) = q.call("DELETE", "/v1/schedules/tick", None).await;
    assert_eq!(status, 404);
    let runs = scheduled_runs(&q).await;
    let mut keys: Vec<String> = runs
        .iter()
        .filter_map(|t| t.idempotency_key.clone())
        .collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(
        (keys.len(), n),
        (runs.len(), runs.len()),
        "one task per tick, each with its own key"
    );
    q.stop().await;
}

/// Guards checkpoints: a running attempt's checkpoint is stored (progress shown), ignored
/// from a stale lease, survives a restart, and is handed to the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_kept_and_handed_to_the_next_attempt() {
    use shared::protocol::{Checkpoint, Held};
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;
    assert_eq!(a.checkpoint, None);
    let held = vec![Held {
        task_id: t.id,
        fence: a.fence,
    }];
    let cp = |fence, step| Checkpoint {
        task_id: t.id,
        fence,
        data: json!({"step": step, "progress": 0.25}),
    };
    d.heartbeat_with(held.clone(), vec![cp(a.fence, 3), cp(Fence(99), 7)])
        .await;
    let v = q
        .wait_task(t.id, "checkpoint stored", |t| t.checkpoint.is_some())
        .await;
    assert_eq!(
        v.checkpoint,
        Some(json!({"step": 3, "progress": 0.25})),
        "the stale fence's checkpoint is ignored"
    );
    assert_eq!(v.progress, Some(0.25));
    q.stop().await;
    drop(d);

    let q = TestQueen::start(fast_config(dir.path())).await;
    // The old drone never comes back; a new one gets the task with the checkpoint.
    let mut d2 = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a2 = d2.assign_heartbeating(Duration::from_millis(500)).await;
    assert_eq!(a2.task_id, t.id);
    assert_eq!(a2.checkpoint, Some(json!({"step": 3, "progress": 0.25})));
    finish(&mut d2, &a2).await;
    q.stop().await;
}

/// Guards retention by count: the oldest finished tasks are purged, with their
/// idempotency keys, while the newest stay readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_beyond_the_retention_count_are_purged_oldest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.retention.finished_max_count = 3;
    cfg.retention.purge_interval_ms = 50;
    let q = TestQueen::start(cfg).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let t = q
            .submit(json!({"kind": "echo", "idempotency_key": format!("k{i}")}))
            .await;
        let a = d.expect_assign().await;
        finish(&mut d, &a).await;
        ids.push(t.id);
    }
    wait_until_async(Duration::from_secs(10), "the purge", || async {
        let (_, body) = q.call("GET", "/v1/stats", None).await;
        if body["by_state"]["succeeded"] == 3 {
            Ok(())
        } else {
            Err(format!("not purged: {body}"))
        }
    })
    .await;
    for (i, id) in ids.iter().enumerate() {
        let (status, _) = q.call("GET", &format!("/v1/tasks/{id}"), None).await;
        assert_eq!(status, if i < 3 { 404 } else { 200 }, "task {i}");
    }
    // A purged task's idempotency key is free again.
    let (status, _) = q
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"kind": "echo", "idempotency_key": "k0"})),
        )
        .await;
    assert_eq!(status, 201);
    q.stop().await;
}

/// Guards label routing: a task goes only to a drone with all its labels; while no
/// connected drone can run it, it waits and stats count it as unroutable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_task_waits_for_a_drone_with_its_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let gpu = q
        .submit(json!({"kind": "echo", "labels": ["gpu", "linux"]}))
        .await;
    let mut plain = FakeDrone::connect(q.drones, hello(DroneId::generate(), 2, vec![])).await;
    let other = q.submit(json!({"kind": "echo"})).await;
    let a = plain.expect_assign().await;
    assert_eq!(
        a.task_id, other.id,
        "the unlabelled drone gets only the unlabelled task"
    );
    finish(&mut plain, &a).await;
    let (_, stats) = q.call("GET", "/v1/stats", None).await;
    assert_eq!(stats["unroutable"], 1, "{stats}");
    let mut h = hello(DroneId::generate(), 1, vec![]);
    h.labels = vec!["linux".into(), "gpu".into(), "big".into()];
    let mut labelled = FakeDrone::connect(q.drones, h).await;
    let a = labelled.expect_assign().await;
    assert_eq!(a.task_id, gpu.id);
    let (_, stats) = q.call("GET", "/v1/stats", None).await;
    assert_eq!(stats["unroutable"], 0, "{stats}");
    finish(&mut labelled, &a).await;
    q.stop().await;
}
