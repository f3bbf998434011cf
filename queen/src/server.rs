//! The drone protocol listener: accepts connections (bounded by a semaphore), reads and
//! checks the hello, then shuttles frames between the socket and the core. One bad frame
//! closes that connection only, after an `error` message saying what was wrong.
//!
//! The hello is checked here, at the edge (protocol version, drone token, its shape): the
//! core only ever sees a hello from a drone it may take. A refused hello gets a `reject`
//! with a code and the connection closes; nothing of it reaches the core.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared::frame::{self, Encoding};
use shared::ids::Secret;
use shared::protocol::{self, DroneMessage, Hello, QueenMessage};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{Conn, CoreHandle, Request};
use crate::net::Io;

/// The drone port's limits, from `[queen]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    pub max_frame_len: usize,
    /// TLS handshake plus hello must be done within this.
    pub hello_timeout: Duration,
}

impl Limits {
    pub fn from_config(cfg: &crate::config::Config) -> Limits {
        Limits {
            max_connections: cfg.queen.max_connections,
            max_frame_len: cfg.queen.max_frame_len,
            hello_timeout: Duration::from_millis(cfg.queen.hello_timeout_ms),
        }
    }
}

/// Who may connect as a drone, from `[auth]`.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// The token a hello must carry (`auth.drone_token`, else `auth.token`); `None` takes
    /// any drone.
    pub token: Option<Secret>,
}

impl Admission {
    pub fn from_config(cfg: &crate::config::Config) -> Admission {
        Admission {
            token: cfg.auth.drone().cloned(),
        }
    }
}

/// Who answers a drone once its hello is admitted.
#[derive(Clone)]
pub enum Target {
    /// The leader's (or a single queen's) scheduler core.
    Core(CoreHandle),
    /// A standby: every admitted hello gets a `not_leader` reject naming the leader's
    /// drone address when this function knows it.
    Standby(Arc<dyn Fn() -> Option<String> + Send + Sync>),
}

/// Serves drone connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    core: Target,
    limits: Limits,
    admission: Admission,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let edge = Arc::new(Edge { limits, admission });
    let ids = AtomicU64::new(1);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(crate::net::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let core = core.clone();
        let close = shutdown.child_token();
        let tls = tls.clone();
        let edge = Arc::clone(&edge);
        tracker.spawn(async move {
            // The handshake counts against the hello timeout: a peer that stalls in it
            // holds one slot for that long, no more.
            let started = tokio::time::Instant::now();
            match tls {
                None => connection(stream, peer, id, core, &edge, started, close).await,
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        _ = close.cancelled() => return,
                        h = tokio::time::timeout(limits.hello_timeout, acceptor.accept(stream)) => h,
                    };
                    match handshake {
                        Ok(Ok(s)) => connection(s, peer, id, core, &edge, started, close).await,
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "no tls handshake in time; closing"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// What every connection on the drone port is held to.
#[derive(Debug)]
struct Edge {
    limits: Limits,
    admission: Admission,
}

async fn connection<S: Io>(
    stream: S,
    peer: SocketAddr,
    id: u64,
    target: Target,
    edge: &Edge,
    started: tokio::time::Instant,
    close: CancellationToken,
) {
    let limits = edge.limits;
    let framed = Framed::new(stream, frame::codec(limits.max_frame_len));
    let (mut sink, mut frames) = framed.split();

    let first = tokio::select! {
        _ = close.cancelled() => return,
        f = tokio::time::timeout_at(started + limits.hello_timeout, frames.next()) => f,
    };
    let hello = match first {
        Err(_) => {
            tracing::debug!(%peer, "no hello in time; closing");
            return;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => {
            let message = bad_frame(&e, limits.max_frame_len);
            tracing::warn!(%peer, %message, "closing connection");
            let _ = send(&mut sink, &QueenMessage::Error { message }).await;
            return;
        }
        Ok(Some(Ok(bytes))) => match frame::decode::<DroneMessage>(&bytes) {
            Ok(DroneMessage::Hello(h)) => h,
            Ok(_) => {
                let message = "the first message must be a hello".to_string();
                let _ = send(&mut sink, &QueenMessage::Error { message }).await;
                return;
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(%peer, %message, "closing connection");
                let _ = send(&mut sink, &QueenMessage::Error { message }).await;
                return;
            }
        },
    };
    if !admit(&hello, &edge.admission, &mut sink, limits, &close).await {
        return;
    }
    let core = match target {
        Target::Core(core) => core,
        Target::Standby(leader) => {
            let leader = leader();
            let reason = match &leader {
                Some(addr) => format!("this queen is a standby; the leader is at {addr}"),
                None => "this queen is a standby and no queen leads right now".to_string(),
            };
            tracing::debug!(%peer, ?leader, "refusing a drone: standby");
            let reject = protocol::Reject {
                reason,
                supported_versions: protocol::SUPPORTED_VERSIONS.to_vec(),
                code: Some(protocol::RejectCode::NotLeader),
                leader,
            };
            let _ = send(&mut sink, &QueenMessage::Reject(reject)).await;
            return;
        }
    };

    // The wire encoding after the welcome: the first the drone offered that this queen
    // speaks (it speaks all it knows), JSON otherwise. The core knows nothing of it: the
    // writer puts the choice in the welcome it forwards, the last JSON frame it writes.
    let encoding = Encoding::choose(&hello.encodings, &[Encoding::MessagePack]);
    let (tx, mut rx) = mpsc::unbounded_channel::<QueenMessage>();
    let conn = Conn {
        id,
        tx: tx.clone(),
        close: close.clone(),
    };
    if core
        .send(Request::Hello {
            hello: Box::new(hello),
            conn,
        })
        .await
        .is_err()
    {
        return;
    }

    let writer_close = close.clone();
    let writer = async move {
        // JSON until the welcome is written (a reject or an error before it is JSON too).
        let mut writing = Encoding::Json;
        loop {
            // Biased: a queued `error` is written before a close is noticed.
            let msg = tokio::select! {
                biased;
                m = rx.recv() => m,
                _ = writer_close.cancelled() => None,
            };
            let Some(mut msg) = msg else { break };
            // Feed everything already queued, then flush once.
            let mut last = is_final(&msg);
            let fed = match &mut msg {
                QueenMessage::Welcome(welcome) => {
                    welcome.encoding =
                        (encoding != Encoding::Json).then(|| encoding.name().to_owned());
                    let fed = feed(&mut sink, &msg, Encoding::Json).await;
                    writing = encoding;
                    fed
                }
                _ => feed(&mut sink, &msg, writing).await,
            };
            if fed.is_err() {
                break;
            }
            while !last {
                match rx.try_recv() {
                    Ok(m) => {
                        last = is_final(&m);
                        if feed(&mut sink, &m, writing).await.is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() || last {
                break;
            }
        }
        let _ = sink.close().await;
        writer_close.cancel();
    };

    let reader_close = close.clone();
    let reader = async move {
        loop {
            let next = tokio::select! {
                _ = reader_close.cancelled() => break,
                f = frames.next() => f,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    let message = bad_frame(&e, limits.max_frame_len);
                    tracing::warn!(%peer, conn = id, %message, "closing connection");
                    let _ = tx.send(QueenMessage::Error { message });
                    break;
                }
                // The drone writes nothing after its hello until it has our welcome.
                Some(Ok(bytes)) => match encoding.decode::<DroneMessage>(&bytes) {
                    Ok(msg) => {
                        if core.send(Request::Message { conn: id, msg }).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let message = e.to_string();
                        tracing::warn!(%peer, conn = id, %message, "closing connection");
                        let _ = tx.send(QueenMessage::Error { message });
                        break;
                    }
                },
            }
        }
        let _ = core.send(Request::Closed { conn: id }).await;
    };
    tokio::join!(writer, reader);
}

/// Checks a hello at the edge. A refused one is answered with a `reject` (its code says
/// why), written, flushed and the connection closed before this returns false; the hello
/// never reaches the core.
async fn admit<S: Io>(
    hello: &Hello,
    admission: &Admission,
    sink: &mut Sink<S>,
    limits: Limits,
    close: &CancellationToken,
) -> bool {
    let Err(refusal) = protocol::check_hello(hello, admission.token.as_ref()) else {
        return true;
    };
    tracing::warn!(drone = %hello.drone_id, name = %hello.name, reason = %refusal.reason, "drone rejected");
    let reject = QueenMessage::Reject(refusal.to_reject());
    // Bounded like the hello: a peer that stops reading holds the slot no longer than that.
    // Closing the sink shuts the write side down (a TLS close_notify first), so the
    // reject is on the wire before the socket is dropped.
    let written = async {
        if send(sink, &reject).await.is_ok() {
            let _ = sink.close().await;
        }
    };
    tokio::select! {
        _ = close.cancelled() => {}
        _ = tokio::time::timeout(limits.hello_timeout, written) => {}
    }
    false
}

/// What the drone is told about a frame that could not be read.
fn bad_frame(e: &std::io::Error, max_frame_len: usize) -> String {
    let too_long = e
        .get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>());
    if too_long {
        format!(
            "bad frame: longer than {max_frame_len} bytes (queen.max_frame_len = {max_frame_len})"
        )
    } else {
        format!("bad frame: {e}")
    }
}

/// Messages after which the queen closes the connection.
fn is_final(msg: &QueenMessage) -> bool {
    matches!(msg, QueenMessage::Reject(_) | QueenMessage::Error { .. })
}

type Sink<S> = futures_util::stream::SplitSink<
    Framed<S, tokio_util::codec::LengthDelimitedCodec>,
    bytes::Bytes,
>;

async fn feed<S: Io>(sink: &mut Sink<S>, msg: &QueenMessage, encoding: Encoding) -> Result<(), ()> {
    let bytes = encoding
        .encode(msg)
        .map_err(|e| tracing::error!(error = %e, "encode failed"))?;
    sink.feed(bytes).await.map_err(|_| ())
}

/// Sends one message before the welcome (so as JSON) and flushes.
async fn send<S: Io>(sink: &mut Sink<S>, msg: &QueenMessage) -> Result<(), ()> {
    feed(sink, msg, Encoding::Json).await?;
    sink.flush().await.map_err(|_| ())
}
