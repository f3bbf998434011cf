//! `restart`: what a queen restart costs with many pending tasks. Fills a queen with
//! `--tasks` pending `echo` tasks (batch API, no drones), stops it with SIGTERM, starts it
//! again on the same data dir and times, from the new process's spawn:
//!
//! * *ready*: the queen printed `ready drones=... http=...`;
//! * *healthz*: `GET /healthz` answered;
//! * *stats all pending*: the first `GET /v1/stats` answered, counting every task pending
//!   (its own duration is reported too: it is not cheap with many active tasks);
//!
//! then simulated drones connect, and from their first connect:
//!
//! * *first assign* / *all assigned*: the first / the last task's `assign` arrived, i.e.
//!   the queen can dispatch / has leased every task once;
//! * *all recorded*: the ack of the last task's `task_complete` arrived (the drones complete
//!   each task at once, so this is the time to drain the whole backlog).
//!
//! Memory is the queen's `VmRSS` / `VmHWM` from `/proc`: once filled (before the restart),
//! after the restart with every task pending and no drone connected, and once drained.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use shared::api::Stats;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::hive::{disk_usage, Hive, Queen, Submitter};
use crate::report::{mib, Machine, Reporter};
use crate::sim::{self, Behavior, Counters};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Pending tasks the queen holds when it restarts.
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: usize,
    /// Tasks per batch submit while filling.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// Threads submitting batches at once while filling.
    #[arg(long, default_value_t = 4)]
    pub submitters: usize,
    /// Simulated drones draining the backlog after the restart, and slots each.
    #[arg(long, default_value_t = 4)]
    pub drones: u32,
    #[arg(long, default_value_t = 1_000)]
    pub slots: u32,
    /// Runs, each with a fresh queen; the median (min–max) follows.
    #[arg(long, default_value_t = 1)]
    pub trials: u32,
    /// Drain the filled queen without restarting it: how its memory behaves while a
    /// backlog built at full speed drains.
    #[arg(long)]
    pub no_restart: bool,
}

pub fn run(
    bin_dir: &Path,
    sync: bool,
    json_only: bool,
    machine: &Machine,
    rt: &Runtime,
    a: &Args,
) -> Result<()> {
    if a.tasks == 0 || a.drones == 0 {
        bail!("--tasks and --drones must be at least 1");
    }
    let mut report = Reporter::new(
        "restart",
        machine,
        json!({"tasks": a.tasks, "batch": a.batch, "submitters": a.submitters,
               "drones": a.drones, "slots": a.slots, "sync": sync, "drone": "simulated",
               "restart": !a.no_restart}),
        json_only,
    );
    report.note("spawn_to_*: from spawning the restarted queen; connect_to_*: from the drones starting to connect (right after the first /v1/stats answer); all_assigned / all_recorded: the last task's assign / ack arrived (the drones complete each task at once)");
    for trial in 1..=a.trials {
        one(bin_dir, sync, json_only, rt, a, trial, &mut report)?;
    }
    report.summary();
    Ok(())
}

fn pending(stats: &Stats) -> u64 {
    stats.by_state.get("pending").copied().unwrap_or(0)
}

/// One `/v1/stats` call and how long it took.
fn timed_stats(queen: &Queen) -> Result<(Stats, Duration)> {
    let t0 = Instant::now();
    let stats = queen.stats()?;
    Ok((stats, t0.elapsed()))
}

fn one(
    bin_dir: &Path,
    sync: bool,
    json_only: bool,
    rt: &Runtime,
    a: &Args,
    trial: u32,
    report: &mut Reporter,
) -> Result<()> {
    let n = a.tasks as u64;
    let hive = Hive::start(bin_dir, sync)?;

    // Fill.
    let fill = fill(&hive.queen, a, json_only)?;
    report.value(trial, "fill_seconds", "s", fill.as_secs_f64());
    report.value(
        trial,
        "fill_tasks_per_s",
        "tasks/s",
        a.tasks as f64 / fill.as_secs_f64(),
    );
    let (stats, took) = timed_stats(&hive.queen)?;
    if pending(&stats) != n {
        bail!(
            "after filling, the queen counts {} pending tasks, expected {n}",
            pending(&stats)
        );
    }
    report.value(trial, "stats_call_filled", "ms", took.as_secs_f64() * 1e3);
    // The dashboard polls these every 1.5 s and Prometheus scrapes /metrics: what each
    // costs with every task active.
    for (metric, path) in [
        ("queues_call_filled", "/v1/queues"),
        ("metrics_call_filled", "/metrics"),
    ] {
        let t0 = Instant::now();
        let response = hive.queen.agent().get(&hive.queen.url(path)).call()?;
        std::io::copy(&mut response.into_reader(), &mut std::io::sink())?;
        report.value(trial, metric, "ms", t0.elapsed().as_secs_f64() * 1e3);
    }
    // Let the fill's transient allocations settle before reading memory.
    std::thread::sleep(Duration::from_secs(1));
    let filled = hive.queen.memory()?;
    report.value(trial, "queen_rss_filled", "MiB", mib(filled.rss));
    report.value(trial, "queen_hwm_filled", "MiB", mib(filled.hwm));

    let (hive, spawned) = if a.no_restart {
        (hive, None)
    } else {
        let (hive, spawned) = restart(hive, n, trial, report)?;
        (hive, Some(spawned))
    };
    let queen = &hive.queen;

    // Drain with simulated drones; watched through their counters, not `/v1/stats`, which
    // would compete with the drain for the queen's core.
    let counters = Arc::new(Counters::default());
    counters.target.store(n, Ordering::Relaxed);
    let stop = CancellationToken::new();
    let _stop_drones = stop.clone().drop_guard();
    let connecting = Instant::now();
    for i in 0..a.drones {
        let conn = rt.block_on(sim::connect(
            &queen.drones_addr,
            &format!("sim-{i}"),
            a.slots,
        ))?;
        rt.spawn(sim::run(
            conn,
            Behavior::Complete {
                work: Duration::ZERO,
            },
            None,
            counters.clone(),
            stop.clone(),
        ));
    }
    // A generous bound: 1,000 tasks/s would be an order of magnitude below expectations.
    let limit = Duration::from_secs(60 + n / 1_000);
    let mut last_progress = Instant::now();
    let mut last_sample = Instant::now();
    let mut peak_draining = queen.memory()?.rss;
    while counters.all_recorded.get().is_none() {
        if last_sample.elapsed() > Duration::from_millis(100) {
            peak_draining = peak_draining.max(queen.memory()?.rss);
            last_sample = Instant::now();
        }
        if Counters::get(&counters.lost) > 0 {
            bail!("a simulated drone lost its connection during the drain");
        }
        if connecting.elapsed() > limit {
            bail!(
                "drain stuck: {} assigned, {} recorded of {n} after {limit:?}",
                Counters::get(&counters.assigned),
                Counters::get(&counters.recorded)
            );
        }
        if !json_only && last_progress.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  draining: {} assigned, {} recorded of {n}",
                Counters::get(&counters.assigned),
                Counters::get(&counters.recorded)
            );
            last_progress = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let after_connect =
        |t: Option<&Instant>| t.map_or(f64::NAN, |t| (*t - connecting).as_secs_f64());
    report.value(
        trial,
        "connect_to_first_assign",
        "s",
        after_connect(counters.first_assign.get()),
    );
    report.value(
        trial,
        "connect_to_all_assigned",
        "s",
        after_connect(counters.all_assigned.get()),
    );
    report.value(
        trial,
        "connect_to_all_recorded",
        "s",
        after_connect(counters.all_recorded.get()),
    );
    if let Some(done) = counters.all_recorded.get() {
        if let Some(spawned) = spawned {
            report.value(
                trial,
                "spawn_to_all_recorded",
                "s",
                (*done - spawned).as_secs_f64(),
            );
        }
        report.value(
            trial,
            "drain_tasks_per_s",
            "tasks/s",
            a.tasks as f64 / (*done - connecting).as_secs_f64(),
        );
    }
    let stale = Counters::get(&counters.stale);
    if stale > 0 {
        bail!("{stale} completions were acknowledged as stale");
    }
    let drained = queen.memory()?;
    report.value(
        trial,
        "queen_rss_peak_draining",
        "MiB",
        mib(peak_draining.max(drained.rss)),
    );
    report.value(trial, "queen_rss_drained", "MiB", mib(drained.rss));
    report.value(trial, "queen_hwm_drained", "MiB", mib(drained.hwm));
    let stats = queen.stats()?;
    let succeeded = stats.by_state.get("succeeded").copied().unwrap_or(0);
    if succeeded != n {
        bail!("after the drain the queen counts {succeeded} succeeded tasks, expected {n}");
    }
    Ok(())
}

/// Submits `a.tasks` pending tasks in batches from `a.submitters` threads; returns how long
/// it took.
fn fill(queen: &Queen, a: &Args, json_only: bool) -> Result<Duration> {
    let batch = a.batch.max(1);
    let batches = a.tasks.div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..a.submitters.max(1))
        .map(|_| {
            let next = next.clone();
            let http = queen.http.clone();
            let tasks = a.tasks;
            std::thread::spawn(move || -> Result<()> {
                let mut submitter = Submitter::connect(&http)?;
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok(());
                    }
                    let from = b * batch;
                    let to = (from + batch).min(tasks);
                    let mut body = String::with_capacity(64 + (to - from) * 40);
                    body.push_str(r#"{"tasks":["#);
                    for i in from..to {
                        if i > from {
                            body.push(',');
                        }
                        body.push_str(&format!(r#"{{"kind":"echo","payload":{{"seq":{i}}}}}"#));
                    }
                    body.push_str("]}");
                    submitter
                        .post("/v1/tasks/batch", body)
                        .with_context(|| format!("submitting batch {b} of {batches}"))?;
                    if !json_only && b > 0 && (b * batch) % 100_000 < batch {
                        eprintln!(
                            "  filling: {} of {tasks} submitted, {:.0} s",
                            b * batch,
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a submitter thread panicked"))??;
    }
    Ok(start.elapsed())
}

/// Restarts the filled queen and reports how long until it serves and counts every task
/// pending, and its memory then; returns the new hive and when its queen was spawned.
fn restart(hive: Hive, n: u64, trial: u32, report: &mut Reporter) -> Result<(Hive, Instant)> {
    let (stopped_in, hive) = hive.restart()?;
    let queen = &hive.queen;
    let spawned = queen.spawned_at;
    let disk = disk_usage(&hive.data_dir())?;
    report.value(trial, "stop_seconds", "s", stopped_in.as_secs_f64());
    report.value(trial, "data_dir_on_disk", "MiB", mib(disk.allocated));
    report.value(trial, "data_dir_apparent", "MiB", mib(disk.apparent));
    report.value(
        trial,
        "spawn_to_ready",
        "s",
        (queen.ready_at - spawned).as_secs_f64(),
    );
    let healthz = loop {
        if queen.agent().get(&queen.url("/healthz")).call().is_ok() {
            break Instant::now();
        }
        if spawned.elapsed() > crate::hive::READY_TIMEOUT {
            bail!("the restarted queen did not answer /healthz");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    report.value(
        trial,
        "spawn_to_healthz",
        "s",
        (healthz - spawned).as_secs_f64(),
    );
    // The first `/v1/stats` answer: it must already count every task pending (the queen
    // rebuilds its ready queues before it serves).
    let (stats, took) = timed_stats(queen)?;
    let counted = Instant::now();
    if pending(&stats) != n {
        bail!(
            "the restarted queen counts {} pending tasks, expected {n}",
            pending(&stats)
        );
    }
    report.value(
        trial,
        "spawn_to_stats_all_pending",
        "s",
        (counted - spawned).as_secs_f64(),
    );
    report.value(
        trial,
        "stats_call_restarted",
        "ms",
        took.as_secs_f64() * 1e3,
    );
    let restarted = queen.memory()?;
    report.value(trial, "queen_rss_restarted", "MiB", mib(restarted.rss));
    report.value(trial, "queen_hwm_restarted", "MiB", mib(restarted.hwm));

    Ok((hive, spawned))
}
