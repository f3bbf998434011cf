//! `hive-bench`: measures a real queen on this machine, with real drones or simulated ones.
//!
//! ```sh
//! cargo build --release -p queen -p drone -p hive-bench
//! B=target/release/hive-bench
//! $B throughput --tasks 10000 --drones 4 --slots 8 --trials 3   # batch submit → run → recorded
//! $B requeue --trials 3                 # kill -9 / SIGSTOP of a drone → its task requeued
//! $B latency --tasks 2000 --rate 2000 --seconds 5 --trials 3
//!                                       # submit → started / recorded, p50 p99 p99.9 max,
//!                                       # one task at a time, then an open-loop stream
//! $B restart --tasks 1000000            # fill, SIGTERM, restart: time to serving and to
//!                                       # draining the backlog, queen RSS, data dir size
//! $B drones --drones 10000 --trials 3   # queen RSS per idle drone connection, heartbeat CPU
//! $B pool --lang python --tasks 20000 --processes 2 --slots 128
//!                                       # a no-op Python (or node) handler on a drone's
//!                                       # worker pool, end to end (sdk/)
//! $B pool-rtt --lang python             # drone↔worker round trip p50/p99, start → ready
//! $B floor --dir DATA_DIR_PARENT        # no queen: a journal sync, an fdatasync, a thread
//!                                       # hand-off, a loopback round trip (p50, p99)
//! $B --json-only latency ...            # only the JSON lines
//! $B --sync throughput ...              # queen with [storage] sync = true
//! $B --postgres throughput ...          # queen on a fresh PostgreSQL primary per trial
//! $B --sync-standby latency ...         # … and a synchronous standby (throughput, latency)
//! $B failover --tasks 100000 --trials 3 # kill -9 / SIGTERM of the leading queen with
//!                                       # N pending: time until the other one writes
//! ```
//!
//! `--postgres` and `--sync-standby` start PostgreSQL clusters of their own with the HA
//! tests' harness (`hive_tests::pg`: Debian's `postgresql` package; as root the servers
//! run as the `postgres` user), one set per trial, stopped when the trial ends.
//!
//! Each run starts its own queen (temp data dir, free ports, log in the temp dir) from the
//! binaries next to this one (or `--bin-dir`), prints the machine (with the load average:
//! other work on the machine shows in the figures) and settings, a human table, then one
//! JSON line per result (`{"bench", "metric", "value", "unit", settings...}`), and stops it.
//! With `--trials K` (default 3; 1 for `restart`) every trial is printed, then the median
//! (min–max) of each metric. On a 2-core machine `restart --tasks 1000000` takes about two
//! minutes (fill ~25 s, drain ~60 s); the others take well under a minute.
//!
//! `throughput` and `requeue` use real drone processes. `latency`, `restart` and `drones`
//! use simulated drones (`sim`): the real protocol from this process, so every instant is
//! on one clock and ten thousand connections cost one process.

mod drones;
mod failover;
mod floor;
mod hive;
mod latency;
mod pool;
mod report;
mod requeue;
mod restart;
mod sim;
mod throughput;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks The Hive with a real queen and real or simulated drones")]
struct Cli {
    /// Directory holding the `queen` and `drone` binaries (default: next to this one).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// `[storage] sync` for the queen: fdatasync-class durability per group commit.
    #[arg(long, global = true)]
    sync: bool,
    /// Print only the JSON lines (no machine line, settings or tables).
    #[arg(long, global = true)]
    json_only: bool,
    /// Store in PostgreSQL: a fresh primary cluster of the bench's own per trial
    /// (`throughput`, `latency`; `failover` always does).
    #[arg(long, global = true)]
    postgres: bool,
    /// As `--postgres`, and the primary gets a synchronous standby: a commit returns once
    /// it is on both servers' disks.
    #[arg(long, global = true)]
    sync_standby: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// End-to-end throughput of `echo` tasks with real drones: batch submit → run → recorded.
    Throughput(throughput::Args),
    /// Time from `kill -9` (and from SIGSTOP) of a real drone to its task being requeued,
    /// with the default lease settings.
    Requeue(requeue::Args),
    /// Submit → started and submit → recorded latency with simulated drones, at low load
    /// (one task at a time) and at high load (open-loop single-task submits).
    Latency(latency::Args),
    /// Restart with many pending tasks: time to ready, serving, dispatching and draining;
    /// queen memory before and after; data dir size.
    Restart(restart::Args),
    /// Queen memory per idle drone connection, with thousands of simulated drones.
    Drones(drones::Args),
    /// Two queens on one PostgreSQL database with N pending tasks: time from `kill -9` of
    /// the leader until the standby accepts a write, and from SIGTERM of that one until
    /// the first, restarted as a standby, does.
    Failover(failover::Args),
    /// Tasks in Python or Node on a drone's worker pool (sdk/): batch submit → handler →
    /// recorded, to compare with Celery and BullMQ (../shared/peers) in the same run.
    Pool(pool::Args),
    /// The pool's own cost: `run` → `done` round trips with one SDK worker process
    /// (p50, p99) and a process start → `ready`.
    PoolRtt(pool::RttArgs),
    /// What this machine charges for each step a durable submit → start cannot skip, with
    /// no queen: a journal sync, an fdatasync, a hand-off between threads, a TCP round trip.
    Floor(floor::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no parent dir")?
            .to_path_buf(),
    };
    // `floor` runs no queen and no drones: only this machine's disk, threads and loopback.
    let needs_binaries = !matches!(cli.what, What::Floor(_));
    for b in ["queen", "drone"] {
        if needs_binaries && !bin_dir.join(b).exists() {
            bail!(
                "{} not found; build with `cargo build --release -p queen -p drone -p hive-bench`",
                bin_dir.join(b).display()
            );
        }
    }
    raise_nofile_limit();
    let machine = report::Machine::detect();
    let (sync, json_only) = (cli.sync, cli.json_only);
    let engine = hive::Engine::from_flags(cli.postgres, cli.sync_standby);
    let storage = hive::Storage { sync, engine };
    if sync && (engine.is_postgres() || matches!(cli.what, What::Failover(_))) {
        bail!("--sync is sled's `[storage] sync`; PostgreSQL commits with fsync on");
    }
    if engine.is_postgres()
        && matches!(
            cli.what,
            What::Requeue(_)
                | What::Restart(_)
                | What::Drones(_)
                | What::Pool(_)
                | What::PoolRtt(_)
        )
    {
        bail!("--postgres and --sync-standby apply to throughput, latency and failover");
    }

    match &cli.what {
        What::Throughput(a) => throughput::run(&bin_dir, storage, json_only, &machine, a),
        What::Requeue(a) => requeue::run(&bin_dir, sync, json_only, &machine, a),
        What::Latency(a) => latency::run(&bin_dir, storage, json_only, &machine, &runtime()?, a),
        What::Failover(a) => failover::run(&bin_dir, engine, json_only, &machine, a),
        What::Restart(a) => restart::run(&bin_dir, sync, json_only, &machine, &runtime()?, a),
        What::Drones(a) => drones::run(&bin_dir, sync, json_only, &machine, &runtime()?, a),
        What::Pool(a) => pool::run(&bin_dir, sync, json_only, &machine, a),
        What::PoolRtt(a) => pool::run_rtt(json_only, &machine, a),
        What::Floor(a) => floor::run(json_only, &machine, a),
    }
}

/// The runtime the simulated drones run on; the benchmark's own control flow stays on the
/// main thread (blocking HTTP, sleeps), so it never stalls a drone's heartbeat.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Raises this process's open-file limit to its hard limit, so thousands of drone
/// connections fit; the queen, a child, inherits it.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!(
                    "hive-bench: could not raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// This process's open-file limit (soft), for the record.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}
