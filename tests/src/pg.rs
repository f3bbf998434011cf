//! Real PostgreSQL servers for the scenarios where queens share a database (issue 14): a
//! primary, a synchronous standby streaming from it, `kill -9` of either, promotion.
//!
//! The server binaries are found once per test process ([`bindir`]): `pg_config --bindir`,
//! else the newest `/usr/lib/postgresql/*/bin`, else `PATH`. Without them every test that
//! asks for a cluster fails and says to install Debian's `postgresql` (CI's `.ci/run`
//! does); it never skips.
//!
//! Each [`PgCluster`] lives in its own temp dir (data dir, socket dir, `postgres.log`)
//! inside the dir the test gives it, listens on a free loopback port, and trusts every
//! local connection as the superuser [`USER`]. It runs with `fsync` on, because these tests
//! are about durability. PostgreSQL refuses to run as root, and the tests run as root in
//! CI: then the server-side commands (`initdb`, `postgres`, `pg_ctl`, `pg_basebackup`) run
//! as the `postgres` system user, which owns the cluster's temp dir. Clients (`psql`)
//! connect over TCP and run as whoever runs the test.
//!
//! The postmaster is a child of the test (a [`Proc`]): it dies with the test thread, and
//! its log is printed when a test fails. Its own children (backends, the WAL sender, the
//! checkpointer…) are found in `/proc` by what their command lines name ([`PgProcesses`]):
//! the postmaster's names its data dir, every other server process titles itself
//! `postgres: <cluster name>: …`. [`PgCluster::kill9`] kills all of them; dropping a cluster
//! stops it (`pg_ctl stop -m immediate`) and then kills whatever is left, also while a
//! failed test unwinds, so no server outlives its test.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{dump_logs, pid_alive, pid_state, signal, Proc, Stdout};
use crate::wait::{poll_until, wait_until, DEADLINE};

/// The superuser every cluster is created with (`initdb -U`), and the user in its URLs.
pub const USER: &str = "hive";

/// The database [`PgCluster::primary`] creates, and the one its URLs and `psql` name.
pub const DATABASE: &str = "hive";

/// The system user the server runs as when the tests run as root (created by Debian's
/// `postgresql` package).
pub const SERVER_USER: &str = "postgres";

/// What to install when the binaries are missing, for the panic that says so.
const INSTALL_HINT: &str =
    "install Debian's `postgresql` package (`apt-get install postgresql`; CI's .ci/run does)";

/// The binaries the harness runs; a directory holding all of them is a server installation.
const NEEDED: [&str; 5] = ["initdb", "postgres", "pg_ctl", "pg_basebackup", "psql"];

/// How long `initdb` or `pg_basebackup` may take: seconds when healthy (`initdb` runs the
/// bootstrap backend several times); this bounds a hung one on a loaded 2-core machine.
const SETUP_DEADLINE: Duration = Duration::from_secs(120);

/// How long a server may take to accept connections after it is started, including crash
/// recovery after a `kill -9` (milliseconds for a test's small WAL).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// How long `pg_ctl stop`/`promote` and one `psql` call may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// How long killed server processes may take to be gone (SIGKILL is immediate; this only
/// bounds a stuck kernel).
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// How long dropping a healthy cluster waits for `pg_ctl stop -m immediate` before killing
/// it outright.
const DROP_STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Ports tried for one start: a free port found by binding `127.0.0.1:0` can be taken by
/// another process (another test's cluster) before the server binds it.
const PORT_ATTEMPTS: u32 = 3;

/// Settings for every cluster, appended to `postgresql.conf` after `initdb` (a standby
/// copies them with the data dir). The per-server ones — port, socket dir, cluster name —
/// are on the `postgres` command line instead, so a copy never carries them over.
const CONF: &str = "
# ---- The Hive's test harness (tests/src/pg.rs) ----
listen_addresses = '127.0.0.1'
# These tests are about durability: a commit is on disk (and, with a synchronous standby,
# on the standby's disk) before it is acknowledged.
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = replica
max_wal_senders = 5
# A standby that was down a while can catch up from the primary's WAL.
wal_keep_size = '128MB'
# Small: many clusters may run at once on a small CI machine.
shared_buffers = '16MB'
max_connections = 50
# The server logs to stderr, which the harness sends to postgres.log in the cluster's dir.
logging_collector = off
log_destination = 'stderr'
# The harness finds a cluster's processes by their titles (`postgres: <cluster name>: …`).
update_process_title = on
";

/// The directory holding the PostgreSQL server binaries, found once per test process.
/// Panics, saying what to install, when there is none.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINDIR.get_or_init(find_bindir) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

/// Whether `dir` holds every binary the harness runs.
fn has_server(dir: &Path) -> bool {
    NEEDED.iter().all(|b| dir.join(b).is_file())
}

/// `pg_config --bindir` if it names a server installation (Debian's `/usr/bin/pg_config`
/// from `libpq-dev` alone names `/usr/bin`, which has no `initdb`), else the newest
/// `/usr/lib/postgresql/<major>/bin`, else the first `PATH` entry with the binaries.
fn find_bindir() -> Result<PathBuf, String> {
    let mut looked = Vec::new();
    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return Ok(dir);
            }
            looked.push(format!("`pg_config --bindir` ({})", dir.display()));
        }
        Ok(out) => looked.push(format!("`pg_config --bindir` (failed: {})", out.status)),
        Err(e) => looked.push(format!("`pg_config --bindir` ({e})")),
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| has_server(d)) {
        return Ok(dir);
    }
    looked.push("/usr/lib/postgresql/*/bin".into());
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d)) {
            return Ok(dir);
        }
    }
    looked.push("PATH".into());
    Err(format!(
        "PostgreSQL server binaries ({}) not found; looked in {}. The PostgreSQL tests \
         need them: {INSTALL_HINT}",
        NEEDED.join(", "),
        looked.join(", ")
    ))
}

/// The uid and gid the server runs as: `None` to run as this process (not root), else
/// [`SERVER_USER`]'s. Panics when running as root without that user.
fn server_user() -> Option<(u32, u32)> {
    static USER_IDS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER_IDS.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        match lookup_user(SERVER_USER) {
            Some(ids) => Some(ids),
            None => panic!(
                "the tests run as root, which PostgreSQL refuses, so the harness runs the \
                 server as the `{SERVER_USER}` system user — and there is none: {INSTALL_HINT}"
            ),
        }
    })
}

/// `(uid, gid)` of the user `name`, from the password database. `getpwnam_r`, the
/// reentrant `getpwnam`: tests run on parallel threads.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into `buf`, which
    // outlives every read of it below, and writes at most `buf.len()` bytes there.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

/// A command for one of the PostgreSQL binaries, without the test runner's `PG*`
/// variables (a `PGPORT` or `PGDATA` in a developer's shell must not change a test) and in
/// the C locale (messages the harness reads are in English).
fn pg_command(binary: &str) -> Command {
    let mut cmd = Command::new(bindir().join(binary));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("LC_ALL", "C").env("LANG", "C");
    cmd
}

/// Runs `cmd` to completion with stdin closed, for at most `within` (then kills it), and
/// returns its output if it exited successfully, else what went wrong.
fn run(what: &str, mut cmd: Command, within: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what} ({cmd:?}): {e}"))?;
    // Drained on threads, so a chatty command never blocks on a full pipe while we poll.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = poll_until(within, || match child.try_wait() {
        Ok(Some(status)) => Ok(Ok(status)),
        Ok(None) => Err(()),
        Err(e) => Ok(Err(e)),
    });
    let status = match status {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("cannot wait for {what}: {e}")),
        Err(()) => {
            // Still our unreaped child: the pid cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {within:?}"));
        }
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// The command line of `pid` with its arguments separated by NULs, if it can be read.
fn cmdline(pid: i32) -> Option<Vec<u8>> {
    fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// Every pid in `/proc`.
fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// What identifies one cluster's server processes in `/proc`, kept after the cluster is
/// gone so a test can check that nothing of it still runs. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgProcesses {
    /// The data dir, an argument of the postmaster (and of `pg_ctl`, `pg_basebackup`).
    data_dir: String,
    /// `postgres: <cluster name>: `, the start of every other server process's title.
    title: String,
}

impl PgProcesses {
    /// Whether a command line (arguments separated by NULs) is one of this cluster's.
    fn matches(&self, cmdline: &[u8]) -> bool {
        cmdline.starts_with(self.title.as_bytes())
            || cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == self.data_dir.as_bytes())
    }

    /// The live (not zombie) processes of this cluster right now.
    pub fn pids(&self) -> Vec<i32> {
        all_pids()
            .into_iter()
            .filter(|pid| cmdline(*pid).is_some_and(|c| self.matches(&c)) && pid_alive(*pid))
            .collect()
    }
}

/// One PostgreSQL server and its own temp dir. See the module docs.
#[derive(Debug)]
pub struct PgCluster {
    /// `primary` or `standby`, for labels.
    role: &'static str,
    /// Unique per cluster (the temp dir's name): its `cluster_name`, in every process
    /// title, and a standby's `application_name`.
    name: String,
    port: u16,
    /// Where a standby of this cluster puts its own temp dir.
    parent: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    processes: PgProcesses,
    /// The running postmaster; `None` before the first start and after a stop or kill.
    postmaster: Option<Proc>,
    starts: u32,
    /// Last: removed after every process is gone (kept when the test failed or
    /// `HIVE_TEST_KEEP` is set).
    dir: TempDir,
}

impl PgCluster {
    /// Creates (`initdb`), starts and returns a primary in a new temp dir inside `dir`,
    /// with the database [`DATABASE`]. Returns once it accepts connections.
    ///
    /// A failed test keeps the cluster's dir (as `HIVE_TEST_KEEP` does), so give it a `dir`
    /// that is kept then too, such as a [`crate::Hive`]'s. When the tests run as root,
    /// `dir` is made searchable for [`SERVER_USER`].
    pub fn primary(dir: &Path) -> PgCluster {
        let mut pg = PgCluster::new(dir, "primary");
        let mut initdb = pg.server_command("initdb");
        initdb
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", USER, "--auth=trust", "--encoding=UTF8", "--locale=C"])
            // Only skips flushing the new files to disk before the server starts: no test
            // crashes the machine, and the server itself runs with fsync on.
            .arg("--no-sync");
        if let Err(e) = run("initdb", initdb, SETUP_DEADLINE) {
            panic!("{}: {e}", pg.label());
        }
        let conf = pg.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", conf.display()));
        f.write_all(CONF.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
        drop(f);
        pg.launch(false);
        pg.psql_in("postgres", &format!("CREATE DATABASE {DATABASE}"));
        pg
    }

    /// Creates a standby of `primary` (`pg_basebackup -R`) in a new temp dir next to the
    /// primary's, starts it, and makes it the primary's synchronous standby
    /// (`synchronous_standby_names` naming only it, `synchronous_commit = on`): from then
    /// on a commit on the primary returns once the standby has the commit on disk. Returns
    /// once `pg_stat_replication` shows it `sync`.
    pub fn sync_standby_of(primary: &PgCluster) -> PgCluster {
        let mut pg = PgCluster::new(&primary.parent, "standby");
        let mut backup = pg.server_command("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                USER,
            ])
            .arg("-D")
            .arg(&pg.data)
            // -R: standby.signal and primary_conninfo; -X stream: the WAL to be consistent;
            // fast: checkpoint now rather than spread over minutes.
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        if let Err(e) = run("pg_basebackup", backup, SETUP_DEADLINE) {
            panic!("{} of {}: {e}", pg.label(), primary.label());
        }
        // Our own primary_conninfo, naming this standby so the primary can require it; and
        // none of the primary's synchronous_standby_names (set by ALTER SYSTEM when an
        // earlier standby was made), which would block every commit once this is promoted.
        let auto = pg.data.join("postgresql.auto.conf");
        let old = fs::read_to_string(&auto)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", auto.display()));
        let mut new: String = old
            .lines()
            .filter(|l| {
                let key = l.trim_start();
                !key.starts_with("primary_conninfo")
                    && !key.starts_with("synchronous_standby_names")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        new.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user={USER} application_name={}'\n",
            primary.port, pg.name
        ));
        fs::write(&auto, new).unwrap_or_else(|e| panic!("cannot write {}: {e}", auto.display()));
        pg.launch(false);

        primary.psql_in(
            "postgres",
            &format!(
                "ALTER SYSTEM SET synchronous_standby_names = '\"{}\"'",
                pg.name
            ),
        );
        primary.psql_in("postgres", "ALTER SYSTEM SET synchronous_commit = on");
        primary.psql_in("postgres", "SELECT pg_reload_conf()");
        let query = format!(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{}'",
            pg.name
        );
        wait_until(
            DEADLINE,
            &format!(
                "{} to be the synchronous standby of {}",
                pg.label(),
                primary.label()
            ),
            || match primary.try_psql_in("postgres", &query) {
                Ok(state) if state == "sync" => Ok(()),
                Ok(state) => Err(format!("sync_state {state:?}")),
                Err(e) => Err(e),
            },
        );
        pg
    }

    /// A cluster not yet initialised: its temp dir inside `parent` (owned by the server's
    /// user), names and a port.
    fn new(parent: &Path, role: &'static str) -> PgCluster {
        let user = server_user();
        let parent = fs::canonicalize(parent)
            .unwrap_or_else(|e| panic!("the cluster's parent dir {}: {e}", parent.display()));
        if let Some((uid, gid)) = user {
            make_traversable(&parent, uid, gid);
        }
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(&parent)
            .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", parent.display()));
        let root = dir.path().to_owned();
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a temp dir's name is ASCII")
            .to_owned();
        let sock = root.join("sock");
        fs::create_dir(&sock).unwrap_or_else(|e| panic!("cannot create {}: {e}", sock.display()));
        if let Some((uid, gid)) = user {
            for d in [&root, &sock] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap_or_else(|e| {
                    panic!("cannot chown {} to {SERVER_USER}: {e}", d.display())
                });
            }
        }
        let data = root.join("data");
        let processes = PgProcesses {
            data_dir: data.to_string_lossy().into_owned(),
            title: format!("postgres: {name}: "),
        };
        PgCluster {
            role,
            port: free_port(),
            parent,
            log: root.join("postgres.log"),
            data,
            sock,
            name,
            processes,
            postmaster: None,
            starts: 0,
            dir,
        }
    }

    /// `postgres primary (pg-XXXX, port N)`.
    fn label(&self) -> String {
        format!("postgres {} ({}, port {})", self.role, self.name, self.port)
    }

    /// A command for a server-side binary: as [`SERVER_USER`] when we are root, in the
    /// cluster's dir, with its own `HOME` (not root's, which that user cannot read).
    fn server_command(&self, binary: &str) -> Command {
        let mut cmd = pg_command(binary);
        cmd.current_dir(self.dir.path())
            .env("HOME", self.dir.path());
        if let Some((uid, gid)) = server_user() {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Starts the postmaster and waits until it accepts connections. With `fixed_port`
    /// false a port taken meanwhile by someone else is swapped for another free one.
    fn launch(&mut self, fixed_port: bool) {
        assert!(
            self.postmaster.is_none(),
            "{} is already running",
            self.label()
        );
        for attempt in 1..=PORT_ATTEMPTS {
            self.starts += 1;
            let mut log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
            let _ = writeln!(
                log,
                "===== test harness: postgres start #{} on port {} =====",
                self.starts, self.port
            );
            let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
            drop(log);
            let mut cmd = self.server_command("postgres");
            cmd.arg("-D")
                .arg(&self.data)
                .args(["-p", &self.port.to_string()])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", self.sock.display()))
                .arg("-c")
                .arg(format!("cluster_name={}", self.name));
            let label = self.label();
            // Held by the cluster at once: if this start fails, unwinding drops the
            // cluster, which kills whatever the postmaster started.
            self.postmaster = Some(Proc::spawn(&label, cmd, &self.log, Stdout::Log));
            let started = poll_until(START_DEADLINE, || {
                let proc = self.postmaster.as_mut().expect("just started");
                if let Some(status) = proc.exit_status() {
                    return Ok(Err(status));
                }
                let pid = proc.pid();
                if self
                    .pid_file_status(pid)
                    .is_some_and(|s| s == "ready" || s == "standby")
                {
                    Ok(Ok(()))
                } else {
                    Err(())
                }
            });
            match started {
                Ok(Ok(())) => {
                    // The postmaster says it accepts connections; so must a client.
                    if let Err(e) = self.try_psql_in("postgres", "SELECT 1") {
                        panic!("{label} is up but refuses psql: {e}\n{}", dump_logs());
                    }
                    return;
                }
                Ok(Err(status)) => {
                    // The logs while this start's is still registered for the dump.
                    let logs = dump_logs();
                    self.postmaster = None;
                    let said = fs::read(&self.log)
                        .map(|b| {
                            String::from_utf8_lossy(&b[(offset as usize).min(b.len())..])
                                .into_owned()
                        })
                        .unwrap_or_default();
                    if !fixed_port && attempt < PORT_ATTEMPTS && said.contains("already in use") {
                        self.port = free_port();
                        continue;
                    }
                    panic!("{label} exited while starting ({status})\n{logs}");
                }
                Err(()) => panic!(
                    "{label} did not accept connections within {START_DEADLINE:?}\n{}",
                    dump_logs()
                ),
            }
        }
        unreachable!("the last attempt returns or panics");
    }

    /// The status line of `postmaster.pid` (`starting`, `ready`, `standby`, `stopping`)
    /// if the file is there and written by `pid`: what `pg_ctl start -w` waits on.
    fn pid_file_status(&self, pid: i32) -> Option<String> {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.first()?.trim().parse::<i32>().ok()? != pid {
            return None;
        }
        Some(lines.get(7)?.trim().to_owned())
    }

    /// The pid in `postmaster.pid`, if the file is there.
    fn pid_file_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// `postgres://hive@127.0.0.1:PORT/hive`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid, from `postmaster.pid`. Panics if the server is not running.
    pub fn pid(&self) -> i32 {
        assert!(self.postmaster.is_some(), "{} is not running", self.label());
        self.pid_file_pid().unwrap_or_else(|| {
            panic!(
                "{} is running but {} has no pid",
                self.label(),
                self.data.join("postmaster.pid").display()
            )
        })
    }

    /// Whether the postmaster is running (started, not stopped or killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.postmaster.as_mut().is_some_and(Proc::is_running)
    }

    /// This cluster's temp dir (data dir, socket dir, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server's log (stderr of every start).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its `cluster_name`, and a standby's `application_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What finds this cluster's processes, now or after it is dropped.
    pub fn processes(&self) -> PgProcesses {
        self.processes.clone()
    }

    /// `kill -9` of the server: the postmaster and every process of the cluster, at once,
    /// as a machine losing power would leave it (minus the disk). The postmaster is
    /// frozen (SIGSTOP) first so it neither forks nor restarts children meanwhile.
    /// Returns once none of them is alive. [`PgCluster::start`] recovers it.
    pub fn kill9(&mut self) {
        assert!(
            self.postmaster.is_some(),
            "kill9: {} is not running",
            self.label()
        );
        if let Err(left) = self.kill_all() {
            panic!("kill9: {left}\n{}", dump_logs());
        }
    }

    /// A fast shutdown (`pg_ctl stop -m fast`): sessions are ended, a checkpoint written.
    pub fn stop(&mut self) {
        assert!(
            self.postmaster.is_some(),
            "stop: {} is not running",
            self.label()
        );
        let result = self.pg_ctl_stop("fast", COMMAND_DEADLINE);
        if let Err(e) = result {
            panic!("stop {}: {e}\n{}", self.label(), dump_logs());
        }
        if let Err(left) = self.kill_all() {
            panic!("stop: {left}\n{}", dump_logs());
        }
    }

    /// Starts a stopped or killed cluster again on its port (crash recovery after a
    /// [`PgCluster::kill9`]) and waits until it accepts connections.
    pub fn start(&mut self) {
        self.launch(true);
    }

    /// Promotes a standby (`pg_ctl promote`) and waits until it leaves recovery and
    /// accepts writes.
    pub fn promote(&self) {
        let mut cmd = self.server_command("pg_ctl");
        cmd.args(["promote", "-w", "-t"])
            .arg(START_DEADLINE.as_secs().to_string())
            .arg("-D")
            .arg(&self.data);
        if let Err(e) = run(
            "pg_ctl promote",
            cmd,
            START_DEADLINE + Duration::from_secs(5),
        ) {
            panic!("promote {}: {e}\n{}", self.label(), dump_logs());
        }
        wait_until(
            DEADLINE,
            &format!("{} to leave recovery", self.label()),
            || match self.try_psql("SELECT pg_is_in_recovery()") {
                Ok(r) if r == "f" => Ok(()),
                other => Err(other),
            },
        );
    }

    /// Runs `sql` with `psql -At` in the database [`DATABASE`] and returns its output
    /// (rows one a line, columns separated by `|`, no trailing newline). Panics if it fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(DATABASE, sql)
    }

    /// [`PgCluster::psql`], returning the error (psql's output) instead of panicking: for a
    /// statement that is expected to fail, such as a write on a standby.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.try_psql_in(DATABASE, sql)
    }

    fn psql_in(&self, db: &str, sql: &str) -> String {
        self.try_psql_in(db, sql)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", self.label(), dump_logs()))
    }

    fn try_psql_in(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = pg_command("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", USER, "-d", db, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10");
        let out = run(&format!("psql -c {sql:?}"), cmd, COMMAND_DEADLINE)?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.trim_end_matches('\n').to_owned())
    }

    /// `pg_ctl stop -m <mode>`, waiting up to `within`.
    fn pg_ctl_stop(&self, mode: &str, within: Duration) -> Result<(), String> {
        let mut cmd = self.server_command("pg_ctl");
        cmd.args(["stop", "-m", mode, "-w", "-t"])
            .arg(within.as_secs().max(1).to_string())
            .arg("-D")
            .arg(&self.data);
        run(
            &format!("pg_ctl stop -m {mode}"),
            cmd,
            within + Duration::from_secs(5),
        )
        .map(drop)
    }

    /// Freezes the postmaster, SIGKILLs every process of the cluster (whichever postmaster
    /// `postmaster.pid` names included) until none is left, and reaps the postmaster. Err
    /// names what is still alive at the deadline.
    fn kill_all(&mut self) -> Result<(), String> {
        if let Some(proc) = self.postmaster.as_mut() {
            proc.signal(libc::SIGSTOP);
        }
        let processes = self.processes.clone();
        let mut postmaster = self.postmaster.take();
        let left = poll_until(KILL_DEADLINE, || {
            // The pid in postmaster.pid is among these while it is a live postmaster of
            // this data dir; once that postmaster is dead the file may name a reused pid,
            // which is left alone.
            let pids = processes.pids();
            for pid in &pids {
                signal(*pid, libc::SIGKILL);
            }
            let reaped = match postmaster.as_mut() {
                Some(proc) => {
                    proc.signal(libc::SIGKILL);
                    proc.exit_status().is_some()
                }
                None => true,
            };
            if pids.is_empty() && reaped {
                Ok(())
            } else {
                Err(pids)
            }
        });
        // Dropping the Proc reaps it if it has not been (and prints its log on failure).
        drop(postmaster);
        left.map_err(|pids| {
            format!(
                "processes of {} still alive {KILL_DEADLINE:?} after SIGKILL: {pids:?}",
                self.label()
            )
        })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A clean immediate stop when the server can still act on it; a frozen (SIGSTOP)
        // or killed one is killed outright, so a drop never waits on it.
        let pid = self.postmaster.as_ref().map(Proc::pid);
        let runs = pid.is_some_and(|p| !matches!(pid_state(p), None | Some('T' | 't' | 'Z')));
        if runs {
            if let Err(e) = self.pg_ctl_stop("immediate", DROP_STOP_DEADLINE) {
                eprintln!("dropping {}: {e}; killing it", self.label());
            }
        }
        if let Err(left) = self.kill_all() {
            if std::thread::panicking() {
                eprintln!("{left}");
            } else {
                panic!("{left}");
            }
        }
        let keep = std::env::var_os("HIVE_TEST_KEEP").is_some_and(|v| !v.is_empty());
        if keep || std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "{} dir kept for inspection: {}",
                self.label(),
                self.dir.path().display()
            );
        }
    }
}

/// A libpq multi-host URL naming every cluster, for a client that must find whichever one
/// accepts writes: `postgres://hive@127.0.0.1:P1,127.0.0.1:P2/hive?target_session_attrs=read-write`.
pub fn url_multi(clusters: &[&PgCluster]) -> String {
    multi_host_url(&clusters.iter().map(|c| c.port).collect::<Vec<_>>())
}

fn multi_host_url(ports: &[u16]) -> String {
    assert!(!ports.is_empty(), "a URL needs at least one cluster");
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "postgres://{USER}@{}/{DATABASE}?target_session_attrs=read-write",
        hosts.join(",")
    )
}

/// Lets the server's user reach a cluster dir inside `parent` when we are root: `parent`
/// (a test's temp dir, 0700) gets search permission for others; every dir above it must
/// already have it. Panics naming the first one that does not.
fn make_traversable(parent: &Path, uid: u32, gid: u32) {
    let meta =
        fs::metadata(parent).unwrap_or_else(|e| panic!("cannot stat {}: {e}", parent.display()));
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        fs::set_permissions(parent, fs::Permissions::from_mode(mode | 0o001)).unwrap_or_else(|e| {
            panic!(
                "cannot make {} traversable for {SERVER_USER}: {e}",
                parent.display()
            )
        });
    }
    for dir in parent.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let ok = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        assert!(
            ok,
            "{SERVER_USER} (uid {uid}) cannot reach {}: {} is not searchable for it; put \
             PostgreSQL clusters under a dir it can reach (e.g. a temp dir in /tmp)",
            parent.display(),
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_host_url_lists_every_port_and_asks_for_the_writable_one() {
        assert_eq!(
            multi_host_url(&[5433, 6001]),
            "postgres://hive@127.0.0.1:5433,127.0.0.1:6001/hive?target_session_attrs=read-write"
        );
    }

    #[test]
    fn a_cluster_is_found_by_its_data_dir_argument_or_its_title() {
        let p = PgProcesses {
            data_dir: "/tmp/x/pg-abc/data".into(),
            title: "postgres: pg-abc: ".into(),
        };
        assert!(
            p.matches(b"/usr/lib/postgresql/15/bin/postgres\0-D\0/tmp/x/pg-abc/data\0-p\x005432\0")
        );
        assert!(p.matches(b"postgres: pg-abc: checkpointer \0\0\0"));
        // Another cluster whose path merely starts the same, or whose name is longer.
        assert!(!p.matches(b"postgres\0-D\0/tmp/x/pg-abc/data2\0"));
        assert!(!p.matches(b"postgres: pg-abcd: checkpointer \0"));
        assert!(!p.matches(b"psql\0-c\0SELECT 1\0"));
    }
}
