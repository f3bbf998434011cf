//! Counting real executions: `exec` tasks wrapped so that each run appends a `start` line
//! (and a `done` line when its body finished) to a shared log file, tagged with the task id,
//! attempt and fence the drone gave it, the task's own pid, the pid of the drone that runs
//! it (the parent of the drone's supervisor, which is the task's parent) and the time (seconds
//! since boot, from `/proc/uptime`, the clock [`crate::process::uptime`] reads). A body can
//! also log a `child` line for a process it starts ([`ExecLog::child`]), so a checker can
//! make sure no process of a task outlives its drone — neither still running at the end
//! nor writing a line after its drone died.
//!
//! One short `echo ... >> file` is a single `write(2)` on an `O_APPEND` file, so lines from
//! concurrent tasks never interleave. Only what a process really ran is in the log: this is
//! how a scenario tells "the queen says once" from "it ran once".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shared::api::TaskSpec;
use shared::TaskId;

/// The shell variable [`ExecLog::script`] sets to the pid of the drone running the task,
/// for bodies that need it (e.g. a poison task that kills its drone).
pub const DRONE_PID_VAR: &str = "hive_drone_pid";

/// Which event of a run a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Start,
    Done,
    /// The body started a process (its pid is the line's `pid`).
    Child,
}

/// One line of the execution log.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub task: TaskId,
    pub attempt: u32,
    pub fence: u64,
    pub phase: Phase,
    /// The task's shell (`start`, `done`) or the child it started (`child`).
    pub pid: Option<i32>,
    /// The drone running the task.
    pub drone_pid: Option<i32>,
    /// When the line was written, in seconds since boot (10 ms resolution).
    pub at: Option<f64>,
}

/// Everything the log says about one run: one task under one fence.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub task: TaskId,
    pub fence: u64,
    pub attempt: u32,
    /// How many `start` lines this fence has: more than one is one lease run twice.
    pub starts: usize,
    /// Position of the first `start` line in the log (lines are in write order).
    pub started_at: usize,
    /// Position of the `done` line, if the body finished successfully.
    pub done_at: Option<usize>,
    /// The task's shell, then every child it logged.
    pub pids: Vec<i32>,
    pub drone_pid: Option<i32>,
    /// The latest line of the run: its phase and time (seconds since boot).
    pub last: Option<(Phase, f64)>,
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
    /// its exit status is `body`'s. The drone's pid is read from `/proc` (field 4 of the
    /// supervisor's `stat` is the supervisor's parent) into [`DRONE_PID_VAR`]; times come from
    /// `/proc/uptime` with the shell's own `read`, so logging starts no process.
    pub fn script(&self, body: &str) -> String {
        let log = shell_quote(&self.path.to_string_lossy());
        let tag = "$HIVE_TASK_ID $HIVE_ATTEMPT $HIVE_FENCE";
        let d = DRONE_PID_VAR;
        format!(
            "read -r _ _ _ {d} _ < /proc/$PPID/stat || {d}=0\n\
             read -r hive_up _ < /proc/uptime\n\
             echo \"{tag} start $$ ${d} $hive_up\" >> {log} || exit 97\n\
             {body}\n\
             rc=$?\n\
             read -r hive_up _ < /proc/uptime\n\
             if [ $rc -eq 0 ]; then echo \"{tag} done $$ ${d} $hive_up\" >> {log} || exit 98; fi\n\
             exit $rc\n"
        )
    }

    /// A body fragment that starts `cmd` in the background, logs its pid as a `child`
    /// line, and waits for it (the fragment's status is `cmd`'s).
    pub fn child(&self, cmd: &str) -> String {
        let log = shell_quote(&self.path.to_string_lossy());
        format!(
            "{cmd} &\n\
             read -r hive_up _ < /proc/uptime\n\
             echo \"$HIVE_TASK_ID $HIVE_ATTEMPT $HIVE_FENCE child $! ${DRONE_PID_VAR} $hive_up\" >> {log}\n\
             wait $!"
        )
    }

    /// An `exec` task running [`ExecLog::script`] with `sh -c`.
    pub fn task(&self, body: &str) -> TaskSpec {
        crate::api::sh(&self.script(body))
    }

    /// Every line so far. Panics on a line it cannot parse (that would be a harness bug or
    /// a task that ran without the drone's environment). A last line without its newline
    /// is one being written as the log is read, and is left for the next read.
    pub fn entries(&self) -> Vec<Entry> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("cannot read exec log {}: {e}", self.path.display()),
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
        complete
            .lines()
            .map(|l| {
                parse_line(l)
                    .unwrap_or_else(|| panic!("bad exec log line {l:?} in {}", self.path.display()))
            })
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

    /// Every run in the log, grouped by (task, fence), in order of first start.
    pub fn executions(&self) -> Vec<Execution> {
        executions(&self.entries())
    }

    /// How many times `task` started.
    pub fn starts(&self, task: TaskId) -> usize {
        self.entries()
            .iter()
            .filter(|e| e.task == task && e.phase == Phase::Start)
            .count()
    }

    /// The lines about `task`, for failure messages.
    pub fn lines_of(&self, task: TaskId) -> String {
        let id = task.to_string();
        self.dump()
            .lines()
            .filter(|l| l.starts_with(&id))
            .map(|l| format!("  {l}\n"))
            .collect()
    }

    /// The whole log, for failure messages.
    pub fn dump(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

/// Groups log entries into runs (see [`Execution`]). A `child` or `done` line without a
/// `start` still makes a run (its start line is then counted as 0).
pub fn executions(entries: &[Entry]) -> Vec<Execution> {
    let mut runs: BTreeMap<(TaskId, u64), Execution> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let run = runs.entry((e.task, e.fence)).or_insert_with(|| Execution {
            task: e.task,
            fence: e.fence,
            attempt: e.attempt,
            starts: 0,
            started_at: i,
            done_at: None,
            pids: Vec::new(),
            drone_pid: e.drone_pid,
            last: None,
        });
        if let Some(at) = e.at {
            match run.last {
                Some((_, t)) if t > at => {}
                _ => run.last = Some((e.phase, at)),
            }
        }
        match e.phase {
            Phase::Start => {
                if run.starts == 0 {
                    run.started_at = i;
                }
                run.starts += 1;
                if let Some(pid) = e.pid {
                    if !run.pids.contains(&pid) {
                        run.pids.insert(0, pid);
                    }
                }
            }
            Phase::Done => run.done_at = Some(i),
            Phase::Child => run.pids.extend(e.pid),
        }
        if run.drone_pid.is_none() {
            run.drone_pid = e.drone_pid;
        }
    }
    let mut out: Vec<Execution> = runs.into_values().collect();
    out.sort_by_key(|r| r.started_at);
    out
}

fn parse_line(line: &str) -> Option<Entry> {
    let mut parts = line.split_whitespace();
    let task = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let fence = parts.next()?.parse().ok()?;
    let phase = match parts.next()? {
        "start" => Phase::Start,
        "done" => Phase::Done,
        "child" => Phase::Child,
        _ => return None,
    };
    // Pids are optional (a line written by hand may leave them out) but come in pairs,
    // optionally followed by the time.
    let (pid, drone_pid) = match (parts.next(), parts.next()) {
        (None, None) => (None, None),
        (Some(p), Some(d)) => (Some(p.parse().ok()?), Some(d.parse().ok()?)),
        _ => return None,
    };
    let at = match parts.next() {
        None => None,
        Some(t) if pid.is_some() => Some(t.parse().ok()?),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Entry {
        task,
        attempt,
        fence,
        phase,
        pid,
        drone_pid,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_garbage_does_not() {
        let id = TaskId::generate();
        let e = parse_line(&format!("{id} 2 7 done 4242 17 1234.56")).expect("parses");
        assert_eq!(
            e,
            Entry {
                task: id,
                attempt: 2,
                fence: 7,
                phase: Phase::Done,
                pid: Some(4242),
                drone_pid: Some(17),
                at: Some(1234.56),
            }
        );
        let no_time = parse_line(&format!("{id} 2 7 done 4242 17")).expect("time is optional");
        assert_eq!(no_time.at, None);
        let bare = parse_line(&format!("{id} 1 3 start")).expect("pids are optional");
        assert_eq!((bare.pid, bare.drone_pid), (None, None));
        assert!(parse_line(&format!("{id}  start")).is_none());
        assert!(parse_line("x 1 1 start").is_none());
        assert!(parse_line(&format!("{id} 1 1 begin")).is_none());
        assert!(parse_line(&format!("{id} 1 1 start 12")).is_none());
        assert!(parse_line(&format!("{id} 1 1 start 12 x")).is_none());
        assert!(parse_line(&format!("{id} 1 1 start 12 3 soon")).is_none());
    }

    #[test]
    fn the_script_logs_start_child_and_done_around_its_body() {
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
        assert!(run(&log.child("true")).success());
        assert_eq!(run("exit 3").code(), Some(3));
        let entries = log.entries();
        let phases: Vec<Phase> = entries.iter().map(|e| e.phase).collect();
        assert_eq!(
            phases,
            vec![Phase::Start, Phase::Child, Phase::Done, Phase::Start]
        );
        // Here the "supervisor" is this test process, so the "drone" is its parent.
        let me = std::process::id() as i32;
        assert!(entries.iter().all(|e| e.drone_pid.is_some_and(|d| d != me)));
        let now = crate::process::uptime();
        assert!(
            entries
                .iter()
                .all(|e| e.at.is_some_and(|t| t <= now && t > now - 60.0)),
            "every line is timed on the harness's clock: {entries:?}"
        );
        assert_eq!(log.starts(id), 2);
        let runs = executions(&entries);
        assert_eq!(runs.len(), 1, "one fence: one run (started twice) {runs:?}");
        assert_eq!(runs[0].starts, 2);
        assert_eq!(runs[0].pids.len(), 3, "two shells and a child: {runs:?}");
    }
}
