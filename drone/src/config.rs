//! The drone's configuration: defaults, an optional TOML file, and command-line flags, in
//! that order of precedence (a flag beats the file, the file beats the default).
//!
//! Everything here is pure apart from reading the file and the host name, so the layering
//! rules are unit-tested without a process or a network.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};
use shared::ids::Secret;

use crate::backoff::Backoff;
use crate::link::{TlsClient, TlsSettings};
use crate::policy::{Policy, PolicyFile};

/// The environment variable the token may come from, so it need not appear in `ps`.
pub use crate::env::TOKEN_ENV;

/// Where a drone looks for its queen when told nothing: the queen's own default `listen`
/// address, so `queen` and `drone` started bare on one machine find each other.
pub const DEFAULT_QUEEN: &str = "127.0.0.1:8080";

/// How many tasks run at once when not told: enough to keep a small machine busy with
/// I/O-bound tasks without letting CPU-bound ones thrash it.
pub const DEFAULT_SLOTS: u32 = 4;

/// How long a gracefully stopping drone waits for its running tasks (30 s): long enough
/// for typical short jobs to finish, short enough for a deploy or a reboot not to hang.
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 30_000;

/// How long a task has between SIGTERM and SIGKILL when it is timed out or cancelled
/// (2 s): time to flush and remove temp files, not time to do more work.
pub const DEFAULT_KILL_GRACE_MS: u64 = 2_000;

/// How much of each of stdout and stderr an `exec` result keeps (64 KiB). Both fit in one
/// frame many times over even after JSON escaping, and the queen stores results, so this
/// bounds what a chatty task costs the database.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The largest protocol frame either way; the same default as the queen's so an outcome
/// the drone sends is one the queen accepts.
pub const DEFAULT_MAX_FRAME_LEN: usize = shared::frame::DEFAULT_MAX_FRAME_LEN;

/// The smallest `max_frame_len` accepted: below this even a hello with a few labels may not
/// fit, which would make the drone reconnect forever for no visible reason.
pub const MIN_MAX_FRAME_LEN: usize = 4 * 1024;

/// The most slots a queen accepts in a hello, and the longest drone name it accepts in
/// bytes: both sides compile against the same constants. Checked here so a typo fails at
/// start with a clear message instead of as a reject on every reconnect.
pub use shared::protocol::{MAX_NAME_LEN, MAX_SLOTS};

/// The drone's name when the host has none we can read.
pub const FALLBACK_NAME: &str = "drone";

/// Where the kernel publishes the host name on Linux.
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The program that supervises every task process (see [`crate::supervise`]). On Linux
/// `/proc/self/exe` names the running drone's own image even if its file was replaced or
/// deleted by an upgrade, so a running drone never mixes with a newer binary's supervisor.
const SELF_EXE: &str = "/proc/self/exe";

/// How the drone writes its logs (always to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for a log collector.
    Json,
}

/// How the drone asks to write protocol messages after the handshake (docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WireEncoding {
    /// JSON, what every queen speaks.
    #[default]
    Json,
    /// MessagePack when the queen agrees in its welcome, JSON otherwise.
    Msgpack,
}

impl WireEncoding {
    /// The encodings besides JSON this asks for, most wanted first.
    pub fn encodings(self) -> &'static [shared::frame::Encoding] {
        match self {
            WireEncoding::Json => &[],
            WireEncoding::Msgpack => &[shared::frame::Encoding::MessagePack],
        }
    }

    /// What the hello offers.
    pub fn offer(self) -> Vec<String> {
        self.encodings()
            .iter()
            .map(|e| e.name().to_owned())
            .collect()
    }
}

/// One queen's address as `HOST:PORT`. Kept as text and resolved at each connect, so a
/// queen that moves behind a DNS name is found again after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueenAddr(String);

impl QueenAddr {
    /// Checks the `HOST:PORT` shape (the host is resolved later, at connect time).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("`{text}` is not HOST:PORT (no port)"))?;
        if host.is_empty() {
            return Err(format!("`{text}` is not HOST:PORT (empty host)"));
        }
        if host.contains(|c: char| c == ',' || c.is_whitespace()) {
            return Err(format!(
                "`{text}` is not HOST:PORT (a host has no commas or spaces)"
            ));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(QueenAddr(text.to_owned())),
            _ => Err(format!(
                "`{text}` is not HOST:PORT (port `{port}` is not a number from 1 to 65535)"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part (without brackets for an IPv6 address): the name TLS verifies.
    pub fn host(&self) -> &str {
        let host = self.0.rsplit_once(':').map_or(self.0.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for QueenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The queens a drone may connect to, in the order it tries them: one address for a
/// single queen, several for queens that share a database (one leads, the others stand
/// by). Never empty, no address twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueenAddrs(Vec<QueenAddr>);

impl QueenAddrs {
    /// `HOST:PORT[,HOST:PORT...]`, as `--queen` and a string `queen` key give it.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::from_entries(text.split(','))
    }

    /// One address per entry (a `queen = [...]` array), each checked on its own: an
    /// empty entry or a bad port is an error naming the entry.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut addrs: Vec<QueenAddr> = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(format!(
                    "address {} of the list is empty (expected HOST:PORT[,HOST:PORT...])",
                    i + 1
                ));
            }
            let addr = QueenAddr::parse(entry)?;
            // A repeated address is most likely a typo for another queen's: say so
            // rather than quietly trying one queen twice and the intended one never.
            if addrs.contains(&addr) {
                return Err(format!("`{addr}` is listed twice"));
            }
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err("no address given (expected HOST:PORT[,HOST:PORT...])".to_owned());
        }
        Ok(QueenAddrs(addrs))
    }

    /// The addresses, in the order given.
    pub fn as_slice(&self) -> &[QueenAddr] {
        &self.0
    }
}

impl From<QueenAddr> for QueenAddrs {
    fn from(addr: QueenAddr) -> Self {
        QueenAddrs(vec![addr])
    }
}

impl fmt::Display for QueenAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(addr.as_str())?;
        }
        Ok(())
    }
}

/// The `queen` key as written in a config file: `"A"`, `"A,B"` or `["A", "B"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "HOST:PORT, a comma-separated list of them, or an array of them"
)]
pub enum QueenSetting {
    Text(String),
    List(Vec<String>),
}

impl QueenSetting {
    fn resolve(&self) -> Result<QueenAddrs, String> {
        match self {
            QueenSetting::Text(text) => QueenAddrs::parse(text),
            QueenSetting::List(list) => QueenAddrs::from_entries(list.iter().map(String::as_str)),
        }
    }
}

/// The command line. Every option is optional so that an unset flag falls through to the
/// config file and then to the default.
#[derive(Debug, Default, Parser)]
#[command(name = "drone", version, about = "Runs tasks leased by a Hive queen.")]
pub struct Cli {
    /// The queen's drone-protocol address [default: 127.0.0.1:8080]. For queens that share
    /// a database (one leader, standbys), list them all, comma-separated: the drone tries
    /// them in turn, goes to the leader a standby names, and ignores a deposed leader (one
    /// that welcomes it in an older epoch than it has already seen).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub queen: Option<String>,
    /// How many tasks to run at once [default: 4].
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// The name shown in the queen's drone list [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// A label tasks can require; repeat for more. Replaces the file's labels when given.
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// The shared secret the queen expects, if it has one.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true, value_parser = parse_secret)]
    pub token: Option<Secret>,
    /// CA certificate (PEM) to verify the queen with: the connection is TLS when given.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This drone's certificate (PEM), for a queen that asks for client certificates.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name every queen's certificate must carry [default: the host of the --queen
    /// address being dialled].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// A worker pool: `NAME[:PROCESSES]=COMMAND`, e.g. `py:4=python3 -m hive worker
    /// app.tasks` (the command is split as a shell would split it; no shell runs). Repeat
    /// for more pools; given flags replace the file's `[[pool]]` tables. See docs/POOLS.md.
    #[arg(long = "pool", value_name = "NAME[:N]=COMMAND")]
    pub pools: Vec<String>,
    /// A TOML file with any of: queen, slots, name, labels, token, drain_grace_ms,
    /// kill_grace_ms, max_output_bytes, max_frame_len, log_format, encoding, tls_ca,
    /// tls_cert, tls_key, tls_server_name, a [policy] section and [[pool]] tables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How to write logs to stderr [default: pretty].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// The protocol encoding to ask the queen for after the handshake; `msgpack` falls
    /// back to JSON with a queen that does not speak it [default: json].
    #[arg(long, value_enum)]
    pub encoding: Option<WireEncoding>,
}

fn parse_secret(text: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret(text.to_owned()))
}

/// The config file: the same keys as the flags plus the tuning knobs. An unknown key is an
/// error naming it, so a typo (`slot = 8`) is never silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `"HOST:PORT"`, `"A,B"` or `["A", "B"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queen: Option<QueenSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<WireEncoding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// What tasks may do on this host (see [`crate::policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyFile>,
    /// Worker pools (`[[pool]]` tables; docs/POOLS.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Vec<PoolFile>>,
}

/// One `[[pool]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tasks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_ms: Option<u64>,
}

/// Processes in a pool when the config does not say.
pub const DEFAULT_POOL_PROCESSES: u32 = 2;
/// The most processes one pool may have.
pub const MAX_POOL_PROCESSES: u32 = 1024;
/// How long a pool process may take to say `ready` when the config does not say.
pub const DEFAULT_POOL_READY_TIMEOUT_MS: u64 = 30_000;

/// A validated worker pool (see `crate::pool`, which runs it).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    /// The program and its arguments; never empty.
    pub command: Vec<String>,
    pub processes: u32,
    /// Retire a process after this many tasks.
    pub max_tasks: Option<u64>,
    /// Retire a process whose resident memory is above this many MiB after a task.
    pub max_memory_mib: Option<u64>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub ready_timeout: Duration,
}

impl PoolSpec {
    /// Validates one `[[pool]]` table.
    pub fn from_file(file: PoolFile) -> Result<PoolSpec, String> {
        let name = file.name;
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid_name {
            return Err(format!(
                "pool name `{name}` must be 1 to 64 letters, digits, `-`, `_` or `.`"
            ));
        }
        let first = file.command.first().map(String::as_str).unwrap_or("");
        if first.is_empty() {
            return Err(format!("pool `{name}`: `command` must name a program"));
        }
        if file.command.iter().any(|a| a.contains('\0')) {
            return Err(format!("pool `{name}`: `command` contains a NUL byte"));
        }
        let processes = file.processes.unwrap_or(DEFAULT_POOL_PROCESSES);
        if processes == 0 || processes > MAX_POOL_PROCESSES {
            return Err(format!(
                "pool `{name}`: `processes` must be between 1 and {MAX_POOL_PROCESSES}, got {processes}"
            ));
        }
        if file.max_tasks == Some(0) {
            return Err(format!(
                "pool `{name}`: `max_tasks` must be at least 1 (leave it out to never recycle)"
            ));
        }
        if file.max_memory_mib == Some(0) {
            return Err(format!(
                "pool `{name}`: `max_memory_mib` must be at least 1 (leave it out for no limit)"
            ));
        }
        let env = file.env.unwrap_or_default();
        for (key, value) in &env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                return Err(format!(
                    "pool `{name}`: env variable {key:?} must be a non-empty name without `=` \
                     or NUL, with a value without NUL"
                ));
            }
        }
        let ready_timeout_ms = file
            .ready_timeout_ms
            .unwrap_or(DEFAULT_POOL_READY_TIMEOUT_MS);
        if ready_timeout_ms == 0 {
            return Err(format!("pool `{name}`: `ready_timeout_ms` must be above 0"));
        }
        Ok(PoolSpec {
            name,
            command: file.command,
            processes,
            max_tasks: file.max_tasks,
            max_memory_mib: file.max_memory_mib,
            env,
            cwd: file.cwd,
            ready_timeout: Duration::from_millis(ready_timeout_ms),
        })
    }

    /// Reads a `--pool NAME[:PROCESSES]=COMMAND` flag.
    pub fn parse_flag(flag: &str) -> Result<PoolFile, String> {
        let usage =
            "expected NAME[:PROCESSES]=COMMAND, e.g. `py:4=python3 -m hive worker app.tasks`";
        let (head, command) = flag
            .split_once('=')
            .ok_or_else(|| format!("`{flag}`: {usage}"))?;
        let (name, processes) = match head.split_once(':') {
            Some((name, n)) => {
                let n = n.parse::<u32>().map_err(|_| {
                    format!("`{flag}`: `{n}` is not a number of processes; {usage}")
                })?;
                (name, Some(n))
            }
            None => (head, None),
        };
        let command = shlex::split(command)
            .ok_or_else(|| format!("`{flag}`: the command has an unclosed quote"))?;
        Ok(PoolFile {
            name: name.to_owned(),
            command,
            processes,
            ..PoolFile::default()
        })
    }
}

impl FileConfig {
    /// Parses a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a config file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Everything the drone needs to run, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the queens listen for drones, in the order the drone tries them.
    pub queen: QueenAddrs,
    /// How many tasks this drone runs at once; the queen never leases more.
    pub slots: u32,
    /// The name operators see in the queen's drone list.
    pub name: String,
    /// Tasks with labels go only to drones that have all of them.
    pub labels: Vec<String>,
    /// Sent in every hello; `None` when the queen has no token.
    pub token: Option<Secret>,
    /// How long a graceful shutdown waits for running tasks before killing them.
    pub drain_grace: Duration,
    /// Time between SIGTERM and SIGKILL for a timed-out or cancelled task.
    pub kill_grace: Duration,
    /// Bytes kept of each of an `exec` task's stdout and stderr.
    pub max_output_bytes: usize,
    /// The largest frame sent or accepted.
    pub max_frame_len: usize,
    /// The protocol encoding asked for in the hello.
    pub encoding: WireEncoding,
    /// The program that supervises task processes: this drone binary, run as
    /// `__supervise`. Tests that drive [`crate::run`] in-process point it at the built
    /// `drone` binary, because there the current executable is the test harness.
    pub supervisor: PathBuf,
    /// How logs are written (used by the binary before it calls [`crate::run`]).
    pub log_format: LogFormat,
    /// Worker pools: long-lived processes that run tasks of the kinds they announce.
    pub pools: Vec<PoolSpec>,
    /// Which kinds run, which programs, as whom, where and with what environment.
    pub policy: Policy,
    /// TLS to the queen (none: plain TCP), its files already loaded.
    pub tls: Option<TlsClient>,
    /// The wait between rounds of reconnect attempts (never between the addresses of one
    /// round). Not a key: the default suits every hive; tests lengthen it to show what
    /// must not wait for it.
    pub reconnect: Backoff,
}

impl Default for Config {
    /// The defaults every key documents, with the host's name.
    fn default() -> Self {
        Config {
            queen: QueenAddrs(vec![QueenAddr(DEFAULT_QUEEN.to_owned())]),
            slots: DEFAULT_SLOTS,
            name: default_name(),
            labels: Vec::new(),
            token: None,
            drain_grace: Duration::from_millis(DEFAULT_DRAIN_GRACE_MS),
            kill_grace: Duration::from_millis(DEFAULT_KILL_GRACE_MS),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            encoding: WireEncoding::default(),
            supervisor: default_supervisor(),
            log_format: LogFormat::default(),
            pools: Vec::new(),
            policy: Policy::default(),
            tls: None,
            reconnect: Backoff::default(),
        }
    }
}

impl Config {
    /// Builds the config the binary runs with: the file named by `--config` (if any) under
    /// the flags.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        Self::from_layers(file, cli)
    }

    /// Layers the flags over the file over the defaults, then validates the result.
    pub fn from_layers(file: FileConfig, cli: &Cli) -> Result<Self, ConfigError> {
        let defaults = Config::default();

        let queen_setting = cli.queen.clone().map(QueenSetting::Text).or(file.queen);
        let queen = match queen_setting {
            Some(setting) => setting.resolve().map_err(|m| invalid("queen", m))?,
            None => defaults.queen,
        };

        let slots = cli.slots.or(file.slots).unwrap_or(defaults.slots);
        if slots == 0 || slots > MAX_SLOTS {
            return Err(invalid(
                "slots",
                format!("must be between 1 and {MAX_SLOTS}, got {slots}"),
            ));
        }

        let name = cli.name.clone().or(file.name).unwrap_or(defaults.name);
        if name.trim().is_empty() || name.len() > MAX_NAME_LEN {
            return Err(invalid(
                "name",
                format!("must be 1 to {MAX_NAME_LEN} bytes, got {}", name.len()),
            ));
        }

        // Flags replace the file's labels rather than adding to them, so one command line
        // says exactly which labels a drone has.
        let labels = if cli.labels.is_empty() {
            file.labels.unwrap_or_default()
        } else {
            cli.labels.clone()
        };
        if let Some(bad) = labels.iter().find(|l| l.trim().is_empty()) {
            return Err(invalid(
                "labels",
                format!("a label must not be empty, got `{bad}`"),
            ));
        }

        // An empty token (say `HIVE_DRONE_TOKEN=` in a unit file) means "no token", not a
        // token that is the empty string.
        let token = cli.token.clone().or(file.token).filter(|t| !t.0.is_empty());

        let max_frame_len = file.max_frame_len.unwrap_or(defaults.max_frame_len);
        if max_frame_len < MIN_MAX_FRAME_LEN {
            return Err(invalid(
                "max_frame_len",
                format!("must be at least {MIN_MAX_FRAME_LEN} bytes, got {max_frame_len}"),
            ));
        }

        let policy = Policy::resolve(file.policy.unwrap_or_default())
            .map_err(|e| invalid(e.key, e.message))?;

        // Flags replace the file's pools, as with labels: one command line says exactly
        // which pools a drone has.
        let pool_files = if cli.pools.is_empty() {
            file.pool.unwrap_or_default()
        } else {
            cli.pools
                .iter()
                .map(|flag| PoolSpec::parse_flag(flag))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid("pool", m))?
        };
        let mut pools: Vec<PoolSpec> = Vec::new();
        for pool in pool_files {
            let pool = PoolSpec::from_file(pool).map_err(|m| invalid("pool", m))?;
            if pools.iter().any(|p| p.name == pool.name) {
                return Err(invalid(
                    "pool",
                    format!("two pools are named `{}`", pool.name),
                ));
            }
            pools.push(pool);
        }

        let tls_ca = cli.tls_ca.clone().or(file.tls_ca);
        let tls_cert = cli.tls_cert.clone().or(file.tls_cert);
        let tls_key = cli.tls_key.clone().or(file.tls_key);
        let tls_server_name = cli.tls_server_name.clone().or(file.tls_server_name);
        if tls_cert.is_some() != tls_key.is_some() {
            return Err(invalid("tls_key", "tls_cert and tls_key go together"));
        }
        let tls = match tls_ca {
            Some(ca) => {
                let settings = TlsSettings {
                    ca,
                    cert: tls_cert,
                    key: tls_key,
                    server_name: tls_server_name,
                };
                // Loaded now and only now: a bad file stops the drone at start, naming it,
                // and the drone connects with what was loaded here.
                let tls = TlsClient::load(settings).map_err(|m| invalid("tls_ca", m))?;
                // Every configured queen's host must make a name to verify (a leader a
                // standby names later is checked when it is dialled).
                for addr in queen.as_slice() {
                    tls.server_name_for(addr.host())
                        .map_err(|m| invalid("queen", format!("{m}; set tls_server_name")))?;
                }
                Some(tls)
            }
            None if tls_cert.is_some() || tls_server_name.is_some() => {
                return Err(invalid(
                    "tls_ca",
                    "TLS settings need tls_ca, the CA to verify the queen with",
                ));
            }
            None => None,
        };

        Ok(Config {
            queen,
            slots,
            name,
            labels,
            token,
            drain_grace: file
                .drain_grace_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.drain_grace),
            kill_grace: file
                .kill_grace_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.kill_grace),
            max_output_bytes: file.max_output_bytes.unwrap_or(defaults.max_output_bytes),
            max_frame_len,
            encoding: cli.encoding.or(file.encoding).unwrap_or(defaults.encoding),
            supervisor: defaults.supervisor,
            log_format: cli
                .log_format
                .or(file.log_format)
                .unwrap_or(defaults.log_format),
            pools,
            policy,
            tls,
            reconnect: defaults.reconnect,
        })
    }
}

/// This host's name: the kernel's, then `$HOSTNAME`, then [`FALLBACK_NAME`].
pub fn default_name() -> String {
    let from_kernel = std::fs::read_to_string(HOSTNAME_FILE)
        .ok()
        .map(|s| s.trim().to_owned());
    let from_env = || std::env::var("HOSTNAME").ok().map(|s| s.trim().to_owned());
    from_kernel
        .filter(|s| !s.is_empty())
        .or_else(|| from_env().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| FALLBACK_NAME.to_owned())
}

/// The drone's own binary, for re-running itself as the `exec` supervisor.
fn default_supervisor() -> PathBuf {
    if Path::new(SELF_EXE).exists() {
        PathBuf::from(SELF_EXE)
    } else {
        // Not Linux-like: fall back to the path we were started from; failing that, the
        // bare name, which spawning will report clearly if it cannot be found.
        std::env::current_exe().unwrap_or_else(|_| PathBuf::from("drone"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example, compiled in so the test rebuilds whenever it changes.
    const EXAMPLE: &str = include_str!("../../config/drone.toml");

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["drone"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all) {
            Ok(c) => c,
            Err(e) => panic!("bad test command line: {e}"),
        }
    }

    fn file(text: &str) -> FileConfig {
        match FileConfig::parse(text, Path::new("test.toml")) {
            Ok(f) => f,
            Err(e) => panic!("bad test config: {e}"),
        }
    }

    fn layers(f: FileConfig, c: &Cli) -> Config {
        match Config::from_layers(f, c) {
            Ok(c) => c,
            Err(e) => panic!("config refused: {e}"),
        }
    }

    #[test]
    fn nothing_given_means_the_documented_defaults() {
        let c = layers(FileConfig::default(), &Cli::default());
        assert_eq!(c.queen.to_string(), DEFAULT_QUEEN);
        assert_eq!(c.slots, DEFAULT_SLOTS);
        assert_eq!(c.name, default_name());
        assert!(c.labels.is_empty());
        assert!(c.token.is_none());
        assert_eq!(c.drain_grace, Duration::from_millis(DEFAULT_DRAIN_GRACE_MS));
        assert_eq!(c.kill_grace, Duration::from_millis(DEFAULT_KILL_GRACE_MS));
        assert_eq!(c.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES);
        assert_eq!(c.max_frame_len, DEFAULT_MAX_FRAME_LEN);
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let f = file(
            r#"
            queen = "queen.example:9000"
            slots = 8
            name = "from-file"
            labels = ["gpu", "ssd"]
            token = "file-secret"
            drain_grace_ms = 5000
            kill_grace_ms = 100
            max_output_bytes = 10
            max_frame_len = 65536
            log_format = "json"
            "#,
        );
        let from_file = layers(f.clone(), &Cli::default());
        assert_eq!(from_file.queen.to_string(), "queen.example:9000");
        assert_eq!(from_file.slots, 8);
        assert_eq!(from_file.name, "from-file");
        assert_eq!(from_file.labels, vec!["gpu", "ssd"]);
        assert_eq!(from_file.token, Some(Secret("file-secret".into())));
        assert_eq!(from_file.drain_grace, Duration::from_millis(5000));
        assert_eq!(from_file.kill_grace, Duration::from_millis(100));
        assert_eq!(from_file.max_output_bytes, 10);
        assert_eq!(from_file.max_frame_len, 65536);
        assert_eq!(from_file.log_format, LogFormat::Json);

        let flags = cli(&[
            "--queen",
            "10.0.0.1:7000",
            "--slots",
            "2",
            "--name",
            "from-flag",
            "--label",
            "arm",
            "--token",
            "flag-secret",
            "--log-format",
            "pretty",
        ]);
        let both = layers(f, &flags);
        assert_eq!(both.queen.to_string(), "10.0.0.1:7000");
        assert_eq!(both.slots, 2);
        assert_eq!(both.name, "from-flag");
        assert_eq!(both.labels, vec!["arm"], "flag labels replace file labels");
        assert_eq!(both.token, Some(Secret("flag-secret".into())));
        assert_eq!(both.log_format, LogFormat::Pretty);
        // Keys without a flag still come from the file.
        assert_eq!(both.drain_grace, Duration::from_millis(5000));
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = FileConfig::parse("slot = 8\n", Path::new("drone.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("slot"), "{err}");
        assert!(err.contains("drone.toml"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let cases: &[(&str, &str)] = &[
            ("slots = 0", "slots"),
            ("slots = 10001", "slots"),
            ("queen = \"no-port\"", "queen"),
            ("queen = \"host:99999\"", "queen"),
            ("queen = \":8080\"", "queen"),
            ("name = \"  \"", "name"),
            ("labels = [\"\"]", "labels"),
            ("max_frame_len = 10", "max_frame_len"),
        ];
        let long_name = format!("name = \"{}\"", "n".repeat(MAX_NAME_LEN + 1));
        let cases: Vec<(&str, &str)> = cases
            .iter()
            .copied()
            .chain([(long_name.as_str(), "name")])
            .collect();
        for (text, key) in cases {
            let err = Config::from_layers(file(text), &Cli::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(key), "`{text}` gave `{err}`");
        }
        // Type errors come from the parser and still point at the key.
        for text in ["slots = -1", "log_format = \"xml\"", "slots = \"four\""] {
            let err = FileConfig::parse(text, Path::new("x.toml"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!err.is_empty(), "`{text}` was accepted");
        }
    }

    fn queens_of(c: &Config) -> Vec<&str> {
        c.queen.as_slice().iter().map(QueenAddr::as_str).collect()
    }

    #[test]
    fn several_queens_come_as_a_list_from_the_flag_or_either_file_form() {
        let want = ["q1.example:8080", "q2.example:8080", "[::1]:9000"];
        for text in [
            r#"queen = "q1.example:8080,q2.example:8080,[::1]:9000""#,
            r#"queen = "q1.example:8080, q2.example:8080 , [::1]:9000""#,
            r#"queen = ["q1.example:8080", "q2.example:8080", "[::1]:9000"]"#,
        ] {
            let c = layers(file(text), &Cli::default());
            assert_eq!(queens_of(&c), want, "{text}");
        }
        let flag = cli(&["--queen", "q1.example:8080,q2.example:8080,[::1]:9000"]);
        assert_eq!(queens_of(&layers(FileConfig::default(), &flag)), want);
        // The flag replaces the file's whole list.
        let c = layers(file(r#"queen = ["a:1", "b:2"]"#), &cli(&["--queen", "c:3"]));
        assert_eq!(queens_of(&c), ["c:3"]);
        // One address in an array is one queen, as a string is.
        let c = layers(file(r#"queen = ["a:1"]"#), &Cli::default());
        assert_eq!(queens_of(&c), ["a:1"]);
    }

    #[test]
    fn a_bad_queen_list_is_refused_saying_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (r#"queen = "a:1,""#, "address 2 of the list is empty"),
            (r#"queen = ",a:1""#, "address 1 of the list is empty"),
            (r#"queen = "a:1,,b:2""#, "address 2 of the list is empty"),
            (r#"queen = ["a:1", " "]"#, "address 2 of the list is empty"),
            (r#"queen = """#, "address 1 of the list is empty"),
            (r#"queen = []"#, "no address given"),
            (r#"queen = "a:1,b:0""#, "`b:0` is not HOST:PORT (port `0`"),
            (r#"queen = "a:1,b:http""#, "port `http` is not a number"),
            (
                r#"queen = ["a:1", "b:65536"]"#,
                "port `65536` is not a number",
            ),
            (r#"queen = "a:1,b""#, "`b` is not HOST:PORT (no port)"),
            (r#"queen = "a:1,a:1""#, "`a:1` is listed twice"),
            // A comma inside an array entry is not a second address.
            (r#"queen = ["a:1,b:2"]"#, "a host has no commas or spaces"),
        ];
        for (text, message) in cases {
            let err = Config::from_layers(file(text), &Cli::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.starts_with("invalid `queen`: "),
                "`{text}` gave `{err}`"
            );
            assert!(err.contains(message), "`{text}` gave `{err}`");
        }
        let err = Config::from_layers(FileConfig::default(), &cli(&["--queen", "a:1,"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("address 2 of the list is empty"), "{err}");
        // Neither a string nor an array of strings: the parser says what it expects.
        for text in ["queen = 8080", "queen = [8080]"] {
            let err = FileConfig::parse(text, Path::new("d.toml"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("HOST:PORT, a comma-separated list of them, or an array of them"),
                "`{text}` gave `{err}`"
            );
        }
    }

    /// Queens sharing a database each have a certificate for their own host: the name
    /// verified is the host dialled, unless the operator set one name for all.
    #[test]
    fn tls_verifies_the_host_dialled_unless_a_server_name_is_set() {
        use rustls::pki_types::ServerName;
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = hive_tls::test_pki::Pki::new(dir.path(), "config-unit");
        let ca = pki.ca().display().to_string();
        let name = |s: &str| ServerName::try_from(s.to_owned()).ok();
        let text = format!("queen = \"q1.example:1,10.0.0.2:2\"\ntls_ca = \"{ca}\"");
        let c = layers(file(&text), &Cli::default());
        let tls = c.tls.expect("tls");
        assert_eq!(tls.server_name_for("q1.example").ok(), name("q1.example"));
        assert_eq!(tls.server_name_for("10.0.0.2").ok(), name("10.0.0.2"));
        let c = layers(
            file(&format!("{text}\ntls_server_name = \"queens.internal\"")),
            &Cli::default(),
        );
        let tls = c.tls.expect("tls");
        assert_eq!(
            tls.server_name_for("q1.example").ok(),
            name("queens.internal")
        );
        assert_eq!(
            tls.server_name_for("10.0.0.2").ok(),
            name("queens.internal")
        );
    }

    #[test]
    fn an_empty_token_means_no_token() {
        let c = layers(file("token = \"\""), &Cli::default());
        assert_eq!(c.token, None);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let c = layers(file("token = \"hunter2\""), &cli(&["--token", "hunter3"]));
        assert!(!format!("{c:?}").contains("hunter"));
        assert!(!format!("{:?}", cli(&["--token", "hunter3"])).contains("hunter"));
    }

    #[test]
    fn the_example_config_matches_the_defaults() {
        // Guards against the shipped example drifting from the code: every value it sets
        // must be the default, and every key the file format knows must be documented in
        // it (set, or commented out when its default depends on the host).
        let example = file(EXAMPLE);
        assert_eq!(
            layers(example, &Cli::default()),
            layers(FileConfig::default(), &Cli::default())
        );

        // A struct literal without `..`: adding a key to FileConfig breaks this until the
        // key is listed here, and then the check below demands it in the example.
        let every_key = FileConfig {
            queen: Some(QueenSetting::Text(String::new())),
            slots: Some(0),
            name: Some(String::new()),
            labels: Some(Vec::new()),
            token: Some(Secret::default()),
            drain_grace_ms: Some(0),
            kill_grace_ms: Some(0),
            max_output_bytes: Some(0),
            max_frame_len: Some(0),
            log_format: Some(LogFormat::Pretty),
            encoding: Some(WireEncoding::Json),
            tls_ca: Some(PathBuf::new()),
            tls_cert: Some(PathBuf::new()),
            tls_key: Some(PathBuf::new()),
            tls_server_name: Some(String::new()),
            // Its keys are checked by the policy module's own test.
            policy: Some(PolicyFile::default()),
            pool: Some(Vec::new()),
        };
        let table = match toml::Value::try_from(every_key) {
            Ok(toml::Value::Table(t)) => t,
            other => panic!("FileConfig did not serialize to a table: {other:?}"),
        };
        for key in table.keys() {
            let documented = EXAMPLE
                .lines()
                .map(|l| l.trim_start_matches('#').trim_start())
                .any(|l| {
                    l.starts_with(&format!("{key} ="))
                        || l == format!("[{key}]")
                        || l == format!("[[{key}]]")
                });
            assert!(documented, "config/drone.toml does not document `{key}`");
        }
    }
}
