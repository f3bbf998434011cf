//! The drone's life: the connection to its queen (an explicit state machine), the tasks it
//! holds, its outbox, and graceful shutdown.
//!
//! One loop owns all state and reacts to one event at a time: a frame from the queen, a
//! finished task, a heartbeat tick, a retry timer, a shutdown signal. Tasks run on their
//! own tokio tasks and report back over a channel, so a slow task never delays a
//! heartbeat, and a lost connection never touches a running task.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::SeedableRng;
use shared::frame::{self, Encoding, FrameError};
use shared::protocol::{
    Assign, CancelTask, DroneMessage, Heartbeat, Held, Hello, QueenMessage, Reject, RejectCode,
    Welcome, PROTOCOL_VERSION,
};
use shared::DroneId;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::awake::{self, sleep_until_opt, Silence};
use crate::backoff::Backoff;
use crate::checkpoint::{Checkpoints, Seen, MAX_CHECKPOINT_BYTES};
use crate::config::{Config, QueenAddr};
use crate::executor::{Executor, StopReason};
use crate::link::{Stream, TlsClient};
use crate::outbox::{Outbox, Outcome};
use crate::pool::Pools;
use crate::process::Spawner;
use crate::queens::{Queens, Verdict};

/// How long one connect may take (5 s): a queen that does not answer a SYN in that time is
/// as good as down, and the backoff will try again.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the queen may take to answer a hello (10 s). It only has to check the token and
/// re-attach leases; longer means it is stuck, and a fresh connection is the better bet.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// After a graceful drain, how long the drone waits for the queen to acknowledge its last
/// outcomes (5 s): enough for a flush on a busy queen, short enough not to hold up a deploy.
pub const GRACEFUL_DELIVERY_WINDOW: Duration = Duration::from_secs(5);

/// After a forced stop (second signal, or the drain grace ran out), how long the drone
/// tries to deliver the killed tasks' outcomes (2 s). Undelivered ones are not lost work:
/// the queen requeues leases it stops hearing about.
pub const FORCED_DELIVERY_WINDOW: Duration = Duration::from_secs(2);

/// The fastest heartbeat the drone sends whatever the queen asks (50 ms), so a queen that
/// sends a zero interval cannot make it spin.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);

/// The shortest time a single write may take before the connection is declared dead.
/// Normally the bound is the queen's heartbeat timeout: a drone that cannot get a message
/// out for that long has lost its leases anyway.
pub const MIN_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The pause before the next round of queen addresses when a queen of the last round said
/// it is a standby (`not_leader`, with no leader to follow) or was a deposed leader
/// (100 ms). The queens are up and choosing a leader; the new one keeps this drone's
/// running tasks only for its heartbeat timeout, so the growing backoff meant for
/// unreachable queens (a second or more after a few rounds) would cost them. Fixed and
/// short, yet a pause: a drone must not spin on standbys during a long election.
pub const STANDBY_RETRY: Duration = Duration::from_millis(100);

/// Finished tasks waiting for the loop to pick up their outcome. The queen bounds running
/// tasks by slots, so this rarely fills; when it does, finished tasks simply wait.
pub const OUTCOME_CHANNEL_CAPACITY: usize = 64;

/// How long `run` waits for task executors to wind down once it has decided to return.
pub const EXIT_WAIT: Duration = Duration::from_secs(1);

/// How the drone is told to stop. The first token asks for a graceful drain; the second
/// for an immediate stop (running tasks are killed). The binary cancels them on the first
/// and second SIGTERM/SIGINT.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop taking tasks, let running ones finish (up to the drain grace), deliver the
    /// outbox, return.
    pub graceful: CancellationToken,
    /// Kill running tasks now, try briefly to deliver their outcomes, return.
    pub immediate: CancellationToken,
}

/// Why [`crate::run`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum DroneError {
    #[error("the queen rejected this drone: {reason} (the queen speaks protocol versions {supported_versions:?}, this drone speaks {PROTOCOL_VERSION})")]
    Rejected {
        reason: String,
        supported_versions: Vec<u32>,
    },
    #[error("could not start the process spawner thread: {0}")]
    Spawner(#[source] std::io::Error),
    #[error("could not create the checkpoint directory: {0}")]
    Checkpoints(#[source] std::io::Error),
    #[error("could not start the worker pools: {0}")]
    Pools(String),
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("could not connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("connection failed during the handshake: {0}")]
    Io(#[source] std::io::Error),
    #[error("tls handshake with the queen failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("no welcome within {0:?}")]
    WelcomeTimeout(Duration),
    #[error("the queen closed the connection before answering the hello")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("expected welcome or reject, got {0}")]
    Unexpected(&'static str),
    #[error("the queen chose the encoding {0:?}, which the hello did not offer")]
    Encoding(String),
    #[error("rejected: {}", .0.reason)]
    Rejected(Reject),
}

/// Whether a reject is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// Retrying cannot help (wrong token, protocol version the queen does not speak, a
    /// hello out of bounds): the drone exits and says why.
    Fatal,
    /// Possibly transient (the queen is starting, overloaded, ...): retry with backoff.
    Transient,
}

/// Sorts a reject by its code and the queen's list of versions, never by its wording
/// (the reason is for people and may change).
pub fn classify_reject(reject: &Reject) -> RejectKind {
    // A queen that does not list our version will never accept us, whatever it says.
    if !reject.supported_versions.is_empty()
        && !reject.supported_versions.contains(&PROTOCOL_VERSION)
    {
        return RejectKind::Fatal;
    }
    match reject.code {
        // The same hello gets the same answer: the token, the version and the hello's
        // shape come from this drone's config, which does not change while it runs.
        Some(RejectCode::UnsupportedVersion | RejectCode::Unauthorized | RejectCode::BadHello) => {
            RejectKind::Fatal
        }
        // No code: a queen from before codes (which still lists its versions, checked
        // above). Its reason text could say anything, so it is not searched; retrying
        // with backoff is the safe reading: a transient refusal heals, and a permanent
        // one costs a logged reconnect now and then instead of a drone that exited over
        // a passing condition. A code this drone does not know (a newer queen's) reads
        // the same way, for the same reason.
        // A standby (HA): try the leader it names, or the next queen address.
        None | Some(RejectCode::Unknown | RejectCode::NotLeader) => RejectKind::Transient,
    }
}

/// An established, welcomed connection.
#[derive(Debug)]
struct Session {
    framed: Framed<Stream, LengthDelimitedCodec>,
    heartbeat: Interval,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    write_timeout: Duration,
    /// `assign` messages received on this connection (the queen compares it with what it
    /// sent to tell a lost assign from one still in flight).
    assigns_seen: u64,
    /// The leader's term the queen welcomed this drone in (queens sharing a database).
    epoch: Option<u64>,
    /// The queen's address, as dialled.
    queen: QueenAddr,
    /// Set when the queen answers heartbeats (`pongs` in the welcome): how long it has
    /// said nothing. Unset for queens that do not, whose silence means nothing.
    silence: Option<Silence>,
    /// How messages are written after the welcome, both ways.
    encoding: Encoding,
}

impl Session {
    fn new(
        framed: Framed<Stream, LengthDelimitedCodec>,
        welcome: &Welcome,
        queen: QueenAddr,
        encoding: Encoding,
    ) -> Self {
        let heartbeat_interval =
            Duration::from_millis(welcome.heartbeat_interval_ms).max(MIN_HEARTBEAT_INTERVAL);
        let heartbeat_timeout = Duration::from_millis(welcome.heartbeat_timeout_ms);
        set_tcp_user_timeout(
            framed.get_ref().tcp(),
            heartbeat_timeout.max(MIN_WRITE_TIMEOUT),
        );
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_interval, heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A queen whose timeout is shorter than two heartbeats (or zero) must not get this
        // drone to drop it between two pongs.
        let silence_limit = heartbeat_timeout
            .max(heartbeat_interval * 2)
            .max(MIN_WRITE_TIMEOUT);
        let silence =
            (welcome.pongs == Some(true)).then(|| Silence::new(silence_limit, Instant::now()));
        Session {
            framed,
            heartbeat,
            heartbeat_interval,
            heartbeat_timeout,
            write_timeout: heartbeat_timeout.max(MIN_WRITE_TIMEOUT),
            assigns_seen: 0,
            epoch: welcome.epoch,
            queen,
            silence,
            encoding,
        }
    }
}

/// Makes the kernel fail the connection when sent data goes unacknowledged this long.
/// A queen that does not answer heartbeats (one before pongs) sends nothing when it has
/// nothing to say, so reads cannot detect a queen whose host vanished; our own heartbeats
/// going unacknowledged can. (A frozen queen's kernel still acknowledges them: only pongs
/// catch that.)
fn set_tcp_user_timeout(stream: &TcpStream, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a valid socket fd and a pointer to a c_uint of the length given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not set TCP_USER_TIMEOUT");
    }
}

type HandshakeFuture = Pin<Box<dyn Future<Output = Result<Box<Session>, HandshakeError>> + Send>>;

/// The connection state machine.
enum Link {
    /// No connection; the next attempt starts at `retry_at`. `attempt` counts rounds (each
    /// queen address tried once, see [`crate::queens`]) that failed since the last welcome,
    /// and drives the backoff.
    Disconnected { attempt: u32, retry_at: Instant },
    /// Connect, hello and welcome in flight, to `queen`.
    Connecting {
        attempt: u32,
        queen: QueenAddr,
        handshake: HandshakeFuture,
    },
    /// Boxed: a session is large, and the link changes state only on (re)connects.
    Connected(Box<Session>),
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Disconnected { attempt, retry_at } => f
                .debug_struct("Disconnected")
                .field("attempt", attempt)
                .field("retry_at", retry_at)
                .finish(),
            Link::Connecting { attempt, queen, .. } => f
                .debug_struct("Connecting")
                .field("attempt", attempt)
                .field("queen", queen)
                .finish_non_exhaustive(),
            Link::Connected(s) => f.debug_tuple("Connected").field(s).finish(),
        }
    }
}

/// Where the drone is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking tasks.
    Running,
    /// Stopping gracefully: no new tasks; running ones have until `deadline`.
    Draining { deadline: Instant },
    /// No task runs any more (or they were killed); delivering the outbox until
    /// `deadline`.
    Delivering { deadline: Instant },
    /// Done: `run` returns.
    Stopped,
}

impl Phase {
    fn deadline(self) -> Option<Instant> {
        match self {
            Phase::Draining { deadline } | Phase::Delivering { deadline } => Some(deadline),
            Phase::Running | Phase::Stopped => None,
        }
    }
}

/// What a spawned task runs: a pool task, already in its pool's queue, or an `exec`.
enum Work {
    Pool(crate::pool::Queued),
    Exec(Assign),
}

/// A task this drone is running.
#[derive(Debug)]
struct RunningTask {
    attempt: u32,
    /// The checkpoint file as last sent to the queen.
    checkpoint: Seen,
    /// Taken when the task is asked to stop, so it is asked once.
    stop: Option<oneshot::Sender<StopReason>>,
}

/// What a connection said, decoded.
#[derive(Debug)]
enum Incoming {
    Message(QueenMessage),
    Malformed(FrameError),
    Closed,
    Failed(std::io::Error),
}

#[derive(Debug)]
enum Event {
    Finished {
        held: Held,
        outcome: Outcome,
    },
    Incoming(Incoming),
    HeartbeatDue,
    /// Time to count the queen's silence (a session with pongs).
    SilenceCheck,
    RetryDue,
    Handshake(Result<Box<Session>, HandshakeError>),
    DrainRequested,
    KillRequested,
    PhaseDeadline,
}

/// The drone: all of its state, owned by one loop.
#[derive(Debug)]
pub(crate) struct Drone {
    config: Config,
    drone_id: DroneId,
    shutdown: Shutdown,
    backoff: Backoff,
    rng: StdRng,
    /// Which queen to dial next, and the highest epoch this drone was welcomed in.
    queens: Queens,
    /// The heartbeat timeout of the last welcome: with several queens, one that does not
    /// welcome the drone within it is treated like a silent one (see [`welcome_wait`]).
    last_heartbeat_timeout: Option<Duration>,
    link: Link,
    phase: Phase,
    /// Set by the first shutdown request; sent in every later hello.
    draining: bool,
    /// Set once every running task has been told to die.
    killed: bool,
    running: HashMap<Held, RunningTask>,
    outbox: Outbox,
    finished_tx: mpsc::Sender<(Held, Outcome)>,
    finished_rx: mpsc::Receiver<(Held, Outcome)>,
    executor: Arc<Executor>,
    /// Worker pools and the kinds they handle (none until [`Drone::start_pools`]).
    pools: Pools,
    tasks: TaskTracker,
}

impl Drone {
    pub(crate) fn new(config: Config, shutdown: Shutdown) -> Result<Self, DroneError> {
        let spawner = Spawner::start(config.supervisor.clone()).map_err(DroneError::Spawner)?;
        let checkpoints =
            Checkpoints::new(MAX_CHECKPOINT_BYTES).map_err(DroneError::Checkpoints)?;
        let executor = Executor::new(&config, spawner, checkpoints);
        let (finished_tx, finished_rx) = mpsc::channel(OUTCOME_CHANNEL_CAPACITY);
        Ok(Drone {
            queens: Queens::new(config.queen.clone()),
            last_heartbeat_timeout: None,
            backoff: config.reconnect,
            config,
            drone_id: DroneId::generate(),
            shutdown,
            rng: StdRng::from_os_rng(),
            link: Link::Disconnected {
                attempt: 0,
                retry_at: Instant::now(),
            },
            phase: Phase::Running,
            draining: false,
            killed: false,
            running: HashMap::new(),
            outbox: Outbox::default(),
            finished_tx,
            finished_rx,
            executor,
            pools: Pools::default(),
            tasks: TaskTracker::new(),
        })
    }

    /// Starts the configured worker pools, each process ready, before the first hello
    /// (which announces their kinds). `Ok(false)` when a shutdown was asked for meanwhile.
    pub(crate) async fn start_pools(&mut self) -> Result<bool, DroneError> {
        if self.config.pools.is_empty() {
            return Ok(true);
        }
        let stopping = CancellationToken::new();
        let (config, executor) = (self.config.clone(), Arc::clone(&self.executor));
        let starting = Pools::start(&config, &executor, stopping.clone());
        tokio::pin!(starting);
        let (graceful, immediate) = (
            self.shutdown.graceful.clone(),
            self.shutdown.immediate.clone(),
        );
        tokio::select! {
            started = &mut starting => {
                self.pools = started.map_err(DroneError::Pools)?;
                Ok(true)
            }
            _ = async { tokio::select! { _ = graceful.cancelled() => {}, _ = immediate.cancelled() => {} } } => {
                // Not dropped half-way: the start kills what it started, then returns.
                stopping.cancel();
                let _ = starting.await;
                Ok(false)
            }
        }
    }

    pub(crate) async fn run(mut self) -> Result<(), DroneError> {
        tracing::info!(
            drone_id = %self.drone_id,
            name = %self.config.name,
            queen = %self.config.queen,
            slots = self.config.slots,
            labels = ?self.config.labels,
            "drone starting"
        );
        let result = loop {
            self.advance_phase();
            if self.phase == Phase::Stopped {
                break Ok(());
            }
            let event = self.next_event().await;
            if let Err(e) = self.handle(event).await {
                break Err(e);
            }
        };
        self.wind_down().await;
        result
    }

    /// Moves a stopping drone along once what it waits for has happened.
    fn advance_phase(&mut self) {
        match self.phase {
            Phase::Draining { .. } if self.running.is_empty() => {
                tracing::info!(
                    outbox = self.outbox.len(),
                    "every task has finished; delivering the last outcomes"
                );
                self.phase = Phase::Delivering {
                    deadline: Instant::now() + GRACEFUL_DELIVERY_WINDOW,
                };
                self.advance_phase();
            }
            Phase::Delivering { .. } if self.running.is_empty() && self.outbox.is_empty() => {
                tracing::info!("every outcome is delivered; stopping");
                self.phase = Phase::Stopped;
            }
            _ => {}
        }
    }

    async fn next_event(&mut self) -> Event {
        let phase_deadline = self.phase.deadline();
        let can_drain = self.phase == Phase::Running;
        let can_kill = !self.killed;
        let graceful = &self.shutdown.graceful;
        let immediate = &self.shutdown.immediate;
        let finished = &mut self.finished_rx;
        let link = &mut self.link;
        let link_event = async move {
            match link {
                Link::Disconnected { retry_at, .. } => {
                    tokio::time::sleep_until(*retry_at).await;
                    Event::RetryDue
                }
                Link::Connecting { handshake, .. } => Event::Handshake(handshake.await),
                Link::Connected(session) => tokio::select! {
                    frame = session.framed.next() => Event::Incoming(match frame {
                        None => Incoming::Closed,
                        Some(Err(e)) => Incoming::Failed(e),
                        Some(Ok(body)) => match session.encoding.decode::<QueenMessage>(&body) {
                            Ok(m) => Incoming::Message(m),
                            Err(e) => Incoming::Malformed(e),
                        },
                    }),
                    _ = session.heartbeat.tick() => Event::HeartbeatDue,
                    _ = sleep_until_opt(session.silence.map(|s| s.next_check())) => {
                        Event::SilenceCheck
                    }
                },
            }
        };
        tokio::select! {
            // Outcomes first: a finished task belongs in the outbox before anything that
            // could end the loop or send a heartbeat that would no longer list it.
            biased;
            Some((held, outcome)) = finished.recv() => Event::Finished { held, outcome },
            _ = immediate.cancelled(), if can_kill => Event::KillRequested,
            _ = graceful.cancelled(), if can_drain => Event::DrainRequested,
            _ = sleep_until_opt(phase_deadline) => Event::PhaseDeadline,
            event = link_event => event,
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), DroneError> {
        match event {
            Event::Finished { held, outcome } => {
                // A checkpoint written just before the attempt ended must reach the queen
                // before the outcome does, or the next attempt starts without it and the
                // task's record misses it (heartbeats carry checkpoints, and the file goes
                // with the attempt).
                self.send_last_checkpoint(held).await;
                let attempt = self.running.remove(&held).map_or(0, |t| t.attempt);
                self.executor.checkpoints.remove(held);
                self.record(outcome, attempt).await;
            }
            Event::Incoming(incoming) => self.on_incoming(incoming).await,
            Event::HeartbeatDue => self.send_heartbeat().await,
            Event::SilenceCheck => self.check_silence(),
            Event::RetryDue => self.start_connecting(),
            Event::Handshake(result) => self.on_handshake(result).await?,
            Event::DrainRequested => self.begin_drain().await,
            Event::KillRequested => {
                tracing::warn!(
                    running = self.running.len(),
                    "stopping now: killing running tasks"
                );
                self.kill_all().await;
            }
            Event::PhaseDeadline => match self.phase {
                Phase::Draining { .. } => {
                    tracing::warn!(
                        running = self.running.len(),
                        grace_ms = self.config.drain_grace.as_millis() as u64,
                        "drain grace ran out: killing running tasks"
                    );
                    self.kill_all().await;
                }
                Phase::Delivering { .. } => {
                    tracing::warn!(
                        undelivered = self.outbox.len(),
                        connected = matches!(self.link, Link::Connected(_)),
                        "gave up delivering outcomes; the queen will requeue those leases"
                    );
                    self.phase = Phase::Stopped;
                }
                Phase::Running | Phase::Stopped => {}
            },
        }
        Ok(())
    }

    /// Every task this drone holds: running, or finished and awaiting an ack.
    fn held(&self) -> Vec<Held> {
        let mut held: Vec<Held> = self.running.keys().copied().collect();
        held.extend(self.outbox.held().filter(|h| !self.running.contains_key(h)));
        held
    }

    /// Dials the next queen of the round (the first of a new round after a backoff).
    fn start_connecting(&mut self) {
        let attempt = match self.link {
            Link::Disconnected { attempt, .. } => attempt,
            _ => return,
        };
        let queen = match self.queens.dial_next() {
            Some(queen) => queen,
            // Every round is started before the wait that ends here, and the list is
            // never empty; should that change, a fresh round is the right reading.
            None => {
                self.queens.start_round();
                match self.queens.dial_next() {
                    Some(queen) => queen,
                    None => return,
                }
            }
        };
        self.connect_to(attempt, queen);
    }

    fn connect_to(&mut self, attempt: u32, queen: QueenAddr) {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            drone_id: self.drone_id,
            name: self.config.name.clone(),
            labels: self.config.labels.clone(),
            slots: self.config.slots,
            kinds: self
                .config
                .policy
                .kinds
                .iter()
                .chain(self.pools.kinds())
                .cloned()
                .collect(),
            token: self.config.token.clone(),
            held: self.held(),
            draining: self.draining,
            pongs: true,
            pools: self.pools.statuses(),
            encodings: self.config.encoding.offer(),
        };
        tracing::debug!(attempt, %queen, held = hello.held.len(), "connecting to the queen");
        self.link = Link::Connecting {
            attempt,
            handshake: Box::pin(handshake(
                queen.clone(),
                self.config.tls.clone(),
                hello,
                self.config.max_frame_len,
                welcome_wait(
                    self.config.queen.as_slice().len(),
                    self.last_heartbeat_timeout,
                ),
            )),
            queen,
        };
    }

    async fn on_handshake(
        &mut self,
        result: Result<Box<Session>, HandshakeError>,
    ) -> Result<(), DroneError> {
        let (attempt, queen) = match &self.link {
            Link::Connecting { attempt, queen, .. } => (*attempt, queen.clone()),
            // A handshake ends only while connecting.
            _ => return Ok(()),
        };
        match result {
            Ok(session) => match self.queens.welcomed(&queen, session.epoch) {
                Verdict::Leader => self.on_welcome(queen, attempt, session).await,
                Verdict::Deposed { theirs, seen } => {
                    // Dropping the session closes the connection before anything is sent
                    // on it: no outcome goes to a queen whose leases are not the real ones.
                    drop(session);
                    self.queens.standby_answered();
                    tracing::warn!(
                        %queen,
                        epoch = theirs,
                        newest_epoch = seen,
                        "the queen welcomed this drone in an older epoch than one it has already been welcomed in: a deposed leader; leaving it"
                    );
                    self.try_next_queen(attempt, &queen, &"a deposed leader");
                }
            },
            Err(HandshakeError::Rejected(reject))
                if classify_reject(&reject) == RejectKind::Fatal =>
            {
                tracing::error!(%queen, reason = %reject.reason, supported_versions = ?reject.supported_versions, "the queen rejected this drone");
                return Err(DroneError::Rejected {
                    reason: reject.reason,
                    supported_versions: reject.supported_versions,
                });
            }
            Err(error) => {
                if let HandshakeError::Rejected(Reject {
                    code: Some(RejectCode::NotLeader),
                    leader,
                    ..
                }) = &error
                {
                    self.queens.standby_answered();
                    if let Some(leader) = leader {
                        self.follow_leader(&queen, leader);
                    }
                }
                self.try_next_queen(attempt, &queen, &error);
            }
        }
        Ok(())
    }

    /// A standby at `standby` named `leader`: dial it next (see [`Queens::leader_named`]).
    fn follow_leader(&mut self, standby: &QueenAddr, leader: &str) {
        match QueenAddr::parse(leader) {
            Ok(leader) => {
                let first_time = self.queens.leader_named(leader.clone());
                tracing::info!(
                    %standby,
                    %leader,
                    dialling = first_time,
                    "the queen is a standby and names the leader"
                );
            }
            Err(e) => {
                tracing::warn!(%standby, error = %e, "the queen is a standby and names a leader that is not HOST:PORT; ignoring it");
            }
        }
    }

    /// `failed` did not take this drone: dial the next queen of the round at once, or,
    /// once every one was tried, back off and start a new round (after only
    /// [`STANDBY_RETRY`] when a standby answered in this one).
    fn try_next_queen(&mut self, attempt: u32, failed: &QueenAddr, error: &dyn fmt::Display) {
        if let Some(next) = self.queens.dial_next() {
            tracing::warn!(
                queen = %failed,
                attempt = attempt + 1,
                %error,
                next = %next,
                "could not reach the queen; trying the next"
            );
            self.connect_to(attempt, next);
            return;
        }
        let standby = self.queens.round_met_a_standby();
        let delay = if standby {
            STANDBY_RETRY
        } else {
            self.backoff.delay(attempt, &mut self.rng)
        };
        tracing::warn!(
            queen = %failed,
            attempt = attempt + 1,
            %error,
            retry_in_ms = delay.as_millis() as u64,
            no_leader_yet = standby,
            "could not reach the queen"
        );
        self.queens.start_round();
        self.link = Link::Disconnected {
            attempt: attempt.saturating_add(1),
            retry_at: Instant::now() + delay,
        };
    }

    /// A queen welcomed this drone and leads: from now on its connection is the one.
    async fn on_welcome(&mut self, queen: QueenAddr, attempt: u32, session: Box<Session>) {
        tracing::info!(
            %queen,
            epoch = session.epoch,
            failed_attempts = attempt,
            heartbeat_ms = session.heartbeat_interval.as_millis() as u64,
            pongs = session.silence.is_some(),
            running = self.running.len(),
            outbox = self.outbox.len(),
            draining = self.draining,
            "connected to the queen"
        );
        // After a queen restart this drone has the heartbeat timeout to come back
        // and keep its running tasks: never sleep through that window.
        self.backoff = self.backoff.capped_for(session.heartbeat_timeout);
        self.last_heartbeat_timeout = Some(session.heartbeat_timeout);
        self.link = Link::Connected(session);
        if self.draining {
            self.send(&DroneMessage::Drain).await;
        }
        let pending: Vec<DroneMessage> = self.outbox.iter().map(Outcome::to_message).collect();
        for message in pending {
            if !self.send(&message).await {
                break;
            }
        }
    }

    /// Drops the connection and schedules the first reconnect: a new round, which begins
    /// with the queen just lost.
    fn disconnect(&mut self, reason: &str) {
        let delay = self.backoff.delay(0, &mut self.rng);
        self.queens.start_round();
        tracing::warn!(
            reason,
            running = self.running.len(),
            outbox = self.outbox.len(),
            retry_in_ms = delay.as_millis() as u64,
            "lost the queen; tasks keep running, reconnecting"
        );
        self.link = Link::Disconnected {
            attempt: 0,
            retry_at: Instant::now() + delay,
        };
    }

    /// Counts the queen's silence on a session with pongs; past the heartbeat timeout (in
    /// time this drone was awake) the connection is as good as lost: the queen is frozen
    /// or its process stuck, while its kernel still accepts our bytes.
    fn check_silence(&mut self) {
        let Link::Connected(session) = &mut self.link else {
            return;
        };
        let Some(silence) = &mut session.silence else {
            return;
        };
        if !silence.check(Instant::now()) {
            return;
        }
        let queen = session.queen.clone();
        tracing::warn!(
            %queen,
            heartbeat_timeout_ms = session.heartbeat_timeout.as_millis() as u64,
            "the queen went silent: nothing from it for the heartbeat timeout though it answers heartbeats; it may be frozen"
        );
        self.queens.went_silent(&queen);
        self.disconnect("the queen went silent");
    }

    /// Sends one message if connected; false (and disconnected) if it could not be sent.
    async fn send(&mut self, message: &DroneMessage) -> bool {
        let Link::Connected(session) = &mut self.link else {
            return false;
        };
        let body = match session.encoding.encode(message) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "could not encode a message");
                return false;
            }
        };
        // Counted in time the drone was awake: a send pending when the drone was stopped
        // is not failed on resuming before the runtime has seen that it went through.
        let failure = match awake::timeout(session.write_timeout, session.framed.send(body)).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => format!("could not send: {e}"),
            Err(_) => format!("a send took over {:?}", session.write_timeout),
        };
        self.disconnect(&failure);
        false
    }

    async fn send_heartbeat(&mut self) {
        let Link::Connected(session) = &self.link else {
            return;
        };
        let assigns_seen = session.assigns_seen;
        let mut checkpoints = Vec::new();
        for (held, task) in self.running.iter_mut() {
            if let Some(data) = self
                .executor
                .checkpoints
                .changed(*held, &mut task.checkpoint)
            {
                checkpoints.push(shared::protocol::Checkpoint {
                    task_id: held.task_id,
                    fence: held.fence,
                    data,
                });
            }
        }
        let heartbeat = Heartbeat {
            held: self.held(),
            assigns_seen,
            checkpoints,
            pools: self.pools.statuses(),
        };
        self.send(&DroneMessage::Heartbeat(heartbeat)).await;
    }

    /// Sends a heartbeat now if `held`'s checkpoint changed since the last one. The queen
    /// reads a connection's frames in order, so it stores the checkpoint before the outcome
    /// that follows.
    async fn send_last_checkpoint(&mut self, held: Held) {
        let Link::Connected(session) = &self.link else {
            return;
        };
        let assigns_seen = session.assigns_seen;
        let Some(task) = self.running.get_mut(&held) else {
            return;
        };
        let Some(data) = self
            .executor
            .checkpoints
            .changed(held, &mut task.checkpoint)
        else {
            return;
        };
        let heartbeat = Heartbeat {
            held: self.held(),
            assigns_seen,
            checkpoints: vec![shared::protocol::Checkpoint {
                task_id: held.task_id,
                fence: held.fence,
                data,
            }],
            pools: self.pools.statuses(),
        };
        self.send(&DroneMessage::Heartbeat(heartbeat)).await;
    }

    async fn on_incoming(&mut self, incoming: Incoming) {
        if let (Incoming::Message(_) | Incoming::Malformed(_), Link::Connected(session)) =
            (&incoming, &mut self.link)
        {
            // Any frame is a sign of life, not only a pong.
            if let Some(silence) = &mut session.silence {
                silence.heard(Instant::now());
            }
        }
        match incoming {
            Incoming::Closed => self.disconnect("the queen closed the connection"),
            Incoming::Failed(e) => self.disconnect(&format!("connection error: {e}")),
            Incoming::Malformed(e) => {
                // Possibly a message type from a newer queen: skipping it is safer than
                // dropping a connection that carries leases.
                tracing::warn!(error = %e, "ignoring a message from the queen that this drone cannot read");
            }
            Incoming::Message(QueenMessage::Assign(assign)) => {
                if let Link::Connected(session) = &mut self.link {
                    session.assigns_seen += 1;
                }
                self.on_assign(assign).await;
            }
            Incoming::Message(QueenMessage::Cancel(cancel)) => self.on_cancel(cancel),
            Incoming::Message(QueenMessage::Ack(ack)) => {
                let held = Held {
                    task_id: ack.task_id,
                    fence: ack.fence,
                };
                let removed = self.outbox.ack(held);
                tracing::debug!(task_id = %ack.task_id, fence = %ack.fence, status = ?ack.status, removed, "outcome acknowledged");
            }
            Incoming::Message(QueenMessage::Error { message }) => {
                tracing::error!(%message, "the queen refused something this drone sent");
            }
            Incoming::Message(QueenMessage::Pong) => {}
            Incoming::Message(other @ (QueenMessage::Welcome(_) | QueenMessage::Reject(_))) => {
                tracing::warn!(
                    message = message_type(&other),
                    "ignoring an unexpected message after the welcome"
                );
            }
        }
    }

    async fn on_assign(&mut self, assign: Assign) {
        let held = Held {
            task_id: assign.task_id,
            fence: assign.fence,
        };
        if self.running.contains_key(&held) || self.outbox.contains(held) {
            tracing::debug!(task_id = %held.task_id, fence = %held.fence, "ignoring a repeated assign for a task already held");
            return;
        }
        tracing::info!(
            task_id = %assign.task_id,
            fence = %assign.fence,
            attempt = assign.attempt,
            kind = %assign.kind,
            queue = %assign.queue,
            timeout_ms = ?assign.timeout_ms,
            "task assigned"
        );
        if self.draining {
            self.record(
                Outcome::failed(held, "drone is draining", true),
                assign.attempt,
            )
            .await;
            return;
        }
        // The queen leased this task to us again under a new fence: the older lease is
        // dead, and two copies of one task must not run side by side.
        let superseded: Vec<Held> = self
            .running
            .keys()
            .filter(|h| h.task_id == assign.task_id)
            .copied()
            .collect();
        for old in superseded {
            tracing::warn!(task_id = %old.task_id, fence = %old.fence, new_fence = %assign.fence, "stopping an attempt whose lease was superseded");
            self.stop(old, StopReason::Superseded(assign.fence));
        }
        if self.running.len() >= self.config.slots as usize {
            tracing::warn!(
                running = self.running.len(),
                slots = self.config.slots,
                task_id = %assign.task_id,
                "assigned more tasks than slots; running it anyway (the queen decides)"
            );
        }
        let pool = self.pools.get(&assign.kind);
        if pool.is_none() {
            if let Some(outcome) = Executor::immediate(&self.config.policy, &assign) {
                self.record(outcome, assign.attempt).await;
                return;
            }
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let checkpoints = &self.executor.checkpoints;
        let checkpoint = if pool.is_some() {
            checkpoints.prepare_for_pool(held, assign.checkpoint.as_ref())
        } else {
            checkpoints.prepare(held, assign.checkpoint.as_ref())
        };
        self.running.insert(
            held,
            RunningTask {
                attempt: assign.attempt,
                checkpoint,
                stop: Some(stop_tx),
            },
        );
        let span = tracing::info_span!(
            "task",
            task_id = %assign.task_id,
            fence = %assign.fence,
            attempt = assign.attempt
        );
        // A pool task joins its pool's queue here, not when its future first runs: the
        // runtime polls new futures in no particular order, and pool tasks wait for a
        // process in the order they were assigned (docs/POOLS.md).
        let work = match pool {
            Some(pool) => Work::Pool(crate::pool::queue(&pool, assign)),
            None => Work::Exec(assign),
        };
        let executor = Arc::clone(&self.executor);
        let finished = self.finished_tx.clone();
        self.tasks.spawn(
            async move {
                let outcome = match work {
                    Work::Pool(queued) => queued.outcome(stop_rx).await,
                    Work::Exec(assign) => executor.run_exec(assign, stop_rx).await,
                };
                // Fails only when `run` has already returned: nobody is left to tell.
                let _ = finished.send((held, outcome)).await;
            }
            .instrument(span),
        );
    }

    fn on_cancel(&mut self, cancel: CancelTask) {
        let targets: Vec<Held> = self
            .running
            .keys()
            // A cancel names the lease it means: it stops that attempt and older ones, never
            // a newer lease of the same task that may already run here.
            .filter(|h| h.task_id == cancel.task_id && h.fence <= cancel.fence)
            .copied()
            .collect();
        if targets.is_empty() {
            tracing::info!(task_id = %cancel.task_id, fence = %cancel.fence, reason = %cancel.reason, "cancel for a task not running here; nothing to kill");
            return;
        }
        for held in targets {
            let attempt = self.running.get(&held).map_or(0, |t| t.attempt);
            tracing::info!(task_id = %held.task_id, fence = %held.fence, attempt, reason = %cancel.reason, "cancelling task");
            self.stop(held, StopReason::Cancelled(cancel.reason.clone()));
        }
    }

    fn stop(&mut self, held: Held, reason: StopReason) {
        if let Some(stop) = self.running.get_mut(&held).and_then(|t| t.stop.take()) {
            // The task may have just finished; its outcome is on its way either way.
            let _ = stop.send(reason);
        }
    }

    async fn begin_drain(&mut self) {
        tracing::info!(
            running = self.running.len(),
            outbox = self.outbox.len(),
            grace_ms = self.config.drain_grace.as_millis() as u64,
            "draining: taking no new tasks, waiting for running ones"
        );
        self.draining = true;
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.config.drain_grace,
        };
        self.send(&DroneMessage::Drain).await;
    }

    async fn kill_all(&mut self) {
        if !self.draining {
            self.draining = true;
            self.send(&DroneMessage::Drain).await;
        }
        self.killed = true;
        let all: Vec<Held> = self.running.keys().copied().collect();
        for held in all {
            self.stop(held, StopReason::Shutdown);
        }
        self.phase = Phase::Delivering {
            deadline: Instant::now() + FORCED_DELIVERY_WINDOW,
        };
    }

    /// Logs an outcome, keeps it until acked, and sends it if connected.
    async fn record(&mut self, outcome: Outcome, attempt: u32) {
        let outcome =
            outcome.fit_to_frame(self.config.max_frame_len, self.config.encoding.encodings());
        match &outcome {
            Outcome::Complete(c) => {
                tracing::info!(task_id = %c.task_id, fence = %c.fence, attempt, "task succeeded");
            }
            Outcome::Failed(f) => {
                tracing::warn!(task_id = %f.task_id, fence = %f.fence, attempt, error = %f.error, retryable = f.retryable, "task failed");
            }
        }
        let message = outcome.to_message();
        self.outbox.push(outcome);
        self.send(&message).await;
    }

    /// Makes sure no task outlives `run`: kills what still runs and waits briefly for the
    /// executors to reap their processes.
    async fn wind_down(&mut self) {
        let all: Vec<Held> = self.running.keys().copied().collect();
        for held in all {
            self.stop(held, StopReason::Shutdown);
        }
        self.link = Link::Disconnected {
            attempt: 0,
            retry_at: Instant::now(),
        };
        self.tasks.close();
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            tokio::select! {
                _ = self.tasks.wait() => break,
                // Keep the channel moving so no executor blocks on a full one.
                Some(_) = self.finished_rx.recv() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(left = self.tasks.len(), "some tasks did not wind down in time");
                    break;
                }
            }
        }
        self.pools.stop().await;
        tracing::info!(undelivered = self.outbox.len(), "drone stopped");
    }
}

fn message_type(message: &QueenMessage) -> &'static str {
    match message {
        QueenMessage::Welcome(_) => "welcome",
        QueenMessage::Reject(_) => "reject",
        QueenMessage::Assign(_) => "assign",
        QueenMessage::Cancel(_) => "cancel",
        QueenMessage::Ack(_) => "ack",
        QueenMessage::Error { .. } => "error",
        QueenMessage::Pong => "pong",
    }
}

/// How long to wait for a queen's welcome. With one queen, [`WELCOME_TIMEOUT`]. With
/// several, once a queen has said how long silence may last, no longer than that (and at
/// least a second): a queen that accepts the connection but says nothing for that long is
/// frozen or overloaded (a stopped process's socket still accepts), and the leader may be
/// another queen, which keeps this drone's running tasks only for that heartbeat timeout.
fn welcome_wait(queens: usize, last_heartbeat_timeout: Option<Duration>) -> Duration {
    match last_heartbeat_timeout {
        Some(t) if queens > 1 => t.clamp(Duration::from_secs(1), WELCOME_TIMEOUT),
        _ => WELCOME_TIMEOUT,
    }
}

/// Connects, says hello and waits (up to `welcome_timeout`) for the answer.
async fn handshake(
    queen: QueenAddr,
    tls: Option<TlsClient>,
    hello: Hello,
    max_frame_len: usize,
    welcome_timeout: Duration,
) -> Result<Box<Session>, HandshakeError> {
    // Each step's timeout counts time the drone was awake (see `awake`): a drone stopped
    // while the queen answered takes the answer when it resumes instead of timing out.
    let stream = awake::timeout(CONNECT_TIMEOUT, TcpStream::connect(queen.as_str()))
        .await
        .map_err(|_| HandshakeError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(HandshakeError::Connect)?;
    // Frames are small and latency matters more than packet count.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let stream = match tls {
        None => Stream::Plain(stream),
        Some(tls) => awake::timeout(welcome_timeout, tls.connect(stream, queen.host()))
            .await
            .map_err(|_| HandshakeError::WelcomeTimeout(welcome_timeout))?
            .map_err(HandshakeError::Tls)?,
    };
    let mut framed = Framed::new(stream, frame::codec(max_frame_len));
    let offered = hello.encodings.clone();
    let body = frame::encode(&DroneMessage::Hello(hello))?;
    let answer = awake::timeout(welcome_timeout, async {
        framed.send(body).await.map_err(HandshakeError::Io)?;
        match framed.next().await {
            None => Err(HandshakeError::Closed),
            Some(Err(e)) => Err(HandshakeError::Io(e)),
            Some(Ok(body)) => Ok(frame::decode::<QueenMessage>(&body)?),
        }
    })
    .await
    .map_err(|_| HandshakeError::WelcomeTimeout(welcome_timeout))??;
    match answer {
        QueenMessage::Welcome(welcome) => {
            if welcome.protocol_version != PROTOCOL_VERSION {
                tracing::warn!(
                    queen_version = welcome.protocol_version,
                    ours = PROTOCOL_VERSION,
                    "the queen welcomed us with a different protocol version"
                );
            }
            let encoding = match &welcome.encoding {
                None => Encoding::Json,
                Some(name) => Encoding::from_name(name)
                    .filter(|e| *e == Encoding::Json || offered.iter().any(|o| o == name))
                    .ok_or_else(|| HandshakeError::Encoding(name.clone()))?,
            };
            Ok(Box::new(Session::new(framed, &welcome, queen, encoding)))
        }
        QueenMessage::Reject(reject) => Err(HandshakeError::Rejected(reject)),
        other => Err(HandshakeError::Unexpected(message_type(&other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_several_queens_a_welcome_is_awaited_only_as_long_as_silence_may_last() {
        let five = Some(Duration::from_secs(5));
        assert_eq!(
            welcome_wait(1, five),
            WELCOME_TIMEOUT,
            "one queen: wait for it"
        );
        assert_eq!(welcome_wait(2, None), WELCOME_TIMEOUT, "nothing known yet");
        assert_eq!(welcome_wait(2, five), Duration::from_secs(5));
        assert_eq!(
            welcome_wait(3, Some(Duration::from_millis(200))),
            Duration::from_secs(1)
        );
        assert_eq!(
            welcome_wait(2, Some(Duration::from_secs(60))),
            WELCOME_TIMEOUT
        );
    }

    fn reject(reason: &str, versions: &[u32], code: Option<RejectCode>) -> Reject {
        Reject {
            reason: reason.to_owned(),
            supported_versions: versions.to_vec(),
            code,
            leader: None,
        }
    }

    /// Guards "TLS files are loaded once": the drone connects with what the config loaded
    /// at start, so a CA file removed (or replaced) afterwards is not read again.
    #[tokio::test]
    async fn tls_files_are_read_once_when_the_config_is_built() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = hive_tls::test_pki::Pki::new(dir.path(), "drone-unit");
        let file = crate::config::FileConfig {
            tls_ca: Some(pki.ca()),
            ..Default::default()
        };
        let config = Config::from_layers(file, &crate::config::Cli::default()).expect("config");
        assert_eq!(
            config.tls.as_ref().map(|t| t.settings().ca.clone()),
            Some(pki.ca())
        );
        std::fs::remove_file(pki.ca()).expect("remove the CA");
        let drone = Drone::new(config, Shutdown::default()).expect("the drone starts");
        assert!(drone.config.tls.is_some());
    }

    #[test]
    fn rejects_are_sorted_by_code_and_versions_never_by_their_words() {
        let v = PROTOCOL_VERSION;
        for code in [
            RejectCode::UnsupportedVersion,
            RejectCode::Unauthorized,
            RejectCode::BadHello,
        ] {
            // The wording is irrelevant: "queen is starting up" with a fatal code is fatal.
            assert_eq!(
                classify_reject(&reject("queen is starting up", &[v], Some(code))),
                RejectKind::Fatal,
                "{code:?}"
            );
        }
        assert_eq!(
            classify_reject(&reject("no", &[v + 1, v + 2], None)),
            RejectKind::Fatal,
            "a queen that does not list our version will never accept us"
        );
        // Without a code (an older queen) or with one from a newer queen, the words are
        // not searched: "bad token" is retried like anything else.
        for code in [None, Some(RejectCode::Unknown)] {
            assert_eq!(
                classify_reject(&reject("bad token", &[v], code)),
                RejectKind::Transient
            );
            assert_eq!(
                classify_reject(&reject("drone id already connected", &[], code)),
                RejectKind::Transient
            );
        }
    }
}
