//! The ledger: every task the core holds, and the lifecycle requests on them — submit
//! (idempotency keys, dependencies), cancel, retry — and the end of a task's life
//! (`finish`), with the recently finished tasks kept until their record is durable so
//! reads never miss them.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use shared::api::{TaskState, TaskView};
use shared::TaskId;
use tokio::sync::oneshot;

use super::api::CoreError;
use super::lifecycle::{self, Event, Moved};
use super::{Core, Now};
use crate::active::ActiveTasks;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::rules::{self, RetryPolicy};
use crate::store::Mutation;
use crate::task::Task;

/// Where a task's dependencies stand (see [`Core::dependencies`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Deps {
    AllSucceeded,
    /// Some are still active.
    Waiting,
    /// This one ended without succeeding (`None`: it no longer exists).
    Ended {
        dep: TaskId,
        state: Option<TaskState>,
    },
}

#[derive(Debug)]
pub(super) struct Ledger {
    /// The active tasks, each held whole or demoted (see `active.rs`).
    pub tasks: ActiveTasks,
    /// Finished tasks whose commit may not be durable yet, so reads never miss them.
    pub recent: HashMap<TaskId, (u64, Task)>,
    recent_order: VecDeque<(u64, TaskId)>,
    /// Idempotency keys of active (and recently finished) tasks.
    pub idem: HashMap<String, TaskId>,
    /// Blocked task ids by the dependency they wait for.
    pub dependents: HashMap<TaskId, Vec<TaskId>>,
    pub finished_counts: HashMap<(String, TaskState), u64>,
    pub rng: StdRng,
    /// The queen's default retry backoff (a task's own settings apply over it).
    pub retry: RetryPolicy,
}

impl Ledger {
    pub fn new(
        cfg: &Config,
        tasks: ActiveTasks,
        finished_counts: Vec<((String, TaskState), u64)>,
    ) -> Ledger {
        Ledger {
            tasks,
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            idem: HashMap::new(),
            dependents: HashMap::new(),
            finished_counts: finished_counts.into_iter().collect(),
            rng: StdRng::from_os_rng(),
            retry: RetryPolicy {
                base: Duration::from_millis(cfg.tasks.retry_base_ms),
                max: Duration::from_millis(cfg.tasks.retry_max_ms),
                factor: rules::DEFAULT_RETRY_FACTOR,
                jitter: rules::DEFAULT_RETRY_JITTER,
            },
        }
    }

    /// An active task, or a finished one not yet known durable.
    pub fn held(&self, id: &TaskId) -> Option<Cow<'_, Task>> {
        self.tasks
            .get(id)
            .or_else(|| self.recent.get(id).map(|(_, t)| Cow::Borrowed(t)))
    }

    /// Counts a task that reached a terminal state; returns its queue's new count.
    fn bump_finished(&mut self, task: &Task, metrics: &Metrics) -> u64 {
        let counter = match task.state {
            TaskState::Succeeded => Some(&metrics.succeeded),
            TaskState::Failed => Some(&metrics.failed),
            TaskState::Cancelled => Some(&metrics.cancelled),
            _ => None,
        };
        if let Some(c) = counter {
            c.with_label_values(&[task.queue.as_str()]).inc();
        }
        let n = self
            .finished_counts
            .entry((task.queue.clone(), task.state))
            .or_default();
        *n += 1;
        *n
    }

    fn remember_recent(&mut self, seq: u64, task: Task) {
        self.recent_order.push_back((seq, task.id));
        self.recent.insert(task.id, (seq, task));
    }

    /// Finished tasks whose record is durable are read from the store from now on.
    pub fn forget_durable(&mut self, durable: u64) {
        while let Some(&(seq, id)) = self.recent_order.front() {
            if seq > durable {
                break;
            }
            self.recent_order.pop_front();
            // Only if it is still that commit's copy (a retried task may have finished again).
            if self.recent.get(&id).is_some_and(|(s, _)| *s == seq) {
                self.recent.remove(&id);
            }
        }
    }
}

impl Core {
    pub(super) fn submit(
        &mut self,
        tasks: Vec<Task>,
        reply: oneshot::Sender<Result<Vec<(TaskView, bool)>, CoreError>>,
        now: Now,
    ) {
        if let Some(refused) = self.refuse_new_work() {
            let _ = reply.send(Err(refused));
            return;
        }
        /// What each submitted spec turns out to be.
        enum Slot {
            New(Task),
            /// An idempotency key matched a task the queen already has.
            Existing(TaskView),
            /// An idempotency key repeated within this batch: the task at that index.
            SameAs(usize),
        }
        // Decide everything before changing anything: a batch is all or nothing.
        let mut slots = Vec::with_capacity(tasks.len());
        let mut batch_keys: HashMap<String, usize> = HashMap::new();
        // Tasks of this batch may depend on each other (the HTTP layer orders them so a
        // dependency always comes first).
        let batch_ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        let in_batch: HashSet<TaskId> = batch_ids.iter().copied().collect();
        // A task replaced by an existing one (idempotency) stands for it in dependencies.
        let mut alias: HashMap<TaskId, TaskId> = HashMap::new();
        for (i, task) in tasks.into_iter().enumerate() {
            if let Some(key) = &task.idempotency_key {
                if let Some(&j) = batch_keys.get(key) {
                    alias.insert(task.id, batch_ids[j]);
                    slots.push(Slot::SameAs(j));
                    continue;
                }
                match self.lookup_idempotent(key) {
                    Ok(Some(view)) => {
                        alias.insert(task.id, view.id);
                        slots.push(Slot::Existing(view));
                        continue;
                    }
                    Ok(None) => {
                        batch_keys.insert(key.clone(), i);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
            for dep in task.depends_on.iter().filter(|d| !in_batch.contains(d)) {
                match self.find_state(*dep) {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let _ = reply.send(Err(CoreError::UnknownDependency(*dep)));
                        return;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
            slots.push(Slot::New(task));
        }
        // Everything below goes into the next commit; tasks born finished are visible to
        // reads (and to dependents later in this batch) from now on.
        let seq = self.fx.made() + 1;

        let mut mutations = Vec::with_capacity(slots.len() * 2);
        let mut views: Vec<Option<(TaskView, bool)>> = Vec::with_capacity(slots.len());
        let mut same_as = Vec::new();
        for slot in slots {
            let mut task = match slot {
                Slot::New(task) => task,
                Slot::Existing(view) => {
                    views.push(Some((view, false)));
                    continue;
                }
                Slot::SameAs(j) => {
                    same_as.push((views.len(), j));
                    views.push(None);
                    continue;
                }
            };
            if let Some(key) = &task.idempotency_key {
                mutations.push(Mutation::Idempotency {
                    key: key.clone(),
                    id: task.id,
                });
                self.ledger.idem.insert(key.clone(), task.id);
            }
            if task.state == TaskState::Blocked {
                for dep in &mut task.depends_on {
                    if let Some(a) = alias.get(dep) {
                        *dep = *a;
                    }
                }
                task.depends_on.sort();
                task.depends_on.dedup();
                if let Err(e) = self.settle_new_blocked(&mut task, now) {
                    // The queen is stopping: nothing this pass decided is answered.
                    let _ = reply.send(Err(e));
                    return;
                }
            }
            tracing::debug!(task_id = %task.id, queue = %task.queue, kind = %task.kind, state = %task.state, "task submitted");
            views.push(Some((task.view(), true)));
            self.metrics
                .submitted
                .with_label_values(&[task.queue.as_str()])
                .inc();
            if task.state.is_terminal() {
                let count = self.ledger.bump_finished(&task, &self.metrics);
                mutations.push(Mutation::finish(&task, count));
                self.ledger.remember_recent(seq, task);
            } else {
                mutations.push(Mutation::save(&task));
                self.dispatch.enqueue(&task);
                self.ledger.tasks.insert(Box::new(task));
            }
        }
        for (i, j) in same_as {
            views[i] = views.get(j).cloned().flatten().map(|(v, _)| (v, false));
        }
        let views: Vec<(TaskView, bool)> = views.into_iter().flatten().collect();
        let made = self.fx.reply_when_durable(mutations, reply, Ok(views));
        debug_assert_eq!(
            made, seq,
            "born-finished tasks were remembered under this commit"
        );
    }

    /// A new task with dependencies: cancelled if one already failed, runnable if all
    /// succeeded, otherwise blocked and registered with each dependency.
    fn settle_new_blocked(&mut self, task: &mut Task, now: Now) -> Result<(), CoreError> {
        // A dependency not found yet is a task of the same batch still being submitted.
        let mut states = Vec::with_capacity(task.depends_on.len());
        for dep in &task.depends_on {
            states.push((*dep, self.find_state(*dep)?));
        }
        let event = if let Some((dep, st)) = states
            .iter()
            .find(|(_, s)| matches!(s, Some(TaskState::Failed | TaskState::Cancelled)))
        {
            let st = st.map_or("gone", TaskState::as_str);
            Event::Cancel {
                reason: format!("dependency {dep} {st}"),
            }
        } else if states.iter().all(|(_, s)| *s == Some(TaskState::Succeeded)) {
            Event::DependenciesMet
        } else {
            for dep in &task.depends_on {
                self.ledger
                    .dependents
                    .entry(*dep)
                    .or_default()
                    .push(task.id);
            }
            return Ok(());
        };
        if let Err(refused) = lifecycle::apply(task, event, now.wall) {
            tracing::error!(task_id = %task.id, %refused, "a new blocked task could not be settled");
        }
        Ok(())
    }

    /// Where dependencies stand, the first one that ended without succeeding (or is gone)
    /// deciding. A failed read is an error (the queen stops).
    fn dependencies(&self, deps: &[TaskId]) -> Result<Deps, CoreError> {
        let mut out = Deps::AllSucceeded;
        for dep in deps {
            match self.find_state(*dep)? {
                Some(TaskState::Succeeded) => {}
                Some(state @ (TaskState::Failed | TaskState::Cancelled)) => {
                    return Ok(Deps::Ended {
                        dep: *dep,
                        state: Some(state),
                    })
                }
                None => {
                    return Ok(Deps::Ended {
                        dep: *dep,
                        state: None,
                    })
                }
                Some(_) => out = Deps::Waiting,
            }
        }
        Ok(out)
    }

    /// The task an idempotency key names, wherever it lives.
    fn lookup_idempotent(&self, key: &str) -> Result<Option<TaskView>, CoreError> {
        if let Some(id) = self.ledger.idem.get(key) {
            if let Some(t) = self.ledger.held(id) {
                return Ok(Some(t.view()));
            }
        }
        let id = self.read(self.lookup.idempotent(key), "an idempotency key")?;
        let Some(id) = id else { return Ok(None) };
        if let Some(t) = self.ledger.held(&id) {
            return Ok(Some(t.view()));
        }
        let finished = self.read(self.lookup.finished(id), "a finished task")?;
        Ok(finished.map(|t| t.view()))
    }

    /// The state of any task the queen knows, wherever it lives. A failed read is an
    /// error (and stops the queen), never "unknown task".
    pub(super) fn find_state(&self, id: TaskId) -> Result<Option<TaskState>, CoreError> {
        if let Some(state) = self
            .ledger
            .tasks
            .state(&id)
            .or_else(|| self.ledger.recent.get(&id).map(|(_, t)| t.state))
        {
            return Ok(Some(state));
        }
        let finished = self.read(self.lookup.finished(id), "a finished task")?;
        Ok(finished.map(|t| t.state))
    }

    pub(super) fn cancel_request(
        &mut self,
        id: TaskId,
        reason: String,
        reply: oneshot::Sender<Result<TaskView, CoreError>>,
        now: Now,
    ) {
        if !self.ledger.tasks.contains(&id) {
            let err = match self.find_state(id) {
                Ok(Some(state)) => CoreError::AlreadyFinished { id, state },
                Ok(None) => CoreError::UnknownTask(id),
                Err(e) => e,
            };
            let _ = reply.send(Err(err));
            return;
        }
        let view = self.cancel_task(id, reason, now);
        self.fx
            .reply_when_durable(Vec::new(), reply, view.ok_or(CoreError::UnknownTask(id)));
    }

    /// Cancels an active task (and, transitively, its blocked dependents). A running
    /// task's drone is told to stop once the cancel is durable.
    pub(super) fn cancel_task(&mut self, id: TaskId, reason: String, now: Now) -> Option<TaskView> {
        let mut task = *self.ledger.tasks.remove(&id)?;
        self.dispatch.dequeue(&task);
        let mut notify = None;
        if task.state == TaskState::Running {
            self.end_attempt(&task, now);
            self.fleet.orphans.remove(&id);
            let holder = task.lease.as_ref().map(|l| l.drone);
            if let Some(drone) = self.fleet.holder(holder) {
                notify = Some((drone.conn.clone(), drone.stop(id, task.fence, &reason)));
            }
        }
        tracing::info!(task_id = %id, fence = %task.fence, reason = %reason, "task cancelled");
        if let Err(refused) = lifecycle::apply(&mut task, Event::Cancel { reason }, now.wall) {
            // Every active task may be cancelled; this is a bug, so keep the task.
            tracing::error!(task_id = %id, %refused, "an active task could not be cancelled");
            self.ledger.tasks.insert(Box::new(task));
            return None;
        }
        let view = task.view();
        self.finish(task, now);
        if let Some((conn, msg)) = notify {
            self.fx.send_when_durable(Vec::new(), &conn, msg);
        }
        Some(view)
    }

    /// A failed or cancelled task runs again: a fresh set of attempts.
    pub(super) fn retry(
        &mut self,
        id: TaskId,
        reply: oneshot::Sender<Result<TaskView, CoreError>>,
        now: Now,
    ) {
        if let Some(state) = self.ledger.tasks.state(&id) {
            let _ = reply.send(Err(CoreError::NotRetryable { id, state }));
            return;
        }
        if let Some(refused) = self.refuse_new_work() {
            let _ = reply.send(Err(refused));
            return;
        }
        let found = match self.ledger.recent.get(&id) {
            Some((_, t)) => Some(t.clone()),
            None => match self.read(self.lookup.finished(id), "a finished task") {
                Ok(t) => t,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            },
        };
        let Some(mut task) = found else {
            let _ = reply.send(Err(CoreError::UnknownTask(id)));
            return;
        };
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            let state = task.state;
            let _ = reply.send(Err(CoreError::NotRetryable { id, state }));
            return;
        }
        // Its dependencies as for a new task: a task whose dependency ended without
        // succeeding could never run, and one whose dependencies are still running waits.
        // A task that was ever leased (fence above zero) saw them all succeed, and a
        // succeeded task stays so: it needs no check (its dependencies may be purged).
        let deps = if task.fence > shared::Fence::ZERO {
            Deps::AllSucceeded
        } else {
            match self.dependencies(&task.depends_on) {
                Ok(deps) => deps,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        };
        let blocked = match deps {
            Deps::AllSucceeded => false,
            Deps::Waiting => true,
            Deps::Ended {
                dep,
                state: Some(state),
            } => {
                let _ = reply.send(Err(CoreError::DependencyFailed { id, dep, state }));
                return;
            }
            Deps::Ended { dep, state: None } => {
                let _ = reply.send(Err(CoreError::DependencyGone { id, dep }));
                return;
            }
        };
        let finished_ms = task.finished_at.map(|t| t.timestamp_millis()).unwrap_or(0);
        let was = match lifecycle::apply(&mut task, Event::Retry { blocked }, now.wall) {
            Ok(Moved::Revived { was }) => was,
            _ => {
                let state = task.state;
                let _ = reply.send(Err(CoreError::NotRetryable { id, state }));
                return;
            }
        };
        self.ledger.recent.remove(&id);
        let n = self
            .ledger
            .finished_counts
            .entry((task.queue.clone(), was))
            .or_default();
        *n = n.saturating_sub(1);
        let count = *n;
        tracing::info!(task_id = %id, was = %was, fence = %task.fence, "task retried");
        self.metrics
            .retried
            .with_label_values(&[task.queue.as_str()])
            .inc();
        let m = Mutation::Revive {
            id,
            record: crate::store::record::encode(&task),
            finished_ms,
            queue: task.queue.clone(),
            state: was,
            count,
        };
        if let Some(key) = &task.idempotency_key {
            self.ledger.idem.insert(key.clone(), id);
        }
        if task.state == TaskState::Blocked {
            for dep in &task.depends_on {
                self.ledger.dependents.entry(*dep).or_default().push(id);
            }
        }
        self.dispatch.enqueue(&task);
        let view = task.view();
        self.ledger.tasks.insert(Box::new(task));
        self.fx.reply_when_durable(vec![m], reply, Ok(view));
    }

    /// Puts a task that is active again (requeued, retrying, unblocked) where its state
    /// says, and records it; a terminal one is finished.
    pub(super) fn place(&mut self, task: Task, now: Now) {
        if task.state.is_terminal() {
            self.finish(task, now);
            return;
        }
        if task.is_suspect() {
            self.dispatch.suspects.insert(task.id);
        } else if !self.dispatch.suspects.is_empty() {
            self.dispatch.suspects.remove(&task.id);
        }
        self.dispatch.enqueue(&task);
        let m = Mutation::save(&task);
        self.ledger.tasks.insert(Box::new(task));
        self.fx.write(vec![m]);
    }

    /// Records a terminal task (already removed from the active tasks) and settles its
    /// dependents.
    pub(super) fn finish(&mut self, task: Task, now: Now) {
        if !self.dispatch.suspects.is_empty() {
            self.dispatch.suspects.remove(&task.id);
        }
        if let Some(key) = &task.idempotency_key {
            if self.ledger.idem.get(key) == Some(&task.id) {
                self.ledger.idem.remove(key);
            }
        }
        let count = self.ledger.bump_finished(&task, &self.metrics);
        let seq = self.fx.write(vec![Mutation::finish(&task, count)]);
        let (id, state) = (task.id, task.state);
        self.ledger.remember_recent(seq, task);
        if let Some(waiting) = self.ledger.dependents.remove(&id) {
            for dep in waiting {
                if state == TaskState::Succeeded {
                    self.reevaluate_blocked(dep, now);
                } else if self.ledger.tasks.state(&dep) == Some(TaskState::Blocked) {
                    self.cancel_task(dep, format!("dependency {id} {state}"), now);
                }
            }
        }
    }

    /// Unblocks a blocked task whose dependencies all succeeded (or cancels it if one
    /// ended otherwise). A failed read leaves it blocked: the queen is stopping, and the
    /// next one decides from what is on disk.
    pub(super) fn reevaluate_blocked(&mut self, id: TaskId, now: Now) {
        let deps = match self.ledger.tasks.get(&id) {
            Some(task) if task.state == TaskState::Blocked => task.depends_on.clone(),
            _ => return,
        };
        match self.dependencies(&deps) {
            Err(_) => return,
            Ok(Deps::AllSucceeded) => {}
            Ok(Deps::Waiting) => return,
            Ok(Deps::Ended { dep, state }) => {
                let reason = match state {
                    Some(st) => format!("dependency {dep} {st}"),
                    None => format!("dependency {dep} no longer exists"),
                };
                self.cancel_task(id, reason, now);
                return;
            }
        }
        let Some(mut task) = self.ledger.tasks.remove(&id).map(|b| *b) else {
            return;
        };
        if let Err(refused) = lifecycle::apply(&mut task, Event::DependenciesMet, now.wall) {
            tracing::error!(task_id = %id, %refused, "a blocked task could not be unblocked");
            self.ledger.tasks.insert(Box::new(task));
            return;
        }
        self.place(task, now);
    }
}
