//! The PostgreSQL engine's own rules, with a real cluster: a newer schema is refused before
//! the queen listens, retention purges finished tasks (and their idempotency keys) from
//! the tables, and the data a queen writes is fenced by its epoch.

use std::collections::BTreeMap;
use std::time::Duration;

use hive_tests::pg::PgCluster;
use hive_tests::queen::run_to_exit;
use hive_tests::{wait_until, Hive};
use shared::api::TaskSpec;
use shared::TaskId;

fn env(url: &str) -> BTreeMap<String, String> {
    [
        ("HIVE_STORAGE__BACKEND", "postgres"),
        ("HIVE_POSTGRES__URL", url),
        ("HIVE_QUEEN__LISTEN", "127.0.0.1:0"),
        ("HIVE_QUEEN__HTTP", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn a_database_with_a_newer_schema_is_refused_before_the_queen_listens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = PgCluster::primary(dir.path());
    // A first queen creates the schema; a later release stamped it newer.
    let hive = Hive::builder().postgres(&pg.url(), 1).start();
    drop(hive);
    pg.psql("UPDATE hive_schema SET version = 99");
    let out = run_to_exit(
        dir.path(),
        "newer-schema",
        env(&pg.url()),
        None,
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("schema 99") && out.stderr.contains("upgrade the queen"),
        "{}",
        out.stderr
    );
    assert_eq!(
        pg.psql("SELECT version FROM hive_schema"),
        "99",
        "nothing changed"
    );
}

#[test]
fn a_url_that_cannot_parse_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run_to_exit(
        dir.path(),
        "bad-url",
        env("postgres://[not-a-host"),
        None,
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("postgres.url"), "{}", out.stderr);
}

#[test]
fn retention_purges_finished_tasks_and_their_keys_from_the_tables() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = PgCluster::primary(dir.path());
    let mut hive = Hive::builder()
        .postgres(&pg.url(), 1)
        .env("HIVE_RETENTION__FINISHED_MAX_COUNT", "50")
        .env("HIVE_RETENTION__PURGE_INTERVAL_MS", "100")
        .start();
    hive.start_drone("a", 8);
    // Rounds smaller than the limit: a round's tasks are the newest, so none of them is
    // purged while the round is checked; the older rounds' are.
    for round in 0..5 {
        let specs: Vec<TaskSpec> = (0..40)
            .map(|i| TaskSpec {
                idempotency_key: Some(format!("r{round}-{i}")),
                ..hive_tests::echo(serde_json::json!(i))
            })
            .collect();
        let ids: Vec<TaskId> = hive.api().batch(specs).into_iter().map(|v| v.id).collect();
        hive.wait_all_succeeded(Duration::from_secs(60), &ids);
        // Purged tasks are gone for good: the checker must not hold the queen to them.
        hive.api().forget(ids);
    }
    let count = |table: &str| -> u64 {
        pg.psql(&format!("SELECT count(*) FROM {table}"))
            .parse()
            .expect("a count")
    };
    wait_until(
        Duration::from_secs(30),
        "retention to bring the finished tables down to 50 rows",
        || {
            let rows = (
                count("hive_finished"),
                count("hive_retention"),
                count("hive_idem"),
            );
            if rows == (50, 50, 50) {
                Ok(())
            } else {
                Err(format!(
                    "(finished, retention, idempotency keys) = {rows:?}"
                ))
            }
        },
    );
    assert_eq!(count("hive_active"), 0);
}
