//! The fleet: connected drones, their leases and slots, heartbeats and checkpoints, and
//! the leases whose drone is gone (orphans), given up when the drone does not come back
//! in time. Liveness is in memory: every drone message refreshes `last_seen`.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::api::{DroneView, TaskState};
use shared::protocol::{
    CancelTask, DroneMessage, Held, Hello, QueenMessage, Welcome, PROTOCOL_VERSION,
};
use shared::{DroneId, Fence, TaskId};
use tokio::time::Instant;

use super::api::Conn;
use super::attempts::Loss;
use super::{Core, Now};
use crate::ready::Route;
use crate::rules::{self, LiveLease, Reattach};
use crate::store::Mutation;

#[derive(Debug)]
pub(super) struct Drone {
    pub id: DroneId,
    pub name: String,
    pub labels: BTreeSet<String>,
    pub kinds: HashSet<String>,
    pub slots: u32,
    pub conn: Conn,
    pub leases: HashMap<TaskId, LiveLease>,
    /// Tasks the drone was told to cancel; they occupy a slot until it stops reporting them.
    pub cancelling: HashSet<TaskId>,
    /// Tasks whose outcome the drone reported; held until acked, but no longer in a slot.
    pub reported: HashSet<TaskId>,
    pub last_seen: Instant,
    pub last_seen_wall: DateTime<Utc>,
    pub assigns_sent: u64,
    pub draining: bool,
    /// Its worker pools, as its last heartbeat reported them.
    pub pools: Vec<shared::protocol::PoolStatus>,
    /// The drone's hello asked for a `pong` after each heartbeat (drones that did not
    /// would not understand one).
    pub pongs: bool,
    /// The suspect this drone runs alone: it takes no other task until that attempt is
    /// over, stopping included (drones held for a waiting suspect are
    /// `Dispatch::reserved`).
    pub isolating: Option<TaskId>,
}

impl Drone {
    pub fn free_slots(&self) -> usize {
        if self.draining || self.isolating.is_some() {
            return 0;
        }
        (self.slots as usize).saturating_sub(self.leases.len() + self.cancelling.len())
    }

    /// Ends this drone's isolation once its suspect neither runs here nor is being
    /// stopped here (a stopped attempt may still kill the drone): it takes other work
    /// again. Returns whether it did.
    pub fn settle_isolation(&mut self) -> bool {
        match self.isolating {
            Some(t) if !self.leases.contains_key(&t) && !self.cancelling.contains(&t) => {
                self.isolating = None;
                true
            }
            _ => false,
        }
    }

    /// The tasks in this drone's slots: running, or being stopped.
    pub fn held(&self) -> u32 {
        (self.leases.len() + self.cancelling.len()) as u32
    }

    /// Nothing runs here and nothing is being stopped: a suspect may run here alone.
    pub fn is_idle(&self) -> bool {
        self.leases.is_empty() && self.cancelling.is_empty()
    }

    /// Could run `suspect` (of `route`) alone here, now or once its other tasks end.
    pub fn could_isolate(&self, route: &Route, suspect: TaskId) -> bool {
        !self.draining
            && self.isolating.is_none_or(|t| t == suspect)
            && route.served_by(&self.kinds, &self.labels)
    }

    /// The one way to take an attempt away from a drone: its lease (if it is this
    /// fence's) goes, the slot stays taken until the drone stops reporting the task, and
    /// the returned message tells the drone to stop it.
    pub fn stop(&mut self, task_id: TaskId, fence: Fence, reason: &str) -> QueenMessage {
        if self.leases.get(&task_id).is_some_and(|l| l.fence == fence) {
            self.leases.remove(&task_id);
        }
        self.cancelling.insert(task_id);
        QueenMessage::Cancel(CancelTask {
            task_id,
            fence,
            reason: reason.to_string(),
        })
    }

    fn view(&self) -> DroneView {
        let mut running: Vec<TaskId> = self.leases.keys().copied().collect();
        running.sort();
        let mut labels: Vec<String> = self.labels.iter().cloned().collect();
        labels.sort();
        let mut kinds: Vec<String> = self.kinds.iter().cloned().collect();
        kinds.sort();
        DroneView {
            id: self.id,
            name: self.name.clone(),
            labels,
            kinds,
            slots: self.slots,
            running,
            connected: true,
            draining: self.draining,
            last_seen: self.last_seen_wall,
            pools: self.pools.clone(),
        }
    }
}

#[derive(Debug)]
pub(super) struct Fleet {
    pub drones: HashMap<DroneId, Drone>,
    pub by_conn: HashMap<u64, DroneId>,
    /// Running leases with no connected holder, and when they are given up.
    pub orphans: HashMap<TaskId, Instant>,
    /// Drones lost lately with work on them (connection closed, or silent), oldest
    /// first: a suspect's lone attempt lost around the same time as other drones is no
    /// evidence (a rack, a deploy or an OOM storm took them all).
    pub recent_losses: VecDeque<DroneLoss>,
    next_check: Instant,
}

/// Most recent drone losses remembered.
const MAX_RECENT_LOSSES: usize = 4_096;
/// Losses noticed this close after a task's own previous loss belong to that event (the
/// same kill, noticed a moment apart): they do not make its next loss look correlated.
const SAME_EVENT: Duration = Duration::from_millis(100);

/// A drone lost with work on it.
#[derive(Debug, Clone, Copy)]
pub(super) struct DroneLoss {
    pub at: Instant,
    pub drone: DroneId,
    /// The tasks in its slots then.
    pub held: u32,
}

impl Fleet {
    pub fn new(now: Now) -> Fleet {
        Fleet {
            drones: HashMap::new(),
            by_conn: HashMap::new(),
            orphans: HashMap::new(),
            recent_losses: VecDeque::new(),
            next_check: now.mono,
        }
    }

    /// Remembers that a drone holding `held` tasks was lost at `at`, forgetting losses
    /// too old to correlate with anything still waiting for a verdict.
    pub fn record_loss(&mut self, drone: DroneId, at: Instant, held: u32, window: Duration) {
        while self.recent_losses.len() >= MAX_RECENT_LOSSES
            || self
                .recent_losses
                .front()
                .is_some_and(|l| l.at + window * 4 < at)
        {
            self.recent_losses.pop_front();
        }
        self.recent_losses.push_back(DroneLoss { at, drone, held });
    }

    /// The last recorded loss of a drone.
    pub fn last_loss(&self, drone: DroneId) -> Option<DroneLoss> {
        self.recent_losses
            .iter()
            .rev()
            .find(|l| l.drone == drone)
            .copied()
    }

    /// Whether another drone was lost within `window` of `at` (when `drone` was lost),
    /// counting only losses after `after`, the task's own previous loss: the drones a
    /// poison task took down itself (one after the other) are not a mass failure.
    pub fn lost_together(
        &self,
        drone: DroneId,
        at: Instant,
        after: Option<Instant>,
        window: Duration,
    ) -> bool {
        self.recent_losses.iter().any(|l| {
            l.drone != drone
                && after.is_none_or(|a| l.at > a + SAME_EVENT)
                && l.at
                    .saturating_duration_since(at)
                    .max(at.saturating_duration_since(l.at))
                    <= window
        })
    }

    /// Disconnects a drone; its leases become orphans given up at `deadline`.
    pub fn detach(&mut self, id: DroneId, deadline: Instant) {
        let Some(drone) = self.drones.remove(&id) else {
            return;
        };
        self.by_conn.remove(&drone.conn.id);
        drone.conn.close.cancel();
        for tid in drone.leases.into_keys() {
            self.orphans.insert(tid, deadline);
        }
    }

    /// After a stall of the queen's own: every drone's silence and every orphan's grace
    /// is paused for the stall (a drone's last contact moves on by it, never past now),
    /// and silent drones are judged again only after `hold`, so frames that waited in the
    /// sockets are read first (a short hold: a longer one, renewed by every stall, would
    /// keep a queen that stalls often from ever judging).
    pub fn forgive(
        &mut self,
        now: Instant,
        stalled: std::time::Duration,
        hold: std::time::Duration,
    ) {
        for drone in self.drones.values_mut() {
            drone.last_seen = (drone.last_seen + stalled).min(now);
        }
        for deadline in self.orphans.values_mut() {
            *deadline += stalled;
        }
        self.next_check = self.next_check.max(now + hold);
    }

    pub fn close_all(&self) {
        for drone in self.drones.values() {
            drone.conn.close.cancel();
        }
    }

    pub fn views(&self) -> Vec<DroneView> {
        let mut views: Vec<DroneView> = self.drones.values().map(Drone::view).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        views
    }

    /// The holder of a task's lease, if it is connected.
    pub fn holder(&mut self, holder: Option<DroneId>) -> Option<&mut Drone> {
        holder.and_then(|h| self.drones.get_mut(&h))
    }
}

impl Core {
    /// A drone joins. Its hello was checked at the connection edge (version, token,
    /// shape: `shared::protocol::check_hello` in `server.rs`), so the core only ever sees
    /// one it may accept.
    pub(super) fn hello(&mut self, hello: Hello, conn: Conn, now: Now) {
        if self.fleet.drones.contains_key(&hello.drone_id) {
            // The same drone on a new connection: the old one is dead or dying.
            let grace = self.cfg.leases.reconnect_grace();
            self.fleet.detach(hello.drone_id, now.mono + grace);
        }
        conn.send(QueenMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: self.cfg.leases.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.cfg.leases.heartbeat_timeout_ms,
            epoch: self.epoch,
            pongs: hello.pongs.then_some(true),
            // The connection's edge (server.rs) fills in the wire encoding it chose.
            encoding: None,
        }));
        let id = hello.drone_id;
        let mut drone = Drone {
            id,
            name: hello.name,
            labels: hello.labels.into_iter().collect(),
            kinds: hello.kinds.into_iter().collect(),
            slots: hello.slots,
            conn,
            leases: HashMap::new(),
            cancelling: HashSet::new(),
            reported: HashSet::new(),
            last_seen: now.mono,
            last_seen_wall: now.wall,
            assigns_sent: 0,
            draining: hello.draining,
            pongs: hello.pongs,
            pools: hello.pools,
            isolating: None,
        };
        let mut reattached = 0;
        for held in &hello.held {
            let current = self
                .ledger
                .tasks
                .get(&held.task_id)
                .map(|t| (t.state, t.fence, t.lease.as_ref().map(|l| l.drone)));
            match rules::reattach(current, id, held.fence) {
                Reattach::Keep => {
                    self.fleet.orphans.remove(&held.task_id);
                    if self.dispatch.suspects.contains(&held.task_id) {
                        drone.isolating = Some(held.task_id);
                    }
                    drone.leases.insert(
                        held.task_id,
                        LiveLease {
                            fence: held.fence,
                            ordinal: 0,
                        },
                    );
                    reattached += 1;
                    tracing::info!(task_id = %held.task_id, drone = %id, fence = %held.fence, "lease re-attached");
                }
                Reattach::Cancel => {
                    tracing::info!(task_id = %held.task_id, drone = %id, fence = %held.fence, "drone holds a stale lease; telling it to stop");
                    let msg = drone.stop(held.task_id, held.fence, "lease is no longer valid");
                    drone.conn.send(msg);
                }
            }
        }
        tracing::info!(drone = %id, name = %drone.name, slots = drone.slots, reattached, "drone connected");
        self.fleet.by_conn.insert(drone.conn.id, id);
        self.fleet.drones.insert(id, drone);
        self.dispatch.slot_may_have_freed(id);
        // Orphaned leases of this drone that it did not report are gone with its old life.
        let tasks = &self.ledger.tasks;
        let lost: Vec<TaskId> = self
            .fleet
            .orphans
            .keys()
            .filter(|tid| {
                tasks
                    .get(tid)
                    .is_some_and(|t| t.lease.as_ref().is_some_and(|l| l.drone == id))
            })
            .copied()
            .collect();
        if lost.is_empty() {
            return;
        }
        // It came back without them: its old life died holding them, beside the ones it
        // did bring back.
        let held = (lost.len() + reattached) as u32;
        // Its connection's close, if that was noticed (within the orphans' grace); else now.
        let recent = self.cfg.leases.reconnect_grace() + self.cfg.leases.heartbeat_timeout();
        let at = match self.fleet.last_loss(id) {
            Some(l) if now.mono.saturating_duration_since(l.at) <= recent => l.at,
            _ => {
                self.fleet
                    .record_loss(id, now.mono, held, self.loss_window());
                now.mono
            }
        };
        let loss = Loss {
            co_tenants: held.saturating_sub(1),
            at,
            drone_died: true,
        };
        for tid in lost {
            self.fleet.orphans.remove(&tid);
            self.lose_lease(tid, "drone reconnected without the task", loss, now);
        }
    }

    pub(super) fn closed(&mut self, conn: u64, now: Now) {
        if let Some(drone) = self.fleet.by_conn.get(&conn).copied() {
            tracing::info!(drone = %drone, "drone disconnected; its leases wait for it to reconnect");
            let grace = self.cfg.leases.reconnect_grace();
            let held = self.fleet.drones.get(&drone).map_or(0, Drone::held);
            if held > 0 {
                let window = self.loss_window();
                self.fleet.record_loss(drone, now.mono, held, window);
            }
            self.fleet.detach(drone, now.mono + grace);
        }
    }

    /// Drones lost within this of each other were lost together: `[tasks]
    /// loss_correlation_ms`, and at least twice the heartbeat timeout, since silence is
    /// noticed that late.
    pub(super) fn loss_window(&self) -> Duration {
        Duration::from_millis(self.cfg.tasks.loss_correlation_ms)
            .max(self.cfg.leases.heartbeat_timeout() * 2)
    }

    pub(super) fn drone_message(&mut self, conn: u64, msg: DroneMessage, now: Now) {
        let Some(id) = self.fleet.by_conn.get(&conn).copied() else {
            return;
        };
        let Some(drone) = self.fleet.drones.get_mut(&id) else {
            return;
        };
        drone.last_seen = now.mono;
        drone.last_seen_wall = now.wall;
        match msg {
            DroneMessage::Hello(_) => {
                tracing::warn!(drone = %id, "second hello on one connection ignored");
            }
            DroneMessage::Drain => {
                tracing::info!(drone = %id, "drone is draining: no new leases");
                drone.draining = true;
            }
            DroneMessage::Heartbeat(hb) => {
                if drone.pongs {
                    // A sign of life for a drone that cannot otherwise tell a frozen queen
                    // from an idle one: one tiny frame per heartbeat, nothing to compute.
                    drone.conn.send(QueenMessage::Pong);
                }
                drone.pools = hb.pools;
                self.checkpoints(id, hb.checkpoints);
                self.heartbeat(id, &hb.held, hb.assigns_seen, now)
            }
            DroneMessage::TaskComplete(c) => {
                let result = super::cap_result(c.result, self.cfg.tasks.max_result_bytes);
                self.outcome(id, c.task_id, c.fence, Ok(result), now);
            }
            DroneMessage::TaskFailed(f) => {
                let result = f
                    .result
                    .map(|r| super::cap_result(r, self.cfg.tasks.max_result_bytes));
                self.outcome(
                    id,
                    f.task_id,
                    f.fence,
                    Err((f.error, f.retryable, result)),
                    now,
                );
            }
        }
    }

    /// Stores checkpoints reported for current leases of this drone; anything else (an
    /// old fence, another drone's task, an oversized checkpoint) is ignored.
    fn checkpoints(&mut self, drone: DroneId, reports: Vec<shared::protocol::Checkpoint>) {
        let max = self.cfg.tasks.max_checkpoint_bytes;
        for c in reports {
            // Only a running task (always held whole) can take one: a report naming any
            // other task must not pull it back into memory.
            if self.ledger.tasks.state(&c.task_id) != Some(TaskState::Running) {
                continue;
            }
            let Some(mut task) = self.ledger.tasks.get_mut(&c.task_id) else {
                continue;
            };
            let current = task.state == TaskState::Running
                && task.fence == c.fence
                && task.lease.as_ref().is_some_and(|l| l.drone == drone);
            if !current {
                continue;
            }
            let size = c.data.to_string().len();
            if size > max {
                tracing::warn!(task_id = %c.task_id, fence = %c.fence, size, max, "checkpoint too large; ignored (tasks.max_checkpoint_bytes)");
                continue;
            }
            task.checkpoint = Some(Box::new(c.data));
            let m = Mutation::save(&task);
            drop(task);
            self.fx.write(vec![m]);
        }
    }

    /// Compares what the drone says it holds with its leases: leases it lost are given
    /// up, tasks it runs without a lease are stopped.
    fn heartbeat(&mut self, id: DroneId, held: &[Held], assigns_seen: u64, now: Now) {
        let Some(drone) = self.fleet.drones.get_mut(&id) else {
            return;
        };
        let known: HashSet<TaskId> = drone.cancelling.union(&drone.reported).copied().collect();
        let r = rules::reconcile(&drone.leases, &known, held, assigns_seen);
        for tid in &r.released {
            drone.cancelling.remove(tid);
            drone.reported.remove(tid);
        }
        if drone.settle_isolation() {
            self.dispatch.slot_may_have_freed(id);
        }
        for h in &r.foreign {
            tracing::info!(task_id = %h.task_id, drone = %id, fence = %h.fence, "drone runs a task it holds no lease for; telling it to stop");
            let msg = drone.stop(h.task_id, h.fence, "lease is no longer valid");
            drone.conn.send(msg);
        }
        // What it held, the forgotten ones included, when it forgot them. The drone lives:
        // no evidence against the tasks.
        let loss = Loss {
            co_tenants: drone.held().saturating_sub(1),
            at: now.mono,
            drone_died: false,
        };
        for tid in &r.missing {
            drone.leases.remove(tid);
        }
        if !r.released.is_empty() || !r.missing.is_empty() {
            self.dispatch.slot_may_have_freed(id);
        }
        for tid in r.missing {
            self.lose_lease(tid, "drone no longer reports the task", loss, now);
        }
    }

    /// Drones silent past the heartbeat timeout are detached; their leases are given up
    /// at once.
    pub(super) fn expire_silent_drones(&mut self, now: Now) {
        if now.mono < self.fleet.next_check {
            return;
        }
        self.fleet.next_check = now.mono + self.cfg.leases.heartbeat_interval() / 2;
        let timeout = self.cfg.leases.heartbeat_timeout();
        let silent: Vec<DroneId> = self
            .fleet
            .drones
            .values()
            .filter(|d| rules::is_silent(d.last_seen, now.mono, timeout))
            .map(|d| d.id)
            .collect();
        let window = self.loss_window();
        for id in silent {
            tracing::warn!(drone = %id, timeout_ms = timeout.as_millis() as u64, "drone silent past the heartbeat timeout; expiring its leases");
            let held = self.fleet.drones.get(&id).map_or(0, Drone::held);
            if held > 0 {
                self.fleet.record_loss(id, now.mono, held, window);
            }
            self.fleet.detach(id, now.mono);
        }
    }

    /// Orphaned leases whose drone did not come back in time are lost.
    pub(super) fn give_up_orphans(&mut self, now: Now) {
        let expired: Vec<TaskId> = self
            .fleet
            .orphans
            .iter()
            .filter(|(_, deadline)| **deadline <= now.mono)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return;
        }
        // Each orphan's drone was lost with what it held then. A drone never heard from
        // since a restart of the queen held the orphans of its leases on disk; whether it
        // died is unknown.
        let tasks = &self.ledger.tasks;
        let holder = |id: &TaskId| {
            tasks
                .get(id)
                .and_then(|t| t.lease.as_ref().map(|l| l.drone))
        };
        let mut unseen: HashMap<DroneId, u32> = HashMap::new();
        for id in self.fleet.orphans.keys() {
            if let Some(d) = holder(id) {
                *unseen.entry(d).or_default() += 1;
            }
        }
        let lost: Vec<(TaskId, Option<DroneId>)> =
            expired.into_iter().map(|id| (id, holder(&id))).collect();
        let unknown = Loss {
            co_tenants: 0,
            at: now.mono,
            drone_died: false,
        };
        let mut losses: HashMap<DroneId, Loss> = HashMap::new();
        for d in lost.iter().filter_map(|(_, d)| *d) {
            if losses.contains_key(&d) {
                continue;
            }
            let loss = match self.fleet.last_loss(d) {
                Some(l) => Loss {
                    co_tenants: l.held.saturating_sub(1),
                    at: l.at,
                    drone_died: true,
                },
                None => Loss {
                    co_tenants: unseen.get(&d).copied().unwrap_or(1).saturating_sub(1),
                    ..unknown
                },
            };
            losses.insert(d, loss);
        }
        let window = self.loss_window();
        for (d, loss) in &losses {
            if !loss.drone_died && !self.fleet.drones.contains_key(d) {
                // Never heard from since the restart: lost now, for the others' verdicts.
                self.fleet
                    .record_loss(*d, now.mono, loss.co_tenants + 1, window);
            }
        }
        for (id, drone) in lost {
            let loss = drone
                .and_then(|d| losses.get(&d).copied())
                .unwrap_or(unknown);
            self.fleet.orphans.remove(&id);
            self.lose_lease(id, "drone did not come back in time", loss, now);
        }
    }
}
