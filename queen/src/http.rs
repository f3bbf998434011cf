//! The HTTP/JSON API (`/v1/...`), health, metrics and the dashboard. Handlers validate
//! input, ask the core, and map its answers to status codes; errors are always
//! `{"error": "..."}`.
//!
//! The routes are one list ([`routes`]): the router is built from it, and so is which
//! routes need the token. The OpenAPI 3 document (`GET /v1/openapi.json`, checked in as
//! docs/openapi.json) is generated from the handlers' `#[utoipa::path]` attributes and the
//! serde types of `shared::api`; queen/tests/openapi.rs holds it to the list and to what
//! the server answers.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use shared::api::{
    BatchRequest, BatchResponse, DronesResponse, ErrorBody, Health, HealthStatus, QueenRole,
    QueueLimits, QueueView, QueuesResponse, Readiness, ReadyStatus, ScheduleRequest, ScheduleView,
    SchedulesResponse, StandbyError, Stats, TaskPage, TaskSpec, TaskState, TaskView,
};
use shared::TaskId;
use utoipa::OpenApi;

use crate::config::Config;
use crate::core::{CoreError, CoreHandle, ErrorKind, ListFilter, QueueChange, Request};
use crate::store::StoreReader;
use crate::task::Task;

/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page a client may ask for.
pub const MAX_PAGE: usize = 1_000;
/// Most finished records one listing reads, so a rare filter cannot scan all history.
pub const MAX_SCAN: usize = 100_000;

/// What every handler shares. Cloned once per request by axum's `State`, so it is one
/// `Arc`: cloning the fields themselves (the metrics alone hold some thirty `Arc`s) showed
/// up at about 1 % of the queen's CPU under single-task submits.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub core: CoreHandle,
    pub reader: StoreReader,
    pub cfg: Arc<Config>,
    pub metrics: crate::metrics::Metrics,
}

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// An API error: a status and a message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match e.kind() {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        };
        ApiError(status, e.to_string())
    }
}

/// Readiness: startup recovery is over.
///
/// 200 `ready` once the queen has read every active task at startup, or 200 `degraded`
/// while free space is below `[storage] min_free_mb` (everything but new work is served);
/// 503 while the active tasks are still being read (the API already answers then, but
/// requests that need every task wait). `/healthz` is liveness.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready, or degraded (new work is refused with 507)", body = Readiness),
        (status = 503, description = "Still reading the active tasks at startup; or a standby queen, whose body is a `StandbyError`", body = ErrorBody),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let disk = state.core.disk();
    if state.core.is_recovered() && disk.degraded() {
        // Still 200: reads, outcomes and the dashboard are served; only new work waits.
        Json(Readiness {
            status: ReadyStatus::Degraded,
            reason: Some(format!(
                "the data dir's filesystem has {} MiB free, below [storage] min_free_mb = {}: new work is refused (507)",
                disk.free_bytes() / (1024 * 1024),
                state.cfg.storage.min_free_mb
            )),
        })
        .into_response()
    } else if state.core.is_recovered() {
        Json(Readiness {
            status: ReadyStatus::Ready,
            reason: None,
        })
        .into_response()
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering: reading the active tasks from the database".into(),
        )
        .into_response()
    }
}

/// A method the server routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }
}

/// Whether a route needs the client token (when the queen has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// `Authorization: Bearer <token>`, checked before the body is read.
    Token,
    /// No token: health, readiness, the dashboard page and the OpenAPI document.
    Open,
}

/// One route of a serving queen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    pub access: Access,
}

/// Every route a serving queen answers (besides `HEAD` for each `GET`), from the one list
/// the router is built from.
pub fn routes() -> Vec<Route> {
    route_table().into_iter().map(|(route, _)| route).collect()
}

/// The routes and their handlers: the only place a route is added.
fn route_table() -> Vec<(Route, MethodRouter<AppState>)> {
    use Access::{Open, Token};
    use Verb::{Delete, Get, Post};
    fn route<H, T>(
        verb: Verb,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> (Route, MethodRouter<AppState>)
    where
        H: axum::handler::Handler<T, AppState>,
        T: 'static,
    {
        let method_router = match verb {
            Get => get(handler),
            Post => post(handler),
            Delete => delete(handler),
        };
        (Route { verb, path, access }, method_router)
    }
    vec![
        route(Post, "/v1/tasks", Token, submit_one),
        route(Post, "/v1/tasks/batch", Token, submit_batch),
        route(Get, "/v1/tasks", Token, list_tasks),
        route(Get, "/v1/tasks/{id}", Token, get_task),
        route(Post, "/v1/tasks/{id}/cancel", Token, cancel_task),
        route(Post, "/v1/tasks/{id}/retry", Token, retry_task),
        route(Get, "/v1/queues", Token, queues),
        route(Post, "/v1/queues/{name}", Token, set_queue_limits),
        route(Post, "/v1/queues/{name}/pause", Token, pause_queue),
        route(Post, "/v1/queues/{name}/resume", Token, resume_queue),
        route(Post, "/v1/schedules", Token, put_schedule),
        route(Get, "/v1/schedules", Token, schedules),
        route(Delete, "/v1/schedules/{name}", Token, delete_schedule),
        route(Get, "/v1/drones", Token, drones),
        route(Get, "/v1/stats", Token, stats),
        route(Get, "/metrics", Token, metrics),
        route(Get, "/v1/openapi.json", Open, openapi_json),
        route(Get, "/healthz", Open, healthz),
        route(Get, "/readyz", Open, readyz),
        route(Get, "/", Open, dashboard),
    ]
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.cfg.tasks.max_body_bytes;
    let (mut api, mut open) = (Router::new(), Router::new());
    for (route, handler) in route_table() {
        match route.access {
            Access::Token => api = api.route(route.path, handler),
            Access::Open => open = open.route(route.path, handler),
        }
    }
    // Outermost first: the token is checked before a body is read.
    let api = api
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    open.merge(api)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Liveness: the HTTP server is serving.
///
/// Answered without asking the scheduler; for a check that goes through it, use
/// `GET /v1/stats` (which answers 503 once the queen is shutting down). A standby queen
/// answers it too, with `role` `standby`.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The queen's HTTP server is serving", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health {
        role: None,
        status: HealthStatus::Ok,
    })
}

/// The web dashboard.
///
/// One self-contained HTML page (no external assets) that polls the API from the browser
/// with the token typed into the page.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    responses(
        (status = 200, description = "The dashboard page", body = String, content_type = "text/html"),
        (status = 503, description = "A standby queen (HA on PostgreSQL): the leader serves the dashboard", body = StandbyError),
    )
)]
async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// What a standby queen (HA on PostgreSQL) serves: liveness, a 503 readiness, and a 503
/// naming the leader's HTTP address (when `leader` knows it) for everything else, so a
/// client or load balancer moves on. Nothing is read from the database here: a standby
/// has no state it could present as current.
/// The OpenAPI document is served there too: it describes the API whoever leads.
pub fn standby_router(leader: Arc<dyn Fn() -> Option<String> + Send + Sync>) -> Router {
    let unavailable = move |what: &'static str| {
        let leader = leader();
        let body = StandbyError {
            error: match &leader {
                Some(addr) => format!("this queen is a standby; {what} the leader at {addr}"),
                None => format!("this queen is a standby and no queen leads right now; {what} a leader once one is elected"),
            },
            leader,
            status: QueenRole::Standby,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    let ready = unavailable.clone();
    Router::new()
        .route(
            "/healthz",
            get(|| async {
                Json(Health {
                    role: Some(QueenRole::Standby),
                    status: HealthStatus::Ok,
                })
            }),
        )
        .route("/readyz", get(move || async move { ready("ask") }))
        .route("/v1/openapi.json", get(openapi_json))
        .fallback(move || async move { unavailable("send this to") })
}

/// Reads the whole request body within `queen.http_request_timeout_ms` (and the body
/// limit) before the handler runs, so a client trickling its body is answered 408 and
/// changes nothing, instead of holding a handler (and a connection) for ever.
async fn read_body_in_time(
    State(state): State<AppState>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let limit = Duration::from_millis(state.cfg.queen.http_request_timeout_ms);
    let (parts, body) = req.into_parts();
    let max = state.cfg.tasks.max_body_bytes;
    let bytes = match tokio::time::timeout(limit, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_big {
                ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {max} bytes (tasks.max_body_bytes)"),
                )
                .into_response()
            } else {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                )
                .into_response()
            };
        }
        Err(_) => {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} ms (queen.http_request_timeout_ms)",
                    limit.as_millis()
                ),
            )
            .into_response()
        }
    };
    next.run(HttpRequest::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Every error the API sends is `{"error": "..."}`, including those axum answers itself
/// (405, path and query rejections, which come as plain text or empty).
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if !text.is_empty() {
        text
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        format!("method not allowed here (allowed: {allowed})")
    } else {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    };
    let body = serde_json::to_string(&ErrorBody { error: message })
        .unwrap_or_else(|_| r#"{"error":"request failed"}"#.to_string());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn require_token(State(state): State<AppState>, req: HttpRequest, next: Next) -> Response {
    if let Some(token) = state.cfg.auth.client() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| token.matches(g)) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or invalid bearer token".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        ApiError(
            e.status(),
            format!("could not read request body: {}", e.body_text()),
        )
    })
}

fn parse_spec(raw: &[u8]) -> Result<TaskSpec, ApiError> {
    serde_json::from_slice(raw).map_err(|e| ApiError::bad(format!("invalid task spec: {e}")))
}

/// Submit one task.
///
/// The answer comes once the task is durable. A spec whose `idempotency_key` matches a
/// task the queen still has creates nothing: the answer is that task's current record,
/// with 200. `ref` is ignored here (it only means something in a batch).
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    request_body = TaskSpec,
    responses(
        (status = 201, description = "The new task's record", body = TaskView),
        (status = 200, description = "The `idempotency_key` matched a task the queen already has: its current record; nothing was created", body = TaskView),
        (status = 400, description = "Invalid JSON or spec (`invalid task spec: ...`), or an unknown dependency", body = ErrorBody),
        (status = 507, description = "Free space on the data dir's filesystem is below `[storage] min_free_mb`: new work is refused", body = ErrorBody),
    )
)]
async fn submit_one(
    State(st): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = parse_spec(&body(raw)?)?;
    let task = Task::from_spec(spec, TaskId::generate(), Utc::now(), &st.cfg.tasks)
        .map_err(|e| ApiError::bad(format!("invalid task spec: {e}")))?;
    let mut out = st
        .core
        .ask(|reply| Request::Submit {
            tasks: vec![task],
            reply,
        })
        .await??;
    let (view, created) = out
        .pop()
        .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no task recorded".into()))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// Submit many tasks, all or nothing.
///
/// One atomic write: all of the tasks or none. Tasks of the batch may depend on each
/// other through `ref`; cycles are refused. Two specs with one `idempotency_key` are one
/// task (both entries show it).
#[utoipa::path(
    post,
    path = "/v1/tasks/batch",
    tag = "tasks",
    request_body = BatchRequest,
    responses(
        (status = 201, description = "The records, in the order submitted; at least one task was created", body = BatchResponse),
        (status = 200, description = "Every spec matched an existing task by `idempotency_key`; nothing was created", body = BatchResponse),
        (status = 400, description = "A bad envelope (`invalid batch: ...`, `tasks` empty), or a spec error naming its index (`invalid task spec at tasks[1]: ...`, an unknown `ref`, a cycle). Nothing is stored", body = ErrorBody),
        (status = 413, description = "More than `[tasks] max_batch` tasks, or a body larger than `[tasks] max_body_bytes`", body = ErrorBody),
        (status = 507, description = "Free space on the data dir's filesystem is below `[storage] min_free_mb`: new work is refused", body = ErrorBody),
    )
)]
async fn submit_batch(
    State(st): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Parse the envelope first and each spec on its own, so an error names its index. The
    // envelope only slices the body into each spec's text (no `Value` tree per spec, which
    // cost more than the spec itself); each spec is then parsed straight into its struct.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Envelope<'a> {
        #[serde(borrow)]
        tasks: Vec<&'a serde_json::value::RawValue>,
    }
    let bytes = body(raw)?;
    let env: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid batch: {e}")))?;
    let req = BatchRequest {
        tasks: env
            .tasks
            .iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_str::<TaskSpec>(v.get())
                    .map_err(|e| ApiError::bad(format!("invalid task spec at tasks[{i}]: {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    if req.tasks.is_empty() {
        return Err(ApiError::bad("invalid batch: `tasks` is empty"));
    }
    if req.tasks.len() > st.cfg.tasks.max_batch {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "batch of {} tasks exceeds tasks.max_batch ({})",
                req.tasks.len(),
                st.cfg.tasks.max_batch
            ),
        ));
    }
    let plan = crate::batch::plan(req.tasks, Utc::now(), &st.cfg.tasks, TaskId::generate)
        .map_err(ApiError::bad)?;
    let tasks = plan.tasks;
    let planned = st
        .core
        .ask(|reply| Request::Submit { tasks, reply })
        .await??;
    // Back to the client's order.
    let mut out: Vec<Option<(TaskView, bool)>> = vec![None; planned.len()];
    for (slot, item) in plan.original_index.into_iter().zip(planned) {
        if let Some(o) = out.get_mut(slot) {
            *o = Some(item);
        }
    }
    let out: Vec<(TaskView, bool)> = out.into_iter().flatten().collect();
    let any_created = out.iter().any(|(_, c)| *c);
    let status = if any_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(BatchResponse {
            tasks: out.into_iter().map(|(v, _)| v).collect(),
        }),
    )
        .into_response())
}

fn parse_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad(format!("invalid task id `{raw}`: expected a UUID")))
}

/// The longest `GET /v1/tasks/{id}?wait_ms=` may hold a request: long enough that a
/// waiting client asks about twice a minute, short enough for proxies' idle timeouts.
pub const MAX_WAIT_MS: u64 = 60_000;

/// One task.
///
/// Active, or finished and not yet purged. With `wait_ms`, a task not yet in a terminal
/// state holds the request until its end is durable or `wait_ms` has passed, then the
/// task as it is: check `state` and ask again to wait longer.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(
        ("id" = TaskId, Path, description = "The task's id"),
        ("wait_ms" = Option<u64>, Query, minimum = 0, maximum = 60000, description = "Wait up to this many ms (0-60000, default 0) for the task to end"),
    ),
    responses(
        (status = 200, description = "The task's record", body = TaskView),
        (status = 400, description = "Not a UUID; a `wait_ms` out of range, or another query parameter", body = ErrorBody),
        (status = 404, description = "No such task (`no task <id>`), or already purged", body = ErrorBody),
    )
)]
async fn get_task(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<TaskView>, ApiError> {
    let id = parse_id(&id)?;
    let mut wait_ms = 0;
    for (k, v) in &q {
        match k.as_str() {
            "wait_ms" => {
                wait_ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| *ms <= MAX_WAIT_MS)
                    .ok_or_else(|| {
                        ApiError::bad(format!(
                            "wait_ms must be a whole number of milliseconds from 0 to {MAX_WAIT_MS}, got {v:?}"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad(format!(
                    "unknown query parameter `{other}`, expected wait_ms"
                )))
            }
        }
    }
    if wait_ms == 0 {
        return current_view(&st, id).await.map(Json);
    }
    // Listen before looking, so an end between the look and the wait is not missed.
    let mut ends = st.core.watch_ends();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    loop {
        let view = current_view(&st, id).await?;
        if view.state.is_terminal() {
            return Ok(Json(view));
        }
        // Wait for this task's end (or a sign we missed some), then look again.
        loop {
            match tokio::time::timeout_at(deadline, ends.recv()).await {
                Ok(Ok(ended)) if ended == id => break,
                Ok(Ok(_)) => continue,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                // The core stopped, or time is up: the task as it is now.
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) | Err(_) => {
                    return current_view(&st, id).await.map(Json);
                }
            }
        }
    }
}

/// A task as the queen knows it now: from the core, or (finished and out of memory) from
/// the store.
async fn current_view(st: &AppState, id: TaskId) -> Result<TaskView, ApiError> {
    if let Some(view) = st.core.ask(|reply| Request::Get { id, reply }).await? {
        return Ok(view);
    }
    // Not in memory: finished and durable, or unknown. A store read blocks (a disk read,
    // or a round trip to PostgreSQL): off the runtime's workers.
    let reader = st.reader.clone();
    let found = tokio::task::spawn_blocking(move || reader.finished(id))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match found {
        Ok(Some(task)) => Ok(task.view()),
        Ok(None) => Err(ApiError(StatusCode::NOT_FOUND, format!("no task {id}"))),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// List tasks, newest first, paged.
///
/// Finished tasks are read from disk; one request reads at most 100,000 finished records,
/// so a very selective filter over a long history can return a short page early.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(
        ("state" = Option<TaskState>, Query, description = "Only tasks in this state; empty: any"),
        ("queue" = Option<String>, Query, description = "Only tasks of this queue; empty: any"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, 1-1000, default 100"),
        ("before" = Option<TaskId>, Query, description = "Only tasks created before this one: the `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of task records; `next` when the page is full", body = TaskPage),
        (status = 400, description = "A bad value, or an unknown query parameter", body = ErrorBody),
    )
)]
async fn list_tasks(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<TaskPage>, ApiError> {
    let mut filter = ListFilter {
        limit: DEFAULT_PAGE,
        ..Default::default()
    };
    for (k, v) in &q {
        match k.as_str() {
            "state" if !v.is_empty() => {
                filter.state = Some(v.parse::<TaskState>().map_err(ApiError::bad)?)
            }
            "queue" if !v.is_empty() => filter.queue = Some(v.clone()),
            "before" if !v.is_empty() => filter.before = Some(parse_id(v)?),
            "limit" => {
                let n: usize = v.parse().map_err(|_| {
                    ApiError::bad(format!("invalid limit `{v}`: expected 1-{MAX_PAGE}"))
                })?;
                if !(1..=MAX_PAGE).contains(&n) {
                    return Err(ApiError::bad(format!(
                        "invalid limit `{v}`: expected 1-{MAX_PAGE}"
                    )));
                }
                filter.limit = n;
            }
            "state" | "queue" | "before" => {}
            other => {
                return Err(ApiError::bad(format!(
                    "unknown query parameter `{other}`, expected state, queue, before or limit"
                )))
            }
        }
    }
    let limit = filter.limit;
    let f = filter.clone();
    let mut tasks = st
        .core
        .ask(|reply| Request::List { filter: f, reply })
        .await?;
    if filter.state.is_none_or(TaskState::is_terminal) {
        let f = filter.clone();
        let reader = st.reader.clone();
        let stored = tokio::task::spawn_blocking(move || {
            reader.finished_page(f.before, f.limit, MAX_SCAN, |t| f.matches(t))
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let seen: std::collections::HashSet<TaskId> = tasks.iter().map(|t| t.id).collect();
        tasks.extend(
            stored
                .into_iter()
                .filter(|t| !seen.contains(&t.id))
                .map(|t| t.view()),
        );
        tasks.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
        tasks.truncate(limit);
    }
    let next = (tasks.len() == limit)
        .then(|| tasks.last().map(|t| t.id))
        .flatten();
    Ok(Json(TaskPage { tasks, next }))
}

/// Body of `POST /v1/tasks/{id}/cancel`, which may also be empty.
#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    /// Shown as the task's `cancel_reason`; `cancelled through the API` when left out.
    reason: Option<String>,
}

/// Cancel a task.
///
/// Durable before the answer. A running task's drone is then told to stop it; blocked
/// tasks that depend on it are cancelled too.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id")),
    request_body(content = CancelBody, description = "Optional: empty, or a reason"),
    responses(
        (status = 200, description = "The task's record, `state` `cancelled`", body = TaskView),
        (status = 400, description = "A bad id, or a body other than `{\"reason\": string}` (`invalid cancel body: ...`)", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "It has already finished (`task <id> is already <state>`)", body = ErrorBody),
    )
)]
async fn cancel_task(
    State(st): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<TaskView>, ApiError> {
    let id = parse_id(&id)?;
    let raw = body(raw)?;
    let parsed: CancelBody = if raw.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| ApiError::bad(format!("invalid cancel body: {e}")))?
    };
    let reason = parsed
        .reason
        .unwrap_or_else(|| "cancelled through the API".into());
    let view = st
        .core
        .ask(|reply| Request::Cancel { id, reason, reply })
        .await??;
    Ok(Json(view))
}

/// Run a failed or cancelled task again.
///
/// It becomes `pending` (or `blocked` while a dependency has not succeeded) with
/// `attempts` reset to 0; its `errors` history is kept and its fence keeps growing. No
/// body. Dependents cancelled because of it stay cancelled.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/retry",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The task's record, `state` `pending` or `blocked`", body = TaskView),
        (status = 400, description = "A bad id", body = ErrorBody),
        (status = 404, description = "No such task, or already purged", body = ErrorBody),
        (status = 409, description = "It is not failed or cancelled, or a dependency failed, was cancelled or no longer exists", body = ErrorBody),
        (status = 507, description = "Free space on the data dir's filesystem is below `[storage] min_free_mb`: new work is refused", body = ErrorBody),
    )
)]
async fn retry_task(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        st.core.ask(|reply| Request::Retry { id, reply }).await??,
    ))
}

/// Queues with counts and settings.
///
/// Sorted by name: every queue the queen knows of (one with settings, active tasks, or
/// finished tasks on record).
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    responses((status = 200, description = "The queues", body = QueuesResponse))
)]
async fn queues(State(st): State<AppState>) -> Result<Json<QueuesResponse>, ApiError> {
    let queues = st.core.ask(|reply| Request::Queues { reply }).await?;
    Ok(Json(QueuesResponse { queues }))
}

async fn change_queue(
    st: &AppState,
    name: String,
    change: QueueChange,
) -> Result<Json<QueueView>, ApiError> {
    Ok(Json(
        st.core
            .ask(|reply| Request::SetQueue {
                name,
                change,
                reply,
            })
            .await??,
    ))
}

/// Pause a queue.
///
/// Nothing new of it is leased; running tasks finish; submits are still accepted.
#[utoipa::path(
    post,
    path = "/v1/queues/{name}/pause",
    tag = "queues",
    params(("name" = String, Path, description = "A queue name")),
    responses(
        (status = 200, description = "The queue, `paused` `true`", body = QueueView),
        (status = 400, description = "An invalid queue name", body = ErrorBody),
    )
)]
async fn pause_queue(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    change_queue(&st, name, QueueChange::Pause).await
}

/// Resume a queue.
#[utoipa::path(
    post,
    path = "/v1/queues/{name}/resume",
    tag = "queues",
    params(("name" = String, Path, description = "A queue name")),
    responses(
        (status = 200, description = "The queue, `paused` `false`", body = QueueView),
        (status = 400, description = "An invalid queue name", body = ErrorBody),
    )
)]
async fn resume_queue(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    change_queue(&st, name, QueueChange::Resume).await
}

/// Set a queue's limits.
///
/// A field left out keeps its value; `null` removes the limit; `{}` changes nothing.
#[utoipa::path(
    post,
    path = "/v1/queues/{name}",
    tag = "queues",
    params(("name" = String, Path, description = "A queue name")),
    request_body = QueueLimits,
    responses(
        (status = 200, description = "The queue", body = QueueView),
        (status = 400, description = "An invalid queue name, JSON or field (`invalid queue limits: ...`), or a limit out of range", body = ErrorBody),
    )
)]
async fn set_queue_limits(
    State(st): State<AppState>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<QueueView>, ApiError> {
    let limits: QueueLimits = serde_json::from_slice(&body(raw)?)
        .map_err(|e| ApiError::bad(format!("invalid queue limits: {e}")))?;
    change_queue(&st, name, QueueChange::Limits(limits)).await
}

/// Create or replace a periodic schedule.
///
/// Each run is an ordinary task with the idempotency key `schedule/<name>/<tick in ms>`.
/// Replacing a schedule restarts its clock.
#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "The new schedule", body = ScheduleView),
        (status = 200, description = "An existing schedule of that name was replaced", body = ScheduleView),
        (status = 400, description = "`invalid schedule: ...` (JSON, name, not exactly one of `cron` and `every_ms`, the pattern or interval, `task.idempotency_key` set), or `invalid schedule task: ...`", body = ErrorBody),
    )
)]
async fn put_schedule(
    State(st): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ScheduleRequest = serde_json::from_slice(&body(raw)?)
        .map_err(|e| ApiError::bad(format!("invalid schedule: {e}")))?;
    crate::task::check_name("schedule name", &req.name).map_err(|e| ApiError::bad(e.0))?;
    let every = match (&req.cron, req.every_ms) {
        (Some(c), None) => crate::schedule::Every::cron(c),
        (None, Some(ms)) => crate::schedule::Every::interval(ms),
        _ => Err("give exactly one of cron and every_ms".to_string()),
    }
    .map_err(|e| ApiError::bad(format!("invalid schedule: {e}")))?;
    if req.task.idempotency_key.is_some() {
        return Err(ApiError::bad(
            "invalid schedule: task.idempotency_key is set by the schedule for each run",
        ));
    }
    let now = Utc::now();
    // Validate the spec now, so a schedule never fires a task that cannot exist.
    Task::from_spec(req.task.clone(), TaskId::generate(), now, &st.cfg.tasks)
        .map_err(|e| ApiError::bad(format!("invalid schedule task: {e}")))?;
    let task = serde_json::to_value(&req.task)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let schedule = crate::schedule::Schedule {
        name: req.name,
        every,
        task,
        created_at: now,
        last_tick: now,
    };
    let (view, created) = st
        .core
        .ask(|reply| Request::PutSchedule {
            schedule: Box::new(schedule),
            reply,
        })
        .await??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// List schedules, sorted by name.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    responses((status = 200, description = "The schedules", body = SchedulesResponse))
)]
async fn schedules(State(st): State<AppState>) -> Result<Json<SchedulesResponse>, ApiError> {
    let schedules = st.core.ask(|reply| Request::Schedules { reply }).await?;
    Ok(Json(SchedulesResponse { schedules }))
}

/// Delete a schedule.
///
/// Tasks it already submitted are not touched.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, description = "The deleted schedule", body = ScheduleView),
        (status = 404, description = "No such schedule (`no schedule <name>`)", body = ErrorBody),
    )
)]
async fn delete_schedule(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    Ok(Json(
        st.core
            .ask(|reply| Request::DeleteSchedule { name, reply })
            .await??,
    ))
}

/// Connected drones.
///
/// Sorted by name, then id. A drone whose connection closed leaves the list at once.
#[utoipa::path(
    get,
    path = "/v1/drones",
    tag = "drones",
    responses((status = 200, description = "The drones connected now", body = DronesResponse))
)]
async fn drones(State(st): State<AppState>) -> Result<Json<DronesResponse>, ApiError> {
    let drones = st.core.ask(|reply| Request::Drones { reply }).await?;
    Ok(Json(DronesResponse { drones }))
}

/// Task counts by state and queue.
///
/// Active tasks, and finished tasks not yet purged.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "stats",
    responses((status = 200, description = "The counts", body = Stats))
)]
async fn stats(State(st): State<AppState>) -> Result<Json<Stats>, ApiError> {
    Ok(Json(st.core.ask(|reply| Request::Stats { reply }).await?))
}

/// Prometheus metrics.
///
/// The text exposition format; the series are listed in docs/API.md, "Metrics".
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let stats = st.core.ask(|reply| Request::Stats { reply }).await?;
    let drones = st.core.ask(|reply| Request::Drones { reply }).await?;
    let text = st.metrics.render(&stats, &drones);
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}

/// The dashboard: one self-contained page (no build step, no external assets) that polls
/// the API.
const DASHBOARD: &str = include_str!("dashboard.html");

/// This document: the HTTP API as OpenAPI 3.
///
/// Generated from the server's own handlers and types; docs/openapi.json is a copy that a
/// test keeps equal to it. Needs no token, and a standby queen serves it too.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "openapi",
    responses((status = 200, description = "The OpenAPI 3 document", body = Object, content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    match &*OPENAPI_JSON {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text.as_str()).into_response(),
        Err(e) => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the OpenAPI document: {e}"),
        )
        .into_response(),
    }
}

/// Rendered once, on the first request.
static OPENAPI_JSON: LazyLock<Result<String, String>> =
    LazyLock::new(|| openapi_json_text().map_err(|e| e.to_string()));

/// The OpenAPI document as served and checked in: pretty-printed, with a final newline.
/// Its key order is fixed: paths and properties in the order declared, everything else
/// sorted.
pub fn openapi_json_text() -> Result<String, serde_json::Error> {
    openapi().to_pretty_json().map(|text| text + "\n")
}

/// The HTTP API as an OpenAPI 3 document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "The Hive",
        description = "The HTTP API of The Hive's queen, a durable distributed job scheduler: \
submit tasks, follow them, and run the queues, schedules and drones. Every write answers only \
after it is durable. Errors are always `{\"error\": \"...\"}`, naming the field, value or limit \
at fault. The prose reference, with examples and every limit, is docs/API.md.",
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        submit_one,
        submit_batch,
        list_tasks,
        get_task,
        cancel_task,
        retry_task,
        queues,
        set_queue_limits,
        pause_queue,
        resume_queue,
        put_schedule,
        schedules,
        delete_schedule,
        drones,
        stats,
        metrics,
        openapi_json,
        healthz,
        readyz,
        dashboard,
    ),
    components(schemas(StandbyError)),
    modifiers(&Guarded, &OptionalCancelBody),
    tags(
        (name = "tasks", description = "Submit, follow, cancel and retry tasks"),
        (name = "queues", description = "Queue counts, pause and limits"),
        (name = "schedules", description = "Periodic schedules"),
        (name = "drones", description = "The connected drones"),
        (name = "stats", description = "Task counts"),
        (name = "metrics", description = "Prometheus metrics"),
        (name = "health", description = "Liveness and readiness, without a token"),
        (name = "dashboard", description = "The web dashboard page"),
        (name = "openapi", description = "This document"),
    )
)]
struct ApiDoc;

/// `POST /v1/tasks/{id}/cancel` takes an empty body or a `CancelBody`. utoipa marks a body
/// optional only when it is declared as `Option<_>`, whose schema also admits a JSON `null`
/// that the server refuses; so it is declared as `CancelBody` and made optional here.
struct OptionalCancelBody;

impl utoipa::Modify for OptionalCancelBody {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let body = doc
            .paths
            .paths
            .get_mut("/v1/tasks/{id}/cancel")
            .and_then(|item| item.post.as_mut())
            .and_then(|operation| operation.request_body.as_mut());
        if let Some(body) = body {
            body.required = Some(utoipa::openapi::Required::False);
        }
    }
}

/// Adds what every route behind the token shares, taken from [`routes`] (the list the
/// router applies the token check from): the bearer security requirement, and the
/// answers of the layers in front of their handlers.
struct Guarded;

/// The security scheme's name in the document.
const BEARER: &str = "bearer";

impl utoipa::Modify for Guarded {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{
            ComponentsBuilder, ContentBuilder, Ref, RefOr, ResponseBuilder, SecurityRequirement,
        };
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let shared = [
            ("401", "Unauthorized", "The queen has a client token and the request did not present it: `missing or invalid bearer token`. Checked before anything else, even the method"),
            ("408", "RequestTimeout", "The request body did not arrive within `[queen] http_request_timeout_ms` after its headers"),
            ("413", "PayloadTooLarge", "The request body is larger than `[tasks] max_body_bytes`"),
            ("503", "Unavailable", "The queen is shutting down, a write could not be made durable, or this queen is a standby (HA on PostgreSQL), whose body is a `StandbyError` naming the leader"),
        ];
        let components = doc
            .components
            .get_or_insert_with(|| ComponentsBuilder::new().build());
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`[auth] client_token` (or `[auth] token`). Required only when the queen has one",
                    ))
                    .build(),
            ),
        );
        for (_, name, description) in shared {
            components
                .responses
                .insert(name.to_string(), RefOr::T(error(description)));
        }
        for route in routes().into_iter().filter(|r| r.access == Access::Token) {
            let Some(item) = doc.paths.paths.get_mut(route.path) else {
                continue;
            };
            let operation = match route.verb {
                Verb::Get => item.get.as_mut(),
                Verb::Post => item.post.as_mut(),
                Verb::Delete => item.delete.as_mut(),
            };
            let Some(operation) = operation else {
                continue;
            };
            operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            for (status, name, _) in shared {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| {
                        RefOr::Ref(Ref::new(format!("#/components/responses/{name}")))
                    });
            }
        }
    }
}
