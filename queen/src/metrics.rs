//! Prometheus metrics (`GET /metrics`), with the `prometheus` crate: one registry per queen
//! (tests run several queens in one process), conventional names (`_total` counters, base
//! units in seconds), and a label only where its values are bounded by the operator
//! (`queue`; never a task id).
//!
//! Counters move where the event happens (the core, the store writer); gauges of state
//! (tasks by queue and state, drones connected) are set from the core's own counts at
//! scrape time, so they can never drift from what `/v1/stats` says.

use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use shared::api::{DroneView, Stats};

/// Seconds buckets from 100 µs to 5 min: dispatch is sub-millisecond when drones are free
/// and minutes when they are not; runs span the same range.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Flushes take from tens of microseconds (page cache) to tens of milliseconds (fsync).
const FLUSH_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Commits per group commit: 1 when idle, thousands under load (capped by the writer).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Every metric the queen exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub submitted: IntCounterVec,
    pub succeeded: IntCounterVec,
    pub failed: IntCounterVec,
    pub retried: IntCounterVec,
    pub requeued: IntCounterVec,
    /// Tasks that became suspects of killing their drones (they then run alone).
    pub suspected: IntCounterVec,
    /// Suspects convicted by an isolated attempt that lost its drone.
    pub quarantined: IntCounterVec,
    pub cancelled: IntCounterVec,
    pub lease_expirations: IntCounter,
    pub stale_completions: IntCounter,
    /// Times the queen noticed it had stalled (see `core::Core::notice_stall`).
    pub stalls: IntCounter,
    /// Time spent idle polling (`crate::idle`), by thread: `runtime` (the poller beside
    /// the core) and `writer` (the sled store's writer, also in `store`).
    pub idle_poll_seconds: CounterVec,
    pub dispatch_latency: Histogram,
    pub run_duration: HistogramVec,
    tasks: IntGaugeVec,
    drones_connected: IntGauge,
    unroutable: IntGauge,
    /// Worker pools of connected drones (docs/POOLS.md), by drone and pool.
    pool_processes: IntGaugeVec,
    pool_ready: IntGaugeVec,
    pool_busy: IntGaugeVec,
    pool_restarts: IntGaugeVec,
    pool_failing: IntGaugeVec,
    /// Free bytes on the data dir's filesystem, as last sampled.
    pub store_free_bytes: IntGauge,
    /// 1 while the queen refuses new work for want of disk space (`[storage] min_free_mb`).
    pub store_degraded: IntGauge,
    pub store: StoreMetrics,
}

/// The store writer's share: how it batches, how long making a group durable takes, and
/// how long its checkpoints take.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    pub batch_commits: Histogram,
    pub flush_seconds: Histogram,
    pub checkpoint_seconds: Histogram,
    /// The writer's share of `hive_idle_poll_seconds_total`.
    pub idle_poll_seconds: Counter,
}

impl Default for StoreMetrics {
    /// Unregistered histograms, for a store opened outside a queen (tests, tools).
    fn default() -> Self {
        StoreMetrics {
            batch_commits: store_batch_histogram(),
            flush_seconds: store_flush_histogram(),
            checkpoint_seconds: store_checkpoint_histogram(),
            idle_poll_seconds: idle_poll_counter().with_label_values(&["writer"]),
        }
    }
}

fn idle_poll_counter() -> CounterVec {
    CounterVec::new(
        Opts::new(
            "hive_idle_poll_seconds_total",
            "Time spent polling for more work before sleeping ([queen] idle_poll_us), by thread: runtime or writer. CPU time, though it yields to any other thread.",
        ),
        &["thread"],
    )
    .expect("static counter options are valid")
}

fn store_batch_histogram() -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(
            "hive_store_group_commit_size",
            "Commits written and flushed together in one group commit.",
        )
        .buckets(BATCH_BUCKETS.to_vec()),
    )
    .expect("static histogram options are valid")
}

fn store_flush_histogram() -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(
            "hive_store_flush_duration_seconds",
            "Time to make one group commit durable: the journal's sync_file_range, or its fdatasync under [storage] sync.",
        )
        .buckets(FLUSH_BUCKETS.to_vec()),
    )
    .expect("static histogram options are valid")
}

/// A checkpoint writes up to 16 MiB to sled and flushes it: milliseconds to seconds.
const CHECKPOINT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn store_checkpoint_histogram() -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(
            "hive_store_checkpoint_duration_seconds",
            "Time of a checkpoint: writing the pending writes to sled and flushing it (with syncfs under [storage] sync), after which journal files can go.",
        )
        .buckets(CHECKPOINT_BUCKETS.to_vec()),
    )
    .expect("static histogram options are valid")
}

fn counter_by_queue(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &["queue"]).expect("static counter options are valid")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let idle_poll = idle_poll_counter();
        let writer_poll = idle_poll.with_label_values(&["writer"]);
        let m = Metrics {
            registry: Registry::new(),
            submitted: counter_by_queue("hive_tasks_submitted_total", "Tasks accepted."),
            succeeded: counter_by_queue("hive_tasks_succeeded_total", "Tasks that succeeded."),
            failed: counter_by_queue(
                "hive_tasks_failed_total",
                "Tasks that failed for good (attempts used up, permanent error, quarantine).",
            ),
            retried: counter_by_queue(
                "hive_tasks_retried_total",
                "Failed attempts scheduled to run again after backoff, and operator retries.",
            ),
            requeued: counter_by_queue(
                "hive_tasks_requeued_total",
                "Tasks put back to pending because their lease was lost (drone died, went silent or did not come back).",
            ),
            suspected: counter_by_queue(
                "hive_tasks_suspected_total",
                "Tasks that lost their lease often enough (tasks.suspect_after_lost) to be suspected of killing their drones; they run alone on a drone from then on.",
            ),
            quarantined: counter_by_queue(
                "hive_tasks_quarantined_total",
                "Suspects failed because an isolated attempt lost its drone with no other drone lost around it (tasks.max_lost_attempts); also counted in hive_tasks_failed_total.",
            ),
            cancelled: counter_by_queue("hive_tasks_cancelled_total", "Tasks cancelled."),
            lease_expirations: IntCounter::new(
                "hive_lease_expirations_total",
                "Leases that ended without an outcome: the drone died, went silent or did not re-attach after a restart.",
            )
            .expect("static counter options are valid"),
            stale_completions: IntCounter::new(
                "hive_stale_completions_total",
                "Outcomes refused because their fence was no longer current (G2/G3, docs/GUARANTEES.md).",
            )
            .expect("static counter options are valid"),
            stalls: IntCounter::new(
                "hive_queen_stalls_total",
                "Times the queen's own loop ran later than a heartbeat interval (stopped, starved or stuck); each gave every drone a fresh heartbeat timeout.",
            )
            .expect("static counter options are valid"),
            dispatch_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "hive_dispatch_latency_seconds",
                    "Time from a task becoming runnable to its lease being granted.",
                )
                .buckets(SECONDS_BUCKETS.to_vec()),
            )
            .expect("static histogram options are valid"),
            run_duration: HistogramVec::new(
                HistogramOpts::new(
                    "hive_task_run_duration_seconds",
                    "Time from lease granted to outcome recorded, per attempt.",
                )
                .buckets(SECONDS_BUCKETS.to_vec()),
                &["queue"],
            )
            .expect("static histogram options are valid"),
            tasks: IntGaugeVec::new(
                Opts::new("hive_tasks", "Tasks by queue and state."),
                &["queue", "state"],
            )
            .expect("static gauge options are valid"),
            drones_connected: IntGauge::new("hive_drones_connected", "Drones connected now.")
                .expect("static gauge options are valid"),
            pool_processes: pool_gauge(
                "hive_pool_processes",
                "Processes a drone's worker pool is configured to keep.",
            ),
            pool_ready: pool_gauge(
                "hive_pool_processes_ready",
                "Processes of a drone's worker pool that are up and ready.",
            ),
            pool_busy: pool_gauge(
                "hive_pool_processes_busy",
                "Processes of a drone's worker pool running a task.",
            ),
            pool_restarts: pool_gauge(
                "hive_pool_restarts",
                "Processes of a drone's worker pool started again since the drone started (crashes, kills, failed starts).",
            ),
            pool_failing: pool_gauge(
                "hive_pool_failing",
                "1 while a drone's worker pool keeps failing to start or keep processes (see GET /v1/drones).",
            ),
            unroutable: IntGauge::new(
                "hive_tasks_unroutable",
                "Pending tasks no connected drone can run (kind or labels).",
            )
            .expect("static gauge options are valid"),
            store_free_bytes: IntGauge::new(
                "hive_store_free_bytes",
                "Free bytes on the filesystem of the data dir, as last sampled.",
            )
            .expect("static gauge options are valid"),
            store_degraded: IntGauge::new(
                "hive_store_degraded",
                "1 while free space is below [storage] min_free_mb and new work is refused (507).",
            )
            .expect("static gauge options are valid"),
            idle_poll_seconds: idle_poll,
            store: StoreMetrics {
                batch_commits: store_batch_histogram(),
                flush_seconds: store_flush_histogram(),
                checkpoint_seconds: store_checkpoint_histogram(),
                idle_poll_seconds: writer_poll,
            },
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.submitted.clone()),
            Box::new(m.succeeded.clone()),
            Box::new(m.failed.clone()),
            Box::new(m.retried.clone()),
            Box::new(m.requeued.clone()),
            Box::new(m.suspected.clone()),
            Box::new(m.quarantined.clone()),
            Box::new(m.cancelled.clone()),
            Box::new(m.lease_expirations.clone()),
            Box::new(m.stale_completions.clone()),
            Box::new(m.stalls.clone()),
            Box::new(m.idle_poll_seconds.clone()),
            Box::new(m.dispatch_latency.clone()),
            Box::new(m.run_duration.clone()),
            Box::new(m.tasks.clone()),
            Box::new(m.drones_connected.clone()),
            Box::new(m.pool_processes.clone()),
            Box::new(m.pool_ready.clone()),
            Box::new(m.pool_busy.clone()),
            Box::new(m.pool_restarts.clone()),
            Box::new(m.pool_failing.clone()),
            Box::new(m.unroutable.clone()),
            Box::new(m.store_free_bytes.clone()),
            Box::new(m.store_degraded.clone()),
            Box::new(m.store.batch_commits.clone()),
            Box::new(m.store.flush_seconds.clone()),
            Box::new(m.store.checkpoint_seconds.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are distinct and valid");
        }
        m
    }

    /// The text exposition, with the state gauges set from `stats` and `drones` first.
    pub fn render(&self, stats: &Stats, drones: &[DroneView]) -> String {
        let pool_gauges = [
            &self.pool_processes,
            &self.pool_ready,
            &self.pool_busy,
            &self.pool_restarts,
            &self.pool_failing,
        ];
        for gauge in pool_gauges {
            gauge.reset();
        }
        for drone in drones {
            let id = drone.id.to_string();
            for pool in &drone.pools {
                let labels = [drone.name.as_str(), id.as_str(), pool.name.as_str()];
                let values = [
                    i64::from(pool.processes),
                    i64::from(pool.ready),
                    i64::from(pool.busy),
                    i64::try_from(pool.restarts).unwrap_or(i64::MAX),
                    i64::from(pool.failing.is_some()),
                ];
                for (gauge, value) in pool_gauges.iter().zip(values) {
                    gauge.with_label_values(&labels).set(value);
                }
            }
        }
        self.tasks.reset();
        for (queue, states) in &stats.by_queue {
            for (state, n) in states {
                self.tasks
                    .with_label_values(&[queue.as_str(), state.as_str()])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
        self.drones_connected
            .set(i64::try_from(stats.drones_connected).unwrap_or(i64::MAX));
        self.unroutable
            .set(i64::try_from(stats.unroutable).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

fn pool_gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["drone", "drone_id", "pool"])
        .expect("static gauge options are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_and_parses() {
        let m = Metrics::new();
        m.submitted.with_label_values(&["q\"uote"]).inc();
        m.store.batch_commits.observe(3.0);
        let mut stats = Stats::default();
        stats
            .by_queue
            .entry("default".into())
            .or_default()
            .insert("pending".into(), 7);
        let drone = DroneView {
            id: shared::DroneId::generate(),
            name: "d1".into(),
            labels: vec![],
            kinds: vec!["py.greet".into()],
            slots: 4,
            running: vec![],
            connected: true,
            draining: false,
            last_seen: chrono::Utc::now(),
            pools: vec![shared::protocol::PoolStatus {
                name: "py".into(),
                kinds: vec!["py.greet".into()],
                processes: 4,
                ready: 3,
                busy: 1,
                restarts: 5,
                failing: Some("exited with code 1".into()),
            }],
        };
        let text = m.render(&stats, std::slice::from_ref(&drone));
        for (metric, want) in [
            ("hive_pool_processes", 4.0),
            ("hive_pool_processes_ready", 3.0),
            ("hive_pool_processes_busy", 1.0),
            ("hive_pool_restarts", 5.0),
            ("hive_pool_failing", 1.0),
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(metric)
                    && l.contains("pool=\"py\"")
                    && l.contains("drone=\"d1\"")
                    && l.ends_with(&format!(" {want}"))),
                "{metric} {want} missing from:\n{text}"
            );
        }
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
        let names: std::collections::BTreeSet<&str> =
            scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        assert!(names.contains("hive_tasks_submitted_total"), "{names:?}");
        assert!(
            names.contains("hive_store_group_commit_size_count"),
            "{names:?}"
        );
        let pending = scrape
            .samples
            .iter()
            .find(|s| s.metric == "hive_tasks" && s.labels.get("state") == Some("pending"))
            .expect("gauge set from stats");
        assert!(matches!(pending.value, prometheus_parse::Value::Gauge(v) if v == 7.0));
        let quoted = scrape
            .samples
            .iter()
            .find(|s| s.metric == "hive_tasks_submitted_total")
            .expect("counter");
        // The label value is escaped in the exposition (the parser keeps escapes as is).
        assert_eq!(quoted.labels.get("queue"), Some(r#"q\"uote"#));
    }
}
