//! G1, G3 and G5 under repeated crashes of the queen: `kill -9` while clients submit as
//! fast as they can and again while drones report completions, and three times while
//! drones are busy with a few hundred tasks. Every acknowledged task still succeeds, runs
//! exactly once (its drones always reconnect within the heartbeat timeout, so leases are
//! re-attached, never duplicated), and its recorded outcome comes from a real run under its
//! current fence.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_tests::api::count;
use hive_tests::execlog::Phase;
use hive_tests::{seed, wait_until, Hive, DEADLINE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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
    let mut hive = hive_tests::hive_builder!()
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

    let mut rng = seed::rng("three_queen_crashes_during_a_busy_run_lose_and_duplicate_nothing");
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
    hive.check(ALL_DONE);
}

/// How many clients submit at once during a storm.
const STORM_CLIENTS: usize = 3;

/// One round of the storm scenario: the queen is killed once `storm_acks` more submits are
/// acknowledged (a random number in the range); then `batch` more tasks are submitted and
/// the queen is killed again once `completions` of them have succeeded.
#[derive(Debug, Clone)]
struct StormRound {
    storm_acks: std::ops::Range<usize>,
    batch: usize,
    completions: std::ops::Range<u64>,
}

const CI_STORM: StormRound = StormRound {
    storm_acks: 120..260,
    batch: 150,
    completions: 20..100,
};
const SOAK_STORM: StormRound = StormRound {
    storm_acks: 600..1_200,
    batch: 600,
    completions: 100..400,
};

/// A short exec task: 10–150 ms.
fn storm_spec(log: &hive_tests::ExecLog, rng: &mut StdRng) -> TaskSpec {
    TaskSpec {
        max_attempts: Some(10),
        ..log.task(&format!("sleep {}", rng.random_range(1..16) as f64 / 100.0))
    }
}

fn storm_round(hive: &mut Hive, rng: &mut StdRng, round: &StormRound) {
    let acked_before = hive.api().acknowledged().len();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..STORM_CLIENTS)
        .map(|_| {
            let (api, stop) = (hive.api().clone(), stop.clone());
            let mut rng = StdRng::seed_from_u64(rng.random());
            let log = hive.exec_log().clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // The client remembers what was acknowledged; errors (the queen is
                    // dead) are simply not acknowledged. One in five is a batch of five.
                    if rng.random_ratio(1, 5) {
                        let specs = (0..5).map(|_| storm_spec(&log, &mut rng)).collect();
                        let _ = api.try_batch(specs);
                    } else {
                        let _ = api.try_submit(&storm_spec(&log, &mut rng));
                    }
                }
            })
        })
        .collect();
    let kill_at = acked_before + rng.random_range(round.storm_acks.clone());
    wait_until(
        DEADLINE,
        &format!("{kill_at} submits acknowledged during the storm"),
        || hive.api().acknowledged().len() >= kill_at,
    );
    hive.queen.kill9();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("storm client");
    }
    hive.queen.restart();

    // Again while tasks complete: a fresh batch, so there are always enough left.
    let done = count(&hive.api().stats(), TaskState::Succeeded);
    let specs: Vec<TaskSpec> = (0..round.batch)
        .map(|_| storm_spec(hive.exec_log(), rng))
        .collect();
    hive.api().batch(specs);
    let at = done + rng.random_range(round.completions.clone());
    hive.wait_stats(ALL_DONE, &format!("{at} tasks to succeed"), |s| {
        count(s, TaskState::Succeeded) >= at
    });
    hive.queen.kill9();
    hive.queen.restart();
}

/// Scenario 2 of the chaos suite. Guards against acknowledged writes lost to a crash (G1) —
/// submits, lease grants, completions — and against a restart running work twice (G5):
/// three clients submit exec tasks (single and batched) to a hive of three busy drones; the
/// queen is `kill -9`ed at a random moment of the storm and restarted; 150 more tasks are
/// submitted and it is killed again at a random moment while they complete, and restarted. Every acknowledged task must
/// exist and succeed, and no task may run twice: no drone was harmed, so every lease must
/// have been re-attached. `HIVE_SOAK_MINUTES` repeats bigger rounds.
#[test]
fn queen_kill_9_during_a_submit_storm_and_during_completions_loses_nothing() {
    let mut rng =
        seed::rng("queen_kill_9_during_a_submit_storm_and_during_completions_loses_nothing");
    let soak = seed::soak();
    let round = if soak.is_some() { SOAK_STORM } else { CI_STORM };
    let until = soak.map(|d| Instant::now() + d);
    let mut hive = hive_tests::hive_builder!()
        .env("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", REATTACH_WINDOW_MS)
        .start();
    for name in ["d1", "d2", "d3"] {
        hive.start_drone(name, 4);
    }
    let mut rounds = 0;
    loop {
        rounds += 1;
        storm_round(&mut hive, &mut rng, &round);
        let summary = hive.check(ALL_DONE);
        assert_eq!(
            summary.by_state.get("succeeded"),
            Some(&summary.tasks),
            "every acknowledged task must succeed: {summary}"
        );
        assert_eq!(
            summary.rerun_tasks, 0,
            "a queen restart ran tasks again instead of re-attaching them: {summary}"
        );
        eprintln!("storm round {rounds} passed: {summary}");
        match until {
            Some(u) if Instant::now() < u => {}
            _ => break,
        }
    }
}
