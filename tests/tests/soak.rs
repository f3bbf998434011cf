//! The mixed-fault soak: every fault the harness can inject, in one run, at a steady
//! moderate load — the proof that the guarantees hold for longer than one scenario, and
//! that the queen does not slowly leak memory, file descriptors or disk while they do.
//!
//! Five drones, each behind its own fault-injecting proxy, run short exec tasks that a
//! client submits at about 20 a second (one submit in five is a batch of five), while the
//! scenario injects, one after another with a random gap: a drone `kill -9` (restarted at
//! once or after the queen dropped it), drone churn (two or three drones killed within a few
//! seconds), a queen `kill -9` and restart, a queen stall (SIGSTOP for two to three
//! heartbeat timeouts), a drone stall shorter than the heartbeat timeout and a drone freeze
//! longer than it, a partition longer than the heartbeat timeout, a flaky link (latency,
//! dropped and reset connections, short blackholes), and a full disk (the data dir's tmpfs
//! filled below `[storage] min_free_mb`, then freed). A poison task that kills every drone
//! it runs on is submitted each round; the drones it kills are restarted.
//!
//! Each round ends with the load paused, every task terminal and the invariant checker
//! (`Hive::check`); the checked tasks are then forgotten, so retention (2 minutes here) may
//! purge them and a data dir that keeps growing is a real leak. The run must show: no task
//! lost (acknowledged, then unknown) or stuck (not terminal within the bound), no task run
//! twice where no fault explains it (`duplicated_by_stall`: only a kill, a death, a
//! partition or a freeze past the heartbeat timeout of the drone an earlier run was on
//! excuses a second run; stalls, flaky links and queen restarts do not), no drone dead by
//! itself, every task but the poison succeeded, and the poison failed.
//!
//! Without `HIVE_SOAK_MINUTES` it is one round in which each fault happens once (about a
//! minute). With `HIVE_SOAK_MINUTES=N` it runs rounds of 45 s for N minutes, faults drawn
//! from shuffled decks of all kinds (a queen kill in one deck of four, so queen processes
//! live for minutes and show a trend). Every 30 s and at the end it prints a report and
//! appends it as a JSON line to `HIVE_SOAK_REPORT` (default: `soak-report.jsonl` in the
//! test's dir): elapsed time, tasks submitted / succeeded / failed, lost, stuck,
//! duplicated by a stall, the queen's RSS, open fds and data dir size, and at the end their
//! least-squares slope per minute: RSS and fds after the first minute of the run and of
//! each queen process (each its own series), the data dir once retention purges (after
//! retention and a round). `HIVE_CHAOS_SEED` replays the scenario's choices.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hive_tests::api::ApiError;
use hive_tests::disk;
use hive_tests::execlog::DRONE_PID_VAR;
use hive_tests::process::{signal, uptime};
use hive_tests::soak::{self, FaultEvent, Sample};
use hive_tests::wait::poll_until;
use hive_tests::{seed, wait_until, Api, ExecLog, Fault, Hive, DEADLINE};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shared::api::{TaskSpec, TaskState};
use shared::TaskId;

const HEARTBEAT_INTERVAL_MS: u64 = 300;
/// Long enough for a killed queen to restart and its drones (backoff capped at a third of
/// it) to re-attach their leases; short enough for stalls of several timeouts.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longer than a flaky link's dropped connection takes to come back.
const RECONNECT_GRACE_MS: u64 = 4_000;
/// Room for the lost leases of drone kills, churn and the poison's co-tenants (they count
/// as attempts, G8). The queen's quarantine runs with its defaults: the co-tenants and the
/// churn victims must not be quarantined for it.
const TASK_MAX_ATTEMPTS: u32 = 10;
/// The poison ends quarantined, or by its attempts when other faults keep its kills
/// inconclusive.
const POISON_MAX_ATTEMPTS: u32 = 10;

const DRONES: [&str; 5] = ["s1", "s2", "s3", "s4", "s5"];
const SLOTS: u32 = 3;
/// Tasks per second the client submits.
const RATE: f64 = 20.0;

/// The data dir's tmpfs and the reserve the queen keeps on it.
const VOLUME_MB: u64 = 384;
const MIN_FREE_MB: u64 = 64;
/// Finished tasks are kept this long: longer than a round and its check, short enough that
/// the data dir levels off early in a long run.
const RETENTION: Duration = Duration::from_secs(120);
const PURGE_INTERVAL_MS: u64 = 5_000;

/// A round of the long run.
const ROUND: Duration = Duration::from_secs(45);
/// In the long run a queen kill is in one deck of faults in this many, so queen processes
/// live for minutes and their RSS and fds show a trend rather than a warm-up.
const QUEEN_KILL_EVERY_DECKS: u32 = 4;
/// How long all tasks of a round may take to be terminal once the load pauses.
const SETTLE: Duration = Duration::from_secs(90);
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Samples of the run's first minute, and of each queen process's, are warm-up, left out
/// of the trends (a third of a shorter run). The data dir's trend starts once retention
/// purges: after `RETENTION` and a round.
const WARMUP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    DroneKill,
    DroneChurn,
    QueenKill,
    QueenStall,
    DroneStall,
    DroneFreeze,
    Partition,
    FlakyLink,
    FullDisk,
}

const KINDS: [Kind; 9] = [
    Kind::DroneKill,
    Kind::DroneChurn,
    Kind::QueenKill,
    Kind::QueenStall,
    Kind::DroneStall,
    Kind::DroneFreeze,
    Kind::Partition,
    Kind::FlakyLink,
    Kind::FullDisk,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::DroneKill => "drone_kill",
            Kind::DroneChurn => "drone_churn",
            Kind::QueenKill => "queen_kill",
            Kind::QueenStall => "queen_stall",
            Kind::DroneStall => "drone_stall",
            Kind::DroneFreeze => "drone_freeze",
            Kind::Partition => "partition",
            Kind::FlakyLink => "flaky_link",
            Kind::FullDisk => "full_disk",
        }
    }
}

/// What the run has seen so far, shared by the scenario and its threads.
#[derive(Debug, Default)]
struct Book {
    round: u32,
    /// Tasks the queen acknowledged to the client (the poison not included).
    submitted: u64,
    /// Tasks the client offered that the queen did not acknowledge (down, stalled, 507).
    refused: u64,
    poison: BTreeSet<TaskId>,
    /// Acknowledged, not yet seen terminal.
    open: BTreeSet<TaskId>,
    succeeded: u64,
    /// Tasks other than the poison that ended `failed` or `cancelled`.
    failed: BTreeSet<TaskId>,
    poison_failed: u64,
    /// Of those, quarantined (the rest used up their attempts).
    poison_quarantined: u64,
    /// A poison that did not fail.
    poison_other: BTreeSet<TaskId>,
    /// Acknowledged, then unknown to the queen before it was seen terminal.
    lost: BTreeSet<TaskId>,
    /// Not terminal within `SETTLE` of the end of their round.
    stuck: BTreeSet<TaskId>,
    faults: Vec<FaultEvent>,
    fault_counts: BTreeMap<&'static str, u64>,
    /// Drone processes that died without the scenario or the poison killing them.
    unexplained_deaths: Vec<String>,
    samples: Vec<Sample>,
    /// The queen process to sample, while one runs, and when it started.
    queen_pid: Option<(i32, Instant)>,
    /// Queen processes started so far.
    queen_starts: u32,
}

type Shared = Arc<Mutex<Book>>;

fn book(shared: &Shared) -> MutexGuard<'_, Book> {
    // A thread that panicked holding the lock left a book that is still worth reporting.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// One ordinary task: sleeps 50–300 ms, one in four in a logged child process.
fn work(log: &ExecLog, rng: &mut StdRng) -> TaskSpec {
    let secs = rng.random_range(5..30) as f64 / 100.0;
    let body = if rng.random_ratio(1, 4) {
        log.child(&format!("sleep {secs}"))
    } else {
        format!("sleep {secs}")
    };
    TaskSpec {
        max_attempts: Some(TASK_MAX_ATTEMPTS),
        ..log.task(&body)
    }
}

/// The client: submits about `RATE` tasks a second until stopped; while paused it
/// submits nothing and says so.
fn submitter(
    api: Api,
    log: ExecLog,
    shared: Shared,
    mut rng: StdRng,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if paused.load(Ordering::SeqCst) {
            idle.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            next = Instant::now();
            continue;
        }
        idle.store(false, Ordering::SeqCst);
        let n = if rng.random_ratio(1, 5) { 5 } else { 1 };
        let specs: Vec<TaskSpec> = (0..n).map(|_| work(&log, &mut rng)).collect();
        let acked = if n == 1 {
            api.try_submit(&specs[0]).map(|v| vec![v.id])
        } else {
            api.try_batch(specs)
                .map(|vs| vs.into_iter().map(|v| v.id).collect())
        };
        {
            let mut b = book(&shared);
            match acked {
                Ok(ids) => {
                    b.submitted += ids.len() as u64;
                    b.open.extend(ids);
                }
                Err(_) => b.refused += n as u64,
            }
        }
        // Pacing, not a wait for anything: a client that fell behind (the queen stalled)
        // goes on at the same rate instead of bursting.
        next += Duration::from_secs_f64(n as f64 / RATE);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now;
        }
    }
    idle.store(true, Ordering::SeqCst);
}

/// Follows every open task to its end: terminal records are counted and closed, a task the
/// queen no longer knows is lost.
fn tracker(api: Api, shared: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let open: Vec<TaskId> = book(&shared).open.iter().copied().collect();
        for id in open {
            match api.try_task(id) {
                Ok(v) if v.state.is_terminal() => {
                    let mut b = book(&shared);
                    b.open.remove(&id);
                    let poison = b.poison.contains(&id);
                    match (poison, v.state) {
                        (false, TaskState::Succeeded) => b.succeeded += 1,
                        (false, _) => {
                            b.failed.insert(id);
                        }
                        (true, TaskState::Failed) => {
                            b.poison_failed += 1;
                            let quarantined = v
                                .errors
                                .last()
                                .is_some_and(|e| e.error.contains("quarantined"));
                            b.poison_quarantined += u64::from(quarantined);
                        }
                        (true, _) => {
                            b.poison_other.insert(id);
                        }
                    }
                }
                Ok(_) => {}
                Err(ApiError::Status(404, _)) => {
                    let mut b = book(&shared);
                    b.open.remove(&id);
                    b.lost.insert(id);
                }
                Err(ApiError::Status(..)) => {}
                // The queen is down or stalled: try again on the next pass.
                Err(ApiError::Transport(_)) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The report's figures at this moment.
fn report(
    shared: &Shared,
    log: &ExecLog,
    started: Instant,
    seed: u64,
    kind: &str,
) -> serde_json::Value {
    let entries = log.entries();
    let (faults, poison) = {
        let b = book(shared);
        (b.faults.clone(), b.poison.clone())
    };
    let dups = soak::duplicates(&entries, &faults, &poison);
    let b = book(shared);
    let last = b.samples.last().copied();
    // A few of each kind of trouble, to start looking from.
    let some = |ids: &BTreeSet<TaskId>| -> Vec<String> {
        ids.iter().take(10).map(ToString::to_string).collect()
    };
    serde_json::json!({
        "kind": kind,
        "seed": seed,
        "elapsed_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "round": b.round,
        "submitted": b.submitted,
        "refused": b.refused,
        "succeeded": b.succeeded,
        "failed": b.failed.len(),
        "poison_submitted": b.poison.len(),
        "poison_failed": b.poison_failed,
        "poison_quarantined": b.poison_quarantined,
        "open": b.open.len(),
        "lost": b.lost.len(),
        "stuck": b.stuck.len(),
        "duplicated_by_stall": dups.unexplained.len(),
        "duplicated_by_faults": dups.explained.len(),
        "unexplained_drone_deaths": b.unexplained_deaths.len(),
        "queen_starts": b.queen_starts,
        "queen_rss_kib": last.and_then(|s| s.rss_kib),
        "queen_fds": last.and_then(|s| s.fds),
        "data_dir_bytes": last.map(|s| s.data_dir_bytes),
        "faults": b.fault_counts,
        "examples": {
            "lost": some(&b.lost),
            "stuck": some(&b.stuck),
            "failed": some(&b.failed),
            "duplicated_by_stall": some(&dups.unexplained),
            "unexplained_drone_deaths": b.unexplained_deaths.iter().take(10).collect::<Vec<_>>(),
        },
    })
}

fn print_report(line: &serde_json::Value, path: &std::path::Path) {
    eprintln!("soak report: {line}");
    soak::append_line(path, line);
}

/// Samples the queen every `SAMPLE_EVERY` and reports every `REPORT_EVERY`.
fn reporter(
    shared: Shared,
    log: ExecLog,
    data_dir: PathBuf,
    report_to: PathBuf,
    started: Instant,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut next_report = started + REPORT_EVERY;
    let mut next_sample = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next_sample {
            next_sample += SAMPLE_EVERY;
            let (pid, queen_start) = {
                let b = book(&shared);
                (b.queen_pid, b.queen_starts)
            };
            let sample = Sample {
                elapsed_s: started.elapsed().as_secs_f64(),
                queen_start,
                queen_age_s: pid.map_or(0.0, |(_, at)| at.elapsed().as_secs_f64()),
                rss_kib: pid.and_then(|(p, _)| soak::rss_kib(p)),
                fds: pid.and_then(|(p, _)| soak::open_fds(p)),
                data_dir_bytes: disk::usage(&data_dir),
            };
            book(&shared).samples.push(sample);
        }
        if Instant::now() >= next_report {
            next_report += REPORT_EVERY;
            print_report(
                &report(&shared, &log, started, seed, "progress"),
                &report_to,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The client, the tracker and the reporter; stopped and joined when dropped.
struct Threads {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Threads {
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.idle.store(false, Ordering::SeqCst);
        wait_until(DEADLINE * 2, "the client to stop submitting", || {
            self.idle.load(Ordering::SeqCst)
        });
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The scenario's state on the test thread.
struct Soak {
    hive: Hive,
    rng: StdRng,
    shared: Shared,
    /// When every drone not found dead since was last seen alive (seconds since boot): a
    /// death found later happened after it.
    last_alive: f64,
}

impl Soak {
    /// Logs a fault as it begins (it lasts until [`Soak::ended`]; a kill, forever).
    fn note(&mut self, kind: &'static str, drone_pid: Option<i32>, excuses: bool) -> usize {
        let mut b = book(&self.shared);
        b.faults.push(FaultEvent {
            kind,
            drone_pid,
            from: uptime(),
            to: f64::INFINITY,
            excuses,
        });
        b.faults.len() - 1
    }

    fn ended(&mut self, fault: usize) {
        if let Some(f) = book(&self.shared).faults.get_mut(fault) {
            f.to = uptime();
        }
    }

    fn queen_started(&mut self) {
        let pid = self.hive.queen.pid();
        let mut b = book(&self.shared);
        b.queen_starts += 1;
        b.queen_pid = pid.map(|p| (p, Instant::now()));
    }

    /// Holds a fault for `d` (its length, the scenario's choice, not a wait).
    fn hold(d: Duration) {
        std::thread::sleep(d);
    }

    fn timeouts(&mut self, lo: f64, hi: f64) -> Duration {
        HEARTBEAT_TIMEOUT.mul_f64(self.rng.random_range(lo..hi))
    }

    fn live(&mut self) -> Vec<String> {
        self.hive.live_drones()
    }

    fn pick_live(&mut self) -> String {
        let live = self.live();
        assert!(!live.is_empty(), "no drone is alive");
        live[self.rng.random_range(0..live.len())].clone()
    }

    /// A live drone the queen says is running something, if any; else any live one.
    fn pick_busy(&mut self) -> String {
        let live = self.live();
        let busy: Vec<String> = self
            .hive
            .api()
            .try_drones()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| !d.running.is_empty() && live.contains(&d.name))
            .map(|d| d.name)
            .collect();
        if busy.is_empty() {
            self.pick_live()
        } else {
            busy[self.rng.random_range(0..busy.len())].clone()
        }
    }

    /// Restarts every drone whose process died. A death the scenario did not cause and
    /// the poison did not either (its `start` line names the drone it kills) is noted.
    fn restart_dead(&mut self) {
        let now = uptime();
        let dead = self.hive.dead_drones();
        if !dead.is_empty() {
            let poisoned: BTreeSet<i32> = {
                let poison = book(&self.shared).poison.clone();
                self.hive
                    .exec_log()
                    .entries()
                    .into_iter()
                    .filter(|e| poison.contains(&e.task))
                    .filter_map(|e| e.drone_pid)
                    .collect()
            };
            for name in dead {
                let pid = self.hive.drone(&name).pid();
                let killed = book(&self.shared)
                    .faults
                    .iter()
                    .any(|f| f.drone_pid == Some(pid) && f.to == f64::INFINITY && f.excuses);
                if !killed && !poisoned.contains(&pid) {
                    let mut b = book(&self.shared);
                    b.unexplained_deaths
                        .push(format!("drone {name} (pid {pid})"));
                    b.faults.push(FaultEvent {
                        kind: "died",
                        drone_pid: Some(pid),
                        from: self.last_alive,
                        to: f64::INFINITY,
                        excuses: true,
                    });
                }
                // The poison may kill the fresh drone before it is seen connected: that
                // death is found (and explained, or not) by the next round.
                let _ = self.hive.restart_drone_may_die(&name);
            }
        }
        self.last_alive = now;
    }

    fn kill_drone(&mut self, name: &str, kind: &'static str) {
        let pid = self.hive.drone(name).pid();
        self.note(kind, Some(pid), true);
        self.hive.drone(name).kill9();
    }

    fn inject(&mut self, kind: Kind) {
        self.restart_dead();
        *book(&self.shared)
            .fault_counts
            .entry(kind.name())
            .or_default() += 1;
        match kind {
            Kind::DroneKill => {
                let victim = self.pick_busy();
                let gone = self.hive.drone(&victim).id;
                self.kill_drone(&victim, kind.name());
                // Sometimes back at once, sometimes after the queen gave up on it.
                if self.rng.random_bool(0.5) {
                    let api = self.hive.api().clone();
                    wait_until(DEADLINE, "the queen to drop the killed drone", || {
                        api.try_drones()
                            .is_ok_and(|ds| ds.iter().all(|d| Some(d.id) != gone))
                    });
                }
                // The poison may kill it again before it is seen connected; the next
                // round restarts it then.
                let _ = self.hive.restart_drone_may_die(&victim);
            }
            Kind::DroneChurn => {
                let mut live = self.live();
                live.shuffle(&mut self.rng);
                let n = self.rng.random_range(2..=3).min(live.len());
                for (i, victim) in live.iter().take(n).enumerate() {
                    if i > 0 {
                        Self::hold(Duration::from_millis(self.rng.random_range(300..1_500)));
                    }
                    self.kill_drone(victim, kind.name());
                }
                for victim in live.iter().take(n) {
                    let _ = self.hive.restart_drone_may_die(victim);
                }
            }
            Kind::QueenKill => {
                let f = self.note(kind.name(), None, false);
                book(&self.shared).queen_pid = None;
                self.hive.queen.kill9();
                self.hive.queen.restart();
                self.queen_started();
                self.ended(f);
            }
            Kind::QueenStall => {
                let stall = self.timeouts(2.0, 3.0);
                let f = self.note(kind.name(), None, false);
                self.hive.queen.sigstop();
                Self::hold(stall);
                self.hive.queen.sigcont();
                self.ended(f);
            }
            Kind::DroneStall => {
                // Shorter than the heartbeat timeout, with a heartbeat interval to spare: the
                // drone must keep its leases (not marked harmed: the checker holds it to that).
                let stall = self.timeouts(0.2, 0.5);
                let victim = self.pick_busy();
                let pid = self.hive.drone(&victim).pid();
                let f = self.note(kind.name(), Some(pid), false);
                signal(pid, libc::SIGSTOP);
                Self::hold(stall);
                signal(pid, libc::SIGCONT);
                self.ended(f);
            }
            Kind::DroneFreeze => {
                let stall = self.timeouts(1.3, 1.8);
                let victim = self.pick_busy();
                let pid = self.hive.drone(&victim).pid();
                let f = self.note(kind.name(), Some(pid), true);
                self.hive.drone(&victim).sigstop();
                Self::hold(stall);
                self.hive.drone(&victim).sigcont();
                self.ended(f);
            }
            Kind::Partition => {
                let cut = self.timeouts(1.3, 1.8);
                let victim = self.pick_busy();
                let pid = self.hive.drone(&victim).pid();
                let f = self.note(kind.name(), Some(pid), true);
                self.hive.set_fault(&victim, Fault::Blackhole);
                Self::hold(cut);
                self.hive.set_fault(&victim, Fault::Pass);
                self.ended(f);
            }
            Kind::FlakyLink => {
                // Shorter than every lease timeout: no lease may be lost to these, so the
                // drones are not marked harmed.
                for _ in 0..self.rng.random_range(3..=5) {
                    let victim = self.pick_live();
                    let pid = self.hive.drone(&victim).pid();
                    let fault = match self.rng.random_range(0..4) {
                        0 => Fault::Delay(Duration::from_millis(self.rng.random_range(50..400))),
                        1 => Fault::Drop,
                        2 => Fault::Reset,
                        _ => Fault::Blackhole,
                    };
                    let f = self.note(kind.name(), Some(pid), false);
                    self.hive.proxy(&victim).set(fault);
                    Self::hold(Duration::from_millis(self.rng.random_range(200..700)));
                    self.hive.proxy(&victim).set(Fault::Pass);
                    self.ended(f);
                }
            }
            Kind::FullDisk => {
                let f = self.note(kind.name(), None, false);
                let data_dir = self.hive.queen.data_dir().to_owned();
                let filler = disk::fill_until(&data_dir, (MIN_FREE_MB / 2) << 20);
                let api = self.hive.api().clone();
                let readyz = move || {
                    api.get_raw("/readyz")
                        .map(|(_, body)| body)
                        .unwrap_or_default()
                };
                wait_until(
                    DEADLINE,
                    "the queen to refuse work on its full disk",
                    || readyz().contains("degraded"),
                );
                Self::hold(Duration::from_millis(self.rng.random_range(2_000..4_000)));
                std::fs::remove_file(&filler).expect("remove the filler");
                wait_until(DEADLINE, "the queen to accept work again", || {
                    readyz().contains("\"ready\"")
                });
                self.ended(f);
            }
        }
    }

    fn submit_poison(&mut self) {
        let spec = TaskSpec {
            max_attempts: Some(POISON_MAX_ATTEMPTS),
            ..self
                .hive
                .exec_log()
                .task(&format!("kill -9 \"${DRONE_PID_VAR}\"; sleep 30"))
        };
        let api = self.hive.api().clone();
        let id = wait_until(DEADLINE, "the poison task to be accepted", || {
            api.try_submit(&spec).ok().map(|v| v.id)
        });
        let mut b = book(&self.shared);
        b.poison.insert(id);
        b.open.insert(id);
    }
}

#[test]
fn every_fault_at_once_under_steady_load_loses_strands_and_doubles_nothing_and_leaks_nothing() {
    let mut rng = seed::rng("soak");
    let seed = seed::current().expect("seed::rng sets the seed");
    let long = seed::soak();
    let hive = Hive::builder()
        .data_on_tmpfs(VOLUME_MB)
        .env("HIVE_STORAGE__MIN_FREE_MB", &MIN_FREE_MB.to_string())
        .env(
            "HIVE_LEASES__HEARTBEAT_INTERVAL_MS",
            &HEARTBEAT_INTERVAL_MS.to_string(),
        )
        .env(
            "HIVE_LEASES__HEARTBEAT_TIMEOUT_MS",
            &HEARTBEAT_TIMEOUT.as_millis().to_string(),
        )
        .env(
            "HIVE_LEASES__RECONNECT_GRACE_MS",
            &RECONNECT_GRACE_MS.to_string(),
        )
        .env(
            "HIVE_RETENTION__FINISHED_MAX_AGE_S",
            &RETENTION.as_secs().to_string(),
        )
        .env(
            "HIVE_RETENTION__PURGE_INTERVAL_MS",
            &PURGE_INTERVAL_MS.to_string(),
        )
        .start();
    let report_to = soak::report_path(hive.path("soak-report.jsonl"));
    eprintln!(
        "soak: {}; report lines go to {}",
        match long {
            Some(d) => format!("{:.1} minutes", d.as_secs_f64() / 60.0),
            None => "the short CI form (each fault once)".into(),
        },
        report_to.display()
    );
    let shared: Shared = Arc::default();
    let mut s = Soak {
        hive,
        rng: StdRng::seed_from_u64(rng.random()),
        shared: shared.clone(),
        last_alive: uptime(),
    };
    for d in DRONES {
        s.hive.start_drone_behind_proxy(d, SLOTS, &[]);
    }
    s.queen_started();

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicBool::new(false));
    let mut threads = Threads {
        stop: stop.clone(),
        paused: paused.clone(),
        idle: idle.clone(),
        handles: Vec::new(),
    };
    {
        let (api, log, shared) = (
            s.hive.api().clone(),
            s.hive.exec_log().clone(),
            shared.clone(),
        );
        let (stop, rng) = (stop.clone(), StdRng::seed_from_u64(rng.random()));
        threads.handles.push(std::thread::spawn(move || {
            submitter(api, log, shared, rng, paused, idle, stop)
        }));
    }
    {
        let (api, shared, stop) = (s.hive.api().clone(), shared.clone(), stop.clone());
        threads
            .handles
            .push(std::thread::spawn(move || tracker(api, shared, stop)));
    }
    {
        let (log, shared, stop) = (s.hive.exec_log().clone(), shared.clone(), stop.clone());
        let (data_dir, report_to) = (s.hive.queen.data_dir().to_owned(), report_to.clone());
        threads.handles.push(std::thread::spawn(move || {
            reporter(shared, log, data_dir, report_to, started, seed, stop)
        }));
    }

    let run_end = long.map(|d| started + d);
    // Faults come from shuffled decks of every kind; the short form plays one deck.
    let mut deck: Vec<Kind> = Vec::new();
    let mut decks = 0u32;
    let mut deal = |rng: &mut StdRng, deck: &mut Vec<Kind>| {
        *deck = KINDS
            .into_iter()
            .filter(|k| *k != Kind::QueenKill || decks.is_multiple_of(QUEEN_KILL_EVERY_DECKS))
            .collect();
        deck.shuffle(rng);
        decks += 1;
    };
    if run_end.is_none() {
        deal(&mut s.rng, &mut deck);
    }
    loop {
        book(&shared).round += 1;
        threads.resume();
        let round_end = run_end.map(|end| (Instant::now() + ROUND).min(end));
        let mut poisoned = false;
        loop {
            let kind = match round_end {
                None => match deck.pop() {
                    Some(k) => k,
                    None => break,
                },
                Some(end) if Instant::now() >= end => break,
                Some(_) => {
                    if deck.is_empty() {
                        deal(&mut s.rng, &mut deck);
                    }
                    deck.pop().expect("a dealt deck")
                }
            };
            s.inject(kind);
            if !poisoned {
                s.submit_poison();
                poisoned = true;
            }
            // The gap between faults: spacing, not a wait for anything.
            Soak::hold(Duration::from_millis(s.rng.random_range(500..2_000)));
            s.restart_dead();
        }

        // The round's end: the load pauses, every task must reach its end, the checker
        // judges them, and they are forgotten so retention may purge them.
        threads.pause();
        let settled = poll_until(SETTLE, || {
            s.restart_dead();
            if book(&shared).open.is_empty() {
                Ok(())
            } else {
                Err(())
            }
        });
        if settled.is_err() {
            let mut b = book(&shared);
            let open = std::mem::take(&mut b.open);
            b.stuck.extend(open);
        }
        s.restart_dead();
        let line = report(&shared, s.hive.exec_log(), started, seed, "round");
        print_report(&line, &report_to);
        let summary = s.hive.check(DEADLINE);
        eprintln!("soak round {} checked: {summary}", book(&shared).round);
        assert_clean(&line);
        let api = s.hive.api().clone();
        api.forget(api.acknowledged().into_keys());
        match run_end {
            Some(end) if Instant::now() < end => {}
            _ => break,
        }
    }
    drop(threads);

    let mut line = report(&shared, s.hive.exec_log(), started, seed, "final");
    let samples = book(&shared).samples.clone();
    let warmup = WARMUP.min(started.elapsed() / 3);
    let dir_warmup = (RETENTION + ROUND).min(started.elapsed() / 3);
    let t = soak::trends(&samples, warmup.as_secs_f64(), dir_warmup.as_secs_f64());
    line["trend_after_s"] = serde_json::json!(warmup.as_secs());
    line["dir_trend_after_s"] = serde_json::json!(dir_warmup.as_secs());
    line["trend_samples"] = serde_json::json!(t.process_samples);
    line["dir_trend_samples"] = serde_json::json!(t.dir_samples);
    line["queen_rss_kib_per_min"] = serde_json::json!(t.rss_kib_per_min);
    line["queen_fds_per_min"] = serde_json::json!(t.fds_per_min);
    line["data_dir_bytes_per_min"] = serde_json::json!(t.data_dir_bytes_per_min);
    print_report(&line, &report_to);
    eprintln!(
        "soak trends per minute: queen RSS {} KiB and fds {} (after the first {} s of the run and of each queen process, {} samples); data dir {} bytes (after {} s, {} samples)",
        fmt_slope(t.rss_kib_per_min),
        fmt_slope(t.fds_per_min),
        warmup.as_secs(),
        t.process_samples,
        fmt_slope(t.data_dir_bytes_per_min),
        dir_warmup.as_secs(),
        t.dir_samples,
    );
    assert_clean(&line);
    let b = book(&shared);
    for kind in KINDS {
        assert!(
            b.fault_counts.get(kind.name()).is_some_and(|n| *n > 0),
            "the run never injected {}: {:?}",
            kind.name(),
            b.fault_counts
        );
    }
    assert!(b.submitted > 0 && b.succeeded > 0, "no load: {line}");
}

fn fmt_slope(s: Option<f64>) -> String {
    s.map_or_else(|| "n/a".into(), |v| format!("{v:+.1}"))
}

/// The run's verdict on a report line: nothing lost, stuck, doubled by a stall or failed
/// but the poison, which failed; no drone died by itself.
fn assert_clean(line: &serde_json::Value) {
    let n = |k: &str| line[k].as_u64().unwrap_or(u64::MAX);
    for key in [
        "lost",
        "stuck",
        "duplicated_by_stall",
        "failed",
        "unexplained_drone_deaths",
    ] {
        assert_eq!(n(key), 0, "{key} must be 0 (seed {}): {line}", line["seed"]);
    }
    assert_eq!(
        n("poison_failed"),
        n("poison_submitted"),
        "every poison task must end failed: {line}"
    );
}
