//! `failover`: how long writes stop when the leading queen of a PostgreSQL-backed hive
//! dies (`kill -9`) or is stopped (SIGTERM), with N pending tasks in the database.
//!
//! Per trial: a fresh PostgreSQL primary (and synchronous standby with `--sync-standby`);
//! queen A, waited on until it leads (`/readyz` 200); N pending tasks submitted in batches
//! (no drones, so they stay pending: the new leader has all of them to load); queen B,
//! waited on until it stands by (`/healthz` role `standby`). Then:
//!
//! - **failover_s**: from the instant before `kill -9` of A until B answers a
//!   `POST /v1/tasks` with 201. B has to notice that A's lease lapsed (`[postgres]
//!   lease_ms`, default 2 s), take it, and load the N tasks before it can write.
//! - **handover_s**: A is started again (it stands by), B gets SIGTERM (it releases the
//!   lease at once), and the time runs from the signal until A answers a write with 201.
//!
//! A probe is sent every ~10 ms, each on a fresh connection, until one gets 201; a probe
//! the queen holds (a request that arrives while a new leader loads waits for it) counts
//! as the wait it is. After each switch the new leader must count every pending task,
//! probes included, or the trial fails.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::hive::{post_raw, Engine, Postgres, Queen, PG_SETTINGS};
use crate::report::{Machine, Reporter};

/// How long one queen may take to lead at start, to stand by, or to take over.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a write is tried while no queen accepts it.
const PROBE_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Pending tasks in the database when the leader dies.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Tasks per batch request while filling.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// Runs, each with fresh clusters and queens; the median (min–max) follows.
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
}

pub fn run(
    bin_dir: &Path,
    engine: Engine,
    json_only: bool,
    machine: &Machine,
    a: &Args,
) -> Result<()> {
    // This mode is about PostgreSQL: without --sync-standby, a primary alone.
    let engine = if engine.is_postgres() {
        engine
    } else {
        Engine::Postgres
    };
    let mut report = Reporter::new(
        "failover",
        machine,
        json!({"tasks": a.tasks, "batch": a.batch, "engine": engine.name(),
               "postgres": PG_SETTINGS, "lease_ms": "default (2000)", "probe_ms": 10}),
        json_only,
    );
    report.note("failover = kill -9 of the leader → the standby answers POST /v1/tasks with 201; handover = SIGTERM of the leader → the restarted queen (standing by) answers 201");
    for trial in 1..=a.trials {
        let pg = Postgres::start(engine)?.context("failover needs PostgreSQL")?;
        let dir = tempfile::Builder::new()
            .prefix("hive-bench-failover-")
            .tempdir()?;
        let env = pg.queen_env();
        let spawn = |name: &str| -> Result<Queen> {
            let data = dir.path().join(format!("data-{name}"));
            std::fs::create_dir_all(&data)?;
            let log = dir.path().join(format!("queen-{name}.log"));
            Queen::spawn(bin_dir, &data, &log, false, &env)
                .with_context(|| format!("starting queen {name}; see {}", log.display()))
        };

        let a_queen = spawn("a")?;
        a_queen.wait_leading(SWITCH_TIMEOUT)?;
        let fill_started = Instant::now();
        fill(&a_queen, a.tasks, a.batch)?;
        let fill_s = fill_started.elapsed().as_secs_f64();
        expect_pending(&a_queen, a.tasks as u64)?;

        let b_queen = spawn("b")?;
        b_queen.wait_standby(SWITCH_TIMEOUT)?;

        // Failover: kill -9 of the leader.
        let killed = Instant::now();
        a_queen.signal(libc::SIGKILL);
        let failover = first_write(&b_queen, killed, 1)?;
        drop(a_queen);
        expect_pending(&b_queen, a.tasks as u64 + 1)?;

        // Handover: A back as a standby, SIGTERM of B.
        let a_queen = spawn("a")?;
        a_queen.wait_standby(SWITCH_TIMEOUT)?;
        let stopped = Instant::now();
        b_queen.signal(libc::SIGTERM);
        let handover = first_write(&a_queen, stopped, 2)?;
        b_queen
            .wait_exit(SWITCH_TIMEOUT)
            .context("queen B after SIGTERM")?;
        expect_pending(&a_queen, a.tasks as u64 + 2)?;

        report.value(
            trial,
            "fill_tasks_per_s",
            "tasks/s",
            a.tasks as f64 / fill_s,
        );
        report.value(trial, "failover_s", "s", failover.as_secs_f64());
        report.value(trial, "handover_s", "s", handover.as_secs_f64());
        // Queen A is killed, then the clusters stopped, then the dirs removed.
        drop(a_queen);
        drop(pg);
    }
    report.summary();
    Ok(())
}

/// Submits `n` pending `echo` tasks in batches of `batch`.
fn fill(queen: &Queen, n: usize, batch: usize) -> Result<()> {
    let agent = queen.agent();
    let url = queen.url("/v1/tasks/batch");
    let mut done = 0;
    while done < n {
        let k = (n - done).min(batch.max(1));
        let specs: Vec<Value> = (done..done + k)
            .map(|i| json!({"kind": "echo", "payload": i}))
            .collect();
        post_raw(&agent, &url, &json!({ "tasks": specs }).to_string())
            .with_context(|| format!("submitting tasks {done}..{}", done + k))?;
        done += k;
    }
    Ok(())
}

/// Tries `POST /v1/tasks` on `queen` every ~10 ms until one is answered 201; returns the
/// time from `since` to that answer. 503 (a standby, or a leader not ready) and transport
/// errors (a connection refused or cut while the queen switches) are retried; any other
/// answer fails the trial.
fn first_write(queen: &Queen, since: Instant, probe: u32) -> Result<Duration> {
    let url = queen.url("/v1/tasks");
    let body = json!({"kind": "echo", "payload": {"probe": probe}}).to_string();
    loop {
        // A fresh connection per try: a kept-alive one may belong to the standby server
        // that the queen just closed.
        let agent = ureq::AgentBuilder::new()
            .timeout(SWITCH_TIMEOUT)
            .max_idle_connections(0)
            .build();
        match agent
            .post(&url)
            .set("content-type", "application/json")
            .send_string(&body)
        {
            Ok(r) if r.status() == 201 => return Ok(since.elapsed()),
            Ok(r) => bail!("the write probe got {} {}", r.status(), r.status_text()),
            Err(ureq::Error::Status(503, _)) | Err(ureq::Error::Transport(_)) => {}
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                bail!("the write probe got {code}: {text}")
            }
        }
        if since.elapsed() > SWITCH_TIMEOUT {
            bail!("no write accepted within {SWITCH_TIMEOUT:?}");
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// Fails unless the queen counts exactly `n` pending tasks: no acknowledged task was lost
/// (or doubled) across the switch.
fn expect_pending(queen: &Queen, n: u64) -> Result<()> {
    let pending = queen.stats()?.by_state.get("pending").copied().unwrap_or(0);
    if pending != n {
        bail!("the leader counts {pending} pending tasks, expected {n}");
    }
    Ok(())
}
