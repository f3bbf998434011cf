//! Worker pools (docs/POOLS.md) against a fake queen: each test names the failure it
//! guards against.
//!
//! The workers are one small Python script (`pool_worker.py`, written into each test's
//! temporary directory) that speaks the local protocol with nothing but the standard
//! library and does what each task's payload says, hostile things included. Most tests run
//! `drone::run` in-process (pool processes still start through the real binary's
//! process supervisor); the `kill -9` one runs the real binary.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::future::ready;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use drone::config::{PoolFile, PoolSpec};
use drone::pool::RESTART_BACKOFF_MIN;
use drone::Config;
use serde_json::{json, Value};
use shared::protocol::{
    Assign, CancelTask, DroneMessage, Hello, PoolStatus, QueenMessage, TaskComplete,
};
use shared::TaskId;
use support::*;
use tokio::time::Instant;

const WORKER: &str = include_str!("pool_worker.py");

// ----- helpers -----

/// A temporary directory holding the worker script (and, as it runs, its `pids` and
/// `started` files).
struct Workdir {
    dir: tempfile::TempDir,
    script: PathBuf,
}

impl Workdir {
    fn new() -> Result<Workdir> {
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("pool_worker.py");
        std::fs::write(&script, WORKER)?;
        Ok(Workdir { dir, script })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A pool of `processes` workers announcing `kinds` (comma-separated).
    fn pool(&self, name: &str, kinds: &str, processes: u32) -> PoolFile {
        PoolFile {
            name: name.to_owned(),
            command: vec![
                "python3".into(),
                self.script.display().to_string(),
                kinds.to_owned(),
            ],
            processes: Some(processes),
            // A crashing worker's core (if the host keeps cores) lands here, not in the crate.
            cwd: Some(self.path().to_owned()),
            ..PoolFile::default()
        }
    }

    /// Every `run` the workers took so far: task id → pid.
    fn started(&self) -> HashMap<String, i32> {
        std::fs::read_to_string(self.file("started"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (task, pid) = l.split_once(' ')?;
                Some((task.to_owned(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    /// The pid of the worker that took `task`, once it has.
    async fn started_on(&self, task: TaskId) -> i32 {
        let id = task.to_string();
        wait_until_async(DEADLINE, &format!("a worker starts task {id}"), || {
            ready(self.started().get(&id).copied())
        })
        .await
    }
}

fn spec(file: PoolFile) -> PoolSpec {
    PoolSpec::from_file(file).expect("a valid pool")
}

/// A drone with `pools`, connected to and welcomed by a fake queen.
struct Hive {
    _queen: FakeQueen,
    conn: Conn,
    hello: Hello,
    _drone: InProcessDrone,
}

async fn hive(pools: Vec<PoolSpec>, tweak: impl FnOnce(&mut Config)) -> Result<Hive> {
    let queen = FakeQueen::start().await?;
    let mut config = test_config(queen.addr)?;
    config.pools = pools;
    tweak(&mut config);
    let drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    let hello = conn.welcome().await?;
    Ok(Hive {
        _queen: queen,
        conn,
        hello,
        _drone: drone,
    })
}

/// Runs `config` expecting `drone::run` to refuse to start; returns its error text.
async fn start_error(config: Config) -> Result<String> {
    let mut drone = InProcessDrone::start(config);
    match drone.finished().await? {
        Ok(()) => bail!("the drone stopped without an error"),
        Err(e) => Ok(e.to_string()),
    }
}

fn task(kind: &str, payload: Value) -> Assign {
    assign(kind, payload)
}

fn pid_of(c: &TaskComplete) -> Result<i32> {
    c.result["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| anyhow!("no pid in {}", c.result))
}

/// Runs a `pid` task of `kind` to completion and returns the worker's pid.
async fn pid_task(conn: &mut Conn, kind: &str) -> Result<i32> {
    let t = task(kind, json!({"do": "pid"}));
    conn.assign(t.clone()).await?;
    pid_of(&completed(conn.outcome(t.task_id).await?)?)
}

/// The pool `name` in the first heartbeat whose status of it `pick` accepts.
async fn pool_status(
    conn: &mut Conn,
    name: &str,
    what: &str,
    mut pick: impl FnMut(&PoolStatus) -> bool,
) -> Result<PoolStatus> {
    conn.recv_where(what, |m| match m {
        DroneMessage::Heartbeat(h) => h
            .pools
            .iter()
            .find(|p| p.name == name)
            .filter(|p| pick(p))
            .cloned(),
        _ => None,
    })
    .await
}

fn cancel(t: &Assign, reason: &str) -> QueenMessage {
    QueenMessage::Cancel(CancelTask {
        task_id: t.task_id,
        fence: t.fence,
        reason: reason.into(),
    })
}

/// Every outcome the drone sent, counted per task, each acked: a second outcome for one
/// attempt is a bug whenever it comes.
#[derive(Default)]
struct Book {
    counts: HashMap<TaskId, usize>,
    outcomes: HashMap<TaskId, DroneMessage>,
}

impl Book {
    async fn note(&mut self, conn: &mut Conn, m: DroneMessage) -> Result<()> {
        let (id, fence) = match &m {
            DroneMessage::TaskComplete(c) => (c.task_id, c.fence),
            DroneMessage::TaskFailed(f) => (f.task_id, f.fence),
            _ => return Ok(()),
        };
        *self.counts.entry(id).or_default() += 1;
        self.outcomes.insert(id, m);
        conn.ack(id, fence).await
    }

    /// Reads messages until each of `ids` has an outcome.
    async fn wait_for(&mut self, conn: &mut Conn, ids: &[TaskId]) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        while let Some(missing) = ids.iter().find(|id| !self.outcomes.contains_key(id)) {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, conn.recv())
                .await
                .with_context(|| format!("no outcome for task {missing} in time"))??;
            self.note(conn, m).await?;
        }
        Ok(())
    }

    /// Reads `n` more heartbeats (noting any late outcome), then checks that no task got
    /// two outcomes.
    async fn exactly_once(&mut self, conn: &mut Conn, heartbeats: usize) -> Result<()> {
        let mut seen = 0;
        while seen < heartbeats {
            let m = conn.recv().await?;
            if matches!(m, DroneMessage::Heartbeat(_)) {
                seen += 1;
            }
            self.note(conn, m).await?;
        }
        let twice: Vec<_> = self.counts.iter().filter(|(_, n)| **n != 1).collect();
        if !twice.is_empty() {
            bail!("tasks with other than one outcome: {twice:?}");
        }
        Ok(())
    }

    fn outcome(&self, id: TaskId) -> Result<DroneMessage> {
        self.outcomes
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow!("no outcome for {id}"))
    }
}

// ----- 1. the happy path -----

/// Guards the whole wiring: a pool's announced kinds reach the hello next to the built-in
/// ones (or the queen would never route them here), a task of a pool kind reaches a worker
/// with its lease and comes back with the handler's result, and heartbeats report the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_announces_its_kinds_runs_their_tasks_and_shows_in_heartbeats() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "resize,thumbnail", 2))], |_| {}).await?;
    let kinds: BTreeSet<&str> = h.hello.kinds.iter().map(String::as_str).collect();
    for k in ["echo", "exec", "resize", "thumbnail"] {
        assert!(kinds.contains(k), "hello kinds {kinds:?} lack {k}");
    }

    let status = pool_status(
        &mut h.conn,
        "py",
        "a heartbeat with both processes ready",
        |p| p.ready == 2,
    )
    .await?;
    assert_eq!(
        status,
        PoolStatus {
            name: "py".into(),
            kinds: vec!["resize".into(), "thumbnail".into()],
            processes: 2,
            ready: 2,
            busy: 0,
            restarts: 0,
            failing: None,
        }
    );

    let mut t = task("thumbnail", json!({"do": "pid", "size": [64, 64]}));
    t.fence = shared::Fence(7);
    t.attempt = 3;
    t.timeout_ms = Some(30_000);
    h.conn.assign(t.clone()).await?;
    let done = completed(h.conn.outcome(t.task_id).await?)?;
    assert_eq!(done.fence, t.fence);
    let pid = pid_of(&done)?;
    assert_eq!(
        done.result,
        json!({
            "pid": pid, "pool": "py", "process": done.result["process"].clone(),
            "kind": "thumbnail", "queue": "default", "attempt": 3, "fence": 7,
            "timeout_ms": 30000, "checkpoint": null,
            "payload": {"do": "pid", "size": [64, 64]},
        })
    );

    // A handler's own failure is the task's, and the process is kept.
    let f = task(
        "resize",
        json!({"do": "fail", "error": "bad image", "retryable": false}),
    );
    h.conn.assign(f.clone()).await?;
    let fail = failed(h.conn.outcome(f.task_id).await?)?;
    assert_eq!(fail.error, "bad image");
    assert!(!fail.retryable);

    // While a task runs, its process counts as busy.
    let go = w.file("go");
    let b = task("resize", json!({"do": "block", "go": go}));
    h.conn.assign(b.clone()).await?;
    w.started_on(b.task_id).await;
    pool_status(
        &mut h.conn,
        "py",
        "a heartbeat with one busy process",
        |p| p.busy == 1,
    )
    .await?;
    std::fs::write(&go, b"")?;
    completed(h.conn.outcome(b.task_id).await?)?;
    let after = pool_status(&mut h.conn, "py", "a heartbeat with no busy process", |p| {
        p.busy == 0
    })
    .await?;
    assert_eq!((after.ready, after.restarts), (2, 0), "{after:?}");
    Ok(())
}

/// Guards the queue's order (docs/POOLS.md: pool tasks wait "in the order they were
/// assigned"): with the only process busy, tasks assigned together must run in that
/// order, not in whatever order the drone's runtime first polls them. A few rounds,
/// since a wrong order shows only when the runtime happens to reorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_tasks_wait_for_a_process_in_the_order_they_were_assigned() -> Result<()> {
    const ROUNDS: usize = 6;
    const WAITING: usize = 6;
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |c| {
        c.slots = WAITING as u32 + 1;
    })
    .await?;
    let mut book = Book::default();
    let mut expected: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let go = w.file(&format!("go-{round}"));
        let first = task("py", json!({"do": "block", "go": go}));
        h.conn.assign(first.clone()).await?;
        w.started_on(first.task_id).await;
        let waiting: Vec<Assign> = (0..WAITING)
            .map(|n| task("py", json!({"do": "pid", "n": n})))
            .collect();
        // In one write, as a queen leasing several tasks at once does.
        h.conn.assign_all(&waiting).await?;
        let last = support::held(&waiting[WAITING - 1]);
        h.conn
            .heartbeat_where("a heartbeat holding every task", |held, _| {
                held.contains(&last)
            })
            .await?;
        std::fs::write(&go, b"")?;
        let ids: Vec<TaskId> = std::iter::once(&first)
            .chain(&waiting)
            .map(|t| t.task_id)
            .collect();
        book.wait_for(&mut h.conn, &ids).await?;
        expected.extend(ids.iter().map(TaskId::to_string));

        let log = std::fs::read_to_string(w.file("started"))?;
        let ran: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            ran, expected,
            "round {round}: tasks ran out of assignment order"
        );
    }
    Ok(())
}

// ----- 2. hostile workers -----

/// Guards "garbage, oversized and out-of-order frames from a worker change nothing but
/// that attempt": each fails its attempt (retryable, naming the protocol error), the
/// process is replaced (its group killed), the task queued behind it runs on the new
/// process, and a built-in task on the same drone is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_breaking_the_protocol_fails_only_its_attempt_and_is_replaced() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |c| c.slots = 3).await?;
    let mut book = Book::default();
    let mut previous = pid_task(&mut h.conn, "py").await?;

    let cases = [
        (json!({"do": "garbage"}), "malformed message"),
        (
            json!({"do": "huge", "len": (1u64 << 20) + 1}),
            "frame size too big",
        ),
        (json!({"do": "wrong_task"}), "sent `done` for task"),
        (json!({"do": "second_ready"}), "second `ready`"),
        (json!({"do": "unknown_type"}), "unknown variant `progress`"),
    ];
    for (payload, needle) in &cases {
        let hostile = task("py", payload.clone());
        let behind = task("py", json!({"do": "pid"}));
        let builtin = task("echo", json!({"beside": payload}));
        for t in [&hostile, &behind, &builtin] {
            h.conn.assign(t.clone()).await?;
        }
        book.wait_for(
            &mut h.conn,
            &[hostile.task_id, behind.task_id, builtin.task_id],
        )
        .await?;

        let f = failed(book.outcome(hostile.task_id)?)?;
        assert!(f.retryable, "{payload}: {f:?}");
        assert!(
            f.error.contains("broke the pool protocol") && f.error.contains(needle),
            "{payload}: `{}` should name the protocol error ({needle})",
            f.error
        );
        let next = pid_of(&completed(book.outcome(behind.task_id)?)?)?;
        assert_ne!(
            next,
            previous,
            "{payload}: the process was not replaced (or the task behind ran first); runs: {:?}",
            w.started()
        );
        wait_all_gone(&[previous]).await;
        assert_eq!(
            completed(book.outcome(builtin.task_id)?)?.result,
            json!({"beside": payload})
        );
        previous = next;
    }
    book.exactly_once(&mut h.conn, 2).await?;
    let status = pool_status(
        &mut h.conn,
        "py",
        "a heartbeat after the hostile tasks",
        |_| true,
    )
    .await?;
    assert_eq!(status.ready, 1, "{status:?}");
    assert_eq!(status.restarts, cases.len() as u64, "{status:?}");
    // A process that completes a task clears the failing state.
    assert_eq!(status.failing, None, "{status:?}");
    Ok(())
}

/// The fuzzed version: a worker writes seeded random bytes (whole frames, torn frames,
/// oversized prefixes, JSON of the wrong shape) and then exits or carries on. Guards
/// against a byte sequence that hangs an attempt, gives it two outcomes, a success, or
/// takes the drone down: each attempt ends exactly once, retryable, and the drone keeps
/// serving the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_from_workers_end_each_attempt_exactly_once() -> Result<()> {
    const SEEDS: u64 = 30;
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 2))], |c| c.slots = 4).await?;
    let mut book = Book::default();
    for pair in (0..SEEDS).collect::<Vec<_>>().chunks(2) {
        let mut hostile = Vec::new();
        for seed in pair {
            let mut t = task("py", json!({"do": "random", "seed": seed}));
            // A torn frame may leave the drone waiting for the rest: the timeout is the
            // backstop that still ends the attempt once.
            t.timeout_ms = Some(2_000);
            hostile.push(t);
        }
        let healthy: Vec<Assign> = pair.iter().map(|_| task("py", json!({}))).collect();
        for t in hostile.iter().chain(&healthy) {
            h.conn.assign(t.clone()).await?;
        }
        let ids: Vec<TaskId> = hostile.iter().chain(&healthy).map(|t| t.task_id).collect();
        book.wait_for(&mut h.conn, &ids).await?;
        for (seed, t) in pair.iter().zip(&hostile) {
            let f = failed(book.outcome(t.task_id)?)
                .with_context(|| format!("seed {seed} did not fail its attempt"))?;
            assert!(f.retryable, "seed {seed}: {f:?}");
        }
        for t in &healthy {
            completed(book.outcome(t.task_id)?)
                .with_context(|| format!("the drone stopped serving the pool near {pair:?}"))?;
        }
    }
    book.exactly_once(&mut h.conn, 2).await?;
    pool_status(&mut h.conn, "py", "both processes ready at the end", |p| {
        p.ready == 2
    })
    .await?;
    Ok(())
}

// ----- 3. a process that dies mid-task -----

/// Guards what an operator needs to see when a handler dies under a task: a retryable
/// failure with its exit code or signal and the last words on its stderr, and a fresh
/// process for the next task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_dying_mid_task_fails_it_with_the_exit_and_stderr_and_is_replaced() -> Result<()>
{
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let cases = [
        (
            json!({"do": "exit", "code": 3, "stderr": "Traceback: out of cheese\n"}),
            "exited with code 3",
            "out of cheese",
        ),
        (
            json!({"do": "segv", "stderr": "about to dereference NULL\n"}),
            "SIGSEGV",
            "about to dereference NULL",
        ),
    ];
    for (payload, exit, last_words) in cases {
        let t = task("py", payload.clone());
        h.conn.assign(t.clone()).await?;
        let dead = w.started_on(t.task_id).await;
        let f = failed(h.conn.outcome(t.task_id).await?)?;
        assert!(f.retryable, "{payload}: {f:?}");
        assert!(
            f.error.contains(exit),
            "{payload}: `{}` lacks `{exit}`",
            f.error
        );
        assert!(
            f.error.contains(last_words),
            "{payload}: `{}` lacks the stderr tail `{last_words}`",
            f.error
        );
        let next = pid_task(&mut h.conn, "py").await?;
        assert_ne!(next, dead, "{payload}: the task ran on the dead process");
    }
    Ok(())
}

// ----- 4. timeouts -----

/// Guards `timeout_ms` for pool tasks: the attempt fails "timed out after", the process's
/// group gets SIGTERM first (as the table in docs/POOLS.md says, so a handler can clean up)
/// and is gone soon after, and the next task runs on a fresh process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_task_kills_its_process_politely_and_the_next_task_runs() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let mut t = task("py", json!({"do": "block", "trap_term": true}));
    t.timeout_ms = Some(400);
    h.conn.assign(t.clone()).await?;
    let pid = w.started_on(t.task_id).await;

    let f = failed(h.conn.outcome(t.task_id).await?)?;
    assert_eq!(f.error, "timed out after 400 ms");
    assert!(f.retryable);
    wait_all_gone(&[pid]).await;
    let termed = std::fs::read_to_string(w.file("sigterm")).unwrap_or_default();
    assert_eq!(
        termed.trim(),
        pid.to_string(),
        "the timed-out process got no SIGTERM before SIGKILL"
    );

    let next = pid_task(&mut h.conn, "py").await?;
    assert_ne!(next, pid);
    Ok(())
}

// ----- 5. cancels -----

/// Guards cancel for a running pool task: the attempt fails for good with the queen's
/// reason, and the process that ran it is killed and replaced (the handler must stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_pool_task_kills_its_process_and_fails_it_for_good() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let t = task("py", json!({"do": "block"}));
    h.conn.assign(t.clone()).await?;
    let pid = w.started_on(t.task_id).await;

    h.conn.send(cancel(&t, "operator said so")).await?;
    let f = failed(h.conn.outcome(t.task_id).await?)?;
    assert_eq!(f.error, "cancelled: operator said so");
    assert!(!f.retryable);
    wait_all_gone(&[pid]).await;
    let next = pid_task(&mut h.conn, "py").await?;
    assert_ne!(next, pid);
    Ok(())
}

/// Guards cancel for a task still waiting for a busy process: it ends at once (not when a
/// process frees up), it never runs, and the busy process and its task are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_waiting_pool_task_ends_it_at_once_and_leaves_the_busy_one() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |c| c.slots = 2).await?;
    let go = w.file("go");
    let busy = task("py", json!({"do": "block", "go": go}));
    h.conn.assign(busy.clone()).await?;
    let pid = w.started_on(busy.task_id).await;
    let waiting = task("py", json!({"do": "pid"}));
    h.conn.assign(waiting.clone()).await?;
    h.conn
        .heartbeat_where("a heartbeat holding both tasks", |held, _| {
            held.contains(&support::held(&waiting))
        })
        .await?;

    let asked = Instant::now();
    h.conn.send(cancel(&waiting, "changed my mind")).await?;
    let f = failed(h.conn.outcome(waiting.task_id).await?)?;
    assert_eq!(f.error, "cancelled: changed my mind");
    assert!(!f.retryable);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the waiting task was cancelled only after {:?}",
        asked.elapsed()
    );
    assert!(
        !is_gone(pid),
        "the busy process was killed for another task"
    );

    std::fs::write(&go, b"")?;
    let done = completed(h.conn.outcome(busy.task_id).await?)?;
    assert_eq!(done.result, json!({"pid": pid, "released": true}));
    assert_eq!(
        pid_task(&mut h.conn, "py").await?,
        pid,
        "the process was replaced"
    );
    assert!(
        !w.started().contains_key(&waiting.task_id.to_string()),
        "the cancelled task still ran"
    );
    Ok(())
}

// ----- 6. checkpoints -----

/// Guards checkpoints through the pool protocol: the checkpoint the queen hands in reaches
/// the worker in `run`, and one the worker sends reaches the queen in a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_go_in_through_run_and_out_through_heartbeats() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let go = w.file("go");
    let mut t = task(
        "py",
        json!({"do": "checkpoint", "data": {"step": 2, "progress": 0.5}, "go": go}),
    );
    t.checkpoint = Some(json!({"step": 1}));
    t.attempt = 2;
    h.conn.assign(t.clone()).await?;
    let task_id = t.task_id;
    let data = h
        .conn
        .recv_where("a heartbeat with the worker's checkpoint", |m| match m {
            DroneMessage::Heartbeat(hb) => hb
                .checkpoints
                .iter()
                .find(|c| c.task_id == task_id && c.fence == t.fence)
                .map(|c| c.data.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(data, json!({"step": 2, "progress": 0.5}));
    std::fs::write(&go, b"")?;
    let done = completed(h.conn.outcome(task_id).await?)?;
    assert_eq!(done.result, json!({"checkpoint_in_run": {"step": 1}}));
    Ok(())
}

// ----- 7. recycling -----

/// Guards `max_tasks`: a process is retired after that many tasks (and really ends), the
/// next task runs on a fresh one, and recycling is not counted as a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tasks_recycles_a_process_without_counting_a_restart() -> Result<()> {
    let w = Workdir::new()?;
    let mut pool = w.pool("py", "py", 1);
    pool.max_tasks = Some(2);
    let mut h = hive(vec![spec(pool)], |_| {}).await?;
    let first = pid_task(&mut h.conn, "py").await?;
    assert_eq!(pid_task(&mut h.conn, "py").await?, first);
    let third = pid_task(&mut h.conn, "py").await?;
    assert_ne!(
        third, first,
        "the third task ran on the process past max_tasks"
    );
    wait_all_gone(&[first]).await;
    assert_eq!(pid_task(&mut h.conn, "py").await?, third);
    // The fourth task was the third process's second: it is being recycled too.
    let status = pool_status(&mut h.conn, "py", "a ready process after recycling", |p| {
        p.ready == 1
    })
    .await?;
    assert_eq!(status.restarts, 0, "{status:?}");
    Ok(())
}

/// Guards `max_memory_mib`: a process whose resident memory is above it after a task is
/// recycled (its next task runs on a fresh process; not counted as a restart), and one
/// below it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_recycles_a_process_that_grew_past_it() -> Result<()> {
    let w = Workdir::new()?;
    let mut pool = w.pool("py", "py", 1);
    pool.max_memory_mib = Some(64);
    let mut h = hive(vec![spec(pool)], |_| {}).await?;
    let first = pid_task(&mut h.conn, "py").await?;
    assert_eq!(
        pid_task(&mut h.conn, "py").await?,
        first,
        "a process below max_memory_mib is kept"
    );
    let grow = task("py", json!({"do": "grow", "mib": 128}));
    h.conn.assign(grow.clone()).await?;
    assert_eq!(
        pid_of(&completed(h.conn.outcome(grow.task_id).await?)?)?,
        first
    );
    let next = pid_task(&mut h.conn, "py").await?;
    assert_ne!(
        next, first,
        "the process that grew past max_memory_mib was kept"
    );
    wait_all_gone(&[first]).await;
    let status = pool_status(&mut h.conn, "py", "a ready process after recycling", |p| {
        p.ready == 1
    })
    .await?;
    assert_eq!(status.restarts, 0, "{status:?}");
    Ok(())
}

// ----- 8. crash loops -----

/// The most restarts a crash loop may make within `window` of its first crash when the
/// wait before each restart doubles from RESTART_BACKOFF_MIN: the crash itself, then one
/// per backoff that fits in the window.
fn most_restarts_within(window: Duration) -> u64 {
    let mut restarts = 1;
    let mut waited = Duration::ZERO;
    let mut delay = RESTART_BACKOFF_MIN;
    loop {
        waited += delay;
        if waited > window {
            return restarts;
        }
        restarts += 1;
        delay *= 2;
    }
}

/// Guards the restart backoff: a worker that dies before `ready` on every start is shown
/// as failing (with why) and restarted, but with a doubling wait, never in a busy loop
/// that would eat a core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_pool_is_reported_failing_and_restarted_with_backoff() -> Result<()> {
    const WINDOW: Duration = Duration::from_millis(1500);
    let w = Workdir::new()?;
    let mut pool = w.pool("py", "py", 1);
    pool.env = Some(
        [(
            "CRASH_MARKER".to_owned(),
            w.file("marker").display().to_string(),
        )]
        .into(),
    );
    let mut h = hive(vec![spec(pool)], |_| {}).await?;

    let since = Instant::now();
    let t = task("py", json!({"do": "exit", "code": 1}));
    h.conn.assign(t.clone()).await?;
    failed(h.conn.outcome(t.task_id).await?)?;
    let mut last = None;
    while since.elapsed() < WINDOW {
        let status = pool_status(&mut h.conn, "py", "a heartbeat", |_| true).await?;
        let bound = most_restarts_within(since.elapsed());
        assert!(
            status.restarts <= bound,
            "{} restarts within {:?} of the first crash; backoff allows {bound}: {status:?}",
            status.restarts,
            since.elapsed()
        );
        last = Some(status);
    }
    let status = last.context("no heartbeat")?;
    assert!(
        status.restarts >= 3,
        "the pool stopped restarting its process: {status:?}"
    );
    assert_eq!(status.ready, 0, "{status:?}");
    let failing = status.failing.clone().unwrap_or_default();
    assert!(
        failing.contains("before it said `ready`")
            && failing.contains("crash loop: refusing to start"),
        "failing should say why: {status:?}"
    );
    let pids = pids_in(&w.file("pids"), 1).await;
    wait_all_gone(&pids).await;
    Ok(())
}

// ----- 9. start errors -----

/// Guards start: a pool that cannot start stops the drone with an error naming the pool
/// (not a drone that runs and announces kinds it cannot serve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_program_does_not_exist_stops_the_drone_naming_it() -> Result<()> {
    let mut config = test_config(dead_addr()?)?;
    config.pools = vec![spec(PoolFile {
        name: "ghost".into(),
        command: vec!["/nonexistent/hive-worker".into(), "--serve".into()],
        processes: Some(1),
        ..PoolFile::default()
    })];
    let e = start_error(config).await?;
    assert!(
        e.contains("pool `ghost`") && e.contains("/nonexistent/hive-worker"),
        "{e}"
    );
    Ok(())
}

/// Guards the start error an operator acts on: a worker that dies before `ready` (a bad
/// import, a missing setting) stops the drone with its exit and the tail of its stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_exiting_before_ready_stops_the_drone_with_its_stderr() -> Result<()> {
    let w = Workdir::new()?;
    let mut config = test_config(dead_addr()?)?;
    let mut pool = w.pool("early", "py", 2);
    pool.env = Some(
        [(
            "EXIT_BEFORE_READY".to_owned(),
            "ImportError: no module named myapp".to_owned(),
        )]
        .into(),
    );
    config.pools = vec![spec(pool)];
    let e = start_error(config).await?;
    for needle in [
        "pool `early`",
        "pool_worker.py",
        "exited with code 2 before it said `ready`",
        "ImportError: no module named myapp",
    ] {
        assert!(e.contains(needle), "`{e}` lacks `{needle}`");
    }
    Ok(())
}

/// Guards `ready_timeout_ms`: a worker that never says `ready` does not hang the drone's
/// start forever, and is not left running after the drone gives up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_silent_past_ready_timeout_stops_the_drone_and_is_killed() -> Result<()> {
    let w = Workdir::new()?;
    let mut config = test_config(dead_addr()?)?;
    let mut pool = w.pool("mute", "py", 1);
    pool.env = Some([("NEVER_READY".to_owned(), "1".to_owned())].into());
    pool.ready_timeout_ms = Some(300);
    config.pools = vec![spec(pool)];
    let e = start_error(config).await?;
    assert!(
        e.contains("pool `mute`") && e.contains("did not say `ready` within 300 ms"),
        "{e}"
    );
    let pids = pids_in(&w.file("pids"), 1).await;
    wait_all_gone(&pids).await;
    Ok(())
}

/// Guards kind ownership: two pools may not claim one kind (which would get the task?),
/// and every process started before the refusal is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_announcing_one_kind_stop_the_drone_and_leave_no_process() -> Result<()> {
    let w = Workdir::new()?;
    let mut config = test_config(dead_addr()?)?;
    config.pools = vec![
        spec(w.pool("one", "shared-kind,a", 1)),
        spec(w.pool("two", "b,shared-kind", 1)),
    ];
    let e = start_error(config).await?;
    assert!(
        e.contains("pools `one` and `two` both announce `shared-kind`"),
        "{e}"
    );
    let pids = pids_in(&w.file("pids"), 2).await;
    wait_all_gone(&pids).await;
    Ok(())
}

/// Guards the built-in kinds: a pool may not take over `echo` (or `exec`, which policy
/// governs) by announcing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_announcing_a_built_in_kind_stops_the_drone() -> Result<()> {
    let w = Workdir::new()?;
    let mut config = test_config(dead_addr()?)?;
    config.pools = vec![spec(w.pool("impostor", "echo", 1))];
    let e = start_error(config).await?;
    assert!(
        e.contains("pool `impostor`") && e.contains("`echo`") && e.contains("built-in"),
        "{e}"
    );
    Ok(())
}

/// Guards policy: `policy.kinds` limits what pools may handle as it limits built-in
/// kinds; a pool announcing a kind outside it must not quietly widen what runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_kind_outside_policy_kinds_stops_the_drone() -> Result<()> {
    let w = Workdir::new()?;
    let mut config = test_config(dead_addr()?)?;
    config.policy.pool_kinds = Some(vec!["other".into()]);
    config.pools = vec![spec(w.pool("mine", "mine", 1))];
    let e = start_error(config).await?;
    assert!(
        e.contains("pool `mine`") && e.contains("`mine`") && e.contains("policy.kinds"),
        "{e}"
    );
    Ok(())
}

// ----- 10. the real binary -----

/// Guards "processes die with their drone": after `kill -9` of the drone nothing can
/// clean up, so the parent-death signal must take every pool process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_of_the_drone_takes_its_pool_processes() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let w = Workdir::new()?;
    let flag = format!("py:2=python3 {} py", w.script.display());
    let drone = DroneProcess::start(queen.addr, &["--pool", &flag], &[])?;
    let mut conn = queen.accept().await?;
    let hello = conn.welcome().await?;
    assert!(hello.kinds.contains(&"py".to_owned()), "{:?}", hello.kinds);
    let pids = pids_in(&w.file("pids"), 2).await;
    assert!(pids.iter().all(|p| !is_gone(*p)), "{pids:?} should run");

    signal(drone.pid(), libc::SIGKILL)?;
    wait_all_gone(&pids).await;
    Ok(())
}

// ----- 11. several pools -----

/// Guards routing by kind: with two pools on one drone each task goes to the pool that
/// announced its kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_each_get_the_tasks_of_their_own_kinds() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(
        vec![
            spec(w.pool("alpha", "a", 1)),
            spec(w.pool("beta", "b,b2", 1)),
        ],
        |c| c.slots = 4,
    )
    .await?;
    for k in ["a", "b", "b2"] {
        assert!(h.hello.kinds.contains(&k.to_owned()), "{:?}", h.hello.kinds);
    }
    let tasks = [
        ("a", "alpha"),
        ("b", "beta"),
        ("b2", "beta"),
        ("a", "alpha"),
    ];
    let assigned: Vec<Assign> = tasks
        .iter()
        .map(|(kind, _)| task(kind, json!({"do": "pid"})))
        .collect();
    for t in &assigned {
        h.conn.assign(t.clone()).await?;
    }
    // The pools run side by side: their outcomes come in any order.
    let mut book = Book::default();
    let ids: Vec<TaskId> = assigned.iter().map(|t| t.task_id).collect();
    book.wait_for(&mut h.conn, &ids).await?;
    for (t, (kind, pool)) in assigned.iter().zip(tasks) {
        let done = completed(book.outcome(t.task_id)?)?;
        assert_eq!(
            (done.result["kind"].as_str(), done.result["pool"].as_str()),
            (Some(kind), Some(pool)),
            "{}",
            done.result
        );
    }
    let statuses = h
        .conn
        .recv_where("a heartbeat with both pools", |m| match m {
            DroneMessage::Heartbeat(hb) if hb.pools.len() == 2 => Some(hb.pools.clone()),
            _ => None,
        })
        .await?;
    let kinds: Vec<(&str, Vec<&str>)> = statuses
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.kinds.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(kinds, vec![("alpha", vec!["a"]), ("beta", vec!["b", "b2"])]);
    Ok(())
}

// ----- 12. the environment -----

/// Guards the environment of a pool process: the protocol variables and the pool's
/// `env`, on the minimal base a task gets, and nothing else of the drone's environment
/// (which may hold secrets: here, whatever cargo and the shell gave the test process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_process_sees_the_protocol_variables_and_its_env_and_nothing_else() -> Result<()> {
    let w = Workdir::new()?;
    let mut pool = w.pool("envy", "py", 1);
    pool.env = Some([("GREETING".to_owned(), "hello pool".to_owned())].into());
    let mut h = hive(vec![spec(pool)], |_| {}).await?;
    let t = task("py", json!({"do": "env"}));
    h.conn.assign(t.clone()).await?;
    let env = completed(h.conn.outcome(t.task_id).await?)?.result;
    let env = env.as_object().context("env is an object")?;
    let get = |k: &str| env.get(k).and_then(Value::as_str);

    let fd = get("HIVE_POOL_FD").context("HIVE_POOL_FD is set")?;
    assert!(
        fd.parse::<u32>().is_ok_and(|fd| fd > 2),
        "HIVE_POOL_FD={fd}"
    );
    assert_eq!(get("HIVE_POOL_PROTOCOL"), Some("1"));
    assert_eq!(get("HIVE_POOL_NAME"), Some("envy"));
    assert_eq!(get("HIVE_POOL_PROCESS"), Some("0"));
    assert_eq!(
        get("HIVE_POOL_MAX_FRAME"),
        Some(shared::frame::DEFAULT_MAX_FRAME_LEN.to_string().as_str())
    );
    assert_eq!(get("GREETING"), Some("hello pool"));
    assert_eq!(get("PATH"), Some(drone::policy::DEFAULT_TASK_PATH));

    // Under cargo the test process has CARGO_MANIFEST_DIR (and HOME, USER, ...): the
    // drone's environment, which must not reach the pool.
    assert_eq!(get("CARGO_MANIFEST_DIR"), None, "the drone's env leaked");
    // Python may add LC_CTYPE when it coerces the C locale; nothing else may appear.
    let allowed = [
        "HIVE_POOL_FD",
        "HIVE_POOL_PROTOCOL",
        "HIVE_POOL_NAME",
        "HIVE_POOL_PROCESS",
        "HIVE_POOL_MAX_FRAME",
        "GREETING",
        "PATH",
        "LANG",
        "LC_CTYPE",
    ];
    let extra: Vec<&String> = env
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    assert!(extra.is_empty(), "unexpected variables: {extra:?}");
    let ours: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    assert!(
        !ours.is_empty(),
        "the test process has no variables of its own, so this test shows nothing"
    );
    Ok(())
}

// ----- what a review of the pool code found -----

/// Guards the exit of a process whose children keep its channel open: the attempt fails
/// when the process exits, with its exit code and stderr, not at the end of file that never
/// comes (without a timeout it would hang forever), and the children die with its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_dies_mid_task_fails_it_even_when_its_children_keep_the_channel(
) -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let before = pid_task(&mut h.conn, "py").await?;
    let t = task(
        "py",
        json!({"do": "fork_and_die", "code": 3, "stderr": "leaving my child\n"}),
    );
    h.conn.assign(t.clone()).await?;
    let f = failed(h.conn.outcome(t.task_id).await?)?;
    assert!(f.retryable, "{f:?}");
    assert!(f.error.contains("exited with code 3"), "{}", f.error);
    assert!(f.error.contains("leaving my child"), "{}", f.error);
    let forked: Vec<i32> = std::fs::read_to_string(w.file("forked"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(forked.len(), 1, "{forked:?}");
    wait_all_gone(&[before, forked[0]]).await;
    assert_ne!(pid_task(&mut h.conn, "py").await?, before);
    Ok(())
}

/// Guards the timeout of a task that waits for a process: it counts from the assignment,
/// as the queen counts it, so a task still waiting when its time is up fails as timed out
/// without ever running (the queen would otherwise give up on it and cancel it midway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_times_out_from_its_assignment_without_running() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let go = w.file("go");
    let busy = task("py", json!({"do": "block", "go": go}));
    h.conn.assign(busy.clone()).await?;
    let pid = w.started_on(busy.task_id).await;
    let mut waiting = task("py", json!({"do": "pid"}));
    waiting.timeout_ms = Some(300);
    h.conn.assign(waiting.clone()).await?;
    let f = failed(h.conn.outcome(waiting.task_id).await?)?;
    assert!(f.error.contains("timed out after 300 ms"), "{}", f.error);
    assert!(
        f.error.contains("waiting for a free process"),
        "{}",
        f.error
    );
    assert!(f.retryable);
    assert!(
        !w.started().contains_key(&waiting.task_id.to_string()),
        "the timed-out task ran"
    );
    std::fs::write(&go, "")?;
    let done = completed(h.conn.outcome(busy.task_id).await?)?;
    assert_eq!(pid_of(&done)?, pid, "the busy process was left alone");
    Ok(())
}

/// Guards the hand-over of a task to a process that no longer reads its channel: the
/// write cannot block the attempt past its timeout (nor a cancel), and the process is
/// replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_stops_reading_cannot_hold_a_task_past_its_timeout() -> Result<()> {
    let w = Workdir::new()?;
    let mut h = hive(vec![spec(w.pool("py", "py", 1))], |_| {}).await?;
    let deaf = task("py", json!({"do": "deaf"}));
    h.conn.assign(deaf.clone()).await?;
    let pid = pid_of(&completed(h.conn.outcome(deaf.task_id).await?)?)?;
    // Far more than a socket buffer holds, within the frame limit.
    let mut big = task("py", json!({"do": "pid", "pad": "x".repeat(900 * 1024)}));
    big.timeout_ms = Some(500);
    h.conn.assign(big.clone()).await?;
    let f = failed(h.conn.outcome(big.task_id).await?)?;
    assert!(f.error.contains("timed out after 500 ms"), "{}", f.error);
    wait_all_gone(&[pid]).await;
    assert_ne!(pid_task(&mut h.conn, "py").await?, pid);
    Ok(())
}

/// Guards a pool that cannot start processes any more: the tasks waiting for it fail
/// (retryably, so the queen runs them elsewhere or later) instead of waiting forever with
/// their leases renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_waiting_for_a_pool_that_cannot_start_fail_retryably() -> Result<()> {
    let w = Workdir::new()?;
    let mut pool = w.pool("py", "py", 1);
    pool.env = Some(
        [(
            "CRASH_MARKER".to_owned(),
            w.file("marker").display().to_string(),
        )]
        .into(),
    );
    let mut h = hive(vec![spec(pool)], |_| {}).await?;
    // The one process dies; every start after it fails.
    let crash = task("py", json!({"do": "exit", "code": 1}));
    h.conn.assign(crash.clone()).await?;
    failed(h.conn.outcome(crash.task_id).await?)?;
    let waiting = task("py", json!({"do": "pid"}));
    h.conn.assign(waiting.clone()).await?;
    let f = failed(h.conn.outcome(waiting.task_id).await?)?;
    assert!(f.retryable, "{f:?}");
    assert!(
        f.error.contains("no process of pool `py` could start"),
        "{}",
        f.error
    );
    assert!(f.error.contains("exited with code 1"), "{}", f.error);
    Ok(())
}

/// Guards a shutdown that arrives while the pools start: the drone stops at once and kills
/// the processes it started, instead of leaving them to the parent-death signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_the_pools_start_kills_what_was_started() -> Result<()> {
    let w = Workdir::new()?;
    let mut pool = w.pool("py", "py", 2);
    pool.env = Some([("NEVER_READY".to_owned(), "1".to_owned())].into());
    pool.ready_timeout_ms = Some(60_000);
    let queen = FakeQueen::start().await?;
    let mut config = test_config(queen.addr)?;
    config.pools = vec![spec(pool)];
    let mut drone = InProcessDrone::start(config);
    let pids = pids_in(&w.file("pids"), 2).await;
    drone.shutdown.graceful.cancel();
    let finished = drone.finished().await?;
    assert!(finished.is_ok(), "{finished:?}");
    wait_all_gone(&pids).await;
    Ok(())
}
