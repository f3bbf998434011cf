//! `queen stats` (task counts by state and queue, once) and `queen watch` (the same, live).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use shared::api::{Stats, TaskState};

use super::table::Table;
use super::{time, CliError, Ctx, Exit};

/// Show task counts by state, overall and per queue, and how many drones are connected.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {}

/// Show live task counts by state and queue, redrawn until Ctrl-C.
///
/// On a terminal the screen is redrawn in place; otherwise each refresh is printed after
/// the last (with --json: one compact stats document per line).
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Time between refreshes (100-3600000).
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    interval_ms: u64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

pub fn show(ctx: &Ctx, out: &mut impl Write, _args: StatsArgs) -> Result<Exit, CliError> {
    let doc = ctx.client.get("/v1/stats")?;
    if ctx.json {
        ctx.print_json(out, &doc)?;
        return Ok(Exit::Ok);
    }
    let stats: Stats = ctx.client.decode(doc)?;
    write_stats(out, &stats)?;
    Ok(Exit::Ok)
}

pub fn watch(ctx: &Ctx, out: &mut impl Write, args: WatchArgs) -> Result<Exit, CliError> {
    let interval = Duration::from_millis(args.interval_ms);
    let redraw = std::io::stdout().is_terminal() && !ctx.json;
    let mut last: Option<(Instant, u64)> = None;
    let mut refreshes = 0u64;
    loop {
        let doc = ctx.client.get("/v1/stats")?;
        refreshes += 1;
        if ctx.json {
            // One document per refresh, one per line, so `jq` can follow the stream.
            let line = serde_json::to_string(&doc).map_err(|e| CliError::BadResponse {
                addr: ctx.client.addr(),
                reason: e.to_string(),
            })?;
            writeln!(out, "{line}")?;
        } else {
            let stats: Stats = ctx.client.decode(doc)?;
            let now = Instant::now();
            let finished = finished(&stats);
            // Finished per second since the last refresh. Purges and retries lower the
            // count, so a drop reads as 0 rather than a negative rate.
            let rate = last.map(|(at, before)| {
                finished.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64()
            });
            last = Some((now, finished));
            let mut frame = Vec::new();
            writeln!(
                frame,
                "queen at {}, {}, every {} ms{}",
                ctx.client.addr(),
                time(&chrono::Utc::now()),
                args.interval_ms,
                if args.count.is_none() {
                    " (Ctrl-C to stop)"
                } else {
                    ""
                }
            )?;
            writeln!(frame)?;
            write_stats(&mut frame, &stats)?;
            if let Some(r) = rate {
                writeln!(frame, "finished per second: {r:.1}")?;
            }
            if redraw {
                // Home and clear, then the frame: a whole redraw, no flicker of stale lines.
                out.write_all(b"\x1b[H\x1b[2J")?;
            } else if refreshes > 1 {
                writeln!(out)?;
            }
            out.write_all(&frame)?;
        }
        out.flush()?;
        if args.count.is_some_and(|n| refreshes >= n) {
            return Ok(Exit::Ok);
        }
        std::thread::sleep(interval);
    }
}

fn finished(stats: &Stats) -> u64 {
    [
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ]
    .iter()
    .map(|s| stats.by_state.get(s.as_str()).copied().unwrap_or(0))
    .sum()
}

/// One row per queue and a total row, one column per state; then drones.
fn write_stats(out: &mut impl Write, stats: &Stats) -> Result<(), CliError> {
    let upper: Vec<String> = TaskState::ALL
        .iter()
        .map(|s| s.as_str().to_uppercase())
        .collect();
    let mut header = vec!["QUEUE".to_string()];
    header.extend(upper.iter().cloned());
    let mut table = Table::new(&header).right(&upper);
    let row = |name: &str, counts: &std::collections::BTreeMap<String, u64>| {
        let mut r = vec![name.to_string()];
        r.extend(
            TaskState::ALL
                .iter()
                .map(|s| counts.get(s.as_str()).copied().unwrap_or(0).to_string()),
        );
        r
    };
    for (queue, counts) in &stats.by_queue {
        table.row(row(queue, counts));
    }
    table.row(row("(all)", &stats.by_state));
    table.write(out)?;
    writeln!(out)?;
    writeln!(out, "drones connected: {}", stats.drones_connected)?;
    writeln!(
        out,
        "unroutable: {} (pending tasks no connected drone can run)",
        stats.unroutable
    )?;
    Ok(())
}
