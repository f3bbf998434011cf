//! The harness for The Hive's cross-process scenarios: it builds and spawns the real
//! `queen` and `drone` binaries, kills them with `kill -9`, freezes and restarts them, and
//! observes the result only from the outside — the HTTP API, the drone protocol, `/proc`,
//! and a log the tasks themselves write.
//!
//! The scenarios live in `tests/`, one file per failure family. Each one names the failure
//! it guards against and waits only on conditions ([`wait::wait_until`]), never on bare
//! sleeps. Every process a test starts dies with the test, also when it fails.
//!
//! Code map:
//! - [`bins`]: `cargo build -p queen` / `-p drone` once per test process, then their paths.
//! - [`process`]: a child that is killed when dropped; log files and failure dumps;
//!   `/proc` liveness.
//! - [`queen`], [`drone`]: the two binaries as processes.
//! - [`hive`]: a temp dir, a queen, its drones and a client, for one test.
//! - [`api`]: the HTTP client. [`FakeDrone`] (from `hive-testkit`): the drone protocol
//!   spoken by hand, scripted and misbehaving on purpose.
//! - [`execlog`]: counting real executions of `exec` tasks.
//! - [`proxy`]: a fault-injecting TCP proxy (delay, drop, blackhole, reset) between a drone
//!   and the queen.
//! - [`check`]: the invariant checker every chaos scenario ends with ([`Hive::check`]).
//! - [`disk`]: filling the small filesystem under a queen's data dir; what the dir holds.
//! - [`seed`]: seeded randomness (`HIVE_CHAOS_SEED`) and soak mode (`HIVE_SOAK_MINUTES`).
//! - [`soak`]: the mixed-fault soak's bookkeeping: its fault log, which duplicate runs the
//!   faults explain, the queen's resources and their trend, the report lines.
//! - [`wait`]: polling with deadlines (`hive-testkit`'s, with this harness's deadline and
//!   logs).
//! - [`webdriver`]: headless Chromium driven over WebDriver, for the dashboard test.
//! - [`pg`]: real PostgreSQL servers for queens sharing a database (issue 14): a primary,
//!   a synchronous standby, `kill -9`, promotion; never outliving the test.
//!
//! Knobs for debugging a failure (all optional):
//! - `HIVE_TEST_KEEP=1` keeps every test's temp dir (data dir, logs, exec log); a failed
//!   test always keeps its own and prints the path.
//! - `HIVE_TEST_LOG_TAIL=N` prints the last N lines of each log on failure (default 80).
//! - `HIVE_TEST_RUST_LOG=filter` sets the queen's and drones' log filter (default `info`).
//! - `HIVE_CHAOS_SEED=N` replays a scenario's random choices (each scenario prints its seed).
//! - `HIVE_SOAK_MINUTES=N` makes the soak-capable scenarios (random drone kills, queen
//!   kills under load) loop for N minutes with more tasks, for runs outside CI; and runs
//!   the mixed-fault soak (`tests/soak.rs`: every fault at once, at a steady load) for N
//!   minutes instead of its short CI form, e.g. `HIVE_SOAK_MINUTES=20 cargo test -p
//!   hive-tests --test soak -- --nocapture`.
//! - `HIVE_SOAK_REPORT=path` appends the soak's report lines (JSON: every 30 s, at the
//!   end of each round and at the end) to `path` instead of its temp dir.

pub mod api;
pub mod bins;
pub mod check;
pub mod disk;
pub mod drone;
pub mod execlog;
pub mod hive;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod queen;
pub mod seed;
pub mod soak;
pub mod wait;
pub mod webdriver;

pub use api::{echo, exec, sh, Api, ApiError};
pub use check::Summary;
pub use drone::DroneProc;
pub use execlog::{Entry, ExecLog, Execution, Phase};
pub use hive::{Hive, HiveBuilder};
pub use hive_testkit::blocking::FakeDrone;
pub use hive_testkit::drone::named_hello;
pub use pg::{PgCluster, PgProcesses};
pub use process::{pid_alive, pid_state};
pub use proxy::{Fault, Proxy};
pub use queen::QueenProc;
pub use wait::{wait_until, DEADLINE};
