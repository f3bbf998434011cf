//! The HTTP/JSON API (`/v1/...`), health, metrics and the dashboard. Handlers validate
//! input, ask the core, and map its answers to status codes; errors are always
//! `{"error": "..."}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use shared::api::{
    BatchRequest, BatchResponse, DronesResponse, ErrorBody, QueueLimits, QueueView, QueuesResponse,
    ScheduleRequest, ScheduleView, SchedulesResponse, TaskPage, TaskSpec, TaskState, TaskView,
};
use shared::TaskId;

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

#[derive(Debug, Clone)]
pub struct AppState {
    pub core: CoreHandle,
    pub reader: StoreReader,
    pub cfg: Arc<Config>,
    pub metrics: crate::metrics::Metrics,
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

/// Readiness: 200 once startup recovery is over, 503 while the active tasks are still
/// being read (the API already answers then, but requests that need every task wait).
/// `/healthz` is liveness: 200 as soon as the queen listens.
async fn readyz(State(state): State<AppState>) -> Response {
    let disk = state.core.disk();
    if state.core.is_recovered() && disk.degraded() {
        // Still 200: reads, outcomes and the dashboard are served; only new work waits.
        Json(serde_json::json!({
            "status": "degraded",
            "reason": format!(
                "the data dir's filesystem has {} MiB free, below [storage] min_free_mb = {}: new work is refused (507)",
                disk.free_bytes() / (1024 * 1024),
                state.cfg.storage.min_free_mb
            ),
        }))
        .into_response()
    } else if state.core.is_recovered() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering: reading the active tasks from the database".into(),
        )
        .into_response()
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.cfg.tasks.max_body_bytes;
    let api = Router::new()
        .route("/v1/tasks", post(submit_one).get(list_tasks))
        .route("/v1/tasks/batch", post(submit_batch))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/retry", post(retry_task))
        .route("/v1/queues", get(queues))
        .route("/v1/queues/{name}", post(set_queue_limits))
        .route("/v1/queues/{name}/pause", post(pause_queue))
        .route("/v1/queues/{name}/resume", post(resume_queue))
        .route("/v1/schedules", post(put_schedule).get(schedules))
        .route("/v1/schedules/{name}", delete(delete_schedule))
        .route("/v1/drones", get(drones))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        // Outermost first: the token is checked before a body is read.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/", get(|| async { Html(DASHBOARD) }))
        .merge(api)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// What a standby queen (HA on PostgreSQL) serves: liveness, a 503 readiness, and a 503
/// naming the leader's HTTP address (when `leader` knows it) for everything else, so a
/// client or load balancer moves on. Nothing is read from the database here: a standby
/// has no state it could present as current.
pub fn standby_router(leader: Arc<dyn Fn() -> Option<String> + Send + Sync>) -> Router {
    let unavailable = move |what: &'static str| {
        let leader = leader();
        let mut body = serde_json::json!({
            "error": match &leader {
                Some(addr) => format!("this queen is a standby; {what} the leader at {addr}"),
                None => format!("this queen is a standby and no queen leads right now; {what} a leader once one is elected"),
            },
            "status": "standby",
        });
        if let Some(addr) = leader {
            body["leader"] = serde_json::Value::String(addr);
        }
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    let ready = unavailable.clone();
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok", "role": "standby"})) }),
        )
        .route("/readyz", get(move || async move { ready("ask") }))
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
    let body = serde_json::json!({ "error": message }).to_string();
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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

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

async fn retry_task(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        st.core.ask(|reply| Request::Retry { id, reply }).await??,
    ))
}

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

async fn pause_queue(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    change_queue(&st, name, QueueChange::Pause).await
}

async fn resume_queue(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    change_queue(&st, name, QueueChange::Resume).await
}

async fn set_queue_limits(
    State(st): State<AppState>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<QueueView>, ApiError> {
    let limits: QueueLimits = serde_json::from_slice(&body(raw)?)
        .map_err(|e| ApiError::bad(format!("invalid queue limits: {e}")))?;
    change_queue(&st, name, QueueChange::Limits(limits)).await
}

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

async fn schedules(State(st): State<AppState>) -> Result<Json<SchedulesResponse>, ApiError> {
    let schedules = st.core.ask(|reply| Request::Schedules { reply }).await?;
    Ok(Json(SchedulesResponse { schedules }))
}

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

async fn drones(State(st): State<AppState>) -> Result<Json<DronesResponse>, ApiError> {
    let drones = st.core.ask(|reply| Request::Drones { reply }).await?;
    Ok(Json(DronesResponse { drones }))
}

async fn stats(State(st): State<AppState>) -> Result<Json<shared::api::Stats>, ApiError> {
    Ok(Json(st.core.ask(|reply| Request::Stats { reply }).await?))
}

async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let stats = st.core.ask(|reply| Request::Stats { reply }).await?;
    let drones = st.core.ask(|reply| Request::Drones { reply }).await?;
    let text = st.metrics.render(&stats, &drones);
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}

/// The dashboard: one self-contained page (no build step, no external assets) that polls
/// the API.
const DASHBOARD: &str = include_str!("dashboard.html");
