//! The processes under test: a queen started from the release binary (its own data dir,
//! free ports), real drones, and the HTTP client the benchmarks drive the queen with.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
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
    /// One keep-alive connection pool for every request, so a measured request does not
    /// pay for a TCP handshake (ureq's free functions open a connection per call).
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
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(300))
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
    let mut reader = response.into_reader();
    let mut buf = [0u8; 64 * 1024];
    while reader.read(&mut buf)? > 0 {}
    Ok(())
}

/// A queen on its own temporary data dir, and the binaries to start drones with.
#[derive(Debug)]
pub struct Hive {
    /// Holds `data/` (the queen's data dir) and `queen.log`; removed when dropped.
    dir: tempfile::TempDir,
    pub queen: Queen,
    bin_dir: PathBuf,
    sync: bool,
    env: Vec<(String, String)>,
}

impl Hive {
    pub fn start(bin_dir: &Path, sync: bool) -> Result<Hive> {
        Hive::start_with(bin_dir, sync, Vec::new())
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
            dir,
            queen,
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
            dir,
            queen,
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
                dir,
                queen,
                bin_dir,
                sync,
                env,
            },
        ))
    }

    /// A real drone process.
    pub fn drone(&self, name: &str, slots: u32) -> Result<Proc> {
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
