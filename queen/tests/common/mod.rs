//! In-process queen and a fake drone that speaks the protocol, for integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use queen::config::Config;
use queen::{Listeners, Queen};
use shared::api::TaskView;
use shared::frame;
use shared::protocol::{DroneMessage, Held, Hello, QueenMessage, PROTOCOL_VERSION};
use shared::{DroneId, TaskId};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen in milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Fast retries and a heartbeat timeout long enough that a fake drone, which heartbeats
/// only when a test says so, is not expired by a slow machine mid-test. Expiry tests
/// shorten it themselves.
pub fn fast_config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.queen.data_dir = dir.to_path_buf();
    cfg.queen.listen = "127.0.0.1:0".into();
    cfg.queen.http = "127.0.0.1:0".into();
    cfg.leases.heartbeat_interval_ms = 500;
    cfg.leases.heartbeat_timeout_ms = 5_000;
    cfg.leases.reconnect_grace_ms = 200;
    cfg.tasks.retry_base_ms = 20;
    cfg.tasks.retry_max_ms = 100;
    cfg.storage.cache_capacity_mb = 8;
    // A tiny in-memory budget, so most waiting tasks in every test are demoted to the
    // store and read back: the scheduling tests cover both paths.
    cfg.storage.hot_tasks = 2;
    cfg
}

pub struct TestQueen {
    pub drones: SocketAddr,
    pub http: SocketAddr,
    shutdown: CancellationToken,
    join: Option<tokio::task::JoinHandle<Result<(), queen::QueenError>>>,
}

impl TestQueen {
    pub async fn start(cfg: Config) -> TestQueen {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let queen = tokio::task::spawn_blocking(move || Queen::open(cfg))
            .await
            .expect("join")
            .expect("queen opens");
        let drones_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (drones, http) = (
            drones_l.local_addr().expect("addr"),
            http_l.local_addr().expect("addr"),
        );
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(queen.serve(
            Listeners {
                drones: drones_l,
                http: http_l,
            },
            shutdown.clone(),
        ));
        TestQueen {
            drones,
            http,
            shutdown,
            join: Some(join),
        }
    }

    /// Graceful stop; waits until the database is closed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(j) = self.join.take() {
            j.await.expect("join").expect("clean stop");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// An HTTP call on a blocking thread: (status, JSON body).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.call_with(method, path, body, None).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let url = self.url(path);
        let method = method.to_string();
        let token = token.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let mut req = ureq::request(&method, &url);
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let res = match body {
                Some(b) => req.send_json(b),
                None => req.call(),
            };
            let resp = match res {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("transport error: {e}"),
            };
            let status = resp.status();
            let text = resp.into_string().expect("body");
            (
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            )
        })
        .await
        .expect("join")
    }

    pub async fn submit(&self, spec: serde_json::Value) -> TaskView {
        let (status, body) = self.call("POST", "/v1/tasks", Some(spec)).await;
        assert_eq!(status, 201, "submit failed: {body}");
        serde_json::from_value(body).expect("task view")
    }

    pub async fn task(&self, id: TaskId) -> TaskView {
        let (status, body) = self.call("GET", &format!("/v1/tasks/{id}"), None).await;
        assert_eq!(status, 200, "get failed: {body}");
        serde_json::from_value(body).expect("task view")
    }

    /// Polls a task until `pred` holds.
    pub async fn wait_task(
        &self,
        id: TaskId,
        what: &str,
        pred: impl Fn(&TaskView) -> bool,
    ) -> TaskView {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let t = self.task(id).await;
            if pred(&t) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; task is {t:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestQueen {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A drone played by the test, one frame at a time.
pub struct FakeDrone {
    pub id: DroneId,
    io: Framed<TcpStream, LengthDelimitedCodec>,
    pub assigns_seen: u64,
}

pub fn hello(id: DroneId, slots: u32, held: Vec<Held>) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        drone_id: id,
        name: format!("fake-{}", &id.to_string()[..8]),
        labels: vec![],
        slots,
        kinds: vec!["echo".into(), "exec".into()],
        token: None,
        held,
        draining: false,
    }
}

impl FakeDrone {
    pub async fn raw(addr: SocketAddr) -> Framed<TcpStream, LengthDelimitedCodec> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Framed::new(stream, frame::codec(frame::DEFAULT_MAX_FRAME_LEN))
    }

    /// Connects and says hello; panics unless welcomed.
    pub async fn connect(addr: SocketAddr, hello: Hello) -> FakeDrone {
        let id = hello.drone_id;
        let mut io = Self::raw(addr).await;
        io.send(frame::encode(&DroneMessage::Hello(hello)).expect("encode"))
            .await
            .expect("send");
        let mut d = FakeDrone {
            id,
            io,
            assigns_seen: 0,
        };
        match d.recv().await {
            Some(QueenMessage::Welcome(_)) => d,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: DroneMessage) {
        self.io
            .send(frame::encode(&msg).expect("encode"))
            .await
            .expect("send");
    }

    /// The next message, or None when the queen closed the connection.
    pub async fn recv(&mut self) -> Option<QueenMessage> {
        let next = tokio::time::timeout(PATIENCE, self.io.next())
            .await
            .expect("queen said nothing in time");
        let msg = match next {
            None | Some(Err(_)) => return None,
            Some(Ok(bytes)) => {
                frame::decode::<QueenMessage>(&bytes).expect("queen sends valid messages")
            }
        };
        if matches!(msg, QueenMessage::Assign(_)) {
            self.assigns_seen += 1;
        }
        Some(msg)
    }

    /// Waits for the next message of interest, skipping the others.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(QueenMessage) -> Option<T>,
    ) -> T {
        loop {
            match self.recv().await {
                None => panic!("connection closed while waiting for {what}"),
                Some(m) => {
                    if let Some(t) = pick(m) {
                        return t;
                    }
                }
            }
        }
    }

    /// The next ack: (task, fence, status).
    pub async fn ack(&mut self) -> (TaskId, shared::Fence, shared::protocol::AckStatus) {
        self.expect("an ack", |m| match m {
            QueenMessage::Ack(a) => Some((a.task_id, a.fence, a.status)),
            _ => None,
        })
        .await
    }

    pub async fn assign(&mut self) -> shared::protocol::Assign {
        self.expect("an assign", |m| match m {
            QueenMessage::Assign(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// Waits for an assign while heartbeating (holding nothing) every `every`: for waits as
    /// long as the heartbeat timeout (an orphan's expiry after a restart), so the queen
    /// does not expire this silent drone first.
    pub async fn assign_heartbeating(&mut self, every: Duration) -> shared::protocol::Assign {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            self.heartbeat(vec![]).await;
            match tokio::time::timeout(every, self.recv()).await {
                Ok(Some(QueenMessage::Assign(a))) => return a,
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("connection closed while waiting for an assign"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no assign within {PATIENCE:?}"
            );
        }
    }

    pub async fn heartbeat(&mut self, held: Vec<Held>) {
        self.heartbeat_with(held, vec![]).await;
    }

    pub async fn heartbeat_with(
        &mut self,
        held: Vec<Held>,
        checkpoints: Vec<shared::protocol::Checkpoint>,
    ) {
        let assigns_seen = self.assigns_seen;
        self.send(DroneMessage::Heartbeat(shared::protocol::Heartbeat {
            held,
            assigns_seen,
            checkpoints,
        }))
        .await;
    }

    /// True when the queen closes the connection (after any messages still queued).
    pub async fn closed(&mut self) -> bool {
        loop {
            match self.recv().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }
}
