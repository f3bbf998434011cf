//! Where a program name leads: the `PATH` search `execvp` does, with every symlink and
//! `..` resolved, so the allowlist compares the file that will really run.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The first executable file named `name` in the absolute directories of `path` (empty
/// and relative entries are skipped: they would mean the task's own directory).
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where a task's `cmd[0]` leads, with every symlink and `..` resolved: a name with a
/// slash relative to `cwd`, a bare name through `path` the way `execvp` searches it.
pub fn locate_program(program: &str, cwd: &Path, path: Option<&OsStr>) -> Result<PathBuf, String> {
    let found = if program.contains('/') {
        cwd.join(program)
    } else {
        let path = path.unwrap_or_default();
        find_in_path(program, path).ok_or_else(|| {
            format!(
                "program `{program}` is not an executable file in PATH `{}`",
                path.to_string_lossy()
            )
        })?
    };
    found
        .canonicalize()
        .map_err(|e| format!("program `{program}` cannot be resolved: {e}"))
}
