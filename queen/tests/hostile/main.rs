//! Hostile input against a whole in-process queen (G7 in docs/GUARANTEES.md: bad input is
//! refused, never harmful): property fuzzing of the drone message handler and of the HTTP
//! API, and the regressions those fuzzers found.
//!
//! The fuzzers drive the queen's real layers: drone messages go through `frame::decode`
//! and the core exactly as `server.rs` forwards them (plus a share over real TCP
//! connections, which checks the `error` + close path), and HTTP requests go through the
//! real axum router with `tower::ServiceExt::oneshot`, no sockets. Each target runs
//! `HIVE_FUZZ_CASES` cases (default 10,000); `PROPTEST_RNG_SEED=<n>` replays a run.
//!
//! The inputs are in `generators`, the in-process queen, the drones and the runner
//! settings in `harness`; this file holds the properties and the regressions.

#[path = "../common/mod.rs"]
mod common;
mod generators;
mod harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use common::{hello, FakeDrone};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use queen::core::Request;
use serde_json::{json, Value};
use shared::frame;
use shared::protocol::{AckStatus, DroneMessage, TaskComplete, TaskFailed};
use shared::DroneId;
use tower::ServiceExt;

use generators::*;
use harness::*;

/// Guards G7 on the API: random and mutated task specs, batches, queue limits and
/// schedules, arbitrary JSON and non-JSON bodies, random query strings on `GET /v1/tasks`
/// and random paths never get a 5xx (or a hang, or a panic); every 4xx is a JSON
/// `{"error": "..."}` with a message; a refused request, and any GET, changes nothing.
#[test]
fn fuzzed_api_requests_never_fail_the_server_and_refusals_change_nothing() {
    on_big_stack(|| {
        let rt = fuzz_runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = fuzz_config(dir.path());
        // Small limits, so random input reaches them.
        cfg.tasks.max_payload_bytes = 4096;
        cfg.tasks.max_batch = 4;
        cfg.tasks.max_body_bytes = 64 * 1024;
        let hive = rt.block_on(Hive::start(cfg));
        // Something to refer to and to leave alone.
        rt.block_on(async {
            hive.submit(json!({"kind": "echo", "idempotency_key": "k1"}))
                .await;
            hive.submit(json!({"kind": "echo", "queue": "q1", "delay_ms": 3_600_000}))
                .await;
        });

        let counts: Mutex<BTreeMap<String, [u64; 3]>> = Mutex::new(BTreeMap::new());
        let cases = fuzz_cases();
        let started = Instant::now();
        let result = TestRunner::new(proptest_config(cases, true)).run(&call(), |c| {
            rt.block_on(async {
                let before = api_snapshot(&hive.core).await;
                let reply = hive.call(c.method, &c.uri, c.body.clone()).await;
                let what = format!(
                    "{} {} -> {} {}",
                    c.method,
                    c.uri,
                    reply.status,
                    reply.text()
                );
                prop_assert!(!reply.status.is_server_error(), "server error: {what}");
                let class = if reply.status.is_success() {
                    0
                } else if reply.status.is_client_error() {
                    1
                } else {
                    2
                };
                if let Ok(mut counts) = counts.lock() {
                    counts.entry(c.endpoint.to_string()).or_default()[class] += 1;
                }
                if reply.status.is_client_error() {
                    if let Err(e) = reply.error_message() {
                        return Err(TestCaseError::fail(format!("{e}; for {what}")));
                    }
                }
                if reply.status.is_success() && c.endpoint == "POST /v1/schedules" {
                    // An accepted schedule would fire tasks while later cases run: remove it.
                    let v: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
                    let name = v["name"].as_str().unwrap_or_default();
                    let del = hive
                        .call(
                            "DELETE",
                            &format!("/v1/schedules/{}", pct(name.as_bytes())),
                            vec![],
                        )
                        .await;
                    prop_assert_eq!(del.status, StatusCode::OK, "{}", del.text());
                }
                if !reply.status.is_success() || c.method == "GET" {
                    let after = api_snapshot(&hive.core).await;
                    prop_assert_eq!(&after, &before, "state changed by {}", what);
                }
                Ok(())
            })
        });
        let elapsed = started.elapsed();
        let counts = counts.into_inner().unwrap_or_default();
        eprintln!("HTTP API fuzz: {cases} cases in {elapsed:.1?}; per endpoint [2xx, 4xx, other]:");
        for (endpoint, [ok, refused, other]) in &counts {
            eprintln!("  {endpoint:40} {ok:6} {refused:6} {other:6}");
        }
        if let Err(e) = result {
            panic!("{e}");
        }
        // The queen still serves after it all.
        rt.block_on(async {
            let (status, _) = hive.json("GET", "/v1/stats", Value::Null).await;
            assert_eq!(status, StatusCode::OK);
            let t = hive.submit(json!({"kind": "echo"})).await;
            assert_eq!(t.state, shared::api::TaskState::Pending);
            hive.stop().await;
        });
    });
}

/// Guards G7 on the drone port, in-process: after a valid hello, random and mutated frame
/// bodies, message-shaped JSON and valid messages naming real and unknown tasks with
/// current, stale and absurd fences go through `frame::decode` and the core. Nothing
/// panics or hangs, the victim drone hears nothing, and no task the fuzz drone does not
/// hold changes in any way.
#[test]
fn fuzzed_drone_messages_change_no_task_the_drone_does_not_hold() {
    on_big_stack(|| {
        let rt = fuzz_runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let hive = rt.block_on(Hive::start(fuzz_config(dir.path())));
        let (victim, known) = rt.block_on(victim_world(&hive));
        let victim = Mutex::new(victim);
        let baseline = rt.block_on(hive.tasks());
        let baseline_stats = rt.block_on(hive.stats());
        let fuzz_drone = rt.block_on(async {
            let mut h = hello(DroneId::generate(), 4, vec![]);
            h.kinds = vec!["fuzz-runs-nothing".into()];
            InProcessDrone::hello(&hive.core, h).await
        });
        let fuzz_drone = Mutex::new(fuzz_drone);

        let decoded = AtomicU64::new(0);
        let cases = fuzz_cases();
        let started = Instant::now();
        let result =
            TestRunner::new(proptest_config(cases, false)).run(&frame_body(&known), |body| {
                rt.block_on(async {
                    let Ok(msg) = frame::decode::<DroneMessage>(&body) else {
                        // The server answers these with `error` and a close (the TCP fuzz below
                        // checks that); the core never sees them.
                        return Ok(());
                    };
                    decoded.fetch_add(1, Ordering::Relaxed);
                    let what = format!("{msg:?}");
                    let conn = fuzz_drone.lock().map(|d| d.conn).unwrap_or_default();
                    hive.core
                        .send(Request::Message { conn, msg })
                        .await
                        .map_err(|e| TestCaseError::fail(format!("core gone: {e}")))?;
                    // The core handles requests in order: once this answers, the message is handled.
                    let after = hive.tasks().await;
                    if after != baseline {
                        return Err(TestCaseError::fail(format!(
                            "{what} changed tasks the drone does not hold:\n{}",
                            task_diff(&baseline, &after)
                        )));
                    }
                    let heard = victim.lock().ok().and_then(|mut v| v.rx.try_recv().ok());
                    if let Some(msg) = heard {
                        return Err(TestCaseError::fail(format!(
                            "the victim drone was sent {msg:?} because of {what}"
                        )));
                    }
                    // Drop what the fuzz drone was told (cancels, stale acks).
                    if let Ok(mut d) = fuzz_drone.lock() {
                        while d.rx.try_recv().is_ok() {}
                    }
                    Ok(())
                })
            });
        let elapsed = started.elapsed();
        eprintln!(
            "drone message fuzz (in-process): {cases} cases, {} decoded and handled, in {elapsed:.1?}",
            decoded.load(Ordering::Relaxed)
        );
        if let Err(e) = result {
            panic!("{e}");
        }
        rt.block_on(async {
            let stats = hive.stats().await;
            assert_eq!(stats.by_state, baseline_stats.by_state);
            // The queen still serves: a fresh drone says hello and runs a task end to end.
            let mut h = hello(DroneId::generate(), 1, vec![]);
            h.kinds = vec!["final-check".into()];
            let mut d = FakeDrone::connect(hive.drones, h).await;
            let t = hive.submit(json!({"kind": "final-check"})).await;
            let a = d.expect_assign().await;
            assert_eq!(a.task_id, t.id);
            d.complete(a.task_id, a.fence, json!("ok")).await;
            let (_, _, status) = d.expect_ack().await;
            assert_eq!(status, AckStatus::Recorded);
            drop(victim);
            hive.stop().await;
        });
    });
}

/// Guards G7 over real sockets: after a valid hello, fuzzed frames (a tenth of
/// `HIVE_FUZZ_CASES`, over as many connections as refusals close) are either handled — the
/// next message is answered — or refused with one `error` and a close, exactly as
/// `frame::decode` predicts; frames with a length over `max_frame_len` are refused from
/// the prefix. No task the fuzz drone does not hold changes, and the queen keeps serving.
#[test]
fn fuzzed_frames_over_tcp_are_handled_or_refused_with_an_error_and_a_close() {
    on_big_stack(|| {
        let rt = fuzz_runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = fuzz_config(dir.path());
        let max_frame = cfg.queen.max_frame_len;
        let hive = rt.block_on(Hive::start(cfg));
        let (_victim, known) = rt.block_on(victim_world(&hive));
        let baseline = rt.block_on(hive.tasks());
        let fuzz_id = DroneId::generate();
        let connect = || async {
            let mut h = hello(fuzz_id, 4, vec![]);
            h.kinds = vec!["fuzz-runs-nothing".into()];
            FakeDrone::connect(hive.drones, h).await
        };
        let io = Mutex::new(Some(rt.block_on(connect())));
        let strategy = prop_oneof![
            30 => frame_body(&known).prop_map(|b| {
                let mut out = (b.len() as u32).to_be_bytes().to_vec();
                out.extend_from_slice(&b);
                (out, false)
            }),
            1 => ((max_frame as u32 + 1)..=u32::MAX).prop_map(|len| (len.to_be_bytes().to_vec(), true)),
        ];
        let tallies = Mutex::new([0u64; 2]);
        let cases = (fuzz_cases() / 10).max(1);
        let started = Instant::now();
        let result =
            TestRunner::new(proptest_config(cases, false)).run(&strategy, |(bytes, oversized)| {
                rt.block_on(async {
                    let expect = if oversized || frame::decode::<DroneMessage>(&bytes[4..]).is_err()
                    {
                        Outcome::ErrorAndClosed
                    } else {
                        Outcome::Handled
                    };
                    let mut conn = match io.lock().ok().and_then(|mut g| g.take()) {
                        Some(c) => c,
                        None => connect().await,
                    };
                    let got = send_and_sync(&mut conn, &bytes, &expect)
                        .await
                        .map_err(TestCaseError::fail)?;
                    prop_assert_eq!(&got, &expect);
                    if let Ok(mut t) = tallies.lock() {
                        t[usize::from(got == Outcome::ErrorAndClosed)] += 1;
                    }
                    if got == Outcome::Handled {
                        if let Ok(mut g) = io.lock() {
                            *g = Some(conn);
                        }
                    }
                    let after = hive.tasks().await;
                    if after != baseline {
                        return Err(TestCaseError::fail(format!(
                            "{} changed tasks the drone does not hold:\n{}",
                            String::from_utf8_lossy(&bytes),
                            task_diff(&baseline, &after)
                        )));
                    }
                    Ok(())
                })
            });
        let [handled, refused] = tallies.into_inner().unwrap_or_default();
        eprintln!(
            "drone frame fuzz (TCP): {cases} frames in {:.1?}: {handled} handled, {refused} refused with an error and a close",
            started.elapsed()
        );
        if let Err(e) = result {
            panic!("{e}");
        }
        rt.block_on(async {
            let mut h = hello(DroneId::generate(), 1, vec![]);
            h.kinds = vec!["final-check".into()];
            let mut d = FakeDrone::connect(hive.drones, h).await;
            let t = hive.submit(json!({"kind": "final-check"})).await;
            let a = d.expect_assign().await;
            assert_eq!(a.task_id, t.id);
            hive.stop().await;
        });
    });
}

// ----- what the fuzzers found --------------------------------------------------------------

/// Guards G3/G4 against a drone reporting on a lease it does not hold: drone B, which
/// never had the task, sends a completion (and a failure) with the current fence of
/// drone A's lease. Fences are small counters and task ids are shown by the API, so the
/// queen must check who holds the lease: B's outcome is `stale` and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_cannot_record_the_outcome_of_another_drone_s_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hive = Hive::start(fuzz_config(dir.path())).await;
    let mut a = FakeDrone::connect(hive.drones, hello(DroneId::generate(), 1, vec![])).await;
    let t = hive.submit(json!({"kind": "echo"})).await;
    let lease = a.expect_assign().await;
    let mut h = hello(DroneId::generate(), 1, vec![]);
    h.kinds = vec!["nothing".into()];
    let mut b = FakeDrone::connect(hive.drones, h).await;
    for msg in [
        DroneMessage::TaskFailed(TaskFailed {
            task_id: t.id,
            fence: lease.fence,
            error: "forged".into(),
            result: None,
            retryable: false,
        }),
        DroneMessage::TaskComplete(TaskComplete {
            task_id: t.id,
            fence: lease.fence,
            result: json!("forged"),
        }),
    ] {
        b.send(msg).await;
        let (_, _, status) = b.expect_ack().await;
        let now = hive.tasks().await;
        let view = now.iter().find(|v| v.id == t.id).expect("listed");
        assert_eq!(
            (status, view.state, &view.result),
            (AckStatus::Stale, shared::api::TaskState::Running, &None),
            "an outcome from a drone that does not hold the lease was recorded: {view:#?}"
        );
    }
    hive.stop().await;
}

/// Guards G7 against a delay past the end of the calendar: `delay_ms` near `u64::MAX`
/// overflows `now + delay` in chrono, which panics. The spec must be refused with a 400
/// naming `delay_ms` (here and inside a batch or a schedule), and the queen keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_past_the_end_of_time_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hive = Hive::start(fuzz_config(dir.path())).await;
    let huge = i64::MAX as u64 / 2;
    let spec = json!({"kind": "echo", "delay_ms": huge});
    for (uri, body) in [
        ("/v1/tasks", spec.clone()),
        ("/v1/tasks/batch", json!({"tasks": [spec.clone()]})),
        (
            "/v1/schedules",
            json!({"name": "far", "every_ms": 60_000, "task": spec.clone()}),
        ),
    ] {
        let app = hive.app.clone();
        let req = HttpRequest::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        // A panic in the handler surfaces here as a join error.
        let answer = tokio::spawn(async move {
            let resp = app.oneshot(req).await.unwrap_or_else(|e| match e {});
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
        .await;
        let (status, text) =
            answer.unwrap_or_else(|e| panic!("POST {uri} with delay_ms {huge} panicked: {e}"));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {text}");
        assert!(text.contains("delay_ms"), "{uri}: {text}");
    }
    let s = hive.stats().await;
    assert_eq!(s.by_state.values().sum::<u64>(), 0, "{s:?}");
    hive.stop().await;
}

/// Guards the core against a schedule interval past the end of the calendar: `every_ms`
/// of 10^16 (~317,000 years) passes validation, then computing its next run overflows
/// chrono inside the core, which panics and takes every later request with it. It must be
/// refused with a 400 naming `every_ms`, and the queen keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_past_the_end_of_time_is_refused_and_the_core_survives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hive = Hive::start(fuzz_config(dir.path())).await;
    for every in [10_000_000_000_000_000u64, i64::MAX as u64 + 1, u64::MAX] {
        let (status, body) = hive
            .json(
                "POST",
                "/v1/schedules",
                json!({"name": "far", "every_ms": every, "task": {"kind": "echo"}}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "every_ms {every} was answered {body}"
        );
        assert!(body.to_string().contains("every_ms"), "{body}");
        let (status, body) = hive.json("GET", "/v1/stats", Value::Null).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "after every_ms {every} the queen answers {body}"
        );
    }
    hive.stop().await;
}

/// Guards the API's error contract (docs/API.md: errors are `{"error": "..."}`) where the
/// router and extractors answer before a handler: a wrong method on a known path, a query
/// string or path that is not valid UTF-8 or percent-encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_from_routing_and_extractors_are_json_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hive = Hive::start(fuzz_config(dir.path())).await;
    let mut failures = Vec::new();
    for (method, uri) in [
        ("GET", "/v1/tasks/batch"),
        ("DELETE", "/v1/tasks"),
        ("GET", "/v1/queues/default"),
        ("GET", "/v1/schedules/nightly"),
        ("GET", "/v1/tasks?limit=%FF"),
        ("GET", "/v1/tasks?state=%G1"),
        ("GET", "/v1/tasks/%FF"),
        ("POST", "/v1/queues/%FF/pause"),
    ] {
        let r = hive.call(method, uri, vec![]).await;
        if let Err(e) = r.error_message() {
            failures.push(format!("{method} {uri} -> {}: {e}", r.status));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    hive.stop().await;
}
