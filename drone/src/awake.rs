//! Timeouts counted in time the drone was awake to see them through.
//!
//! A `tokio::time::timeout` armed before the drone is stopped (SIGSTOP, a VM pause, a
//! host starved of CPU) expires during the stop and fires on the very first turn after it
//! — before the I/O that arrived meanwhile is seen: on Linux the stop interrupts
//! `epoll_wait` (EINTR), so that turn finds the timer expired and no readiness, and the
//! guarded future (a welcome, a send whose buffer the queen has long drained) is judged as
//! if the queen had said nothing. A stalled drone would drop a healthy connection whose
//! reply is waiting in its socket, and reconnect.
//!
//! [`timeout`] counts the limit in steps of about an eighth of it. A step that took more
//! than twice as long as asked was (mostly) time the drone was not running: it counts only
//! as long as asked, and it never gives the verdict — the next step is slept first, which
//! lets the runtime deliver what arrived during the stop. So the limit is reached only
//! after the drone was awake for about that long (to within a step), however long it was
//! stopped, and never on the first turn after a stop.
//!
//! A drone that is late on every step never times out by this clock; the connection still
//! has the kernel's bounds (`TCP_USER_TIMEOUT` on every session, SYN retries on connect)
//! and the queen's hello timeout.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The limit is counted in this many steps.
const STEPS: u32 = 8;

/// The shortest step, so a short limit does not wake the drone in a busy loop.
const MIN_STEP: Duration = Duration::from_millis(20);

/// A step that took longer than this many times what was asked was a stop (or the drone
/// was starved of CPU): only what was asked counts, and it gives no verdict.
const LATE_FACTOR: u32 = 2;

/// The limit was reached in time the drone was awake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no result within {0:?}")]
pub struct Elapsed(pub Duration);

/// Runs `fut` until it finishes or the drone has been awake for `limit` without it
/// finishing (see the module docs).
pub async fn timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    tokio::pin!(fut);
    let step = (limit / STEPS).max(MIN_STEP);
    let mut counted = Duration::ZERO;
    loop {
        let ask = step.min(limit.saturating_sub(counted)).max(MIN_STEP);
        let started = Instant::now();
        tokio::select! {
            // The future first: what arrived is judged before any timer.
            biased;
            out = &mut fut => return Ok(out),
            () = tokio::time::sleep(ask) => {}
        }
        let took = started.elapsed();
        let on_time = took <= ask * LATE_FACTOR;
        counted += if on_time { took } else { ask };
        if on_time && counted >= limit {
            return Err(Elapsed(limit));
        }
    }
}

/// How long the queen has said nothing, counted like [`timeout`] in time the drone was
/// awake: a step that came late (the drone was stopped) counts only as long as asked and
/// gives no verdict, so frames that waited in the socket during the stop are read before
/// the queen is judged silent. Pure: the caller sleeps until [`Silence::next_check`] and
/// reports what it heard.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    limit: Duration,
    step: Duration,
    /// Awake time counted since the queen was last heard.
    counted: Duration,
    /// When the last step began (a frame, or the previous check).
    last: Instant,
}

impl Silence {
    /// A clock that starts counting at `now` (the welcome).
    pub fn new(limit: Duration, now: Instant) -> Self {
        Silence {
            limit,
            step: (limit / STEPS).max(MIN_STEP),
            counted: Duration::ZERO,
            last: now,
        }
    }

    /// Something arrived from the queen: it lives; count again from `now`.
    pub fn heard(&mut self, now: Instant) {
        self.counted = Duration::ZERO;
        self.last = now;
    }

    fn ask(&self) -> Duration {
        self.step
            .min(self.limit.saturating_sub(self.counted))
            .max(MIN_STEP)
    }

    /// When to call [`Silence::check`] next.
    pub fn next_check(&self) -> Instant {
        self.last + self.ask()
    }

    /// Counts the step that ends at `now`; true once the queen has been silent for the
    /// limit in time the drone was awake.
    pub fn check(&mut self, now: Instant) -> bool {
        let ask = self.ask();
        let took = now.saturating_duration_since(self.last);
        let on_time = took <= ask * LATE_FACTOR;
        self.counted += if on_time { took } else { ask };
        self.last = now;
        on_time && self.counted >= self.limit
    }
}

/// Sleeps until `deadline`, or forever when there is none (a `select!` arm that never
/// fires).
pub async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::Poll;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(4);

    /// A reply that, like socket readiness after a stop, is seen one poll late: it is
    /// ready only if it had arrived before the previous poll. It never wakes its task.
    fn seen_one_poll_late(arrived: Arc<AtomicBool>) -> impl Future<Output = ()> {
        let mut arrived_at_last_poll = false;
        std::future::poll_fn(move |_| {
            if arrived_at_last_poll {
                return Poll::Ready(());
            }
            arrived_at_last_poll = arrived.load(Ordering::SeqCst);
            Poll::Pending
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_in_time_is_returned() {
        assert_eq!(timeout(LIMIT, async { 7 }).await, Ok(7));
        let late = timeout(LIMIT, async {
            tokio::time::sleep(LIMIT / 2).await;
            8
        });
        assert_eq!(late.await, Ok(8));
    }

    #[tokio::test(start_paused = true)]
    async fn an_awake_drone_gives_up_after_the_limit() {
        let start = Instant::now();
        let out = timeout(LIMIT, std::future::pending::<()>()).await;
        assert_eq!(out, Err(Elapsed(LIMIT)));
        assert_eq!(start.elapsed(), LIMIT, "counted to the limit, not beyond");
    }

    /// The stop is modelled by moving the clock past the limit in one jump, with the reply
    /// arriving during it: tokio's own timeout fires before the reply is seen; this one
    /// looks again first.
    #[tokio::test(start_paused = true)]
    async fn a_reply_that_arrived_while_the_drone_was_stopped_is_seen() {
        for ours in [false, true] {
            let arrived = Arc::new(AtomicBool::new(false));
            let reply = seen_one_poll_late(arrived.clone());
            let waiting = tokio::spawn(async move {
                if ours {
                    timeout(LIMIT, reply).await.is_ok()
                } else {
                    tokio::time::timeout(LIMIT, reply).await.is_ok()
                }
            });
            tokio::time::sleep(LIMIT / 4).await;
            arrived.store(true, Ordering::SeqCst);
            tokio::time::advance(LIMIT * 3).await;
            let got = waiting.await.expect("the waiting task");
            assert_eq!(got, ours, "ours: {ours}");
        }
    }

    /// A drone stopped again and again counts only the time it was awake.
    #[tokio::test(start_paused = true)]
    async fn stops_do_not_count_towards_the_limit() {
        let waiting = tokio::spawn(timeout(LIMIT, std::future::pending::<()>()));
        for _ in 0..20 {
            tokio::time::advance(LIMIT * 2).await;
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "stops were counted as awake time");
        let out = waiting.await.expect("the waiting task");
        assert_eq!(out, Err(Elapsed(LIMIT)));
    }

    /// Guards the silence rule's clock: the limit in awake time ends it, any frame starts
    /// it again, and a stop (a step far later than asked) never gives the verdict.
    #[test]
    fn silence_is_counted_in_awake_time_and_reset_by_any_frame() {
        let start = Instant::now();
        let mut s = Silence::new(LIMIT, start);
        let mut checks = 0;
        let silent_at = loop {
            let at = s.next_check();
            if s.check(at) {
                break at;
            }
            checks += 1;
            assert!(checks < 100, "never judged silent");
        };
        assert_eq!(
            silent_at - start,
            LIMIT,
            "silent after the limit, not before"
        );

        let mut s = Silence::new(LIMIT, start);
        let half = start + LIMIT / 2;
        s.heard(half);
        assert!(!s.check(half + LIMIT / STEPS));
        assert_eq!(s.next_check(), half + LIMIT / STEPS * 2);

        // A stop of ten limits: the late step counts as one step and says nothing.
        let mut s = Silence::new(LIMIT, start);
        assert!(
            !s.check(start + LIMIT * 10),
            "judged on the first turn after a stop"
        );
        let mut steps_after = 0;
        while !s.check(s.next_check()) {
            steps_after += 1;
            assert!(steps_after < 100, "never judged silent");
        }
        assert_eq!(steps_after + 1, STEPS - 1, "the rest of the limit, awake");
    }
}
