//! A real `queen` process: started on `127.0.0.1:0`, ready when it prints its `ready` line,
//! killed with `kill -9`, restarted on the same data dir and ports.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::Duration;

use crate::bins;
use crate::process::{dump_logs, tail, Proc, Stdout};
use crate::wait::poll_until;

/// How long a queen may take to open its store and print `ready`. Opening is milliseconds
/// when healthy; this only bounds a hung start on a loaded machine.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// How long a queen may take to stop after SIGTERM.
pub const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// Builds a `queen` command whose environment carries exactly the `HIVE_*` config we give
/// it: the test runner's own `HIVE_*` variables are removed so they cannot change a
/// scenario. `HIVE_TEST_RUST_LOG` sets the queen's log filter (default `info`).
pub fn command(env: &BTreeMap<String, String>, config: Option<&Path>) -> Command {
    let mut cmd = Command::new(bins::queen());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HIVE_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("HIVE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    cmd.envs(env);
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    cmd
}

/// The addresses from `ready drones=127.0.0.1:P http=127.0.0.1:Q`.
fn parse_ready(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("ready ")?;
    let mut drones = None;
    let mut http = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("drones=") {
            drones = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("http=") {
            http = v.parse().ok();
        }
    }
    Some((drones?, http?))
}

/// A queen process and everything needed to start it again the same way.
#[derive(Debug)]
pub struct QueenProc {
    data_dir: PathBuf,
    log: PathBuf,
    env: BTreeMap<String, String>,
    config: Option<PathBuf>,
    /// Where drones connect (fixed by the first start; restarts reuse it).
    pub drones_addr: SocketAddr,
    /// The HTTP API (fixed by the first start; restarts reuse it).
    pub http_addr: SocketAddr,
    proc: Option<Proc>,
    starts: u32,
    /// A queen that must lead once started (the only queen on a PostgreSQL database):
    /// restarts wait until it answers `/readyz` with 200, as a sled queen is ready once it
    /// prints `ready`. The lease of a killed predecessor lapses first (a few seconds).
    pub lead_on_start: bool,
}

impl QueenProc {
    /// Starts a queen on `data_dir` with ephemeral ports, `env` config overrides and an
    /// optional config file; its logs go to `log`. Returns once it is serving.
    pub fn start(
        data_dir: &Path,
        log: &Path,
        env: BTreeMap<String, String>,
        config: Option<PathBuf>,
    ) -> QueenProc {
        let mut q = QueenProc {
            data_dir: data_dir.to_owned(),
            log: log.to_owned(),
            env,
            config,
            drones_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            proc: None,
            starts: 0,
            lead_on_start: false,
        };
        q.launch();
        q
    }

    /// Counts a start, marks it in the log, and returns the environment that pins the
    /// queen to this harness's addresses and data dir.
    fn next_start(&mut self, note: &str) -> BTreeMap<String, String> {
        assert!(self.proc.is_none(), "the queen is already running");
        self.starts += 1;
        let mut env = self.env.clone();
        // A small in-memory budget unless a test sets one: most waiting tasks are demoted
        // to the store, so every crash scenario also crosses the read-back path.
        env.entry("HIVE_STORAGE__HOT_TASKS".into())
            .or_insert_with(|| "8".into());
        env.insert("HIVE_QUEEN__LISTEN".into(), self.drones_addr.to_string());
        env.insert("HIVE_QUEEN__HTTP".into(), self.http_addr.to_string());
        env.insert(
            "HIVE_QUEEN__DATA_DIR".into(),
            self.data_dir.to_string_lossy().into_owned(),
        );
        if let Ok(mut f) = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = writeln!(
                f,
                "===== test harness: queen start #{}{note} =====",
                self.starts
            );
        }
        env
    }

    /// Starts the process on the current addresses and waits for its `ready` line.
    fn launch(&mut self) {
        let env = self.next_start("");
        let label = format!("queen (start #{})", self.starts);
        let mut proc = Proc::spawn(
            &label,
            command(&env, self.config.as_deref()),
            &self.log,
            Stdout::Piped,
        );
        let stdout = proc.child_mut().stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel::<String>();
        let log = self.log.clone();
        std::thread::spawn(move || {
            // The first `ready` line is for us; anything else on stdout goes to the log.
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ready ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                        continue;
                    }
                }
                if let Ok(mut f) = std::fs::File::options().append(true).open(&log) {
                    let _ = writeln!(f, "[stdout] {line}");
                }
            }
        });
        let line = match rx.recv_timeout(START_DEADLINE) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = proc.wait_timeout(START_DEADLINE);
                panic!(
                    "{label} exited before it was ready ({status:?})\n{}",
                    dump_logs()
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "{label} did not print `ready` within {START_DEADLINE:?}\n{}",
                    dump_logs()
                );
            }
        };
        let (drones, http) =
            parse_ready(&line).unwrap_or_else(|| panic!("{label}: unexpected ready line {line:?}"));
        if self.starts > 1 {
            assert_eq!(
                (drones, http),
                (self.drones_addr, self.http_addr),
                "a restarted queen must keep its ports"
            );
        }
        self.drones_addr = drones;
        self.http_addr = http;
        self.proc = Some(proc);
        if self.lead_on_start {
            let api = crate::api::Api::new(http);
            let led = poll_until(START_DEADLINE, || match api.get_raw("/readyz") {
                Ok((200, _)) => Ok(()),
                _ => Err(()),
            });
            assert!(
                led.is_ok(),
                "{label} did not lead within {START_DEADLINE:?}\n{}",
                dump_logs()
            );
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `kill -9` the queen and reap it.
    pub fn kill9(&mut self) {
        let mut proc = self.proc.take().expect("kill9: the queen is not running");
        proc.kill9();
    }

    /// Stops the queen where it is (SIGSTOP): a VM pause, a swap storm or a starved CPU
    /// look the same to it.
    pub fn sigstop(&mut self) {
        let pid = self.pid().expect("sigstop: the queen is not running");
        crate::process::signal(pid, libc::SIGSTOP);
    }

    /// Lets a stopped queen go on (SIGCONT).
    pub fn sigcont(&mut self) {
        let pid = self.pid().expect("sigcont: the queen is not running");
        crate::process::signal(pid, libc::SIGCONT);
    }

    /// SIGTERM, and waits for a graceful exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("stop: the queen is not running");
        proc.terminate(STOP_DEADLINE)
    }

    /// Starts the queen again on the same data dir and ports (killing it with `kill -9`
    /// first if it still runs), and waits until it is ready.
    pub fn restart(&mut self) {
        if self.proc.is_some() {
            self.kill9();
        }
        self.launch();
    }

    /// Starts the queen (same data dir and ports) and `kill -9`s it after `delay`, whether
    /// or not it is ready by then: a crash in the middle of opening the store. The delay is
    /// the crash's timing, not a wait for anything.
    pub fn start_and_kill9_after(&mut self, delay: Duration) {
        let env = self.next_start(&format!(", killed after {delay:?}"));
        let label = format!("queen (start #{}, to be killed)", self.starts);
        let mut proc = Proc::spawn(
            &label,
            command(&env, self.config.as_deref()),
            &self.log,
            Stdout::Log,
        );
        std::thread::sleep(delay);
        proc.kill9();
    }

    /// Fails the test if the queen has exited (e.g. panicked).
    pub fn assert_running(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            if let Some(status) = p.exit_status() {
                panic!("the queen exited unexpectedly: {status}\n{}", dump_logs());
            }
        } else {
            panic!("the queen is not running");
        }
    }
}

/// What a queen that was expected to refuse to start did.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a queen that should exit by itself (bad config, locked data dir) and returns how it
/// exited. Panics, after killing it, if it is still running after `within` — or printed
/// `ready`, which means it started serving when it should have refused.
pub fn run_to_exit(
    dir: &Path,
    name: &str,
    env: BTreeMap<String, String>,
    config: Option<&Path>,
    within: Duration,
) -> Exited {
    let out_path = dir.join(format!("{name}.stdout"));
    let err_path = dir.join(format!("{name}.stderr"));
    let stdout_file = std::fs::File::create(&out_path).expect("create stdout file");
    let mut proc = Proc::spawn(
        &format!("queen ({name})"),
        command(&env, config),
        &err_path,
        Stdout::File(stdout_file),
    );
    // Wait for the exit, but give up at once if the queen says it is serving.
    let status = poll_until(within, || {
        if let Some(status) = proc.exit_status() {
            return Ok(status);
        }
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        if stdout.lines().any(|l| l.starts_with("ready ")) {
            proc.kill9();
            panic!(
                "queen ({name}) started serving when it should have refused\nstdout:\n{stdout}\nstderr:\n{}",
                tail(&err_path, 40)
            );
        }
        Err(())
    })
    .ok();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status {
        Some(status) => Exited {
            status,
            stdout,
            stderr,
        },
        None => {
            proc.kill9();
            panic!(
                "queen ({name}) was expected to exit by itself but still ran after {within:?}\nstdout:\n{stdout}\nstderr:\n{}",
                tail(&err_path, 40)
            );
        }
    }
}
