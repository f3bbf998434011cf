//! Reads: a task by id, listings, queues and counts. Counts come from the live counts
//! the active tasks keep (`active.rs`) and the finished counts, never from a walk of
//! the tasks; a listing filters on the index and reads only the tasks it returns.

use std::borrow::Cow;
use std::collections::BTreeMap;

use shared::api::{QueueView, Stats, TaskState, TaskView};
use shared::TaskId;
use tokio::sync::oneshot;

use super::api::ListFilter;
use super::lifecycle::normalize_waiting;
use super::{Core, Now};
use crate::task::Task;

impl Core {
    pub(super) fn get(&mut self, id: TaskId, reply: oneshot::Sender<Option<TaskView>>, now: Now) {
        let found = self.ledger.held(&id).map(|t| t.view());
        if found.is_some() || self.recovery.is_none() {
            let _ = reply.send(found);
            return;
        }
        // While recovering, a task not read yet is exactly as stored: nothing is written
        // before recovery ends. A failed read stops the queen; the reply is dropped
        // (the caller hears that the queen is stopping).
        let Ok(stored) = self.read(self.lookup.active(id), "a task while recovering") else {
            return;
        };
        let found = stored.map(|mut task| {
            normalize_waiting(&mut task, now.wall);
            task.view()
        });
        let _ = reply.send(found);
    }

    pub(super) fn list(&self, filter: ListFilter, reply: oneshot::Sender<Vec<TaskView>>) {
        // The newest `limit` matches among active tasks (stopping once found; none when a
        // finished state is asked for), plus the few recent finished ones.
        let active_may_match = filter.state.is_none_or(|s| !s.is_terminal());
        let tasks = &self.ledger.tasks;
        // Filtered on the index; only the tasks returned are read (demoted ones from the
        // store).
        let mut out: Vec<Cow<'_, Task>> = tasks
            .newest_first(filter.before)
            .filter(|e| active_may_match && filter.matches_parts(e.id, e.queue, e.state))
            .take(if active_may_match { filter.limit } else { 0 })
            .filter_map(|e| tasks.get(&e.id))
            .chain(
                self.ledger
                    .recent
                    .values()
                    .map(|(_, t)| t)
                    .filter(|t| filter.matches(t))
                    .map(Cow::Borrowed),
            )
            .collect();
        out.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
        out.truncate(filter.limit);
        let _ = reply.send(out.iter().map(|t| t.view()).collect());
    }

    pub(super) fn queue_views(&self) -> Vec<QueueView> {
        let mut views: BTreeMap<&str, QueueView> = BTreeMap::new();
        let blank = |name: &str| QueueView {
            name: name.to_string(),
            pending: 0,
            scheduled: 0,
            blocked: 0,
            running: 0,
            paused: false,
            max_running: None,
            rate_per_s: None,
        };
        for (name, q) in &self.dispatch.queues {
            let v = views.entry(name).or_insert_with(|| blank(name));
            v.paused = q.settings.paused;
            v.max_running = q.settings.max_running;
            v.rate_per_s = q.settings.rate_per_s;
        }
        for (queue, state, n) in self.ledger.tasks.counts() {
            let v = views.entry(queue).or_insert_with(|| blank(queue));
            match state {
                TaskState::Pending => v.pending += n,
                TaskState::Scheduled => v.scheduled += n,
                TaskState::Blocked => v.blocked += n,
                TaskState::Running => v.running += n,
                _ => {}
            }
        }
        for (queue, _) in self.ledger.finished_counts.keys() {
            views.entry(queue).or_insert_with(|| blank(queue));
        }
        views.into_values().collect()
    }

    pub(super) fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for st in TaskState::ALL {
            stats.by_state.insert(st.as_str().to_string(), 0);
        }
        let mut add = |queue: &str, state: TaskState, n: u64| {
            *stats
                .by_state
                .entry(state.as_str().to_string())
                .or_default() += n;
            *stats
                .by_queue
                .entry(queue.to_string())
                .or_default()
                .entry(state.as_str().to_string())
                .or_default() += n;
        };
        for (queue, state, n) in self.ledger.tasks.counts() {
            add(queue, state, n);
        }
        for ((queue, state), n) in &self.ledger.finished_counts {
            if *n > 0 {
                add(queue, *state, *n);
            }
        }
        let drones = &self.fleet.drones;
        stats.drones_connected = drones.len() as u64;
        stats.unroutable = self
            .dispatch
            .ready
            .routes()
            .filter(|(route, _)| {
                !drones
                    .values()
                    .any(|d| route.served_by(&d.kinds, &d.labels))
            })
            .map(|(_, n)| n as u64)
            .sum();
        stats
    }
}
