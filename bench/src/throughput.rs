//! `throughput`: end-to-end throughput of `echo` tasks with real drones: batch submit →
//! run → recorded, from the first submit until `/v1/stats` counts every task succeeded.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::hive::{poll, Hive, Proc, Storage, Submitter};
use crate::report::{merge, Machine, Reporter};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 4)]
    pub drones: u32,
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// Tasks per batch request; 1 submits each task alone (`POST /v1/tasks`).
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Concurrent submitters, each with its own connection, each waiting for its answer
    /// before sending the next request (as beanstalk-bench's producers do).
    #[arg(long, default_value_t = 1)]
    pub submitters: usize,
    /// Runs, each with a fresh queen and drones; the median (min–max) follows.
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
    /// Run `exec` tasks of `/bin/true` instead of `echo`: what starting a process per
    /// task costs end to end.
    #[arg(long)]
    pub exec: bool,
    /// The protocol encoding the drones ask for (`json` or `msgpack`); also reports the
    /// frame sizes of one task's messages in it.
    #[arg(long, default_value = "json")]
    pub encoding: String,
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
        "batch": a.batch, "submitters": a.submitters, "kind": kind, "encoding": a.encoding});
    let encoding = shared::frame::Encoding::from_name(&a.encoding)
        .ok_or_else(|| anyhow::anyhow!("--encoding is json or msgpack, not {}", a.encoding))?;
    merge(&mut settings, storage.settings());
    let mut report = Reporter::new("throughput", machine, settings, json_only);
    for trial in 1..=a.trials {
        // With PostgreSQL: fresh clusters for this trial, stopped when `hive` is dropped.
        let hive = Hive::start_on(bin_dir, storage)?;
        let queen = &hive.queen;
        let _drones: Vec<Proc> = (0..a.drones)
            .map(|i| hive.drone_with(&format!("bench-{i}"), a.slots, &["--encoding", &a.encoding]))
            .collect::<Result<_>>()?;
        queen.wait_drones(u64::from(a.drones), Duration::from_secs(20))?;
        let cpu0 = queen.cpu_time()?;
        let start = Instant::now();
        submit_all(queen, a)?;
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
        let cpu = queen.cpu_time()?.saturating_sub(cpu0);
        report.value(
            trial,
            "queen_cpu_us_per_task",
            "us",
            cpu.as_secs_f64() * 1e6 / a.tasks as f64,
        );
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
    for (message, bytes) in wire_sizes(encoding, a.exec)? {
        report.value(0, &format!("frame_bytes_{message}"), "bytes", bytes as f64);
    }
    Ok(())
}

/// Submits `a.tasks` tasks from `a.submitters` threads, each with its own connection,
/// in requests of `a.batch` tasks (a batch request, or `POST /v1/tasks` for 1).
fn submit_all(queen: &crate::hive::Queen, a: &Args) -> Result<()> {
    let submitters = a.submitters.max(1);
    let batch = a.batch.max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..submitters)
            .map(|s| {
                // This submitter's share: an even split, the remainder to the first ones.
                let share = a.tasks / submitters + usize::from(s < a.tasks % submitters);
                let http = &queen.http;
                scope.spawn(move || -> Result<()> {
                    let mut submitter = Submitter::connect(http)?;
                    let mut left = share;
                    while left > 0 {
                        let n = left.min(batch);
                        let spec = |i: usize| match a.exec {
                            true => json!({"kind": "exec", "payload": {"cmd": ["/bin/true"]}}),
                            false => json!({"kind": "echo", "payload": i}),
                        };
                        if batch == 1 {
                            submitter.post("/v1/tasks", spec(0).to_string())?;
                        } else {
                            let specs: Vec<Value> = (0..n).map(spec).collect();
                            let body = json!({ "tasks": specs }).to_string();
                            submitter.post("/v1/tasks/batch", body)?;
                        }
                        left -= n;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a submitter panicked"))?
        })
    })
}

/// The frame bodies one task of this bench exchanges with its drone, in `encoding`: the
/// assign, the completion and its ack (heartbeats are per drone, not per task).
fn wire_sizes(encoding: shared::frame::Encoding, exec: bool) -> Result<Vec<(&'static str, usize)>> {
    use shared::protocol::{Ack, AckStatus, Assign, DroneMessage, QueenMessage, TaskComplete};
    let (task_id, fence) = (shared::TaskId::generate(), shared::Fence(1));
    let (payload, result) = if exec {
        (
            json!({"cmd": ["/bin/true"]}),
            json!({"exit_code": 0, "stdout": "", "stderr": ""}),
        )
    } else {
        (json!(12345), json!(12345))
    };
    let assign = QueenMessage::Assign(Assign {
        task_id,
        fence,
        attempt: 1,
        kind: if exec { "exec" } else { "echo" }.into(),
        queue: "default".into(),
        payload,
        timeout_ms: None,
        checkpoint: None,
    });
    let complete = DroneMessage::TaskComplete(TaskComplete {
        task_id,
        fence,
        result,
    });
    let ack = QueenMessage::Ack(Ack {
        task_id,
        fence,
        status: AckStatus::Recorded,
    });
    Ok(vec![
        ("assign", encoding.encode(&assign)?.len()),
        ("complete", encoding.encode(&complete)?.len()),
        ("ack", encoding.encode(&ack)?.len()),
    ])
}
