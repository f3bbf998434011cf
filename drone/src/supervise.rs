//! The supervisor shim every `exec` task runs under: `drone __supervise --status-fd N --
//! prog args...`.
//!
//! Why a shim: G6 (docs/GUARANTEES.md) says a drone that dies takes its children with it, including after
//! `kill -9` and including grandchildren (`sh -c 'sleep 100 & ...'`). The kernel can tell a
//! child that its parent died (`PR_SET_PDEATHSIG`), but only the direct child, and only if
//! the child has not exec'd into a program that resets it or ignores the signal. So the
//! drone starts this shim (its own binary) with a parent-death signal of SIGUSR2 and as the
//! leader of a new process group; the shim starts the real command in that same group and
//! waits. When the drone dies the shim gets SIGUSR2 and SIGKILLs its whole group: the
//! command and everything it started. The drone itself stops a task by signalling the
//! group, whose id is the shim's pid.
//!
//! The shim reports whether it could start the command through the status pipe (fd `N`):
//! closed without a word means started; a line of text is the spawn error. That keeps
//! "no such program" apart from a command that ran and exited 127.
//!
//! The shim's exit mirrors the command's: the same exit code, or death by the same signal,
//! so the drone reports exactly what the command did.
//!
//! The shim runs with the drone's privileges, so nothing a payload chose may reach it
//! before its `main`: the drone hands it the task's environment with every name prefixed
//! by [`TASK_ENV_PREFIX`] (the dynamic loader would act on a bare `LD_PRELOAD` as it loads
//! the shim, running the payload's code as the drone's user), and the shim strips the
//! prefix for the command. When the policy says whom tasks run as (`--uid`/`--gid`), the
//! shim stays root and switches only the command, so the command can neither signal nor
//! trace the shim that must outlive it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

/// The hidden first argument that turns the drone binary into the shim. `main.rs` checks
/// for it before parsing the command line.
pub const SUBCOMMAND: &str = "__supervise";

/// The flag that names the status pipe's file descriptor.
pub const STATUS_FD_FLAG: &str = "--status-fd";

/// The flags that give the user and group the command runs as (both or neither).
pub const UID_FLAG: &str = "--uid";
pub const GID_FLAG: &str = "--gid";

/// The flag that sets the command's `argv[0]` when the program is given by a resolved
/// path, so the command still sees the name the task used.
pub const ARG0_FLAG: &str = "--arg0";

/// The prefix of every variable the drone passes for the command (see the module docs).
/// The shim's own environment holds nothing else.
pub const TASK_ENV_PREFIX: &str = "HIVE_SUPERVISE_ENV__";

/// The signal the kernel sends the shim when the thread that started it (in the drone)
/// goes away. SIGUSR2 because no task tooling sends it to a process group by habit.
pub const PARENT_DEATH_SIGNAL: libc::c_int = libc::SIGUSR2;

/// What the shim exits with when it could not start the command, like a shell's
/// "command not found". The drone reads the reason from the status pipe, not from this.
const EXIT_NOT_STARTED: i32 = 127;

/// What the shim exits with when it was started wrongly (a drone bug, not a task's).
const EXIT_USAGE: i32 = 2;

/// Signals the shim blocks and handles on its own thread: the parent-death signal, and
/// the polite stop signals the drone (or a terminal) sends to the whole group, which are
/// meant for the command, not for the shim that must outlive it to report its status.
const HANDLED: [libc::c_int; 4] = [
    PARENT_DEATH_SIGNAL,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
];

/// The parsed shim command line.
#[derive(Debug, PartialEq)]
struct Invocation {
    status_fd: Option<RawFd>,
    /// The user and group to run the command as; `None` keeps the shim's.
    identity: Option<(libc::uid_t, libc::gid_t)>,
    arg0: Option<OsString>,
    program: OsString,
    args: Vec<OsString>,
}

fn parse(args: &[OsString]) -> Result<Invocation, String> {
    let mut status_fd = None;
    let mut uid = None;
    let mut gid = None;
    let mut arg0 = None;
    let mut rest = args.iter();
    let number = |flag: &str, value: Option<&OsString>| {
        value
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    loop {
        match rest.next() {
            Some(a) if a == STATUS_FD_FLAG => {
                let fd = rest
                    .next()
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<RawFd>().ok())
                    .filter(|fd| *fd > 2)
                    .ok_or_else(|| format!("{STATUS_FD_FLAG} needs a descriptor number above 2"))?;
                status_fd = Some(fd);
            }
            Some(a) if a == UID_FLAG => uid = Some(number(UID_FLAG, rest.next())?),
            Some(a) if a == GID_FLAG => gid = Some(number(GID_FLAG, rest.next())?),
            Some(a) if a == ARG0_FLAG => {
                arg0 = Some(
                    rest.next()
                        .cloned()
                        .ok_or_else(|| format!("{ARG0_FLAG} needs a value"))?,
                );
            }
            Some(a) if a == "--" => break,
            Some(other) => return Err(format!("unexpected argument {other:?}, expected `--`")),
            None => return Err("missing `-- PROGRAM [ARGS...]`".to_owned()),
        }
    }
    let identity = match (uid, gid) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        (None, None) => None,
        _ => return Err(format!("{UID_FLAG} and {GID_FLAG} go together")),
    };
    let program = rest
        .next()
        .cloned()
        .ok_or_else(|| "missing the program after `--`".to_owned())?;
    Ok(Invocation {
        status_fd,
        identity,
        arg0,
        program,
        args: rest.cloned().collect(),
    })
}

/// The command's environment: the shim's own variables that carry [`TASK_ENV_PREFIX`],
/// without it.
fn task_env(own: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    own.filter_map(|(name, value)| {
        name.as_bytes()
            .strip_prefix(TASK_ENV_PREFIX.as_bytes())
            .map(|bare| (OsStr::from_bytes(bare).to_owned(), value))
    })
    .collect()
}

/// Runs the shim; `args` are the arguments after [`SUBCOMMAND`]. Returns the exit code
/// (when the command was killed by a signal, the shim dies by that signal instead).
pub fn main(args: Vec<OsString>) -> i32 {
    let inv = match parse(&args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("drone {SUBCOMMAND}: {e}");
            return EXIT_USAGE;
        }
    };

    // Block before any thread exists so every thread inherits the mask and the signals
    // can only be taken by the watcher's sigwait. A parent-death signal that arrived
    // before this line killed us by its default action, which is right: no command yet.
    let set = signal_set(&HANDLED);
    // SAFETY: `set` is a valid, initialised sigset_t; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }

    let status = inv.status_fd.map(|fd| {
        // The command must not inherit the status pipe, or the drone would wait for its
        // end of file as long as the command runs.
        // SAFETY: fcntl on a descriptor number has no memory effects; a bad fd is EBADF.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the drone passed us this descriptor (it is open in this process and
        // nothing else here uses it), so taking ownership closes it exactly once.
        unsafe { File::from_raw_fd(fd) }
    });

    if let Err(e) = std::thread::Builder::new()
        .name("watch-signals".into())
        .spawn(move || watch_signals(set))
    {
        // Without the watcher a dying drone could leave the command behind, which is the
        // one thing the shim exists to prevent: refuse to start it.
        report_not_started(status, &inv.program, &format!("no signal watcher: {e}"));
        return EXIT_NOT_STARTED;
    }

    // The command stays in our process group with our stdio (the drone's pipes). Its
    // signal mask must be emptied by hand: a blocked mask survives fork and exec, and a
    // command that cannot receive SIGTERM cannot be stopped politely.
    let mut command = Command::new(&inv.program);
    command
        .args(&inv.args)
        .env_clear()
        .envs(task_env(std::env::vars_os()));
    if let Some(arg0) = &inv.arg0 {
        command.arg0(arg0);
    }
    let empty = signal_set(&[]);
    let identity = inv.identity;
    // SAFETY: runs in the forked child before exec and only makes async-signal-safe calls
    // (pthread_sigmask on a set built before the fork, setgroups, setgid, setuid) and
    // allocates nothing (an OS error is a plain code).
    unsafe {
        command.pre_exec(move || {
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if let Some((uid, gid)) = identity {
                // Groups first, while still root: the command keeps none of the shim's
                // supplementary groups, then the group, then the user (after which no
                // more changes are allowed).
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            report_not_started(status, &inv.program, &e.to_string());
            return EXIT_NOT_STARTED;
        }
    };
    // Closing the status pipe tells the drone the command started.
    drop(status);

    match child.wait() {
        Ok(exit) => match (exit.code(), exit.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => die_by(sig),
            (None, None) => EXIT_NOT_STARTED,
        },
        Err(e) => {
            eprintln!("drone {SUBCOMMAND}: lost track of {:?}: {e}", inv.program);
            // Do not leave the command running unwatched.
            kill_own_group();
            EXIT_NOT_STARTED
        }
    }
}

fn report_not_started(status: Option<File>, program: &OsStr, why: &str) {
    let message = format!("could not start {}: {why}", program.to_string_lossy());
    match status {
        Some(mut f) => {
            // If the drone is gone there is nobody to tell; nothing else to do.
            let _ = f.write_all(message.as_bytes());
        }
        None => eprintln!("drone {SUBCOMMAND}: {message}"),
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

/// Waits for the blocked signals forever.
fn watch_signals(set: libc::sigset_t) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` and `sig` are valid for the call.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            continue;
        }
        if sig == PARENT_DEATH_SIGNAL {
            // The drone died: its leases will be requeued, so nothing in this group may
            // keep running. This kills the shim too, which is fine: nobody is waiting.
            kill_own_group();
        }
        // SIGTERM/SIGINT/SIGHUP went to the whole group, so the command got them too.
        // The shim stays to report how the command ends; if it does not end, the drone
        // SIGKILLs the group after its grace period.
    }
}

fn kill_own_group() {
    // SAFETY: getpgrp cannot fail; kill with a negative pid signals our own group, whose
    // id is our pid (we are its leader), never pid 1 or "all processes".
    unsafe {
        let pgrp = libc::getpgrp();
        if pgrp > 1 {
            libc::kill(-pgrp, libc::SIGKILL);
        }
    }
}

/// Dies by `sig` like the command did, so the drone sees the real cause; returns the
/// shell-style code 128+sig only if the signal does not end the process.
fn die_by(sig: libc::c_int) -> i32 {
    // SAFETY: plain libc calls with valid arguments. Core dumps are switched off first so
    // a command that crashed does not also make the shim write a core file.
    unsafe {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let only = signal_set(&[sig]);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
        libc::raise(sig);
    }
    128 + sig
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_command_line_is_status_fd_then_dashes_then_the_program() {
        assert_eq!(
            parse(&os(&["--status-fd", "7", "--", "sh", "-c", "echo hi"])),
            Ok(Invocation {
                status_fd: Some(7),
                identity: None,
                arg0: None,
                program: "sh".into(),
                args: os(&["-c", "echo hi"]),
            })
        );
        assert_eq!(parse(&os(&["--", "true"])).map(|i| i.status_fd), Ok(None));
        assert_eq!(
            parse(&os(&[
                "--uid",
                "65534",
                "--gid",
                "65533",
                "--arg0",
                "sh",
                "--",
                "/usr/bin/dash"
            ])),
            Ok(Invocation {
                status_fd: None,
                identity: Some((65534, 65533)),
                arg0: Some("sh".into()),
                program: "/usr/bin/dash".into(),
                args: vec![],
            })
        );
    }

    #[test]
    fn only_prefixed_variables_reach_the_command() {
        let own = [
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("HIVE_SUPERVISE_ENV__LD_PRELOAD", "/tmp/task.so"),
            ("HIVE_SUPERVISE_ENV__PATH", "/bin"),
            ("HIVE_SUPERVISE_ENV__HIVE_SUPERVISE_ENV__X", "nested"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = task_env(own.into_iter());
        let expected = [
            ("LD_PRELOAD", "/tmp/task.so"),
            ("PATH", "/bin"),
            ("HIVE_SUPERVISE_ENV__X", "nested"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        assert_eq!(env, expected);
    }

    #[test]
    fn a_malformed_command_line_is_refused() {
        for bad in [
            &[][..],
            &["sh"][..],
            &["--"][..],
            &["--status-fd", "1", "--", "sh"][..],
            &["--status-fd", "x", "--", "sh"][..],
            &["--uid", "1", "--", "sh"][..],
            &["--uid", "x", "--gid", "1", "--", "sh"][..],
            &["--arg0"][..],
        ] {
            assert!(parse(&os(bad)).is_err(), "{bad:?} was accepted");
        }
    }
}
