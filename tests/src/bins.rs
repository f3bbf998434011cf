//! Finding the real `queen` and `drone` binaries, freshly built.
//!
//! A `tests` package cannot use `CARGO_BIN_EXE_*` for another package's binaries, and a
//! stale binary left in `target/` would make every scenario test old code. So the first
//! test in a process that needs a binary runs `cargo build -p <package>` (a no-op when it is
//! up to date) and every later one reuses the result. Each binary is built on its own so a
//! drone that does not compile yet does not stop the queen-only scenarios from running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root: this package's parent directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives inside the workspace")
        .to_path_buf()
}

/// `<target dir>/debug`: `CARGO_TARGET_DIR` when set (relative to the workspace root, as
/// cargo reads it), else the `target/` this test binary was built into
/// (`…/target/debug/deps/<test>` → `…/target`).
fn profile_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return workspace_root().join(dir).join("debug");
    }
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let target = exe
        .ancestors()
        .nth(3)
        .unwrap_or_else(|| panic!("cannot derive the target dir from {}", exe.display()));
    target.join("debug")
}

/// Runs `cargo build -p <package>` in the workspace root and returns the binary's path.
/// Panics with cargo's output when the build fails.
fn build(package: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "-p", package])
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} build -p {package}: {e}"));
    if !out.status.success() {
        panic!(
            "`cargo build -p {package}` failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = profile_dir().join(package);
    assert!(
        bin.is_file(),
        "`cargo build -p {package}` succeeded but {} does not exist",
        bin.display()
    );
    bin
}

/// The `queen` binary, built at most once per test process.
pub fn queen() -> &'static Path {
    static QUEEN: OnceLock<PathBuf> = OnceLock::new();
    QUEEN.get_or_init(|| build("queen"))
}

/// The `drone` binary, built at most once per test process.
pub fn drone() -> &'static Path {
    static DRONE: OnceLock<PathBuf> = OnceLock::new();
    DRONE.get_or_init(|| build("drone"))
}
