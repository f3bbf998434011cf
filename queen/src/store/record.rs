//! On-disk task records. A shipped format is frozen: a change adds `mod v2` with a
//! `migrate(v1)`, bumps [`super::SCHEMA_VERSION`] and adds a note in `migrations-notes/`.
//! Each record is one version byte followed by the version's JSON encoding.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::api::{AttemptError, LossVerdict, LostLease, Suspicion, TaskState};
use shared::{DroneId, Fence, TaskId};

use crate::task::{Lease, Task};

pub mod v1 {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum State {
        Pending,
        Scheduled,
        Blocked,
        Running,
        Succeeded,
        Failed,
        Cancelled,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct AttemptErr {
        pub attempt: u32,
        pub fence: u64,
        pub drone: Option<DroneId>,
        pub error: String,
        pub at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct LeaseRec {
        pub drone: DroneId,
        pub drone_name: String,
    }

    /// A task's own retry backoff settings.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct RetryRec {
        pub initial_ms: Option<u64>,
        pub factor: Option<f64>,
        pub max_ms: Option<u64>,
        pub jitter: Option<f64>,
    }

    /// A periodic schedule (`s/<name>`). `task` is the task spec as submitted (API JSON).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ScheduleRecord {
        pub name: String,
        pub cron: Option<String>,
        pub every_ms: Option<u64>,
        pub task: Value,
        pub created_at: DateTime<Utc>,
        pub last_tick: DateTime<Utc>,
    }

    /// Operator settings of one queue (`q/<name>`).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct QueueRecord {
        pub paused: bool,
        pub max_running: Option<u32>,
        pub rate_per_s: Option<f64>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TaskRecord {
        pub id: TaskId,
        pub queue: String,
        pub kind: String,
        pub payload: crate::task::Payload,
        pub priority: i32,
        pub labels: Vec<String>,
        pub idempotency_key: Option<String>,
        pub depends_on: Vec<TaskId>,
        #[serde(default)]
        pub retry: Option<RetryRec>,
        pub max_attempts: u32,
        pub timeout_ms: Option<u64>,
        pub state: State,
        pub attempts: u32,
        /// Attempts that ended with the lease lost (drone died, hung or was cut off).
        #[serde(default)]
        pub lost: u32,
        pub fence: u64,
        pub lease: Option<LeaseRec>,
        pub result: Option<Value>,
        pub errors: Vec<AttemptErr>,
        #[serde(default)]
        pub checkpoint: Option<Value>,
        pub cancel_reason: Option<String>,
        pub created_at: DateTime<Utc>,
        pub run_at: Option<DateTime<Utc>>,
        pub started_at: Option<DateTime<Utc>>,
        pub finished_at: Option<DateTime<Utc>>,
    }
}

/// Schema 2: the v1 task record with empty, absent and zero fields left out (a pending
/// task's record shrinks from ~400 to ~150 bytes; decoding a million of them at start takes
/// half the time). Reading fills them back with their defaults.
pub mod v2 {
    pub use super::v1::{AttemptErr, LeaseRec, RetryRec, State};
    use super::*;

    fn is_zero(n: &u32) -> bool {
        *n == 0
    }

    fn is_zero64(n: &u64) -> bool {
        *n == 0
    }

    fn is_zero_i32(n: &i32) -> bool {
        *n == 0
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TaskRecord {
        pub id: TaskId,
        pub queue: String,
        pub kind: String,
        pub payload: crate::task::Payload,
        #[serde(default, skip_serializing_if = "is_zero_i32")]
        pub priority: i32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub labels: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub idempotency_key: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub depends_on: Vec<TaskId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retry: Option<RetryRec>,
        pub max_attempts: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeout_ms: Option<u64>,
        pub state: State,
        #[serde(default, skip_serializing_if = "is_zero")]
        pub attempts: u32,
        #[serde(default, skip_serializing_if = "is_zero")]
        pub lost: u32,
        #[serde(default, skip_serializing_if = "is_zero64")]
        pub fence: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub lease: Option<LeaseRec>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub result: Option<Value>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub errors: Vec<AttemptErr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub checkpoint: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cancel_reason: Option<String>,
        pub created_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub run_at: Option<DateTime<Utc>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub started_at: Option<DateTime<Utc>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub finished_at: Option<DateTime<Utc>>,
    }

    /// A v1 record in the v2 shape: the same fields.
    pub fn migrate(r: v1::TaskRecord) -> TaskRecord {
        TaskRecord {
            id: r.id,
            queue: r.queue,
            kind: r.kind,
            payload: r.payload,
            priority: r.priority,
            labels: r.labels,
            idempotency_key: r.idempotency_key,
            depends_on: r.depends_on,
            retry: r.retry,
            max_attempts: r.max_attempts,
            timeout_ms: r.timeout_ms,
            state: r.state,
            attempts: r.attempts,
            lost: r.lost,
            fence: r.fence,
            lease: r.lease,
            result: r.result,
            errors: r.errors,
            checkpoint: r.checkpoint,
            cancel_reason: r.cancel_reason,
            created_at: r.created_at,
            run_at: r.run_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

/// Schema 3: a task record may carry the evidence of its lost leases (`suspicion`). A task
/// without any (nearly all of them) is still written as a v2 record, byte for byte; one
/// with some is written as v3: the v2 record's JSON with one more field, `suspicion`.
pub mod v3 {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum VerdictRec {
        Shared,
        Alone,
        Isolated,
        Inconclusive,
        Awaiting,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct LostLeaseRec {
        pub attempt: u32,
        pub fence: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub drone: Option<DroneId>,
        pub co_tenants: u32,
        pub verdict: VerdictRec,
        pub at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct SuspicionRec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub suspect_since: Option<DateTime<Utc>>,
        #[serde(default)]
        pub losses: Vec<LostLeaseRec>,
    }

    /// The one field v3 adds, read from the same JSON object as the v2 fields (serde
    /// skips the fields it does not name, as the v2 decoder skips this one).
    #[derive(Debug, Deserialize)]
    pub struct Extra {
        pub suspicion: SuspicionRec,
    }

    pub fn to_rec(s: &Suspicion) -> SuspicionRec {
        SuspicionRec {
            suspect_since: s.suspect_since,
            losses: s
                .losses
                .iter()
                .map(|l| LostLeaseRec {
                    attempt: l.attempt,
                    fence: l.fence.0,
                    drone: l.drone,
                    co_tenants: l.co_tenants,
                    verdict: match l.verdict {
                        LossVerdict::Shared => VerdictRec::Shared,
                        LossVerdict::Alone => VerdictRec::Alone,
                        LossVerdict::Isolated => VerdictRec::Isolated,
                        LossVerdict::Inconclusive => VerdictRec::Inconclusive,
                        LossVerdict::Awaiting => VerdictRec::Awaiting,
                    },
                    at: l.at,
                })
                .collect(),
        }
    }

    pub fn from_rec(r: SuspicionRec) -> Suspicion {
        Suspicion {
            suspect_since: r.suspect_since,
            losses: r
                .losses
                .into_iter()
                .map(|l| LostLease {
                    attempt: l.attempt,
                    fence: Fence(l.fence),
                    drone: l.drone,
                    co_tenants: l.co_tenants,
                    verdict: match l.verdict {
                        VerdictRec::Shared => LossVerdict::Shared,
                        VerdictRec::Alone => LossVerdict::Alone,
                        VerdictRec::Isolated => LossVerdict::Isolated,
                        VerdictRec::Inconclusive => LossVerdict::Inconclusive,
                        VerdictRec::Awaiting => LossVerdict::Awaiting,
                    },
                    at: l.at,
                })
                .collect(),
        }
    }
}

/// What [`encode`] writes: a v2 record (and v3's first fields), serialized straight from
/// a borrowed task instead of a copy of its strings, payload, result and checkpoint, with
/// timestamps formatted by [`Ts`]. The same field names, order and omissions as
/// [`v2::TaskRecord`], so the bytes are the same; a test holds them equal.
mod write {
    use super::*;

    fn is_zero(n: &u32) -> bool {
        *n == 0
    }

    fn is_zero64(n: &u64) -> bool {
        *n == 0
    }

    fn is_zero_i32(n: &i32) -> bool {
        *n == 0
    }

    fn is_empty<T>(s: &&[T]) -> bool {
        s.is_empty()
    }

    #[derive(Serialize)]
    pub(super) struct LeaseRef<'a> {
        pub drone: DroneId,
        pub drone_name: &'a str,
    }

    #[derive(Serialize)]
    pub(super) struct TaskRecordRef<'a> {
        pub id: TaskId,
        pub queue: &'a str,
        pub kind: &'a str,
        pub payload: &'a crate::task::Payload,
        #[serde(skip_serializing_if = "is_zero_i32")]
        pub priority: i32,
        #[serde(skip_serializing_if = "is_empty")]
        pub labels: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        pub idempotency_key: Option<&'a str>,
        #[serde(skip_serializing_if = "is_empty")]
        pub depends_on: &'a [TaskId],
        #[serde(skip_serializing_if = "Option::is_none")]
        pub retry: Option<v1::RetryRec>,
        pub max_attempts: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeout_ms: Option<u64>,
        pub state: v1::State,
        #[serde(skip_serializing_if = "is_zero")]
        pub attempts: u32,
        #[serde(skip_serializing_if = "is_zero")]
        pub lost: u32,
        #[serde(skip_serializing_if = "is_zero64")]
        pub fence: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub lease: Option<LeaseRef<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub result: Option<&'a Value>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pub errors: Vec<ErrRef<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub checkpoint: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cancel_reason: Option<&'a str>,
        pub created_at: Ts,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub run_at: Option<Ts>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub started_at: Option<Ts>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub finished_at: Option<Ts>,
    }

    /// [`v1::AttemptErr`], borrowed.
    #[derive(Serialize)]
    pub(super) struct ErrRef<'a> {
        pub attempt: u32,
        pub fence: u64,
        pub drone: Option<DroneId>,
        pub error: &'a str,
        pub at: Ts,
    }
}

/// A timestamp serialized as chrono serializes a `DateTime<Utc>` (RFC 3339, `Z`, the
/// fraction in 0, 3, 6 or 9 digits, whichever holds it exactly), written into a stack
/// buffer instead of through `fmt::Write` a character at a time; outside years 0–9999
/// and for leap seconds it hands over to chrono.
#[derive(Debug, Clone, Copy)]
struct Ts(DateTime<Utc>);

/// A timestamp's text, built in place (at most 30 bytes: `9999-12-31T23:59:59.999999999Z`).
#[derive(Default)]
struct Digits {
    bytes: [u8; 30],
    len: usize,
}

impl Digits {
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// `value` in exactly `count` decimal digits, zero-padded.
    fn put(&mut self, value: u32, count: u32) {
        let mut div = 10u32.pow(count - 1);
        for _ in 0..count {
            self.byte(b'0' + ((value / div) % 10) as u8);
            div /= 10;
        }
    }
}

impl Serialize for Ts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use chrono::{Datelike, Timelike};
        let t = self.0;
        let (year, nanos) = (t.year(), t.nanosecond());
        if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
            return self.0.serialize(serializer);
        }
        let mut out = Digits::default();
        out.put(year as u32, 4);
        let tail: [(u8, u32); 5] = [
            (b'-', t.month()),
            (b'-', t.day()),
            (b'T', t.hour()),
            (b':', t.minute()),
            (b':', t.second()),
        ];
        for (sep, value) in tail {
            out.byte(sep);
            out.put(value, 2);
        }
        if nanos != 0 {
            out.byte(b'.');
            if nanos % 1_000_000 == 0 {
                out.put(nanos / 1_000_000, 3);
            } else if nanos % 1_000 == 0 {
                out.put(nanos / 1_000, 6);
            } else {
                out.put(nanos, 9);
            }
        }
        out.byte(b'Z');
        match std::str::from_utf8(&out.bytes[..out.len]) {
            Ok(text) => serializer.serialize_str(text),
            // Only ASCII digits and separators were written.
            Err(_) => self.0.serialize(serializer),
        }
    }
}

/// The version byte written before every record.
pub const RECORD_V1: u8 = 1;
/// The version byte of task records written since schema 2.
pub const RECORD_V2: u8 = 2;
/// The version byte of task records with lost-lease evidence (schema 3).
pub const RECORD_V3: u8 = 3;

fn state_to_v1(s: TaskState) -> v1::State {
    match s {
        TaskState::Pending => v1::State::Pending,
        TaskState::Scheduled => v1::State::Scheduled,
        TaskState::Blocked => v1::State::Blocked,
        TaskState::Running => v1::State::Running,
        TaskState::Succeeded => v1::State::Succeeded,
        TaskState::Failed => v1::State::Failed,
        TaskState::Cancelled => v1::State::Cancelled,
    }
}

fn state_from_v1(s: v1::State) -> TaskState {
    match s {
        v1::State::Pending => TaskState::Pending,
        v1::State::Scheduled => TaskState::Scheduled,
        v1::State::Blocked => TaskState::Blocked,
        v1::State::Running => TaskState::Running,
        v1::State::Succeeded => TaskState::Succeeded,
        v1::State::Failed => TaskState::Failed,
        v1::State::Cancelled => TaskState::Cancelled,
    }
}

/// A task's own retry settings as records hold them.
fn retry_rec(r: &shared::api::RetrySpec) -> v1::RetryRec {
    v1::RetryRec {
        initial_ms: r.initial_ms,
        factor: r.factor,
        max_ms: r.max_ms,
        jitter: r.jitter,
    }
}

/// Encodes a task as the current record version.
pub fn encode(task: &Task) -> Vec<u8> {
    let rec = write::TaskRecordRef {
        id: task.id,
        queue: &task.queue,
        kind: &task.kind,
        payload: &task.payload,
        priority: task.priority,
        labels: &task.labels,
        idempotency_key: task.idempotency_key.as_deref(),
        depends_on: &task.depends_on,
        retry: task.retry.as_deref().map(retry_rec),
        max_attempts: task.max_attempts,
        timeout_ms: task.timeout_ms,
        state: state_to_v1(task.state),
        attempts: task.attempts,
        lost: task.lost,
        fence: task.fence.0,
        lease: task.lease.as_ref().map(|l| write::LeaseRef {
            drone: l.drone,
            drone_name: &l.drone_name,
        }),
        result: task.result.as_deref(),
        errors: task
            .errors
            .iter()
            .map(|e| write::ErrRef {
                attempt: e.attempt,
                fence: e.fence.0,
                drone: e.drone,
                error: &e.error,
                at: Ts(e.at),
            })
            .collect(),
        checkpoint: task.checkpoint.as_deref(),
        cancel_reason: task.cancel_reason.as_deref(),
        created_at: Ts(task.created_at),
        run_at: task.run_at.map(Ts),
        started_at: task.started_at.map(Ts),
        finished_at: task.finished_at.map(Ts),
    };
    let Some(suspicion) = task.suspicion.as_deref() else {
        return versioned(RECORD_V2, &rec);
    };
    // The v2 object with `suspicion` added before its closing brace.
    let mut out = versioned(RECORD_V3, &rec);
    if out.last() == Some(&b'}') {
        out.pop();
        out.extend_from_slice(b",\"suspicion\":");
        if serde_json::to_writer(&mut out, &v3::to_rec(suspicion)).is_err() {
            return versioned(RECORD_V2, &rec);
        }
        out.push(b'}');
    }
    out
}

/// One version byte, then the record's JSON. Serializing plain structs of strings, numbers
/// and JSON values cannot fail.
fn versioned<T: Serialize>(version: u8, rec: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(version);
    if serde_json::to_writer(&mut out, rec).is_err() {
        out.truncate(1);
    }
    out
}

/// Encodes a schedule as the current record version.
pub fn encode_schedule(s: &crate::schedule::Schedule) -> Vec<u8> {
    let (cron, every_ms) = match &s.every {
        crate::schedule::Every::Cron { pattern, .. } => (Some(pattern.clone()), None),
        crate::schedule::Every::Interval { ms } => (None, Some(*ms)),
    };
    let rec = v1::ScheduleRecord {
        name: s.name.clone(),
        cron,
        every_ms,
        task: s.task.clone(),
        created_at: s.created_at,
        last_tick: s.last_tick,
    };
    versioned(RECORD_V1, &rec)
}

pub fn decode_schedule(bytes: &[u8]) -> Result<crate::schedule::Schedule, String> {
    let (&version, body) = bytes.split_first().ok_or("empty schedule record")?;
    if version != RECORD_V1 {
        return Err(format!("unknown schedule record version {version}"));
    }
    let r: v1::ScheduleRecord =
        serde_json::from_slice(body).map_err(|e| format!("bad v1 schedule record: {e}"))?;
    let every = match (r.cron, r.every_ms) {
        (Some(c), None) => crate::schedule::Every::cron(&c)?,
        (None, Some(ms)) => crate::schedule::Every::interval(ms)?,
        _ => return Err("schedule record needs exactly one of cron and every_ms".into()),
    };
    Ok(crate::schedule::Schedule {
        name: r.name,
        every,
        task: r.task,
        created_at: r.created_at,
        last_tick: r.last_tick,
    })
}

/// Encodes queue settings as the current record version.
pub fn encode_queue(q: &crate::queues::QueueSettings) -> Vec<u8> {
    let rec = v1::QueueRecord {
        paused: q.paused,
        max_running: q.max_running,
        rate_per_s: q.rate_per_s,
    };
    versioned(RECORD_V1, &rec)
}

pub fn decode_queue(bytes: &[u8]) -> Result<crate::queues::QueueSettings, String> {
    let (&version, body) = bytes.split_first().ok_or("empty queue record")?;
    match version {
        RECORD_V1 => {
            let r: v1::QueueRecord =
                serde_json::from_slice(body).map_err(|e| format!("bad v1 queue record: {e}"))?;
            Ok(crate::queues::QueueSettings {
                paused: r.paused,
                max_running: r.max_running,
                rate_per_s: r.rate_per_s,
            })
        }
        other => Err(format!("unknown queue record version {other}")),
    }
}

/// What the scheduler's index needs of a waiting task: enough to queue it, not to run it.
#[derive(Deserialize)]
struct IndexRecord {
    id: TaskId,
    queue: String,
    kind: String,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    depends_on: Vec<TaskId>,
    state: v1::State,
    #[serde(default)]
    run_at: Option<DateTime<Utc>>,
}

/// What the startup index needs of a waiting task, decoded without the rest of its
/// record (see [`decode_index`]). It is its own type so that a half-filled `Task` never
/// exists: the task itself is read whole when it is next leased, viewed or changed.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub id: TaskId,
    pub queue: String,
    pub kind: String,
    pub priority: i32,
    pub labels: Vec<String>,
    pub idempotency_key: Option<String>,
    pub depends_on: Vec<TaskId>,
    pub state: TaskState,
    pub run_at: Option<DateTime<Utc>>,
}

/// A recovered task: whole, or only its index fields.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovered {
    Whole(Task),
    /// Always a waiting task (pending, scheduled, blocked).
    Index(IndexEntry),
}

impl Recovered {
    pub fn id(&self) -> TaskId {
        match self {
            Recovered::Whole(t) => t.id,
            Recovered::Index(e) => e.id,
        }
    }

    pub fn state(&self) -> TaskState {
        match self {
            Recovered::Whole(t) => t.state,
            Recovered::Index(e) => e.state,
        }
    }

    pub fn queue(&self) -> &str {
        match self {
            Recovered::Whole(t) => &t.queue,
            Recovered::Index(e) => &e.queue,
        }
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        match self {
            Recovered::Whole(t) => t.idempotency_key.as_deref(),
            Recovered::Index(e) => e.idempotency_key.as_deref(),
        }
    }

    pub fn depends_on(&self) -> &[TaskId] {
        match self {
            Recovered::Whole(t) => &t.depends_on,
            Recovered::Index(e) => &e.depends_on,
        }
    }

    /// The waiting fields a restart normalizes (see `core::lifecycle::normalize_parts`).
    pub fn waiting_mut(&mut self) -> (&mut TaskState, &mut Option<DateTime<Utc>>) {
        match self {
            Recovered::Whole(t) => (&mut t.state, &mut t.run_at),
            Recovered::Index(e) => (&mut e.state, &mut e.run_at),
        }
    }

    pub fn run_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Recovered::Whole(t) => t.run_at,
            Recovered::Index(e) => e.run_at,
        }
    }

    pub fn ready_key(&self) -> crate::ready::ReadyKey<'_> {
        match self {
            Recovered::Whole(t) => t.into(),
            Recovered::Index(e) => crate::ready::ReadyKey {
                id: e.id,
                priority: e.priority,
                queue: &e.queue,
                kind: &e.kind,
                labels: &e.labels,
            },
        }
    }
}

/// Decodes a record for the startup index. A waiting task (pending, scheduled, blocked)
/// of the current version comes back with only what the index needs (id, queue, kind,
/// labels, priority, state, run_at, dependencies, idempotency key), skipping the payload,
/// timestamps and history, which is about half the decoding; any other task comes back
/// whole. The core demotes the partial ones at once and reads them whole when needed.
///
/// It checks the JSON and the index fields only: a record whose other fields are wrong
/// (which sled's own checksums make a writer bug, not disk damage) is found when the task
/// is read back, and stops the queen then.
pub fn decode_index(bytes: &[u8]) -> Result<Recovered, String> {
    if let Some((&RECORD_V2, body)) = bytes.split_first() {
        let r: IndexRecord =
            serde_json::from_slice(body).map_err(|e| format!("bad v2 record: {e}"))?;
        if matches!(
            r.state,
            v1::State::Pending | v1::State::Scheduled | v1::State::Blocked
        ) {
            return Ok(Recovered::Index(IndexEntry {
                id: r.id,
                queue: r.queue,
                kind: r.kind,
                priority: r.priority,
                labels: r.labels,
                idempotency_key: r.idempotency_key,
                depends_on: r.depends_on,
                state: state_from_v1(r.state),
                run_at: r.run_at,
            }));
        }
    }
    decode(bytes).map(Recovered::Whole)
}

/// Decodes a record of any known version into the current task shape.
pub fn decode(bytes: &[u8]) -> Result<Task, String> {
    let (&version, body) = bytes.split_first().ok_or("empty record")?;
    let r = match version {
        RECORD_V1 => v2::migrate(
            serde_json::from_slice::<v1::TaskRecord>(body)
                .map_err(|e| format!("bad v1 record: {e}"))?,
        ),
        RECORD_V2 | RECORD_V3 => serde_json::from_slice::<v2::TaskRecord>(body)
            .map_err(|e| format!("bad v{version} record: {e}"))?,
        other => return Err(format!("unknown record version {other}")),
    };
    let suspicion = if version == RECORD_V3 {
        let extra: v3::Extra =
            serde_json::from_slice(body).map_err(|e| format!("bad v3 record: {e}"))?;
        Some(Box::new(v3::from_rec(extra.suspicion)))
    } else {
        None
    };
    Ok(Task {
        id: r.id,
        queue: r.queue,
        kind: r.kind,
        payload: r.payload,
        priority: r.priority,
        labels: r.labels,
        idempotency_key: r.idempotency_key,
        depends_on: r.depends_on,
        retry: r.retry.map(|r| {
            Box::new(shared::api::RetrySpec {
                initial_ms: r.initial_ms,
                factor: r.factor,
                max_ms: r.max_ms,
                jitter: r.jitter,
            })
        }),
        max_attempts: r.max_attempts,
        timeout_ms: r.timeout_ms,
        state: state_from_v1(r.state),
        attempts: r.attempts,
        lost: r.lost,
        fence: Fence(r.fence),
        lease: r.lease.map(|l| {
            Box::new(Lease {
                drone: l.drone,
                drone_name: l.drone_name,
            })
        }),
        result: r.result.map(Box::new),
        errors: r
            .errors
            .into_iter()
            .map(|e| AttemptError {
                attempt: e.attempt,
                fence: Fence(e.fence),
                drone: e.drone,
                error: e.error,
                at: e.at,
            })
            .collect(),
        checkpoint: r.checkpoint.map(Box::new),
        cancel_reason: r.cancel_reason,
        suspicion,
        created_at: r.created_at,
        run_at: r.run_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::api::TaskSpec;

    #[test]
    fn a_task_round_trips_through_its_record() {
        let spec = TaskSpec {
            kind: "echo".into(),
            payload: serde_json::json!({"a": 1}),
            ..Default::default()
        };
        let mut t = Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default())
            .expect("valid spec");
        t.state = TaskState::Running;
        t.fence = Fence(7);
        t.attempts = 2;
        t.lease = Some(Box::new(Lease {
            drone: DroneId::generate(),
            drone_name: "d1".into(),
        }));
        t.errors.push(AttemptError {
            attempt: 1,
            fence: Fence(6),
            drone: None,
            error: "boom".into(),
            at: Utc::now(),
        });
        assert_eq!(decode(&encode(&t)), Ok(t));
    }

    /// The record as [`v2::TaskRecord`] holds it: what `encode` wrote before it borrowed.
    fn owned(task: &Task) -> v2::TaskRecord {
        v2::TaskRecord {
            id: task.id,
            queue: task.queue.clone(),
            kind: task.kind.clone(),
            payload: task.payload.clone(),
            priority: task.priority,
            labels: task.labels.clone(),
            idempotency_key: task.idempotency_key.clone(),
            depends_on: task.depends_on.clone(),
            retry: task.retry.as_deref().map(retry_rec),
            max_attempts: task.max_attempts,
            timeout_ms: task.timeout_ms,
            state: state_to_v1(task.state),
            attempts: task.attempts,
            lost: task.lost,
            fence: task.fence.0,
            lease: task.lease.as_ref().map(|l| v1::LeaseRec {
                drone: l.drone,
                drone_name: l.drone_name.clone(),
            }),
            result: task.result.as_deref().cloned(),
            errors: task
                .errors
                .iter()
                .map(|e| v1::AttemptErr {
                    attempt: e.attempt,
                    fence: e.fence.0,
                    drone: e.drone,
                    error: e.error.clone(),
                    at: e.at,
                })
                .collect(),
            checkpoint: task.checkpoint.as_deref().cloned(),
            cancel_reason: task.cancel_reason.clone(),
            created_at: task.created_at,
            run_at: task.run_at,
            started_at: task.started_at,
            finished_at: task.finished_at,
        }
    }

    #[test]
    fn the_borrowed_encoding_writes_the_v2_records_bytes() {
        use chrono::{NaiveDate, TimeZone};
        let at = |y: i32, nanos: u32| {
            let naive = NaiveDate::from_ymd_opt(y, 2, 3)
                .and_then(|d| d.and_hms_nano_opt(4, 5, 59, nanos))
                .expect("a valid time");
            Utc.from_utc_datetime(&naive)
        };
        let spec = TaskSpec {
            kind: "render.v2:x".into(),
            queue: Some("q-1".into()),
            payload: serde_json::json!({"a": [1, 2.5, "x"], "b": null}),
            priority: Some(-3),
            labels: vec!["l1".into(), "l2".into()],
            idempotency_key: Some("k\u{1}".into()),
            timeout_ms: Some(9_000),
            ..Default::default()
        };
        let mut t = Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default())
            .expect("valid spec");
        let plain = t.clone();
        t.depends_on = vec![TaskId::generate(), TaskId::generate()];
        t.retry = Some(Box::new(shared::api::RetrySpec {
            initial_ms: Some(10),
            factor: Some(1.5),
            max_ms: None,
            jitter: Some(0.25),
        }));
        t.state = TaskState::Failed;
        t.attempts = 3;
        t.lost = 1;
        t.fence = Fence(42);
        t.lease = Some(Box::new(Lease {
            drone: DroneId::generate(),
            drone_name: "d\"1".into(),
        }));
        t.result = Some(Box::new(serde_json::json!({"out": "ok", "n": 1e300})));
        t.checkpoint = Some(Box::new(serde_json::json!([true, {"c": 1}])));
        t.cancel_reason = Some("why".into());
        t.errors = vec![
            AttemptError {
                attempt: 1,
                fence: Fence(41),
                drone: Some(DroneId::generate()),
                error: "boom\t".into(),
                at: at(2026, 0),
            },
            AttemptError {
                attempt: 2,
                fence: Fence(42),
                drone: None,
                error: String::new(),
                at: at(1, 7),
            },
        ];
        // Every precision chrono picks between (none, 3, 6, 9 digits), the edges of the
        // years written as four digits, and the cases handed to chrono (a leap second,
        // a five-digit year).
        let times = [
            at(2026, 0),
            at(2026, 123_000_000),
            at(2026, 123_456_000),
            at(2026, 123_456_789),
            at(2026, 1),
            at(0, 999_999_999),
            at(9999, 10_000),
            at(2026, 1_500_000_000),
            at(10_000, 5_000_000),
            at(-1, 0),
        ];
        for (i, time) in times.iter().enumerate() {
            t.created_at = *time;
            t.run_at = Some(times[(i + 1) % times.len()]);
            t.started_at = Some(times[(i + 2) % times.len()]);
            t.finished_at = (i % 2 == 0).then(|| times[(i + 3) % times.len()]);
            for task in [&t, &plain] {
                let expected = serde_json::to_vec(&owned(task)).expect("serializes");
                let written = encode(task);
                assert_eq!(written.first(), Some(&RECORD_V2));
                assert_eq!(
                    String::from_utf8_lossy(&written[1..]),
                    String::from_utf8_lossy(&expected),
                    "created_at {time:?}"
                );
                assert_eq!(decode(&written).as_ref(), Ok(task));
            }
        }
    }

    #[test]
    fn a_suspect_round_trips_as_v3_and_an_unsuspected_task_stays_v2() {
        let spec = TaskSpec {
            kind: "echo".into(),
            payload: serde_json::json!({"suspicion": "a payload may say anything"}),
            ..Default::default()
        };
        let mut t = Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default())
            .expect("valid spec");
        let plain = encode(&t);
        assert_eq!(plain[0], RECORD_V2, "no evidence, no new version");
        t.lost = 2;
        t.suspicion = Some(Box::new(Suspicion {
            suspect_since: Some(Utc::now()),
            losses: vec![
                LostLease {
                    attempt: 1,
                    fence: Fence(1),
                    drone: Some(DroneId::generate()),
                    co_tenants: 3,
                    verdict: LossVerdict::Shared,
                    at: Utc::now(),
                },
                LostLease {
                    attempt: 2,
                    fence: Fence(2),
                    drone: None,
                    co_tenants: 0,
                    verdict: LossVerdict::Inconclusive,
                    at: Utc::now(),
                },
            ],
        }));
        let bytes = encode(&t);
        assert_eq!(bytes[0], RECORD_V3);
        assert_eq!(decode(&bytes), Ok(t.clone()));
        // A v3 record is never decoded as an index entry: the core needs the suspicion.
        assert!(matches!(decode_index(&bytes), Ok(Recovered::Whole(_))));
        // Its v2 part is the v2 record: a v2 decoder reads every other field.
        let v2: v2::TaskRecord = serde_json::from_slice(&bytes[1..]).expect("v2 fields");
        assert_eq!(v2.lost, 2);
        assert_eq!(v2.payload, t.payload);
    }

    #[test]
    fn the_index_decode_keeps_every_field_the_scheduler_indexes() {
        let spec = TaskSpec {
            kind: "render".into(),
            queue: Some("img".into()),
            payload: serde_json::json!({"big": "x".repeat(100)}),
            priority: Some(-3),
            labels: vec!["gpu".into()],
            idempotency_key: Some("k1".into()),
            ..Default::default()
        };
        let mut t = Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default())
            .expect("valid spec");
        t.state = TaskState::Scheduled;
        t.run_at = Some(Utc::now());
        t.depends_on = vec![TaskId::generate()];
        let got = decode_index(&encode(&t)).expect("decodes");
        let Recovered::Index(i) = got else {
            panic!("a waiting task is decoded for the index only: {got:?}")
        };
        assert_eq!(
            (i.id, &i.queue, &i.kind, i.priority, &i.labels, i.state, i.run_at),
            (t.id, &t.queue, &t.kind, t.priority, &t.labels, t.state, t.run_at)
        );
        assert_eq!(
            (&i.idempotency_key, &i.depends_on),
            (&t.idempotency_key, &t.depends_on)
        );
        // A running task is needed whole at once (its drone may re-attach it).
        t.state = TaskState::Running;
        let got = decode_index(&encode(&t)).expect("decodes");
        assert_eq!(got, Recovered::Whole(t));
    }

    #[test]
    fn the_index_decode_refuses_a_record_with_a_bad_index_field() {
        let spec = TaskSpec {
            kind: "echo".into(),
            ..Default::default()
        };
        let t = Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default())
            .expect("valid spec");
        let good = encode(&t);
        assert!(decode_index(&good).is_ok());
        let mut json: serde_json::Value = serde_json::from_slice(&good[1..]).expect("json");
        json["priority"] = serde_json::json!("high");
        let mut bad = vec![RECORD_V2];
        bad.extend(serde_json::to_vec(&json).expect("encode"));
        assert!(decode_index(&bad).unwrap_err().contains("bad v2 record"));
        assert!(
            decode_index(&good[..good.len() - 3]).is_err(),
            "truncated JSON"
        );
    }

    #[test]
    fn an_unknown_version_is_refused_not_guessed() {
        assert!(decode(&[9, b'{', b'}']).unwrap_err().contains("version 9"));
        assert!(decode(&[]).is_err());
    }
}
