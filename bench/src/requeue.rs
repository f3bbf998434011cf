//! `requeue`: time from `kill -9` (and from SIGSTOP) of a real drone to its task being
//! requeued, with the default lease settings.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use shared::api::{TaskState, TaskView};

use crate::hive::{poll, Hive};
use crate::report::{Machine, Reporter};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Runs per signal, each with a fresh queen and drone; the median (min–max) follows.
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
}

pub fn run(bin_dir: &Path, sync: bool, json_only: bool, machine: &Machine, a: &Args) -> Result<()> {
    let mut report = Reporter::new("requeue", machine, json!({ "sync": sync }), json_only);
    for trial in 1..=a.trials {
        for (signal, metric) in [
            (libc::SIGKILL, "requeue_after_kill9"),
            (libc::SIGSTOP, "requeue_after_sigstop"),
        ] {
            let hive = Hive::start(bin_dir, sync)?;
            let queen = &hive.queen;
            let victim = hive.drone("victim", 1)?;
            queen.wait_drones(1, Duration::from_secs(20))?;
            let t: TaskView = serde_json::from_value(queen.post(
                "/v1/tasks",
                json!({"kind": "exec", "payload": {"cmd": ["sleep", "60"]}}),
            )?)?;
            let path = format!("/v1/tasks/{}", t.id);
            poll(Duration::from_secs(20), || {
                Ok(serde_json::from_value::<TaskView>(queen.get(&path)?)?.state
                    == TaskState::Running)
            })?;
            victim.signal(signal);
            let t0 = Instant::now();
            poll(Duration::from_secs(60), || {
                Ok(serde_json::from_value::<TaskView>(queen.get(&path)?)?.state
                    != TaskState::Running)
            })?;
            report.value(trial, metric, "ms", t0.elapsed().as_secs_f64() * 1000.0);
            if signal == libc::SIGSTOP {
                // Let the drone die normally when dropped.
                victim.signal(libc::SIGCONT);
            }
        }
    }
    report.summary();
    Ok(())
}
