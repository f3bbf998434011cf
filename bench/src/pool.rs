//! `pool` and `pool-rtt`: tasks written in Python or Node, run by a drone's worker pool
//! (docs/POOLS.md) through the SDKs in `sdk/`.
//!
//! - `pool`: end to end, like `throughput`, with one drone whose pool runs a no-op handler
//!   (`bench/workers/noop_tasks.{py,js}`): batch submit → handler → recorded, from the
//!   first submit until `/v1/stats` counts every task succeeded. The figure to put beside
//!   Celery's and BullMQ's (`../shared/peers/`), measured in the same run.
//! - `pool-rtt`: what the pool itself costs. This process plays the drone's side of the
//!   local protocol with one SDK worker process, exactly as the drone starts it (a
//!   socketpair end inherited as `HIVE_POOL_FD`), and times `run` → `done` round trips
//!   one at a time (p50, p99), and a process start → `ready` (what a pool process restart
//!   costs before it can take work).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::hive::{cpu_time, poll, Hive, Proc};
use crate::report::{quantile, Machine, Reporter};

/// The handler language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Python,
    Node,
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Node => "node",
        }
    }

    /// The command that starts one worker process with the no-op handler, and the
    /// environment it needs, for the repo at `repo`.
    fn worker(self, repo: &Path) -> (Vec<String>, Vec<(String, String)>) {
        let workers = repo.join("bench/workers");
        match self {
            Lang::Python => (
                ["python3", "-m", "hive", "worker", "noop_tasks"]
                    .map(str::to_owned)
                    .to_vec(),
                vec![(
                    "PYTHONPATH".to_owned(),
                    format!(
                        "{}:{}",
                        repo.join("sdk/python").display(),
                        workers.display()
                    ),
                )],
            ),
            Lang::Node => (
                vec![
                    "node".to_owned(),
                    repo.join("sdk/node/bin/hive-worker.js")
                        .display()
                        .to_string(),
                    "worker".to_owned(),
                    workers.join("noop_tasks.js").display().to_string(),
                ],
                Vec::new(),
            ),
        }
    }
}

/// The repository the SDKs and the no-op handlers are read from.
fn default_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Lang::Python)]
    pub lang: Lang,
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Worker processes in the drone's pool.
    #[arg(long, default_value_t = 2)]
    pub processes: u32,
    /// The drone's slots: above `processes`, the next tasks wait in the drone while the
    /// queen's round trip is in flight (like BullMQ's `concurrency` or Celery's prefetch).
    #[arg(long, default_value_t = 128)]
    pub slots: u32,
    /// Tasks per batch request.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
    /// The repository holding `sdk/` and `bench/workers/` [default: this build's].
    #[arg(long)]
    pub repo: Option<PathBuf>,
}

pub fn run(bin_dir: &Path, sync: bool, json_only: bool, machine: &Machine, a: &Args) -> Result<()> {
    let repo = a.repo.clone().unwrap_or_else(default_repo);
    let settings = json!({
        "lang": a.lang.name(), "tasks": a.tasks, "processes": a.processes,
        "slots": a.slots, "batch": a.batch, "sync": sync,
    });
    let mut report = Reporter::new("pool", machine, settings, json_only);
    for trial in 1..=a.trials {
        let hive = Hive::start(bin_dir, sync)?;
        let queen = &hive.queen;
        let dir = tempfile::tempdir()?;
        let (command, env) = a.lang.worker(&repo);
        let config = pool_config(&queen.drones_addr, a.slots, a.processes, &command, &env);
        let config_path = dir.path().join("drone.toml");
        std::fs::write(&config_path, config)?;
        let drone = Proc(
            Command::new(bin_dir.join("drone"))
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("drone.log"))?)
                .spawn()
                .context("starting the drone")?,
        );
        queen
            .wait_drones(1, Duration::from_secs(60))
            .with_context(|| format!("see {}", dir.path().join("drone.log").display()))?;
        let cpu_before = (cpu_time(queen.pid())?, cpu_time(drone.pid())?);
        let start = Instant::now();
        let mut left = a.tasks;
        while left > 0 {
            let n = left.min(a.batch.max(1));
            let specs: Vec<Value> = (0..n)
                .map(|i| json!({"kind": "bench.noop", "payload": {"i": i}}))
                .collect();
            queen.post("/v1/tasks/batch", json!({ "tasks": specs }))?;
            left -= n;
        }
        poll(Duration::from_secs(600), || {
            let stats = queen.stats()?;
            if stats.by_state.get("failed").copied().unwrap_or(0) > 0 {
                bail!(
                    "tasks failed; see {}",
                    dir.path().join("drone.log").display()
                );
            }
            Ok(stats.by_state.get("succeeded").copied().unwrap_or(0) >= a.tasks as u64)
        })?;
        let total = start.elapsed();
        let per_task = |spent: Duration| spent.as_secs_f64() * 1e6 / a.tasks as f64;
        let (queen_cpu, drone_cpu) = (
            cpu_time(queen.pid())?.saturating_sub(cpu_before.0),
            cpu_time(drone.pid())?.saturating_sub(cpu_before.1),
        );
        report.value(
            trial,
            "e2e_tasks_per_s",
            "tasks/s",
            a.tasks as f64 / total.as_secs_f64(),
        );
        report.value(trial, "queen_cpu_per_task_us", "µs", per_task(queen_cpu));
        report.value(trial, "drone_cpu_per_task_us", "µs", per_task(drone_cpu));
        drop(drone);
    }
    report.summary();
    Ok(())
}

/// A drone config with one pool (TOML strings are JSON strings for these values).
fn pool_config(
    queen: &str,
    slots: u32,
    processes: u32,
    command: &[String],
    env: &[(String, String)],
) -> String {
    let quoted = |s: &str| Value::String(s.to_owned()).to_string();
    let command: Vec<String> = command.iter().map(|c| quoted(c)).collect();
    let env: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{} = {}", quoted(k), quoted(v)))
        .collect();
    format!(
        "queen = {}\nslots = {slots}\nname = \"bench-pool\"\n\n[[pool]]\nname = \"bench\"\n\
         command = [{}]\nprocesses = {processes}\nenv = {{ {} }}\n",
        quoted(queen),
        command.join(", "),
        env.join(", ")
    )
}

#[derive(Debug, Clone, clap::Args)]
pub struct RttArgs {
    #[arg(long, value_enum, default_value_t = Lang::Python)]
    pub lang: Lang,
    /// Round trips per trial, one at a time.
    #[arg(long, default_value_t = 20_000)]
    pub round_trips: usize,
    /// Process starts timed per trial.
    #[arg(long, default_value_t = 10)]
    pub starts: usize,
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
    #[arg(long)]
    pub repo: Option<PathBuf>,
}

/// One SDK worker process on the far end of a socketpair, as the drone runs it.
struct Worker {
    child: std::process::Child,
    channel: UnixStream,
}

impl Worker {
    /// Starts it and waits for `ready`; returns it and how long that took.
    fn start(lang: Lang, repo: &Path) -> Result<(Worker, Duration)> {
        let (ours, theirs) = UnixStream::pair()?;
        let fd = theirs.as_raw_fd();
        let (command, env) = lang.worker(repo);
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..])
            .envs(env)
            .env("HIVE_POOL_FD", fd.to_string())
            .env("HIVE_POOL_PROTOCOL", "1")
            .env("HIVE_POOL_NAME", "bench")
            .env("HIVE_POOL_PROCESS", "0")
            .stdin(Stdio::null());
        // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on the child's
        // copy of the channel so the worker inherits it under the same number.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().context("starting the worker")?;
        drop(theirs);
        let mut worker = Worker {
            child,
            channel: ours,
        };
        let ready = worker.recv()?;
        if ready["type"] != "ready" {
            bail!("the worker's first message was {ready}");
        }
        Ok((worker, started.elapsed()))
    }

    fn send(&mut self, message: &Value) -> Result<()> {
        let body = serde_json::to_vec(message)?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
        frame.extend_from_slice(&body);
        self.channel.write_all(&frame)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Value> {
        let mut len = [0u8; 4];
        self.channel
            .read_exact(&mut len)
            .context("the worker closed its channel")?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.channel.read_exact(&mut body)?;
        Ok(serde_json::from_slice(&body)?)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_rtt(json_only: bool, machine: &Machine, a: &RttArgs) -> Result<()> {
    let repo = a.repo.clone().unwrap_or_else(default_repo);
    let settings = json!({"lang": a.lang.name(), "round_trips": a.round_trips, "starts": a.starts});
    let mut report = Reporter::new("pool-rtt", machine, settings, json_only);
    for trial in 1..=a.trials {
        let mut starts = Vec::with_capacity(a.starts);
        for _ in 0..a.starts.max(1) {
            let (_worker, took) = Worker::start(a.lang, &repo)?;
            starts.push(took.as_secs_f64() * 1e3);
        }
        let (mut worker, _) = Worker::start(a.lang, &repo)?;
        let mut rtts = Vec::with_capacity(a.round_trips);
        let payload = json!({"i": 1});
        for i in 0..a.round_trips {
            let task_id = format!("00000000-0000-7000-8000-{i:012}");
            let run = json!({
                "type": "run", "task_id": task_id, "attempt": 1, "fence": 1,
                "kind": "bench.noop", "queue": "default", "payload": payload,
                "checkpoint": null, "timeout_ms": null,
            });
            let sent = Instant::now();
            worker.send(&run)?;
            let done = worker.recv()?;
            rtts.push(sent.elapsed().as_secs_f64() * 1e6);
            if done["type"] != "done" || done["task_id"] != task_id.as_str() {
                bail!("expected done for {task_id}, got {done}");
            }
        }
        rtts.sort_by(f64::total_cmp);
        starts.sort_by(f64::total_cmp);
        report.value(trial, "round_trip_p50_us", "µs", quantile(&rtts, 0.50));
        report.value(trial, "round_trip_p99_us", "µs", quantile(&rtts, 0.99));
        report.value(
            trial,
            "start_to_ready_p50_ms",
            "ms",
            quantile(&starts, 0.50),
        );
        report.value(trial, "start_to_ready_max_ms", "ms", quantile(&starts, 1.0));
    }
    report.summary();
    Ok(())
}
