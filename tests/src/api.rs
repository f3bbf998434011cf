//! A small blocking client for the queen's HTTP API, returning the `shared::api` types.
//!
//! `try_*` methods return an [`ApiError`] (an HTTP status with the body, or a transport
//! failure) for tests that expect errors or poll a queen that may be down; the plain
//! methods panic with the error, for the common case where the call must work.
//!
//! Every client (and its clones) remembers each task the queen acknowledged (a 201 to a
//! submit, a 200 to a batch), with the `max_attempts` its spec asked for: that list is what
//! the invariant checker holds the queen to (G1).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shared::api::{
    BatchRequest, BatchResponse, DroneView, DronesResponse, Stats, TaskPage, TaskSpec, TaskState,
    TaskView,
};
use shared::TaskId;

/// Per-request deadline: a healthy queen answers in milliseconds; a hung one must fail the
/// test rather than hang it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest page the API serves.
pub const MAX_PAGE: usize = 1_000;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The queen answered with this status and body.
    Status(u16, String),
    /// No answer (connection refused or reset, timeout) or an unreadable one.
    Transport(String),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status(code, _) => Some(*code),
            ApiError::Transport(_) => None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Status(code, body) => write!(f, "HTTP {code}: {body}"),
            ApiError::Transport(e) => write!(f, "transport error: {e}"),
        }
    }
}

/// A client for one queen's HTTP address. It keeps no idle connections, so a queen that
/// was killed and restarted on the same port is never talked to over a dead socket.
#[derive(Debug, Clone)]
pub struct Api {
    /// Shared by clones: [`Api::retarget`] moves them all (to a new leader, in HA tests).
    base: Arc<Mutex<String>>,
    agent: ureq::Agent,
    /// Every acknowledged task id with its spec's `max_attempts`, shared by all clones.
    acked: Arc<Mutex<BTreeMap<TaskId, Option<u32>>>>,
}

fn convert(r: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response, ApiError> {
    match r {
        Ok(resp) => Ok(resp),
        Err(ureq::Error::Status(code, resp)) => Err(ApiError::Status(
            code,
            resp.into_string()
                .unwrap_or_else(|e| format!("<unreadable body: {e}>")),
        )),
        Err(e) => Err(ApiError::Transport(e.to_string())),
    }
}

fn json<T: DeserializeOwned>(resp: ureq::Response) -> Result<T, ApiError> {
    let text = resp
        .into_string()
        .map_err(|e| ApiError::Transport(format!("reading body: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| ApiError::Transport(format!("unexpected body ({e}): {text}")))
}

impl Api {
    pub fn new(http: SocketAddr) -> Api {
        let agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .max_idle_connections(0)
            .build();
        Api {
            base: Arc::new(Mutex::new(format!("http://{http}"))),
            agent,
            acked: Arc::default(),
        }
    }

    /// Every task the queen acknowledged to this client or its clones, with the
    /// `max_attempts` its spec asked for (`None`: the queen's default).
    pub fn acknowledged(&self) -> BTreeMap<TaskId, Option<u32>> {
        self.acked.lock().expect("acked lock").clone()
    }

    /// Takes `ids` off the acknowledged list, so the invariant checker no longer holds the
    /// queen to them: for a long run whose finished tasks were checked and may now be
    /// purged by retention.
    pub fn forget(&self, ids: impl IntoIterator<Item = TaskId>) {
        let mut acked = self.acked.lock().expect("acked lock");
        for id in ids {
            acked.remove(&id);
        }
    }

    fn remember(&self, views: &[TaskView], specs: &[Option<u32>]) {
        let mut acked = self.acked.lock().expect("acked lock");
        for (v, max_attempts) in views.iter().zip(specs) {
            acked.entry(v.id).or_insert(*max_attempts);
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.lock().expect("api base lock"))
    }

    /// Points this client and all its clones at another queen (the new leader after a
    /// failover); what it remembers as acknowledged stays.
    pub fn retarget(&self, http: SocketAddr) {
        *self.base.lock().expect("api base lock") = format!("http://{http}");
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ApiError> {
        json(convert(self.agent.post(&self.url(path)).send_json(body))?)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        json(convert(self.agent.get(&self.url(path)).call())?)
    }

    /// `POST path` with a raw body; the status and body whatever they are.
    pub fn post_raw(&self, path: &str, body: &str) -> Result<(u16, String), ApiError> {
        let r = self
            .agent
            .post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(body);
        raw(convert(r))
    }

    /// `GET path`; the status and body whatever they are.
    pub fn get_raw(&self, path: &str) -> Result<(u16, String), ApiError> {
        raw(convert(self.agent.get(&self.url(path)).call()))
    }

    pub fn try_submit(&self, spec: &TaskSpec) -> Result<TaskView, ApiError> {
        let view: TaskView = self.post("/v1/tasks", spec)?;
        self.remember(std::slice::from_ref(&view), &[spec.max_attempts]);
        Ok(view)
    }

    pub fn submit(&self, spec: &TaskSpec) -> TaskView {
        self.try_submit(spec)
            .unwrap_or_else(|e| panic!("submit {spec:?} failed: {e}"))
    }

    pub fn try_batch(&self, specs: Vec<TaskSpec>) -> Result<Vec<TaskView>, ApiError> {
        let max_attempts: Vec<Option<u32>> = specs.iter().map(|s| s.max_attempts).collect();
        let resp: BatchResponse = self.post("/v1/tasks/batch", &BatchRequest { tasks: specs })?;
        self.remember(&resp.tasks, &max_attempts);
        Ok(resp.tasks)
    }

    pub fn batch(&self, specs: Vec<TaskSpec>) -> Vec<TaskView> {
        let n = specs.len();
        self.try_batch(specs)
            .unwrap_or_else(|e| panic!("batch submit of {n} tasks failed: {e}"))
    }

    pub fn try_task(&self, id: TaskId) -> Result<TaskView, ApiError> {
        self.get(&format!("/v1/tasks/{id}"))
    }

    pub fn task(&self, id: TaskId) -> TaskView {
        self.try_task(id)
            .unwrap_or_else(|e| panic!("GET task {id} failed: {e}"))
    }

    /// One page of `GET /v1/tasks`, newest first.
    pub fn try_list(
        &self,
        state: Option<TaskState>,
        queue: Option<&str>,
        limit: usize,
        before: Option<TaskId>,
    ) -> Result<TaskPage, ApiError> {
        let mut q = vec![format!("limit={limit}")];
        if let Some(s) = state {
            q.push(format!("state={s}"));
        }
        if let Some(queue) = queue {
            q.push(format!("queue={queue}"));
        }
        if let Some(b) = before {
            q.push(format!("before={b}"));
        }
        self.get(&format!("/v1/tasks?{}", q.join("&")))
    }

    /// Every task matching the filter, following `next` through all pages.
    pub fn list_all(&self, state: Option<TaskState>, queue: Option<&str>) -> Vec<TaskView> {
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let page = self
                .try_list(state, queue, MAX_PAGE, before)
                .unwrap_or_else(|e| panic!("GET /v1/tasks failed: {e}"));
            out.extend(page.tasks);
            match page.next {
                Some(next) => before = Some(next),
                None => return out,
            }
        }
    }

    pub fn try_cancel(&self, id: TaskId) -> Result<TaskView, ApiError> {
        self.post(&format!("/v1/tasks/{id}/cancel"), &serde_json::json!({}))
    }

    pub fn try_stats(&self) -> Result<Stats, ApiError> {
        self.get("/v1/stats")
    }

    pub fn stats(&self) -> Stats {
        self.try_stats()
            .unwrap_or_else(|e| panic!("GET /v1/stats failed: {e}"))
    }

    pub fn try_drones(&self) -> Result<Vec<DroneView>, ApiError> {
        let resp: DronesResponse = self.get("/v1/drones")?;
        Ok(resp.drones)
    }

    pub fn drones(&self) -> Vec<DroneView> {
        self.try_drones()
            .unwrap_or_else(|e| panic!("GET /v1/drones failed: {e}"))
    }

    /// Whether `GET /healthz` answers 200.
    pub fn healthy(&self) -> bool {
        convert(self.agent.get(&self.url("/healthz")).call()).is_ok()
    }
}

/// How many tasks are in `state` according to `stats` (0 when absent).
/// Any answer as (status, body); only transport failures are errors.
fn raw(r: Result<ureq::Response, ApiError>) -> Result<(u16, String), ApiError> {
    match r {
        Ok(resp) => {
            let code = resp.status();
            let body = resp
                .into_string()
                .map_err(|e| ApiError::Transport(e.to_string()))?;
            Ok((code, body))
        }
        Err(ApiError::Status(code, body)) => Ok((code, body)),
        Err(e) => Err(e),
    }
}

pub fn count(stats: &Stats, state: TaskState) -> u64 {
    stats.by_state.get(state.as_str()).copied().unwrap_or(0)
}

/// An `echo` task spec: succeeds at once with `payload` as its result.
pub fn echo(payload: serde_json::Value) -> TaskSpec {
    TaskSpec {
        kind: "echo".into(),
        payload,
        ..TaskSpec::default()
    }
}

/// An `exec` task spec running `cmd`.
pub fn exec(cmd: &[&str]) -> TaskSpec {
    TaskSpec {
        kind: "exec".into(),
        payload: serde_json::json!({ "cmd": cmd }),
        ..TaskSpec::default()
    }
}

/// An `exec` task spec running `sh -c script`.
pub fn sh(script: &str) -> TaskSpec {
    exec(&["sh", "-c", script])
}
