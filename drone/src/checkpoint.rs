//! Checkpoint files: each running `exec` attempt gets `$HIVE_CHECKPOINT_FILE`, holding the
//! last checkpoint of an earlier attempt (if any). Whatever JSON the task writes there is
//! sent to the queen with the next heartbeat, stored with the task, and handed to the next
//! attempt if this one is lost.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;
use shared::protocol::Held;

use crate::identity::Identity;

/// Largest checkpoint sent to the queen (the queen's default `tasks.max_checkpoint_bytes`).
pub const MAX_CHECKPOINT_BYTES: usize = 64 * 1024;

/// The directory for one drone process's checkpoint files; removed when dropped.
#[derive(Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    max_bytes: usize,
    /// The user tasks run as (`policy.run_as`), who must be able to write the files.
    owner: Option<(libc::uid_t, libc::gid_t)>,
    /// How many times the drone itself wrote each attempt's file ([`Checkpoints::prepare`]:
    /// a pool process's checkpoints). File times are coarse (a clock tick), so two
    /// checkpoints of one length written within a tick look alike by time and size; this
    /// count tells them apart.
    written: Mutex<HashMap<Held, Attempt>>,
}

/// What the drone knows of one attempt's checkpoint file without looking at it.
#[derive(Debug, Clone, Copy, Default)]
struct Attempt {
    /// Checkpoints the drone wrote into it.
    written: u64,
    /// Only the drone writes it (a pool process's attempt): with nothing written there is
    /// no file, and nothing to look at or remove.
    drone_only: bool,
}

/// What the drone last sent of one checkpoint file, to send only changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    modified: Option<SystemTime>,
    len: u64,
    written: u64,
}

impl Checkpoints {
    /// Creates a private directory under the system temp dir.
    pub fn new(max_bytes: usize) -> std::io::Result<Checkpoints> {
        let dir = std::env::temp_dir().join(format!(
            "hive-drone-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Checkpoints {
            dir,
            max_bytes,
            owner: None,
            written: Mutex::new(HashMap::new()),
        })
    }

    /// Gives the directory, and every checkpoint file written from now on, to the user
    /// tasks run as, so they can write (or atomically replace) their checkpoints.
    pub fn hand_to(&mut self, user: &Identity) -> std::io::Result<()> {
        std::os::unix::fs::chown(&self.dir, Some(user.uid), Some(user.gid))?;
        self.owner = Some((user.uid, user.gid));
        Ok(())
    }

    pub fn path(&self, held: Held) -> PathBuf {
        self.dir
            .join(format!("{}-{}.json", held.task_id, held.fence))
    }

    /// Writes the checkpoint an earlier attempt left, so the task can resume from it.
    /// Returns what counts as already seen (the queen has that checkpoint).
    pub fn prepare(&self, held: Held, initial: Option<&Value>) -> Seen {
        let path = self.path(held);
        let _ = std::fs::remove_file(&path);
        if let Some(v) = initial {
            // `create_new` never follows a symlink a task may have planted at this path,
            // so the drone cannot be made to write someone else's file.
            let written = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| {
                    if let Some((uid, gid)) = self.owner {
                        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
                    }
                    std::io::Write::write_all(&mut f, v.to_string().as_bytes())
                });
            if let Err(e) = written {
                tracing::warn!(task_id = %held.task_id, error = %e, "could not write the checkpoint file");
            }
            // Counted after the write: a heartbeat between the two sends the new content
            // and then, seeing the count move, sends it once more (never too little).
            if let Ok(mut counts) = self.written.lock() {
                counts.entry(held).or_default().written += 1;
            }
        }
        self.seen(held)
    }

    /// [`Checkpoints::prepare`] for an attempt on a pool process, whose file only the
    /// drone writes (the process sends checkpoints over its channel): until one is written
    /// the drone touches no file for it, which saves a pool task three file system calls.
    pub fn prepare_for_pool(&self, held: Held, initial: Option<&Value>) -> Seen {
        if let Ok(mut counts) = self.written.lock() {
            counts.insert(
                held,
                Attempt {
                    written: 0,
                    drone_only: true,
                },
            );
        }
        match initial {
            Some(_) => self.prepare(held, initial),
            None => self.seen(held),
        }
    }

    fn attempt(&self, held: Held) -> Attempt {
        self.written
            .lock()
            .ok()
            .and_then(|c| c.get(&held).copied())
            .unwrap_or_default()
    }

    fn seen(&self, held: Held) -> Seen {
        let Attempt {
            written,
            drone_only,
        } = self.attempt(held);
        if drone_only && written == 0 {
            return Seen::default();
        }
        match std::fs::symlink_metadata(self.path(held)) {
            Ok(m) => Seen {
                modified: m.modified().ok(),
                len: m.len(),
                written,
            },
            Err(_) => Seen {
                written,
                ..Seen::default()
            },
        }
    }

    /// The checkpoint, if the file changed since `last`; `last` is updated. A file that is
    /// too large or not JSON is skipped with a warning (the task may be mid-write; a later
    /// heartbeat reads it again once it changes).
    pub fn changed(&self, held: Held, last: &mut Seen) -> Option<Value> {
        let now = self.seen(held);
        if now == *last || now == Seen::default() {
            return None;
        }
        *last = now;
        if now.len > self.max_bytes as u64 {
            tracing::warn!(task_id = %held.task_id, len = now.len, max = self.max_bytes, "checkpoint file too large; not sent");
            return None;
        }
        let bytes = self.read(held).ok()?;
        if bytes.len() > self.max_bytes {
            // It grew since the size check above.
            return None;
        }
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(task_id = %held.task_id, error = %e, "checkpoint file is not JSON; not sent");
                None
            }
        }
    }

    /// Reads a checkpoint file the task wrote, which the drone does not trust: a symlink is
    /// not followed (it could point at a file only the drone may read) and a FIFO is not
    /// waited on; at most one byte past the cap is read.
    fn read(&self, held: Held) -> std::io::Result<Vec<u8>> {
        let file: File = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.path(held))?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(self.max_bytes as u64 + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    pub fn remove(&self, held: Held) {
        let attempt = self
            .written
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&held))
            .unwrap_or_default();
        if !(attempt.drone_only && attempt.written == 0) {
            let _ = std::fs::remove_file(self.path(held));
        }
    }

    /// Where an exec attempt's input (`"input"`) or result (`"result"`) file lives, beside
    /// its checkpoint file, in the directory the task's user may write.
    pub fn io_path(&self, held: Held, what: &str) -> PathBuf {
        self.dir
            .join(format!("{}-{}.{what}.json", held.task_id, held.fence))
    }

    /// Writes a file for the task to read (its input), readable by the task's user only.
    /// A stale file is removed first; `create_new` never follows a planted symlink.
    pub fn write_for_task(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        std::io::Write::write_all(&mut f, bytes)
    }

    /// Reads a file the task wrote (its result), which the drone does not trust: no
    /// symlink followed, no FIFO waited on, at most `max + 1` bytes. `None` when absent.
    pub fn read_from_task(&self, path: &Path, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let file: File = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(max as u64 + 1).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{Fence, TaskId};

    #[test]
    fn only_changes_are_reported_and_bad_files_are_skipped() {
        let c = Checkpoints::new(64).expect("dir");
        let held = Held {
            task_id: TaskId::generate(),
            fence: Fence(2),
        };
        let mut seen = c.prepare(held, Some(&serde_json::json!({"step": 1})));
        assert_eq!(
            c.changed(held, &mut seen),
            None,
            "the initial checkpoint is not news"
        );
        std::fs::write(c.path(held), r#"{"step": 2, "progress": 0.5}"#).expect("write");
        // Make sure the length differs even where mtime granularity is coarse.
        assert_eq!(
            c.changed(held, &mut seen),
            Some(serde_json::json!({"step": 2, "progress": 0.5}))
        );
        assert_eq!(c.changed(held, &mut seen), None);
        std::fs::write(c.path(held), "not json at all").expect("write");
        assert_eq!(c.changed(held, &mut seen), None);
        std::fs::write(c.path(held), "x".repeat(100)).expect("write");
        assert_eq!(c.changed(held, &mut seen), None, "too large");
        std::fs::remove_file(c.path(held)).expect("rm");
        let elsewhere = c.dir.join("elsewhere.json");
        std::fs::write(&elsewhere, r#"{"secret": true}"#).expect("write");
        std::os::unix::fs::symlink(&elsewhere, c.path(held)).expect("symlink");
        assert_eq!(
            c.changed(held, &mut seen),
            None,
            "a symlink is not followed"
        );
        let dir = c.dir.clone();
        drop(c);
        assert!(!dir.exists(), "the directory goes with the drone");
    }

    /// A pool process's checkpoints are written by the drone: each one counts as news even
    /// when it has the length of the last one and lands within the same clock tick (file
    /// times are coarse), or a later attempt would resume from an older one.
    #[test]
    fn checkpoints_the_drone_writes_count_as_news_whatever_the_clock_says() {
        let c = Checkpoints::new(64).expect("dir");
        let held = Held {
            task_id: TaskId::generate(),
            fence: Fence(3),
        };
        let mut seen = c.prepare(held, None);
        let tick = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        for step in 1..=5 {
            let data = serde_json::json!({ "step": step });
            c.prepare(held, Some(&data));
            // As a coarse clock would stamp them: every write in the same tick.
            std::fs::File::options()
                .write(true)
                .open(c.path(held))
                .and_then(|f| f.set_modified(tick))
                .expect("set the file's time");
            assert_eq!(c.changed(held, &mut seen), Some(data), "step {step}");
            assert_eq!(c.changed(held, &mut seen), None);
        }
        c.remove(held);
        assert_eq!(c.seen(held), Seen::default(), "forgotten with its file");
    }

    /// A pool attempt's file exists only once the drone wrote a checkpoint, and its
    /// checkpoints are news like any other.
    #[test]
    fn a_pool_attempt_has_a_file_only_once_a_checkpoint_is_written() {
        let c = Checkpoints::new(64).expect("dir");
        let held = Held {
            task_id: TaskId::generate(),
            fence: Fence(4),
        };
        let mut seen = c.prepare_for_pool(held, None);
        assert!(!c.path(held).exists());
        assert_eq!(c.changed(held, &mut seen), None);
        let data = serde_json::json!({"step": 1});
        c.prepare(held, Some(&data));
        assert!(c.path(held).exists());
        assert_eq!(c.changed(held, &mut seen), Some(data));
        c.remove(held);
        assert!(!c.path(held).exists(), "removed with its attempt");

        let resumed = Held {
            task_id: TaskId::generate(),
            fence: Fence(5),
        };
        let earlier = serde_json::json!({"step": 7});
        let mut seen = c.prepare_for_pool(resumed, Some(&earlier));
        assert!(
            c.path(resumed).exists(),
            "the earlier attempt's checkpoint is kept"
        );
        assert_eq!(
            c.changed(resumed, &mut seen),
            None,
            "the queen has it already"
        );
        c.remove(resumed);
        assert!(!c.path(resumed).exists());
    }
}
