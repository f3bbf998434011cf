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
        .env_remove("HIVE_AUTH__TOKEN");
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

#[test]
fn queen_dev_runs_its_sample_batch_serves_and_stops_with_its_drones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut queen, rx) = spawn_dev(
        dir.path(),
        &["--drones", "2", "--slots", "2", "--tasks", "12"],
    );
    let mut lines = Vec::new();
    let next_line = |lines: &mut Vec<String>| -> Option<String> {
        let line = rx.recv_timeout(DEADLINE).ok()?;
        lines.push(line.clone());
        Some(line)
    };

    // The dashboard URL, then the sample batch running to completion.
    let mut dashboard = None;
    let mut drones_addr = None;
    loop {
        let line = next_line(&mut lines)
            .unwrap_or_else(|| panic!("queen dev stopped printing; so far: {lines:#?}"));
        if let Some(url) = line.strip_prefix("dashboard: ") {
            dashboard = Some(url.trim().to_owned());
        }
        if let Some(rest) = line.strip_prefix("queen: drones connect to ") {
            drones_addr = rest.split(',').next().map(str::to_owned);
        }
        if line == "sample batch complete" {
            break;
        }
    }
    let dashboard = dashboard.expect("a dashboard URL");
    let drones_addr = drones_addr.expect("the drones' address");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sample batch: 12/12 finished")),
        "{lines:#?}"
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

    // SIGTERM: a clean exit, and the drones go with it.
    queen.signal(libc::SIGTERM);
    wait_until(DEADLINE, "queen dev to exit", || queen.exit_status());
    let status = queen.exit_status().expect("exited");
    assert!(status.success(), "exit status {status}");
    wait_until(
        Duration::from_secs(10),
        "the local drones to stop with the queen",
        || processes_with(&drones_addr).is_empty(),
    );
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
    let mut lines = Vec::new();
    let mut drones_addr = None;
    loop {
        let line = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("queen dev stopped printing; so far: {lines:#?}"));
        if let Some(rest) = line.strip_prefix("queen: drones connect to ") {
            drones_addr = rest.split(',').next().map(str::to_owned);
        }
        let submitted = line.starts_with("submitted a sample batch");
        lines.push(line);
        if submitted {
            break;
        }
    }
    let drones_addr = drones_addr.expect("the drones' address");
    assert!(
        !lines.iter().any(|l| l == "sample batch complete"),
        "the batch must still be running: {lines:#?}"
    );
    queen.signal(libc::SIGTERM);
    wait_until(DEADLINE, "queen dev to exit", || queen.exit_status());
    let status = queen.exit_status().expect("exited");
    assert!(status.success(), "exit status {status}");
    wait_until(
        Duration::from_secs(10),
        "the local drones to stop with the queen",
        || processes_with(&drones_addr).is_empty(),
    );
}
