//! The queen's task record and how a validated spec becomes one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::api::{
    AttemptError, Dependency, LeaseView, RetrySpec, Suspicion, TaskSpec, TaskState, TaskView,
};
use shared::{DroneId, Fence, TaskId};

use crate::config::TaskSection;

/// Who holds a running task. Durable (so a restarted queen knows whom to expect back),
/// unlike the lease's deadline, which lives in memory and is renewed by heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub drone: DroneId,
    pub drone_name: String,
}

/// A task with everything the queen records about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub queue: String,
    pub kind: String,
    pub payload: Payload,
    pub priority: i32,
    pub labels: Vec<String>,
    pub idempotency_key: Option<String>,
    pub depends_on: Vec<TaskId>,
    /// The task's own retry backoff settings, over the queen's defaults.
    /// Boxed, like the other fields most tasks never set, to keep a pending task small.
    pub retry: Option<Box<RetrySpec>>,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub state: TaskState,
    /// Leases granted so far (lost leases count).
    pub attempts: u32,
    /// Attempts that ended with the lease lost: the drone died, hung or was cut off. Too
    /// many of them make the task a suspect (it may be what kills its drones).
    pub lost: u32,
    /// The evidence of those lost leases, and whether the task is a suspect (its attempts
    /// then run alone on a drone, and an isolated attempt that loses its drone counts
    /// toward quarantine). None for the many tasks that never lost a lease.
    pub suspicion: Option<Box<Suspicion>>,
    /// The current (or last) lease's fence.
    pub fence: Fence,
    pub lease: Option<Box<Lease>>,
    pub result: Option<Box<Value>>,
    pub errors: Vec<AttemptError>,
    /// The last checkpoint reported by a running attempt; survives requeues.
    pub checkpoint: Option<Box<Value>>,
    pub cancel_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Not runnable before this (delay, `run_at` or retry backoff).
    pub run_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A task's payload as the JSON text it arrived in. A parsed `Value` costs hundreds of bytes
/// per task even for `{"n": 1}` (a map node); the text costs its length. It is parsed only
/// where a `Value` is needed (views, assigns) and stored as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// From JSON text (already validated JSON, e.g. `serde_json::to_string` output).
    pub fn from_json(text: String) -> Result<Payload, SpecError> {
        serde_json::value::RawValue::from_string(text)
            .map(Payload)
            .map_err(|e| SpecError(format!("payload: {e}")))
    }

    pub fn from_value(v: &Value) -> Payload {
        let text = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
        Payload::from_json(text).unwrap_or_else(|_| Payload::null())
    }

    pub fn null() -> Payload {
        Payload(serde_json::value::RawValue::from_string("null".into()).expect("`null` is JSON"))
    }

    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.0.get() == other.0.get()
    }
}

/// The queue a spec without one goes to.
pub const DEFAULT_QUEUE: &str = "default";
/// Longest queue name, label or kind: they are keys and log fields, not documents. The
/// same limit as a drone's name, defined once where the drone can see it too.
pub use shared::protocol::MAX_NAME_LEN;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// Most attempts a spec may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000;
/// Longest per-attempt timeout a spec may ask for: 7 days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most labels per task.
pub const MAX_LABELS: usize = 32;

/// Why a spec was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

pub fn check_name(field: &str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SpecError(format!(
            "invalid {field} `{value}`: expected 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ . : /"
        )))
    }
}

impl Task {
    /// Validates a spec and builds the new task it describes. Pure: `now` and `id` are given.
    pub fn from_spec(
        spec: TaskSpec,
        id: TaskId,
        now: DateTime<Utc>,
        limits: &TaskSection,
    ) -> Result<Task, SpecError> {
        check_name("kind", &spec.kind)?;
        let queue = spec.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_string());
        check_name("queue", &queue)?;
        if spec.labels.len() > MAX_LABELS {
            return Err(SpecError(format!(
                "too many labels: {} (at most {MAX_LABELS})",
                spec.labels.len()
            )));
        }
        for label in &spec.labels {
            check_name("label", label)?;
        }
        let mut labels = spec.labels;
        labels.sort();
        labels.dedup();
        let payload_text =
            serde_json::to_string(&spec.payload).map_err(|e| SpecError(format!("payload: {e}")))?;
        let payload_len = payload_text.len();
        if payload_len > limits.max_payload_bytes {
            return Err(SpecError(format!(
                "payload is {payload_len} bytes, more than the limit of {} (tasks.max_payload_bytes)",
                limits.max_payload_bytes
            )));
        }
        if spec.kind == "exec" {
            validate_exec_payload(&spec.payload)?;
        }
        let max_attempts = spec.max_attempts.unwrap_or(limits.max_attempts);
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(SpecError(format!(
                "max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {max_attempts}"
            )));
        }
        if let Some(t) = spec.timeout_ms {
            if t == 0 || t > MAX_TIMEOUT_MS {
                return Err(SpecError(format!(
                    "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {t}"
                )));
            }
        }
        if let Some(key) = &spec.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
                return Err(SpecError(format!(
                    "idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes"
                )));
            }
        }
        if let Some(r) = &spec.retry {
            validate_retry(r)?;
        }
        let run_at = match (spec.run_at, spec.delay_ms) {
            (Some(_), Some(_)) => {
                return Err(SpecError("give run_at or delay_ms, not both".into()));
            }
            (Some(at), None) => Some(at),
            (None, Some(ms)) => {
                let at = i64::try_from(ms)
                    .ok()
                    .and_then(chrono::Duration::try_milliseconds)
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or_else(|| SpecError(format!("delay_ms {ms} is too large")))?;
                Some(at)
            }
            (None, None) => None,
        };
        let run_at = run_at.filter(|at| *at > now);
        let mut depends_on = spec
            .depends_on
            .into_iter()
            .map(|d| match d {
                Dependency::Id(id) => Ok(id),
                Dependency::Ref(r) => Err(SpecError(format!(
                    "depends_on: unknown ref `{r}` (a ref names a task of the same batch)"
                ))),
            })
            .collect::<Result<Vec<TaskId>, SpecError>>()?;
        depends_on.sort();
        depends_on.dedup();
        let state = if !depends_on.is_empty() {
            TaskState::Blocked
        } else if run_at.is_some() {
            TaskState::Scheduled
        } else {
            TaskState::Pending
        };
        Ok(Task {
            id,
            queue,
            kind: spec.kind,
            payload: Payload::from_json(payload_text)?,
            priority: spec.priority.unwrap_or(0),
            labels,
            idempotency_key: spec.idempotency_key,
            depends_on,
            retry: spec.retry.map(Box::new),
            max_attempts,
            timeout_ms: spec.timeout_ms,
            state,
            attempts: 0,
            lost: 0,
            fence: Fence::ZERO,
            lease: None,
            result: None,
            errors: Vec::new(),
            checkpoint: None,
            cancel_reason: None,
            suspicion: None,
            created_at: now,
            run_at,
            started_at: None,
            finished_at: None,
        })
    }

    /// Whether the task's attempts must run alone on a drone.
    pub fn is_suspect(&self) -> bool {
        self.suspicion.as_ref().is_some_and(|s| s.is_suspect())
    }

    pub fn view(&self) -> TaskView {
        TaskView {
            id: self.id,
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            payload: self.payload.to_value(),
            priority: self.priority,
            state: self.state,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            fence: self.fence,
            timeout_ms: self.timeout_ms,
            labels: self.labels.clone(),
            idempotency_key: self.idempotency_key.clone(),
            depends_on: self.depends_on.clone(),
            retry: self.retry.as_deref().cloned(),
            lease: self.lease.as_ref().map(|l| LeaseView {
                drone: l.drone,
                drone_name: l.drone_name.clone(),
            }),
            result: self.result.as_deref().cloned(),
            errors: self.errors.clone(),
            progress: self
                .checkpoint
                .as_ref()
                .and_then(|c| c.get("progress"))
                .and_then(Value::as_f64),
            checkpoint: self.checkpoint.as_deref().cloned(),
            cancel_reason: self.cancel_reason.clone(),
            suspicion: self.suspicion.as_deref().cloned(),
            created_at: self.created_at,
            run_at: self.run_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        }
    }
}

/// Longest retry delay a spec may ask for: 7 days.
pub const MAX_RETRY_DELAY_MS: u64 = 7 * 24 * 3600 * 1000;

fn validate_retry(r: &RetrySpec) -> Result<(), SpecError> {
    let bad = |m: String| Err(SpecError(m));
    if r.initial_ms
        .is_some_and(|v| v == 0 || v > MAX_RETRY_DELAY_MS)
    {
        return bad(format!(
            "retry.initial_ms must be between 1 and {MAX_RETRY_DELAY_MS}"
        ));
    }
    if r.max_ms.is_some_and(|v| v == 0 || v > MAX_RETRY_DELAY_MS) {
        return bad(format!(
            "retry.max_ms must be between 1 and {MAX_RETRY_DELAY_MS}"
        ));
    }
    if let (Some(i), Some(m)) = (r.initial_ms, r.max_ms) {
        if m < i {
            return bad("retry.max_ms must be at least retry.initial_ms".into());
        }
    }
    if r.factor.is_some_and(|f| !(1.0..=10.0).contains(&f)) {
        return bad("retry.factor must be between 1 and 10".into());
    }
    if r.jitter.is_some_and(|j| !(0.0..=1.0).contains(&j)) {
        return bad("retry.jitter must be between 0 and 1".into());
    }
    Ok(())
}

/// The `exec` kind's payload must name a command; refusing a bad one at submit beats
/// burning attempts on drones.
fn validate_exec_payload(payload: &Value) -> Result<(), SpecError> {
    let obj = payload.as_object().ok_or_else(|| {
        SpecError("exec payload must be an object like {\"cmd\": [\"prog\", \"arg\"]}".into())
    })?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "cmd" | "env" | "cwd" | "permanent_exit_codes" | "input"
        ) {
            return Err(SpecError(format!(
                "unknown field `{key}` in exec payload, expected cmd, env, cwd, permanent_exit_codes or input"
            )));
        }
    }
    let cmd = obj.get("cmd").and_then(Value::as_array).ok_or_else(|| {
        SpecError("exec payload needs `cmd`: a non-empty array of strings".into())
    })?;
    if cmd.is_empty() || !cmd.iter().all(Value::is_string) {
        return Err(SpecError(
            "exec payload `cmd` must be a non-empty array of strings".into(),
        ));
    }
    if let Some(env) = obj.get("env") {
        let ok = env
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string));
        if !ok {
            return Err(SpecError(
                "exec payload `env` must be an object of strings".into(),
            ));
        }
    }
    if let Some(codes) = obj.get("permanent_exit_codes") {
        let ok = codes.as_array().is_some_and(|c| {
            c.iter()
                .all(|v| v.as_i64().is_some_and(|n| (1..=255).contains(&n)))
        });
        if !ok {
            return Err(SpecError(
                "exec payload `permanent_exit_codes` must be a list of exit codes 1-255".into(),
            ));
        }
    }
    if let Some(cwd) = obj.get("cwd") {
        if !cwd.is_string() {
            return Err(SpecError("exec payload `cwd` must be a string".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(kind: &str) -> TaskSpec {
        TaskSpec {
            kind: kind.into(),
            ..TaskSpec::default()
        }
    }

    fn build(s: TaskSpec) -> Result<Task, SpecError> {
        Task::from_spec(s, TaskId::generate(), Utc::now(), &TaskSection::default())
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let t = build(spec("echo")).expect("valid");
        assert_eq!(t.queue, "default");
        assert_eq!(t.state, TaskState::Pending);
        assert_eq!(t.max_attempts, crate::config::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(t.fence, Fence::ZERO);
    }

    #[test]
    fn a_delay_schedules_the_task() {
        let t = build(TaskSpec {
            delay_ms: Some(60_000),
            ..spec("echo")
        })
        .expect("valid");
        assert_eq!(t.state, TaskState::Scheduled);
        assert!(t.run_at.is_some());
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let cases = [
            (
                TaskSpec {
                    retry: Some(RetrySpec {
                        factor: Some(0.5),
                        ..Default::default()
                    }),
                    ..spec("echo")
                },
                "retry.factor",
            ),
            (
                TaskSpec {
                    retry: Some(RetrySpec {
                        initial_ms: Some(10),
                        max_ms: Some(5),
                        ..Default::default()
                    }),
                    ..spec("echo")
                },
                "retry.max_ms",
            ),
            (spec(""), "kind"),
            (
                TaskSpec {
                    queue: Some("a b".into()),
                    ..spec("echo")
                },
                "queue",
            ),
            (
                TaskSpec {
                    max_attempts: Some(0),
                    ..spec("echo")
                },
                "max_attempts",
            ),
            (
                TaskSpec {
                    timeout_ms: Some(0),
                    ..spec("echo")
                },
                "timeout_ms",
            ),
            (
                TaskSpec {
                    delay_ms: Some(1),
                    run_at: Some(Utc::now()),
                    ..spec("echo")
                },
                "run_at",
            ),
            (
                TaskSpec {
                    payload: json!({"cmd": []}),
                    ..spec("exec")
                },
                "cmd",
            ),
            (
                TaskSpec {
                    payload: json!({"cmd": ["ls"], "bogus": 1}),
                    ..spec("exec")
                },
                "bogus",
            ),
            (
                TaskSpec {
                    payload: json!("x".repeat(300_000)),
                    ..spec("echo")
                },
                "payload",
            ),
        ];
        for (s, needle) in cases {
            let err = build(s).expect_err("must be refused").0;
            assert!(err.contains(needle), "`{err}` should name {needle}");
        }
    }
}
