//! Hostile input against a whole in-process queen (SPEC G7: bad input is refused, never
//! harmful): property fuzzing of the drone message handler and of the HTTP API, and the
//! regressions those fuzzers found.
//!
//! The fuzzers drive the queen's real layers: drone messages go through `frame::decode`
//! and the core exactly as `server.rs` forwards them (plus a share over real TCP
//! connections, which checks the `error` + close path), and HTTP requests go through the
//! real axum router with `tower::ServiceExt::oneshot`, no sockets. Each target runs
//! `HIVE_FUZZ_CASES` cases (default 10,000); `PROPTEST_RNG_SEED=<n>` replays a run.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use axum::Router;
use common::{fast_config, hello, FakeDrone, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use queen::config::Config;
use queen::core::{Conn, CoreHandle, Request};
use queen::{Listeners, Queen};
use serde_json::{json, Map, Value};
use shared::api::{QueueView, ScheduleView, Stats, TaskPage, TaskView};
use shared::frame;
use shared::protocol::{
    AckStatus, Checkpoint, DroneMessage, Heartbeat, Held, Hello, QueenMessage, TaskComplete,
    TaskFailed,
};
use shared::{DroneId, Fence, TaskId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Cases per fuzz target unless `HIVE_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u32 = 10_000;

fn fuzz_cases() -> u32 {
    std::env::var("HIVE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Runs a fuzz target on a thread with a large stack: proptest's nested strategies recurse
/// deeply when generating and shrinking, more than a test thread's default 2 MiB allows in
/// a debug build.
fn on_big_stack(f: impl FnOnce() + Send + 'static) {
    let worker = std::thread::Builder::new()
        .name("fuzz".into())
        .stack_size(256 << 20)
        .spawn(f)
        .expect("spawn the fuzz thread");
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

/// `shrink: false` for targets checked against a baseline taken once: after a failure the
/// world has changed, so re-running smaller inputs against it would blame the wrong one;
/// the input reported is then the one that first broke the property.
fn proptest_config(cases: u32, shrink: bool) -> ProptestConfig {
    ProptestConfig {
        // A failure is reported with its (shrunk) input; nothing is written to the tree.
        failure_persistence: None,
        max_shrink_time: 60_000,
        max_shrink_iters: if shrink { u32::MAX } else { 0 },
        ..ProptestConfig::with_cases(cases)
    }
}

// ----- an in-process queen whose core and router the test can reach ---------------------

/// A queen serving on `127.0.0.1:0`, with its core handle and a router built on that core,
/// so requests can skip the sockets.
struct Hive {
    drones: SocketAddr,
    core: CoreHandle,
    app: Router,
    shutdown: CancellationToken,
    join: Option<tokio::task::JoinHandle<Result<(), queen::QueenError>>>,
}

impl Hive {
    async fn start(cfg: Config) -> Hive {
        let open_cfg = cfg.clone();
        let queen = tokio::task::spawn_blocking(move || Queen::open(open_cfg))
            .await
            .expect("join")
            .expect("queen opens");
        let core = queen.handle();
        let app = queen::http::router(queen::http::AppState {
            core: core.clone(),
            reader: queen.reader(),
            cfg: Arc::new(cfg),
            metrics: queen::metrics::Metrics::new(),
        });
        let drones_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let drones = drones_l.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(queen.serve(
            Listeners {
                drones: drones_l,
                http: http_l,
            },
            shutdown.clone(),
        ));
        Hive {
            drones,
            core,
            app,
            shutdown,
            join: Some(join),
        }
    }

    /// One request through the router: (status, content type, body). A request that does
    /// not answer within `PATIENCE` is a hang and fails the test.
    async fn call(&self, method: &str, uri: &str, body: Vec<u8>) -> Reply {
        let req = HttpRequest::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap_or_else(|e| panic!("test built a bad request {method} {uri}: {e}"));
        let resp = tokio::time::timeout(PATIENCE, self.app.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {uri} hung"))
            .unwrap_or_else(|e| match e {});
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        Reply {
            status,
            content_type,
            body: body.to_vec(),
        }
    }

    async fn json(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        let r = self.call(method, uri, body.to_string().into_bytes()).await;
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    async fn submit(&self, spec: Value) -> TaskView {
        let (status, body) = self.json("POST", "/v1/tasks", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        serde_json::from_value(body).expect("task view")
    }

    /// Every task the API lists, oldest first.
    async fn tasks(&self) -> Vec<TaskView> {
        let r = self.call("GET", "/v1/tasks?limit=1000", vec![]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let mut page: TaskPage = serde_json::from_slice(&r.body).expect("task page");
        page.tasks.reverse();
        page.tasks
    }

    async fn stats(&self) -> Stats {
        self.core
            .ask(|reply| Request::Stats { reply })
            .await
            .expect("the core answers")
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(j) = self.join.take() {
            j.await.expect("join").expect("clean stop");
        }
    }
}

impl Drop for Hive {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The API's contract for errors: a JSON `{"error": "..."}` with a message.
    fn error_message(&self) -> Result<String, String> {
        let v: Value = serde_json::from_slice(&self.body)
            .map_err(|e| format!("error body is not JSON ({e}): {:?}", self.text()))?;
        let msg = v["error"]
            .as_str()
            .ok_or_else(|| format!("no `error` string in {v}"))?;
        if msg.trim().is_empty() {
            return Err(format!("empty error message in {v}"));
        }
        if !self.content_type.starts_with("application/json") {
            return Err(format!("content type {:?} for {v}", self.content_type));
        }
        Ok(msg.to_string())
    }
}

fn fuzz_config(dir: &std::path::Path) -> Config {
    let mut cfg = fast_config(dir);
    // The fuzzed drones and the victim never heartbeat on their own: nothing may expire
    // during a run, so any change is the fuzz input's doing.
    cfg.leases.heartbeat_interval_ms = 1_000;
    cfg.leases.heartbeat_timeout_ms = 600_000;
    cfg.leases.reconnect_grace_ms = 600_000;
    cfg
}

// ----- generators --------------------------------------------------------------------------

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Mostly short strings, now and then a long one (up to 4 KiB).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => any::<String>(),
        1 => (any::<char>(), 0usize..4096).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
}

/// Names as the API takes them (kind, queue, label, schedule): good ones, edge cases and
/// junk.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&["echo", "exec", "default", "q1", "a:b/c.d_e-f"][..])
            .prop_map(str::to_string),
        2 => "[a-zA-Z0-9._:/-]{1,12}",
        1 => Just(String::new()),
        1 => Just("x".repeat(129)),
        1 => Just("x".repeat(128)),
        2 => text(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..10_000).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(
            &[
                0,
                1,
                u32::MAX as u64,
                u32::MAX as u64 + 1,
                i64::MAX as u64,
                u64::MAX
            ][..]
        )
        .prop_map(Value::from),
        prop::sample::select(&[-1.0, 0.5, 1e308, -1e308, 1e-300][..]).prop_map(Value::from),
        json_value(),
    ]
}

fn timestamp() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(
            &[
                "2026-01-01T12:00:00Z",
                "1970-01-01T00:00:00Z",
                "0000-01-01T00:00:00Z",
                "9999-12-31T23:59:59Z",
                "9999-12-31T23:59:59-23:59",
                "0000-01-01T00:00:00+23:59",
                "2026-13-01T00:00:00Z",
                "yesterday",
                "",
            ][..]
        )
        .prop_map(Value::from),
        json_value(),
    ]
}

fn uuid_text() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string())
}

/// A task spec: half of them valid but for at most one field, the rest with every field
/// wild.
fn spec() -> impl Strategy<Value = Value> {
    prop_oneof![near_valid_spec(), wild_spec()]
}

/// A valid spec with at most one field replaced by a wild value (or one unknown field
/// added), so validation is reached field by field and specs are also accepted.
fn near_valid_spec() -> impl Strategy<Value = Value> {
    let valid = (
        (
            prop_oneof![
                3 => Just(json!({"kind": "echo"})),
                1 => Just(json!({"kind": "exec", "payload": {"cmd": ["true"], "env": {"A": "1"}}})),
            ],
            prop::option::of(json_value()),
            prop::option::of(prop::sample::select(
                &["default", "q1", "q-2", "a:b/c.d_e"][..],
            )),
            prop::option::of(any::<i32>()),
            prop::option::of(0u64..10_000_000),
            prop::option::of(1u32..20),
        ),
        (
            prop::option::of(1u64..1_000_000),
            prop::option::of(prop::collection::vec("[a-z0-9]{1,8}", 0..3)),
            prop::option::of("[a-zA-Z0-9/_-]{1,24}"),
            prop::option::weighted(
                0.2,
                (1u64..1000, 1.0f64..10.0, 1000u64..100_000, 0.0f64..1.0),
            ),
        ),
    )
        .prop_map(
            |((base, payload, queue, priority, delay, attempts), (timeout, labels, key, retry))| {
                let mut m = base.as_object().cloned().unwrap_or_default();
                if let (Some(p), false) = (payload, m.contains_key("payload")) {
                    m.insert("payload".into(), p);
                }
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                };
                put("queue", queue.map(Value::from));
                put("priority", priority.map(Value::from));
                put("delay_ms", delay.map(Value::from));
                put("max_attempts", attempts.map(Value::from));
                put("timeout_ms", timeout.map(Value::from));
                put("labels", labels.map(Value::from));
                put("idempotency_key", key.map(Value::from));
                put(
                    "retry",
                    retry.map(|(i, f, m, j)| {
                        json!({"initial_ms": i, "factor": f, "max_ms": m, "jitter": j})
                    }),
                );
                Value::Object(m)
            },
        );
    const FIELDS: &[&str] = &[
        "kind",
        "payload",
        "queue",
        "priority",
        "run_at",
        "delay_ms",
        "max_attempts",
        "timeout_ms",
        "labels",
        "idempotency_key",
        "depends_on",
        "ref",
        "retry",
        "priorty",
    ];
    let wild = prop_oneof![
        number(),
        name().prop_map(Value::from),
        timestamp(),
        json_value(),
    ];
    (
        valid,
        prop::option::of((prop::sample::select(FIELDS), wild)),
    )
        .prop_map(|(mut v, change)| {
            if let (Some((k, x)), Some(m)) = (change, v.as_object_mut()) {
                m.insert(k.to_string(), x);
            }
            v
        })
}

/// A task spec, each field present or not, with plausible, edge and wild values, and now
/// and then a field the spec does not have.
fn wild_spec() -> impl Strategy<Value = Value> {
    let exec_payload = prop_oneof![
        Just(json!({"cmd": ["true"]})),
        Just(json!({"cmd": []})),
        Just(json!({"cmd": "ls"})),
        Just(json!({"cmd": ["sh"], "env": {"A": 1}, "cwd": 3})),
        Just(json!({"cmd": ["sh"], "permanent_exit_codes": [0, 256, -1]})),
        Just(json!({"cmd": ["sh"], "bogus": true})),
    ];
    let payload = prop_oneof![
        4 => json_value(),
        1 => exec_payload,
        1 => (3_000usize..6_000).prop_map(|n| Value::from("p".repeat(n))),
    ];
    let retry = prop::collection::vec(
        (
            prop::sample::select(&["initial_ms", "factor", "max_ms", "jitter", "bogus"][..]),
            number(),
        ),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    let depends = prop::collection::vec(
        prop_oneof![
            uuid_text().prop_map(Value::from),
            prop::sample::select(&["a", "b", "c"][..]).prop_map(Value::from),
            json_value(),
        ],
        0..4,
    )
    .prop_map(Value::Array);
    let fields = (
        (
            prop::option::weighted(
                0.9,
                prop_oneof![9 => name().prop_map(Value::from), 1 => json_value()],
            ),
            prop::option::of(payload),
            prop::option::of(prop_oneof![name().prop_map(Value::from), json_value()]),
            prop::option::of(number()),
            prop::option::weighted(0.2, timestamp()),
            prop::option::weighted(0.3, number()),
        ),
        (
            prop::option::weighted(0.3, number()),
            prop::option::weighted(0.3, number()),
            prop::option::weighted(
                0.3,
                prop::collection::vec(name().prop_map(Value::from), 0..40).prop_map(Value::Array),
            ),
            prop::option::weighted(0.3, prop_oneof![name().prop_map(Value::from), json_value()]),
            prop::option::weighted(0.3, depends),
            prop::option::weighted(0.3, prop::sample::select(&["a", "b", "c", ""][..])),
            prop::option::weighted(0.2, retry),
            prop::option::weighted(0.1, (name(), json_value())),
        ),
    );
    fields.prop_map(
        |(
            (kind, payload, queue, priority, run_at, delay_ms),
            (max_attempts, timeout_ms, labels, key, depends_on, reference, retry, extra),
        )| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            };
            put("kind", kind);
            put("payload", payload);
            put("queue", queue);
            put("priority", priority);
            put("run_at", run_at);
            put("delay_ms", delay_ms);
            put("max_attempts", max_attempts);
            put("timeout_ms", timeout_ms);
            put("labels", labels);
            put("idempotency_key", key);
            put("depends_on", depends_on);
            put("ref", reference.map(Value::from));
            put("retry", retry);
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        },
    )
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            bytes.push(b'{');
        }
        let n = bytes.len();
        match m {
            Mutation::Flip(i, bit) => bytes[i.index(n)] ^= 1 << bit,
            Mutation::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            Mutation::Delete(i) => {
                bytes.remove(i.index(n));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(n)),
        }
    }
    bytes
}

/// A JSON body: as generated, with a few bytes mutated, or replaced by random bytes or
/// by some other JSON value.
fn body_from(v: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
    (
        v,
        0u8..11,
        prop::collection::vec(mutation(), 1..4),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(v, mode, mutations, random)| match mode {
            0..=5 => v.to_string().into_bytes(),
            6..=8 => mutate(v.to_string().into_bytes(), &mutations),
            9 => random,
            _ => Value::Array(vec![v]).to_string().into_bytes(),
        })
}

/// Percent-encodes everything but unreserved characters, so any bytes make a valid URI.
fn pct(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(
            &["v1", "tasks", "queues", "schedules", "drones", "stats", "metrics", "healthz",
              "batch", "cancel", "retry", "pause", "resume", "default", ""][..]
        )
        .prop_map(str::to_string),
        2 => uuid_text(),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| pct(&b)),
        1 => name().prop_map(|n| pct(n.as_bytes())),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => prop::sample::select(&["state", "queue", "before", "limit", "bogus", ""][..])
            .prop_map(|k| k.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ];
    let value = prop_oneof![
        4 => prop::sample::select(
            &["pending", "running", "succeeded", "done", "default", "0", "1", "1000", "1001",
              "-1", "99999999999999999999", ""][..]
        )
        .prop_map(|v| v.as_bytes().to_vec()),
        2 => uuid_text().prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 0..24),
    ];
    prop::collection::vec((key, value, any::<bool>()), 0..5).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v, raw)| {
                if raw {
                    // Unencoded bytes where the URI allows them; percent signs stay raw
                    // too, so half-encodings like `%G1` or `%` reach the query parser.
                    let keep = |b: &Vec<u8>| -> String {
                        b.iter()
                            .map(|&c| {
                                if c.is_ascii_alphanumeric() || b"-._~!$'()*+,;:@/?%".contains(&c) {
                                    (c as char).to_string()
                                } else {
                                    format!("%{c:02X}")
                                }
                            })
                            .collect()
                    };
                    format!("{}={}", keep(&k), keep(&v))
                } else {
                    format!("{}={}", pct(&k), pct(&v))
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// One HTTP request the fuzzer sends.
#[derive(Debug, Clone)]
struct Call {
    endpoint: &'static str,
    method: &'static str,
    uri: String,
    body: Vec<u8>,
}

fn call() -> impl Strategy<Value = Call> {
    let post = |endpoint: &'static str, uri: String, body: Vec<u8>| Call {
        endpoint,
        method: "POST",
        uri,
        body,
    };
    let batch = prop_oneof![
        4 => prop::collection::vec(spec(), 0..6).prop_map(|t| json!({ "tasks": t })),
        3 => prop::collection::vec(near_valid_spec(), 1..6).prop_map(|t| json!({ "tasks": t })),
        1 => (prop::collection::vec(spec(), 0..3), json_value())
            .prop_map(|(t, x)| json!({ "tasks": t, "extra": x })),
        1 => json_value().prop_map(|t| json!({ "tasks": t })),
    ];
    let limits = prop::collection::vec(
        (
            prop::sample::select(&["max_running", "rate_per_s", "paused", ""][..]),
            prop_oneof![Just(Value::Null), number()],
        ),
        0..3,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    let cron = prop_oneof![
        prop::sample::select(
            &[
                "*/5 * * * *",
                "30 */5 * * * *",
                "* * * *",
                "99 * * * *",
                "0 0 31 2 *",
                "0 0 0 1 1 * 2030",
                "* * * * * * *",
                "",
                "@daily",
                "59 59 23 31 12 *"
            ][..]
        )
        .prop_map(Value::from),
        json_value(),
    ];
    let near_valid_schedule = (
        "[a-z0-9-]{1,12}",
        prop_oneof![
            prop::sample::select(&["*/5 * * * *", "0 0 1 1 *", "30 */5 * * * *"][..])
                .prop_map(|c| ("cron", Value::from(c))),
            (1_000u64..100_000_000).prop_map(|ms| ("every_ms", Value::from(ms))),
        ],
        near_valid_spec(),
        prop::option::of((
            prop::sample::select(&["name", "cron", "every_ms", "task", "bogus"][..]),
            prop_oneof![number(), name().prop_map(Value::from), json_value()],
        )),
    )
        .prop_map(|(name, (key, every), task, change)| {
            let mut m = Map::new();
            m.insert("name".into(), Value::from(name));
            m.insert(key.into(), every);
            m.insert("task".into(), task);
            if let Some((k, v)) = change {
                m.insert(k.into(), v);
            }
            Value::Object(m)
        });
    let schedule = (
        prop::option::weighted(0.9, name().prop_map(Value::from)),
        prop::option::of(cron),
        prop::option::of(number()),
        prop::option::weighted(0.9, spec()),
        prop::option::weighted(0.1, (name(), json_value())),
    )
        .prop_map(|(n, cron, every, task, extra)| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            };
            put("name", n);
            put("cron", cron);
            put("every_ms", every);
            put("task", task);
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        });
    prop_oneof![
        6 => body_from(spec()).prop_map(move |b| post("POST /v1/tasks", "/v1/tasks".into(), b)),
        3 => body_from(batch)
            .prop_map(move |b| post("POST /v1/tasks/batch", "/v1/tasks/batch".into(), b)),
        2 => (segment(), body_from(limits)).prop_map(move |(n, b)| {
            post("POST /v1/queues/{name}", format!("/v1/queues/{n}"), b)
        }),
        2 => body_from(near_valid_schedule)
            .prop_map(move |b| post("POST /v1/schedules", "/v1/schedules".into(), b)),
        2 => body_from(schedule)
            .prop_map(move |b| post("POST /v1/schedules", "/v1/schedules".into(), b)),
        1 => Just(()).prop_map(move |()| post(
            "POST /v1/tasks (over max_body_bytes)",
            "/v1/tasks".into(),
            vec![b' '; 70 * 1024],
        )),
        3 => query().prop_map(|q| Call {
            endpoint: "GET /v1/tasks?query",
            method: "GET",
            uri: format!("/v1/tasks?{q}"),
            body: vec![],
        }),
        3 => prop::collection::vec(segment(), 1..5).prop_map(|s| Call {
            endpoint: "GET random path",
            method: "GET",
            uri: format!("/{}", s.join("/")),
            body: vec![],
        }),
    ]
}

// ----- HTTP API fuzz ---------------------------------------------------------------------------

/// What a rejected request must leave alone: the tasks of each queue (counted over all
/// states, since delayed tasks move from scheduled to pending on their own), the queues'
/// settings and the schedules.
#[derive(Debug, PartialEq)]
struct ApiSnapshot {
    tasks_by_queue: BTreeMap<String, u64>,
    queues: Vec<(String, bool, Option<u32>, Option<String>)>,
    schedules: Vec<(String, Option<String>, Option<u64>, Value)>,
}

async fn api_snapshot(core: &CoreHandle) -> ApiSnapshot {
    let stats = core
        .ask(|reply| Request::Stats { reply })
        .await
        .expect("the core answers");
    let queues: Vec<QueueView> = core
        .ask(|reply| Request::Queues { reply })
        .await
        .expect("the core answers");
    let schedules: Vec<ScheduleView> = core
        .ask(|reply| Request::Schedules { reply })
        .await
        .expect("the core answers");
    ApiSnapshot {
        tasks_by_queue: stats
            .by_queue
            .into_iter()
            .map(|(q, by_state)| (q, by_state.values().sum::<u64>()))
            .filter(|(_, n)| *n > 0)
            .collect(),
        queues: queues
            .into_iter()
            .map(|q| {
                (
                    q.name,
                    q.paused,
                    q.max_running,
                    q.rate_per_s.map(|r| r.to_string()),
                )
            })
            .collect(),
        schedules: schedules
            .into_iter()
            .map(|s| (s.name, s.cron, s.every_ms, s.task))
            .collect(),
    }
}

/// Guards G7 on the API: random and mutated task specs, batches, queue limits and
/// schedules, arbitrary JSON and non-JSON bodies, random query strings on `GET /v1/tasks`
/// and random paths never get a 5xx (or a hang, or a panic); every 4xx is a JSON
/// `{"error": "..."}` with a message; a refused request, and any GET, changes nothing.
#[test]
fn fuzzed_api_requests_never_fail_the_server_and_refusals_change_nothing() {
    on_big_stack(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
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

// ----- drone message fuzz ------------------------------------------------------------------

/// Ids and fences of tasks that exist, so fuzzed messages hit real records as well as
/// unknown ones.
#[derive(Debug, Clone)]
struct Known {
    ids: Vec<TaskId>,
}

fn fence() -> impl Strategy<Value = Fence> {
    prop_oneof![
        2 => (0u64..4).prop_map(Fence),
        1 => Just(Fence(u64::MAX)),
        1 => any::<u64>().prop_map(Fence),
    ]
}

fn task_id(known: &Known) -> impl Strategy<Value = TaskId> {
    prop_oneof![
        1 => any::<u128>().prop_map(|n| TaskId(uuid::Uuid::from_u128(n))),
        2 => prop::sample::select(known.ids.clone()),
    ]
}

fn held(known: &Known) -> impl Strategy<Value = Held> {
    (task_id(known), fence()).prop_map(|(task_id, fence)| Held { task_id, fence })
}

/// Valid drone messages of every variant with random ids (known and unknown), random
/// fences (current and stale), huge strings and arbitrary JSON.
fn drone_message(known: &Known) -> impl Strategy<Value = DroneMessage> {
    let hello = (
        any::<u32>(),
        any::<u128>(),
        text(),
        prop::collection::vec(text(), 0..3),
        any::<u32>(),
        prop::collection::vec(prop_oneof![Just("echo".to_string()), text()], 0..3),
        prop::collection::vec(held(known), 0..3),
    )
        .prop_map(|(v, id, name, labels, slots, kinds, held)| {
            DroneMessage::Hello(Hello {
                protocol_version: v % 3,
                drone_id: DroneId(uuid::Uuid::from_u128(id)),
                name,
                labels,
                slots,
                kinds,
                token: None,
                held,
                draining: false,
            })
        });
    let checkpoint =
        (task_id(known), fence(), json_value()).prop_map(|(task_id, fence, data)| Checkpoint {
            task_id,
            fence,
            data,
        });
    let heartbeat = (
        prop::collection::vec(held(known), 0..6),
        any::<u64>(),
        prop::collection::vec(checkpoint, 0..3),
    )
        .prop_map(|(held, assigns_seen, checkpoints)| {
            DroneMessage::Heartbeat(Heartbeat {
                held,
                assigns_seen,
                checkpoints,
            })
        });
    let complete = (task_id(known), fence(), json_value()).prop_map(|(task_id, fence, result)| {
        DroneMessage::TaskComplete(TaskComplete {
            task_id,
            fence,
            result,
        })
    });
    let failed = (
        task_id(known),
        fence(),
        text(),
        prop::option::of(json_value()),
        any::<bool>(),
    )
        .prop_map(|(task_id, fence, error, result, retryable)| {
            DroneMessage::TaskFailed(TaskFailed {
                task_id,
                fence,
                error,
                result,
                retryable,
            })
        });
    prop_oneof![
        1 => hello,
        3 => heartbeat,
        3 => complete,
        3 => failed,
        1 => Just(DroneMessage::Drain),
    ]
}

/// JSON objects shaped like messages: a known (or unknown) `type` and protocol field names
/// with values of any type.
fn message_shaped_json(known: &Known) -> impl Strategy<Value = Value> {
    const TYPES: &[&str] = &[
        "hello",
        "heartbeat",
        "task_complete",
        "task_failed",
        "drain",
        "welcome",
        "ack",
        "launch_missiles",
    ];
    const FIELDS: &[&str] = &[
        "drone_id",
        "slots",
        "kinds",
        "held",
        "assigns_seen",
        "checkpoints",
        "task_id",
        "fence",
        "result",
        "error",
        "retryable",
    ];
    let ids: Vec<Value> = known
        .ids
        .iter()
        .map(|i| Value::from(i.to_string()))
        .collect();
    let field_value = prop_oneof![json_value(), prop::sample::select(ids)];
    (
        prop::sample::select(TYPES),
        prop::collection::vec((prop::sample::select(FIELDS), field_value), 0..6),
    )
        .prop_map(|(ty, fields)| {
            let mut m = Map::new();
            m.insert("type".into(), Value::from(ty));
            for (k, v) in fields {
                m.insert(k.to_string(), v);
            }
            Value::Object(m)
        })
}

/// A frame body the fuzz drone sends: a valid message, one with bytes mutated, JSON shaped
/// like a message, or random bytes.
fn frame_body(known: &Known) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => drone_message(known).prop_map(|m| frame::encode(&m).expect("encode").to_vec()),
        3 => (drone_message(known), prop::collection::vec(mutation(), 1..4)).prop_map(|(m, mu)| {
            mutate(frame::encode(&m).expect("encode").to_vec(), &mu)
        }),
        2 => message_shaped_json(known).prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// The tasks that differ between two listings, before and after, for a failure message.
fn task_diff(before: &[TaskView], after: &[TaskView]) -> String {
    let mut out = String::new();
    for b in before {
        match after.iter().find(|a| a.id == b.id) {
            Some(a) if a == b => {}
            Some(a) => out.push_str(&format!("  was {b:?}\n  now {a:?}\n")),
            None => out.push_str(&format!("  gone {b:?}\n")),
        }
    }
    for a in after
        .iter()
        .filter(|a| !before.iter().any(|b| b.id == a.id))
    {
        out.push_str(&format!("  new {a:?}\n"));
    }
    out
}

/// A drone the test plays in-process: what the core sends it arrives on `rx`.
struct InProcessDrone {
    conn: u64,
    rx: mpsc::UnboundedReceiver<QueenMessage>,
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1 << 40);

impl InProcessDrone {
    async fn hello(core: &CoreHandle, h: Hello) -> InProcessDrone {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let conn = CONN_IDS.fetch_add(1, Ordering::Relaxed);
        core.send(Request::Hello {
            hello: Box::new(h),
            conn: Conn {
                id: conn,
                tx,
                close: CancellationToken::new(),
            },
        })
        .await
        .expect("the core takes the hello");
        match tokio::time::timeout(PATIENCE, rx.recv()).await {
            Ok(Some(QueenMessage::Welcome(_))) => {}
            other => panic!("expected a welcome, got {other:?}"),
        }
        InProcessDrone { conn, rx }
    }

    async fn send(&self, core: &CoreHandle, msg: DroneMessage) {
        core.send(Request::Message {
            conn: self.conn,
            msg,
        })
        .await
        .expect("the core takes the message");
    }

    async fn next(&mut self) -> QueenMessage {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("the queen said nothing in time")
            .expect("the queen closed the channel")
    }
}

/// Tasks in every state, some of them leased to a victim drone the test plays: what the
/// fuzz drone must not be able to touch.
async fn victim_world(hive: &Hive) -> (InProcessDrone, Known) {
    let mut victim = {
        let mut h = hello(DroneId::generate(), 5, vec![]);
        h.kinds = vec!["echo".into()];
        InProcessDrone::hello(&hive.core, h).await
    };
    for i in 0..5 {
        hive.submit(json!({"kind": "echo", "payload": i})).await;
    }
    let mut assigns = Vec::new();
    while assigns.len() < 5 {
        if let QueenMessage::Assign(a) = victim.next().await {
            assigns.push(a);
        }
    }
    // One succeeds and one fails for good; three stay running on the victim.
    victim
        .send(
            &hive.core,
            DroneMessage::TaskComplete(TaskComplete {
                task_id: assigns[0].task_id,
                fence: assigns[0].fence,
                result: json!("done"),
            }),
        )
        .await;
    victim
        .send(
            &hive.core,
            DroneMessage::TaskFailed(TaskFailed {
                task_id: assigns[1].task_id,
                fence: assigns[1].fence,
                error: "no".into(),
                result: None,
                retryable: false,
            }),
        )
        .await;
    let mut acked = 0;
    while acked < 2 {
        if let QueenMessage::Ack(a) = victim.next().await {
            assert_eq!(a.status, AckStatus::Recorded);
            acked += 1;
        }
    }
    let nobody = hive.submit(json!({"kind": "nobody-runs-this"})).await;
    let later = hive
        .submit(json!({"kind": "echo", "delay_ms": 3_600_000}))
        .await;
    let blocked = hive
        .submit(json!({"kind": "echo", "depends_on": [nobody.id]}))
        .await;
    let cancelled = hive.submit(json!({"kind": "nobody-runs-this"})).await;
    let (status, body) = hive
        .json(
            "POST",
            &format!("/v1/tasks/{}/cancel", cancelled.id),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut ids: Vec<TaskId> = assigns.iter().map(|a| a.task_id).collect();
    ids.extend([nobody.id, later.id, blocked.id, cancelled.id]);
    (victim, Known { ids })
}

/// Guards G7 on the drone port, in-process: after a valid hello, random and mutated frame
/// bodies, message-shaped JSON and valid messages naming real and unknown tasks with
/// current, stale and absurd fences go through `frame::decode` and the core. Nothing
/// panics or hangs, the victim drone hears nothing, and no task the fuzz drone does not
/// hold changes in any way.
#[test]
fn fuzzed_drone_messages_change_no_task_the_drone_does_not_hold() {
    on_big_stack(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
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
            let a = d.assign().await;
            assert_eq!(a.task_id, t.id);
            d.send(DroneMessage::TaskComplete(TaskComplete {
                task_id: a.task_id,
                fence: a.fence,
                result: json!("ok"),
            }))
            .await;
            let status = d
                .expect("an ack", |m| match m {
                    QueenMessage::Ack(a) => Some(a.status),
                    _ => None,
                })
                .await;
            assert_eq!(status, AckStatus::Recorded);
            drop(victim);
            hive.stop().await;
        });
    });
}

/// How one fuzz frame sent over TCP was answered.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Handled: the marker sent after it was acked.
    Handled,
    /// Refused with an `error` naming something, then the connection closed.
    ErrorAndClosed,
}

/// Sends `bytes`, then, when they should be handled, a marker (an outcome for an unknown
/// task, always acked `stale`), and reads until the marker's ack or the close.
async fn send_and_sync(
    io: &mut tokio_util::codec::Framed<
        tokio::net::TcpStream,
        tokio_util::codec::LengthDelimitedCodec,
    >,
    bytes: &[u8],
    expect: &Outcome,
) -> Result<Outcome, String> {
    let marker = TaskId::generate();
    io.get_mut()
        .write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The marker goes only after a frame that should be handled: sent after a refused one
    // it would sit unread, and a socket closed with unread data is reset, which may cost
    // the `error` frame still in flight.
    if *expect == Outcome::Handled {
        let m = frame::encode(&DroneMessage::TaskComplete(TaskComplete {
            task_id: marker,
            fence: Fence(1),
            result: Value::Null,
        }))
        .expect("encode");
        io.send(m).await.map_err(|e| format!("write: {e}"))?;
    }
    let mut error = None;
    loop {
        let next = tokio::time::timeout(PATIENCE, io.next())
            .await
            .map_err(|_| "the queen neither answered nor closed in time".to_string())?;
        match next {
            None | Some(Err(_)) => {
                return match error {
                    Some(_) => Ok(Outcome::ErrorAndClosed),
                    None => Err("closed without an error message".into()),
                }
            }
            Some(Ok(f)) => match frame::decode::<QueenMessage>(&f) {
                Ok(QueenMessage::Ack(a)) if a.task_id == marker => {
                    if let Some(e) = error {
                        return Err(format!("acked after the error {e:?}"));
                    }
                    return Ok(Outcome::Handled);
                }
                Ok(QueenMessage::Error { message }) => {
                    if message.trim().is_empty() {
                        return Err("empty error message".into());
                    }
                    error = Some(message);
                }
                Ok(_) => {}
                Err(e) => return Err(format!("the queen sent an undecodable frame: {e}")),
            },
        }
    }
}

/// Guards G7 over real sockets: after a valid hello, fuzzed frames (a tenth of
/// `HIVE_FUZZ_CASES`, over as many connections as refusals close) are either handled — the
/// next message is answered — or refused with one `error` and a close, exactly as
/// `frame::decode` predicts; frames with a length over `max_frame_len` are refused from
/// the prefix. No task the fuzz drone does not hold changes, and the queen keeps serving.
#[test]
fn fuzzed_frames_over_tcp_are_handled_or_refused_with_an_error_and_a_close() {
    on_big_stack(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = fuzz_config(dir.path());
        let max_frame = cfg.queen.max_frame_len;
        let hive = rt.block_on(Hive::start(cfg));
        let (_victim, known) = rt.block_on(victim_world(&hive));
        let baseline = rt.block_on(hive.tasks());
        let fuzz_id = DroneId::generate();
        let connect = || async {
            let mut io = FakeDrone::raw(hive.drones).await;
            let mut h = hello(fuzz_id, 4, vec![]);
            h.kinds = vec!["fuzz-runs-nothing".into()];
            io.send(frame::encode(&DroneMessage::Hello(h)).expect("encode"))
                .await
                .expect("send hello");
            loop {
                let f = tokio::time::timeout(PATIENCE, io.next())
                    .await
                    .expect("welcome in time")
                    .expect("welcome")
                    .expect("frame");
                if let Ok(QueenMessage::Welcome(_)) = frame::decode::<QueenMessage>(&f) {
                    return io;
                }
            }
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
            let a = d.assign().await;
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
    let lease = a.assign().await;
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
        let status = b
            .expect("an ack", |m| match m {
                QueenMessage::Ack(a) => Some(a.status),
                _ => None,
            })
            .await;
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

/// Guards the API's error contract (SPEC §5: errors are `{"error": "..."}`) where the
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
