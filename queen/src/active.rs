//! The active (non-terminal) tasks the core holds, ordered by id (ids are time-ordered),
//! with live counts per queue and state. Counts move on every insert, removal and state
//! change, so `/v1/stats`, `/v1/queues` and `/metrics` never walk the tasks, and a list
//! of the newest tasks stops as soon as it has enough.
//!
//! **Hot and cold.** About `hot_max` tasks are held whole ("hot"). Beyond that, waiting
//! tasks (pending, scheduled, blocked) whose latest record is durable are *demoted*: the
//! map keeps only their queue and state (16 bytes), and the task is read back from the
//! store when it is next leased, viewed or changed ("faulted in"). Memory for a backlog of
//! a million tasks is then the index, not a million tasks.
//!
//! A demoted task must read back exactly as it was held, so a task is demoted only once
//! the commit carrying its last change is durable: the core [`seal`](ActiveTasks::seal)s
//! each pass with the number of commits made so far, which stamps every task touched in
//! the pass (every change is committed in the pass that makes it), and
//! [`demote`](ActiveTasks::demote) takes only stamps the writer has made durable. The one
//! change the core keeps in memory only, a scheduled task whose time came becoming
//! pending, is kept in the cold entry's state and reapplied when the task is read back.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{Deref, DerefMut};

use shared::api::TaskState;
use shared::TaskId;
use tokio_util::sync::CancellationToken;

use crate::core::Lookup;
use crate::store::record::Recovered;
use crate::task::Task;

const STATES: usize = TaskState::ALL.len();

fn state_slot(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

/// Waiting states: the only ones a task is demoted in (a running task is in use).
fn demotable(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Pending | TaskState::Scheduled | TaskState::Blocked
    )
}

/// Queue names, each stored once; cold entries and counts refer to them by number.
#[derive(Debug, Default)]
struct Queues {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, u32>,
}

impl Queues {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |n| n)
    }
}

#[derive(Debug, Default)]
struct Counts(Vec<[u64; STATES]>);

impl Counts {
    fn add(&mut self, queue: u32, state: TaskState) {
        let q = queue as usize;
        if self.0.len() <= q {
            self.0.resize(q + 1, [0; STATES]);
        }
        self.0[q][state_slot(state)] += 1;
    }

    fn sub(&mut self, queue: u32, state: TaskState) {
        if let Some(c) = self.0.get_mut(queue as usize) {
            let n = &mut c[state_slot(state)];
            *n = n.saturating_sub(1);
        }
    }
}

#[derive(Debug)]
enum Slot {
    /// Held whole. `stamp`: commits made when it was last changed (see the module docs).
    Hot { task: Box<Task>, stamp: u64 },
    /// Demoted: the rest is in the store.
    Cold { queue: u32, state: TaskState },
}

/// Where demoted tasks are read back from, and what to stop if that ever fails.
#[derive(Debug, Clone)]
pub struct Backing {
    pub reader: std::sync::Arc<dyn Lookup>,
    /// Cancelled when a read fails: the core's state no longer matches the disk.
    pub fatal: CancellationToken,
}

#[derive(Debug, Default)]
pub struct ActiveTasks {
    map: BTreeMap<TaskId, Slot>,
    queues: Queues,
    counts: Counts,
    /// None: every task stays hot (tests of the scheduling logic alone).
    backing: Option<Backing>,
    hot: usize,
    hot_max: usize,
    /// Tasks changed in the current pass, stamped by the next `seal`.
    touched: Vec<TaskId>,
    /// Demotion candidates in the order they were last changed, with their stamp. An entry
    /// whose task changed again since (its stamp moved) is skipped.
    candidates: VecDeque<(u64, TaskId)>,
    /// Tasks read at startup, in id order, until [`ActiveTasks::end_loading`] builds the
    /// map from them at once: a B-tree built from sorted entries has full nodes, one
    /// filled an insert at a time in order has half-empty ones (twice the memory), and
    /// the bulk build costs a fraction of a million inserts.
    loading: Vec<(TaskId, Slot)>,
}

/// One active task as an index entry: what a listing filters on without reading the task.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub id: TaskId,
    pub queue: &'a str,
    pub state: TaskState,
}

pub struct TaskMut<'a> {
    task: &'a mut Task,
    counts: &'a mut Counts,
    queues: &'a mut Queues,
    before: TaskState,
}

impl Deref for TaskMut<'_> {
    type Target = Task;
    fn deref(&self) -> &Task {
        self.task
    }
}

impl DerefMut for TaskMut<'_> {
    fn deref_mut(&mut self) -> &mut Task {
        self.task
    }
}

impl Drop for TaskMut<'_> {
    fn drop(&mut self) {
        if self.task.state != self.before {
            let q = self.queues.id(&self.task.queue);
            self.counts.sub(q, self.before);
            self.counts.add(q, self.task.state);
        }
    }
}

impl ActiveTasks {
    /// Tasks beyond `hot_max` are demoted to the store behind `backing`.
    pub fn backed(backing: Backing, hot_max: usize) -> ActiveTasks {
        ActiveTasks {
            backing: Some(backing),
            hot_max,
            ..ActiveTasks::default()
        }
    }

    #[cfg(test)]
    pub fn with_tasks(tasks: Vec<Box<Task>>) -> ActiveTasks {
        let mut active = ActiveTasks::default();
        for t in tasks {
            active.insert(t);
        }
        active
    }

    pub fn len(&self) -> usize {
        self.map.len() + self.loading.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tasks held whole.
    pub fn hot(&self) -> usize {
        self.hot
    }

    pub fn contains(&self, id: &TaskId) -> bool {
        self.map.contains_key(id)
    }

    /// A task's state, without reading a demoted task back.
    pub fn state(&self, id: &TaskId) -> Option<TaskState> {
        match self.map.get(id)? {
            Slot::Hot { task, .. } => Some(task.state),
            Slot::Cold { state, .. } => Some(*state),
        }
    }

    /// The task, read back from the store if it is demoted (and left demoted).
    pub fn get(&self, id: &TaskId) -> Option<Cow<'_, Task>> {
        match self.map.get(id)? {
            Slot::Hot { task, .. } => Some(Cow::Borrowed(&**task)),
            Slot::Cold { state, .. } => self.read_back(id, *state).map(Cow::Owned),
        }
    }

    /// The task to change; a demoted one is read back and held whole again.
    pub fn get_mut(&mut self, id: &TaskId) -> Option<TaskMut<'_>> {
        self.fault_in(id)?;
        self.touched.push(*id);
        let Some(Slot::Hot { task, .. }) = self.map.get_mut(id) else {
            return None;
        };
        let before = task.state;
        Some(TaskMut {
            task,
            counts: &mut self.counts,
            queues: &mut self.queues,
            before,
        })
    }

    /// Adds (or replaces) a task, held whole.
    pub fn insert(&mut self, task: Box<Task>) {
        let q = self.queues.id(&task.queue);
        self.counts.add(q, task.state);
        self.touched.push(task.id);
        self.hot += 1;
        if let Some(old) = self.map.insert(task.id, Slot::Hot { task, stamp: 0 }) {
            self.forget(&old);
        }
    }

    /// Adds a task read from the store at startup: held whole while there is room, else
    /// demoted at once (its record is the one just read). A task decoded only for the
    /// index (always a waiting one) is always demoted. Tasks must come in id order, and
    /// are seen (by `get`, `state`, ...) once [`ActiveTasks::end_loading`] ran.
    pub fn insert_recovered(&mut self, recovered: Recovered) {
        let (id, state) = (recovered.id(), recovered.state());
        let q = self.queues.id(recovered.queue());
        self.counts.add(q, state);
        let keep = self.backing.is_none() || self.hot < self.hot_max || !demotable(state);
        let slot = match recovered {
            Recovered::Whole(task) if keep => {
                if demotable(state) {
                    self.candidates.push_back((0, id));
                }
                self.hot += 1;
                Slot::Hot {
                    task: Box::new(task),
                    stamp: 0,
                }
            }
            // An index entry is always demoted: the task is read whole from the store
            // behind the map when it is needed (only a backed map is given entries).
            Recovered::Whole(_) | Recovered::Index(_) => Slot::Cold { queue: q, state },
        };
        self.loading.push((id, slot));
    }

    /// Makes the tasks added by `insert_recovered` part of the map.
    pub fn end_loading(&mut self) {
        let loaded = std::mem::take(&mut self.loading);
        if self.map.is_empty() {
            self.map = loaded.into_iter().collect();
            return;
        }
        for (id, slot) in loaded {
            if let Some(old) = self.map.insert(id, slot) {
                self.forget(&old);
            }
        }
    }

    pub fn remove(&mut self, id: &TaskId) -> Option<Box<Task>> {
        self.fault_in(id)?;
        match self.map.remove(id)? {
            Slot::Hot { task, .. } => {
                self.hot -= 1;
                let q = self.queues.id(&task.queue);
                self.counts.sub(q, task.state);
                Some(task)
            }
            Slot::Cold { .. } => None,
        }
    }

    /// Undoes what a replaced slot added to the counts.
    fn forget(&mut self, old: &Slot) {
        match old {
            Slot::Hot { task, .. } => {
                self.hot -= 1;
                let q = self.queues.id(&task.queue);
                self.counts.sub(q, task.state);
            }
            Slot::Cold { queue, state } => self.counts.sub(*queue, *state),
        }
    }

    /// Active tasks newest first, ids below `before`, as index entries (nothing is read).
    pub fn newest_first(&self, before: Option<TaskId>) -> impl Iterator<Item = Entry<'_>> {
        let range = match before {
            Some(b) => self.map.range(..b),
            None => self.map.range(..),
        };
        range.rev().map(|(id, slot)| match slot {
            Slot::Hot { task, .. } => Entry {
                id: *id,
                queue: task.queue.as_str(),
                state: task.state,
            },
            Slot::Cold { queue, state } => Entry {
                id: *id,
                queue: self.queues.name(*queue),
                state: *state,
            },
        })
    }

    pub fn counts(&self) -> impl Iterator<Item = (&str, TaskState, u64)> {
        self.counts.0.iter().enumerate().flat_map(move |(q, c)| {
            TaskState::ALL
                .iter()
                .zip(c.iter())
                .filter(|(_, n)| **n > 0)
                .map(move |(s, n)| (self.queues.name(q as u32), *s, *n))
        })
    }

    /// Stamps every task changed since the last seal with `commits_made`: the commits
    /// carrying those changes are all numbered at most that.
    pub fn seal(&mut self, commits_made: u64) {
        for id in std::mem::take(&mut self.touched) {
            if let Some(Slot::Hot { task, stamp }) = self.map.get_mut(&id) {
                *stamp = commits_made;
                if demotable(task.state) {
                    self.candidates.push_back((commits_made, id));
                }
            }
        }
    }

    /// Demotes the longest-unchanged waiting tasks while more than `hot_max` are held,
    /// taking only those whose last change is within the first `durable` commits.
    pub fn demote(&mut self, durable: u64) {
        if self.backing.is_none() {
            self.candidates.clear();
            return;
        }
        while self.hot > self.hot_max {
            let Some(&(stamp, id)) = self.candidates.front() else {
                break;
            };
            if stamp > durable {
                break;
            }
            self.candidates.pop_front();
            let Some(slot) = self.map.get_mut(&id) else {
                continue;
            };
            let Slot::Hot { task, stamp: now } = slot else {
                continue;
            };
            if *now != stamp || !demotable(task.state) {
                continue;
            }
            let cold = Slot::Cold {
                queue: self.queues.id(&task.queue),
                state: task.state,
            };
            *slot = cold;
            self.hot -= 1;
        }
        // Entries of tasks that finished or changed again pile up while nothing needs
        // demoting: drop them once they outnumber the tasks that could use them.
        if self.candidates.len() > 2 * self.hot + 1024 {
            let map = &self.map;
            self.candidates.retain(|(stamp, id)| {
                matches!(map.get(id), Some(Slot::Hot { task, stamp: s }) if s == stamp && demotable(task.state))
            });
        }
    }

    /// Makes the task hot if it is demoted. None if it is not here (or cannot be read).
    fn fault_in(&mut self, id: &TaskId) -> Option<()> {
        let state = match self.map.get(id)? {
            Slot::Hot { .. } => return Some(()),
            Slot::Cold { state, .. } => *state,
        };
        let task = self.read_back(id, state)?;
        if let Some(slot) = self.map.get_mut(id) {
            *slot = Slot::Hot {
                task: Box::new(task),
                stamp: 0,
            };
            self.hot += 1;
        }
        Some(())
    }

    /// Reads a demoted task from the store, with the state it had when demoted.
    fn read_back(&self, id: &TaskId, state: TaskState) -> Option<Task> {
        let backing = self.backing.as_ref()?;
        let found = backing.reader.active(*id);
        let mut task = match found {
            Ok(Some(task)) => task,
            Ok(None) => {
                tracing::error!(task_id = %id, "a demoted task is missing from the store; the queen must stop");
                backing.fatal.cancel();
                return None;
            }
            Err(e) => {
                tracing::error!(task_id = %id, error = %e, "reading a demoted task failed; the queen must stop");
                backing.fatal.cancel();
                return None;
            }
        };
        // A scheduled task may have become pending in memory only (see the module docs);
        // a pending task has no `run_at`, as at recovery.
        if state == TaskState::Pending {
            task.run_at = None;
        }
        task.state = state;
        Some(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use shared::api::TaskSpec;

    fn task(queue: &str) -> Box<Task> {
        let spec = TaskSpec {
            kind: "echo".into(),
            queue: Some(queue.into()),
            ..Default::default()
        };
        Box::new(
            Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default())
                .expect("valid"),
        )
    }

    fn count(a: &ActiveTasks, queue: &str, state: TaskState) -> u64 {
        a.counts()
            .find(|(q, s, _)| *q == queue && *s == state)
            .map_or(0, |(_, _, n)| n)
    }

    #[test]
    fn counts_follow_inserts_removals_and_state_changes() {
        let (a, b, c) = (task("mail"), task("mail"), task("img"));
        let (ida, idb) = (a.id, b.id);
        let mut active = ActiveTasks::with_tasks(vec![a, b, c]);
        assert_eq!(count(&active, "mail", TaskState::Pending), 2);
        assert_eq!(count(&active, "img", TaskState::Pending), 1);
        if let Some(mut t) = active.get_mut(&ida) {
            t.state = TaskState::Running;
        }
        assert_eq!(count(&active, "mail", TaskState::Pending), 1);
        assert_eq!(count(&active, "mail", TaskState::Running), 1);
        let mut back = active.remove(&ida).expect("present");
        assert_eq!(count(&active, "mail", TaskState::Running), 0);
        back.state = TaskState::Scheduled;
        active.insert(back);
        assert_eq!(count(&active, "mail", TaskState::Scheduled), 1);
        // Replacing a task counts the new one only.
        let mut again = active.remove(&idb).expect("present");
        again.state = TaskState::Blocked;
        active.insert(again.clone());
        active.insert(again);
        assert_eq!(count(&active, "mail", TaskState::Blocked), 1);
        assert_eq!(count(&active, "mail", TaskState::Pending), 0);
        let total: u64 = active.counts().map(|(_, _, n)| n).sum();
        assert_eq!(total, active.len() as u64);
    }

    #[test]
    fn newest_first_is_by_id_and_starts_below_before() {
        let ts: Vec<Box<Task>> = (0..5).map(|_| task("q")).collect();
        let mut ids: Vec<TaskId> = ts.iter().map(|t| t.id).collect();
        ids.sort();
        let active = ActiveTasks::with_tasks(ts);
        let all: Vec<TaskId> = active.newest_first(None).map(|t| t.id).collect();
        let mut want = ids.clone();
        want.reverse();
        assert_eq!(all, want);
        let below: Vec<TaskId> = active.newest_first(Some(ids[2])).map(|t| t.id).collect();
        assert_eq!(below, vec![ids[1], ids[0]]);
    }

    mod demotion {
        use super::*;
        use crate::store::{Commit, Mutation, OpenOptionsHive, Store, StoreWriter};
        use tokio::sync::oneshot;

        async fn save(writer: &StoreWriter, task: &Task) {
            let (tx, rx) = oneshot::channel();
            writer
                .send(Commit {
                    mutations: vec![Mutation::save(task)],
                    after: Some(Box::new(move |r| drop(tx.send(r)))),
                    first: false,
                })
                .await;
            rx.await.expect("answered").expect("durable");
        }

        fn open(dir: &std::path::Path) -> (Store, StoreWriter, Backing) {
            let opts = OpenOptionsHive {
                data_dir: dir.to_path_buf(),
                cache_capacity_bytes: 8 << 20,
                sync: false,
                metrics: Default::default(),
                idle_poll: std::time::Duration::from_micros(crate::config::DEFAULT_IDLE_POLL_US),
            };
            let (store, writer, _) = Store::open(&opts, CancellationToken::new()).expect("open");
            let backing = Backing {
                reader: std::sync::Arc::new(store.reader.clone()),
                fatal: CancellationToken::new(),
            };
            (store, writer, backing)
        }

        #[tokio::test]
        async fn waiting_tasks_beyond_the_limit_are_demoted_once_durable_and_read_back_whole() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (_store, writer, backing) = open(dir.path());
            let mut active = ActiveTasks::backed(backing.clone(), 2);
            let mut waiting: Vec<Box<Task>> = (0..4).map(|_| task("mail")).collect();
            waiting[1].priority = 7;
            let mut running = task("img");
            running.state = TaskState::Running;
            for t in waiting.iter().chain([&running]) {
                active.insert(t.clone());
            }
            active.seal(1);
            // Not durable yet: nothing may be demoted.
            active.demote(writer.durable());
            assert_eq!(active.hot(), 5);
            for t in waiting.iter().chain([&running]) {
                save(&writer, t).await;
            }
            active.seal(5);
            active.demote(writer.durable());
            assert_eq!(
                active.hot(),
                2,
                "the longest-unchanged waiting tasks go until two are held"
            );
            assert!(
                matches!(active.get(&waiting[3].id), Some(Cow::Borrowed(_))),
                "the newest waiting task stays whole"
            );
            assert!(matches!(active.get(&running.id), Some(Cow::Borrowed(_))));
            assert_eq!(count(&active, "mail", TaskState::Pending), 4);
            assert_eq!(count(&active, "img", TaskState::Running), 1);
            for t in &waiting[..3] {
                let got = active.get(&t.id).expect("present");
                assert!(matches!(got, Cow::Owned(_)), "read back from the store");
                assert_eq!(*got, **t);
                assert_eq!(active.state(&t.id), Some(TaskState::Pending));
            }
            let entries: Vec<(TaskId, String)> = active
                .newest_first(None)
                .map(|e| (e.id, e.queue.to_string()))
                .collect();
            assert_eq!(entries.len(), 5);
            assert!(entries.iter().all(|(_, q)| q == "mail" || q == "img"));
            // Changing a demoted task makes it whole again, and the counts follow.
            if let Some(mut t) = active.get_mut(&waiting[1].id) {
                assert_eq!(t.priority, 7);
                t.state = TaskState::Running;
            }
            assert_eq!(active.hot(), 3);
            assert_eq!(count(&active, "mail", TaskState::Pending), 3);
            assert_eq!(count(&active, "mail", TaskState::Running), 1);
            let gone = active
                .remove(&waiting[2].id)
                .expect("read back and removed");
            assert_eq!(*gone, *waiting[2]);
            assert_eq!(count(&active, "mail", TaskState::Pending), 2);
            assert_eq!(active.len(), 4);
            assert!(!backing.fatal.is_cancelled());
        }

        #[tokio::test]
        async fn a_task_changed_again_waits_until_its_newest_change_is_durable() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (_store, writer, backing) = open(dir.path());
            let mut active = ActiveTasks::backed(backing, 0);
            let t = task("mail");
            active.insert(t.clone());
            active.seal(1);
            save(&writer, &t).await;
            // Changed in a later pass whose commit has not reached the writer yet.
            if let Some(mut m) = active.get_mut(&t.id) {
                m.priority = 9;
            }
            active.seal(2);
            active.demote(writer.durable());
            assert_eq!(
                active.hot(),
                1,
                "its record on disk is older than what is held"
            );
            let mut changed = (*t).clone();
            changed.priority = 9;
            save(&writer, &changed).await;
            active.demote(writer.durable());
            assert_eq!(active.hot(), 0);
            assert_eq!(active.get(&t.id).expect("present").priority, 9);
        }

        #[tokio::test]
        async fn a_scheduled_task_that_came_due_in_memory_reads_back_pending() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (_store, writer, backing) = open(dir.path());
            let mut active = ActiveTasks::backed(backing, 0);
            let mut t = task("mail");
            t.state = TaskState::Scheduled;
            t.run_at = Some(Utc::now());
            save(&writer, &t).await;
            active.insert(t.clone());
            // Due: pending in memory only, as the core's timer does it.
            if let Some(mut m) = active.get_mut(&t.id) {
                m.state = TaskState::Pending;
                m.run_at = None;
            }
            active.seal(1);
            active.demote(writer.durable());
            assert_eq!(active.hot(), 0);
            let back = active.get(&t.id).expect("present");
            assert_eq!(back.state, TaskState::Pending);
            assert_eq!(back.run_at, None);
            assert_eq!(count(&active, "mail", TaskState::Pending), 1);
            assert_eq!(count(&active, "mail", TaskState::Scheduled), 0);
        }

        #[tokio::test]
        async fn a_demoted_task_missing_from_the_store_stops_the_queen() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (_store, writer, backing) = open(dir.path());
            let mut active = ActiveTasks::backed(backing.clone(), 0);
            let t = task("mail");
            active.insert_recovered(Recovered::Whole((*t).clone()));
            active.end_loading();
            // Never written: reading it back must fail loudly, not invent a task.
            assert_eq!(active.hot(), 0);
            assert!(active.get_mut(&t.id).is_none());
            assert!(backing.fatal.is_cancelled());
            drop(writer);
        }

        #[test]
        fn leftover_candidates_are_dropped_while_nothing_needs_demoting() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (_store, _writer, backing) = open(dir.path());
            let mut active = ActiveTasks::backed(backing, 1_000_000);
            for round in 0..100u64 {
                let batch: Vec<Box<Task>> = (0..100).map(|_| task("q")).collect();
                for t in &batch {
                    active.insert(t.clone());
                }
                active.seal(round + 1);
                for t in &batch {
                    active.remove(&t.id);
                }
                active.demote(round + 1);
            }
            assert!(active.candidates.len() <= 1024 + 2 * active.hot());
        }
    }
}
