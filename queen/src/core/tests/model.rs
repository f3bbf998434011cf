//! A model-based property test of the core: random interleavings of submits (with
//! dependencies and idempotency keys), grants, heartbeats, outcomes (current, stale,
//! duplicated, reordered), drone deaths and reconnects, timeouts, stalls of the queen,
//! cancels, retries and restarts (recovery from what was durable), checked after every step
//! against what must always hold:
//!
//! - one live lease per task: no task is leased to two drones at once;
//! - a terminal task never changes, except by an accepted retry;
//! - fences only grow: every assign a drone receives carries a larger fence than any it
//!   saw for that task, and the queen's fence is never below one a drone has seen;
//! - an outcome is recorded only for the current fence of the lease holder; anything else
//!   changes nothing;
//! - a task runs only once every dependency succeeded, and a blocked task whose
//!   dependencies all succeeded does not stay blocked;
//! - counts match: the live counts equal a walk of the tasks, the ready queues hold
//!   exactly the pending tasks and the timer exactly the scheduled ones;
//! - nothing acknowledged is lost across a restart: every acknowledged submit is there,
//!   every outcome acked `recorded` stays recorded.
//!
//! `HIVE_MODEL_CASES` sets the number of cases (default below, about 20 s in a debug
//! build on two cores); `PROPTEST_RNG_SEED=<n>` replays a run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use shared::api::{Dependency, TaskSpec, TaskState, TaskView};
use shared::protocol::{AckStatus, Held, QueenMessage};
use shared::{DroneId, Fence, TaskId};
use tokio::sync::oneshot;

use super::harness::{config, Hive, Link};
use crate::core::{CoreError, Request};
use crate::task::Task;

const DEFAULT_CASES: u32 = 2_000;
const DRONES: usize = 3;
const SLOTS: u32 = 2;

fn cases() -> u32 {
    std::env::var("HIVE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

#[derive(Debug, Clone, Copy)]
enum Skew {
    Current,
    /// An earlier attempt's fence: a report that arrives late (reordered).
    Older,
    /// A fence the queen never granted.
    Newer,
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        deps: Vec<Index>,
        key: Option<u8>,
        max_attempts: u32,
        timeout: bool,
    },
    Connect(usize),
    Disconnect(usize),
    Heartbeat {
        drone: usize,
        forget: Option<Index>,
    },
    Complete {
        drone: usize,
        task: Index,
        skew: Skew,
        twice: bool,
    },
    Fail {
        drone: usize,
        task: Index,
        retryable: bool,
        skew: Skew,
    },
    Cancel(Index),
    Retry(Index),
    Advance(u64),
    /// The queen itself stalls (stopped, starved) for this long.
    Stall(u64),
    /// All commits so far become durable, or (Some) only the first few.
    Flush(Option<usize>),
    Restart,
}

fn skew() -> impl Strategy<Value = Skew> {
    prop_oneof![
        6 => Just(Skew::Current),
        2 => Just(Skew::Older),
        1 => Just(Skew::Newer),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let drone = 0..DRONES;
    prop_oneof![
        5 => (
            prop::collection::vec(any::<Index>(), 0..3),
            prop::option::weighted(0.3, 0u8..3),
            1u32..4,
            prop::bool::weighted(0.2),
        )
            .prop_map(|(deps, key, max_attempts, timeout)| Op::Submit {
                deps,
                key,
                max_attempts,
                timeout
            }),
        2 => drone.clone().prop_map(Op::Connect),
        1 => drone.clone().prop_map(Op::Disconnect),
        3 => (drone.clone(), prop::option::weighted(0.2, any::<Index>()))
            .prop_map(|(drone, forget)| Op::Heartbeat { drone, forget }),
        5 => (drone.clone(), any::<Index>(), skew(), prop::bool::weighted(0.2))
            .prop_map(|(drone, task, skew, twice)| Op::Complete { drone, task, skew, twice }),
        2 => (drone, any::<Index>(), any::<bool>(), skew())
            .prop_map(|(drone, task, retryable, skew)| Op::Fail { drone, task, retryable, skew }),
        1 => any::<Index>().prop_map(Op::Cancel),
        1 => any::<Index>().prop_map(Op::Retry),
        3 => prop_oneof![0u64..200, 200u64..3_000, Just(6_000)].prop_map(Op::Advance),
        1 => (1_000u64..12_000).prop_map(Op::Stall),
        3 => prop::option::weighted(0.3, 1usize..4).prop_map(Op::Flush),
        1 => Just(Op::Restart),
    ]
}

type SubmitReply = oneshot::Receiver<Result<Vec<(TaskView, bool)>, CoreError>>;

/// A drone as the test plays it: what it runs, by the fences it was given.
#[derive(Debug)]
struct FakeDrone {
    id: DroneId,
    link: Option<Link>,
    runs: BTreeMap<TaskId, Fence>,
    /// Every (task, fence) it was ever assigned, for late reports.
    history: Vec<(TaskId, Fence)>,
}

impl FakeDrone {
    /// What it says it holds, in a hello or a heartbeat.
    fn held(&self) -> Vec<Held> {
        self.runs
            .iter()
            .map(|(task_id, fence)| Held {
                task_id: *task_id,
                fence: *fence,
            })
            .collect()
    }
}

struct Model {
    hive: Hive,
    drones: Vec<FakeDrone>,
    /// Every task submitted, acknowledged or not, in submit order.
    ids: Vec<TaskId>,
    deps: HashMap<TaskId, Vec<TaskId>>,
    /// Submits not answered yet; answered ones move to `acked`.
    waiting: Vec<(TaskId, SubmitReply)>,
    acked: BTreeSet<TaskId>,
    /// The largest fence a drone was ever sent for each task.
    seen_fence: HashMap<TaskId, Fence>,
    /// Every fence granted to a drone, per task.
    granted: HashMap<TaskId, BTreeSet<Fence>>,
    /// Terminal tasks as first seen: (state, fence, attempts, errors).
    frozen: HashMap<TaskId, (TaskState, Fence, u32, usize)>,
    /// Outcomes acked `recorded`.
    recorded: Vec<(TaskId, Fence)>,
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

fn key_of(t: &TaskView) -> (TaskState, Fence, u32, usize) {
    (t.state, t.fence, t.attempts, t.errors.len())
}

impl Model {
    fn new() -> Model {
        Model {
            hive: Hive::new({
                // Suspects after one lost lease: isolation is crossed in most runs.
                let mut cfg = config();
                cfg.tasks.suspect_after_lost = 1;
                cfg.tasks.max_lost_attempts = 2;
                cfg
            }),
            drones: (0..DRONES)
                .map(|_| FakeDrone {
                    id: DroneId::generate(),
                    link: None,
                    runs: BTreeMap::new(),
                    history: Vec::new(),
                })
                .collect(),
            ids: Vec::new(),
            deps: HashMap::new(),
            waiting: Vec::new(),
            acked: BTreeSet::new(),
            seen_fence: HashMap::new(),
            granted: HashMap::new(),
            frozen: HashMap::new(),
            recorded: Vec::new(),
        }
    }

    /// A task's view wherever it lives: held by the core, or finished on disk.
    fn view(&mut self, id: TaskId) -> Option<TaskView> {
        self.hive
            .get(id)
            .or_else(|| self.hive.disk().task(id).map(|t| t.view()))
    }

    fn pick(&self, i: &Index) -> Option<TaskId> {
        (!self.ids.is_empty()).then(|| *i.get(&self.ids))
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Submit {
                deps,
                key,
                max_attempts,
                timeout,
            } => {
                let deps: Vec<TaskId> = deps.iter().filter_map(|i| self.pick(i)).collect();
                let spec = TaskSpec {
                    kind: "echo".into(),
                    depends_on: deps.iter().map(|d| Dependency::Id(*d)).collect(),
                    idempotency_key: key.map(|k| format!("key-{k}")),
                    max_attempts: Some(*max_attempts),
                    timeout_ms: timeout.then_some(2_000),
                    ..Default::default()
                };
                let h = &mut self.hive;
                let task = Task::from_spec(spec, TaskId::generate(), h.now.wall, &h.cfg.tasks)
                    .map_err(|e| TestCaseError::fail(e.0))?;
                let id = task.id;
                let rx = h.ask(|reply| Request::Submit {
                    tasks: vec![task],
                    reply,
                });
                self.ids.push(id);
                self.deps.insert(id, deps);
                self.waiting.push((id, rx));
            }
            Op::Connect(i) => {
                let d = &mut self.drones[*i];
                let held = d.held();
                d.link = Some(self.hive.connect(&format!("d{i}"), SLOTS, held, Some(d.id)));
            }
            Op::Disconnect(i) => {
                if let Some(link) = self.drones[*i].link.take() {
                    self.hive.close(&link);
                }
            }
            Op::Heartbeat { drone, forget } => {
                let d = &mut self.drones[*drone];
                if let Some(f) = forget {
                    let tasks: Vec<TaskId> = d.runs.keys().copied().collect();
                    if !tasks.is_empty() {
                        d.runs.remove(f.get(&tasks));
                    }
                }
                if let Some(link) = &d.link {
                    let held = d.held();
                    self.hive.heartbeat(link, held);
                }
            }
            Op::Complete {
                drone,
                task,
                skew,
                twice,
            } => {
                for _ in 0..if *twice { 2 } else { 1 } {
                    self.report(*drone, task, *skew, None)?;
                }
            }
            Op::Fail {
                drone,
                task,
                retryable,
                skew,
            } => self.report(*drone, task, *skew, Some(*retryable))?,
            Op::Cancel(i) => {
                if let Some(id) = self.pick(i) {
                    // Nobody waits for the answer; the invariants judge the outcome.
                    drop(self.hive.ask(|reply| Request::Cancel {
                        id,
                        reason: "model".into(),
                        reply,
                    }));
                }
            }
            Op::Retry(i) => {
                if let Some(id) = self.pick(i) {
                    drop(self.hive.ask(|reply| Request::Retry { id, reply }));
                    if self.hive.core.ledger.tasks.contains(&id) {
                        // Accepted: a fresh set of attempts may change it, but only a task
                        // that failed or was cancelled may be retried.
                        if let Some((state, ..)) = self.frozen.remove(&id) {
                            check(
                                matches!(state, TaskState::Failed | TaskState::Cancelled),
                                || format!("a {state} task {id} was retried"),
                            )?;
                        }
                    }
                }
            }
            Op::Advance(ms) => self.hive.advance(Duration::from_millis(*ms)),
            Op::Stall(ms) => self.hive.stall(Duration::from_millis(*ms)),
            Op::Flush(None) => self.hive.flush(),
            Op::Flush(Some(n)) => self.hive.flush_first(*n),
            Op::Restart => return self.restart(),
        }
        self.hive.pass();
        self.deliver()?;
        self.invariants()
    }

    /// A drone reports an outcome; whatever fence it carries, only the current lease
    /// holder's current fence may change the task.
    fn report(
        &mut self,
        drone: usize,
        pick: &Index,
        skew: Skew,
        failed: Option<bool>,
    ) -> Result<(), TestCaseError> {
        let d = &self.drones[drone];
        let Some(link) = &d.link else { return Ok(()) };
        let (task_id, fence) = match skew {
            Skew::Current => {
                let runs: Vec<(TaskId, Fence)> = d.runs.iter().map(|(t, f)| (*t, *f)).collect();
                if runs.is_empty() {
                    return Ok(());
                }
                *pick.get(&runs)
            }
            Skew::Older => {
                if d.history.is_empty() {
                    return Ok(());
                }
                *pick.get(&d.history)
            }
            Skew::Newer => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                (id, Fence(self.seen_fence.get(&id).map_or(0, |f| f.0) + 1))
            }
        };
        let before = self.hive.core.ledger.held(&task_id).map(|t| {
            let holder = t.lease.as_ref().map(|l| l.drone);
            (t.state, t.fence, holder, key_of(&t.view()))
        });
        let current =
            matches!(before, Some((TaskState::Running, f, Some(h), _)) if f == fence && h == d.id);
        match failed {
            None => self.hive.complete(link, task_id, fence),
            Some(retryable) => self.hive.fail(link, task_id, fence, retryable),
        }
        if matches!(skew, Skew::Current) {
            self.drones[drone].runs.remove(&task_id);
        }
        let after = self
            .hive
            .core
            .ledger
            .held(&task_id)
            .map(|t| key_of(&t.view()));
        if current {
            check(
                after.is_none_or(|(state, f, _, _)| state != TaskState::Running || f != fence),
                || format!("the current fence's outcome was not recorded for {task_id}"),
            )?;
        } else {
            let was = before.map(|b| b.3);
            check(after == was || (was.is_none() && after.is_none()), || {
                format!("a stale outcome (fence {fence}) changed {task_id}: {was:?} -> {after:?}")
            })?;
        }
        Ok(())
    }

    /// Drones read what the queen sent them.
    fn deliver(&mut self) -> Result<(), TestCaseError> {
        for i in 0..DRONES {
            let Some(link) = self.drones[i].link.as_mut() else {
                continue;
            };
            if link.close.is_cancelled() {
                // The queen closed the connection: the drone notices and reconnects later.
                self.drones[i].link = None;
                continue;
            }
            for msg in link.inbox() {
                match msg {
                    QueenMessage::Assign(a) => {
                        // Each grant has a fence of its own, and one drone sees a task's
                        // fences grow.
                        let granted = self.granted.entry(a.task_id).or_default();
                        check(granted.insert(a.fence), || {
                            format!("{} granted twice under fence {}", a.task_id, a.fence)
                        })?;
                        let last = self.drones[i]
                            .history
                            .iter()
                            .filter(|(t, _)| *t == a.task_id)
                            .map(|(_, f)| *f)
                            .max();
                        check(last.is_none_or(|l| a.fence > l), || {
                            format!(
                                "assign of {} under fence {} after {last:?}",
                                a.task_id, a.fence
                            )
                        })?;
                        let seen = self.seen_fence.entry(a.task_id).or_insert(a.fence);
                        *seen = (*seen).max(a.fence);
                        for dep in self.deps.get(&a.task_id).cloned().unwrap_or_default() {
                            let state = self.view(dep).map(|v| v.state);
                            check(state == Some(TaskState::Succeeded), || {
                                format!(
                                    "{} runs before its dependency {dep} succeeded ({state:?})",
                                    a.task_id
                                )
                            })?;
                        }
                        let d = &mut self.drones[i];
                        d.runs.insert(a.task_id, a.fence);
                        d.history.push((a.task_id, a.fence));
                    }
                    QueenMessage::Cancel(c) => {
                        let d = &mut self.drones[i];
                        if d.runs.get(&c.task_id) == Some(&c.fence) {
                            d.runs.remove(&c.task_id);
                        }
                    }
                    QueenMessage::Ack(ack) if ack.status == AckStatus::Recorded => {
                        self.recorded.push((ack.task_id, ack.fence));
                    }
                    _ => {}
                }
            }
        }
        let mut still = Vec::new();
        for (id, mut rx) in std::mem::take(&mut self.waiting) {
            match rx.try_recv() {
                // The task acknowledged is the one returned: an idempotency key may have
                // matched an earlier task instead of creating this one.
                Ok(Ok(views)) => {
                    self.acked.extend(views.iter().map(|(v, _)| v.id));
                }
                Ok(Err(_)) => {}
                Err(oneshot::error::TryRecvError::Empty) => still.push((id, rx)),
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
        }
        self.waiting = still;
        Ok(())
    }

    fn invariants(&mut self) -> Result<(), TestCaseError> {
        let core = &self.hive.core;
        // One live lease per task.
        let mut holders: HashMap<TaskId, DroneId> = HashMap::new();
        for drone in core.fleet.drones.values() {
            for task in drone.leases.keys() {
                if let Some(other) = holders.insert(*task, drone.id) {
                    return Err(TestCaseError::fail(format!(
                        "{task} is leased to {other} and {}",
                        drone.id
                    )));
                }
            }
        }
        // Every lease a drone holds is its task's current lease: running, held by that
        // drone, under that fence (a stale entry would leak a slot).
        for drone in core.fleet.drones.values() {
            for (task, lease) in &drone.leases {
                let ok = core.ledger.tasks.get(task).is_some_and(|t| {
                    t.state == TaskState::Running
                        && t.fence == lease.fence
                        && t.lease.as_ref().is_some_and(|l| l.drone == drone.id)
                });
                check(ok, || {
                    format!("{} holds a lease on {task} that is not current", drone.id)
                })?;
            }
        }
        // Counts match a walk; ready and timer hold exactly the waiting tasks.
        let mut walked: BTreeMap<TaskState, u64> = BTreeMap::new();
        let entries: Vec<(TaskId, TaskState)> = core
            .ledger
            .tasks
            .newest_first(None)
            .map(|e| (e.id, e.state))
            .collect();
        for (_, state) in &entries {
            *walked.entry(*state).or_default() += 1;
        }
        let mut counted: BTreeMap<TaskState, u64> = BTreeMap::new();
        for (_, state, n) in core.ledger.tasks.counts() {
            *counted.entry(state).or_default() += n;
        }
        check(walked == counted, || {
            format!("counts {counted:?} but the tasks are {walked:?}")
        })?;
        let n = |s| walked.get(&s).copied().unwrap_or(0) as usize;
        let alone = core.dispatch.waiting_alone.len();
        check(
            core.dispatch.ready.len() + alone == n(TaskState::Pending),
            || {
                format!(
                    "{} ready entries and {alone} suspects waiting for a drone for {} pending tasks",
                    core.dispatch.ready.len(),
                    n(TaskState::Pending)
                )
            },
        )?;
        // Suspects: exactly the active tasks under suspicion; each runs alone on its
        // drone; only a pending suspect holds a drone, and only one.
        let mut suspects = HashSet::new();
        for (id, state) in &entries {
            let Some(task) = core.ledger.tasks.get(id) else {
                continue;
            };
            if !task.is_suspect() {
                continue;
            }
            suspects.insert(*id);
            if *state != TaskState::Running {
                continue;
            }
            let Some(drone) = task
                .lease
                .as_ref()
                .and_then(|l| core.fleet.drones.get(&l.drone))
            else {
                continue;
            };
            check(
                drone.leases.len() == 1 && drone.isolating == Some(*id),
                || {
                    format!(
                        "suspect {id} does not run alone on {}: leases {:?}, isolating {:?}",
                        drone.id,
                        drone.leases.keys().collect::<Vec<_>>(),
                        drone.isolating
                    )
                },
            )?;
        }
        check(core.dispatch.suspects == suspects, || {
            format!(
                "suspects {:?} but the tasks under suspicion are {suspects:?}",
                core.dispatch.suspects
            )
        })?;
        for (drone, id) in &core.dispatch.reserved {
            let waiting = core.dispatch.waiting_alone.iter().any(|s| s.id == *id);
            check(waiting, || {
                format!("{drone} is held for {id}, which does not wait for a drone")
            })?;
        }
        for drone in core.fleet.drones.values() {
            if let Some(id) = drone.isolating {
                let there = drone.leases.contains_key(&id) || drone.cancelling.contains(&id);
                check(there, || {
                    format!(
                        "{} is kept for {id}, which it neither runs nor stops",
                        drone.id
                    )
                })?;
            }
        }
        // A suspect awaiting its verdict waits, scheduled, and is judged when due.
        for (id, state) in &entries {
            let awaiting = core
                .ledger
                .tasks
                .get(id)
                .is_some_and(|t| t.suspicion.as_ref().is_some_and(|s| s.awaiting()));
            check(!awaiting || *state == TaskState::Scheduled, || {
                format!("{id} awaits a verdict but is {state}")
            })?;
        }
        check(
            core.dispatch.scheduled.len() == n(TaskState::Scheduled),
            || {
                format!(
                    "{} timers for {} scheduled tasks",
                    core.dispatch.scheduled.len(),
                    n(TaskState::Scheduled)
                )
            },
        )?;
        // A running task is leased to a connected drone or waits for one as an orphan,
        // and the queen's fence is never below what a drone was sent.
        for (id, state) in &entries {
            let Some(task) = core.ledger.tasks.get(id) else {
                return Err(TestCaseError::fail(format!(
                    "{id} is indexed but cannot be read"
                )));
            };
            let seen = self.seen_fence.get(id).copied().unwrap_or(Fence(0));
            check(task.fence >= seen, || {
                format!("{id}: fence {} below {seen} a drone saw", task.fence)
            })?;
            if *state == TaskState::Running {
                let leased = task.lease.as_ref().is_some_and(|l| {
                    core.fleet
                        .drones
                        .get(&l.drone)
                        .is_some_and(|d| d.leases.get(id).is_some_and(|ll| ll.fence == task.fence))
                });
                check(leased || core.fleet.orphans.contains_key(id), || {
                    format!("{id} is running with neither a live lease nor an orphan deadline")
                })?;
            }
        }
        // A blocked task whose dependencies all succeeded does not stay blocked.
        for (id, state) in &entries {
            if *state != TaskState::Blocked {
                continue;
            }
            let deps = core
                .ledger
                .tasks
                .get(id)
                .map(|t| t.depends_on.clone())
                .unwrap_or_default();
            let all = deps
                .iter()
                .all(|d| core.find_state(*d).ok().flatten() == Some(TaskState::Succeeded));
            check(!all, || {
                format!("{id} stays blocked though {deps:?} all succeeded")
            })?;
        }
        // Terminal tasks never change (retries excepted, see `Op::Retry`).
        let ids = self.ids.clone();
        for id in ids {
            let Some(view) = self.view(id) else { continue };
            match self.frozen.get(&id) {
                Some(frozen) => check(*frozen == key_of(&view), || {
                    format!("terminal {id} changed: {frozen:?} -> {:?}", key_of(&view))
                })?,
                None if view.state.is_terminal() => {
                    self.frozen.insert(id, key_of(&view));
                }
                None => {}
            }
        }
        check(!self.hive.fatal(), || "the core stopped".into())
    }

    /// The queen dies and restarts from its disk; drones lose their connections but keep
    /// running what they run, and come back with it in their hello.
    fn restart(&mut self) -> Result<(), TestCaseError> {
        let hive = std::mem::replace(&mut self.hive, Hive::new(config()));
        self.hive = hive.restart();
        for d in &mut self.drones {
            d.link = None;
        }
        // Unanswered submits were never acknowledged: they may or may not be there.
        self.waiting.clear();
        // What is terminal now is what was durable.
        self.frozen.clear();
        for id in self.acked.clone() {
            check(self.view(id).is_some(), || {
                format!("acknowledged task {id} lost in a restart")
            })?;
        }
        for (id, fence) in self.recorded.clone() {
            let view = self.view(id);
            let kept = view.as_ref().is_some_and(|v| {
                v.fence > fence || (v.fence == fence && v.state != TaskState::Running)
            });
            check(kept, || {
                format!("the recorded outcome of {id} under {fence} was lost: {view:?}")
            })?;
        }
        self.hive.pass();
        self.invariants()
    }
}

#[test]
fn random_interleavings_keep_every_invariant_of_the_core() {
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases())
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&prop::collection::vec(op(), 1..120), |ops| {
        let mut model = Model::new();
        for op in &ops {
            model.step(op)?;
        }
        // Whatever happened, once everything is durable the invariants still hold and
        // a restart loses nothing acknowledged.
        model.hive.settle();
        model.deliver()?;
        model.restart()
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
