//! Waiting on conditions: poll until a condition holds or a deadline passes.
//!
//! Deadlines are generous (a slow, shared 2-core machine must not fail a correct build) and
//! cost nothing when things work, because the poll returns as soon as the condition holds.
//! On timeout the panic names what was awaited, how long it waited, the last thing observed
//! and whatever a test harness registered with [`set_failure_context`] (e.g. the tails of
//! the logs of the processes it started).
//!
//! [`wait_until`] blocks the thread; [`wait_until_async`] awaits its condition and sleeps
//! on tokio's clock. Both fail the test on timeout; [`poll_until`] and
//! [`poll_until_async`], which they are built on, return the last observation instead, for
//! harness code that reports what it found by a deadline.

use std::fmt::Debug;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often a condition is polled: often enough that a wait ends within a few
/// milliseconds of the condition holding, rarely enough that polling costs nothing.
pub const POLL: Duration = Duration::from_millis(20);

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

/// Extra text for every timeout panic, set once by a harness (the first call wins).
static FAILURE_CONTEXT: OnceLock<fn() -> String> = OnceLock::new();

/// Registers what a timeout panic appends after the last observation: a harness that
/// starts processes passes a function returning the tails of their logs. Later calls are
/// ignored, so every test may call it.
pub fn set_failure_context(context: fn() -> String) {
    let _ = FAILURE_CONTEXT.set(context);
}

/// The registered failure context, or nothing.
pub fn failure_context() -> String {
    FAILURE_CONTEXT.get().map(|f| f()).unwrap_or_default()
}

/// Polls `cond` every [`POLL`] until it returns `Ok`, for at most `within` (at least
/// once), blocking the thread. A timeout is an answer here, not a failure: the last `Err`.
/// For harness code that gathers evidence until a deadline and reports it; a test that
/// needs the condition calls [`wait_until`].
pub fn poll_until<T, E>(within: Duration, mut cond: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match cond() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// [`poll_until`] for async code, with a condition that may await; the runtime keeps
/// running between polls.
pub async fn poll_until_async<T, E, F>(
    within: Duration,
    mut cond: impl FnMut() -> F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match cond().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The panic of a wait that timed out: what was awaited, for how long, what was seen last
/// and the registered failure context.
fn timed_out(what: &str, start: Instant, last: &str) -> ! {
    panic!(
        "timed out after {:?} waiting for: {what}\nlast observed: {last}\n{}",
        start.elapsed(),
        failure_context()
    )
}

/// Polls `cond` every [`POLL`] until it holds, for at most `within`, blocking the thread.
/// Panics on timeout with `what` and the last observation.
pub fn wait_until<C: Check>(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> C,
) -> C::Output {
    let start = Instant::now();
    poll_until(within, || cond().check()).unwrap_or_else(|last| timed_out(what, start, &last))
}

/// [`wait_until`] for async tests, with a condition that may await (an HTTP call, a
/// message): the runtime keeps running between polls. A plain condition is
/// `|| std::future::ready(...)`.
pub async fn wait_until_async<C, F>(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) -> C::Output
where
    C: Check,
    F: Future<Output = C>,
{
    let start = Instant::now();
    let polled = poll_until_async(within, || {
        let next = cond();
        async move { next.await.check() }
    })
    .await;
    polled.unwrap_or_else(|last| timed_out(what, start, &last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_returns_its_value_at_once() {
        let started = Instant::now();
        let v = wait_until(Duration::from_secs(5), "a value", || Some(7));
        assert_eq!(v, 7);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_poll_that_times_out_answers_with_the_last_observation() {
        let mut n = 0;
        let got: Result<(), u32> = poll_until(Duration::from_millis(50), || {
            n += 1;
            Err(n)
        });
        assert_eq!(got, Err(n));
        assert!(n >= 2, "polled again before the deadline: {n}");
    }

    #[test]
    fn a_timeout_names_what_was_awaited_and_the_last_observation() {
        let panic = std::panic::catch_unwind(|| {
            let mut n = 0;
            wait_until(Duration::from_millis(60), "n to reach ten", || {
                n += 1;
                if n >= 10_000 {
                    Ok(())
                } else {
                    Err(format!("n is {n}"))
                }
            })
        })
        .expect_err("times out");
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("n to reach ten"), "{text}");
        assert!(text.contains("last observed: \"n is"), "{text}");
    }
}
