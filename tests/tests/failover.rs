//! High availability on PostgreSQL: real queens sharing a real database (a cluster this
//! test starts in a temp dir, see `hive_tests::pg`), real drones given every queen's
//! address, and real failures: `kill -9` of the leader, SIGSTOP past its lease, its link to
//! the database cut, the database primary killed and its synchronous standby promoted.
//! Every scenario ends with the invariant checker (G1–G8): nothing acknowledged lost, every
//! task terminal, each outcome recorded once, no task run under two live leases.

use std::time::{Duration, Instant};

use hive_tests::pg::{url_multi, PgCluster};
use hive_tests::proxy::{Fault, Proxy};
use hive_tests::Hive;
use shared::TaskId;

/// How long a standby may take to lead after the leader died: the lease (2 s by default)
/// plus a poll and loading the tasks, with room for a loaded two-core machine.
const TAKEOVER: Duration = Duration::from_secs(15);

fn pg_hive(url: &str, queens: usize) -> Hive {
    Hive::builder().postgres(url, queens).start()
}

/// Submits `n` tasks that each sleep `secs` (logged in the exec log) and waits until they
/// all run.
fn running_tasks(hive: &mut Hive, n: usize, secs: f64) -> Vec<TaskId> {
    let ids: Vec<TaskId> = (0..n)
        .map(|_| {
            hive.api()
                .submit(&hive.exec_log().task(&format!("sleep {secs}")))
                .id
        })
        .collect();
    hive.wait_stats(Duration::from_secs(20), "the long tasks to run", |s| {
        s.by_state.get("running").copied().unwrap_or(0) as usize >= n
    });
    ids
}

fn quick_batch(hive: &Hive, n: usize) -> Vec<TaskId> {
    let specs = (0..n).map(|_| hive.exec_log().task("true")).collect();
    hive.api().batch(specs).into_iter().map(|v| v.id).collect()
}

#[test]
fn a_killed_leader_is_replaced_and_tasks_running_on_live_drones_are_not_run_again() {
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let pg = PgCluster::primary(pg_dir.path());
    let mut hive = pg_hive(&pg.url(), 2);
    hive.start_drone("a", 4);
    hive.start_drone("b", 4);
    let long = running_tasks(&mut hive, 4, 4.0);
    let before = quick_batch(&hive, 40);

    hive.queen_at(0).kill9();
    let killed = Instant::now();
    hive.wait_leader_is(1, TAKEOVER);
    eprintln!(
        "failover: the standby answered ready {:?} after the kill",
        killed.elapsed()
    );

    // The new leader takes writes, and the drones follow it.
    let after = quick_batch(&hive, 40);
    let all: Vec<TaskId> = long.iter().chain(&before).chain(&after).copied().collect();
    hive.wait_all_succeeded(Duration::from_secs(60), &all);
    // Re-attached, not re-run: each long task started once.
    for id in &long {
        assert_eq!(
            hive.exec_log().starts(*id),
            1,
            "task {id} ran again after the failover:\n{}",
            hive.exec_log().lines_of(*id)
        );
    }
    let summary = hive.check(Duration::from_secs(60));
    eprintln!("{summary}");
}

#[test]
fn a_leader_paused_past_its_lease_writes_nothing_when_it_wakes() {
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let pg = PgCluster::primary(pg_dir.path());
    let mut hive = pg_hive(&pg.url(), 2);
    hive.start_drone("a", 4);
    let first = quick_batch(&hive, 20);
    hive.wait_all_succeeded(Duration::from_secs(30), &first);
    let long = running_tasks(&mut hive, 2, 3.0);

    hive.queen_at(0).sigstop();
    hive.wait_leader_is(1, TAKEOVER);
    let epoch_after = pg.psql("SELECT epoch FROM hive_leader");
    let during = quick_batch(&hive, 20);
    hive.wait_all_succeeded(Duration::from_secs(60), &during);

    // The old leader wakes: it must step down without touching the database.
    hive.queen_at(0).sigcont();
    let old = hive.queen_at(0).http_addr;
    hive_tests::wait::wait_until(
        Duration::from_secs(20),
        "the woken leader to stand by",
        || match hive_tests::api::Api::new(old).get_raw("/readyz") {
            Ok((503, body)) if body.contains("standby") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        pg.psql("SELECT epoch FROM hive_leader"),
        epoch_after,
        "nobody else took over"
    );
    let log = std::fs::read_to_string(hive.queen_at(0).log()).expect("the old leader's log");
    assert!(
        !log.contains("postgres commit failed"),
        "the woken leader tried to commit (and was fenced), so it acted after its lease: {log}"
    );
    assert!(
        log.contains("ending the term"),
        "the woken leader did not end its term by itself: {log}"
    );

    let all: Vec<TaskId> = first.iter().chain(&long).chain(&during).copied().collect();
    hive.wait_all_succeeded(Duration::from_secs(60), &all);
    let summary = hive.check(Duration::from_secs(60));
    eprintln!("{summary}");
}

#[test]
fn a_leader_cut_off_from_postgres_steps_down_and_no_task_gets_two_leases() {
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let pg = PgCluster::primary(pg_dir.path());
    // The first queen reaches the database through a proxy the test can cut; the second
    // directly.
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port()).parse().expect("addr"));
    let via_proxy = pg.url().replace(
        &format!(":{}/", pg.port()),
        &format!(":{}/", proxy.addr().port()),
    );
    let mut hive = Hive::builder().postgres(&via_proxy, 1).start();
    let second = hive_tests::queen::QueenProc::start(
        &hive.path("data-1"),
        &hive.path("queen-1.log"),
        [
            ("HIVE_STORAGE__BACKEND".to_string(), "postgres".to_string()),
            ("HIVE_POSTGRES__URL".to_string(), pg.url()),
        ]
        .into_iter()
        .chain(
            hive_tests::hive::FAST_LEASES
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .collect(),
        None,
    );
    hive.others.push(second);
    hive.start_drone("a", 4);
    hive.start_drone("b", 4);
    let long = running_tasks(&mut hive, 3, 3.0);
    let before = quick_batch(&hive, 30);

    proxy.set(Fault::Blackhole);
    // The queen that still reaches postgres leads, and the cut-off one stops leading.
    hive.wait_leader_is(1, TAKEOVER);
    let after = quick_batch(&hive, 30);
    let all: Vec<TaskId> = long.iter().chain(&before).chain(&after).copied().collect();
    hive.wait_all_succeeded(Duration::from_secs(60), &all);
    proxy.set(Fault::Pass);
    let summary = hive.check(Duration::from_secs(60));
    eprintln!("{summary}");
}

#[test]
fn the_database_primary_dies_and_its_synchronous_standby_takes_over_with_nothing_lost() {
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let mut primary = PgCluster::primary(pg_dir.path());
    let standby = PgCluster::sync_standby_of(&primary);
    let url = url_multi(&[&primary, &standby]);
    let mut hive = pg_hive(&url, 2);
    hive.start_drone("a", 4);
    let before = quick_batch(&hive, 50);
    hive.wait_all_succeeded(Duration::from_secs(60), &before);
    let pending = quick_batch(&hive, 50);

    primary.kill9();
    standby.promote();
    hive.wait_leader(Duration::from_secs(30));
    let after = quick_batch(&hive, 50);
    let all: Vec<TaskId> = before
        .iter()
        .chain(&pending)
        .chain(&after)
        .copied()
        .collect();
    hive.wait_all_succeeded(Duration::from_secs(90), &all);
    let summary = hive.check(Duration::from_secs(60));
    eprintln!("{summary}");
}

#[test]
fn a_sled_hive_moves_into_postgres_with_every_task_and_refuses_a_second_copy() {
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let pg = PgCluster::primary(pg_dir.path());
    let mut sled_hive = Hive::start();
    sled_hive.start_drone("a", 4);
    let done = quick_batch(&sled_hive, 30);
    sled_hive.wait_all_succeeded(Duration::from_secs(30), &done);
    sled_hive.drone("a").kill9();
    let waiting = quick_batch(&sled_hive, 20);
    sled_hive.queen.stop();

    let migrate = |hive: &Hive| {
        std::process::Command::new(hive_tests::bins::queen())
            .arg("migrate")
            .arg("--from")
            .arg(hive.path("data"))
            .arg("--to")
            .arg(pg.url())
            .env_remove("HIVE_POSTGRES__URL")
            .output()
            .expect("run queen migrate")
    };
    let first = migrate(&sled_hive);
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(out.contains("hive_active: 20 rows"), "{out}");
    assert!(out.contains("hive_finished: 30 rows"), "{out}");
    let again = migrate(&sled_hive);
    assert!(
        !again.status.success(),
        "a second copy into the same database must be refused"
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The hive runs on postgres now: the finished tasks are there, the waiting ones run.
    let mut pg_hive = pg_hive(&pg.url(), 1);
    for id in &done {
        assert_eq!(
            pg_hive.api().task(*id).state,
            shared::api::TaskState::Succeeded
        );
    }
    pg_hive.start_drone("b", 4);
    pg_hive.wait_all_succeeded(Duration::from_secs(60), &waiting);
}

#[test]
fn a_leader_whose_synchronous_standby_dies_steps_down_instead_of_hanging_and_leads_again() {
    let pg_dir = tempfile::tempdir().expect("temp dir");
    let primary = PgCluster::primary(pg_dir.path());
    let mut standby = PgCluster::sync_standby_of(&primary);
    let mut hive = pg_hive(&primary.url(), 1);
    hive.start_drone("a", 4);
    let before = quick_batch(&hive, 30);
    hive.wait_all_succeeded(Duration::from_secs(60), &before);

    // Every commit now waits for a standby that is gone, the lease's renewals included:
    // the leader must stop leading (not hang with its lease thread stuck in a commit).
    standby.kill9();
    let leader_http = hive.queen.http_addr;
    hive_tests::wait::wait_until(TAKEOVER, "the leader to step down", || {
        match hive_tests::api::Api::new(leader_http).get_raw("/readyz") {
            Ok((503, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // The standby comes back: commits go through again and the queen leads again.
    standby.start();
    hive.wait_leader_is(0, Duration::from_secs(60));
    let after = quick_batch(&hive, 30);
    let all: Vec<TaskId> = before.iter().chain(&after).copied().collect();
    hive.wait_all_succeeded(Duration::from_secs(60), &all);
    let summary = hive.check(Duration::from_secs(60));
    eprintln!("{summary}");
}
