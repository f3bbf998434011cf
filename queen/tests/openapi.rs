//! The OpenAPI document (`GET /v1/openapi.json`, checked in as docs/openapi.json) against
//! the server: the checked-in copy is the one served; every documented operation is routed
//! and every route (`queen::http::routes`) documented; the token is required exactly where
//! the document says; documented query parameters are accepted; and real answers, success
//! and error, match the documented schemas (a small structural checker below: `$ref`,
//! `oneOf`/`anyOf`, types, formats, enums, ranges, required and undeclared properties).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request as HttpRequest;
use common::{fast_config, hello, FakeDrone, TestQueen};
use serde_json::{json, Value};
use shared::api::{TaskState, TaskView};
use shared::{DroneId, TaskId};
use tower::ServiceExt;

const REGENERATE: &str =
    "regenerate it with `cargo run -p queen -- openapi > docs/openapi.json` and review the diff";

const METHODS: [&str; 5] = ["GET", "POST", "DELETE", "PUT", "PATCH"];

fn checked_in_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

fn generated() -> String {
    queen::http::openapi_json_text().expect("the document renders")
}

fn document() -> Value {
    serde_json::from_str(&generated()).expect("the document is JSON")
}

/// One HTTP answer: status, media type (without parameters) and body text.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    media_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// A request to a real queen over HTTP.
async fn call(
    q: &TestQueen,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Answer {
    let (status, content_type, text) = q.request(method, path, body, token).await;
    Answer {
        status,
        media_type: media_type(&content_type),
        text,
    }
}

/// A request to a standby queen's router, in process.
async fn standby_call(method: &str, path: &str) -> Answer {
    let app = queen::http::standby_router(Arc::new(|| Some("queen-2.internal:8081".into())));
    let req = HttpRequest::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let res = app.oneshot(req).await.unwrap_or_else(|e| match e {});
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("body");
    Answer {
        status,
        media_type: media_type(&content_type),
        text: String::from_utf8(bytes.to_vec()).expect("utf-8"),
    }
}

/// Every documented operation: (method, path template, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let method = method.to_ascii_uppercase();
            if METHODS.contains(&method.as_str()) || method == "HEAD" || method == "OPTIONS" {
                out.push((method, path.clone(), op.clone()));
            }
        }
    }
    out
}

fn operation(doc: &Value, method: &str, template: &str) -> Value {
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {template} is not documented");
    op.clone()
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("not a local $ref: {reference}"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("$ref {reference} points at nothing"))
}

/// A path template with its parameters filled in.
fn fill(template: &str) -> String {
    template
        .replace("{id}", &TaskId::generate().to_string())
        .replace("{name}", "openapi-probe")
}

/// Checks `value` against `schema`. `strict`: an object property the schema does not
/// declare is an error (the server sends a field the document does not know).
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, strict: bool) -> Vec<String> {
    let mut errors = Vec::new();
    check(doc, schema, value, at, strict, &mut errors);
    errors
}

fn check(doc: &Value, schema: &Value, v: &Value, at: &str, strict: bool, errs: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return check(doc, resolve(doc, r), v, at, strict, errs);
    }
    if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = alternatives
            .iter()
            .filter(|s| validate(doc, s, v, at, strict).is_empty())
            .count();
        if matching != 1 {
            errs.push(format!("{at}: matches {matching} of oneOf, not 1: {v}"));
        }
    }
    if let Some(alternatives) = schema.get("anyOf").and_then(Value::as_array) {
        if !alternatives
            .iter()
            .any(|s| validate(doc, s, v, at, strict).is_empty())
        {
            errs.push(format!("{at}: matches none of anyOf: {v}"));
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, s, v, at, strict, errs);
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            errs.push(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() {
        let is = |t: &str| match t {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            other => panic!("{at}: unknown schema type {other}"),
        };
        if !types.iter().any(|t| is(t)) {
            errs.push(format!("{at}: {v} is not of type {types:?}"));
            return;
        }
    }
    if let (Some(format), Some(s)) = (schema.get("format").and_then(Value::as_str), v.as_str()) {
        let ok = match format {
            "uuid" => s.parse::<uuid::Uuid>().is_ok(),
            "date-time" => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
            _ => true,
        };
        if !ok {
            errs.push(format!("{at}: `{s}` is not a {format}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if schema
            .get("minimum")
            .and_then(Value::as_f64)
            .is_some_and(|min| n < min)
        {
            errs.push(format!("{at}: {n} is below the minimum"));
        }
        if schema
            .get("maximum")
            .and_then(Value::as_f64)
            .is_some_and(|max| n > max)
        {
            errs.push(format!("{at}: {n} is above the maximum"));
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, item) in v.as_array().into_iter().flatten().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"), strict, errs);
        }
    }
    if let Some(object) = v.as_object() {
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                errs.push(format!("{at}: required property `{name}` is missing"));
            }
        }
        let declared = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (name, value) in object {
            let at = format!("{at}.{name}");
            match (declared.and_then(|d| d.get(name)), additional) {
                (Some(s), _) => check(doc, s, value, &at, strict, errs),
                (None, Some(Value::Bool(false))) => {
                    errs.push(format!("{at}: not allowed (additionalProperties: false)"))
                }
                (None, Some(s)) if s.is_object() => check(doc, s, value, &at, strict, errs),
                (None, _) if strict && declared.is_some() => errs.push(format!(
                    "{at}: the server sends it, the schema does not declare it"
                )),
                (None, _) => {}
            }
        }
    }
}

/// Holds `answer`, the server's reply to `method template`, to the document: its status is
/// documented for the operation, with its media type, and a JSON body matches the schema
/// (strictly for a 2xx: no undeclared property).
fn conforms(doc: &Value, method: &str, template: &str, answer: &Answer) {
    let op = operation(doc, method, template);
    let status = answer.status.to_string();
    let mut response = op["responses"]
        .get(&status)
        .unwrap_or_else(|| {
            panic!(
                "{method} {template} answered {status}, which the document does not list: {}",
                answer.text
            )
        })
        .clone();
    if let Some(r) = response.get("$ref").and_then(Value::as_str) {
        response = resolve(doc, r).clone();
    }
    let content = response["content"].as_object().cloned().unwrap_or_default();
    let schema = content
        .iter()
        .find(|(documented, _)| media_type(documented) == answer.media_type)
        .map(|(_, c)| c["schema"].clone())
        .unwrap_or_else(|| {
            panic!(
                "{method} {template} {status}: answered as {}, documented as {:?}",
                answer.media_type,
                content.keys().collect::<Vec<_>>()
            )
        });
    if answer.media_type == "application/json" {
        let strict = answer.status < 300;
        let errors = validate(doc, &schema, &answer.json(), "body", strict);
        assert!(
            errors.is_empty(),
            "{method} {template} {status} does not match the document:\n{}\nbody: {}",
            errors.join("\n"),
            answer.text
        );
    }
}

/// Holds a body to a named component schema.
fn conforms_to(doc: &Value, component: &str, body: &Value) {
    let schema = json!({ "$ref": format!("#/components/schemas/{component}") });
    let errors = validate(doc, &schema, body, "body", true);
    assert!(
        errors.is_empty(),
        "not a {component}:\n{}\nbody: {body}",
        errors.join("\n")
    );
}

/// Guards the checked-in copy: docs/openapi.json is byte for byte what the queen
/// generates and serves, to anyone (no token), on a standby too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checked_in_document_is_the_one_the_queen_serves() {
    let generated = generated();
    let path = checked_in_path();
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}; {REGENERATE}", path.display()));
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || checked_in.lines().count().min(generated.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "docs/openapi.json differs from the document the queen serves, first at line {line} \
             (checked in: {:?}, served: {:?}); {REGENERATE}",
            checked_in.lines().nth(line - 1).unwrap_or("<end>"),
            generated.lines().nth(line - 1).unwrap_or("<end>"),
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.client_token = Some(shared::ids::Secret("s3cret".into()));
    let q = TestQueen::start(cfg).await;
    let served = call(&q, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(
        served.status, 200,
        "served without a token: {}",
        served.text
    );
    assert_eq!(served.media_type, "application/json");
    assert!(
        served.text == generated,
        "the queen serves another document"
    );
    let doc = document();
    conforms(&doc, "GET", "/v1/openapi.json", &served);
    q.stop().await;

    let standby = standby_call("GET", "/v1/openapi.json").await;
    assert_eq!(standby.status, 200, "{}", standby.text);
    assert!(
        standby.text == generated,
        "a standby serves another document"
    );
}

/// Guards the document against the router, both ways: the operations documented are the
/// routes the router is built from, each of them is answered (not the 404 of an unknown
/// path, not a 405), and the methods a path does not document are refused with 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_every_route_documented() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let routed: BTreeSet<(String, String)> = queen::http::routes()
        .into_iter()
        .map(|r| (r.verb.as_str().to_string(), r.path.to_string()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes without a documented operation: {undocumented:?}. Annotate the handler with \
         #[utoipa::path] and list it in ApiDoc's paths (queen/src/http.rs); then {REGENERATE}"
    );
    assert!(
        unrouted.is_empty(),
        "documented operations that no route serves: {unrouted:?}. Add the route to \
         route_table, or the handler's #[utoipa::path] has another method or path than its \
         route (queen/src/http.rs); then {REGENERATE}"
    );

    for (method, path, op) in operations(&doc) {
        // Path parameters are exactly the template's.
        let in_template: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        let in_doc: BTreeSet<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect();
        assert_eq!(in_template, in_doc, "{method} {path}: path parameters");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    for (method, path) in &documented {
        let answer = call(&q, method, &fill(path), None, None).await;
        let unknown_path = answer.status == 404
            && answer.media_type == "application/json"
            && answer.json()["error"] == "no such endpoint";
        assert!(
            answer.status != 405 && !unknown_path,
            "{method} {path} is documented, but the server does not route it: {} {}",
            answer.status,
            answer.text
        );
    }
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        for method in METHODS {
            if documented.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let answer = call(&q, method, &fill(path), None, None).await;
            assert_eq!(
                answer.status, 405,
                "{method} {path} is not documented, but the server answers it: {}",
                answer.text
            );
        }
    }
    q.stop().await;
}

/// Guards the security requirements: with a client token set, exactly the operations the
/// document marks `bearer` answer 401 without it (with the documented error body), and
/// none does with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_required_exactly_where_documented() {
    let doc = document();
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.auth.client_token = Some(shared::ids::Secret("s3cret".into()));
    let q = TestQueen::start(cfg).await;
    for (method, path, op) in operations(&doc) {
        let secured = op["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        let without = call(&q, &method, &fill(&path), None, None).await;
        if secured {
            assert_eq!(
                without.status, 401,
                "{method} {path} is documented as needing the token, but answers without it: {}",
                without.text
            );
            conforms(&doc, &method, &path, &without);
        } else {
            assert_ne!(
                without.status, 401,
                "{method} {path} is documented as open, but wants a token"
            );
        }
        let with = call(&q, &method, &fill(&path), None, Some("s3cret")).await;
        assert_ne!(with.status, 401, "{method} {path} refuses the token");
    }
    q.stop().await;
}

/// A value the server must accept for a documented query parameter.
fn example(doc: &Value, schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return example(doc, resolve(doc, r));
    }
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first
            .as_str()
            .map_or_else(|| first.to_string(), str::to_string);
    }
    if schema["format"] == "uuid" {
        return TaskId::generate().to_string();
    }
    let types = schema["type"].to_string();
    if types.contains("integer") || types.contains("number") {
        return schema["minimum"].as_u64().unwrap_or(0).to_string();
    }
    "default".into()
}

/// Guards the query parameters: each one documented is accepted with a value its schema
/// allows, and (on the operations that take any) one not documented is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_query_parameters_are_accepted_and_no_others() {
    let doc = document();
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let mut checked = 0;
    for (method, path, op) in operations(&doc) {
        let query: Vec<&Value> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .collect();
        if query.is_empty() {
            continue;
        }
        for p in &query {
            let name = p["name"].as_str().expect("name");
            let value = example(&doc, &p["schema"]);
            let target = format!("{}?{name}={value}", fill(&path));
            let answer = call(&q, &method, &target, None, None).await;
            assert!(
                answer.status != 400,
                "{method} {target}: the documented parameter is refused: {}",
                answer.text
            );
            conforms(&doc, &method, &path, &answer);
            checked += 1;
        }
        let target = format!("{}?openapi_probe=1", fill(&path));
        let answer = call(&q, &method, &target, None, None).await;
        assert_eq!(
            answer.status, 400,
            "{method} {target}: a parameter the document does not list is accepted"
        );
        conforms(&doc, &method, &path, &answer);
    }
    assert!(checked >= 5, "only {checked} query parameters documented");
    q.stop().await;
}

async fn task_now(q: &TestQueen, id: TaskId) -> (Answer, TaskView) {
    let answer = call(q, "GET", &format!("/v1/tasks/{id}"), None, None).await;
    let view = serde_json::from_str(&answer.text).expect("a task record");
    (answer, view)
}

/// Guards the schemas against real answers: a task through its life (created, found by
/// its idempotency key, leased, failed, succeeded with a result, cancelled, retried),
/// listings, queues, schedules, drones, stats, health and the errors, each held to the
/// schema the document gives for that operation and status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_documented_schemas() {
    let doc = document();
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let post = |path: &'static str, body: Value| {
        let q = &q;
        async move { call(q, "POST", path, Some(body), None).await }
    };

    // A task a drone runs: leased, failed once, then succeeded with a result.
    let labelled = shared::protocol::Hello {
        labels: vec!["a".into(), "b".into()],
        ..hello(DroneId::generate(), 1, vec![])
    };
    let mut drone = FakeDrone::connect(q.drones, labelled).await;
    let created = post(
        "/v1/tasks",
        json!({"kind": "echo", "payload": {"n": 1}, "labels": ["b", "a"], "priority": 3,
               "timeout_ms": 60000, "retry": {"initial_ms": 10, "max_ms": 20},
               "idempotency_key": "openapi-1"}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    conforms(&doc, "POST", "/v1/tasks", &created);
    let id: TaskId = serde_json::from_value(created.json()["id"].clone()).expect("id");
    let again = post(
        "/v1/tasks",
        json!({"kind": "echo", "idempotency_key": "openapi-1"}),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text);
    conforms(&doc, "POST", "/v1/tasks", &again);

    let first = drone.expect_assign().await;
    assert_eq!(first.task_id, id);
    let (running, view) = task_now(&q, id).await;
    assert!(view.lease.is_some(), "{view:?}");
    conforms(&doc, "GET", "/v1/tasks/{id}", &running);
    let drones = call(&q, "GET", "/v1/drones", None, None).await;
    assert_eq!(drones.json()["drones"].as_array().map(Vec::len), Some(1));
    conforms(&doc, "GET", "/v1/drones", &drones);

    drone.fail(id, first.fence, "boom").await;
    let second = drone.expect_assign().await;
    drone.complete(id, second.fence, json!({"sum": 3})).await;
    q.wait_task(id, "the task to succeed", |t| {
        t.state == TaskState::Succeeded
    })
    .await;
    let (done, view) = task_now(&q, id).await;
    assert!(view.result.is_some() && !view.errors.is_empty(), "{view:?}");
    conforms(&doc, "GET", "/v1/tasks/{id}", &done);
    let waited = call(&q, "GET", &format!("/v1/tasks/{id}?wait_ms=10"), None, None).await;
    conforms(&doc, "GET", "/v1/tasks/{id}", &waited);

    // Cancel, cancel again, retry: a task that depends on another, in a batch.
    let batch = post(
        "/v1/tasks/batch",
        json!({"tasks": [{"kind": "echo", "ref": "a", "run_at": "2999-01-01T00:00:00Z"},
                         {"kind": "echo", "depends_on": ["a"]}]}),
    )
    .await;
    assert_eq!(batch.status, 201, "{}", batch.text);
    conforms(&doc, "POST", "/v1/tasks/batch", &batch);
    let blocked = batch.json()["tasks"][1]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let cancel = format!("/v1/tasks/{blocked}/cancel");
    let cancelled = call(&q, "POST", &cancel, Some(json!({"reason": "probe"})), None).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    conforms(&doc, "POST", "/v1/tasks/{id}/cancel", &cancelled);
    let conflict = call(&q, "POST", &cancel, None, None).await;
    assert_eq!(conflict.status, 409, "{}", conflict.text);
    conforms(&doc, "POST", "/v1/tasks/{id}/cancel", &conflict);
    let retried = call(
        &q,
        "POST",
        &format!("/v1/tasks/{blocked}/retry"),
        None,
        None,
    )
    .await;
    assert_eq!(retried.status, 200, "{}", retried.text);
    conforms(&doc, "POST", "/v1/tasks/{id}/retry", &retried);
    let not_retryable = call(&q, "POST", &format!("/v1/tasks/{id}/retry"), None, None).await;
    assert_eq!(not_retryable.status, 409, "{}", not_retryable.text);
    conforms(&doc, "POST", "/v1/tasks/{id}/retry", &not_retryable);

    // Listings and reads that fail.
    let page = call(&q, "GET", "/v1/tasks?limit=1", None, None).await;
    assert!(page.json()["next"].is_string(), "{}", page.text);
    conforms(&doc, "GET", "/v1/tasks", &page);
    let all = call(&q, "GET", "/v1/tasks", None, None).await;
    conforms(&doc, "GET", "/v1/tasks", &all);
    let bad_state = call(&q, "GET", "/v1/tasks?state=done", None, None).await;
    assert_eq!(bad_state.status, 400);
    conforms(&doc, "GET", "/v1/tasks", &bad_state);
    let bad_id = call(&q, "GET", "/v1/tasks/not-a-uuid", None, None).await;
    assert_eq!(bad_id.status, 400);
    conforms(&doc, "GET", "/v1/tasks/{id}", &bad_id);
    let unknown = call(&q, "GET", &fill("/v1/tasks/{id}"), None, None).await;
    assert_eq!(unknown.status, 404);
    conforms(&doc, "GET", "/v1/tasks/{id}", &unknown);
    let bad_spec = post("/v1/tasks", json!({"kind": "echo", "priorty": 1})).await;
    assert_eq!(bad_spec.status, 400);
    conforms(&doc, "POST", "/v1/tasks", &bad_spec);
    let bad_batch = post("/v1/tasks/batch", json!({"tasks": []})).await;
    assert_eq!(bad_batch.status, 400);
    conforms(&doc, "POST", "/v1/tasks/batch", &bad_batch);

    // Queues.
    let limits = post("/v1/queues/default", json!({"max_running": 4})).await;
    assert_eq!(limits.status, 200, "{}", limits.text);
    conforms(&doc, "POST", "/v1/queues/{name}", &limits);
    let bad_limits = post("/v1/queues/default", json!({"max_runing": 4})).await;
    assert_eq!(bad_limits.status, 400);
    conforms(&doc, "POST", "/v1/queues/{name}", &bad_limits);
    for (path, template) in [
        ("/v1/queues/default/pause", "/v1/queues/{name}/pause"),
        ("/v1/queues/default/resume", "/v1/queues/{name}/resume"),
        ("/v1/queues/a%20b/pause", "/v1/queues/{name}/pause"),
    ] {
        let answer = call(&q, "POST", path, None, None).await;
        conforms(&doc, "POST", template, &answer);
    }
    let queues = call(&q, "GET", "/v1/queues", None, None).await;
    conforms(&doc, "GET", "/v1/queues", &queues);

    // Schedules.
    let schedule = json!({"name": "nightly", "cron": "0 3 * * *", "task": {"kind": "echo"}});
    let made = post("/v1/schedules", schedule.clone()).await;
    assert_eq!(made.status, 201, "{}", made.text);
    conforms(&doc, "POST", "/v1/schedules", &made);
    let replaced = post("/v1/schedules", schedule).await;
    assert_eq!(replaced.status, 200, "{}", replaced.text);
    conforms(&doc, "POST", "/v1/schedules", &replaced);
    let bad_schedule = post(
        "/v1/schedules",
        json!({"name": "x", "task": {"kind": "echo"}}),
    )
    .await;
    assert_eq!(bad_schedule.status, 400);
    conforms(&doc, "POST", "/v1/schedules", &bad_schedule);
    let listed = call(&q, "GET", "/v1/schedules", None, None).await;
    conforms(&doc, "GET", "/v1/schedules", &listed);
    for status in [200, 404] {
        let deleted = call(&q, "DELETE", "/v1/schedules/nightly", None, None).await;
        assert_eq!(deleted.status, status, "{}", deleted.text);
        conforms(&doc, "DELETE", "/v1/schedules/{name}", &deleted);
    }

    // Counts, metrics, health, the dashboard, an unknown path.
    for (path, media) in [
        ("/v1/stats", "application/json"),
        ("/metrics", "text/plain"),
        ("/healthz", "application/json"),
        ("/readyz", "application/json"),
        ("/", "text/html"),
    ] {
        let answer = call(&q, "GET", path, None, None).await;
        assert_eq!((answer.status, answer.media_type.as_str()), (200, media));
        conforms(&doc, "GET", path, &answer);
    }
    let nowhere = call(&q, "GET", "/v1/nowhere", None, None).await;
    assert_eq!(nowhere.status, 404);
    conforms_to(&doc, "ErrorBody", &nowhere.json());
    q.stop().await;
}

/// Guards what a standby queen answers against the document: its health, its 503s (a
/// `StandbyError`, which is also the documented error body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_answers_as_documented() {
    let doc = document();
    let health = standby_call("GET", "/healthz").await;
    assert_eq!(health.status, 200);
    conforms(&doc, "GET", "/healthz", &health);
    assert_eq!(health.json()["role"], "standby");
    for (method, path, template) in [
        ("GET", "/readyz", "/readyz"),
        ("GET", "/v1/tasks", "/v1/tasks"),
        ("POST", "/v1/tasks", "/v1/tasks"),
        ("GET", "/v1/stats", "/v1/stats"),
        ("GET", "/", "/"),
    ] {
        let answer = standby_call(method, path).await;
        assert_eq!(answer.status, 503, "{method} {path}: {}", answer.text);
        conforms(&doc, method, template, &answer);
        conforms_to(&doc, "StandbyError", &answer.json());
    }
}
