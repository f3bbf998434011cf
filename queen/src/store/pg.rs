//! The PostgreSQL engine: the same layout, mutations and group commit as sled (see the
//! module docs of `store`), on a database that several queens share, one of which leads.
//!
//! - **Tables.** One per key prefix of the layout, each `(k bytea PRIMARY KEY, v bytea)`
//!   holding the key without its prefix and the same encoded value sled holds, so a record
//!   is byte for byte what the sled store writes and `queen migrate` copies without
//!   re-encoding. `hive_active` is the hot table: a lower fillfactor (HOT updates) and
//!   aggressive per-table autovacuum; the schema and its reasons are in `SCHEMA_V1` and
//!   `migrations-notes/pg-v1.md`.
//! - **Group commit.** One writer thread, one connection: every commit waiting in the
//!   channel becomes one transaction, set-based statements per table (`unnest` arrays);
//!   continuations run only after `COMMIT` returns. Commits are durable in send order.
//! - **Fencing.** Each transaction first calls `hive_fence(epoch)`, which takes the leader
//!   row `FOR SHARE` and raises unless the epoch is still the writer's: once a new
//!   leader's epoch is committed, no write of an older one can land (the takeover waits for
//!   a commit in flight; a commit after it sees the new epoch and aborts).
//! - **Never cancelled.** A commit is never timed out or cancelled (a cancelled wait for
//!   the synchronous standby reports a commit that happened locally). Any error, or such a
//!   cancellation done by someone else (seen as a warning), is "outcome unknown": nothing
//!   is acknowledged, the queen steps down, the next term reloads from the database.
//! - **The leader lease** (`Election`): a row `hive_leader(epoch, holder, expires_at)`
//!   taken and renewed on the database's clock by its own thread and connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{ops, Commit, CommitError, Op, Raw, Rows, StoreError, ACTIVE};
use crate::config::Config;

/// The PostgreSQL schema this build writes (`hive_schema.version`); see
/// `migrations-notes/pg-v1.md`. Independent of sled's `SCHEMA_VERSION`: the records in
/// both are the same encoding.
pub const PG_SCHEMA_VERSION: i32 = 1;

/// One table per key prefix of the layout.
pub(crate) const TABLES: [(&[u8], &str); 7] = [
    (b"a/", "hive_active"),
    (b"f/", "hive_finished"),
    (b"t/", "hive_retention"),
    (b"i/", "hive_idem"),
    (b"c/", "hive_counts"),
    (b"q/", "hive_queues"),
    (b"s/", "hive_schedules"),
];

/// Serialises schema setup between queens starting at once (an arbitrary constant: "hive").
const SETUP_LOCK: i64 = 0x6869_7665;

const SCHEMA_V1: &str = r#"
CREATE TABLE hive_leader (
    id         smallint PRIMARY KEY CHECK (id = 1),
    epoch      bigint NOT NULL,
    holder     text NOT NULL,
    http       text NOT NULL,
    drones     text NOT NULL,
    expires_at timestamptz NOT NULL,
    since      timestamptz NOT NULL
);
INSERT INTO hive_leader VALUES (1, 0, '', '', '', '-infinity', now());

-- The hot table: every submit, grant and outcome rewrites or deletes a row here. A
-- fillfactor of 70 leaves room on each page for HOT updates (no index write); vacuum
-- runs after 1,000 dead rows plus 2 % of the table instead of 20 %, unthrottled, so
-- the table stays near its live size under a steady churn.
CREATE TABLE hive_active (k bytea PRIMARY KEY, v bytea NOT NULL) WITH (
    fillfactor = 70,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
-- Finished tasks are written once and deleted by retention in key order; vacuum after
-- 5 % dead rows keeps the space they leave reused instead of the table growing.
CREATE TABLE hive_finished (k bytea PRIMARY KEY, v bytea NOT NULL) WITH (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
CREATE TABLE hive_retention (k bytea PRIMARY KEY, v bytea NOT NULL) WITH (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
CREATE TABLE hive_idem (k bytea PRIMARY KEY, v bytea NOT NULL) WITH (
    autovacuum_vacuum_scale_factor = 0.05
);
-- A few rows rewritten on every outcome: mostly dead versions, vacuumed often.
CREATE TABLE hive_counts (k bytea PRIMARY KEY, v bytea NOT NULL) WITH (
    fillfactor = 50,
    autovacuum_vacuum_threshold = 100,
    autovacuum_vacuum_scale_factor = 0
);
CREATE TABLE hive_queues (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE hive_schedules (k bytea PRIMARY KEY, v bytea NOT NULL);

-- Called first in every commit transaction of a leader: holds the leader row against a
-- takeover until the transaction ends, and aborts it if another queen leads.
CREATE FUNCTION hive_fence(mine bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    SELECT epoch INTO current FROM hive_leader WHERE id = 1 FOR SHARE;
    IF current IS DISTINCT FROM mine THEN
        RAISE EXCEPTION 'hive: epoch % is deposed; epoch % leads', mine, current
            USING ERRCODE = 'HV001';
    END IF;
END
$$;
"#;

/// How the queen reaches the database, from `[postgres]`.
#[derive(Clone)]
pub struct Settings {
    /// `postgres.url`, parsed once.
    config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pub pool_size: usize,
    pub lease: Duration,
    pub connect_timeout: Duration,
    /// This queen, as the leader row names it.
    pub name: String,
    /// What a standby tells clients and drones of this queen when it leads.
    pub http: String,
    pub drones: String,
}

impl std::fmt::Debug for Settings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("name", &self.name)
            .field("tls", &self.tls.is_some())
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

fn pg_err(e: postgres::Error) -> StoreError {
    // The database's own message (with its SQLSTATE) is the useful part.
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{} ({})", db.message(), db.code().code())),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            StoreError::Postgres(text)
        }
    }
}

impl Settings {
    /// From `[postgres]`, for a queen whose listeners are bound at `drones` and `http`.
    pub fn from_config(
        cfg: &Config,
        drones: SocketAddr,
        http: SocketAddr,
    ) -> Result<Settings, StoreError> {
        let pg = &cfg.postgres;
        let url = pg
            .url
            .as_ref()
            .ok_or_else(|| StoreError::Postgres("postgres.url is not set".into()))?;
        let parsed: postgres::Config = url
            .0
            .parse()
            .map_err(|e| StoreError::Postgres(format!("postgres.url does not parse: {e}")))?;
        let tls = match &pg.tls_ca {
            Some(ca) => {
                let config = hive_tls::client_config(ca, None)
                    .map_err(|e| StoreError::Postgres(format!("postgres.tls_ca: {e}")))?;
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                    (*config).clone(),
                ))
            }
            None => {
                if parsed.get_ssl_mode() == postgres::config::SslMode::Require {
                    return Err(StoreError::Postgres(
                        "postgres.url asks for sslmode=require: set postgres.tls_ca to the CA that signed the server's certificate".into(),
                    ));
                }
                None
            }
        };
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "queen".into());
        Ok(Settings {
            config: parsed,
            tls,
            pool_size: pg.pool_size,
            lease: Duration::from_millis(pg.lease_ms),
            connect_timeout: Duration::from_millis(pg.connect_timeout_ms),
            name: pg
                .name
                .clone()
                .unwrap_or_else(|| format!("{host}:{}", std::process::id())),
            http: pg
                .advertise_http
                .clone()
                .unwrap_or_else(|| http.to_string()),
            drones: pg
                .advertise_drones
                .clone()
                .unwrap_or_else(|| drones.to_string()),
        })
    }

    /// A connection for one role (shown in `pg_stat_activity.application_name`). Dead
    /// peers are noticed by TCP keepalives and a user timeout of twice the lease, never by
    /// timing out a statement.
    pub fn connect(&self, role: &str) -> Result<Client, StoreError> {
        self.connect_with(role, None)
    }

    fn connect_with(
        &self,
        role: &str,
        notices: Option<Arc<AtomicBool>>,
    ) -> Result<Client, StoreError> {
        let mut config = self.config.clone();
        config
            .application_name(&format!("hive-queen {role}"))
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(1).max(self.lease / 2))
            // Whole seconds: the kernel refuses a zero interval.
            .keepalives_interval(Duration::from_secs(1).max(self.lease / 4))
            .keepalives_retries(4)
            .tcp_user_timeout(self.lease * 2);
        if let Some(flag) = notices {
            config.notice_callback(move |notice| {
                // "canceling wait for synchronous replication ...": the commit is on the
                // primary but maybe not on the standby.
                if notice.message().contains("synchronous replication") {
                    flag.store(true, Ordering::SeqCst);
                }
                tracing::warn!(message = notice.message(), "postgres notice");
            });
        }
        let client = match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(NoTls),
        };
        client.map_err(|e| {
            StoreError::Postgres(format!("cannot connect to postgres.url: {}", pg_err(e)))
        })
    }
}

/// Creates the schema in an empty database, or checks the one there: a newer schema is
/// refused, as sled's store refuses a newer database.
pub fn prepare(settings: &Settings) -> Result<(), StoreError> {
    let mut client = settings.connect("setup")?;
    let mut tx = client.transaction().map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK])
        .map_err(pg_err)?;
    // Created only when missing: a queen whose role may read and write the tables but not
    // create any (a prepared database) must still start.
    let exists: bool = tx
        .query_one("SELECT to_regclass('hive_schema') IS NOT NULL", &[])
        .and_then(|row| row.try_get(0))
        .map_err(pg_err)?;
    if !exists {
        tx.batch_execute("CREATE TABLE hive_schema (version integer NOT NULL)")
            .map_err(pg_err)?;
    }
    let found: Option<i32> = tx
        .query_one("SELECT max(version) FROM hive_schema", &[])
        .and_then(|row| row.try_get(0))
        .map_err(pg_err)?;
    match found {
        None => {
            tracing::info!(
                version = PG_SCHEMA_VERSION,
                "creating the hive schema in postgres"
            );
            tx.batch_execute(SCHEMA_V1).map_err(pg_err)?;
            tx.execute(
                "INSERT INTO hive_schema (version) VALUES ($1)",
                &[&PG_SCHEMA_VERSION],
            )
            .map_err(pg_err)?;
        }
        Some(v) if v > PG_SCHEMA_VERSION => {
            return Err(StoreError::NewerSchema {
                path: "postgres.url".into(),
                found: v as u32,
                supported: PG_SCHEMA_VERSION as u32,
            })
        }
        Some(_) => {}
    }
    tx.commit().map_err(pg_err)
}

fn table_of(key: &[u8]) -> Option<(usize, &[u8])> {
    let prefix = key.get(..2)?;
    let t = TABLES.iter().position(|(p, _)| *p == prefix)?;
    Some((t, &key[2..]))
}

fn unknown_key(key: &[u8]) -> StoreError {
    StoreError::Postgres(format!(
        "no table for key {:?} (a bug: every prefix of the layout has one)",
        String::from_utf8_lossy(key)
    ))
}

fn with_prefix(t: usize, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + rest.len());
    k.extend_from_slice(TABLES[t].0);
    k.extend_from_slice(rest);
    k
}

// ----- the writer -----

/// Prepared statements, per table.
pub(super) struct Statements {
    fence: postgres::Statement,
    put: Vec<postgres::Statement>,
    del: Vec<postgres::Statement>,
    del_if: Vec<postgres::Statement>,
}

impl Statements {
    fn prepare(client: &mut Client) -> Result<Statements, postgres::Error> {
        let mut put = Vec::new();
        let mut del = Vec::new();
        let mut del_if = Vec::new();
        for (_, t) in TABLES {
            put.push(client.prepare(&format!(
                "INSERT INTO {t} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v"
            ))?);
            del.push(client.prepare(&format!("DELETE FROM {t} WHERE k = ANY($1::bytea[])"))?);
            del_if.push(client.prepare(&format!(
                "DELETE FROM {t} x USING unnest($1::bytea[], $2::bytea[]) AS d(k, v) \
                 WHERE x.k = d.k AND x.v = d.v"
            ))?);
        }
        Ok(Statements {
            fence: client.prepare("SELECT hive_fence($1)")?,
            put,
            del,
            del_if,
        })
    }
}

/// Per table: keys and values to upsert, keys to delete, (key, value) to delete if equal.
#[derive(Default)]
struct TableWrites {
    put_k: Vec<Vec<u8>>,
    put_v: Vec<Vec<u8>>,
    del: Vec<Vec<u8>>,
    del_if_k: Vec<Vec<u8>>,
    del_if_v: Vec<Vec<u8>>,
}

/// Folds a batch's mutations into each key's final value (so one statement never touches
/// a row twice), in the order they were made; a conditional delete of a key the batch
/// has not touched is checked against the stored value, before the batch's own writes.
fn fold(commits: &mut [Commit]) -> Result<Vec<TableWrites>, StoreError> {
    let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let mut conditional: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for commit in commits.iter_mut() {
        for m in commit.mutations.drain(..) {
            ops(m, |op| match op {
                Op::Put(k, v) => {
                    latest.insert(k, Some(v));
                }
                Op::Del(k) => {
                    latest.insert(k, None);
                }
                Op::DelIfEq(k, expected) => match latest.get(&k) {
                    Some(Some(v)) if *v == expected => {
                        latest.insert(k, None);
                    }
                    Some(_) => {}
                    None => conditional.push((k, expected)),
                },
            });
        }
    }
    let mut tables: Vec<TableWrites> = TABLES.iter().map(|_| TableWrites::default()).collect();
    for (k, v) in conditional {
        let (t, rest) = table_of(&k).ok_or_else(|| unknown_key(&k))?;
        tables[t].del_if_k.push(rest.to_vec());
        tables[t].del_if_v.push(v);
    }
    for (k, v) in latest {
        let (t, rest) = table_of(&k).ok_or_else(|| unknown_key(&k))?;
        match v {
            Some(v) => {
                tables[t].put_k.push(rest.to_vec());
                tables[t].put_v.push(v);
            }
            None => tables[t].del.push(rest.to_vec()),
        }
    }
    Ok(tables)
}

pub(super) struct Writer {
    pub settings: Settings,
    pub epoch: i64,
    /// Until when the term may write: past it, a batch fails without reaching the
    /// database (the term is over; the fence would refuse it anyway).
    pub trust: Option<Trust>,
    pub rx: mpsc::Receiver<Commit>,
    pub durable: Arc<AtomicU64>,
    pub fatal: CancellationToken,
    pub metrics: crate::metrics::StoreMetrics,
}

impl Writer {
    /// The writer's connection, checked before the term starts serving.
    pub fn connect(&self) -> Result<(Client, Statements, Arc<AtomicBool>), StoreError> {
        let cancelled = Arc::new(AtomicBool::new(false));
        let mut client = self
            .settings
            .connect_with("writer", Some(cancelled.clone()))?;
        // A leader stopped (SIGSTOP, a long pause) inside a transaction holds the leader
        // row; the server ends such a session after the lease, so a takeover never waits
        // longer than that for it.
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {}",
                self.settings.lease.as_millis()
            ))
            .map_err(pg_err)?;
        let statements = Statements::prepare(&mut client).map_err(pg_err)?;
        Ok((client, statements, cancelled))
    }

    pub fn run(mut self, mut client: Client, statements: Statements, cancelled: Arc<AtomicBool>) {
        let mut failed: Option<CommitError> = None;
        // No idle polling in this writer: each of its commits waits for a network round
        // trip to PostgreSQL anyway, next to which a wake-up is small. (The runtime's
        // poller still runs on a one-worker runtime.)
        let idle = crate::idle::Window::new(std::time::Duration::ZERO);
        while let Some(mut commits) = super::next_batch(&mut self.rx, &idle) {
            let started = Instant::now();
            let lapsed = self
                .trust
                .as_ref()
                .is_some_and(|t| Instant::now() >= t.until());
            let result = match &failed {
                Some(err) => Err(err.clone()),
                None if lapsed => Err(CommitError(
                    "not written: this queen's leader lease lapsed, so its term is over".into(),
                )),
                None => self.write(&mut client, &statements, &cancelled, &mut commits),
            };
            self.metrics
                .flush_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.batch_commits.observe(commits.len() as f64);
            match &result {
                Err(err) if lapsed && failed.is_none() => {
                    tracing::warn!(error = %err, "a batch came after the term ended; nothing of it is written or acknowledged");
                    self.fatal.cancel();
                    failed = Some(err.clone());
                }
                Err(err) => {
                    if failed.is_none() {
                        tracing::error!(error = %err, "postgres commit failed: its outcome is unknown, so nothing of it is acknowledged and this queen steps down");
                        self.fatal.cancel();
                        failed = Some(err.clone());
                    }
                }
                Ok(()) => {
                    self.durable
                        .fetch_add(commits.len() as u64, Ordering::AcqRel);
                }
            }
            answer(commits, &result, &self.fatal, &mut failed);
        }
    }

    fn write(
        &self,
        client: &mut Client,
        st: &Statements,
        cancelled: &AtomicBool,
        commits: &mut [Commit],
    ) -> Result<(), CommitError> {
        let unknown = |e: StoreError| CommitError(format!("outcome unknown: {e}"));
        let tables = fold(commits).map_err(unknown)?;
        let db = |e: postgres::Error| unknown(pg_err(e));
        let mut tx = client.transaction().map_err(db)?;
        tx.execute(&st.fence, &[&self.epoch]).map_err(db)?;
        for (t, w) in tables.iter().enumerate() {
            if !w.del_if_k.is_empty() {
                tx.execute(&st.del_if[t], &[&w.del_if_k, &w.del_if_v])
                    .map_err(db)?;
            }
        }
        for (t, w) in tables.iter().enumerate() {
            if !w.del.is_empty() {
                tx.execute(&st.del[t], &[&w.del]).map_err(db)?;
            }
            if !w.put_k.is_empty() {
                tx.execute(&st.put[t], &[&w.put_k, &w.put_v]).map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        if cancelled.swap(false, Ordering::SeqCst) {
            return Err(CommitError(
                "outcome unknown: the commit's wait for the synchronous standby was cancelled, so it is on the primary but may not be on the standby".into(),
            ));
        }
        Ok(())
    }
}

// ----- reads -----

/// What a read does with a connection (or the error of getting one).
type ReadFn = Box<dyn FnOnce(Result<&mut Client, StoreError>) + Send>;

/// A read waiting for a connection, and when its caller stops waiting for it.
struct Job {
    run: ReadFn,
    deadline: Instant,
}

/// A small pool of read connections, each on its own thread; a read blocks its caller
/// for one round trip, like a sled read blocks on the disk.
#[derive(Clone)]
pub struct Reader {
    jobs: std::sync::mpsc::Sender<Job>,
    /// A read that takes longer fails (a read, unlike a commit, changes nothing, so giving
    /// up on it is safe): a database that stopped answering must not hold the threads
    /// that serve the API and the core for ever.
    timeout: Duration,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("pg::Reader").finish_non_exhaustive()
    }
}

/// Rows a range read fetches at a time.
const PAGE: usize = 256;

impl Reader {
    /// Connects `threads` read connections (now, so no read pays for a connect) and
    /// starts a thread for each; a thread reconnects after an error, and they end when the
    /// last clone of the reader is dropped.
    pub fn start(settings: &Settings, threads: usize, role: &str) -> Result<Reader, StoreError> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut clients = Vec::new();
        for _ in 0..threads.max(1) {
            clients.push(settings.connect(role)?);
        }
        for (n, first) in clients.into_iter().enumerate() {
            let rx = Arc::clone(&rx);
            let settings = settings.clone();
            let role = role.to_owned();
            std::thread::Builder::new()
                .name(format!("hive-pg-{role}-{n}"))
                .spawn(move || {
                    let mut client: Option<Client> = Some(first);
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        if Instant::now() >= job.deadline {
                            // Its caller has given up: the database is spared the work.
                            continue;
                        }
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            client = None;
                            match settings.connect(&role) {
                                Ok(c) => client = Some(c),
                                Err(e) => {
                                    (job.run)(Err(e));
                                    continue;
                                }
                            }
                        }
                        if let Some(c) = client.as_mut() {
                            (job.run)(Ok(c));
                        }
                    }
                })
                .map_err(|source| StoreError::Io {
                    path: "postgres reader thread".into(),
                    source,
                })?;
        }
        Ok(Reader {
            jobs,
            // A read, unlike a commit, changes nothing, so giving up on one is safe; a
            // quarter of the lease keeps a database that stopped answering from holding
            // the core past the moment its term must end.
            timeout: (settings.lease / 4).max(Duration::from_millis(100)),
        })
    }

    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, postgres::Error> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = Job {
            run: Box::new(move |client| {
                let result = client.and_then(|c| f(c).map_err(pg_err));
                let _ = tx.send(result);
            }),
            deadline: Instant::now() + self.timeout,
        };
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Postgres("the read connections are shut down".into()))?;
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(StoreError::Postgres(format!(
                "no answer to a read within {} ms",
                self.timeout.as_millis()
            ))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::Postgres(
                "a read connection thread ended".into(),
            )),
        }
    }

    pub fn get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        let (t, _) = table_of(&key).ok_or_else(|| unknown_key(&key))?;
        self.call(move |c| {
            let sql = format!("SELECT v FROM {} WHERE k = $1", TABLES[t].1);
            let row = c.query_opt(&sql, &[&&key[2..]])?;
            row.map(|r| r.try_get::<_, Vec<u8>>(0)).transpose()
        })
    }

    /// Up to `limit` rows with `start <= key < end` (full keys, one table), ascending or
    /// descending.
    fn page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        descending: bool,
    ) -> Result<Rows, StoreError> {
        let (t, lo) = table_of(start).ok_or_else(|| unknown_key(start))?;
        let (t_end, hi) = table_of(end).ok_or_else(|| unknown_key(end))?;
        if t != t_end {
            return Err(unknown_key(end));
        }
        let (lo, hi) = (lo.to_vec(), hi.to_vec());
        let limit = limit as i64;
        self.call(move |c| {
            let order = if descending { "DESC" } else { "ASC" };
            let sql = format!(
                "SELECT k, v FROM {} WHERE k >= $1 AND k < $2 ORDER BY k {order} LIMIT $3",
                TABLES[t].1
            );
            let rows = c.query(&sql, &[&lo, &hi, &limit])?;
            rows.iter()
                .map(|r| {
                    let k: Vec<u8> = r.try_get(0)?;
                    Ok((with_prefix(t, &k), r.try_get(1)?))
                })
                .collect()
        })
    }

    /// Ascending, as sled's `range(start..end).take(limit)`.
    pub fn range(&self, start: Vec<u8>, end: Vec<u8>, limit: usize) -> Result<Rows, StoreError> {
        self.page(&start, &end, limit, false)
    }

    /// Descending from `end` (exclusive), at most `scan_limit` rows, a page at a time,
    /// until `take` returns false.
    pub fn range_rev(
        &self,
        start: Vec<u8>,
        mut end: Vec<u8>,
        scan_limit: usize,
        mut take: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut left = scan_limit;
        while left > 0 {
            let rows = self.page(&start, &end, left.min(PAGE), true)?;
            let full = rows.len() == left.min(PAGE);
            left -= rows.len();
            for (k, v) in &rows {
                if !take(k, v)? {
                    return Ok(());
                }
            }
            match rows.last() {
                Some((k, _)) if full => end = k.clone(),
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// Every row under a prefix (full keys), in key order: the small tables read at start.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Rows, StoreError> {
        let (t, _) = table_of(prefix).ok_or_else(|| unknown_key(prefix))?;
        self.call(move |c| {
            let rows = c.query(&format!("SELECT k, v FROM {} ORDER BY k", TABLES[t].1), &[])?;
            rows.iter()
                .map(|r| {
                    let k: Vec<u8> = r.try_get(0)?;
                    Ok((with_prefix(t, &k), r.try_get(1)?))
                })
                .collect()
        })
    }
}

/// Streams `hive_active` in key order from one snapshot, `chunk` rows at a time (the
/// recovery cursor; see `ActiveScan::for_each_chunk`).
pub(super) fn scan_active(
    settings: &Settings,
    chunk: usize,
    send: &mut dyn FnMut(Raw) -> bool,
) -> Result<(), StoreError> {
    let mut client = settings.connect("recovery")?;
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg_err)?;
    let portal = tx
        .bind("SELECT k, v FROM hive_active ORDER BY k", &[])
        .map_err(pg_err)?;
    loop {
        let rows = tx.query_portal(&portal, chunk as i32).map_err(pg_err)?;
        let n = rows.len();
        let mut raw: Raw = Vec::with_capacity(n);
        for r in &rows {
            let k: &[u8] = r.try_get(0).map_err(pg_err)?;
            let v: &[u8] = r.try_get(1).map_err(pg_err)?;
            let mut key = Vec::with_capacity(ACTIVE.len() + k.len());
            key.extend_from_slice(ACTIVE);
            key.extend_from_slice(k);
            raw.push((sled::IVec::from(key), sled::IVec::from(v)));
        }
        if n > 0 && !send(raw) {
            return Ok(());
        }
        if n < chunk {
            return Ok(());
        }
    }
}

/// Rows copied per statement by [`import`].
const IMPORT_BATCH: usize = 2_000;

/// Copies rows into every table in one transaction, refusing a database that already
/// holds tasks, and checks the counts: `read(prefix, take)` hands over every (key without
/// prefix, value) of one prefix. See `store::migrate_to_postgres`.
pub(super) fn import(
    settings: &Settings,
    sources: &[(&'static [u8], &'static str)],
    mut read: impl FnMut(
        &[u8],
        &mut dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>,
) -> Result<super::Migrated, StoreError> {
    let mut client = settings.connect("migrate")?;
    let mut tx = client.transaction().map_err(pg_err)?;
    for (_, table) in sources {
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .and_then(|r| r.try_get(0))
            .map_err(pg_err)?;
        if n > 0 {
            return Err(StoreError::Postgres(format!(
                "the target database is not empty ({table} has {n} rows): migrate into a new database"
            )));
        }
    }
    let mut copied = Vec::new();
    for (prefix, table) in sources {
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {table} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[])"
            ))
            .map_err(pg_err)?;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut values: Vec<Vec<u8>> = Vec::new();
        let mut count = 0u64;
        let mut failed = None;
        read(prefix, &mut |k, v| {
            keys.push(k.to_vec());
            values.push(v.to_vec());
            count += 1;
            if keys.len() == IMPORT_BATCH {
                if let Err(e) = tx.execute(&insert, &[&keys, &values]) {
                    failed = Some(pg_err(e));
                    return Err(StoreError::Interrupted);
                }
                keys.clear();
                values.clear();
            }
            Ok(())
        })
        .map_err(|e| failed.take().unwrap_or(e))?;
        if !keys.is_empty() {
            tx.execute(&insert, &[&keys, &values]).map_err(pg_err)?;
        }
        let stored: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .and_then(|r| r.try_get(0))
            .map_err(pg_err)?;
        if stored as u64 != count {
            return Err(StoreError::Postgres(format!(
                "{table}: copied {count} records but the database holds {stored}; nothing was committed"
            )));
        }
        copied.push((*table, count));
    }
    tx.commit().map_err(pg_err)?;
    Ok(super::Migrated { tables: copied })
}

// ----- the leader lease -----

/// The queen that leads, as the leader row names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    pub epoch: i64,
    pub holder: String,
    /// Its HTTP API, for a standby's 503s.
    pub http: String,
    /// Its drone port, for a standby's `not_leader` rejects.
    pub drones: String,
}

/// Where this queen stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Another queen leads (`Some`, while its lease runs) or nobody does yet.
    Standby(Option<LeaderInfo>),
    /// This queen leads in this epoch.
    Leading(i64),
}

/// The leader lease, kept by its own thread and connection: a standby takes the lease
/// once it has lapsed on the database's clock; the leader renews it every third of
/// `lease` and trusts it until `lease` after it *sent* its last successful renewal, less
/// a margin, so it stops leading before the lease can lapse on the database.
pub struct Election {
    role: watch::Receiver<Role>,
    trust: Trust,
    commands: std::sync::mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("role", &*self.role.borrow())
            .finish_non_exhaustive()
    }
}

/// Until when the current term may act (past once it has lapsed or been given up):
/// written by the lease thread, read by the watchdog and the writer.
#[derive(Debug, Clone)]
pub struct Trust {
    /// Nanoseconds after `base`; 0 is "not trusted".
    until: Arc<AtomicU64>,
    base: Instant,
}

impl Trust {
    fn new() -> Trust {
        Trust {
            until: Arc::new(AtomicU64::new(0)),
            base: Instant::now(),
        }
    }

    pub fn until(&self) -> Instant {
        self.base + Duration::from_nanos(self.until.load(Ordering::Acquire))
    }

    fn set(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.until.store(nanos, Ordering::Release);
    }

    fn clear(&self) {
        self.until.store(0, Ordering::Release);
    }
}

/// How long stopping waits for the lease thread to release the lease.
const STOP_WAIT: Duration = Duration::from_secs(5);

enum Command {
    /// Give up the lease of this epoch (a stop, or a step-down): standbys take over at
    /// their next poll instead of waiting for it to lapse.
    Release(i64),
    /// Release what is held and end the thread.
    Stop,
}

impl Election {
    /// Starts campaigning (the schema must be prepared).
    pub fn start(settings: Settings) -> Result<Election, StoreError> {
        let (role_tx, role) = watch::channel(Role::Standby(None));
        let trust = Trust::new();
        let (commands, rx) = std::sync::mpsc::channel();
        let canceller =
            Canceller::start(settings.tls.clone()).map_err(|source| StoreError::Io {
                path: "postgres lease canceller thread".into(),
                source,
            })?;
        let campaign = Campaign {
            settings,
            canceller,
            statement: 0,
            role: role_tx,
            trust: trust.clone(),
            commands: rx,
            client: None,
        };
        let thread = std::thread::Builder::new()
            .name("hive-pg-lease".into())
            .spawn(move || campaign.run())
            .map_err(|source| StoreError::Io {
                path: "postgres lease thread".into(),
                source,
            })?;
        Ok(Election {
            role,
            trust,
            commands,
            thread: Some(thread),
        })
    }

    /// Watches this queen's role.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Until when the current term may act, readable from anywhere.
    pub fn trust(&self) -> Trust {
        self.trust.clone()
    }

    /// Gives up the lease of `epoch` if this queen still holds it.
    pub fn release(&self, epoch: i64) {
        let _ = self.commands.send(Command::Release(epoch));
    }

    /// Releases the lease (if held) and stops campaigning; waits for the lease thread.
    pub fn stop(mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            // The release is one bounded statement (see `Canceller`); past this, the
            // lease simply lapses on its own.
            let deadline = Instant::now() + STOP_WAIT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Cancels a lease statement that runs past its deadline. A lease write waits for the
/// synchronous standby like any commit, and with the standby gone it would wait for ever;
/// the lease thread must go on (to step down, to stop). A lease statement cancelled this
/// way counts as failed whatever it returns: a renewal that was not replicated must not
/// extend the leader's trust, and a takeover that was not replicated must not lead (its
/// row lapses by itself). Data commits are never cancelled.
struct Canceller {
    slot: Mutex<Option<(u64, Instant, postgres::CancelToken)>>,
    /// The last statement (by number) that was cancelled.
    fired: AtomicU64,
    stop: AtomicBool,
}

/// How often the canceller looks at the running lease statement.
const CANCEL_TICK: Duration = Duration::from_millis(20);

impl Canceller {
    fn start(
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ) -> std::io::Result<Arc<Canceller>> {
        let canceller = Arc::new(Canceller {
            slot: Mutex::new(None),
            fired: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let c = Arc::clone(&canceller);
        std::thread::Builder::new()
            .name("hive-pg-lease-cancel".into())
            .spawn(move || {
                while !c.stop.load(Ordering::Acquire) {
                    std::thread::sleep(CANCEL_TICK);
                    let due = match c.slot.lock() {
                        Ok(mut slot) => match slot.as_ref() {
                            Some((_, deadline, _)) if Instant::now() >= *deadline => slot.take(),
                            _ => None,
                        },
                        Err(_) => return,
                    };
                    if let Some((n, _, token)) = due {
                        c.fired.store(n, Ordering::Release);
                        let sent = match &tls {
                            Some(tls) => token.cancel_query(tls.clone()),
                            None => token.cancel_query(NoTls),
                        };
                        if let Err(e) = sent {
                            tracing::warn!(error = %e, "cannot cancel a lease statement past its deadline");
                        }
                    }
                }
            })?;
        Ok(canceller)
    }
}

struct Campaign {
    settings: Settings,
    canceller: Arc<Canceller>,
    /// Number of the lease statement running now (see [`Canceller`]).
    statement: u64,
    role: watch::Sender<Role>,
    trust: Trust,
    commands: std::sync::mpsc::Receiver<Command>,
    client: Option<Client>,
}

impl Campaign {
    fn poll_interval(&self) -> Duration {
        (self.settings.lease / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
    }

    fn renew_interval(&self) -> Duration {
        self.settings.lease / 3
    }

    /// How much earlier than the database the leader gives up its lease: clocks run at
    /// slightly different rates.
    fn margin(&self) -> Duration {
        // A quarter: enough for drift and for the term to wind down (a read in flight
        // gives up after an eighth) before the lease lapses on the database.
        self.settings.lease / 4
    }

    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            let mut client = self.settings.connect("lease")?;
            // A takeover must not wait forever behind a lock: it retries instead.
            client
                .batch_execute(&format!(
                    "SET lock_timeout = {}",
                    self.settings.lease.as_millis().max(1)
                ))
                .map_err(pg_err)?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Postgres("no lease connection".into()))
    }

    /// Runs one lease statement on the lease connection, cancelled (and failed) once it
    /// has run for a third of the lease.
    fn bounded<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        self.statement += 1;
        let n = self.statement;
        let deadline = Instant::now() + self.renew_interval();
        let canceller = Arc::clone(&self.canceller);
        let client = self.client()?;
        if let Ok(mut slot) = canceller.slot.lock() {
            *slot = Some((n, deadline, client.cancel_token()));
        }
        let result = f(client);
        if let Ok(mut slot) = canceller.slot.lock() {
            *slot = None;
        }
        if canceller.fired.load(Ordering::Acquire) == n {
            // A cancel may still be on its way: the next statement gets a fresh connection.
            self.client = None;
            return Err(StoreError::Postgres(format!(
                "a lease statement ran past {} ms and was cancelled; it counts as failed",
                self.renew_interval().as_millis()
            )));
        }
        result.map_err(pg_err)
    }

    fn run(mut self) {
        let mut leading: Option<i64> = None;
        let mut next = Instant::now();
        // After giving a lease up, leave the next term to another queen for a while.
        let mut hold_off = Instant::now();
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match self.commands.recv_timeout(wait) {
                Ok(Command::Release(epoch)) => {
                    if leading == Some(epoch) {
                        leading = None;
                        self.demote();
                    }
                    self.release(epoch);
                    hold_off = Instant::now() + self.settings.lease;
                    continue;
                }
                Ok(Command::Stop) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    if let Some(epoch) = leading.take() {
                        self.demote();
                        self.release(epoch);
                    }
                    self.canceller.stop.store(true, Ordering::Release);
                    return;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            match leading {
                None => {
                    next = Instant::now() + self.poll_interval();
                    match self.try_acquire(Instant::now() >= hold_off) {
                        Ok(Some(epoch)) => {
                            leading = Some(epoch);
                            next = Instant::now() + self.renew_interval();
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "campaigning for the leader lease failed");
                            self.client = None;
                        }
                    }
                }
                Some(epoch) => {
                    let sent = Instant::now();
                    match self.renew(epoch) {
                        Ok(true) => {
                            self.trust.set(sent + self.settings.lease - self.margin());
                            next = Instant::now() + self.renew_interval();
                        }
                        Ok(false) => {
                            tracing::warn!(epoch, "another queen took the lease: stepping down");
                            leading = None;
                            self.demote();
                            next = Instant::now();
                        }
                        Err(e) => {
                            tracing::warn!(epoch, error = %e, "cannot renew the leader lease");
                            self.client = None;
                            if Instant::now() >= self.trust.until() {
                                tracing::warn!(epoch, "the leader lease lapsed: stepping down");
                                leading = None;
                                self.demote();
                            }
                            next = Instant::now() + self.poll_interval();
                        }
                    }
                }
            }
        }
    }

    fn demote(&mut self) {
        self.trust.clear();
        self.role.send_replace(Role::Standby(None));
    }

    /// Takes the lease if it has lapsed (and `campaign`); otherwise reads who holds it.
    fn try_acquire(&mut self, campaign: bool) -> Result<Option<i64>, StoreError> {
        let lease_ms = self.settings.lease.as_millis() as i64;
        let (name, http, drones) = (
            self.settings.name.clone(),
            self.settings.http.clone(),
            self.settings.drones.clone(),
        );
        let sent = Instant::now();
        let taken = if !campaign {
            None
        } else {
            self.bounded(|client| {
                client.query_opt(
                    "UPDATE hive_leader SET epoch = epoch + 1, holder = $1, http = $2, drones = $3, \
                     expires_at = now() + $4::bigint * interval '1 millisecond', since = now() \
                     WHERE id = 1 AND expires_at < now() RETURNING epoch",
                    &[&name, &http, &drones, &lease_ms],
                )
            })?
        };
        if let Some(row) = taken {
            let epoch: i64 = row.try_get(0).map_err(pg_err)?;
            self.trust.set(sent + self.settings.lease - self.margin());
            tracing::info!(epoch, holder = %name, "this queen leads");
            self.role.send_replace(Role::Leading(epoch));
            return Ok(Some(epoch));
        }
        let row = self.bounded(|client| {
            client.query_one(
                "SELECT epoch, holder, http, drones, expires_at >= now() FROM hive_leader WHERE id = 1",
                &[],
            )
        })?;
        let live: bool = row.try_get(4).map_err(pg_err)?;
        let leader = if live {
            Some(LeaderInfo {
                epoch: row.try_get(0).map_err(pg_err)?,
                holder: row.try_get(1).map_err(pg_err)?,
                http: row.try_get(2).map_err(pg_err)?,
                drones: row.try_get(3).map_err(pg_err)?,
            })
        } else {
            None
        };
        self.role.send_if_modified(|role| {
            let new = Role::Standby(leader);
            if *role != new {
                *role = new;
                true
            } else {
                false
            }
        });
        Ok(None)
    }

    /// Extends the lease if this epoch still holds it.
    fn renew(&mut self, epoch: i64) -> Result<bool, StoreError> {
        let lease_ms = self.settings.lease.as_millis() as i64;
        let row = self.bounded(|client| {
            client.query_opt(
                "UPDATE hive_leader SET expires_at = now() + $2::bigint * interval '1 millisecond' \
                 WHERE id = 1 AND epoch = $1 RETURNING 1",
                &[&epoch, &lease_ms],
            )
        })?;
        Ok(row.is_some())
    }

    /// Ends this epoch's lease now, so a standby takes over at its next poll.
    fn release(&mut self, epoch: i64) {
        let result = self.bounded(|c| {
            c.execute(
                "UPDATE hive_leader SET expires_at = now() - interval '1 millisecond' \
                 WHERE id = 1 AND epoch = $1",
                &[&epoch],
            )
        });
        match result {
            Ok(1) => tracing::info!(epoch, "leader lease released"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(epoch, error = %e, "cannot release the leader lease; it lapses by itself")
            }
        }
    }
}

/// Runs the continuations of a batch `COMMIT` made durable (or failed) as sled's writer
/// does ([`super::Answers`]: messages to drones first). Should one panic (a bug), the
/// queen stops and, like sled's writer, this one writes and acknowledges nothing more.
fn answer(
    commits: Vec<Commit>,
    result: &Result<(), CommitError>,
    fatal: &CancellationToken,
    failed: &mut Option<CommitError>,
) {
    let mut answers = super::Answers::default();
    for commit in commits {
        answers.push(commit, result);
    }
    answers.run(fatal);
    if fatal.is_cancelled() && failed.is_none() {
        *failed = Some(CommitError("the queen is stopping".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Expired, Mutation, RetentionEntry};
    use shared::api::TaskState;
    use shared::TaskId;

    fn commit(mutations: Vec<Mutation>) -> Commit {
        Commit {
            mutations,
            after: None,
            first: false,
        }
    }

    fn table(name: &str) -> usize {
        TABLES
            .iter()
            .position(|(_, t)| *t == name)
            .expect("a table")
    }

    #[test]
    fn a_batch_folds_to_each_keys_last_write_in_order() {
        let id = TaskId::generate();
        let save = |record: &[u8]| Mutation::SaveActive {
            id,
            record: record.to_vec(),
        };
        // Saved twice, then finished, in one batch: one finished row, no active row.
        let mut commits = vec![
            commit(vec![save(b"one"), save(b"two")]),
            commit(vec![Mutation::Finish {
                id,
                record: b"done".to_vec(),
                finished_ms: 5,
                index: RetentionEntry {
                    queue: "q".into(),
                    state: TaskState::Succeeded,
                    idempotency_key: None,
                },
                count: 1,
            }]),
        ];
        let tables = fold(&mut commits).expect("fold");
        let active = &tables[table("hive_active")];
        assert!(
            active.put_k.is_empty(),
            "the save is overtaken by the finish"
        );
        assert_eq!(active.del, vec![id.to_bytes().to_vec()]);
        let finished = &tables[table("hive_finished")];
        assert_eq!(finished.put_v, vec![b"done".to_vec()]);
        assert_eq!(
            tables[table("hive_counts")].put_v,
            vec![1u64.to_be_bytes().to_vec()]
        );
        // And a later revive in the same batch brings it back: active again, no finished.
        let mut commits = vec![commit(vec![
            save(b"one"),
            Mutation::Revive {
                id,
                record: b"again".to_vec(),
                finished_ms: 5,
                queue: "q".into(),
                state: TaskState::Succeeded,
                count: 0,
            },
        ])];
        let tables = fold(&mut commits).expect("fold");
        assert_eq!(tables[table("hive_active")].put_v, vec![b"again".to_vec()]);
        assert_eq!(tables[table("hive_finished")].del.len(), 1);
    }

    #[test]
    fn a_purge_drops_an_idempotency_key_only_while_it_names_the_purged_task() {
        let (old, new) = (TaskId::generate(), TaskId::generate());
        let purge = || Mutation::Purge {
            expired: Expired {
                id: old,
                finished_ms: 1,
                entry: RetentionEntry {
                    queue: "q".into(),
                    state: TaskState::Succeeded,
                    idempotency_key: Some("k".into()),
                },
            },
            count: 0,
        };
        let idem = table("hive_idem");
        // Untouched in the batch: checked against the stored value, by the database.
        let tables = fold(&mut [commit(vec![purge()])]).expect("fold");
        assert_eq!(tables[idem].del_if_k, vec![b"k".to_vec()]);
        assert_eq!(tables[idem].del_if_v, vec![old.to_bytes().to_vec()]);
        // Re-pointed at a new task earlier in the batch: kept.
        let tables = fold(&mut [commit(vec![
            Mutation::Idempotency {
                key: "k".into(),
                id: new,
            },
            purge(),
        ])])
        .expect("fold");
        assert!(tables[idem].del_if_k.is_empty() && tables[idem].del.is_empty());
        assert_eq!(tables[idem].put_v, vec![new.to_bytes().to_vec()]);
        // Pointing at the purged task earlier in the batch: dropped.
        let tables = fold(&mut [commit(vec![
            Mutation::Idempotency {
                key: "k".into(),
                id: old,
            },
            purge(),
        ])])
        .expect("fold");
        assert_eq!(tables[idem].del, vec![b"k".to_vec()]);
        assert!(tables[idem].put_k.is_empty());
    }

    /// A batch is answered drones first, and a continuation that panics leaves every
    /// other one answered (those after it too) but the writer refusing what comes next.
    #[test]
    fn a_batch_answers_drones_first_and_a_panic_stops_the_writing() {
        let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (fatal, mut failed) = (CancellationToken::new(), None);
        // Each answer: its number, whether it succeeded, whether the queen was stopping.
        let commit = |n: u32, first: bool| {
            let (answered, fatal) = (answered.clone(), fatal.clone());
            Commit {
                mutations: Vec::new(),
                after: Some(Box::new(move |r: Result<(), CommitError>| {
                    assert!(n != 2, "a bug in continuation 2");
                    let mut answered = answered.lock().unwrap_or_else(|p| p.into_inner());
                    answered.push((n, r.is_ok(), fatal.is_cancelled()));
                })),
                first,
            }
        };
        let batch = vec![
            commit(1, false),
            commit(2, true),
            commit(3, false),
            commit(4, true),
        ];
        answer(batch, &Ok(()), &fatal, &mut failed);
        let answered = answered.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // 2 panicked; the others ran after it, drones first, before the queen stopped.
        assert_eq!(
            answered,
            [(4, true, false), (1, true, false), (3, true, false)]
        );
        assert!(fatal.is_cancelled(), "the queen stops");
        assert!(failed.is_some(), "and this writer writes nothing more");
    }
}
