//! The language SDKs' own suites (`sdk/python`: pytest, `sdk/node`: `node --test`), run
//! against the freshly built `queen` and `drone`, so `cargo test --workspace` covers them.
//! Each suite starts real queens and drones with worker pools of its SDK and kills them
//! itself; this wrapper only points them at the binaries and fails with their output.
//!
//! Neither suite is skipped when its runner is missing: the test fails and says what to
//! install (`.ci/run` installs both).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hive_tests::bins;

fn repo() -> PathBuf {
    bins::workspace_root()
}

/// Runs a suite in `dir` with the binaries it is to start, and fails with its output.
fn run_suite(name: &str, mut command: Command, dir: &Path) {
    command
        .current_dir(dir)
        .env("HIVE_QUEEN_BIN", bins::queen())
        .env("HIVE_DRONE_BIN", bins::drone())
        .env_remove("RUST_LOG");
    // The suites configure their own queens; the runner's HIVE_* settings must not leak in.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("HIVE_") && key != "HIVE_QUEEN_BIN" && key != "HIVE_DRONE_BIN" {
            command.env_remove(key);
        }
    }
    // A suite that finds no binaries fails instead of skipping its integration tests.
    command
        .env("HIVE_SDK_REQUIRE_INTEGRATION", "1")
        .env("HIVE_REQUIRE_INTEGRATION", "1");
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|e| panic!("could not run the {name} suite ({command:?}): {e}"));
    let stdout = String::from_utf8_lossy(&stdout);
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(
        status.success(),
        "the {name} suite failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // Shown with --nocapture: what ran.
    println!("{stdout}");
}

/// A Python that has pytest: `HIVE_TEST_PYTHON`, the CI venv (`.ci/run` installs pytest
/// there), or `python3`.
fn python_with_pytest() -> PathBuf {
    let candidates: Vec<PathBuf> = std::env::var_os("HIVE_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            repo().join("target/ci-venv/bin/python"),
            PathBuf::from("python3"),
        ])
        .collect();
    for python in &candidates {
        let has_pytest = Command::new(python)
            .args(["-c", "import pytest"])
            .output()
            .is_ok_and(|o| o.status.success());
        if has_pytest {
            return python.clone();
        }
    }
    panic!(
        "the Python SDK's tests need pytest, and none of {candidates:?} has it: \
         `python3 -m venv target/ci-venv && target/ci-venv/bin/pip install pytest` \
         (what .ci/run does), or set HIVE_TEST_PYTHON to a Python that has it"
    );
}

#[test]
fn the_python_sdk_suite_passes_against_a_real_queen_and_drone() {
    let mut command = Command::new(python_with_pytest());
    command.args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "sdk/python/tests",
    ]);
    run_suite("Python SDK", command, &repo());
}

#[test]
fn the_node_sdk_suite_passes_against_a_real_queen_and_drone() {
    let node =
        std::env::var_os("HIVE_TEST_NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let version = Command::new(&node)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the Node SDK's tests need Node.js 18 or later on the PATH (or HIVE_TEST_NODE): {e}"
            )
        });
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 18,
        "the Node SDK needs Node.js 18 or later, found {version:?}"
    );
    // The test files by name: `node --test test/` reads a directory on Node 18 and 20 but
    // takes it as a file pattern from Node 21 on, where it finds nothing and fails.
    let dir = repo().join("sdk/node");
    let mut files: Vec<String> = std::fs::read_dir(dir.join("test"))
        .expect("sdk/node/test is readable")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.js"))
        .map(|name| format!("test/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.js in sdk/node/test");
    let mut command = Command::new(node);
    command.arg("--test").args(&files);
    run_suite("Node SDK", command, &dir);
}
