//! A filling disk degrades the hive instead of stopping it. The data dir is on a small
//! tmpfs; a filler file takes it below `[storage] min_free_mb`. Then new work is refused
//! with 507, naming the free space and the setting, while reads, `/readyz` and `/metrics`
//! say so and the work already accepted still finishes and is recorded; once the filler
//! is gone the queen accepts new work again by itself, and nothing acknowledged is lost.

use std::io::Write;
use std::path::Path;

use hive_tests::disk::fill_until;
use hive_tests::execlog::shell_quote;
use hive_tests::{wait_until, Hive, DEADLINE};
use shared::api::TaskState;

/// The tmpfs under the data dir, and the reserve the queen keeps on it.
const VOLUME_MB: u64 = 64;
const MIN_FREE_MB: u64 = 24;

#[test]
fn a_nearly_full_disk_refuses_new_work_keeps_recording_outcomes_and_recovers_by_itself() {
    let mut hive = Hive::builder()
        .data_on_tmpfs(VOLUME_MB)
        .env("HIVE_STORAGE__MIN_FREE_MB", &MIN_FREE_MB.to_string())
        .start();
    hive.start_drone("a", 2);
    let release = hive.path("release");
    let wait_for_release = format!(
        "while [ ! -e {} ]; do sleep 0.05; done",
        shell_quote(&release.to_string_lossy())
    );
    let accepted = hive
        .api()
        .submit(&hive.exec_log().task(&wait_for_release))
        .id;
    hive.wait_task(accepted, "running", |t| t.state == TaskState::Running);

    let data_dir = hive.queen.data_dir().to_owned();
    let filler = fill_until(&data_dir, (MIN_FREE_MB / 2) << 20);
    let refusal = wait_until(DEADLINE, "a submit to be refused with 507", || {
        match hive.api().try_submit(&hive.exec_log().task("true")) {
            Err(e) if e.status() == Some(507) => Some(e.to_string()),
            _ => None,
        }
    });
    assert!(
        refusal.contains("min_free_mb") && refusal.contains("MiB free"),
        "{refusal}"
    );
    let (status, ready) = hive.api().get_raw("/readyz").expect("readyz");
    assert!(
        status == 200 && ready.contains("degraded"),
        "{status} {ready}"
    );
    let (_, metrics) = hive.api().get_raw("/metrics").expect("metrics");
    assert!(
        metrics.lines().any(|l| l == "hive_store_degraded 1"),
        "no degraded flag in /metrics"
    );
    // Work already accepted still finishes, and its outcome is recorded.
    std::fs::write(&release, "").expect("write the release file");
    let done = hive.wait_task(accepted, "succeeded", |t| t.state.is_terminal());
    assert_eq!(done.state, TaskState::Succeeded, "{done:#?}");

    // Space comes back: new work is accepted again, without a restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    let again = wait_until(DEADLINE, "a submit to be accepted again", || {
        hive.api().try_submit(&hive.exec_log().task("true")).ok()
    });
    hive.wait_task(again.id, "succeeded", |t| t.state == TaskState::Succeeded);
    let (_, ready) = hive.api().get_raw("/readyz").expect("readyz");
    assert!(ready.contains("\"ready\""), "{ready}");
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.rerun_tasks, 0, "{summary}");
}

/// Writes real bytes until the filesystem holding `dir` is full.
fn fill_completely(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0x5a_u8; 64 << 10];
    loop {
        match file.write_all(&chunk).and_then(|()| file.sync_data()) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return path,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
}

#[test]
fn a_restart_on_a_full_disk_says_what_is_needed_and_loses_nothing() {
    let mut hive = Hive::builder()
        .data_on_tmpfs(16)
        .env("HIVE_STORAGE__MIN_FREE_MB", "4")
        .start();
    let ids: Vec<_> = (0..5)
        .map(|_| hive.api().submit(&hive.exec_log().task("true")).id)
        .collect();
    hive.queen.stop();
    let data_dir = hive.queen.data_dir().to_owned();
    let filler = fill_completely(&data_dir);
    let env = [
        (
            "HIVE_QUEEN__DATA_DIR",
            data_dir.to_string_lossy().into_owned(),
        ),
        ("HIVE_QUEEN__LISTEN", "127.0.0.1:0".to_owned()),
        ("HIVE_QUEEN__HTTP", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let exited = hive_tests::queen::run_to_exit(hive.dir(), "full-disk", env, None, DEADLINE);
    assert!(!exited.status.success(), "{exited:?}");
    assert!(
        exited
            .stderr
            .contains("no space left on the filesystem of the data dir")
            && exited.stderr.contains("free some space"),
        "the refusal must say what is needed: {}",
        exited.stderr
    );
    // Space freed: everything acknowledged is there and runs.
    std::fs::remove_file(&filler).expect("remove the filler");
    hive.queen.restart();
    hive.start_drone("a", 2);
    hive.wait_all_succeeded(DEADLINE, &ids);
    hive.check(DEADLINE);
}
