//! G1, G3 and G5 under repeated crashes: the queen is `kill -9`ed three times while drones
//! are busy with a few hundred tasks. Every task still succeeds, runs exactly once (its
//! drones always reconnect within the heartbeat timeout, so leases are re-attached, never
//! duplicated), and its recorded outcome comes from a real run under its current fence.

use std::collections::BTreeMap;
use std::time::Duration;

use hive_tests::api::count;
use hive_tests::execlog::Phase;
use hive_tests::{Hive, DEADLINE};
use rand::Rng;
use shared::api::{TaskSpec, TaskState};
use shared::TaskId;

/// Above the drone's 5 s reconnect backoff cap: a correct drone always re-attaches in time.
const REATTACH_WINDOW_MS: &str = "6000";
const TASKS: usize = 240;
/// Each restart may add up to a reconnect backoff; a healthy run takes a few seconds.
const ALL_DONE: Duration = Duration::from_secs(45);

/// Guards against crash windows in the queen's write paths: grants, outcomes and acks in
/// flight when the queen dies at random moments (three `kill -9`s while 240 short exec tasks
/// run on three drones). Afterwards: every task `succeeded`, each ran exactly once, and the
/// fence on each record is the fence of a run that really finished.
#[test]
fn three_queen_crashes_during_a_busy_run_lose_and_duplicate_nothing() {
    let mut hive = Hive::builder()
        .env("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", REATTACH_WINDOW_MS)
        .start();
    for name in ["d1", "d2", "d3"] {
        hive.start_drone(name, 4);
    }
    let specs: Vec<TaskSpec> = (0..TASKS)
        .map(|_| TaskSpec {
            max_attempts: Some(10),
            ..hive.exec_log().task("sleep 0.05")
        })
        .collect();
    let ids: Vec<TaskId> = hive.api().batch(specs).into_iter().map(|v| v.id).collect();

    let mut rng = rand::rng();
    for round in 0..3u64 {
        // Kill somewhere in each third of the run, at a random number of finished tasks.
        let lo = TASKS as u64 * round / 4 + 10;
        let at = rng.random_range(lo..lo + TASKS as u64 / 5);
        hive.wait_stats(
            DEADLINE,
            &format!("{at} tasks to succeed before crash {}", round + 1),
            |s| count(s, TaskState::Succeeded) >= at,
        );
        hive.queen.kill9();
        hive.queen.restart();
    }

    let views = hive.wait_all_succeeded(ALL_DONE, &ids);
    let log = hive.exec_log().by_task();
    let mut problems = Vec::new();
    for v in &views {
        let runs = log.get(&v.id).cloned().unwrap_or_default();
        let starts = runs.iter().filter(|e| e.phase == Phase::Start).count();
        let finished_here = runs
            .iter()
            .any(|e| e.phase == Phase::Done && e.fence == v.fence.0);
        if starts != 1 || !finished_here {
            problems.push(format!(
                "{}: attempts={} fence={} runs={runs:?}",
                v.id, v.attempts, v.fence
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {TASKS} tasks ran more than once or record an outcome no run produced:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let by_attempts: BTreeMap<u32, usize> = views.iter().fold(BTreeMap::new(), |mut m, v| {
        *m.entry(v.attempts).or_default() += 1;
        m
    });
    let stats = hive.api().stats();
    assert_eq!(
        count(&stats, TaskState::Succeeded),
        TASKS as u64,
        "{stats:?} (attempts histogram {by_attempts:?})"
    );
}
