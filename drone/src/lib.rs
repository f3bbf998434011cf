//! The Hive's drone: connects to a queen, runs the tasks it leases, heartbeats, and
//! reports every outcome until the queen acknowledges it.
//!
//! Code map:
//! - [`config`]: defaults, config file and flags, layered and validated.
//! - [`client`]: the connection state machine, held tasks, outbox delivery, shutdown.
//! - [`backoff`]: reconnect delays (pure).
//! - [`outbox`]: outcomes awaiting an ack (pure).
//! - [`executor`]: the `echo` and `exec` kinds; how an attempt's end becomes an outcome.
//! - [`policy`]: what tasks may do on this host (kinds, programs, user, directory,
//!   environment), validated at start and checked before every spawn.
//! - [`process`]: the only code that forks or signals processes.
//! - [`supervise`]: the shim every `exec` task runs under, so tasks die with the drone.
//!
//! Invariants: the connection loop never waits on a task; a task never waits on the
//! connection; an outcome leaves the drone's memory only when the queen acknowledged it.

pub mod backoff;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod executor;
pub mod link;
pub mod outbox;
pub mod policy;
pub mod process;
pub mod supervise;

pub use client::{DroneError, Shutdown};
pub use config::{Cli, Config, LogFormat};

/// Runs the drone until `shutdown` says stop (or a queen rejects it for good).
///
/// Connects to `config.queen`, reconnecting with backoff for as long as it runs; runs
/// what it is assigned; returns `Ok` after a graceful or immediate shutdown, and an error
/// when the queen refuses this drone in a way retrying cannot fix (bad token, protocol
/// version). Every task process it started is dead or being killed when it returns.
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
    for warning in p.startup_warnings(policy::effective_uid()) {
        tracing::warn!("{warning}");
    }
    client::Drone::new(config, shutdown)?.run().await
}
