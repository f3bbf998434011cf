//! Dispatch: the waiting rooms (ready queues by route, the timer of scheduled tasks), the
//! queue gates (pause, concurrency, rate), and the grant of a lease, with its attempt
//! deadline. Dispatch runs only when something changed that could let it progress, and
//! looks only at drones that may have a free slot and at the heads of the ready groups.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::api::{QueueView, TaskState};
use shared::protocol::{Assign, QueenMessage};
use shared::{DroneId, Fence, TaskId};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::api::{CoreError, QueueChange};
use super::lifecycle::{self, Event};
use super::{Core, Now};
use crate::queues::{QueueSettings, QueueState};
use crate::ready::ReadyQueues;
use crate::rules::LiveLease;
use crate::store::Mutation;
use crate::task::Task;

#[derive(Debug)]
pub(super) struct Dispatch {
    pub ready: ReadyQueues,
    /// Scheduled tasks by the time they become pending.
    pub scheduled: BTreeSet<(DateTime<Utc>, TaskId)>,
    /// Queues with settings or running tasks (a queue exists once used).
    pub queues: HashMap<String, QueueState>,
    /// Queen-side attempt deadlines: a task past `timeout_ms` plus the heartbeat timeout
    /// without a report is failed by the queen.
    pub deadlines: BTreeSet<(Instant, TaskId, Fence)>,
    /// The entry of each running task in `deadlines`, so it can be dropped when the
    /// attempt ends (the set stays as small as the running set).
    deadline_of: HashMap<TaskId, (Instant, Fence)>,
    rr: usize,
    /// Drones that may have a free slot: added when a slot may have freed (hello, outcome,
    /// heartbeat), dropped by dispatch once found full. Dispatch looks only at these.
    pub maybe_free: BTreeSet<DroneId>,
    /// Something other than a new ready task may let dispatch progress (a slot freed, a
    /// queue changed, time passed for rate limits and timers).
    pub wanted: bool,
    /// `ready.pushes()` at the end of the last dispatch.
    pushes_seen: u64,
    /// Reused by dispatch for its candidate list.
    buf: Vec<DroneId>,
}

impl Dispatch {
    pub fn new(queues: HashMap<String, QueueState>) -> Dispatch {
        Dispatch {
            ready: ReadyQueues::default(),
            scheduled: BTreeSet::new(),
            queues,
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            rr: 0,
            maybe_free: BTreeSet::new(),
            wanted: true,
            pushes_seen: 0,
            buf: Vec::new(),
        }
    }

    pub fn queue(&mut self, name: &str) -> &mut QueueState {
        self.queues.entry(name.to_string()).or_default()
    }

    /// Puts a pending task in its ready queue or a scheduled one on the timer.
    pub fn enqueue(&mut self, task: &Task) {
        match task.state {
            // The moment it became ready feeds the dispatch-latency metric only, so it is
            // read from the real clock, as the grant's is.
            TaskState::Pending => self.ready.push(task),
            TaskState::Scheduled => {
                if let Some(at) = task.run_at {
                    self.scheduled.insert((at, task.id));
                }
            }
            _ => {}
        }
    }

    /// Takes a waiting task out of its ready queue or off the timer.
    pub fn dequeue(&mut self, task: &Task) {
        match task.state {
            TaskState::Pending => self.ready.remove(task),
            TaskState::Scheduled => {
                if let Some(at) = task.run_at {
                    self.scheduled.remove(&(at, task.id));
                }
            }
            _ => {}
        }
    }

    pub fn slot_may_have_freed(&mut self, drone: DroneId) {
        self.maybe_free.insert(drone);
        self.wanted = true;
    }

    /// When the first scheduled task becomes pending.
    pub fn first_scheduled(&self) -> Option<DateTime<Utc>> {
        self.scheduled.first().map(|(at, _)| *at)
    }

    pub fn first_due_by(&self, wall: DateTime<Utc>) -> bool {
        self.first_scheduled().is_some_and(|at| at <= wall)
    }

    /// A running attempt ended (outcome, timeout, lost lease, cancel): its deadline goes,
    /// and its queue has one task fewer running, which may let another start.
    pub fn attempt_ended(&mut self, task: &Task) {
        self.wanted = true;
        if let Some((at, fence)) = self.deadline_of.remove(&task.id) {
            self.deadlines.remove(&(at, task.id, fence));
        }
        if let Some(q) = self.queues.get_mut(&task.queue) {
            q.ended();
        }
    }

    /// Moves every attempt deadline on by `by` (the queen stalled: no report could be
    /// heard meanwhile).
    pub fn postpone_deadlines(&mut self, by: Duration) {
        self.deadlines = std::mem::take(&mut self.deadlines)
            .into_iter()
            .map(|(at, id, fence)| (at + by, id, fence))
            .collect();
        for (at, _) in self.deadline_of.values_mut() {
            *at += by;
        }
    }

    /// The first attempt deadline that passed by `now`, taken off the timer.
    pub fn pop_expired_deadline(&mut self, now: Instant) -> Option<(TaskId, Fence)> {
        let &(deadline, id, fence) = self.deadlines.first()?;
        if deadline > now {
            return None;
        }
        self.deadlines.pop_first();
        self.deadline_of.remove(&id);
        Some((id, fence))
    }
}

impl Core {
    /// Leases ready tasks to drones with free slots, round-robin (one per drone per round,
    /// so work spreads across the hive). No scan of drones or tasks.
    pub(super) fn dispatch(&mut self, now: Now) {
        let d = &mut self.dispatch;
        if d.ready.is_empty() || (!d.wanted && d.ready.pushes() == d.pushes_seen) {
            return;
        }
        d.wanted = false;
        let drones = &self.fleet.drones;
        d.maybe_free
            .retain(|id| drones.get(id).is_some_and(|d| d.free_slots() > 0));
        let mut candidates = std::mem::take(&mut d.buf);
        candidates.clear();
        candidates.extend(d.maybe_free.iter().copied());
        if !candidates.is_empty() {
            let n = candidates.len();
            candidates.rotate_left(d.rr % n);
            d.rr = d.rr.wrapping_add(1);
            self.dispatch_to(&candidates, now);
        }
        self.dispatch.buf = candidates;
        self.dispatch.pushes_seen = self.dispatch.ready.pushes();
    }

    fn dispatch_to(&mut self, candidates: &[DroneId], now: Now) {
        loop {
            let mut progress = false;
            for id in candidates {
                let Some(drone) = self.fleet.drones.get(id) else {
                    continue;
                };
                if drone.free_slots() == 0 {
                    continue;
                }
                let queues = &self.dispatch.queues;
                let open = |q: &str| queues.get(q).is_none_or(|q| q.may_start(now.mono));
                let Some((tid, since)) =
                    self.dispatch
                        .ready
                        .pop_for(&drone.kinds, &drone.labels, &open)
                else {
                    continue;
                };
                if drone.cancelling.contains(&tid) {
                    // This drone is still killing an older attempt of the task: give it
                    // to another drone (or to this one once the old attempt is gone).
                    if let Some(task) = self.ledger.tasks.get(&tid) {
                        self.dispatch.ready.push_since(&*task, since);
                    }
                    continue;
                }
                self.metrics.dispatch_latency.observe(
                    std::time::Instant::now()
                        .saturating_duration_since(since)
                        .as_secs_f64(),
                );
                self.grant(*id, tid, now);
                progress = true;
                if self.dispatch.ready.is_empty() {
                    return;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Leases a ready task to a drone: a new attempt under a new fence, durable before
    /// the drone hears of it.
    fn grant(&mut self, drone_id: DroneId, tid: TaskId, now: Now) {
        let (Some(mut task), Some(drone)) = (
            self.ledger.tasks.get_mut(&tid),
            self.fleet.drones.get_mut(&drone_id),
        ) else {
            return;
        };
        let event = Event::Grant {
            drone: drone_id,
            drone_name: drone.name.clone(),
        };
        if let Err(refused) = lifecycle::apply(&mut task, event, now.wall) {
            // Only pending tasks are in the ready queues; anything else is a bug here.
            tracing::error!(task_id = %tid, %refused, "a ready task could not be leased");
            return;
        }
        drone.assigns_sent += 1;
        self.dispatch
            .queues
            .entry(task.queue.clone())
            .or_default()
            .started(now.mono);
        drone.leases.insert(
            tid,
            LiveLease {
                fence: task.fence,
                ordinal: drone.assigns_sent,
            },
        );
        if let Some(ms) = task.timeout_ms {
            let deadline =
                now.mono + Duration::from_millis(ms) + self.cfg.leases.heartbeat_timeout();
            self.dispatch.deadlines.insert((deadline, tid, task.fence));
            self.dispatch
                .deadline_of
                .insert(tid, (deadline, task.fence));
        }
        // Per-task lines are debug: at tens of thousands of tasks a second, info-level
        // lines per task would cost more than scheduling them.
        tracing::debug!(task_id = %tid, drone = %drone_id, fence = %task.fence, attempt = task.attempts, "lease granted");
        let msg = QueenMessage::Assign(Assign {
            task_id: tid,
            fence: task.fence,
            attempt: task.attempts,
            kind: task.kind.clone(),
            queue: task.queue.clone(),
            payload: task.payload.to_value(),
            timeout_ms: task.timeout_ms,
            checkpoint: task.checkpoint.as_deref().cloned(),
        });
        let m = Mutation::save(&task);
        drop(task);
        // The grant, with its fence, is durable before the drone hears of it.
        self.fx.send_when_durable(vec![m], &drone.conn, msg);
    }

    /// Scheduled tasks whose time has come become pending. Not written back: a restart
    /// derives `pending` from `run_at` having passed.
    pub(super) fn promote_due(&mut self, now: Now) {
        while let Some(&(at, id)) = self.dispatch.scheduled.first() {
            if at > now.wall {
                break;
            }
            self.dispatch.scheduled.pop_first();
            if let Some(mut task) = self.ledger.tasks.get_mut(&id) {
                if task.state == TaskState::Scheduled
                    && task.run_at == Some(at)
                    && lifecycle::apply(&mut task, Event::Due, now.wall).is_ok()
                {
                    self.dispatch.ready.push(&*task);
                }
            }
        }
    }

    /// Pause, resume or new limits for a queue (created if it is new).
    pub(super) fn set_queue(
        &mut self,
        name: String,
        change: QueueChange,
        reply: oneshot::Sender<Result<QueueView, CoreError>>,
    ) {
        if let Err(e) = crate::task::check_name("queue", &name) {
            let _ = reply.send(Err(CoreError::Invalid(e.0)));
            return;
        }
        let mut settings: QueueSettings = self
            .dispatch
            .queues
            .get(&name)
            .map(|q| q.settings.clone())
            .unwrap_or_default();
        match change {
            QueueChange::Pause => settings.paused = true,
            QueueChange::Resume => settings.paused = false,
            QueueChange::Limits(l) => {
                if let Some(max) = l.max_running {
                    if max == Some(0) {
                        let msg = "max_running must be at least 1 (pause the queue to stop it)";
                        let _ = reply.send(Err(CoreError::Invalid(msg.into())));
                        return;
                    }
                    settings.max_running = max;
                }
                if let Some(rate) = l.rate_per_s {
                    if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                        let msg = "rate_per_s must be a positive number";
                        let _ = reply.send(Err(CoreError::Invalid(msg.into())));
                        return;
                    }
                    settings.rate_per_s = rate;
                }
            }
        }
        self.dispatch.wanted = true;
        tracing::info!(queue = %name, paused = settings.paused, max_running = ?settings.max_running, rate_per_s = ?settings.rate_per_s, "queue settings changed");
        let m = Mutation::SaveQueue {
            name: name.clone(),
            record: crate::store::record::encode_queue(&settings),
        };
        self.dispatch.queue(&name).set(settings);
        let view = self.queue_views().into_iter().find(|v| v.name == name);
        let answer = view.ok_or(CoreError::UnknownQueue(name));
        self.fx.reply_when_durable(vec![m], reply, answer);
    }
}
