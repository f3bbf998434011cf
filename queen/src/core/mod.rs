//! The scheduler core: one task that owns all in-memory scheduling state and makes every
//! decision. Connections and HTTP handlers talk to it through a bounded channel; it talks
//! to disk only through the store's writer (and the narrow [`Lookup`] for reads), and
//! sends nothing that depends on a write before that write is durable. It knows nothing
//! about sockets or HTTP.
//!
//! The state lives in rooms, one file each, each owning its part:
//! - [`ledger`]: the tasks and their lifecycle (submit, dependencies, idempotency,
//!   cancel, retry, finish), the recently finished tasks;
//! - [`attempts`]: how a running attempt ends (outcome, failure, lost lease, timeout);
//! - [`fleet`]: drones, their leases, heartbeats, orphans and silent drones;
//! - [`dispatch`]: ready queues, queue gates, grants and attempt deadlines;
//! - [`schedules`], [`reaper`] (retention), [`views`] (reads), [`recovery`] (startup);
//! - [`effects`]: the commits a pass made and what answers once they are durable;
//! - [`lifecycle`]: the state machine every state change goes through.
//!
//! This file keeps the rooms and the order of a pass: read the clocks once, handle
//! requests, run the timers, dispatch, seal, demote, hand the commits to the writer.

mod api;
mod attempts;
mod dispatch;
mod effects;
mod fleet;
mod ledger;
pub mod lifecycle;
pub mod lookup;
mod reaper;
mod recovery;
mod schedules;
mod views;

#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use api::{
    Conn, CoreError, CoreHandle, DiskState, ErrorKind, ListFilter, QueueChange, Request,
};
pub use attempts::cap_result;
pub use lookup::Lookup;

use crate::active::{ActiveTasks, Backing};
use crate::config::Config;
use crate::idle::RuntimePoll;
use crate::metrics::Metrics;
use crate::queues::QueueState;
use crate::store::{StoreError, StoreWriter};
use dispatch::Dispatch;
use effects::Effects;
use fleet::Fleet;
use ledger::Ledger;
use reaper::Reaper;
use recovery::{Chunks, Loaded, Recovery};
use schedules::Schedules;

/// Requests queued for the core before senders wait (backpressure on drones and clients).
pub const REQUEST_QUEUE: usize = 8_192;
/// Requests handled between two dispatch passes: amortizes dispatch under load while
/// keeping a single pass short.
const REQUESTS_PER_PASS: usize = 512;
/// How often timers (scheduled tasks, orphaned leases, attempt deadlines) are checked when
/// nothing else wakes the core.
const TICK: Duration = Duration::from_millis(50);

/// The clocks, read once per pass and passed down: every decision of a pass sees one
/// time. `mono` orders deadlines (it never jumps); `wall` is what records and users see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Now {
    pub mono: Instant,
    pub wall: DateTime<Utc>,
}

impl Now {
    pub fn read() -> Now {
        Now {
            mono: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// What the store knows besides the active tasks, read before the core starts.
#[derive(Debug, Default)]
struct Known {
    queues: Vec<(String, crate::queues::QueueSettings)>,
    schedules: Vec<crate::schedule::Schedule>,
    finished_counts: Vec<((String, shared::api::TaskState), u64)>,
}

/// The core's state: its rooms. See the module docs.
pub struct Core {
    cfg: Arc<Config>,
    writer: StoreWriter,
    lookup: Arc<dyn Lookup>,
    fx: Effects,
    ledger: Ledger,
    dispatch: Dispatch,
    fleet: Fleet,
    schedules: Schedules,
    reaper: Reaper,
    next_tick: Instant,
    /// When the previous pass ended, to notice the core's own stalls (see
    /// [`Core::notice_stall`]).
    last_pass: Option<Instant>,
    /// Set until every active task has been read from the store (see [`Core::run`]).
    recovery: Option<Recovery>,
    /// True once recovery is over (read by `/readyz` through the handle).
    recovered_flag: Arc<AtomicBool>,
    /// The data dir's free space, sampled outside the core; below `[storage]
    /// min_free_mb` the core refuses new work (see [`Core::check_disk`]).
    disk: Arc<DiskState>,
    /// Cancelled when the queen must stop: a store read failed.
    fatal: CancellationToken,
    metrics: Metrics,
    /// The leader's term on a shared database (sent in every welcome), `None` on sled.
    epoch: Option<u64>,
    /// Keeps the runtime's worker polling for a short while after each pass (see
    /// [`crate::idle`]).
    idle_poll: Arc<RuntimePoll>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("tasks", &self.ledger.tasks.len())
            .field("drones", &self.fleet.drones.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Builds the core from what the store recovered. Running tasks become orphans: their
    /// drones get `heartbeat_timeout` to reconnect and re-attach them (G5,
    /// docs/GUARANTEES.md).
    pub fn new(
        cfg: Arc<Config>,
        writer: StoreWriter,
        lookup: Arc<dyn Lookup>,
        recovered: crate::store::Recovered,
        metrics: Metrics,
        fatal: CancellationToken,
    ) -> (Core, CoreHandle, mpsc::Receiver<Request>) {
        let crate::store::Recovered {
            active,
            queues,
            schedules,
            finished_counts,
        } = recovered;
        let known = Known {
            queues,
            schedules,
            finished_counts,
        };
        Core::build(cfg, writer, lookup, known, Some(active), metrics, fatal)
    }

    /// The leader's term (HA on PostgreSQL): welcomes carry it, so a drone can tell a
    /// deposed queen from the leader.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
    }

    /// [`Core::new`] with the active tasks read from `scan`, or (None) given by the caller
    /// through `recover_chunk` (tests of the core, which have no sled).
    fn build(
        cfg: Arc<Config>,
        writer: StoreWriter,
        lookup: Arc<dyn Lookup>,
        known: Known,
        scan: Option<crate::store::ActiveScan>,
        metrics: Metrics,
        fatal: CancellationToken,
    ) -> (Core, CoreHandle, mpsc::Receiver<Request>) {
        let now = Now::read();
        let backing = Backing {
            reader: lookup.clone(),
            fatal: fatal.clone(),
        };
        let tasks = ActiveTasks::backed(backing, cfg.storage.hot_tasks);
        let mut core = Core {
            writer,
            lookup,
            fx: Effects::default(),
            ledger: Ledger::new(&cfg, tasks, known.finished_counts),
            dispatch: Dispatch::new(
                known
                    .queues
                    .into_iter()
                    .map(|(name, s)| (name, QueueState::new(s)))
                    .collect(),
            ),
            fleet: Fleet::new(now),
            schedules: Schedules::default(),
            reaper: Reaper::new(now),
            next_tick: now.mono,
            last_pass: None,
            recovery: Some(Recovery::new(scan)),
            recovered_flag: Arc::new(AtomicBool::new(false)),
            disk: Arc::new(DiskState::default()),
            fatal,
            idle_poll: RuntimePoll::new(
                Duration::from_micros(cfg.queen.idle_poll_us),
                metrics.idle_poll_seconds.with_label_values(&["runtime"]),
            ),
            cfg,
            metrics,
            epoch: None,
        };
        for schedule in known.schedules {
            core.schedules.insert(schedule, now.wall);
        }
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let (ended, ends) = tokio::sync::broadcast::channel(effects::ENDED_BUFFER);
        core.fx.announce_ends_on(ended);
        let handle = CoreHandle {
            tx,
            recovered: core.recovered_flag.clone(),
            disk: core.disk.clone(),
            ended: Arc::new(ends),
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
            self.finish_recovery(Now::read());
        }
        let mut failed = None;
        // The idle poller runs beside the core for as long as it serves, on a runtime of
        // one worker only (see `crate::idle`); aborted when this returns or unwinds.
        let one_worker = tokio::runtime::Handle::current().metrics().num_workers() == 1;
        let _poller = (self.cfg.queen.idle_poll_us > 0 && one_worker).then(|| {
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(self.idle_poll.clone().run()))
        });
        loop {
            let wake = self.next_wake(Now::read());
            // While recovering, stop taking requests once many wait: the bounded request
            // channel then pushes back on clients instead of memory growing.
            let accepting = self.recovery.as_ref().is_none_or(Recovery::accepting);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                loaded = recovery::next_chunk(&mut chunks) => {
                    let now = self.woke();
                    let failure = match loaded {
                        Some(Loaded::Chunk(tasks)) => {
                            self.recover_chunk(tasks, now);
                            None
                        }
                        Some(Loaded::Done) => {
                            chunks = None;
                            self.finish_recovery(now);
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
                    self.pass(Now::read());
                    self.last_pass = Some(Instant::now());
                }
                req = rx.recv(), if accepting => {
                    let Some(req) = req else { break };
                    let now = self.woke();
                    self.handle(req, now);
                    for _ in 1..REQUESTS_PER_PASS {
                        match rx.try_recv() {
                            Ok(req) => self.handle(req, now),
                            Err(_) => break,
                        }
                    }
                    self.pass(now);
                    self.last_pass = Some(Instant::now());
                }
                // Timers wait for recovery (the tick would be due at once, every pass).
                _ = tokio::time::sleep_until(wake), if self.recovery.is_none() => {
                    let now = self.woke();
                    self.pass(now);
                    self.last_pass = Some(Instant::now());
                }
            }
            self.flush_commits().await;
            self.idle_poll.idle();
        }
        // Close every drone connection; their tasks stay `running` on disk and are
        // re-attached when the drones reconnect to the next queen.
        self.fleet.close_all();
        self.flush_commits().await;
        failed.map_or(Ok(()), Err)
    }

    /// The start of a pass: reads the clocks, notices a stall of the core's own, and ends
    /// the idle poller's spell.
    fn woke(&mut self) -> Now {
        let now = Now::read();
        self.notice_stall(now);
        self.idle_poll.busy();
        now
    }

    /// The rest of a pass, after its requests: timers, dispatch, then seal and demote.
    fn pass(&mut self, now: Now) {
        if self.recovery.is_none() {
            // A scheduled task that came due is promoted now, not at the next tick (its
            // timer woke the loop; waiting would spin until the tick).
            if now.mono >= self.next_tick || self.dispatch.first_due_by(now.wall) {
                self.timers(now);
            }
            self.dispatch(now);
        }
        // Every change made in this pass is in a commit numbered at most this.
        self.ledger.tasks.seal(self.fx.made());
        if self.recovery.is_none() {
            // Tasks read at startup join the map only when recovery ends.
            self.ledger.tasks.demote(self.writer.durable());
        }
    }

    /// Notices that the core itself stalled: it could not hear its drones for longer than
    /// a heartbeat interval, because it was stopped, paused, swapped out or starved of CPU,
    /// or waited on a stuck disk. The deaf time is measured from the end of the previous
    /// pass (time spent deciding is time spent hearing: every request handled is a message
    /// heard) to the start of this one; an idle loop wakes every [`TICK`]. Drones
    /// heartbeated meanwhile and their frames wait unread in the sockets, so the queen
    /// must not judge them on silence it could not observe: every silence clock (a
    /// drone's last contact, an orphan's grace, an attempt's deadline) is paused for the
    /// deaf time, and silent drones are judged again only from the next pass on, once
    /// what waited has been read. Silence heard outside stalls still adds
    /// up, so a drone that really died is still found out: by its closed connection at
    /// once, or by its silence after the resume.
    fn notice_stall(&mut self, now: Now) {
        let Some(last) = self.last_pass else {
            return;
        };
        if self.recovery.is_some() {
            // No timer runs while recovering, and no drone is registered yet.
            return;
        }
        let deaf = now.mono.saturating_duration_since(last);
        let interval = self.cfg.leases.heartbeat_interval();
        if deaf <= interval + TICK {
            return;
        }
        let stalled = deaf.saturating_sub(TICK);
        tracing::warn!(
            stalled_ms = stalled.as_millis() as u64,
            drones = self.fleet.drones.len(),
            "the queen stalled and could not hear its drones; their silence clocks and lease deadlines are paused for the stall"
        );
        self.metrics.stalls.inc();
        self.fleet.forgive(now.mono, stalled, TICK);
        self.dispatch.postpone_deadlines(stalled);
        // Counted once: the next pass measures from the end of this one.
        self.last_pass = Some(now.mono);
    }

    /// The timers, one unit of work each, in this order.
    fn timers(&mut self, now: Now) {
        self.next_tick = now.mono + TICK;
        // Rate-limit tokens refill with time.
        self.dispatch.wanted = true;
        self.check_disk();
        self.fire_schedules(now);
        self.promote_due(now);
        self.expire_silent_drones(now);
        self.give_up_orphans(now);
        self.expire_attempts(now);
        self.ledger.forget_durable(self.writer.durable());
        self.purge_if_due(now);
    }

    /// Enters or leaves the degraded mode of a filling disk: below `[storage]
    /// min_free_mb` free, new work is refused; outcomes, grants, cancels and reads go on
    /// (they are what frees space once retention runs).
    fn check_disk(&mut self) {
        let min_free_mb = self.cfg.storage.min_free_mb;
        let free = self.disk.free_bytes();
        if free != u64::MAX {
            self.metrics
                .store_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        let low = min_free_mb > 0 && free < min_free_mb.saturating_mul(1024 * 1024);
        if low == self.disk.degraded() {
            return;
        }
        self.disk.set_degraded(low);
        self.metrics.store_degraded.set(i64::from(low));
        let free_mb = free / (1024 * 1024);
        if low {
            tracing::warn!(free_mb, min_free_mb, "the data dir's filesystem is nearly full: new work is refused (507) until space is freed; outcomes of accepted work are still recorded");
        } else {
            tracing::info!(
                free_mb,
                min_free_mb,
                "space on the data dir's filesystem is back: new work is accepted again"
            );
        }
    }

    /// Why new work (a submit, a retry, a schedule run) is refused now, if it is.
    fn refuse_new_work(&self) -> Option<CoreError> {
        self.disk
            .degraded()
            .then(|| CoreError::InsufficientStorage {
                free_bytes: self.disk.free_bytes(),
                min_free_mb: self.cfg.storage.min_free_mb,
            })
    }

    /// When the loop must wake with nothing else to do: the tick, or a scheduled task.
    fn next_wake(&self, now: Now) -> Instant {
        let mut wake = self.next_tick;
        if let Some(at) = self.dispatch.first_scheduled() {
            let until = (at - now.wall).to_std().unwrap_or(Duration::ZERO);
            wake = wake.min(now.mono + until);
        }
        wake
    }

    async fn flush_commits(&mut self) {
        for commit in self.outgoing() {
            self.writer.send(commit).await;
        }
    }

    /// The pass's commits, for the writer: none if the queen must stop (a store read
    /// failed during the pass, so what it decided may rest on something it could not see;
    /// each of them is answered with the failure instead).
    fn outgoing(&mut self) -> Vec<crate::store::Commit> {
        let outgoing = self.fx.take();
        if !self.fatal.is_cancelled() {
            return outgoing;
        }
        for commit in outgoing {
            if let Some(after) = commit.after {
                after(Err(crate::store::CommitError(
                    "the queen is stopping after a store failure".into(),
                )));
            }
        }
        Vec::new()
    }

    /// Forwards a request to the room that answers it.
    fn handle(&mut self, req: Request, now: Now) {
        if let Some(recovery) = self.recovery.as_mut() {
            if !req.answerable_while_recovering() {
                recovery.defer(req);
                return;
            }
        }
        match req {
            Request::Submit { tasks, reply } => self.submit(tasks, reply, now),
            Request::Get { id, reply } => self.get(id, reply, now),
            Request::List { filter, reply } => self.list(filter, reply),
            Request::Cancel { id, reason, reply } => self.cancel_request(id, reason, reply, now),
            Request::Drones { reply } => {
                let _ = reply.send(self.fleet.views());
            }
            Request::Queues { reply } => {
                let _ = reply.send(self.queue_views());
            }
            Request::SetQueue {
                name,
                change,
                reply,
            } => self.set_queue(name, change, reply),
            Request::Retry { id, reply } => self.retry(id, reply, now),
            Request::Schedules { reply } => {
                let _ = reply.send(self.schedules.views(now.wall));
            }
            Request::PutSchedule { schedule, reply } => self.put_schedule(*schedule, reply, now),
            Request::DeleteSchedule { name, reply } => self.delete_schedule(name, reply, now),
            Request::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Request::Hello { hello, conn } => self.hello(*hello, conn, now),
            Request::Message { conn, msg } => self.drone_message(conn, msg, now),
            Request::Closed { conn } => self.closed(conn, now),
        }
    }

    /// A store read's result; a failed read stops the queen (as a failed write does) and
    /// the pass's decisions are answered with nothing but the failure.
    fn read<T>(&self, read: Result<T, StoreError>, what: &str) -> Result<T, CoreError> {
        read.map_err(|e| {
            tracing::error!(error = %e, what, "a store read failed; the queen must stop");
            self.fatal.cancel();
            CoreError::ReadFailed(e.to_string())
        })
    }
}
