//! G7 for the queen's own inputs: a bad config, a data dir that is not a directory, and a
//! data dir another queen holds are each refused at start with a non-zero exit and an error
//! naming what is wrong — and refusing changes nothing on disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hive_tests::queen::{run_to_exit, Exited};
use hive_tests::{echo, Hive};
use shared::api::TaskState;

/// A refusing queen exits in milliseconds; this only bounds a queen that wrongly serves.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

/// Env for a queen on ephemeral ports in `dir`, plus `extra`.
fn env(dir: &Path, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("HIVE_QUEEN__LISTEN", "127.0.0.1:0".to_string()),
        ("HIVE_QUEEN__HTTP", "127.0.0.1:0".to_string()),
        (
            "HIVE_QUEEN__DATA_DIR",
            dir.join("data").to_string_lossy().into_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// Asserts the queen refused: non-zero exit, never `ready`, and stderr containing `needle`.
fn assert_refused(out: &Exited, needle: &str) {
    assert!(
        !out.status.success(),
        "the queen exited successfully; stderr:\n{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("ready"),
        "the queen printed ready before refusing:\n{}",
        out.stdout
    );
    assert!(
        out.stderr.contains(needle),
        "stderr does not name `{needle}`:\n{}",
        out.stderr
    );
}

/// Guards against a typo'd or out-of-range setting silently running a queen with defaults:
/// a non-integer `HIVE_LEASES__HEARTBEAT_TIMEOUT_MS` stops it with exit code 2, naming the key.
#[test]
fn a_non_numeric_env_value_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_to_exit(
        dir.path(),
        "bad-timeout",
        env(dir.path(), &[("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "abc")]),
        None,
        EXIT_DEADLINE,
    );
    assert_refused(&out, "heartbeat_timeout_ms");
    assert_eq!(
        out.status.code(),
        Some(2),
        "config errors exit with 2; stderr:\n{}",
        out.stderr
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused config must not create the data dir"
    );
}

/// Guards against a misspelt key in hive.toml being ignored (the operator thinks a setting
/// is in force when it is not).
#[test]
fn an_unknown_key_in_the_config_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hive.toml");
    std::fs::write(&config, "[leases]\nheartbeat_timout_ms = 10\n").expect("write config");
    let out = run_to_exit(
        dir.path(),
        "unknown-key",
        env(dir.path(), &[]),
        Some(&config),
        EXIT_DEADLINE,
    );
    assert_refused(&out, "heartbeat_timout_ms");
    assert_eq!(
        out.status.code(),
        Some(2),
        "config errors exit with 2; stderr:\n{}",
        out.stderr
    );
}

/// Guards against an unparsable listen address crashing (or binding somewhere unexpected)
/// instead of a clear refusal naming `queen.listen`.
#[test]
fn a_listen_address_that_is_not_ip_port_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_to_exit(
        dir.path(),
        "bad-listen",
        env(dir.path(), &[("HIVE_QUEEN__LISTEN", "nowhere")]),
        None,
        EXIT_DEADLINE,
    );
    assert_refused(&out, "queen.listen");
    assert_eq!(
        out.status.code(),
        Some(2),
        "config errors exit with 2; stderr:\n{}",
        out.stderr
    );
}

/// Guards against a missing config file being treated as "no config" (defaults silently
/// used when the operator pointed at a file).
#[test]
fn a_missing_config_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("nope.toml");
    let out = run_to_exit(
        dir.path(),
        "missing-file",
        env(dir.path(), &[]),
        Some(&config),
        EXIT_DEADLINE,
    );
    assert_refused(&out, "nope.toml");
}

/// Guards against a queen clobbering a file that is not its data dir (e.g. a path typo
/// naming someone's file): it must refuse, name the path, and leave the file intact.
#[test]
fn a_data_dir_that_is_a_regular_file_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("precious.txt");
    let content = "not a database\nkeep me\n";
    std::fs::write(&file, content).expect("write file");
    let file_str = file.to_string_lossy().into_owned();
    let out = run_to_exit(
        dir.path(),
        "file-data-dir",
        env(dir.path(), &[("HIVE_QUEEN__DATA_DIR", &file_str)]),
        None,
        EXIT_DEADLINE,
    );
    assert_refused(&out, &file_str);
    assert_eq!(
        std::fs::read_to_string(&file).expect("file still readable"),
        content,
        "the file was modified"
    );
    assert!(file.is_file());
}

/// Guards against two queens sharing one database (two writers, two sets of leases: G4
/// broken at once): the second is refused with "in use by another queen", and the first
/// keeps serving with its data untouched.
#[test]
fn a_second_queen_on_a_data_dir_in_use_is_refused() {
    let hive = Hive::start();
    let task = hive.api().submit(&echo(serde_json::json!({"keep": "me"})));
    let data = hive.queen.data_dir().to_string_lossy().into_owned();
    let out = run_to_exit(
        hive.dir(),
        "second-queen",
        env(hive.dir(), &[("HIVE_QUEEN__DATA_DIR", &data)]),
        None,
        EXIT_DEADLINE,
    );
    assert_refused(&out, "in use by another queen");

    // The first queen is unaffected: alive, healthy, and its task unchanged.
    let mut hive = hive;
    hive.queen.assert_running();
    assert!(hive.api().healthy(), "the first queen stopped answering");
    let again = hive.api().task(task.id);
    assert_eq!(again.state, TaskState::Pending);
    assert_eq!(again.payload, task.payload);
    assert_eq!(hive.api().stats().by_state.get("pending"), Some(&1));

    // And after the first queen goes away the lock goes with it: the data dir is usable.
    hive.queen.kill9();
    hive.queen.restart();
    assert_eq!(hive.api().task(task.id).state, TaskState::Pending);
}
