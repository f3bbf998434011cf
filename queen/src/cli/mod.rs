//! The operator CLI: `queen submit`, `queen tasks`, `queen watch`, ... — blocking clients of a
//! running queen's HTTP API, so one binary is both server and client (like `nomad`).
//!
//! Every command is one or a few API calls, then output: aligned tables for people, or with
//! `--json` the API's JSON as it came. Failures map to a few exit codes ([`Exit`]) that
//! scripts can rely on. The CLI knows nothing of the server's internals: it sees only the
//! wire types of `shared::api` and the two defaults it takes from the queen's config.

mod client;
mod drones;
mod queues;
mod schedules;
mod stats;
mod submit;
mod table;
mod tasks;

use std::io::Write;
use std::process::ExitCode;

use shared::ids::Secret;

pub use client::Client;

/// The exit codes, as `queen --help` and the README show them.
pub const EXIT_CODES_HELP: &str = "\
Exit status of client commands (scripts can rely on these):
  0  success
  1  a task waited for (submit --wait) failed or was cancelled; or output could not be written
  2  invalid usage or input: a bad flag, file or spec, or a 4xx answer other than
     401/403/404 (400 invalid, 409 conflict such as retrying a pending task, 413 too large)
  3  not found (404): no such task, queue or schedule
  4  unauthorized (401/403): missing or wrong --token
  5  the queen cannot be reached, or it failed (5xx, timeout, an answer that is not the API)";

/// How a client command ended, as the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok,
    /// A task waited for failed or was cancelled (or stdout could not be written).
    TaskFailed,
    /// Bad flags, a bad file or spec, or a 4xx other than 401/403/404.
    Invalid,
    /// The API answered 404.
    NotFound,
    /// The API answered 401 or 403.
    Unauthorized,
    /// No answer, a 5xx, or an answer that is not the API's.
    Unavailable,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::TaskFailed => 1,
            Exit::Invalid => 2,
            Exit::NotFound => 3,
            Exit::Unauthorized => 4,
            Exit::Unavailable => 5,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// Why a client command failed; each maps to an [`Exit`] code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Input refused before anything was sent.
    #[error("{0}")]
    Invalid(String),
    /// The queen refused the request; `message` is its `{"error": ...}`.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("cannot reach the queen at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("unexpected answer from the queen at {addr}: {reason}")]
    BadResponse { addr: String, reason: String },
    /// Several queens were given and none took the request; what each said.
    #[error("no queen took the request: {}", .0.join("; "))]
    NoQueen(Vec<String>),
    #[error("cannot write output: {0}")]
    Output(std::io::Error),
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Invalid(_) => Exit::Invalid,
            CliError::Api { status, .. } => match status {
                401 | 403 => Exit::Unauthorized,
                404 => Exit::NotFound,
                400..=499 => Exit::Invalid,
                _ => Exit::Unavailable,
            },
            CliError::Unreachable { .. } | CliError::BadResponse { .. } | CliError::NoQueen(_) => {
                Exit::Unavailable
            }
            CliError::Output(_) => Exit::TaskFailed,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Output(e)
    }
}

/// Options every client command takes. Each falls back to the queen's own config (the same
/// `--config` file and `HIVE_<SECTION>__<KEY>` variables the server reads).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Client options")]
pub struct ClientOpts {
    /// The queen's HTTP API: HOST:PORT or http://HOST:PORT. Default: `[queen] http` of the
    /// config (127.0.0.1:8081 without one); an unspecified address such as 0.0.0.0 means
    /// this host. For queens that share a database, list them all, comma-separated: each
    /// request goes to the one that answered last, then to the others in turn (a standby's
    /// 503 naming the leader sends it there; a write goes on only when it cannot have been
    /// applied).
    #[arg(long, global = true, env = "HIVE_ADDR", value_name = "ADDR[,ADDR...]")]
    pub addr: Option<String>,
    /// CA certificate (PEM) to verify a TLS queen with (an https:// address, or a config
    /// with `[tls]` set). Without it, the system's public roots are used.
    #[arg(long, global = true, env = "HIVE_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Bearer token for the API. Default: `[auth] client_token` (or `token`) of the config.
    #[arg(
        long,
        global = true,
        env = "HIVE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = parse_secret
    )]
    pub token: Option<Secret>,
    /// Print the API's JSON (one document) instead of tables, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

/// What the client takes from the queen's config when no flag says otherwise.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// `[queen] http`.
    pub addr: String,
    /// `[auth] client_token`, else `[auth] token`.
    pub token: Option<Secret>,
    /// `[tls]` is set: the API speaks https.
    pub tls: bool,
}

/// The client commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    // Boxed: its many flags would make every other variant as large.
    Submit(Box<submit::SubmitArgs>),
    Task(tasks::TaskArgs),
    Tasks(tasks::ListArgs),
    Cancel(tasks::CancelArgs),
    Retry(tasks::RetryArgs),
    Drones(drones::DronesArgs),
    Queues(queues::QueuesArgs),
    Schedules(schedules::SchedulesArgs),
    Stats(stats::StatsArgs),
    Watch(stats::WatchArgs),
}

/// What every command needs: the API and how to print.
#[derive(Debug)]
struct Ctx {
    client: Client,
    json: bool,
}

impl Ctx {
    /// Prints an API document as-is (the `--json` output).
    fn print_json(&self, out: &mut impl Write, doc: &serde_json::Value) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(doc).map_err(|e| CliError::BadResponse {
            addr: self.client.addr(),
            reason: e.to_string(),
        })?;
        writeln!(out, "{text}")?;
        Ok(())
    }
}

/// Runs one client command; prints `queen: <error>` on stderr when it fails.
pub fn run(defaults: Defaults, opts: ClientOpts, command: Command) -> Exit {
    let (addr, https) = match &opts.addr {
        Some(a) => (a.as_str(), client::wants_https(a)),
        None => (defaults.addr.as_str(), defaults.tls),
    };
    let tls = (https || opts.ca.is_some()).then(|| client::TlsOpts {
        ca: opts.ca.clone(),
    });
    let result = Client::new(addr, opts.token.or(defaults.token), tls).and_then(|client| {
        let ctx = Ctx {
            client,
            json: opts.json,
        };
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let exit = dispatch(&ctx, &mut out, command)?;
        out.flush()?;
        Ok(exit)
    });
    match result {
        Ok(exit) => exit,
        // `queen tasks | head`: the reader has what it wanted; not a failure.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Ok,
        Err(e) => {
            eprintln!("queen: {e}");
            e.exit()
        }
    }
}

fn dispatch(ctx: &Ctx, out: &mut impl Write, command: Command) -> Result<Exit, CliError> {
    match command {
        Command::Submit(args) => submit::run(ctx, out, *args),
        Command::Task(args) => tasks::show(ctx, out, args),
        Command::Tasks(args) => tasks::list(ctx, out, args),
        Command::Cancel(args) => tasks::cancel(ctx, out, args),
        Command::Retry(args) => tasks::retry(ctx, out, args),
        Command::Drones(args) => drones::run(ctx, out, args),
        Command::Queues(args) => queues::run(ctx, out, args),
        Command::Schedules(args) => schedules::run(ctx, out, args),
        Command::Stats(args) => stats::show(ctx, out, args),
        Command::Watch(args) => stats::watch(ctx, out, args),
    }
}

/// Percent-encodes one URL path segment or query value: queue names may hold `/` and `:`.
fn encode(raw: &str) -> String {
    let mut s = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A token flag: kept as a [`Secret`], whose `Debug` never shows it.
fn parse_secret(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret(s.to_string()))
}

/// A task id flag or argument; clap turns the error into a usage error (exit 2).
fn parse_id(s: &str) -> Result<shared::TaskId, String> {
    s.parse().map_err(|_| {
        "expected a task id, a UUID like 01a216fc-3f1e-736a-b67b-11561fabd520".to_string()
    })
}

/// A timestamp as people read it: RFC 3339 to the second, UTC.
fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// How long ago `t` was, roughly: `0.4s ago`, `12s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(t: &chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    let ms = (now - *t).num_milliseconds().max(0);
    match ms {
        0..10_000 => format!("{:.1}s ago", ms as f64 / 1000.0),
        10_000..120_000 => format!("{}s ago", ms / 1000),
        120_000..7_200_000 => format!("{}m ago", ms / 60_000),
        7_200_000..172_800_000 => format!("{}h ago", ms / 3_600_000),
        _ => format!("{}d ago", ms / 86_400_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode("reports"), "reports");
        assert_eq!(encode("a/b:c d"), "a%2Fb%3Ac%20d");
    }

    #[test]
    fn api_statuses_map_to_the_documented_exit_codes() {
        let api = |status| CliError::Api {
            status,
            message: String::new(),
        };
        assert_eq!(api(400).exit().code(), 2);
        assert_eq!(api(409).exit().code(), 2);
        assert_eq!(api(413).exit().code(), 2);
        assert_eq!(api(404).exit().code(), 3);
        assert_eq!(api(401).exit().code(), 4);
        assert_eq!(api(503).exit().code(), 5);
        assert_eq!(CliError::NoQueen(vec![]).exit().code(), 5);
    }
}
