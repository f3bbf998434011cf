//! What the rest of the queen sees of the core: the requests it takes, the handle that
//! sends them, a drone connection as the core knows it, and why a request was refused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use shared::api::{DroneView, QueueView, ScheduleView, Stats, TaskState, TaskView};
use shared::protocol::{DroneMessage, Hello, QueenMessage};
use shared::TaskId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::schedule::Schedule;
use crate::store::CommitError;
use crate::task::Task;

/// A drone connection as the core sees it: a way to send it messages and to close it.
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: u64,
    /// Unbounded because the protocol bounds it: the queen sends a drone at most one
    /// assign per free slot and one reply per drone message, which the reader bounds.
    pub tx: mpsc::UnboundedSender<QueenMessage>,
    pub close: CancellationToken,
}

impl Conn {
    pub(crate) fn send(&self, msg: QueenMessage) {
        // A closed connection is handled by its `Closed` request; nothing to do here.
        let _ = self.tx.send(msg);
    }
}

/// How the HTTP layer should answer a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Conflict,
    Unavailable,
    /// The disk reserve is reached (HTTP 507).
    InsufficientStorage,
}

/// Why a client request was refused. Each cause carries what it is about, so callers
/// match on the cause rather than on text; `Display` is the message users see.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("no task {0}")]
    UnknownTask(TaskId),
    #[error("depends_on: unknown task {0}")]
    UnknownDependency(TaskId),
    #[error("task {id} is already {state}")]
    AlreadyFinished { id: TaskId, state: TaskState },
    #[error("task {id} is {state}; only failed or cancelled tasks can be retried")]
    NotRetryable { id: TaskId, state: TaskState },
    /// A retry of a task whose dependency ended without succeeding: it could never run.
    #[error("task {id} depends on {dep}, which is {state}; retry that task first")]
    DependencyFailed {
        id: TaskId,
        dep: TaskId,
        state: TaskState,
    },
    #[error("task {id} depends on {dep}, which no longer exists")]
    DependencyGone { id: TaskId, dep: TaskId },
    #[error("no schedule {0}")]
    UnknownSchedule(String),
    #[error("no queue {0}")]
    UnknownQueue(String),
    /// A field of the request is out of its range; the text names it.
    #[error("{0}")]
    Invalid(String),
    /// The write the answer depends on did not become durable.
    #[error("{0}")]
    NotDurable(#[from] CommitError),
    /// A store read failed; the queen stops, as it does when a write fails.
    #[error("reading the store failed: {0}")]
    ReadFailed(String),
    #[error("the queen is shutting down")]
    ShuttingDown,
    /// Free space on the data dir's filesystem is below the reserve: new work waits.
    #[error("the data dir's filesystem has {} MiB free, below [storage] min_free_mb = {min_free_mb}: new work is refused until space is freed (outcomes of accepted work are still recorded)", free_bytes / (1024 * 1024))]
    InsufficientStorage { free_bytes: u64, min_free_mb: u64 },
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::UnknownTask(_)
            | CoreError::UnknownSchedule(_)
            | CoreError::UnknownQueue(_) => ErrorKind::NotFound,
            CoreError::UnknownDependency(_) | CoreError::Invalid(_) => ErrorKind::BadRequest,
            CoreError::AlreadyFinished { .. }
            | CoreError::NotRetryable { .. }
            | CoreError::DependencyFailed { .. }
            | CoreError::DependencyGone { .. } => ErrorKind::Conflict,
            CoreError::NotDurable(_) | CoreError::ReadFailed(_) | CoreError::ShuttingDown => {
                ErrorKind::Unavailable
            }
            CoreError::InsufficientStorage { .. } => ErrorKind::InsufficientStorage,
        }
    }
}

/// Filter for the in-memory part of a task listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<TaskState>,
    pub queue: Option<String>,
    pub before: Option<TaskId>,
    pub limit: usize,
}

impl ListFilter {
    pub fn matches(&self, t: &Task) -> bool {
        self.matches_parts(t.id, &t.queue, t.state)
    }

    pub(crate) fn matches_parts(&self, id: TaskId, queue: &str, state: TaskState) -> bool {
        self.state.is_none_or(|s| s == state)
            && self.queue.as_deref().is_none_or(|q| q == queue)
            && self.before.is_none_or(|b| id < b)
    }
}

/// What the core is asked to do.
#[derive(Debug)]
pub enum Request {
    /// New tasks (validated), all or nothing. The reply says, per task, its record and
    /// whether it was created (false: an idempotency key matched an existing task).
    Submit {
        tasks: Vec<Task>,
        reply: oneshot::Sender<Result<Vec<(TaskView, bool)>, CoreError>>,
    },
    /// A task held in memory (active, or finished and not yet known durable).
    Get {
        id: TaskId,
        reply: oneshot::Sender<Option<TaskView>>,
    },
    /// In-memory tasks matching the filter, newest first.
    List {
        filter: ListFilter,
        reply: oneshot::Sender<Vec<TaskView>>,
    },
    Cancel {
        id: TaskId,
        reason: String,
        reply: oneshot::Sender<Result<TaskView, CoreError>>,
    },
    Drones {
        reply: oneshot::Sender<Vec<DroneView>>,
    },
    Queues {
        reply: oneshot::Sender<Vec<QueueView>>,
    },
    /// Pause, resume or set limits; creates the queue if it is new.
    SetQueue {
        name: String,
        change: QueueChange,
        reply: oneshot::Sender<Result<QueueView, CoreError>>,
    },
    Schedules {
        reply: oneshot::Sender<Vec<ScheduleView>>,
    },
    /// Creates or replaces a schedule; the reply says whether it was created.
    PutSchedule {
        schedule: Box<Schedule>,
        reply: oneshot::Sender<Result<(ScheduleView, bool), CoreError>>,
    },
    DeleteSchedule {
        name: String,
        reply: oneshot::Sender<Result<ScheduleView, CoreError>>,
    },
    /// A failed or cancelled task runs again.
    Retry {
        id: TaskId,
        reply: oneshot::Sender<Result<TaskView, CoreError>>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    /// A drone's hello, already checked at the connection edge (protocol version, token,
    /// shape; see `server.rs`).
    Hello {
        hello: Box<Hello>,
        conn: Conn,
    },
    Message {
        conn: u64,
        msg: DroneMessage,
    },
    Closed {
        conn: u64,
    },
}

impl Request {
    /// Whether the request is answered exactly while recovery is still reading tasks
    /// (see [`super::Core::run`]); every other one waits for recovery to end.
    pub(crate) fn answerable_while_recovering(&self) -> bool {
        matches!(
            self,
            Request::Get { .. } | Request::Drones { .. } | Request::Schedules { .. }
        )
    }
}

/// How a queue's settings change.
#[derive(Debug, Clone, PartialEq)]
pub enum QueueChange {
    Pause,
    Resume,
    Limits(shared::api::QueueLimits),
}

/// A cheap, cloneable way to send requests to the core.
#[derive(Debug, Clone)]
pub struct CoreHandle {
    pub(crate) tx: mpsc::Sender<Request>,
    pub(crate) recovered: Arc<AtomicBool>,
    pub(crate) disk: Arc<DiskState>,
    /// A receiver of task ends, kept only to make more (see [`CoreHandle::watch_ends`]).
    pub(crate) ended: Arc<tokio::sync::broadcast::Receiver<shared::TaskId>>,
}

/// The data dir's free space as last sampled (by the queen's sampler, see `lib.rs`), and
/// whether the core refuses new work for want of it (`[storage] min_free_mb`).
#[derive(Debug)]
pub struct DiskState {
    free_bytes: AtomicU64,
    degraded: AtomicBool,
}

impl Default for DiskState {
    fn default() -> DiskState {
        DiskState {
            // Unknown until first sampled: never below any reserve.
            free_bytes: AtomicU64::new(u64::MAX),
            degraded: AtomicBool::new(false),
        }
    }
}

impl DiskState {
    pub fn set_free_bytes(&self, free: u64) {
        self.free_bytes.store(free, Ordering::Release);
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Acquire)
    }

    /// Whether new work is refused (set by the core only).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    pub(crate) fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Release);
    }
}

impl CoreHandle {
    /// The ids of tasks whose terminal state is durable, from now on. Closed when the core
    /// stops.
    pub fn watch_ends(&self) -> tokio::sync::broadcast::Receiver<shared::TaskId> {
        self.ended.resubscribe()
    }

    /// Whether startup recovery is over: every active task is loaded and every request is
    /// answered at once (before that, some wait; see [`super::Core::run`]).
    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
    }

    /// The data dir's free space and whether new work is refused for it.
    pub fn disk(&self) -> &Arc<DiskState> {
        &self.disk
    }

    pub async fn send(&self, req: Request) -> Result<(), CoreError> {
        self.tx.send(req).await.map_err(|_| CoreError::ShuttingDown)
    }

    /// Sends a request built around a reply channel and waits for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| CoreError::ShuttingDown)
    }
}
