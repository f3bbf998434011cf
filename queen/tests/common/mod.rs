//! An in-process queen for integration tests; the drones are played by the shared fake
//! drone ([`hive_testkit::FakeDrone`]).
#![allow(dead_code)]

use std::net::SocketAddr;

// Not every test file plays a drone.
pub use hive_testkit::wait_until_async;
#[allow(unused_imports)]
pub use hive_testkit::{hello, FakeDrone, PATIENCE};
use queen::config::Config;
use queen::{Listeners, Queen};
use shared::api::TaskView;
use shared::TaskId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
        let (status, _, text) = self.request(method, path, body, token).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// One request as it went: the status, the `Content-Type` and the body's text.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> (u16, String, String) {
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
                Err(e) => panic!("{method} {url}: transport error: {e}"),
            };
            let status = resp.status();
            let content_type = resp.header("Content-Type").unwrap_or_default().to_owned();
            (status, content_type, resp.into_string().expect("body"))
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
        let pred = &pred;
        wait_until_async(PATIENCE, what, || async move {
            let t = self.task(id).await;
            if pred(&t) {
                Ok(t)
            } else {
                Err(format!("task is {t:?}"))
            }
        })
        .await
    }
}

impl Drop for TestQueen {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
