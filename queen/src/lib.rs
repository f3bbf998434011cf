//! The queen: records every task in sled, leases tasks to drones, renews leases on
//! heartbeats, requeues the work of drones that die or go silent, and resumes all pending
//! and running work after a restart.
//!
//! `main.rs` only parses the command line, loads config, starts tracing and binds; this
//! library does the rest, so tests drive a whole queen in-process on `127.0.0.1:0`.

pub mod active;
pub mod batch;
pub mod cli;
pub mod config;
pub mod core;
pub mod ha;
pub mod http;
pub mod idle;
pub mod metrics;
pub mod net;
pub mod queues;
pub mod ready;
pub mod rules;
pub mod schedule;
pub mod server;
pub mod store;
pub mod task;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::core::{Core, CoreHandle, Request};
use crate::store::{OpenOptionsHive, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum QueenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a store write failed; stopped so that nothing unrecorded is acknowledged")]
    StoreFailed,
    #[error(transparent)]
    Tls(#[from] hive_tls::TlsError),
}

/// The listeners a queen serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub drones: TcpListener,
    pub http: TcpListener,
}

/// A queen with its database open and its state recovered, ready to serve.
pub struct Queen {
    cfg: Arc<Config>,
    store: Store,
    core: Core,
    handle: CoreHandle,
    requests: tokio::sync::mpsc::Receiver<Request>,
    fatal: CancellationToken,
    metrics: metrics::Metrics,
    tls: net::Tls,
}

impl std::fmt::Debug for Queen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queen")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl Queen {
    /// Opens the data dir (refusing one that is locked, corrupt or too new) and reads what
    /// the scheduler needs besides the active tasks, which [`Queen::serve`] streams in while
    /// it already answers (see [`core::Core::run`]).
    pub fn open(cfg: Config) -> Result<Queen, QueenError> {
        if cfg.storage.backend == config::Backend::Postgres {
            return Err(QueenError::Store(StoreError::Postgres(
                "storage.backend = \"postgres\" runs through ha::serve (a leader and standbys), not Queen::open".into(),
            )));
        }
        let fatal = CancellationToken::new();
        // Certificates first: a bad file must stop the queen before it touches the data.
        let tls = net::Tls::from_config(&cfg)?;
        for warning in cfg.warnings() {
            tracing::warn!("{warning}");
        }
        let metrics = metrics::Metrics::new();
        let opts = OpenOptionsHive {
            data_dir: cfg.queen.data_dir.clone(),
            cache_capacity_bytes: cfg.storage.cache_capacity_mb * 1024 * 1024,
            sync: cfg.storage.sync,
            metrics: metrics.store.clone(),
            idle_poll: std::time::Duration::from_micros(cfg.queen.idle_poll_us),
        };
        let started = std::time::Instant::now();
        let opened = Store::open(&opts, fatal.clone())?;
        Ok(Queen::build(
            cfg, opened, started, fatal, metrics, tls, None,
        ))
    }

    /// A leader's term on PostgreSQL: the store is opened with `epoch`, which fences every
    /// commit, and welcomes carry it. `metrics` outlive the term (one registry per process).
    pub fn open_term(
        cfg: Config,
        settings: &store::pg::Settings,
        epoch: i64,
        trust: store::pg::Trust,
        metrics: metrics::Metrics,
    ) -> Result<Queen, QueenError> {
        let fatal = CancellationToken::new();
        let tls = net::Tls::from_config(&cfg)?;
        let started = std::time::Instant::now();
        let opened = Store::open_postgres(
            settings,
            epoch,
            Some(trust),
            metrics.store.clone(),
            fatal.clone(),
        )?;
        Ok(Queen::build(
            cfg,
            opened,
            started,
            fatal,
            metrics,
            tls,
            Some(epoch.max(0) as u64),
        ))
    }

    fn build(
        cfg: Config,
        (store, writer, recovered): (Store, store::StoreWriter, store::Recovered),
        started: std::time::Instant,
        fatal: CancellationToken,
        metrics: metrics::Metrics,
        tls: net::Tls,
        epoch: Option<u64>,
    ) -> Queen {
        let read = started.elapsed();
        let cfg = Arc::new(cfg);
        let (mut core, handle, requests) = Core::new(
            cfg.clone(),
            writer,
            Arc::new(store.core_reader.clone()),
            recovered,
            metrics.clone(),
            fatal.clone(),
        );
        if let Some(epoch) = epoch {
            core.set_epoch(epoch);
        }
        tracing::info!(
            open_ms = read.as_millis() as u64,
            "store opened; active tasks are read while the queen serves"
        );
        Queen {
            cfg,
            store,
            core,
            handle,
            requests,
            fatal,
            metrics,
            tls,
        }
    }

    /// A handle to the scheduler core, for in-process clients (the `dev` command, tests).
    pub fn handle(&self) -> CoreHandle {
        self.handle.clone()
    }

    /// Read access to stored (finished) tasks, for in-process clients.
    pub fn reader(&self) -> store::StoreReader {
        self.store.reader.clone()
    }

    /// Serves drones and the API until `shutdown` is cancelled (or a store write fails),
    /// then stops every component and makes every queued write durable.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(), QueenError> {
        let Queen {
            cfg,
            store,
            core,
            handle,
            requests,
            fatal,
            metrics,
            tls,
        } = self;
        let stop = shutdown.child_token();
        let tracker = TaskTracker::new();

        let core_task = tokio::spawn(core.run(requests, stop.clone()));
        let on_sled = cfg.storage.backend == config::Backend::Sled;
        if on_sled {
            tracker.spawn(sample_free_space(
                cfg.queen.data_dir.clone(),
                handle.disk().clone(),
                stop.clone(),
            ));
        }
        tracker.spawn(server::serve(
            listeners.drones,
            server::Target::Core(handle.clone()),
            server::Limits::from_config(&cfg),
            server::Admission::from_config(&cfg),
            tls.drones.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        let app = http::router(http::AppState::new(http::Shared {
            core: handle.clone(),
            reader: store.reader.clone(),
            cfg: cfg.clone(),
            metrics,
        }));
        let http_task = tokio::spawn(net::serve_http(
            listeners.http,
            app,
            cfg.clone(),
            tls.http.clone(),
            stop.clone(),
        ));
        drop(handle);

        tokio::select! {
            _ = stop.cancelled() => {}
            _ = fatal.cancelled() => {}
        }
        stop.cancel();
        tracing::info!("queen stopping");
        let _ = http_task.await;
        let recovery = core_task.await;
        tracker.close();
        tracker.wait().await;
        // The core, the only writer, has stopped: the writer thread drains and exits.
        let Store {
            reader,
            core_reader,
            writer_thread,
            ..
        } = store;
        drop((reader, core_reader));
        let joined = tokio::task::spawn_blocking(move || writer_thread.join());
        if on_sled {
            let _ = joined.await;
        } else if tokio::time::timeout(PG_WRITER_DRAIN, joined).await.is_err() {
            // A commit stuck on a dead connection is never cancelled, and nothing waits
            // for it any longer: its outcome is unknown, nothing of it was acknowledged,
            // and the next term reloads whatever it did.
            tracing::warn!("the postgres writer did not drain in time; leaving it");
        }
        if let Ok(Err(e)) = recovery {
            return Err(QueenError::Store(e));
        }
        if fatal.is_cancelled() {
            return Err(QueenError::StoreFailed);
        }
        tracing::info!("queen stopped");
        Ok(())
    }
}

/// How long a PostgreSQL term's end waits for its queued commits.
const PG_WRITER_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the data dir's free space is sampled for `[storage] min_free_mb`: often
/// enough that a burst of writes is caught within a second, rarely enough to cost nothing.
const FREE_SPACE_SAMPLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Samples the data dir's free space until `stop`, for the core's disk guard.
async fn sample_free_space(
    data_dir: std::path::PathBuf,
    disk: Arc<core::DiskState>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(FREE_SPACE_SAMPLE);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || store::free_bytes(&dir)).await {
            Ok(Ok(free)) => disk.set_free_bytes(free),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the data dir's free space"),
            Err(_) => return,
        }
    }
}
