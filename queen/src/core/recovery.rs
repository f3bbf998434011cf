//! Startup: the active tasks stream in from the store while the queen already serves.
//! Until the last chunk is in, requests that need every task (and every write) wait in
//! arrival order; see [`super::Core::run`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared::api::TaskState;
use shared::TaskId;
use tokio::sync::mpsc;

use super::api::Request;
use super::lifecycle::normalize_parts;
use super::{Core, Now};
use crate::store::record::Recovered;
use crate::store::{ActiveScan, StoreError};

/// What the recovery thread sends: chunks of tasks in id order, then `Done` or the error
/// that ended the read. A channel that closes without either means the thread died.
#[derive(Debug)]
pub(super) enum Loaded {
    Chunk(Vec<Recovered>),
    Done,
    Failed(StoreError),
}

pub(super) type Chunks = mpsc::Receiver<Loaded>;
/// Requests held while recovering before the core stops taking more (backpressure).
const MAX_DEFERRED: usize = 65_536;
/// Decoded chunks of recovered tasks queued ahead of the core.
const RECOVERY_CHUNKS_AHEAD: usize = 4;

/// Startup in progress: the active tasks are being streamed in from the store while the
/// queen already serves.
pub(super) struct Recovery {
    /// Taken when the reading thread starts.
    scan: Option<ActiveScan>,
    deferred: VecDeque<Request>,
    /// Tasks recovered as running (their drones have a grace to come back).
    running: usize,
    /// Blocked tasks, re-checked at the end (their dependencies may have finished).
    blocked: Vec<TaskId>,
    started: std::time::Instant,
    /// Time the core spent indexing chunks (the rest of recovery overlaps it).
    indexing: Duration,
}

impl Recovery {
    pub(super) fn new(scan: Option<ActiveScan>) -> Recovery {
        Recovery {
            scan,
            deferred: VecDeque::new(),
            running: 0,
            blocked: Vec::new(),
            started: std::time::Instant::now(),
            indexing: Duration::ZERO,
        }
    }

    /// Whether more requests may be taken (they would wait here).
    pub(super) fn accepting(&self) -> bool {
        self.deferred.len() < MAX_DEFERRED
    }

    pub(super) fn defer(&mut self, req: Request) {
        self.deferred.push_back(req);
    }
}

pub(super) async fn next_chunk(chunks: &mut Option<Chunks>) -> Option<Loaded> {
    match chunks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Core {
    /// Starts the thread that reads the active tasks; chunks arrive in id order.
    pub(super) fn start_recovery(&mut self) -> Option<(Chunks, std::thread::JoinHandle<()>)> {
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
    pub(super) fn recover_chunk(&mut self, chunk: Vec<Recovered>, now: Now) {
        let started = std::time::Instant::now();
        let since = now.mono.into_std();
        let grace = self.cfg.leases.heartbeat_timeout();
        for mut task in chunk {
            let id = task.id();
            let mut awaiting = false;
            if let Recovered::Whole(t) = &task {
                if t.is_suspect() && !t.state.is_terminal() {
                    self.dispatch.suspects.insert(id);
                    awaiting = t.suspicion.as_ref().is_some_and(|s| s.awaiting());
                }
            }
            if let Some(key) = task.idempotency_key() {
                self.ledger.idem.insert(key.to_string(), id);
            }
            match task.state() {
                TaskState::Running => {
                    if let Some(r) = self.recovery.as_mut() {
                        r.running += 1;
                    }
                    self.dispatch.queue(task.queue()).started(now.mono);
                    self.fleet.orphans.insert(id, now.mono + grace);
                }
                TaskState::Pending | TaskState::Scheduled => {
                    let (state, run_at) = task.waiting_mut();
                    // A suspect awaiting its verdict stays scheduled (as stored), even
                    // past its time: the verdict is given when it comes due.
                    if !awaiting {
                        normalize_parts(state, run_at, now.wall);
                    }
                    match (task.state(), task.run_at()) {
                        (TaskState::Pending, _) => {
                            self.dispatch.ready.push_loading(task.ready_key(), since);
                        }
                        (_, Some(at)) => {
                            self.dispatch.scheduled.insert((at, id));
                        }
                        (_, None) => {}
                    }
                }
                TaskState::Blocked => {
                    for dep in task.depends_on() {
                        self.ledger.dependents.entry(*dep).or_default().push(id);
                    }
                    if let Some(r) = self.recovery.as_mut() {
                        r.blocked.push(id);
                    }
                }
                _ => {}
            }
            self.ledger.tasks.insert_recovered(task);
        }
        if let Some(r) = self.recovery.as_mut() {
            r.indexing += started.elapsed();
        }
    }

    /// Every active task is in: finish the indexes, then serve what waited, in order.
    pub(super) fn finish_recovery(&mut self, now: Now) {
        let Some(recovery) = self.recovery.take() else {
            return;
        };
        let read = recovery.started.elapsed();
        self.ledger.tasks.end_loading();
        self.dispatch.ready.end_loading();
        release_free_memory();
        let compacted = recovery.started.elapsed() - read;
        // Blocked tasks whose dependencies finished while the queen was down.
        for id in recovery.blocked {
            self.reevaluate_blocked(id, now);
        }
        tracing::info!(
            active = self.ledger.tasks.len(),
            held_whole = self.ledger.tasks.hot(),
            running_awaiting_drones = recovery.running,
            waited = recovery.deferred.len(),
            read_ms = read.as_millis() as u64,
            indexing_ms = recovery.indexing.as_millis() as u64,
            build_ms = compacted.as_millis() as u64,
            recovery_ms = recovery.started.elapsed().as_millis() as u64,
            "recovered tasks from the store"
        );
        self.recovered_flag.store(true, Ordering::Release);
        self.dispatch.wanted = true;
        for req in recovery.deferred {
            self.handle(req, now);
        }
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
