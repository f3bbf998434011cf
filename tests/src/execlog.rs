//! Counting real executions: `exec` tasks wrapped so that each run appends a `start` line
//! (and a `done` line when its body finished) to a shared log file, tagged with the task id,
//! attempt and fence the drone gave it.
//!
//! One short `echo ... >> file` is a single `write(2)` on an `O_APPEND` file, so lines from
//! concurrent tasks never interleave. Only what a process really ran is in the log: this is
//! how a scenario tells "the queen says once" from "it ran once".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shared::api::TaskSpec;
use shared::TaskId;

/// Which end of a run a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Start,
    Done,
}

/// One line of the execution log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub task: TaskId,
    pub attempt: u32,
    pub fence: u64,
    pub phase: Phase,
}

/// An execution log file and the task specs that write to it.
#[derive(Debug, Clone)]
pub struct ExecLog {
    path: PathBuf,
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl ExecLog {
    pub fn new(path: impl Into<PathBuf>) -> ExecLog {
        ExecLog { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A shell script that logs `start`, runs `body`, then logs `done` if `body` succeeded;
    /// its exit status is `body`'s.
    pub fn script(&self, body: &str) -> String {
        let log = shell_quote(&self.path.to_string_lossy());
        format!(
            "echo \"$HIVE_TASK_ID $HIVE_ATTEMPT $HIVE_FENCE start\" >> {log} || exit 97\n\
             {body}\n\
             rc=$?\n\
             if [ $rc -eq 0 ]; then echo \"$HIVE_TASK_ID $HIVE_ATTEMPT $HIVE_FENCE done\" >> {log} || exit 98; fi\n\
             exit $rc\n"
        )
    }

    /// An `exec` task running [`ExecLog::script`] with `sh -c`.
    pub fn task(&self, body: &str) -> TaskSpec {
        crate::api::sh(&self.script(body))
    }

    /// Every line so far. Panics on a line it cannot parse (that would be a harness bug or
    /// a task that ran without the drone's environment).
    pub fn entries(&self) -> Vec<Entry> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("cannot read exec log {}: {e}", self.path.display()),
        };
        text.lines()
            .map(|l| parse_line(l).unwrap_or_else(|| panic!("bad exec log line {l:?} in:\n{text}")))
            .collect()
    }

    /// The entries grouped by task, in log order.
    pub fn by_task(&self) -> BTreeMap<TaskId, Vec<Entry>> {
        let mut out: BTreeMap<TaskId, Vec<Entry>> = BTreeMap::new();
        for e in self.entries() {
            out.entry(e.task).or_default().push(e);
        }
        out
    }

    /// How many times `task` started.
    pub fn starts(&self, task: TaskId) -> usize {
        self.entries()
            .iter()
            .filter(|e| e.task == task && e.phase == Phase::Start)
            .count()
    }

    /// The whole log, for failure messages.
    pub fn dump(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let mut parts = line.split_whitespace();
    let task = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let fence = parts.next()?.parse().ok()?;
    let phase = match parts.next()? {
        "start" => Phase::Start,
        "done" => Phase::Done,
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Entry {
        task,
        attempt,
        fence,
        phase,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_garbage_does_not() {
        let id = TaskId::generate();
        let e = parse_line(&format!("{id} 2 7 done")).expect("parses");
        assert_eq!(
            e,
            Entry {
                task: id,
                attempt: 2,
                fence: 7,
                phase: Phase::Done
            }
        );
        assert!(parse_line(&format!("{id}  start")).is_none());
        assert!(parse_line("x 1 1 start").is_none());
        assert!(parse_line(&format!("{id} 1 1 begin")).is_none());
    }

    #[test]
    fn the_script_logs_start_and_done_around_its_body() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ExecLog::new(dir.path().join("it's.log"));
        let id = TaskId::generate();
        let run = |body: &str| {
            std::process::Command::new("sh")
                .args(["-c", &log.script(body)])
                .env("HIVE_TASK_ID", id.to_string())
                .env("HIVE_ATTEMPT", "1")
                .env("HIVE_FENCE", "4")
                .status()
                .expect("sh runs")
        };
        assert!(run("true").success());
        assert_eq!(run("exit 3").code(), Some(3));
        let phases: Vec<Phase> = log.entries().into_iter().map(|e| e.phase).collect();
        assert_eq!(phases, vec![Phase::Start, Phase::Done, Phase::Start]);
        assert_eq!(log.starts(id), 2);
    }
}
