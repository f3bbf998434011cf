//! What stands between a socket and the protocol: TLS (rustls) for both listeners, and the
//! HTTP accept loop with its limits: a connection cap, a header-read timeout (slow loris,
//! idle keep-alives) and a body-read timeout (`http_request_timeout_ms`, which times the
//! body only), each from config.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping queen lets HTTP requests in flight finish.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// TLS acceptors for the two listeners (none: plain TCP).
#[derive(Clone, Default)]
pub struct Tls {
    pub drones: Option<TlsAcceptor>,
    pub http: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("drones", &self.drones.is_some())
            .field("http", &self.http.is_some())
            .finish()
    }
}

impl Tls {
    /// Reads the certificate, key and client CA named in `[tls]`.
    pub fn from_config(cfg: &Config) -> Result<Tls, hive_tls::TlsError> {
        let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) else {
            return Ok(Tls::default());
        };
        let drones = hive_tls::server_config(cert, key, cfg.tls.client_ca.as_deref())?;
        // The API is for browsers and the CLI: no client certificates there.
        let http = hive_tls::server_config(cert, key, None)?;
        Ok(Tls {
            drones: Some(TlsAcceptor::from(drones)),
            http: Some(TlsAcceptor::from(http)),
        })
    }
}

/// A byte stream a protocol can run over: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Serves `app` on `listener` until `shutdown`, then lets requests in flight finish (for
/// a few seconds at most).
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    cfg: Arc<Config>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(cfg.queen.max_http_connections));
    let header_timeout = Duration::from_millis(cfg.queen.http_header_timeout_ms);
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        match &tls {
            None => {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                // The handshake runs on the connection's own task, bounded by the same
                // timeout as headers, so a stalled handshake holds only its own slot.
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls_stream =
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "tls handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
                    let _ = watcher.watch(conn).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(HTTP_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http requests still running at shutdown; closing them");
    }
}
