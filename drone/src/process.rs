//! Starting supervised processes and signalling their process groups: the only code in
//! the drone that starts processes or sends signals. Processes are started by the drone's
//! supervisor ([`crate::supervise`]), a single-threaded process of its own that this
//! module launches (and relaunches if it dies) and talks to over a socketpair.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::awake;
use crate::identity::Identity;
use crate::supervise::{self, Event, Request};

/// How long the supervisor may take to say whether it started a process. It only has to
/// fork and exec; far longer means the machine is in trouble, and the attempt is failed
/// (retryably) rather than hung.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The descriptor a pool process finds its channel on (docs/POOLS.md, `HIVE_POOL_FD`).
pub const POOL_CHANNEL_FD: RawFd = 3;

/// A process group the drone started: its leader's pid. Only ever built from a
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

/// Why a process did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program could not be started (no such program, not executable, a bad working
    /// directory, a user switch refused): the task's doing, not worth retrying.
    #[error("could not start {program}: {source}")]
    NotStarted { program: String, source: io::Error },
    /// The drone's side failed (no pipe, the supervisor gone or silent): worth retrying.
    #[error("could not start the task: {0}")]
    Drone(String),
}

/// What the process is to run, with what, where and as whom.
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
    /// Where it starts; `None` for the drone's own directory.
    pub cwd: Option<&'a Path>,
}

impl Launch<'_> {
    fn request(&self, targets: Vec<RawFd>) -> Result<Vec<u8>, String> {
        let argv0 = self
            .arg0
            .map_or_else(|| self.program.to_owned(), OsString::from);
        let mut argv = vec![argv0];
        argv.extend(self.args.iter().map(OsString::from));
        let env = self
            .env
            .iter()
            .map(|(name, value)| {
                let mut pair = OsString::from(name);
                pair.push("=");
                pair.push(value);
                pair
            })
            .collect();
        Request {
            identity: self.identity.map(|i| (i.uid, i.gid)),
            cwd: self.cwd.map(|d| d.as_os_str().to_owned()),
            program: self.program.to_owned(),
            argv,
            env,
            targets,
        }
        .encode()
    }
}

/// A started process and the read ends of its output.
#[derive(Debug)]
pub struct Started {
    pub child: Supervised,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

type ExitSender = oneshot::Sender<io::Result<ExitStatus>>;

/// A process the supervisor started: the leader of its own process group.
#[derive(Debug)]
pub struct Supervised {
    group: ProcessGroup,
    exit: oneshot::Receiver<io::Result<ExitStatus>>,
    /// How it ended, once known (`wait` may be called again after that).
    ended: Option<Result<ExitStatus, String>>,
}

impl Supervised {
    pub fn group(&self) -> ProcessGroup {
        self.group
    }

    /// Waits for the process to end. Cancel-safe, and may be called again after it ended.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let ended = match self.ended.take() {
            Some(ended) => ended,
            None => match (&mut self.exit).await {
                Ok(status) => status.map_err(|e| e.to_string()),
                Err(_) => Err("the drone's process supervisor stopped".to_owned()),
            },
        };
        self.ended = Some(ended.clone());
        ended.map_err(io::Error::other)
    }
}

/// What the supervisor answered to one request.
enum Answer {
    Spawned(libc::pid_t, oneshot::Receiver<io::Result<ExitStatus>>),
    /// The OS error of the step that failed.
    Failed(i32),
    /// The supervisor is gone or could not be started.
    Lost(String),
}

struct Job {
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
    reply: oneshot::Sender<Answer>,
}

/// Hands every start to the supervisor, from one long-lived thread.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. The supervisor is started from this thread, which lives exactly as long as the
/// drone's [`crate::run`]: when it ends (the drone stops or dies) the supervisor gets its
/// parent-death signal and kills every process group it started, which is what G6 wants.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std::sync::mpsc::Sender<Job>,
}

impl Spawner {
    /// Starts the spawner thread; the supervisor (`supervisor`, the drone's own binary)
    /// is launched at the first start and again after it died.
    pub fn start(supervisor: PathBuf) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("drone-spawner".into())
            .spawn(move || {
                let mut link: Option<Link> = None;
                // Ends when every Spawner handle is dropped, i.e. when the drone stops.
                while let Ok(job) = rx.recv() {
                    link = forward(link, &supervisor, job);
                }
            })?;
        Ok(Spawner { requests: tx })
    }

    /// Starts `launch` with stdin from `stdin` (`/dev/null` when `None`), stdout and
    /// stderr on fresh pipes, and, for a pool process, its channel on
    /// [`POOL_CHANNEL_FD`].
    pub async fn spawn(
        &self,
        launch: &Launch<'_>,
        stdin: Option<OwnedFd>,
        channel: Option<OwnedFd>,
    ) -> Result<Started, SpawnError> {
        let program = launch.program.to_string_lossy().into_owned();
        let drone = |what: &str, e: io::Error| SpawnError::Drone(format!("{what}: {e}"));
        let (stdout, out_write) = pipe_pair().map_err(|e| drone("could not create a pipe", e))?;
        let (stderr, err_write) = pipe_pair().map_err(|e| drone("could not create a pipe", e))?;
        let stdin = match stdin {
            Some(fd) => fd,
            None => std::fs::File::open("/dev/null")
                .map_err(|e| drone("could not open /dev/null", e))?
                .into(),
        };
        let mut fds = vec![stdin, out_write, err_write];
        let mut targets = vec![0, 1, 2];
        if let Some(channel) = channel {
            fds.push(channel);
            targets.push(POOL_CHANNEL_FD);
        }
        let body = launch
            .request(targets)
            .map_err(|e| SpawnError::NotStarted {
                program: program.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
        let (reply, answer) = oneshot::channel();
        let gone = || SpawnError::Drone("the drone's spawner thread has stopped".to_owned());
        self.requests
            .send(Job { body, fds, reply })
            .map_err(|_| gone())?;
        // In time the drone was awake: an answer given while the drone was stopped is
        // read, not taken for a silent supervisor.
        let answer = awake::timeout(SPAWN_TIMEOUT, answer)
            .await
            .map_err(|_| {
                SpawnError::Drone(format!(
                    "the supervisor did not answer within {} s",
                    SPAWN_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|_| gone())?;
        let (pid, exit) = match answer {
            Answer::Spawned(pid, exit) => (pid, exit),
            Answer::Failed(errno) => {
                return Err(SpawnError::NotStarted {
                    program,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            Answer::Lost(why) => return Err(SpawnError::Drone(why)),
        };
        let group = ProcessGroup(pid);
        let child = Supervised {
            group,
            exit,
            ended: None,
        };
        let readers = pipe::Receiver::from_owned_fd(stdout)
            .and_then(|out| Ok((out, pipe::Receiver::from_owned_fd(stderr)?)));
        match readers {
            Ok((stdout, stderr)) => Ok(Started {
                child,
                stdout,
                stderr,
            }),
            Err(e) => {
                group.signal(libc::SIGKILL);
                Err(drone("could not read its output", e))
            }
        }
    }
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1, -1];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the spawner thread and a supervisor's event reader share.
#[derive(Default)]
struct Shared {
    /// Answers owed, in the order the requests were sent.
    waiting: VecDeque<oneshot::Sender<Answer>>,
    /// Started processes whose end is awaited.
    running: HashMap<libc::pid_t, ExitSender>,
    /// The supervisor is gone: nothing more will be answered on this link.
    closed: bool,
}

/// One running supervisor: the socket to it and the state its reader thread fills.
struct Link {
    sock: UnixStream,
    shared: Arc<Mutex<Shared>>,
}

/// Sends `job` to the supervisor of `link`, launching a new one first when there is none
/// or it died; returns the link to use next time.
fn forward(link: Option<Link>, supervisor: &Path, job: Job) -> Option<Link> {
    let Job { body, fds, reply } = job;
    let mut reply = Some(reply);
    let mut link = link;
    for _ in 0..2 {
        let current = match link.take() {
            Some(current) => current,
            None => match Link::launch(supervisor) {
                Ok(new) => new,
                Err(e) => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Answer::Lost(format!(
                            "could not start the drone's process supervisor {}: {e}",
                            supervisor.display()
                        )));
                    }
                    return None;
                }
            },
        };
        {
            let Ok(mut shared) = current.shared.lock() else {
                continue;
            };
            if shared.closed {
                // It died since the last request: launch a new one.
                continue;
            }
            if let Some(reply) = reply.take() {
                shared.waiting.push_back(reply);
            }
        }
        if supervise::send_request(&current.sock, &body, &fds).is_err() {
            // The supervisor is gone; its reader fails everything owed, this included.
            let _ = current.sock.shutdown(std::net::Shutdown::Both);
        }
        return Some(current);
    }
    if let Some(reply) = reply.take() {
        let _ = reply.send(Answer::Lost(
            "the drone's process supervisor keeps dying".to_owned(),
        ));
    }
    None
}

impl Link {
    /// Starts the supervisor from this (the spawner) thread, with its parent-death signal,
    /// in a process group of its own, and starts the thread that reads its events.
    fn launch(supervisor: &Path) -> io::Result<Link> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: getpid cannot fail.
        let drone_pid = unsafe { libc::getpid() };
        let mut command = std::process::Command::new(supervisor);
        command
            .arg(supervise::SUBCOMMAND)
            .arg(supervise::FD_FLAG)
            .arg(theirs_fd.to_string())
            .arg(supervise::PARENT_FLAG)
            .arg(drone_pid.to_string())
            // It needs none of the drone's variables; each command gets its own.
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // A signal to the drone's group (Ctrl-C in a terminal) is for the drone, which
            // then stops its tasks itself; the supervisor must outlive that to see it.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, getppid, fcntl) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, supervise::PARENT_DEATH_SIGNAL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != drone_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                // Keep (only) the supervisor's end across the exec.
                if libc::fcntl(theirs_fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let reader = ours.try_clone()?;
        let for_reader = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("drone-supervisor".into())
            .spawn(move || read_events(reader, for_reader, child))?;
        tracing::debug!(supervisor = %supervisor.display(), "process supervisor started");
        Ok(Link { sock: ours, shared })
    }
}

/// Delivers the supervisor's events until it is gone, then fails whatever is still owed
/// and kills the groups it can no longer watch.
fn read_events(sock: UnixStream, shared: Arc<Mutex<Shared>>, mut child: std::process::Child) {
    let mut bytes = [0u8; supervise::EVENT_LEN];
    let why = loop {
        if let Err(e) = (&sock).read_exact(&mut bytes) {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                "exited".to_owned()
            } else {
                format!("could not be read: {e}")
            };
        }
        let Some(event) = Event::decode(&bytes) else {
            break "sent an event the drone does not know".to_owned();
        };
        let Ok(mut state) = shared.lock() else {
            break "left the drone's state poisoned".to_owned();
        };
        match event {
            Event::Spawned { pid } => {
                let (tx, rx) = oneshot::channel();
                state.running.insert(pid, tx);
                let owed = state.waiting.pop_front();
                drop(state);
                let delivered =
                    owed.is_some_and(|reply| reply.send(Answer::Spawned(pid, rx)).is_ok());
                if !delivered {
                    // Whoever asked gave up waiting: nobody would ever stop it.
                    ProcessGroup(pid).signal(libc::SIGKILL);
                }
            }
            Event::Failed { errno } => {
                if let Some(reply) = state.waiting.pop_front() {
                    let _ = reply.send(Answer::Failed(errno));
                }
            }
            Event::Exited { pid, status } => {
                if let Some(tx) = state.running.remove(&pid) {
                    let _ = tx.send(Ok(ExitStatus::from_raw(status)));
                }
            }
        }
    };
    let (owed, running) = match shared.lock() {
        Ok(mut state) => {
            state.closed = true;
            (
                std::mem::take(&mut state.waiting),
                std::mem::take(&mut state.running),
            )
        }
        Err(_) => Default::default(),
    };
    let _ = sock.shutdown(std::net::Shutdown::Both);
    let status = child.wait();
    if owed.is_empty() && running.is_empty() {
        tracing::debug!(?status, "process supervisor stopped");
        return;
    }
    tracing::error!(?status, running = running.len(), "the drone's process supervisor {why}; the processes it watched are killed and their attempts failed, and the next start launches a new supervisor");
    let lost = format!("the drone's process supervisor {why}");
    for reply in owed {
        let _ = reply.send(Answer::Lost(lost.clone()));
    }
    for (pid, tx) in running {
        ProcessGroup(pid).signal(libc::SIGKILL);
        let _ = tx.send(Err(io::Error::other(lost.clone())));
    }
}
