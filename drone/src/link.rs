//! The byte stream to the queen: plain TCP, or TLS over it when the drone is given a CA to
//! verify the queen with (and, for mutual TLS, its own certificate).
//!
//! It owns its TLS settings and loads their files once, when the config is built: a bad
//! file stops the drone at start, naming it, and every reconnect reuses what was loaded.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// TLS to the queen: the CA that signed the queen's certificate, and optionally this
/// drone's own certificate for mutual TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify the queen's certificate against (default: the queen's host).
    pub server_name: Option<String>,
}

/// How the drone speaks TLS to its queen, loaded once at start.
#[derive(Clone)]
pub struct TlsClient {
    /// What was loaded, for comparing configs and for logs.
    settings: TlsSettings,
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("settings", &self.settings)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Two clients are the same when they were loaded from the same settings for the same
/// name (rustls configs cannot be compared; they are made from those files).
impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        self.settings == other.settings && self.server_name == other.server_name
    }
}

impl TlsClient {
    /// Reads the CA (and client identity) files; `host` is the queen's host as configured,
    /// used as the name to verify unless `settings.server_name` says otherwise.
    pub fn load(settings: TlsSettings, host: &str) -> Result<TlsClient, String> {
        let identity = match (&settings.cert, &settings.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let config = hive_tls::client_config(&settings.ca, identity).map_err(|e| e.to_string())?;
        let name = settings.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("`{name}` is not a valid TLS server name: {e}"))?;
        Ok(TlsClient {
            settings,
            config,
            server_name,
        })
    }

    /// The settings this client was loaded from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        let tls = connector.connect(self.server_name.clone(), tcp).await?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// A connection to the queen.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
