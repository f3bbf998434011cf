//! The drone against a fake queen: each test names the failure it guards against.
//!
//! Most tests run `drone::run` in-process (exec tasks still go through the real binary's
//! process supervisor); the ones about signals and `kill -9` run the real binary.

mod support;

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;
use shared::frame::Encoding;
use shared::protocol::{CancelTask, DroneMessage, QueenMessage, Reject, PROTOCOL_VERSION};
use shared::{ids::Secret, Fence};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_carries_version_identity_slots_labels_kinds_and_token() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let mut config = test_config(queen.addr)?;
    config.slots = 3;
    config.labels = vec!["gpu".into(), "ssd".into()];
    config.token = Some(Secret("s3cret".into()));
    let _drone = InProcessDrone::start(config);

    let mut conn = queen.accept().await?;
    let hello = conn.welcome().await?;
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hello.name, "test-drone");
    assert_eq!(hello.slots, 3);
    assert_eq!(hello.labels, vec!["gpu", "ssd"]);
    assert!(
        hello.kinds.contains(&"echo".to_owned()),
        "{:?}",
        hello.kinds
    );
    assert!(
        hello.kinds.contains(&"exec".to_owned()),
        "{:?}",
        hello.kinds
    );
    assert_eq!(hello.token, Some(Secret("s3cret".into())));
    assert!(hello.held.is_empty());
    assert!(!hello.draining);
    // An idle drone still heartbeats, or the queen would think it dead.
    conn.heartbeat_where("an idle heartbeat", |held, seen| {
        held.is_empty() && seen == 0
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_completes_and_is_held_until_acked() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = assign("echo", json!({"hello": [1, 2, 3]}));
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.fence, task.fence);
    assert_eq!(done.result, json!({"hello": [1, 2, 3]}));

    // Unacked, the drone still holds it (the queen must not requeue it).
    conn.heartbeat_where("a heartbeat holding the unacked task", |held, seen| {
        held.contains(&support::held(&task)) && seen == 1
    })
    .await?;
    conn.ack(task.task_id, task.fence).await?;
    conn.heartbeat_where("a heartbeat without the acked task", |held, _| {
        held.is_empty()
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sees_its_lease_and_payload_env() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let mut task = assign(
        "exec",
        json!({
            "cmd": ["sh", "-c", "echo $HIVE_TASK_ID $HIVE_ATTEMPT $HIVE_FENCE $GREETING; pwd; echo warn >&2"],
            "env": {"GREETING": "hi", "HIVE_FENCE": "forged"},
            "cwd": dir.path(),
        }),
    );
    task.fence = Fence(7);
    task.attempt = 2;
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    let cwd = dir.path().canonicalize()?;
    assert_eq!(
        done.result,
        json!({
            "exit_code": 0,
            "stdout": format!("{} 2 7 hi\n{}\n", task.task_id, cwd.display()),
            "stderr": "warn\n",
        })
    );
    Ok(())
}

/// JSON in and out of `exec` without a pool: the payload's `input` on stdin and in
/// `$HIVE_INPUT_FILE`; what the task writes to `$HIVE_RESULT_FILE` is its result; a result
/// file that is not JSON fails the attempt for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_takes_json_input_and_gives_a_json_result() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let input = json!({"name": "ada", "n": [1, 2, 3]});
    let task = assign(
        "exec",
        json!({
            "cmd": ["sh", "-c", "IFS= read -r line || true; \
                    [ \"$line\" = \"$(cat \"$HIVE_INPUT_FILE\")\" ] || exit 3; \
                    printf '{\"echo\": %s}' \"$line\" > \"$HIVE_RESULT_FILE\"; echo ignored"],
            "input": input,
        }),
    );
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.result, json!({"echo": input}));

    // No input: stdin is empty and the input variable unset; no result file: the output.
    let task = assign(
        "exec",
        json!({"cmd": ["sh", "-c", "cat; echo \"${HIVE_INPUT_FILE:-none}\""]}),
    );
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "none\n");

    let task = assign(
        "exec",
        json!({"cmd": ["sh", "-c", "echo '{not json' > \"$HIVE_RESULT_FILE\""]}),
    );
    conn.assign(task.clone()).await?;
    match conn.outcome(task.task_id).await? {
        DroneMessage::TaskFailed(f) => {
            assert!(f.error.contains("not JSON"), "{}", f.error);
            assert!(!f.retryable);
        }
        other => anyhow::bail!("expected a failure, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonzero_exit_is_a_retryable_failure_with_code_and_output() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec("echo out; echo oops >&2; exit 3", dir.path());
    conn.assign(task.clone()).await?;
    let f = failed(conn.outcome(task.task_id).await?)?;
    assert_eq!(f.error, "exit code 3");
    assert!(f.retryable);
    assert_eq!(
        f.result,
        Some(json!({"exit_code": 3, "stdout": "out\n", "stderr": "oops\n"}))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kinds_bad_payloads_and_missing_programs_fail_permanently() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let cases = [
        (
            assign("teleport", json!({})),
            "kind teleport is not supported by this drone",
        ),
        (assign("exec", json!({"cmd": []})), "cmd"),
        (assign("exec", json!({"command": ["ls"]})), "command"),
        (
            assign("exec", json!({"cmd": ["/no/such/program-hive"]})),
            "No such file or directory",
        ),
    ];
    for (task, needle) in cases {
        conn.assign(task.clone()).await?;
        let f = failed(conn.outcome(task.task_id).await?)?;
        assert!(f.error.contains(needle), "`{}` lacks `{needle}`", f.error);
        assert!(!f.retryable, "{}: retrying cannot help", f.error);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cap_is_drained_and_marked_so_the_task_never_blocks() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(queen.addr)?;
    config.max_output_bytes = 1000;
    let _drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    // 300 kB is far more than a pipe buffer: without draining, `head` would block.
    let task = exec("head -c 300000 /dev/zero | tr '\\0' a", dir.path());
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    let stdout = done.result["stdout"].as_str().unwrap_or_default();
    assert!(
        stdout.starts_with(&"a".repeat(1000)),
        "{}",
        &stdout[..20.min(stdout.len())]
    );
    assert!(
        stdout.ends_with("\n[truncated 299000 bytes]"),
        "{}",
        &stdout[1000..]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_child_holding_the_output_open_does_not_hang_the_result() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec("sleep 30 & echo $! > pids; echo done", dir.path());
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "done\n");
    let pids = pids_in(&dir.path().join("pids"), 1).await;
    // Left behind by a finished attempt, it is an orphan: the drone kills it.
    wait_all_gone(&pids).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_whole_process_group() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let mut task = exec(
        "echo $$ > pids; sleep 30 & echo $! >> pids; sleep 30; wait",
        dir.path(),
    );
    task.timeout_ms = Some(1000);
    conn.assign(task.clone()).await?;
    let pids = pids_in(&dir.path().join("pids"), 2).await;
    assert!(
        pids.iter().all(|p| !is_gone(*p)),
        "the task should be running"
    );

    let f = failed(conn.outcome(task.task_id).await?)?;
    assert_eq!(f.error, "timed out after 1000 ms");
    assert!(f.retryable);
    // The shell and its background grandchild both die, not just the shell.
    wait_all_gone(&pids).await;
    Ok(())
}

/// Guards the negotiated encoding (issue 16) on the drone's side: a drone configured for
/// MessagePack offers it, and once the welcome chooses it, reads the queen's frames and
/// writes its own in it (an outcome written in JSON would not decode here); a drone left
/// at the default offers nothing; a welcome choosing an encoding the hello did not offer
/// makes the drone drop that connection rather than guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_is_offered_when_configured_and_spoken_once_chosen() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(queen.addr)?;
    config.encoding = drone::config::WireEncoding::Msgpack;
    let _drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    let hello = conn.welcome_encoding(Encoding::MessagePack).await?;
    assert_eq!(hello.encodings, vec!["msgpack".to_owned()]);
    let task = exec("echo 0.5", dir.path());
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "0.5\n");

    let json_queen = FakeQueen::start().await?;
    let _json_drone = InProcessDrone::start(test_config(json_queen.addr)?);
    let mut conn = json_queen.accept().await?;
    let hello = conn.welcome_encoding(Encoding::MessagePack).await?;
    assert!(hello.encodings.is_empty(), "{hello:?}");
    conn.closed_by_the_drone().await?;
    Ok(())
}

/// Guards the drone's process supervisor (one per drone, the parent of every task
/// process): if it is killed outright, its tasks must not run on unwatched, their
/// attempts must fail (retryably, so the queen runs them again), and the next task must
/// start under a new supervisor rather than fail forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_fails_its_tasks_kills_their_groups_and_is_replaced() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec(
        "echo $PPID > supervisor; echo $$ > pids; sleep 30 & echo $! >> pids; wait",
        dir.path(),
    );
    conn.assign(task.clone()).await?;
    let pids = pids_in(&dir.path().join("pids"), 2).await;
    let supervisor = pids_in(&dir.path().join("supervisor"), 1).await[0];
    signal(u32::try_from(supervisor)?, libc::SIGKILL)?;

    let f = failed(conn.outcome(task.task_id).await?)?;
    assert!(f.retryable, "{f:?}");
    // The shell and its background grandchild both die with the supervisor.
    wait_all_gone(&pids).await;

    let next = exec("echo $PPID", dir.path());
    conn.assign(next.clone()).await?;
    let done = completed(conn.outcome(next.task_id).await?)?;
    let new_supervisor: i32 = done.result["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no parent pid in {}", done.result))?;
    assert_ne!(
        new_supervisor, supervisor,
        "a new supervisor runs the next task"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_running_task_and_reports_it_permanently() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec(
        "echo $$ > pids; sleep 30 & echo $! >> pids; wait",
        dir.path(),
    );
    conn.assign(task.clone()).await?;
    let pids = pids_in(&dir.path().join("pids"), 2).await;

    conn.send(QueenMessage::Cancel(CancelTask {
        task_id: task.task_id,
        fence: task.fence,
        reason: "operator said so".into(),
    }))
    .await?;
    let f = failed(conn.outcome(task.task_id).await?)?;
    assert_eq!(f.error, "cancelled: operator said so");
    assert!(!f.retryable);
    wait_all_gone(&pids).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_assign_runs_the_task_once() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec(
        "echo run >> runs; while [ ! -e go ]; do sleep 0.02; done",
        dir.path(),
    );
    conn.assign(task.clone()).await?;
    wait_until_async(DEADLINE, "the first run started", || {
        std::future::ready(dir.path().join("runs").exists())
    })
    .await;
    conn.assign(task.clone()).await?;
    // Nothing about the task may come back before it is released: no second outcome,
    // no failure of a "superseded" first run.
    let id = task.task_id;
    conn.recv_where("a heartbeat after both assigns", |m| match m {
        DroneMessage::Heartbeat(h) if h.assigns_seen == 2 => Some(Ok(())),
        DroneMessage::TaskComplete(c) if c.task_id == id => Some(Err(format!("{m:?}"))),
        DroneMessage::TaskFailed(f) if f.task_id == id => Some(Err(format!("{m:?}"))),
        _ => None,
    })
    .await?
    .map_err(|m| anyhow::anyhow!("outcome before the task was released: {m}"))?;
    std::fs::write(dir.path().join("go"), "")?;
    completed(conn.outcome(task.task_id).await?)?;
    conn.ack(task.task_id, task.fence).await?;
    conn.heartbeat_where("the task released", |held, _| held.is_empty())
        .await?;
    let runs = std::fs::read_to_string(dir.path().join("runs"))?;
    assert_eq!(
        runs, "run\n",
        "the duplicate assign must not start a second run"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_task_gets_sigterm_before_sigkill() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    // A task that cleans up on SIGTERM must get the chance to.
    let mut task = exec(
        "trap 'echo cleaning up; exit 5' TERM; touch started; sleep 30 & wait",
        dir.path(),
    );
    task.timeout_ms = Some(500);
    conn.assign(task.clone()).await?;
    let f = failed(conn.outcome(task.task_id).await?)?;
    assert_eq!(f.error, "timed out after 500 ms");
    let result = f.result.unwrap_or_default();
    assert_eq!(result["stdout"], "cleaning up\n", "{result}");
    assert_eq!(result["exit_code"], 5, "{result}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_start_with_no_signal_blocked() -> Result<()> {
    // The supervisor blocks signals for itself; a task inheriting that mask would ignore the
    // drone's SIGTERM and could only be SIGKILLed, never stopped politely.
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;
    let task = assign(
        "exec",
        json!({"cmd": ["grep", "SigBlk", "/proc/self/status"]}),
    );
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "SigBlk:\t0000000000000000\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_drain_grace_runs_out_running_tasks_are_killed_and_reported() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(queen.addr)?;
    config.drain_grace = Duration::from_millis(300);
    let mut drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec(
        "echo $$ > pids; sleep 60 & echo $! >> pids; wait",
        dir.path(),
    );
    conn.assign(task.clone()).await?;
    let pids = pids_in(&dir.path().join("pids"), 2).await;
    drone.shutdown.graceful.cancel();
    conn.recv_where("drain", |m| matches!(m, DroneMessage::Drain).then_some(()))
        .await?;
    let f = failed(conn.outcome(task.task_id).await?)?;
    assert_eq!(f.error, "drone shutting down");
    assert!(f.retryable);
    conn.ack(task.task_id, task.fence).await?;
    wait_all_gone(&pids).await;
    assert!(drone.finished().await?.is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_outcome_is_resent_after_reconnect_until_acked() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);

    let mut first = queen.accept().await?;
    let hello1 = first.welcome().await?;
    let task = assign("echo", json!("result"));
    first.assign(task.clone()).await?;
    completed(first.outcome(task.task_id).await?)?;
    drop(first); // the queen goes away before acking

    let mut second = queen.accept().await?;
    let hello2 = second.welcome().await?;
    assert_eq!(
        hello2.drone_id, hello1.drone_id,
        "the drone id survives reconnects"
    );
    assert_eq!(
        hello2.held,
        vec![held(&task)],
        "the hello lists the unacked task"
    );
    let again = completed(second.outcome(task.task_id).await?)?;
    assert_eq!((again.fence, again.result), (task.fence, json!("result")));
    // A new connection counts its own assigns.
    second
        .heartbeat_where("a heartbeat still holding it", |held, seen| {
            held.contains(&support::held(&task)) && seen == 0
        })
        .await?;
    second.ack(task.task_id, task.fence).await?;
    second
        .heartbeat_where("the task released", |held, _| held.is_empty())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_keeps_running_through_a_queen_outage_and_reports_afterwards() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);

    let mut first = queen.accept().await?;
    first.welcome().await?;
    let task = exec(
        "while [ ! -e go ]; do sleep 0.02; done; echo finished; touch done",
        dir.path(),
    );
    first.assign(task.clone()).await?;
    first
        .heartbeat_where("the task running", |held, seen| {
            seen == 1 && held.contains(&support::held(&task))
        })
        .await?;
    drop(first);

    // Finish the task while nobody is listening.
    std::fs::write(dir.path().join("go"), "")?;
    wait_until_async(DEADLINE, "the task finished", || {
        std::future::ready(dir.path().join("done").exists())
    })
    .await;

    let mut second = queen.accept().await?;
    let hello = second.welcome().await?;
    assert_eq!(hello.held, vec![held(&task)]);
    let done = completed(second.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "finished\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_reject_stops_the_drone_with_the_reason() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let mut drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    match conn.recv().await? {
        DroneMessage::Hello(_) => {}
        other => bail!("expected hello, got {other:?}"),
    }
    conn.send(QueenMessage::Reject(Reject {
        reason: "unsupported protocol version 1".into(),
        supported_versions: vec![PROTOCOL_VERSION + 1],
        code: None,
        leader: None,
    }))
    .await?;
    match drone.finished().await? {
        Ok(()) => bail!("the drone kept going after a fatal reject"),
        Err(e) => assert!(
            e.to_string().contains("unsupported protocol version 1"),
            "{e}"
        ),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_reject_is_retried() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.recv().await?;
    conn.send(QueenMessage::Reject(Reject {
        reason: "queen is starting up".into(),
        supported_versions: vec![PROTOCOL_VERSION],
        code: None,
        leader: None,
    }))
    .await?;
    let mut again = queen.accept().await?;
    again.welcome().await?;
    Ok(())
}

// ----- several queens: a leader and its standbys -----

/// A reconnect backoff so long that a test finishing in seconds shows the drone never
/// waited for it: between the addresses of one round there is no wait.
fn backoff_longer_than_any_test() -> drone::backoff::Backoff {
    let ten_minutes = Duration::from_secs(600);
    drone::backoff::Backoff::new(ten_minutes, 1, ten_minutes)
}

/// Guards following the leader a standby names: at once (no backoff), before the rest of
/// the list, even when the leader is not in the list. The list's next address answers
/// nothing, so dialling it first would cost the drone its 10 s welcome timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_naming_the_leader_sends_the_drone_there_at_once() -> Result<()> {
    let standby = FakeQueen::start().await?;
    let leader = FakeQueen::start().await?;
    let hole = black_hole()?;
    let mut config = test_config_for(&[standby.addr, hole.local_addr()?])?;
    config.reconnect = backoff_longer_than_any_test();
    let _drone = InProcessDrone::start(config);

    let mut to_standby = standby.accept().await?;
    to_standby
        .reject_not_leader(Some(leader.addr.to_string()))
        .await?;
    let mut to_leader = leader.accept().await?;
    to_leader.welcome_in(Some(1)).await?;
    to_leader
        .heartbeat_where("a heartbeat to the leader", |_, _| true)
        .await?;
    Ok(())
}

/// Guards a standby that does not know the leader: the drone moves on to its next
/// address at once instead of backing off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_without_a_leader_passes_the_drone_to_the_next_address() -> Result<()> {
    let standby = FakeQueen::start().await?;
    let leader = FakeQueen::start().await?;
    let mut config = test_config_for(&[standby.addr, leader.addr])?;
    config.reconnect = backoff_longer_than_any_test();
    let _drone = InProcessDrone::start(config);

    standby.accept().await?.reject_not_leader(None).await?;
    leader.accept().await?.welcome_in(Some(1)).await?;
    Ok(())
}

/// Guards the retry after a round of standbys (issue 14): a standby that knows no leader
/// yet (an election in progress) ends the round, and the next round comes after a short
/// fixed pause, not the backoff (ten minutes here), so the drone reaches the new leader
/// while it still keeps the drone's running tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_round_of_standbys_the_next_round_comes_at_once() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let mut config = test_config(queen.addr)?;
    config.reconnect = backoff_longer_than_any_test();
    let _drone = InProcessDrone::start(config);

    queen.accept().await?.reject_not_leader(None).await?;
    // The same queen has won the election meanwhile.
    let mut leader = queen.accept().await?;
    leader.welcome_in(Some(1)).await?;
    leader
        .heartbeat_where("a heartbeat to the new leader", |_, _| true)
        .await?;
    Ok(())
}

/// Guards the silence rule (issue 14): a queen that promised pongs and then says nothing
/// (frozen: its kernel still takes the drone's bytes) is left after about the heartbeat
/// timeout, and the drone comes back with its running task listed in the hello, the task
/// untouched by the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queen_that_promised_pongs_and_went_silent_is_left_with_the_held_tasks() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);

    let mut frozen = queen.accept().await?;
    let hello = frozen.welcome_with(None, Some(true)).await?;
    assert!(hello.pongs, "the drone asks for pongs");
    let task = exec(
        "while [ ! -e go ]; do sleep 0.02; done; echo finished",
        dir.path(),
    );
    frozen.assign(task.clone()).await?;
    frozen
        .heartbeat_where("the task running", |held, seen| {
            seen == 1 && held.contains(&support::held(&task))
        })
        .await?;
    // From here the queen reads nothing and answers nothing; the socket stays open.
    let silent_since = tokio::time::Instant::now();

    let mut next = queen.accept().await?;
    let waited = silent_since.elapsed();
    let timeout = Duration::from_millis(HEARTBEAT_TIMEOUT_MS);
    assert!(
        waited >= timeout / 2 && waited <= timeout * 3,
        "left the silent queen after {waited:?}; the heartbeat timeout is {timeout:?}"
    );
    let again = next.welcome_with(None, Some(true)).await?;
    assert_eq!(again.drone_id, hello.drone_id);
    assert_eq!(
        again.held,
        vec![held(&task)],
        "the hello re-attaches the task"
    );
    std::fs::write(dir.path().join("go"), "")?;
    let done = completed(next.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "finished\n");
    drop(frozen);
    Ok(())
}

/// Guards compatibility with queens before pongs: one that never answers a heartbeat is
/// not judged by its silence. Three heartbeat timeouts of heartbeats all arrive on the
/// one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queen_without_pongs_is_not_left_for_its_silence() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);

    let mut old = queen.accept().await?;
    old.welcome().await?;
    let until = tokio::time::Instant::now() + Duration::from_millis(3 * HEARTBEAT_TIMEOUT_MS);
    let mut heartbeats = 0;
    while tokio::time::Instant::now() < until {
        match old.recv().await? {
            DroneMessage::Heartbeat(_) => heartbeats += 1,
            other => bail!("expected only heartbeats, got {other:?}"),
        }
    }
    assert!(heartbeats >= 10, "only {heartbeats} heartbeats");
    Ok(())
}

/// Guards failover speed: a dead address (a queen host that is down) costs one refused
/// connect, not a backoff period, before the next address is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_address_costs_no_backoff() -> Result<()> {
    let live = FakeQueen::start().await?;
    let mut config = test_config_for(&[dead_addr()?, live.addr])?;
    config.reconnect = backoff_longer_than_any_test();
    let _drone = InProcessDrone::start(config);
    live.accept().await?.welcome().await?;
    Ok(())
}

/// Guards the epoch: a queen that welcomes the drone in an older term than it has already
/// been welcomed in is a deposed leader. The drone sends it nothing, closes, and takes
/// its running task and its unacknowledged outcome to the next queen, as on any
/// reconnect: listed in the hello, the outcome sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_is_left_for_the_next_queen_with_the_held_tasks() -> Result<()> {
    let old_leader = FakeQueen::start().await?;
    let new_leader = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config_for(&[old_leader.addr, new_leader.addr])?);

    let mut first = old_leader.accept().await?;
    let hello1 = first.welcome_in(Some(5)).await?;
    let running = exec("while [ ! -e go ]; do sleep 0.02; done", dir.path());
    let finished = assign("echo", json!("kept"));
    first.assign(running.clone()).await?;
    first.assign(finished.clone()).await?;
    completed(first.outcome(finished.task_id).await?)?;
    first
        .heartbeat_where("both tasks held", |held, seen| {
            seen == 2
                && held.contains(&support::held(&running))
                && held.contains(&support::held(&finished))
        })
        .await?;
    let mut both = vec![held(&running), held(&finished)];
    both.sort_by_key(|h| h.task_id);
    drop(first); // the connection breaks: a failover

    // The drone tries the queen it knew first: still running, deposed, in term 3.
    let mut deposed = old_leader.accept().await?;
    let mut hello = deposed.welcome_in(Some(3)).await?;
    hello.held.sort_by_key(|h| h.task_id);
    assert_eq!(hello.held, both);
    deposed.closed_by_the_drone().await?;

    let mut second = new_leader.accept().await?;
    let mut hello2 = second.welcome_in(Some(6)).await?;
    assert_eq!(hello2.drone_id, hello1.drone_id, "still the same drone");
    hello2.held.sort_by_key(|h| h.task_id);
    assert_eq!(hello2.held, both, "the hello re-attaches both tasks");
    let again = completed(second.outcome(finished.task_id).await?)?;
    assert_eq!((again.fence, again.result), (finished.fence, json!("kept")));
    second.ack(finished.task_id, finished.fence).await?;
    std::fs::write(dir.path().join("go"), "")?;
    completed(second.outcome(running.task_id).await?)?;
    Ok(())
}

/// Guards TLS with several queens: each has its own certificate, so the name verified is
/// the host of the address dialled, here a leader named by a standby (an IP address),
/// not the host of the first address (`localhost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_queen_is_verified_by_the_host_it_is_dialled_at() -> Result<()> {
    use hive_tls::test_pki::{Pki, Usage};
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "ha");
    let (crt, key) = pki.issue("standby", &["localhost"], Usage::ServerAuth);
    let standby = FakeQueen::start_tls(&crt, &key).await?;
    let (crt, key) = pki.issue("leader", &["127.0.0.1"], Usage::ServerAuth);
    let leader = FakeQueen::start_tls(&crt, &key).await?;

    let mut config = test_config(standby.addr)?;
    config.queen = drone::config::QueenAddrs::parse(&format!("localhost:{}", standby.addr.port()))
        .map_err(anyhow::Error::msg)?;
    let settings = drone::link::TlsSettings {
        ca: pki.ca(),
        cert: None,
        key: None,
        server_name: None,
    };
    config.tls = Some(drone::link::TlsClient::load(settings).map_err(anyhow::Error::msg)?);
    let _drone = InProcessDrone::start(config);

    standby
        .accept()
        .await?
        .reject_not_leader(Some(leader.addr.to_string()))
        .await?;
    leader.accept().await?.welcome_in(Some(1)).await?;
    Ok(())
}

// ----- the real binary -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_of_the_drone_takes_its_tasks_and_their_children() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let drone = DroneProcess::start(queen.addr, &[], &[])?;
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec(
        "echo $$ > pids; sleep 60 & echo $! >> pids; wait",
        dir.path(),
    );
    conn.assign(task).await?;
    let pids = pids_in(&dir.path().join("pids"), 2).await;
    assert!(pids.iter().all(|p| !is_gone(*p)));

    signal(drone.pid(), libc::SIGKILL)?;
    // No orphan may keep running a task the queen is about to requeue.
    wait_all_gone(&pids).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_finishes_the_running_task_and_exits_zero() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut drone = DroneProcess::start(queen.addr, &[], &[("HIVE_DRONE_TOKEN", "s3cret")])?;
    let mut conn = queen.accept().await?;
    let hello = conn.welcome().await?;
    assert_eq!(
        hello.token,
        Some(Secret("s3cret".into())),
        "the token comes from the env"
    );

    // The task also shows that the drone's token does not leak into its environment.
    let task = exec(
        "touch started; while [ ! -e go ]; do sleep 0.02; done; echo ${HIVE_DRONE_TOKEN:-no-token}; echo finished",
        dir.path(),
    );
    conn.assign(task.clone()).await?;
    wait_until_async(DEADLINE, "the task started", || {
        std::future::ready(dir.path().join("started").exists())
    })
    .await;

    signal(drone.pid(), libc::SIGTERM)?;
    conn.recv_where("drain", |m| matches!(m, DroneMessage::Drain).then_some(()))
        .await?;

    // A draining drone takes nothing new.
    let late = assign("echo", json!(1));
    conn.assign(late.clone()).await?;
    let f = failed(conn.outcome(late.task_id).await?)?;
    assert_eq!(f.error, "drone is draining");
    assert!(f.retryable, "another drone can run it");
    conn.ack(late.task_id, late.fence).await?;

    std::fs::write(dir.path().join("go"), "")?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    assert_eq!(done.result["stdout"], "no-token\nfinished\n");
    conn.ack(task.task_id, task.fence).await?;

    let status = drone.exit_status().await?;
    assert_eq!(status.code(), Some(0), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_kills_running_tasks_and_reports_them() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut drone = DroneProcess::start(queen.addr, &[], &[])?;
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = exec(
        "echo $$ > pids; sleep 60 & echo $! >> pids; wait",
        dir.path(),
    );
    conn.assign(task.clone()).await?;
    let pids = pids_in(&dir.path().join("pids"), 2).await;

    signal(drone.pid(), libc::SIGTERM)?;
    conn.recv_where("drain", |m| matches!(m, DroneMessage::Drain).then_some(()))
        .await?;
    signal(drone.pid(), libc::SIGTERM)?;
    let f = failed(conn.outcome(task.task_id).await?)?;
    assert_eq!(f.error, "drone shutting down");
    assert!(f.retryable);
    conn.ack(task.task_id, task.fence).await?;
    wait_all_gone(&pids).await;
    let status = drone.exit_status().await?;
    assert_eq!(status.code(), Some(0), "{status:?}");
    Ok(())
}

/// Guards `--queen A,B`: the binary takes a list and finds the queen that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_a_comma_separated_list_of_queens() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let _drone = DroneProcess::start_with(&format!("{},{}", dead_addr()?, queen.addr), &[], &[])?;
    queen.accept().await?.welcome().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_with_an_unknown_key_is_refused_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("drone.toml");
    std::fs::write(&path, "slots = 2\nslot = 3\n")?;
    let output = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(drone_binary())
            .arg("--config")
            .arg(&path)
            .output(),
    )
    .await??;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("slot"), "{stderr}");
    assert!(stderr.contains("drone.toml"), "{stderr}");
    Ok(())
}

/// Guards checkpoints: the task finds the previous attempt's checkpoint in
/// `$HIVE_CHECKPOINT_FILE`, and what it writes there reaches the queen in a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_handed_in_and_reported_out() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let _drone = InProcessDrone::start(test_config(queen.addr)?);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;
    let go = dir.path().join("go");
    let script = format!(
        "cat \"$HIVE_CHECKPOINT_FILE\"; echo '{{\"step\": 2, \"progress\": 0.5}}' > \"$HIVE_CHECKPOINT_FILE\"; \
         while [ ! -e {go} ]; do sleep 0.02; done",
        go = go.display()
    );
    let mut a = exec(&script, dir.path());
    a.checkpoint = Some(json!({"step": 1}));
    let task_id = a.task_id;
    conn.assign(a).await?;
    let data = conn
        .recv_where("a heartbeat with the new checkpoint", |m| match m {
            DroneMessage::Heartbeat(h) => h
                .checkpoints
                .iter()
                .find(|c| c.task_id == task_id)
                .map(|c| c.data.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(data, json!({"step": 2, "progress": 0.5}));
    std::fs::write(&go, b"")?;
    let done = completed(conn.outcome(task_id).await?)?;
    assert_eq!(
        done.result["stdout"],
        json!("{\"step\":1}"),
        "the task read the handed-in checkpoint"
    );
    Ok(())
}
