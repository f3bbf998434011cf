//! Starting supervised processes and signalling their process groups: the only code in
//! the drone that forks or sends signals.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::identity::Identity;
use crate::supervise;

/// A process group the drone started: the supervisor shim's pid. Only ever built from a
/// pid above 1, so signalling it can never mean "every process" (-1) or "our own group"
/// (0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessGroup(libc::pid_t);

impl ProcessGroup {
    pub fn of_leader(pid: u32) -> Option<Self> {
        libc::pid_t::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .map(ProcessGroup)
    }

    /// Sends `signal` to every process in the group. A group that is already gone is not
    /// an error: the point was that it should be gone.
    pub fn signal(self, signal: libc::c_int) {
        // SAFETY: kill has no memory effects; the negative id addresses exactly this group
        // (the constructor refuses 0 and 1).
        let rc = unsafe { libc::kill(-self.0, signal) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(pgid = self.0, signal, error = %err, "could not signal a task's process group");
            }
        }
    }

    pub fn id(self) -> libc::pid_t {
        self.0
    }
}

type SpawnReply = oneshot::Sender<io::Result<Child>>;

/// Hands every fork to one long-lived thread.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Tokio's blocking-pool threads exit when idle, and nothing promises a worker
/// thread lives forever, so forking from them could kill a healthy task at random. This
/// thread lives exactly as long as the drone's [`crate::run`]: when it ends (the drone
/// stops or dies) every shim it started gets its parent-death signal, which is what G6
/// wants.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std::sync::mpsc::Sender<(Command, SpawnReply)>,
}

impl Spawner {
    /// Starts the spawner thread inside the current tokio runtime (children are reaped by
    /// that runtime).
    pub fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("the drone must run inside a tokio runtime (it reaps children there)")
        })?;
        let (tx, rx) = std::sync::mpsc::channel::<(Command, SpawnReply)>();
        std::thread::Builder::new()
            .name("drone-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                // Ends when every Spawner handle is dropped, i.e. when the drone stops.
                while let Ok((mut command, reply)) = rx.recv() {
                    // The requester may have given up; the child is then reaped by the
                    // runtime when the Child is dropped.
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Spawner { requests: tx })
    }

    /// Starts `command` (see [`supervised_command`]) on the spawner thread.
    pub async fn spawn(&self, command: Command) -> io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the drone's spawner thread has stopped");
        self.requests.send((command, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// A pipe whose read end tells whether the shim started the command.
#[derive(Debug)]
pub struct StatusPipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl StatusPipe {
    /// Both ends close-on-exec, so no process but the shim (which is given the write end
    /// explicitly) ever holds it.
    pub fn new() -> io::Result<Self> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        Ok(StatusPipe { read, write })
    }
}

/// What the shim is to start, with what, and as whom.
#[derive(Debug)]
pub struct Launch<'a> {
    /// The program: as the task named it, or the path a policy check resolved it to.
    pub program: &'a OsStr,
    /// The command's `argv[0]` when it is not `program` itself.
    pub arg0: Option<&'a str>,
    pub args: &'a [String],
    /// The command's whole environment; nothing of the drone's is added.
    pub env: &'a BTreeMap<String, OsString>,
    /// The user the command runs as; `None` for the drone's own.
    pub identity: Option<&'a Identity>,
}

/// The command that runs `launch` under the supervisor shim, in a new process group led by
/// the shim, with a parent-death signal tied to the spawning thread.
pub fn supervised_command(
    supervisor: &Path,
    launch: &Launch<'_>,
    status_write: &OwnedFd,
    channel: Option<&OwnedFd>,
) -> Command {
    let status_fd = status_write.as_raw_fd();
    // A pool process's end of its channel (crate::pool): kept open across both execs (the
    // shim's and the command's) under the same number, which the command finds in
    // `HIVE_POOL_FD`.
    let channel_fd = channel.map(AsRawFd::as_raw_fd);
    let mut command = Command::new(supervisor);
    command
        .arg(supervise::SUBCOMMAND)
        .arg(supervise::STATUS_FD_FLAG)
        .arg(status_fd.to_string());
    if let Some(identity) = launch.identity {
        command
            .arg(supervise::UID_FLAG)
            .arg(identity.uid.to_string())
            .arg(supervise::GID_FLAG)
            .arg(identity.gid.to_string());
    }
    if let Some(arg0) = launch.arg0 {
        command.arg(supervise::ARG0_FLAG).arg(arg0);
    }
    // The shim gets no variable under its real name (see crate::supervise).
    command.env_clear();
    for (name, value) in launch.env {
        command.env(format!("{}{name}", supervise::TASK_ENV_PREFIX), value);
    }
    command
        .arg("--")
        .arg(launch.program)
        .args(launch.args)
        // The group is the unit the drone kills, so the shim leads a new one.
        .process_group(0)
        // Killing is explicit, by process group; dropping a handle must not kill only the
        // shim and leave the command orphaned.
        .kill_on_drop(false);

    // SAFETY: getpid is async-signal-safe and called here, in the parent.
    let drone_pid = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (prctl, getppid, fcntl) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, supervise::PARENT_DEATH_SIGNAL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the drone died between fork and prctl, no signal will ever come: give up
            // rather than run a task nobody watches.
            if libc::getppid() != drone_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // Let the shim (and only the shim) keep the status pipe across exec. This
            // changes the flag in the child's descriptor table only.
            if libc::fcntl(status_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = channel_fd {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command
}
