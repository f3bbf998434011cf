//! Idle polling: a thread on a task's path keeps its CPU for a short while after it runs
//! out of work, so that the next piece of work finds it running instead of having to
//! wake it.
//!
//! Waking a thread that sleeps costs more than the futex: when its CPU went idle, the
//! CPU has to come out of its idle state first. On a virtual machine whose guest does not
//! poll before halting (this project's 2-CPU CI machine: cpuidle `haltpoll` with
//! `guest_halt_poll_ns` = 0) every such wake-up is a VM exit and entry, 30–40 µs, and a
//! task at low load crosses several: the HTTP request to the runtime's worker, the core to
//! the store's writer, the writer's answer back to the worker. Polling for up to
//! `[queen] idle_poll_us` before sleeping takes those wake-ups off the path
//! (docs/performance.md, "Issue 16, sixth session").
//!
//! The window adapts after the rules of Linux's halt polling, applied to the whole idle
//! spell: if work came later than the window but within the maximum, the window doubles
//! (from at least [`GROW_START`]), as the guest's `cpuidle-haltpoll` governor does
//! (`drivers/cpuidle/governors/haltpoll.c`, `adjust_poll_limit`); work caught within the
//! window changes nothing; if it came later than the maximum, polling would not have
//! caught it and the window halves, to nothing once below [`GROW_START`], as KVM's host
//! side does (`shrink_halt_poll_ns`). An idle queen's spells are its 50 ms timer tick and
//! longer, so with the default maximum its window closes within three ticks (nine with
//! the largest allowed) and it polls not at all; a busy one's spells are short and it
//! keeps polling. `hive_idle_poll_seconds_total` counts the time spent polling, by thread.
//!
//! While it polls, a thread offers its CPU to any other thread waiting for that CPU every
//! round (`sched_yield`), so on an otherwise idle CPU it delays no one. It is not free, though:
//! the polling counts as the queen's CPU time, against a cgroup's CPU quota too (a
//! container with a CPU limit may be throttled for it), it competes with a hyperthread
//! sibling, and the scheduler sees the CPU as busy when it places woken threads. `0` turns
//! it off: a CPU-limited container, a machine shared with other latency-sensitive work, a
//! laptop on battery.
//!
//! The runtime's poller runs only on a runtime of one worker (the default with sled on 2
//! CPUs): with more, each of its rounds would make tokio wake another worker to look for
//! work, the very wake-up it is there to save, and the worker that polls would not hold
//! the I/O driver. Its window follows the gaps between the core's passes, so it catches
//! the store's answers (which come within a sync of a pass) only while requests keep
//! coming within the maximum of each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Counter;
use tokio::sync::Notify;

/// The smallest window a growing one starts from (the kernel's `guest_halt_poll_grow_start`
/// is 50 µs too).
pub const GROW_START: Duration = Duration::from_micros(50);

/// An adaptive polling window, at most `max` long. Shared by reference between the
/// thread that polls and whoever measures its idle spells.
#[derive(Debug)]
pub struct Window {
    max_ns: u64,
    ns: AtomicU64,
    /// Where the time spent polling is counted (`hive_idle_poll_seconds_total`).
    spent: Option<Counter>,
}

impl Window {
    /// A window that may grow up to `max` (`Duration::ZERO`: never polls). It starts
    /// closed and opens once idle spells show polling would catch work.
    pub fn new(max: Duration) -> Window {
        Window {
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
            ns: AtomicU64::new(0),
            spent: None,
        }
    }

    /// Counts the time spent polling in `spent`.
    pub fn counting(mut self, spent: Counter) -> Window {
        self.spent = Some(spent);
        self
    }

    /// How long to poll now.
    pub fn current(&self) -> Duration {
        Duration::from_nanos(self.ns.load(Ordering::Relaxed))
    }

    /// Adapts the window to an idle spell that just ended after `idle`: grows it when
    /// polling longer (but no longer than the maximum) would have caught the work, shrinks
    /// it when not even the maximum would have.
    pub fn adapt(&self, idle: Duration) {
        if self.max_ns == 0 {
            return;
        }
        let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let now = self.ns.load(Ordering::Relaxed);
        let next = if idle > now && idle <= self.max_ns {
            now.saturating_mul(2)
                .max(GROW_START.as_nanos() as u64)
                .min(self.max_ns)
        } else if idle > self.max_ns {
            let half = now / 2;
            if half < GROW_START.as_nanos() as u64 {
                0
            } else {
                half
            }
        } else {
            return;
        };
        self.ns.store(next, Ordering::Relaxed);
    }

    /// Calls `ready` until it gives something or the current window has passed, giving
    /// the CPU to any other runnable thread between calls; `None` if the window passed
    /// (or is closed). For threads that then block on what `ready` polls.
    pub fn poll<T>(&self, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
        let window = self.current();
        if window.is_zero() {
            return None;
        }
        let started = Instant::now();
        let until = started + window;
        let found = loop {
            if let Some(found) = ready() {
                break Some(found);
            }
            if Instant::now() >= until {
                break None;
            }
            std::thread::yield_now();
        };
        self.count_since(started);
        found
    }

    /// Counts the time polled since `started`.
    fn count_since(&self, started: Instant) {
        if let Some(spent) = &self.spent {
            spent.inc_by(started.elapsed().as_secs_f64());
        }
    }
}

/// Idle polling for the async runtime: the scheduler core says when it starts and stops
/// being busy, and a poller task keeps the runtime's worker from parking for the window
/// after each stop. While the poller yields, the worker runs every other task that is
/// ready and checks for I/O without blocking (tokio polls its driver with a zero timeout
/// whenever only yielded tasks are left), so a request or a store answer that arrives
/// meanwhile is picked up without a wake-up.
#[derive(Debug)]
pub struct RuntimePoll {
    window: Window,
    epoch: Instant,
    /// When the core last went idle, in ns since `epoch`.
    idle_since: AtomicU64,
    wake: Notify,
    /// Poll rounds so far, and whether the poller is polling now (tests; both
    /// `SeqCst`, so that a test reading the count sees the flag of the same moment).
    rounds: AtomicU64,
    polling: AtomicBool,
}

impl RuntimePoll {
    /// A poller that polls up to `max` at a time and counts the time it polls in `spent`.
    pub fn new(max: Duration, spent: Counter) -> Arc<RuntimePoll> {
        Arc::new(RuntimePoll {
            window: Window::new(max).counting(spent),
            epoch: Instant::now(),
            idle_since: AtomicU64::new(0),
            wake: Notify::new(),
            rounds: AtomicU64::new(0),
            polling: AtomicBool::new(false),
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The core has work again: the idle spell that ends here adapts the window.
    pub fn busy(&self) {
        let idle = self
            .now_ns()
            .saturating_sub(self.idle_since.load(Ordering::Relaxed));
        self.window.adapt(Duration::from_nanos(idle));
    }

    /// The core has run out of work: poll for the window from now.
    pub fn idle(&self) {
        self.idle_since.store(self.now_ns(), Ordering::Relaxed);
        if !self.window.current().is_zero() {
            self.wake.notify_one();
        }
    }

    /// The poller: spawn it once on the runtime; it sleeps while the window is closed
    /// and stops when its task is aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            self.polling.store(true, Ordering::SeqCst);
            let started = Instant::now();
            loop {
                self.rounds.fetch_add(1, Ordering::SeqCst);
                let idle = self
                    .now_ns()
                    .saturating_sub(self.idle_since.load(Ordering::Relaxed));
                if Duration::from_nanos(idle) >= self.window.current() {
                    break;
                }
                // Let the worker run every task that is ready (tokio polls its I/O driver
                // before it comes back to this one), then the CPU any other thread that
                // waits for it. (Resumed, this task can be ahead of tasks woken by the
                // same poll of the driver, by one round; putting the `sched_yield` first
                // measured no different.)
                tokio::task::yield_now().await;
                std::thread::yield_now();
            }
            self.window.count_since(started);
            self.polling.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(300);

    #[test]
    fn a_window_opens_when_work_comes_soon_and_closes_when_it_does_not() {
        let w = Window::new(MAX);
        assert_eq!(w.current(), Duration::ZERO, "starts closed");
        // Work came 20 µs after going idle: a window of 50 µs would have caught it.
        w.adapt(Duration::from_micros(20));
        assert_eq!(w.current(), GROW_START);
        // Caught within the window: nothing to change.
        w.adapt(Duration::from_micros(30));
        assert_eq!(w.current(), GROW_START);
        // Later than the window, within the maximum: doubles, up to the maximum.
        w.adapt(Duration::from_micros(80));
        assert_eq!(w.current(), Duration::from_micros(100));
        w.adapt(Duration::from_micros(250));
        assert_eq!(w.current(), Duration::from_micros(200));
        w.adapt(Duration::from_micros(250));
        assert_eq!(w.current(), MAX);
        w.adapt(MAX);
        assert_eq!(w.current(), MAX);
        // Later than the maximum: polling could not have caught it; halves each time, and
        // closes once below the start.
        w.adapt(Duration::from_millis(50));
        assert_eq!(w.current(), Duration::from_micros(150));
        w.adapt(Duration::from_millis(50));
        assert_eq!(w.current(), Duration::from_micros(75));
        w.adapt(Duration::from_millis(50));
        assert_eq!(w.current(), Duration::ZERO);
        w.adapt(Duration::from_millis(50));
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let w = Window::new(Duration::ZERO);
        w.adapt(Duration::from_micros(1));
        assert_eq!(w.current(), Duration::ZERO);
        let mut calls = 0;
        assert_eq!(
            w.poll(|| {
                calls += 1;
                Some(())
            }),
            None
        );
        assert_eq!(calls, 0, "a closed window does not even look");
    }

    #[test]
    fn polling_returns_what_turns_up_and_gives_up_after_the_window() {
        // A window no preemption of this test can outlast.
        let long = Duration::from_secs(60);
        let w = Window::new(long);
        for _ in 0..40 {
            w.adapt(long - Duration::from_secs(1));
        }
        assert_eq!(w.current(), long);
        let mut calls = 0;
        assert_eq!(
            w.poll(|| {
                calls += 1;
                (calls == 3).then_some(calls)
            }),
            Some(3)
        );
        let w = Window::new(MAX);
        w.adapt(Duration::from_micros(1));
        let started = Instant::now();
        assert_eq!(w.poll(|| None::<()>), None);
        assert!(started.elapsed() >= GROW_START, "polled the whole window");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_runtime_poller_polls_after_work_then_sleeps() {
        // A window long enough that no preemption of this test can outlast it.
        let max = Duration::from_millis(200);
        let poll = RuntimePoll::new(max, Counter::new("t", "t").expect("a valid counter"));
        let poller = tokio::spawn(poll.clone().run());
        // Idle spells a little shorter than the maximum open the window all the way.
        for _ in 0..20 {
            poll.window.adapt(max - Duration::from_millis(1));
        }
        assert_eq!(poll.window.current(), max);
        let idle_at = Instant::now();
        poll.idle();
        // The poller wakes, keeps the runtime round after round for the whole window and,
        // once it has passed with no new work, sleeps again.
        let deadline = idle_at + Duration::from_secs(30);
        while poll.rounds.load(Ordering::SeqCst) == 0 || poll.polling.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the poller did not poll and then sleep: {} rounds, polling {}",
                poll.rounds.load(Ordering::SeqCst),
                poll.polling.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            idle_at.elapsed() >= max,
            "the poller gave up after {:?}, before its window of {max:?}",
            idle_at.elapsed()
        );
        // Spells far longer than the maximum close the window: no more polling.
        for _ in 0..40 {
            poll.busy();
            poll.window.adapt(Duration::from_secs(1));
        }
        assert_eq!(poll.window.current(), Duration::ZERO);
        poller.abort();
    }
}
