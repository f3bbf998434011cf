//! The queen's configuration: compiled-in defaults, then a TOML file, then environment
//! variables `HIVE_<SECTION>__<KEY>` (e.g. `HIVE_QUEEN__DATA_DIR`), each layer overriding
//! the one before. Unknown keys and bad values are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shared::ids::Secret;

/// Where drones connect by default: loopback, so a default queen is never exposed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the HTTP API and dashboard listen by default.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8081";
/// A relative data dir, so `queen` with no config works in any checkout.
pub const DEFAULT_DATA_DIR: &str = "hive-data";
/// Enough for 10,000 idle drones plus API clients; an idle drone connection costs about
/// 32 KB of queen memory (31.7 KB of RSS each, measured by `hive-bench drones` with
/// 10,000 simulated drones and the queen's mimalloc allocator).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// How often drones must speak: 1 s keeps detection within seconds at negligible cost.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Five missed heartbeats: tolerant of a GC pause or a busy host, still seconds not minutes.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 5_000;
/// How long a drone whose connection closed may take to reconnect and keep its tasks.
/// A killed drone's tasks are requeued after this; 500 ms rides out a connection reset
/// while keeping dead-drone requeue well under a second.
pub const DEFAULT_RECONNECT_GRACE_MS: u64 = 500;
/// Attempts per task unless its spec says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Lost leases (drone died, hung, cut off), wherever they happened, after which a task
/// becomes a suspect: its next attempts run alone on a drone, so a drone death can be
/// told apart from its co-tenants'.
pub const DEFAULT_SUSPECT_AFTER_LOST: u32 = 2;
/// Isolated attempts of a suspect that lose their drone (with no other drone lost around
/// the same time) after which the task is quarantined as failed even if it has attempts
/// left: a task that kills every drone it lands on must not take down the fleet one drone
/// at a time. Only isolated attempts count, so the co-tenants of a drone that died, and
/// the victims of a mass failure, are never convicted.
pub const DEFAULT_MAX_LOST_ATTEMPTS: u32 = 1;
/// Drones lost within this of each other (and at least twice the heartbeat timeout, as
/// silence is noticed that late) were lost together: a suspect's lone drone lost around
/// other drones' deaths is no evidence, and its verdict waits this long for them.
pub const DEFAULT_LOSS_CORRELATION_MS: u64 = 10_000;
/// First retry backoff; doubles per attempt up to the max, with jitter.
pub const DEFAULT_RETRY_BASE_MS: u64 = 1_000;
/// Backoff ceiling: a failing task is retried at least every five minutes.
pub const DEFAULT_RETRY_MAX_MS: u64 = 300_000;
/// Largest task payload accepted (JSON bytes); larger inputs belong in object storage.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Largest result kept per task; a longer one is truncated and marked so.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;
/// Largest checkpoint kept per task: enough to resume from, small enough to write on
/// every heartbeat without weighing on the disk.
pub const DEFAULT_MAX_CHECKPOINT_BYTES: usize = 64 * 1024;
/// Most tasks in one batch submit: one batch is one atomic write and must stay bounded.
pub const DEFAULT_MAX_BATCH: usize = 10_000;
/// Largest HTTP request body: a full batch of modest tasks.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// HTTP connections served at once (the API is for operators and submitters, not drones).
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 1_024;
/// A drone connection must finish its TLS handshake and say hello within this (10 s), or it
/// is closed: a connection that sends nothing holds a slot.
pub const DEFAULT_HELLO_TIMEOUT_MS: u64 = 10_000;
/// An HTTP client must send a request's headers within this (10 s) of starting it; a
/// slow-loris trickle is cut off.
pub const DEFAULT_HTTP_HEADER_TIMEOUT_MS: u64 = 10_000;
/// An HTTP request's body must arrive within this (30 s) once its headers are in, or the
/// answer is 408. Only the body read is timed: the headers have their own timeout, and
/// the time the queen takes to answer is not bounded by either.
pub const DEFAULT_HTTP_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// `[queen] idle_poll_us` by default: a little longer than the gaps between the steps of
/// one task at low load on the 2-CPU machine (docs/performance.md).
pub const DEFAULT_IDLE_POLL_US: u64 = 300;
/// The longest `[queen] idle_poll_us` may be: beyond a few milliseconds a wake-up costs
/// nothing next to the gap, and polling would only burn CPU.
pub const MAX_IDLE_POLL_US: u64 = 10_000;

/// The most runtime worker threads `[queen] worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1_024;
/// sled page cache. sled may use up to ~10x this in the worst case, so keep it modest.
pub const DEFAULT_CACHE_CAPACITY_MB: u64 = 64;
/// Active tasks held whole in memory (about 0.5 KB each). Waiting tasks beyond this are
/// held as a small index entry and read back from the database when needed, so a backlog
/// of millions costs tens of bytes a task.
pub const DEFAULT_HOT_TASKS: usize = 50_000;
/// Default `[storage] min_free_mb`: room for the outcomes of the work already accepted
/// (a finished record is a few hundred bytes; 256 MiB is about a million of them, plus
/// sled's segment rewrites) while new work waits for space.
pub const DEFAULT_MIN_FREE_MB: u64 = 256;
/// Finished tasks are kept this long (7 days) for inspection, then purged.
pub const DEFAULT_FINISHED_RETENTION_S: u64 = 7 * 24 * 3600;
/// How often the purge of expired finished tasks runs.
pub const DEFAULT_PURGE_INTERVAL_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config: invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub queen: QueenSection,
    pub leases: LeaseSection,
    pub tasks: TaskSection,
    pub storage: StorageSection,
    pub auth: AuthSection,
    pub tls: TlsSection,
    pub log: LogSection,
    pub retention: RetentionSection,
    pub postgres: PostgresSection,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueenSection {
    /// Address of the drone protocol listener.
    pub listen: String,
    /// Address of the HTTP API, metrics and dashboard.
    pub http: String,
    /// Directory holding the sled database and the lock file.
    pub data_dir: PathBuf,
    /// Connections (drones) served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// Largest drone protocol frame, in bytes.
    pub max_frame_len: usize,
    /// A drone connection must complete TLS and its hello within this.
    pub hello_timeout_ms: u64,
    /// HTTP connections served at once; more wait in the accept queue.
    pub max_http_connections: usize,
    /// Time allowed to send an HTTP request's headers.
    pub http_header_timeout_ms: u64,
    /// Time allowed to receive an HTTP request's body after its headers; past it the
    /// answer is 408. The answer itself is not timed.
    pub http_request_timeout_ms: u64,
    /// Threads running the queen's async tasks (the scheduler core, HTTP and drone
    /// connections). 0: [`Config::runtime_workers`] picks.
    pub worker_threads: usize,
    /// Longest a thread on a task's path (the runtime's worker, the sled store's writer)
    /// polls for more work before it sleeps, in microseconds; adaptive, see
    /// [`crate::idle`]. 0: never poll.
    pub idle_poll_us: u64,
}

impl Default for QueenSection {
    fn default() -> Self {
        QueenSection {
            listen: DEFAULT_LISTEN.into(),
            http: DEFAULT_HTTP.into(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_frame_len: shared::frame::DEFAULT_MAX_FRAME_LEN,
            hello_timeout_ms: DEFAULT_HELLO_TIMEOUT_MS,
            max_http_connections: DEFAULT_MAX_HTTP_CONNECTIONS,
            http_header_timeout_ms: DEFAULT_HTTP_HEADER_TIMEOUT_MS,
            http_request_timeout_ms: DEFAULT_HTTP_REQUEST_TIMEOUT_MS,
            worker_threads: 0,
            idle_poll_us: DEFAULT_IDLE_POLL_US,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSection {
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub reconnect_grace_ms: u64,
}

impl Default for LeaseSection {
    fn default() -> Self {
        LeaseSection {
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
            reconnect_grace_ms: DEFAULT_RECONNECT_GRACE_MS,
        }
    }
}

impl LeaseSection {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    pub fn reconnect_grace(&self) -> Duration {
        Duration::from_millis(self.reconnect_grace_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSection {
    pub max_attempts: u32,
    pub suspect_after_lost: u32,
    pub max_lost_attempts: u32,
    pub loss_correlation_ms: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_payload_bytes: usize,
    pub max_result_bytes: usize,
    pub max_checkpoint_bytes: usize,
    pub max_batch: usize,
    pub max_body_bytes: usize,
}

impl Default for TaskSection {
    fn default() -> Self {
        TaskSection {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            suspect_after_lost: DEFAULT_SUSPECT_AFTER_LOST,
            max_lost_attempts: DEFAULT_MAX_LOST_ATTEMPTS,
            loss_correlation_ms: DEFAULT_LOSS_CORRELATION_MS,
            retry_base_ms: DEFAULT_RETRY_BASE_MS,
            retry_max_ms: DEFAULT_RETRY_MAX_MS,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_checkpoint_bytes: DEFAULT_MAX_CHECKPOINT_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Which engine holds the tasks: `sled` (embedded, one queen, the default) or
    /// `postgres` (`[postgres] url`; several queens share it, one leads).
    pub backend: Backend,
    /// `false`: each group commit's journal record is synced with `sync_file_range`
    /// before the answer (survives a killed process, not power loss). `true`: each record
    /// is `fdatasync`ed before its group goes further, and each checkpoint runs `syncfs`.
    pub sync: bool,
    pub cache_capacity_mb: u64,
    /// Active tasks held whole in memory; pending, scheduled and blocked tasks beyond this
    /// are read back from the database when leased, viewed or changed. 0 holds only
    /// running tasks (and waiting tasks whose last write is not yet durable).
    pub hot_tasks: usize,
    /// Free space (MiB) the data dir's filesystem must keep. Below it the queen refuses
    /// new work (submits, batches, retries, schedule runs: 507) while it keeps serving
    /// reads and recording the outcomes and grants of work already accepted, which is
    /// what frees space once retention runs; it returns to normal by itself when space
    /// comes back. 0 turns the guard off.
    pub min_free_mb: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            backend: Backend::Sled,
            sync: false,
            cache_capacity_mb: DEFAULT_CACHE_CAPACITY_MB,
            hot_tasks: DEFAULT_HOT_TASKS,
            min_free_mb: DEFAULT_MIN_FREE_MB,
        }
    }
}

/// The storage engine (`[storage] backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// sled in `queen.data_dir`: one machine, one queen.
    #[default]
    Sled,
    /// PostgreSQL at `[postgres] url`: one leader queen and any number of standbys.
    Postgres,
}

/// `[postgres]`: the database a leader queen and its standbys share.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSection {
    /// A libpq-style URL or key=value string; it may name several hosts
    /// (`postgres://u@h1:5432,h2:5432/hive?target_session_attrs=read-write`), and the
    /// queen connects to the first that takes writes. Env `HIVE_POSTGRES__URL`.
    pub url: Option<Secret>,
    /// A CA certificate (PEM) to verify the server with: connections use TLS (rustls),
    /// required. Without it they are plain TCP unless the URL says `sslmode=require`,
    /// which is refused without a CA rather than connecting unverified.
    pub tls_ca: Option<PathBuf>,
    /// Connections for reads (HTTP lookups, cold tasks, purges), besides the writer's
    /// and the leader lease's own.
    pub pool_size: usize,
    /// How long a leader's lease lasts on the database clock. A killed leader is replaced
    /// about this long after its last renewal; it renews every third of it and steps
    /// down by itself before the lease can lapse on the database.
    pub lease_ms: u64,
    /// This queen's name in the leader row (default: host name and pid).
    pub name: Option<String>,
    /// The HTTP address a standby names to clients (`leader` in its 503s): the leader's
    /// `queen.http` as others reach it. Default: `queen.http` as bound.
    pub advertise_http: Option<String>,
    /// The drone address a standby names to drones in its `not_leader` reject. Default:
    /// `queen.listen` as bound.
    pub advertise_drones: Option<String>,
    /// Connecting (and each statement of the leader lease) may take this long.
    pub connect_timeout_ms: u64,
}

/// Default `[postgres] lease_ms`: a dead leader is replaced in about two seconds.
pub const DEFAULT_PG_LEASE_MS: u64 = 2_000;
/// Default `[postgres] pool_size`.
pub const DEFAULT_PG_POOL_SIZE: usize = 4;
/// Default `[postgres] connect_timeout_ms`.
pub const DEFAULT_PG_CONNECT_TIMEOUT_MS: u64 = 5_000;

impl Default for PostgresSection {
    fn default() -> Self {
        PostgresSection {
            url: None,
            tls_ca: None,
            pool_size: DEFAULT_PG_POOL_SIZE,
            lease_ms: DEFAULT_PG_LEASE_MS,
            name: None,
            advertise_http: None,
            advertise_drones: None,
            connect_timeout_ms: DEFAULT_PG_CONNECT_TIMEOUT_MS,
        }
    }
}

impl std::fmt::Debug for PostgresSection {
    // The URL may carry a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSection")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("tls_ca", &self.tls_ca)
            .field("pool_size", &self.pool_size)
            .field("lease_ms", &self.lease_ms)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Shared secret drones send in their hello and API clients send as a bearer token,
    /// for whichever of `drone_token` / `client_token` is unset.
    pub token: Option<Secret>,
    /// The secret drones must send in their hello.
    pub drone_token: Option<Secret>,
    /// The bearer token API clients (CLI, dashboard, scripts) must send.
    pub client_token: Option<Secret>,
    /// Serve a non-loopback address without a token (a warning is logged). Only for
    /// networks where something else (a firewall, a private link) guards the ports.
    pub allow_unauthenticated: bool,
}

impl AuthSection {
    /// The token drones must present, if any.
    pub fn drone(&self) -> Option<&Secret> {
        self.drone_token.as_ref().or(self.token.as_ref())
    }

    /// The token API clients must present, if any.
    pub fn client(&self) -> Option<&Secret> {
        self.client_token.as_ref().or(self.token.as_ref())
    }
}

/// TLS for both listeners: with `cert` and `key` set, the drone port and the HTTP port
/// speak only TLS. With `client_ca` too, drones must present a certificate it signed.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain of the queen (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) drone client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    /// A tracing filter (`info`, `queen=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Finished tasks older than this are purged.
    pub finished_max_age_s: u64,
    /// At most this many finished tasks are kept (oldest purged first); 0: no count limit.
    pub finished_max_count: u64,
    pub purge_interval_ms: u64,
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection {
            finished_max_age_s: DEFAULT_FINISHED_RETENTION_S,
            finished_max_count: 0,
            purge_interval_ms: DEFAULT_PURGE_INTERVAL_MS,
        }
    }
}

impl Config {
    /// The async runtime's worker threads for a machine of `cpus` CPUs: `[queen]
    /// worker_threads`, or with 0: with sled one per CPU but one (at least one), with
    /// PostgreSQL one per CPU. With sled the store's own threads (the writer, its flusher,
    /// the checkpoint and its sled thread) do the disk work, and under load they take
    /// about a core: a worker per CPU only competes with them. On 2 CPUs the second worker
    /// cost more in wake-ups and stolen tasks than it ran (one worker: queen CPU 23 -> 20
    /// µs a task, ~10 % more throughput, latency p50 0.295 -> 0.244 ms; docs/performance.md);
    /// the rule for more CPUs is extrapolated from there. With PostgreSQL the core reads
    /// tasks it had demoted from memory over the network, blocking its worker for a round
    /// trip, and the other workers keep the connections served meanwhile.
    pub fn runtime_workers(&self, cpus: usize) -> usize {
        match (self.queen.worker_threads, self.storage.backend) {
            (0, Backend::Sled) => cpus.saturating_sub(1).max(1),
            (0, Backend::Postgres) => cpus.max(1),
            (n, _) => n,
        }
    }

    /// Loads defaults, then `path` (if given), then `HIVE_<SECTION>__<KEY>` variables from
    /// `env`, then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        for (name, value) in env {
            // Only `HIVE_SECTION__KEY` names are ours: `HIVE_TASK_ID` and friends, which
            // the drone sets for tasks, must not be mistaken for config.
            let Some(rest) = name.strip_prefix("HIVE_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let key_path = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
            builder = builder.set_override(key_path, value)?;
        }
        let cfg: Config = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot: addresses parse, timings make sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        self.listen_addr()?;
        self.http_addr()?;
        if self.queen.data_dir.as_os_str().is_empty() {
            return Err(invalid("queen.data_dir", "must not be empty"));
        }
        if self.queen.max_connections == 0 {
            return Err(invalid("queen.max_connections", "must be at least 1"));
        }
        if self.queen.max_frame_len < 1024 {
            return Err(invalid(
                "queen.max_frame_len",
                "must be at least 1024 bytes",
            ));
        }
        let l = &self.leases;
        if l.heartbeat_interval_ms == 0 {
            return Err(invalid(
                "leases.heartbeat_interval_ms",
                "must be at least 1",
            ));
        }
        if l.heartbeat_timeout_ms <= l.heartbeat_interval_ms {
            return Err(invalid(
                "leases.heartbeat_timeout_ms",
                format!(
                    "must be greater than leases.heartbeat_interval_ms ({}), got {}",
                    l.heartbeat_interval_ms, l.heartbeat_timeout_ms
                ),
            ));
        }
        if self.tasks.max_attempts == 0 {
            return Err(invalid("tasks.max_attempts", "must be at least 1"));
        }
        if self.tasks.suspect_after_lost == 0 {
            return Err(invalid("tasks.suspect_after_lost", "must be at least 1"));
        }
        if self.tasks.max_lost_attempts == 0 {
            return Err(invalid("tasks.max_lost_attempts", "must be at least 1"));
        }
        if self.tasks.loss_correlation_ms > 3_600_000 {
            return Err(invalid(
                "tasks.loss_correlation_ms",
                "must be at most 3600000 (an hour)",
            ));
        }
        if self.tasks.retry_base_ms == 0 || self.tasks.retry_max_ms < self.tasks.retry_base_ms {
            return Err(invalid(
                "tasks.retry_max_ms",
                "retry_base_ms must be at least 1 and retry_max_ms at least retry_base_ms",
            ));
        }
        if self.tasks.max_batch == 0 {
            return Err(invalid("tasks.max_batch", "must be at least 1"));
        }
        if self.storage.cache_capacity_mb == 0 {
            return Err(invalid("storage.cache_capacity_mb", "must be at least 1"));
        }
        if self.storage.backend == Backend::Postgres {
            let pg = &self.postgres;
            match &pg.url {
                None => {
                    return Err(invalid(
                        "postgres.url",
                        "storage.backend = \"postgres\" needs postgres.url (or HIVE_POSTGRES__URL)",
                    ))
                }
                Some(url) if url.0.trim().is_empty() => {
                    return Err(invalid("postgres.url", "must not be empty"))
                }
                Some(_) => {}
            }
            if pg.pool_size == 0 || pg.pool_size > 256 {
                return Err(invalid("postgres.pool_size", "must be between 1 and 256"));
            }
            if pg.lease_ms < 300 || pg.lease_ms > 600_000 {
                return Err(invalid(
                    "postgres.lease_ms",
                    "must be between 300 and 600000 (ten minutes)",
                ));
            }
            if pg.connect_timeout_ms == 0 {
                return Err(invalid("postgres.connect_timeout_ms", "must be at least 1"));
            }
        }
        if self.retention.purge_interval_ms == 0 {
            return Err(invalid("retention.purge_interval_ms", "must be at least 1"));
        }
        for (key, token) in [
            ("auth.token", &self.auth.token),
            ("auth.drone_token", &self.auth.drone_token),
            ("auth.client_token", &self.auth.client_token),
        ] {
            if token.as_ref().is_some_and(|t| t.0.is_empty()) {
                return Err(invalid(key, "must not be empty (leave it unset instead)"));
            }
        }
        if self.queen.hello_timeout_ms == 0 {
            return Err(invalid("queen.hello_timeout_ms", "must be at least 1"));
        }
        if self.queen.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "queen.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0 picks for this machine)"),
            ));
        }
        if self.queen.idle_poll_us > MAX_IDLE_POLL_US {
            return Err(invalid(
                "queen.idle_poll_us",
                format!("must be at most {MAX_IDLE_POLL_US} (0 turns idle polling off)"),
            ));
        }
        if self.queen.max_http_connections == 0 {
            return Err(invalid("queen.max_http_connections", "must be at least 1"));
        }
        if self.queen.http_header_timeout_ms == 0 || self.queen.http_request_timeout_ms == 0 {
            return Err(invalid(
                "queen.http_header_timeout_ms",
                "http_header_timeout_ms and http_request_timeout_ms must be at least 1",
            ));
        }
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(invalid("tls.key", "tls.cert and tls.key go together"));
        }
        if tls.client_ca.is_some() && tls.cert.is_none() {
            return Err(invalid(
                "tls.client_ca",
                "client certificates need TLS: set tls.cert and tls.key too",
            ));
        }
        // Whoever can reach the drone port can run code on every drone; whoever can reach
        // the API can submit such code. Off loopback, that takes a token or an explicit yes.
        if !self.auth.allow_unauthenticated {
            let exposed = |addr: SocketAddr| !addr.ip().is_loopback();
            if exposed(self.listen_addr()?) && self.auth.drone().is_none() {
                return Err(invalid(
                    "auth.drone_token",
                    format!(
                        "queen.listen = {} is not a loopback address: set auth.drone_token (or auth.token), or auth.allow_unauthenticated = true",
                        self.queen.listen
                    ),
                ));
            }
            if exposed(self.http_addr()?) && self.auth.client().is_none() {
                return Err(invalid(
                    "auth.client_token",
                    format!(
                        "queen.http = {} is not a loopback address: set auth.client_token (or auth.token), or auth.allow_unauthenticated = true",
                        self.queen.http
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What an operator must hear about at startup: settings that are allowed but unsafe.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let exposed =
            |addr: Result<SocketAddr, ConfigError>| addr.is_ok_and(|a| !a.ip().is_loopback());
        if exposed(self.listen_addr()) && self.auth.drone().is_none() {
            out.push(format!(
                "drone port {} is reachable off this host and takes drones without a token (auth.allow_unauthenticated): anyone who reaches it can take tasks",
                self.queen.listen
            ));
        }
        if exposed(self.http_addr()) && self.auth.client().is_none() {
            out.push(format!(
                "HTTP API {} is reachable off this host without a token (auth.allow_unauthenticated): anyone who reaches it can submit exec tasks, which run code on the drones",
                self.queen.http
            ));
        }
        if !self.tls.enabled() && (exposed(self.listen_addr()) || exposed(self.http_addr())) {
            out.push(
                "TLS is off on a non-loopback address: tokens, payloads and results cross the network in clear text (set [tls] cert and key)".into(),
            );
        }
        out
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("queen.listen", &self.queen.listen)
    }

    pub fn http_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("queen.http", &self.queen.http)
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("`{value}` is not an ip:port address ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hive.toml");
        std::fs::write(&path, toml).expect("write config");
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// The error `load_str` gives, as text ("" if it loads).
    fn load_err(toml: &str, env: &[(&str, &str)]) -> String {
        load_str(toml, env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn runtime_workers_leave_sled_a_cpu_unless_told() {
        let mut cfg = Config::default();
        assert_eq!(cfg.runtime_workers(1), 1);
        assert_eq!(cfg.runtime_workers(2), 1);
        assert_eq!(cfg.runtime_workers(8), 7);
        cfg.storage.backend = Backend::Postgres;
        assert_eq!(cfg.runtime_workers(2), 2);
        assert_eq!(cfg.runtime_workers(0), 1);
        let cfg = load_str("[queen]\nworker_threads = 3\n", &[]).expect("loads");
        assert_eq!(cfg.runtime_workers(2), 3);
        let cfg = load_str("", &[("HIVE_QUEEN__WORKER_THREADS", "2")]).expect("loads");
        assert_eq!(cfg.runtime_workers(8), 2);
        let e = load_err("[queen]\nworker_threads = 5000\n", &[]);
        assert!(e.contains("queen.worker_threads"), "{e}");
        let e = load_err("[queen]\nworker_threads = -1\n", &[]);
        assert!(e.contains("worker_threads"), "{e}");
    }

    #[test]
    fn idle_polling_is_bounded_and_can_be_turned_off() {
        assert_eq!(Config::default().queen.idle_poll_us, DEFAULT_IDLE_POLL_US);
        let cfg = load_str("", &[("HIVE_QUEEN__IDLE_POLL_US", "0")]).expect("loads");
        assert_eq!(cfg.queen.idle_poll_us, 0);
        let cfg = load_str("[queen]\nidle_poll_us = 10000\n", &[]).expect("loads");
        assert_eq!(cfg.queen.idle_poll_us, MAX_IDLE_POLL_US);
        let e = load_err("[queen]\nidle_poll_us = 10001\n", &[]);
        assert!(e.contains("queen.idle_poll_us"), "{e}");
    }

    #[test]
    fn the_example_config_matches_the_defaults() {
        // config/hive.toml documents every key with its default; if a default changes
        // without the example (or the reverse), this fails.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/hive.toml");
        let cfg = Config::load(Some(&path), []).expect("example config loads");
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn the_postgres_backend_needs_a_url_and_sane_lease_settings() {
        let err = load_err;
        let e = err("[storage]\nbackend = \"postgres\"\n", &[]);
        assert!(e.contains("postgres.url"), "{e}");
        let e = err(
            "[storage]\nbackend = \"postgres\"\n[postgres]\nlease_ms = 10\n",
            &[("HIVE_POSTGRES__URL", "postgres://h/db")],
        );
        assert!(e.contains("postgres.lease_ms"), "{e}");
        let e = err("[storage]\nbackend = \"mysql\"\n", &[]);
        assert!(e.contains("mysql"), "{e}");
        let cfg = load_str(
            "[storage]\nbackend = \"postgres\"\n",
            &[("HIVE_POSTGRES__URL", "postgres://h/db")],
        )
        .expect("loads");
        assert_eq!(cfg.storage.backend, Backend::Postgres);
        // The URL (it may hold a password) is never printed.
        assert!(!format!("{cfg:?}").contains("postgres://h/db"));
    }

    #[test]
    fn env_overrides_file_and_unrelated_hive_vars_are_ignored() {
        let cfg = load_str(
            "[leases]\nheartbeat_timeout_ms = 9000\n",
            &[
                ("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "7000"),
                ("HIVE_QUEEN__DATA_DIR", "/tmp/elsewhere"),
                ("HIVE_TASK_ID", "not-config"),
                ("HIVE_STORAGE__SYNC", "true"),
            ],
        )
        .expect("loads");
        assert_eq!(cfg.leases.heartbeat_timeout_ms, 7000);
        assert_eq!(cfg.queen.data_dir, PathBuf::from("/tmp/elsewhere"));
        assert!(cfg.storage.sync);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = load_str("[leases]\nheartbeat_timout_ms = 10\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat_timout_ms"), "{err}");
        let err = load_str("", &[("HIVE_LEASES__NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_key() {
        let err = load_str("[leases]\nheartbeat_timeout_ms = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat_timeout_ms"), "{err}");
        let err = load_str("", &[("HIVE_QUEEN__LISTEN", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("queen.listen"), "{err}");
        let err = load_str("[leases]\nheartbeat_timeout_ms = 500\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("leases.heartbeat_timeout_ms"), "{err}");
    }

    #[test]
    fn off_loopback_a_token_or_an_explicit_yes_is_required() {
        let err = load_str("[queen]\nlisten = \"0.0.0.0:8080\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.drone_token"), "{err}");
        let err = load_str("[queen]\nhttp = \"10.1.2.3:8081\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.client_token"), "{err}");
        // A drone token does not open the API, nor the reverse.
        let err = load_str(
            "[queen]\nlisten = \"0.0.0.0:8080\"\nhttp = \"0.0.0.0:8081\"\n[auth]\ndrone_token = \"d\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("auth.client_token"), "{err}");
        let both = load_str(
            "[queen]\nlisten = \"0.0.0.0:8080\"\nhttp = \"0.0.0.0:8081\"\n[auth]\ntoken = \"t\"\n",
            &[],
        )
        .expect("one token covers both");
        assert_eq!(both.auth.drone().map(|t| t.0.as_str()), Some("t"));
        assert_eq!(both.auth.client().map(|t| t.0.as_str()), Some("t"));
        assert_eq!(
            both.warnings().len(),
            1,
            "only the clear-text warning: {:?}",
            both.warnings()
        );
        let open = load_str(
            "[queen]\nlisten = \"0.0.0.0:8080\"\n[auth]\nallow_unauthenticated = true\n",
            &[],
        )
        .expect("explicitly allowed");
        assert!(open
            .warnings()
            .iter()
            .any(|w| w.contains("without a token")));
        assert!(Config::default().warnings().is_empty(), "loopback is quiet");
    }

    #[test]
    fn tls_settings_must_be_complete() {
        let err = load_str("[tls]\ncert = \"/x.crt\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.key"), "{err}");
        let err = load_str("[tls]\nclient_ca = \"/ca.crt\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.client_ca"), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        assert!(Config::load(Some(Path::new("/nonexistent/hive.toml")), []).is_err());
    }
}
