//! A real `drone` process, which a test can `kill -9`, freeze (SIGSTOP) and thaw (SIGCONT).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use shared::DroneId;

use crate::bins;
use crate::process::{Proc, Stdout};

/// A running (or killed) drone.
#[derive(Debug)]
pub struct DroneProc {
    pub name: String,
    pub slots: u32,
    /// Its id, once the queen has listed it (see `Hive::start_drone`).
    pub id: Option<DroneId>,
    proc: Proc,
}

impl DroneProc {
    /// Starts `drone --queen ADDR --slots N --name NAME [extra...]`, logging to `log`. Its
    /// environment carries no `HIVE_*` variables of the test runner; `HIVE_TEST_RUST_LOG`
    /// sets its log filter (default `info`).
    pub fn start(
        queen: SocketAddr,
        name: &str,
        slots: u32,
        extra: &[&str],
        log: &Path,
    ) -> DroneProc {
        let mut cmd = Command::new(bins::drone());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HIVE_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("HIVE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd.arg("--queen")
            .arg(queen.to_string())
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--name")
            .arg(name);
        cmd.args(extra);
        let proc = Proc::spawn(&format!("drone {name}"), cmd, log, Stdout::Log);
        DroneProc {
            name: name.to_owned(),
            slots,
            id: None,
            proc,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn log(&self) -> PathBuf {
        self.proc.log().to_owned()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Why the drone is no longer running, if it is not.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.exit_status()
    }

    /// `kill -9`, then reaps it.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Freezes the drone: it stays connected but says nothing (a hung host).
    pub fn sigstop(&mut self) {
        self.proc.signal(libc::SIGSTOP);
    }

    pub fn sigcont(&mut self) {
        self.proc.signal(libc::SIGCONT);
    }

    /// SIGTERM, and waits for a graceful exit.
    pub fn stop(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        self.proc.terminate(within)
    }
}
