//! The active (non-terminal) tasks the core holds, ordered by id (ids are time-ordered),
//! with live counts per queue and state. Counts move on every insert, removal and state
//! change, so `/v1/stats`, `/v1/queues` and `/metrics` never walk the tasks, and a list
//! of the newest tasks stops as soon as it has enough.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};

use shared::api::TaskState;
use shared::TaskId;

use crate::task::Task;

const STATES: usize = TaskState::ALL.len();

fn slot(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

/// Tasks by queue, per state (indexed as `TaskState::ALL`).
#[derive(Debug, Default)]
struct Counts(HashMap<String, [u64; STATES]>);

impl Counts {
    fn add(&mut self, queue: &str, state: TaskState) {
        match self.0.get_mut(queue) {
            Some(c) => c[slot(state)] += 1,
            None => {
                let mut c = [0; STATES];
                c[slot(state)] = 1;
                self.0.insert(queue.to_string(), c);
            }
        }
    }

    fn sub(&mut self, queue: &str, state: TaskState) {
        if let Some(c) = self.0.get_mut(queue) {
            let n = &mut c[slot(state)];
            *n = n.saturating_sub(1);
        }
    }
}

/// Boxed tasks: a map entry holds a pointer, not a whole task.
#[derive(Debug, Default)]
pub struct ActiveTasks {
    map: BTreeMap<TaskId, Box<Task>>,
    counts: Counts,
}

/// A task borrowed for change; its state's count follows when the borrow ends.
pub struct TaskMut<'a> {
    task: &'a mut Task,
    counts: &'a mut Counts,
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
            self.counts.sub(&self.task.queue, self.before);
            self.counts.add(&self.task.queue, self.task.state);
        }
    }
}

impl ActiveTasks {
    pub fn with_tasks(tasks: Vec<Box<Task>>) -> ActiveTasks {
        let mut active = ActiveTasks::default();
        for t in tasks {
            active.insert(t);
        }
        active
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, id: &TaskId) -> bool {
        self.map.contains_key(id)
    }

    pub fn get(&self, id: &TaskId) -> Option<&Task> {
        self.map.get(id).map(|b| &**b)
    }

    pub fn get_mut(&mut self, id: &TaskId) -> Option<TaskMut<'_>> {
        let task = self.map.get_mut(id)?;
        let before = task.state;
        Some(TaskMut {
            task,
            counts: &mut self.counts,
            before,
        })
    }

    pub fn insert(&mut self, task: Box<Task>) {
        self.counts.add(&task.queue, task.state);
        if let Some(old) = self.map.insert(task.id, task) {
            self.counts.sub(&old.queue, old.state);
        }
    }

    pub fn remove(&mut self, id: &TaskId) -> Option<Box<Task>> {
        let task = self.map.remove(id)?;
        self.counts.sub(&task.queue, task.state);
        Some(task)
    }

    pub fn values(&self) -> impl Iterator<Item = &Task> {
        self.map.values().map(|b| &**b)
    }

    /// Newest first, starting below `before` when given.
    pub fn newest_first(&self, before: Option<TaskId>) -> impl Iterator<Item = &Task> {
        let range = match before {
            Some(b) => self.map.range(..b),
            None => self.map.range(..),
        };
        range.rev().map(|(_, b)| &**b)
    }

    /// (queue, state, count) for every non-zero count.
    pub fn counts(&self) -> impl Iterator<Item = (&str, TaskState, u64)> {
        self.counts.0.iter().flat_map(|(q, c)| {
            TaskState::ALL
                .iter()
                .zip(c.iter())
                .filter(|(_, n)| **n > 0)
                .map(move |(s, n)| (q.as_str(), *s, *n))
        })
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
}
