//! The drone's process supervisor: one long-lived, single-threaded process per drone,
//! `drone __supervise --fd N --parent PID`, that starts every task and pool process.
//!
//! Why a separate process: G6 (docs/GUARANTEES.md) says a drone that dies takes its
//! children with it, including after `kill -9` and including grandchildren
//! (`sh -c 'sleep 100 & ...'`). The kernel can tell a child that its parent died
//! (`PR_SET_PDEATHSIG`), but only the direct child. So the drone starts this supervisor
//! (its own binary, once) with a parent-death signal of SIGUSR2 and in a process group of
//! its own. The supervisor starts each command as the leader of a new process group and
//! keeps the list of groups alive. When the drone dies, the supervisor learns it twice
//! over (the parent-death signal, and the end of its control socket, whose only other end
//! the drone held) and SIGKILLs every group: the commands and everything they started.
//! Each command also gets a parent-death SIGKILL of its own, so even a supervisor killed
//! by force takes the commands it started with it, and the drone, seeing the supervisor
//! gone, kills the groups it knows.
//!
//! Why one long-lived process rather than a shim exec'd per task (the design before
//! issue 16): a task then costs one `exec` (its own) instead of two. Every `exec` pays the
//! dynamic loader and glibc's start-up probe of the CPU caches, which traps to the
//! hypervisor on a VM; two of them were ~1 ms of CPU a task and capped `exec` at ~550
//! tasks/s on the 2-core machine. A fork of this small single-threaded process is cheap,
//! and being single-threaded it may fork without the rules that bind a multi-threaded
//! parent (the drone).
//!
//! The control socket is a Unix stream socketpair. The drone sends requests: a header
//! (body length and descriptor count, with the descriptors as `SCM_RIGHTS`) and a body
//! (see [`Request`]). The supervisor answers each request in order with one [`Event`]
//! (`Spawned` or `Failed`) and later sends an `Exited` event when a command it started
//! ends. Both ends are this binary, so the format has no version.
//!
//! Nothing a payload chose reaches the supervisor's own environment: the command's
//! environment travels in the request body. When the policy says whom tasks run as, the
//! supervisor stays root and switches only the command, after `chdir`, so the command can
//! neither signal nor trace the supervisor.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The hidden first argument that turns the drone binary into the supervisor. `main.rs`
/// checks for it before parsing the command line.
pub const SUBCOMMAND: &str = "__supervise";

/// The flag that names the control socket's file descriptor.
pub const FD_FLAG: &str = "--fd";

/// The flag that gives the drone's pid, so a supervisor whose drone died while it started
/// exits at once instead of waiting for a signal that was already sent.
pub const PARENT_FLAG: &str = "--parent";

/// The signal the kernel sends the supervisor when the drone thread that started it goes
/// away. SIGUSR2 because no task tooling sends it by habit; the supervisor only reads it.
pub const PARENT_DEATH_SIGNAL: libc::c_int = libc::SIGUSR2;

/// Most descriptors one request passes (stdin, stdout, stderr, a pool's channel).
pub const MAX_FDS: usize = 4;

/// Largest request body: arguments and environment together. The kernel's own limit on
/// them is 2 MiB with the default stack; this only keeps a corrupt length from being
/// taken for a huge allocation.
pub const MAX_BODY: usize = 16 << 20;

/// What the supervisor exits with when it was started wrongly (a drone bug).
const EXIT_USAGE: i32 = 2;

/// Where the child moves the descriptors it was given before placing them, so that
/// placing one never overwrites another that is still to be placed.
const FD_PARKING: RawFd = 64;

/// The search path a command without `PATH` gets, as `execvp` uses.
const DEFAULT_PATH: &[u8] = b"/bin:/usr/bin";

/// One process to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The user and group to run as; `None` keeps the supervisor's.
    pub identity: Option<(libc::uid_t, libc::gid_t)>,
    /// Where it starts; `None` for the supervisor's own directory (the drone's).
    pub cwd: Option<OsString>,
    /// The program: a path, or a name looked up in the command's own `PATH`.
    pub program: OsString,
    /// Its `argv`, `argv[0]` included.
    pub argv: Vec<OsString>,
    /// Its whole environment, as `NAME=value`.
    pub env: Vec<OsString>,
    /// For each descriptor passed with the request, in order, the number it gets in the
    /// command (0, 1, 2 for stdio; a pool's channel gets its own).
    pub targets: Vec<RawFd>,
}

/// Every string in the body ends with a NUL, which no argument, variable or path may hold
/// (the kernel takes them NUL-terminated): identity (`uid:gid` or empty), cwd (empty for
/// none), program, argument count, arguments, variable count, variables, descriptor
/// count, descriptor targets.
impl Request {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut put = |s: &[u8], what: &str| -> Result<(), String> {
            if s.contains(&0) {
                return Err(format!("{what} contains a NUL byte"));
            }
            out.extend_from_slice(s);
            out.push(0);
            Ok(())
        };
        let identity = self
            .identity
            .map(|(u, g)| format!("{u}:{g}"))
            .unwrap_or_default();
        put(identity.as_bytes(), "the identity")?;
        put(
            self.cwd.as_deref().map_or(&b""[..], OsStr::as_bytes),
            "the working directory",
        )?;
        if self.program.is_empty() {
            return Err("the program is empty".to_owned());
        }
        put(self.program.as_bytes(), "the program")?;
        put(self.argv.len().to_string().as_bytes(), "")?;
        for a in &self.argv {
            put(a.as_bytes(), "an argument")?;
        }
        put(self.env.len().to_string().as_bytes(), "")?;
        for v in &self.env {
            put(v.as_bytes(), "an environment variable")?;
        }
        put(self.targets.len().to_string().as_bytes(), "")?;
        for t in &self.targets {
            put(t.to_string().as_bytes(), "")?;
        }
        Ok(out)
    }

    pub fn decode(body: &[u8]) -> Result<Request, String> {
        let Some(body) = body.strip_suffix(&[0]) else {
            return Err("the request does not end with a NUL".to_owned());
        };
        let mut parts = body.split(|b| *b == 0);
        let mut next = |what: &str| parts.next().ok_or_else(|| format!("{what} is missing"));
        let number = |s: &[u8], what: &str| -> Result<usize, String> {
            std::str::from_utf8(s)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("{what} is not a number"))
        };
        let identity = match next("the identity")? {
            b"" => None,
            text => {
                let text = std::str::from_utf8(text).map_err(|_| "bad identity".to_owned())?;
                let (u, g) = text.split_once(':').ok_or("bad identity")?;
                Some((
                    u.parse().map_err(|_| "bad uid")?,
                    g.parse().map_err(|_| "bad gid")?,
                ))
            }
        };
        let cwd = match next("the working directory")? {
            b"" => None,
            dir => Some(OsString::from_vec(dir.to_vec())),
        };
        let program = OsString::from_vec(next("the program")?.to_vec());
        let argc = number(next("the argument count")?, "the argument count")?;
        let mut argv = Vec::with_capacity(argc.min(4096));
        for _ in 0..argc {
            argv.push(OsString::from_vec(next("an argument")?.to_vec()));
        }
        let envc = number(next("the variable count")?, "the variable count")?;
        let mut env = Vec::with_capacity(envc.min(4096));
        for _ in 0..envc {
            env.push(OsString::from_vec(next("a variable")?.to_vec()));
        }
        let fdc = number(next("the descriptor count")?, "the descriptor count")?;
        if fdc > MAX_FDS {
            return Err(format!("{fdc} descriptors, at most {MAX_FDS}"));
        }
        let mut targets = Vec::with_capacity(fdc);
        for _ in 0..fdc {
            let t = number(next("a descriptor target")?, "a descriptor target")?;
            targets.push(RawFd::try_from(t).map_err(|_| "descriptor target too large")?);
        }
        if parts.next().is_some() {
            return Err("the request has trailing fields".to_owned());
        }
        Ok(Request {
            identity,
            cwd,
            program,
            argv,
            env,
            targets,
        })
    }
}

/// What the supervisor tells the drone. On the wire: 16 bytes, kind, pid, value (all
/// little-endian `i32`) and a zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request was started as `pid`, which leads its own process group.
    Spawned { pid: libc::pid_t },
    /// The request could not be started: the OS error of the step that failed (the
    /// working directory, the user switch or the exec).
    Failed { errno: i32 },
    /// `pid` ended with this raw wait status.
    Exited { pid: libc::pid_t, status: i32 },
}

pub const EVENT_LEN: usize = 16;

impl Event {
    pub fn encode(self) -> [u8; EVENT_LEN] {
        let (kind, pid, value) = match self {
            Event::Spawned { pid } => (1, pid, 0),
            Event::Failed { errno } => (2, 0, errno),
            Event::Exited { pid, status } => (3, pid, status),
        };
        let mut out = [0u8; EVENT_LEN];
        out[0..4].copy_from_slice(&i32::to_le_bytes(kind));
        out[4..8].copy_from_slice(&pid.to_le_bytes());
        out[8..12].copy_from_slice(&value.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; EVENT_LEN]) -> Option<Event> {
        let word =
            |i: usize| i32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (pid, value) = (word(4), word(8));
        match word(0) {
            1 if pid > 1 => Some(Event::Spawned { pid }),
            2 => Some(Event::Failed { errno: value }),
            3 if pid > 1 => Some(Event::Exited { pid, status: value }),
            _ => None,
        }
    }
}

/// Sends one request: the header with the descriptors, then the body.
pub fn send_request(sock: &UnixStream, body: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || body.len() > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "request too large",
        ));
    }
    let len = u32::try_from(body.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut header = [0u8; 8];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other(
            "descriptors do not fit the control message",
        ));
    }
    // A stream socket may take part of the header: the descriptors go with the first
    // byte, so the rest is written plainly.
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&header)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    let mut rest = sock;
    rest.write_all(&header[sent..])?;
    rest.write_all(body)
}

/// Reads one request: `None` at the end of the stream (the drone is gone).
pub fn read_request(sock: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut header = [0u8; 8];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < header.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut header[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let received = match received {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = message {
                fds.extend(passed);
            }
        }
        if received.bytes == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += received.bytes;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_BODY || count != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bad request header: {len} bytes, {count} descriptors announced, {} passed",
                fds.len()
            ),
        ));
    }
    let mut body = vec![0u8; len];
    let mut reader = sock;
    reader.read_exact(&mut body)?;
    Ok(Some((body, fds)))
}

/// Runs the supervisor; `args` are the arguments after [`SUBCOMMAND`]. Returns when the
/// drone is gone, having killed every process group it started.
pub fn main(args: Vec<OsString>) -> i32 {
    let (fd, parent) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("drone {SUBCOMMAND}: {e}");
            return EXIT_USAGE;
        }
    };
    let handled = signal_set(&[
        libc::SIGCHLD,
        PARENT_DEATH_SIGNAL,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
    ]);
    // SAFETY: `handled` is an initialised set; a null old-set pointer is allowed. The
    // process has one thread, so the mask is the process's.
    let signals = unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &handled, std::ptr::null_mut());
        libc::signalfd(-1, &handled, libc::SFD_CLOEXEC)
    };
    if signals < 0 {
        eprintln!(
            "drone {SUBCOMMAND}: signalfd: {}",
            io::Error::last_os_error()
        );
        return EXIT_USAGE;
    }
    // SAFETY: signalfd just returned this descriptor; nothing else owns it.
    let signals = unsafe { OwnedFd::from_raw_fd(signals) };
    // A parent-death signal sent before the mask was set killed us (default action), which
    // is right; one that could not be sent because the drone was already gone shows here.
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != parent {
        return 0;
    }
    // SAFETY: the drone passed this descriptor (open here, owned by nothing else); the
    // commands must not inherit it, or the drone's death would not end the stream.
    let sock = unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        UnixStream::from_raw_fd(fd)
    };
    let mut supervisor = Supervisor {
        sock,
        live: HashSet::new(),
        // SAFETY: getpid cannot fail.
        me: unsafe { libc::getpid() },
    };
    let code = supervisor.serve(&signals);
    supervisor.kill_all();
    code
}

fn parse(args: &[OsString]) -> Result<(RawFd, libc::pid_t), String> {
    let mut fd = None;
    let mut parent = None;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<i32>().ok());
        match flag.to_str() {
            Some(FD_FLAG) => fd = value.filter(|fd| *fd > 2),
            Some(PARENT_FLAG) => parent = value.filter(|pid| *pid > 1),
            _ => return Err(format!("unexpected argument {flag:?}")),
        }
    }
    match (fd, parent) {
        (Some(fd), Some(parent)) => Ok((fd, parent)),
        _ => Err(format!(
            "needs {FD_FLAG} (a descriptor above 2) and {PARENT_FLAG} (a pid)"
        )),
    }
}

struct Supervisor {
    sock: UnixStream,
    /// The commands started and not yet reaped: each the leader of its own group.
    live: HashSet<libc::pid_t>,
    me: libc::pid_t,
}

impl Supervisor {
    /// Serves requests and signals until the drone is gone.
    fn serve(&mut self, signals: &OwnedFd) -> i32 {
        loop {
            let mut polled = [
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `polled` is a valid array of two pollfds for the call.
            let rc = unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return EXIT_USAGE;
            }
            if polled[1].revents != 0 && self.take_signals(signals) {
                return 0;
            }
            if polled[0].revents != 0 {
                match read_request(&self.sock) {
                    Ok(Some((body, fds))) => {
                        let event = match Request::decode(&body) {
                            Ok(request) => self.spawn(&request, fds),
                            Err(e) => {
                                eprintln!("drone {SUBCOMMAND}: bad request: {e}");
                                Event::Failed {
                                    errno: libc::EINVAL,
                                }
                            }
                        };
                        if self.tell(event).is_err() {
                            return 0;
                        }
                    }
                    // The drone closed its end or died: nobody watches the commands.
                    Ok(None) => return 0,
                    Err(e) => {
                        eprintln!("drone {SUBCOMMAND}: control socket: {e}");
                        return EXIT_USAGE;
                    }
                }
            }
        }
    }

    /// Handles the pending signals; true when the drone is gone.
    fn take_signals(&mut self, signals: &OwnedFd) -> bool {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: reads at most `size` bytes into `info`, which has room for them.
            let n = unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), size) };
            if n != size as isize {
                // Nothing pending (the descriptor is ready only when something is), or
                // interrupted: poll again.
                return false;
            }
            // SAFETY: the kernel filled the whole struct.
            let signo = unsafe { info.assume_init_ref() }.ssi_signo as libc::c_int;
            if signo == PARENT_DEATH_SIGNAL {
                return true;
            }
            if signo == libc::SIGCHLD {
                if self.reap().is_err() {
                    return true;
                }
                return false;
            }
            // SIGTERM, SIGINT, SIGHUP: the supervisor outlives whatever sent them; the
            // drone decides when it ends.
        }
    }

    /// Reaps every command that ended and tells the drone how.
    fn reap(&mut self) -> io::Result<()> {
        loop {
            let mut status = 0;
            // SAFETY: `status` is valid for the call.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return Ok(());
            }
            if self.live.remove(&pid) {
                self.tell(Event::Exited { pid, status })?;
            }
        }
    }

    fn tell(&mut self, event: Event) -> io::Result<()> {
        let bytes = event.encode();
        let mut sent = 0;
        while sent < bytes.len() {
            match rustix::net::send(&self.sock, &bytes[sent..], SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn kill_all(&self) {
        for pid in &self.live {
            // SAFETY: kill has no memory effects; every pid here is above 1 (fork's).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }

    /// Forks and execs one command; answers whether it started.
    fn spawn(&mut self, request: &Request, fds: Vec<OwnedFd>) -> Event {
        if fds.len() != request.targets.len() {
            return Event::Failed {
                errno: libc::EINVAL,
            };
        }
        let prepared = match Prepared::new(request) {
            Ok(p) => p,
            Err(errno) => return Event::Failed { errno },
        };
        let mut report: [RawFd; 2] = [-1, -1];
        // SAFETY: `report` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Event::Failed { errno: errno() };
        }
        // SAFETY: pipe2 succeeded; both ends are ours alone.
        let (report_read, report_write) = unsafe {
            (
                OwnedFd::from_raw_fd(report[0]),
                OwnedFd::from_raw_fd(report[1]),
            )
        };
        // SAFETY: this process has one thread, so the child may run any code; it runs
        // only `exec_child`, which never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Event::Failed { errno: errno() };
        }
        if pid == 0 {
            exec_child(
                &prepared,
                &fds,
                &request.targets,
                request.identity,
                self.me,
                report_write.as_raw_fd(),
            );
        }
        drop(report_write);
        drop(fds);
        // The child closes its end by exec (close-on-exec) or writes the errno of the
        // step that failed.
        let mut word = [0u8; 4];
        let mut reader = std::fs::File::from(report_read);
        match reader.read_exact(&mut word) {
            Ok(()) => {
                let mut status = 0;
                // SAFETY: `status` is valid; the child exits right after reporting.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                Event::Failed {
                    errno: i32::from_le_bytes(word),
                }
            }
            Err(_) => {
                self.live.insert(pid);
                Event::Spawned { pid }
            }
        }
    }
}

/// Everything the child needs, built before the fork.
struct Prepared {
    /// The paths to try, in order (one, or one per `PATH` entry).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
    cwd: Option<CString>,
}

impl Prepared {
    fn new(request: &Request) -> Result<Prepared, i32> {
        let c = |s: &[u8]| CString::new(s).map_err(|_| libc::EINVAL);
        let program = request.program.as_bytes();
        let candidates = if program.contains(&b'/') {
            vec![c(program)?]
        } else {
            let path = request
                .env
                .iter()
                .find_map(|v| v.as_bytes().strip_prefix(b"PATH="))
                .unwrap_or(DEFAULT_PATH);
            path.split(|b| *b == b':')
                .map(|dir| {
                    let mut full = if dir.is_empty() {
                        b".".to_vec()
                    } else {
                        dir.to_vec()
                    };
                    full.push(b'/');
                    full.extend_from_slice(program);
                    c(&full)
                })
                .collect::<Result<_, _>>()?
        };
        Ok(Prepared {
            candidates,
            argv: request
                .argv
                .iter()
                .map(|a| c(a.as_bytes()))
                .collect::<Result<_, _>>()?,
            env: request
                .env
                .iter()
                .map(|v| c(v.as_bytes()))
                .collect::<Result<_, _>>()?,
            cwd: request
                .cwd
                .as_deref()
                .map(|d| c(d.as_bytes()))
                .transpose()?,
        })
    }
}

/// The pointers of `strings` followed by a null, as `execve` takes them.
fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The child's side of a spawn: its own group, a parent-death signal, the descriptors in
/// place, the directory, the user, the exec. Any failure writes its errno to `report`
/// and exits 127.
fn exec_child(
    prepared: &Prepared,
    fds: &[OwnedFd],
    targets: &[RawFd],
    identity: Option<(libc::uid_t, libc::gid_t)>,
    supervisor: libc::pid_t,
    report: RawFd,
) -> ! {
    let fail = |errno: i32| -> ! {
        let word = errno.to_le_bytes();
        // SAFETY: writes 4 bytes from a valid buffer, then ends the child without
        // running anything of the parent's (no atexit handlers, no buffers flushed).
        unsafe {
            libc::write(report, word.as_ptr().cast(), word.len());
            libc::_exit(127)
        }
    };
    let argv = null_terminated(&prepared.argv);
    let envp = null_terminated(&prepared.env);
    // SAFETY: plain system calls on valid arguments; the pointers in `argv` and `envp`
    // point into `prepared`, alive until exec replaces the process.
    unsafe {
        // The command must be able to take every signal, and take it by default: the
        // supervisor's blocked mask would otherwise survive the exec.
        let empty = signal_set(&[]);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::setpgid(0, 0) != 0 {
            fail(errno());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(errno());
        }
        // The supervisor died between the fork and the prctl: no signal will come.
        if libc::getppid() != supervisor {
            fail(libc::ESRCH);
        }
        let mut parked = [-1; MAX_FDS];
        for (i, fd) in fds.iter().enumerate() {
            parked[i] = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FD_PARKING);
            if parked[i] < 0 {
                fail(errno());
            }
        }
        for (i, target) in targets.iter().enumerate() {
            // dup2 leaves the new descriptor open across exec.
            if libc::dup2(parked[i], *target) < 0 {
                fail(errno());
            }
        }
        if let Some(cwd) = &prepared.cwd {
            if libc::chdir(cwd.as_ptr()) != 0 {
                fail(errno());
            }
        }
        if let Some((uid, gid)) = identity {
            // Groups first, while still root: the command keeps none of the
            // supervisor's supplementary groups, then the group, then the user.
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                fail(errno());
            }
        }
        // As execvp does: try each candidate; "not here" errors go on to the next, and a
        // permission error is what is reported if nothing else works.
        let mut missing = libc::ENOENT;
        let mut denied = false;
        for path in &prepared.candidates {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            match errno() {
                libc::EACCES => denied = true,
                e @ (libc::ENOENT
                | libc::ENOTDIR
                | libc::ESTALE
                | libc::ENODEV
                | libc::ETIMEDOUT) => missing = e,
                other => fail(other),
            }
        }
        fail(if denied { libc::EACCES } else { missing })
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset only adds valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn request() -> Request {
        Request {
            identity: Some((65534, 65533)),
            cwd: Some("/tmp/work dir".into()),
            program: "/usr/bin/env".into(),
            argv: os(&["sh", "-c", "echo hi", ""]),
            env: os(&["PATH=/bin", "EMPTY=", "A=b=c"]),
            targets: vec![0, 1, 2, 3],
        }
    }

    #[test]
    fn a_request_survives_encoding() {
        let r = request();
        assert_eq!(Request::decode(&r.encode().unwrap()), Ok(r));
        let bare = Request {
            identity: None,
            cwd: None,
            program: "true".into(),
            argv: os(&["true"]),
            env: vec![],
            targets: vec![],
        };
        assert_eq!(Request::decode(&bare.encode().unwrap()), Ok(bare));
    }

    #[test]
    fn nul_bytes_and_an_empty_program_are_refused_before_sending() {
        let mut r = request();
        r.argv.push(OsString::from("a\0b"));
        assert!(r.encode().unwrap_err().contains("argument"));
        let mut r = request();
        r.env.push(OsString::from("X=\0"));
        assert!(r.encode().unwrap_err().contains("environment"));
        let mut r = request();
        r.program = OsString::new();
        assert!(r.encode().is_err());
    }

    #[test]
    fn a_malformed_request_is_refused() {
        let good = request().encode().unwrap();
        // Every strict prefix is incomplete, and extra fields are refused too.
        for end in 0..good.len() {
            assert!(
                Request::decode(&good[..end]).is_err(),
                "prefix of {end} bytes accepted"
            );
        }
        let mut longer = good.clone();
        longer.extend_from_slice(b"extra\0");
        assert!(Request::decode(&longer).is_err());
        let too_many_fds =
            b"\0\0true\x000\x000\x009\x000\x000\x000\x000\x000\x000\x000\x000\x000\0";
        assert!(Request::decode(too_many_fds)
            .unwrap_err()
            .contains("descriptors"));
        assert!(Request::decode(b"x\0\0true\x000\x000\x000\0").is_err());
    }

    #[test]
    fn events_survive_encoding_and_nonsense_is_refused() {
        for e in [
            Event::Spawned { pid: 4242 },
            Event::Failed {
                errno: libc::ENOENT,
            },
            Event::Exited { pid: 77, status: 9 },
        ] {
            assert_eq!(Event::decode(&e.encode()), Some(e));
        }
        assert_eq!(Event::decode(&[0; EVENT_LEN]), None);
        // A pid of 0 or 1 would make a group signal mean "our group" or "everyone".
        assert_eq!(Event::decode(&Event::Spawned { pid: 1 }.encode()), None);
        assert_eq!(
            Event::decode(&Event::Exited { pid: 0, status: 0 }.encode()),
            None
        );
    }

    #[test]
    fn requests_and_descriptors_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let body = request().encode().unwrap();
        send_request(&a, &body, &[OwnedFd::from(w)]).unwrap();
        send_request(&a, b"second", &[]).unwrap();
        let (got, fds) = read_request(&b).unwrap().unwrap();
        assert_eq!(got, body);
        assert_eq!(fds.len(), 1);
        // The passed descriptor is the same socket: what is written to it arrives.
        let mut passed = UnixStream::from(fds.into_iter().next().unwrap());
        passed.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        (&r).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let (got, fds) = read_request(&b).unwrap().unwrap();
        assert_eq!((got.as_slice(), fds.len()), (&b"second"[..], 0));
        drop(a);
        assert!(read_request(&b).unwrap().is_none());
    }

    #[test]
    fn a_malformed_command_line_is_refused() {
        assert_eq!(parse(&os(&["--fd", "5", "--parent", "100"])), Ok((5, 100)));
        for bad in [
            &[][..],
            &["--fd", "5"][..],
            &["--fd", "1", "--parent", "100"][..],
            &["--fd", "x", "--parent", "100"][..],
            &["--fd", "5", "--parent", "1"][..],
            &["--", "sh"][..],
        ] {
            assert!(parse(&os(bad)).is_err(), "{bad:?} was accepted");
        }
    }
}
