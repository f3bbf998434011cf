//! A core with the outside world replaced: an in-memory store behind the [`Lookup`]
//! trait, a writer whose commits the test applies when it says they are durable, clocks
//! the test moves, and drone connections that are plain channels.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shared::api::{TaskSpec, TaskState, TaskView};
use shared::protocol::{
    DroneMessage, Heartbeat, Held, Hello, QueenMessage, TaskComplete, TaskFailed, PROTOCOL_VERSION,
};
use shared::{DroneId, Fence, TaskId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::super::{Conn, Core, CoreError, CoreHandle, Lookup, Now, Request};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::record::{self, Recovered};
use crate::store::{Commit, Expired, Mutation, RetentionEntry, StoreError, StoreWriter};
use crate::task::Task;

/// What the in-memory store holds: the durable state, as sled would.
#[derive(Debug, Default, Clone)]
pub struct Disk {
    pub active: BTreeMap<TaskId, Vec<u8>>,
    pub finished: BTreeMap<TaskId, Vec<u8>>,
    pub idem: HashMap<String, TaskId>,
    pub retention: BTreeMap<(i64, TaskId), RetentionEntry>,
    pub queues: BTreeMap<String, Vec<u8>>,
    pub schedules: BTreeMap<String, Vec<u8>>,
}

impl Disk {
    fn apply(&mut self, m: Mutation) {
        match m {
            Mutation::SaveActive { id, record } => {
                self.active.insert(id, record);
            }
            Mutation::Finish {
                id,
                record,
                finished_ms,
                index,
                ..
            } => {
                self.active.remove(&id);
                self.finished.insert(id, record);
                self.retention.insert((finished_ms, id), index);
            }
            Mutation::Idempotency { key, id } => {
                self.idem.insert(key, id);
            }
            Mutation::SaveSchedule { name, record } => {
                self.schedules.insert(name, record);
            }
            Mutation::DeleteSchedule { name } => {
                self.schedules.remove(&name);
            }
            Mutation::SaveQueue { name, record } => {
                self.queues.insert(name, record);
            }
            Mutation::Revive {
                id,
                record,
                finished_ms,
                ..
            } => {
                self.finished.remove(&id);
                self.retention.remove(&(finished_ms, id));
                self.active.insert(id, record);
            }
            Mutation::Purge { expired, .. } => {
                self.finished.remove(&expired.id);
                self.retention.remove(&(expired.finished_ms, expired.id));
                if let Some(key) = &expired.entry.idempotency_key {
                    if self.idem.get(key) == Some(&expired.id) {
                        self.idem.remove(key);
                    }
                }
            }
        }
    }

    pub fn task(&self, id: TaskId) -> Option<Task> {
        let raw = self.active.get(&id).or_else(|| self.finished.get(&id))?;
        record::decode(raw).ok()
    }
}

/// The in-memory store as the core reads it; `fail` makes every read fail.
#[derive(Debug, Clone, Default)]
pub struct MemLookup {
    pub disk: Arc<Mutex<Disk>>,
    pub fail: Arc<AtomicBool>,
}

impl MemLookup {
    fn disk(&self) -> Result<MutexGuard<'_, Disk>, StoreError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::Io {
                path: "injected".into(),
                source: std::io::Error::other("an injected read failure"),
            });
        }
        self.disk.lock().map_err(|_| StoreError::Interrupted)
    }
}

fn decode(raw: Option<&Vec<u8>>) -> Result<Option<Task>, StoreError> {
    raw.map(|r| record::decode(r))
        .transpose()
        .map_err(|detail| StoreError::Corrupt {
            path: "memory".into(),
            detail,
        })
}

impl Lookup for MemLookup {
    fn active(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        decode(self.disk()?.active.get(&id))
    }

    fn finished(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        decode(self.disk()?.finished.get(&id))
    }

    fn idempotent(&self, key: &str) -> Result<Option<TaskId>, StoreError> {
        Ok(self.disk()?.idem.get(key).copied())
    }

    fn expired(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Expired>, StoreError> {
        Ok(self
            .disk()?
            .retention
            .range(..(cutoff_ms, TaskId(uuid::Uuid::nil())))
            .take(limit)
            .map(|((ms, id), entry)| Expired {
                id: *id,
                finished_ms: *ms,
                entry: entry.clone(),
            })
            .collect())
    }
}

/// A drone connection: what the queen sent it, and the ids the core knows it by.
#[derive(Debug)]
pub struct Link {
    pub conn: u64,
    pub drone: DroneId,
    rx: mpsc::UnboundedReceiver<QueenMessage>,
    pub close: CancellationToken,
    /// Assigns received so far on this connection.
    pub assigns_seen: u64,
}

impl Link {
    /// Everything the queen sent since the last call.
    pub fn inbox(&mut self) -> Vec<QueenMessage> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            if matches!(m, QueenMessage::Assign(_)) {
                self.assigns_seen += 1;
            }
            out.push(m);
        }
        out
    }
}

/// A core, its store, its clocks.
pub struct Hive {
    pub core: Core,
    pub lookup: MemLookup,
    durable: Arc<AtomicU64>,
    /// Commits handed over by the core and not yet durable, in order.
    pending: Vec<Commit>,
    pub now: Now,
    pub cfg: Arc<Config>,
    next_conn: u64,
    /// Kept so the core's writer channel stays open; commits are taken from the core.
    _commits: mpsc::Receiver<Commit>,
    _handle: CoreHandle,
}

pub fn config() -> Config {
    let mut cfg = Config::default();
    // Every task can be demoted: every read-back path is crossed.
    cfg.storage.hot_tasks = 1;
    cfg
}

impl Hive {
    pub fn new(cfg: Config) -> Hive {
        Hive::on(cfg, MemLookup::default(), Vec::new())
    }

    /// A core recovered from `lookup`'s disk (its active tasks in `recovered`, in id
    /// order), as a queen restarting on that store.
    pub fn on(cfg: Config, lookup: MemLookup, recovered: Vec<Recovered>) -> Hive {
        Hive::resume(Arc::new(cfg), lookup, recovered, Now::read())
    }

    /// The queen killed and started again on its disk: whatever was not durable is gone
    /// (and was never answered); its clocks go on from where they were.
    pub fn restart(self) -> Hive {
        let disk = self.disk();
        let (cfg, lookup, now) = (self.cfg.clone(), self.lookup.clone(), self.now);
        drop(self);
        Hive::resume(cfg, lookup, recovered(&disk), now)
    }

    fn resume(cfg: Arc<Config>, lookup: MemLookup, recovered: Vec<Recovered>, now: Now) -> Hive {
        let (writer, commits, durable) = StoreWriter::detached();
        let (mut core, handle, _rx) = Core::build(
            cfg.clone(),
            writer,
            Arc::new(lookup.clone()),
            super::super::Known::default(),
            None,
            Metrics::new(),
            CancellationToken::new(),
        );
        core.recover_chunk(recovered, now);
        core.finish_recovery(now);
        let mut hive = Hive {
            core,
            lookup,
            durable,
            pending: Vec::new(),
            now,
            cfg,
            next_conn: 1,
            _commits: commits,
            _handle: handle,
        };
        hive.pass();
        hive
    }

    /// Handles one request in the current pass.
    pub fn request(&mut self, req: Request) {
        self.core.notice_stall(self.now);
        self.core.handle(req, self.now);
    }

    /// Sends a request built around a reply channel; the answer comes when it is due.
    pub fn ask<T>(
        &mut self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.request(make(tx));
        rx
    }

    /// Ends the pass: timers, dispatch, seal, demote, and the commits go to the writer.
    pub fn pass(&mut self) {
        self.core.notice_stall(self.now);
        self.core.pass(self.now);
        // A pass takes no time on the test's clock.
        self.core.last_pass = Some(self.now.mono);
        let out = self.core.outgoing();
        self.pending.extend(out);
    }

    /// Every commit handed over so far becomes durable, in order: applied to the disk,
    /// then answered.
    pub fn flush(&mut self) {
        self.flush_first(usize::MAX);
    }

    /// The first `n` commits handed over become durable, in order (the writer is behind:
    /// the rest are still in flight).
    pub fn flush_first(&mut self, n: usize) {
        let n = n.min(self.pending.len());
        let commits: Vec<Commit> = self.pending.drain(..n).collect();
        {
            let mut disk = self.lookup.disk.lock().expect("disk lock");
            for c in &commits {
                for m in &c.mutations {
                    disk.apply(m.clone());
                }
            }
        }
        self.durable
            .fetch_add(commits.len() as u64, Ordering::AcqRel);
        // Answered as the store answers the commits one sync made durable.
        let mut answers = crate::store::Answers::default();
        for c in commits {
            answers.push(c, &Ok(()));
        }
        let panicked = CancellationToken::new();
        answers.run(&panicked);
        assert!(!panicked.is_cancelled(), "a continuation panicked");
    }

    /// A pass, then everything durable.
    pub fn settle(&mut self) {
        self.pass();
        self.flush();
    }

    /// Commits handed over and not yet durable.
    pub fn undurable(&self) -> usize {
        self.pending.len()
    }

    /// Time passes with the core awake: a pass every tick, as the loop wakes.
    pub fn advance(&mut self, by: Duration) {
        let tick = super::super::TICK;
        let mut left = by;
        while left > tick {
            self.jump(tick);
            self.pass();
            left -= tick;
        }
        self.jump(left);
    }

    /// Time passes with the core stalled (stopped, starved): no pass meanwhile.
    pub fn stall(&mut self, by: Duration) {
        self.jump(by);
    }

    fn jump(&mut self, by: Duration) {
        self.now.mono += by;
        self.now.wall += chrono::Duration::from_std(by).expect("a short step");
    }

    pub fn submit(&mut self, spec: TaskSpec) -> Result<TaskView, CoreError> {
        let task = Task::from_spec(spec, TaskId::generate(), self.now.wall, &self.cfg.tasks)
            .map_err(|e| CoreError::Invalid(e.0))?;
        let mut rx = self.ask(|reply| Request::Submit {
            tasks: vec![task],
            reply,
        });
        self.settle();
        let mut views = rx.try_recv().expect("answered once durable")?;
        Ok(views.remove(0).0)
    }

    pub fn get(&mut self, id: TaskId) -> Option<TaskView> {
        let mut rx = self.ask(|reply| Request::Get { id, reply });
        rx.try_recv().expect("answered at once")
    }

    pub fn state(&mut self, id: TaskId) -> Option<TaskState> {
        self.get(id).map(|t| t.state)
    }

    pub fn connect(
        &mut self,
        name: &str,
        slots: u32,
        held: Vec<Held>,
        drone: Option<DroneId>,
    ) -> Link {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = self.next_conn;
        self.next_conn += 1;
        let close = CancellationToken::new();
        let drone = drone.unwrap_or_else(DroneId::generate);
        self.request(Request::Hello {
            hello: Box::new(Hello {
                protocol_version: PROTOCOL_VERSION,
                drone_id: drone,
                name: name.into(),
                labels: Vec::new(),
                slots,
                kinds: vec!["echo".into()],
                token: None,
                held,
                draining: false,
                pongs: false,
                pools: Vec::new(),
                encodings: Vec::new(),
            }),
            conn: Conn {
                id: conn,
                tx,
                close: close.clone(),
            },
        });
        Link {
            conn,
            drone,
            rx,
            close,
            assigns_seen: 0,
        }
    }

    pub fn say(&mut self, link: &Link, msg: DroneMessage) {
        self.request(Request::Message {
            conn: link.conn,
            msg,
        });
    }

    pub fn heartbeat(&mut self, link: &Link, held: Vec<Held>) {
        let assigns_seen = link.assigns_seen;
        self.say(
            link,
            DroneMessage::Heartbeat(Heartbeat {
                held,
                assigns_seen,
                checkpoints: Vec::new(),
                pools: Vec::new(),
            }),
        );
    }

    pub fn complete(&mut self, link: &Link, task_id: TaskId, fence: Fence) {
        self.say(
            link,
            DroneMessage::TaskComplete(TaskComplete {
                task_id,
                fence,
                result: serde_json::json!({"ok": true}),
            }),
        );
    }

    pub fn fail(&mut self, link: &Link, task_id: TaskId, fence: Fence, retryable: bool) {
        self.say(
            link,
            DroneMessage::TaskFailed(TaskFailed {
                task_id,
                fence,
                error: "boom".into(),
                result: None,
                retryable,
            }),
        );
    }

    pub fn close(&mut self, link: &Link) {
        self.request(Request::Closed { conn: link.conn });
    }

    /// The disk, as a restarted queen would find it.
    pub fn disk(&self) -> Disk {
        self.lookup.disk.lock().expect("disk lock").clone()
    }

    pub fn fatal(&self) -> bool {
        self.core.fatal.is_cancelled()
    }
}

/// The active tasks of a disk, in id order, as a restart reads them.
pub fn recovered(disk: &Disk) -> Vec<Recovered> {
    disk.active
        .values()
        .filter_map(|raw| record::decode_index(raw).ok())
        .collect()
}

/// The assigns among `msgs`.
pub fn assigns(msgs: &[QueenMessage]) -> Vec<shared::protocol::Assign> {
    msgs.iter()
        .filter_map(|m| match m {
            QueenMessage::Assign(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

pub fn spec() -> TaskSpec {
    TaskSpec {
        kind: "echo".into(),
        ..Default::default()
    }
}
