//! `drones`: what an idle drone connection costs the queen. Opens `--drones` simulated
//! drone connections from this one process (hello with one slot, heartbeats every interval
//! the queen asks for), and reads the queen's `VmRSS` before and after; then keeps them
//! idle for a few heartbeat intervals — longer than the heartbeat timeout — and checks
//! that none was expired, and what the heartbeats cost in queen CPU.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::StreamExt;
use serde_json::json;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::hive::Hive;
use crate::report::{mib, Machine, Reporter};
use crate::sim::{self, Behavior, Counters};

/// The queen's own default `[queen] max_connections` (see queen/src/config.rs); the bench
/// raises it when it opens more connections than this leaves room for.
const QUEEN_DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// Room above `--drones` for the bench's own HTTP connections.
const SPARE_CONNECTIONS: usize = 1_024;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Idle drone connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub drones: usize,
    /// Connects (with their hello) in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Heartbeat intervals to stay idle once all are connected; more than the heartbeat
    /// timeout's worth, so a drone whose heartbeats went unnoticed would be expired.
    #[arg(long, default_value_t = 8)]
    pub idle_intervals: u32,
    /// Runs, each with a fresh queen; the median (min–max) follows.
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
}

pub fn run(
    bin_dir: &Path,
    sync: bool,
    json_only: bool,
    machine: &Machine,
    rt: &Runtime,
    a: &Args,
) -> Result<()> {
    if a.drones == 0 {
        bail!("--drones must be at least 1");
    }
    let max_connections = QUEEN_DEFAULT_MAX_CONNECTIONS.max(a.drones + SPARE_CONNECTIONS);
    let mut report = Reporter::new(
        "drones",
        machine,
        json!({"drones": a.drones, "slots": 1, "idle_intervals": a.idle_intervals,
               "connect_concurrency": a.connect_concurrency,
               "HIVE_QUEEN__MAX_CONNECTIONS": max_connections,
               "nofile_limit": crate::nofile_limit(), "sync": sync, "drone": "simulated"}),
        json_only,
    );
    report.note("per-connection bytes = (queen VmRSS with the drones connected − before) / drones");
    for trial in 1..=a.trials {
        let env = vec![(
            "HIVE_QUEEN__MAX_CONNECTIONS".to_string(),
            max_connections.to_string(),
        )];
        let hive = Hive::start_with(bin_dir, sync, env)?;
        let queen = &hive.queen;
        // Warm the HTTP path and let start-up allocations settle before the baseline.
        queen.stats()?;
        std::thread::sleep(Duration::from_millis(500));
        let before = queen.memory()?;

        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let _stop_drones = stop.clone().drop_guard();
        let t0 = Instant::now();
        let addr = queen.drones_addr.clone();
        let (connected, failures) = rt.block_on(async {
            let mut connects = futures_util::stream::iter(0..a.drones)
                .map(|i| {
                    let addr = addr.clone();
                    async move { sim::connect(&addr, &format!("idle-{i}"), 1).await }
                })
                .buffer_unordered(a.connect_concurrency.max(1));
            let mut connected = Vec::with_capacity(a.drones);
            let mut failures = Vec::new();
            while let Some(conn) = connects.next().await {
                match conn {
                    Ok(conn) => connected.push(conn),
                    Err(e) => failures.push(e),
                }
            }
            (connected, failures)
        });
        if let Some(e) = failures.first() {
            bail!(
                "{} of {} drones could not connect; first: {e:#}",
                failures.len(),
                a.drones
            );
        }
        let connect_time = t0.elapsed();
        let interval = connected.first().map_or(Duration::from_secs(1), |c| {
            Duration::from_millis(c.welcome.heartbeat_interval_ms)
        });
        let timeout_ms = connected
            .first()
            .map_or(0, |c| c.welcome.heartbeat_timeout_ms);
        for conn in connected {
            rt.spawn(sim::run(
                conn,
                Behavior::Hold,
                None,
                counters.clone(),
                stop.clone(),
            ));
        }
        let seen = queen.stats()?.drones_connected;
        if seen != a.drones as u64 {
            bail!(
                "the queen counts {seen} drones connected, expected {}",
                a.drones
            );
        }
        report.value(trial, "connect_seconds", "s", connect_time.as_secs_f64());
        report.value(
            trial,
            "connects_per_s",
            "conn/s",
            a.drones as f64 / connect_time.as_secs_f64(),
        );

        // After one interval every connection has sent a heartbeat and the queen has read
        // it: its buffers exist.
        std::thread::sleep(interval + interval / 2);
        let with = queen.memory()?;
        report.value(trial, "queen_rss_before", "MiB", mib(before.rss));
        report.value(trial, "queen_rss_connected", "MiB", mib(with.rss));
        report.value(
            trial,
            "queen_bytes_per_connection",
            "bytes",
            with.rss.saturating_sub(before.rss) as f64 / a.drones as f64,
        );

        // Idle, past the heartbeat timeout.
        let cpu0 = queen.cpu_time()?;
        let hb0 = Counters::get(&counters.heartbeats);
        let idle_from = Instant::now();
        std::thread::sleep(interval * a.idle_intervals);
        let idle = idle_from.elapsed();
        let cpu = queen.cpu_time()?.saturating_sub(cpu0);
        let heartbeats = Counters::get(&counters.heartbeats) - hb0;
        let after = queen.memory()?;
        let still = queen.stats()?.drones_connected;
        let lost = Counters::get(&counters.lost);
        report.value(trial, "idle_seconds", "s", idle.as_secs_f64());
        report.value(
            trial,
            "heartbeats_per_s",
            "msg/s",
            heartbeats as f64 / idle.as_secs_f64(),
        );
        report.value(
            trial,
            "queen_cpu_idle",
            "%",
            100.0 * cpu.as_secs_f64() / idle.as_secs_f64(),
        );
        report.value(trial, "queen_rss_after_idle", "MiB", mib(after.rss));
        report.value(
            trial,
            "queen_bytes_per_connection_after_idle",
            "bytes",
            after.rss.saturating_sub(before.rss) as f64 / a.drones as f64,
        );
        report.value(trial, "queen_hwm", "MiB", mib(after.hwm));
        report.value(trial, "drones_connected_after_idle", "drones", still as f64);
        report.value(trial, "drones_lost", "drones", lost as f64);
        if still != a.drones as u64 || lost > 0 {
            report.note(&format!(
                "warning: {} of {} drones were dropped while idle (heartbeat timeout {timeout_ms} ms)",
                a.drones as u64 - still.min(a.drones as u64),
                a.drones
            ));
        }
    }
    report.summary();
    Ok(())
}
