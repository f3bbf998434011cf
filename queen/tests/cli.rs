//! The operator CLI: the real `queen` binary as a client of an in-process queen, each
//! subcommand checked for its output and its exit code.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{fast_config, hello, FakeDrone, TestQueen, PATIENCE};
use serde_json::{json, Value};
use shared::api::{
    DronesResponse, QueueView, QueuesResponse, SchedulesResponse, Stats, TaskPage, TaskState,
    TaskView,
};
use shared::protocol::{DroneMessage, TaskComplete, TaskFailed};
use shared::{DroneId, TaskId};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_queen");

/// What one run of the binary left behind.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts the exit code, showing everything the run printed when it differs.
    fn expect(self, code: i32) -> Out {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    fn ids(&self) -> Vec<TaskId> {
        self.lines()
            .iter()
            .map(|l| {
                l.parse()
                    .unwrap_or_else(|_| panic!("`{l}` is not a task id: {self:#?}"))
            })
            .collect()
    }
}

/// One invocation of the binary: arguments, extra environment, stdin.
#[derive(Debug, Default, Clone)]
struct Run {
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<String>,
}

impl Run {
    fn new(args: &[&str]) -> Run {
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A client command against `q` (its address as `--addr`).
    fn at(q: &TestQueen, args: &[&str]) -> Run {
        let mut r = Run::new(&["--addr", &q.http.to_string()]);
        r.args.extend(args.iter().map(|a| a.to_string()));
        r
    }

    fn env(mut self, k: &str, v: &str) -> Run {
        self.env.push((k.into(), v.into()));
        self
    }

    fn stdin(mut self, input: &str) -> Run {
        self.stdin = Some(input.into());
        self
    }

    /// Runs it to the end, within PATIENCE; the test's own HIVE_* variables are not passed on.
    async fn run(self) -> Out {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        for (k, _) in std::env::vars() {
            if k.starts_with("HIVE_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the queen binary");
        if let Some(input) = self.stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(input.as_bytes()).await.expect("write stdin");
            drop(pipe);
        }
        let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("`queen {}` did not finish in time", self.args.join(" ")))
            .expect("wait for the queen binary");
        Out {
            code: out.status.code().expect("exited rather than killed"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

async fn cli(q: &TestQueen, args: &[&str]) -> Out {
    Run::at(q, args).run().await
}

async fn stats(q: &TestQueen) -> Stats {
    let (status, body) = q.call("GET", "/v1/stats", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("stats")
}

/// Guards the help contract: scripts find the exit codes in `queen --help`, and an unknown
/// command is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_documents_the_commands_and_exit_codes() {
    let help = Run::new(&["--help"]).run().await.expect(0);
    for needle in [
        "submit",
        "task",
        "tasks",
        "cancel",
        "retry",
        "drones",
        "queues",
        "schedules",
        "stats",
        "watch",
        "dev",
        "--addr",
        "--token",
        "--json",
    ] {
        assert!(
            help.stdout.contains(needle),
            "--help lacks {needle}: {help:#?}"
        );
    }
    for code in ["0  ", "1  ", "2  ", "3  ", "4  ", "5  "] {
        assert!(
            help.stdout.contains(&format!("\n  {code}")),
            "--help lacks exit code {code}: {}",
            help.stdout
        );
    }
    let submit = Run::new(&["submit", "--help"]).run().await.expect(0);
    assert!(
        submit.stdout.contains("chunks of at most 1000") && submit.stdout.contains("atomic"),
        "{}",
        submit.stdout
    );
    Run::new(&["frobnicate"]).run().await.expect(2);
}

/// Guards `submit` from flags: every flag reaches the spec, `-- CMD` makes an exec task,
/// and the id printed is the task's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_the_new_id_and_every_flag_reaches_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let dep = q.submit(json!({"kind": "echo", "delay_ms": 600_000})).await;
    let out = cli(
        &q,
        &[
            "submit",
            "echo",
            "--payload",
            r#"{"n": 1}"#,
            "--queue",
            "reports",
            "--priority",
            "-3",
            "--max-attempts",
            "2",
            "--timeout-ms",
            "1500",
            "--label",
            "linux",
            "--label",
            "gpu",
            "--idempotency-key",
            "k-1",
            "--depends-on",
            &dep.id.to_string(),
            "--retry-initial-ms",
            "50",
        ],
    )
    .await
    .expect(0);
    let ids = out.ids();
    assert_eq!(ids.len(), 1, "{out:#?}");
    let t = q.task(ids[0]).await;
    assert_eq!(
        (
            t.kind.as_str(),
            t.queue.as_str(),
            t.priority,
            t.max_attempts
        ),
        ("echo", "reports", -3, 2)
    );
    assert_eq!(t.payload, json!({"n": 1}));
    assert_eq!(t.timeout_ms, Some(1500));
    assert_eq!(t.labels, vec!["gpu".to_string(), "linux".to_string()]);
    assert_eq!(t.idempotency_key.as_deref(), Some("k-1"));
    assert_eq!(t.depends_on, vec![dep.id]);
    assert_eq!(t.retry.and_then(|r| r.initial_ms), Some(50));
    assert_eq!(t.state, TaskState::Blocked);

    // `-- CMD ARGS`: an exec task whose payload is the command.
    let out = cli(
        &q,
        &[
            "submit",
            "--run-at",
            "2099-01-01T00:00:00Z",
            "--",
            "sh",
            "-c",
            "echo hi",
        ],
    )
    .await
    .expect(0);
    let t = q.task(out.ids()[0]).await;
    assert_eq!(t.kind, "exec");
    assert_eq!(t.payload, json!({"cmd": ["sh", "-c", "echo hi"]}));
    assert_eq!(t.state, TaskState::Scheduled);

    // --json: the API's task document.
    let out = cli(&q, &["--json", "submit", "echo", "--delay-ms", "600000"])
        .await
        .expect(0);
    let view: TaskView = serde_json::from_value(out.json()).expect("a task document");
    assert_eq!(q.task(view.id).await.kind, "echo");
    q.stop().await;
}

/// Guards `submit --file`: JSON batches (with refs), NDJSON from a file or stdin, and files
/// larger than one chunk all arrive, ids printed in file order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_file_sends_json_batches_and_ndjson_in_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(&dir.path().join("db"))).await;
    let batch = dir.path().join("batch.json");
    std::fs::write(
        &batch,
        json!({"tasks": [
            {"kind": "echo", "ref": "first", "delay_ms": 600000},
            {"kind": "echo", "depends_on": ["first"], "payload": 2},
        ]})
        .to_string(),
    )
    .expect("write batch");
    let out = cli(
        &q,
        &["submit", "--file", batch.to_str().expect("utf-8 path")],
    )
    .await
    .expect(0);
    let ids = out.ids();
    assert_eq!(ids.len(), 2, "{out:#?}");
    let second = q.task(ids[1]).await;
    assert_eq!(second.payload, json!(2));
    assert_eq!(
        second.depends_on,
        vec![ids[0]],
        "the ref resolved to the first task"
    );

    // NDJSON on stdin, blank lines skipped.
    let out = Run::at(&q, &["submit", "-f", "-"])
        .stdin("{\"kind\": \"echo\", \"payload\": \"a\"}\n\n{\"kind\": \"echo\", \"payload\": \"b\"}\n")
        .run()
        .await
        .expect(0);
    let ids = out.ids();
    assert_eq!(ids.len(), 2, "{out:#?}");
    assert_eq!(q.task(ids[0]).await.payload, json!("a"));
    assert_eq!(q.task(ids[1]).await.payload, json!("b"));

    // More than one chunk of 1000, with --json: one document with every task.
    let ndjson: String = (0..1001)
        .map(|i| format!("{{\"kind\": \"echo\", \"queue\": \"bulk\", \"payload\": {i}}}\n"))
        .collect();
    let file = dir.path().join("bulk.ndjson");
    std::fs::write(&file, ndjson).expect("write ndjson");
    let out = cli(
        &q,
        &[
            "--json",
            "submit",
            "--file",
            file.to_str().expect("utf-8 path"),
        ],
    )
    .await
    .expect(0);
    let doc = out.json();
    let tasks = doc["tasks"].as_array().expect("tasks array");
    assert_eq!(tasks.len(), 1001);
    assert_eq!(tasks[1000]["payload"], json!(1000), "file order is kept");
    let s = stats(&q).await;
    let bulk: u64 = s
        .by_queue
        .get("bulk")
        .map(|m| m.values().sum())
        .unwrap_or(0);
    assert_eq!(bulk, 1001);
    q.stop().await;
}

/// Guards the chunking contract stated in `submit --help`: a refused later chunk exits 2,
/// leaves the earlier chunks submitted, prints their ids and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_later_chunk_leaves_earlier_chunks_submitted_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(&dir.path().join("db"))).await;
    // Well-formed everywhere (so the local check passes), but task 1000 is refused by the
    // queen: it opens the second chunk.
    let mut ndjson: String = (0..1000)
        .map(|i| format!("{{\"kind\": \"echo\", \"payload\": {i}}}\n"))
        .collect();
    ndjson.push_str("{\"kind\": \"echo\", \"max_attempts\": 0}\n");
    let out = Run::at(&q, &["submit", "--file", "-"])
        .stdin(&ndjson)
        .run()
        .await
        .expect(2);
    assert_eq!(out.ids().len(), 1000, "the first chunk's ids are printed");
    assert!(
        out.stderr.contains("the first 1000 tasks were submitted")
            && out.stderr.contains("max_attempts"),
        "{}",
        out.stderr
    );
    let total: u64 = stats(&q).await.by_state.values().sum();
    assert_eq!(total, 1000);
    q.stop().await;
}

/// Guards the exit code 2 contract: bad input, caught locally or by the API, exits 2 with a
/// message naming what was wrong, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_2_naming_the_field_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(&dir.path().join("db"))).await;
    let nd = dir.path().join("bad.ndjson");
    std::fs::write(
        &nd,
        "{\"kind\": \"echo\"}\n{\"kind\": \"echo\", \"priorty\": 1}\n",
    )
    .expect("write");
    let js = dir.path().join("bad.json");
    std::fs::write(
        &js,
        r#"{"tasks": [{"kind": "echo"}, {"kind": "echo", "bogus": true}]}"#,
    )
    .expect("write");
    let nd = nd.to_str().expect("utf-8 path");
    let js = js.to_str().expect("utf-8 path");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["submit", "echo", "--max-attempts", "0"],
            vec!["max_attempts"],
        ),
        (
            vec!["submit", "exec", "--payload", r#"{"cmd": "ls"}"#],
            vec!["cmd"],
        ),
        (
            vec!["submit", "echo", "--payload", "{bad"],
            vec!["--payload"],
        ),
        (
            vec!["submit", "echo", "--run-at", "tomorrow"],
            vec!["--run-at"],
        ),
        (vec!["submit", "--file", nd], vec!["line 2", "priorty"]),
        (vec!["submit", "--file", js], vec!["tasks[1]", "bogus"]),
        (
            vec!["submit", "--file", "/nonexistent/specs"],
            vec!["cannot read"],
        ),
        (vec!["submit"], vec!["KIND"]),
        (vec!["tasks", "--state", "done"], vec!["unknown state"]),
        (vec!["task", "not-an-id"], vec!["task id"]),
    ];
    for (args, needles) in cases {
        let out = cli(&q, &args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:#?}");
        for n in needles {
            assert!(out.stderr.contains(n), "{args:?} should name {n}: {out:#?}");
        }
    }
    let out = cli(&q, &["submit", "echo", "--max-attempts", "0"]).await;
    assert!(
        out.stderr
            .starts_with("queen: invalid task spec: max_attempts"),
        "errors print `queen: <the API's message>`: {out:#?}"
    );
    let s = stats(&q).await;
    assert!(
        s.by_state.values().all(|n| *n == 0),
        "nothing stored: {s:?}"
    );
    q.stop().await;
}

/// Guards `task` and `tasks`: the detail view, an aligned table, filters, paging and --json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_and_tasks_show_a_detail_view_a_table_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let a1 = q
        .submit(json!({"kind": "echo", "queue": "alpha", "delay_ms": 600_000}))
        .await;
    let a2 = q
        .submit(json!({"kind": "echo", "queue": "alpha", "delay_ms": 600_000}))
        .await;
    let b = q
        .submit(json!({"kind": "exec", "queue": "beta", "delay_ms": 600_000,
                        "payload": {"cmd": ["true"]}, "labels": ["linux"]}))
        .await;

    let out = cli(&q, &["task", &b.id.to_string()]).await.expect(0);
    for needle in [
        format!("id:       {}", b.id),
        "state:    scheduled".into(),
        "attempts: 0 of 3".into(),
        "fence:    0".into(),
        "queue:    beta".into(),
        "kind:     exec".into(),
        "labels:   linux".into(),
        "run at:".into(),
        "\"cmd\"".into(),
    ] {
        assert!(
            out.stdout.contains(&needle),
            "lacks {needle}: {}",
            out.stdout
        );
    }
    let doc = cli(&q, &["--json", "task", &b.id.to_string()])
        .await
        .expect(0);
    let view: TaskView = serde_json::from_value(doc.json()).expect("task document");
    assert_eq!(view.id, b.id);

    let out = cli(&q, &["tasks"]).await.expect(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 4, "header and three rows: {}", out.stdout);
    assert!(lines[0].starts_with("ID "), "{}", out.stdout);
    let state_col = lines[0].find("STATE").expect("STATE column");
    for (line, id) in lines[1..].iter().zip([b.id, a2.id, a1.id]) {
        assert!(
            line.starts_with(&id.to_string()),
            "newest first: {}",
            out.stdout
        );
        assert_eq!(
            line.get(state_col..state_col + 9),
            Some("scheduled"),
            "{}",
            out.stdout
        );
        assert!(line.contains("0/3"), "{line}");
    }

    let out = cli(&q, &["tasks", "--queue", "beta"]).await.expect(0);
    assert_eq!(out.lines().len(), 2, "{}", out.stdout);
    let out = cli(&q, &["tasks", "--state", "running"]).await.expect(0);
    assert_eq!(out.stdout.trim(), "no tasks");

    // One page of two: --json is the API's page, with its cursor; the table hints at more.
    let out = cli(&q, &["--json", "tasks", "--limit", "2"])
        .await
        .expect(0);
    let page: TaskPage = serde_json::from_value(out.json()).expect("a page");
    assert_eq!(page.tasks.len(), 2);
    assert_eq!(page.next, Some(a2.id));
    let out = cli(&q, &["tasks", "--limit", "2"]).await.expect(0);
    assert!(
        out.stderr.contains(&format!("--before {}", a2.id)),
        "{out:#?}"
    );
    let out = cli(&q, &["tasks", "--before", &a2.id.to_string()])
        .await
        .expect(0);
    assert_eq!(out.lines().len(), 2, "only the older task: {}", out.stdout);
    let out = cli(&q, &["--json", "tasks", "--all"]).await.expect(0);
    let page: TaskPage = serde_json::from_value(out.json()).expect("a page");
    assert_eq!(page.tasks.len(), 3);
    assert_eq!(page.next, None);
    q.stop().await;
}

/// Guards `cancel` and `retry`: they change the task, and a conflict (409) exits 2 with
/// the API's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_change_the_task_and_a_conflict_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let t = q.submit(json!({"kind": "echo", "delay_ms": 600_000})).await;
    let id = t.id.to_string();

    let out = cli(&q, &["retry", &id]).await.expect(2);
    assert_eq!(
        out.stderr.trim(),
        format!("queen: task {id} is scheduled; only failed or cancelled tasks can be retried")
    );

    let out = cli(&q, &["cancel", &id, "--reason", "not needed"])
        .await
        .expect(0);
    assert_eq!(out.stdout.trim(), format!("task {id} is cancelled"));
    let view = q.task(t.id).await;
    assert_eq!(view.state, TaskState::Cancelled);
    assert_eq!(view.cancel_reason.as_deref(), Some("not needed"));
    let out = cli(&q, &["cancel", &id]).await.expect(2);
    assert!(out.stderr.contains("already cancelled"), "{out:#?}");

    let out = cli(&q, &["--json", "retry", &id]).await.expect(0);
    let view: TaskView = serde_json::from_value(out.json()).expect("task document");
    assert_eq!(view.state, TaskState::Pending);
    q.stop().await;
}

/// Guards exit code 3: an unknown task or schedule is "not found", not a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tasks_and_schedules_exit_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let nobody = TaskId::generate().to_string();
    for args in [
        vec!["task", nobody.as_str()],
        vec!["cancel", nobody.as_str()],
        vec!["retry", nobody.as_str()],
        vec!["schedules", "delete", "nope"],
    ] {
        let out = cli(&q, &args).await.expect(3);
        assert!(out.stderr.starts_with("queen: no "), "{args:?}: {out:#?}");
    }
    q.stop().await;
}

/// Guards `queues`: the table, pause/resume and limits (set and removed with `none`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_listed_paused_resumed_and_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    q.submit(json!({"kind": "echo", "queue": "reports"})).await;

    let out = cli(&q, &["queues"]).await.expect(0);
    let row = out
        .lines()
        .into_iter()
        .find(|l| l.starts_with("reports "))
        .unwrap_or_else(|| panic!("no reports row: {}", out.stdout));
    assert!(row.contains("active"), "{row}");

    let out = cli(&q, &["queues", "pause", "reports"]).await.expect(0);
    assert!(out.stdout.contains("paused"), "{}", out.stdout);
    let out = cli(&q, &["--json", "queues"]).await.expect(0);
    let resp: QueuesResponse = serde_json::from_value(out.json()).expect("queues");
    let reports = resp
        .queues
        .iter()
        .find(|v| v.name == "reports")
        .expect("reports");
    assert!(reports.paused);
    assert_eq!(reports.pending, 1);

    let out = cli(
        &q,
        &[
            "--json",
            "queues",
            "limit",
            "reports",
            "--max-running",
            "4",
            "--rate",
            "2.5",
        ],
    )
    .await
    .expect(0);
    let v: QueueView = serde_json::from_value(out.json()).expect("queue");
    assert_eq!((v.max_running, v.rate_per_s), (Some(4), Some(2.5)));
    let out = cli(
        &q,
        &["--json", "queues", "limit", "reports", "--rate", "none"],
    )
    .await
    .expect(0);
    let v: QueueView = serde_json::from_value(out.json()).expect("queue");
    assert_eq!(
        (v.max_running, v.rate_per_s),
        (Some(4), None),
        "absent keeps, none removes"
    );
    cli(&q, &["queues", "limit", "reports"]).await.expect(2);
    cli(&q, &["queues", "limit", "reports", "--rate", "fast"])
        .await
        .expect(2);

    let out = cli(&q, &["queues", "resume", "reports"]).await.expect(0);
    assert!(out.stdout.contains("active"), "{}", out.stdout);
    q.stop().await;
}

/// Guards `schedules`: add (cron and interval), list, a bad spec refused naming the field,
/// delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_added_listed_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    cli(
        &q,
        &[
            "schedules",
            "add",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--spec",
            r#"{"kind": "echo"}"#,
        ],
    )
    .await
    .expect(0);
    let out = cli(
        &q,
        &[
            "schedules",
            "add",
            "often",
            "--every-ms",
            "3600000",
            "--spec",
            r#"{"kind": "echo", "queue": "ops"}"#,
        ],
    )
    .await
    .expect(0);
    assert!(out.stdout.contains("3600000 ms"), "{}", out.stdout);

    let out = cli(&q, &["schedules"]).await.expect(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(lines
        .iter()
        .any(|l| l.starts_with("nightly ") && l.contains("cron 0 3 * * *")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("often ") && l.contains("ops")));

    let out = cli(
        &q,
        &[
            "schedules",
            "add",
            "bad",
            "--every-ms",
            "1000",
            "--spec",
            r#"{"kind": "echo", "bogus": 1}"#,
        ],
    )
    .await
    .expect(2);
    assert!(out.stderr.contains("bogus"), "{out:#?}");
    cli(
        &q,
        &[
            "schedules",
            "add",
            "both",
            "--every-ms",
            "1000",
            "--cron",
            "* * * * *",
            "--spec",
            "{}",
        ],
    )
    .await
    .expect(2);

    let out = cli(&q, &["schedules", "delete", "often"]).await.expect(0);
    assert_eq!(out.stdout.trim(), "deleted schedule often");
    let out = cli(&q, &["--json", "schedules"]).await.expect(0);
    let resp: SchedulesResponse = serde_json::from_value(out.json()).expect("schedules");
    let names: Vec<&str> = resp.schedules.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["nightly"]);
    q.stop().await;
}

/// Guards `drones`, `stats` and `watch`: the counts and drones the API reports are shown,
/// and `watch --count` stops by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drones_stats_and_watch_show_what_the_queen_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let out = cli(&q, &["drones"]).await.expect(0);
    assert_eq!(out.stdout.trim(), "no drones");
    let drone = FakeDrone::connect(q.drones, hello(DroneId::generate(), 3, vec![])).await;
    q.submit(json!({"kind": "echo", "queue": "later", "delay_ms": 600_000}))
        .await;

    let out = cli(&q, &["drones"]).await.expect(0);
    let lines = out.lines();
    assert!(lines[0].starts_with("NAME "), "{}", out.stdout);
    let row = lines.get(1).expect("one drone");
    assert!(
        row.contains(&drone.id.to_string()) && row.contains("connected"),
        "{row}"
    );
    assert!(row.contains("0/3") && row.contains("echo,exec"), "{row}");
    let out = cli(&q, &["--json", "drones"]).await.expect(0);
    let resp: DronesResponse = serde_json::from_value(out.json()).expect("drones");
    assert_eq!(resp.drones.len(), 1);

    let out = cli(&q, &["stats"]).await.expect(0);
    let later = out
        .lines()
        .into_iter()
        .find(|l| l.starts_with("later "))
        .unwrap_or_else(|| panic!("no row for the queue: {}", out.stdout));
    let header = out.lines()[0];
    let col = header.find("SCHEDULED").expect("SCHEDULED column") + "SCHEDULED".len() - 1;
    assert_eq!(later.get(col..=col), Some("1"), "{}", out.stdout);
    assert!(out.stdout.contains("drones connected: 1"), "{}", out.stdout);
    let out = cli(&q, &["--json", "stats"]).await.expect(0);
    let s: Stats = serde_json::from_value(out.json()).expect("stats");
    assert_eq!(s.by_state.get("scheduled"), Some(&1));

    let out = cli(&q, &["watch", "--count", "1"]).await.expect(0);
    assert!(
        out.stdout.contains("SCHEDULED") && out.stdout.contains("later"),
        "{}",
        out.stdout
    );
    let out = cli(
        &q,
        &["--json", "watch", "--count", "2", "--interval-ms", "100"],
    )
    .await
    .expect(0);
    let docs = out.lines();
    assert_eq!(
        docs.len(),
        2,
        "one stats document per refresh: {}",
        out.stdout
    );
    for d in docs {
        let s: Stats = serde_json::from_str(d).expect("stats line");
        assert_eq!(s.drones_connected, 1);
    }
    drop(drone);
    q.stop().await;
}

/// Guards exit code 4 and where the address and token come from: flags, HIVE_ADDR and
/// HIVE_TOKEN, or the same config file as the server's (an unspecified listen address
/// meaning this host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_exits_4_and_address_and_token_come_from_flags_env_or_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(&dir.path().join("db"));
    cfg.auth.token = Some(shared::ids::Secret("s3cret".into()));
    let q = TestQueen::start(cfg).await;

    let out = cli(&q, &["stats"]).await.expect(4);
    assert_eq!(out.stderr.trim(), "queen: missing or invalid bearer token");
    cli(&q, &["--token", "wrong", "stats"]).await.expect(4);
    cli(&q, &["--token", "s3cret", "stats"]).await.expect(0);
    Run::at(&q, &["stats"])
        .env("HIVE_TOKEN", "s3cret")
        .run()
        .await
        .expect(0);
    Run::new(&["tasks"])
        .env("HIVE_ADDR", &q.http.to_string())
        .env("HIVE_TOKEN", "s3cret")
        .run()
        .await
        .expect(0);

    let config = dir.path().join("hive.toml");
    std::fs::write(
        &config,
        format!(
            "[queen]\nhttp = \"0.0.0.0:{}\"\n\n[auth]\ntoken = \"s3cret\"\n",
            q.http.port()
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path");
    Run::new(&["--config", config, "stats"])
        .run()
        .await
        .expect(0);
    // The flag wins over the config.
    Run::new(&["--config", config, "--token", "wrong", "stats"])
        .run()
        .await
        .expect(4);
    q.stop().await;
}

/// Guards exit code 5: a queen that is not there is "unavailable", said plainly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_queen_exits_5() {
    // A port that was free a moment ago and has no listener now.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let out = Run::new(&["--addr", &addr.to_string(), "stats"])
        .run()
        .await
        .expect(5);
    assert!(
        out.stderr
            .starts_with(&format!("queen: cannot reach the queen at {addr}")),
        "{out:#?}"
    );
    Run::new(&["--addr", &addr.to_string(), "submit", "echo"])
        .run()
        .await
        .expect(5);
}

/// A standby queen's HTTP side as the CLI sees it: every request is answered 503 with
/// `{"error", "leader"}` (no `leader` when it does not know one). Serves until the test
/// process ends; counts the requests it answered.
fn fake_standby(leader: Option<String>) -> (String, Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let mut body = json!({"error": "this queen is a standby"});
    if let Some(leader) = leader {
        body["leader"] = json!(leader);
    }
    let body = body.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(&stream);
            // Read the whole request (headers, then the body's length), so closing after
            // the answer does not reset the connection under the client.
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut request_body = vec![0; length];
            let _ = reader.read_exact(&mut request_body);
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = (&stream).write_all(answer.as_bytes());
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, hits)
}

/// Guards several `--addr`es (queens sharing a database): a queen that is down is skipped
/// for reads and writes alike (nothing was sent to it), and a standby's 503 naming the
/// leader sends the request there, even when the leader was not given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_addresses_find_the_queen_that_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let live = q.http.to_string();

    let list = format!("{dead},{live}");
    let out = Run::new(&["--addr", &list, "--json", "stats"])
        .run()
        .await
        .expect(0);
    assert!(out.json()["by_state"].is_object(), "{out:#?}");
    let out = Run::new(&["--addr", &list, "submit", "echo"])
        .run()
        .await
        .expect(0);
    let ids = out.ids();
    assert_eq!(q.task(ids[0]).await.kind, "echo");

    let (standby, hits) = fake_standby(Some(live.clone()));
    let out = Run::new(&["--addr", &standby, "submit", "echo"])
        .run()
        .await
        .expect(0);
    let ids = out.ids();
    assert_eq!(
        q.task(ids[0]).await.kind,
        "echo",
        "the write reached the leader"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the standby was asked once");
    // Also from HIVE_ADDR, with the standby last: the first queen that answers is enough.
    Run::new(&["tasks", "--all"])
        .env("HIVE_ADDR", &format!("{live},{standby}"))
        .run()
        .await
        .expect(0);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    q.stop().await;
}

/// Guards writes that might have been applied: a 503 that names no leader may come from a
/// leader whose write failed, so a write is not sent to another queen (exit 5 with the
/// queen's own message), while a read goes on. With every queen failing, the error says
/// what each said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_without_a_leader_ends_a_write_but_not_a_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(dir.path())).await;
    let live = q.http.to_string();
    let (standby, hits) = fake_standby(None);
    let list = format!("{standby},{live}");

    let out = Run::new(&["--addr", &list, "submit", "echo"])
        .run()
        .await
        .expect(5);
    assert_eq!(
        out.stderr.trim(),
        "queen: this queen is a standby",
        "{out:#?}"
    );
    assert_eq!(
        stats(&q).await.by_state.values().sum::<u64>(),
        0,
        "nothing was submitted"
    );
    Run::new(&["--addr", &list, "stats"]).run().await.expect(0);
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let out = Run::new(&["--addr", &format!("{standby},{dead}"), "stats"])
        .run()
        .await
        .expect(5);
    assert!(
        out.stderr.starts_with(&format!(
            "queen: no queen took the request: {standby}: this queen is a standby; \
             cannot reach the queen at {dead}: "
        )),
        "{out:#?}"
    );
    q.stop().await;
}

/// Guards `task --wait`: it answers once the task has ended (the queen holds the request),
/// exits 0 for a success and 1 for a failure, and with `--timeout` gives up with 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_wait_returns_when_the_task_ends_and_gives_up_at_its_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(&dir.path().join("db"))).await;
    let mut drone = FakeDrone::connect(q.drones, hello(DroneId::generate(), 2, vec![])).await;

    let id = cli(&q, &["submit", "echo", "--payload", "\"ok\""])
        .await
        .expect(0)
        .ids()[0];
    let a = drone.expect_assign().await;
    assert_eq!(a.task_id, id);
    let waiting = tokio::spawn(Run::at(&q, &["task", &id.to_string(), "--wait"]).run());
    drone
        .send(DroneMessage::TaskComplete(TaskComplete {
            task_id: a.task_id,
            fence: a.fence,
            result: json!({"echo": "ok"}),
        }))
        .await;
    let out = waiting.await.expect("join").expect(0);
    assert!(out.stdout.contains("succeeded"), "{out:#?}");

    let id = cli(
        &q,
        &[
            "submit",
            "echo",
            "--payload",
            "\"bad\"",
            "--max-attempts",
            "1",
        ],
    )
    .await
    .expect(0)
    .ids()[0];
    let a = drone.expect_assign().await;
    let waiting = tokio::spawn(Run::at(&q, &["--json", "task", &id.to_string(), "--wait"]).run());
    drone
        .send(DroneMessage::TaskFailed(TaskFailed {
            task_id: a.task_id,
            fence: a.fence,
            error: "boom".into(),
            result: None,
            retryable: false,
        }))
        .await;
    let out = waiting.await.expect("join").expect(1);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(doc["state"], "failed", "{out:#?}");

    // Assigned and never answered: --timeout gives up.
    let id = cli(&q, &["submit", "echo", "--payload", "\"slow\""])
        .await
        .expect(0)
        .ids()[0];
    let _slow = drone.expect_assign().await;
    let out = Run::at(&q, &["task", &id.to_string(), "--wait", "--timeout", "1"])
        .run()
        .await
        .expect(1);
    assert!(out.stderr.contains("has not ended after 1 s"), "{out:#?}");
    assert!(out.stdout.contains("running"), "{out:#?}");
    q.stop().await;
}

/// Guards `submit --wait`: it waits for every task, exits 0 when all succeeded and 1 when
/// one failed, naming it; `task` then shows the error of each attempt and the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_exits_0_when_all_succeed_and_1_when_one_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = TestQueen::start(fast_config(&dir.path().join("db"))).await;
    let mut drone = FakeDrone::connect(q.drones, hello(DroneId::generate(), 2, vec![])).await;

    let ok = tokio::spawn(Run::at(&q, &["submit", "echo", "--payload", "\"ok\"", "--wait"]).run());
    let a = drone.expect_assign().await;
    drone
        .send(DroneMessage::TaskComplete(TaskComplete {
            task_id: a.task_id,
            fence: a.fence,
            result: json!({"echo": "ok"}),
        }))
        .await;
    let out = ok.await.expect("join").expect(0);
    assert_eq!(out.ids(), vec![a.task_id]);
    assert!(out.stderr.contains("1/1 done: 1 succeeded"), "{out:#?}");

    let file = dir.path().join("two.ndjson");
    std::fs::write(
        &file,
        "{\"kind\": \"echo\", \"payload\": \"ok\", \"max_attempts\": 1}\n\
         {\"kind\": \"echo\", \"payload\": \"bad\", \"max_attempts\": 1}\n",
    )
    .expect("write");
    let file = file.to_str().expect("utf-8 path").to_string();
    let waiting = tokio::spawn(Run::at(&q, &["submit", "--wait", "--file", &file]).run());
    let mut failed = None;
    for _ in 0..2 {
        let a = drone.expect_assign().await;
        let msg = if a.payload == json!("bad") {
            failed = Some(a.task_id);
            DroneMessage::TaskFailed(TaskFailed {
                task_id: a.task_id,
                fence: a.fence,
                error: "boom".into(),
                result: None,
                retryable: false,
            })
        } else {
            DroneMessage::TaskComplete(TaskComplete {
                task_id: a.task_id,
                fence: a.fence,
                result: json!({"echo": "ok"}),
            })
        };
        drone.send(msg).await;
    }
    let failed = failed.expect("the bad task was assigned");
    let out = waiting.await.expect("join").expect(1);
    assert_eq!(out.ids().len(), 2, "{out:#?}");
    assert!(
        out.stderr
            .contains(&format!("queen: task {failed} failed: boom")),
        "{out:#?}"
    );

    let out = cli(&q, &["task", &failed.to_string()]).await.expect(0);
    assert!(out.stdout.contains("state:    failed"), "{}", out.stdout);
    assert!(
        out.stdout.contains("attempt 1 (fence 1, drone ") && out.stdout.contains(": boom"),
        "{}",
        out.stdout
    );
    let out = cli(&q, &["task", &a.task_id.to_string()]).await.expect(0);
    assert!(
        out.stdout.contains("result:") && out.stdout.contains("\"echo\": \"ok\""),
        "{}",
        out.stdout
    );
    q.stop().await;
}

/// Guards the suspicion in `task`: a task whose drone died while it ran alone is shown as
/// a suspect, with the lost lease and how it was judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_shows_the_suspicion_of_a_task_that_lost_its_drone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.tasks.suspect_after_lost = 1;
    cfg.tasks.max_lost_attempts = 2;
    let q = TestQueen::start(cfg).await;
    let t = q.submit(json!({"kind": "echo", "max_attempts": 10})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    assert_eq!(d.expect_assign().await.task_id, t.id);
    drop(d); // the drone dies
    q.wait_task(t.id, "the lease lost", |t| t.suspicion.is_some())
        .await;
    let out = cli(&q, &["task", &t.id.to_string()]).await.expect(0);
    for needle in [
        "suspicion:",
        "suspect since",
        "runs alone on a drone",
        "attempt 1 (fence 1) on drone",
        "alone by chance (not yet a suspect): no evidence",
    ] {
        assert!(
            out.stdout.contains(needle),
            "lacks {needle}: {}",
            out.stdout
        );
    }
    q.stop().await;
}
