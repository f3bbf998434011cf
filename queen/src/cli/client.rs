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

impl Client {
    pub fn new(addr: &str, token: Option<Secret>) -> Result<Client, CliError> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build();
        Ok(Client {
            agent,
            base: base_url(addr)?,
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

/// `HOST:PORT` or `http://HOST:PORT` to a base URL. A server's unspecified listen address
/// (`0.0.0.0`, `[::]`) in the config means "this host" to a client.
fn base_url(addr: &str) -> Result<String, CliError> {
    if addr.starts_with("https://") {
        return Err(CliError::Invalid(format!(
            "invalid --addr `{addr}`: the queen serves plain HTTP; put TLS in a proxy and give \
             http://HOST:PORT"
        )));
    }
    let hostport = addr.strip_prefix("http://").unwrap_or(addr);
    let hostport = hostport.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains(['/', ' ']) || hostport.contains("://") {
        return Err(CliError::Invalid(format!(
            "invalid --addr `{addr}`: expected HOST:PORT or http://HOST:PORT"
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
    Ok(format!("http://{hostport}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_base_urls_and_unspecified_means_this_host() {
        let ok = |a: &str| base_url(a).ok();
        assert_eq!(
            ok("127.0.0.1:8081").as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(ok("http://queen:80/").as_deref(), Some("http://queen:80"));
        assert_eq!(ok("0.0.0.0:9000").as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(ok("[::]:9000").as_deref(), Some("http://[::1]:9000"));
        assert!(base_url("https://queen:443").is_err());
        assert!(base_url("http://queen:80/v1").is_err());
        assert!(base_url("").is_err());
    }
}
