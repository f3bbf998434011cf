//! The only code that touches sled. Scheduling sees tasks, mutations and commits; this
//! module turns them into keys, batches and flushes, so the engine could be swapped
//! without touching the scheduler.
//!
//! Layout: one sled tree, `hive`, with key prefixes. Every group commit, however many
//! tasks it touches, is durable and atomic through the write-ahead journal ([`journal`];
//! through a killed queen, and with `[storage] sync` through power loss too):
//!
//! | key                               | value                                  |
//! |-----------------------------------|----------------------------------------|
//! | `m/schema`                        | schema version, u32 big-endian         |
//! | `m/ckpt`                          | last journal group checkpointed in sled |
//! | `m/seq`                           | last journal group begun in sled        |
//! | `a/<task id>`                     | active (non-terminal) task record      |
//! | `f/<task id>`                     | finished task record                   |
//! | `t/<finished ms BE><task id>`     | retention index entry (JSON)           |
//! | `i/<idempotency key>`             | task id                                |
//! | `c/<queue>\0<state>`              | count of finished tasks, u64 BE        |
//! | `q/<queue>`                       | queue settings (pause, limits)         |
//! | `s/<schedule>`                    | periodic schedule and its last tick    |
//!
//! Active and finished tasks live apart, so a restart reads only active ones.
//!
//! Writes go through a two-stage writer (group commit). The writer thread drains every
//! commit waiting in its channel, appends the group's record to the journal and folds its
//! writes into the [`pending`] ones (which readers see before sled); the flusher thread
//! syncs the journal up to there, then runs those commits' continuations: the messages
//! to drones first ([`Commit::first`]), then the rest, each in commit order. The
//! next group is written while the last one syncs; when nothing waits behind a group and
//! the flusher is idle, the writer syncs and answers it itself. A checkpoint thread takes
//! what is pending, once a second or sooner under load, and its sled thread (at a lower
//! priority) writes it to sled and flushes it, so the journal can be deleted. Nothing is
//! acknowledged or sent to a drone before the write it depends on is durable.

mod journal;
mod pending;
pub mod pg;
pub mod record;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use shared::api::TaskState;
use shared::TaskId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::task::Task;

/// The storage schema this build writes. See `migrations-notes/`.
pub const SCHEMA_VERSION: u32 = 5;

/// Commits queued for the writer before submitters wait: enough to keep a batch full
/// while the previous one flushes, small enough to bound memory.
pub const WRITE_QUEUE: usize = 16_384;

/// Active records handed to a decoder thread at a time during recovery.
const RECOVERY_CHUNK: usize = 4_096;

/// One decoded chunk of active records.
type Decoded = Result<Vec<record::Recovered>, StoreError>;
/// Most commits in one group commit, so one flush never waits behind an unbounded batch.
pub const MAX_COMMITS_PER_BATCH: usize = 8_192;

const SCHEMA_KEY: &[u8] = b"m/schema";
/// Every journal group up to this one (u64 big-endian) is in sled (see [`journal`]).
const CKPT_KEY: &[u8] = b"m/ckpt";
/// The last journal group whose writes were begun in sled (u64 big-endian), written before
/// them: a recovered one past the journal's last whole record means sled holds part of a
/// group the journal lost, which only an unsynced journal and an OS crash can do.
const SEQ_KEY: &[u8] = b"m/seq";
/// Schema 4's marker: the last group commit of several keys, begun or done ([`Marker`]).
/// Read only to upgrade a schema-4 database.
const GROUP_KEY: &[u8] = b"m/group";
const ACTIVE: &[u8] = b"a/";
const FINISHED: &[u8] = b"f/";
const RETENTION: &[u8] = b"t/";
const IDEM: &[u8] = b"i/";
const COUNTS: &[u8] = b"c/";
const QUEUES: &[u8] = b"q/";
const SCHEDULES: &[u8] = b"s/";

/// A full filesystem says so, with what to do: an ENOSPC from any step of opening (sled
/// writes its log and snapshot as it opens) becomes [`StoreError::NoSpace`].
fn explain_no_space(e: StoreError, dir: &Path) -> StoreError {
    let io = match &e {
        StoreError::Io { source, .. } => Some(source),
        StoreError::Sled(sled::Error::Io(source)) => Some(source),
        _ => None,
    };
    if io.and_then(std::io::Error::raw_os_error) == Some(libc::ENOSPC) {
        return StoreError::NoSpace {
            path: dir.to_owned(),
        };
    }
    e
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("data dir {path} is in use by another queen (lock held{holder}); stop it or choose another queen.data_dir")]
    Locked { path: PathBuf, holder: String },
    #[error("database in {path} was written by storage schema {found}, newer than this queen's {supported}; upgrade the queen")]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("database in {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("reading the active tasks was stopped before the end")]
    Interrupted,
    #[error("no space left on the filesystem of the data dir {path}: free some space there (or grow the volume) and start the queen again; nothing stored is lost, and the queen keeps [storage] min_free_mb free once it runs")]
    NoSpace { path: PathBuf },
}

/// Why a commit did not become durable. Cloned to every waiter of a failed batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("write not durable: {0}")]
pub struct CommitError(pub String);

/// One change to stored state.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Insert or replace an active task.
    SaveActive {
        id: TaskId,
        record: Vec<u8>,
    },
    /// A task reached a terminal state: move it from active to finished.
    Finish {
        id: TaskId,
        record: Vec<u8>,
        finished_ms: i64,
        index: RetentionEntry,
        /// The queue's new count of finished tasks in this state.
        count: u64,
    },
    /// Remember an idempotency key for a new task.
    Idempotency {
        key: String,
        id: TaskId,
    },
    /// Store a schedule (created, replaced, or its last tick moved on).
    SaveSchedule {
        name: String,
        record: Vec<u8>,
    },
    DeleteSchedule {
        name: String,
    },
    /// Store a queue's settings.
    SaveQueue {
        name: String,
        record: Vec<u8>,
    },
    /// A finished task runs again (retry): back from finished to active.
    Revive {
        id: TaskId,
        record: Vec<u8>,
        finished_ms: i64,
        queue: String,
        state: TaskState,
        count: u64,
    },
    /// Drop an expired finished task and everything that points at it.
    Purge {
        expired: Expired,
        count: u64,
    },
}

impl Mutation {
    pub fn save(task: &Task) -> Mutation {
        Mutation::SaveActive {
            id: task.id,
            record: record::encode(task),
        }
    }

    /// `count` is the new number of finished tasks in the task's queue and state.
    pub fn finish(task: &Task, count: u64) -> Mutation {
        let finished_ms = task.finished_at.map(|t| t.timestamp_millis()).unwrap_or(0);
        Mutation::Finish {
            id: task.id,
            record: record::encode(task),
            finished_ms,
            index: RetentionEntry {
                queue: task.queue.clone(),
                state: task.state,
                idempotency_key: task.idempotency_key.clone(),
            },
            count,
        }
    }
}

/// What the retention index remembers of a finished task, so a purge needs no record reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetentionEntry {
    pub queue: String,
    pub state: TaskState,
    pub idempotency_key: Option<String>,
}

/// A finished task past its retention.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    pub id: TaskId,
    pub finished_ms: i64,
    pub entry: RetentionEntry,
}

/// Runs once the commit is durable (or failed): sends an ack, an assign, an HTTP reply.
/// It runs on a store thread (sled's writer or flusher, PostgreSQL's writer), or in
/// `StoreWriter::send` once the store is shut down, so it must not block, and above all
/// not wait on the store's writer (`StoreWriter::send`): that thread may be the one
/// running it.
pub type AfterCommit = Box<dyn FnOnce(Result<(), CommitError>) + Send>;

/// Mutations applied atomically, and what to do once they are durable.
pub struct Commit {
    pub mutations: Vec<Mutation>,
    pub after: Option<AfterCommit>,
    /// `after` goes before the continuations of commits that are not `first` among those
    /// one sync makes durable (they are all durable by then, so the order among them is
    /// free): the core marks the messages to drones, so an `assign` is on its way before
    /// the submit it shares a sync with is answered, as beanstalkd hands a waiting worker
    /// its job before it answers the put. Each kind keeps commit order.
    pub first: bool,
}

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit")
            .field("mutations", &self.mutations)
            .finish_non_exhaustive()
    }
}

/// What the queen needs from disk to rebuild its in-memory state.
#[derive(Debug)]
pub struct Recovered {
    /// Active tasks, read when the caller streams them.
    pub active: ActiveScan,
    pub queues: Vec<(String, crate::queues::QueueSettings)>,
    pub schedules: Vec<crate::schedule::Schedule>,
    pub finished_counts: Vec<((String, TaskState), u64)>,
}

/// Read access, safe to share with HTTP handlers. Reads block the calling thread for one
/// lookup (a sled tree read, or a round trip on one of the PostgreSQL read connections).
#[derive(Clone, Debug)]
pub struct StoreReader {
    engine: ReadEngine,
}

#[derive(Clone, Debug)]
enum ReadEngine {
    Sled(SledRead),
    Postgres(pg::Reader),
}

/// Reads on sled: the writes still [`pending`] first, then the tree.
#[derive(Clone)]
struct SledRead {
    tree: sled::Tree,
    pending: Arc<pending::Pending>,
}

impl std::fmt::Debug for SledRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledRead").finish_non_exhaustive()
    }
}

impl SledRead {
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
        match self.pending.get(k) {
            Some(pending) => Ok(pending),
            None => Ok(self.tree.get(k)?.map(|v| v.to_vec())),
        }
    }

    /// Calls `f` with each row in `start..end`, ascending (descending with `rev`), the
    /// pending writes over sled's, until it returns `false`; at most `limit` rows.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        rev: bool,
        limit: usize,
        f: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        pending::scan(&self.tree, &self.pending, start, end, rev, limit, f)
    }
}

/// The write side: owned by the scheduler core. Dropping it stops the writer thread after
/// it has made every queued commit durable.
#[derive(Debug)]
pub struct StoreWriter {
    tx: mpsc::Sender<Commit>,
    durable: Arc<AtomicU64>,
}

/// The open store: keep it alive for as long as the database is in use. Its writer half
/// ([`StoreWriter`]) is handed out separately, to the one component that writes.
#[derive(Debug)]
pub struct Store {
    pub reader: StoreReader,
    /// The scheduler core's reads: on PostgreSQL, connections of its own, so API reads
    /// (history pages) never make the core wait. On sled, the same as `reader`.
    pub core_reader: StoreReader,
    /// Joined at shutdown so the last commits are flushed before the process exits.
    pub writer_thread: std::thread::JoinHandle<()>,
    /// sled: the data dir's `LOCK`, held (with its flock) for as long as the queen runs.
    /// PostgreSQL needs none: the leader lease decides who writes.
    _lock: Option<File>,
}

#[derive(Debug, Clone)]
pub struct OpenOptionsHive {
    pub data_dir: PathBuf,
    pub cache_capacity_bytes: u64,
    pub sync: bool,
    /// Where the writer reports its group-commit sizes and flush times.
    pub metrics: crate::metrics::StoreMetrics,
    /// The longest the writer polls for the next commit before it sleeps
    /// (`[queen] idle_poll_us`, [`crate::idle`]).
    pub idle_poll: std::time::Duration,
}

impl Store {
    /// Opens (or creates) the database in `opts.data_dir`, refusing a dir held by another
    /// queen, a newer schema or a corrupt database; returns what must be rebuilt in memory.
    /// `fatal` is cancelled if a write ever fails, since the in-memory state can no longer
    /// be trusted to match the disk.
    pub fn open(
        opts: &OpenOptionsHive,
        fatal: CancellationToken,
    ) -> Result<(Store, StoreWriter, Recovered), StoreError> {
        Store::open_dir(opts, fatal).map_err(|e| explain_no_space(e, &opts.data_dir))
    }

    fn open_dir(
        opts: &OpenOptionsHive,
        fatal: CancellationToken,
    ) -> Result<(Store, StoreWriter, Recovered), StoreError> {
        let dir = &opts.data_dir;
        let io = |source| StoreError::Io {
            path: dir.clone(),
            source,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::NotADirectory(dir.clone()));
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock_data_dir(dir)?;

        let db_path = dir.join("db");
        remove_unfinished_snapshots(&db_path)?;
        let opening = std::time::Instant::now();
        let db = open_sled(&db_path, opts.cache_capacity_bytes).map_err(|e| match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt {
                path: db_path.clone(),
                detail: e.to_string(),
            },
            sled::Error::Io(source) => StoreError::Io {
                path: db_path.clone(),
                source,
            },
            other => StoreError::Sled(other),
        })?;
        let tree = db.open_tree("hive")?;
        check_schema(&tree, &db_path, &dir.join(MARKER))?;
        let last_group = replay_journal(&tree, dir, opts.sync)?;
        let journal = journal::Journal::start(dir, opts.sync, last_group).map_err(io)?;
        let opened = opening.elapsed();
        let recovered = recover(&tree, &db_path)?;
        tracing::info!(
            sled_open_ms = opened.as_millis() as u64,
            read_ms = (opening.elapsed() - opened).as_millis() as u64,
            "database opened"
        );

        let sync_file = if opts.sync {
            Some(
                File::open(db_path.join("db")).map_err(|source| StoreError::Io {
                    path: db_path.join("db"),
                    source,
                })?,
            )
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let durable = Arc::new(AtomicU64::new(0));
        let read = SledRead {
            tree: tree.clone(),
            pending: Arc::default(),
        };
        let writer = Writer {
            db,
            read: read.clone(),
            rx,
            durable: durable.clone(),
            sync_file,
            fatal,
            metrics: opts.metrics.clone(),
            journal,
            sync: opts.sync,
            seq: last_group,
            checkpointed: Arc::new(AtomicU64::new(last_group)),
            idle: crate::idle::Window::new(opts.idle_poll)
                .counting(opts.metrics.idle_poll_seconds.clone()),
        };
        let writer_thread = std::thread::Builder::new()
            .name("hive-store-writer".into())
            .spawn(move || writer.run())
            .map_err(io)?;
        Ok((
            Store {
                reader: StoreReader {
                    engine: ReadEngine::Sled(read.clone()),
                },
                core_reader: StoreReader {
                    engine: ReadEngine::Sled(read),
                },
                writer_thread,
                _lock: Some(lock),
            },
            StoreWriter { tx, durable },
            recovered,
        ))
    }
}

/// The scheduler core reads one thing at a time (it is one task), plus the purge: two
/// connections of its own.
const CORE_READ_CONNECTIONS: usize = 2;

impl Store {
    /// Opens the PostgreSQL store for a leader's term: `epoch` fences every commit (see
    /// [`pg`]). The schema must be prepared ([`pg::prepare`]) and the lease held.
    pub fn open_postgres(
        settings: &pg::Settings,
        epoch: i64,
        trust: Option<pg::Trust>,
        metrics: crate::metrics::StoreMetrics,
        fatal: CancellationToken,
    ) -> Result<(Store, StoreWriter, Recovered), StoreError> {
        let reader = pg::Reader::start(settings, settings.pool_size, "reader")?;
        let core_reader = pg::Reader::start(settings, CORE_READ_CONNECTIONS, "core-reader")?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let durable = Arc::new(AtomicU64::new(0));
        let writer = pg::Writer {
            settings: settings.clone(),
            epoch,
            trust,
            rx,
            durable: durable.clone(),
            fatal,
            metrics,
        };
        let (client, statements, cancelled) = writer.connect()?;
        let recovered = recover_from(
            ActiveScan {
                source: ScanSource::Postgres(Box::new(settings.clone())),
                db_path: PathBuf::from("postgres"),
            },
            |prefix| reader.scan_prefix(prefix),
        )?;
        let writer_thread = std::thread::Builder::new()
            .name("hive-pg-writer".into())
            .spawn(move || writer.run(client, statements, cancelled))
            .map_err(|source| StoreError::Io {
                path: PathBuf::from("postgres writer thread"),
                source,
            })?;
        Ok((
            Store {
                reader: StoreReader {
                    engine: ReadEngine::Postgres(reader),
                },
                core_reader: StoreReader {
                    engine: ReadEngine::Postgres(core_reader),
                },
                writer_thread,
                _lock: None,
            },
            StoreWriter { tx, durable },
            recovered,
        ))
    }
}

/// What [`migrate_to_postgres`] copied: rows per table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub tables: Vec<(&'static str, u64)>,
}

/// Copies a stopped queen's sled data dir into an empty PostgreSQL database (`queen
/// migrate`): every record as it is (the two engines store the same bytes), then checks
/// the database holds exactly as many rows per table as the data dir had keys per prefix.
/// Refuses a data dir another queen holds, a newer schema, and a database that already
/// holds tasks. One transaction: a failed copy leaves the database as it was.
pub fn migrate_to_postgres(
    data_dir: &Path,
    settings: &pg::Settings,
) -> Result<Migrated, StoreError> {
    let db_path = data_dir.join("db");
    if !db_path.exists() {
        return Err(StoreError::Io {
            path: db_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no sled database here"),
        });
    }
    let _lock = lock_data_dir(data_dir)?;
    let db = open_sled(&db_path, 64 * 1024 * 1024)?;
    let tree = db.open_tree("hive")?;
    check_schema_key(&tree, &db_path, true)?;
    replay_journal(&tree, data_dir, false)?;
    pg::prepare(settings)?;
    let sources: Vec<(&'static [u8], &'static str)> = pg::TABLES.to_vec();
    pg::import(settings, &sources, |prefix, take| {
        for item in tree.scan_prefix(prefix) {
            let (k, v) = item?;
            take(&k[prefix.len()..], &v)?;
        }
        Ok(())
    })
}

/// How long to wait for sled's own file lock once we hold `LOCK`. Holding `LOCK` proves no
/// other queen uses the dir, so a busy sled lock can only be a handle of this process that
/// is still being released: sled drops its last file handle on a background thread a
/// moment after the database is closed (seen when a queen is reopened in-process).
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_sled(db_path: &Path, cache_capacity: u64) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        // No periodic flush of sled's own: the checkpoint thread flushes it (every
        // `journal::CHECKPOINT_EVERY`), and durability comes from the journal.
        let result = sled::Config::new()
            .path(db_path)
            .cache_capacity(cache_capacity)
            .flush_every_ms(None)
            .open();
        match result {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Takes an exclusive `flock` on `<data_dir>/LOCK` and writes our pid into it, so a second
/// queen on the same data dir fails at once with a clear message. The lock dies with the
/// process, so a `kill -9` never leaves a stale lock behind.
fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::WouldBlock {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                String::new()
            } else {
                format!(" by pid {holder}")
            };
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                holder,
            });
        }
        return Err(io(err));
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// A `kill -9` while sled writes its startup snapshot leaves `snap.*.generating`, which
/// makes the next open fail with `Corruption` although the log is intact. The file is an
/// incomplete, never-used snapshot: removing it loses nothing.
fn remove_unfinished_snapshots(db_path: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(db_path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                path: db_path.to_path_buf(),
                source,
            })
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing unfinished sled snapshot left by an interrupted start");
            std::fs::remove_file(entry.path()).map_err(|source| StoreError::Io {
                path: entry.path(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Written (outside sled) once a new database has its schema key: from then on, a
/// database that opens without one has lost its contents (a damaged log that sled reads
/// as empty) and must be refused, never re-initialised over what may still be recovered.
const MARKER: &str = "hive-store";

fn check_schema(tree: &sled::Tree, db_path: &Path, marker: &Path) -> Result<(), StoreError> {
    let marked = marker.exists();
    let result = check_schema_key(tree, db_path, marked);
    if result.is_ok() && !marked {
        let io = |source| StoreError::Io {
            path: marker.to_path_buf(),
            source,
        };
        std::fs::write(marker, format!("schema {SCHEMA_VERSION}\n")).map_err(io)?;
        // The marker must be durable before anything is acknowledged.
        File::open(marker).and_then(|f| f.sync_all()).map_err(io)?;
    }
    result
}

fn check_schema_key(tree: &sled::Tree, db_path: &Path, marked: bool) -> Result<(), StoreError> {
    match tree.get(SCHEMA_KEY)? {
        None if marked => Err(StoreError::Corrupt {
            path: db_path.to_path_buf(),
            detail: "the database was initialised but now reads as empty (a damaged log?); \
                     refusing to start over it: restore data_dir from a backup"
                .into(),
        }),
        None => {
            // A database without a schema key must be empty: we write it first thing.
            if tree.first()?.is_some() {
                return Err(StoreError::Corrupt {
                    path: db_path.to_path_buf(),
                    detail: "records present but no schema version".into(),
                });
            }
            tree.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            tree.flush()?;
            Ok(())
        }
        Some(raw) => {
            let bytes: [u8; 4] = raw.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                path: db_path.to_path_buf(),
                detail: "schema version is not 4 bytes".into(),
            })?;
            let found = u32::from_be_bytes(bytes);
            if found > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    path: db_path.to_path_buf(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            if found < SCHEMA_VERSION {
                // 1 → 2: task records are written in the compact v2 form from now on;
                // v1 records are read as they are and rewritten as v2 when they next
                // change. 2 → 3: a task with lost-lease evidence is written as a v3
                // record (v2 plus `suspicion`); nothing existing is rewritten. 3 → 4:
                // groups of several keys go through the group journal (`journal`) instead
                // of sled batches; nothing is rewritten. 4 → 5: every group commit is a
                // journal record, acknowledged once the journal is synced, and sled is
                // flushed at checkpoints (`m/ckpt`; `replay_journal` upgrades the
                // markers). Marking the database keeps an older queen, which cannot read
                // v3 or would not replay the journal after a crash, from opening it.
                tracing::info!(
                    from = found,
                    to = SCHEMA_VERSION,
                    "upgrading the storage schema (see migrations-notes/)"
                );
                tree.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                tree.flush()?;
            }
            Ok(())
        }
    }
}

/// Makes sled whole and current from the journal before anything reads it (see
/// [`journal`]): every record after the recovered `m/ckpt` is applied again, in order;
/// then `m/ckpt` names the last one, sled is flushed (and with `sync` the file system
/// synced), so that [`journal::Journal::start`] may delete the journal. A database
/// without `m/ckpt` (new, or written by schema 4) is upgraded first. Returns the last
/// group's number, after which new groups are numbered.
fn replay_journal(tree: &sled::Tree, data_dir: &Path, sync: bool) -> Result<u64, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: data_dir.join("db"),
        detail,
    };
    let journal_err = |e| journal_error(data_dir, e);
    let Some(checkpointed) = group_number(tree, CKPT_KEY, data_dir)? else {
        // Schema 4 (or a new database): complete its interrupted group, if any. Its
        // journal held only groups of several keys, and a record past `m/group` was never
        // applied (a single-key write before it may be missing from sled): none may be
        // replayed by this schema's rule, so the journal goes before `m/ckpt` is set.
        let last = finish_interrupted_group(tree, data_dir, sync)?;
        journal::clear(data_dir).map_err(journal_err)?;
        tree.insert(CKPT_KEY, &last.to_be_bytes())?;
        tree.remove(GROUP_KEY)?;
        flush_tree(tree, data_dir, sync)?;
        return Ok(last);
    };
    let groups = journal::read(data_dir, checkpointed).map_err(journal_err)?;
    let last = groups.last().map_or(checkpointed, |g| g.0);
    let (count, mut writes) = (groups.len(), 0);
    for (_, group) in groups {
        writes += group.len();
        for (k, v) in group {
            write_key(tree, &k, v.as_deref())?;
        }
    }
    if count > 0 {
        tracing::info!(
            groups = count,
            writes,
            after = checkpointed,
            "replayed the journal's groups after the last checkpoint"
        );
    }
    if let Some(begun) = group_number(tree, SEQ_KEY, data_dir)? {
        if begun > last {
            return Err(corrupt(format!(
                "sled holds writes of journal group {begun}, but the journal ends at group \
                 {last}: part of a group may be applied without its record (the journal was \
                 not synced before an OS crash or power loss; `[storage] sync = true` \
                 prevents this); restore data_dir from a backup"
            )));
        }
    }
    tree.insert(CKPT_KEY, &last.to_be_bytes())?;
    flush_tree(tree, data_dir, sync)?;
    Ok(last)
}

/// `m/ckpt` or `m/seq`: a journal group's number (u64 big-endian), if set.
fn group_number(tree: &sled::Tree, k: &[u8], data_dir: &Path) -> Result<Option<u64>, StoreError> {
    let Some(raw) = tree.get(k)? else {
        return Ok(None);
    };
    let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| StoreError::Corrupt {
        path: data_dir.join("db"),
        detail: format!(
            "{} is not a group number: {:?}",
            String::from_utf8_lossy(k),
            raw.as_ref()
        ),
    })?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

/// A journal that cannot be read, or reads as corrupt (a missing group).
fn journal_error(data_dir: &Path, source: std::io::Error) -> StoreError {
    let path = data_dir.join(journal::DIR);
    if source.kind() == std::io::ErrorKind::InvalidData {
        StoreError::Corrupt {
            path,
            detail: source.to_string(),
        }
    } else {
        StoreError::Io { path, source }
    }
}

/// Flushes sled, and with `sync` the file system it lives on (sled's flush issues
/// `sync_file_range`, which survives a killed process but not power loss).
fn flush_tree(tree: &sled::Tree, data_dir: &Path, sync: bool) -> Result<(), StoreError> {
    tree.flush()?;
    if sync {
        let db = data_dir.join("db").join("db");
        let io = |source| StoreError::Io {
            path: db.clone(),
            source,
        };
        let file = File::open(&db).map_err(io)?;
        syncfs(&file).map_err(io)?;
    }
    Ok(())
}

/// `syncfs` of the file system holding `file`.
fn syncfs(file: &File) -> std::io::Result<()> {
    // SAFETY: syncfs on a descriptor we own; it takes no pointers.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Schema 4: completes the group commit a crash interrupted. Under schema 4 a group of
/// several keys was its journal record, `m/group` = (N, begun), plain writes, `m/group` =
/// (N, done), and a group of one key a plain write with no record; if `m/group` says a
/// group was begun and not done, its record is applied again and the group marked done.
/// Then sled is flushed (and, with `sync`, the file system synced). Returns the last
/// group's number.
fn finish_interrupted_group(
    tree: &sled::Tree,
    data_dir: &Path,
    sync: bool,
) -> Result<u64, StoreError> {
    let marker = group_marker(tree, data_dir)?;
    if let Some(Marker::Begun(seq)) = marker {
        let group = journal::read(data_dir, seq.saturating_sub(1))
            .map_err(|e| journal_error(data_dir, e))?
            .into_iter()
            .find(|(s, _)| *s == seq)
            .ok_or_else(|| StoreError::Corrupt {
                path: data_dir.join(journal::DIR),
                detail: format!(
                    "group commit {seq} was begun but the group journal has no record of it"
                ),
            })?;
        let writes = group.1.len();
        for (k, v) in group.1 {
            write_key(tree, &k, v.as_deref())?;
        }
        tree.insert(GROUP_KEY, &Marker::Done(seq).encode())?;
        tracing::warn!(
            group = seq,
            writes,
            "completed a group commit a crash interrupted (it had not been acknowledged)"
        );
    }
    flush_tree(tree, data_dir, sync)?;
    Ok(marker.map_or(0, |m| m.seq()))
}

/// `m/group`: the last group commit of several keys, begun (its writes may be partly in
/// sled) or done (all of them are). Written before and after the group's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Begun(u64),
    Done(u64),
}

impl Marker {
    fn seq(self) -> u64 {
        match self {
            Marker::Begun(s) | Marker::Done(s) => s,
        }
    }

    /// The group's number (u64 big-endian), then 0 (begun) or 1 (done).
    fn encode(self) -> [u8; 9] {
        let mut out = [0u8; 9];
        out[..8].copy_from_slice(&self.seq().to_be_bytes());
        out[8] = u8::from(matches!(self, Marker::Done(_)));
        out
    }
}

/// `m/group`, if a group of several keys was ever written.
fn group_marker(tree: &sled::Tree, data_dir: &Path) -> Result<Option<Marker>, StoreError> {
    let Some(raw) = tree.get(GROUP_KEY)? else {
        return Ok(None);
    };
    let corrupt = || StoreError::Corrupt {
        path: data_dir.join("db"),
        detail: format!("m/group is not a group marker: {:?}", raw.as_ref()),
    };
    let bytes: [u8; 9] = raw.as_ref().try_into().map_err(|_| corrupt())?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[..8]);
    let seq = u64::from_be_bytes(seq);
    match bytes[8] {
        0 => Ok(Some(Marker::Begun(seq))),
        1 => Ok(Some(Marker::Done(seq))),
        _ => Err(corrupt()),
    }
}

fn recover(tree: &sled::Tree, db_path: &Path) -> Result<Recovered, StoreError> {
    let scan = |prefix: &[u8]| -> Result<Rows, StoreError> {
        let mut rows = Vec::new();
        for item in tree.scan_prefix(prefix) {
            let (k, v) = item?;
            rows.push((k.to_vec(), v.to_vec()));
        }
        Ok(rows)
    };
    recover_from(
        ActiveScan {
            source: ScanSource::Sled(tree.clone()),
            db_path: db_path.to_path_buf(),
        },
        scan,
    )
}

/// What the scheduler rebuilds besides the active tasks (queues, schedules, counters),
/// from `scan`, which lists every key (with its prefix) under a prefix, in key order.
fn recover_from(
    active: ActiveScan,
    scan: impl Fn(&[u8]) -> Result<Rows, StoreError>,
) -> Result<Recovered, StoreError> {
    let db_path = active.db_path.clone();
    let corrupt = |detail: String| StoreError::Corrupt {
        path: db_path.clone(),
        detail,
    };
    let mut out = Recovered {
        active,
        queues: Vec::new(),
        schedules: Vec::new(),
        finished_counts: Vec::new(),
    };
    for (key, value) in scan(SCHEDULES)? {
        let schedule = record::decode_schedule(&value).map_err(|e| {
            corrupt(format!(
                "schedule {}: {e}",
                String::from_utf8_lossy(&key[SCHEDULES.len()..])
            ))
        })?;
        out.schedules.push(schedule);
    }
    for (key, value) in scan(QUEUES)? {
        let name = String::from_utf8_lossy(&key[QUEUES.len()..]).into_owned();
        let settings =
            record::decode_queue(&value).map_err(|e| corrupt(format!("queue {name}: {e}")))?;
        out.queues.push((name, settings));
    }
    for (key, value) in scan(COUNTS)? {
        let rest = &key[COUNTS.len()..];
        let parsed = rest.iter().position(|b| *b == 0).and_then(|nul| {
            let queue = std::str::from_utf8(&rest[..nul]).ok()?;
            let state = std::str::from_utf8(&rest[nul + 1..])
                .ok()?
                .parse::<TaskState>()
                .ok()?;
            let count = u64::from_be_bytes(value.as_slice().try_into().ok()?);
            Some(((queue.to_string(), state), count))
        });
        out.finished_counts
            .push(parsed.ok_or_else(|| corrupt("bad counter entry".into()))?);
    }
    Ok(out)
}

/// The active task records, left by [`Store::open`] for the caller to stream into the
/// scheduler: a million tasks are never all decoded and held at once.
#[derive(Debug)]
pub struct ActiveScan {
    source: ScanSource,
    /// Where the records are, for error messages.
    db_path: PathBuf,
}

#[derive(Debug)]
enum ScanSource {
    Sled(sled::Tree),
    Postgres(Box<pg::Settings>),
}

impl ActiveScan {
    /// Calls `take` with every active task, in key (id) order, a chunk at a time; returns
    /// how many there were. Reading is one cursor and decoding (JSON, timestamps) is as
    /// much work again, so the cursor hands chunks to decoder threads as it goes: decoding
    /// overlaps reading and uses every core, and `take` runs on this thread meanwhile.
    /// Only a few chunks are in flight at once. `take` returning false stops the read.
    ///
    /// The first `whole_first` tasks (rounded up to a chunk) are decoded whole; waiting
    /// tasks after them only as far as the scheduler's index needs
    /// ([`record::decode_index`]), since the scheduler will not hold them whole anyway.
    pub fn for_each_chunk(
        self,
        whole_first: usize,
        mut take: impl FnMut(Vec<record::Recovered>) -> bool,
    ) -> Result<usize, StoreError> {
        let db_path = &self.db_path;
        let corrupt = |detail: String| StoreError::Corrupt {
            path: db_path.clone(),
            detail,
        };
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let decode_chunk = |index: usize, chunk: Vec<(sled::IVec, sled::IVec)>| -> Decoded {
            let whole = index.saturating_mul(RECOVERY_CHUNK) < whole_first;
            chunk
                .iter()
                .map(|(key, value)| {
                    let decoded = if whole {
                        record::decode(value).map(record::Recovered::Whole)
                    } else {
                        record::decode_index(value)
                    };
                    decoded.map_err(|e| {
                        corrupt(format!(
                            "active task key {:?}: {e}",
                            String::from_utf8_lossy(key)
                        ))
                    })
                })
                .collect()
        };
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(usize, Raw)>(workers);
        let work_rx = std::sync::Mutex::new(work_rx);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<(usize, Decoded)>(workers);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (work_rx, done_tx) = (&work_rx, done_tx.clone());
                scope.spawn(move || loop {
                    let next = match work_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((index, chunk)) = next else { return };
                    if done_tx.send((index, decode_chunk(index, chunk))).is_err() {
                        return;
                    }
                });
            }
            // The cursor: a read error travels in order like a chunk of decoded records.
            let cursor_done = done_tx;
            let stop = &stop;
            let source = &self.source;
            scope.spawn(move || {
                let mut index = 0;
                let mut send = |chunk: Raw| -> bool {
                    if stop.load(Ordering::Relaxed) || work_tx.send((index, chunk)).is_err() {
                        return false;
                    }
                    index += 1;
                    true
                };
                let read = match source {
                    ScanSource::Sled(tree) => scan_sled(tree, &mut send),
                    ScanSource::Postgres(settings) => {
                        pg::scan_active(settings, RECOVERY_CHUNK, &mut send)
                    }
                };
                if let Err(e) = read {
                    let _ = cursor_done.send((index, Err(e)));
                }
            });
            // Chunks come back in any order; hand them on in key order.
            // After a failure the rest is drained unread, so no thread blocks on a send.
            let mut waiting = std::collections::BTreeMap::new();
            let mut next = 0;
            let mut total = 0;
            let mut failed = None;
            // Owned here, so a panic in `take` drops it and no sender blocks forever.
            let done_rx = done_rx;
            for (index, decoded) in done_rx.iter() {
                if failed.is_some() {
                    continue;
                }
                waiting.insert(index, decoded);
                while let Some(decoded) = waiting.remove(&next) {
                    match decoded {
                        Ok(tasks) => {
                            total += tasks.len();
                            if !take(tasks) {
                                stop.store(true, Ordering::Relaxed);
                                failed = Some(StoreError::Interrupted);
                                break;
                            }
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            failed = Some(e);
                            break;
                        }
                    }
                    next += 1;
                }
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })
    }

    /// Every active task at once (tests and tools; the queen streams them).
    pub fn collect(self) -> Result<Vec<Task>, StoreError> {
        let mut all = Vec::new();
        // Every chunk is decoded whole when `whole_first` is unbounded: no index entries.
        self.for_each_chunk(usize::MAX, |chunk| {
            all.extend(chunk.into_iter().filter_map(|r| match r {
                record::Recovered::Whole(task) => Some(task),
                record::Recovered::Index(_) => None,
            }));
            true
        })?;
        Ok(all)
    }
}

/// Keys (with their prefix) and values, in key order.
pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// A chunk of raw active records (key, value) on its way to a decoder thread.
pub(crate) type Raw = Vec<(sled::IVec, sled::IVec)>;

/// Reads sled's active records in key order, a chunk at a time; `send` returning false
/// stops the read. Straight from the tree, not through [`SledRead`]: it runs at start,
/// after the journal's replay, and the core writes nothing (it defers requests and holds
/// its timers) until the scan is done, so nothing is pending for these keys.
fn scan_sled(tree: &sled::Tree, send: &mut dyn FnMut(Raw) -> bool) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(RECOVERY_CHUNK);
    for item in tree.scan_prefix(ACTIVE) {
        chunk.push(item?);
        if chunk.len() == RECOVERY_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(RECOVERY_CHUNK));
            if !send(full) {
                return Ok(());
            }
        }
    }
    if !chunk.is_empty() {
        send(chunk);
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`
/// (`statvfs`: available blocks times the fragment size).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes only into the struct we pass; it is plain old data, so an
    // all-zero value is a valid starting point.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a statvfs of the right size.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The fields' types differ across targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest);
    k
}

fn retention_key(finished_ms: i64, id: TaskId) -> Vec<u8> {
    let mut k = key(RETENTION, &(finished_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&id.to_bytes());
    k
}

fn count_key(queue: &str, state: TaskState) -> Vec<u8> {
    let mut k = key(COUNTS, queue.as_bytes());
    k.push(0);
    k.extend_from_slice(state.as_str().as_bytes());
    k
}

impl StoreReader {
    /// The sled tree under a sled store (tests poke at raw records).
    #[cfg(test)]
    pub(crate) fn tree(&self) -> &sled::Tree {
        match &self.engine {
            ReadEngine::Sled(read) => &read.tree,
            ReadEngine::Postgres(_) => panic!("not a sled store"),
        }
    }

    /// A finished task.
    pub fn finished(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.task(key(FINISHED, &id.to_bytes()), "finished")
    }

    /// An active task's stored record (the core holds active tasks; it reads back those it
    /// demoted to save memory).
    pub fn active(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.task(key(ACTIVE, &id.to_bytes()), "active")
    }

    fn get(&self, k: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.engine {
            ReadEngine::Sled(read) => Ok(read.get(&k)?),
            ReadEngine::Postgres(reader) => reader.get(k),
        }
    }

    fn task(&self, k: Vec<u8>, what: &str) -> Result<Option<Task>, StoreError> {
        match self.get(k)? {
            None => Ok(None),
            Some(raw) => record::decode(&raw)
                .map(Some)
                .map_err(|detail| StoreError::Corrupt {
                    path: PathBuf::from(what),
                    detail,
                }),
        }
    }

    /// The task an idempotency key points at, if it is still retained.
    pub fn idempotent(&self, idem_key: &str) -> Result<Option<TaskId>, StoreError> {
        Ok(self.get(key(IDEM, idem_key.as_bytes()))?.and_then(|raw| {
            let bytes: [u8; 16] = raw.as_slice().try_into().ok()?;
            Some(TaskId::from_bytes(bytes))
        }))
    }

    /// Finished tasks, newest first, with ids below `before`, that `keep` accepts; reads at
    /// most `scan_limit` records so a selective filter cannot scan all history.
    pub fn finished_page(
        &self,
        before: Option<TaskId>,
        limit: usize,
        scan_limit: usize,
        keep: impl Fn(&Task) -> bool,
    ) -> Result<Vec<Task>, StoreError> {
        let start = FINISHED.to_vec();
        let end = match before {
            Some(id) => key(FINISHED, &id.to_bytes()),
            None => key(FINISHED, &[0xff; 17]),
        };
        let mut out = Vec::new();
        let mut take = |raw: &[u8]| -> Result<bool, StoreError> {
            let task = record::decode(raw).map_err(|detail| StoreError::Corrupt {
                path: PathBuf::from("finished"),
                detail,
            })?;
            if keep(&task) {
                out.push(task);
            }
            Ok(out.len() < limit)
        };
        match &self.engine {
            ReadEngine::Sled(read) => {
                read.scan(&start, &end, true, scan_limit, |_, raw| take(raw))?;
            }
            ReadEngine::Postgres(reader) => {
                reader.range_rev(start, end, scan_limit, |_, raw| take(raw))?;
            }
        }
        Ok(out)
    }

    /// Up to `limit` finished tasks that finished before `cutoff_ms`, oldest first.
    pub fn expired(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Expired>, StoreError> {
        let end = key(RETENTION, &(cutoff_ms.max(0) as u64).to_be_bytes());
        let rows = match &self.engine {
            ReadEngine::Sled(read) => {
                let mut rows = Vec::new();
                read.scan(RETENTION, &end, false, limit, |k, v| {
                    rows.push((k.to_vec(), v.to_vec()));
                    Ok(true)
                })?;
                rows
            }
            ReadEngine::Postgres(reader) => reader.range(RETENTION.to_vec(), end, limit)?,
        };
        let mut out = Vec::new();
        for (k, v) in rows {
            let rest = &k[RETENTION.len()..];
            let parsed = (rest.len() == 24).then(|| {
                let ms = u64::from_be_bytes(rest[..8].try_into().ok()?);
                let id = TaskId::from_bytes(rest[8..].try_into().ok()?);
                let entry: RetentionEntry = serde_json::from_slice(&v).ok()?;
                Some(Expired {
                    id,
                    finished_ms: ms as i64,
                    entry,
                })
            });
            match parsed.flatten() {
                Some(e) => out.push(e),
                None => tracing::warn!(key = ?k, "skipping malformed retention entry"),
            }
        }
        Ok(out)
    }
}

impl StoreWriter {
    /// Queues a commit. Waits only when the writer is [`WRITE_QUEUE`] commits behind.
    /// Commits become durable in the order they are sent.
    pub async fn send(&self, commit: Commit) {
        if let Err(mpsc::error::SendError(commit)) = self.tx.send(commit).await {
            if let Some(after) = commit.after {
                after(Err(CommitError("the store is shut down".into())));
            }
        }
    }

    /// A writer with no store behind it, for tests of the core: commits sent to it come
    /// out of the returned receiver, and the test says how many are durable.
    #[cfg(test)]
    pub(crate) fn detached() -> (StoreWriter, mpsc::Receiver<Commit>, Arc<AtomicU64>) {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let durable = Arc::new(AtomicU64::new(0));
        (
            StoreWriter {
                tx,
                durable: durable.clone(),
            },
            rx,
            durable,
        )
    }

    /// How many commits are durable so far (commits are numbered from 1 in send order).
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }
}

/// A group of commits written to the journal (and folded into the pending writes), waiting
/// for the journal sync.
struct Applied {
    commits: Vec<Commit>,
    result: Result<(), CommitError>,
    /// Where the journal ended once the group was written.
    end: journal::End,
}

/// Makes written groups durable (the journal synced up to them) and answers their
/// commits, sync after sync ([`Answers`] orders those of one sync). The flusher thread
/// does it under load; the writer itself when nothing else is waiting (see
/// [`Writer::run`]). Shared by the two, never contended: the writer syncs only while the
/// flusher has nothing to do.
struct Syncer {
    /// `[storage] sync`: the writer already synced each record.
    sync: bool,
    durable: Arc<AtomicU64>,
    fatal: CancellationToken,
    metrics: crate::metrics::StoreMetrics,
    /// The first failure: every later group is answered with it.
    failed: Option<CommitError>,
    /// The journal file last synced, and up to where.
    synced: Option<journal::End>,
}

impl Syncer {
    /// Syncs the journal up to the last of `groups` (one sync makes all of them durable)
    /// and answers their commits ([`Answers`]: messages to drones first, each kind in
    /// commit order).
    fn finish(&mut self, groups: Vec<Applied>) {
        let started = std::time::Instant::now();
        let flushed = match &self.failed {
            Some(err) => Err(err.clone()),
            None => self.sync_to(groups.last().map(|g| &g.end)),
        };
        if !self.sync {
            // (With `sync` the writer timed each record's fdatasync.)
            self.metrics
                .flush_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let count: usize = groups.iter().map(|g| g.commits.len()).sum();
        self.metrics.batch_commits.observe(count as f64);
        let mut answers = Answers::default();
        let mut stop = false;
        for group in groups {
            let result = group.result.and(flushed.clone());
            if let Err(err) = &result {
                if self.failed.is_none() {
                    tracing::error!(error = %err, "store write failed; the queen must stop");
                    self.failed = Some(err.clone());
                    stop = true;
                }
            } else {
                self.durable
                    .fetch_add(group.commits.len() as u64, Ordering::AcqRel);
            }
            for commit in group.commits {
                answers.push(commit, &result);
            }
        }
        answers.run(&self.fatal);
        // After the groups before the failure were answered: they are durable, and a
        // queen that has begun to stop may no longer deliver their answers.
        if stop {
            self.fatal.cancel();
        }
    }

    /// Syncs the journal up to `end` (the file the writer appends to: it syncs a full file
    /// itself before starting the next).
    fn sync_to(&mut self, end: Option<&journal::End>) -> Result<(), CommitError> {
        let Some(end) = end else { return Ok(()) };
        if self.sync {
            return Ok(());
        }
        let from = match &self.synced {
            Some(s) if Arc::ptr_eq(&s.file, &end.file) => s.len,
            _ => 0,
        };
        journal::sync_range(&end.file, from, end.len)
            .map_err(|e| CommitError(format!("journal sync: {e}")))?;
        self.synced = Some(end.clone());
        Ok(())
    }
}

/// The continuations of the commits one sync made durable (or failed): those of
/// [`Commit::first`] commits run first, then the rest, each in commit order.
#[derive(Default)]
pub(crate) struct Answers {
    first: Vec<(AfterCommit, Result<(), CommitError>)>,
    rest: Vec<(AfterCommit, Result<(), CommitError>)>,
}

impl Answers {
    pub(crate) fn push(&mut self, commit: Commit, result: &Result<(), CommitError>) {
        if let Some(after) = commit.after {
            let to = if commit.first {
                &mut self.first
            } else {
                &mut self.rest
            };
            to.push((after, result.clone()));
        }
    }

    /// Runs them. A panicking one (a bug) stops the queen, as any store failure does
    /// (what it left undone is unknown), but only once the others ran (their commits are
    /// durable, and a queen that has begun to stop may no longer deliver their answers);
    /// the store's threads go on.
    pub(crate) fn run(self, fatal: &CancellationToken) {
        let mut panicked = false;
        for (after, result) in self.first.into_iter().chain(self.rest) {
            let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| after(result)));
            if answered.is_err() {
                tracing::error!("a commit's continuation panicked; the queen must stop");
                panicked = true;
            }
        }
        if panicked {
            fatal.cancel();
        }
    }
}

/// Locks the [`Syncer`]. Continuations run under it, but a panicking one is caught in
/// [`Syncer::finish`]; should the lock be poisoned anyway, what it guards (the first
/// failure, the end last synced) is whole between any two of its steps.
fn lock_syncer(syncer: &Mutex<Syncer>) -> std::sync::MutexGuard<'_, Syncer> {
    syncer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The second stage of the writer under load: makes the groups the writer hands it durable
/// and answers them, while the writer appends the next.
struct Flusher {
    syncer: Arc<Mutex<Syncer>>,
    /// Groups answered so far (the writer counts those it handed over).
    answered: Arc<AtomicU64>,
    rx: std::sync::mpsc::Receiver<Applied>,
}

impl Flusher {
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            // Everything written so far: one sync makes all of it durable.
            let mut groups = vec![first];
            while let Ok(more) = self.rx.try_recv() {
                groups.push(more);
            }
            let count = groups.len() as u64;
            lock_syncer(&self.syncer).finish(groups);
            self.answered.fetch_add(count, Ordering::Release);
        }
    }
}

/// Writes what is [`pending`] to sled every [`journal::CHECKPOINT_EVERY`] (sooner when
/// much is waiting, and once more when the writer stops) so that journal files can go:
/// `m/seq`, the writes, `m/ckpt` = the last group they hold, a sled flush (and `syncfs`
/// with `[storage] sync`), then the writer is told it may delete files holding nothing
/// later.
struct Checkpointer {
    db: sled::Db,
    read: SledRead,
    sync_file: Option<File>,
    checkpointed: Arc<AtomicU64>,
    fatal: CancellationToken,
    metrics: crate::metrics::StoreMetrics,
}

/// Ends a checkpoint thread however it ends: a panic stops the queen as a failed
/// checkpoint does, and a writer waiting for room is never left waiting.
struct CheckpointerExit<'a> {
    pending: &'a pending::Pending,
    fatal: &'a CancellationToken,
}

impl Drop for CheckpointerExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("store checkpoint thread panicked; the queen must stop");
            self.fatal.cancel();
        }
        self.pending.stop();
    }
}

/// The checkpoint's sled thread, as the checkpoint thread sees it: writes to apply go
/// in, each one's result comes back.
struct SledThread {
    work: std::sync::mpsc::SyncSender<(Arc<KeyWrites>, u64)>,
    done: std::sync::mpsc::Receiver<Result<(), sled::Error>>,
}

impl Checkpointer {
    /// The checkpoint thread, at the queen's usual priority, takes the pending writes and
    /// marks them applied; a thread of its own, `hive-store-sled`, lowered by
    /// [`CHECKPOINT_NICE`], writes them to sled and flushes. The split keeps the
    /// low-priority thread away from the pending writes' lock, which the writer and every
    /// read share: waiting for it, or preempted while holding it, a low-priority thread
    /// would hold them all up (priority inversion).
    fn run(self) {
        let _exit = CheckpointerExit {
            pending: &self.read.pending,
            fatal: &self.fatal,
        };
        let this = &self;
        std::thread::scope(|scope| {
            let (work, work_rx) = std::sync::mpsc::sync_channel::<(Arc<KeyWrites>, u64)>(0);
            let (done_tx, done) = std::sync::mpsc::sync_channel(0);
            let spawned = std::thread::Builder::new()
                .name("hive-store-sled".into())
                .spawn_scoped(scope, move || {
                    lower_priority();
                    while let Ok((writes, last)) = work_rx.recv() {
                        if done_tx.send(this.write_sled(&writes, last)).is_err() {
                            break;
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the store's sled thread; the queen must stop");
                this.fatal.cancel();
                return;
            }
            this.checkpoints(&SledThread { work, done });
            // Dropping the sender ends the sled thread; the scope joins it.
        });
    }

    fn checkpoints(&self, sled: &SledThread) {
        loop {
            let last = self.read.pending.wait(journal::CHECKPOINT_EVERY);
            // After the writer stopped, until everything is in sled.
            loop {
                match self.checkpoint(sled) {
                    Ok(true) if last => continue,
                    Ok(_) => break,
                    Err(e) => {
                        // The journal could then only grow: stop while it is still whole.
                        tracing::error!(error = %e, "store checkpoint failed; the queen must stop");
                        // (`CheckpointerExit` then frees a writer waiting for room; it
                        // writes nothing more.)
                        self.fatal.cancel();
                        return;
                    }
                }
            }
            if last {
                return;
            }
        }
    }

    /// Has the sled thread write what is pending to sled and flush; whether there was
    /// anything.
    fn checkpoint(&self, sled: &SledThread) -> Result<bool, String> {
        let Some((writes, last)) = self.read.pending.take() else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        let gone = || "the store's sled thread stopped".to_string();
        sled.work.send((writes, last)).map_err(|_| gone())?;
        sled.done
            .recv()
            .map_err(|_| gone())?
            .map_err(|e| e.to_string())?;
        self.read.pending.applied();
        self.metrics
            .checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
        self.checkpointed.fetch_max(last, Ordering::AcqRel);
        Ok(true)
    }

    /// Writes a checkpoint's writes to sled (on the sled thread): `m/seq`, the writes,
    /// `m/ckpt`, a flush (and `syncfs` with `[storage] sync`).
    fn write_sled(&self, writes: &KeyWrites, last: u64) -> Result<(), sled::Error> {
        let tree = &self.read.tree;
        // Before the writes (see `SEQ_KEY`): a crash may leave them partly in sled.
        tree.insert(SEQ_KEY, &last.to_be_bytes())?;
        for (i, (k, v)) in writes.iter().enumerate() {
            if i % OPS_PER_RECLAIM == 0 {
                crossbeam_epoch::pin().flush();
            }
            write_key(tree, k, v.as_deref())?;
        }
        // After them in sled's log, so a recovered `m/ckpt` vouches for them.
        tree.insert(CKPT_KEY, &last.to_be_bytes())?;
        self.db.flush()?;
        if let Some(file) = &self.sync_file {
            syncfs(file)?;
        }
        Ok(())
    }
}

/// How much lower than the queen's other threads the checkpoint's sled thread runs (nice
/// levels). Its work (sled's inserts, leaf splits, flushes) is background, like an LSM
/// store's compactions, which RocksDB runs at a lower CPU priority for the same reason:
/// under a burst, acknowledgements, grants and outcomes get the cores first and the
/// checkpoint catches up after. Only that thread is lowered, never one that takes the
/// pending writes' lock (see [`Checkpointer::run`]). It cannot fall behind without
/// bound: past [`pending::MAX_KEYS`] or [`pending::MAX_BYTES`] the writer waits for it,
/// so a long overload runs at the checkpoint's pace with memory bounded.
const CHECKPOINT_NICE: libc::c_int = 10;

/// Lowers the calling thread's CPU priority by [`CHECKPOINT_NICE`] (on Linux the nice
/// value is per thread). Failing to is harmless: the thread then runs at the usual one.
#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: reads and sets the nice value of the calling thread (`who` 0); no memory
    // is passed. A -1 from `getpriority` may be nice -1 or an error: either way the new
    // value is lower than the current priority or refused.
    let rc = unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, current + CHECKPOINT_NICE)
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower the store's sled thread's priority"
        );
    }
}

/// Elsewhere the nice value may be the whole process's: the thread keeps the usual one.
#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

struct Writer {
    db: sled::Db,
    /// The tree and the writes still pending for it.
    read: SledRead,
    rx: mpsc::Receiver<Commit>,
    durable: Arc<AtomicU64>,
    sync_file: Option<File>,
    fatal: CancellationToken,
    metrics: crate::metrics::StoreMetrics,
    journal: journal::Journal,
    /// `[storage] sync`.
    sync: bool,
    /// The last group written (numbered from 1, across restarts).
    seq: u64,
    /// Every group up to this one is durable in sled (set by the checkpointer).
    checkpointed: Arc<AtomicU64>,
    /// How long to poll for the next commit before sleeping.
    idle: crate::idle::Window,
}

impl Writer {
    /// Two stages, so that writing the next group overlaps syncing the last one: this
    /// thread appends each group of waiting commits to the journal and folds it into the
    /// [`pending`] writes; the flusher thread syncs the journal up to there and only then
    /// runs those commits' continuations ([`Answers`]). A third thread takes what is
    /// pending at checkpoints and a fourth, at a lower priority, writes it to sled.
    ///
    /// When no commit waits behind a group and the flusher has answered every group
    /// before it, this thread syncs and answers the group itself: there is nothing to
    /// overlap, and waking the flusher is a hand-off to another CPU, ~30 µs when that CPU
    /// is idle on a VM (`perf sched timehist` of a low-load run: 33 µs from the writer's
    /// wake-up to the flusher running). Commits arriving meanwhile wait for the sync and
    /// the answers (behind the flusher they would wait for its sync too, only their
    /// journal append would not), and form the next group.
    fn run(mut self) {
        let (applied_tx, applied_rx) = std::sync::mpsc::channel::<Applied>();
        let syncer = Arc::new(Mutex::new(Syncer {
            sync: self.sync,
            durable: self.durable.clone(),
            fatal: self.fatal.clone(),
            metrics: self.metrics.clone(),
            failed: None,
            synced: None,
        }));
        let answered = Arc::new(AtomicU64::new(0));
        let flusher = Flusher {
            syncer: syncer.clone(),
            answered: answered.clone(),
            rx: applied_rx,
        };
        let checkpointer = Checkpointer {
            db: self.db.clone(),
            read: self.read.clone(),
            sync_file: self.sync_file.take(),
            checkpointed: self.checkpointed.clone(),
            fatal: self.fatal.clone(),
            metrics: self.metrics.clone(),
        };
        let threads = std::thread::Builder::new()
            .name("hive-store-flush".into())
            .spawn(move || flusher.run())
            .and_then(|flusher| {
                std::thread::Builder::new()
                    .name("hive-store-ckpt".into())
                    .spawn(move || checkpointer.run())
                    .map(|checkpointer| (flusher, checkpointer))
            });
        let (flusher, checkpointer) = match threads {
            Ok(handles) => handles,
            Err(e) => {
                // Without them nothing can become durable: refuse every commit.
                tracing::error!(error = %e, "cannot start the store's threads; the queen must stop");
                self.fatal.cancel();
                while let Some(commit) = self.rx.blocking_recv() {
                    if let Some(after) = commit.after {
                        after(Err(CommitError("the store's threads did not start".into())));
                    }
                }
                return;
            }
        };
        let mut failed: Option<CommitError> = None;
        // Groups handed to the flusher.
        let mut handed: u64 = 0;
        while let Some(mut commits) = next_batch(&mut self.rx, &self.idle) {
            let result = match &failed {
                Some(err) => Err(err.clone()),
                None => self.apply_all(&mut commits),
            };
            if let Err(err) = &result {
                failed.get_or_insert_with(|| err.clone());
            }
            let group = Applied {
                commits,
                result,
                end: self.journal.end(),
            };
            // Answered sync after sync: inline only once the flusher has answered
            // everything handed to it (it is sent nothing more meanwhile). (`is_empty`
            // needs tokio 1.38: 1.37's could say "not empty" of an empty channel, which
            // only sent the group to the flusher.)
            if self.rx.is_empty() && answered.load(Ordering::Acquire) == handed {
                lock_syncer(&syncer).finish(vec![group]);
                continue;
            }
            handed += 1;
            if applied_tx.send(group).is_err() {
                break;
            }
        }
        drop(applied_tx);
        let _ = flusher.join();
        // A last checkpoint, so the next start has nothing to replay.
        self.read.pending.stop();
        let _ = checkpointer.join();
    }

    /// Writes a group of commits: its record to the journal, then its writes to the
    /// pending ones (durable once the flusher has synced the journal).
    fn apply_all(&mut self, commits: &mut [Commit]) -> Result<(), CommitError> {
        // The group's final value per key (a later write to a key replaces an earlier
        // one), in key order.
        let mut writes = KeyWrites::new();
        for commit in commits.iter_mut() {
            for m in commit.mutations.drain(..) {
                self.apply(&mut writes, m)
                    .map_err(|e| CommitError(e.to_string()))?;
            }
        }
        self.write(writes)
    }

    /// Writes a group's final values: the journal record first (see [`journal`]), then
    /// into the [`pending`] writes, which the checkpointer writes to sled as plain inserts
    /// and removes, never through `apply_batch`, whose process-wide lock would wait for
    /// every sled flush in progress.
    fn write(&mut self, writes: KeyWrites) -> Result<(), CommitError> {
        if writes.is_empty() {
            return Ok(());
        }
        if self.fatal.is_cancelled() {
            // The queen is stopping (a sync, a checkpoint or a read failed): nothing more
            // may be written.
            return Err(CommitError(
                "the store failed; the queen is stopping".into(),
            ));
        }
        let seq = self.seq + 1;
        let checkpointed = self.checkpointed.load(Ordering::Acquire);
        let started = std::time::Instant::now();
        self.journal
            .append(seq, &writes, checkpointed)
            .map_err(|e| CommitError(format!("journal: {e}")))?;
        if self.sync {
            // The record's fdatasync happened in the append: this is the group's sync.
            self.metrics
                .flush_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.seq = seq;
        self.read.pending.add(seq, writes);
        Ok(())
    }

    fn apply(&self, writes: &mut KeyWrites, m: Mutation) -> Result<(), sled::Error> {
        let mut failed = None;
        ops(m, |op| match op {
            Op::Put(k, v) => {
                writes.insert(k, Some(v));
            }
            Op::Del(k) => {
                writes.insert(k, None);
            }
            Op::DelIfEq(k, expected) => {
                // The value as of this point in the group (as PostgreSQL's fold sees it);
                // else the stored one (safe to read here: this thread is the only writer).
                let current = match writes.get(&k) {
                    Some(pending) => Ok(pending.clone()),
                    None => self.read.get(&k),
                };
                match current {
                    Ok(Some(v)) if v == expected => {
                        writes.insert(k, None);
                    }
                    Ok(_) => {}
                    Err(e) => failed = Some(e),
                }
            }
        });
        failed.map_or(Ok(()), Err)
    }
}

/// A group commit's writes: each key's final value (`None`: deleted), in key order.
type KeyWrites = std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Sets `k` to its final value in a group: a put, or a removal for `None`.
fn write_key(tree: &sled::Tree, k: &[u8], v: Option<&[u8]>) -> Result<(), sled::Error> {
    match v {
        Some(v) => tree.insert(k, v).map(drop),
        None => tree.remove(k).map(drop),
    }
}

/// Key operations per extra pin of sled's garbage collector when the checkpoint writes
/// to sled. Every insert copies the leaf it changes, and the old copies are freed by
/// `crossbeam-epoch`'s collector, a few bags per later pin. When the store applied groups
/// as sled batches (schema 3), a whole batch ran under one guard and after a burst the
/// garbage outgrew what was freed: sled alone (`hive-sled-alone`, 1M records in
/// 5,000-record batches) held 800–1,050 MiB, 220 MiB with these extra pins. With plain
/// inserts (schema 4 on) each insert pins on its own and sled alone holds ~190 MiB either
/// way (`--plain`), but the pins still pay a little (161,654 → 175,684 records/s). Each
/// pin and flush collects some of the global garbage; with nothing to collect it costs
/// well under a microsecond.
const OPS_PER_RECLAIM: usize = 10;

/// The next group commit, for either engine's writer: waits for one commit (polling for it
/// for up to `idle`'s window first, which adapts to how long the writer waited), then takes
/// every commit already waiting, up to [`MAX_COMMITS_PER_BATCH`]. `None` once the channel
/// is closed and empty.
pub(crate) fn next_batch(
    rx: &mut mpsc::Receiver<Commit>,
    idle: &crate::idle::Window,
) -> Option<Vec<Commit>> {
    use mpsc::error::TryRecvError;
    let first = match rx.try_recv() {
        Ok(commit) => commit,
        Err(TryRecvError::Disconnected) => return None,
        Err(TryRecvError::Empty) => {
            let waiting = std::time::Instant::now();
            let polled = idle.poll(|| match rx.try_recv() {
                Ok(commit) => Some(Some(commit)),
                Err(TryRecvError::Disconnected) => Some(None),
                Err(TryRecvError::Empty) => None,
            });
            let commit = match polled {
                Some(found) => found?,
                None => rx.blocking_recv()?,
            };
            idle.adapt(waiting.elapsed());
            commit
        }
    };
    let mut commits = vec![first];
    while commits.len() < MAX_COMMITS_PER_BATCH {
        match rx.try_recv() {
            Ok(c) => commits.push(c),
            Err(_) => break,
        }
    }
    Some(commits)
}

/// One key-level change a [`Mutation`] makes: the layout in the module docs, written once
/// for both engines (sled applies these to its batch; PostgreSQL to one table per prefix).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
    /// Delete the key only if it still holds this value (as stored before the batch, or
    /// as set earlier in the same batch).
    DelIfEq(Vec<u8>, Vec<u8>),
}

/// The key-level changes of a mutation, in order.
pub(crate) fn ops(m: Mutation, mut emit: impl FnMut(Op)) {
    match m {
        Mutation::SaveActive { id, record } => emit(Op::Put(key(ACTIVE, &id.to_bytes()), record)),
        Mutation::Finish {
            id,
            record,
            finished_ms,
            index,
            count,
        } => {
            emit(Op::Del(key(ACTIVE, &id.to_bytes())));
            emit(Op::Put(key(FINISHED, &id.to_bytes()), record));
            let entry = serde_json::to_vec(&index).unwrap_or_default();
            emit(Op::Put(retention_key(finished_ms, id), entry));
            emit(Op::Put(
                count_key(&index.queue, index.state),
                count.to_be_bytes().to_vec(),
            ));
        }
        Mutation::SaveSchedule { name, record } => {
            emit(Op::Put(key(SCHEDULES, name.as_bytes()), record))
        }
        Mutation::DeleteSchedule { name } => emit(Op::Del(key(SCHEDULES, name.as_bytes()))),
        Mutation::SaveQueue { name, record } => emit(Op::Put(key(QUEUES, name.as_bytes()), record)),
        Mutation::Revive {
            id,
            record,
            finished_ms,
            queue,
            state,
            count,
        } => {
            emit(Op::Del(key(FINISHED, &id.to_bytes())));
            emit(Op::Del(retention_key(finished_ms, id)));
            emit(Op::Put(
                count_key(&queue, state),
                count.to_be_bytes().to_vec(),
            ));
            emit(Op::Put(key(ACTIVE, &id.to_bytes()), record));
        }
        Mutation::Idempotency { key: k, id } => {
            emit(Op::Put(key(IDEM, k.as_bytes()), id.to_bytes().to_vec()))
        }
        Mutation::Purge { expired, count } => {
            emit(Op::Del(key(FINISHED, &expired.id.to_bytes())));
            emit(Op::Del(retention_key(expired.finished_ms, expired.id)));
            emit(Op::Put(
                count_key(&expired.entry.queue, expired.entry.state),
                count.to_be_bytes().to_vec(),
            ));
            if let Some(k) = &expired.entry.idempotency_key {
                // Only drop the key if it still names this task.
                emit(Op::DelIfEq(
                    key(IDEM, k.as_bytes()),
                    expired.id.to_bytes().to_vec(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests;
