//! The drone protocol against an in-process queen, with drones played by the test.

mod common;

use common::{fast_config, hello, FakeDrone, TestQueen};
use serde_json::json;
use shared::api::TaskState;
use shared::frame;
use shared::protocol::{
    AckStatus, DroneMessage, Held, QueenMessage, RejectCode, TaskComplete, TaskFailed,
    MAX_NAME_LEN, MAX_SLOTS, SUPPORTED_VERSIONS,
};
use shared::{DroneId, Fence};

fn complete(a: &shared::protocol::Assign, result: serde_json::Value) -> DroneMessage {
    DroneMessage::TaskComplete(TaskComplete {
        task_id: a.task_id,
        fence: a.fence,
        result,
    })
}

/// Guards the basic loop: lease, run, durable completion, `recorded` ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_task_is_acked_recorded_and_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "payload": {"x": 1}})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 2, vec![])).await;
    let a = d.expect_assign().await;
    assert_eq!((a.task_id, a.fence, a.attempt), (t.id, Fence(1), 1));
    assert_eq!(a.payload, json!({"x": 1}));
    d.send(complete(&a, json!({"ok": true}))).await;
    assert_eq!(d.expect_ack().await, (t.id, Fence(1), AckStatus::Recorded));
    let done = q.task(t.id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.result, Some(json!({"ok": true})));
    assert_eq!(done.attempts, 1);
    q.stop().await;
}

/// Guards G3: an outcome carrying an old fence is `stale` and changes nothing, while the
/// current lease's outcome is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_with_a_stale_fence_is_acked_stale_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut a = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let first = a.expect_assign().await;
    // Drone A drops the task from its heartbeat: the lease is lost and the task requeued.
    a.heartbeat(vec![]).await;
    q.wait_task(t.id, "requeue", |t| {
        t.state == TaskState::Pending || t.fence > Fence(1)
    })
    .await;
    let second = a.expect_assign().await;
    assert_eq!(second.fence, Fence(2), "a new lease gets a new fence");
    a.send(complete(&first, json!("from the lost lease"))).await;
    assert_eq!(a.expect_ack().await, (t.id, Fence(1), AckStatus::Stale));
    let mid = q.task(t.id).await;
    assert_eq!(mid.state, TaskState::Running);
    assert_eq!(mid.result, None, "a stale completion must not set a result");
    a.send(complete(&second, json!("current"))).await;
    assert_eq!(a.expect_ack().await, (t.id, Fence(2), AckStatus::Recorded));
    let done = q.task(t.id).await;
    assert_eq!(
        (done.state, done.result),
        (TaskState::Succeeded, Some(json!("current")))
    );
    // A terminal state never changes again, whatever arrives later.
    a.send(DroneMessage::TaskFailed(TaskFailed {
        task_id: t.id,
        fence: Fence(2),
        error: "late".into(),
        result: None,
        retryable: true,
    }))
    .await;
    assert_eq!(a.expect_ack().await, (t.id, Fence(2), AckStatus::Stale));
    assert_eq!(q.task(t.id).await.state, TaskState::Succeeded);
    q.stop().await;
}

/// Guards G2: a drone that goes silent loses its lease within the heartbeat timeout and
/// the task runs elsewhere; its late completion is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_drone_loses_its_lease_to_another_drone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.leases.heartbeat_interval_ms = 100;
    cfg.leases.heartbeat_timeout_ms = 1_000;
    let q = TestQueen::start(cfg).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut silent = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let old = silent.expect_assign().await;
    // Say nothing; the queen must expire the drone and close its connection.
    assert!(
        silent.closed().await,
        "the queen closes a silent drone's connection"
    );
    let after = q.task(t.id).await;
    assert_eq!(after.state, TaskState::Pending);
    assert!(
        after.errors.iter().any(|e| e.error.contains("lease lost")),
        "{after:?}"
    );
    let mut live = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let new = live.expect_assign().await;
    live.heartbeat(vec![Held {
        task_id: t.id,
        fence: new.fence,
    }])
    .await;
    assert_eq!(new.fence, Fence(2));
    // The silent drone comes back holding the old lease: told to stop it; its result is stale.
    let mut back = FakeDrone::connect(
        q.drones,
        hello(
            silent.id,
            1,
            vec![Held {
                task_id: t.id,
                fence: old.fence,
            }],
        ),
    )
    .await;
    let cancel = back.expect_cancel().await;
    assert_eq!((cancel.task_id, cancel.fence), (t.id, old.fence));
    back.send(complete(&old, json!("old"))).await;
    assert_eq!(back.expect_ack().await.2, AckStatus::Stale);
    live.send(complete(&new, json!("new"))).await;
    assert_eq!(live.expect_ack().await.2, AckStatus::Recorded);
    assert_eq!(q.task(t.id).await.result, Some(json!("new")));
    q.stop().await;
}

/// Guards G2 for dead drones: a closed connection requeues after the reconnect grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_drone_s_task_is_requeued_after_the_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    d.expect_assign().await;
    drop(d);
    q.wait_task(t.id, "requeue after disconnect", |t| {
        t.state == TaskState::Pending
    })
    .await;
    q.stop().await;
}

/// Guards G5: after a queen restart a drone that reports its running task keeps it (no
/// second run), and an unreported running task is requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_reporting_drone_keeps_its_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let kept = q.submit(json!({"kind": "echo"})).await;
    let lost = q.submit(json!({"kind": "echo"})).await;
    let id = DroneId::generate();
    let mut d = FakeDrone::connect(q.drones, hello(id, 2, vec![])).await;
    let a1 = d.expect_assign().await;
    let a2 = d.expect_assign().await;
    let (keep, _lose) = if a1.task_id == kept.id {
        (a1, a2)
    } else {
        (a2, a1)
    };
    q.stop().await;
    drop(d);

    let q = TestQueen::start(fast_config(dir.path())).await;
    assert_eq!(
        q.task(kept.id).await.state,
        TaskState::Running,
        "running survives a restart"
    );
    let mut d = FakeDrone::connect(
        q.drones,
        hello(
            id,
            2,
            vec![Held {
                task_id: keep.task_id,
                fence: keep.fence,
            }],
        ),
    )
    .await;
    // The unreported task is requeued and leased again (to this drone, which has a free
    // slot) with a new fence.
    let again = d.expect_assign().await;
    assert_eq!((again.task_id, again.fence), (lost.id, Fence(2)));
    d.send(complete(&keep, json!(1))).await;
    assert_eq!(
        d.expect_ack().await,
        (kept.id, keep.fence, AckStatus::Recorded)
    );
    let k = q.task(kept.id).await;
    assert_eq!(
        (k.state, k.attempts),
        (TaskState::Succeeded, 1),
        "re-attached: no second run"
    );
    q.stop().await;
}

/// Guards G8: failed attempts retry with backoff, then the task fails with every error kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_then_fail_keeping_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "max_attempts": 3})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    for attempt in 1..=3 {
        let a = d.expect_assign().await;
        assert_eq!(a.attempt, attempt);
        d.send(DroneMessage::TaskFailed(TaskFailed {
            task_id: a.task_id,
            fence: a.fence,
            error: format!("boom {attempt}"),
            result: None,
            retryable: true,
        }))
        .await;
        assert_eq!(d.expect_ack().await.2, AckStatus::Recorded);
    }
    let done = q.wait_task(t.id, "failed", |t| t.state.is_terminal()).await;
    assert_eq!(done.state, TaskState::Failed);
    assert_eq!(done.attempts, 3);
    let errors: Vec<&str> = done.errors.iter().map(|e| e.error.as_str()).collect();
    assert_eq!(errors, ["boom 1", "boom 2", "boom 3"]);
    q.stop().await;
}

/// Guards non-retryable failures: they fail at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_failure_fails_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "max_attempts": 5})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;
    d.send(DroneMessage::TaskFailed(TaskFailed {
        task_id: a.task_id,
        fence: a.fence,
        error: "bad input".into(),
        result: None,
        retryable: false,
    }))
    .await;
    assert_eq!(d.expect_ack().await.2, AckStatus::Recorded);
    let done = q.task(t.id).await;
    assert_eq!((done.state, done.attempts), (TaskState::Failed, 1));
    q.stop().await;
}

/// Guards cancellation of a running task: the drone is told, the task ends cancelled and
/// never succeeded afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_tells_its_drone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;
    let (status, body) = q
        .call("POST", &format!("/v1/tasks/{}/cancel", t.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let c = d.expect_cancel().await;
    assert_eq!((c.task_id, c.fence), (t.id, a.fence));
    d.send(complete(&a, json!("too late"))).await;
    assert_eq!(d.expect_ack().await.2, AckStatus::Stale);
    let done = q.task(t.id).await;
    assert_eq!(done.state, TaskState::Cancelled);
    assert_eq!(done.result, None);
    q.stop().await;
}

/// Guards G7 on the drone port: garbage, oversized and unknown frames close that
/// connection only, with an error; other drones keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let mut good = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;

    let error_of = |m: Option<QueenMessage>| match m {
        Some(QueenMessage::Error { message }) => message,
        other => panic!("expected an error message, got {other:?}"),
    };
    // Garbage instead of a hello.
    let mut raw = FakeDrone::open(q.drones).await;
    raw.send_frame(b"\x00\xffnot json").await.expect("send");
    assert!(error_of(raw.recv().await).contains("malformed"));
    assert!(raw.recv().await.is_none(), "connection closed");

    // An unknown message type after a valid hello.
    let mut raw = FakeDrone::open(q.drones).await;
    let h = DroneMessage::Hello(hello(DroneId::generate(), 1, vec![]));
    raw.try_send(&h).await.expect("send");
    raw.send_frame(&frame::encode(&json!({"type": "launch_missiles"})).expect("encode"))
        .await
        .expect("send");
    let mut saw_error = None;
    while let Some(m) = raw.recv().await {
        if let QueenMessage::Error { message } = m {
            saw_error = Some(message);
        }
    }
    let saw_error = saw_error.unwrap_or_default();
    assert!(saw_error.contains("launch_missiles"), "{saw_error}");

    // An oversized length prefix: refused from the prefix alone, without reading the body.
    let mut big = FakeDrone::open(q.drones).await;
    big.send_bytes(&(1u32 << 30).to_be_bytes())
        .await
        .expect("send");
    assert!(error_of(big.recv().await).contains("frame"));
    assert!(big.recv().await.is_none(), "connection closed");

    // The well-behaved drone still gets work.
    let t = q.submit(json!({"kind": "echo"})).await;
    let a = good.expect_assign().await;
    assert_eq!(a.task_id, t.id);
    good.send(complete(&a, json!(null))).await;
    assert_eq!(good.expect_ack().await.2, AckStatus::Recorded);
    q.stop().await;
}

/// Guards version skew: an unsupported protocol version is rejected naming the versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_protocol_version_is_rejected_with_the_supported_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let mut h = hello(DroneId::generate(), 1, vec![]);
    h.protocol_version = 99;
    let mut raw = FakeDrone::open(q.drones).await;
    match raw.say_hello(h).await {
        Some(QueenMessage::Reject(r)) => {
            assert!(r.reason.contains("99"), "{}", r.reason);
            assert_eq!(r.supported_versions, SUPPORTED_VERSIONS);
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    assert!(raw.recv().await.is_none());
    q.stop().await;
}

/// Guards the edge: every hello the queen cannot take is refused by the connection
/// handler with a machine-readable code (the core's own refusals never carried one), the
/// reject is on the wire before the connection closes, and a good hello is still welcomed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hello_is_rejected_at_the_edge_with_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.token = Some(shared::ids::Secret("s3cret".into()));
    let q = TestQueen::start(cfg).await;
    let good = || {
        let mut h = hello(DroneId::generate(), 1, vec![]);
        h.token = Some(shared::ids::Secret("s3cret".into()));
        h
    };
    let cases = [
        (
            shared::protocol::Hello {
                protocol_version: 99,
                ..good()
            },
            RejectCode::UnsupportedVersion,
            "protocol version 99 is not supported; this queen speaks [1]".to_owned(),
        ),
        (
            shared::protocol::Hello {
                token: None,
                ..good()
            },
            RejectCode::Unauthorized,
            "invalid or missing auth token".to_owned(),
        ),
        (
            shared::protocol::Hello {
                token: Some(shared::ids::Secret("s3cre".into())),
                ..good()
            },
            RejectCode::Unauthorized,
            "invalid or missing auth token".to_owned(),
        ),
        (
            shared::protocol::Hello { slots: 0, ..good() },
            RejectCode::BadHello,
            "slots must be between 1 and 10000, got 0".to_owned(),
        ),
        (
            shared::protocol::Hello {
                slots: MAX_SLOTS + 1,
                ..good()
            },
            RejectCode::BadHello,
            format!("slots must be between 1 and 10000, got {}", MAX_SLOTS + 1),
        ),
        (
            shared::protocol::Hello {
                name: String::new(),
                ..good()
            },
            RejectCode::BadHello,
            "name must be 1-128 bytes".to_owned(),
        ),
        (
            shared::protocol::Hello {
                name: "n".repeat(MAX_NAME_LEN + 1),
                ..good()
            },
            RejectCode::BadHello,
            "name must be 1-128 bytes".to_owned(),
        ),
    ];
    for (bad, code, reason) in cases {
        let mut raw = FakeDrone::open(q.drones).await;
        match raw.say_hello(bad).await {
            Some(QueenMessage::Reject(r)) => {
                assert_eq!(r.code, Some(code), "{}", r.reason);
                assert_eq!(r.reason, reason);
                assert_eq!(r.supported_versions, SUPPORTED_VERSIONS);
            }
            other => panic!("expected a reject for {reason}, got {other:?}"),
        }
        assert!(
            raw.recv().await.is_none(),
            "{reason}: the connection closes"
        );
    }
    // Welcomed (`connect` panics otherwise): the edge let the good hello through.
    let _welcomed = FakeDrone::connect(q.drones, good()).await;
    q.stop().await;
}

/// Guards auth: with a token configured, a drone without it is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_without_the_token_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.token = Some(shared::ids::Secret("s3cret".into()));
    let q = TestQueen::start(cfg).await;
    let mut raw = FakeDrone::open(q.drones).await;
    let reply = raw.say_hello(hello(DroneId::generate(), 1, vec![])).await;
    assert!(matches!(reply, Some(QueenMessage::Reject(r)) if r.reason.contains("token")));
    let mut h = hello(DroneId::generate(), 1, vec![]);
    h.token = Some(shared::ids::Secret("s3cret".into()));
    let _ok = FakeDrone::connect(q.drones, h).await;
    q.stop().await;
}

/// Guards pongs (issue 14): a drone whose hello asks for them is promised them in the
/// welcome and gets one for every heartbeat, so it can tell a frozen queen from an idle
/// one; a drone that did not ask (one before pongs) is promised nothing and never gets a
/// message it could not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_answered_with_pongs_only_when_the_hello_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let asked = shared::protocol::Hello {
        pongs: true,
        ..hello(DroneId::generate(), 1, vec![])
    };
    let mut new = FakeDrone::connect(q.drones, asked).await;
    assert_eq!(new.welcome.as_ref().and_then(|w| w.pongs), Some(true));
    for _ in 0..2 {
        new.heartbeat(vec![]).await;
        assert_eq!(new.recv().await, Some(QueenMessage::Pong));
    }

    let mut old = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    assert_eq!(old.welcome.as_ref().and_then(|w| w.pongs), None);
    old.heartbeat(vec![]).await;
    old.heartbeat(vec![]).await;
    // An outcome for a task it never held is answered `stale`: that answer comes after
    // the heartbeats were handled, and it is the first thing the drone hears.
    let ghost = shared::TaskId::generate();
    old.complete(ghost, Fence(1), json!(null)).await;
    assert_eq!(
        old.recv().await,
        Some(QueenMessage::Ack(shared::protocol::Ack {
            task_id: ghost,
            fence: Fence(1),
            status: AckStatus::Stale,
        }))
    );
    q.stop().await;
}

/// Guards the negotiated binary encoding (issue 16): a drone that offers MessagePack is
/// told so in a JSON welcome and then both sides speak it (a task goes through assign and
/// completion and is recorded); an offer the queen does not know, or none, leaves the
/// connection on JSON, what every drone speaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_is_spoken_only_when_offered_and_chosen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;

    let offering = shared::protocol::Hello {
        encodings: vec!["zstd-json".into(), "msgpack".into()],
        ..hello(DroneId::generate(), 1, vec![])
    };
    let mut binary = FakeDrone::connect(q.drones, offering).await;
    assert_eq!(
        binary.welcome.as_ref().and_then(|w| w.encoding.clone()),
        Some("msgpack".to_owned())
    );
    let t = q
        .submit(json!({"kind": "echo", "payload": {"n": 0.5, "s": "é"}}))
        .await;
    let assign = binary.expect_assign().await;
    assert_eq!(assign.task_id, t.id);
    assert_eq!(assign.payload, json!({"n": 0.5, "s": "é"}));
    binary
        .send(complete(&assign, json!({"ok": [1, 2.5, null]})))
        .await;
    assert_eq!(
        binary.expect_ack().await,
        (t.id, Fence(1), AckStatus::Recorded)
    );
    let done = q.task(t.id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.result, Some(json!({"ok": [1, 2.5, null]})));

    let unknown = shared::protocol::Hello {
        encodings: vec!["zstd-json".into()],
        ..hello(DroneId::generate(), 1, vec![])
    };
    let mut text = FakeDrone::connect(q.drones, unknown).await;
    assert_eq!(text.welcome.as_ref().and_then(|w| w.encoding.clone()), None);
    // A JSON frame after the welcome is understood: the ghost completion is acked stale.
    let ghost = shared::TaskId::generate();
    text.complete(ghost, Fence(1), json!(null)).await;
    assert_eq!(
        text.recv().await,
        Some(QueenMessage::Ack(shared::protocol::Ack {
            task_id: ghost,
            fence: Fence(1),
            status: AckStatus::Stale,
        }))
    );
    q.stop().await;
}
