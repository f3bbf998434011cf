//! A small blocking client of the queen's HTTP API: base URLs, bearer token, timeouts,
//! which queen to ask when several share a database, and the mapping of answers to
//! [`CliError`]s. Bodies stay `serde_json::Value`s so `--json` can print exactly what the
//! queen sent; commands decode them into `shared::api` types.

use std::cell::RefCell;
use std::collections::VecDeque;
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

/// One queen's API.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `http://host:port`, no trailing slash.
    base: String,
    /// As the user gave it (or the config, or a standby naming the leader), for messages.
    addr: String,
}

impl Target {
    fn new(addr: &str, tls: bool) -> Result<Target, CliError> {
        Ok(Target {
            base: base_url(addr, tls)?,
            addr: addr.to_string(),
        })
    }
}

/// The API of a hive: one queen, or queens that share a database (one leader, standbys).
/// Each request goes to the queen that answered last, then to the others in turn (see
/// [`next_queue`]).
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    /// The queens given, in order.
    targets: Vec<Target>,
    /// The queen that answered last: asked first, as it most likely still leads.
    current: RefCell<Target>,
    /// https only.
    tls: bool,
    token: Option<Secret>,
}

/// How to reach a TLS queen.
#[derive(Debug, Clone, Default)]
pub struct TlsOpts {
    /// Trust only this CA (PEM); none: the public roots.
    pub ca: Option<std::path::PathBuf>,
}

/// How a request to one queen went wrong, as far as asking another goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Miss {
    /// No connection (refused, DNS, TLS handshake, connect timeout): nothing was sent.
    NotSent,
    /// The connection failed once the request may have reached the queen.
    Lost,
    /// `503`; `leader` is the leader's HTTP address when the queen is a standby that
    /// knows it.
    Unavailable { leader: Option<String> },
    /// Any other answer (4xx, another 5xx, not the API): another queen would not help.
    Final,
}

impl Client {
    /// A client of the queens at `addrs` (`A` or `A,B,...`); with `tls`, over https only.
    pub fn new(
        addrs: &str,
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
        let targets = parse_addrs(addrs)?
            .into_iter()
            .map(|a| Target::new(a, tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        let current = targets
            .first()
            .cloned()
            .ok_or_else(|| CliError::Invalid("--addr: no address given".to_string()))?;
        Ok(Client {
            agent: agent.build(),
            targets,
            current: RefCell::new(current),
            tls: tls.is_some(),
            token,
        })
    }

    /// The address of the queen that answered last (the first given before any answer),
    /// for messages.
    pub fn addr(&self) -> String {
        self.current.borrow().addr.clone()
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
        serde_json::from_value(doc).map_err(|e| bad_response(&self.addr(), e.to_string()))
    }

    /// Asks the queens in turn until one answers, or one's answer stands.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        let current = self.current.borrow().clone();
        let mut queue: VecDeque<Target> = std::iter::once(current.clone())
            .chain(self.targets.iter().filter(|t| **t != current).cloned())
            .collect();
        let mut asked: Vec<Target> = Vec::new();
        let mut misses: Vec<String> = Vec::new();
        let mut last: Option<CliError> = None;
        while let Some(target) = queue.pop_front() {
            if asked.iter().any(|t| t.base == target.base) {
                continue;
            }
            let (error, miss) = match self.call_one(&target, method, path, body) {
                Ok(doc) => {
                    *self.current.borrow_mut() = target;
                    return Ok(doc);
                }
                Err(failed) => failed,
            };
            asked.push(target.clone());
            queue = match next_queue(method, &miss, queue, &asked, self.tls) {
                Some(next) => next,
                None => return Err(error),
            };
            misses.push(match &error {
                CliError::Unreachable { .. } => error.to_string(),
                _ => format!("{}: {error}", target.addr),
            });
            last = Some(error);
        }
        // Every queen was asked and none took the request.
        match last {
            // One queen: its own error, exactly as when only one is given.
            Some(error) if misses.len() == 1 => Err(error),
            _ => Err(CliError::NoQueen(misses)),
        }
    }

    /// One request to one queen.
    fn call_one(
        &self,
        target: &Target,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, (CliError, Miss)> {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", target.base));
        if let Some(token) = &self.token {
            req = req.set("Authorization", &format!("Bearer {}", token.0));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let addr = target.addr.as_str();
        match res {
            Ok(resp) => {
                let mut raw = Vec::new();
                resp.into_reader()
                    .take(MAX_RESPONSE_BYTES + 1)
                    .read_to_end(&mut raw)
                    .map_err(|e| {
                        let error = bad_response(addr, format!("reading the answer: {e}"));
                        (error, Miss::Lost)
                    })?;
                if raw.len() as u64 > MAX_RESPONSE_BYTES {
                    let error = bad_response(
                        addr,
                        format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"),
                    );
                    return Err((error, Miss::Final));
                }
                serde_json::from_slice(&raw)
                    .map_err(|e| (bad_response(addr, format!("not JSON ({e})")), Miss::Final))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let status_text = resp.status_text().to_string();
                let mut raw = Vec::new();
                let _ = resp
                    .into_reader()
                    .take(MAX_ERROR_BYTES)
                    .read_to_end(&mut raw);
                let (message, leader) = match serde_json::from_slice::<Refusal>(&raw) {
                    Ok(body) => (body.error, body.leader),
                    // Not the queen's error shape (a proxy, another server): say what came.
                    Err(_) => (format!("HTTP {status} {status_text} from {addr}"), None),
                };
                let miss = match status {
                    503 => Miss::Unavailable { leader },
                    _ => Miss::Final,
                };
                Err((CliError::Api { status, message }, miss))
            }
            Err(ureq::Error::Transport(t)) => {
                let miss = match t.kind() {
                    ureq::ErrorKind::ConnectionFailed
                    | ureq::ErrorKind::Dns
                    | ureq::ErrorKind::ProxyConnect => Miss::NotSent,
                    _ => Miss::Lost,
                };
                let mut reason = t.kind().to_string().to_lowercase();
                if let Some(m) = t.message() {
                    reason = format!("{reason}: {m}");
                }
                if let Some(src) = std::error::Error::source(&t) {
                    reason = format!("{reason}: {src}");
                }
                let error = CliError::Unreachable {
                    addr: addr.to_string(),
                    reason,
                };
                Err((error, miss))
            }
        }
    }
}

/// An error answer: the queen's `{"error": ...}`, with the leader's HTTP address when a
/// standby answers 503 and knows it.
#[derive(Debug, serde::Deserialize)]
struct Refusal {
    error: String,
    #[serde(default)]
    leader: Option<String>,
}

fn bad_response(addr: &str, reason: String) -> CliError {
    CliError::BadResponse {
        addr: addr.to_string(),
        reason,
    }
}

/// `A` or `A,B,...` as `--addr` (or `HIVE_ADDR`) gives it: each entry trimmed, none empty,
/// none twice.
fn parse_addrs(text: &str) -> Result<Vec<&str>, CliError> {
    let mut addrs: Vec<&str> = Vec::new();
    for (i, entry) in text.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(CliError::Invalid(format!(
                "invalid --addr `{text}`: address {} of the list is empty",
                i + 1
            )));
        }
        if addrs.contains(&entry) {
            return Err(CliError::Invalid(format!(
                "invalid --addr `{text}`: `{entry}` is listed twice"
            )));
        }
        addrs.push(entry);
    }
    Ok(addrs)
}

/// Whether an address list asks for TLS: any entry written `https://...`.
pub fn wants_https(addrs: &str) -> bool {
    addrs.split(',').any(|a| a.trim().starts_with("https://"))
}

/// After `miss` from a queen, the queens to ask next, or `None` when the request must go
/// nowhere else and this answer stands. `queue` holds the queens not yet asked, in order;
/// `asked` those already asked.
///
/// * Nothing was sent (no connection): any request goes on to the next queen.
/// * A 503 naming the leader (a standby, which applied nothing): the leader next, even if
///   it was not given, unless it was already asked; then the rest.
/// * A connection lost after sending, or a 503 without a leader (a standby that does not
///   know it, or a leader failing): only a read goes on; a write may have been applied
///   (or may be applied yet), and sending it again elsewhere could apply it twice.
/// * Anything else is the answer.
fn next_queue(
    method: &str,
    miss: &Miss,
    mut queue: VecDeque<Target>,
    asked: &[Target],
    tls: bool,
) -> Option<VecDeque<Target>> {
    let read = method == "GET";
    match miss {
        Miss::NotSent => {}
        Miss::Unavailable {
            leader: Some(leader),
        } => {
            // A leader address that does not parse is no lead; the rest may still answer.
            if let Ok(leader) = Target::new(leader, tls) {
                queue.retain(|t| t.base != leader.base);
                if !asked.iter().any(|t| t.base == leader.base) {
                    queue.push_front(leader);
                }
            }
        }
        Miss::Lost | Miss::Unavailable { leader: None } if read => {}
        Miss::Lost | Miss::Unavailable { leader: None } | Miss::Final => return None,
    }
    Some(queue)
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

    fn target(addr: &str) -> Target {
        Target::new(addr, false).unwrap_or_else(|e| panic!("bad test address {addr}: {e}"))
    }

    fn queue(addrs: &[&str]) -> VecDeque<Target> {
        addrs.iter().map(|a| target(a)).collect()
    }

    /// The addresses `next_queue` says to ask next after `miss` from `a:1`, with `b:2` and
    /// `c:3` not yet asked; `None`: the answer stands.
    fn after(method: &str, miss: Miss) -> Option<Vec<String>> {
        let next = next_queue(
            method,
            &miss,
            queue(&["b:2", "c:3"]),
            &[target("a:1")],
            false,
        );
        next.map(|q| q.into_iter().map(|t| t.addr).collect())
    }

    fn standby(leader: Option<&str>) -> Miss {
        Miss::Unavailable {
            leader: leader.map(str::to_string),
        }
    }

    #[test]
    fn address_lists_are_split_trimmed_and_checked() {
        assert_eq!(parse_addrs("a:1").ok(), Some(vec!["a:1"]));
        assert_eq!(
            parse_addrs("a:1, http://b:2 ,https://c:3").ok(),
            Some(vec!["a:1", "http://b:2", "https://c:3"])
        );
        let err = |text: &str| match parse_addrs(text) {
            Err(CliError::Invalid(m)) => m,
            other => panic!("`{text}` gave {other:?}"),
        };
        assert_eq!(
            err("a:1,,b:2"),
            "invalid --addr `a:1,,b:2`: address 2 of the list is empty"
        );
        assert_eq!(err(""), "invalid --addr ``: address 1 of the list is empty");
        assert_eq!(
            err("a:1,"),
            "invalid --addr `a:1,`: address 2 of the list is empty"
        );
        assert_eq!(
            err("a:1,a:1"),
            "invalid --addr `a:1,a:1`: `a:1` is listed twice"
        );
        // Each entry is checked as a single address is.
        for bad in ["a:1,http://b:2/v1", "a:1,b c:2"] {
            assert!(
                matches!(Client::new(bad, None, None), Err(CliError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(wants_https("a:1,https://b:2"));
        assert!(!wants_https("a:1,http://b:2"));
        // TLS for one is TLS for all: a plain http:// entry is refused, bare ones get https.
        let tls = Some(TlsOpts::default());
        assert!(matches!(
            Client::new("https://a:1,http://b:2", None, tls.clone()),
            Err(CliError::Invalid(_))
        ));
        let client = Client::new("https://a:1, b:2", None, tls).expect("a valid list");
        let bases: Vec<&str> = client.targets.iter().map(|t| t.base.as_str()).collect();
        assert_eq!(bases, ["https://a:1", "https://b:2"]);
        assert_eq!(
            client.addr(),
            "https://a:1",
            "messages name the first until one answers"
        );
    }

    #[test]
    fn what_was_never_sent_goes_to_the_next_queen_whatever_it_is() {
        for method in ["GET", "POST", "DELETE"] {
            assert_eq!(
                after(method, Miss::NotSent),
                Some(vec!["b:2".into(), "c:3".into()]),
                "{method}"
            );
        }
    }

    #[test]
    fn a_standby_naming_the_leader_sends_any_request_there_first() {
        for method in ["GET", "POST"] {
            // In the list: moved to the front, asked once.
            assert_eq!(
                after(method, standby(Some("c:3"))),
                Some(vec!["c:3".into(), "b:2".into()])
            );
            // Not in the list: asked first all the same.
            assert_eq!(
                after(method, standby(Some("d:4"))),
                Some(vec!["d:4".into(), "b:2".into(), "c:3".into()])
            );
            // Written another way, it is still the same queen.
            assert_eq!(
                after(method, standby(Some("http://c:3/"))),
                Some(vec!["http://c:3/".into(), "b:2".into()])
            );
            // Already asked (two standbys naming each other): not again.
            assert_eq!(
                after(method, standby(Some("a:1"))),
                Some(vec!["b:2".into(), "c:3".into()])
            );
            // Not an address: no lead, but the standby applied nothing, so go on.
            assert_eq!(
                after(method, standby(Some("not an address/"))),
                Some(vec!["b:2".into(), "c:3".into()])
            );
        }
    }

    #[test]
    fn a_write_that_may_have_been_applied_is_not_sent_again_elsewhere() {
        for method in ["POST", "DELETE"] {
            assert_eq!(after(method, Miss::Lost), None, "{method}");
            assert_eq!(after(method, standby(None)), None, "{method}");
        }
        // A read can always be asked again.
        assert_eq!(
            after("GET", Miss::Lost),
            Some(vec!["b:2".into(), "c:3".into()])
        );
        assert_eq!(
            after("GET", standby(None)),
            Some(vec!["b:2".into(), "c:3".into()])
        );
        // Any other answer is the answer.
        for method in ["GET", "POST"] {
            assert_eq!(after(method, Miss::Final), None, "{method}");
        }
    }

    #[test]
    fn an_error_body_may_name_the_leader() {
        let body: Refusal = serde_json::from_str(
            r#"{"error": "this queen is a standby", "leader": "10.0.0.2:8081"}"#,
        )
        .expect("parses");
        assert_eq!(body.leader.as_deref(), Some("10.0.0.2:8081"));
        let body: Refusal =
            serde_json::from_str(r#"{"error": "the queen is shutting down"}"#).expect("parses");
        assert_eq!(
            (body.error.as_str(), body.leader),
            ("the queen is shutting down", None)
        );
    }

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
