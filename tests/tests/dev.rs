//! `queen dev`, the one-command local hive behind `./run-hive`: it starts a queen and local
//! drones, runs its sample batch to completion, prints the dashboard URL, keeps serving,
//! and on SIGTERM stops cleanly with its drones.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use hive_tests::bins;
use hive_tests::process::{Proc, Stdout};
use hive_tests::wait::{wait_until, DEADLINE};

/// The pids of live processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .filter(|pid| {
            // A zombie is already dead.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        })
        .collect()
}

/// `queen dev` with `args`, and its stdout a line at a time.
fn spawn_dev(dir: &std::path::Path, args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut cmd = Command::new(bins::queen());
    // `drone` is built next to `queen`, where `dev` looks for it.
    let _ = bins::drone();
    cmd.arg("dev")
        .args(args)
        .env("HIVE_QUEEN__DATA_DIR", dir.join("data"))
        .env("HIVE_QUEEN__LISTEN", "127.0.0.1:0")
        .env("HIVE_QUEEN__HTTP", "127.0.0.1:0")
        .env_remove("HIVE_AUTH__TOKEN")
        .env_remove("RUST_LOG");
    let mut queen = Proc::spawn("queen dev", cmd, &dir.join("dev.log"), Stdout::Piped);
    let stdout = queen.child_mut().stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (queen, rx)
}

/// Lines from queen dev's stdout up to and including the first that `last` accepts.
fn lines_until(rx: &mpsc::Receiver<String>, last: impl Fn(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("queen dev stopped printing; so far: {lines:#?}"));
        let done = last(&line);
        lines.push(line);
        if done {
            return lines;
        }
    }
}

/// The rest of the first line that starts with `prefix`.
fn after(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix).map(|rest| rest.trim().to_owned()))
}

/// SIGTERM: a clean exit, and the local drones (found by the queen's address on their
/// command line) go with it.
fn stop_cleanly(queen: &mut Proc, drones_addr: &str) {
    queen.signal(libc::SIGTERM);
    wait_until(DEADLINE, "queen dev to exit", || queen.exit_status());
    let status = queen.exit_status().expect("exited");
    assert!(status.success(), "exit status {status}");
    wait_until(
        Duration::from_secs(10),
        "the local drones to stop with the queen",
        || processes_with(drones_addr).is_empty(),
    );
}

#[test]
fn queen_dev_runs_its_sample_batch_serves_and_stops_with_its_drones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut queen, rx) = spawn_dev(
        dir.path(),
        &["--drones", "2", "--slots", "2", "--tasks", "12"],
    );
    // The dashboard URL, then the sample batch running to completion.
    let lines = lines_until(&rx, |l| l == "sample batch complete");
    let dashboard = after(&lines, "dashboard: ");
    let drones_addr = after(&lines, "queen: drones connect to ")
        .and_then(|rest| rest.split(',').next().map(str::to_owned));
    let dashboard = dashboard.expect("a dashboard URL");
    let drones_addr = drones_addr.expect("the drones' address");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sample batch: 12/12 finished")),
        "{lines:#?}"
    );
    // The terminal shows the progress, not a line per task from every drone.
    let log = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
    assert!(
        !log.contains("task succeeded") && !log.contains("task assigned"),
        "per-task lines without --verbose:\n{log}"
    );

    // It keeps serving: the page, and the API with the batch's outcome and both drones.
    let page = ureq::get(&dashboard)
        .call()
        .expect("dashboard page")
        .into_string()
        .expect("html");
    assert!(page.contains("<title>The Hive</title>"), "{page:.200}");
    let stats: serde_json::Value = ureq::get(&format!("{dashboard}v1/stats"))
        .call()
        .expect("stats")
        .into_json()
        .expect("json");
    assert_eq!(stats["by_queue"]["sample"]["succeeded"], 12, "{stats}");
    assert_eq!(stats["drones_connected"], 2, "{stats}");
    let drones = processes_with(&drones_addr);
    assert_eq!(drones.len(), 2, "two local drones: {drones:?}");

    stop_cleanly(&mut queen, &drones_addr);
}

/// `queen dev --verbose` shows every task's lines from the drones.
#[test]
fn queen_dev_verbose_shows_every_tasks_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut queen, rx) = spawn_dev(
        dir.path(),
        &["--drones", "1", "--slots", "2", "--tasks", "4", "--verbose"],
    );
    let lines = lines_until(&rx, |l| l == "sample batch complete");
    let drones_addr = after(&lines, "queen: drones connect to ")
        .and_then(|rest| rest.split(',').next().map(str::to_owned))
        .expect("the drones' address");
    let log = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
    assert!(log.contains("task succeeded"), "{log}");
    stop_cleanly(&mut queen, &drones_addr);
}

/// Guards the signal handling of `queen dev`: a SIGTERM that arrives while the sample
/// batch still runs stops the hive cleanly, drones included. (Its handlers used to be
/// installed only once the batch was done, so such a signal killed the process outright
/// and left its drones running.)
#[test]
fn queen_dev_stops_cleanly_on_sigterm_while_its_sample_batch_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One slot for a few hundred tasks (a third of them sleep): the batch outlasts the test.
    let (mut queen, rx) = spawn_dev(
        dir.path(),
        &["--drones", "1", "--slots", "1", "--tasks", "300"],
    );
    let lines = lines_until(&rx, |l| l.starts_with("submitted a sample batch"));
    let drones_addr = after(&lines, "queen: drones connect to ")
        .and_then(|rest| rest.split(',').next().map(str::to_owned));
    let drones_addr = drones_addr.expect("the drones' address");
    assert!(
        !lines.iter().any(|l| l == "sample batch complete"),
        "the batch must still be running: {lines:#?}"
    );
    stop_cleanly(&mut queen, &drones_addr);
}

/// `queen dev` with `drones` drones of 2 slots, a sample batch of `tasks` and this
/// checkout's Python SDK, so it starts a drone with a Python worker pool too.
fn spawn_dev_with_python(
    dir: &std::path::Path,
    drones: u32,
    tasks: u32,
) -> (Proc, mpsc::Receiver<String>) {
    let sdk = bins::workspace_root().join("sdk/python");
    let sdk = sdk.to_str().expect("a UTF-8 path");
    let (drones, tasks) = (drones.to_string(), tasks.to_string());
    spawn_dev(
        dir,
        &[
            "--drones",
            &drones,
            "--slots",
            "2",
            "--tasks",
            &tasks,
            "--python-sdk",
            sdk,
        ],
    )
}

/// Every process descended from `pid` (children first), read from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// `./run-hive` shows a function-style task: with the Python SDK at hand, `queen dev`
/// starts a drone whose worker pool runs `sdk/python/examples/tasks.py`, the sample batch's
/// `py.greet` tasks succeed with the handler's greeting, and the pool's processes stop with
/// the hive.
#[test]
fn queen_dev_runs_python_tasks_on_a_worker_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut queen, rx) = spawn_dev_with_python(dir.path(), 1, 10);
    let lines = lines_until(&rx, |l| l == "sample batch complete");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("started a drone with a Python worker pool")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sample batch: 10/10 finished")),
        "{lines:#?}"
    );
    let dashboard = after(&lines, "dashboard: ").expect("a dashboard URL");
    let drones_addr = after(&lines, "queen: drones connect to ")
        .and_then(|rest| rest.split(',').next().map(str::to_owned))
        .expect("the drones' address");
    let page: serde_json::Value = ureq::get(&format!("{dashboard}v1/tasks?queue=sample&limit=100"))
        .call()
        .expect("tasks")
        .into_json()
        .expect("json");
    let greeted: Vec<&serde_json::Value> = page["tasks"]
        .as_array()
        .expect("a task list")
        .iter()
        .filter(|t| t["kind"] == "py.greet")
        .collect();
    assert_eq!(greeted.len(), 2, "tasks 1 and 6 of 10 are py.greet: {page}");
    for t in &greeted {
        assert_eq!(t["state"], "succeeded", "{t}");
        let greeting = t["result"]["greeting"].as_str().unwrap_or_default();
        assert!(greeting.starts_with("Hello, task "), "{t}");
    }
    let drones: serde_json::Value = ureq::get(&format!("{dashboard}v1/drones"))
        .call()
        .expect("drones")
        .into_json()
        .expect("json");
    let python_drone = drones["drones"]
        .as_array()
        .expect("a drone list")
        .iter()
        .find(|d| d["name"] == "dev-drone-python")
        .cloned()
        .unwrap_or_else(|| panic!("no dev-drone-python in {drones}"));
    assert_eq!(python_drone["pools"][0]["name"], "py", "{python_drone}");
    assert_eq!(python_drone["pools"][0]["processes"], 2, "{python_drone}");

    // The pool's processes (the drone's supervisor and the Python workers under it) stop
    // with the hive.
    let config = dir.path().join("data/dev-drone-python.toml");
    let python_drones = processes_with(config.to_str().expect("a UTF-8 path"));
    assert_eq!(
        python_drones.len(),
        1,
        "one Python pool drone: {python_drones:?}"
    );
    let pool_processes = descendants(python_drones[0]);
    assert!(
        pool_processes.len() >= 3,
        "the supervisor and two Python workers: {pool_processes:?}"
    );
    stop_cleanly(&mut queen, &drones_addr);
    wait_until(
        Duration::from_secs(10),
        "the Python pool's processes to stop with the hive",
        || !pool_processes.iter().any(|p| alive(*p)),
    );
}

/// Guards the local drones of a dev hive: when `queen dev` is killed outright (`kill -9`,
/// a crashed terminal, a test that panicked), its drones and their pool processes go too,
/// instead of reconnecting forever to a queen that is gone.
#[test]
fn the_local_drones_die_with_a_killed_queen_dev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut queen, rx) = spawn_dev_with_python(dir.path(), 2, 6);
    let lines = lines_until(&rx, |l| l == "sample batch complete");
    let drones_addr = after(&lines, "queen: drones connect to ")
        .and_then(|rest| rest.split(',').next().map(str::to_owned))
        .expect("the drones' address");
    let config = dir.path().join("data/dev-drone-python.toml");
    let mut everything = processes_with(&drones_addr);
    assert_eq!(everything.len(), 2, "two local drones: {everything:?}");
    let python_drones = processes_with(config.to_str().expect("a UTF-8 path"));
    assert_eq!(python_drones.len(), 1, "{python_drones:?}");
    everything.extend(&python_drones);
    everything.extend(descendants(python_drones[0]));
    assert!(
        everything.len() >= 6,
        "drones, the supervisor and workers: {everything:?}"
    );

    queen.signal(libc::SIGKILL);
    wait_until(DEADLINE, "queen dev to die", || queen.exit_status());
    wait_until(
        Duration::from_secs(20),
        "every drone and pool process of the killed dev hive to exit",
        || !everything.iter().any(|p| alive(*p)),
    );
}
