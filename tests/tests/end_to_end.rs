//! The happy path through the real binaries: many tasks, several drones, every task
//! succeeds once, and what the API reports (records, listings, stats) agrees.

use std::collections::BTreeSet;
use std::time::Duration;

use hive_tests::api::count;
use hive_tests::execlog::Phase;
use hive_tests::{echo, Hive};
use serde_json::json;
use shared::api::{TaskSpec, TaskState};
use shared::TaskId;

/// Generous for 320 tasks on a loaded 2-core machine; a healthy hive needs a second or two.
const ALL_DONE: Duration = Duration::from_secs(30);

/// Guards against the basic contract breaking end to end: lost or duplicated tasks under
/// load spread over several drones, wrong results, listings that skip or repeat tasks when
/// paged, and stats that disagree with the records. Three drones run 300 `echo` tasks
/// (one batch) and 20 `exec` tasks (single submits) in two queues.
#[test]
fn three_drones_run_300_echo_and_20_exec_tasks_and_the_stats_agree() {
    let mut hive = Hive::start();
    for name in ["d1", "d2", "d3"] {
        hive.start_drone(name, 4);
    }
    let api = hive.api().clone();

    let echoes: Vec<TaskSpec> = (0..300)
        .map(|i| TaskSpec {
            queue: Some("e2e-echo".into()),
            ..echo(json!({"i": i}))
        })
        .collect();
    let echo_views = api.batch(echoes);
    let exec_views: Vec<_> = (0..20)
        .map(|_| {
            let spec = hive.exec_log().task("echo \"out:$HIVE_TASK_ID\"");
            api.submit(&TaskSpec {
                queue: Some("e2e-exec".into()),
                ..spec
            })
        })
        .collect();

    let ids: Vec<TaskId> = echo_views.iter().chain(&exec_views).map(|v| v.id).collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        320,
        "ids must be unique"
    );
    let done = hive.wait_all_succeeded(ALL_DONE, &ids);

    for (submitted, v) in echo_views.iter().zip(&done) {
        assert_eq!(
            v.result.as_ref(),
            Some(&submitted.payload),
            "echo result: {v:#?}"
        );
        assert_eq!((v.attempts, v.queue.as_str()), (1, "e2e-echo"), "{v:#?}");
    }
    let log = hive.exec_log().by_task();
    for v in &done[300..] {
        let result = v.result.as_ref().expect("exec result");
        assert_eq!(result["exit_code"], 0, "{v:#?}");
        let stdout = result["stdout"].as_str().unwrap_or_default();
        assert_eq!(stdout.trim(), format!("out:{}", v.id), "{v:#?}");
        assert_eq!(v.attempts, 1, "{v:#?}");
        let phases: Vec<Phase> = log
            .get(&v.id)
            .map(|es| es.iter().map(|e| e.phase).collect())
            .unwrap_or_default();
        assert_eq!(
            phases,
            vec![Phase::Start, Phase::Done],
            "task {} must have run once",
            v.id
        );
    }

    // Stats agree with the records.
    let stats = api.stats();
    for state in TaskState::ALL {
        let expected = if state == TaskState::Succeeded {
            320
        } else {
            0
        };
        assert_eq!(count(&stats, state), expected, "{state}: {stats:?}");
    }
    assert_eq!(
        stats
            .by_queue
            .get("e2e-echo")
            .and_then(|q| q.get("succeeded")),
        Some(&300),
        "{stats:?}"
    );
    assert_eq!(
        stats
            .by_queue
            .get("e2e-exec")
            .and_then(|q| q.get("succeeded")),
        Some(&20),
        "{stats:?}"
    );
    assert_eq!(stats.drones_connected, 3, "{stats:?}");
    assert_eq!(stats.unroutable, 0, "{stats:?}");

    // Paging through a queue yields every task once, newest first.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = api
            .try_list(Some(TaskState::Succeeded), Some("e2e-echo"), 64, before)
            .expect("list page");
        assert!(page.tasks.len() <= 64);
        paged.extend(page.tasks.iter().map(|t| t.id));
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<TaskId> = echo_views.iter().map(|v| v.id).collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(paged, expected, "paged listing of e2e-echo");
    let execs = api.list_all(None, Some("e2e-exec"));
    assert_eq!(execs.len(), 20);
    assert!(execs.iter().all(|t| t.state == TaskState::Succeeded));
    hive.check(ALL_DONE);
}

/// The queen's CPU time so far (user + system, all threads), from `/proc/<pid>/stat`, in
/// seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the queen runs");
    // `pid (comm) state ppid ...`: utime and stime are fields 14 and 15, the 12th and 13th
    // after the parenthesis that closes comm.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("field {} of /proc/{pid}/stat: {stat}", i + 3))
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Seconds the queen has spent idle polling, by thread (`runtime`, `writer`), from its
/// `hive_idle_poll_seconds_total` counter.
fn idle_poll_seconds(api: &hive_tests::Api, thread: &str) -> f64 {
    let (status, text) = api.get_raw("/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    let series = format!("hive_idle_poll_seconds_total{{thread=\"{thread}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// Idle polling (`[queen] idle_poll_us`) keeps the runtime's worker and the store's writer
/// busy for a moment after work, so the next request finds them running. Both must poll
/// while work keeps coming, and stop once it does not: a poller that never gave up, a
/// writer that never went back to sleep or a window that never closed would burn CPU on a
/// quiet queen. The queen runs one runtime worker (where the runtime's poller runs) and
/// the largest window (10 ms, so that one stuck open costs a fifth of a CPU against the
/// 50 ms tick). After a burst of single submits through a drone, with the drone still
/// connected and heartbeating, both threads must have polled, and then, over a
/// two-second window, the queen must stay under 10 % of a CPU and poll under 2 %.
#[test]
fn a_queen_polls_while_busy_and_stops_when_idle() {
    let mut hive = Hive::builder()
        .env("HIVE_QUEEN__WORKER_THREADS", "1")
        .env("HIVE_QUEEN__IDLE_POLL_US", "10000")
        .start();
    hive.start_drone("d1", 8);
    let api = hive.api().clone();
    let ids: Vec<TaskId> = (0..100)
        .map(|i| api.submit(&echo(json!({"i": i}))).id)
        .collect();
    hive.wait_all_succeeded(ALL_DONE, &ids);
    for thread in ["runtime", "writer"] {
        assert!(
            idle_poll_seconds(&api, thread) > 0.0,
            "the {thread} never polled during the burst"
        );
    }
    let pid = hive.queen_at(0).pid().expect("the queen runs");
    let polled = || idle_poll_seconds(&api, "runtime") + idle_poll_seconds(&api, "writer");

    // Measured over a sliding two-second window, again every half second until one is
    // quiet: a loaded CI machine may delay the queen's own background work, but a queen
    // that keeps polling never gets there.
    const WINDOW: Duration = Duration::from_secs(2);
    const QUIET_CPU: f64 = 0.10;
    const QUIET_POLL: f64 = 0.02;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut samples = std::collections::VecDeque::new();
    loop {
        samples.push_back((std::time::Instant::now(), cpu_seconds(pid), polled()));
        let (newest_at, newest_cpu, newest_poll) = samples[samples.len() - 1];
        while samples.len() > 1 && newest_at - samples[1].0 >= WINDOW {
            samples.pop_front();
        }
        let (oldest_at, oldest_cpu, oldest_poll) = samples[0];
        let span = (newest_at - oldest_at).as_secs_f64();
        if span >= WINDOW.as_secs_f64() {
            let cpu = (newest_cpu - oldest_cpu) / span;
            let poll = (newest_poll - oldest_poll) / span;
            if cpu <= QUIET_CPU && poll <= QUIET_POLL {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "an idle queen kept using {:.0} % of a CPU, {:.1} % polling",
                cpu * 100.0,
                poll * 100.0
            );
        }
        // The sampling interval of a measurement, not a wait for an event.
        std::thread::sleep(Duration::from_millis(500));
    }
}
