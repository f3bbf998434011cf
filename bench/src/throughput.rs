//! `throughput`: end-to-end throughput of `echo` tasks with real drones: batch submit →
//! run → recorded, from the first submit until `/v1/stats` counts every task succeeded.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::hive::{poll, Hive, Proc, Storage};
use crate::report::{merge, Machine, Reporter};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 4)]
    pub drones: u32,
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// Tasks per batch request.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Runs, each with a fresh queen and drones; the median (min–max) follows.
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
    /// Run `exec` tasks of `/bin/true` instead of `echo`: what starting a process per
    /// task costs end to end.
    #[arg(long)]
    pub exec: bool,
}

pub fn run(
    bin_dir: &Path,
    storage: Storage,
    json_only: bool,
    machine: &Machine,
    a: &Args,
) -> Result<()> {
    let kind = if a.exec { "exec" } else { "echo" };
    let mut settings = json!({"tasks": a.tasks, "drones": a.drones, "slots": a.slots,
        "batch": a.batch, "kind": kind});
    merge(&mut settings, storage.settings());
    let mut report = Reporter::new("throughput", machine, settings, json_only);
    for trial in 1..=a.trials {
        // With PostgreSQL: fresh clusters for this trial, stopped when `hive` is dropped.
        let hive = Hive::start_on(bin_dir, storage)?;
        let queen = &hive.queen;
        let _drones: Vec<Proc> = (0..a.drones)
            .map(|i| hive.drone(&format!("bench-{i}"), a.slots))
            .collect::<Result<_>>()?;
        queen.wait_drones(u64::from(a.drones), Duration::from_secs(20))?;
        let start = Instant::now();
        let mut left = a.tasks;
        while left > 0 {
            let n = left.min(a.batch.max(1));
            let specs: Vec<Value> = (0..n)
                .map(|i| match a.exec {
                    true => json!({"kind": "exec", "payload": {"cmd": ["/bin/true"]}}),
                    false => json!({"kind": "echo", "payload": i}),
                })
                .collect();
            queen.post("/v1/tasks/batch", json!({ "tasks": specs }))?;
            left -= n;
        }
        let submitted = start.elapsed();
        poll(Duration::from_secs(600), || {
            Ok(queen
                .stats()?
                .by_state
                .get("succeeded")
                .copied()
                .unwrap_or(0)
                >= a.tasks as u64)
        })?;
        let total = start.elapsed();
        report.value(
            trial,
            "submit_only_tasks_per_s",
            "tasks/s",
            a.tasks as f64 / submitted.as_secs_f64(),
        );
        report.value(
            trial,
            "e2e_tasks_per_s",
            "tasks/s",
            a.tasks as f64 / total.as_secs_f64(),
        );
        report.value(trial, "e2e_seconds", "s", total.as_secs_f64());
    }
    report.summary();
    Ok(())
}
