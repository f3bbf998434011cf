//! `/metrics` as Prometheus reads it: parsed with a text-format parser, and the counters
//! and histograms move as tasks are submitted, run, fail, lose their lease and report late.

mod common;

use common::{fast_config, hello, FakeDrone, TestQueen};
use prometheus_parse::{Scrape, Value};
use serde_json::json;
use shared::protocol::{AckStatus, DroneMessage, TaskFailed};
use shared::DroneId;

async fn scrape(q: &TestQueen) -> Scrape {
    let url = q.url("/metrics");
    let (content_type, text) = tokio::task::spawn_blocking(move || {
        let resp = ureq::get(&url).call().expect("GET /metrics");
        let ct = resp.header("Content-Type").unwrap_or_default().to_string();
        (ct, resp.into_string().expect("body"))
    })
    .await
    .expect("join");
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format, got {content_type}"
    );
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition text")
}

/// The value of a counter or gauge sample with these labels (0 when absent, as Prometheus
/// treats a series not yet created).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a plain value: {other:?}"),
        })
        .unwrap_or(0.0)
}

/// How many observations a histogram holds.
fn observations(s: &Scrape, name: &str) -> u64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .map(|x| match &x.value {
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count as u64).max().unwrap_or(0),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_move_as_tasks_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let before = scrape(&q).await;
    assert_eq!(value(&before, "hive_tasks_submitted_total", &[]), 0.0);
    assert_eq!(value(&before, "hive_drones_connected", &[]), 0.0);

    // Submitted, by queue.
    let ok = q.submit(json!({"kind": "echo", "queue": "mail"})).await;
    let bad = q
        .submit(json!({"kind": "echo", "queue": "mail", "max_attempts": 3}))
        .await;
    let s = scrape(&q).await;
    assert_eq!(
        value(&s, "hive_tasks_submitted_total", &[("queue", "mail")]),
        2.0
    );
    assert_eq!(
        value(&s, "hive_tasks", &[("queue", "mail"), ("state", "pending")]),
        2.0
    );
    let commits_before = observations(&s, "hive_store_group_commit_size");
    assert!(commits_before >= 1, "submits went through group commits");
    assert!(observations(&s, "hive_store_flush_duration_seconds") >= 1);
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "hive_store_checkpoint_duration_seconds"),
        "the checkpoint histogram is exported"
    );

    // A drone takes both: dispatch latency observed twice, the gauge moves to running.
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 2, vec![])).await;
    let (a1, a2) = (d.expect_assign().await, d.expect_assign().await);
    let (first, second) = if a1.task_id == ok.id {
        (a1, a2)
    } else {
        (a2, a1)
    };
    let s = scrape(&q).await;
    assert_eq!(observations(&s, "hive_dispatch_latency_seconds"), 2);
    assert_eq!(value(&s, "hive_drones_connected", &[]), 1.0);
    assert_eq!(
        value(&s, "hive_tasks", &[("queue", "mail"), ("state", "running")]),
        2.0
    );

    // One succeeds; the other fails once (retried), is leased again, and the drone then
    // drops it from its heartbeat (lease lost: requeued).
    d.complete(first.task_id, first.fence, json!("done")).await;
    assert_eq!(d.expect_ack().await.2, AckStatus::Recorded);
    d.send(DroneMessage::TaskFailed(TaskFailed {
        task_id: second.task_id,
        fence: second.fence,
        error: "boom".into(),
        result: None,
        retryable: true,
    }))
    .await;
    assert_eq!(d.expect_ack().await.2, AckStatus::Recorded);
    let again = d.expect_assign().await;
    assert_eq!(again.task_id, bad.id);
    d.heartbeat(vec![]).await;
    // Requeued, and leased again to the only drone.
    let last = d.expect_assign().await;
    assert_eq!((last.task_id, last.attempt), (bad.id, 3));
    // The old lease's late outcome is stale.
    d.complete(again.task_id, again.fence, json!("late")).await;
    assert_eq!(d.expect_ack().await.2, AckStatus::Stale);

    let s = scrape(&q).await;
    let mail = [("queue", "mail")];
    assert_eq!(value(&s, "hive_tasks_succeeded_total", &mail), 1.0);
    assert_eq!(value(&s, "hive_tasks_retried_total", &mail), 1.0);
    assert_eq!(value(&s, "hive_tasks_requeued_total", &mail), 1.0);
    assert_eq!(value(&s, "hive_lease_expirations_total", &[]), 1.0);
    assert_eq!(value(&s, "hive_stale_completions_total", &[]), 1.0);
    assert_eq!(value(&s, "hive_tasks_failed_total", &mail), 0.0);
    assert_eq!(
        observations(&s, "hive_task_run_duration_seconds"),
        3,
        "three attempts ended: success, failure, lost lease"
    );
    assert!(observations(&s, "hive_store_group_commit_size") > commits_before);

    // Its last attempt fails for good: failed, and the state gauges follow.
    d.send(DroneMessage::TaskFailed(TaskFailed {
        task_id: last.task_id,
        fence: last.fence,
        error: "boom again".into(),
        result: None,
        retryable: true,
    }))
    .await;
    assert_eq!(d.expect_ack().await.2, AckStatus::Recorded);
    let s = scrape(&q).await;
    assert_eq!(value(&s, "hive_tasks_failed_total", &mail), 1.0);
    assert_eq!(
        value(&s, "hive_tasks", &[("queue", "mail"), ("state", "failed")]),
        1.0
    );
    assert_eq!(
        value(&s, "hive_tasks", &[("queue", "mail"), ("state", "running")]),
        0.0
    );
    q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_require_the_api_token_when_one_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.token = Some(shared::ids::Secret("s3cret".into()));
    let q = TestQueen::start(cfg).await;
    let (status, _) = q.call("GET", "/metrics", None).await;
    assert_eq!(status, 401);
    let (status, body) = q.call_with("GET", "/metrics", None, Some("s3cret")).await;
    assert_eq!(status, 200);
    assert!(body
        .as_str()
        .is_some_and(|t| t.contains("hive_lease_expirations_total")));
    q.stop().await;
}
