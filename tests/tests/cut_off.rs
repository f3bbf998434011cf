//! G2, G3, G4 and G6 for a drone that is cut off but not dead — partitioned from the queen
//! (its link blackholed by the proxy) or frozen (`SIGSTOP`) — for longer than the heartbeat
//! timeout. Its leases are requeued in bounded time and its tasks complete elsewhere; when
//! it comes back, the outcome it finished meanwhile is acknowledged `stale` and changes
//! nothing, and it is told to stop the attempt it still runs, whose processes die. And for
//! links that only misbehave — slow, dropped, reset, briefly blackholed — under load.

use std::time::{Duration, Instant};

use hive_tests::execlog::shell_quote;
use hive_tests::hive::lingering;
use hive_tests::process::log_lines;
use hive_tests::{seed, wait_until, Execution, Fault, Hive, DEADLINE};
use rand::Rng;
use shared::api::{TaskSpec, TaskState, TaskView};
use shared::TaskId;

/// The lease bound of `Hive::start` (FAST_LEASES): a heartbeat timeout of 1 s plus one
/// 200 ms heartbeat interval (G2, docs/GUARANTEES.md).
const LEASE_BOUND: Duration = Duration::from_millis(1_200);

/// On top of the bound: polling, and a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The drone's link is blackholed: both ends stay open, nothing passes.
    Partition,
    /// The drone is stopped with SIGSTOP; its task processes keep running.
    Freeze,
}

const VICTIM: &str = "a";

fn cut(hive: &mut Hive, how: Cut) {
    match how {
        Cut::Partition => hive.set_fault(VICTIM, Fault::Blackhole),
        Cut::Freeze => hive.drone(VICTIM).sigstop(),
    }
}

fn heal(hive: &mut Hive, how: Cut) {
    match how {
        Cut::Partition => hive.set_fault(VICTIM, Fault::Pass),
        Cut::Freeze => hive.drone(VICTIM).sigcont(),
    }
}

/// The first run of `task` in the exec log, once `ready` says it is far enough along.
fn first_run(hive: &Hive, task: TaskId, ready: impl Fn(&Execution) -> bool) -> Execution {
    wait_until(
        DEADLINE,
        &format!("attempt 1 of {task} to be running"),
        || {
            hive.exec_log()
                .executions()
                .into_iter()
                .find(|r| r.task == task && r.attempt == 1 && ready(r))
        },
    )
}

/// The shared scenario. Two tasks run attempt 1 on drone `a`: X waits for a file, Y runs a
/// `sleep 60` child. `a` is cut off; both leases must move to drone `b` within the lease
/// bound and succeed there on attempt 2, with the lost lease recorded against `a`. Then X's
/// first attempt is let finish on the cut-off drone (its outcome cannot reach the queen)
/// while Y's keeps running. When `a` is back, its completion of X must be acknowledged
/// `stale` (queen log; the exec log shows the run finished successfully), the queen must
/// tell it to stop Y's attempt and Y's processes must die, and neither record may change.
fn cut_off_drone_mid_task(how: Cut) {
    let mut hive = hive_tests::hive_builder!().start();
    let a = match how {
        Cut::Partition => hive.start_drone_behind_proxy(VICTIM, 2, &[]),
        Cut::Freeze => hive.start_drone(VICTIM, 2),
    };
    let release = shell_quote(&hive.path("release").to_string_lossy());
    let x_body = format!(
        "if [ \"$HIVE_ATTEMPT\" = 1 ]; then while [ ! -e {release} ]; do sleep 0.05; done; fi"
    );
    let y_body = format!(
        "if [ \"$HIVE_ATTEMPT\" = 1 ]; then\n{}\nfi",
        hive.exec_log().child("sleep 60")
    );
    let x = hive.api().submit(&hive.exec_log().task(&x_body)).id;
    let y = hive.api().submit(&hive.exec_log().task(&y_body)).id;
    let x1 = first_run(&hive, x, |_| true);
    // Y's shell and its child.
    let y1 = first_run(&hive, y, |r| r.pids.len() == 2);
    let mut old: Vec<TaskView> = Vec::new();
    for id in [x, y] {
        old.push(hive.wait_task(id, "running attempt 1 on a", |t| {
            t.state == TaskState::Running && t.attempts == 1
        }));
    }
    hive.start_drone("b", 2);

    let cut_at = Instant::now();
    cut(&mut hive, how);
    let moved = wait_until(
        DEADLINE,
        "both leases to move off the cut-off drone",
        || {
            let now: Vec<TaskView> = [x, y].iter().map(|id| hive.api().task(*id)).collect();
            let all_moved = now.iter().zip(&old).all(|(n, o)| n.fence > o.fence);
            all_moved.then(|| cut_at.elapsed())
        },
    );
    assert!(
        moved <= LEASE_BOUND + SLACK,
        "leases of a cut-off drone were requeued only after {moved:?} (bound {LEASE_BOUND:?} + {SLACK:?})"
    );
    let mut done: Vec<TaskView> = Vec::new();
    for (id, o) in [x, y].into_iter().zip(&old) {
        let d = hive.wait_task(id, "succeeded on b", |t| t.state.is_terminal());
        assert_eq!((d.state, d.attempts), (TaskState::Succeeded, 2), "{d:#?}");
        assert_eq!(d.errors.len(), 1, "{d:#?}");
        let lost = &d.errors[0];
        assert!(
            lost.error.starts_with("lease lost") && lost.fence == o.fence && lost.drone == Some(a),
            "attempt 1's error must be the lease lost on a: {d:#?}"
        );
        done.push(d);
    }

    // On the cut-off drone: X's first attempt finishes now, Y's still runs.
    std::fs::write(hive.path("release"), "").expect("write the release file");
    wait_until(
        DEADLINE,
        "X's first attempt to finish on the cut-off drone",
        || {
            hive.exec_log()
                .executions()
                .iter()
                .any(|r| r.task == x && r.fence == x1.fence && r.done_at.is_some())
        },
    );
    assert_eq!(
        lingering(&y1),
        y1.pids,
        "Y's first attempt must still run on the cut-off drone"
    );

    heal(&mut hive, how);
    wait_until(
        DEADLINE,
        "the drone, back, to be told to stop Y's attempt and kill its processes",
        || {
            let alive = lingering(&y1);
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still alive: {alive:?}"))
            }
        },
    );
    let queen_log = hive.queen.log().to_owned();
    let told = log_lines(
        &queen_log,
        "telling it to stop",
        &[("task_id", y.to_string()), ("fence", y1.fence.to_string())],
    );
    assert!(
        !told.is_empty(),
        "the queen never told the drone to stop Y's stale attempt (fence {})",
        y1.fence
    );
    for (task, fence, what) in [
        (x, x1.fence, "X's late completion"),
        (y, y1.fence, "Y's stopped attempt"),
    ] {
        wait_until(
            DEADLINE,
            &format!("the queen to acknowledge {what} (fence {fence}) as stale"),
            || {
                !log_lines(
                    &queen_log,
                    "stale outcome ignored",
                    &[("task_id", task.to_string()), ("fence", fence.to_string())],
                )
                .is_empty()
            },
        );
    }
    hive.wait_drone_connected(VICTIM);
    if how == Cut::Partition {
        assert!(
            hive.proxy(VICTIM).accepted() >= 2,
            "the healed drone must have reconnected through its proxy"
        );
    }
    for d in &done {
        assert_eq!(
            &hive.api().task(d.id),
            d,
            "a late report from the cut-off drone changed a finished task"
        );
    }
    let summary = hive.check(DEADLINE);
    assert_eq!(
        summary.duplicate_completions, 1,
        "X ran to completion twice (recorded on b, stale on a), Y once: {summary}"
    );
}

/// Scenario 4 of the chaos suite: a partition (proxy blackhole) longer than the heartbeat
/// timeout. Guards against a partitioned drone pinning its tasks (G2), against its late
/// completion overwriting the recorded outcome (G3), against the queen leaving it running a
/// stale attempt next to the live one (G4), and against that attempt's processes living on
/// (G6).
#[test]
fn a_partitioned_drone_loses_its_leases_and_its_late_outcome_is_stale() {
    cut_off_drone_mid_task(Cut::Partition);
}

/// Scenario 5: the same with a frozen drone (`SIGSTOP` past the heartbeat timeout, then
/// `SIGCONT`): a hung host is indistinguishable from a partitioned one, and must be handled
/// the same way.
#[test]
fn a_frozen_drone_loses_its_leases_and_its_late_outcome_is_stale() {
    cut_off_drone_mid_task(Cut::Freeze);
}

const FLAKY_DRONES: [&str; 3] = ["f1", "f2", "f3"];

/// Guards against trouble on the wire that is short of a partition — latency, connections
/// dropped or reset (open ones and new ones), blackholes shorter than the heartbeat timeout
/// — costing leases or running work twice (G5, G6: a drone rides out a link outage as it
/// rides out a queen outage). 90 exec tasks run on three drones behind proxies while twelve
/// seeded faults hit random links, each held for a random 0.2–0.8 s (the fault's length is
/// the scenario's choice, not a wait for anything). The queen gives a closed connection 5 s
/// to come back and a silent drone 2.5 s, so no fault here outlasts them: every task must
/// succeed and run exactly once (only a lease whose assign was lost with a dropped
/// connection may be given up), drones must have reconnected after drops and resets, and
/// the invariant checker must pass.
#[test]
fn a_flaky_link_under_load_loses_and_doubles_nothing() {
    let mut rng = seed::rng("a_flaky_link_under_load_loses_and_doubles_nothing");
    let mut hive = hive_tests::hive_builder!()
        .env("HIVE_LEASES__RECONNECT_GRACE_MS", "5000")
        .env("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "2500")
        .start();
    for d in FLAKY_DRONES {
        hive.start_drone_behind_proxy(d, 3, &[]);
    }
    let specs: Vec<TaskSpec> = (0..90)
        .map(|_| TaskSpec {
            max_attempts: Some(10),
            ..hive
                .exec_log()
                .task(&format!("sleep {}", rng.random_range(5..30) as f64 / 100.0))
        })
        .collect();
    let ids: Vec<TaskId> = hive.api().batch(specs).into_iter().map(|v| v.id).collect();
    let mut broke = Vec::new();
    for _ in 0..12 {
        let victim = FLAKY_DRONES[rng.random_range(0..FLAKY_DRONES.len())];
        let fault = match rng.random_range(0..4) {
            0 => Fault::Delay(Duration::from_millis(rng.random_range(50..400))),
            1 => Fault::Drop,
            2 => Fault::Reset,
            _ => Fault::Blackhole,
        };
        if matches!(fault, Fault::Drop | Fault::Reset) {
            broke.push(victim);
        }
        hive.set_fault(victim, fault);
        std::thread::sleep(Duration::from_millis(rng.random_range(200..800)));
        hive.set_fault(victim, Fault::Pass);
        hive.wait_drone_connected(victim);
    }
    hive.wait_all_succeeded(Duration::from_secs(60), &ids);
    for d in broke {
        assert!(
            hive.proxy(d).accepted() >= 2,
            "drone {d} never reconnected after its link was dropped or reset"
        );
    }
    // A lease whose assign was lost with a dropped connection is rightly given up when
    // the drone comes back without it; a lease a drone was running must never be.
    let summary = hive.check(DEADLINE);
    assert_eq!(
        (summary.rerun_tasks, summary.duplicate_completions),
        (0, 0),
        "link faults shorter than the lease timeouts re-ran tasks: {summary}"
    );
}
