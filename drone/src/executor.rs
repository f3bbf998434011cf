//! The task kinds this drone runs (`echo`, `exec`) and how an attempt's end becomes an
//! outcome. Deciding the outcome is pure (unit-tested); running processes is at the edge.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use shared::protocol::{Assign, Held, TaskComplete, TaskFailed};
use shared::Fence;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::awake::sleep_until_opt;
use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::env::{
    ATTEMPT_ENV, CHECKPOINT_FILE_ENV, FENCE_ENV, INPUT_FILE_ENV, RESULT_FILE_ENV, TASK_ID_ENV,
};
use crate::kind::Kind;
use crate::outbox::Outcome;
use crate::policy::Policy;
use crate::process::{Launch, ProcessGroup, SpawnError, Spawner, Started, Supervised};
use crate::workdir::{sandboxed_cwd, WorkDir};

/// How long the drone keeps reading a task's output after its process group is gone. Only
/// a process that escaped the group (`setsid`) can still hold the pipes open then; the
/// result must not wait for it.
pub const PIPE_DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// How many bytes a read from a task's pipe takes at once.
const READ_CHUNK: usize = 8 * 1024;

/// Why the drone stops a running task before it ends by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The queen cancelled the task.
    Cancelled(String),
    /// The drone is shutting down and can wait no longer.
    Shutdown,
    /// The queen leased the same task to this drone again under a newer fence, so this
    /// attempt's lease is gone.
    Superseded(Fence),
}

/// What an exec task's payload says to run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Exit codes by which the task says retrying cannot help: the task fails at once.
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
    /// JSON for the task: on its stdin, and in the file `HIVE_INPUT_FILE` names.
    #[serde(default)]
    pub input: Option<Value>,
}

impl ExecSpec {
    /// Reads an exec payload, naming what is wrong with a bad one.
    pub fn parse(payload: &Value) -> Result<Self, String> {
        let spec = ExecSpec::deserialize(payload).map_err(|e| {
            format!(
                "invalid exec payload: {e} (expected {{\"cmd\": [\"prog\", \"arg\", ...], \
                 \"env\": {{\"K\": \"V\"}}, \"cwd\": \"dir\", \"permanent_exit_codes\": [2]}})"
            )
        })?;
        if spec.cmd.is_empty() {
            return Err("invalid exec payload: `cmd` must name a program, got []".to_owned());
        }
        if spec.cmd[0].is_empty() {
            return Err("invalid exec payload: `cmd[0]` (the program) is empty".to_owned());
        }
        // The OS cannot pass these; caught here they are the payload's fault (permanent),
        // not a spawn failure that retrying might fix.
        let has_nul = |s: &str| s.contains('\0');
        if let Some(arg) = spec.cmd.iter().find(|a| has_nul(a)) {
            return Err(format!(
                "invalid exec payload: `cmd` argument {arg:?} contains a NUL byte"
            ));
        }
        for (key, value) in &spec.env {
            if key.is_empty() || key.contains('=') || has_nul(key) || has_nul(value) {
                return Err(format!(
                    "invalid exec payload: env variable {key:?} must be a non-empty name \
                     without `=` or NUL, with a value without NUL"
                ));
            }
        }
        if let Some(cwd) = &spec.cwd {
            if cwd.as_os_str().as_encoded_bytes().contains(&0) {
                return Err("invalid exec payload: `cwd` contains a NUL byte".to_owned());
            }
        }
        Ok(spec)
    }
}

/// At most `cap` bytes of a stream, and how many more there were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    cap: usize,
    kept: Vec<u8>,
    dropped: u64,
}

impl Capture {
    pub fn new(cap: usize) -> Self {
        Capture {
            cap,
            kept: Vec::new(),
            dropped: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        let take = room.min(bytes.len());
        self.kept.extend_from_slice(&bytes[..take]);
        self.dropped += (bytes.len() - take) as u64;
    }

    /// Reads `pipe` to its end, keeping what fits. Reading past the cap keeps the pipe
    /// flowing: a task blocked on a full pipe would otherwise hang until it timed out.
    pub async fn fill(&mut self, mut pipe: impl AsyncRead + Unpin) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => self.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read a task's output");
                    break;
                }
            }
        }
    }

    /// The text for the result: lossy UTF-8, with a note when bytes were cut.
    pub fn into_text(self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!("\n[truncated {} bytes]", self.dropped));
        }
        text
    }
}

/// How the supervised process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The drone could not learn the status (waiting failed).
    Unknown,
}

impl From<std::io::Result<ExitStatus>> for Exit {
    fn from(status: std::io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Unknown,
            },
            Err(_) => Exit::Unknown,
        }
    }
}

/// Why an exec attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The command ended by itself.
    Exited,
    /// It ran past the assignment's `timeout_ms`.
    TimedOut { timeout_ms: u64 },
    /// The drone stopped it.
    Stopped(StopReason),
}

/// A successful attempt that wrote its result file has that JSON as its result (instead of
/// its exit code and output). A result file that cannot be read, is too large or is not
/// JSON fails the attempt for good (the task finished; running it again writes the same);
/// a failed attempt keeps its outcome whatever the file holds.
pub fn with_result_file(
    outcome: Outcome,
    written: std::io::Result<Option<Vec<u8>>>,
    max_bytes: usize,
) -> Outcome {
    let Outcome::Complete(mut done) = outcome else {
        return outcome;
    };
    let problem = match written {
        Ok(None) => return Outcome::Complete(done),
        Ok(Some(bytes)) if bytes.len() > max_bytes => {
            format!("the task's result file is larger than {max_bytes} bytes")
        }
        Ok(Some(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(value) => {
                done.result = value;
                return Outcome::Complete(done);
            }
            Err(e) => format!("the task's result file is not JSON: {e}"),
        },
        Err(e) => format!("could not read the task's result file: {e}"),
    };
    Outcome::Failed(TaskFailed {
        task_id: done.task_id,
        fence: done.fence,
        error: problem,
        result: Some(done.result),
        retryable: false,
    })
}

/// The error of an attempt that ran past its timeout, and whether to retry it.
pub fn timed_out(timeout_ms: u64) -> (String, bool) {
    (format!("timed out after {timeout_ms} ms"), true)
}

/// The error of an attempt the drone stopped, and whether to retry it: a cancel is final,
/// a shutdown or a superseded lease is not the task's fault.
pub fn stopped(reason: &StopReason) -> (String, bool) {
    match reason {
        StopReason::Cancelled(reason) => (format!("cancelled: {reason}"), false),
        StopReason::Shutdown => ("drone shutting down".to_owned(), true),
        StopReason::Superseded(fence) => {
            (format!("superseded by a newer lease (fence {fence})"), true)
        }
    }
}

/// The pure rule from how an exec attempt ended to the outcome the queen gets.
pub fn exec_outcome(
    held: Held,
    ending: &Ending,
    exit: Exit,
    permanent_exit_codes: &[i32],
    stdout: Capture,
    stderr: Capture,
) -> Outcome {
    let mut result = json!({
        "exit_code": match exit { Exit::Code(c) => Value::from(c), _ => Value::Null },
        "stdout": stdout.into_text(),
        "stderr": stderr.into_text(),
    });
    if let (Exit::Signal(sig), Some(obj)) = (exit, result.as_object_mut()) {
        obj.insert("signal".to_owned(), Value::from(sig));
    }
    let (error, retryable) = match ending {
        Ending::TimedOut { timeout_ms } => timed_out(*timeout_ms),
        Ending::Stopped(reason) => stopped(reason),
        Ending::Exited => match exit {
            Exit::Code(0) => {
                return Outcome::Complete(TaskComplete {
                    task_id: held.task_id,
                    fence: held.fence,
                    result,
                })
            }
            Exit::Code(code) if permanent_exit_codes.contains(&code) => {
                (format!("exit code {code} (permanent: no retry)"), false)
            }
            Exit::Code(code) => (format!("exit code {code}"), true),
            Exit::Signal(sig) => (format!("killed by signal {sig}"), true),
            Exit::Unknown => ("the drone lost track of the process".to_owned(), true),
        },
    };
    Outcome::Failed(TaskFailed {
        task_id: held.task_id,
        fence: held.fence,
        error,
        result: Some(result),
        retryable,
    })
}

/// What every task execution needs from the drone.
#[derive(Debug)]
pub struct Executor {
    /// Where running tasks keep their checkpoint files.
    pub checkpoints: Checkpoints,
    pub(crate) spawner: Spawner,
    max_output_bytes: usize,
    pub(crate) kill_grace: Duration,
    /// What tasks may do on this host, checked before anything is spawned.
    pub(crate) policy: Policy,
}

/// An exec attempt ready to start: everything the payload asked for, checked against the
/// policy.
#[derive(Debug)]
struct Prepared {
    /// Where the command starts; `None` for the drone's own directory.
    cwd: Option<PathBuf>,
    /// The input file (also the task's stdin), when the payload has `input`.
    input: Option<PathBuf>,
    /// Where the task may write its result.
    result: PathBuf,
    env: BTreeMap<String, OsString>,
    /// The program to start: as named, or the path the allowlist approved.
    program: OsString,
    /// `cmd[0]` as the task gave it, when `program` is a resolved path.
    arg0: Option<String>,
}

impl Executor {
    pub fn new(config: &Config, spawner: Spawner, mut checkpoints: Checkpoints) -> Arc<Self> {
        if let Some(user) = &config.policy.run_as {
            // Tasks write their checkpoint files as that user.
            if let Err(e) = checkpoints.hand_to(user) {
                tracing::error!(user = %user.name, error = %e, "could not give the checkpoint directory to the task user; tasks cannot write checkpoints");
            }
        }
        Arc::new(Executor {
            checkpoints,
            spawner,
            max_output_bytes: config.max_output_bytes,
            kill_grace: config.kill_grace,
            policy: config.policy.clone(),
        })
    }

    /// The outcome of a kind that needs no process, or `None` when the kind runs a
    /// process (exec): then [`Executor::run_exec`] runs it. A kind outside `policy` fails
    /// permanently whatever the queen thought this drone runs.
    pub fn immediate(policy: &Policy, assign: &Assign) -> Option<Outcome> {
        let held = Held {
            task_id: assign.task_id,
            fence: assign.fence,
        };
        if let Err(refused) = policy.check_kind(&assign.kind) {
            return Some(Outcome::failed(held, refused, false));
        }
        match Kind::from_name(&assign.kind) {
            Some(Kind::Echo) => Some(Outcome::Complete(TaskComplete {
                task_id: assign.task_id,
                fence: assign.fence,
                result: assign.payload.clone(),
            })),
            Some(Kind::Exec) => None,
            None => Some(Outcome::failed(
                held,
                format!("kind {} is not supported by this drone", assign.kind),
                false,
            )),
        }
    }

    /// Runs one exec attempt to its end and says how it went. `stop` asks it to end early.
    pub async fn run_exec(&self, assign: Assign, stop: oneshot::Receiver<StopReason>) -> Outcome {
        let held = Held {
            task_id: assign.task_id,
            fence: assign.fence,
        };
        let spec = match ExecSpec::parse(&assign.payload) {
            Ok(spec) => spec,
            Err(e) => return Outcome::failed(held, e, false),
        };
        let Some(root) = &self.policy.work_root else {
            return self.run_prepared(&assign, &spec, None, stop).await;
        };
        let name = format!("{}-{}", held.task_id, held.fence);
        let work = match WorkDir::create(root, &name, self.policy.run_as.as_ref()) {
            Ok(work) => work,
            Err(e) => {
                return Outcome::failed(
                    held,
                    format!(
                        "could not create the task's directory under {}: {e}",
                        root.display()
                    ),
                    true,
                )
            }
        };
        let outcome = self.run_prepared(&assign, &spec, Some(&work), stop).await;
        // The process group is dead by now, so nothing is still writing in there.
        work.remove().await;
        outcome
    }

    /// Checks the payload against the policy and works out the command's directory,
    /// environment and program. An error is the attempt's outcome.
    fn prepare(
        &self,
        assign: &Assign,
        spec: &ExecSpec,
        work: Option<&WorkDir>,
    ) -> Result<Prepared, Outcome> {
        let held = Held {
            task_id: assign.task_id,
            fence: assign.fence,
        };
        let refuse = |error: String| Outcome::failed(held, error, false);
        let cwd = match work {
            Some(work) => {
                let inside = sandboxed_cwd(spec.cwd.as_deref()).map_err(refuse)?;
                let cwd = work
                    .make_cwd(&inside, self.policy.run_as.as_ref())
                    .map_err(|e| {
                        Outcome::failed(
                            held,
                            format!(
                                "could not create the task's cwd `{}`: {e}",
                                inside.display()
                            ),
                            true,
                        )
                    })?;
                Some(cwd)
            }
            None => {
                if let Some(cwd) = spec.cwd.as_ref().filter(|c| !c.is_dir()) {
                    return Err(refuse(format!(
                        "invalid exec payload: cwd `{}` is not a directory",
                        cwd.display()
                    )));
                }
                spec.cwd.clone()
            }
        };
        self.policy.check_payload_env(&spec.env).map_err(refuse)?;
        let result = self.checkpoints.io_path(held, "result");
        let _ = std::fs::remove_file(&result);
        let input = match &spec.input {
            None => None,
            Some(value) => {
                let path = self.checkpoints.io_path(held, "input");
                self.checkpoints
                    .write_for_task(&path, value.to_string().as_bytes())
                    .map_err(|e| {
                        Outcome::failed(
                            held,
                            format!("could not write the task's input file: {e}"),
                            true,
                        )
                    })?;
                Some(path)
            }
        };
        let mut lease = vec![
            (TASK_ID_ENV, OsString::from(assign.task_id.to_string())),
            (ATTEMPT_ENV, OsString::from(assign.attempt.to_string())),
            (FENCE_ENV, OsString::from(assign.fence.to_string())),
            (
                CHECKPOINT_FILE_ENV,
                self.checkpoints.path(held).into_os_string(),
            ),
            (RESULT_FILE_ENV, result.clone().into_os_string()),
        ];
        if let Some(path) = &input {
            lease.push((INPUT_FILE_ENV, path.clone().into_os_string()));
        }
        let env = self
            .policy
            .task_env(work.map(WorkDir::path), &spec.env, &lease, |name: &str| {
                std::env::var_os(name)
            });
        // A relative program is found from where the command will start; with no cwd
        // that is the drone's own directory, which the empty path resolves against.
        let base = cwd.as_deref().unwrap_or(Path::new(""));
        let named = &spec.cmd[0];
        let resolved = self
            .policy
            .allowed_program(named, base, env.get("PATH").map(OsString::as_os_str))
            .map_err(refuse)?;
        let (program, arg0) = match resolved {
            Some(path) => (path.into_os_string(), Some(named.clone())),
            None => (OsString::from(named), None),
        };
        Ok(Prepared {
            cwd,
            input,
            result,
            env,
            program,
            arg0,
        })
    }

    /// Runs a parsed exec attempt (in `work`, if the policy gives it one) to its end.
    async fn run_prepared(
        &self,
        assign: &Assign,
        spec: &ExecSpec,
        work: Option<&WorkDir>,
        stop: oneshot::Receiver<StopReason>,
    ) -> Outcome {
        let held = Held {
            task_id: assign.task_id,
            fence: assign.fence,
        };
        let prepared = match self.prepare(assign, spec, work) {
            Ok(p) => p,
            Err(outcome) => return outcome,
        };
        let stdin = match &prepared.input {
            // The input, when there is one, is also the task's stdin (read from the file,
            // so a task that never reads it blocks nothing).
            Some(path) => match std::fs::File::open(path) {
                Ok(file) => Some(file.into()),
                Err(e) => {
                    return Outcome::failed(
                        held,
                        format!("could not open the input file: {e}"),
                        true,
                    )
                }
            },
            None => None,
        };
        let launch = Launch {
            program: OsStr::new(&prepared.program),
            arg0: prepared.arg0.as_deref(),
            args: &spec.cmd[1..],
            env: &prepared.env,
            identity: self.policy.run_as.as_ref(),
            cwd: prepared.cwd.as_deref(),
        };
        let Started {
            mut child,
            stdout: out_pipe,
            stderr: err_pipe,
        } = match self.spawner.spawn(&launch, stdin, None).await {
            Ok(started) => started,
            Err(e @ SpawnError::NotStarted { .. }) => {
                return Outcome::failed(held, e.to_string(), false)
            }
            Err(e @ SpawnError::Drone(_)) => return Outcome::failed(held, e.to_string(), true),
        };
        let group = child.group();
        tracing::debug!(pgid = group.id(), "task process started");

        let mut stdout = Capture::new(self.max_output_bytes);
        let mut stderr = Capture::new(self.max_output_bytes);
        let exited = CancellationToken::new();

        let read_output = async {
            let drain = async { tokio::join!(stdout.fill(out_pipe), stderr.fill(err_pipe),) };
            tokio::select! {
                _ = drain => {}
                _ = async { exited.cancelled().await; tokio::time::sleep(PIPE_DRAIN_AFTER_EXIT).await } => {
                    tracing::warn!("a process outside the task's group still holds its output open; result cut short");
                }
            }
        };
        let supervise = async {
            let ending = self
                .wait_or_stop(&mut child, group, assign.timeout_ms, stop)
                .await;
            let exit = Exit::from(child.wait().await);
            // The command is done: whatever it left behind in its group (`cmd &`) is an
            // orphan of a finished attempt. Killing it also closes the output pipes.
            group.signal(libc::SIGKILL);
            exited.cancel();
            (ending, exit)
        };
        let ((), (ending, exit)) = tokio::join!(read_output, supervise);
        let outcome = exec_outcome(
            held,
            &ending,
            exit,
            &spec.permanent_exit_codes,
            stdout,
            stderr,
        );
        let written = self
            .checkpoints
            .read_from_task(&prepared.result, self.max_output_bytes);
        if let Some(input) = &prepared.input {
            let _ = std::fs::remove_file(input);
        }
        let _ = std::fs::remove_file(&prepared.result);
        with_result_file(outcome, written, self.max_output_bytes)
    }

    /// Waits for the process to end by itself, or ends it: at the timeout or on a stop
    /// request, SIGTERM to the group, then SIGKILL after the grace (at once for shutdown).
    async fn wait_or_stop(
        &self,
        child: &mut Supervised,
        group: ProcessGroup,
        timeout_ms: Option<u64>,
        stop: oneshot::Receiver<StopReason>,
    ) -> Ending {
        let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        // A dropped sender means nobody will ask us to stop, not a request to stop.
        let stop = async {
            match stop.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            }
        };
        let ending = tokio::select! {
            _ = child.wait() => return Ending::Exited,
            _ = sleep_until_opt(deadline) => Ending::TimedOut { timeout_ms: timeout_ms.unwrap_or(0) },
            reason = stop => Ending::Stopped(reason),
        };
        match &ending {
            Ending::TimedOut { timeout_ms } => {
                tracing::warn!(timeout_ms, pgid = group.id(), "task timed out; stopping it");
            }
            Ending::Stopped(reason) => {
                tracing::info!(?reason, pgid = group.id(), "stopping task");
            }
            Ending::Exited => {}
        }
        match &ending {
            Ending::Stopped(StopReason::Shutdown) => group.signal(libc::SIGKILL),
            _ => {
                group.signal(libc::SIGTERM);
                if tokio::time::timeout(self.kill_grace, child.wait())
                    .await
                    .is_err()
                {
                    tracing::info!(
                        pgid = group.id(),
                        "task outlived its grace period; killing it"
                    );
                }
                group.signal(libc::SIGKILL);
            }
        }
        ending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::TaskId;

    fn held() -> Held {
        Held {
            task_id: TaskId::generate(),
            fence: Fence(3),
        }
    }

    fn capture(text: &str, cap: usize) -> Capture {
        let mut c = Capture::new(cap);
        c.push(text.as_bytes());
        c
    }

    #[test]
    fn output_past_the_cap_is_counted_and_marked() {
        let mut c = Capture::new(5);
        c.push(b"hel");
        c.push(b"lo world");
        assert_eq!(c.into_text(), "hello\n[truncated 6 bytes]");
        assert_eq!(capture("short", 64).into_text(), "short");
        assert_eq!(capture("", 0).into_text(), "");
        assert_eq!(capture("x", 0).into_text(), "\n[truncated 1 bytes]");
    }

    #[test]
    fn invalid_utf8_output_is_kept_lossily() {
        let mut c = Capture::new(64);
        c.push(b"ok \xff\xfe end");
        assert_eq!(c.into_text(), "ok \u{fffd}\u{fffd} end");
    }

    #[test]
    fn exit_zero_completes_with_code_and_output() {
        let h = held();
        let out = exec_outcome(
            h,
            &Ending::Exited,
            Exit::Code(0),
            &[],
            capture("hi\n", 64),
            capture("", 64),
        );
        assert_eq!(
            out,
            Outcome::Complete(TaskComplete {
                task_id: h.task_id,
                fence: h.fence,
                result: json!({"exit_code": 0, "stdout": "hi\n", "stderr": ""}),
            })
        );
    }

    fn failure(out: Outcome) -> TaskFailed {
        match out {
            Outcome::Failed(f) => f,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_nonzero_exit_is_a_retryable_failure_with_the_result() {
        let f = failure(exec_outcome(
            held(),
            &Ending::Exited,
            Exit::Code(3),
            &[],
            capture("", 8),
            capture("oops", 8),
        ));
        assert_eq!(f.error, "exit code 3");
        assert!(f.retryable);
        assert_eq!(
            f.result,
            Some(json!({"exit_code": 3, "stdout": "", "stderr": "oops"}))
        );
    }

    #[test]
    fn a_signal_death_has_no_exit_code() {
        let f = failure(exec_outcome(
            held(),
            &Ending::Exited,
            Exit::Signal(9),
            &[],
            capture("", 8),
            capture("", 8),
        ));
        assert_eq!(f.error, "killed by signal 9");
        let result = f.result.unwrap_or_default();
        assert_eq!(result["exit_code"], Value::Null);
        assert_eq!(result["signal"], 9);
    }

    #[test]
    fn timeouts_cancels_and_shutdowns_say_why() {
        let cases = [
            (
                Ending::TimedOut { timeout_ms: 250 },
                "timed out after 250 ms",
                true,
            ),
            (
                Ending::Stopped(StopReason::Cancelled("by ops".into())),
                "cancelled: by ops",
                false,
            ),
            (
                Ending::Stopped(StopReason::Shutdown),
                "drone shutting down",
                true,
            ),
        ];
        for (ending, error, retryable) in cases {
            let f = failure(exec_outcome(
                held(),
                &ending,
                Exit::Signal(15),
                &[],
                capture("", 8),
                capture("", 8),
            ));
            assert_eq!((f.error.as_str(), f.retryable), (error, retryable));
            assert!(f.result.is_some(), "output so far is kept");
        }
    }

    #[test]
    fn exec_payload_problems_are_named() {
        let cases = [
            (json!(null), "invalid exec payload"),
            (json!({}), "cmd"),
            (json!({"cmd": []}), "cmd"),
            (json!({"cmd": "ls -l"}), "expected a sequence"),
            (json!({"cmd": ["ls", 3]}), "expected a string"),
            (json!({"cmd": ["ls"], "evn": {}}), "evn"),
            (json!({"cmd": ["ls"], "env": {"A": 1}}), "expected a string"),
            (json!({"cmd": [""]}), "program"),
            (json!({"cmd": ["ls", "a\0b"]}), "NUL"),
            (json!({"cmd": ["ls"], "env": {"A=B": "1"}}), "A=B"),
            (json!({"cmd": ["ls"], "env": {"": "1"}}), "env variable"),
            (json!({"cmd": ["ls"], "cwd": "/tmp\0"}), "cwd"),
        ];
        for (payload, needle) in cases {
            match ExecSpec::parse(&payload) {
                Ok(spec) => panic!("{payload} was accepted as {spec:?}"),
                Err(e) => assert!(e.contains(needle), "{payload}: `{e}` lacks `{needle}`"),
            }
        }
        let ok = ExecSpec::parse(&json!({"cmd": ["ls", "-l"], "env": {"A": "1"}, "cwd": "/tmp"}));
        assert_eq!(
            ok,
            Ok(ExecSpec {
                cmd: vec!["ls".into(), "-l".into()],
                env: [("A".to_owned(), "1".to_owned())].into(),
                cwd: Some(PathBuf::from("/tmp")),
                permanent_exit_codes: vec![],
                input: None,
            })
        );
    }

    #[test]
    fn a_result_file_replaces_the_output_only_when_the_attempt_succeeded_and_it_is_json() {
        let held = Held {
            task_id: shared::TaskId::generate(),
            fence: shared::Fence(1),
        };
        let done = || {
            Outcome::Complete(TaskComplete {
                task_id: held.task_id,
                fence: held.fence,
                result: json!({"exit_code": 0}),
            })
        };
        let result = |o: Outcome| match o {
            Outcome::Complete(c) => Ok(c.result),
            Outcome::Failed(f) => Err((f.error, f.retryable)),
        };
        assert_eq!(
            result(with_result_file(done(), Ok(None), 10)),
            Ok(json!({"exit_code": 0}))
        );
        assert_eq!(
            result(with_result_file(done(), Ok(Some(b"[1,2]".to_vec())), 10)),
            Ok(json!([1, 2]))
        );
        let too_big = result(with_result_file(done(), Ok(Some(vec![b'1'; 11])), 10));
        assert!(
            matches!(&too_big, Err((e, false)) if e.contains("larger than 10")),
            "{too_big:?}"
        );
        let unreadable = result(with_result_file(
            done(),
            Err(std::io::Error::other("not a regular file")),
            10,
        ));
        assert!(matches!(&unreadable, Err((e, false)) if e.contains("not a regular file")));
        // A failed attempt stays failed with its own error, whatever the file says.
        let failed = Outcome::failed(held, "exit code 3", true);
        let kept = result(with_result_file(failed, Ok(Some(b"{}".to_vec())), 10));
        assert_eq!(kept, Err(("exit code 3".to_owned(), true)));
    }

    #[test]
    fn unknown_kinds_fail_permanently_and_echo_returns_its_payload() {
        let mut assign = Assign {
            task_id: TaskId::generate(),
            fence: Fence(1),
            attempt: 1,
            kind: "teleport".into(),
            queue: "default".into(),
            payload: json!({"x": 1}),
            timeout_ms: None,
            checkpoint: None,
        };
        let policy = Policy::default();
        let f =
            failure(Executor::immediate(&policy, &assign).unwrap_or_else(|| panic!("no outcome")));
        assert_eq!(f.error, "kind teleport is not supported by this drone");
        assert!(!f.retryable);

        assign.kind = Kind::Echo.name().into();
        match Executor::immediate(&policy, &assign) {
            Some(Outcome::Complete(c)) => assert_eq!(c.result, json!({"x": 1})),
            other => panic!("echo gave {other:?}"),
        }
        assign.kind = Kind::Exec.name().into();
        assert!(Executor::immediate(&policy, &assign).is_none());
    }

    #[test]
    fn a_kind_outside_the_policy_fails_permanently_even_if_the_queen_sends_it() {
        let policy = Policy {
            kinds: vec![Kind::Echo.name().to_owned()],
            ..Policy::default()
        };
        let assign = Assign {
            task_id: TaskId::generate(),
            fence: Fence(1),
            attempt: 1,
            kind: Kind::Exec.name().into(),
            queue: "default".into(),
            payload: json!({"cmd": ["true"]}),
            timeout_ms: None,
            checkpoint: None,
        };
        let f =
            failure(Executor::immediate(&policy, &assign).unwrap_or_else(|| panic!("no outcome")));
        assert!(f.error.contains("kind exec is not allowed"), "{}", f.error);
        assert!(!f.retryable);
    }

    #[test]
    fn a_permanent_exit_code_is_not_retried() {
        let f = failure(exec_outcome(
            held(),
            &Ending::Exited,
            Exit::Code(3),
            &[3, 4],
            Capture::new(8),
            Capture::new(8),
        ));
        assert!(!f.retryable);
        assert!(f.error.contains("permanent"), "{}", f.error);
        let f = failure(exec_outcome(
            held(),
            &Ending::Exited,
            Exit::Code(5),
            &[3, 4],
            Capture::new(8),
            Capture::new(8),
        ));
        assert!(f.retryable);
    }
}
