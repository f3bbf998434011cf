//! Decision-level tests, one group per room: each drives the core through the harness
//! and checks what it decided, what it wrote and what it told drones — and when.

use std::time::Duration;

use shared::api::{TaskSpec, TaskState};
use shared::protocol::{Held, QueenMessage};
use shared::Fence;

use super::harness::{assigns, config, spec, Hive};
use crate::core::{CoreError, Request};

fn hive() -> Hive {
    Hive::new(config())
}

/// A task of `spec` submitted and leased to a new one-slot drone: the task, the drone,
/// and what it was assigned.
fn leased(
    h: &mut Hive,
    spec: TaskSpec,
) -> (
    shared::api::TaskView,
    super::harness::Link,
    Vec<shared::protocol::Assign>,
) {
    let t = h.submit(spec).expect("created");
    let mut drone = h.connect("d", 1, Vec::new(), None);
    h.settle();
    let a = assigns(&drone.inbox());
    (t, drone, a)
}

/// The drone behind `gone` reconnects holding `task` under `fence`: the lease is
/// re-attached (no second run), and its completion is recorded. Returns the new link.
fn come_back_and_finish(
    h: &mut Hive,
    gone: &super::harness::Link,
    task: shared::TaskId,
    fence: Fence,
) -> super::harness::Link {
    let held = vec![Held {
        task_id: task,
        fence,
    }];
    let mut back = h.connect("d", 1, held, Some(gone.drone));
    h.settle();
    assert!(
        assigns(&back.inbox()).is_empty(),
        "re-attached, not run a second time"
    );
    h.complete(&back, task, fence);
    h.settle();
    assert_eq!(h.state(task), Some(TaskState::Succeeded));
    back
}

mod ledger {
    use super::*;

    #[test]
    fn a_submit_is_answered_only_once_durable_and_then_found_on_disk() {
        let mut h = hive();
        let task = crate::task::Task::from_spec(
            spec(),
            shared::TaskId::generate(),
            h.now.wall,
            &h.cfg.tasks,
        )
        .expect("valid");
        let id = task.id;
        let mut rx = h.ask(|reply| Request::Submit {
            tasks: vec![task],
            reply,
        });
        h.pass();
        assert!(
            rx.try_recv().is_err(),
            "no answer before the write is durable"
        );
        assert!(h.disk().active.is_empty());
        h.flush();
        let views = rx.try_recv().expect("answered").expect("accepted");
        assert_eq!((views[0].0.id, views[0].1), (id, true));
        assert_eq!(h.disk().task(id).map(|t| t.state), Some(TaskState::Pending));
    }

    #[test]
    fn an_idempotency_key_returns_the_first_task_while_it_is_active_or_finished() {
        let mut h = hive();
        let keyed = || TaskSpec {
            idempotency_key: Some("order-7".into()),
            ..spec()
        };
        let first = h.submit(keyed()).expect("created");
        let again = h.submit(keyed()).expect("matched");
        assert_eq!(again.id, first.id);
        assert_eq!(h.disk().active.len(), 1, "nothing new was written");
        // Once finished and forgotten in memory, the key still names it (from the store).
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        h.complete(&drone, first.id, a[0].fence);
        h.settle();
        h.advance(Duration::from_millis(100));
        h.settle();
        assert!(
            h.core.ledger.recent.is_empty(),
            "finished tasks are read from the store"
        );
        assert_eq!(h.submit(keyed()).expect("matched").id, first.id);
    }

    #[test]
    fn dependencies_block_then_release_or_cancel_and_unknown_ones_are_refused() {
        let mut h = hive();
        let unknown = shared::TaskId::generate();
        let err = h
            .submit(TaskSpec {
                depends_on: vec![shared::api::Dependency::Id(unknown)],
                ..spec()
            })
            .expect_err("refused");
        assert_eq!(err, CoreError::UnknownDependency(unknown));
        let a = h.submit(spec()).expect("a");
        let b = h.submit(spec()).expect("b");
        let after_a = h
            .submit(TaskSpec {
                depends_on: vec![shared::api::Dependency::Id(a.id)],
                ..spec()
            })
            .expect("blocked");
        let after_b = h
            .submit(TaskSpec {
                depends_on: vec![shared::api::Dependency::Id(b.id)],
                ..spec()
            })
            .expect("blocked");
        assert_eq!(after_a.state, TaskState::Blocked);
        let mut drone = h.connect("d", 2, Vec::new(), None);
        h.settle();
        let granted = assigns(&drone.inbox());
        assert_eq!(granted.len(), 2, "only a and b are runnable");
        for g in &granted {
            if g.task_id == a.id {
                h.complete(&drone, g.task_id, g.fence);
            } else {
                h.fail(&drone, g.task_id, g.fence, false);
            }
        }
        h.settle();
        assert_ne!(h.state(after_a.id), Some(TaskState::Blocked), "released");
        assert!(
            assigns(&drone.inbox())
                .iter()
                .any(|g| g.task_id == after_a.id),
            "and leased"
        );
        let cancelled = h.get(after_b.id).expect("known");
        assert_eq!(cancelled.state, TaskState::Cancelled);
        assert_eq!(
            cancelled.cancel_reason.as_deref(),
            Some(&*format!("dependency {} failed", b.id))
        );
        // A new task on a dependency that already failed is born cancelled.
        let late = h
            .submit(TaskSpec {
                depends_on: vec![shared::api::Dependency::Id(b.id)],
                ..spec()
            })
            .expect("accepted");
        assert_eq!(late.state, TaskState::Cancelled);
    }

    /// The read-error fix: a failed read while re-checking a blocked task's dependencies
    /// must stop the queen, not cancel the task for good as "no longer exists".
    #[test]
    fn a_failed_read_of_a_dependency_stops_the_queen_and_leaves_the_task_blocked() {
        let mut h = hive();
        let done = h.submit(spec()).expect("done");
        let running = h.submit(spec()).expect("running");
        let mut drone = h.connect("d", 2, Vec::new(), None);
        h.settle();
        let granted = assigns(&drone.inbox());
        let fence_of = |id| {
            granted
                .iter()
                .find(|g| g.task_id == id)
                .map(|g| g.fence)
                .expect("granted")
        };
        h.complete(&drone, done.id, fence_of(done.id));
        h.settle();
        h.advance(Duration::from_millis(100));
        h.settle();
        assert!(
            h.core.ledger.recent.is_empty(),
            "`done` now lives on disk only"
        );
        let blocked = h
            .submit(TaskSpec {
                depends_on: vec![
                    shared::api::Dependency::Id(done.id),
                    shared::api::Dependency::Id(running.id),
                ],
                ..spec()
            })
            .expect("blocked");
        assert_eq!(blocked.state, TaskState::Blocked);
        drone.inbox();
        h.lookup
            .fail
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // `running` succeeds: the blocked task's other dependency must be read.
        h.complete(&drone, running.id, fence_of(running.id));
        h.pass();
        assert!(h.fatal(), "a failed read stops the queen");
        assert_eq!(h.undurable(), 0, "nothing decided in that pass is written");
        assert!(drone.inbox().is_empty(), "and nothing is acknowledged");
        assert_eq!(
            h.core.ledger.tasks.state(&blocked.id),
            Some(TaskState::Blocked),
            "the task is not cancelled for a dependency it could not read"
        );
        let on_disk = h.disk().task(blocked.id).expect("stored");
        assert_eq!(on_disk.state, TaskState::Blocked);
    }

    #[test]
    fn a_failed_idempotency_read_refuses_the_submit_and_stops_the_queen() {
        let mut h = hive();
        h.lookup
            .fail
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let err = h
            .submit(TaskSpec {
                idempotency_key: Some("k".into()),
                ..spec()
            })
            .expect_err("refused");
        assert!(matches!(err, CoreError::ReadFailed(_)), "{err:?}");
        assert!(h.fatal());
        assert!(h.disk().active.is_empty());
    }

    /// Found by the model test: a dependent cancelled for its dependency's failure used
    /// to run, once retried, without the dependency ever succeeding.
    #[test]
    fn a_retried_dependent_waits_for_its_dependency_and_is_refused_while_it_failed() {
        let mut h = hive();
        let dep = h
            .submit(TaskSpec {
                max_attempts: Some(1),
                ..spec()
            })
            .expect("dep");
        let after = h
            .submit(TaskSpec {
                depends_on: vec![shared::api::Dependency::Id(dep.id)],
                ..spec()
            })
            .expect("dependent");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        h.fail(&drone, dep.id, a[0].fence, false);
        h.settle();
        assert_eq!(h.state(after.id), Some(TaskState::Cancelled));
        let mut refused = h.ask(|reply| Request::Retry {
            id: after.id,
            reply,
        });
        let err = refused
            .try_recv()
            .expect("answered at once")
            .expect_err("refused");
        assert_eq!(
            err,
            CoreError::DependencyFailed {
                id: after.id,
                dep: dep.id,
                state: TaskState::Failed
            }
        );
        assert_eq!(
            h.state(after.id),
            Some(TaskState::Cancelled),
            "nothing changed"
        );
        drop(h.ask(|reply| Request::Retry { id: dep.id, reply }));
        let mut waits = h.ask(|reply| Request::Retry {
            id: after.id,
            reply,
        });
        h.settle();
        let view = waits.try_recv().expect("answered").expect("accepted");
        assert_eq!(
            view.state,
            TaskState::Blocked,
            "it waits for the dependency again"
        );
        let again = assigns(&drone.inbox());
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].task_id, dep.id, "only the dependency runs");
        h.complete(&drone, dep.id, again[0].fence);
        h.settle();
        let next = assigns(&drone.inbox());
        assert_eq!(next[0].task_id, after.id, "and then the dependent");
    }

    /// A dependent that ran (so its dependencies had succeeded) can be retried after its
    /// dependencies were purged by retention.
    #[test]
    fn a_dependent_that_ran_can_be_retried_after_its_dependency_was_purged() {
        let mut cfg = config();
        // Retention keeps one finished task: the older one, the dependency, goes first.
        cfg.retention.finished_max_count = 1;
        let mut h = Hive::new(cfg);
        let dep = h.submit(spec()).expect("dep");
        let after = h
            .submit(TaskSpec {
                depends_on: vec![shared::api::Dependency::Id(dep.id)],
                max_attempts: Some(1),
                ..spec()
            })
            .expect("dependent");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        h.complete(&drone, dep.id, a[0].fence);
        h.settle();
        let b = assigns(&drone.inbox());
        assert_eq!(b[0].task_id, after.id);
        h.fail(&drone, after.id, b[0].fence, false);
        h.settle();
        assert_eq!(h.state(after.id), Some(TaskState::Failed));
        h.advance(
            Duration::from_millis(h.cfg.retention.purge_interval_ms) + Duration::from_secs(31),
        );
        h.settle();
        assert!(
            !h.disk().finished.contains_key(&dep.id),
            "the dependency is purged"
        );
        let mut rx = h.ask(|reply| Request::Retry {
            id: after.id,
            reply,
        });
        h.settle();
        let view = rx.try_recv().expect("answered").expect("retried");
        assert_eq!(view.state, TaskState::Pending);
    }

    #[test]
    fn a_retry_revives_a_failed_task_with_a_fresh_set_of_attempts_and_the_fence_going_on() {
        let mut h = hive();
        let t = h
            .submit(TaskSpec {
                max_attempts: Some(1),
                ..spec()
            })
            .expect("created");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        h.fail(&drone, t.id, a[0].fence, true);
        h.settle();
        assert_eq!(
            h.state(t.id),
            Some(TaskState::Failed),
            "its only attempt failed"
        );
        let not_yet = h.ask(|reply| Request::Retry { id: t.id, reply });
        drop(not_yet);
        h.settle();
        let again = assigns(&drone.inbox());
        assert_eq!(again.len(), 1, "retried and leased again");
        assert_eq!((again[0].attempt, again[0].fence), (1, Fence(2)));
        let mut conflict = h.ask(|reply| Request::Retry { id: t.id, reply });
        let err = conflict
            .try_recv()
            .expect("answered at once")
            .expect_err("running");
        assert_eq!(
            err,
            CoreError::NotRetryable {
                id: t.id,
                state: TaskState::Running
            }
        );
    }
}

mod dispatch {
    use super::*;

    #[test]
    fn a_grant_bumps_the_fence_and_the_assign_waits_for_the_grant_to_be_durable() {
        let mut h = hive();
        let t = h.submit(spec()).expect("created");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.pass();
        let before: Vec<QueenMessage> = drone.inbox();
        assert!(
            assigns(&before).is_empty(),
            "no assign before its grant is durable"
        );
        assert_eq!(h.state(t.id), Some(TaskState::Running));
        h.flush();
        let a = assigns(&drone.inbox());
        assert_eq!(
            (a[0].task_id, a[0].fence, a[0].attempt),
            (t.id, Fence(1), 1)
        );
        let stored = h.disk().task(t.id).expect("stored");
        assert_eq!((stored.state, stored.fence), (TaskState::Running, Fence(1)));
    }

    #[test]
    fn a_drone_gets_no_more_tasks_than_slots_and_a_paused_queue_none() {
        let mut h = hive();
        for _ in 0..3 {
            h.submit(spec()).expect("created");
        }
        let mut drone = h.connect("d", 2, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&drone.inbox()).len(), 2);
        let mut paused = h.ask(|reply| Request::SetQueue {
            name: "default".into(),
            change: crate::core::QueueChange::Pause,
            reply,
        });
        h.settle();
        assert!(paused.try_recv().expect("answered").expect("ok").paused);
        let mut other = h.connect("e", 4, Vec::new(), None);
        h.settle();
        assert!(
            assigns(&other.inbox()).is_empty(),
            "a paused queue starts nothing"
        );
    }
}

mod fleet {
    use super::*;

    #[test]
    fn a_heartbeat_without_a_seen_lease_loses_it_and_a_foreign_task_is_stopped() {
        let mut h = hive();
        let (t, mut drone, a) = leased(&mut h, spec());
        // The drone has seen the assign but no longer holds it, and runs a task it was
        // never given.
        let stranger = shared::TaskId::generate();
        h.heartbeat(
            &drone,
            vec![Held {
                task_id: stranger,
                fence: Fence(9),
            }],
        );
        h.settle();
        let msgs = drone.inbox();
        assert!(
            msgs.iter()
                .any(|m| matches!(m, QueenMessage::Cancel(c) if c.task_id == stranger)),
            "{msgs:?}"
        );
        let view = h.get(t.id).expect("known");
        assert_eq!(view.errors.len(), 1, "the lost attempt is on record");
        assert!(view.errors[0]
            .error
            .contains("drone no longer reports the task"));
        // Requeued, and leased again under a new fence once the stranger's slot frees.
        assert!(
            assigns(&msgs).is_empty(),
            "the slot is held while the stranger is stopped"
        );
        h.heartbeat(&drone, Vec::new());
        h.settle();
        let again = assigns(&drone.inbox());
        assert_eq!(
            (again[0].task_id, again[0].fence),
            (t.id, a[0].fence.next())
        );
    }

    #[test]
    fn a_disconnected_drone_that_returns_in_time_keeps_its_lease_and_one_that_does_not_loses_it() {
        let mut h = hive();
        let (t, drone, a) = leased(&mut h, spec());
        h.close(&drone);
        h.settle();
        h.advance(h.cfg.leases.reconnect_grace() / 2);
        h.settle();
        assert_eq!(
            h.state(t.id),
            Some(TaskState::Running),
            "an orphan waits for its drone"
        );
        let mut back = come_back_and_finish(&mut h, &drone, t.id, a[0].fence);

        let u = h.submit(spec()).expect("created");
        h.settle();
        let b = assigns(&back.inbox());
        assert_eq!(b[0].task_id, u.id);
        h.close(&back);
        h.settle();
        h.advance(h.cfg.leases.reconnect_grace() + Duration::from_millis(100));
        h.settle();
        let view = h.get(u.id).expect("known");
        assert_eq!(view.state, TaskState::Pending, "given up and requeued");
        assert!(view.errors[0].error.contains("did not come back in time"));
    }

    /// A queen that stalled (stopped, starved) past the heartbeat timeout could not hear
    /// its drones: it gives each a fresh timeout instead of expiring them on resume, and a
    /// drone that really went away meanwhile is still expired within the usual bound.
    #[test]
    fn a_stall_of_the_queen_is_not_held_against_its_drones() {
        let mut h = hive();
        let t = h.submit(spec()).expect("created");
        let u = h.submit(spec()).expect("created");
        let mut alive = h.connect("alive", 1, Vec::new(), None);
        let mut gone = h.connect("gone", 1, Vec::new(), None);
        h.settle();
        let (a, g) = (assigns(&alive.inbox()), assigns(&gone.inbox()));
        assert_eq!((a.len(), g.len()), (1, 1));
        let timeout = h.cfg.leases.heartbeat_timeout();
        h.stall(timeout * 3);
        h.settle();
        // What waited in the sockets is read first: `alive`'s heartbeat.
        let held = vec![Held {
            task_id: a[0].task_id,
            fence: a[0].fence,
        }];
        h.heartbeat(&alive, held.clone());
        h.settle();
        for id in [t.id, u.id] {
            assert_eq!(
                h.state(id),
                Some(TaskState::Running),
                "no lease lost to the stall"
            );
        }
        assert!(!alive.close.is_cancelled() && !gone.close.is_cancelled());
        // From now on silence counts again: `gone` says nothing and is expired after one
        // heartbeat timeout (and a check interval), `alive` keeps heartbeating.
        let step = h.cfg.leases.heartbeat_interval();
        let mut waited = Duration::ZERO;
        while waited <= timeout + step {
            h.advance(step);
            waited += step;
            h.heartbeat(&alive, held.clone());
            h.settle();
        }
        assert!(
            gone.close.is_cancelled(),
            "a drone silent after the stall is expired"
        );
        assert_eq!(
            h.state(g[0].task_id),
            Some(TaskState::Pending),
            "and its task requeued"
        );
        assert_eq!(h.state(a[0].task_id), Some(TaskState::Running));
        assert!(!alive.close.is_cancelled());
    }

    /// An orphan's grace and an attempt's deadline do not run out during the queen's own
    /// stall: the drone that left could not have come back while the queen was not
    /// listening, nor could a report have been heard.
    /// Stalls pause a drone's silence clock, they do not reset it: a drone that died with
    /// its connection open is found out even when the queen keeps stalling.
    #[test]
    fn repeated_stalls_do_not_hide_a_dead_drone() {
        let mut h = hive();
        let t = h.submit(spec()).expect("created");
        let mut dead = h.connect("dead", 1, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&dead.inbox()).len(), 1);
        let listening = h.cfg.leases.heartbeat_interval() / 2;
        let mut cycles = 0;
        while !dead.close.is_cancelled() {
            cycles += 1;
            assert!(cycles <= 40, "a silent drone survived {cycles} stalls");
            h.stall(h.cfg.leases.heartbeat_interval() * 2);
            h.settle();
            h.advance(listening);
            h.settle();
        }
        assert_eq!(h.state(t.id), Some(TaskState::Pending), "its task requeued");
        // The silence it was charged is the listening time, a heartbeat timeout's worth.
        let heard = listening * cycles;
        assert!(
            heard >= h.cfg.leases.heartbeat_timeout() / 2,
            "expired after {heard:?} heard"
        );
    }

    #[test]
    fn a_stall_moves_orphan_and_attempt_deadlines_on() {
        let mut h = hive();
        let t = h
            .submit(TaskSpec {
                timeout_ms: Some(1_000),
                ..spec()
            })
            .expect("created");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        h.close(&drone);
        h.settle();
        h.stall(h.cfg.leases.heartbeat_timeout() * 3);
        h.settle();
        assert_eq!(
            h.state(t.id),
            Some(TaskState::Running),
            "the orphan waits on"
        );
        come_back_and_finish(&mut h, &drone, t.id, a[0].fence);
    }

    #[test]
    fn a_silent_drone_is_expired_after_the_heartbeat_timeout_and_its_work_requeued() {
        let mut h = hive();
        let t = h.submit(spec()).expect("created");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&drone.inbox()).len(), 1);
        h.advance(h.cfg.leases.heartbeat_timeout() - Duration::from_millis(10));
        h.settle();
        assert_eq!(h.state(t.id), Some(TaskState::Running), "not silent yet");
        h.advance(h.cfg.leases.heartbeat_timeout());
        h.settle();
        assert_eq!(h.state(t.id), Some(TaskState::Pending));
        assert!(drone.close.is_cancelled(), "its connection is closed");
    }
}

mod attempts {
    use super::*;

    #[test]
    fn a_failed_attempt_retries_after_a_backoff_within_the_jitter_bounds() {
        let mut h = hive();
        let (t, mut drone, a) = leased(&mut h, spec());
        let failed_at = h.now.wall;
        h.fail(&drone, t.id, a[0].fence, true);
        h.settle();
        let view = h.get(t.id).expect("known");
        assert_eq!(view.state, TaskState::Scheduled);
        let at = view.run_at.expect("a retry time");
        let base = chrono::Duration::milliseconds(h.cfg.tasks.retry_base_ms as i64);
        assert!(
            at >= failed_at + base / 2 && at <= failed_at + base,
            "{at} vs {failed_at}"
        );
        h.advance(Duration::from_millis(h.cfg.tasks.retry_base_ms + 60));
        h.settle();
        h.settle();
        let again = assigns(&drone.inbox());
        assert_eq!((again[0].attempt, again[0].fence), (2, Fence(2)));
    }

    #[test]
    fn a_stale_or_duplicated_outcome_is_acked_stale_and_changes_nothing() {
        let mut h = hive();
        let (t, mut drone, a) = leased(&mut h, spec());
        h.complete(&drone, t.id, Fence(a[0].fence.0 + 7));
        h.complete(&drone, t.id, a[0].fence);
        h.complete(&drone, t.id, a[0].fence);
        h.settle();
        let statuses: Vec<_> = drone
            .inbox()
            .into_iter()
            .filter_map(|m| match m {
                QueenMessage::Ack(ack) => Some(ack.status),
                _ => None,
            })
            .collect();
        use shared::protocol::AckStatus::{Recorded, Stale};
        assert_eq!(statuses, vec![Stale, Recorded, Stale]);
        assert_eq!(h.state(t.id), Some(TaskState::Succeeded));
    }

    #[test]
    fn an_attempt_past_its_deadline_fails_and_its_drone_is_told_to_stop() {
        let mut h = hive();
        let t = h
            .submit(TaskSpec {
                timeout_ms: Some(1_000),
                ..spec()
            })
            .expect("created");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        // Heartbeats keep the drone alive; the attempt itself never reports.
        let held = vec![Held {
            task_id: t.id,
            fence: a[0].fence,
        }];
        let step = h.cfg.leases.heartbeat_interval();
        let limit = Duration::from_millis(1_000) + h.cfg.leases.heartbeat_timeout();
        let mut waited = Duration::ZERO;
        while waited <= limit {
            h.advance(step);
            waited += step;
            h.heartbeat(&drone, held.clone());
            h.settle();
        }
        let msgs = drone.inbox();
        assert!(
            msgs.iter().any(|m| matches!(m, QueenMessage::Cancel(c) if c.task_id == t.id && c.reason == "attempt timed out")),
            "{msgs:?}"
        );
        let view = h.get(t.id).expect("known");
        assert!(
            view.errors[0].error.starts_with("timed out"),
            "{:?}",
            view.errors
        );
        assert_ne!(view.state, TaskState::Running);
    }

    #[test]
    fn cancelling_a_running_task_tells_its_drone_only_once_the_cancel_is_durable() {
        let mut h = hive();
        let t = h.submit(spec()).expect("created");
        let (other, mut drone, a) = leased(&mut h, spec());
        let running = a[0].task_id;
        let mut rx = h.ask(|reply| Request::Cancel {
            id: running,
            reason: "operator".into(),
            reply,
        });
        h.pass();
        assert!(drone.inbox().is_empty(), "not before the cancel is durable");
        assert!(rx.try_recv().is_err());
        h.flush();
        let view = rx.try_recv().expect("answered").expect("cancelled");
        assert_eq!(view.state, TaskState::Cancelled);
        let msgs = drone.inbox();
        assert!(msgs
            .iter()
            .any(|m| matches!(m, QueenMessage::Cancel(c) if c.task_id == running)));
        assert!(
            assigns(&msgs).is_empty(),
            "the slot stays taken while the drone stops it"
        );
        let held = vec![Held {
            task_id: running,
            fence: a[0].fence,
        }];
        h.heartbeat(&drone, held);
        h.settle();
        assert!(assigns(&drone.inbox()).is_empty());
        h.heartbeat(&drone, Vec::new());
        h.settle();
        let next = assigns(&drone.inbox());
        let waiting = if running == t.id { other.id } else { t.id };
        assert_eq!(
            next[0].task_id, waiting,
            "the slot freed once the drone let go"
        );
    }
}

mod timers {
    use super::*;

    #[test]
    fn a_schedule_fires_once_per_tick_with_a_per_tick_key() {
        let mut h = hive();
        let schedule = crate::schedule::Schedule {
            name: "nightly".into(),
            every: crate::schedule::Every::interval(1_000).expect("valid"),
            task: serde_json::json!({"kind": "echo"}),
            created_at: h.now.wall,
            last_tick: h.now.wall,
        };
        let mut rx = h.ask(|reply| Request::PutSchedule {
            schedule: Box::new(schedule),
            reply,
        });
        h.settle();
        assert!(
            rx.try_recv().expect("answered").expect("saved").1,
            "created"
        );
        h.advance(Duration::from_millis(1_100));
        h.settle();
        h.advance(Duration::from_millis(100));
        h.settle();
        let disk = h.disk();
        let runs: Vec<_> = disk.active.keys().filter_map(|id| disk.task(*id)).collect();
        assert_eq!(runs.len(), 1, "one run for one tick");
        assert!(runs[0]
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.contains("nightly")));
        assert_eq!(disk.idem.len(), 1);
    }

    #[test]
    fn finished_tasks_past_retention_are_purged_with_what_points_at_them() {
        let mut cfg = config();
        cfg.retention.finished_max_age_s = 60;
        let mut h = Hive::new(cfg);
        let t = h
            .submit(TaskSpec {
                idempotency_key: Some("once".into()),
                ..spec()
            })
            .expect("created");
        let mut drone = h.connect("d", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&drone.inbox());
        h.complete(&drone, t.id, a[0].fence);
        h.settle();
        assert!(h.disk().finished.contains_key(&t.id));
        h.advance(Duration::from_secs(30));
        h.settle();
        assert!(
            h.disk().finished.contains_key(&t.id),
            "kept within retention"
        );
        h.advance(
            Duration::from_millis(h.cfg.retention.purge_interval_ms) + Duration::from_secs(31),
        );
        h.settle();
        let disk = h.disk();
        assert!(!disk.finished.contains_key(&t.id), "purged");
        assert!(disk.idem.is_empty() && disk.retention.is_empty());
        assert!(h.get(t.id).is_none());
    }
}

mod disk {
    use super::*;

    /// Below `[storage] min_free_mb` free, new work is refused with the free space and
    /// the setting named, while the outcome of work already accepted is still recorded;
    /// once space is back, new work is accepted again without a restart.
    #[test]
    fn below_the_reserve_new_work_is_refused_and_accepted_work_still_finishes() {
        let mut h = hive();
        let (t, drone, a) = leased(&mut h, spec());
        let reserve = h.cfg.storage.min_free_mb * 1024 * 1024;
        h.core.disk.set_free_bytes(reserve - 1);
        h.advance(Duration::from_millis(100));
        h.settle();
        assert!(h.core.disk.degraded());
        let err = h.submit(spec()).expect_err("refused");
        assert!(
            matches!(err, CoreError::InsufficientStorage { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("min_free_mb") && text.contains("MiB free"),
            "{text}"
        );
        assert_eq!(err.kind(), crate::core::ErrorKind::InsufficientStorage);
        // The running task's outcome is still recorded, durably.
        h.complete(&drone, t.id, a[0].fence);
        h.settle();
        assert_eq!(h.state(t.id), Some(TaskState::Succeeded));
        assert!(h.disk().finished.contains_key(&t.id));
        // Space comes back: accepted again, by itself.
        h.core.disk.set_free_bytes(reserve * 4);
        h.advance(Duration::from_millis(100));
        h.settle();
        assert!(!h.core.disk.degraded());
        let again = h.submit(spec()).expect("accepted");
        assert_eq!(again.state, TaskState::Pending);
    }
}

/// Poison-task quarantine: who becomes a suspect, how a suspect runs alone, and what
/// convicts it (only an isolated attempt whose drone died by itself).
mod quarantine {
    use super::super::harness::Link;
    use super::*;
    use shared::api::LossVerdict;
    use shared::TaskId;

    /// Suspects after one lost lease, convicted by one isolated loss.
    fn strict() -> Hive {
        let mut cfg = config();
        cfg.tasks.suspect_after_lost = 1;
        cfg.tasks.max_lost_attempts = 1;
        Hive::new(cfg)
    }

    fn many_attempts() -> TaskSpec {
        TaskSpec {
            max_attempts: Some(10),
            ..spec()
        }
    }

    /// The drone behind `link` dies: its connection closes and it does not come back.
    fn die(h: &mut Hive, link: &Link) {
        h.close(link);
        h.settle();
    }

    fn give_up_orphans(h: &mut Hive) {
        h.advance(h.cfg.leases.reconnect_grace() + Duration::from_millis(100));
        h.settle();
    }

    /// Time for a verdict: the correlation window after a lone drone's death.
    fn wait_out_the_window(h: &mut Hive) {
        let window = Duration::from_millis(h.cfg.tasks.loss_correlation_ms)
            .max(h.cfg.leases.heartbeat_timeout() * 2);
        h.advance(window + Duration::from_millis(100));
        h.settle();
    }

    /// The verdicts on a task's lost leases, as stored.
    fn verdicts(h: &mut Hive, id: TaskId) -> Vec<LossVerdict> {
        h.disk()
            .task(id)
            .and_then(|t| t.suspicion)
            .map(|s| s.losses.iter().map(|l| l.verdict).collect())
            .unwrap_or_default()
    }

    /// The state of a task, as stored (finished tasks leave memory once durable).
    fn stored(h: &Hive, id: TaskId) -> Option<TaskState> {
        h.disk().task(id).map(|t| t.state)
    }

    /// A task made a suspect: leased alone to a drone that dies (no other drone lost).
    fn suspect(h: &mut Hive) -> TaskId {
        let t = h.submit(many_attempts()).expect("created");
        let mut d = h.connect("first", 1, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&d.inbox())[0].task_id, t.id);
        die(h, &d);
        give_up_orphans(h);
        let view = h.get(t.id).expect("known");
        assert!(
            view.state == TaskState::Pending
                && view.suspicion.is_some_and(|s| s.suspect_since.is_some()),
            "a suspect, pending again"
        );
        t.id
    }

    /// A poison task kills the three-slot drones it shares with two innocent tasks:
    /// all three become suspects, each runs alone, and only the poison's lone drone dies.
    /// The poison is convicted; the innocents, which shared every death, are not.
    #[test]
    fn the_co_tenants_of_a_poison_task_are_never_convicted() {
        let mut h = hive();
        let poison = h.submit(many_attempts()).expect("created").id;
        let innocent: Vec<TaskId> = (0..2)
            .map(|_| h.submit(many_attempts()).expect("created").id)
            .collect();
        for round in 0..h.cfg.tasks.suspect_after_lost {
            let mut d = h.connect(&format!("shared{round}"), 3, Vec::new(), None);
            h.settle();
            assert_eq!(assigns(&d.inbox()).len(), 3, "all three share the drone");
            die(&mut h, &d);
            give_up_orphans(&mut h);
        }
        // Three drones of three slots: each suspect gets one to itself.
        let mut drones: Vec<Link> = (0..3)
            .map(|i| h.connect(&format!("alone{i}"), 3, Vec::new(), None))
            .collect();
        h.settle();
        let mut runs = Vec::new();
        for d in &mut drones {
            let a = assigns(&d.inbox());
            assert_eq!(a.len(), 1, "a suspect runs alone");
            runs.push(a[0].clone());
        }
        for (d, a) in drones.iter().zip(&runs) {
            if a.task_id == poison {
                die(&mut h, d);
            } else {
                h.complete(d, a.task_id, a.fence);
            }
        }
        give_up_orphans(&mut h);
        assert_eq!(
            stored(&h, poison),
            Some(TaskState::Scheduled),
            "it waits for its verdict"
        );
        wait_out_the_window(&mut h);
        let view = h.disk().task(poison).expect("stored");
        assert_eq!(view.state, TaskState::Failed);
        assert!(view
            .errors
            .last()
            .is_some_and(|e| e.error.contains("quarantined")));
        assert_eq!(
            verdicts(&mut h, poison),
            [
                LossVerdict::Shared,
                LossVerdict::Shared,
                LossVerdict::Isolated
            ]
        );
        for id in innocent {
            assert_eq!(stored(&h, id), Some(TaskState::Succeeded));
            assert_eq!(
                verdicts(&mut h, id),
                [LossVerdict::Shared, LossVerdict::Shared]
            );
        }
    }

    #[test]
    fn a_suspect_runs_alone_on_an_idle_drone_which_takes_nothing_else_meanwhile() {
        let mut h = strict();
        let s = suspect(&mut h);
        let others: Vec<TaskId> = (0..2)
            .map(|_| h.submit(spec()).expect("created").id)
            .collect();
        let mut lone = h.connect("lone", 3, Vec::new(), None);
        h.settle();
        let a = assigns(&lone.inbox());
        assert_eq!(
            a.iter().map(|a| a.task_id).collect::<Vec<_>>(),
            [s],
            "the suspect (oldest) alone, though the drone has three slots"
        );
        let mut other = h.connect("other", 3, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&other.inbox()).len(), 2, "the rest run elsewhere");
        // Once the suspect's attempt ends, the drone takes other work again.
        h.complete(&lone, s, a[0].fence);
        h.settle();
        assert_eq!(h.state(s), Some(TaskState::Succeeded));
        let more = h.submit(spec()).expect("created");
        h.settle();
        let got: Vec<TaskId> = assigns(&lone.inbox())
            .into_iter()
            .chain(assigns(&other.inbox()))
            .map(|a| a.task_id)
            .collect();
        assert_eq!(got, [more.id]);
        assert!(others
            .iter()
            .all(|o| h.state(*o) == Some(TaskState::Running)));
    }

    #[test]
    fn with_no_idle_drone_one_is_held_for_the_suspect_until_its_work_ends() {
        let mut h = strict();
        let s = suspect(&mut h);
        let busy = h
            .submit(TaskSpec {
                priority: Some(10),
                ..spec()
            })
            .expect("created");
        let mut d = h.connect("busy", 2, Vec::new(), None);
        h.settle();
        // `busy` goes first (priority); the suspect cannot run beside it: the drone is
        // held for the suspect, and takes no new task though it has a free slot.
        let running = assigns(&d.inbox());
        assert_eq!(
            running.iter().map(|a| a.task_id).collect::<Vec<_>>(),
            [busy.id]
        );
        let late = h.submit(spec()).expect("created");
        h.settle();
        assert!(assigns(&d.inbox()).is_empty(), "held: nothing new");
        assert_eq!(h.state(late.id), Some(TaskState::Pending));
        assert_eq!(h.state(s), Some(TaskState::Pending));
        // Its work ends: the suspect runs there, alone; the late task still waits.
        h.complete(&d, busy.id, running[0].fence);
        h.settle();
        let a = assigns(&d.inbox());
        assert_eq!(a.iter().map(|a| a.task_id).collect::<Vec<_>>(), [s]);
        h.complete(&d, s, a[0].fence);
        h.settle();
        assert_eq!(assigns(&d.inbox())[0].task_id, late.id);
    }

    #[test]
    fn a_suspect_waiting_for_a_held_drone_takes_an_empty_one_that_comes_first() {
        let mut h = strict();
        let s = suspect(&mut h);
        let busy = h
            .submit(TaskSpec {
                priority: Some(10),
                ..spec()
            })
            .expect("created");
        let mut held = h.connect("busy", 2, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&held.inbox())[0].task_id, busy.id);
        assert_eq!(h.state(s), Some(TaskState::Pending), "waits for a drone");
        let mut fresh = h.connect("fresh", 1, Vec::new(), None);
        h.settle();
        let a = assigns(&fresh.inbox());
        assert_eq!(a.iter().map(|a| a.task_id).collect::<Vec<_>>(), [s]);
        // The held drone is released: it takes new work again.
        let late = h.submit(spec()).expect("created");
        h.settle();
        assert_eq!(assigns(&held.inbox())[0].task_id, late.id);
    }

    #[test]
    fn a_suspect_alone_on_a_drone_that_dies_by_itself_is_quarantined() {
        let mut h = strict();
        let s = suspect(&mut h);
        let d = h.connect("victim", 1, Vec::new(), None);
        h.settle();
        die(&mut h, &d);
        give_up_orphans(&mut h);
        assert_eq!(verdicts(&mut h, s)[1], LossVerdict::Awaiting);
        assert_eq!(h.state(s), Some(TaskState::Scheduled), "not run meanwhile");
        wait_out_the_window(&mut h);
        let view = h.disk().task(s).expect("stored");
        assert_eq!(view.state, TaskState::Failed);
        assert_eq!(view.attempts, 2, "with attempts left: quarantined");
        assert!(view.errors[1].error.contains("quarantined"), "{view:?}");
        assert_eq!(
            verdicts(&mut h, s),
            [LossVerdict::Alone, LossVerdict::Isolated]
        );
    }

    #[test]
    fn a_suspect_whose_drone_died_with_others_is_not_convicted() {
        let mut h = strict();
        let s = suspect(&mut h);
        let ordinary = h.submit(spec()).expect("created");
        let mut lone = h.connect("lone", 1, Vec::new(), None);
        let mut other = h.connect("other", 1, Vec::new(), None);
        h.settle();
        let got: Vec<TaskId> = assigns(&lone.inbox())
            .into_iter()
            .chain(assigns(&other.inbox()))
            .map(|a| a.task_id)
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        // A rack goes: both drones at once.
        die(&mut h, &lone);
        die(&mut h, &other);
        give_up_orphans(&mut h);
        assert_eq!(
            h.state(s),
            Some(TaskState::Pending),
            "requeued, not convicted"
        );
        assert_eq!(
            verdicts(&mut h, s),
            [LossVerdict::Alone, LossVerdict::Inconclusive]
        );
        assert_eq!(h.state(ordinary.id), Some(TaskState::Pending));
    }

    /// A mass failure noticed after the suspect's lone drone died (the first drone of a
    /// storm to go) is seen when the verdict comes, a window later.
    #[test]
    fn a_suspect_whose_drone_died_first_in_a_storm_is_not_convicted() {
        let mut h = strict();
        let s = suspect(&mut h);
        let ordinary = h.submit(spec()).expect("created");
        let lone = h.connect("lone", 1, Vec::new(), None);
        h.settle();
        die(&mut h, &lone);
        give_up_orphans(&mut h);
        assert_eq!(
            h.state(s),
            Some(TaskState::Scheduled),
            "awaiting its verdict"
        );
        // Seconds later, more of the fleet goes.
        h.advance(Duration::from_secs(3));
        let mut other = h.connect("other", 1, Vec::new(), None);
        h.settle();
        assert_eq!(assigns(&other.inbox())[0].task_id, ordinary.id);
        die(&mut h, &other);
        give_up_orphans(&mut h);
        wait_out_the_window(&mut h);
        assert_eq!(h.state(s), Some(TaskState::Pending), "runs again");
        assert_eq!(
            verdicts(&mut h, s),
            [LossVerdict::Alone, LossVerdict::Inconclusive]
        );
    }

    #[test]
    fn a_suspect_awaiting_its_verdict_is_judged_after_a_restart() {
        let mut h = strict();
        let s = suspect(&mut h);
        let d = h.connect("victim", 1, Vec::new(), None);
        h.settle();
        die(&mut h, &d);
        give_up_orphans(&mut h);
        assert_eq!(h.state(s), Some(TaskState::Scheduled));
        let mut h = h.restart();
        wait_out_the_window(&mut h);
        let view = h.disk().task(s).expect("stored");
        assert_eq!(view.state, TaskState::Failed, "judged from what is on disk");
        assert_eq!(
            verdicts(&mut h, s),
            [LossVerdict::Alone, LossVerdict::Isolated]
        );
    }

    #[test]
    fn a_suspect_stays_one_across_a_restart_and_still_runs_alone() {
        let mut h = strict();
        let s = suspect(&mut h);
        h.submit(spec()).expect("created");
        h.settle();
        let mut h = h.restart();
        let mut d = h.connect("after", 2, Vec::new(), None);
        h.settle();
        let a = assigns(&d.inbox());
        assert_eq!(
            a.iter().map(|a| a.task_id).collect::<Vec<_>>(),
            [s],
            "alone, though the drone has two slots"
        );
    }
}
