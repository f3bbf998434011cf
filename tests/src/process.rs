//! Child processes that can never outlive a test, their log files, and `/proc` checks.
//!
//! Every queen and drone a test starts is held by a [`Proc`]: dropping it (normally or while
//! a failed assertion unwinds) SIGKILLs and reaps the process. As a second line of defence
//! each child asks the kernel to SIGKILL it if the test thread that started it goes away
//! (`PR_SET_PDEATHSIG`), which covers a test binary that is itself killed.
//!
//! Each process logs to a file. The files of the processes alive on a test's thread are
//! registered here, so a failed wait (see [`crate::wait`]) or a failed assertion can print
//! the tail of every log without the test having to ask for it.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use hive_testkit::wait::poll_until;

/// How many lines of each log a failure prints (override with `HIVE_TEST_LOG_TAIL`).
const DEFAULT_LOG_TAIL: usize = 80;

thread_local! {
    /// `(registration id, label, log path)` of the processes started on this thread.
    static LOGS: RefCell<Vec<(u64, String, PathBuf)>> = const { RefCell::new(Vec::new()) };
    static NEXT_ID: Cell<u64> = const { Cell::new(0) };
    /// Set once this thread has printed the logs for a failure, so dropping each process
    /// while unwinding does not print them again.
    static DUMPED: Cell<bool> = const { Cell::new(false) };
}

/// A log file registered for failure dumps while this value lives.
#[derive(Debug)]
struct Registration(u64);

impl Registration {
    fn new(label: &str, path: &Path) -> Registration {
        // A wait that times out, or a fake drone that hears nothing, shows these logs.
        hive_testkit::wait::set_failure_context(dump_logs);
        let id = NEXT_ID.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        LOGS.with(|l| l.borrow_mut().push((id, label.to_owned(), path.to_owned())));
        Registration(id)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let id = self.0;
        let _ = LOGS.try_with(|l| l.borrow_mut().retain(|(i, _, _)| *i != id));
    }
}

fn log_tail_lines() -> usize {
    std::env::var("HIVE_TEST_LOG_TAIL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_LOG_TAIL)
}

/// The last `lines` lines of a file (or why it could not be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let skipped = all.len().saturating_sub(lines);
            let mut out = String::new();
            if skipped > 0 {
                out.push_str(&format!("  [... {skipped} earlier lines]\n"));
            }
            for line in &all[skipped..] {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("  [cannot read {}: {e}]\n", path.display()),
    }
}

/// The tail of every log registered on this thread (after the scenario's chaos seed, if
/// it has one), and marks them dumped.
pub fn dump_logs() -> String {
    DUMPED.with(|d| d.set(true));
    let n = log_tail_lines();
    LOGS.with(|l| {
        let mut out = String::new();
        if let Some(seed) = crate::seed::current() {
            out.push_str(&format!(
                "chaos seed: {seed} (replay with {}={seed})\n",
                crate::seed::SEED_VAR
            ));
        }
        for (_, label, path) in l.borrow().iter() {
            out.push_str(&format!(
                "----- {label} log ({}), last {n} lines -----\n",
                path.display()
            ));
            out.push_str(&tail(path, n));
        }
        out
    })
}

/// The lines of the log at `path` that contain `message` and every `key=value` field in
/// `fields` as a whole token (so `fence=3` does not match `fence=31`). A log that cannot be
/// read has no lines.
pub fn log_lines(path: &Path, message: &str, fields: &[(&str, String)]) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let tokens: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    text.lines()
        .filter(|l| {
            l.contains(message) && {
                let words: Vec<&str> = l.split_whitespace().collect();
                tokens.iter().all(|t| words.contains(&t.as_str()))
            }
        })
        .map(str::to_owned)
        .collect()
}

/// Where a child's stdout goes.
#[derive(Debug)]
pub enum Stdout {
    /// Into its log file, with stderr.
    Log,
    /// A pipe the caller reads (`Proc::child_mut().stdout`).
    Piped,
    /// This file.
    File(File),
}

/// A child process that is SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    label: String,
    log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
    _registration: Registration,
}

impl Proc {
    /// Starts `cmd` with stdin closed, stderr appended to `log`, stdout as `stdout` says,
    /// and a parent-death SIGKILL.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path, stdout: Stdout) -> Proc {
        let file = || {
            File::options()
                .create(true)
                .append(true)
                .open(log)
                .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()))
        };
        cmd.stdin(Stdio::null()).stderr(file());
        match stdout {
            Stdout::Log => cmd.stdout(file()),
            Stdout::Piped => cmd.stdout(Stdio::piped()),
            Stdout::File(f) => cmd.stdout(f),
        };
        // Logs go to files, not terminals: no colour codes.
        cmd.env("NO_COLOR", "1");
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        Proc {
            label: label.to_owned(),
            log: log.to_owned(),
            child,
            status: None,
            _registration: Registration::new(label, log),
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status, if the process has exited (it is reaped then).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.label));
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `sig` unless the process has already exited.
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.is_running() {
            signal(self.pid(), sig);
        }
    }

    /// `kill -9`, then reaps the process.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait()
    }

    /// Waits for the process to exit (it must be on its way out).
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.label));
        self.status = Some(status);
        status
    }

    /// Waits up to `within` for the process to exit on its own.
    pub fn wait_timeout(&mut self, within: Duration) -> Option<ExitStatus> {
        poll_until(within, || self.exit_status().ok_or(())).ok()
    }

    /// SIGTERM, then waits up to `within` for a graceful exit; panics (after a SIGKILL) if
    /// the process does not stop in time.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(within) {
            Some(status) => status,
            None => {
                self.kill9();
                panic!(
                    "{} did not exit within {within:?} of SIGTERM\n{}",
                    self.label,
                    dump_logs()
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            signal(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
        }
        if std::thread::panicking() && !DUMPED.with(Cell::get) {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.label,
                self.log.display(),
                tail(&self.log, log_tail_lines())
            );
        }
    }
}

/// Sends `sig` to `pid`. A process that is already gone is not an error.
pub fn signal(pid: i32, sig: libc::c_int) {
    assert!(pid > 1, "refusing to signal pid {pid}");
    // SAFETY: kill(2) has no memory effects; the pid is a single positive process id.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ESRCH),
            "kill({pid}, {sig}) failed: {err}"
        );
    }
}

/// Pins every thread of `pid` to one CPU (the lowest this test process may use): a host
/// with a single CPU, where the order in which a resumed process's threads run is decided
/// by the scheduler rather than by which core is free. Threads it starts later inherit it.
pub fn pin_to_one_cpu(pid: i32) {
    // SAFETY: cpu_set_t is plain data; the calls get and set masks of the size given.
    let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    let rc = unsafe { libc::sched_getaffinity(0, size, &mut mine) };
    assert_eq!(rc, 0, "sched_getaffinity: {}", io::Error::last_os_error());
    let cpu = (0..libc::CPU_SETSIZE as usize)
        .find(|c| unsafe { libc::CPU_ISSET(*c, &mine) })
        .expect("this process may run on some CPU");
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut one) };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("cannot list the threads of {pid}: {e}"));
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: as above; a thread that exited meanwhile is not an error.
        let rc = unsafe { libc::sched_setaffinity(tid, size, &one) };
        let err = io::Error::last_os_error();
        assert!(
            rc == 0 || err.raw_os_error() == Some(libc::ESRCH),
            "sched_setaffinity({tid}): {err}"
        );
    }
}

/// Seconds since boot from `/proc/uptime`: the clock the execution log's lines carry (see
/// [`crate::execlog`]), so the harness can tell what a task wrote after a drone died.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/uptime holds seconds since boot")
}

/// Whether `pid` names a live process: `/proc/<pid>` exists and its state is not zombie
/// (`Z`) or dead (`X`). A zombie has stopped running; it only waits for a parent to reap it.
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state ...`; comm may hold spaces and parentheses, so split at the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

/// The process state letter of `pid` (`R`, `S`, `T` for stopped, …), if it exists.
pub fn pid_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}
