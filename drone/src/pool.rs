//! Worker pools (docs/POOLS.md): long-lived processes, started from a configured command,
//! that run tasks of the kinds they announce, one at a time each, over a local channel.
//!
//! The drone stays the supervising parent: leases, heartbeats, the outbox, fencing,
//! timeouts, cancels and policy are the same code as for `exec`. This module only keeps
//! each pool's processes alive and turns a task into a `run` frame and the answer into an
//! outcome.
//!
//! Shape: every process slot of a pool has a *keeper* task that starts a process, waits
//! for its `ready`, then takes jobs from the pool's queue one at a time until the process
//! dies, is killed (timeout, cancel, protocol error) or is recycled, and starts the next.
//! The drone puts a task's job in that queue as the assignment arrives ([`queue`]), and
//! the task's own future ([`Queued::outcome`]) waits for its outcome; a stop (cancel,
//! shutdown, superseded lease) that arrives while the job still waits takes it back from
//! the queue, and one that arrives later is forwarded to the keeper running it.
//!
//! Every process is started by the drone's supervisor, in its own process group with a
//! parent-death signal ([`crate::process`], [`crate::supervise`]), so pool processes die
//! with their drone as `exec` tasks do.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::protocol::{Assign, Held, PoolStatus, TaskComplete};
use shared::{Fence, TaskId};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::awake::{self, sleep_until_opt};
use crate::checkpoint::MAX_CHECKPOINT_BYTES;
use crate::config::{Config, PoolSpec};
use crate::env::{
    POOL_FD_ENV, POOL_MAX_FRAME_ENV, POOL_NAME_ENV, POOL_PROCESS_ENV, POOL_PROTOCOL_ENV,
};
use crate::executor::{stopped, timed_out, Executor, Exit, StopReason};
use crate::kind::Kind;
use crate::outbox::Outcome;
use crate::process::{Launch, ProcessGroup, Started, Supervised, POOL_CHANNEL_FD};
use crate::workdir::{sandboxed_cwd, WorkDir};

/// The version of the local protocol this drone speaks (docs/POOLS.md).
pub const PROTOCOL_VERSION: u32 = 1;

/// The most of a process's stderr kept for the error of an attempt it died in.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// The longest line of a process's output logged as one line.
const MAX_LOG_LINE: usize = 8 * 1024;

/// The longest error text a worker's `failed` keeps.
const MAX_ERROR_BYTES: usize = 8 * 1024;

/// The first wait before restarting a process that failed to start or died, doubled for
/// each failure in a row, up to [`RESTART_BACKOFF_MAX`].
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long the drone waits for a process's exit status (and the end of its stderr) once
/// its channel has closed.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The wait before the `failures`-th restart in a row (1 for the first).
pub fn restart_delay(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    RESTART_BACKOFF_MIN
        .saturating_mul(1 << shift)
        .min(RESTART_BACKOFF_MAX)
}

/// A message from a pool process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    Ready {
        protocol: u32,
        kinds: Vec<String>,
        #[serde(default)]
        sdk: Option<String>,
        #[serde(default)]
        pid: Option<u32>,
    },
    Checkpoint {
        task_id: TaskId,
        data: Value,
    },
    Done {
        task_id: TaskId,
        #[serde(default)]
        result: Value,
    },
    Failed {
        task_id: TaskId,
        error: String,
        #[serde(default = "retry_by_default")]
        retryable: bool,
    },
}

fn retry_by_default() -> bool {
    true
}

impl FromWorker {
    fn name(&self) -> &'static str {
        match self {
            FromWorker::Ready { .. } => "ready",
            FromWorker::Checkpoint { .. } => "checkpoint",
            FromWorker::Done { .. } => "done",
            FromWorker::Failed { .. } => "failed",
        }
    }
}

/// A message to a pool process.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker<'a> {
    Run {
        task_id: TaskId,
        attempt: u32,
        fence: Fence,
        kind: &'a str,
        queue: &'a str,
        payload: &'a Value,
        checkpoint: Option<&'a Value>,
        timeout_ms: Option<u64>,
    },
}

/// What a `ready` announced, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Announced {
    pub kinds: Vec<String>,
    pub sdk: String,
    pub pid: Option<u32>,
}

/// Checks a process's first message.
pub fn check_ready(message: FromWorker) -> Result<Announced, String> {
    let FromWorker::Ready {
        protocol,
        kinds,
        sdk,
        pid,
    } = message
    else {
        return Err(format!(
            "its first message was `{}`, not `ready`",
            message.name()
        ));
    };
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "it speaks protocol {protocol}; this drone speaks {PROTOCOL_VERSION}"
        ));
    }
    if kinds.is_empty() {
        return Err("its `ready` lists no kinds (does the module register any task?)".into());
    }
    if let Some(bad) = kinds.iter().find(|k| k.trim().is_empty() || k.len() > 200) {
        return Err(format!("`{bad}` is not a kind name (1 to 200 bytes)"));
    }
    let mut unique = kinds.clone();
    unique.sort();
    unique.dedup();
    Ok(Announced {
        kinds: unique,
        sdk: sdk.unwrap_or_default(),
        pid,
    })
}

/// The state of a job: waiting in the queue, taken by a keeper, or taken back by the task
/// (stopped while waiting). Exactly one of the two sides wins the move out of `QUEUED`.
const QUEUED: u8 = 0;
const CLAIMED: u8 = 1;
const ABANDONED: u8 = 2;

/// A task waiting for, or running on, a pool process.
#[derive(Debug)]
struct Job {
    assign: Assign,
    /// When its `timeout_ms` runs out, counted from its assignment, as the queen counts it
    /// (waiting for a process included).
    deadline: Option<Instant>,
    state: Arc<AtomicU8>,
    /// A stop forwarded once a keeper has claimed the job.
    stop: oneshot::Receiver<StopReason>,
    reply: oneshot::Sender<Outcome>,
}

/// One pool's shared state: its spec, kinds, queue and counters.
#[derive(Debug)]
pub struct Pool {
    spec: PoolSpec,
    kinds: Vec<String>,
    jobs_tx: mpsc::UnboundedSender<Job>,
    jobs_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>,
    executor: Arc<Executor>,
    max_frame_len: usize,
    stopping: CancellationToken,
    ready: AtomicU32,
    busy: AtomicU32,
    restarts: AtomicU64,
    failing: Mutex<Option<String>>,
}

impl Pool {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn status(&self) -> PoolStatus {
        PoolStatus {
            name: self.spec.name.clone(),
            kinds: self.kinds.clone(),
            processes: self.spec.processes,
            ready: self.ready.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            failing: self.failing.lock().ok().and_then(|f| f.clone()),
        }
    }

    fn set_failing(&self, why: Option<String>) {
        if let Ok(mut failing) = self.failing.lock() {
            *failing = why;
        }
    }
}

/// Every pool of the drone.
#[derive(Debug, Default)]
pub struct Pools {
    pools: Vec<Arc<Pool>>,
    by_kind: BTreeMap<String, Arc<Pool>>,
    stopping: CancellationToken,
    keepers: TaskTracker,
}

impl Pools {
    /// Starts every configured pool and waits until each of its processes is ready. A
    /// process that cannot start, dies or stays silent fails the whole start with an error
    /// naming the pool and why, and every process started so far is killed.
    /// `stopping` ends it early (the drone is asked to stop meanwhile): every process
    /// started so far is killed before it returns.
    pub async fn start(
        config: &Config,
        executor: &Arc<Executor>,
        stopping: CancellationToken,
    ) -> Result<Pools, String> {
        let mut pools = Pools {
            stopping,
            ..Pools::default()
        };
        let started = pools.start_all(config, executor).await;
        if let Err(e) = started {
            pools.stop().await;
            return Err(e);
        }
        Ok(pools)
    }

    async fn start_all(&mut self, config: &Config, executor: &Arc<Executor>) -> Result<(), String> {
        for spec in &config.pools {
            let name = &spec.name;
            let launches = (0..spec.processes).map(|index| {
                Process::start(
                    spec,
                    executor,
                    config.max_frame_len,
                    index,
                    self.stopping.clone(),
                )
            });
            let results = futures_util::future::join_all(launches).await;
            let mut processes = Vec::new();
            let mut first_error = None;
            for result in results {
                match result {
                    Ok(process) => processes.push(process),
                    Err(e) if first_error.is_none() => first_error = Some(e),
                    Err(_) => {}
                }
            }
            if let Some(e) = first_error {
                for process in processes {
                    process.kill_now().await;
                }
                return Err(format!("pool `{name}`: {e}"));
            }
            let Some(kinds) = processes.first().map(|p| p.announced.kinds.clone()) else {
                return Err(format!("pool `{name}` has no processes"));
            };
            for process in &processes {
                if process.announced.kinds != kinds {
                    let other = process.announced.kinds.clone();
                    for process in processes {
                        process.kill_now().await;
                    }
                    return Err(format!(
                        "pool `{name}`: its processes announce different kinds ({kinds:?} and {other:?})"
                    ));
                }
            }
            if let Err(e) = self.check_kinds(name, &kinds, config) {
                for process in processes {
                    process.kill_now().await;
                }
                return Err(e);
            }
            let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
            let pool = Arc::new(Pool {
                spec: spec.clone(),
                kinds: kinds.clone(),
                jobs_tx,
                jobs_rx: tokio::sync::Mutex::new(jobs_rx),
                executor: Arc::clone(executor),
                max_frame_len: config.max_frame_len,
                stopping: self.stopping.clone(),
                ready: AtomicU32::new(0),
                busy: AtomicU32::new(0),
                restarts: AtomicU64::new(0),
                failing: Mutex::new(None),
            });
            tracing::info!(
                pool = %name,
                processes = spec.processes,
                kinds = ?kinds,
                sdk = %processes.first().map(|p| p.announced.sdk.as_str()).unwrap_or(""),
                "worker pool ready"
            );
            for process in processes {
                let pool = Arc::clone(&pool);
                let index = process.index;
                self.keepers.spawn(keep(pool, index, Some(process)));
            }
            for kind in kinds {
                self.by_kind.insert(kind, Arc::clone(&pool));
            }
            self.pools.push(pool);
        }
        if let Some(allowed) = &config.policy.pool_kinds {
            if let Some(missing) = allowed.iter().find(|k| !self.by_kind.contains_key(*k)) {
                return Err(format!(
                    "policy.kinds lists `{missing}`, which is not a built-in kind ({:?}) and no \
                     worker pool handles",
                    Kind::names()
                ));
            }
        }
        Ok(())
    }

    fn check_kinds(&self, name: &str, kinds: &[String], config: &Config) -> Result<(), String> {
        for kind in kinds {
            if Kind::from_name(kind).is_some() {
                return Err(format!(
                    "pool `{name}` announces `{kind}`, a built-in kind; pools handle other kinds"
                ));
            }
            if let Some(other) = self.by_kind.get(kind) {
                return Err(format!(
                    "pools `{}` and `{name}` both announce `{kind}`; a kind belongs to one pool",
                    other.name()
                ));
            }
            if let Some(allowed) = &config.policy.pool_kinds {
                if !allowed.contains(kind) {
                    return Err(format!(
                        "pool `{name}` announces `{kind}`, which policy.kinds does not allow \
                         (policy.kinds = {:?})",
                        config
                            .policy
                            .kinds
                            .iter()
                            .chain(allowed.iter())
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The kinds the pools handle, for the hello.
    pub fn kinds(&self) -> impl Iterator<Item = &String> {
        self.by_kind.keys()
    }

    /// The pool that handles `kind`, if one does.
    pub fn get(&self, kind: &str) -> Option<Arc<Pool>> {
        self.by_kind.get(kind).cloned()
    }

    pub fn statuses(&self) -> Vec<PoolStatus> {
        self.pools.iter().map(|p| p.status()).collect()
    }

    /// Kills every pool process and waits (briefly) for the keepers to reap them.
    pub async fn stop(&self) {
        self.stopping.cancel();
        self.keepers.close();
        if tokio::time::timeout(EXIT_WAIT, self.keepers.wait())
            .await
            .is_err()
        {
            tracing::warn!("some pool processes were not reaped in time");
        }
    }
}

/// A task in its pool's queue, from [`queue`] until [`Queued::outcome`] returns.
#[derive(Debug)]
pub struct Queued {
    held: Held,
    deadline: Option<Instant>,
    timeout_ms: Option<u64>,
    pool: String,
    state: Arc<AtomicU8>,
    /// Where a stop goes once a keeper has claimed the job.
    forward: oneshot::Sender<StopReason>,
    reply: oneshot::Receiver<Outcome>,
    /// The pool was stopping: the task never joined its queue.
    refused: bool,
}

/// Puts a task in `pool`'s queue, behind every task queued before it. Not async on
/// purpose: the drone calls it as the assignment arrives, so tasks wait in the order they
/// were assigned (a spawned future would join the queue whenever the runtime first polls
/// it, and the runtime polls new futures in no particular order).
pub fn queue(pool: &Pool, assign: Assign) -> Queued {
    let held = Held {
        task_id: assign.task_id,
        fence: assign.fence,
    };
    let state = Arc::new(AtomicU8::new(QUEUED));
    let (forward, forward_rx) = oneshot::channel();
    let (reply_tx, reply) = oneshot::channel();
    let timeout_ms = assign.timeout_ms;
    let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    let job = Job {
        assign,
        deadline,
        state: Arc::clone(&state),
        stop: forward_rx,
        reply: reply_tx,
    };
    let refused = pool.jobs_tx.send(job).is_err();
    Queued {
        held,
        deadline,
        timeout_ms,
        pool: pool.spec.name.clone(),
        state,
        forward,
        reply,
        refused,
    }
}

impl Queued {
    /// Waits for an idle process to run the task and returns the outcome. A stop that
    /// arrives while the task still waits ends it at once.
    pub async fn outcome(self, mut stop: oneshot::Receiver<StopReason>) -> Outcome {
        let Queued {
            held,
            deadline,
            timeout_ms,
            pool,
            state,
            forward,
            mut reply,
            refused,
        } = self;
        if refused {
            return Outcome::failed(held, "the drone's worker pool is stopping", true);
        }
        let mut forward = Some(forward);
        let mut listening = true;
        let mut waiting = true;
        loop {
            tokio::select! {
                // Still waiting for a process when its time is up: the queen counts the
                // timeout from the assignment too, so it ends here rather than run late.
                _ = sleep_until_opt(deadline), if waiting => {
                    waiting = false;
                    if state
                        .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        let ms = timeout_ms.unwrap_or(0);
                        let (error, retryable) = timed_out(ms);
                        return Outcome::failed(
                            held,
                            format!("{error}, waiting for a free process of pool `{pool}`"),
                            retryable,
                        );
                    }
                }
                outcome = &mut reply => {
                    return outcome.unwrap_or_else(|_| {
                        Outcome::failed(held, "the worker pool stopped before the task ended", true)
                    });
                }
                reason = &mut stop, if listening => {
                    listening = false;
                    let Ok(reason) = reason else { continue };
                    if state
                        .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        let (error, retryable) = stopped(&reason);
                        return Outcome::failed(held, error, retryable);
                    }
                    if let Some(forward) = forward.take() {
                        // The keeper may have just finished; its outcome is on its way.
                        let _ = forward.send(reason);
                    }
                }
            }
        }
    }
}

/// Output of a process: the task it runs now (for log lines) and the tail of its stderr.
#[derive(Debug, Default)]
struct Output {
    task: Option<TaskId>,
    stderr_tail: Vec<u8>,
}

type SharedOutput = Arc<Mutex<Output>>;

/// A started, ready pool process.
#[derive(Debug)]
struct Process {
    index: u32,
    pool: String,
    child: Supervised,
    group: ProcessGroup,
    channel: Framed<UnixStream, LengthDelimitedCodec>,
    announced: Announced,
    output: SharedOutput,
    /// Ends when both output pipes have reached their end.
    output_done: tokio::task::JoinHandle<()>,
    work: Option<WorkDir>,
    tasks_run: u64,
}

/// Why a keeper stops using a process.
#[derive(Debug)]
enum Retire {
    /// `max_tasks` or `max_memory_mib`: close its channel and let it exit.
    Recycle(String),
    /// It broke, or was killed for a task: replace it (after a backoff when `backoff`).
    Replace { why: String, backoff: bool },
    /// The drone is stopping.
    Stop,
}

impl Process {
    /// Starts process `index` of `spec` and waits for its `ready`.
    async fn start(
        spec: &PoolSpec,
        executor: &Arc<Executor>,
        max_frame_len: usize,
        index: u32,
        stopping: CancellationToken,
    ) -> Result<Process, String> {
        let command_text = shlex::try_join(spec.command.iter().map(String::as_str))
            .unwrap_or_else(|_| spec.command.join(" "));
        let policy = &executor.policy;
        policy
            .check_payload_env(&spec.env)
            .map_err(|e| e.replace("exec payload", "pool config"))?;
        let (work, cwd) = match &policy.work_root {
            Some(root) => {
                // Checked before the directory exists, so a bad `cwd` leaves nothing behind.
                let inside = sandboxed_cwd(spec.cwd.as_deref())
                    .map_err(|e| e.replace("invalid exec payload: ", "invalid pool `cwd`: "))?;
                let name = format!(
                    "pool-{}-{index}-{}",
                    spec.name,
                    uuid::Uuid::new_v4().simple()
                );
                let work = WorkDir::create(root, &name, policy.run_as.as_ref()).map_err(|e| {
                    format!(
                        "could not create its directory under {}: {e}",
                        root.display()
                    )
                })?;
                match work.make_cwd(&inside, policy.run_as.as_ref()) {
                    Ok(cwd) => (Some(work), Some(cwd)),
                    Err(e) => {
                        work.remove().await;
                        return Err(format!(
                            "could not create its cwd `{}`: {e}",
                            inside.display()
                        ));
                    }
                }
            }
            None => {
                if let Some(cwd) = spec.cwd.as_ref().filter(|c| !c.is_dir()) {
                    return Err(format!("cwd `{}` is not a directory", cwd.display()));
                }
                (None, spec.cwd.clone())
            }
        };
        let home = work.as_ref().map(|w| w.path().to_path_buf());
        let launched = Self::launch(
            spec,
            executor,
            max_frame_len,
            index,
            stopping,
            &command_text,
            home.as_deref(),
            cwd,
        )
        .await;
        match launched {
            Ok(mut process) => {
                process.work = work;
                Ok(process)
            }
            Err(e) => {
                // Every way out of a failed start removes the directory it was given.
                if let Some(work) = work {
                    work.remove().await;
                }
                Err(e)
            }
        }
    }

    /// Starts the process (in `cwd`, with `home` as its HOME) and waits for its `ready`.
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        spec: &PoolSpec,
        executor: &Arc<Executor>,
        max_frame_len: usize,
        index: u32,
        stopping: CancellationToken,
        command_text: &str,
        home: Option<&Path>,
        cwd: Option<std::path::PathBuf>,
    ) -> Result<Process, String> {
        let policy = &executor.policy;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("could not create its channel: {e}"))?;
        let theirs = OwnedFd::from(theirs);
        let vars = [
            (POOL_FD_ENV, OsString::from(POOL_CHANNEL_FD.to_string())),
            (
                POOL_PROTOCOL_ENV,
                OsString::from(PROTOCOL_VERSION.to_string()),
            ),
            (POOL_NAME_ENV, OsString::from(&spec.name)),
            (POOL_PROCESS_ENV, OsString::from(index.to_string())),
            (
                POOL_MAX_FRAME_ENV,
                OsString::from(max_frame_len.to_string()),
            ),
        ];
        let env = policy.task_env(home, &spec.env, &vars, |name: &str| std::env::var_os(name));
        let base = cwd.as_deref().unwrap_or(Path::new(""));
        let named = &spec.command[0];
        let resolved =
            policy.allowed_program(named, base, env.get("PATH").map(OsString::as_os_str))?;
        let (program, arg0) = match resolved {
            Some(path) => (path.into_os_string(), Some(named.clone())),
            None => (OsString::from(named), None),
        };
        let launch = Launch {
            program: OsStr::new(&program),
            arg0: arg0.as_deref(),
            args: &spec.command[1..],
            env: &env,
            identity: policy.run_as.as_ref(),
            cwd: cwd.as_deref(),
        };
        let Started {
            mut child,
            stdout,
            stderr,
        } = executor
            .spawner
            .spawn(&launch, None, Some(theirs))
            .await
            .map_err(|e| format!("could not run `{command_text}`: {e}"))?;
        let group = child.group();
        let output: SharedOutput = Arc::default();
        let output_done = {
            let pool = spec.name.clone();
            let output = Arc::clone(&output);
            tokio::spawn(async move {
                tokio::join!(
                    forward_output(stdout, &pool, index, "stdout", &output),
                    forward_output(stderr, &pool, index, "stderr", &output),
                );
            })
        };
        let channel = ours
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(ours))
            .map_err(|e| format!("could not use its channel: {e}"));
        let channel = match channel {
            Ok(c) => Framed::new(c, shared::frame::codec(max_frame_len)),
            Err(e) => {
                group.signal(libc::SIGKILL);
                let _ = child.wait().await;
                return Err(e);
            }
        };
        let mut process = Process {
            index,
            pool: spec.name.clone(),
            child,
            group,
            channel,
            announced: Announced {
                kinds: Vec::new(),
                sdk: String::new(),
                pid: None,
            },
            output,
            output_done,
            work: None,
            tasks_run: 0,
        };
        let first = tokio::select! {
            first = awake::timeout(spec.ready_timeout, process.channel.next()) => first,
            _ = stopping.cancelled() => {
                process.kill_now().await;
                return Err("the drone is stopping".into());
            }
        };
        let announced = match first {
            Err(_) => Err(format!(
                "`{command_text}` did not say `ready` within {} ms",
                spec.ready_timeout.as_millis()
            )),
            Ok(None) => {
                let exit = process.exit_status().await;
                Err(format!(
                    "`{command_text}` {} before it said `ready`{}",
                    describe_exit(exit),
                    process.stderr_tail()
                ))
            }
            Ok(Some(Err(e))) => Err(format!("`{command_text}` broke the pool protocol: {e}")),
            Ok(Some(Ok(frame))) => shared::frame::decode::<FromWorker>(&frame)
                .map_err(|e| e.to_string())
                .and_then(check_ready)
                .map_err(|e| format!("`{command_text}` broke the pool protocol: {e}")),
        };
        match announced {
            Ok(mut announced) => {
                // The pid is where memory is read for `max_memory_mib`: only a process of
                // this pool's own group counts.
                if let Some(pid) = announced.pid {
                    if !in_group(pid, group) {
                        tracing::warn!(pool = %spec.name, process = index, pid, "the pid in `ready` is not in the process's group; ignoring it");
                        announced.pid = None;
                    }
                }
                if announced.pid.is_none() && spec.max_memory_mib.is_some() {
                    tracing::warn!(pool = %spec.name, process = index, "the process's `ready` gives no pid of its group: max_memory_mib does not apply to it");
                }
                process.announced = announced;
                Ok(process)
            }
            Err(e) => {
                process.kill_now().await;
                Err(e)
            }
        }
    }

    /// Waits (briefly) for the process to end and returns how.
    async fn exit_status(&mut self) -> Exit {
        let status = awake::timeout(EXIT_WAIT, self.child.wait()).await;
        let exit = match status {
            Ok(status) => Exit::from(status),
            Err(_) => {
                self.group.signal(libc::SIGKILL);
                Exit::from(self.child.wait().await)
            }
        };
        // Its group is done: let the stderr reader reach the end, so the tail is whole.
        self.group.signal(libc::SIGKILL);
        let _ = tokio::time::timeout(EXIT_WAIT, &mut self.output_done).await;
        exit
    }

    /// The process has exited (`exit`): kills what is left of its group (children that
    /// still hold its channel or output) and lets the stderr reader reach the end.
    async fn exited(&mut self, exit: Exit) -> Exit {
        self.group.signal(libc::SIGKILL);
        let _ = tokio::time::timeout(EXIT_WAIT, &mut self.output_done).await;
        exit
    }

    /// "; its stderr ended with: …", or nothing when it wrote none.
    fn stderr_tail(&self) -> String {
        let tail = self
            .output
            .lock()
            .map(|o| String::from_utf8_lossy(&o.stderr_tail).trim().to_owned())
            .unwrap_or_default();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ended with:\n{tail}")
        }
    }

    fn set_task(&self, task: Option<TaskId>) {
        if let Ok(mut output) = self.output.lock() {
            output.task = task;
            if task.is_some() {
                output.stderr_tail.clear();
            }
        }
    }

    /// SIGTERM to the group, `grace` for the process to exit, then SIGKILL: how the
    /// process of a timed-out or cancelled task ends (docs/POOLS.md).
    async fn terminate(&mut self, grace: Duration) {
        self.group.signal(libc::SIGTERM);
        let _ = tokio::time::timeout(grace, self.child.wait()).await;
        self.group.signal(libc::SIGKILL);
    }

    /// SIGKILL to the group, then reaps it and removes its directory.
    async fn kill_now(self) {
        let Process {
            child,
            group,
            output_done,
            work,
            ..
        } = self;
        reap(child, group, output_done, work).await;
    }

    /// Closes its channel (it should exit on end-of-file), gives it `grace` to do so, then
    /// as [`Process::kill_now`].
    async fn retire(self, grace: Duration) {
        let Process {
            mut child,
            group,
            channel,
            output_done,
            work,
            ..
        } = self;
        drop(channel);
        let _ = tokio::time::timeout(grace, child.wait()).await;
        reap(child, group, output_done, work).await;
    }

    /// The resident memory of the process that runs the handlers, in MiB.
    fn rss_mib(&self) -> Option<u64> {
        let pid = self.announced.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib / 1024)
    }
}

/// Kills what is left of a process's group, reaps it and removes its directory.
async fn reap(
    mut child: Supervised,
    group: ProcessGroup,
    output_done: tokio::task::JoinHandle<()>,
    work: Option<WorkDir>,
) {
    group.signal(libc::SIGKILL);
    let _ = child.wait().await;
    output_done.abort();
    if let Some(work) = work {
        work.remove().await;
    }
}

fn in_group(pid: u32, group: ProcessGroup) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: getpgid only reads the process table.
    let pgid = unsafe { libc::getpgid(pid) };
    pgid == group.id()
}

/// "exited with code 3", "was killed by signal 11 (SIGSEGV)".
pub fn describe_exit(exit: Exit) -> String {
    match exit {
        Exit::Code(code) => format!("exited with code {code}"),
        Exit::Signal(sig) => match signal_name(sig) {
            Some(name) => format!("was killed by signal {sig} ({name})"),
            None => format!("was killed by signal {sig}"),
        },
        Exit::Unknown => "ended (the drone could not learn how)".into(),
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

/// Logs a process's output line by line, tagged with the pool, the process and the task
/// it runs, and keeps the tail of its stderr. Reads to the end whatever comes, so a chatty
/// process never blocks on a full pipe.
async fn forward_output(
    mut pipe: impl AsyncRead + Unpin,
    pool: &str,
    index: u32,
    stream: &'static str,
    output: &SharedOutput,
) {
    let mut buf = vec![0u8; 8 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let log = |line: &[u8]| {
        let task = output.lock().ok().and_then(|o| o.task);
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        match task {
            Some(task_id) => {
                tracing::info!(target: "pool", pool, process = index, %task_id, stream, "{text}")
            }
            None => tracing::info!(target: "pool", pool, process = index, stream, "{text}"),
        }
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &buf[..n];
        if stream == "stderr" {
            if let Ok(mut o) = output.lock() {
                o.stderr_tail.extend_from_slice(chunk);
                let excess = o.stderr_tail.len().saturating_sub(STDERR_TAIL_BYTES);
                o.stderr_tail.drain(..excess);
            }
        }
        for piece in chunk.split_inclusive(|b| *b == b'\n') {
            line.extend_from_slice(piece);
            if line.ends_with(b"\n") {
                log(&line[..line.len() - 1]);
                line.clear();
            } else if line.len() >= MAX_LOG_LINE {
                log(&line);
                line.clear();
            }
        }
    }
    if !line.is_empty() {
        log(&line);
    }
}

/// Keeps process slot `index` of `pool` busy for as long as the drone runs: serves jobs on
/// a process, replaces it when it goes, with a growing wait while processes keep failing.
async fn keep(pool: Arc<Pool>, index: u32, mut first: Option<Process>) {
    let mut failures: u32 = 0;
    let grace = pool.executor.kill_grace;
    loop {
        if pool.stopping.is_cancelled() {
            if let Some(process) = first.take() {
                process.kill_now().await;
            }
            return;
        }
        let mut process = match first.take() {
            Some(process) => process,
            None => {
                let started = Process::start(
                    &pool.spec,
                    &pool.executor,
                    pool.max_frame_len,
                    index,
                    pool.stopping.clone(),
                )
                .await;
                match started {
                    Ok(process) => process,
                    Err(e) => {
                        if pool.stopping.is_cancelled() {
                            return;
                        }
                        failures += 1;
                        pool.restarts.fetch_add(1, Ordering::Relaxed);
                        let delay = restart_delay(failures);
                        tracing::warn!(pool = %pool.spec.name, process = index, failures, retry_in_ms = delay.as_millis() as u64, error = %e, "a pool process failed to start");
                        fail_waiting(&pool, &e);
                        pool.set_failing(Some(e));
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = pool.stopping.cancelled() => return,
                        }
                    }
                }
            }
        };
        if process.announced.kinds != pool.kinds {
            tracing::warn!(pool = %pool.spec.name, process = index, announced = ?process.announced.kinds, kinds = ?pool.kinds, "a restarted pool process announces other kinds than the pool's; it gets only the pool's kinds");
        }
        pool.ready.fetch_add(1, Ordering::Relaxed);
        let retire = serve(&pool, &mut process, &mut failures).await;
        pool.ready.fetch_sub(1, Ordering::Relaxed);
        match retire {
            Retire::Stop => {
                process.kill_now().await;
                return;
            }
            Retire::Recycle(why) => {
                tracing::info!(pool = %pool.spec.name, process = index, tasks = process.tasks_run, "recycling a pool process: {why}");
                process.retire(grace).await;
            }
            Retire::Replace { why, backoff } => {
                pool.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pool = %pool.spec.name, process = index, "replacing a pool process: {why}");
                process.kill_now().await;
                if backoff {
                    failures += 1;
                    pool.set_failing(Some(why));
                    let delay = restart_delay(failures);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = pool.stopping.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// With no process of the pool up, the tasks waiting for one fail (retryably, so the
/// queen runs them again, here or elsewhere) instead of waiting while every start fails;
/// tasks taken back while they waited leave the queue too.
fn fail_waiting(pool: &Pool, why: &str) {
    if pool.ready.load(Ordering::Relaxed) > 0 {
        return;
    }
    // A keeper that holds the queue is serving, so a process is up after all.
    let Ok(mut jobs) = pool.jobs_rx.try_lock() else {
        return;
    };
    while let Ok(job) = jobs.try_recv() {
        if job
            .state
            .compare_exchange(QUEUED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let held = Held {
                task_id: job.assign.task_id,
                fence: job.assign.fence,
            };
            let _ = job.reply.send(Outcome::failed(
                held,
                format!("no process of pool `{}` could start: {why}", pool.spec.name),
                true,
            ));
        }
    }
}

/// Runs jobs on `process` until it has to go.
async fn serve(pool: &Pool, process: &mut Process, failures: &mut u32) -> Retire {
    loop {
        let job = tokio::select! {
            job = async { pool.jobs_rx.lock().await.recv().await } => match job {
                Some(job) => job,
                None => return Retire::Stop,
            },
            frame = process.channel.next() => {
                let why = match frame {
                    None => {
                        let exit = process.exit_status().await;
                        format!("it {} while idle{}", describe_exit(exit), process.stderr_tail())
                    }
                    Some(Ok(_)) => "it sent a message while it ran no task".to_owned(),
                    Some(Err(e)) => format!("its channel failed while idle: {e}"),
                };
                return Retire::Replace { why, backoff: true };
            }
            status = process.child.wait() => {
                let exit = process.exited(Exit::from(status)).await;
                let why = format!("it {} while idle{}", describe_exit(exit), process.stderr_tail());
                return Retire::Replace { why, backoff: true };
            }
            _ = pool.stopping.cancelled() => return Retire::Stop,
        };
        if job
            .state
            .compare_exchange(QUEUED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Stopped while it waited; its task already has its outcome.
            continue;
        }
        pool.busy.fetch_add(1, Ordering::Relaxed);
        let (outcome, after) = run_job(pool, process, job.assign, job.deadline, job.stop).await;
        pool.busy.fetch_sub(1, Ordering::Relaxed);
        process.set_task(None);
        // Fails only when the task's future is gone (the drone stopped).
        let _ = job.reply.send(outcome);
        match after {
            After::Keep => {
                process.tasks_run += 1;
                *failures = 0;
                pool.set_failing(None);
                if let Some(max) = pool.spec.max_tasks {
                    if process.tasks_run >= max {
                        return Retire::Recycle(format!("it ran max_tasks = {max} tasks"));
                    }
                }
                if let Some(max) = pool.spec.max_memory_mib {
                    if let Some(rss) = process.rss_mib().filter(|rss| *rss > max) {
                        return Retire::Recycle(format!(
                            "it uses {rss} MiB, above max_memory_mib = {max}"
                        ));
                    }
                }
            }
            After::Replace { why, backoff } => return Retire::Replace { why, backoff },
            After::Stop => return Retire::Stop,
        }
    }
}

/// What happens to a process after a task.
#[derive(Debug)]
enum After {
    Keep,
    Replace { why: String, backoff: bool },
    Stop,
}

/// Runs one claimed task on `process`.
async fn run_job(
    pool: &Pool,
    process: &mut Process,
    assign: Assign,
    deadline: Option<Instant>,
    mut stop: oneshot::Receiver<StopReason>,
) -> (Outcome, After) {
    let held = Held {
        task_id: assign.task_id,
        fence: assign.fence,
    };
    let broke = |why: String| {
        (
            Outcome::failed(
                held,
                format!("the pool process broke the pool protocol: {why}"),
                true,
            ),
            After::Replace { why, backoff: true },
        )
    };
    process.set_task(Some(held.task_id));
    let run = ToWorker::Run {
        task_id: assign.task_id,
        attempt: assign.attempt,
        fence: assign.fence,
        kind: &assign.kind,
        queue: &assign.queue,
        payload: &assign.payload,
        checkpoint: assign.checkpoint.as_ref(),
        timeout_ms: assign.timeout_ms,
    };
    let frame = match shared::frame::encode(&run) {
        Ok(frame) => frame,
        Err(e) => return (Outcome::failed(held, e.to_string(), false), After::Keep),
    };
    if frame.len() > pool.max_frame_len {
        return (
            Outcome::failed(
                held,
                format!(
                    "the task is {} bytes as a `run` frame, above the drone's max_frame_len ({})",
                    frame.len(),
                    pool.max_frame_len
                ),
                false,
            ),
            After::Keep,
        );
    }
    let ms = assign.timeout_ms.unwrap_or(0);
    if deadline.is_some_and(|d| d <= Instant::now()) {
        // Claimed as its time ran out; its own future may have just given up on it too.
        let (error, retryable) = timed_out(ms);
        return (Outcome::failed(held, error, retryable), After::Keep);
    }
    // A process that does not read its channel must not hold the task (or a stop) up: the
    // write races the deadline and stops like the rest of the attempt.
    let mut listening = true;
    let sent = {
        let sending = send(&mut process.channel, frame);
        tokio::pin!(sending);
        loop {
            tokio::select! {
                sent = &mut sending => break Ok(sent),
                _ = sleep_until_opt(deadline) => break Err(None),
                reason = &mut stop, if listening => match reason {
                    Ok(reason) => break Err(Some(reason)),
                    // A dropped sender means nobody will stop it, not a stop.
                    Err(_) => listening = false,
                },
            }
        }
    };
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let exit = process.exit_status().await;
            let why = format!(
                "it could not be given the task ({e}); it {}{}",
                describe_exit(exit),
                process.stderr_tail()
            );
            return lost(held, why);
        }
        Err(None) => {
            let (error, retryable) = timed_out(ms);
            return (
                Outcome::failed(held, error, retryable),
                After::Replace {
                    why: format!("it did not take its task within {ms} ms"),
                    backoff: true,
                },
            );
        }
        Err(Some(reason)) => {
            let (error, retryable) = stopped(&reason);
            let after = stopped_after(pool, &reason, &error);
            return (Outcome::failed(held, error, retryable), after);
        }
    }
    loop {
        tokio::select! {
            // What the process wrote before it exited is read before its exit is seen.
            biased;
            frame = process.channel.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => return broke(e.to_string()),
                    None => {
                        let exit = process.exit_status().await;
                        let why = format!(
                            "the pool process {} while running the task{}",
                            describe_exit(exit),
                            process.stderr_tail()
                        );
                        return lost(held, why);
                    }
                };
                let message = match shared::frame::decode::<FromWorker>(&frame) {
                    Ok(message) => message,
                    Err(e) => return broke(e.to_string()),
                };
                match message {
                    FromWorker::Checkpoint { task_id, data } if task_id == held.task_id => {
                        let len = data.to_string().len();
                        if len > MAX_CHECKPOINT_BYTES {
                            tracing::warn!(task_id = %held.task_id, len, max = MAX_CHECKPOINT_BYTES, "checkpoint too large; not kept");
                        } else {
                            pool.executor.checkpoints.prepare(held, Some(&data));
                        }
                    }
                    FromWorker::Done { task_id, result } if task_id == held.task_id => {
                        return (
                            Outcome::Complete(TaskComplete {
                                task_id: held.task_id,
                                fence: held.fence,
                                result,
                            }),
                            After::Keep,
                        );
                    }
                    FromWorker::Failed { task_id, mut error, retryable } if task_id == held.task_id => {
                        if error.len() > MAX_ERROR_BYTES {
                            let mut cut = MAX_ERROR_BYTES;
                            while !error.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            error.truncate(cut);
                            error.push_str(" [truncated]");
                        }
                        return (Outcome::failed(held, error, retryable), After::Keep);
                    }
                    FromWorker::Ready { .. } => return broke("it sent a second `ready`".into()),
                    other => {
                        let about = match &other {
                            FromWorker::Checkpoint { task_id, .. }
                            | FromWorker::Done { task_id, .. }
                            | FromWorker::Failed { task_id, .. } => task_id.to_string(),
                            FromWorker::Ready { .. } => String::new(),
                        };
                        return broke(format!(
                            "it sent `{}` for task {about} while running task {}",
                            other.name(),
                            held.task_id
                        ));
                    }
                }
            }
            status = process.child.wait() => {
                // The process is gone though its channel is still open: something it
                // started holds it. Its group goes with it.
                let exit = process.exited(Exit::from(status)).await;
                let why = format!(
                    "the pool process {} while running the task{}",
                    describe_exit(exit),
                    process.stderr_tail()
                );
                return lost(held, why);
            }
            _ = sleep_until_opt(deadline) => {
                tracing::warn!(pool = %process.pool, process = process.index, task_id = %held.task_id, timeout_ms = ms, "task timed out; replacing its pool process");
                // SIGTERM first, so the handler can clean up, as for a cancel (and `exec`).
                process.terminate(pool.executor.kill_grace).await;
                let (error, retryable) = timed_out(ms);
                return (
                    Outcome::failed(held, error, retryable),
                    After::Replace { why: format!("its task timed out after {ms} ms"), backoff: false },
                );
            }
            reason = &mut stop, if listening => {
                let Ok(reason) = reason else {
                    listening = false;
                    continue;
                };
                tracing::info!(pool = %process.pool, process = process.index, task_id = %held.task_id, ?reason, "stopping a task on a pool process");
                let (error, retryable) = stopped(&reason);
                // Kill it before the outcome goes out: "cancelled" means it stopped.
                match reason {
                    StopReason::Shutdown => process.group.signal(libc::SIGKILL),
                    _ => process.terminate(pool.executor.kill_grace).await,
                }
                let after = stopped_after(pool, &reason, &error);
                return (Outcome::failed(held, error, retryable), after);
            }
        }
    }
}

/// A retryable failure for an attempt whose process went away, and its replacement.
fn lost(held: Held, why: String) -> (Outcome, After) {
    (
        Outcome::failed(held, why.clone(), true),
        After::Replace { why, backoff: true },
    )
}

/// What happens to a process whose task was stopped: a drone shutting down starts no
/// new one; otherwise a fresh one replaces it.
fn stopped_after(pool: &Pool, reason: &StopReason, error: &str) -> After {
    if pool.stopping.is_cancelled() || *reason == StopReason::Shutdown {
        After::Stop
    } else {
        After::Replace {
            why: format!("its task was stopped ({error})"),
            backoff: false,
        }
    }
}

async fn send(
    channel: &mut Framed<UnixStream, LengthDelimitedCodec>,
    frame: Bytes,
) -> std::io::Result<()> {
    channel.send(frame).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn restarts_back_off_from_100_ms_to_30_s() {
        assert_eq!(restart_delay(1), Duration::from_millis(100));
        assert_eq!(restart_delay(2), Duration::from_millis(200));
        assert_eq!(restart_delay(5), Duration::from_millis(1600));
        assert_eq!(restart_delay(20), RESTART_BACKOFF_MAX);
        assert_eq!(restart_delay(u32::MAX), RESTART_BACKOFF_MAX);
    }

    fn ready(value: Value) -> Result<Announced, String> {
        shared::frame::decode::<FromWorker>(value.to_string().as_bytes())
            .map_err(|e| e.to_string())
            .and_then(check_ready)
    }

    #[test]
    fn a_ready_must_speak_version_1_and_name_kinds() {
        let ok = ready(
            json!({"type": "ready", "protocol": 1, "kinds": ["b", "a", "b"], "sdk": "x", "pid": 7, "extra": true}),
        );
        assert_eq!(
            ok,
            Ok(Announced {
                kinds: vec!["a".into(), "b".into()],
                sdk: "x".into(),
                pid: Some(7)
            })
        );
        for (bad, needle) in [
            (
                json!({"type": "ready", "protocol": 2, "kinds": ["a"]}),
                "protocol 2",
            ),
            (
                json!({"type": "ready", "protocol": 1, "kinds": []}),
                "no kinds",
            ),
            (
                json!({"type": "ready", "protocol": 1, "kinds": [" "]}),
                "not a kind name",
            ),
            (
                json!({"type": "done", "task_id": TaskId::generate()}),
                "not `ready`",
            ),
            (json!({"type": "hello"}), "unknown variant"),
            (json!({"protocol": 1}), "type"),
        ] {
            match ready(bad.clone()) {
                Ok(a) => panic!("{bad} was accepted as {a:?}"),
                Err(e) => assert!(e.contains(needle), "{bad}: `{e}` lacks `{needle}`"),
            }
        }
    }

    #[test]
    fn a_failed_without_retryable_is_retried_and_unknown_fields_are_ignored() {
        let id = TaskId::generate();
        let m: FromWorker = shared::frame::decode(
            json!({"type": "failed", "task_id": id, "error": "boom", "future": 1})
                .to_string()
                .as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            m,
            FromWorker::Failed {
                task_id: id,
                error: "boom".into(),
                retryable: true
            }
        );
    }

    #[test]
    fn a_run_frame_carries_the_lease() {
        let id = TaskId::generate();
        let payload = json!({"n": 1});
        let run = ToWorker::Run {
            task_id: id,
            attempt: 2,
            fence: Fence(9),
            kind: "resize",
            queue: "default",
            payload: &payload,
            checkpoint: None,
            timeout_ms: Some(5),
        };
        let v: Value = serde_json::to_value(&run).unwrap_or_default();
        assert_eq!(
            v,
            json!({"type": "run", "task_id": id, "attempt": 2, "fence": 9, "kind": "resize",
                   "queue": "default", "payload": {"n": 1}, "checkpoint": null, "timeout_ms": 5})
        );
    }

    #[test]
    fn exits_are_described_with_signal_names() {
        assert_eq!(describe_exit(Exit::Code(3)), "exited with code 3");
        assert_eq!(
            describe_exit(Exit::Signal(libc::SIGSEGV)),
            "was killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(describe_exit(Exit::Signal(64)), "was killed by signal 64");
    }
}
