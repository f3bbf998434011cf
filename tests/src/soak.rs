//! The bookkeeping of the mixed-fault soak (`tests/tests/soak.rs`): the log of faults it
//! injected, which duplicate runs those faults explain, the queen's resources over time and
//! their trend, and the report lines it prints and writes.
//!
//! Everything here is pure or reads `/proc` and the data dir; the scenario owns the
//! processes. Times are seconds since boot ([`crate::process::uptime`]), the clock of the
//! execution log's lines, so a fault and a run can be compared.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use shared::TaskId;

use crate::execlog::{Entry, Phase};

/// The environment variable naming the file the soak appends its JSON report lines to
/// (default: `soak-report.jsonl` in the test's temp dir, kept only with `HIVE_TEST_KEEP`).
pub const REPORT_VAR: &str = "HIVE_SOAK_REPORT";

/// How far apart a fault and a run may be (seconds) and still be related: the log's
/// 10 ms clock, and the moment between deciding on a fault and doing it.
pub const MARGIN_S: f64 = 1.0;

/// One fault the soak injected, or a drone death it found.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultEvent {
    pub kind: &'static str,
    /// The drone process it hit, if it hit one.
    pub drone_pid: Option<i32>,
    /// When it began and ended (seconds since boot); a death never ends (`INFINITY`).
    pub from: f64,
    pub to: f64,
    /// Whether it may rightly cost a drone its leases, so a task it held may run again:
    /// a kill or death, a partition, a freeze past the heartbeat timeout. A stall of the
    /// queen, a drone stopped for less than the heartbeat timeout, a flaky link or a full
    /// disk may not.
    pub excuses: bool,
}

/// Tasks that ran under more than one fence, sorted by whether the injected faults
/// explain it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Duplicates {
    /// Ran again although no fault that excuses it hit the drone of an earlier run
    /// between that run's start and the next one's (or one fence started twice).
    pub unexplained: BTreeSet<TaskId>,
    /// Ran again, each earlier run's drone killed, dead, frozen or cut off meanwhile.
    pub explained: BTreeSet<TaskId>,
}

/// One run: a task under one fence, as far as its `start` line says.
#[derive(Debug, Clone, Copy)]
struct Run {
    fence: u64,
    starts: usize,
    at: f64,
    drone: Option<i32>,
}

/// Judges every task that ran under more than one fence against `faults`, plus one
/// death per run of a `poison` task (it kills its drone right after its `start` line).
pub fn duplicates(
    entries: &[Entry],
    faults: &[FaultEvent],
    poison: &BTreeSet<TaskId>,
) -> Duplicates {
    let mut runs: BTreeMap<TaskId, BTreeMap<u64, Run>> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.phase == Phase::Start) {
        let run = runs
            .entry(e.task)
            .or_default()
            .entry(e.fence)
            .or_insert(Run {
                fence: e.fence,
                starts: 0,
                at: e.at.unwrap_or(0.0),
                drone: e.drone_pid,
            });
        run.starts += 1;
    }
    let mut all: Vec<FaultEvent> = faults.to_vec();
    for (task, fences) in &runs {
        if poison.contains(task) {
            all.extend(fences.values().map(|r| FaultEvent {
                kind: "poison",
                drone_pid: r.drone,
                from: r.at,
                to: f64::INFINITY,
                excuses: true,
            }));
        }
    }
    let excused = |run: &Run, next_at: f64| {
        // A run whose parent was already gone when it logged its start (it reads init's
        // pid, 1, or nothing) started as its drone died: a fault that may cost a drone its
        // leases, on any drone, beginning at that moment explains it. The drone it ran on
        // cannot be named.
        let orphaned = matches!(run.drone, None | Some(0) | Some(1));
        all.iter().any(|f| {
            f.excuses
                && if orphaned {
                    (f.from - run.at).abs() <= MARGIN_S
                } else {
                    f.drone_pid.is_some()
                        && f.drone_pid == run.drone
                        && f.from <= next_at + MARGIN_S
                        && f.to >= run.at - MARGIN_S
                }
        })
    };
    let mut out = Duplicates::default();
    for (task, fences) in &runs {
        let ordered: Vec<&Run> = fences.values().collect();
        if ordered.iter().any(|r| r.starts > 1) {
            out.unexplained.insert(*task);
            continue;
        }
        if ordered.len() < 2 {
            continue;
        }
        let all_excused = ordered
            .windows(2)
            .all(|w| w[0].fence < w[1].fence && excused(w[0], w[1].at));
        if all_excused {
            out.explained.insert(*task);
        } else {
            out.unexplained.insert(*task);
        }
    }
    out
}

/// What the queen's process and data dir held at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the run began.
    pub elapsed_s: f64,
    /// Which queen process (its start number): a restart starts a new series.
    pub queen_start: u32,
    /// How long that queen process had been running, in seconds.
    pub queen_age_s: f64,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub data_dir_bytes: u64,
}

/// `VmRSS` of `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// How many file descriptors `pid` has open (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: i32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The least-squares slope of `points` (group, x, y), each group with its own intercept:
/// the trend within each series, pooled. A process restarted at a lower level does not
/// hide (or fake) a trend. `None` without two distinct x in some group.
pub fn pooled_slope(points: &[(u32, f64, f64)]) -> Option<f64> {
    let mut groups: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    for &(g, x, y) in points {
        groups.entry(g).or_default().push((x, y));
    }
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for pts in groups.values() {
        let n = pts.len() as f64;
        let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
        for (x, y) in pts {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx) * (x - mx);
        }
    }
    (sxx > 1e-9).then(|| sxy / sxx)
}

/// Per-minute trends of the queen's RSS (KiB), fds and data dir (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Trends {
    pub rss_kib_per_min: Option<f64>,
    pub fds_per_min: Option<f64>,
    pub data_dir_bytes_per_min: Option<f64>,
    /// Samples the process trends are made of.
    pub process_samples: usize,
    /// Samples the data dir's trend is made of.
    pub dir_samples: usize,
}

/// The trends over `samples`: the queen's RSS and fds from samples taken after `warmup_s`
/// of the run and of that queen process's life, each process its own series; the data dir
/// (which outlives queen processes: one series) from samples after `dir_warmup_s`, once
/// retention can be purging what the run finished.
pub fn trends(samples: &[Sample], warmup_s: f64, dir_warmup_s: f64) -> Trends {
    let slope = |kept: &[&Sample], f: &dyn Fn(&Sample) -> Option<(u32, f64)>| -> Option<f64> {
        let pts: Vec<(u32, f64, f64)> = kept
            .iter()
            .filter_map(|s| f(s).map(|(g, y)| (g, s.elapsed_s / 60.0, y)))
            .collect();
        pooled_slope(&pts)
    };
    let process: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.elapsed_s >= warmup_s && s.queen_age_s >= warmup_s)
        .collect();
    let dir: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.elapsed_s >= dir_warmup_s)
        .collect();
    Trends {
        rss_kib_per_min: slope(&process, &|s| s.rss_kib.map(|v| (s.queen_start, v as f64))),
        fds_per_min: slope(&process, &|s| s.fds.map(|v| (s.queen_start, v as f64))),
        data_dir_bytes_per_min: slope(&dir, &|s| Some((0, s.data_dir_bytes as f64))),
        process_samples: process.len(),
        dir_samples: dir.len(),
    }
}

/// Where the report lines go: [`REPORT_VAR`] if set, else `default`.
pub fn report_path(default: PathBuf) -> PathBuf {
    match std::env::var_os(REPORT_VAR) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default,
    }
}

/// Appends one JSON line to `path`; a report that cannot be written is said on stderr,
/// not a failure of the run it reports on.
pub fn append_line(path: &Path, line: &serde_json::Value) {
    let written = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("soak: cannot append to the report {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(task: TaskId, fence: u64, drone: i32, at: f64) -> Entry {
        Entry {
            task,
            attempt: fence as u32,
            fence,
            phase: Phase::Start,
            pid: Some(1000 + fence as i32),
            drone_pid: Some(drone),
            at: Some(at),
        }
    }

    fn fault(kind: &'static str, drone: i32, from: f64, to: f64, excuses: bool) -> FaultEvent {
        FaultEvent {
            kind,
            drone_pid: Some(drone),
            from,
            to,
            excuses,
        }
    }

    #[test]
    fn a_rerun_is_explained_only_by_an_excusing_fault_on_its_drone_in_time() {
        let t = TaskId::generate();
        let entries = vec![start(t, 1, 10, 100.0), start(t, 2, 20, 105.0)];
        let judge = |faults: &[FaultEvent]| {
            let d = duplicates(&entries, faults, &BTreeSet::new());
            (d.explained.contains(&t), d.unexplained.contains(&t))
        };
        assert_eq!(judge(&[]), (false, true), "no fault: unexplained");
        let kill = fault("drone_kill", 10, 101.0, f64::INFINITY, true);
        assert_eq!(judge(&[kill]), (true, false));
        let freeze = fault("drone_freeze", 10, 102.0, 106.0, true);
        assert_eq!(judge(&[freeze]), (true, false));
        // A short stall of that drone, a kill of another drone, a kill long after the
        // rerun began, a freeze that ended before the run: none explains it.
        let hiccup = fault("drone_stall", 10, 101.0, 102.0, false);
        let other = fault("drone_kill", 30, 101.0, f64::INFINITY, true);
        let late = fault("drone_kill", 10, 110.0, f64::INFINITY, true);
        let before = fault("partition", 10, 90.0, 95.0, true);
        assert_eq!(judge(&[hiccup, other, late, before]), (false, true));
    }

    /// Seen in a 20-minute soak: a task assigned to a drone a moment before the drone was
    /// killed logged its start with init (pid 1) as its parent, and ran again elsewhere.
    #[test]
    fn a_run_that_started_as_its_drone_died_is_explained_by_a_kill_at_that_moment() {
        let t = TaskId::generate();
        let entries = vec![start(t, 1, 1, 100.0), start(t, 2, 20, 104.0)];
        let judge = |faults: &[FaultEvent]| {
            let d = duplicates(&entries, faults, &BTreeSet::new());
            (d.explained.contains(&t), d.unexplained.contains(&t))
        };
        assert_eq!(judge(&[]), (false, true), "no fault: unexplained");
        let kill = fault("drone_churn", 30, 100.2, f64::INFINITY, true);
        assert_eq!(judge(&[kill]), (true, false));
        // A kill long before or after its start, or a fault that does not cost leases,
        // does not explain it.
        let earlier = fault("drone_kill", 30, 90.0, f64::INFINITY, true);
        let later = fault("drone_kill", 30, 103.0, f64::INFINITY, true);
        let hiccup = fault("drone_stall", 30, 99.5, 100.5, false);
        assert_eq!(judge(&[earlier, later, hiccup]), (false, true));
    }

    #[test]
    fn a_fence_started_twice_is_never_explained_and_a_poison_explains_its_own_runs() {
        let t = TaskId::generate();
        let twice = vec![start(t, 1, 10, 100.0), start(t, 1, 10, 100.5)];
        let kill = fault("drone_kill", 10, 101.0, f64::INFINITY, true);
        let d = duplicates(&twice, &[kill], &BTreeSet::new());
        assert!(d.unexplained.contains(&t));

        let p = TaskId::generate();
        let innocent = TaskId::generate();
        let entries = vec![
            start(p, 1, 10, 100.0),
            start(innocent, 1, 10, 99.5),
            start(p, 2, 20, 103.0),
            start(innocent, 2, 20, 104.0),
            start(p, 3, 30, 106.0),
        ];
        let d = duplicates(&entries, &[], &[p].into());
        assert_eq!(d.unexplained, BTreeSet::new(), "{d:?}");
        assert_eq!(
            d.explained,
            [p, innocent].into(),
            "the poison's kill explains its co-tenant too"
        );
    }

    #[test]
    fn the_pooled_slope_follows_each_series_and_ignores_the_jump_between_them() {
        // Two processes, each growing 2 per minute, the second starting lower.
        let pts = [
            (1, 0.0, 100.0),
            (1, 1.0, 102.0),
            (1, 2.0, 104.0),
            (2, 3.0, 10.0),
            (2, 4.0, 12.0),
        ];
        let slope = pooled_slope(&pts).expect("a slope");
        assert!((slope - 2.0).abs() < 1e-9, "{slope}");
        assert_eq!(pooled_slope(&[(1, 5.0, 1.0)]), None);
        let flat = [(1, 0.0, 7.0), (1, 1.0, 7.0), (1, 2.0, 7.0)];
        assert_eq!(pooled_slope(&flat), Some(0.0));
    }

    #[test]
    fn trends_skip_the_warmups_and_keep_the_data_dir_as_one_series() {
        let s = |t: f64, q: u32, age: f64, rss: u64, dir: u64| Sample {
            elapsed_s: t,
            queen_start: q,
            queen_age_s: age,
            rss_kib: Some(rss),
            fds: None,
            data_dir_bytes: dir,
        };
        let samples = [
            s(0.0, 1, 0.0, 1, 0),
            s(60.0, 1, 60.0, 500, 600),
            s(120.0, 1, 120.0, 510, 1200),
            // A young queen process: warming up, left out.
            s(150.0, 2, 10.0, 20, 1500),
            s(210.0, 2, 70.0, 100, 2100),
            s(270.0, 2, 130.0, 110, 2700),
        ];
        let t = trends(&samples, 60.0, 100.0);
        assert_eq!((t.process_samples, t.dir_samples), (4, 4));
        assert!(
            (t.rss_kib_per_min.expect("rss") - 10.0).abs() < 1e-9,
            "{t:?}"
        );
        assert!(
            (t.data_dir_bytes_per_min.expect("dir") - 600.0).abs() < 1e-9,
            "{t:?}"
        );
        assert_eq!(t.fds_per_min, None);
    }

    #[test]
    fn rss_and_fds_of_this_process_are_read() {
        let me = std::process::id() as i32;
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(open_fds(me).is_some_and(|n| n >= 3));
        assert_eq!(rss_kib(i32::MAX), None);
    }
}
