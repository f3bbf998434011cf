//! The only way scenarios wait: poll a condition until it holds or a deadline passes.
//!
//! Deadlines are generous (a slow, shared 2-core machine must not fail a correct build) and
//! cost nothing when things work, because the poll returns as soon as the condition holds.
//! On timeout the panic names what was awaited, the last thing observed, and the tail of
//! every queen and drone log on this thread.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use crate::process::dump_logs;

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(25);

/// The default deadline for anything that should take well under a second when healthy.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// What a polled condition returns: `true`/`Some(v)`/`Ok(v)` when it holds. `Err(e)` says
/// what was observed instead, and the last one is shown on timeout.
pub trait Check {
    type Output;
    fn check(self) -> Result<Self::Output, String>;
}

impl Check for bool {
    type Output = ();
    fn check(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("condition false".into())
        }
    }
}

impl<T> Check for Option<T> {
    type Output = T;
    fn check(self) -> Result<T, String> {
        self.ok_or_else(|| "None".into())
    }
}

impl<T, E: Debug> Check for Result<T, E> {
    type Output = T;
    fn check(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// Polls `cond` every [`POLL`] until it holds, for at most `within`. Panics on timeout with
/// `what`, the last observation and the logs.
pub fn wait_until<C: Check>(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> C,
) -> C::Output {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        let last = match cond().check() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!(
                "timed out after {:?} waiting for: {what}\nlast observed: {last}\n{}",
                start.elapsed(),
                dump_logs()
            );
        }
        std::thread::sleep(POLL);
    }
}
