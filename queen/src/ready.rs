//! Runnable tasks, grouped by what a drone needs to take them (kind and labels), each group
//! ordered by priority (higher first) then age (older first). A drone with a free slot
//! looks only at the heads of the groups it can serve, so dispatch never scans the queue.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use shared::TaskId;

use crate::task::Task;

/// What a drone must offer to take a task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub queue: String,
    pub kind: String,
    /// Sorted, deduplicated.
    pub labels: Vec<String>,
}

/// What the ready queues need of a task: its route and its place in a group. Both a whole
/// task and a recovered index entry give one.
#[derive(Debug, Clone, Copy)]
pub struct ReadyKey<'a> {
    pub id: TaskId,
    pub priority: i32,
    pub queue: &'a str,
    pub kind: &'a str,
    pub labels: &'a [String],
}

impl<'a> From<&'a Task> for ReadyKey<'a> {
    fn from(task: &'a Task) -> ReadyKey<'a> {
        ReadyKey {
            id: task.id,
            priority: task.priority,
            queue: &task.queue,
            kind: &task.kind,
            labels: &task.labels,
        }
    }
}

impl Route {
    pub fn of<'a>(task: impl Into<ReadyKey<'a>>) -> Route {
        let task = task.into();
        Route {
            queue: task.queue.to_string(),
            kind: task.kind.to_string(),
            labels: task.labels.to_vec(),
        }
    }

    fn is_of(&self, task: &ReadyKey<'_>) -> bool {
        self.queue == task.queue && self.kind == task.kind && self.labels == task.labels
    }

    pub fn served_by(&self, kinds: &HashSet<String>, labels: &BTreeSet<String>) -> bool {
        kinds.contains(&self.kind) && self.labels.iter().all(|l| labels.contains(l))
    }
}

type Key = (Reverse<i32>, TaskId);

/// The task's route, reusing `last` when it is the same (a free function so the caller can
/// borrow its other fields meanwhile).
fn cached_route<'a>(last: &'a mut Option<Route>, task: &ReadyKey<'_>) -> Option<&'a Route> {
    if !last.as_ref().is_some_and(|r| r.is_of(task)) {
        *last = Some(Route::of(*task));
    }
    last.as_ref()
}

#[derive(Debug)]
pub struct ReadyQueues {
    /// Each ready task with the moment it became ready (for the dispatch latency metric),
    /// as nanoseconds from `epoch` (negative: before it): 8 bytes instead of an
    /// `Instant`'s 16, for every entry of a backlog of millions.
    groups: HashMap<Route, BTreeMap<Key, i64>>,
    epoch: Instant,
    /// Tasks made ready at startup, by route, until [`ReadyQueues::end_loading`] builds
    /// their groups from them at once (full B-tree nodes, a fraction of the inserts' cost).
    loading: HashMap<Route, Vec<(Key, i64)>>,
    /// The route of the last push: most pushes (a batch, a restart) share one, and reusing
    /// it spares building a `Route` (three allocations) per push.
    last: Option<Route>,
    len: usize,
    /// Tasks made ready so far: dispatch has work to look at when this moved.
    pushes: u64,
}

impl Default for ReadyQueues {
    fn default() -> ReadyQueues {
        ReadyQueues {
            groups: HashMap::new(),
            epoch: Instant::now(),
            last: None,
            loading: HashMap::new(),
            len: 0,
            pushes: 0,
        }
    }
}

impl ReadyQueues {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn nanos(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.epoch) {
            Some(after) => after.as_nanos().min(i64::MAX as u128) as i64,
            None => {
                -(self
                    .epoch
                    .duration_since(at)
                    .as_nanos()
                    .min(i64::MAX as u128) as i64)
            }
        }
    }

    fn instant(&self, nanos: i64) -> Instant {
        let d = std::time::Duration::from_nanos(nanos.unsigned_abs());
        if nanos >= 0 {
            self.epoch + d
        } else {
            self.epoch.checked_sub(d).unwrap_or(self.epoch)
        }
    }

    /// How many times a task was made ready (grows forever; compare two readings).
    pub fn pushes(&self) -> u64 {
        self.pushes
    }

    /// Makes a task ready as of now.
    pub fn push<'a>(&mut self, task: impl Into<ReadyKey<'a>>) {
        self.push_since(task, Instant::now());
    }

    /// Makes a task ready, as of `since` (a task handed back keeps its place in time).
    pub fn push_since<'a>(&mut self, task: impl Into<ReadyKey<'a>>, since: Instant) {
        let task = task.into();
        let nanos = self.nanos(since);
        let Some(route) = cached_route(&mut self.last, &task) else {
            return;
        };
        if !self.groups.contains_key(route) {
            self.groups.insert(route.clone(), BTreeMap::new());
        }
        let Some(group) = self.groups.get_mut(route) else {
            return;
        };
        if group
            .insert((Reverse(task.priority), task.id), nanos)
            .is_none()
        {
            self.len += 1;
            self.pushes += 1;
        }
    }

    pub fn remove<'a>(&mut self, task: impl Into<ReadyKey<'a>>) {
        let task = task.into();
        let route = Route::of(task);
        if let Some(group) = self.groups.get_mut(&route) {
            if group.remove(&(Reverse(task.priority), task.id)).is_some() {
                self.len -= 1;
            }
            if group.is_empty() {
                self.groups.remove(&route);
            }
        }
    }

    /// Takes the best task a drone with these kinds and labels can run, from queues that
    /// `open` allows to start a task now, with the moment it became ready.
    pub fn pop_for(
        &mut self,
        kinds: &HashSet<String>,
        labels: &BTreeSet<String>,
        open: &dyn Fn(&str) -> bool,
    ) -> Option<(TaskId, Instant)> {
        let (route, key) = self
            .groups
            .iter()
            .filter(|(route, _)| route.served_by(kinds, labels) && open(&route.queue))
            .filter_map(|(route, group)| group.first_key_value().map(|(k, _)| (route, *k)))
            .min_by_key(|(_, key)| *key)
            .map(|(route, key)| (route.clone(), key))?;
        let group = self.groups.get_mut(&route)?;
        let nanos = group.remove(&key)?;
        if group.is_empty() {
            self.groups.remove(&route);
        }
        let since = self.instant(nanos);
        self.len -= 1;
        Some((key.1, since))
    }

    /// Makes a task read at startup ready, as of `since`; it is seen by dispatch once
    /// [`ReadyQueues::end_loading`] ran.
    pub fn push_loading<'a>(&mut self, task: impl Into<ReadyKey<'a>>, since: Instant) {
        let task = task.into();
        let nanos = self.nanos(since);
        let Some(route) = cached_route(&mut self.last, &task) else {
            return;
        };
        let entry = ((Reverse(task.priority), task.id), nanos);
        match self.loading.get_mut(route) {
            Some(entries) => entries.push(entry),
            None => {
                self.loading.insert(route.clone(), vec![entry]);
            }
        }
        self.len += 1;
        self.pushes += 1;
    }

    /// Builds the groups of the tasks pushed by `push_loading`.
    pub fn end_loading(&mut self) {
        for (route, mut entries) in std::mem::take(&mut self.loading) {
            entries.sort_unstable_by_key(|(key, _)| *key);
            match self.groups.get_mut(&route) {
                Some(group) => group.extend(entries),
                None => {
                    self.groups.insert(route, entries.into_iter().collect());
                }
            }
        }
    }

    /// How many ready tasks each route holds (for stats: which are unroutable).
    pub fn routes(&self) -> impl Iterator<Item = (&Route, usize)> {
        self.groups.iter().map(|(r, g)| (r, g.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use shared::api::TaskSpec;

    fn task(kind: &str, priority: i32, labels: &[&str]) -> Task {
        let spec = TaskSpec {
            kind: kind.into(),
            priority: Some(priority),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default()).expect("valid")
    }

    fn pop(
        q: &mut ReadyQueues,
        kinds: &HashSet<String>,
        labels: &BTreeSet<String>,
        open: &dyn Fn(&str) -> bool,
    ) -> Option<TaskId> {
        q.pop_for(kinds, labels, open).map(|(id, _)| id)
    }

    #[test]
    fn a_task_handed_back_keeps_the_moment_it_became_ready() {
        let mut q = ReadyQueues::default();
        let t = task("echo", 0, &[]);
        let early = Instant::now() - std::time::Duration::from_secs(5);
        q.push_since(&t, early);
        let kinds = HashSet::from(["echo".to_string()]);
        assert_eq!(
            q.pop_for(&kinds, &BTreeSet::new(), &|_| true),
            Some((t.id, early))
        );
    }

    #[test]
    fn higher_priority_first_then_oldest_first() {
        let mut q = ReadyQueues::default();
        let (a, b, c) = (
            task("echo", 0, &[]),
            task("echo", 5, &[]),
            task("echo", 0, &[]),
        );
        for t in [&a, &b, &c] {
            q.push(t);
        }
        let kinds = HashSet::from(["echo".to_string()]);
        let labels = BTreeSet::new();
        assert_eq!(pop(&mut q, &kinds, &labels, &|_| true), Some(b.id));
        assert_eq!(pop(&mut q, &kinds, &labels, &|_| true), Some(a.id));
        assert_eq!(pop(&mut q, &kinds, &labels, &|_| true), Some(c.id));
        assert_eq!(pop(&mut q, &kinds, &labels, &|_| true), None);
        assert!(q.is_empty());
    }

    #[test]
    fn tasks_loaded_at_startup_join_the_groups_in_order_when_loading_ends() {
        let mut q = ReadyQueues::default();
        let live = task("echo", 1, &[]);
        q.push(&live);
        let (low, high, other) = (
            task("echo", 0, &[]),
            task("echo", 5, &[]),
            task("render", 0, &[]),
        );
        let since = Instant::now();
        for t in [&low, &high, &other] {
            q.push_loading(t, since);
        }
        assert_eq!(q.len(), 4);
        let echo = HashSet::from(["echo".to_string()]);
        let labels = BTreeSet::new();
        // Not seen by dispatch before loading ends (`high` would come first).
        assert_eq!(pop(&mut q, &echo, &labels, &|_| true), Some(live.id));
        // A live task in the same group as loaded ones: loading merges into it.
        let later = task("echo", 3, &[]);
        q.push(&later);
        q.end_loading();
        assert_eq!(pop(&mut q, &echo, &labels, &|_| true), Some(high.id));
        assert_eq!(pop(&mut q, &echo, &labels, &|_| true), Some(later.id));
        assert_eq!(pop(&mut q, &echo, &labels, &|_| true), Some(low.id));
        let render = HashSet::from(["render".to_string()]);
        assert_eq!(pop(&mut q, &render, &labels, &|_| true), Some(other.id));
        assert!(q.is_empty());
    }

    #[test]
    fn a_drone_only_gets_kinds_and_labels_it_has() {
        let mut q = ReadyQueues::default();
        let gpu = task("render", 9, &["gpu"]);
        let plain = task("render", 0, &[]);
        let other_kind = task("echo", 10, &[]);
        for t in [&gpu, &plain, &other_kind] {
            q.push(t);
        }
        let kinds = HashSet::from(["render".to_string()]);
        let no_labels = BTreeSet::new();
        assert_eq!(pop(&mut q, &kinds, &no_labels, &|_| true), Some(plain.id));
        assert_eq!(
            pop(&mut q, &kinds, &no_labels, &|_| true),
            None,
            "gpu task needs the gpu label"
        );
        let gpu_labels = BTreeSet::from(["gpu".to_string(), "big".to_string()]);
        assert_eq!(pop(&mut q, &kinds, &gpu_labels, &|_| true), Some(gpu.id));
        assert_eq!(q.len(), 1);
        q.remove(&other_kind);
        assert!(q.is_empty());
    }

    #[test]
    fn a_closed_queue_is_skipped_but_keeps_its_tasks() {
        let mut q = ReadyQueues::default();
        let mut paused = task("echo", 9, &[]);
        paused.queue = "paused".into();
        let open = task("echo", 0, &[]);
        q.push(&paused);
        q.push(&open);
        let kinds = HashSet::from(["echo".to_string()]);
        let labels = BTreeSet::new();
        assert_eq!(
            pop(&mut q, &kinds, &labels, &|queue| queue != "paused"),
            Some(open.id)
        );
        assert_eq!(
            pop(&mut q, &kinds, &labels, &|queue| queue != "paused"),
            None
        );
        assert_eq!(q.len(), 1);
        assert_eq!(pop(&mut q, &kinds, &labels, &|_| true), Some(paused.id));
    }
}
