//! A simulated drone: the real protocol (shared frame codec and message types, hello,
//! heartbeats with `held` and `assigns_seen` as `drone/src/client.rs` sends them) without
//! running anything, so one process can hold thousands of drone connections, and can time
//! an assign and an ack on the same clock as the HTTP request that submitted the task.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use shared::frame;
use shared::protocol::{
    AckStatus, DroneMessage, Heartbeat, Held, Hello, QueenMessage, TaskComplete, Welcome,
    PROTOCOL_VERSION,
};
use shared::DroneId;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// How long a connect plus hello may take before the simulated drone gives up (30 s):
/// ten thousand drones connecting at once queue up behind each other's hellos.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a simulated drone does with the tasks it is assigned.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Completes each task `work` after its assign arrived (zero: at once, in the same
    /// write as the next heartbeat or completion).
    Complete { work: Duration },
    /// Never completes anything: holds its tasks (and reports them in heartbeats) forever.
    Hold,
}

/// A timestamped step of one task, for latency measurements. `seq` is the `seq` field of
/// the task's payload, which the submitter chose, so the bench can match a step with its
/// submit before the HTTP answer (and the task id) has even arrived.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    Assigned {
        seq: Option<u64>,
        at: std::time::Instant,
    },
    Completed {
        seq: Option<u64>,
        at: std::time::Instant,
    },
    /// The ack arrived (recorded or stale: `Counters::stale` counts the stale ones).
    Recorded {
        seq: Option<u64>,
        at: std::time::Instant,
    },
}

/// Counts shared by every simulated drone of one run.
#[derive(Debug, Default)]
pub struct Counters {
    pub welcomed: AtomicU64,
    pub assigned: AtomicU64,
    pub recorded: AtomicU64,
    pub stale: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Connections the queen closed or broke (an `error` message, EOF, reset).
    pub lost: AtomicU64,
    /// Set when the first assign arrives, and when `assigned` / `recorded` reach `target`.
    pub first_assign: OnceLock<std::time::Instant>,
    pub all_assigned: OnceLock<std::time::Instant>,
    pub all_recorded: OnceLock<std::time::Instant>,
    /// The task count after which `all_assigned` / `all_recorded` are set (0: never).
    pub target: AtomicU64,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A welcomed connection.
#[derive(Debug)]
pub struct Connected {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    pub welcome: Welcome,
}

/// Connects, sends the hello a real drone sends (fresh drone id, no held tasks, kind
/// `echo`), and waits for the welcome.
pub async fn connect(addr: &str, name: &str, slots: u32) -> Result<Connected> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the queen at {addr}"))?;
        stream.set_nodelay(true)?;
        let mut framed = Framed::new(stream, frame::codec(frame::DEFAULT_MAX_FRAME_LEN));
        let hello = DroneMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            drone_id: DroneId::generate(),
            name: name.to_string(),
            labels: Vec::new(),
            slots,
            kinds: vec!["echo".to_string()],
            token: None,
            held: Vec::new(),
            draining: false,
            pongs: false,
            pools: Vec::new(),
            encodings: Vec::new(),
        });
        framed.send(frame::encode(&hello)?).await?;
        let answer = framed
            .next()
            .await
            .context("the queen closed the connection before answering the hello")??;
        match frame::decode::<QueenMessage>(&answer)? {
            QueenMessage::Welcome(welcome) => Ok(Connected { framed, welcome }),
            QueenMessage::Reject(r) => bail!("the queen rejected the hello: {}", r.reason),
            other => bail!("expected a welcome, got {other:?}"),
        }
    })
    .await
    .with_context(|| format!("no welcome within {HANDSHAKE_TIMEOUT:?}"))?
}

/// A simulated drone's state on one connection.
#[derive(Debug)]
struct Drone {
    behavior: Behavior,
    events: Option<mpsc::Sender<Event>>,
    counters: std::sync::Arc<Counters>,
    assigns_seen: u64,
    /// Tasks assigned and not yet completed, due in assign order (the work is constant).
    running: VecDeque<(Instant, Held, Option<u64>)>,
    /// Tasks held forever (`Behavior::Hold`).
    holding: Vec<Held>,
    /// Completions sent and not yet acknowledged.
    unacked: HashMap<Held, Option<u64>>,
}

impl Drone {
    fn emit(&self, event: Event) {
        if let Some(events) = &self.events {
            // The receiver is gone only once the run is over.
            let _ = events.send(event);
        }
    }

    /// Everything this drone holds: what a heartbeat must list (see `Heartbeat::held`).
    fn held(&self) -> Vec<Held> {
        self.running
            .iter()
            .map(|(_, h, _)| *h)
            .chain(self.holding.iter().copied())
            .chain(self.unacked.keys().copied())
            .collect()
    }

    /// Handles one message; returns the messages to send in answer.
    fn on_message(&mut self, msg: QueenMessage, out: &mut Vec<DroneMessage>) -> Result<()> {
        let at = std::time::Instant::now();
        match msg {
            QueenMessage::Assign(a) => {
                self.assigns_seen += 1;
                let seq = a.payload.get("seq").and_then(serde_json::Value::as_u64);
                self.emit(Event::Assigned { seq, at });
                let counters = &self.counters;
                let n = counters.assigned.fetch_add(1, Ordering::Relaxed) + 1;
                let _ = counters.first_assign.set(at);
                if n == counters.target.load(Ordering::Relaxed) {
                    let _ = counters.all_assigned.set(at);
                }
                let held = Held {
                    task_id: a.task_id,
                    fence: a.fence,
                };
                match self.behavior {
                    Behavior::Hold => self.holding.push(held),
                    Behavior::Complete { work } if work.is_zero() => {
                        self.complete(held, seq, out);
                    }
                    Behavior::Complete { work } => {
                        self.running.push_back((Instant::now() + work, held, seq));
                    }
                }
            }
            QueenMessage::Ack(ack) => {
                let held = Held {
                    task_id: ack.task_id,
                    fence: ack.fence,
                };
                let seq = self.unacked.remove(&held).flatten();
                self.emit(Event::Recorded { seq, at });
                let counters = &self.counters;
                if ack.status == AckStatus::Stale {
                    counters.stale.fetch_add(1, Ordering::Relaxed);
                }
                let n = counters.recorded.fetch_add(1, Ordering::Relaxed) + 1;
                if n == counters.target.load(Ordering::Relaxed) {
                    let _ = counters.all_recorded.set(at);
                }
            }
            QueenMessage::Cancel(c) => {
                self.running.retain(|(_, h, _)| h.task_id != c.task_id);
                self.holding.retain(|h| h.task_id != c.task_id);
            }
            QueenMessage::Error { message } => bail!("the queen sent an error: {message}"),
            QueenMessage::Welcome(_) | QueenMessage::Reject(_) | QueenMessage::Pong => {}
        }
        Ok(())
    }

    fn complete(&mut self, held: Held, seq: Option<u64>, out: &mut Vec<DroneMessage>) {
        self.emit(Event::Completed {
            seq,
            at: std::time::Instant::now(),
        });
        self.unacked.insert(held, seq);
        out.push(DroneMessage::TaskComplete(TaskComplete {
            task_id: held.task_id,
            fence: held.fence,
            result: serde_json::Value::Null,
        }));
    }
}

/// Runs one simulated drone until `stop` (then returns `Ok`) or until the connection
/// fails (an error, counted in `counters.lost`).
pub async fn run(
    conn: Connected,
    behavior: Behavior,
    events: Option<mpsc::Sender<Event>>,
    counters: std::sync::Arc<Counters>,
    stop: CancellationToken,
) -> Result<()> {
    counters.welcomed.fetch_add(1, Ordering::Relaxed);
    let result = drive(conn, behavior, events, counters.clone(), stop).await;
    if result.is_err() {
        counters.lost.fetch_add(1, Ordering::Relaxed);
    }
    result
}

async fn drive(
    conn: Connected,
    behavior: Behavior,
    events: Option<mpsc::Sender<Event>>,
    counters: std::sync::Arc<Counters>,
    stop: CancellationToken,
) -> Result<()> {
    let Connected {
        mut framed,
        welcome,
    } = conn;
    // The same cadence as a real drone: every interval, first one interval after the
    // welcome, delayed (not bunched up) after a stall.
    let period = Duration::from_millis(welcome.heartbeat_interval_ms.max(1));
    let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut drone = Drone {
        behavior,
        events,
        counters,
        assigns_seen: 0,
        running: VecDeque::new(),
        holding: Vec::new(),
        unacked: HashMap::new(),
    };
    let mut out = Vec::new();
    loop {
        let next_due = drone.running.front().map(|(due, _, _)| *due);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            frame = framed.next() => {
                let mut frame = Some(frame);
                // Handle every frame already received, then answer them in one write.
                while let Some(f) = frame {
                    let bytes = f.context("the queen closed the connection")??;
                    drone.on_message(frame::decode::<QueenMessage>(&bytes)?, &mut out)?;
                    frame = framed.next().now_or_never();
                }
            }
            _ = heartbeat.tick() => {
                drone.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                out.push(DroneMessage::Heartbeat(Heartbeat {
                    held: drone.held(),
                    assigns_seen: drone.assigns_seen,
                    checkpoints: Vec::new(),
                    pools: Vec::new(),
                }));
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                let now = Instant::now();
                while let Some((due, held, seq)) = drone.running.front().copied() {
                    if due > now {
                        break;
                    }
                    drone.running.pop_front();
                    drone.complete(held, seq, &mut out);
                }
            }
        }
        if !out.is_empty() {
            for msg in out.drain(..) {
                framed.feed(frame::encode(&msg)?).await?;
            }
            SinkExt::<bytes::Bytes>::flush(&mut framed).await?;
        }
    }
}
