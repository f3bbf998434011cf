//! Seeded randomness for scenarios, and the soak switch.
//!
//! Every random choice a scenario makes (when to kill, whom, how long a task sleeps, which
//! fault comes next) comes from one [`StdRng`] made by [`rng`]. Its seed is
//! `HIVE_CHAOS_SEED` when set, else a fresh one; it is printed when the scenario starts and
//! again in every failure dump (see [`crate::process::dump_logs`]), so a failure can be
//! replayed with `HIVE_CHAOS_SEED=<seed> cargo test -p hive-tests <scenario>`. (The queen
//! and the drones keep their own, unseeded jitter: a replay repeats the scenario's choices,
//! not every timing.)

use std::cell::Cell;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;

/// The environment variable that fixes the seed.
pub const SEED_VAR: &str = "HIVE_CHAOS_SEED";

/// The environment variable that turns on soak mode: `HIVE_SOAK_MINUTES=N`.
pub const SOAK_VAR: &str = "HIVE_SOAK_MINUTES";

thread_local! {
    /// The seed of the scenario running on this thread, for failure dumps.
    static SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The seed for a scenario: `HIVE_CHAOS_SEED` if set (it must be a u64), else random.
pub fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR} must be an unsigned integer, got {v:?}")),
        _ => rand::random(),
    }
}

/// A seeded rng for the scenario `name`; prints the seed and remembers it for this
/// thread's failure dumps.
pub fn rng(name: &str) -> StdRng {
    let seed = seed();
    SEED.with(|s| s.set(Some(seed)));
    eprintln!("chaos seed for {name}: {seed} (replay with {SEED_VAR}={seed})");
    StdRng::seed_from_u64(seed)
}

/// The seed of the scenario on this thread, if it made one.
pub fn current() -> Option<u64> {
    SEED.with(Cell::get)
}

/// How long soak mode runs, when `HIVE_SOAK_MINUTES` is set to a positive number.
pub fn soak() -> Option<Duration> {
    let raw = std::env::var(SOAK_VAR).ok()?;
    let minutes: f64 = raw
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{SOAK_VAR} must be a number of minutes, got {raw:?}"));
    (minutes > 0.0).then(|| Duration::from_secs_f64(minutes * 60.0))
}
