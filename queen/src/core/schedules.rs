//! Periodic schedules: each one's next wake-up on a timer, and at most one run per tick
//! when it fires (see `schedule.rs` for the catch-up rule). A run is an ordinary submit
//! made idempotent by a per-tick key, so a restart never runs a tick twice.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use shared::api::ScheduleView;
use shared::TaskId;
use tokio::sync::oneshot;

use super::api::CoreError;
use super::{Core, Now};
use crate::schedule::{Every, Schedule};
use crate::store::record::encode_schedule;
use crate::store::Mutation;
use crate::task::Task;

#[derive(Debug, Default)]
pub(super) struct Schedules {
    by_name: HashMap<String, Schedule>,
    /// Each schedule's next wake-up, ordered; `wake` says which entry is current.
    timers: BTreeSet<(DateTime<Utc>, String)>,
    wake: HashMap<String, DateTime<Utc>>,
}

impl Schedules {
    /// Adds (or replaces) a schedule and arms its timer.
    pub fn insert(&mut self, schedule: Schedule, wall: DateTime<Utc>) {
        let name = schedule.name.clone();
        self.by_name.insert(name.clone(), schedule);
        self.arm(&name, wall);
    }

    /// (Re)arms a schedule's timer; the previous one, if any, is dropped.
    fn arm(&mut self, name: &str, wall: DateTime<Utc>) {
        if let Some(old) = self.wake.remove(name) {
            self.timers.remove(&(old, name.to_string()));
        }
        if let Some(at) = self.by_name.get(name).and_then(|s| s.wake_at(wall)) {
            self.timers.insert((at, name.to_string()));
            self.wake.insert(name.to_string(), at);
        }
    }

    /// The next schedule whose timer has passed by `wall`, taken off the timer.
    fn pop_due(&mut self, wall: DateTime<Utc>) -> Option<String> {
        loop {
            let (at, name) = self.timers.first().cloned()?;
            if at > wall {
                return None;
            }
            self.timers.pop_first();
            // A stale entry: the schedule was re-armed or deleted since.
            if self.wake.get(&name) == Some(&at) {
                self.wake.remove(&name);
                return Some(name);
            }
        }
    }

    pub fn views(&self, wall: DateTime<Utc>) -> Vec<ScheduleView> {
        let mut views: Vec<ScheduleView> = self.by_name.values().map(|s| view(s, wall)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }
}

fn view(s: &Schedule, wall: DateTime<Utc>) -> ScheduleView {
    let (cron, every_ms) = match &s.every {
        Every::Cron { pattern, .. } => (Some(pattern.clone()), None),
        Every::Interval { ms } => (None, Some(*ms)),
    };
    ScheduleView {
        name: s.name.clone(),
        cron,
        every_ms,
        task: s.task.clone(),
        created_at: s.created_at,
        last_run_at: (s.last_tick > s.created_at).then_some(s.last_tick),
        next_run_at: s.wake_at(wall),
    }
}

impl Core {
    pub(super) fn put_schedule(
        &mut self,
        schedule: Schedule,
        reply: oneshot::Sender<Result<(ScheduleView, bool), CoreError>>,
        now: Now,
    ) {
        let name = schedule.name.clone();
        let created = !self.schedules.by_name.contains_key(&name);
        tracing::info!(schedule = %name, created, "schedule saved");
        let m = Mutation::SaveSchedule {
            name: name.clone(),
            record: encode_schedule(&schedule),
        };
        let view = view(&schedule, now.wall);
        self.schedules.insert(schedule, now.wall);
        self.fx
            .reply_when_durable(vec![m], reply, Ok((view, created)));
    }

    pub(super) fn delete_schedule(
        &mut self,
        name: String,
        reply: oneshot::Sender<Result<ScheduleView, CoreError>>,
        now: Now,
    ) {
        let Some(s) = self.schedules.by_name.remove(&name) else {
            let _ = reply.send(Err(CoreError::UnknownSchedule(name)));
            return;
        };
        let view = view(&s, now.wall);
        self.schedules.arm(&name, now.wall);
        tracing::info!(schedule = %name, "schedule deleted");
        self.fx
            .reply_when_durable(vec![Mutation::DeleteSchedule { name }], reply, Ok(view));
    }

    /// Runs the schedules whose time has come: at most one run per tick.
    pub(super) fn fire_schedules(&mut self, now: Now) {
        if self.disk.degraded() {
            // New work waits for disk space; a due schedule stays due, and its latest
            // missed tick runs once space is back (the catch-up rule of `schedule.rs`).
            return;
        }
        while let Some(name) = self.schedules.pop_due(now.wall) {
            let Some(schedule) = self.schedules.by_name.get(&name) else {
                continue;
            };
            if let Some(tick) = schedule.due(now.wall) {
                let key = schedule.idempotency_key(tick);
                let spec = serde_json::from_value::<shared::api::TaskSpec>(schedule.task.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|mut spec| {
                        spec.idempotency_key = Some(key);
                        Task::from_spec(spec, TaskId::generate(), now.wall, &self.cfg.tasks)
                            .map_err(|e| e.0)
                    });
                match spec {
                    Ok(task) => {
                        tracing::info!(schedule = %name, tick = %tick, task_id = %task.id, "schedule fired");
                        // Nobody waits for this reply; durability and idempotency are
                        // those of any submit.
                        let (tx, _rx) = oneshot::channel();
                        self.submit(vec![task], tx, now);
                    }
                    Err(e) => {
                        tracing::error!(schedule = %name, error = %e, "schedule's task spec is no longer valid; tick skipped");
                    }
                }
                if let Some(s) = self.schedules.by_name.get_mut(&name) {
                    s.last_tick = tick;
                    let record = encode_schedule(s);
                    self.fx.write(vec![Mutation::SaveSchedule {
                        name: name.clone(),
                        record,
                    }]);
                }
            }
            self.schedules.arm(&name, now.wall);
        }
    }
}
