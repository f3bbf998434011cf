//! The scheduler core: one task that owns all in-memory scheduling state (active tasks,
//! ready queues, timers, drones and their leases) and makes every decision. Connections
//! and HTTP handlers talk to it through a bounded channel; it talks to disk only through
//! the store's writer, and sends nothing that depends on a write before that write is
//! durable. It knows nothing about sockets or HTTP.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use shared::api::{AttemptError, DroneView, QueueView, ScheduleView, Stats, TaskState, TaskView};
use shared::protocol::{
    Ack, AckStatus, Assign, CancelTask, DroneMessage, Held, Hello, QueenMessage, Reject, Welcome,
    PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use shared::{DroneId, Fence, TaskId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::active::{ActiveTasks, Backing};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::queues::{QueueSettings, QueueState};
use crate::ready::ReadyQueues;
use crate::rules::{self, AfterFailure, AfterLostLease, LiveLease, Reattach, RetryPolicy, Verdict};
use crate::schedule::{Every, Schedule};
use crate::store::record::Recovered;
use crate::store::{Commit, Mutation, StoreError, StoreReader, StoreWriter};
use crate::task::{Lease, Task};

/// Requests queued for the core before senders wait (backpressure on drones and clients).
pub const REQUEST_QUEUE: usize = 8_192;
/// Requests handled between two dispatch passes: amortizes dispatch under load while
/// keeping a single pass short.
const REQUESTS_PER_PASS: usize = 512;
/// How often timers (scheduled tasks, orphaned leases, attempt deadlines) are checked when
/// nothing else wakes the core.
const TICK: Duration = Duration::from_millis(50);
/// What the recovery thread sends: chunks of tasks in id order, then `Done` or the error
/// that ended the read. A channel that closes without either means the thread died.
#[derive(Debug)]
enum Loaded {
    Chunk(Vec<Recovered>),
    Done,
    Failed(StoreError),
}

type Chunks = mpsc::Receiver<Loaded>;
/// Requests held while recovering before the core stops taking more (backpressure).
const MAX_DEFERRED: usize = 65_536;
/// Decoded chunks of recovered tasks queued ahead of the core.
const RECOVERY_CHUNKS_AHEAD: usize = 4;
/// Most expired finished tasks purged per purge pass, so a purge never stalls dispatch.
const PURGE_BATCH: usize = 1_000;
/// Pause between purge batches while a backlog remains: keeps purging from competing
/// with dispatch for the writer.
const PURGE_BACKLOG_PAUSE: Duration = Duration::from_secs(1);
/// Most slots a drone may announce.
pub const MAX_SLOTS: u32 = 10_000;

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
    fn send(&self, msg: QueenMessage) {
        // A closed connection is handled by its `Closed` request; nothing to do here.
        let _ = self.tx.send(msg);
    }
}

/// Why a client request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
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

    fn matches_parts(&self, id: TaskId, queue: &str, state: TaskState) -> bool {
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
    tx: mpsc::Sender<Request>,
    recovered: Arc<AtomicBool>,
}

impl CoreHandle {
    /// Whether startup recovery is over: every active task is loaded and every request is
    /// answered at once (before that, some wait; see [`Core::run`]).
    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
    }

    pub async fn send(&self, req: Request) -> Result<(), CoreError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| CoreError::Unavailable("the queen is shutting down".into()))
    }

    /// Sends a request built around a reply channel and waits for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await
            .map_err(|_| CoreError::Unavailable("the queen is shutting down".into()))
    }
}

#[derive(Debug)]
struct Drone {
    id: DroneId,
    name: String,
    labels: BTreeSet<String>,
    kinds: HashSet<String>,
    slots: u32,
    conn: Conn,
    leases: HashMap<TaskId, LiveLease>,
    /// Tasks the drone was told to cancel; they occupy a slot until it stops reporting them.
    cancelling: HashSet<TaskId>,
    /// Tasks whose outcome the drone reported; held until acked, but no longer in a slot.
    reported: HashSet<TaskId>,
    last_seen: Instant,
    last_seen_wall: DateTime<Utc>,
    assigns_sent: u64,
    draining: bool,
}

impl Drone {
    fn free_slots(&self) -> usize {
        if self.draining {
            return 0;
        }
        (self.slots as usize).saturating_sub(self.leases.len() + self.cancelling.len())
    }
}

/// The core's state. See the module docs.
pub struct Core {
    cfg: Arc<Config>,
    writer: StoreWriter,
    reader: StoreReader,
    /// Commits built while handling requests, sent to the writer in order after the pass.
    outgoing: Vec<Commit>,
    /// Number of commits handed to the writer so far (the writer numbers them alike).
    commits_made: u64,
    /// Boxed: a map slot holds a pointer, not a whole task, so its spare capacity (up to
    /// half the slots) costs 24 bytes a slot instead of a task's size.
    tasks: ActiveTasks,
    /// Finished tasks whose commit may not be durable yet, so reads never miss them.
    recent: HashMap<TaskId, (u64, Task)>,
    recent_order: VecDeque<(u64, TaskId)>,
    ready: ReadyQueues,
    scheduled: BTreeSet<(DateTime<Utc>, TaskId)>,
    idem: HashMap<String, TaskId>,
    /// Blocked task ids by the dependency they wait for.
    dependents: HashMap<TaskId, Vec<TaskId>>,
    drones: HashMap<DroneId, Drone>,
    conn_drone: HashMap<u64, DroneId>,
    /// Running leases with no connected holder, and when they are given up.
    orphans: HashMap<TaskId, Instant>,
    /// Queen-side attempt deadlines: a task past `timeout_ms` plus the heartbeat timeout
    /// without a report is failed by the queen.
    attempt_deadlines: BTreeSet<(Instant, TaskId, Fence)>,
    /// The entry of each running task in `attempt_deadlines`, so it can be dropped when
    /// the attempt ends (the set stays as small as the running set).
    deadline_of: HashMap<TaskId, (Instant, Fence)>,
    finished_counts: HashMap<(String, TaskState), u64>,
    /// Queues with settings or running tasks (a queue exists once used).
    queues: HashMap<String, QueueState>,
    schedules: HashMap<String, Schedule>,
    /// Each schedule's next wake-up, ordered; `schedule_wake` says which entry is current.
    schedule_timers: BTreeSet<(DateTime<Utc>, String)>,
    schedule_wake: HashMap<String, DateTime<Utc>>,
    rng: StdRng,
    retry: RetryPolicy,
    next_tick: Instant,
    next_drone_check: Instant,
    next_purge: Instant,
    rr: usize,
    /// Drones that may have a free slot: added when a slot may have freed (hello, outcome,
    /// heartbeat), dropped by dispatch once found full. Dispatch looks only at these.
    maybe_free: BTreeSet<DroneId>,
    /// Something other than a new ready task may let dispatch progress (a slot freed, a
    /// queue changed, time passed for rate limits and timers).
    dispatch_wanted: bool,
    /// `ready.pushes()` at the end of the last dispatch.
    ready_pushes_seen: u64,
    /// Reused by dispatch for its candidate list.
    dispatch_buf: Vec<DroneId>,
    /// Set until every active task has been read from the store (see [`Core::run`]).
    recovery: Option<Recovery>,
    /// True once recovery is over (read by `/readyz` through the handle).
    recovered_flag: Arc<AtomicBool>,
    /// Cancelled when the queen must stop: a store read failed at startup.
    fatal: CancellationToken,
    metrics: Metrics,
}

/// Startup in progress: the active tasks are being streamed in from the store while the
/// queen already serves. Until it is over, requests that need every task (or any write)
/// wait in `deferred`, in arrival order.
struct Recovery {
    /// Taken when the reading thread starts.
    scan: Option<crate::store::ActiveScan>,
    deferred: VecDeque<Request>,
    /// Tasks recovered as running (their drones have a grace to come back).
    running: usize,
    /// Blocked tasks, re-checked at the end (their dependencies may have finished).
    blocked: Vec<TaskId>,
    started: std::time::Instant,
    /// Time the core spent indexing chunks (the rest of recovery overlaps it).
    indexing: Duration,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("tasks", &self.tasks.len())
            .field("drones", &self.drones.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Builds the core from what the store recovered. Running tasks become orphans: their
    /// drones get `heartbeat_timeout` to reconnect and re-attach them (SPEC G5).
    pub fn new(
        cfg: Arc<Config>,
        writer: StoreWriter,
        reader: StoreReader,
        recovered: crate::store::Recovered,
        metrics: Metrics,
        fatal: CancellationToken,
    ) -> (Core, CoreHandle, mpsc::Receiver<Request>) {
        let now = Instant::now();
        let wall = Utc::now();
        let retry = RetryPolicy {
            base: Duration::from_millis(cfg.tasks.retry_base_ms),
            max: Duration::from_millis(cfg.tasks.retry_max_ms),
            factor: rules::DEFAULT_RETRY_FACTOR,
            jitter: rules::DEFAULT_RETRY_JITTER,
        };
        let backing = Backing {
            reader: reader.clone(),
            fatal: fatal.clone(),
        };
        let mut core = Core {
            writer,
            reader,
            outgoing: Vec::new(),
            commits_made: 0,
            tasks: ActiveTasks::backed(backing, cfg.storage.hot_tasks),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            ready: ReadyQueues::default(),
            scheduled: BTreeSet::new(),
            idem: HashMap::new(),
            dependents: HashMap::new(),
            drones: HashMap::new(),
            conn_drone: HashMap::new(),
            orphans: HashMap::new(),
            attempt_deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            finished_counts: recovered.finished_counts.into_iter().collect(),
            queues: recovered
                .queues
                .into_iter()
                .map(|(name, s)| (name, QueueState::new(s)))
                .collect(),
            schedules: HashMap::new(),
            schedule_timers: BTreeSet::new(),
            schedule_wake: HashMap::new(),
            rng: StdRng::from_os_rng(),
            retry,
            next_tick: now,
            next_drone_check: now,
            next_purge: now,
            rr: 0,
            maybe_free: BTreeSet::new(),
            dispatch_wanted: true,
            ready_pushes_seen: 0,
            dispatch_buf: Vec::new(),
            recovery: Some(Recovery {
                scan: Some(recovered.active),
                deferred: VecDeque::new(),
                running: 0,
                blocked: Vec::new(),
                started: std::time::Instant::now(),
                indexing: Duration::ZERO,
            }),
            recovered_flag: Arc::new(AtomicBool::new(false)),
            fatal,
            cfg,
            metrics,
        };
        for schedule in recovered.schedules {
            let name = schedule.name.clone();
            core.schedules.insert(name.clone(), schedule);
            core.arm_schedule(&name, wall);
        }
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let handle = CoreHandle {
            tx,
            recovered: core.recovered_flag.clone(),
        };
        (core, handle, rx)
    }

    /// Serves requests until `shutdown`, then hands every queued commit to the writer.
    ///
    /// It starts serving at once and reads the active tasks from the store meanwhile, a
    /// chunk per pass, so the API answers within a moment of a start with millions of
    /// tasks. Until the last chunk is in, only requests that can be answered exactly are
    /// (a task by id, through the store; drones; schedules); everything else, every write
    /// and every drone hello included, waits in arrival order and runs when recovery ends.
    /// Nothing is written before the whole store has been read, so a corrupt record still
    /// stops the queen before it changes anything; no lease is granted before every task
    /// is known.
    ///
    /// Returns the error that stopped recovery, if one did.
    pub async fn run(
        mut self,
        rx: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        let (chunks, reader) = match self.start_recovery() {
            Some((chunks, reader)) => (Some(chunks), Some(reader)),
            None => (None, None),
        };
        let result = self.serve(rx, shutdown, chunks).await;
        // The reader holds the database: wait for it (it stops at once when the chunk
        // channel is gone, e.g. after a shutdown during recovery) so nothing outlives us.
        if let Some(reader) = reader {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        result
    }

    /// The loop of [`Core::run`], taking recovered chunks from `chunks`.
    async fn serve(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
        mut chunks: Option<Chunks>,
    ) -> Result<(), StoreError> {
        if chunks.is_none() {
            if self.fatal.is_cancelled() {
                // The reader could not start.
                return Err(StoreError::Interrupted);
            }
            // Nothing to read: recovery is over.
            self.finish_recovery(Utc::now());
        }
        let mut failed = None;
        loop {
            let wake = self.next_wake();
            // While recovering, stop taking requests once many wait: the bounded request
            // channel then pushes back on clients instead of memory growing.
            let accepting = self
                .recovery
                .as_ref()
                .is_none_or(|r| r.deferred.len() < MAX_DEFERRED);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                loaded = next_chunk(&mut chunks) => {
                    let failure = match loaded {
                        Some(Loaded::Chunk(tasks)) => {
                            self.recover_chunk(tasks, Utc::now());
                            None
                        }
                        Some(Loaded::Done) => {
                            chunks = None;
                            self.finish_recovery(Utc::now());
                            None
                        }
                        Some(Loaded::Failed(e)) => Some(e),
                        // A reader that died without saying why (a panic) left tasks
                        // unread: serving on would lose them.
                        None => Some(StoreError::Interrupted),
                    };
                    if let Some(e) = failure {
                        tracing::error!(error = %e, "reading the active tasks failed; the queen must stop");
                        self.fatal.cancel();
                        failed = Some(e);
                        break;
                    }
                }
                req = rx.recv(), if accepting => {
                    let Some(req) = req else { break };
                    self.handle(req);
                    for _ in 1..REQUESTS_PER_PASS {
                        match rx.try_recv() {
                            Ok(req) => self.handle(req),
                            Err(_) => break,
                        }
                    }
                }
                // Timers wait for recovery (the tick would be due at once, every pass).
                _ = tokio::time::sleep_until(wake), if self.recovery.is_none() => {}
            }
            if self.recovery.is_none() {
                let now = Instant::now();
                let wall = Utc::now();
                // A scheduled task that came due is promoted now, not at the next tick
                // (its timer woke the loop; waiting would spin until the tick).
                let due = self.scheduled.first().is_some_and(|(at, _)| *at <= wall);
                if now >= self.next_tick || due {
                    self.tick(now, wall);
                }
                self.dispatch(Utc::now());
            }
            // Every change made in this pass is in a commit numbered at most this.
            self.tasks.seal(self.commits_made);
            if self.recovery.is_none() {
                // Tasks read at startup join the map only when recovery ends.
                self.tasks.demote(self.writer.durable());
            }
            self.flush_commits().await;
        }
        // Close every drone connection; their tasks stay `running` on disk and are
        // re-attached when the drones reconnect to the next queen.
        for drone in self.drones.values() {
            drone.conn.close.cancel();
        }
        self.flush_commits().await;
        failed.map_or(Ok(()), Err)
    }

    /// Starts the thread that reads the active tasks; chunks arrive in id order.
    fn start_recovery(&mut self) -> Option<(Chunks, std::thread::JoinHandle<()>)> {
        let scan = self.recovery.as_mut()?.scan.take()?;
        let hot_max = self.cfg.storage.hot_tasks;
        let (tx, rx) = mpsc::channel(RECOVERY_CHUNKS_AHEAD);
        let spawned = std::thread::Builder::new()
            .name("hive-recovery".into())
            .spawn(move || {
                // Stops early once the core is gone (shutdown during startup).
                let read = scan.for_each_chunk(hot_max, |chunk| {
                    tx.blocking_send(Loaded::Chunk(chunk)).is_ok()
                });
                let _ = tx.blocking_send(match read {
                    Ok(_) => Loaded::Done,
                    Err(e) => Loaded::Failed(e),
                });
            });
        match spawned {
            Ok(reader) => Some((rx, reader)),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the recovery thread; the queen must stop");
                self.fatal.cancel();
                None
            }
        }
    }

    /// Indexes one chunk of recovered tasks. Tasks beyond `storage.hot_tasks` are demoted
    /// as they arrive, so the whole set is never held.
    fn recover_chunk(&mut self, chunk: Vec<Recovered>, wall: DateTime<Utc>) {
        let started = std::time::Instant::now();
        let since = started;
        let now = Instant::now();
        let grace = self.cfg.leases.heartbeat_timeout();
        for Recovered { mut task, whole } in chunk {
            if let Some(key) = &task.idempotency_key {
                self.idem.insert(key.clone(), task.id);
            }
            match task.state {
                TaskState::Running => {
                    if let Some(r) = self.recovery.as_mut() {
                        r.running += 1;
                    }
                    self.queues
                        .entry(task.queue.clone())
                        .or_default()
                        .started(now);
                    self.orphans.insert(task.id, now + grace);
                }
                TaskState::Pending | TaskState::Scheduled => {
                    normalize_waiting(&mut task, wall);
                    match task.state {
                        TaskState::Pending => self.ready.push_loading(&task, since),
                        _ => self.enqueue(&task),
                    }
                }
                TaskState::Blocked => {
                    for dep in &task.depends_on {
                        self.dependents.entry(*dep).or_default().push(task.id);
                    }
                    if let Some(r) = self.recovery.as_mut() {
                        r.blocked.push(task.id);
                    }
                }
                _ => {}
            }
            self.tasks.insert_recovered(task, whole);
        }
        if let Some(r) = self.recovery.as_mut() {
            r.indexing += started.elapsed();
        }
    }

    /// Every active task is in: finish the indexes, then serve what waited, in order.
    fn finish_recovery(&mut self, wall: DateTime<Utc>) {
        let Some(recovery) = self.recovery.take() else {
            return;
        };
        let read = recovery.started.elapsed();
        self.tasks.end_loading();
        self.ready.end_loading();
        release_free_memory();
        let compacted = recovery.started.elapsed() - read;
        // Blocked tasks whose dependencies finished while the queen was down.
        for id in recovery.blocked {
            self.reevaluate_blocked(id, wall);
        }
        tracing::info!(
            active = self.tasks.len(),
            held_whole = self.tasks.hot(),
            running_awaiting_drones = recovery.running,
            waited = recovery.deferred.len(),
            read_ms = read.as_millis() as u64,
            indexing_ms = recovery.indexing.as_millis() as u64,
            build_ms = compacted.as_millis() as u64,
            recovery_ms = recovery.started.elapsed().as_millis() as u64,
            "recovered tasks from the store"
        );
        self.recovered_flag.store(true, Ordering::Release);
        self.dispatch_wanted = true;
        for req in recovery.deferred {
            self.handle(req);
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_tick;
        if let Some((at, _)) = self.scheduled.first() {
            let until = (*at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            wake = wake.min(Instant::now() + until);
        }
        wake
    }

    async fn flush_commits(&mut self) {
        let outgoing = std::mem::take(&mut self.outgoing);
        if self.fatal.is_cancelled() {
            // A store read failed during this pass (a demoted task could not be read
            // back), so what the pass decided may rest on a task it could not see: answer
            // none of it.
            for commit in outgoing {
                if let Some(after) = commit.after {
                    after(Err(crate::store::CommitError(
                        "the queen is stopping after a store failure".into(),
                    )));
                }
            }
            return;
        }
        for commit in outgoing {
            self.writer.send(commit).await;
        }
    }

    /// Queues mutations as one atomic commit; `after` runs once they are durable.
    fn commit(
        &mut self,
        mutations: Vec<Mutation>,
        after: Option<crate::store::AfterCommit>,
    ) -> u64 {
        self.outgoing.push(Commit { mutations, after });
        self.commits_made += 1;
        self.commits_made
    }

    fn handle(&mut self, req: Request) {
        if let Some(recovery) = self.recovery.as_mut() {
            if !answerable_while_recovering(&req) {
                recovery.deferred.push_back(req);
                return;
            }
        }
        let wall = Utc::now();
        let now = Instant::now();
        match req {
            Request::Submit { tasks, reply } => self.submit(tasks, reply, wall),
            Request::Get { id, reply } => {
                let found = self.held(&id).map(|t| t.view());
                // While recovering, a task not read yet is exactly as stored: nothing is
                // written before recovery ends.
                let found = found.or_else(|| {
                    self.recovery.as_ref()?;
                    let stored = self.reader.active(id).unwrap_or_else(|e| {
                        tracing::error!(task_id = %id, error = %e, "reading a task while recovering failed");
                        None
                    });
                    let mut task = stored?;
                    normalize_waiting(&mut task, wall);
                    Some(task.view())
                });
                let _ = reply.send(found);
            }
            Request::List { filter, reply } => {
                // The newest `limit` matches among active tasks (stopping once found; none
                // when a finished state is asked for), plus the few recent finished ones.
                let active_may_match = filter.state.is_none_or(|s| !s.is_terminal());
                // Filtered on the index; only the tasks returned are read (demoted ones from
                // the store).
                let mut out: Vec<Cow<'_, Task>> = self
                    .tasks
                    .newest_first(filter.before)
                    .filter(|e| active_may_match && filter.matches_parts(e.id, e.queue, e.state))
                    .take(if active_may_match { filter.limit } else { 0 })
                    .filter_map(|e| self.tasks.get(&e.id))
                    .chain(
                        self.recent
                            .values()
                            .map(|(_, t)| t)
                            .filter(|t| filter.matches(t))
                            .map(Cow::Borrowed),
                    )
                    .collect();
                out.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
                out.truncate(filter.limit);
                let _ = reply.send(out.iter().map(|t| t.view()).collect());
            }
            Request::Cancel { id, reason, reply } => self.cancel_request(id, reason, reply, wall),
            Request::Drones { reply } => {
                let mut views: Vec<DroneView> = self.drones.values().map(drone_view).collect();
                views.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                let _ = reply.send(views);
            }
            Request::Queues { reply } => {
                let _ = reply.send(self.queue_views());
            }
            Request::SetQueue {
                name,
                change,
                reply,
            } => self.set_queue(name, change, reply),
            Request::Retry { id, reply } => self.retry(id, reply),
            Request::Schedules { reply } => {
                let mut views: Vec<ScheduleView> = self
                    .schedules
                    .values()
                    .map(|s| self.schedule_view(s, wall))
                    .collect();
                views.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(views);
            }
            Request::PutSchedule { schedule, reply } => self.put_schedule(*schedule, reply, wall),
            Request::DeleteSchedule { name, reply } => self.delete_schedule(name, reply, wall),
            Request::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Request::Hello { hello, conn } => self.hello(*hello, conn, now, wall),
            Request::Message { conn, msg } => self.drone_message(conn, msg, now, wall),
            Request::Closed { conn } => {
                if let Some(drone) = self.conn_drone.get(&conn).copied() {
                    tracing::info!(drone = %drone, "drone disconnected; its leases wait for it to reconnect");
                    let grace = self.cfg.leases.reconnect_grace();
                    self.detach(drone, now + grace);
                }
            }
        }
    }

    // ----- client requests -------------------------------------------------------------

    fn submit(
        &mut self,
        tasks: Vec<Task>,
        reply: oneshot::Sender<Result<Vec<(TaskView, bool)>, CoreError>>,
        wall: DateTime<Utc>,
    ) {
        /// What each submitted spec turns out to be.
        enum Slot {
            New(Task),
            /// An idempotency key matched a task the queen already has.
            Existing(TaskView),
            /// An idempotency key repeated within this batch: the task at that index.
            SameAs(usize),
        }
        // Decide everything before changing anything: a batch is all or nothing.
        let mut slots = Vec::with_capacity(tasks.len());
        let mut batch_keys: HashMap<String, usize> = HashMap::new();
        // Tasks of this batch may depend on each other (the HTTP layer orders them so a
        // dependency always comes first).
        let batch_ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        let in_batch: HashSet<TaskId> = batch_ids.iter().copied().collect();
        // A task replaced by an existing one (idempotency) stands for it in dependencies.
        let mut alias: HashMap<TaskId, TaskId> = HashMap::new();
        for (i, task) in tasks.into_iter().enumerate() {
            if let Some(key) = &task.idempotency_key {
                if let Some(&j) = batch_keys.get(key) {
                    alias.insert(task.id, batch_ids[j]);
                    slots.push(Slot::SameAs(j));
                    continue;
                }
                match self.lookup_idempotent(key) {
                    Ok(Some(view)) => {
                        alias.insert(task.id, view.id);
                        slots.push(Slot::Existing(view));
                        continue;
                    }
                    Ok(None) => {
                        batch_keys.insert(key.clone(), i);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
            if let Some(dep) = task
                .depends_on
                .iter()
                .find(|d| !in_batch.contains(d) && self.find_state(**d).is_none())
            {
                let _ = reply.send(Err(CoreError::BadRequest(format!(
                    "depends_on: unknown task {dep}"
                ))));
                return;
            }
            slots.push(Slot::New(task));
        }
        // Everything below goes into the next commit; tasks born finished are visible to
        // reads (and to dependents later in this batch) from now on.
        let seq = self.commits_made + 1;

        let mut mutations = Vec::with_capacity(slots.len() * 2);
        let mut views: Vec<Option<(TaskView, bool)>> = Vec::with_capacity(slots.len());
        let mut same_as = Vec::new();
        for slot in slots {
            let mut task = match slot {
                Slot::New(task) => task,
                Slot::Existing(view) => {
                    views.push(Some((view, false)));
                    continue;
                }
                Slot::SameAs(j) => {
                    same_as.push((views.len(), j));
                    views.push(None);
                    continue;
                }
            };
            if let Some(key) = &task.idempotency_key {
                mutations.push(Mutation::Idempotency {
                    key: key.clone(),
                    id: task.id,
                });
                self.idem.insert(key.clone(), task.id);
            }
            if task.state == TaskState::Blocked {
                for dep in &mut task.depends_on {
                    if let Some(a) = alias.get(dep) {
                        *dep = *a;
                    }
                }
                task.depends_on.sort();
                task.depends_on.dedup();
                self.settle_new_blocked(&mut task, wall);
            }
            tracing::debug!(task_id = %task.id, queue = %task.queue, kind = %task.kind, state = %task.state, "task submitted");
            views.push(Some((task.view(), true)));
            self.metrics
                .submitted
                .with_label_values(&[task.queue.as_str()])
                .inc();
            if task.state.is_terminal() {
                let count = self.bump_finished(&task);
                mutations.push(Mutation::finish(&task, count));
                self.remember_recent(seq, task);
            } else {
                mutations.push(Mutation::save(&task));
                self.enqueue(&task);
                self.tasks.insert(Box::new(task));
            }
        }
        for (i, j) in same_as {
            views[i] = views.get(j).cloned().flatten().map(|(v, _)| (v, false));
        }
        let views: Vec<(TaskView, bool)> = views.into_iter().flatten().collect();
        let made = self.commit(
            mutations,
            Some(Box::new(move |r| {
                let _ = reply.send(
                    r.map(|()| views)
                        .map_err(|e| CoreError::Unavailable(e.to_string())),
                );
            })),
        );
        debug_assert_eq!(
            made, seq,
            "born-finished tasks were remembered under this commit"
        );
    }

    /// A new task with dependencies: cancelled if one already failed, runnable if all
    /// succeeded, otherwise blocked and registered with each dependency.
    fn settle_new_blocked(&mut self, task: &mut Task, wall: DateTime<Utc>) {
        // A dependency not found yet is a task of the same batch still being submitted.
        let states: Vec<(TaskId, Option<TaskState>)> = task
            .depends_on
            .iter()
            .map(|d| (*d, self.find_state(*d)))
            .collect();
        if let Some((dep, st)) = states
            .iter()
            .find(|(_, s)| matches!(s, Some(TaskState::Failed | TaskState::Cancelled)))
        {
            task.state = TaskState::Cancelled;
            let st = st.map_or("gone", TaskState::as_str);
            task.cancel_reason = Some(format!("dependency {dep} {st}"));
            task.finished_at = Some(wall);
        } else if states.iter().all(|(_, s)| *s == Some(TaskState::Succeeded)) {
            task.state = if task.run_at.is_some() {
                TaskState::Scheduled
            } else {
                TaskState::Pending
            };
        } else {
            for dep in &task.depends_on {
                self.dependents.entry(*dep).or_default().push(task.id);
            }
        }
    }

    /// An active task, or a finished one not yet known durable.
    fn held(&self, id: &TaskId) -> Option<Cow<'_, Task>> {
        self.tasks
            .get(id)
            .or_else(|| self.recent.get(id).map(|(_, t)| Cow::Borrowed(t)))
    }

    fn lookup_idempotent(&self, key: &str) -> Result<Option<TaskView>, CoreError> {
        if let Some(id) = self.idem.get(key) {
            if let Some(t) = self.held(id) {
                return Ok(Some(t.view()));
            }
        }
        let id = self
            .reader
            .idempotent(key)
            .map_err(|e| CoreError::Unavailable(e.to_string()))?;
        let Some(id) = id else { return Ok(None) };
        if let Some(t) = self.held(&id) {
            return Ok(Some(t.view()));
        }
        Ok(self
            .reader
            .finished(id)
            .map_err(|e| CoreError::Unavailable(e.to_string()))?
            .map(|t| t.view()))
    }

    /// The state of any task the queen knows, wherever it lives.
    fn find_state(&self, id: TaskId) -> Option<TaskState> {
        if let Some(state) = self
            .tasks
            .state(&id)
            .or_else(|| self.recent.get(&id).map(|(_, t)| t.state))
        {
            return Some(state);
        }
        self.reader.finished(id).ok().flatten().map(|t| t.state)
    }

    fn cancel_request(
        &mut self,
        id: TaskId,
        reason: String,
        reply: oneshot::Sender<Result<TaskView, CoreError>>,
        wall: DateTime<Utc>,
    ) {
        if !self.tasks.contains(&id) {
            let err = match self.find_state(id) {
                Some(state) => CoreError::Conflict(format!("task {id} is already {state}")),
                None => CoreError::NotFound(format!("no task {id}")),
            };
            let _ = reply.send(Err(err));
            return;
        }
        let view = self.cancel_task(id, reason, wall);
        self.set_last_after(Box::new(move |r| {
            let _ = reply.send(
                r.map_err(|e| CoreError::Unavailable(e.to_string()))
                    .and_then(|()| {
                        view.ok_or_else(|| CoreError::NotFound(format!("no task {id}")))
                    }),
            );
        }));
    }

    /// Runs `after` once everything queued so far is durable.
    fn set_last_after(&mut self, after: crate::store::AfterCommit) {
        self.commit(Vec::new(), Some(after));
    }

    /// Cancels an active task (and, transitively, its blocked dependents).
    fn cancel_task(&mut self, id: TaskId, reason: String, wall: DateTime<Utc>) -> Option<TaskView> {
        let mut task = *self.tasks.remove(&id)?;
        self.dequeue(&task);
        if task.state == TaskState::Running {
            self.end_attempt(&task);
        }
        let mut notify: Option<(Conn, CancelTask)> = None;
        if task.state == TaskState::Running {
            self.orphans.remove(&id);
            if let Some(holder) = task.lease.as_ref().map(|l| l.drone) {
                if let Some(drone) = self.drones.get_mut(&holder) {
                    drone.leases.remove(&id);
                    drone.cancelling.insert(id);
                    notify = Some((
                        drone.conn.clone(),
                        CancelTask {
                            task_id: id,
                            fence: task.fence,
                            reason: reason.clone(),
                        },
                    ));
                }
            }
        }
        tracing::info!(task_id = %id, fence = %task.fence, reason = %reason, "task cancelled");
        task.state = TaskState::Cancelled;
        task.cancel_reason = Some(reason);
        task.lease = None;
        task.finished_at = Some(wall);
        let view = task.view();
        self.finish(task, wall);
        if let Some((conn, msg)) = notify {
            self.set_last_after(Box::new(move |r| {
                if r.is_ok() {
                    conn.send(QueenMessage::Cancel(msg));
                }
            }));
        }
        Some(view)
    }

    fn schedule_view(&self, s: &Schedule, wall: DateTime<Utc>) -> ScheduleView {
        let (cron, every_ms) = match &s.every {
            Every::Cron { pattern, .. } => (Some(pattern.clone()), None),
            Every::Interval { ms } => (None, Some(*ms)),
        };
        ScheduleView {
            name: s.name.clone(),
            cron,
            every_ms,
            task: s.task.clone(),
            created_at: s.created_at,
            last_run_at: (s.last_tick > s.created_at).then_some(s.last_tick),
            next_run_at: s.wake_at(wall),
        }
    }

    /// (Re)arms a schedule's timer; the previous one, if any, is dropped.
    fn arm_schedule(&mut self, name: &str, wall: DateTime<Utc>) {
        if let Some(old) = self.schedule_wake.remove(name) {
            self.schedule_timers.remove(&(old, name.to_string()));
        }
        if let Some(at) = self.schedules.get(name).and_then(|s| s.wake_at(wall)) {
            self.schedule_timers.insert((at, name.to_string()));
            self.schedule_wake.insert(name.to_string(), at);
        }
    }

    fn put_schedule(
        &mut self,
        schedule: Schedule,
        reply: oneshot::Sender<Result<(ScheduleView, bool), CoreError>>,
        wall: DateTime<Utc>,
    ) {
        let name = schedule.name.clone();
        let created = !self.schedules.contains_key(&name);
        tracing::info!(schedule = %name, created, "schedule saved");
        let m = Mutation::SaveSchedule {
            name: name.clone(),
            record: crate::store::record::encode_schedule(&schedule),
        };
        let view = self.schedule_view(&schedule, wall);
        self.schedules.insert(name.clone(), schedule);
        self.arm_schedule(&name, wall);
        self.commit(
            vec![m],
            Some(Box::new(move |r| {
                let _ = reply.send(
                    r.map(|()| (view, created))
                        .map_err(|e| CoreError::Unavailable(e.to_string())),
                );
            })),
        );
    }

    fn delete_schedule(
        &mut self,
        name: String,
        reply: oneshot::Sender<Result<ScheduleView, CoreError>>,
        wall: DateTime<Utc>,
    ) {
        let Some(s) = self.schedules.remove(&name) else {
            let _ = reply.send(Err(CoreError::NotFound(format!("no schedule {name}"))));
            return;
        };
        let view = self.schedule_view(&s, wall);
        self.arm_schedule(&name, wall);
        tracing::info!(schedule = %name, "schedule deleted");
        self.commit(
            vec![Mutation::DeleteSchedule { name }],
            Some(Box::new(move |r| {
                let _ = reply.send(
                    r.map(|()| view)
                        .map_err(|e| CoreError::Unavailable(e.to_string())),
                );
            })),
        );
    }

    /// Runs the schedules whose time has come: at most one run per tick (see
    /// `schedule.rs` for the catch-up policy).
    fn fire_schedules(&mut self, wall: DateTime<Utc>) {
        while let Some((at, name)) = self.schedule_timers.first().cloned() {
            if at > wall {
                break;
            }
            self.schedule_timers.pop_first();
            if self.schedule_wake.get(&name) != Some(&at) {
                continue;
            }
            self.schedule_wake.remove(&name);
            let Some(schedule) = self.schedules.get(&name) else {
                continue;
            };
            if let Some(tick) = schedule.due(wall) {
                let key = schedule.idempotency_key(tick);
                let spec = serde_json::from_value::<shared::api::TaskSpec>(schedule.task.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|mut spec| {
                        spec.idempotency_key = Some(key);
                        Task::from_spec(spec, TaskId::generate(), wall, &self.cfg.tasks)
                            .map_err(|e| e.0)
                    });
                match spec {
                    Ok(task) => {
                        tracing::info!(schedule = %name, tick = %tick, task_id = %task.id, "schedule fired");
                        // Nobody waits for this reply; durability and idempotency are
                        // those of any submit.
                        let (tx, _rx) = oneshot::channel();
                        self.submit(vec![task], tx, wall);
                    }
                    Err(e) => {
                        tracing::error!(schedule = %name, error = %e, "schedule's task spec is no longer valid; tick skipped");
                    }
                }
                if let Some(s) = self.schedules.get_mut(&name) {
                    s.last_tick = tick;
                    let record = crate::store::record::encode_schedule(s);
                    self.commit(
                        vec![Mutation::SaveSchedule {
                            name: name.clone(),
                            record,
                        }],
                        None,
                    );
                }
            }
            self.arm_schedule(&name, wall);
        }
    }

    fn queue_views(&self) -> Vec<QueueView> {
        let mut views: std::collections::BTreeMap<&str, QueueView> =
            std::collections::BTreeMap::new();
        let blank = |name: &str| QueueView {
            name: name.to_string(),
            pending: 0,
            scheduled: 0,
            blocked: 0,
            running: 0,
            paused: false,
            max_running: None,
            rate_per_s: None,
        };
        for (name, q) in &self.queues {
            let v = views.entry(name).or_insert_with(|| blank(name));
            v.paused = q.settings.paused;
            v.max_running = q.settings.max_running;
            v.rate_per_s = q.settings.rate_per_s;
        }
        for (queue, state, n) in self.tasks.counts() {
            let v = views.entry(queue).or_insert_with(|| blank(queue));
            match state {
                TaskState::Pending => v.pending += n,
                TaskState::Scheduled => v.scheduled += n,
                TaskState::Blocked => v.blocked += n,
                TaskState::Running => v.running += n,
                _ => {}
            }
        }
        for (queue, _) in self.finished_counts.keys() {
            views.entry(queue).or_insert_with(|| blank(queue));
        }
        views.into_values().collect()
    }

    fn set_queue(
        &mut self,
        name: String,
        change: QueueChange,
        reply: oneshot::Sender<Result<QueueView, CoreError>>,
    ) {
        if let Err(e) = crate::task::check_name("queue", &name) {
            let _ = reply.send(Err(CoreError::BadRequest(e.0)));
            return;
        }
        let mut settings: QueueSettings = self
            .queues
            .get(&name)
            .map(|q| q.settings.clone())
            .unwrap_or_default();
        match change {
            QueueChange::Pause => settings.paused = true,
            QueueChange::Resume => settings.paused = false,
            QueueChange::Limits(l) => {
                if let Some(max) = l.max_running {
                    if max == Some(0) {
                        let msg = "max_running must be at least 1 (pause the queue to stop it)";
                        let _ = reply.send(Err(CoreError::BadRequest(msg.into())));
                        return;
                    }
                    settings.max_running = max;
                }
                if let Some(rate) = l.rate_per_s {
                    if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                        let msg = "rate_per_s must be a positive number";
                        let _ = reply.send(Err(CoreError::BadRequest(msg.into())));
                        return;
                    }
                    settings.rate_per_s = rate;
                }
            }
        }
        self.dispatch_wanted = true;
        tracing::info!(queue = %name, paused = settings.paused, max_running = ?settings.max_running, rate_per_s = ?settings.rate_per_s, "queue settings changed");
        let m = Mutation::SaveQueue {
            name: name.clone(),
            record: crate::store::record::encode_queue(&settings),
        };
        self.queues.entry(name.clone()).or_default().set(settings);
        let view = self.queue_views().into_iter().find(|v| v.name == name);
        self.commit(
            vec![m],
            Some(Box::new(move |r| {
                let _ = reply.send(
                    r.map_err(|e| CoreError::Unavailable(e.to_string()))
                        .and_then(|()| {
                            view.ok_or_else(|| CoreError::NotFound(format!("no queue {name}")))
                        }),
                );
            })),
        );
    }

    fn retry(&mut self, id: TaskId, reply: oneshot::Sender<Result<TaskView, CoreError>>) {
        let conflict = |state: TaskState| {
            CoreError::Conflict(format!(
                "task {id} is {state}; only failed or cancelled tasks can be retried"
            ))
        };
        if let Some(state) = self.tasks.state(&id) {
            let _ = reply.send(Err(conflict(state)));
            return;
        }
        let found = match self.recent.get(&id) {
            Some((_, t)) => Some(t.clone()),
            None => match self.reader.finished(id) {
                Ok(t) => t,
                Err(e) => {
                    let _ = reply.send(Err(CoreError::Unavailable(e.to_string())));
                    return;
                }
            },
        };
        let Some(mut task) = found else {
            let _ = reply.send(Err(CoreError::NotFound(format!("no task {id}"))));
            return;
        };
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            let _ = reply.send(Err(conflict(task.state)));
            return;
        }
        self.recent.remove(&id);
        let old_state = task.state;
        let finished_ms = task.finished_at.map(|t| t.timestamp_millis()).unwrap_or(0);
        let n = self
            .finished_counts
            .entry((task.queue.clone(), old_state))
            .or_default();
        *n = n.saturating_sub(1);
        let count = *n;
        // A fresh set of attempts; the fence keeps growing and the error history stays.
        task.state = TaskState::Pending;
        task.attempts = 0;
        task.lost = 0;
        task.result = None;
        task.checkpoint = None;
        task.cancel_reason = None;
        task.finished_at = None;
        task.run_at = None;
        task.lease = None;
        tracing::info!(task_id = %id, was = %old_state, fence = %task.fence, "task retried");
        self.metrics
            .retried
            .with_label_values(&[task.queue.as_str()])
            .inc();
        let m = Mutation::Revive {
            id,
            record: crate::store::record::encode(&task),
            finished_ms,
            queue: task.queue.clone(),
            state: old_state,
            count,
        };
        if let Some(key) = &task.idempotency_key {
            self.idem.insert(key.clone(), id);
        }
        self.enqueue(&task);
        let view = task.view();
        self.tasks.insert(Box::new(task));
        self.commit(
            vec![m],
            Some(Box::new(move |r| {
                let _ = reply.send(
                    r.map(|()| view)
                        .map_err(|e| CoreError::Unavailable(e.to_string())),
                );
            })),
        );
    }

    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for st in TaskState::ALL {
            stats.by_state.insert(st.as_str().to_string(), 0);
        }
        let mut add = |queue: &str, state: TaskState, n: u64| {
            *stats
                .by_state
                .entry(state.as_str().to_string())
                .or_default() += n;
            *stats
                .by_queue
                .entry(queue.to_string())
                .or_default()
                .entry(state.as_str().to_string())
                .or_default() += n;
        };
        for (queue, state, n) in self.tasks.counts() {
            add(queue, state, n);
        }
        for ((queue, state), n) in &self.finished_counts {
            if *n > 0 {
                add(queue, *state, *n);
            }
        }
        stats.drones_connected = self.drones.len() as u64;
        stats.unroutable = self
            .ready
            .routes()
            .filter(|(route, _)| {
                !self
                    .drones
                    .values()
                    .any(|d| route.served_by(&d.kinds, &d.labels))
            })
            .map(|(_, n)| n as u64)
            .sum();
        stats
    }

    // ----- drones ------------------------------------------------------------------------

    fn hello(&mut self, hello: Hello, conn: Conn, now: Instant, wall: DateTime<Utc>) {
        let reject = |conn: &Conn, reason: String| {
            tracing::warn!(drone = %hello.drone_id, name = %hello.name, reason = %reason, "drone rejected");
            conn.send(QueenMessage::Reject(Reject {
                reason,
                supported_versions: SUPPORTED_VERSIONS.to_vec(),
                code: None,
            }));
        };
        if !SUPPORTED_VERSIONS.contains(&hello.protocol_version) {
            let reason = format!(
                "protocol version {} is not supported; this queen speaks {:?}",
                hello.protocol_version, SUPPORTED_VERSIONS
            );
            return reject(&conn, reason);
        }
        if let Some(token) = self.cfg.auth.drone() {
            let ok = hello.token.as_ref().is_some_and(|t| token.matches(&t.0));
            if !ok {
                return reject(&conn, "invalid or missing auth token".into());
            }
        }
        if hello.slots == 0 || hello.slots > MAX_SLOTS {
            return reject(
                &conn,
                format!(
                    "slots must be between 1 and {MAX_SLOTS}, got {}",
                    hello.slots
                ),
            );
        }
        if hello.name.is_empty() || hello.name.len() > crate::task::MAX_NAME_LEN {
            return reject(&conn, "name must be 1-128 bytes".into());
        }
        if self.drones.contains_key(&hello.drone_id) {
            // The same drone on a new connection: the old one is dead or dying.
            self.detach(hello.drone_id, now + self.cfg.leases.reconnect_grace());
        }
        conn.send(QueenMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: self.cfg.leases.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.cfg.leases.heartbeat_timeout_ms,
        }));
        let id = hello.drone_id;
        let mut drone = Drone {
            id,
            name: hello.name,
            labels: hello.labels.into_iter().collect(),
            kinds: hello.kinds.into_iter().collect(),
            slots: hello.slots,
            conn,
            leases: HashMap::new(),
            cancelling: HashSet::new(),
            reported: HashSet::new(),
            last_seen: now,
            last_seen_wall: wall,
            assigns_sent: 0,
            draining: hello.draining,
        };
        let mut reattached = 0;
        for held in &hello.held {
            let current = self
                .tasks
                .get(&held.task_id)
                .map(|t| (t.state, t.fence, t.lease.as_ref().map(|l| l.drone)));
            match rules::reattach(current, id, held.fence) {
                Reattach::Keep => {
                    self.orphans.remove(&held.task_id);
                    drone.leases.insert(
                        held.task_id,
                        LiveLease {
                            fence: held.fence,
                            ordinal: 0,
                        },
                    );
                    reattached += 1;
                    tracing::info!(task_id = %held.task_id, drone = %id, fence = %held.fence, "lease re-attached");
                }
                Reattach::Cancel => {
                    drone.cancelling.insert(held.task_id);
                    tracing::info!(task_id = %held.task_id, drone = %id, fence = %held.fence, "drone holds a stale lease; telling it to stop");
                    drone.conn.send(QueenMessage::Cancel(CancelTask {
                        task_id: held.task_id,
                        fence: held.fence,
                        reason: "lease is no longer valid".into(),
                    }));
                }
            }
        }
        tracing::info!(drone = %id, name = %drone.name, slots = drone.slots, reattached, "drone connected");
        self.conn_drone.insert(drone.conn.id, id);
        self.drones.insert(id, drone);
        self.slot_may_have_freed(id);
        // Orphaned leases of this drone that it did not report are gone with its old life.
        let lost: Vec<TaskId> = self
            .orphans
            .keys()
            .filter(|tid| {
                self.tasks
                    .get(tid)
                    .is_some_and(|t| t.lease.as_ref().is_some_and(|l| l.drone == id))
            })
            .copied()
            .collect();
        for tid in lost {
            self.orphans.remove(&tid);
            self.lose_lease(tid, "drone reconnected without the task", wall);
        }
    }

    /// Disconnects a drone; its leases become orphans given up at `deadline`.
    fn detach(&mut self, id: DroneId, deadline: Instant) {
        let Some(drone) = self.drones.remove(&id) else {
            return;
        };
        self.conn_drone.remove(&drone.conn.id);
        drone.conn.close.cancel();
        for tid in drone.leases.into_keys() {
            self.orphans.insert(tid, deadline);
        }
    }

    fn drone_message(&mut self, conn: u64, msg: DroneMessage, now: Instant, wall: DateTime<Utc>) {
        let Some(id) = self.conn_drone.get(&conn).copied() else {
            return;
        };
        let Some(drone) = self.drones.get_mut(&id) else {
            return;
        };
        drone.last_seen = now;
        drone.last_seen_wall = wall;
        match msg {
            DroneMessage::Hello(_) => {
                tracing::warn!(drone = %id, "second hello on one connection ignored");
            }
            DroneMessage::Drain => {
                tracing::info!(drone = %id, "drone is draining: no new leases");
                drone.draining = true;
            }
            DroneMessage::Heartbeat(hb) => {
                self.checkpoints(id, hb.checkpoints);
                self.heartbeat(id, &hb.held, hb.assigns_seen, wall)
            }
            DroneMessage::TaskComplete(c) => {
                let result = cap_result(c.result, self.cfg.tasks.max_result_bytes);
                self.outcome(id, c.task_id, c.fence, Ok(result), wall);
            }
            DroneMessage::TaskFailed(f) => {
                let result = f
                    .result
                    .map(|r| cap_result(r, self.cfg.tasks.max_result_bytes));
                self.outcome(
                    id,
                    f.task_id,
                    f.fence,
                    Err((f.error, f.retryable, result)),
                    wall,
                );
            }
        }
    }

    /// Stores checkpoints reported for current leases of this drone; anything else (an
    /// old fence, another drone's task, an oversized checkpoint) is ignored.
    fn checkpoints(&mut self, drone: DroneId, reports: Vec<shared::protocol::Checkpoint>) {
        let max = self.cfg.tasks.max_checkpoint_bytes;
        for c in reports {
            // Only a running task (always held whole) can take one: a report naming any
            // other task must not pull it back into memory.
            if self.tasks.state(&c.task_id) != Some(TaskState::Running) {
                continue;
            }
            let Some(mut task) = self.tasks.get_mut(&c.task_id) else {
                continue;
            };
            let current = task.state == TaskState::Running
                && task.fence == c.fence
                && task.lease.as_ref().is_some_and(|l| l.drone == drone);
            if !current {
                continue;
            }
            let size = c.data.to_string().len();
            if size > max {
                tracing::warn!(task_id = %c.task_id, fence = %c.fence, size, max, "checkpoint too large; ignored (tasks.max_checkpoint_bytes)");
                continue;
            }
            task.checkpoint = Some(Box::new(c.data));
            let m = Mutation::save(&task);
            drop(task);
            self.commit(vec![m], None);
        }
    }

    fn heartbeat(&mut self, id: DroneId, held: &[Held], assigns_seen: u64, wall: DateTime<Utc>) {
        let Some(drone) = self.drones.get_mut(&id) else {
            return;
        };
        let known: HashSet<TaskId> = drone.cancelling.union(&drone.reported).copied().collect();
        let r = rules::reconcile(&drone.leases, &known, held, assigns_seen);
        for tid in &r.released {
            drone.cancelling.remove(tid);
            drone.reported.remove(tid);
        }
        for h in &r.foreign {
            tracing::info!(task_id = %h.task_id, drone = %id, fence = %h.fence, "drone runs a task it holds no lease for; telling it to stop");
            drone.cancelling.insert(h.task_id);
            drone.conn.send(QueenMessage::Cancel(CancelTask {
                task_id: h.task_id,
                fence: h.fence,
                reason: "lease is no longer valid".into(),
            }));
        }
        for tid in &r.missing {
            drone.leases.remove(tid);
        }
        if !r.released.is_empty() || !r.missing.is_empty() {
            self.slot_may_have_freed(id);
        }
        for tid in r.missing {
            self.lose_lease(tid, "drone no longer reports the task", wall);
        }
    }

    fn outcome(
        &mut self,
        drone_id: DroneId,
        task_id: TaskId,
        fence: Fence,
        outcome: Result<Value, (String, bool, Option<Value>)>,
        wall: DateTime<Utc>,
    ) {
        // Only the lease holder may record: a fence is a small number another drone could
        // guess, so an outcome from any other drone is stale whatever fence it carries.
        let current = self
            .tasks
            .get(&task_id)
            .filter(|t| t.lease.as_ref().is_some_and(|l| l.drone == drone_id))
            .map(|t| (t.state, t.fence));
        let verdict = rules::judge_outcome(current, fence);
        let Some(drone) = self.drones.get_mut(&drone_id) else {
            return;
        };
        drone.cancelling.remove(&task_id);
        drone.reported.insert(task_id);
        if drone.leases.get(&task_id).is_some_and(|l| l.fence == fence) {
            drone.leases.remove(&task_id);
        }
        let conn = drone.conn.clone();
        self.slot_may_have_freed(drone_id);
        let status = match verdict {
            Verdict::Stale => {
                self.metrics.stale_completions.inc();
                tracing::info!(task_id = %task_id, drone = %drone_id, fence = %fence, current = ?current, "stale outcome ignored");
                AckStatus::Stale
            }
            Verdict::Record => {
                self.orphans.remove(&task_id);
                match outcome {
                    Ok(result) => self.succeed(task_id, result, wall),
                    Err((error, retryable, result)) => {
                        self.attempt_failed(task_id, error, retryable, result, Some(drone_id), wall)
                    }
                }
                AckStatus::Recorded
            }
        };
        // Acked once everything before it is durable, the outcome included.
        self.set_last_after(Box::new(move |r| {
            if r.is_ok() {
                conn.send(QueenMessage::Ack(Ack {
                    task_id,
                    fence,
                    status,
                }));
            }
        }));
    }

    fn succeed(&mut self, id: TaskId, result: Value, wall: DateTime<Utc>) {
        let Some(mut task) = self.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        self.end_attempt(&task);
        tracing::debug!(task_id = %id, fence = %task.fence, attempt = task.attempts, "task succeeded");
        task.state = TaskState::Succeeded;
        task.result = Some(Box::new(result));
        task.lease = None;
        task.finished_at = Some(wall);
        self.finish(task, wall);
    }

    fn attempt_failed(
        &mut self,
        id: TaskId,
        error: String,
        retryable: bool,
        result: Option<Value>,
        drone: Option<DroneId>,
        wall: DateTime<Utc>,
    ) {
        let Some(mut task) = self.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        self.end_attempt(&task);
        task.errors.push(AttemptError {
            attempt: task.attempts,
            fence: task.fence,
            drone,
            error: error.clone(),
            at: wall,
        });
        task.lease = None;
        if result.is_some() {
            task.result = result.map(Box::new);
        }
        let jitter: f64 = self.rng.random();
        match rules::after_failure(
            task.attempts,
            task.max_attempts,
            retryable,
            wall,
            &self.retry.with(task.retry.as_deref()),
            jitter,
        ) {
            AfterFailure::Retry { at } => {
                self.metrics
                    .retried
                    .with_label_values(&[task.queue.as_str()])
                    .inc();
                tracing::info!(task_id = %id, fence = %task.fence, attempt = task.attempts, error = %error, retry_at = %at, "attempt failed; retry scheduled");
                task.state = TaskState::Scheduled;
                task.run_at = Some(at);
                self.enqueue(&task);
                let m = Mutation::save(&task);
                self.tasks.insert(Box::new(task));
                self.commit(vec![m], None);
            }
            AfterFailure::Fail => {
                tracing::info!(task_id = %id, fence = %task.fence, attempt = task.attempts, error = %error, "task failed");
                task.state = TaskState::Failed;
                task.finished_at = Some(wall);
                self.finish(task, wall);
            }
        }
    }

    /// A running task's lease is gone (drone died, went silent, dropped it): requeue it,
    /// or fail it when that was its last attempt (lost leases count, SPEC G8).
    fn lose_lease(&mut self, id: TaskId, reason: &str, wall: DateTime<Utc>) {
        let Some(mut task) = self.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        if task.state != TaskState::Running {
            self.tasks.insert(Box::new(task));
            return;
        }
        self.end_attempt(&task);
        self.metrics.lease_expirations.inc();
        task.lost += 1;
        let drone = task.lease.as_ref().map(|l| l.drone);
        task.errors.push(AttemptError {
            attempt: task.attempts,
            fence: task.fence,
            drone,
            error: format!("lease lost: {reason}"),
            at: wall,
        });
        task.lease = None;
        let max_lost = self.cfg.tasks.max_lost_attempts;
        match rules::after_lost_lease(task.attempts, task.max_attempts, task.lost, max_lost) {
            AfterLostLease::Requeue => {
                self.metrics
                    .requeued
                    .with_label_values(&[task.queue.as_str()])
                    .inc();
                tracing::warn!(task_id = %id, drone = ?drone, fence = %task.fence, reason, "lease lost; task requeued");
                task.state = TaskState::Pending;
                self.enqueue(&task);
                let m = Mutation::save(&task);
                self.tasks.insert(Box::new(task));
                self.commit(vec![m], None);
            }
            AfterLostLease::Quarantine => {
                tracing::error!(task_id = %id, drone = ?drone, fence = %task.fence, lost = task.lost, "task lost its lease too often (it may be killing its drones); quarantined as failed");
                // One error per attempt: the verdict goes on this attempt's entry.
                if let Some(last) = task.errors.last_mut() {
                    last.error = format!(
                        "{}; quarantined: {} attempts ended with the drone lost (tasks.max_lost_attempts = {max_lost})",
                        last.error, task.lost
                    );
                }
                task.state = TaskState::Failed;
                task.finished_at = Some(wall);
                self.finish(task, wall);
            }
            AfterLostLease::Fail => {
                tracing::warn!(task_id = %id, drone = ?drone, fence = %task.fence, reason, "lease lost on the last attempt; task failed");
                task.state = TaskState::Failed;
                task.finished_at = Some(wall);
                self.finish(task, wall);
            }
        }
    }

    /// Records a terminal task (already removed from `tasks`) and settles its dependents.
    fn finish(&mut self, task: Task, wall: DateTime<Utc>) {
        if let Some(key) = &task.idempotency_key {
            if self.idem.get(key) == Some(&task.id) {
                self.idem.remove(key);
            }
        }
        let count = self.bump_finished(&task);
        let seq = self.commit(vec![Mutation::finish(&task, count)], None);
        let (id, state) = (task.id, task.state);
        self.remember_recent(seq, task);
        if let Some(waiting) = self.dependents.remove(&id) {
            for dep in waiting {
                if state == TaskState::Succeeded {
                    self.reevaluate_blocked(dep, wall);
                } else if self.tasks.state(&dep) == Some(TaskState::Blocked) {
                    self.cancel_task(dep, format!("dependency {id} {state}"), wall);
                }
            }
        }
    }

    /// Unblocks a blocked task whose dependencies all succeeded (or cancels it if one
    /// ended otherwise).
    fn reevaluate_blocked(&mut self, id: TaskId, wall: DateTime<Utc>) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        if task.state != TaskState::Blocked {
            return;
        }
        let deps = task.depends_on.clone();
        let mut all_ok = true;
        for dep in deps {
            match self.find_state(dep) {
                Some(TaskState::Succeeded) => {}
                Some(st @ (TaskState::Failed | TaskState::Cancelled)) => {
                    self.cancel_task(id, format!("dependency {dep} {st}"), wall);
                    return;
                }
                None => {
                    self.cancel_task(id, format!("dependency {dep} no longer exists"), wall);
                    return;
                }
                Some(_) => all_ok = false,
            }
        }
        if !all_ok {
            return;
        }
        let Some(mut task) = self.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        task.state = TaskState::Pending;
        normalize_waiting(&mut task, wall);
        self.enqueue(&task);
        let m = Mutation::save(&task);
        self.tasks.insert(Box::new(task));
        self.commit(vec![m], None);
    }

    /// Bookkeeping when a running attempt ends, however it ends: its queen-side deadline
    /// goes, and its queue has one task fewer running.
    /// A running attempt ends (outcome, timeout, lost lease, cancel).
    fn end_attempt(&mut self, task: &Task) {
        // The queue's concurrency limit may now let another task start.
        self.dispatch_wanted = true;
        if let Some(started) = task.started_at {
            let secs = (Utc::now() - started).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.metrics
                .run_duration
                .with_label_values(&[task.queue.as_str()])
                .observe(secs.max(0.0));
        }
        if let Some((at, fence)) = self.deadline_of.remove(&task.id) {
            self.attempt_deadlines.remove(&(at, task.id, fence));
        }
        if let Some(q) = self.queues.get_mut(&task.queue) {
            q.ended();
        }
    }

    fn bump_finished(&mut self, task: &Task) -> u64 {
        let counter = match task.state {
            TaskState::Succeeded => Some(&self.metrics.succeeded),
            TaskState::Failed => Some(&self.metrics.failed),
            TaskState::Cancelled => Some(&self.metrics.cancelled),
            _ => None,
        };
        if let Some(c) = counter {
            c.with_label_values(&[task.queue.as_str()]).inc();
        }
        let n = self
            .finished_counts
            .entry((task.queue.clone(), task.state))
            .or_default();
        *n += 1;
        *n
    }

    fn remember_recent(&mut self, seq: u64, task: Task) {
        self.recent_order.push_back((seq, task.id));
        self.recent.insert(task.id, (seq, task));
    }

    /// Puts a pending task in its ready queue or a scheduled one on the timer.
    fn enqueue(&mut self, task: &Task) {
        match task.state {
            TaskState::Pending => self.ready.push(task),
            TaskState::Scheduled => {
                if let Some(at) = task.run_at {
                    self.scheduled.insert((at, task.id));
                }
            }
            _ => {}
        }
    }

    fn dequeue(&mut self, task: &Task) {
        match task.state {
            TaskState::Pending => self.ready.remove(task),
            TaskState::Scheduled => {
                if let Some(at) = task.run_at {
                    self.scheduled.remove(&(at, task.id));
                }
            }
            _ => {}
        }
    }

    // ----- time --------------------------------------------------------------------------

    fn tick(&mut self, now: Instant, wall: DateTime<Utc>) {
        self.next_tick = now + TICK;
        // Rate-limit tokens refill with time.
        self.dispatch_wanted = true;
        self.fire_schedules(wall);
        // Scheduled tasks whose time has come. Not written back: a restart derives
        // `pending` from `run_at` having passed.
        while let Some(&(at, id)) = self.scheduled.first() {
            if at > wall {
                break;
            }
            self.scheduled.pop_first();
            if let Some(mut task) = self.tasks.get_mut(&id) {
                if task.state == TaskState::Scheduled && task.run_at == Some(at) {
                    task.state = TaskState::Pending;
                    task.run_at = None;
                    let snapshot = task.clone();
                    self.ready.push(&snapshot);
                }
            }
        }
        if now >= self.next_drone_check {
            self.next_drone_check = now + self.cfg.leases.heartbeat_interval() / 2;
            let timeout = self.cfg.leases.heartbeat_timeout();
            let silent: Vec<DroneId> = self
                .drones
                .values()
                .filter(|d| rules::is_silent(d.last_seen, now, timeout))
                .map(|d| d.id)
                .collect();
            for id in silent {
                tracing::warn!(drone = %id, timeout_ms = timeout.as_millis() as u64, "drone silent past the heartbeat timeout; expiring its leases");
                self.detach(id, now);
            }
        }
        let expired: Vec<TaskId> = self
            .orphans
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.orphans.remove(&id);
            self.lose_lease(id, "drone did not come back in time", wall);
        }
        while let Some(&(deadline, id, fence)) = self.attempt_deadlines.first() {
            if deadline > now {
                break;
            }
            self.attempt_deadlines.pop_first();
            self.deadline_of.remove(&id);
            let still = self
                .tasks
                .get(&id)
                .is_some_and(|t| t.state == TaskState::Running && t.fence == fence);
            if still {
                let holder = self
                    .tasks
                    .get(&id)
                    .and_then(|t| t.lease.as_ref().map(|l| l.drone));
                if let Some(drone) = holder.and_then(|h| self.drones.get_mut(&h)) {
                    drone.leases.remove(&id);
                    drone.cancelling.insert(id);
                    drone.conn.send(QueenMessage::Cancel(CancelTask {
                        task_id: id,
                        fence,
                        reason: "attempt timed out".into(),
                    }));
                }
                self.orphans.remove(&id);
                self.attempt_failed(
                    id,
                    "timed out: no report from the drone within timeout_ms".into(),
                    true,
                    None,
                    holder,
                    wall,
                );
            }
        }
        let durable = self.writer.durable();
        while let Some(&(seq, id)) = self.recent_order.front() {
            if seq > durable {
                break;
            }
            self.recent_order.pop_front();
            // Only if it is still that commit's copy (a retried task may have finished again).
            if self.recent.get(&id).is_some_and(|(s, _)| *s == seq) {
                self.recent.remove(&id);
            }
        }
        if now >= self.next_purge {
            self.next_purge = now + Duration::from_millis(self.cfg.retention.purge_interval_ms);
            self.purge(wall);
        }
    }

    fn purge(&mut self, wall: DateTime<Utc>) {
        let age = chrono::Duration::seconds(
            self.cfg
                .retention
                .finished_max_age_s
                .min(i64::MAX as u64 / 1000) as i64,
        );
        let cutoff = (wall - age).timestamp_millis();
        let max_count = self.cfg.retention.finished_max_count;
        let total: u64 = self.finished_counts.values().sum();
        let over = if max_count > 0 {
            total.saturating_sub(max_count)
        } else {
            0
        };
        // The retention index is oldest first, so the tasks past the age limit are also
        // the first to go when there are too many.
        let scan = |cutoff: i64, limit: usize| {
            self.reader.expired(cutoff, limit).map_err(|e| {
                tracing::error!(error = %e, "reading expired tasks failed");
            })
        };
        let Ok(mut expired) = scan(cutoff, PURGE_BATCH) else {
            return;
        };
        if (expired.len() as u64) < over {
            let Ok(by_count) = scan(i64::MAX, over.min(PURGE_BATCH as u64) as usize) else {
                return;
            };
            expired = by_count;
        }
        // A task retried since its finished record was read is active again.
        expired.retain(|e| !self.tasks.contains(&e.id));
        if expired.len() >= PURGE_BATCH {
            // A backlog: come back soon rather than after a whole purge interval.
            self.next_purge = Instant::now() + PURGE_BACKLOG_PAUSE;
        }
        if expired.is_empty() {
            return;
        }
        tracing::info!(
            count = expired.len(),
            "purging finished tasks past retention"
        );
        let mut mutations = Vec::with_capacity(expired.len());
        for e in expired {
            let n = self
                .finished_counts
                .entry((e.entry.queue.clone(), e.entry.state))
                .or_default();
            *n = n.saturating_sub(1);
            mutations.push(Mutation::Purge {
                count: *n,
                expired: e,
            });
        }
        self.commit(mutations, None);
    }

    // ----- dispatch ----------------------------------------------------------------------

    /// Leases ready tasks to drones with free slots, one per drone per round so work
    /// spreads across the hive.
    fn slot_may_have_freed(&mut self, drone: DroneId) {
        self.maybe_free.insert(drone);
        self.dispatch_wanted = true;
    }

    /// Leases ready tasks to drones with free slots, round-robin. Runs only when something
    /// changed that could let it progress, and looks only at drones that may have a free
    /// slot and at the heads of the ready groups: no scan of drones or tasks.
    fn dispatch(&mut self, wall: DateTime<Utc>) {
        if self.ready.is_empty()
            || (!self.dispatch_wanted && self.ready.pushes() == self.ready_pushes_seen)
        {
            return;
        }
        self.dispatch_wanted = false;
        let drones = &self.drones;
        self.maybe_free
            .retain(|id| drones.get(id).is_some_and(|d| d.free_slots() > 0));
        let mut candidates = std::mem::take(&mut self.dispatch_buf);
        candidates.clear();
        candidates.extend(self.maybe_free.iter().copied());
        if !candidates.is_empty() {
            let n = candidates.len();
            candidates.rotate_left(self.rr % n);
            self.rr = self.rr.wrapping_add(1);
            self.dispatch_to(&candidates, wall);
        }
        self.dispatch_buf = candidates;
        self.ready_pushes_seen = self.ready.pushes();
    }

    fn dispatch_to(&mut self, candidates: &[DroneId], wall: DateTime<Utc>) {
        let now = Instant::now();
        loop {
            let mut progress = false;
            for id in candidates {
                let Some(drone) = self.drones.get(id) else {
                    continue;
                };
                if drone.free_slots() == 0 {
                    continue;
                }
                let queues = &self.queues;
                let open = |q: &str| queues.get(q).is_none_or(|q| q.may_start(now));
                let Some((tid, since)) = self.ready.pop_for(&drone.kinds, &drone.labels, &open)
                else {
                    continue;
                };
                if drone.cancelling.contains(&tid) {
                    // This drone is still killing an older attempt of the task: give it
                    // to another drone (or to this one once the old attempt is gone).
                    if let Some(task) = self.tasks.get(&tid) {
                        self.ready.push_since(&task, since);
                    }
                    continue;
                }
                self.metrics.dispatch_latency.observe(
                    now.into_std()
                        .saturating_duration_since(since)
                        .as_secs_f64(),
                );
                self.grant(*id, tid, wall);
                progress = true;
                if self.ready.is_empty() {
                    return;
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn grant(&mut self, drone_id: DroneId, tid: TaskId, wall: DateTime<Utc>) {
        let (Some(mut task), Some(drone)) =
            (self.tasks.get_mut(&tid), self.drones.get_mut(&drone_id))
        else {
            return;
        };
        task.state = TaskState::Running;
        task.attempts += 1;
        task.fence = task.fence.next();
        task.lease = Some(Box::new(Lease {
            drone: drone_id,
            drone_name: drone.name.clone(),
        }));
        task.started_at = Some(wall);
        task.run_at = None;
        drone.assigns_sent += 1;
        self.queues
            .entry(task.queue.clone())
            .or_default()
            .started(Instant::now());
        drone.leases.insert(
            tid,
            LiveLease {
                fence: task.fence,
                ordinal: drone.assigns_sent,
            },
        );
        if let Some(ms) = task.timeout_ms {
            let deadline =
                Instant::now() + Duration::from_millis(ms) + self.cfg.leases.heartbeat_timeout();
            self.attempt_deadlines.insert((deadline, tid, task.fence));
            self.deadline_of.insert(tid, (deadline, task.fence));
        }
        // Per-task lines are debug: at tens of thousands of tasks a second, info-level
        // lines per task would cost more than scheduling them.
        tracing::debug!(task_id = %tid, drone = %drone_id, fence = %task.fence, attempt = task.attempts, "lease granted");
        let msg = QueenMessage::Assign(Assign {
            task_id: tid,
            fence: task.fence,
            attempt: task.attempts,
            kind: task.kind.clone(),
            queue: task.queue.clone(),
            payload: task.payload.to_value(),
            timeout_ms: task.timeout_ms,
            checkpoint: task.checkpoint.as_deref().cloned(),
        });
        let m = Mutation::save(&task);
        drop(task);
        let conn = drone.conn.clone();
        // The grant, with its fence, is durable before the drone hears of it.
        self.commit(
            vec![m],
            Some(Box::new(move |r| {
                if r.is_ok() {
                    conn.send(msg);
                }
            })),
        );
    }
}

/// Requests answered exactly while recovery is still reading tasks (see [`Core::run`]).
fn answerable_while_recovering(req: &Request) -> bool {
    matches!(
        req,
        Request::Get { .. } | Request::Drones { .. } | Request::Schedules { .. }
    )
}

/// A waiting task as it is after a restart: pending once its `run_at` has passed.
fn normalize_waiting(task: &mut Task, wall: DateTime<Utc>) {
    if !matches!(task.state, TaskState::Pending | TaskState::Scheduled) {
        return;
    }
    if task.run_at.is_some_and(|at| at > wall) {
        task.state = TaskState::Scheduled;
    } else {
        task.state = TaskState::Pending;
        task.run_at = None;
    }
}

async fn next_chunk(chunks: &mut Option<Chunks>) -> Option<Loaded> {
    match chunks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands memory freed by the startup (tasks decoded on other threads and demoted, the
/// decode buffers) back to the OS; allocators otherwise keep it resident for reuse, so a
/// queen that recovered a large backlog would look as big as its startup peak. The queen
/// binary allocates with mimalloc; glibc's heap is trimmed too for embedders and tests.
fn release_free_memory() {
    // SAFETY: both calls only return free memory to the OS; they take no pointers.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        libc::malloc_trim(0);
    }
}

fn drone_view(d: &Drone) -> DroneView {
    let mut running: Vec<TaskId> = d.leases.keys().copied().collect();
    running.sort();
    let mut labels: Vec<String> = d.labels.iter().cloned().collect();
    labels.sort();
    let mut kinds: Vec<String> = d.kinds.iter().cloned().collect();
    kinds.sort();
    DroneView {
        id: d.id,
        name: d.name.clone(),
        labels,
        kinds,
        slots: d.slots,
        running,
        connected: true,
        draining: d.draining,
        last_seen: d.last_seen_wall,
    }
}

/// Keeps results bounded: a larger one is replaced by a marked, truncated preview.
pub fn cap_result(result: Value, max_bytes: usize) -> Value {
    let text = result.to_string();
    if text.len() <= max_bytes {
        return result;
    }
    let mut cut = max_bytes.saturating_sub(128).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    serde_json::json!({
        "truncated": true,
        "original_bytes": text.len(),
        "preview": &text[..cut],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    mod recovery {
        use super::*;
        use crate::store::{OpenOptionsHive, Store};
        use shared::api::TaskSpec;

        fn opts(dir: &std::path::Path) -> OpenOptionsHive {
            OpenOptionsHive {
                data_dir: dir.to_path_buf(),
                cache_capacity_bytes: 8 << 20,
                sync: false,
                metrics: Default::default(),
            }
        }

        fn task(cfg: &Config) -> Task {
            let spec = TaskSpec {
                kind: "echo".into(),
                ..Default::default()
            };
            Task::from_spec(spec, TaskId::generate(), Utc::now(), &cfg.tasks).expect("valid")
        }

        /// A store holding `tasks` as pending, reopened: the core built on it has read
        /// nothing of them yet. The test feeds the recovered chunks itself.
        async fn core_on(
            dir: &std::path::Path,
            tasks: &[Task],
        ) -> (Core, CoreHandle, mpsc::Receiver<Request>, Store) {
            let cfg = Config::default();
            {
                let (store, writer, _) =
                    Store::open(&opts(dir), CancellationToken::new()).expect("open");
                let (tx, rx) = oneshot::channel();
                writer
                    .send(Commit {
                        mutations: tasks.iter().map(Mutation::save).collect(),
                        after: Some(Box::new(move |r| drop(tx.send(r)))),
                    })
                    .await;
                rx.await.expect("answered").expect("durable");
                drop(writer);
                let Store { writer_thread, .. } = store;
                writer_thread.join().expect("writer exits");
            }
            let (store, writer, recovered) =
                Store::open(&opts(dir), CancellationToken::new()).expect("reopen");
            let reader = store.reader.clone();
            let (core, handle, rx) = Core::new(
                Arc::new(cfg),
                writer,
                reader,
                recovered,
                Metrics::new(),
                CancellationToken::new(),
            );
            (core, handle, rx, store)
        }

        #[tokio::test]
        async fn requests_wait_for_recovery_except_exact_reads_and_then_run_in_order() {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = Config::default();
            let (a, b) = (task(&cfg), task(&cfg));
            let (core, handle, rx, store) = core_on(dir.path(), &[a.clone(), b.clone()]).await;
            let (chunk_tx, chunk_rx) = mpsc::channel(4);
            let shutdown = CancellationToken::new();
            let served = tokio::spawn(core.serve(rx, shutdown.clone(), Some(chunk_rx)));

            let fresh = task(&cfg);
            let (submit_tx, mut submit_rx) = oneshot::channel();
            handle
                .send(Request::Submit {
                    tasks: vec![fresh.clone()],
                    reply: submit_tx,
                })
                .await
                .expect("sent");
            let (stats_tx, mut stats_rx) = oneshot::channel();
            handle
                .send(Request::Stats { reply: stats_tx })
                .await
                .expect("sent");
            // Answered in order after the two above: a task not read yet comes from the
            // store, exactly as stored.
            let got = handle
                .ask(|reply| Request::Get { id: b.id, reply })
                .await
                .expect("answered")
                .expect("found while recovering");
            assert_eq!((got.id, got.state), (b.id, TaskState::Pending));
            assert!(!handle.is_recovered());
            assert!(
                stats_rx.try_recv().is_err(),
                "counts wait until every task is read"
            );
            assert!(submit_rx.try_recv().is_err(), "writes wait for recovery");
            let unmade = handle
                .ask(|reply| Request::Get {
                    id: fresh.id,
                    reply,
                })
                .await
                .expect("answered");
            assert!(unmade.is_none(), "the held submit created nothing yet");
            assert!(
                store.reader.active(fresh.id).expect("read").is_none(),
                "nothing is written before recovery ends"
            );

            chunk_tx
                .send(Loaded::Chunk(vec![
                    Recovered {
                        task: a,
                        whole: true,
                    },
                    Recovered {
                        task: b,
                        whole: true,
                    },
                ]))
                .await
                .expect("core takes chunks");
            chunk_tx
                .send(Loaded::Done)
                .await
                .expect("core takes chunks");
            let created = submit_rx.await.expect("answered").expect("accepted");
            assert_eq!(created.len(), 1);
            assert!(created[0].1, "created");
            let stats = stats_rx.await.expect("answered after recovery");
            assert_eq!(
                stats.by_state.get("pending"),
                Some(&3),
                "the two recovered tasks and the one submitted meanwhile"
            );
            assert!(handle.is_recovered());
            shutdown.cancel();
            served.await.expect("join").expect("clean stop");
        }

        #[tokio::test]
        async fn a_failed_read_stops_the_core_before_anything_waiting_is_written() {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = Config::default();
            let (core, handle, rx, store) = core_on(dir.path(), &[task(&cfg)]).await;
            let fatal = core.fatal.clone();
            let (chunk_tx, chunk_rx) = mpsc::channel(4);
            let served = tokio::spawn(core.serve(rx, CancellationToken::new(), Some(chunk_rx)));
            let fresh = task(&cfg);
            let (submit_tx, submit_rx) = oneshot::channel();
            handle
                .send(Request::Submit {
                    tasks: vec![fresh.clone()],
                    reply: submit_tx,
                })
                .await
                .expect("sent");
            // Answered after the submit was taken (and held): requests run in order.
            let seen = handle
                .ask(|reply| Request::Get {
                    id: fresh.id,
                    reply,
                })
                .await
                .expect("answered");
            assert!(seen.is_none(), "the held submit created nothing yet");
            chunk_tx
                .send(Loaded::Failed(StoreError::Corrupt {
                    path: dir.path().to_path_buf(),
                    detail: "planted".into(),
                }))
                .await
                .expect("core takes chunks");
            assert!(
                submit_rx.await.is_err(),
                "the held submit is dropped unanswered, never accepted"
            );
            let err = served.await.expect("join").expect_err("recovery failed");
            assert!(err.to_string().contains("planted"), "{err}");
            assert!(fatal.is_cancelled());
            assert!(store.reader.active(fresh.id).expect("read").is_none());
        }

        #[tokio::test]
        async fn a_reader_that_dies_without_finishing_stops_the_core() {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = Config::default();
            let (a, b) = (task(&cfg), task(&cfg));
            let (core, handle, rx, _store) = core_on(dir.path(), &[a.clone(), b]).await;
            let fatal = core.fatal.clone();
            let (chunk_tx, chunk_rx) = mpsc::channel(4);
            let served = tokio::spawn(core.serve(rx, CancellationToken::new(), Some(chunk_rx)));
            // One chunk of two, then the reader is gone without saying Done (a panic).
            chunk_tx
                .send(Loaded::Chunk(vec![Recovered {
                    task: a,
                    whole: true,
                }]))
                .await
                .expect("core takes chunks");
            drop(chunk_tx);
            let err = served
                .await
                .expect("join")
                .expect_err("recovery incomplete");
            assert!(matches!(err, StoreError::Interrupted), "{err}");
            assert!(fatal.is_cancelled());
            assert!(!handle.is_recovered(), "half the tasks is not a recovery");
        }
    }

    #[test]
    fn small_results_are_kept_and_large_ones_truncated_and_marked() {
        let small = serde_json::json!({"ok": true});
        assert_eq!(cap_result(small.clone(), 1024), small);
        let big = serde_json::json!({"stdout": "é".repeat(5000)});
        let capped = cap_result(big, 1024);
        assert_eq!(capped["truncated"], true);
        assert!(capped["preview"].as_str().is_some_and(|p| p.len() <= 1024));
    }
}
