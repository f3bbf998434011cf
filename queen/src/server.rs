//! The drone protocol listener: accepts connections (bounded by a semaphore), reads the
//! hello, then shuttles frames between the socket and the core. One bad frame closes that
//! connection only, after an `error` message saying what was wrong.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared::frame;
use shared::protocol::{DroneMessage, QueenMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{Conn, CoreHandle, Request};

/// A connection must say hello within this, or it is closed (it holds a connection slot).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves drone connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    core: CoreHandle,
    max_connections: usize,
    max_frame_len: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
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
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let core = core.clone();
        let close = shutdown.child_token();
        tracker.spawn(async move {
            connection(stream, peer, id, core, max_frame_len, close).await;
            drop(permit);
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    core: CoreHandle,
    max_frame_len: usize,
    close: CancellationToken,
) {
    let framed = Framed::new(stream, frame::codec(max_frame_len));
    let (mut sink, mut frames) = framed.split();

    let first = tokio::select! {
        _ = close.cancelled() => return,
        f = tokio::time::timeout(HELLO_TIMEOUT, frames.next()) => f,
    };
    let hello = match first {
        Err(_) => {
            tracing::debug!(%peer, "no hello in time; closing");
            return;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => {
            let message = format!("bad frame: {e}");
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
        loop {
            // Biased: a queued `error` is written before a close is noticed.
            let msg = tokio::select! {
                biased;
                m = rx.recv() => m,
                _ = writer_close.cancelled() => None,
            };
            let Some(msg) = msg else { break };
            // Feed everything already queued, then flush once.
            let mut last = is_final(&msg);
            if feed(&mut sink, &msg).await.is_err() {
                break;
            }
            while !last {
                match rx.try_recv() {
                    Ok(m) => {
                        last = is_final(&m);
                        if feed(&mut sink, &m).await.is_err() {
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
                    let message = format!("bad frame: {e}");
                    tracing::warn!(%peer, conn = id, %message, "closing connection");
                    let _ = tx.send(QueenMessage::Error { message });
                    break;
                }
                Some(Ok(bytes)) => match frame::decode::<DroneMessage>(&bytes) {
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

/// Messages after which the queen closes the connection.
fn is_final(msg: &QueenMessage) -> bool {
    matches!(msg, QueenMessage::Reject(_) | QueenMessage::Error { .. })
}

type Sink = futures_util::stream::SplitSink<
    Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
    bytes::Bytes,
>;

async fn feed(sink: &mut Sink, msg: &QueenMessage) -> Result<(), ()> {
    let bytes = frame::encode(msg).map_err(|e| tracing::error!(error = %e, "encode failed"))?;
    sink.feed(bytes).await.map_err(|_| ())
}

async fn send(sink: &mut Sink, msg: &QueenMessage) -> Result<(), ()> {
    feed(sink, msg).await?;
    sink.flush().await.map_err(|_| ())
}
