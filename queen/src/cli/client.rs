//! A small blocking client of the queen's HTTP API: base URL, bearer token, timeouts, and
//! the mapping of answers to [`CliError`]s. Bodies stay `serde_json::Value`s so `--json`
//! can print exactly what the queen sent; commands decode them into `shared::api` types.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use shared::ids::Secret;

use super::CliError;

/// How long to wait for a TCP connection: a queen that is up accepts at once, so a few
/// seconds tells "down or unreachable" without making scripts hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request deadline: a batch chunk is one group commit (a disk sync with
/// `[storage] sync = true`) and a full page of finished tasks is read from disk; both take
/// well under this on a healthy queen.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read: a full page (1,000 tasks) at the largest payload and result sizes the
/// queen accepts by default is about 330 MB; anything bigger is not the API.
pub const MAX_RESPONSE_BYTES: u64 = 1 << 30;
/// Largest error body read: an `{"error": ...}` is a sentence.
const MAX_ERROR_BYTES: u64 = 64 * 1024;

/// The API of one queen.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    /// `http://host:port`, no trailing slash.
    base: String,
    /// As the user gave it (or the config), for messages.
    addr: String,
    token: Option<Secret>,
}

/// How to reach a TLS queen.
#[derive(Debug, Clone, Default)]
pub struct TlsOpts {
    /// Trust only this CA (PEM); none: the public roots.
    pub ca: Option<std::path::PathBuf>,
}

impl Client {
    /// A client of the queen at `addr`; with `tls`, over https only.
    pub fn new(
        addr: &str,
        token: Option<Secret>,
        tls: Option<TlsOpts>,
    ) -> Result<Client, CliError> {
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(ca) = tls.as_ref().and_then(|t| t.ca.as_deref()) {
            let config = hive_tls::client_config(ca, None)
                .map_err(|e| CliError::Invalid(format!("--ca: {e}")))?;
            agent = agent.tls_config(config);
        }
        Ok(Client {
            agent: agent.build(),
            base: base_url(addr, tls.is_some())?,
            addr: addr.to_string(),
            token,
        })
    }

    /// The address as given, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        self.call("POST", path, body)
    }

    pub fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.call("DELETE", path, None)
    }

    /// Decodes an API document into its `shared::api` type.
    pub fn decode<T: DeserializeOwned>(&self, doc: Value) -> Result<T, CliError> {
        serde_json::from_value(doc).map_err(|e| self.bad_response(e.to_string()))
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.set("Authorization", &format!("Bearer {}", token.0));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(resp) => {
                let mut raw = Vec::new();
                resp.into_reader()
                    .take(MAX_RESPONSE_BYTES + 1)
                    .read_to_end(&mut raw)
                    .map_err(|e| self.bad_response(format!("reading the answer: {e}")))?;
                if raw.len() as u64 > MAX_RESPONSE_BYTES {
                    return Err(self.bad_response(format!(
                        "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                    )));
                }
                serde_json::from_slice(&raw)
                    .map_err(|e| self.bad_response(format!("not JSON ({e})")))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let status_text = resp.status_text().to_string();
                let mut raw = Vec::new();
                let _ = resp
                    .into_reader()
                    .take(MAX_ERROR_BYTES)
                    .read_to_end(&mut raw);
                let message = match serde_json::from_slice::<shared::api::ErrorBody>(&raw) {
                    Ok(body) => body.error,
                    // Not the queen's error shape (a proxy, another server): say what came.
                    Err(_) => format!("HTTP {status} {status_text} from {}", self.addr),
                };
                Err(CliError::Api { status, message })
            }
            Err(ureq::Error::Transport(t)) => {
                let mut reason = t.kind().to_string().to_lowercase();
                if let Some(m) = t.message() {
                    reason = format!("{reason}: {m}");
                }
                if let Some(src) = std::error::Error::source(&t) {
                    reason = format!("{reason}: {src}");
                }
                Err(CliError::Unreachable {
                    addr: self.addr.clone(),
                    reason,
                })
            }
        }
    }

    fn bad_response(&self, reason: String) -> CliError {
        CliError::BadResponse {
            addr: self.addr.clone(),
            reason,
        }
    }
}

/// `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT` to a base URL (https for a bare
/// `HOST:PORT` when `tls`). A server's unspecified listen address (`0.0.0.0`, `[::]`) in the
/// config means "this host" to a client.
fn base_url(addr: &str, tls: bool) -> Result<String, CliError> {
    let (scheme, hostport) = if let Some(rest) = addr.strip_prefix("https://") {
        ("https", rest)
    } else if let Some(rest) = addr.strip_prefix("http://") {
        if tls {
            return Err(CliError::Invalid(format!(
                "invalid --addr `{addr}`: TLS is on (--ca or [tls] in the config); give https://HOST:PORT"
            )));
        }
        ("http", rest)
    } else {
        (if tls { "https" } else { "http" }, addr)
    };
    let hostport = hostport.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains(['/', ' ']) || hostport.contains("://") {
        return Err(CliError::Invalid(format!(
            "invalid --addr `{addr}`: expected HOST:PORT, http://HOST:PORT or https://HOST:PORT"
        )));
    }
    let hostport = match hostport.parse::<SocketAddr>() {
        Ok(sa) if sa.ip().is_unspecified() => {
            let ip = match sa.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            SocketAddr::new(ip, sa.port()).to_string()
        }
        _ => hostport.to_string(),
    };
    Ok(format!("{scheme}://{hostport}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_base_urls_and_unspecified_means_this_host() {
        let ok = |a: &str| base_url(a, false).ok();
        assert_eq!(
            ok("127.0.0.1:8081").as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(ok("http://queen:80/").as_deref(), Some("http://queen:80"));
        assert_eq!(ok("0.0.0.0:9000").as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(ok("[::]:9000").as_deref(), Some("http://[::1]:9000"));
        assert_eq!(
            ok("https://queen:443").as_deref(),
            Some("https://queen:443")
        );
        assert_eq!(
            base_url("queen:443", true).ok().as_deref(),
            Some("https://queen:443")
        );
        assert!(
            base_url("http://queen:443", true).is_err(),
            "no plain http when TLS is asked for"
        );
        assert!(base_url("http://queen:80/v1", false).is_err());
        assert!(base_url("", false).is_err());
    }
}
