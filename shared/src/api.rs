//! JSON shapes of the HTTP API (`/v1/...`), shared by the queen, the CLI and tests.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::ids::{DroneId, Fence, TaskId};

/// What a client submits. Unknown fields are refused with an error naming them, so a typo
/// (`priorty`) is never silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// What runs it: a kind a connected drone announces in its hello. The shipped drone
    /// runs the built-in `echo` and `exec`; the queen routes any other kind to drones
    /// that announce it.
    pub kind: String,
    /// Any JSON, handed to the task (`null` when left out); at most `[tasks]
    /// max_payload_bytes` serialized. The `exec` kind takes `{"cmd": ["prog", "arg"], "env",
    /// "cwd", "permanent_exit_codes", "input"}` (docs/API.md, "The exec payload").
    #[serde(default)]
    pub payload: Value,
    /// A name; `default` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Higher runs first; equal priorities run oldest first. 0 when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Not before this instant (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "run_at"
    )]
    pub run_at: Option<DateTime<Utc>>,
    /// Not before this many milliseconds from now (exclusive with `run_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// 1-1000, `[tasks] max_attempts` when left out. Lost leases count as attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per attempt, 1-604800000 ms (7 days); the drone kills the attempt past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A drone must have all of these to take the task (at most 32 names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// 1-256 bytes. A second submit with the same key returns the first task (200) for as
    /// long as the first is retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Tasks that must succeed before this one runs: task ids, or (in a batch) the `ref`
    /// of another task of the same batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<Dependency>,
    /// A name for this task within its batch, so other tasks of the batch can depend on it.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// This task's retry backoff; unset fields take the queen's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

/// One entry of `depends_on`: a task id, or the `ref` of a task in the same batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dependency {
    Id(TaskId),
    Ref(String),
}

// By hand: utoipa derives an untagged enum as `oneOf`, which a task id would match twice
// (it is a string too), so a validating client would refuse every id. `anyOf` is right.
impl utoipa::PartialSchema for Dependency {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
        AnyOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name(TaskId::name()))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("the `ref` of another task of the same batch")),
            )
            .description(Some(
                "A task id, or (in a batch) the `ref` of another task of the same batch.",
            ))
            .into()
    }
}

impl ToSchema for Dependency {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        schemas.push((
            TaskId::name().into(),
            <TaskId as utoipa::PartialSchema>::schema(),
        ));
    }
}

/// Retry backoff of one task: `initial_ms * factor^(attempt-1)`, capped at `max_ms`, less up
/// to `jitter` (a fraction, 0-1) at random.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// 1-604800000; `[tasks] retry_base_ms` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_ms: Option<u64>,
    /// 1-10; 2 when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// 1-604800000, at least `initial_ms`; `[tasks] retry_max_ms` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    /// 0-1; 0.5 when left out (between half and all of the delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// Parses `run_at`, naming the field in the error (chrono's own error does not).
fn run_at<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                "run_at must be an RFC 3339 timestamp like 2026-01-01T12:00:00Z, got `{s}` ({e})"
            ))
            })
    })
    .transpose()
}

/// Body of `POST /v1/tasks/batch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to `[tasks] max_batch` specs, stored all or none.
    pub tasks: Vec<TaskSpec>,
}

/// Answer of `POST /v1/tasks/batch`: the records in the order submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub tasks: Vec<TaskView>,
}

/// Where a task is in its life. `succeeded`, `failed` and `cancelled` are terminal.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Runnable now, waiting for a drone with a free slot.
    Pending,
    /// Waiting for `run_at` or a retry backoff.
    Scheduled,
    /// Waiting for its dependencies.
    Blocked,
    /// Leased to a drone.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Scheduled,
        TaskState::Blocked,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Scheduled => "scheduled",
            TaskState::Blocked => "blocked",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown state `{s}`, expected one of pending, scheduled, blocked, running, succeeded, failed, cancelled"
                )
            })
    }
}

/// One attempt's failure, kept for every attempt (G8, docs/GUARANTEES.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptError {
    pub attempt: u32,
    pub fence: Fence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone: Option<DroneId>,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// How the queen judged one lost lease of a task (its drone died, hung or was cut off),
/// by where the attempt ran when the drone was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossVerdict {
    /// The drone was running other tasks too: nothing points at this one.
    Shared,
    /// The drone was running only this task, but not on purpose (the task was not a
    /// suspect yet): it counts toward suspicion, never toward a conviction.
    Alone,
    /// An isolated attempt of a suspect (its drone ran nothing else) lost its drone,
    /// and no other drone was lost around the same time: evidence against the task.
    Isolated,
    /// An isolated attempt lost its drone while other drones were lost around the same
    /// time (a rack, a deploy, an OOM storm), or its drone did not die (it stopped
    /// reporting the task): not held against the task.
    Inconclusive,
    /// An isolated attempt lost its drone and no other drone has been lost around it so
    /// far: the task waits (`scheduled`) until the rest of a mass failure would have
    /// shown, then the verdict becomes `isolated` or `inconclusive`.
    Awaiting,
}

/// One lost lease, as evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LostLease {
    pub attempt: u32,
    pub fence: Fence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone: Option<DroneId>,
    /// Other tasks the drone held when it was lost.
    pub co_tenants: u32,
    pub verdict: LossVerdict,
    pub at: DateTime<Utc>,
}

/// What the queen holds against a task whose leases were lost: every lost lease since the
/// task was submitted (or last retried), and, once it lost `tasks.suspect_after_lost` of
/// them, since when it is a suspect. A suspect's attempts run isolated (alone on a drone);
/// `tasks.max_lost_attempts` isolated losses quarantine it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct Suspicion {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_since: Option<DateTime<Utc>>,
    #[serde(default)]
    #[schema(required)]
    pub losses: Vec<LostLease>,
}

impl Suspicion {
    pub fn is_suspect(&self) -> bool {
        self.suspect_since.is_some()
    }

    /// Whether its last lost lease waits for a verdict (see [`LossVerdict::Awaiting`]).
    pub fn awaiting(&self) -> bool {
        self.losses
            .last()
            .is_some_and(|l| l.verdict == LossVerdict::Awaiting)
    }

    /// Isolated attempts that lost their drone: the evidence that convicts.
    pub fn isolated_losses(&self) -> u32 {
        self.losses
            .iter()
            .filter(|l| l.verdict == LossVerdict::Isolated)
            .count() as u32
    }
}

/// Who holds a running task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseView {
    pub drone: DroneId,
    #[serde(default)]
    #[schema(required)]
    pub drone_name: String,
}

/// A task as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub id: TaskId,
    pub queue: String,
    pub kind: String,
    /// As submitted.
    pub payload: Value,
    pub priority: i32,
    pub state: TaskState,
    /// Leases granted so far (lost leases count).
    pub attempts: u32,
    pub max_attempts: u32,
    /// The current (or last) lease's fence; 0 before the first lease.
    pub fence: Fence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Sorted, without duplicates.
    #[serde(default)]
    #[schema(required)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Refs already resolved to ids.
    #[serde(default)]
    #[schema(required)]
    pub depends_on: Vec<TaskId>,
    /// The task's own `retry`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Who runs it; only while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseView>,
    /// `null` until an attempt reports one. One larger than `[tasks] max_result_bytes` is
    /// kept as `{"truncated": true, "original_bytes": N, "preview": "..."}`.
    #[serde(default)]
    #[schema(required)]
    pub result: Option<Value>,
    /// One entry per failed attempt (a lost lease too), all kept.
    #[serde(default)]
    #[schema(required)]
    pub errors: Vec<AttemptError>,
    /// The last checkpoint the task reported (handed to its next attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Value>,
    /// The `progress` number of the last checkpoint, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Why a task was cancelled, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// Lost leases held as evidence, and whether the task is a suspect (it then runs
    /// alone on a drone). Absent for a task that never lost a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspicion: Option<Suspicion>,
    pub created_at: DateTime<Utc>,
    /// When a scheduled task becomes runnable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Answer of `GET /v1/tasks`: newest first. Pass `next` back as `before` for the next page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<TaskId>,
}

/// A connected (or recently disconnected) drone, for `GET /v1/drones`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DroneView {
    pub id: DroneId,
    pub name: String,
    pub labels: Vec<String>,
    pub kinds: Vec<String>,
    pub slots: u32,
    pub running: Vec<TaskId>,
    pub connected: bool,
    pub draining: bool,
    pub last_seen: DateTime<Utc>,
    /// The drone's worker pools as its last heartbeat reported them (absent when it has
    /// none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<crate::protocol::PoolStatus>,
}

/// Answer of `GET /v1/drones`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DronesResponse {
    pub drones: Vec<DroneView>,
}

/// Answer of `GET /v1/stats`: task counts by state, overall and per queue.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    pub by_state: std::collections::BTreeMap<String, u64>,
    pub by_queue: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    pub drones_connected: u64,
    /// Pending tasks no connected drone can run (kind or labels).
    pub unroutable: u64,
}

/// A queue as `GET /v1/queues` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    /// Runnable tasks waiting for a drone.
    pub pending: u64,
    pub scheduled: u64,
    pub blocked: u64,
    pub running: u64,
    pub paused: bool,
    /// Most tasks of the queue running at once across the hive (none: no limit).
    #[serde(default)]
    #[schema(required)]
    pub max_running: Option<u32>,
    /// Most tasks of the queue started per second (none: no limit).
    #[serde(default)]
    #[schema(required)]
    pub rate_per_s: Option<f64>,
}

/// Answer of `GET /v1/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueuesResponse {
    pub queues: Vec<QueueView>,
}

/// Body of `POST /v1/queues/{name}`: the limits to set. A field left out keeps its value;
/// `null` removes the limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueLimits {
    /// At least 1; `null` removes the limit (pause the queue to stop it).
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_running: Option<Option<u32>>,
    /// Greater than 0; `null` removes the limit.
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_per_s: Option<Option<f64>>,
}

/// Tells "absent" (keep) from `null` (remove) for optional limits.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Body of `POST /v1/schedules`: give `cron` (5 or 6 fields, UTC) or `every_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// 1-128 characters of `A-Z a-z 0-9 - _ . : /`; an existing schedule of that name is
    /// replaced.
    pub name: String,
    /// 5 fields (minute hour day month weekday) or 6 (seconds first), in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// 1000 to 31622400000 (366 days); ticks at `created_at` + k × `every_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// Validated now like a submit; must not set `idempotency_key` (each run gets
    /// `schedule/<name>/<tick in ms>`).
    pub task: TaskSpec,
}

/// A periodic schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// The task spec as stored (the fields given, plus `payload`).
    pub task: Value,
    pub created_at: DateTime<Utc>,
    /// The last tick that ran, if any.
    #[serde(default)]
    #[schema(required)]
    pub last_run_at: Option<DateTime<Utc>>,
    /// `null` if there is none.
    #[serde(default)]
    #[schema(required)]
    pub next_run_at: Option<DateTime<Utc>>,
}

/// Answer of `GET /v1/schedules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchedulesResponse {
    pub schedules: Vec<ScheduleView>,
}

/// Every API error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Names the field, value or limit at fault.
    pub error: String,
}

/// What a queen is, when it is not the one serving: `standby` (HA on PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueenRole {
    Standby,
}

/// `status` of `GET /healthz`: the HTTP server is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
}

/// Answer of `GET /healthz`. Fields in name order: the bytes the server has always sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Only on a standby queen (HA on PostgreSQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<QueenRole>,
    pub status: HealthStatus,
}

/// `status` of `GET /readyz`: `ready`, or `degraded` (free space is below `[storage]
/// min_free_mb`: everything but new work is served, new work gets 507).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyStatus {
    Ready,
    Degraded,
}

/// Answer 200 of `GET /readyz`. Fields in name order: the bytes the server has always sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// Why it is degraded; only when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub status: ReadyStatus,
}

/// What a standby queen (HA on PostgreSQL) answers, with 503, to everything but
/// `/healthz` and `/v1/openapi.json`: an error body that also says where the leader is.
/// Fields in name order: the bytes the server has always sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StandbyError {
    pub error: String,
    /// The leader's HTTP address, when a queen leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    pub status: QueenRole,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_with_an_unknown_field_is_refused_naming_it() {
        let err = serde_json::from_str::<TaskSpec>(r#"{"kind":"echo","priorty":3}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("priorty"), "{err}");
    }

    #[test]
    fn states_parse_and_print_lowercase() {
        for st in TaskState::ALL {
            assert_eq!(st.as_str().parse::<TaskState>(), Ok(st));
            assert_eq!(
                serde_json::to_value(st).ok(),
                Some(Value::from(st.as_str()))
            );
        }
        assert!("done".parse::<TaskState>().is_err());
    }
}
