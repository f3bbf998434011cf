//! `hive-bench`: measures a real queen with real drones on this machine.
//!
//! ```sh
//! cargo build --release -p queen -p drone -p hive-bench
//! target/release/hive-bench throughput --tasks 10000 --drones 4 --slots 8
//! target/release/hive-bench requeue --trials 5
//! ```
//!
//! Each run starts its own queen (temp data dir, free ports) and drones from the binaries
//! next to this one, prints a human table and one JSON line per result, then stops them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use shared::api::{Stats, TaskState, TaskView};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks The Hive with a real queen and real drones")]
struct Cli {
    /// Directory holding the `queen` and `drone` binaries (default: next to this one).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// `[storage] sync` for the queen: fdatasync-class durability per group commit.
    #[arg(long, global = true)]
    sync: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// End-to-end throughput of `echo` tasks: batch submit → run → recorded.
    Throughput {
        #[arg(long, default_value_t = 10_000)]
        tasks: usize,
        #[arg(long, default_value_t = 4)]
        drones: u32,
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Tasks per batch request.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
    },
    /// Time from `kill -9` (and from SIGSTOP) of a drone to its task being requeued, with
    /// the default lease settings.
    Requeue {
        #[arg(long, default_value_t = 3)]
        trials: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("no parent dir")?
            .to_path_buf(),
    };
    for b in ["queen", "drone"] {
        if !bin_dir.join(b).exists() {
            bail!(
                "{} not found; build with `cargo build --release -p queen -p drone -p hive-bench`",
                bin_dir.join(b).display()
            );
        }
    }
    println!(
        "machine: {} cores, {}",
        num_cpus(),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    match cli.what {
        What::Throughput {
            tasks,
            drones,
            slots,
            batch,
        } => throughput(&bin_dir, cli.sync, tasks, drones, slots, batch),
        What::Requeue { trials } => requeue(&bin_dir, cli.sync, trials),
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Hive {
    _dir: tempfile::TempDir,
    _queen: Proc,
    drones_addr: String,
    http: String,
    bin_dir: PathBuf,
}

impl Hive {
    fn start(bin_dir: &Path, sync: bool) -> Result<Hive> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(bin_dir.join("queen"))
            .env("HIVE_QUEEN__LISTEN", "127.0.0.1:0")
            .env("HIVE_QUEEN__HTTP", "127.0.0.1:0")
            .env("HIVE_QUEEN__DATA_DIR", dir.path())
            .env("HIVE_STORAGE__SYNC", sync.to_string())
            .env("HIVE_LOG__LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let queen = Proc(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .context("no ready line from the queen")
        };
        Ok(Hive {
            drones_addr: field("drones=")?,
            http: field("http=")?,
            _queen: queen,
            _dir: dir,
            bin_dir: bin_dir.to_path_buf(),
        })
    }

    fn drone(&self, name: &str, slots: u32) -> Result<Proc> {
        Ok(Proc(
            Command::new(self.bin_dir.join("drone"))
                .args([
                    "--queen",
                    &self.drones_addr,
                    "--slots",
                    &slots.to_string(),
                    "--name",
                    name,
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }

    fn get(&self, path: &str) -> Result<Value> {
        Ok(ureq::get(&format!("http://{}{path}", self.http))
            .call()?
            .into_json()?)
    }

    fn post(&self, path: &str, body: Value) -> Result<Value> {
        Ok(ureq::post(&format!("http://{}{path}", self.http))
            .send_json(body)?
            .into_json()?)
    }

    fn stats(&self) -> Result<Stats> {
        Ok(serde_json::from_value(self.get("/v1/stats")?)?)
    }

    fn wait_drones(&self, n: u64) -> Result<()> {
        poll(Duration::from_secs(20), || {
            Ok(self.stats()?.drones_connected >= n)
        })
    }
}

fn poll(limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn throughput(
    bin_dir: &Path,
    sync: bool,
    tasks: usize,
    drones: u32,
    slots: u32,
    batch: usize,
) -> Result<()> {
    let hive = Hive::start(bin_dir, sync)?;
    let _drones: Vec<Proc> = (0..drones)
        .map(|i| hive.drone(&format!("bench-{i}"), slots))
        .collect::<Result<_>>()?;
    hive.wait_drones(u64::from(drones))?;
    let start = Instant::now();
    let mut left = tasks;
    while left > 0 {
        let n = left.min(batch);
        let specs: Vec<Value> = (0..n)
            .map(|i| json!({"kind": "echo", "payload": i}))
            .collect();
        hive.post("/v1/tasks/batch", json!({"tasks": specs}))?;
        left -= n;
    }
    let submitted = start.elapsed();
    poll(Duration::from_secs(600), || {
        Ok(hive
            .stats()?
            .by_state
            .get("succeeded")
            .copied()
            .unwrap_or(0)
            >= tasks as u64)
    })?;
    let total = start.elapsed();
    let e2e = tasks as f64 / total.as_secs_f64();
    let submit_rate = tasks as f64 / submitted.as_secs_f64();
    println!("{:<34} {:>12}", "metric", "value");
    println!("{:<34} {:>12}", "tasks", tasks);
    println!(
        "{:<34} {:>12}",
        "drones x slots",
        format!("{drones} x {slots}")
    );
    println!("{:<34} {:>12}", "storage.sync", sync);
    println!("{:<34} {:>12.0}", "submit-only tasks/s", submit_rate);
    println!("{:<34} {:>12.0}", "end-to-end tasks/s", e2e);
    println!("{:<34} {:>12.3}", "end-to-end seconds", total.as_secs_f64());
    println!(
        "{}",
        json!({"bench": "throughput", "tasks": tasks, "drones": drones, "slots": slots, "sync": sync, "submit_tasks_per_s": submit_rate.round(), "e2e_tasks_per_s": e2e.round(), "seconds": total.as_secs_f64()})
    );
    Ok(())
}

fn requeue(bin_dir: &Path, sync: bool, trials: u32) -> Result<()> {
    println!("{:<10} {:>6} {:>14}", "signal", "trial", "requeue ms");
    for (signal, name) in [(libc::SIGKILL, "kill -9"), (libc::SIGSTOP, "SIGSTOP")] {
        for trial in 1..=trials {
            let hive = Hive::start(bin_dir, sync)?;
            let victim = hive.drone("victim", 1)?;
            hive.wait_drones(1)?;
            let t: TaskView = serde_json::from_value(hive.post(
                "/v1/tasks",
                json!({"kind": "exec", "payload": {"cmd": ["sleep", "60"]}}),
            )?)?;
            let path = format!("/v1/tasks/{}", t.id);
            poll(Duration::from_secs(20), || {
                Ok(serde_json::from_value::<TaskView>(hive.get(&path)?)?.state
                    == TaskState::Running)
            })?;
            // SAFETY: signalling a child process we started.
            unsafe { libc::kill(victim.0.id() as i32, signal) };
            let t0 = Instant::now();
            poll(Duration::from_secs(60), || {
                Ok(serde_json::from_value::<TaskView>(hive.get(&path)?)?.state
                    != TaskState::Running)
            })?;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            println!("{name:<10} {trial:>6} {ms:>14.0}");
            println!(
                "{}",
                json!({"bench": "requeue", "signal": name, "trial": trial, "ms": ms.round()})
            );
            if signal == libc::SIGSTOP {
                // SAFETY: as above; let the drone die normally when dropped.
                unsafe { libc::kill(victim.0.id() as i32, libc::SIGCONT) };
            }
        }
    }
    Ok(())
}
