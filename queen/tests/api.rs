//! The HTTP API against an in-process queen: validation, atomic batches, idempotency,
//! listing, cancellation and auth.

mod common;

use common::{fast_config, TestQueen};
use serde_json::json;
use shared::api::{BatchResponse, Stats, TaskPage, TaskState, TaskView};

async fn stats(q: &TestQueen) -> Stats {
    let (status, body) = q.call("GET", "/v1/stats", None).await;
    assert_eq!(status, 200);
    serde_json::from_value(body).expect("stats")
}

/// Guards G7: a bad spec gets a 400 naming what is wrong and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_with_a_clear_error_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let cases = [
        (json!({"kind": "echo", "priorty": 1}), "priorty"),
        (json!({"payload": {}}), "kind"),
        (json!({"kind": "exec", "payload": {"cmd": "ls"}}), "cmd"),
        (json!({"kind": "echo", "max_attempts": 0}), "max_attempts"),
        (json!({"kind": "echo", "run_at": "yesterday"}), "run_at"),
        (
            json!({"kind": "echo", "depends_on": ["00000000-0000-7000-8000-000000000000"]}),
            "unknown task",
        ),
        (json!([1, 2]), "invalid task spec"),
    ];
    for (spec, needle) in cases {
        let (status, body) = q.call("POST", "/v1/tasks", Some(spec.clone())).await;
        assert_eq!(status, 400, "{spec} -> {body}");
        let err = body["error"].as_str().unwrap_or_default();
        assert!(
            err.contains(needle),
            "error for {spec} should name {needle}: {err}"
        );
    }
    let s = stats(&q).await;
    assert!(
        s.by_state.values().all(|n| *n == 0),
        "nothing stored: {s:?}"
    );
    q.stop().await;
}

/// Guards all-or-nothing batches: one bad spec refuses the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_all_or_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let bad =
        json!({"tasks": [{"kind": "echo"}, {"kind": "echo", "bogus": true}, {"kind": "echo"}]});
    let (status, body) = q.call("POST", "/v1/tasks/batch", Some(bad)).await;
    assert_eq!(status, 400, "{body}");
    let err = body["error"].as_str().unwrap_or_default();
    assert!(err.contains("bogus") && err.contains("tasks[1]"), "{body}");
    assert_eq!(stats(&q).await.by_state["pending"], 0);

    let good = json!({"tasks": [{"kind": "echo", "queue": "a"}, {"kind": "echo", "queue": "b"}]});
    let (status, body) = q.call("POST", "/v1/tasks/batch", Some(good)).await;
    assert_eq!(status, 201, "{body}");
    let resp: BatchResponse = serde_json::from_value(body).expect("batch");
    assert_eq!(resp.tasks.len(), 2);
    assert_eq!(
        (resp.tasks[0].queue.as_str(), resp.tasks[1].queue.as_str()),
        ("a", "b")
    );
    let s = stats(&q).await;
    assert_eq!(s.by_state["pending"], 2);
    assert_eq!(s.by_queue["a"]["pending"], 1);
    let (status, _) = q
        .call("POST", "/v1/tasks/batch", Some(json!({"tasks": []})))
        .await;
    assert_eq!(status, 400);
    q.stop().await;
}

/// Guards idempotency keys: a second submit returns the first task (200, not 201), also
/// within one batch and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_first_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let spec = json!({"kind": "echo", "idempotency_key": "order-42"});
    let first = q.submit(spec.clone()).await;
    let (status, body) = q.call("POST", "/v1/tasks", Some(spec.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], json!(first.id));
    let batch = json!({"tasks": [{"kind": "echo", "idempotency_key": "k2"}, {"kind": "echo", "idempotency_key": "k2"}]});
    let (status, body) = q.call("POST", "/v1/tasks/batch", Some(batch)).await;
    assert_eq!(status, 201);
    let resp: BatchResponse = serde_json::from_value(body).expect("batch");
    assert_eq!(resp.tasks[0].id, resp.tasks[1].id);
    q.stop().await;
    let q = TestQueen::start(fast_config(dir.path())).await;
    let (status, body) = q.call("POST", "/v1/tasks", Some(spec)).await;
    assert_eq!((status, body["id"].clone()), (200, json!(first.id)));
    assert_eq!(stats(&q).await.by_state["pending"], 2);
    q.stop().await;
}

/// Guards reads: unknown ids 404, malformed ids 400, listings newest first with filters
/// and pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_listed_newest_first_with_filters_and_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            q.submit(json!({"kind": "echo", "queue": if i % 2 == 0 { "even" } else { "odd" }}))
                .await
                .id,
        );
    }
    let cancelled = ids[4];
    let (status, _) = q
        .call("POST", &format!("/v1/tasks/{cancelled}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    let page =
        |body: serde_json::Value| -> TaskPage { serde_json::from_value(body).expect("page") };

    let (_, body) = q.call("GET", "/v1/tasks?limit=2", None).await;
    let p1 = page(body);
    assert_eq!(
        p1.tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![ids[4], ids[3]]
    );
    let next = p1.next.expect("more pages");
    let (_, body) = q
        .call("GET", &format!("/v1/tasks?limit=2&before={next}"), None)
        .await;
    assert_eq!(
        page(body).tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );

    let (_, body) = q
        .call("GET", "/v1/tasks?queue=even&state=pending", None)
        .await;
    assert_eq!(
        page(body).tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![ids[2], ids[0]]
    );
    let (_, body) = q.call("GET", "/v1/tasks?state=cancelled", None).await;
    assert_eq!(
        page(body).tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![cancelled]
    );

    let (status, body) = q.call("GET", "/v1/tasks?state=done", None).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap_or_default().contains("done"));
    let (status, _) = q.call("GET", "/v1/tasks?colour=red", None).await;
    assert_eq!(status, 400);
    let (status, _) = q.call("GET", "/v1/tasks/not-a-uuid", None).await;
    assert_eq!(status, 400);
    let (status, body) = q
        .call(
            "GET",
            &format!("/v1/tasks/{}", shared::TaskId::generate()),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    q.stop().await;
}

/// Guards cancellation of waiting tasks and the terminal-state rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_task_cancels_at_once_and_only_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "delay_ms": 60000})).await;
    assert_eq!(t.state, TaskState::Scheduled);
    let (status, body) = q
        .call(
            "POST",
            &format!("/v1/tasks/{}/cancel", t.id),
            Some(json!({"reason": "changed my mind"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: TaskView = serde_json::from_value(body).expect("view");
    assert_eq!(v.state, TaskState::Cancelled);
    assert_eq!(v.cancel_reason.as_deref(), Some("changed my mind"));
    let (status, body) = q
        .call("POST", &format!("/v1/tasks/{}/cancel", t.id), None)
        .await;
    assert_eq!(status, 409, "{body}");
    q.stop().await;
    // Durable: still cancelled after a restart.
    let q = TestQueen::start(fast_config(dir.path())).await;
    assert_eq!(q.task(t.id).await.state, TaskState::Cancelled);
    q.stop().await;
}

/// Guards the optional API token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_api_requires_it_but_health_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.token = Some(shared::ids::Secret("t0k".into()));
    let q = TestQueen::start(cfg).await;
    let (status, body) = q.call("GET", "/v1/stats", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = q.call_with("GET", "/v1/stats", None, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = q.call_with("GET", "/v1/stats", None, Some("t0k")).await;
    assert_eq!(status, 200);
    let (status, _) = q.call("GET", "/healthz", None).await;
    assert_eq!(status, 200);
    q.stop().await;
}

/// Guards readiness over HTTP: `/readyz` needs no token and is 200 once a restarted queen
/// serves counts, which include every recovered task. (That requests wait for recovery, and
/// `/readyz`'s flag before it ends, are proven deterministically in `core::tests::recovery`;
/// 50 tasks recover too fast to catch the 503 here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_after_recovery_and_counts_include_every_recovered_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.token = Some(shared::ids::Secret("t0k".into()));
    let q = TestQueen::start(cfg.clone()).await;
    let tasks: Vec<_> = (0..50)
        .map(|i| json!({"kind": "echo", "payload": i}))
        .collect();
    let (status, body) = q
        .call_with(
            "POST",
            "/v1/tasks/batch",
            Some(json!({ "tasks": tasks })),
            Some("t0k"),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    q.stop().await;

    let q = TestQueen::start(cfg).await;
    // No sleeping: the first stats answer waits for recovery, so it must count all 50.
    let (status, body) = q.call_with("GET", "/v1/stats", None, Some("t0k")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["by_state"]["pending"], 50, "{body}");
    let (status, body) = q.call("GET", "/readyz", None).await;
    assert_eq!((status, &body["status"]), (200, &json!("ready")), "{body}");
    q.stop().await;
}

/// Guards dependencies: blocked until the dependency succeeds; cancelled when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_task_is_cancelled_when_its_dependency_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let parent = q.submit(json!({"kind": "echo", "delay_ms": 60000})).await;
    let child = q
        .submit(json!({"kind": "echo", "depends_on": [parent.id]}))
        .await;
    assert_eq!(child.state, TaskState::Blocked);
    let (status, _) = q
        .call("POST", &format!("/v1/tasks/{}/cancel", parent.id), None)
        .await;
    assert_eq!(status, 200);
    let c = q
        .wait_task(child.id, "dependent cancelled", |t| {
            t.state == TaskState::Cancelled
        })
        .await;
    assert!(c
        .cancel_reason
        .unwrap_or_default()
        .contains(&parent.id.to_string()));
    q.stop().await;
}

/// Guards the server-side wait: `?wait_ms=` answers as soon as the task's end is durable
/// (not at the end of the wait), answers with the task as it is when the wait runs out,
/// answers a finished task at once, and refuses a wait out of bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_a_task_answers_when_it_ends_or_when_the_wait_runs_out() {
    use shared::protocol::DroneMessage;
    use shared::DroneId;
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "payload": 7})).await;
    let mut d =
        common::FakeDrone::connect(q.drones, common::hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;

    // Running: a short wait runs out and says so.
    let (status, body) = q
        .call("GET", &format!("/v1/tasks/{}?wait_ms=200", t.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "running");

    // A long wait ends with the outcome, long before its 60 s.
    let started = std::time::Instant::now();
    let url = q.url(&format!("/v1/tasks/{}?wait_ms=60000", t.id));
    let waiting = tokio::task::spawn_blocking(move || {
        let resp = ureq::get(&url).call().expect("the waiting request");
        let status = resp.status();
        let body: serde_json::Value = resp.into_json().expect("json");
        (status, body)
    });
    d.send(DroneMessage::TaskComplete(shared::protocol::TaskComplete {
        task_id: a.task_id,
        fence: a.fence,
        result: json!("seven"),
    }))
    .await;
    let (status, body) = waiting.await.expect("the waiting request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["result"], "seven");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the wait ran to its end instead of answering the outcome"
    );

    // Finished: at once.
    let (status, body) = q
        .call("GET", &format!("/v1/tasks/{}?wait_ms=60000", t.id), None)
        .await;
    assert_eq!((status, body["state"].clone()), (200, json!("succeeded")));

    for bad in ["wait_ms=60001", "wait_ms=-1", "wait_ms=soon", "wait=1"] {
        let (status, body) = q
            .call("GET", &format!("/v1/tasks/{}?{bad}", t.id), None)
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    q.stop().await;
}
