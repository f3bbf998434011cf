//! Scheduling state survives `kill -9` of the queen: delayed tasks, paused queues, blocked
//! tasks, idempotency keys, schedules and checkpoints are all durable before they are
//! acknowledged, and all behave the same after the restart.

use hive_tests::{wait_until, Hive, DEADLINE};
use serde_json::{json, Value};
use shared::api::{TaskState, TaskView};

fn post(hive: &Hive, path: &str, body: Value) -> (u16, Value) {
    let (code, text) = hive
        .api()
        .post_raw(path, &body.to_string())
        .expect("reach the queen");
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(hive: &Hive, path: &str) -> Value {
    let (code, text) = hive.api().get_raw(path).expect("reach the queen");
    assert_eq!(code, 200, "{path}: {text}");
    serde_json::from_str(&text).expect("json")
}

fn submit(hive: &Hive, spec: Value) -> (u16, TaskView) {
    let (code, body) = post(hive, "/v1/tasks", spec);
    assert!(code == 200 || code == 201, "{body}");
    (code, serde_json::from_value(body).expect("task view"))
}

fn scheduled_runs(hive: &Hive) -> usize {
    get(hive, "/v1/tasks?queue=cron&limit=1000")["tasks"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Guards issue 4's durability: every piece of scheduling state acknowledged before a
/// `kill -9` is there, and honoured, after the restart.
#[test]
fn scheduling_state_survives_kill_9_of_the_queen() {
    let mut hive = Hive::builder()
        .env("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "1500")
        .start();

    // A checkpoint reported by a running attempt (the drone and the queen then die).
    let cp_file = hive.path("resumed");
    let script = format!(
        "if [ -s \"$HIVE_CHECKPOINT_FILE\" ]; then cat \"$HIVE_CHECKPOINT_FILE\" > {out}; exit 0; fi; \
         echo '{{\"step\": 5, \"progress\": 0.5}}' > \"$HIVE_CHECKPOINT_FILE\"; sleep 60",
        out = cp_file.display()
    );
    hive.start_drone("first", 1);
    let (_, resumable) = submit(
        &hive,
        json!({"kind": "exec", "payload": {"cmd": ["sh", "-c", script]}}),
    );
    hive.wait_task(resumable.id, "checkpoint stored", |t| {
        t.checkpoint.is_some()
    });
    hive.drone("first").kill9();

    assert_eq!(post(&hive, "/v1/queues/held/pause", json!({})).0, 200);
    let (_, parent) = submit(&hive, json!({"kind": "echo", "queue": "held"}));
    let (_, child) = submit(&hive, json!({"kind": "echo", "depends_on": [parent.id]}));
    assert_eq!(child.state, TaskState::Blocked);
    let (_, delayed) = submit(&hive, json!({"kind": "echo", "delay_ms": 3000}));
    let run_at = delayed.run_at.expect("a delayed task has run_at");
    let (code, keyed) = submit(
        &hive,
        json!({"kind": "echo", "queue": "held", "idempotency_key": "order-7"}),
    );
    assert_eq!(code, 201);
    let (code, _) = post(
        &hive,
        "/v1/schedules",
        json!({"name": "tick", "every_ms": 1000, "task": {"kind": "echo", "queue": "cron"}}),
    );
    assert_eq!(code, 201);

    hive.queen.kill9();
    hive.queen.restart();

    // Paused stays paused; blocked stays blocked; the key still names the first task.
    let queues = get(&hive, "/v1/queues");
    let held = queues["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["name"] == "held"))
        .cloned();
    assert_eq!(
        held.as_ref().map(|q| q["paused"].clone()),
        Some(json!(true)),
        "{queues}"
    );
    assert_eq!(hive.api().task(child.id).state, TaskState::Blocked);
    let (code, again) = submit(
        &hive,
        json!({"kind": "echo", "queue": "held", "idempotency_key": "order-7"}),
    );
    assert_eq!((code, again.id), (200, keyed.id));
    let schedules = get(&hive, "/v1/schedules");
    assert_eq!(schedules["schedules"][0]["name"], "tick", "{schedules}");
    let cp = hive.api().task(resumable.id).checkpoint;
    assert_eq!(cp, Some(json!({"step": 5, "progress": 0.5})));

    hive.start_drone("second", 4);
    // The checkpoint is handed to the next attempt, which finishes from it.
    let done = hive.wait_task(resumable.id, "resumed and succeeded", |t| {
        t.state == TaskState::Succeeded
    });
    assert!(done.attempts >= 2, "{done:?}");
    let resumed = std::fs::read_to_string(&cp_file).expect("the next attempt saw the checkpoint");
    let resumed: Value = serde_json::from_str(&resumed).expect("checkpoint JSON");
    assert_eq!(resumed["step"], 5);
    // The delayed task runs, and not before its time.
    let d = hive.wait_task(delayed.id, "delayed task done", |t| {
        t.state == TaskState::Succeeded
    });
    assert!(d.started_at.is_some_and(|s| s >= run_at), "{d:?}");
    // The schedule keeps firing after the restart.
    let before = scheduled_runs(&hive);
    wait_until(DEADLINE, "the schedule to fire after the restart", || {
        scheduled_runs(&hive) > before
    });
    // Nothing of the paused queue ran; resuming runs the parent, then the child.
    assert_eq!(hive.api().task(parent.id).state, TaskState::Pending);
    assert_eq!(post(&hive, "/v1/queues/held/resume", json!({})).0, 200);
    hive.wait_task(child.id, "child after parent", |t| {
        t.state == TaskState::Succeeded
    });
    let p = hive.api().task(parent.id);
    let c = hive.api().task(child.id);
    assert!(
        p.finished_at <= c.started_at,
        "the child started before its parent finished"
    );
}
