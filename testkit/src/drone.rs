//! A drone played by the test over the real protocol: the shared message types and the
//! shared framing (a 4-byte big-endian length, then one JSON object) on any stream.
//!
//! One [`FakeDrone`] serves every kind of test:
//! - scripted ([`Heartbeats::Scripted`], what [`FakeDrone::connect`] gives): the drone says
//!   only what the test tells it to, and an assign counts as seen (`assigns_seen`) once the
//!   test has received it, so a heartbeat never admits to an assign the test has not read;
//! - live ([`Heartbeats::Automatic`]): it heartbeats every welcome interval on its own,
//!   holding each assigned task as it arrives (as a real drone does) until the test
//!   [`FakeDrone::release`]s it or [`FakeDrone::go_silent`]s;
//! - raw ([`FakeDrone::open`] without a hello): arbitrary bytes and frames for hostile
//!   tests, and everything the queen answers, down to the close.
//!
//! It reports outcomes with whatever fence a test chooses — including stale ones a correct
//! drone would never send. TLS is the test's business: set up the stream and pass it to
//! [`FakeDrone::over`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use shared::frame;
use shared::protocol::{
    Ack, AckStatus, Assign, CancelTask, Checkpoint, DroneMessage, Heartbeat, Held, Hello,
    QueenMessage, TaskComplete, TaskFailed, Welcome, PROTOCOL_VERSION,
};
use shared::{DroneId, Fence, TaskId};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::wait::failure_context;

/// How long a fake drone waits for something the queen should do in milliseconds: long
/// enough for a loaded 2-core machine, short enough that a hang fails in seconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The shortest heartbeat interval a live fake drone keeps, whatever the welcome says.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// A hello for drone `id`: named after the id, running `echo` and `exec`, no labels, no
/// token, not draining. Tests change the fields they care about.
pub fn hello(id: DroneId, slots: u32, held: Vec<Held>) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        drone_id: id,
        name: format!("fake-{}", &id.to_string()[..8]),
        labels: vec![],
        slots,
        kinds: vec!["echo".into(), "exec".into()],
        token: None,
        held,
        draining: false,
        pongs: false,
        pools: vec![],
        encodings: Vec::new(),
    }
}

/// A hello for a fresh drone id with a chosen name and kinds.
pub fn named_hello(name: &str, kinds: &[&str], slots: u32) -> Hello {
    Hello {
        name: name.to_owned(),
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        ..hello(DroneId::generate(), slots, vec![])
    }
}

/// Who sends the heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeats {
    /// The test, with [`FakeDrone::heartbeat`]; an assign is seen once the test received it.
    Scripted,
    /// The drone itself, every welcome interval, reporting [`FakeDrone::held`]; an assign
    /// is seen and held as soon as it arrives.
    Automatic,
}

/// What the fake drone received.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Msg(QueenMessage),
    /// A frame that is no `QueenMessage` this build knows.
    Unknown {
        frame: Bytes,
        error: String,
    },
    /// The queen closed the connection; with the error if it broke rather than closed.
    Closed(Option<String>),
}

/// How a read until the close ended.
#[derive(Debug)]
pub struct Closing {
    /// Every frame read before the end, as JSON.
    pub frames: Vec<Value>,
    /// The error that ended the stream, if it was not a clean close (e.g. a reset).
    pub error: Option<String>,
}

/// State the connection's tasks share with the test.
#[derive(Debug, Default)]
struct State {
    /// What heartbeats report as held.
    held: Mutex<Vec<Held>>,
    /// Assigns seen on this connection, for heartbeats' `assigns_seen`.
    assigns_seen: AtomicU64,
    /// Live mode: assigns are counted and held as they arrive.
    live: bool,
    /// The live heartbeat clock sends (false once the drone went silent).
    heartbeating: AtomicBool,
    /// The welcome chose MessagePack: every frame after it, both ways, is MessagePack.
    msgpack: AtomicBool,
}

impl State {
    fn encoding(&self) -> frame::Encoding {
        if self.msgpack.load(Ordering::SeqCst) {
            frame::Encoding::MessagePack
        } else {
            frame::Encoding::Json
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn saw(&self, msg: &QueenMessage) {
        if let QueenMessage::Assign(a) = msg {
            self.assigns_seen.fetch_add(1, Ordering::SeqCst);
            if self.live {
                self.held().push(Held {
                    task_id: a.task_id,
                    fence: a.fence,
                });
            }
        }
    }
}

/// Bytes to write, and where to say whether they were written.
type Write = (Bytes, oneshot::Sender<io::Result<()>>);

/// A drone on one connection. See the module docs.
#[derive(Debug)]
pub struct FakeDrone {
    /// From the hello (a fresh id before one was sent).
    pub id: DroneId,
    pub name: String,
    /// What the queen said in its welcome, once it did.
    pub welcome: Option<Welcome>,
    /// How long `recv`, `expect` and the typed helpers wait.
    pub patience: Duration,
    out: mpsc::UnboundedSender<Write>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeDrone {
    /// A plain TCP connection to the queen's drone port, nothing said yet. Panics if the
    /// queen cannot be reached.
    pub async fn open(addr: SocketAddr) -> FakeDrone {
        Self::open_with(addr, Heartbeats::Scripted).await
    }

    async fn open_with(addr: SocketAddr, heartbeats: Heartbeats) -> FakeDrone {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the queen at {addr}: {e}"));
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        Self::over_with(stream, heartbeats)
    }

    /// A fake drone on a stream the test connected (e.g. TLS), nothing said yet.
    pub fn over<S>(stream: S) -> FakeDrone
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::over_with(stream, Heartbeats::Scripted)
    }

    fn over_with<S>(stream: S, heartbeats: Heartbeats) -> FakeDrone
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let state = Arc::new(State {
            live: heartbeats == Heartbeats::Automatic,
            ..State::default()
        });
        let (out, out_rx) = mpsc::unbounded_channel();
        let (in_tx, incoming) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(write_loop(writer, out_rx)),
            tokio::spawn(read_loop(reader, in_tx, state.clone())),
        ];
        FakeDrone {
            id: DroneId::generate(),
            name: "fake".into(),
            welcome: None,
            patience: PATIENCE,
            out,
            incoming,
            state,
            tasks,
        }
    }

    /// Connects and says hello, the test sending every heartbeat; panics unless welcomed.
    pub async fn connect(addr: SocketAddr, hello: Hello) -> FakeDrone {
        Self::connect_with(addr, hello, Heartbeats::Scripted).await
    }

    /// Connects and says hello; panics unless welcomed. With [`Heartbeats::Automatic`] it
    /// then heartbeats every `welcome.heartbeat_interval_ms`, reporting what it holds.
    pub async fn connect_with(addr: SocketAddr, hello: Hello, heartbeats: Heartbeats) -> FakeDrone {
        let mut d = Self::open_with(addr, heartbeats).await;
        match d.say_hello(hello).await {
            Some(QueenMessage::Welcome(_)) => {}
            Some(QueenMessage::Reject(r)) => panic!("the queen rejected the fake drone: {r:?}"),
            other => panic!("expected welcome, got {other:?}"),
        }
        if heartbeats == Heartbeats::Automatic {
            d.start_heartbeats();
        }
        d
    }

    /// Sends `hello` (taking its id, name and held tasks as this drone's) and returns the
    /// queen's first answer, or `None` if the connection closed (or could not be written)
    /// instead. Panics if the queen neither answers nor closes in time.
    pub async fn say_hello(&mut self, hello: Hello) -> Option<QueenMessage> {
        self.id = hello.drone_id;
        self.name.clone_from(&hello.name);
        self.state.held().extend(hello.held.iter().copied());
        self.try_send(&DroneMessage::Hello(hello)).await.ok()?;
        let answer = self.recv().await;
        if let Some(QueenMessage::Welcome(w)) = &answer {
            self.welcome = Some(w.clone());
        }
        answer
    }

    /// Starts the drone's own heartbeat clock (see [`Heartbeats::Automatic`]).
    fn start_heartbeats(&mut self) {
        let interval = self
            .welcome
            .as_ref()
            .map(|w| Duration::from_millis(w.heartbeat_interval_ms))
            .unwrap_or_default()
            .max(MIN_HEARTBEAT);
        self.state.heartbeating.store(true, Ordering::SeqCst);
        let (state, out) = (self.state.clone(), self.out.clone());
        self.tasks.push(tokio::spawn(async move {
            loop {
                // A timer, not a synchronization: this is the fake drone's heartbeat clock.
                tokio::time::sleep(interval).await;
                if !state.heartbeating.load(Ordering::SeqCst) {
                    continue;
                }
                let hb = DroneMessage::Heartbeat(Heartbeat {
                    held: state.held().clone(),
                    assigns_seen: state.assigns_seen.load(Ordering::SeqCst),
                    checkpoints: vec![],
                    pools: Vec::new(),
                });
                let (done, _) = oneshot::channel();
                if out.send((framed(&hb, state.encoding()), done)).is_err() {
                    return;
                }
            }
        }));
    }

    // ----- sending ---------------------------------------------------------------------

    /// Writes bytes as they are (no framing), once they are on the wire.
    pub async fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        self.write(Bytes::copy_from_slice(bytes)).await
    }

    /// Writes one frame with `body`.
    pub async fn send_frame(&self, body: &[u8]) -> io::Result<()> {
        self.write(frame_of(body)).await
    }

    pub async fn try_send(&self, msg: &DroneMessage) -> io::Result<()> {
        self.write(framed(msg, self.state.encoding())).await
    }

    /// Sends `msg`; panics if it cannot be written.
    pub async fn send(&self, msg: DroneMessage) {
        self.try_send(&msg)
            .await
            .unwrap_or_else(|e| panic!("fake drone {}: cannot send {msg:?}: {e}", self.name));
    }

    async fn write(&self, bytes: Bytes) -> io::Result<()> {
        let (done, written) = oneshot::channel();
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the connection is closed");
        self.out.send((bytes, done)).map_err(|_| closed())?;
        written.await.map_err(|_| closed())?
    }

    /// A heartbeat holding `held`, counting the assigns seen so far.
    pub async fn heartbeat(&self, held: Vec<Held>) {
        self.heartbeat_with(held, vec![]).await;
    }

    pub async fn heartbeat_with(&self, held: Vec<Held>, checkpoints: Vec<Checkpoint>) {
        self.send(DroneMessage::Heartbeat(Heartbeat {
            held,
            assigns_seen: self.assigns_seen(),
            checkpoints,
            pools: Vec::new(),
        }))
        .await;
    }

    pub async fn complete(&self, task: TaskId, fence: Fence, result: Value) {
        self.send(DroneMessage::TaskComplete(TaskComplete {
            task_id: task,
            fence,
            result,
        }))
        .await;
    }

    /// A retryable failure.
    pub async fn fail(&self, task: TaskId, fence: Fence, error: &str) {
        self.send(DroneMessage::TaskFailed(TaskFailed {
            task_id: task,
            fence,
            error: error.to_owned(),
            result: None,
            retryable: true,
        }))
        .await;
    }

    // ----- what heartbeats say ---------------------------------------------------------

    /// How many assigns this connection has seen (see [`Heartbeats`]).
    pub fn assigns_seen(&self) -> u64 {
        self.state.assigns_seen.load(Ordering::SeqCst)
    }

    /// Stops the live heartbeats: from now on the drone says nothing unless a test sends
    /// for it.
    pub fn go_silent(&self) {
        self.state.heartbeating.store(false, Ordering::SeqCst);
    }

    pub fn resume_heartbeats(&self) {
        self.state.heartbeating.store(true, Ordering::SeqCst);
    }

    /// The tasks live heartbeats report.
    pub fn held(&self) -> Vec<Held> {
        self.state.held().clone()
    }

    /// Stops reporting `task` in live heartbeats.
    pub fn release(&self, task: TaskId) {
        self.state.held().retain(|h| h.task_id != task);
    }

    // ----- receiving -------------------------------------------------------------------

    /// The next thing received within `within`; `None` if nothing came. After the close,
    /// every call answers `Closed`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Incoming> {
        let next = tokio::time::timeout(within, self.incoming.recv())
            .await
            .ok()?;
        let next = next.unwrap_or(Incoming::Closed(None));
        if let Incoming::Msg(m) = &next {
            if !self.state.live {
                self.state.saw(m);
            }
        }
        Some(next)
    }

    /// The next message, or `None` when the queen closed the connection. Panics if the
    /// queen says nothing within the patience, or sends what is no queen message.
    pub async fn recv(&mut self) -> Option<QueenMessage> {
        match self.next_within(self.patience).await {
            Some(Incoming::Msg(m)) => Some(m),
            Some(Incoming::Closed(_)) => None,
            Some(Incoming::Unknown { frame, error }) => {
                panic!("queen sends valid messages, not ({error}) {frame:?}")
            }
            None => panic!(
                "fake drone {}: queen said nothing in time ({:?})",
                self.name, self.patience
            ),
        }
    }

    /// Waits for the next message `pick` accepts, skipping the others; panics (listing
    /// what it skipped) if none comes within the patience or the connection closes first.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        pick: impl FnMut(QueenMessage) -> Option<T>,
    ) -> T {
        self.expect_within(self.patience, what, pick).await
    }

    /// [`FakeDrone::expect`] with a deadline of its own.
    pub async fn expect_within<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut pick: impl FnMut(QueenMessage) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(Incoming::Msg(m)) => {
                    let shown = format!("{m:?}");
                    match pick(m) {
                        Some(v) => return v,
                        None => skipped.push(shown),
                    }
                }
                Some(Incoming::Unknown { frame, .. }) => {
                    skipped.push(format!("unknown {}", String::from_utf8_lossy(&frame)));
                }
                Some(Incoming::Closed(_)) => panic!(
                    "fake drone {}: connection closed while waiting for {what}; skipped {skipped:?}",
                    self.name
                ),
                None => panic!(
                    "fake drone {}: no {what} within {within:?}; skipped {skipped:?}\n{}",
                    self.name,
                    failure_context()
                ),
            }
        }
    }

    /// The next assign.
    pub async fn expect_assign(&mut self) -> Assign {
        self.expect_assign_within(self.patience).await
    }

    pub async fn expect_assign_within(&mut self, within: Duration) -> Assign {
        self.expect_within(within, "an assign", |m| match m {
            QueenMessage::Assign(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// The next ack: (task, fence, status).
    pub async fn expect_ack(&mut self) -> (TaskId, Fence, AckStatus) {
        self.expect("an ack", |m| match m {
            QueenMessage::Ack(Ack {
                task_id,
                fence,
                status,
            }) => Some((task_id, fence, status)),
            _ => None,
        })
        .await
    }

    /// The next cancel.
    pub async fn expect_cancel(&mut self) -> CancelTask {
        self.expect("a cancel", |m| match m {
            QueenMessage::Cancel(c) => Some(c),
            _ => None,
        })
        .await
    }

    /// Waits for an assign while heartbeating (holding nothing) every `every`: for waits as
    /// long as the heartbeat timeout (an orphan's expiry after a restart), so the queen
    /// does not expire this silent drone first.
    pub async fn assign_heartbeating(&mut self, every: Duration) -> Assign {
        let deadline = Instant::now() + self.patience;
        loop {
            self.heartbeat(vec![]).await;
            match self.next_within(every).await {
                Some(Incoming::Msg(QueenMessage::Assign(a))) => return a,
                Some(Incoming::Closed(_)) => {
                    panic!("connection closed while waiting for an assign")
                }
                Some(_) | None => {}
            }
            assert!(
                Instant::now() < deadline,
                "no assign within {:?}",
                self.patience
            );
        }
    }

    /// True when the queen closes the connection (after any messages still queued).
    /// Panics if the queen goes quiet for the patience without closing.
    pub async fn closed(&mut self) -> bool {
        while self.recv().await.is_some() {}
        true
    }

    /// Waits for the queen to close the connection, returning what it sent before.
    pub async fn expect_closed(&mut self, within: Duration) -> Vec<Incoming> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(Incoming::Closed(_)) => return got,
                Some(other) => got.push(other),
                None => panic!(
                    "fake drone {}: the queen did not close the connection within {within:?}; got {got:?}",
                    self.name
                ),
            }
        }
    }

    /// Reads frames until the queen closes the connection, as JSON. Panics if it is still
    /// open after `within`, or sends a frame that is not JSON.
    pub async fn read_until_closed(&mut self, within: Duration) -> Closing {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(Incoming::Msg(m)) => {
                    frames.push(serde_json::to_value(&m).expect("queen messages serialize"));
                }
                Some(Incoming::Unknown { frame, error }) => {
                    frames.push(serde_json::from_slice(&frame).unwrap_or_else(|_| {
                        panic!(
                            "the queen sent a frame that is not JSON ({error}): {:?}",
                            String::from_utf8_lossy(&frame)
                        )
                    }));
                }
                Some(Incoming::Closed(error)) => return Closing { frames, error },
                None => panic!(
                    "the queen did not close the connection within {within:?}; it sent {frames:?}"
                ),
            }
        }
    }
}

impl Drop for FakeDrone {
    /// Closes the connection: the drone "crashes" or its network drops.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One frame: the body's length as a big-endian u32, then the body.
fn frame_of(body: &[u8]) -> Bytes {
    let len = u32::try_from(body.len()).expect("a test frame is shorter than 4 GiB");
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    Bytes::from(buf)
}

fn framed(msg: &DroneMessage, encoding: frame::Encoding) -> Bytes {
    frame_of(&encoding.encode(msg).expect("protocol messages serialize"))
}

/// Writes what the drone sends, in order, saying for each whether it was written.
async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::UnboundedReceiver<Write>) {
    while let Some((bytes, done)) = rx.recv().await {
        let result = match writer.write_all(&bytes).await {
            Ok(()) => writer.flush().await,
            Err(e) => Err(e),
        };
        let failed = result.is_err();
        let _ = done.send(result);
        if failed {
            return;
        }
    }
}

/// Reads what the queen sends until the close, decoding each frame.
async fn read_loop<R: AsyncRead + Unpin>(
    reader: R,
    tx: mpsc::UnboundedSender<Incoming>,
    state: Arc<State>,
) {
    let mut frames = FramedRead::new(reader, frame::codec(frame::DEFAULT_MAX_FRAME_LEN));
    loop {
        let incoming = match frames.next().await {
            None => Incoming::Closed(None),
            Some(Err(e)) => Incoming::Closed(Some(e.to_string())),
            Some(Ok(body)) => match state.encoding().decode::<QueenMessage>(&body) {
                Ok(m) => {
                    if state.live {
                        state.saw(&m);
                    }
                    // The welcome is JSON; what it chose holds from the next frame on,
                    // and the drone writes nothing before it has read the welcome.
                    if let QueenMessage::Welcome(w) = &m {
                        let binary =
                            w.encoding.as_deref() == Some(frame::Encoding::MessagePack.name());
                        state.msgpack.store(binary, Ordering::SeqCst);
                    }
                    Incoming::Msg(m)
                }
                Err(e) => Incoming::Unknown {
                    frame: body.freeze(),
                    error: e.to_string(),
                },
            },
        };
        let closed = matches!(incoming, Incoming::Closed(_));
        if tx.send(incoming).is_err() || closed {
            return;
        }
    }
}
