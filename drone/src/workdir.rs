//! Per-attempt work directories under `policy.work_root`: where a task's `cwd` may lead
//! inside one ([`sandboxed_cwd`], pure), and the directory itself ([`WorkDir`]), the one
//! piece of the policy that changes the file system.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use crate::identity::Identity;

/// Mode of `work_root` when the drone has to create it: others may pass through (a task
/// running as `run_as` must reach its own directory by absolute path, `$HOME`) but not
/// list the other attempts' directories.
const WORK_ROOT_MODE: u32 = 0o711;

/// Mode of each attempt's directory: only its owner (the task's user) gets in.
const WORK_DIR_MODE: u32 = 0o700;

/// A task's `cwd` inside its work directory, as a relative path without `.` or `..`.
/// Absolute paths are refused, and so is any `..` that would climb out.
pub fn sandboxed_cwd(requested: Option<&Path>) -> Result<PathBuf, String> {
    let Some(requested) = requested else {
        return Ok(PathBuf::new());
    };
    let refuse = |why: &str| {
        Err(format!(
            "invalid exec payload: cwd `{}` {why} (this drone runs every task in its own \
             directory under policy.work_root; cwd must be relative to it)",
            requested.display()
        ))
    };
    let mut inside = PathBuf::new();
    for part in requested.components() {
        match part {
            Component::Normal(name) => inside.push(name),
            Component::CurDir => {}
            Component::ParentDir => {
                if !inside.pop() {
                    return refuse("climbs out of the task's directory");
                }
            }
            Component::RootDir | Component::Prefix(_) => return refuse("is absolute"),
        }
    }
    Ok(inside)
}

/// One attempt's private directory under `work_root`, owned by the task's user. The
/// executor removes it when the attempt ends ([`WorkDir::remove`]).
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `<root>/<name>` empty (a leftover from a drone that died is removed first),
    /// creating `root` too if needed.
    pub fn create(root: &Path, name: &str, owner: Option<&Identity>) -> io::Result<WorkDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(WORK_ROOT_MODE)
            .create(root)?;
        let path = root.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::DirBuilder::new()
            .mode(WORK_DIR_MODE)
            .create(&path)?;
        if let Some(owner) = owner {
            if let Err(e) = std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid)) {
                let _ = std::fs::remove_dir(&path);
                return Err(e);
            }
        }
        Ok(WorkDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the task's `cwd` (from [`sandboxed_cwd`]) inside the directory, each level
    /// owned by `owner`, and returns its absolute path. The directory is fresh and nothing
    /// has run in it yet, so no symlink can redirect this outside.
    pub fn make_cwd(&self, relative: &Path, owner: Option<&Identity>) -> io::Result<PathBuf> {
        let mut at = self.path.clone();
        for part in relative.components() {
            at.push(part);
            match std::fs::DirBuilder::new().mode(WORK_DIR_MODE).create(&at) {
                Ok(()) => {
                    if let Some(owner) = owner {
                        std::os::unix::fs::chown(&at, Some(owner.uid), Some(owner.gid))?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(at)
    }

    /// Removes the directory and everything the task left in it. Failing is logged, not
    /// fatal: the task's outcome does not depend on it.
    pub async fn remove(self) {
        let path = self.path.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&path))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        if let Err(e) = removed {
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove a task's work directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cwd_stays_inside_the_work_directory() {
        let ok_cases = [
            (None, ""),
            (Some("."), ""),
            (Some("a/b"), "a/b"),
            (Some("./a/../b/"), "b"),
            (Some("a/.."), ""),
        ];
        for (requested, expected) in ok_cases {
            assert_eq!(
                sandboxed_cwd(requested.map(Path::new)),
                Ok(PathBuf::from(expected)),
                "{requested:?}"
            );
        }
        for bad in ["/tmp", "..", "../x", "a/../../x", "a/../../a", "/"] {
            let e = sandboxed_cwd(Some(Path::new(bad)))
                .err()
                .unwrap_or_default();
            assert!(e.contains("cwd"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_work_dir_is_fresh_owned_and_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let work_root = root.path().join("work");
        let stale = work_root.join("t-1");
        std::fs::create_dir_all(stale.join("old")).expect("mkdir");
        let dir = WorkDir::create(&work_root, "t-1", None).expect("create");
        assert_eq!(dir.path(), stale);
        assert!(!stale.join("old").exists(), "a leftover is emptied");
        let cwd = dir.make_cwd(Path::new("a/b"), None).expect("cwd");
        assert_eq!(cwd, stale.join("a/b"));
        assert!(cwd.is_dir());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(dir.remove());
        assert!(!stale.exists());
        assert!(work_root.is_dir(), "the root stays");
    }
}
