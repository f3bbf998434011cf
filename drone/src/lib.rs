//! The Hive's drone: connects to a queen, runs the tasks it leases, heartbeats, and
//! reports every outcome until the queen acknowledges it.
//!
//! Code map, leaves first (a module uses only the ones listed before it):
//! - [`awake`]: timeouts counted in time the drone was awake, so a stopped drone does not
//!   give up on a reply that arrived while it was stopped.
//! - [`backoff`]: reconnect delays (pure).
//! - [`env`]: the names in a task's environment the drone owns (lease, loader, token).
//! - [`identity`]: Unix users tasks run as, looked up once at start.
//! - [`kind`]: the built-in kinds (`echo`, `exec`) and their names.
//! - [`outbox`]: outcomes awaiting an ack (pure).
//! - [`program`]: the `PATH` search, with symlinks and `..` resolved.
//! - [`supervise`]: the drone's process supervisor, which starts every task and pool
//!   process and kills them all when the drone dies.
//! - [`workdir`]: per-attempt work directories and where a task's `cwd` may lead in one.
//! - [`checkpoint`]: checkpoint files of running attempts.
//! - [`process`]: the only code that forks or signals processes.
//! - [`policy`]: what tasks may do on this host (kinds, programs, user, directory,
//!   environment): the rules, validated at start and checked before every spawn.
//! - [`link`]: the byte stream to the queen; owns its TLS settings, loaded once.
//! - [`config`]: defaults, config file and flags, layered and validated.
//! - [`queens`]: which queen address to dial next (a round of the given ones, a leader a
//!   standby names first) and whether a welcome comes from a deposed leader (pure).
//! - [`executor`]: runs `echo` and `exec`; how an attempt's end becomes an outcome.
//! - [`pool`]: worker pools, long-lived processes that run tasks of the kinds they
//!   announce over a local channel (docs/POOLS.md).
//! - [`client`]: the connection state machine, held tasks, outbox delivery, shutdown.
//!
//! Invariants: the connection loop never waits on a task; a task never waits on the
//! connection; an outcome leaves the drone's memory only when the queen acknowledged it.

// Leaves first: each module uses only modules above it (`tests/module_graph.rs` checks
// that the graph has no cycle).
pub mod awake;
pub mod backoff;
pub mod env;
pub mod identity;
pub mod kind;
pub mod outbox;
pub mod program;
pub mod supervise;
pub mod workdir;

pub mod checkpoint;
pub mod process;

pub mod policy;

pub mod link;

pub mod config;

pub mod queens;

pub mod executor;

pub mod pool;

pub mod client;

pub use client::{DroneError, Shutdown};
pub use config::{Cli, Config, LogFormat};

/// Runs the drone until `shutdown` says stop (or a queen rejects it for good).
///
/// Connects to one of `config.queen` (the leader, when several queens share a database),
/// reconnecting with backoff for as long as it runs; runs what it is assigned; returns
/// `Ok` after a graceful or immediate shutdown, and an error when a queen refuses this
/// drone in a way retrying cannot fix (bad token, protocol version). Every task process it started is dead or being killed when it returns.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), DroneError> {
    let p = &config.policy;
    tracing::info!(
        kinds = ?p.kinds,
        allowed_programs = ?p.allowed_programs,
        run_as = p.run_as.as_ref().map(|u| u.name.as_str()),
        work_root = ?p.work_root,
        env_passthrough = ?p.env_passthrough,
        "task policy"
    );
    for warning in p.startup_warnings(identity::effective_uid()) {
        tracing::warn!("{warning}");
    }
    let pool_uid = p
        .run_as
        .as_ref()
        .map_or_else(identity::effective_uid, |u| u.uid);
    if !config.pools.is_empty() && pool_uid == 0 {
        tracing::warn!(
            "worker pool processes run as root (set policy.run_as to an unprivileged user)"
        );
    }
    let mut drone = client::Drone::new(config, shutdown)?;
    if !drone.start_pools().await? {
        return Ok(());
    }
    drone.run().await
}
