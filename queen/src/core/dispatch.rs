//! Dispatch: the waiting rooms (ready queues by route, the timer of scheduled tasks), the
//! queue gates (pause, concurrency, rate), and the grant of a lease, with its attempt
//! deadline. Dispatch runs only when something changed that could let it progress, and
//! looks only at drones that may have a free slot and at the heads of the ready groups.

use std::collections::{BTreeSet, HashMap, HashSet};
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
use crate::ready::{ReadyQueues, Route};
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
    /// Active tasks that must run alone on a drone (suspects of killing their drones).
    pub suspects: HashSet<TaskId>,
    /// Suspects out of the ready queues, waiting for a drone to run them alone, oldest
    /// first.
    pub waiting_alone: Vec<Alone>,
    /// Drones held for a waiting suspect: they take no new task, so their running ones
    /// end and the suspect gets the drone to itself.
    pub reserved: HashMap<DroneId, TaskId>,
}

/// A pending suspect waiting for a drone of its own, with the route a drone must serve.
#[derive(Debug, Clone)]
pub(super) struct Alone {
    pub id: TaskId,
    pub route: Route,
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
            suspects: HashSet::new(),
            waiting_alone: Vec::new(),
            reserved: HashMap::new(),
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

    /// Takes a waiting task out of its ready queue (or the suspects' wait) or off the
    /// timer.
    pub fn dequeue(&mut self, task: &Task) {
        match task.state {
            TaskState::Pending => {
                self.ready.remove(task);
                if !self.waiting_alone.is_empty() {
                    self.stop_waiting_alone(task.id);
                }
            }
            TaskState::Scheduled => {
                if let Some(at) = task.run_at {
                    self.scheduled.remove(&(at, task.id));
                }
            }
            _ => {}
        }
    }

    /// A suspect no longer waits for a drone of its own (it got one, or left).
    pub fn stop_waiting_alone(&mut self, id: TaskId) {
        self.waiting_alone.retain(|s| s.id != id);
        self.reserved.retain(|_, t| *t != id);
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
        if (d.ready.is_empty() && d.waiting_alone.is_empty())
            || (!d.wanted && d.ready.pushes() == d.pushes_seen)
        {
            return;
        }
        d.wanted = false;
        if !d.waiting_alone.is_empty() {
            self.dispatch_alone(now);
        }
        let d = &mut self.dispatch;
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
                if drone.free_slots() == 0
                    || (!self.dispatch.reserved.is_empty()
                        && self.dispatch.reserved.contains_key(id))
                {
                    continue;
                }
                let idle = drone.is_idle();
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
                if !self.dispatch.suspects.is_empty()
                    && self.dispatch.suspects.contains(&tid)
                    && !idle
                {
                    // A suspect runs alone: it waits for a drone of its own.
                    self.wait_alone(tid);
                    progress = true;
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

    /// Takes a suspect out of the ready queues to wait for a drone of its own.
    fn wait_alone(&mut self, id: TaskId) {
        let Some(task) = self.ledger.tasks.get(&id) else {
            return;
        };
        let alone = Alone {
            id,
            route: Route::of(&*task),
        };
        drop(task);
        tracing::info!(task_id = %id, "suspect waits for a drone to run it alone");
        self.dispatch.waiting_alone.push(alone);
        self.dispatch.wanted = true;
    }

    /// Gives each waiting suspect an idle drone that can run it, which then takes nothing
    /// else until the attempt ends. With none idle, one capable drone (the least busy) is
    /// held for it: it takes no new task, and the suspect runs there once it is empty.
    fn dispatch_alone(&mut self, now: Now) {
        let mut i = 0;
        while i < self.dispatch.waiting_alone.len() {
            let s = self.dispatch.waiting_alone[i].clone();
            let queue = self.dispatch.queues.get(&s.route.queue);
            if queue.is_some_and(|q| q.settings.paused) {
                // Its queue is paused: hold no drone meanwhile.
                self.dispatch.reserved.retain(|_, t| *t != s.id);
                i += 1;
                continue;
            }
            // At its queue's limits it keeps its held drone (it goes first once there is
            // room: this runs before ordinary dispatch), but starts nowhere yet.
            let open = queue.is_none_or(|q| q.may_start(now.mono));
            let fleet = &self.fleet;
            let reserved = &self.dispatch.reserved;
            let usable = |d: &super::fleet::Drone| {
                d.could_isolate(&s.route, s.id) && reserved.get(&d.id).is_none_or(|t| *t == s.id)
            };
            let held = reserved
                .iter()
                .find(|(_, t)| **t == s.id)
                .and_then(|(d, _)| fleet.drones.get(d))
                .filter(|d| usable(d));
            let idle_one = || {
                fleet
                    .drones
                    .values()
                    .find(|d| usable(d) && d.is_idle())
                    .map(|d| d.id)
            };
            // Held drones are capped, so that many suspects cannot hold the whole fleet.
            let may_hold = reserved.len() < (fleet.drones.len() / 4).max(1);
            let chosen = match held {
                // The drone held for it, once empty, or any drone that is empty first.
                Some(d) if d.is_idle() => Some(d.id),
                Some(_) => idle_one(),
                None => {
                    let idle = idle_one();
                    if idle.is_none() && may_hold {
                        let least_busy = fleet
                            .drones
                            .values()
                            .filter(|d| usable(d))
                            .min_by_key(|d| (d.leases.len() + d.cancelling.len(), d.id))
                            .map(|d| d.id);
                        self.dispatch.reserved.retain(|_, t| *t != s.id);
                        if let Some(d) = least_busy {
                            tracing::info!(task_id = %s.id, drone = %d, "drone held for a suspect: no new work until it can run the suspect alone");
                            self.dispatch.reserved.insert(d, s.id);
                        }
                    }
                    idle
                }
            };
            match chosen.filter(|_| open) {
                Some(drone) => {
                    self.dispatch.waiting_alone.remove(i);
                    self.dispatch.reserved.retain(|_, t| *t != s.id);
                    self.grant(drone, s.id, now);
                }
                None => i += 1,
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
        if !self.dispatch.suspects.is_empty() && self.dispatch.suspects.contains(&tid) {
            // Alone on this drone until the attempt ends (see `dispatch_alone`).
            drone.isolating = Some(tid);
            tracing::info!(task_id = %tid, drone = %drone_id, "suspect runs alone on this drone");
        }
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
            let awaiting = !self.dispatch.suspects.is_empty()
                && self.dispatch.suspects.contains(&id)
                && self.ledger.tasks.get(&id).is_some_and(|t| {
                    t.state == TaskState::Scheduled
                        && t.run_at == Some(at)
                        && t.suspicion.as_ref().is_some_and(|s| s.awaiting())
                });
            if awaiting {
                // A suspect waited out the window after its lone drone died: judge it.
                self.deliver_verdict(id, now);
                continue;
            }
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
