//! The PostgreSQL harness itself ([`hive_tests::pg`]), before any queen relies on it
//! (issue 14): a synchronous standby really has what the primary committed, a `kill -9`
//! of the primary leaves nothing of it running, the promoted standby takes writes, a
//! killed primary recovers what it committed, and no server outlives its cluster.
//!
//! These need PostgreSQL's server binaries and fail without them (install Debian's
//! `postgresql`; CI's `.ci/run` does).

use std::path::Path;

use hive_tests::pg::{self, PgCluster, PgProcesses};
use hive_tests::{pid_alive, wait_until, DEADLINE};

fn keep() -> bool {
    std::env::var_os("HIVE_TEST_KEEP").is_some_and(|v| !v.is_empty())
}

/// The test's temp dir, holding its clusters' dirs: kept, as they are, when the test
/// fails or `HIVE_TEST_KEEP` is set.
struct TestDir(tempfile::TempDir);

impl TestDir {
    fn new() -> TestDir {
        TestDir(
            tempfile::Builder::new()
                .prefix("hive-pg-test-")
                .tempdir()
                .expect("create a temp dir"),
        )
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if keep() || std::thread::panicking() {
            self.0.disable_cleanup(true);
        }
    }
}

/// Live processes whose command line mentions `needle` (a cluster's dir or name), found
/// by a plain scan of `/proc/*/cmdline` — independent of the harness's own matching.
fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("list /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) && pid_alive(pid) {
            found.push((pid, line));
        }
    }
    found
}

/// What a dropped cluster must leave behind: nothing running.
struct Gone {
    label: &'static str,
    dir: String,
    name: String,
    processes: PgProcesses,
}

impl Gone {
    fn of(label: &'static str, pg: &PgCluster) -> Gone {
        Gone {
            label,
            dir: pg.dir().to_string_lossy().into_owned(),
            name: pg.name().to_owned(),
            processes: pg.processes(),
        }
    }

    fn assert_gone(&self) {
        let pids = self.processes.pids();
        assert!(pids.is_empty(), "{} left processes: {pids:?}", self.label);
        for needle in [&self.dir, &self.name] {
            let left = processes_mentioning(needle);
            assert!(
                left.is_empty(),
                "{} left processes naming {needle}: {left:?}",
                self.label
            );
        }
        assert!(
            keep() || !Path::new(&self.dir).exists(),
            "{}'s dir {} was not removed",
            self.label,
            self.dir
        );
    }
}

#[test]
fn a_sync_standby_has_the_primary_s_commits_and_takes_over_after_a_kill_9() {
    let dir = TestDir::new();
    let gone;
    {
        let mut primary = PgCluster::primary(dir.path());
        let standby = PgCluster::sync_standby_of(&primary);
        gone = [Gone::of("primary", &primary), Gone::of("standby", &standby)];
        assert_eq!(
            primary.url(),
            format!("postgres://hive@127.0.0.1:{}/hive", primary.port())
        );
        assert_eq!(
            pg::url_multi(&[&primary, &standby]),
            format!(
                "postgres://hive@127.0.0.1:{},127.0.0.1:{}/hive?target_session_attrs=read-write",
                primary.port(),
                standby.port()
            )
        );
        assert_eq!(primary.psql("SELECT pg_is_in_recovery()"), "f");
        assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
        assert_eq!(primary.psql("SHOW fsync"), "on");

        primary.psql("CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)");
        primary.psql("INSERT INTO t VALUES (1, 'before the crash')");
        // The commit waited for the standby to flush it; replaying it follows at once.
        wait_until(DEADLINE, "the row on the standby", || {
            standby.try_psql("SELECT note FROM t WHERE id = 1") == Ok("before the crash".to_owned())
        });
        let refused = standby
            .try_psql("INSERT INTO t VALUES (9, 'on a standby')")
            .expect_err("a standby refuses writes");
        assert!(refused.contains("read-only"), "{refused}");

        let postmaster = primary.pid();
        let before = primary.processes().pids();
        assert!(
            before.contains(&postmaster) && before.len() > 1,
            "the primary's postmaster {postmaster} and its children are found: {before:?}"
        );
        primary.kill9();
        assert!(!pid_alive(postmaster), "the postmaster is dead");
        assert_eq!(primary.processes().pids(), Vec::<i32>::new());

        standby.promote();
        standby.psql("INSERT INTO t VALUES (2, 'after the promotion')");
        assert_eq!(
            standby.psql("SELECT id || ':' || note FROM t ORDER BY id"),
            "1:before the crash\n2:after the promotion"
        );
        // Dropped here: the killed primary, and the promoted standby while it runs.
    }
    for g in &gone {
        g.assert_gone();
    }
}

#[test]
fn a_killed_primary_recovers_its_commits_and_stops_and_starts_on_its_port() {
    let dir = TestDir::new();
    let gone;
    {
        let mut primary = PgCluster::primary(dir.path());
        gone = Gone::of("primary", &primary);
        let port = primary.port();
        primary.psql("CREATE TABLE t (id int PRIMARY KEY)");
        primary.psql("INSERT INTO t VALUES (1)");
        primary.kill9();
        assert!(!primary.is_running());
        primary.start();
        assert_eq!(primary.port(), port);
        assert_eq!(primary.psql("SELECT count(*) FROM t"), "1");
        primary.psql("INSERT INTO t VALUES (2)");
        primary.stop();
        assert_eq!(primary.processes().pids(), Vec::<i32>::new());
        primary.start();
        assert_eq!(primary.psql("SELECT count(*) FROM t"), "2");
    }
    gone.assert_gone();
}
