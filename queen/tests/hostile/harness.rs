//! The fuzzers' world: an in-process queen whose core and router the test reaches, a
//! drone played straight into the core, a world of tasks in every state for the fuzz drone
//! not to touch, and the runner settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use axum::Router;
use hive_testkit::Incoming;
use proptest::test_runner::Config as ProptestConfig;
use queen::config::Config;
use queen::core::{Conn, CoreHandle, Request};
use queen::{Listeners, Queen};
use serde_json::{json, Value};
use shared::api::{QueueView, ScheduleView, Stats, TaskPage, TaskView};
use shared::protocol::{AckStatus, DroneMessage, Hello, QueenMessage, TaskComplete, TaskFailed};
use shared::{DroneId, Fence, TaskId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::common::{fast_config, hello, FakeDrone, PATIENCE};
use crate::generators::Known;

/// Cases per fuzz target unless `HIVE_FUZZ_CASES` says otherwise.
pub const DEFAULT_CASES: u32 = 10_000;

pub fn fuzz_cases() -> u32 {
    std::env::var("HIVE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Runs a fuzz target on a thread with a large stack: proptest's nested strategies recurse
/// deeply when generating and shrinking, more than a test thread's default 2 MiB allows in
/// a debug build.
pub fn on_big_stack(f: impl FnOnce() + Send + 'static) {
    let worker = std::thread::Builder::new()
        .name("fuzz".into())
        .stack_size(256 << 20)
        .spawn(f)
        .expect("spawn the fuzz thread");
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

/// The runtime a fuzz target drives the queen with, from its big-stack thread: two
/// workers, as the async tests get.
pub fn fuzz_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `shrink: false` for targets checked against a baseline taken once: after a failure the
/// world has changed, so re-running smaller inputs against it would blame the wrong one;
/// the input reported is then the one that first broke the property.
pub fn proptest_config(cases: u32, shrink: bool) -> ProptestConfig {
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
pub struct Hive {
    pub drones: SocketAddr,
    pub core: CoreHandle,
    pub app: Router,
    pub shutdown: CancellationToken,
    pub join: Option<tokio::task::JoinHandle<Result<(), queen::QueenError>>>,
}

impl Hive {
    pub async fn start(cfg: Config) -> Hive {
        let open_cfg = cfg.clone();
        let queen = tokio::task::spawn_blocking(move || Queen::open(open_cfg))
            .await
            .expect("join")
            .expect("queen opens");
        let core = queen.handle();
        let app = queen::http::router(queen::http::AppState::new(queen::http::Shared {
            core: core.clone(),
            reader: queen.reader(),
            cfg: Arc::new(cfg),
            metrics: queen::metrics::Metrics::new(),
        }));
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
    pub async fn call(&self, method: &str, uri: &str, body: Vec<u8>) -> Reply {
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

    pub async fn json(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        let r = self.call(method, uri, body.to_string().into_bytes()).await;
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    pub async fn submit(&self, spec: Value) -> TaskView {
        let (status, body) = self.json("POST", "/v1/tasks", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        serde_json::from_value(body).expect("task view")
    }

    /// Every task the API lists, oldest first.
    pub async fn tasks(&self) -> Vec<TaskView> {
        let r = self.call("GET", "/v1/tasks?limit=1000", vec![]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let mut page: TaskPage = serde_json::from_slice(&r.body).expect("task page");
        page.tasks.reverse();
        page.tasks
    }

    pub async fn stats(&self) -> Stats {
        self.core
            .ask(|reply| Request::Stats { reply })
            .await
            .expect("the core answers")
    }

    pub async fn stop(mut self) {
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
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The API's contract for errors: a JSON `{"error": "..."}` with a message.
    pub fn error_message(&self) -> Result<String, String> {
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

pub fn fuzz_config(dir: &std::path::Path) -> Config {
    let mut cfg = fast_config(dir);
    // The fuzzed drones and the victim never heartbeat on their own: nothing may expire
    // during a run, so any change is the fuzz input's doing.
    cfg.leases.heartbeat_interval_ms = 1_000;
    cfg.leases.heartbeat_timeout_ms = 600_000;
    cfg.leases.reconnect_grace_ms = 600_000;
    cfg
}

// ----- HTTP API fuzz ---------------------------------------------------------------------------

/// What a rejected request must leave alone: the tasks of each queue (counted over all
/// states, since delayed tasks move from scheduled to pending on their own), the queues'
/// settings and the schedules.
#[derive(Debug, PartialEq)]
pub struct ApiSnapshot {
    pub tasks_by_queue: BTreeMap<String, u64>,
    pub queues: Vec<(String, bool, Option<u32>, Option<String>)>,
    pub schedules: Vec<(String, Option<String>, Option<u64>, Value)>,
}

pub async fn api_snapshot(core: &CoreHandle) -> ApiSnapshot {
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

/// The tasks that differ between two listings, before and after, for a failure message.
pub fn task_diff(before: &[TaskView], after: &[TaskView]) -> String {
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
pub struct InProcessDrone {
    pub conn: u64,
    pub rx: mpsc::UnboundedReceiver<QueenMessage>,
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1 << 40);

impl InProcessDrone {
    pub async fn hello(core: &CoreHandle, h: Hello) -> InProcessDrone {
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

    pub async fn send(&self, core: &CoreHandle, msg: DroneMessage) {
        core.send(Request::Message {
            conn: self.conn,
            msg,
        })
        .await
        .expect("the core takes the message");
    }

    pub async fn next(&mut self) -> QueenMessage {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("the queen said nothing in time")
            .expect("the queen closed the channel")
    }
}

/// Tasks in every state, some of them leased to a victim drone the test plays: what the
/// fuzz drone must not be able to touch.
pub async fn victim_world(hive: &Hive) -> (InProcessDrone, Known) {
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

/// How one fuzz frame sent over TCP was answered.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Handled: the marker sent after it was acked.
    Handled,
    /// Refused with an `error` naming something, then the connection closed.
    ErrorAndClosed,
}

/// Sends `bytes`, then, when they should be handled, a marker (an outcome for an unknown
/// task, always acked `stale`), and reads until the marker's ack or the close.
pub async fn send_and_sync(
    io: &mut FakeDrone,
    bytes: &[u8],
    expect: &Outcome,
) -> Result<Outcome, String> {
    let marker = TaskId::generate();
    io.send_bytes(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The marker goes only after a frame that should be handled: sent after a refused one
    // it would sit unread, and a socket closed with unread data is reset, which may cost
    // the `error` frame still in flight.
    if *expect == Outcome::Handled {
        io.try_send(&DroneMessage::TaskComplete(TaskComplete {
            task_id: marker,
            fence: Fence(1),
            result: Value::Null,
        }))
        .await
        .map_err(|e| format!("write: {e}"))?;
    }
    let mut error = None;
    loop {
        let next = io
            .next_within(PATIENCE)
            .await
            .ok_or_else(|| "the queen neither answered nor closed in time".to_string())?;
        match next {
            Incoming::Closed(_) => {
                return match error {
                    Some(_) => Ok(Outcome::ErrorAndClosed),
                    None => Err("closed without an error message".into()),
                }
            }
            Incoming::Msg(QueenMessage::Ack(a)) if a.task_id == marker => {
                if let Some(e) = error {
                    return Err(format!("acked after the error {e:?}"));
                }
                return Ok(Outcome::Handled);
            }
            Incoming::Msg(QueenMessage::Error { message }) => {
                if message.trim().is_empty() {
                    return Err("empty error message".into());
                }
                error = Some(message);
            }
            Incoming::Msg(_) => {}
            Incoming::Unknown { error, .. } => {
                return Err(format!("the queen sent an undecodable frame: {error}"))
            }
        }
    }
}
