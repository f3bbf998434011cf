//! `latency`: how long a task takes from its submit to a drone starting it, and to its
//! outcome being recorded, at low load (one task at a time) and at high load (an open-loop
//! stream of single-task submits at a fixed rate).
//!
//! The drones are simulated (`sim`) inside this process, so every instant is read from one
//! monotonic clock: the submit is the instant just before `POST /v1/tasks` is sent;
//! *started* is when the task's `assign` frame arrived at a drone (the queen sends it after
//! the lease is durable); *recorded* is when the `ack` of its `task_complete` arrived (the
//! queen sends it after the outcome is durable). The task's payload carries a sequence
//! number, so an assign that overtakes the HTTP answer is still matched with its submit.
//! Also reported: submit → HTTP answer, and `task_complete` sent → ack received (the cost
//! of recording an outcome); at high load, `scheduled_to_recorded` counts from when the
//! schedule meant to send the submit, so submitters falling behind are not hidden.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use shared::api::TaskView;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::hive::{Hive, Storage, Submitter};
use crate::report::{merge, quantile, Machine, Reporter};
use crate::sim::{self, Behavior, Counters, Event};

/// How long one task may take end to end before the run is declared stuck.
const TASK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Tasks timed at low load, one at a time: submit, wait for its ack, repeat.
    #[arg(long, default_value_t = 2_000)]
    pub tasks: usize,
    /// Untimed tasks before the timed ones (connections, caches, allocator warm up).
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// High load: single-task submits per second, sent open loop (on a fixed schedule,
    /// whether or not earlier ones were answered).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// High load: how long to submit for.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// High load: threads submitting, each over its own keep-alive connection.
    #[arg(long, default_value_t = 16)]
    pub submitters: usize,
    /// Simulated drones, and slots each.
    #[arg(long, default_value_t = 4)]
    pub drones: u32,
    #[arg(long, default_value_t = 64)]
    pub slots: u32,
    /// High load: each task holds its drone slot this long before completing, so drones
    /// are busy with many tasks at once (0: complete at once).
    #[arg(long, default_value_t = 0)]
    pub work_ms: u64,
    /// Runs, each with a fresh queen; the median (min–max) of each figure follows.
    #[arg(long, default_value_t = 3)]
    pub trials: u32,
}

/// The instants of one task.
#[derive(Debug, Default, Clone, Copy)]
struct Timeline {
    /// High load only: when the open-loop schedule meant to send it. A submitter that
    /// fell behind sends later; measuring from here counts that wait too, as a client
    /// that cannot slow down would see it.
    due: Option<Instant>,
    submit: Option<Instant>,
    response: Option<Instant>,
    assigned: Option<Instant>,
    completed: Option<Instant>,
    recorded: Option<Instant>,
}

impl Timeline {
    fn apply(&mut self, event: &Event) {
        match *event {
            Event::Assigned { at, .. } => self.assigned = Some(at),
            Event::Completed { at, .. } => self.completed = Some(at),
            Event::Recorded { at, .. } => self.recorded = Some(at),
        }
    }
}

fn seq_of(event: &Event) -> Option<u64> {
    match *event {
        Event::Assigned { seq, .. }
        | Event::Completed { seq, .. }
        | Event::Recorded { seq, .. } => seq,
    }
}

/// Simulated drones connected to one queen, stopped when dropped.
struct Drones {
    stop: CancellationToken,
    counters: Arc<Counters>,
}

impl Drop for Drones {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn connect_drones(
    rt: &Runtime,
    hive: &Hive,
    a: &Args,
    behavior: Behavior,
    events: &mpsc::Sender<Event>,
) -> Result<Drones> {
    let stop = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    for i in 0..a.drones {
        let conn = rt.block_on(sim::connect(
            &hive.queen.drones_addr,
            &format!("sim-{i}"),
            a.slots,
        ))?;
        rt.spawn(sim::run(
            conn,
            behavior,
            Some(events.clone()),
            counters.clone(),
            stop.clone(),
        ));
    }
    Ok(Drones { stop, counters })
}

pub fn run(
    bin_dir: &Path,
    storage: Storage,
    json_only: bool,
    machine: &Machine,
    rt: &Runtime,
    a: &Args,
) -> Result<()> {
    let mut settings = json!({"tasks": a.tasks, "warmup": a.warmup, "rate": a.rate,
           "seconds": a.seconds, "submitters": a.submitters, "drones": a.drones,
           "slots": a.slots, "work_ms": a.work_ms, "drone": "simulated"});
    merge(&mut settings, storage.settings());
    let mut report = Reporter::new("latency", machine, settings, json_only);
    report.note("started = assign frame received by a drone; recorded = ack of task_complete received; both from the instant before POST /v1/tasks");
    for trial in 1..=a.trials {
        // With PostgreSQL: fresh clusters for this trial, stopped when `hive` is dropped.
        let hive = Hive::start_on(bin_dir, storage)?;
        let (tx, rx) = mpsc::channel();

        // Low load: one task at a time.
        let drones = connect_drones(
            rt,
            &hive,
            a,
            Behavior::Complete {
                work: Duration::ZERO,
            },
            &tx,
        )?;
        let low = low_load(&hive, a, &rx, trial == 1 && !json_only)?;
        check(&drones)?;
        drop(drones);
        for (metric, sorted) in &low {
            percentiles(&mut report, trial, &format!("low_{metric}"), sorted);
        }

        // High load: an open-loop stream.
        let behavior = Behavior::Complete {
            work: Duration::from_millis(a.work_ms),
        };
        let drones = connect_drones(rt, &hive, a, behavior, &tx)?;
        let first_seq = (a.warmup + a.tasks) as u64;
        let high = high_load(&hive, a, &rx, first_seq)?;
        check(&drones)?;
        drop(drones);
        for (metric, sorted) in &high.series {
            percentiles(&mut report, trial, &format!("high_{metric}"), sorted);
        }
        report.value(
            trial,
            "high_submit_rate_achieved",
            "tasks/s",
            high.achieved_rate,
        );
        report.value(trial, "high_submit_lag_p99", "ms", high.lag_p99_ms);
        report.value(trial, "high_submit_lag_max", "ms", high.lag_max_ms);
        if high.lag_p99_ms > 1.0 {
            report.note("warning: submitters fell behind the schedule (lag p99 > 1 ms); latencies from the actual send understate what an open-loop client would see (see scheduled_to_recorded)");
        }
    }
    report.summary();
    Ok(())
}

/// Fails the run if a drone lost its connection or got a stale ack: the figures would
/// then measure something else.
fn check(drones: &Drones) -> Result<()> {
    let lost = Counters::get(&drones.counters.lost);
    let stale = Counters::get(&drones.counters.stale);
    if lost > 0 || stale > 0 {
        bail!("{lost} simulated drone connection(s) lost, {stale} stale ack(s)");
    }
    Ok(())
}

fn percentiles(report: &mut Reporter, trial: u32, metric: &str, sorted: &[f64]) {
    report.value(trial, &format!("{metric}_p50"), "ms", quantile(sorted, 0.5));
    report.value(
        trial,
        &format!("{metric}_p99"),
        "ms",
        quantile(sorted, 0.99),
    );
    report.value(
        trial,
        &format!("{metric}_p99.9"),
        "ms",
        quantile(sorted, 0.999),
    );
    report.value(trial, &format!("{metric}_max"), "ms", quantile(sorted, 1.0));
}

type Series = Vec<(&'static str, Vec<f64>)>;

/// The spans of every complete timeline, in ms, each sorted.
fn spans(timelines: impl Iterator<Item = Timeline>) -> Result<Series> {
    let mut to_response = Vec::new();
    let mut to_started = Vec::new();
    let mut to_recorded = Vec::new();
    let mut complete_to_recorded = Vec::new();
    let mut scheduled_to_recorded = Vec::new();
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
    for t in timelines {
        let (Some(submit), Some(response), Some(assigned), Some(completed), Some(recorded)) =
            (t.submit, t.response, t.assigned, t.completed, t.recorded)
        else {
            bail!("a task's timeline is incomplete: {t:?}");
        };
        to_response.push(ms(submit, response));
        to_started.push(ms(submit, assigned));
        to_recorded.push(ms(submit, recorded));
        complete_to_recorded.push(ms(completed, recorded));
        if let Some(due) = t.due {
            scheduled_to_recorded.push(ms(due, recorded));
        }
    }
    let mut series = vec![
        ("submit_to_response", to_response),
        ("submit_to_started", to_started),
        ("submit_to_recorded", to_recorded),
        ("complete_to_recorded", complete_to_recorded),
    ];
    if !scheduled_to_recorded.is_empty() {
        series.push(("scheduled_to_recorded", scheduled_to_recorded));
    }
    for (_, v) in &mut series {
        v.sort_by(f64::total_cmp);
    }
    Ok(series)
}

fn low_load(
    hive: &Hive,
    a: &Args,
    rx: &mpsc::Receiver<Event>,
    show_record: bool,
) -> Result<Series> {
    let queen = &hive.queen;
    let mut submitter = Submitter::connect(&queen.http)?;
    let mut timed = Vec::with_capacity(a.tasks);
    let mut sample_id = None;
    for i in 0..(a.warmup + a.tasks) {
        let seq = i as u64;
        let body = format!(r#"{{"kind":"echo","payload":{{"seq":{seq}}}}}"#);
        let mut t = Timeline {
            submit: Some(Instant::now()),
            ..Timeline::default()
        };
        if i == 0 {
            // One parsed answer, to show the queen's own timestamps below.
            let answer = submitter.post_answer("/v1/tasks", body)?;
            let view: TaskView = serde_json::from_slice(&answer)?;
            sample_id = Some(view.id);
        } else {
            submitter.post("/v1/tasks", body)?;
        }
        t.response = Some(Instant::now());
        while t.recorded.is_none() {
            let event = rx
                .recv_timeout(TASK_TIMEOUT)
                .with_context(|| format!("task {seq} was not recorded within {TASK_TIMEOUT:?}"))?;
            if seq_of(&event) == Some(seq) {
                t.apply(&event);
            }
        }
        if i >= a.warmup {
            timed.push(t);
        }
    }
    if let (true, Some(id)) = (show_record, sample_id) {
        let v = queen.get(&format!("/v1/tasks/{id}"))?;
        println!(
            "  the queen's own timestamps of one task: created_at={} started_at={} finished_at={}",
            v["created_at"], v["started_at"], v["finished_at"]
        );
    }
    spans(timed.into_iter())
}

#[derive(Debug)]
struct HighLoad {
    series: Series,
    achieved_rate: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
}

fn high_load(
    hive: &Hive,
    a: &Args,
    rx: &mpsc::Receiver<Event>,
    first_seq: u64,
) -> Result<HighLoad> {
    let total = (f64::from(a.rate) * a.seconds).round() as usize;
    if total == 0 {
        bail!("--rate × --seconds must be at least one task");
    }
    let rate = f64::from(a.rate.max(1));
    let next = Arc::new(AtomicUsize::new(0));
    // The schedule starts shortly after every submitter thread is up.
    let start = Instant::now() + Duration::from_millis(50);
    let submitters: Vec<_> = (0..a.submitters.max(1))
        .map(|_| {
            let next = next.clone();
            let http = hive.queen.http.clone();
            std::thread::spawn(move || -> Result<Vec<(u64, Instant, Timeline)>> {
                let mut submitter = Submitter::connect(&http)?;
                let mut sent = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok(sent);
                    }
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let seq = first_seq + i as u64;
                    let body = format!(r#"{{"kind":"echo","payload":{{"seq":{seq}}}}}"#);
                    let submit = Instant::now();
                    submitter.post("/v1/tasks", body)?;
                    let response = Instant::now();
                    sent.push((
                        seq,
                        due,
                        Timeline {
                            submit: Some(submit),
                            response: Some(response),
                            ..Timeline::default()
                        },
                    ));
                }
            })
        })
        .collect();
    let mut timelines: HashMap<u64, Timeline> = HashMap::with_capacity(total);
    let mut lags = Vec::with_capacity(total);
    let (mut first_submit, mut last_submit) = (None::<Instant>, None::<Instant>);
    for s in submitters {
        let sent = s
            .join()
            .map_err(|_| anyhow::anyhow!("a submitter thread panicked"))??;
        for (seq, due, t) in sent {
            if let Some(submit) = t.submit {
                lags.push(submit.saturating_duration_since(due).as_secs_f64() * 1e3);
                first_submit = Some(first_submit.map_or(submit, |f| f.min(submit)));
                last_submit = Some(last_submit.map_or(submit, |l| l.max(submit)));
            }
            let entry = timelines.entry(seq).or_default();
            entry.due = Some(due);
            entry.submit = t.submit;
            entry.response = t.response;
        }
    }
    // Every event of this phase is in the channel or on its way.
    let mut recorded = 0;
    let deadline = Instant::now() + TASK_TIMEOUT;
    while recorded < total {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = rx
            .recv_timeout(left)
            .with_context(|| format!("only {recorded} of {total} tasks recorded within {TASK_TIMEOUT:?} of the last submit"))?;
        let Some(seq) = seq_of(&event).filter(|s| *s >= first_seq) else {
            continue;
        };
        if matches!(event, Event::Recorded { .. }) {
            recorded += 1;
        }
        timelines.entry(seq).or_default().apply(&event);
    }
    lags.sort_by(f64::total_cmp);
    let span = match (first_submit, last_submit) {
        (Some(f), Some(l)) => l.saturating_duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    Ok(HighLoad {
        series: spans(timelines.into_values())?,
        achieved_rate: if span > 0.0 {
            (total - 1) as f64 / span
        } else {
            0.0
        },
        lag_p99_ms: quantile(&lags, 0.99),
        lag_max_ms: quantile(&lags, 1.0),
    })
}
