//! `hive-sled-alone`: sled by itself, with the queen's allocator (mimalloc), key layout
//! (`a/` + a 16-byte UUIDv7) and write pattern (one `apply_batch` and one flush per
//! group commit), and nothing else of The Hive. It separates sled's own memory after a
//! burst of inserts from the queen's (issue 16, target 2): run it beside
//! `hive-bench restart`, whose `queen_rss_filled` is the whole queen after the same burst.
//!
//! Prints one JSON line per trial: the records, the fill rate, and `VmRSS`/`VmHWM` right
//! after the fill and after mimalloc gave back its free pages (`mi_collect`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Records inserted.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Records per batch (the queen's fill writes 5,000-task batches).
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Batches applied between two flushes (a schema-4 queen flushed once per group
    /// commit; since schema 5 the queen flushes at checkpoints, about every 100th).
    #[arg(long, default_value_t = 1)]
    batches_per_flush: usize,
    /// After each batch, pin and flush sled's epoch-based garbage collector this many
    /// times (0: leave reclamation to sled; the queen's store does one per 10 operations,
    /// `store::OPS_PER_RECLAIM`).
    #[arg(long, default_value_t = 0)]
    reclaim_flushes: usize,
    /// Bytes per value (a pending task's record is ~150).
    #[arg(long, default_value_t = 150)]
    value_bytes: usize,
    /// sled's cache_capacity in MiB (the queen's default is 64).
    #[arg(long, default_value_t = 64)]
    cache_mb: u64,
    #[arg(long, default_value_t = 1)]
    trials: u32,
    /// Write each record's whole life instead of one insert: the submit's `a/` put, the
    /// grant's `a/` put (in the next batch), and the finish (`a/` delete, `f/` put and a
    /// `t/` retention entry, in the batch after), as the queen does for a task that runs
    /// once; `records_per_s` then counts whole lives.
    #[arg(long)]
    lifecycle: bool,
    /// sled's segment mode: `low-space` (sled's default, the queen's) or
    /// `high-throughput`.
    #[arg(long, default_value = "low-space")]
    mode: String,
    /// Write each batch's keys as plain inserts and removes instead of one
    /// `apply_batch` (the queen's store since schema 4, which keeps groups atomic with a
    /// journal of its own).
    #[arg(long)]
    plain: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    for trial in 1..=a.trials {
        let dir = tempfile::tempdir()?;
        let mode = match a.mode.as_str() {
            "low-space" => sled::Mode::LowSpace,
            "high-throughput" => sled::Mode::HighThroughput,
            other => anyhow::bail!("--mode is low-space or high-throughput, not {other}"),
        };
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .cache_capacity(a.cache_mb << 20)
            .mode(mode)
            .open()
            .context("opening sled")?;
        let tree = db.open_tree("hive")?;
        let value = vec![b'x'; a.value_bytes];
        let start = Instant::now();
        let mut done = 0;
        let mut unflushed = 0;
        // With --lifecycle: the ids submitted by the last batch (granted in this one) and
        // granted by the last batch (finished in this one).
        let (mut submitted, mut granted): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (vec![], vec![]);
        while done < a.records || !submitted.is_empty() || !granted.is_empty() {
            let n = a.batch.max(1).min(a.records - done);
            let mut batch = sled::Batch::default();
            let mut plain: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            let mut new = Vec::with_capacity(n);
            for _ in 0..n {
                let id = uuid::Uuid::now_v7();
                let mut key = b"a/".to_vec();
                key.extend_from_slice(id.as_bytes());
                batch.insert(key.clone(), value.clone());
                plain.push((key.clone(), Some(value.clone())));
                new.push(key);
            }
            if a.lifecycle {
                for key in &submitted {
                    batch.insert(key.clone(), value.clone());
                    plain.push((key.clone(), Some(value.clone())));
                }
                for (i, key) in granted.iter().enumerate() {
                    batch.remove(key.clone());
                    plain.push((key.clone(), None));
                    let mut finished = b"f/".to_vec();
                    finished.extend_from_slice(&key[2..]);
                    batch.insert(finished.clone(), value.clone());
                    plain.push((finished, Some(value.clone())));
                    let mut retention = b"t/".to_vec();
                    retention.extend_from_slice(&(done as u64 + i as u64).to_be_bytes());
                    retention.extend_from_slice(&key[2..]);
                    batch.insert(
                        retention,
                        &b"{\"queue\":\"default\",\"state\":\"succeeded\"}"[..],
                    );
                }
                granted = std::mem::replace(&mut submitted, new);
            }
            if a.plain {
                for (k, v) in plain {
                    match v {
                        Some(v) => drop(tree.insert(k, v)?),
                        None => drop(tree.remove(k)?),
                    }
                }
            } else {
                tree.apply_batch(batch)?;
            }
            for _ in 0..a.reclaim_flushes {
                crossbeam_epoch::pin().flush();
            }
            unflushed += 1;
            done += n;
            let last = done == a.records && submitted.is_empty() && granted.is_empty();
            if unflushed >= a.batches_per_flush.max(1) || last {
                db.flush()?;
                unflushed = 0;
            }
        }
        let took = start.elapsed();
        let file_mib = std::fs::metadata(dir.path().join("db").join("db"))?.len() >> 20;
        let filled = memory()?;
        // SAFETY: only returns free memory to the OS; takes no pointers.
        unsafe { libmimalloc_sys::mi_collect(true) };
        let collected = memory()?;
        println!(
            "{}",
            json!({"bench": "sled_alone", "trial": trial, "records": a.records,
                   "batch": a.batch, "batches_per_flush": a.batches_per_flush, "reclaim_flushes": a.reclaim_flushes, "value_bytes": a.value_bytes, "cache_mb": a.cache_mb, "lifecycle": a.lifecycle, "mode": a.mode, "plain": a.plain, "file_mib": file_mib,
                   "records_per_s": (a.records as f64 / took.as_secs_f64()).round(),
                   "rss_filled_mib": filled.0, "hwm_filled_mib": filled.1,
                   "rss_collected_mib": collected.0})
        );
    }
    Ok(())
}

/// This process's (VmRSS, VmHWM) in MiB.
fn memory() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|kib| kib / 1024)
    };
    Ok((
        field("VmRSS:").context("no VmRSS")?,
        field("VmHWM:").context("no VmHWM")?,
    ))
}
