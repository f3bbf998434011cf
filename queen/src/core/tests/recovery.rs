//! Startup recovery on a real store: what waits, what is answered, what stops the core.

use std::sync::Arc;

use chrono::Utc;
use shared::api::TaskState;
use shared::TaskId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::recovery::Loaded;
use crate::core::{Core, CoreHandle, Request};
use crate::metrics::Metrics;
use crate::store::record::Recovered;
use crate::store::StoreError;
use crate::task::Task;

use crate::store::{Commit, Mutation, OpenOptionsHive, Store};
use shared::api::TaskSpec;

fn opts(dir: &std::path::Path) -> OpenOptionsHive {
    OpenOptionsHive {
        data_dir: dir.to_path_buf(),
        cache_capacity_bytes: 8 << 20,
        sync: false,
        metrics: Default::default(),
        idle_poll: std::time::Duration::from_micros(crate::config::DEFAULT_IDLE_POLL_US),
    }
}

fn task(cfg: &Config) -> Task {
    let spec = TaskSpec {
        kind: "echo".into(),
        ..Default::default()
    };
    Task::from_spec(spec, TaskId::generate(), Utc::now(), &cfg.tasks).expect("valid")
}

/// A store holding `tasks` as pending, reopened: the core built on it has read
/// nothing of them yet. The test feeds the recovered chunks itself.
async fn core_on(
    dir: &std::path::Path,
    tasks: &[Task],
) -> (Core, CoreHandle, mpsc::Receiver<Request>, Store) {
    let cfg = Config::default();
    {
        let (store, writer, _) = Store::open(&opts(dir), CancellationToken::new()).expect("open");
        let (tx, rx) = oneshot::channel();
        writer
            .send(Commit {
                mutations: tasks.iter().map(Mutation::save).collect(),
                after: Some(Box::new(move |r| drop(tx.send(r)))),
                first: false,
            })
            .await;
        rx.await.expect("answered").expect("durable");
        drop(writer);
        let Store { writer_thread, .. } = store;
        writer_thread.join().expect("writer exits");
    }
    let (store, writer, recovered) =
        Store::open(&opts(dir), CancellationToken::new()).expect("reopen");
    let reader = store.reader.clone();
    let (core, handle, rx) = Core::new(
        Arc::new(cfg),
        writer,
        Arc::new(reader),
        recovered,
        Metrics::new(),
        CancellationToken::new(),
    );
    (core, handle, rx, store)
}

#[tokio::test]
async fn requests_wait_for_recovery_except_exact_reads_and_then_run_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::default();
    let (a, b) = (task(&cfg), task(&cfg));
    let (core, handle, rx, store) = core_on(dir.path(), &[a.clone(), b.clone()]).await;
    let (chunk_tx, chunk_rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(core.serve(rx, shutdown.clone(), Some(chunk_rx)));

    let fresh = task(&cfg);
    let (submit_tx, mut submit_rx) = oneshot::channel();
    handle
        .send(Request::Submit {
            tasks: vec![fresh.clone()],
            reply: submit_tx,
        })
        .await
        .expect("sent");
    let (stats_tx, mut stats_rx) = oneshot::channel();
    handle
        .send(Request::Stats { reply: stats_tx })
        .await
        .expect("sent");
    // Answered in order after the two above: a task not read yet comes from the
    // store, exactly as stored.
    let got = handle
        .ask(|reply| Request::Get { id: b.id, reply })
        .await
        .expect("answered")
        .expect("found while recovering");
    assert_eq!((got.id, got.state), (b.id, TaskState::Pending));
    assert!(!handle.is_recovered());
    assert!(
        stats_rx.try_recv().is_err(),
        "counts wait until every task is read"
    );
    assert!(submit_rx.try_recv().is_err(), "writes wait for recovery");
    let unmade = handle
        .ask(|reply| Request::Get {
            id: fresh.id,
            reply,
        })
        .await
        .expect("answered");
    assert!(unmade.is_none(), "the held submit created nothing yet");
    assert!(
        store.reader.active(fresh.id).expect("read").is_none(),
        "nothing is written before recovery ends"
    );

    chunk_tx
        .send(Loaded::Chunk(vec![
            Recovered::Whole(a),
            Recovered::Whole(b),
        ]))
        .await
        .expect("core takes chunks");
    chunk_tx
        .send(Loaded::Done)
        .await
        .expect("core takes chunks");
    let created = submit_rx.await.expect("answered").expect("accepted");
    assert_eq!(created.len(), 1);
    assert!(created[0].1, "created");
    let stats = stats_rx.await.expect("answered after recovery");
    assert_eq!(
        stats.by_state.get("pending"),
        Some(&3),
        "the two recovered tasks and the one submitted meanwhile"
    );
    assert!(handle.is_recovered());
    shutdown.cancel();
    served.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn a_failed_read_stops_the_core_before_anything_waiting_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::default();
    let (core, handle, rx, store) = core_on(dir.path(), &[task(&cfg)]).await;
    let fatal = core.fatal.clone();
    let (chunk_tx, chunk_rx) = mpsc::channel(4);
    let served = tokio::spawn(core.serve(rx, CancellationToken::new(), Some(chunk_rx)));
    let fresh = task(&cfg);
    let (submit_tx, submit_rx) = oneshot::channel();
    handle
        .send(Request::Submit {
            tasks: vec![fresh.clone()],
            reply: submit_tx,
        })
        .await
        .expect("sent");
    // Answered after the submit was taken (and held): requests run in order.
    let seen = handle
        .ask(|reply| Request::Get {
            id: fresh.id,
            reply,
        })
        .await
        .expect("answered");
    assert!(seen.is_none(), "the held submit created nothing yet");
    chunk_tx
        .send(Loaded::Failed(StoreError::Corrupt {
            path: dir.path().to_path_buf(),
            detail: "planted".into(),
        }))
        .await
        .expect("core takes chunks");
    assert!(
        submit_rx.await.is_err(),
        "the held submit is dropped unanswered, never accepted"
    );
    let err = served.await.expect("join").expect_err("recovery failed");
    assert!(err.to_string().contains("planted"), "{err}");
    assert!(fatal.is_cancelled());
    assert!(store.reader.active(fresh.id).expect("read").is_none());
}

#[tokio::test]
async fn a_reader_that_dies_without_finishing_stops_the_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::default();
    let (a, b) = (task(&cfg), task(&cfg));
    let (core, handle, rx, _store) = core_on(dir.path(), &[a.clone(), b]).await;
    let fatal = core.fatal.clone();
    let (chunk_tx, chunk_rx) = mpsc::channel(4);
    let served = tokio::spawn(core.serve(rx, CancellationToken::new(), Some(chunk_rx)));
    // One chunk of two, then the reader is gone without saying Done (a panic).
    chunk_tx
        .send(Loaded::Chunk(vec![Recovered::Whole(a)]))
        .await
        .expect("core takes chunks");
    drop(chunk_tx);
    let err = served
        .await
        .expect("join")
        .expect_err("recovery incomplete");
    assert!(matches!(err, StoreError::Interrupted), "{err}");
    assert!(fatal.is_cancelled());
    assert!(!handle.is_recovered(), "half the tasks is not a recovery");
}
