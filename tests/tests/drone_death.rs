//! G2, G3, G6 and G8 when drones die mid-task: a dead drone's lease is requeued to another
//! drone in bounded time, the task's outcome is recorded once, and a dead drone's task
//! processes die with it — for one kill, for many random kills while killed drones are
//! restarted, and for a poison task that kills whichever drone runs it. (A drone that hangs
//! or is cut off without dying is `cut_off.rs`.)

use std::path::Path;
use std::time::{Duration, Instant};

use hive_tests::api::count;
use hive_tests::execlog::{shell_quote, Phase, DRONE_PID_VAR};
use hive_tests::{pid_alive, seed, wait_until, Hive, DEADLINE};
use rand::rngs::StdRng;
use rand::Rng;
use shared::api::{LossVerdict, TaskSpec, TaskState, TaskView};
use shared::TaskId;

/// A task body that, on attempt 1 only, starts a grandchild (`sleep 30 &`), publishes both
/// pids (written then renamed, so a reader never sees half a pid) and waits; later attempts
/// finish at once.
fn slow_first_attempt(dir: &Path) -> String {
    let pid = shell_quote(&dir.join("pid").to_string_lossy());
    let gpid = shell_quote(&dir.join("gpid").to_string_lossy());
    format!(
        "if [ \"$HIVE_ATTEMPT\" = 1 ]; then\n\
           sleep 30 &\n\
           echo $! > {gpid}.tmp && mv {gpid}.tmp {gpid}\n\
           echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\n\
           wait\n\
         fi\n\
         echo \"attempt $HIVE_ATTEMPT ok\""
    )
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits until attempt 1 runs and has published its pids; returns (task record, sh pid,
/// grandchild pid).
fn wait_first_attempt_running(hive: &Hive, id: TaskId) -> (TaskView, i32, i32) {
    let (pid, gpid) = wait_until(DEADLINE, "attempt 1 to start and publish its pids", || {
        Some((read_pid(&hive.path("pid"))?, read_pid(&hive.path("gpid"))?))
    });
    let view = hive.wait_task(id, "running attempt 1", |t| {
        t.state == TaskState::Running && t.attempts == 1
    });
    assert!(
        pid_alive(pid) && pid_alive(gpid),
        "task processes {pid}/{gpid} should be running"
    );
    (view, pid, gpid)
}

/// Guards against (1) a dead drone's task staying `running` forever (G2), (2) the retry not
/// happening elsewhere, and (3) the dead drone's task processes living on as orphans that
/// keep doing work the queen has already handed to someone else (G6). A drone is `kill -9`ed
/// while its task (`sh` with a `sleep 30` grandchild) runs; the task must be requeued to the
/// other drone and succeed there on attempt 2, with the lost lease recorded as attempt 1's
/// error, and both the `sh` and the `sleep` must be gone.
#[test]
fn a_task_on_a_killed_drone_is_requeued_and_its_processes_die() {
    let mut hive = hive_tests::hive_builder!().start();
    hive.start_drone("d1", 1);
    hive.start_drone("d2", 1);
    let spec = hive.exec_log().task(&slow_first_attempt(hive.dir()));
    let id = hive.api().submit(&spec).id;

    let (running, pid, gpid) = wait_first_attempt_running(&hive, id);
    let victim = running
        .lease
        .as_ref()
        .expect("a running task has a lease")
        .drone_name
        .clone();
    let victim_id = running.lease.as_ref().map(|l| l.drone);
    hive.drone(&victim).kill9();

    wait_until(
        DEADLINE,
        "the killed drone's task process and its grandchild to die",
        || {
            let alive: Vec<i32> = [pid, gpid].into_iter().filter(|p| pid_alive(*p)).collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still alive: {alive:?}"))
            }
        },
    );

    let done = hive.wait_task(id, "succeeded", |t| t.state.is_terminal());
    assert_eq!(done.state, TaskState::Succeeded, "{done:#?}");
    assert_eq!(done.attempts, 2, "{done:#?}");
    assert!(
        done.fence > running.fence,
        "the retry must run under a newer fence: {done:#?}"
    );
    assert_eq!(
        done.errors.len(),
        1,
        "attempt 1's lost lease is kept: {done:#?}"
    );
    assert_eq!(done.errors[0].attempt, 1);
    assert_eq!(done.errors[0].fence, running.fence);
    assert_eq!(
        done.errors[0].drone, victim_id,
        "the error names the dead drone"
    );
    let result = done.result.as_ref().expect("a result");
    assert_eq!(result["exit_code"], 0, "{result}");
    assert!(
        result["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("attempt 2 ok")),
        "{result}"
    );

    // The log shows what really ran: attempt 1 started and never finished, attempt 2 did both.
    let runs = hive.exec_log().by_task().remove(&id).unwrap_or_default();
    let seen: Vec<(u32, u64, Phase)> = runs.iter().map(|e| (e.attempt, e.fence, e.phase)).collect();
    assert_eq!(
        seen,
        vec![
            (1, running.fence.0, Phase::Start),
            (2, done.fence.0, Phase::Start),
            (2, done.fence.0, Phase::Done)
        ],
        "exec log:\n{}",
        hive.exec_log().dump()
    );
    hive.check(DEADLINE);
}

/// Drones of the random-kill scenario, and their slots.
const KILL_DRONES: [&str; 4] = ["k1", "k2", "k3", "k4"];
const KILL_SLOTS: u32 = 3;

/// One round of the random-kill scenario: how many tasks, how many kills.
#[derive(Debug, Clone, Copy)]
struct KillRound {
    tasks: usize,
    kills: usize,
}

/// CI: one bounded round. Soak (`HIVE_SOAK_MINUTES`): rounds of this size until time is up.
const CI_ROUND: KillRound = KillRound {
    tasks: 120,
    kills: 8,
};
const SOAK_ROUND: KillRound = KillRound {
    tasks: 600,
    kills: 30,
};

/// Generous for a round on a loaded 2-core machine; a healthy round takes seconds.
const ROUND_DONE: Duration = Duration::from_secs(90);

/// A task that sleeps 0.15–0.45 s; one in three does it in a logged child process, so the
/// checker also sees grandchildren die with their drone.
fn kill_round_task(hive: &Hive, rng: &mut StdRng) -> TaskSpec {
    let secs = rng.random_range(15..45) as f64 / 100.0;
    let body = if rng.random_ratio(1, 3) {
        hive.exec_log().child(&format!("sleep {secs}"))
    } else {
        format!("sleep {secs}")
    };
    TaskSpec {
        // Room for many lost leases: only the kills end attempts here.
        max_attempts: Some(10),
        ..hive.exec_log().task(&body)
    }
}

fn run_kill_round(hive: &mut Hive, rng: &mut StdRng, round: KillRound) -> Vec<TaskId> {
    let specs: Vec<TaskSpec> = (0..round.tasks)
        .map(|_| kill_round_task(hive, rng))
        .collect();
    let before = {
        let s = hive.api().stats();
        count(&s, TaskState::Succeeded) + count(&s, TaskState::Failed)
    };
    let ids: Vec<TaskId> = hive.api().batch(specs).into_iter().map(|v| v.id).collect();
    for k in 0..round.kills {
        // Spread the kills over the round, each at a random point of its share.
        let share = round.tasks / (round.kills + 1);
        let at = before + (k * share + rng.random_range(0..share.max(1))) as u64;
        hive.wait_stats(
            ROUND_DONE,
            &format!("{at} tasks done before kill {}", k + 1),
            |s| count(s, TaskState::Succeeded) + count(s, TaskState::Failed) >= at,
        );
        // A victim that is mid-task, as the queen sees it.
        let busy: Vec<String> = wait_until(DEADLINE, "a drone to be running a task", || {
            let busy: Vec<String> = hive
                .api()
                .drones()
                .into_iter()
                .filter(|d| KILL_DRONES.contains(&d.name.as_str()) && !d.running.is_empty())
                .map(|d| d.name)
                .collect();
            (!busy.is_empty()).then_some(busy)
        });
        let victim = busy[rng.random_range(0..busy.len())].clone();
        hive.drone(&victim).kill9();
        // Sometimes the drone comes back at once, sometimes after the queen noticed.
        if rng.random_bool(0.5) {
            let gone = hive.drone(&victim).id;
            wait_until(DEADLINE, "the queen to drop the killed drone", || {
                hive.api().drones().iter().all(|d| Some(d.id) != gone)
            });
        }
        hive.restart_drone(&victim);
    }
    ids
}

/// Scenario 1 of the chaos suite. Guards against drone deaths losing work (G2), recording a
/// dead attempt's outcome or two outcomes (G3), running a task beside its live lease (G4),
/// orphaned task processes (G6) and unbounded retries (G8): 120 exec tasks on four drones,
/// eight `kill -9`s of random busy drones at random points of the run, each drone restarted
/// (at once or after the queen dropped it). Every task must end `succeeded` — or `failed`
/// only because its drones kept dying (lost leases used up its attempts, or the queen
/// quarantined it) — and the invariant checker must pass, with duplicate runs only on
/// killed drones. `HIVE_SOAK_MINUTES` repeats bigger rounds.
#[test]
fn random_drone_kills_mid_task_with_restarts_lose_and_double_nothing() {
    let mut rng = seed::rng("random_drone_kills_mid_task_with_restarts_lose_and_double_nothing");
    let soak = seed::soak();
    let round = if soak.is_some() { SOAK_ROUND } else { CI_ROUND };
    let until = soak.map(|d| Instant::now() + d);
    let mut hive = hive_tests::hive_builder!().start();
    for d in KILL_DRONES {
        hive.start_drone(d, KILL_SLOTS);
    }
    let mut rounds = 0;
    loop {
        rounds += 1;
        let ids = run_kill_round(&mut hive, &mut rng, round);
        let summary = hive.check(ROUND_DONE);
        assert!(
            summary.lost_leases >= 1,
            "{} kills of busy drones lost no lease: the scenario did not test anything ({summary})",
            round.kills
        );
        for id in ids {
            let v = hive.api().task(id);
            // Only drones dying ends attempts here: a task fails only when lost leases
            // used up its attempts, or the queen quarantined it for losing too many.
            let drones_died = v
                .errors
                .iter()
                .all(|e| e.error.starts_with("lease lost") || e.error.starts_with("quarantined"));
            assert!(
                v.state == TaskState::Succeeded || (v.state == TaskState::Failed && drones_died),
                "only lost leases end attempts here: {v:#?}"
            );
        }
        eprintln!("kill round {rounds} passed");
        match until {
            Some(u) if Instant::now() < u => {}
            _ => break,
        }
    }
}

/// Ordinary work for the poison scenario.
fn quick_tasks(hive: &Hive, n: usize) -> Vec<TaskId> {
    let specs: Vec<TaskSpec> = (0..n)
        .map(|_| TaskSpec {
            max_attempts: Some(10),
            ..hive.exec_log().task("sleep 0.1")
        })
        .collect();
    hive.api().batch(specs).into_iter().map(|v| v.id).collect()
}

/// Restarts every drone whose process died, until `done` holds (or the deadline).
fn restart_dead_drones_until<T>(
    hive: &mut Hive,
    what: &str,
    mut done: impl FnMut(&Hive) -> Option<T>,
) -> T {
    wait_until(ROUND_DONE, what, || {
        for name in hive.dead_drones() {
            hive.restart_drone(&name);
        }
        done(hive)
    })
}

/// A poison task (it `kill -9`s whichever drone runs it) with `max_attempts`, submitted
/// between two batches of `around` ordinary tasks; the poison and the ordinary tasks.
fn poison_among_quick_tasks(
    hive: &Hive,
    max_attempts: u32,
    around: usize,
) -> (TaskId, Vec<TaskId>) {
    let mut ids = quick_tasks(hive, around);
    let poison = TaskSpec {
        max_attempts: Some(max_attempts),
        ..hive
            .exec_log()
            .task(&format!("kill -9 \"${DRONE_PID_VAR}\"; sleep 30"))
    };
    let poison = hive.api().submit(&poison).id;
    ids.extend(quick_tasks(hive, around));
    (poison, ids)
}

/// The runs of `task` the execution log saw.
fn runs_of(hive: &Hive, task: TaskId) -> Vec<hive_tests::Execution> {
    hive.exec_log()
        .executions()
        .into_iter()
        .filter(|r| r.task == task)
        .collect()
}

/// The hive still serves once the poison is gone: every drone is back, and the ordinary
/// tasks, with 20 more, all succeed; the invariant checker's summary.
fn still_serves(hive: &mut Hive, drones: usize, mut ids: Vec<TaskId>) -> hive_tests::Summary {
    restart_dead_drones_until(hive, "every drone to be back", |h| {
        (h.api().drones().len() == drones).then_some(())
    });
    ids.extend(quick_tasks(hive, 20));
    hive.wait_all_succeeded(ROUND_DONE, &ids);
    hive.check(DEADLINE)
}

/// Scenario 6. Guards against a task that kills its drone (`kill -9` of the drone running it:
/// the parent of its supervisor shim) taking down the fleet forever or retrying without
/// bound (G8), and against the hive stopping serving meanwhile (G2). With 40 ordinary tasks
/// around it, the poison task (max_attempts 3) must end `failed` after exactly 3 runs, each
/// on a different drone process that it killed, with 3 lost-lease errors; killed drones are
/// restarted by the scenario; every ordinary task, and 20 more submitted after, succeeds.
#[test]
fn a_poison_task_that_kills_its_drone_fails_after_its_attempts_and_the_hive_keeps_serving() {
    let mut hive = hive_tests::hive_builder!().start();
    for d in ["p1", "p2", "p3"] {
        hive.start_drone(d, 2);
    }
    let (poison, ids) = poison_among_quick_tasks(&hive, 3, 20);

    let api = hive.api().clone();
    let failed = restart_dead_drones_until(&mut hive, "the poison task to end", |_| {
        api.try_task(poison).ok().filter(|v| v.state.is_terminal())
    });
    assert_eq!(failed.state, TaskState::Failed, "{failed:#?}");
    assert_eq!(failed.attempts, 3, "{failed:#?}");
    assert_eq!(failed.errors.len(), 3, "{failed:#?}");
    assert!(
        failed
            .errors
            .iter()
            .all(|e| e.error.starts_with("lease lost")),
        "every attempt died with its drone: {failed:#?}"
    );
    let runs = runs_of(&hive, poison);
    let killers: std::collections::BTreeSet<Option<i32>> =
        runs.iter().map(|r| r.drone_pid).collect();
    assert_eq!(
        (runs.len(), killers.len()),
        (3, 3),
        "three runs, each on a drone it killed: {runs:#?}"
    );
    for pid in killers.into_iter().flatten() {
        assert!(!pid_alive(pid), "drone {pid} ran the poison task and lives");
    }

    let summary = still_serves(&mut hive, 3, ids);
    assert_eq!(
        summary.drones_started,
        3 + 3,
        "three drones, three restarts: {summary}"
    );
}

/// The churn scenario's drones: four of four slots.
const CHURN_DRONES: [&str; 4] = ["c1", "c2", "c3", "c4"];

/// Guards issue 13's churn failure: a mass failure of drones (a rack losing power, spot
/// instances reclaimed, a deploy) must not fail the innocent tasks it hit. 300 short exec
/// tasks run on four drones of four slots while drones are `kill -9`ed two at a time, four
/// times (eight kills), each replaced at once; every pair takes the drone of one long task
/// that the storm chases, so that task loses its lease four times — twice as a suspect
/// running alone. The queen used to quarantine it (and any task that lost three leases);
/// now no task is quarantined, every task succeeds, the chased task's isolated losses are
/// judged inconclusive (other drones died with them), and the invariant checker passes.
#[test]
fn a_storm_of_drone_kills_quarantines_no_task_and_every_task_succeeds() {
    let mut rng = seed::rng("a_storm_of_drone_kills_quarantines_no_task_and_every_task_succeeds");
    let mut hive = hive_tests::hive_builder!().start();
    for d in CHURN_DRONES {
        hive.start_drone(d, 4);
    }
    let chased = TaskSpec {
        max_attempts: Some(10),
        priority: Some(10),
        ..hive.exec_log().task("sleep 2")
    };
    let chased = hive.api().submit(&chased).id;
    let specs: Vec<TaskSpec> = (0..300)
        .map(|_| TaskSpec {
            max_attempts: Some(10),
            ..hive
                .exec_log()
                .task(&format!("sleep {}", rng.random_range(5..20) as f64 / 100.0))
        })
        .collect();
    let mut ids: Vec<TaskId> = hive.api().batch(specs).into_iter().map(|v| v.id).collect();
    for kill in 1..=4 {
        let running = hive.wait_task(chased, &format!("running before kill {kill}"), |t| {
            t.state == TaskState::Running
        });
        let holder = running
            .lease
            .map(|l| l.drone_name)
            .expect("a running task has a lease");
        let others: Vec<&str> = CHURN_DRONES
            .iter()
            .copied()
            .filter(|d| *d != holder)
            .collect();
        let other = others[rng.random_range(0..others.len())];
        hive.drone(&holder).kill9();
        hive.drone(other).kill9();
        hive.restart_drone(&holder);
        hive.restart_drone(other);
        hive.wait_task(chased, &format!("requeued after kill {kill}"), |t| {
            t.errors.len() >= kill
        });
    }
    ids.push(chased);
    let views = hive.wait_all_succeeded(ROUND_DONE, &ids);
    let chased = views
        .iter()
        .find(|v| v.id == chased)
        .expect("the chased task is among them");
    let verdicts: Vec<LossVerdict> = chased
        .suspicion
        .as_ref()
        .map(|s| s.losses.iter().map(|l| l.verdict).collect())
        .unwrap_or_default();
    assert_eq!(verdicts.len(), 4, "{chased:#?}");
    assert!(
        verdicts[2..]
            .iter()
            .all(|v| *v == LossVerdict::Inconclusive),
        "a suspect alone on a drone that died with another is not convicted: {verdicts:?}"
    );
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.quarantined, 0, "{summary}");
    assert!(summary.lost_leases >= 4, "{summary}");
}

/// Guards the other side of quarantine: a real poison task (it `kill -9`s the drone that
/// runs it) is quarantined once it killed a drone it ran on alone, and costs at most
/// `tasks.suspect_after_lost + tasks.max_lost_attempts` drones (2 + 1 by default) though it
/// has ten attempts; none of the ordinary tasks that shared its drones fails.
#[test]
fn a_poison_task_is_quarantined_after_its_isolated_attempt_and_no_co_tenant_fails() {
    // Its verdict comes 2 s (2 x the heartbeat timeout) after its lone drone died.
    let mut hive = hive_tests::hive_builder!()
        .env("HIVE_TASKS__LOSS_CORRELATION_MS", "0")
        .start();
    for d in ["p1", "p2", "p3"] {
        hive.start_drone(d, 3);
    }
    let (poison, ids) = poison_among_quick_tasks(&hive, 10, 30);

    let api = hive.api().clone();
    let mut awaited = false;
    let failed = restart_dead_drones_until(&mut hive, "the poison task to end", |_| {
        let v = api.try_task(poison).ok()?;
        // Between its lone drone's death and the verdict it waits, and runs nowhere.
        awaited |=
            v.state == TaskState::Scheduled && v.suspicion.as_ref().is_some_and(|s| s.awaiting());
        v.state.is_terminal().then_some(v)
    });
    assert_eq!(failed.state, TaskState::Failed, "{failed:#?}");
    assert!(
        failed
            .errors
            .last()
            .is_some_and(|e| e.error.contains("quarantined")),
        "quarantined, not out of attempts: {failed:#?}"
    );
    assert!(awaited, "it waited for its verdict");
    let suspicion = failed.suspicion.clone().expect("the evidence is kept");
    let verdicts: Vec<LossVerdict> = suspicion.losses.iter().map(|l| l.verdict).collect();
    assert_eq!(
        verdicts.len(),
        3,
        "2 lost leases make a suspect, 1 isolated loss convicts: {verdicts:?}"
    );
    assert!(
        verdicts[..2]
            .iter()
            .all(|v| matches!(v, LossVerdict::Shared | LossVerdict::Alone)),
        "{verdicts:?}"
    );
    assert_eq!(verdicts[2], LossVerdict::Isolated);
    assert_eq!(suspicion.losses[2].co_tenants, 0, "it ran alone");
    let runs = runs_of(&hive, poison);
    assert_eq!(runs.len(), 3, "three drones killed, no more: {runs:#?}");

    let summary = still_serves(&mut hive, 3, ids);
    assert_eq!(summary.quarantined, 1, "{summary}");
}
