//! A real `drone` process, which a test can `kill -9`, freeze (SIGSTOP), thaw (SIGCONT) and
//! start again; it remembers what was done to it, for the invariant checker.

use std::path::{Path, PathBuf};
use std::process::Command;

use shared::DroneId;

use crate::bins;
use crate::process::{uptime, Proc, Stdout};

/// The label every harness drone carries, `hive-test:<name>`, so a task can be pinned to
/// one drone (e.g. a barrier proving that drone's earlier messages were handled).
pub fn label(name: &str) -> String {
    format!("hive-test:{name}")
}

/// Something a test did to a drone process that may make the queen give up its leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Harm {
    /// `kill -9`.
    Killed,
    /// SIGTERM (a graceful stop: it drains, then kills what still runs).
    Stopped,
    /// SIGSTOP: alive, connected, silent.
    Frozen,
    /// Its link to the queen was faulted (see [`crate::proxy`]).
    CutOff,
}

/// A running (or dead) drone process.
#[derive(Debug)]
pub struct DroneProc {
    pub name: String,
    pub slots: u32,
    /// Its id, once the queen has listed it (see `Hive::start_drone`).
    pub id: Option<DroneId>,
    /// Where it connects: the queen, a proxy in front of it, or several queens
    /// (`A,B`: a leader and its standbys).
    pub queen: String,
    /// Extra command-line arguments, kept to start it again the same way.
    pub extra: Vec<String>,
    /// What the test did to this process.
    pub harms: Vec<Harm>,
    /// When it was dead for sure (seconds since boot, see [`crate::process::uptime`]):
    /// right after a `kill -9` reaped it, or when the harness first saw it had exited.
    pub died_at: Option<f64>,
    proc: Proc,
}

impl DroneProc {
    /// Starts `drone --queen ADDR --slots N --name NAME --label hive-test:NAME [extra...]`,
    /// logging to `log`. Its environment carries no `HIVE_*` variables of the test runner;
    /// `HIVE_TEST_RUST_LOG` sets its log filter (default `info`).
    pub fn start(
        queen: impl std::fmt::Display,
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
        let queen = queen.to_string();
        cmd.arg("--queen")
            .arg(&queen)
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--name")
            .arg(name)
            .arg("--label")
            .arg(label(name));
        cmd.args(extra);
        let proc = Proc::spawn(&format!("drone {name}"), cmd, log, Stdout::Log);
        DroneProc {
            name: name.to_owned(),
            slots,
            id: None,
            queen,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            harms: Vec::new(),
            died_at: None,
            proc,
        }
    }

    /// A new process started exactly like this one (same name, slots, queen address and
    /// arguments, same log file).
    pub fn respawn(&self) -> DroneProc {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        DroneProc::start(&self.queen, &self.name, self.slots, &extra, self.proc.log())
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn log(&self) -> PathBuf {
        self.proc.log().to_owned()
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Why the drone is no longer running, if it is not.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.proc.exit_status();
        if status.is_some() && self.died_at.is_none() {
            self.died_at = Some(uptime());
        }
        status
    }

    /// `kill -9`, then reaps it.
    pub fn kill9(&mut self) {
        self.harms.push(Harm::Killed);
        self.proc.kill9();
        if self.died_at.is_none() {
            self.died_at = Some(uptime());
        }
    }

    /// Freezes the drone: it stays connected but says nothing (a hung host).
    pub fn sigstop(&mut self) {
        self.harms.push(Harm::Frozen);
        self.proc.signal(libc::SIGSTOP);
    }

    pub fn sigcont(&mut self) {
        self.proc.signal(libc::SIGCONT);
    }

    /// SIGTERM, and waits for a graceful exit.
    pub fn stop(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        self.harms.push(Harm::Stopped);
        let status = self.proc.terminate(within);
        if self.died_at.is_none() {
            self.died_at = Some(uptime());
        }
        status
    }
}
