//! Speaking the drone protocol by hand, over a blocking `std::net::TcpStream`: a 4-byte
//! big-endian length, then one JSON object.
//!
//! [`RawConn`] sends arbitrary bytes (garbage, hostile length prefixes) and reads what the
//! queen answers. [`FakeDrone`] is a scriptable drone: it says hello, heartbeats on its own
//! thread until told to go silent, and reports outcomes with whatever fence a test chooses —
//! including stale ones a correct drone would never send.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::protocol::{
    Assign, DroneMessage, Heartbeat, Held, Hello, QueenMessage, TaskComplete, TaskFailed, Welcome,
    PROTOCOL_VERSION,
};
use shared::{DroneId, Fence, TaskId};

/// The largest frame this side reads; the queen never sends anything near it.
const MAX_READ: usize = 16 << 20;

/// Writes one frame: the body's length as a big-endian u32, then the body.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::other("frame body longer than u32::MAX"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame body; `None` on a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_READ {
        return Err(io::Error::other(format!(
            "the queen sent a {len}-byte frame"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

fn encode(msg: &DroneMessage) -> Vec<u8> {
    serde_json::to_vec(msg).expect("protocol messages serialize")
}

/// Whether an I/O error means the peer closed or reset the connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// A bare connection to the queen's drone port.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
}

/// How a [`RawConn`] read ended.
#[derive(Debug)]
pub struct Closing {
    /// Every frame read before the end, as JSON.
    pub frames: Vec<Value>,
    /// The error that ended the stream, if it was not a clean close (e.g. a reset).
    pub error: Option<String>,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("cannot connect to the queen at {addr}: {e}"));
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        RawConn { stream }
    }

    /// Sends bytes as they are (no framing).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn send_frame(&mut self, body: &[u8]) -> io::Result<()> {
        write_frame(&mut self.stream, body)
    }

    pub fn send(&mut self, msg: &DroneMessage) -> io::Result<()> {
        self.send_frame(&encode(msg))
    }

    /// The next frame as JSON, or `None` if the stream ended or nothing came within `within`.
    pub fn recv(&mut self, within: Duration) -> Option<Value> {
        self.stream
            .set_read_timeout(Some(within))
            .expect("set read timeout");
        match read_frame(&mut self.stream) {
            Ok(Some(body)) => Some(serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!(
                    "the queen sent a frame that is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&body)
                )
            })),
            _ => None,
        }
    }

    /// Reads frames until the queen closes the connection. Panics if it is still open
    /// after `within`.
    pub fn read_until_closed(&mut self, within: Duration) -> Closing {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the queen did not close the connection within {within:?}; it sent {frames:?}"
            );
            self.stream
                .set_read_timeout(Some(left))
                .expect("set read timeout");
            match read_frame(&mut self.stream) {
                Ok(Some(body)) => frames.push(serde_json::from_slice(&body).unwrap_or_else(|e| {
                    panic!(
                        "the queen sent a frame that is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&body)
                    )
                })),
                Ok(None) => {
                    return Closing {
                        frames,
                        error: None,
                    }
                }
                Err(e) if is_closed(&e) => {
                    return Closing {
                        frames,
                        error: Some(e.to_string()),
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the queen did not close the connection within {within:?}; it sent {frames:?}")
                }
                Err(e) => panic!("reading from the queen failed: {e}"),
            }
        }
    }
}

/// What a [`FakeDrone`] received.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Msg(QueenMessage),
    /// A frame that is JSON but no `QueenMessage` this build knows.
    Unknown(Value),
    /// The queen closed the connection (or it broke).
    Closed,
}

#[derive(Debug, Default)]
struct FakeState {
    /// What heartbeats report as held.
    held: Mutex<Vec<Held>>,
    assigns_seen: AtomicU64,
    heartbeating: AtomicBool,
    /// Add every assigned task to `held` as it arrives, as a real drone would.
    auto_hold: AtomicBool,
    stopped: AtomicBool,
}

/// A scripted drone on one connection. See the module docs.
#[derive(Debug)]
pub struct FakeDrone {
    pub id: DroneId,
    pub name: String,
    /// What the queen said in its welcome.
    pub welcome: Welcome,
    writer: Arc<Mutex<TcpStream>>,
    rx: mpsc::Receiver<Incoming>,
    state: Arc<FakeState>,
}

/// A hello for a fresh drone id.
pub fn hello(name: &str, kinds: &[&str], slots: u32) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        drone_id: DroneId::generate(),
        name: name.to_owned(),
        labels: Vec::new(),
        slots,
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        token: None,
        held: Vec::new(),
        draining: false,
    }
}

impl FakeDrone {
    /// Connects, says `hello`, waits for the welcome (panicking on anything else) and then
    /// heartbeats every `welcome.heartbeat_interval_ms`, reporting what it holds.
    pub fn connect(addr: SocketAddr, hello: Hello) -> FakeDrone {
        let stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("cannot connect to the queen at {addr}: {e}"));
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let mut reader = stream.try_clone().expect("clone the socket");
        let writer = Arc::new(Mutex::new(stream));
        let state = Arc::new(FakeState::default());
        state
            .held
            .lock()
            .expect("fresh lock")
            .extend(hello.held.iter().copied());
        state.auto_hold.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        {
            let state = state.clone();
            std::thread::spawn(move || loop {
                let incoming = match read_frame(&mut reader) {
                    Ok(Some(body)) => match serde_json::from_slice::<QueenMessage>(&body) {
                        Ok(msg) => {
                            if let QueenMessage::Assign(a) = &msg {
                                state.assigns_seen.fetch_add(1, Ordering::SeqCst);
                                if state.auto_hold.load(Ordering::SeqCst) {
                                    let mut held = state.held.lock().expect("held lock");
                                    held.push(Held {
                                        task_id: a.task_id,
                                        fence: a.fence,
                                    });
                                }
                            }
                            Incoming::Msg(msg)
                        }
                        Err(_) => {
                            Incoming::Unknown(serde_json::from_slice(&body).unwrap_or(Value::Null))
                        }
                    },
                    _ => Incoming::Closed,
                };
                let closed = incoming == Incoming::Closed;
                if tx.send(incoming).is_err() || closed {
                    return;
                }
            });
        }
        let mut drone = FakeDrone {
            id: hello.drone_id,
            name: hello.name.clone(),
            welcome: Welcome {
                protocol_version: 0,
                heartbeat_interval_ms: 0,
                heartbeat_timeout_ms: 0,
            },
            writer,
            rx,
            state,
        };
        drone.send(&DroneMessage::Hello(hello)).expect("send hello");
        drone.welcome = drone.expect(Duration::from_secs(10), "a welcome", |m| match m {
            QueenMessage::Welcome(w) => Some(w.clone()),
            QueenMessage::Reject(r) => panic!("the queen rejected the fake drone: {r:?}"),
            _ => None,
        });
        drone.state.heartbeating.store(true, Ordering::SeqCst);
        let interval = Duration::from_millis(drone.welcome.heartbeat_interval_ms.max(10));
        let writer = drone.writer.clone();
        let state = drone.state.clone();
        std::thread::spawn(move || loop {
            // A timer, not a synchronization: this is the fake drone's heartbeat clock.
            std::thread::sleep(interval);
            if state.stopped.load(Ordering::SeqCst) {
                return;
            }
            if !state.heartbeating.load(Ordering::SeqCst) {
                continue;
            }
            let hb = DroneMessage::Heartbeat(Heartbeat {
                held: state.held.lock().expect("held lock").clone(),
                assigns_seen: state.assigns_seen.load(Ordering::SeqCst),
                checkpoints: vec![],
            });
            let mut w = writer.lock().expect("writer lock");
            if write_frame(&mut *w, &encode(&hb)).is_err() {
                return;
            }
        });
        drone
    }

    pub fn send(&self, msg: &DroneMessage) -> io::Result<()> {
        let mut w = self.writer.lock().expect("writer lock");
        write_frame(&mut *w, &encode(msg))
    }

    /// Sends raw bytes on the connection.
    pub fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock().expect("writer lock");
        w.write_all(bytes)?;
        w.flush()
    }

    /// Stops heartbeating: from now on the drone says nothing unless a test sends for it.
    pub fn go_silent(&self) {
        self.state.heartbeating.store(false, Ordering::SeqCst);
    }

    pub fn resume_heartbeats(&self) {
        self.state.heartbeating.store(true, Ordering::SeqCst);
    }

    /// The tasks heartbeats report.
    pub fn held(&self) -> Vec<Held> {
        self.state.held.lock().expect("held lock").clone()
    }

    /// Stops reporting `task` in heartbeats.
    pub fn release(&self, task: TaskId) {
        self.state
            .held
            .lock()
            .expect("held lock")
            .retain(|h| h.task_id != task);
    }

    pub fn complete(&self, task: TaskId, fence: Fence, result: Value) {
        self.send(&DroneMessage::TaskComplete(TaskComplete {
            task_id: task,
            fence,
            result,
        }))
        .expect("send task_complete");
    }

    pub fn fail(&self, task: TaskId, fence: Fence, error: &str) {
        self.send(&DroneMessage::TaskFailed(TaskFailed {
            task_id: task,
            fence,
            error: error.to_owned(),
            result: None,
            retryable: true,
        }))
        .expect("send task_failed");
    }

    /// The next thing received within `within`.
    pub fn recv(&self, within: Duration) -> Option<Incoming> {
        self.rx.recv_timeout(within).ok()
    }

    /// Waits for a message `pick` accepts, discarding others; panics (listing what it
    /// discarded) if none comes within `within` or the connection closes first.
    pub fn expect<T>(
        &self,
        within: Duration,
        what: &str,
        mut pick: impl FnMut(&QueenMessage) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Incoming::Msg(m)) => match pick(&m) {
                    Some(v) => return v,
                    None => skipped.push(format!("{m:?}")),
                },
                Ok(Incoming::Unknown(v)) => skipped.push(format!("unknown {v}")),
                Ok(Incoming::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("fake drone {}: connection closed while waiting for {what}; skipped {skipped:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "fake drone {}: no {what} within {within:?}; skipped {skipped:?}\n{}",
                        self.name,
                        crate::process::dump_logs()
                    )
                }
            }
        }
    }

    /// Waits for an assign.
    pub fn expect_assign(&self, within: Duration) -> Assign {
        self.expect(within, "an assign", |m| match m {
            QueenMessage::Assign(a) => Some(a.clone()),
            _ => None,
        })
    }

    /// Waits for the queen to close the connection, returning what it sent before.
    pub fn expect_closed(&self, within: Duration) -> Vec<Incoming> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Incoming::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => return got,
                Ok(other) => got.push(other),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("fake drone {}: the queen did not close the connection within {within:?}; got {got:?}", self.name)
                }
            }
        }
    }

    /// Closes the connection (the drone "crashes" or its network drops).
    pub fn disconnect(self) {
        drop(self);
    }
}

impl Drop for FakeDrone {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}
