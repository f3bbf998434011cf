//! The processes under test: a queen started from the release binary (its own data dir,
//! free ports), real drones, and the HTTP client the benchmarks drive the queen with.
//! With `--postgres` the queen stores in a PostgreSQL cluster of the hive's own
//! (`hive_tests::pg`, the harness the HA tests use), optionally with a synchronous standby.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hive_tests::pg::PgCluster;
use serde_json::Value;
use shared::api::Stats;

/// How long a queen may take from spawn to its `ready` line. Generous: a queen reopening a
/// million pending tasks rebuilds its indexes before it prints it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a queen may take to exit after SIGTERM (it drains and flushes first).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> i32 {
        // Linux pids fit an i32 (pid_max is at most 2^22).
        self.0.id() as i32
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling a child process we started and have not reaped.
        unsafe { libc::kill(self.pid(), signal) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A child already reaped by `wait`/`try_wait` is not signalled again (std returns
        // early), so a recycled pid is never hit.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Memory of a process as the kernel accounts it (`/proc/PID/status`).
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident set size now (`VmRSS`), bytes.
    pub rss: u64,
    /// Peak resident set size since start (`VmHWM`), bytes.
    pub hwm: u64,
}

impl Memory {
    pub fn of(pid: i32) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .with_context(|| format!("no value in `{line}`"))?
                .parse()
                .with_context(|| format!("bad value in `{line}`"))?;
            Ok(kb * 1024)
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
        })
    }
}

/// CPU time (user + system) a process has used so far (`/proc/PID/stat`).
pub fn cpu_time(pid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; the fields we want follow its `)`.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after `)`.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("bad /proc/PID/stat field")
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// Bytes a directory tree takes: on disk (allocated blocks) and apparent (file lengths).
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskUsage {
    pub allocated: u64,
    pub apparent: u64,
}

pub fn disk_usage(dir: &Path) -> Result<DiskUsage> {
    use std::os::unix::fs::MetadataExt;
    let mut usage = DiskUsage::default();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let sub = disk_usage(&entry.path())?;
            usage.allocated += sub.allocated;
            usage.apparent += sub.apparent;
        } else {
            usage.allocated += meta.blocks() * 512;
            usage.apparent += meta.len();
        }
    }
    Ok(usage)
}

/// A running queen process and an HTTP client for its API.
#[derive(Debug)]
pub struct Queen {
    proc: Proc,
    pub drones_addr: String,
    pub http: String,
    /// One keep-alive connection pool for the bench's own requests (stats, health, the
    /// failover bench's submits), so none pays for a TCP handshake (ureq's free functions
    /// open a connection per call). Measured submits go over a [`Submitter`] each.
    agent: ureq::Agent,
    /// When the process was spawned and when it printed its `ready` line.
    pub spawned_at: Instant,
    pub ready_at: Instant,
}

impl Queen {
    /// Spawns a queen on `data_dir` with free ports, `env` on top of the bench's defaults,
    /// and waits for its `ready drones=ADDR http=ADDR` line. Its log (warnings and up) goes
    /// to `log`.
    pub fn spawn(
        bin_dir: &Path,
        data_dir: &Path,
        log: &Path,
        sync: bool,
        env: &[(String, String)],
    ) -> Result<Queen> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::new(bin_dir.join("queen"));
        command
            .env("HIVE_QUEEN__LISTEN", "127.0.0.1:0")
            .env("HIVE_QUEEN__HTTP", "127.0.0.1:0")
            .env("HIVE_QUEEN__DATA_DIR", data_dir)
            .env("HIVE_STORAGE__SYNC", sync.to_string())
            .env("HIVE_LOG__LEVEL", "warn")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            command.env(k, v);
        }
        let spawned_at = Instant::now();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .context("spawning the queen")?;
        let stdout = child.stdout.take().context("queen stdout")?;
        let proc = Proc(child);
        // A thread reads the ready line, then keeps draining stdout so a later print can
        // never fail on a closed pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(READY_TIMEOUT)
            .with_context(|| format!("no ready line from the queen within {READY_TIMEOUT:?}"))?;
        let ready_at = Instant::now();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "the queen did not print a ready line (got `{}`); see {}",
                        line.trim(),
                        log.display()
                    )
                })
        };
        Ok(Queen {
            drones_addr: field("drones=")?,
            http: field("http=")?,
            proc,
            // Keep one idle connection per concurrent caller: ureq keeps one per host by
            // default, so threads sharing this agent would otherwise open a fresh TCP
            // connection for most requests.
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(300))
                .max_idle_connections_per_host(256)
                .build(),
            spawned_at,
            ready_at,
        })
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn memory(&self) -> Result<Memory> {
        Memory::of(self.pid())
    }

    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// SIGTERM, then waits for the process to exit; returns how long that took.
    pub fn stop(mut self) -> Result<Duration> {
        let t0 = Instant::now();
        self.proc.signal(libc::SIGTERM);
        loop {
            if let Some(status) = self.proc.0.try_wait()? {
                if !status.success() {
                    bail!("the queen exited with {status} after SIGTERM");
                }
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > STOP_TIMEOUT {
                bail!("the queen did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn agent(&self) -> ureq::Agent {
        self.agent.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        Ok(self.agent.get(&self.url(path)).call()?.into_json()?)
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        Ok(self
            .agent
            .post(&self.url(path))
            .send_json(body)?
            .into_json()?)
    }

    pub fn stats(&self) -> Result<Stats> {
        Ok(serde_json::from_value(self.get("/v1/stats")?)?)
    }

    /// Sends `signal` to the queen without waiting for it (`kill -9`, SIGTERM).
    pub fn signal(&self, signal: libc::c_int) {
        self.proc.signal(signal);
    }

    /// Waits up to `limit` for the process to exit (after a signal), failing if it
    /// exited unsuccessfully.
    pub fn wait_exit(mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.proc.0.try_wait()? {
                if !status.success() {
                    bail!("the queen exited with {status}");
                }
                return Ok(());
            }
            if t0.elapsed() > limit {
                bail!("the queen did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The status of `GET path` (a transport error is an error).
    pub fn status_of(&self, path: &str) -> Result<u16> {
        match self.agent.get(&self.url(path)).call() {
            Ok(r) => Ok(r.status()),
            Err(ureq::Error::Status(code, _)) => Ok(code),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this queen leads: `/readyz` answers 200 (a standby answers 503, and so
    /// does a leader still loading its tasks).
    pub fn wait_leading(&self, limit: Duration) -> Result<()> {
        poll(limit, || Ok(matches!(self.status_of("/readyz"), Ok(200))))
            .context("waiting for the queen to lead (/readyz 200)")
    }

    /// Waits until this queen serves as a standby: `/healthz` says `"role": "standby"`.
    pub fn wait_standby(&self, limit: Duration) -> Result<()> {
        poll(limit, || {
            Ok(self
                .get("/healthz")
                .is_ok_and(|v| v["role"].as_str() == Some("standby")))
        })
        .context("waiting for the queen to stand by (/healthz role standby)")
    }

    pub fn wait_drones(&self, n: u64, limit: Duration) -> Result<()> {
        poll(limit, || Ok(self.stats()?.drones_connected >= n))
            .with_context(|| format!("waiting for {n} drones to connect"))
    }
}

/// `POST`s a JSON body that is already serialized, reading the answer to the end without
/// parsing it (a 5,000-task batch answers with megabytes of task records).
pub fn post_raw(agent: &ureq::Agent, url: &str, body: &str) -> Result<()> {
    let response = agent
        .post(url)
        .set("content-type", "application/json")
        .send_string(body)?;
    // Into a sink: no buffer of ours to clear for every request (this runs on the same
    // two cores as the queen it measures).
    std::io::copy(&mut response.into_reader(), &mut std::io::sink())?;
    Ok(())
}

/// One keep-alive HTTP/1.1 connection to the queen for the measured submits: hyper's
/// client connection, driven by a runtime of this thread's own.
///
/// Not ureq: ureq 2 sends each request's head and body in two `sendto`s and sets the
/// socket's timeouts and checks the pooled connection (`FIONBIO`, a `MSG_PEEK`) on every
/// request, ~15 system calls of the client's per submit on the two CPUs the queen runs
/// on, and the queen, having read the head, waits for the body in another pass of its
/// event loop. hyper writes the head and the body in one `writev`, as
/// `../shared/peers/beanstalk-bench` writes each `put` in one `write`, so both systems are
/// measured with clients of the same kind (docs/performance.md, "Issue 16, eighth
/// session").
pub struct Submitter {
    rt: tokio::runtime::Runtime,
    sender: Sender,
    host: String,
}

/// How long one submit (or connecting) may take before the bench gives up on the queen.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(300);

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

impl Submitter {
    /// Connects to the queen's HTTP address `http` (`host:port`).
    pub fn connect(http: &str) -> Result<Submitter> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for a submitter")?;
        let sender = rt.block_on(open(http))?;
        Ok(Submitter {
            rt,
            sender,
            host: http.to_string(),
        })
    }

    /// `POST path` with a JSON body that is already serialized; fails unless the answer is
    /// a success, which is read to the end and dropped (a 5,000-task batch answers with
    /// megabytes of task records).
    pub fn post(&mut self, path: &str, body: String) -> Result<()> {
        self.send(path, body, false).map(drop)
    }

    /// As [`Submitter::post`], and returns the answer's body.
    pub fn post_answer(&mut self, path: &str, body: String) -> Result<Vec<u8>> {
        self.send(path, body, true)
    }

    fn send(&mut self, path: &str, body: String, keep: bool) -> Result<Vec<u8>> {
        use http_body_util::BodyExt;
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let (host, sender) = (&self.host, &mut self.sender);
        let sent = async move {
            // The queen closes a keep-alive connection idle for its header timeout: open
            // another before sending (never after: a POST sent may have been taken).
            if sender.is_closed() || sender.ready().await.is_err() {
                *sender = open(host).await?;
                sender.ready().await?;
            }
            let response = sender.send_request(request).await?;
            let status = response.status();
            let mut body = response.into_body();
            let mut text = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    // Kept when asked for, and the start of an error's.
                    if keep || (!status.is_success() && text.len() < 1024) {
                        text.extend_from_slice(&data);
                    }
                }
            }
            if !status.is_success() {
                bail!("{status}: {}", String::from_utf8_lossy(&text).trim());
            }
            Ok(text)
        };
        self.rt
            .block_on(async { tokio::time::timeout(SUBMIT_TIMEOUT, sent).await })
            .map_err(|_| anyhow::anyhow!("no answer within {SUBMIT_TIMEOUT:?}"))
            .and_then(|answered| answered)
            .with_context(|| format!("POST http://{}{path}", self.host))
    }
}

/// Opens a connection to the queen at `http` and starts its task on this thread's runtime
/// (it runs whenever the thread waits for an answer).
async fn open(http: &str) -> Result<Sender> {
    let opened = async {
        let stream = tokio::net::TcpStream::connect(http).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        // Its error, if any, is the next request's.
        tokio::spawn(conn);
        anyhow::Ok(sender)
    };
    tokio::time::timeout(SUBMIT_TIMEOUT, opened)
        .await
        .map_err(|_| anyhow::anyhow!("no connection within {SUBMIT_TIMEOUT:?}"))
        .and_then(|opened| opened)
        .with_context(|| format!("connecting to the queen at {http}"))
}

/// Where the queen stores: sled in its data dir (the default), or PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    #[default]
    Sled,
    /// A fresh primary cluster per trial.
    Postgres,
    /// A fresh primary and a synchronous standby per trial: a commit is acknowledged once
    /// it is on both servers' disks.
    PostgresSyncStandby,
}

impl Engine {
    pub fn from_flags(postgres: bool, sync_standby: bool) -> Engine {
        match (postgres, sync_standby) {
            (_, true) => Engine::PostgresSyncStandby,
            (true, false) => Engine::Postgres,
            (false, false) => Engine::Sled,
        }
    }

    pub fn is_postgres(self) -> bool {
        self != Engine::Sled
    }

    /// For the settings line and every JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Postgres => "postgres",
            Engine::PostgresSyncStandby => "postgres+sync-standby",
        }
    }
}

/// The queen's storage settings: the engine, and `[storage] sync` (sled only).
#[derive(Debug, Clone, Copy, Default)]
pub struct Storage {
    pub sync: bool,
    pub engine: Engine,
}

impl Storage {
    /// The settings every report of a mode that can run on PostgreSQL carries.
    pub fn settings(self) -> Value {
        let mut s = serde_json::json!({"engine": self.engine.name(), "sync": self.sync});
        if self.engine.is_postgres() {
            s["postgres"] = Value::String(PG_SETTINGS.into());
        }
        s
    }
}

/// What the clusters run with, for the record: `hive_tests::pg`'s settings, unchanged.
pub const PG_SETTINGS: &str =
    "hive_tests::pg harness: fsync on, synchronous_commit on, shared_buffers 16MB, loopback TCP";

/// A PostgreSQL primary, and its synchronous standby if asked for, in a temp dir of their
/// own. Dropping it stops both servers (`PgCluster`'s drop) and then removes the dir.
#[derive(Debug)]
pub struct Postgres {
    /// Declared first, dropped first: the standby goes before its primary.
    _standby: Option<PgCluster>,
    pub primary: PgCluster,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Creates and starts the clusters `engine` asks for; `None` for sled.
    pub fn start(engine: Engine) -> Result<Option<Postgres>> {
        if !engine.is_postgres() {
            return Ok(None);
        }
        let dir = tempfile::Builder::new()
            .prefix("hive-bench-pg-")
            .tempdir()?;
        let primary = harness("starting a PostgreSQL primary", || {
            PgCluster::primary(dir.path())
        })?;
        let standby = if engine == Engine::PostgresSyncStandby {
            Some(harness("starting a synchronous standby", || {
                PgCluster::sync_standby_of(&primary)
            })?)
        } else {
            None
        };
        Ok(Some(Postgres {
            _standby: standby,
            primary,
            _dir: dir,
        }))
    }

    /// The environment that points a queen at the primary.
    pub fn queen_env(&self) -> Vec<(String, String)> {
        vec![
            ("HIVE_STORAGE__BACKEND".into(), "postgres".into()),
            ("HIVE_POSTGRES__URL".into(), self.primary.url()),
        ]
    }
}

/// Runs a `hive_tests::pg` call, which panics (after printing what went wrong and the
/// server's log) when a server cannot be set up, and turns that panic into an error.
fn harness<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| anyhow::anyhow!("{what} failed (the reason is printed above)"))
}

/// A queen on its own temporary data dir, and the binaries to start drones with.
#[derive(Debug)]
pub struct Hive {
    /// Declared first, so dropped (killed) before its database and its dir go.
    pub queen: Queen,
    /// The database with `--postgres`: stopped after the queen.
    pub postgres: Option<Postgres>,
    /// Holds `data/` (the queen's data dir) and `queen.log`; removed when dropped.
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    sync: bool,
    env: Vec<(String, String)>,
}

impl Hive {
    pub fn start(bin_dir: &Path, sync: bool) -> Result<Hive> {
        Hive::start_with(bin_dir, sync, Vec::new())
    }

    /// A hive on `storage`: with PostgreSQL, fresh clusters of its own, and returned once
    /// its queen leads (`/readyz` 200).
    pub fn start_on(bin_dir: &Path, storage: Storage) -> Result<Hive> {
        let postgres = Postgres::start(storage.engine)?;
        let env = postgres
            .as_ref()
            .map(Postgres::queen_env)
            .unwrap_or_default();
        let mut hive = Hive::start_with(bin_dir, storage.sync, env)?;
        if postgres.is_some() {
            hive.queen
                .wait_leading(Duration::from_secs(120))
                .with_context(|| format!("see {}", hive.dir.path().join("queen.log").display()))?;
        }
        hive.postgres = postgres;
        Ok(hive)
    }

    /// A hive whose queen also gets `env` (config overrides `HIVE_<SECTION>__<KEY>`).
    pub fn start_with(bin_dir: &Path, sync: bool, env: Vec<(String, String)>) -> Result<Hive> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("data"))?;
        let queen = Queen::spawn(
            bin_dir,
            &dir.path().join("data"),
            &dir.path().join("queen.log"),
            sync,
            &env,
        )?;
        Ok(Hive {
            queen,
            postgres: None,
            dir,
            bin_dir: bin_dir.to_path_buf(),
            sync,
            env,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the queen with SIGTERM (returning how long it took to exit) and starts a new
    /// one on the same data dir, returned once it printed its ready line.
    pub fn restart(self) -> Result<(Duration, Hive)> {
        let Hive {
            queen,
            postgres,
            dir,
            bin_dir,
            sync,
            env,
        } = self;
        let stopped_in = queen.stop()?;
        let queen = Queen::spawn(
            &bin_dir,
            &dir.path().join("data"),
            &dir.path().join("queen.log"),
            sync,
            &env,
        )?;
        Ok((
            stopped_in,
            Hive {
                queen,
                postgres,
                dir,
                bin_dir,
                sync,
                env,
            },
        ))
    }

    /// A real drone process.
    pub fn drone(&self, name: &str, slots: u32) -> Result<Proc> {
        self.drone_with(name, slots, &[])
    }

    /// A real drone process with more flags.
    pub fn drone_with(&self, name: &str, slots: u32, extra: &[&str]) -> Result<Proc> {
        Ok(Proc(
            Command::new(self.bin_dir.join("drone"))
                .args([
                    "--queen",
                    &self.queen.drones_addr,
                    "--slots",
                    &slots.to_string(),
                    "--name",
                    name,
                ])
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }
}

/// Calls `done` every 5 ms until it says yes, or fails after `limit`.
pub fn poll(limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Reads one request of `conn` (head and a `content-length` body); `None` at its end.
    fn read_request(conn: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            let text = String::from_utf8_lossy(buf).to_string();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= head_end + 4 + length {
                    let request =
                        String::from_utf8_lossy(&buf[..head_end + 4 + length]).to_string();
                    buf.drain(..head_end + 4 + length);
                    return Some(request);
                }
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    #[test]
    fn a_submitter_keeps_its_connection_through_an_error_and_opens_another_once_closed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let addr = listener.local_addr().expect("an address").to_string();
        // The first connection is closed after two requests (as the queen closes an idle
        // one); the second serves until the client goes.
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (connection, most) in [(1, 2), (2, usize::MAX)] {
                let (mut conn, _) = listener.accept().expect("accepts");
                let mut buf = Vec::new();
                let mut served = 0;
                while served < most {
                    let Some(request) = read_request(&mut conn, &mut buf) else {
                        break;
                    };
                    let answer = if request.ends_with("bad") {
                        "HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\nno such kind"
                    } else {
                        "HTTP/1.1 201 Created\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
                    };
                    conn.write_all(answer.as_bytes()).expect("answers");
                    seen.push((connection, request));
                    served += 1;
                }
            }
            seen
        });
        let mut submitter = Submitter::connect(&addr).expect("connects");
        let answer = submitter
            .post_answer("/v1/tasks", r#"{"kind":"echo"}"#.into())
            .expect("201 is a success");
        assert_eq!(answer, br#"{"a":1}"#);
        let err = submitter
            .post("/v1/tasks/batch", "bad".into())
            .expect_err("400 is an error");
        let err = format!("{err:#}");
        assert!(
            err.contains("/v1/tasks/batch") && err.contains("400") && err.contains("no such kind"),
            "{err}"
        );
        // Once the client has seen the close, the next submit goes over a new connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !submitter.sender.is_closed() {
            assert!(Instant::now() < deadline, "the close was never seen");
            submitter
                .rt
                .block_on(tokio::time::sleep(Duration::from_millis(1)));
        }
        submitter
            .post("/v1/tasks", r#"{"kind":"echo"}"#.into())
            .expect("a closed connection is replaced before sending");
        drop(submitter);
        let seen = server.join().expect("the server ran");
        let on: Vec<_> = seen.iter().map(|(connection, _)| *connection).collect();
        assert_eq!(on, [1, 1, 2], "{seen:?}");
        let first = &seen[0].1;
        assert!(first.starts_with("POST /v1/tasks HTTP/1.1\r\n"), "{first}");
        assert!(
            first
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{first}"
        );
        assert!(first.ends_with(r#"{"kind":"echo"}"#), "{first}");
        assert!(
            seen[1].1.starts_with("POST /v1/tasks/batch "),
            "{}",
            seen[1].1
        );
    }
}
