//! A fake queen speaking the real protocol (shared types, shared codec), plus helpers to
//! run a drone in-process or as the real binary and to watch processes. Waits go through
//! the shared `hive_testkit::wait_until_async`.

#![allow(dead_code)]

use std::future::ready;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
pub use hive_testkit::wait_until_async;
use serde_json::Value;
use shared::frame;
use shared::protocol::{
    Ack, AckStatus, Assign, DroneMessage, Held, Hello, QueenMessage, Reject, RejectCode, Welcome,
    PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use shared::{Fence, TaskId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use drone::config::QueenAddrs;
use drone::{Config, DroneError, Shutdown};

/// How long a test waits for anything the drone should do promptly. Generous for a
/// loaded 2-core CI machine, yet a hang still fails in seconds.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// The heartbeat interval the fake queen asks for: fast, so tests that wait for a
/// heartbeat finish quickly.
pub const HEARTBEAT_MS: u64 = 100;

/// The heartbeat timeout the fake queen's welcome gives.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 10 * HEARTBEAT_MS;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug")),
        )
        .with_test_writer()
        .try_init();
}

pub struct FakeQueen {
    listener: TcpListener,
    pub addr: SocketAddr,
    /// Set: the queen speaks only TLS, with this certificate.
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for FakeQueen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeQueen")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl FakeQueen {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Ok(FakeQueen {
            listener,
            addr,
            tls: None,
        })
    }

    /// A queen that speaks only TLS, presenting `cert` (with its `key`).
    pub async fn start_tls(cert: &Path, key: &Path) -> Result<Self> {
        let config = hive_tls::server_config(cert, key, None)?;
        let mut queen = FakeQueen::start().await?;
        queen.tls = Some(TlsAcceptor::from(config));
        Ok(queen)
    }

    /// The next drone connection.
    pub async fn accept(&self) -> Result<Conn> {
        let (stream, _) = tokio::time::timeout(DEADLINE, self.listener.accept())
            .await
            .context("no drone connected in time")??;
        let stream: Box<dyn Io> = match &self.tls {
            None => Box::new(stream),
            Some(tls) => Box::new(
                tokio::time::timeout(DEADLINE, tls.accept(stream))
                    .await
                    .context("no TLS handshake in time")?
                    .context("the TLS handshake failed")?,
            ),
        };
        Ok(Conn {
            framed: Framed::new(stream, frame::codec(frame::DEFAULT_MAX_FRAME_LEN)),
            encoding: frame::Encoding::Json,
        })
    }
}

/// An address nothing listens on: a port that was free a moment ago. Connecting to it is
/// refused at once.
pub fn dead_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A queen that answers nothing: the kernel completes the drone's connect (the listen
/// backlog), and no hello is ever answered. A drone that dials it waits out its welcome
/// timeout; keep the listener alive for as long as that must hold.
pub fn black_hole() -> Result<std::net::TcpListener> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?)
}

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Conn {
    framed: Framed<Box<dyn Io>, LengthDelimitedCodec>,
    /// How frames after the welcome are written, both ways (the welcome chose it).
    encoding: frame::Encoding,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    pub async fn send(&mut self, message: QueenMessage) -> Result<()> {
        self.framed.send(self.encoding.encode(&message)?).await?;
        Ok(())
    }

    /// The next message, whatever it is.
    pub async fn recv(&mut self) -> Result<DroneMessage> {
        let body = tokio::time::timeout(DEADLINE, self.framed.next())
            .await
            .context("the drone sent nothing in time")?
            .ok_or_else(|| anyhow!("the drone closed the connection"))??;
        Ok(self.encoding.decode(&body)?)
    }

    /// The first message `pick` accepts, skipping others (heartbeats mostly).
    pub async fn recv_where<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&DroneMessage) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.recv())
                .await
                .with_context(|| format!("waited in vain for {what}"))??;
            if let Some(found) = pick(&message) {
                return Ok(found);
            }
        }
    }

    /// Reads the hello and welcomes the drone (as a single queen: no epoch).
    pub async fn welcome(&mut self) -> Result<Hello> {
        self.welcome_in(None).await
    }

    /// Reads the hello and welcomes the drone as the leader of term `epoch`.
    pub async fn welcome_in(&mut self, epoch: Option<u64>) -> Result<Hello> {
        self.welcome_with(epoch, None).await
    }

    /// Reads the hello and welcomes the drone, promising pongs when `pongs` says so (this
    /// fake never sends them: a test that promises them plays a queen gone silent, or
    /// sends its own).
    pub async fn welcome_with(&mut self, epoch: Option<u64>, pongs: Option<bool>) -> Result<Hello> {
        let hello = self.hello().await?;
        self.send(QueenMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: HEARTBEAT_MS,
            heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
            epoch,
            pongs,
            encoding: None,
        }))
        .await?;
        Ok(hello)
    }

    /// Reads the hello and welcomes the drone choosing `encoding` (named as on the wire,
    /// offered or not); frames after the welcome use it.
    pub async fn welcome_encoding(&mut self, encoding: frame::Encoding) -> Result<Hello> {
        let hello = self.hello().await?;
        self.send(QueenMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: HEARTBEAT_MS,
            heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
            epoch: None,
            pongs: None,
            encoding: Some(encoding.name().to_owned()),
        }))
        .await?;
        self.encoding = encoding;
        Ok(hello)
    }

    /// Reads the hello and rejects it as a standby does, naming `leader` if given.
    pub async fn reject_not_leader(&mut self, leader: Option<String>) -> Result<Hello> {
        let hello = self.hello().await?;
        self.send(QueenMessage::Reject(Reject {
            reason: "this queen is a standby".into(),
            supported_versions: SUPPORTED_VERSIONS.to_vec(),
            code: Some(RejectCode::NotLeader),
            leader,
        }))
        .await?;
        Ok(hello)
    }

    /// The first message, which must be a hello.
    pub async fn hello(&mut self) -> Result<Hello> {
        match self.recv().await? {
            DroneMessage::Hello(h) => Ok(h),
            other => bail!("expected a hello first, got {other:?}"),
        }
    }

    /// Waits for the drone to close this connection, failing if it sends anything first.
    pub async fn closed_by_the_drone(&mut self) -> Result<()> {
        match tokio::time::timeout(DEADLINE, self.framed.next()).await {
            Err(_) => bail!("the drone kept the connection open"),
            Ok(None | Some(Err(_))) => Ok(()),
            Ok(Some(Ok(body))) => bail!(
                "the drone sent {:?} instead of closing",
                self.encoding.decode::<DroneMessage>(&body)
            ),
        }
    }

    pub async fn assign(&mut self, assign: Assign) -> Result<()> {
        self.send(QueenMessage::Assign(assign)).await
    }

    /// Sends several assigns in one write, so the drone reads them in one go.
    pub async fn assign_all(&mut self, assigns: &[Assign]) -> Result<()> {
        for a in assigns {
            self.framed
                .feed(self.encoding.encode(&QueenMessage::Assign(a.clone()))?)
                .await?;
        }
        SinkExt::<Bytes>::flush(&mut self.framed).await?;
        Ok(())
    }

    pub async fn ack(&mut self, task_id: TaskId, fence: Fence) -> Result<()> {
        self.send(QueenMessage::Ack(Ack {
            task_id,
            fence,
            status: AckStatus::Recorded,
        }))
        .await
    }

    /// The outcome the drone reports for `task_id`.
    pub async fn outcome(&mut self, task_id: TaskId) -> Result<DroneMessage> {
        self.recv_where("the task's outcome", |m| match m {
            DroneMessage::TaskComplete(c) if c.task_id == task_id => Some(m.clone()),
            DroneMessage::TaskFailed(f) if f.task_id == task_id => Some(m.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for a heartbeat `pick` accepts.
    pub async fn heartbeat_where(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&[Held], u64) -> bool,
    ) -> Result<()> {
        self.recv_where(what, |m| match m {
            DroneMessage::Heartbeat(h) if pick(&h.held, h.assigns_seen) => Some(()),
            _ => None,
        })
        .await
    }
}

pub fn assign(kind: &str, payload: Value) -> Assign {
    Assign {
        task_id: TaskId::generate(),
        fence: Fence(1),
        attempt: 1,
        kind: kind.to_owned(),
        queue: "default".to_owned(),
        payload,
        timeout_ms: None,
        checkpoint: None,
    }
}

pub fn exec(script: &str, cwd: &Path) -> Assign {
    assign(
        "exec",
        serde_json::json!({"cmd": ["sh", "-c", script], "cwd": cwd}),
    )
}

pub fn held(a: &Assign) -> Held {
    Held {
        task_id: a.task_id,
        fence: a.fence,
    }
}

/// The built drone binary: the exec supervisor, and the program for end-to-end tests.
pub fn drone_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_drone"))
}

pub fn test_config(queen: SocketAddr) -> Result<Config> {
    test_config_for(&[queen])
}

/// A drone given several queen addresses, tried in this order.
pub fn test_config_for(queens: &[SocketAddr]) -> Result<Config> {
    let list: Vec<String> = queens.iter().map(|q| q.to_string()).collect();
    let config = Config {
        queen: QueenAddrs::from_entries(list.iter().map(String::as_str)).map_err(|e| anyhow!(e))?,
        name: "test-drone".to_owned(),
        slots: 2,
        kill_grace: Duration::from_millis(300),
        drain_grace: Duration::from_secs(5),
        // In a test harness the current executable is the harness, not the drone.
        supervisor: drone_binary(),
        ..Config::default()
    };
    Ok(config)
}

/// A drone running in this process. Dropping it stops it at once.
#[derive(Debug)]
pub struct InProcessDrone {
    pub shutdown: Shutdown,
    handle: Option<JoinHandle<Result<(), DroneError>>>,
}

impl InProcessDrone {
    pub fn start(config: Config) -> Self {
        init_logs();
        let shutdown = Shutdown::default();
        let handle = tokio::spawn(drone::run(config, shutdown.clone()));
        InProcessDrone {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Waits for `run` to return.
    pub async fn finished(&mut self) -> Result<Result<(), DroneError>> {
        let handle = self
            .handle
            .take()
            .ok_or_else(|| anyhow!("already finished"))?;
        Ok(tokio::time::timeout(DEADLINE, handle)
            .await
            .context("the drone did not stop in time")??)
    }
}

impl Drop for InProcessDrone {
    fn drop(&mut self) {
        self.shutdown.graceful.cancel();
        self.shutdown.immediate.cancel();
    }
}

/// The pids a task script wrote to `file`, one per line, once there are `n` of them.
pub async fn pids_in(file: &Path, n: usize) -> Vec<i32> {
    let mut pids = Vec::new();
    wait_until_async(
        DEADLINE,
        &format!("{} lists {n} pids", file.display()),
        || {
            pids = std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            ready(pids.len() >= n)
        },
    )
    .await;
    pids
}

/// Whether a process no longer runs: gone, or a zombie nobody reaped yet (it runs no
/// code any more).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

pub async fn wait_all_gone(pids: &[i32]) {
    wait_until_async(DEADLINE, &format!("processes {pids:?} are gone"), || {
        ready(pids.iter().all(|p| is_gone(*p)))
    })
    .await;
}

pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill has no memory effects; the pid is a child this test started.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The real drone binary, connected to `queen`. Killed (SIGKILL) if still running when
/// dropped.
#[derive(Debug)]
pub struct DroneProcess {
    pub child: std::process::Child,
}

impl DroneProcess {
    pub fn start(queen: SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(&queen.to_string(), extra, env)
    }

    /// The binary with `--queen QUEENS` as given (one address or a list).
    pub fn start_with(queens: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let child = std::process::Command::new(drone_binary())
            .arg("--queen")
            .arg(queens)
            .arg("--name")
            .arg("binary-drone")
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("HIVE_DRONE_TOKEN")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // The drone's logs would clutter the test output; set DRONE_TEST_LOGS to see them.
            .stderr(if std::env::var_os("DRONE_TEST_LOGS").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .context("could not start the drone binary")?;
        Ok(DroneProcess { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit.
    pub async fn exit_status(&mut self) -> Result<std::process::ExitStatus> {
        let child = &mut self.child;
        Ok(wait_until_async(DEADLINE, "the drone process exits", || {
            ready(child.try_wait().ok().flatten())
        })
        .await)
    }
}

impl Drop for DroneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The failure a drone reported, or an error naming what it sent instead.
pub fn failed(message: DroneMessage) -> Result<shared::protocol::TaskFailed> {
    match message {
        DroneMessage::TaskFailed(f) => Ok(f),
        other => bail!("expected task_failed, got {other:?}"),
    }
}

/// The success a drone reported, or an error naming what it sent instead.
pub fn completed(message: DroneMessage) -> Result<shared::protocol::TaskComplete> {
    match message {
        DroneMessage::TaskComplete(c) => Ok(c),
        other => bail!("expected task_complete, got {other:?}"),
    }
}
