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
    /// The name to verify every queen's certificate against (default: the host of the
    /// address being dialled).
    pub server_name: Option<String>,
}

/// How the drone speaks TLS to its queen, loaded once at start.
#[derive(Clone)]
pub struct TlsClient {
    /// What was loaded, for comparing configs and for logs.
    settings: TlsSettings,
    config: Arc<rustls::ClientConfig>,
    /// `settings.server_name`, checked: when set, the one name every queen must carry.
    server_name: Option<ServerName<'static>>,
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
    /// Reads the CA (and client identity) files, and checks `settings.server_name`.
    pub fn load(settings: TlsSettings) -> Result<TlsClient, String> {
        let identity = match (&settings.cert, &settings.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let config = hive_tls::client_config(&settings.ca, identity).map_err(|e| e.to_string())?;
        let server_name = settings
            .server_name
            .as_deref()
            .map(parse_name)
            .transpose()?;
        Ok(TlsClient {
            settings,
            config,
            server_name,
        })
    }

    /// The name a queen dialled at `host` must carry: the configured server name if there
    /// is one, else `host` itself. Each queen of a leader and its standbys has its own
    /// certificate naming its own host.
    pub fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => parse_name(host),
        }
    }

    /// The settings this client was loaded from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// TLS over `tcp`, verifying the queen dialled at `host` (see [`Self::server_name_for`]).
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<Stream> {
        let name = self
            .server_name_for(host)
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        let tls = connector.connect(name, tcp).await?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

fn parse_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| format!("`{name}` is not a valid TLS server name: {e}"))
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
