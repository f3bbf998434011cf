use super::*;
use chrono::Utc;
use shared::api::TaskSpec;
use tokio::sync::oneshot;

fn opts(dir: &Path) -> OpenOptionsHive {
    OpenOptionsHive {
        data_dir: dir.to_path_buf(),
        cache_capacity_bytes: 8 << 20,
        sync: false,
        metrics: Default::default(),
        idle_poll: std::time::Duration::from_micros(crate::config::DEFAULT_IDLE_POLL_US),
    }
}

fn task() -> Task {
    let spec = TaskSpec {
        kind: "echo".into(),
        ..Default::default()
    };
    Task::from_spec(spec, TaskId::generate(), Utc::now(), &Default::default()).expect("valid")
}

async fn commit(writer: &StoreWriter, mutations: Vec<Mutation>) -> Result<(), CommitError> {
    let (tx, rx) = oneshot::channel();
    writer
        .send(Commit {
            mutations,
            after: Some(Box::new(move |r| drop(tx.send(r)))),
            first: false,
        })
        .await;
    rx.await
        .unwrap_or_else(|_| Err(CommitError("dropped".into())))
}

fn close(store: Store, writer: StoreWriter) {
    let Store {
        reader,
        core_reader,
        writer_thread,
        _lock,
    } = store;
    drop((reader, core_reader, writer));
    writer_thread.join().expect("writer thread exits cleanly");
    drop(_lock);
}

#[tokio::test]
async fn committed_tasks_survive_reopen_and_finished_ones_live_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (active, mut done) = (task(), task());
    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    assert!(rec.active.collect().expect("scan").is_empty());
    commit(&w, vec![Mutation::save(&active), Mutation::save(&done)])
        .await
        .expect("durable");
    done.state = TaskState::Succeeded;
    done.finished_at = Some(Utc::now());
    commit(&w, vec![Mutation::finish(&done, 1)])
        .await
        .expect("durable");
    assert_eq!(w.durable(), 2);
    close(store, w);

    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    assert_eq!(
        rec.active.collect().expect("scan"),
        vec![active],
        "only the active task is loaded at start"
    );
    assert_eq!(
        rec.finished_counts,
        vec![(("default".to_string(), TaskState::Succeeded), 1)]
    );
    assert_eq!(
        store.reader.finished(done.id).expect("read"),
        Some(done.clone())
    );
    let page = store
        .reader
        .finished_page(None, 10, 100, |_| true)
        .expect("page");
    assert_eq!(page.len(), 1);
    close(store, w);
}

#[tokio::test]
async fn a_second_queen_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    let err = Store::open(&opts(dir.path()), CancellationToken::new()).expect_err("locked");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use by another queen"));
    close(store, w);
    // Once the first is gone the dir opens again.
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    close(store, w);
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_the_database_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = task();
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&t)]).await.expect("durable");
    store
        .reader
        .tree()
        .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
        .expect("insert");
    store.reader.tree().flush().expect("flush");
    close(store, w);
    let err = Store::open(&opts(dir.path()), CancellationToken::new()).expect_err("newer");
    assert!(err.to_string().contains("newer than this queen"), "{err}");
}

/// Guards the 2 → 3 upgrade: a schema-2 database opens, is marked 3 (so a schema-2 queen
/// would refuse it), gives its v2 records back unchanged, and a task saved with lost-lease
/// evidence afterwards is a v3 record that reads back equal.
#[tokio::test]
async fn a_schema_2_database_is_upgraded_and_takes_v3_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = task();
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&t)]).await.expect("durable");
    store
        .reader
        .tree()
        .insert(SCHEMA_KEY, &2u32.to_be_bytes())
        .expect("insert");
    store.reader.tree().flush().expect("flush");
    close(store, w);

    let (store, w, rec) =
        Store::open(&opts(dir.path()), CancellationToken::new()).expect("upgrade");
    assert_eq!(rec.active.collect().expect("scan"), vec![t.clone()]);
    let schema = store
        .reader
        .tree()
        .get(SCHEMA_KEY)
        .expect("get")
        .expect("set");
    assert_eq!(schema.as_ref(), &SCHEMA_VERSION.to_be_bytes());
    t.lost = 1;
    t.suspicion = Some(Box::new(shared::api::Suspicion {
        suspect_since: None,
        losses: vec![shared::api::LostLease {
            attempt: 1,
            fence: shared::Fence(1),
            drone: None,
            co_tenants: 2,
            verdict: shared::api::LossVerdict::Shared,
            at: chrono::Utc::now(),
        }],
    }));
    commit(&w, vec![Mutation::save(&t)]).await.expect("durable");
    close(store, w);
    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    assert_eq!(rec.active.collect().expect("scan"), vec![t.clone()]);
    let mut key = b"a/".to_vec();
    key.extend_from_slice(&t.id.to_bytes());
    let raw = store.reader.tree().get(key).expect("get").expect("present");
    assert_eq!(raw[0], crate::store::record::RECORD_V3);
    close(store, w);
}

/// Guards the 1 → 2 upgrade: a schema-1 database whose task records are v1 JSON (every
/// field present) opens, is marked schema 2, and gives its tasks back unchanged; records
/// written afterwards are the compact v2 form and read back equal.
#[tokio::test]
async fn a_schema_1_database_with_v1_records_is_upgraded_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = task();
    t.state = TaskState::Running;
    t.fence = shared::Fence(4);
    t.attempts = 2;
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    // Write what a schema-1 queen wrote: version byte 1 and the full v1 JSON.
    let v1 = crate::store::record::v1::TaskRecord {
        id: t.id,
        queue: t.queue.clone(),
        kind: t.kind.clone(),
        payload: t.payload.clone(),
        priority: t.priority,
        labels: t.labels.clone(),
        idempotency_key: None,
        depends_on: Vec::new(),
        retry: None,
        max_attempts: t.max_attempts,
        timeout_ms: None,
        state: crate::store::record::v1::State::Running,
        attempts: 2,
        lost: 0,
        fence: 4,
        lease: None,
        result: None,
        errors: Vec::new(),
        checkpoint: None,
        cancel_reason: None,
        created_at: t.created_at,
        run_at: None,
        started_at: None,
        finished_at: None,
    };
    let mut bytes = vec![crate::store::record::RECORD_V1];
    bytes.extend(serde_json::to_vec(&v1).expect("json"));
    let mut key = b"a/".to_vec();
    key.extend_from_slice(&t.id.to_bytes());
    store.reader.tree().insert(key, bytes).expect("insert");
    store
        .reader
        .tree()
        .insert(SCHEMA_KEY, &1u32.to_be_bytes())
        .expect("insert");
    store.reader.tree().flush().expect("flush");
    close(store, w);

    let (store, w, rec) =
        Store::open(&opts(dir.path()), CancellationToken::new()).expect("upgrade");
    assert_eq!(rec.active.collect().expect("scan"), vec![t.clone()]);
    let schema = store
        .reader
        .tree()
        .get(SCHEMA_KEY)
        .expect("get")
        .expect("set");
    assert_eq!(schema.as_ref(), &SCHEMA_VERSION.to_be_bytes());
    // Rewritten as v2: smaller, and read back the same.
    t.attempts = 3;
    commit(&w, vec![Mutation::save(&t)]).await.expect("durable");
    close(store, w);
    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    assert_eq!(rec.active.collect().expect("scan"), vec![t.clone()]);
    let mut key = b"a/".to_vec();
    key.extend_from_slice(&t.id.to_bytes());
    let raw = store.reader.tree().get(key).expect("get").expect("present");
    assert_eq!(raw[0], crate::store::record::RECORD_V2);
    let text = std::str::from_utf8(&raw[1..]).expect("json");
    for absent in [
        "\"lease\"",
        "\"errors\"",
        "\"run_at\"",
        "\"labels\"",
        "\"lost\"",
    ] {
        assert!(!text.contains(absent), "compact, without {absent}: {text}");
    }
    close(store, w);
}

/// Guards the chunked, multi-threaded recovery: more active records than fit in a few
/// chunks come back complete and in key (id) order.
#[tokio::test]
async fn recovery_over_many_chunks_returns_every_task_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = RECOVERY_CHUNK * 2 + 17;
    let tasks: Vec<Task> = (0..n).map(|_| task()).collect();
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, tasks.iter().map(Mutation::save).collect())
        .await
        .expect("durable");
    close(store, w);
    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    let mut want: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    want.sort();
    let got: Vec<TaskId> = rec
        .active
        .collect()
        .expect("scan")
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(got, want);
    close(store, w);
}

#[test]
fn a_data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"precious").expect("write");
    let err = Store::open(&opts(&file), CancellationToken::new()).expect_err("not a dir");
    assert!(err.to_string().contains("is not a directory"), "{err}");
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"precious",
        "the file is untouched"
    );
}

#[tokio::test]
async fn an_unfinished_snapshot_is_removed_and_data_recovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = task();
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&t)]).await.expect("durable");
    close(store, w);
    let bogus = dir
        .path()
        .join("db")
        .join("snap.00000000DEADBEEF.generating");
    std::fs::write(&bogus, b"half a snapshot").expect("write");
    let (store, w, rec) =
        Store::open(&opts(dir.path()), CancellationToken::new()).expect("recovers");
    assert!(!bogus.exists());
    assert_eq!(rec.active.collect().expect("scan"), vec![t]);
    close(store, w);
}

#[tokio::test]
async fn purge_drops_a_finished_task_and_its_idempotency_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = task();
    t.idempotency_key = Some("k1".into());
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(
        &w,
        vec![
            Mutation::save(&t),
            Mutation::Idempotency {
                key: "k1".into(),
                id: t.id,
            },
        ],
    )
    .await
    .expect("durable");
    t.state = TaskState::Failed;
    t.finished_at = Some(Utc::now());
    commit(&w, vec![Mutation::finish(&t, 1)])
        .await
        .expect("durable");
    assert_eq!(store.reader.idempotent("k1").expect("read"), Some(t.id));
    let cutoff = Utc::now().timestamp_millis() + 1;
    let expired = store.reader.expired(cutoff, 10).expect("scan");
    assert_eq!(expired.len(), 1);
    assert!(store.reader.expired(0, 10).expect("scan").is_empty());
    let e = expired.into_iter().next().expect("one");
    commit(
        &w,
        vec![Mutation::Purge {
            expired: e,
            count: 0,
        }],
    )
    .await
    .expect("durable");
    assert_eq!(store.reader.finished(t.id).expect("read"), None);
    assert_eq!(store.reader.idempotent("k1").expect("read"), None);
    close(store, w);
}

#[tokio::test]
async fn a_database_that_lost_its_contents_is_refused_not_reinitialised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&task())])
        .await
        .expect("durable");
    close(store, w);
    // sled reads a log whose segments are gone or garbled as an empty database.
    std::fs::remove_dir_all(dir.path().join("db")).expect("remove");
    for _ in 0..2 {
        let err = Store::open(&opts(dir.path()), CancellationToken::new()).expect_err("refused");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("reads as empty"), "{err}");
    }
}

#[test]
fn a_full_filesystem_at_open_says_what_to_do() {
    let dir = std::path::Path::new("/var/lib/hive");
    let full = StoreError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    };
    let explained = super::explain_no_space(full, dir);
    assert!(
        matches!(explained, StoreError::NoSpace { .. }),
        "{explained:?}"
    );
    let text = explained.to_string();
    assert!(
        text.contains("no space left")
            && text.contains("/var/lib/hive")
            && text.contains("free some space"),
        "{text}"
    );
    let sled_full = StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(
        libc::ENOSPC,
    )));
    assert!(matches!(
        super::explain_no_space(sled_full, dir),
        StoreError::NoSpace { .. }
    ));
    // Any other error is left as it is.
    let denied = StoreError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::EACCES),
    };
    assert!(matches!(
        super::explain_no_space(denied, dir),
        StoreError::Io { .. }
    ));
}

/// A purge in the same group commit as a new task taking over the purged task's
/// idempotency key keeps the key (pointing at the new task); one that follows the old
/// task's own key in the batch drops it. The same rule PostgreSQL's fold applies.
#[tokio::test]
async fn a_purge_sees_idempotency_keys_set_earlier_in_its_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    let (old, new) = (TaskId::generate(), TaskId::generate());
    let purge = |key: &str| Mutation::Purge {
        expired: Expired {
            id: old,
            finished_ms: 1,
            entry: RetentionEntry {
                queue: "q".into(),
                state: TaskState::Succeeded,
                idempotency_key: Some(key.into()),
            },
        },
        count: 0,
    };
    let idem = |key: &str, id| Mutation::Idempotency {
        key: key.into(),
        id,
    };
    commit(&w, vec![idem("taken-over", old), idem("own", old)])
        .await
        .expect("commit");
    commit(
        &w,
        vec![
            idem("taken-over", new),
            purge("taken-over"),
            idem("own", old),
            purge("own"),
        ],
    )
    .await
    .expect("commit");
    assert_eq!(
        store.reader.idempotent("taken-over").expect("read"),
        Some(new)
    );
    assert_eq!(store.reader.idempotent("own").expect("read"), None);
    close(store, w);
}

/// A group commit that comes down to one key is written without a sled batch (which would
/// sync a batch manifest first): the key's last value in the group is what is stored, and
/// it is as durable as a batch.
#[tokio::test]
async fn a_group_of_one_key_keeps_its_last_value_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut granted, lone, mut gone) = (task(), task(), task());
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&gone)])
        .await
        .expect("durable");
    // A submit and its grant in one commit: one key written twice.
    let submitted = granted.clone();
    granted.state = TaskState::Running;
    granted.attempts = 1;
    commit(
        &w,
        vec![Mutation::save(&submitted), Mutation::save(&granted)],
    )
    .await
    .expect("durable");
    commit(&w, vec![Mutation::save(&lone)])
        .await
        .expect("durable");
    // Several keys after single ones: a batch again.
    gone.state = TaskState::Succeeded;
    gone.finished_at = Some(Utc::now());
    commit(&w, vec![Mutation::finish(&gone, 1)])
        .await
        .expect("durable");
    close(store, w);

    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    let mut active = rec.active.collect().expect("scan");
    active.sort_by_key(|t| t.id);
    let mut want = vec![granted, lone];
    want.sort_by_key(|t| t.id);
    assert_eq!(
        active, want,
        "the grant's value won, the lone save is there"
    );
    assert_eq!(store.reader.finished(gone.id).expect("read"), Some(gone));
    close(store, w);
}

/// The group's writes as the writer builds them.
fn group_writes(mutations: Vec<Mutation>) -> KeyWrites {
    let mut writes = KeyWrites::new();
    for m in mutations {
        ops(m, |op| match op {
            Op::Put(k, v) => drop(writes.insert(k, Some(v))),
            Op::Del(k) => drop(writes.insert(k, None)),
            Op::DelIfEq(..) => unreachable!("not used by these mutations"),
        });
    }
    writes
}

/// Works on a closed store's sled tree directly, as a crash may leave it, then flushes it.
fn with_tree(dir: &Path, f: impl FnOnce(&sled::Tree)) {
    let db = open_sled(&dir.join("db"), 8 << 20).expect("sled");
    let tree = db.open_tree("hive").expect("tree");
    f(&tree);
    db.flush().expect("flush");
}

/// `m/ckpt`, as the store left it.
fn checkpoint_of(tree: &sled::Tree) -> u64 {
    group_number(tree, CKPT_KEY, Path::new("test"))
        .expect("read")
        .expect("m/ckpt is set")
}

/// A crash in the middle of a group (here a finish: the active record removed, the
/// finished record, its retention entry and the count not yet written) after its journal
/// record was written; the next open applies every record after `m/ckpt` again before
/// reading anything, and numbers new groups on from the last.
#[tokio::test]
async fn groups_after_the_checkpoint_are_replayed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut done, other) = (task(), task());
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&done), Mutation::save(&other)])
        .await
        .expect("durable");
    close(store, w);

    // What the writer does for the next group, cut after its first write to sled.
    done.state = TaskState::Succeeded;
    done.finished_at = Some(Utc::now());
    let writes = group_writes(vec![Mutation::finish(&done, 1)]);
    assert!(writes.len() >= 3, "a finish writes several keys");
    with_tree(dir.path(), |tree| {
        assert_eq!(
            checkpoint_of(tree),
            1,
            "the close checkpointed the first group"
        );
        let mut journal = journal::Journal::start(dir.path(), false, 1).expect("journal");
        journal.append(2, &writes, 1).expect("append");
        let (k, v) = writes.iter().next().expect("a write");
        write_key(tree, k, v.as_deref()).expect("the first write");
    });

    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    assert_eq!(
        rec.active.collect().expect("scan"),
        vec![other],
        "the finished task left the active ones"
    );
    assert_eq!(store.reader.finished(done.id).expect("read"), Some(done));
    assert_eq!(
        rec.finished_counts,
        vec![(("default".to_string(), TaskState::Succeeded), 1)]
    );
    assert_eq!(checkpoint_of(store.reader.tree()), 2);
    let names: Vec<String> = std::fs::read_dir(dir.path().join(journal::DIR))
        .expect("journal dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![format!("{:020}.log", 3)],
        "the replayed journal is gone; a new one starts at the next group"
    );
    assert!(journal::read(dir.path(), 2).expect("journal").is_empty());
    // New groups are numbered on from there.
    commit(&w, vec![Mutation::save(&task())])
        .await
        .expect("durable");
    assert_eq!(
        journal::read(dir.path(), 2)
            .expect("journal")
            .iter()
            .map(|g| g.0)
            .collect::<Vec<_>>(),
        vec![3]
    );
    close(store, w);
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    assert_eq!(checkpoint_of(store.reader.tree()), 3);
    close(store, w);
}

/// A journal file left behind (its deletion failed) holds groups sled had checkpointed;
/// applying them again would undo what later groups wrote.
#[tokio::test]
async fn records_up_to_the_checkpoint_are_not_replayed_over_later_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (task(), task());
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    close(store, w);

    let writes = group_writes(vec![Mutation::save(&first), Mutation::save(&second)]);
    let mut later = first.clone();
    later.priority = 7;
    with_tree(dir.path(), |tree| {
        let mut journal = journal::Journal::start(dir.path(), false, 0).expect("journal");
        journal.append(1, &writes, 0).expect("append");
        for (k, v) in writes.clone() {
            write_key(tree, &k, v.as_deref()).expect("write");
        }
        // Group 2, whose file was deleted once checkpointed.
        for (k, v) in group_writes(vec![Mutation::save(&later)]) {
            write_key(tree, &k, v.as_deref()).expect("write");
        }
        tree.insert(CKPT_KEY, &2u64.to_be_bytes()).expect("m/ckpt");
    });

    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    let mut active = rec.active.collect().expect("scan");
    active.sort_by_key(|t| t.id);
    let mut want = vec![later, second];
    want.sort_by_key(|t| t.id);
    assert_eq!(active, want, "the later write stands");
    assert_eq!(checkpoint_of(store.reader.tree()), 2);
    close(store, w);
}

/// A group missing between the checkpoint and the records that follow is corruption: the
/// queen refuses to start (and changes nothing) rather than replay past the hole.
#[tokio::test]
async fn a_group_missing_after_the_checkpoint_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    close(store, w);
    let t = task();
    {
        let mut journal = journal::Journal::start(dir.path(), false, 2).expect("journal");
        journal
            .append(3, &group_writes(vec![Mutation::save(&t)]), 0)
            .expect("append");
    }
    let err = Store::open(&opts(dir.path()), CancellationToken::new()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("group 1 is missing")),
        "{err}"
    );
    assert_eq!(
        journal::read(dir.path(), 2).expect("journal").len(),
        1,
        "the journal is left as it was"
    );
}

/// Guards the 4 → 5 upgrade after a crash: schema 4 journaled only groups of several keys
/// and marked them begun and done in `m/group`. A begun group is completed from its
/// record; a record past it (sled never saw that group, and a single-key write before it
/// may be missing) is not applied; the database then carries `m/ckpt` and no `m/group`.
#[tokio::test]
async fn a_schema_4_database_completes_its_begun_group_and_drops_later_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut done, other, never) = (task(), task(), task());
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&done), Mutation::save(&other)])
        .await
        .expect("durable");
    close(store, w);

    done.state = TaskState::Succeeded;
    done.finished_at = Some(Utc::now());
    let finish = group_writes(vec![Mutation::finish(&done, 1)]);
    with_tree(dir.path(), |tree| {
        tree.insert(SCHEMA_KEY, &4u32.to_be_bytes())
            .expect("schema");
        tree.remove(CKPT_KEY).expect("no m/ckpt in schema 4");
        let mut journal = journal::Journal::start(dir.path(), false, 1).expect("journal");
        journal.append(2, &finish, 0).expect("append");
        journal
            .append(
                3,
                &group_writes(vec![Mutation::save(&never), Mutation::save(&task())]),
                0,
            )
            .expect("append");
        tree.insert(GROUP_KEY, &Marker::Begun(2).encode())
            .expect("begun");
        let (k, v) = finish.iter().next().expect("a write");
        write_key(tree, k, v.as_deref()).expect("the first write");
        // The open's first step, as if it stopped there: once `m/ckpt` is set, the
        // journal must hold nothing the schema-5 rule would replay.
        assert_eq!(replay_journal(tree, dir.path(), false).expect("upgrade"), 2);
        assert!(journal::read(dir.path(), 0).expect("journal").is_empty());
    });

    let (store, w, rec) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("reopen");
    assert_eq!(rec.active.collect().expect("scan"), vec![other]);
    assert_eq!(store.reader.finished(done.id).expect("read"), Some(done));
    let tree = store.reader.tree().clone();
    assert_eq!(checkpoint_of(&tree), 2);
    assert_eq!(tree.get(GROUP_KEY).expect("read"), None);
    assert_eq!(
        tree.get(SCHEMA_KEY).expect("read").as_deref(),
        Some(&SCHEMA_VERSION.to_be_bytes()[..])
    );
    close(store, w);
}

/// sled holding writes of a group the journal lost (only an unsynced journal and an OS
/// crash can do that) is refused: the group may be there in part.
#[tokio::test]
async fn a_group_begun_in_sled_without_its_journal_record_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    commit(&w, vec![Mutation::save(&task()), Mutation::save(&task())])
        .await
        .expect("durable");
    close(store, w);
    with_tree(dir.path(), |tree| {
        assert_eq!(
            tree.get(SEQ_KEY).expect("read").as_deref(),
            Some(&1u64.to_be_bytes()[..]),
            "the checkpoint marks the groups it writes"
        );
        tree.insert(SEQ_KEY, &2u64.to_be_bytes()).expect("m/seq");
        let (k, _) = group_writes(vec![Mutation::save(&task())])
            .pop_first()
            .expect("a write");
        write_key(tree, &k, None).expect("part of group 2");
    });
    let err = Store::open(&opts(dir.path()), CancellationToken::new()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("journal group 2")),
        "{err}"
    );
}

/// Reads on sled look at the writes still pending (durable in the journal, not yet in
/// sled) before the tree: a pending write replaces the stored row, a pending removal
/// hides it, in point reads and in ranges either way.
#[test]
fn reads_see_the_pending_writes_before_the_tree() {
    let db = sled::Config::new().temporary(true).open().expect("sled");
    let tree = db.open_tree("hive").expect("tree");
    let k = |n: u8| key(FINISHED, &[n]);
    tree.insert(k(1), b"one".to_vec()).expect("insert");
    tree.insert(k(2), b"two".to_vec()).expect("insert");
    let read = SledRead {
        tree,
        pending: Arc::default(),
    };
    read.pending.add(
        1,
        [(k(2), None), (k(3), Some(b"three".to_vec()))]
            .into_iter()
            .collect(),
    );
    assert_eq!(read.get(&k(1)).expect("get"), Some(b"one".to_vec()));
    assert_eq!(
        read.get(&k(2)).expect("get"),
        None,
        "removed, though sled has it"
    );
    assert_eq!(read.get(&k(3)).expect("get"), Some(b"three".to_vec()));
    let keys = |start: &[u8], end: &[u8], rev: bool, limit: usize| {
        let mut out = Vec::new();
        read.scan(start, end, rev, limit, |k, _| {
            out.push(k.to_vec());
            Ok(true)
        })
        .expect("scan");
        out
    };
    let (start, end) = (FINISHED.to_vec(), key(FINISHED, &[0xff]));
    assert_eq!(keys(&start, &end, false, 10), vec![k(1), k(3)]);
    assert_eq!(keys(&start, &end, true, 1), vec![k(3)]);
}

/// The nice value of each of this process's threads named `name` (Linux `/proc`).
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return found;
    };
    for entry in tasks.flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        // Fields after the `)` closing the command: state is the 3rd, nice the 19th.
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if let Some(nice) = after
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
        {
            found.push(nice);
        }
    }
    found
}

#[tokio::test]
async fn sleds_checkpoint_work_runs_below_the_threads_that_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    // SAFETY: reads this thread's nice value; the store's threads started from a thread
    // of this test process, whose nice they inherited.
    let ours = i64::from(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
    let expected = (ours + i64::from(CHECKPOINT_NICE)).min(19);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let sled = nice_of_threads("hive-store-sled");
        // The threads that take the pending writes' lock keep the usual priority.
        let usual: Vec<i64> = ["hive-store-writ", "hive-store-ckpt", "hive-store-flus"]
            .iter()
            .flat_map(|name| nice_of_threads(name))
            .collect();
        // Other tests' stores may be starting too: every sled thread is lowered, none of
        // the others is.
        if !sled.is_empty()
            && sled.iter().all(|n| *n == expected)
            && usual.len() >= 3
            && usual.iter().all(|n| *n == ours)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sled threads at nice {sled:?}, the others at {usual:?}; expected {expected} and {ours}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    close(store, w);
}

/// Each answer: the commit's number, how many commits were durable then, whether it
/// succeeded, and the thread that answered.
type Answers = Arc<Mutex<Vec<(u64, u64, bool, Option<String>)>>>;

/// What a held answer says when it starts holding, and what it waits for.
type Hold = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

/// Sends commit number `n` ([`Commit::first`] as `first`); its answer goes to `answers`,
/// then, given a `hold`, it says so and waits for the release (at most 30 s), then it says
/// so on the returned receiver.
async fn numbered_commit(
    w: &StoreWriter,
    answers: &Answers,
    n: u64,
    hold: Option<Hold>,
    first: bool,
) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let (answers, durable) = (answers.clone(), w.durable.clone());
    w.send(Commit {
        mutations: vec![Mutation::save(&task())],
        after: Some(Box::new(move |r| {
            let seen = durable.load(Ordering::Acquire);
            let by = std::thread::current().name().map(str::to_owned);
            answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((n, seen, r.is_ok(), by));
            if let Some((holding, release)) = hold {
                let _ = holding.send(());
                let _ = release.recv_timeout(std::time::Duration::from_secs(30));
            }
            let _ = tx.send(());
        })),
        first,
    })
    .await;
    rx
}

/// The writer syncs a group itself when nothing waits behind it and hands groups to the
/// flusher otherwise; either way commits are answered in the order they were sent, each
/// once it and everything before it counts as durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_answered_in_order_whichever_thread_syncs_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    let answers: Answers = Arc::default();
    let mut sent = 0u64;
    // Lone commits, each awaited: nothing waits behind them, the writer answers them.
    for _ in 0..50 {
        numbered_commit(&w, &answers, sent, None, false)
            .await
            .await
            .expect("answered");
        sent += 1;
    }
    // A lone commit (answered by the writer) whose answer holds the writer while more
    // than a group's worth of commits queue behind it: the first group of those is full
    // and more wait behind it, so it goes to the flusher.
    let (holding_tx, holding) = std::sync::mpsc::channel();
    let (release, hold) = std::sync::mpsc::channel();
    let held = numbered_commit(&w, &answers, sent, Some((holding_tx, hold)), false).await;
    sent += 1;
    tokio::task::spawn_blocking(move || holding.recv_timeout(std::time::Duration::from_secs(30)))
        .await
        .expect("joined")
        .expect("the answer holds");
    let mut last = None;
    for _ in 0..MAX_COMMITS_PER_BATCH + 100 {
        last = Some(numbered_commit(&w, &answers, sent, None, false).await);
        sent += 1;
    }
    release.send(()).expect("the held answer waits");
    held.await.expect("answered");
    last.expect("sent").await.expect("answered");
    // Bursts sent back to back and lone commits, mixed.
    for wave in 0..300u64 {
        let burst = if wave % 2 == 0 { 1 } else { 1 + wave % 23 };
        let mut last = None;
        for _ in 0..burst {
            last = Some(numbered_commit(&w, &answers, sent, None, false).await);
            sent += 1;
        }
        if let Some(rx) = last {
            rx.await.expect("answered");
        }
    }
    close(store, w);
    let answers = answers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(answers.len() as u64, sent, "every commit answered once");
    let mut by_thread = std::collections::BTreeMap::<String, usize>::new();
    for (i, (n, durable, ok, by)) in answers.into_iter().enumerate() {
        assert_eq!(n, i as u64, "commit {n} answered in place of commit {i}");
        assert!(ok, "commit {n} failed");
        assert!(
            durable > n,
            "commit {n} answered when only {durable} were durable"
        );
        *by_thread.entry(by.unwrap_or_default()).or_default() += 1;
    }
    for thread in ["hive-store-writer", "hive-store-flush"] {
        assert!(
            by_thread.get(thread).is_some_and(|&n| n > 0),
            "no commit answered by {thread}: {by_thread:?}"
        );
    }
}

/// The commits one sync makes durable are answered `first` ones first (the core's messages
/// to drones), then the others, each kind in the order sent, and every one only once
/// all of them are durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_drones_go_before_the_answers_a_sync_makes_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w, _) = Store::open(&opts(dir.path()), CancellationToken::new()).expect("open");
    let answers: Answers = Arc::default();
    // Commit 0's answer holds the writer, so commits 1-6 queue and become one group.
    let (holding_tx, holding) = std::sync::mpsc::channel();
    let (release, hold) = std::sync::mpsc::channel();
    let held = numbered_commit(&w, &answers, 0, Some((holding_tx, hold)), false).await;
    tokio::task::spawn_blocking(move || holding.recv_timeout(std::time::Duration::from_secs(30)))
        .await
        .expect("joined")
        .expect("the answer holds");
    let mut last = Vec::new();
    for n in 1..=6 {
        last.push(numbered_commit(&w, &answers, n, None, n % 2 == 0).await);
    }
    release.send(()).expect("the held answer waits");
    held.await.expect("answered");
    for rx in last {
        rx.await.expect("answered");
    }
    close(store, w);
    let answers = answers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let order: Vec<u64> = answers.iter().map(|a| a.0).collect();
    assert_eq!(order, [0, 2, 4, 6, 1, 3, 5]);
    for (n, durable, ok, _) in answers {
        assert!(ok, "commit {n} failed");
        assert_eq!(durable, if n == 0 { 1 } else { 7 }, "commit {n}");
    }
}

/// Across the groups one sync makes durable too (the flusher takes every group written
/// meanwhile): the `first` commits of all of them are answered before the others, each
/// with its group's result, and a failed group stops the queen only once every answer
/// went out.
#[test]
fn messages_to_drones_go_first_across_the_groups_of_one_sync() {
    let file = Arc::new(tempfile::tempfile().expect("tempfile"));
    let fatal = CancellationToken::new();
    let durable = Arc::new(AtomicU64::new(0));
    let mut syncer = Syncer {
        sync: false,
        durable: durable.clone(),
        fatal: fatal.clone(),
        metrics: Default::default(),
        failed: None,
        synced: None,
    };
    // Each answer: its number, whether it succeeded, and whether the queen was stopping.
    let answers = Arc::new(Mutex::new(Vec::new()));
    let commit = |n: u64, first: bool| {
        let (answers, fatal) = (answers.clone(), fatal.clone());
        Commit {
            mutations: Vec::new(),
            after: Some(Box::new(move |r: Result<(), CommitError>| {
                let mut answers = answers.lock().unwrap_or_else(|p| p.into_inner());
                answers.push((n, r.is_ok(), fatal.is_cancelled()));
            })),
            first,
        }
    };
    let group = |commits: Vec<Commit>, result: Result<(), CommitError>| Applied {
        commits,
        result,
        end: journal::End {
            file: file.clone(),
            len: 0,
        },
    };
    syncer.finish(vec![
        group(vec![commit(1, false), commit(2, true)], Ok(())),
        group(vec![commit(3, false), commit(4, true)], Ok(())),
        group(
            vec![commit(5, true), commit(6, false)],
            Err(CommitError("disk full".into())),
        ),
    ]);
    let answers = answers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        answers,
        [
            (2, true, false),
            (4, true, false),
            (5, false, false),
            (1, true, false),
            (3, true, false),
            (6, false, false),
        ]
    );
    assert_eq!(durable.load(Ordering::Acquire), 4, "the two whole groups");
    assert!(fatal.is_cancelled(), "the failed group stops the queen");
}
