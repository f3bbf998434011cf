//! A stalled queen (SIGSTOP: what a VM pause, a swap storm or a starved CPU look like to
//! it) must not judge drones on silence it could not observe. Its drones heartbeat the
//! whole time; their frames wait unread in its sockets. On resuming, the queen gives each
//! drone a fresh heartbeat timeout instead of expiring it: no lease is lost, no task runs
//! twice. A drone that really died during the stall is still found out after the resume,
//! within the usual lease bound.
//!
//! The other side: a drone that was itself stalled must not declare the queen lost while
//! the queen's replies wait in its socket. Its timers count only time it was awake
//! (`drone/src/awake.rs`), so it keeps its connection, its leases and its place.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hive_tests::process::{log_lines, pid_state, pin_to_one_cpu, signal};
use hive_tests::{wait_until, DroneProc, Hive, DEADLINE};
use shared::api::{TaskState, TaskView};
use shared::protocol::{DroneMessage, QueenMessage, Welcome, PROTOCOL_VERSION};
use shared::TaskId;

/// The lease bound of `Hive::start` (FAST_LEASES): a heartbeat timeout of 1 s plus one
/// 200 ms heartbeat interval (G2, docs/GUARANTEES.md).
const LEASE_BOUND: Duration = Duration::from_millis(1_200);

/// On top of the bound: polling, and a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

/// Leases for the stall test: a heartbeat every 500 ms, a 2 s timeout.
const STALL_LEASES: [(&str, &str); 2] = [
    ("HIVE_LEASES__HEARTBEAT_INTERVAL_MS", "500"),
    ("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "2000"),
];

/// How long the queen stays stopped: four heartbeat timeouts of `STALL_LEASES`, and
/// several of `Hive::start`'s.
const STALL: Duration = Duration::from_secs(8);

/// Submits `n` exec tasks that each sleep `secs`, and waits until all run attempt 1.
fn running_tasks(hive: &Hive, n: usize, secs: u32) -> Vec<TaskView> {
    let ids: Vec<TaskId> = (0..n)
        .map(|_| {
            hive.api()
                .submit(&hive.exec_log().task(&format!("sleep {secs}")))
                .id
        })
        .collect();
    ids.iter()
        .map(|id| {
            hive.wait_task(*id, "running attempt 1", |t| {
                t.state == TaskState::Running && t.attempts == 1
            })
        })
        .collect()
}

/// Holds the queen stopped for `STALL` (the fault's length, not a wait for a condition)
/// while `during` runs, then lets it go on.
fn stall_queen(hive: &mut Hive, during: impl FnOnce(&mut Hive)) -> Instant {
    hive.queen.sigstop();
    let stopped = Instant::now();
    during(hive);
    if let Some(left) = STALL.checked_sub(stopped.elapsed()) {
        std::thread::sleep(left);
    }
    hive.queen.sigcont();
    Instant::now()
}

#[test]
fn a_stalled_queen_loses_no_lease_of_a_live_drone_and_runs_each_task_once() {
    let mut hive = STALL_LEASES
        .iter()
        .fold(Hive::builder(), |b, (k, v)| b.env(k, v))
        .start();
    hive.start_drone("a", 4);
    let before = running_tasks(&hive, 4, 12);
    stall_queen(&mut hive, |_| {});
    for old in &before {
        let done = hive.wait_task(old.id, "succeeded", |t| t.state.is_terminal());
        assert_eq!(
            (done.state, done.attempts, done.fence),
            (TaskState::Succeeded, 1, old.fence),
            "the stall cost a task its lease: {done:#?}"
        );
        assert!(done.errors.is_empty(), "{done:#?}");
    }
    let stalls = log_lines(hive.queen.log(), "the queen stalled", &[]);
    assert!(!stalls.is_empty(), "the queen did not notice its own stall");
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.rerun_tasks, 0, "{summary}");
    assert_eq!(summary.lost_leases, 0, "{summary}");
}

#[test]
fn a_drone_killed_while_the_queen_is_stalled_is_found_out_after_it_resumes() {
    let mut hive = Hive::start();
    hive.start_drone("victim", 2);
    let before = running_tasks(&hive, 2, 3);
    hive.start_drone("b", 2);
    let resumed = stall_queen(&mut hive, |hive| hive.drone("victim").kill9());
    let moved = wait_until(
        DEADLINE,
        "both leases of the killed drone to be requeued",
        || {
            before
                .iter()
                .all(|o| hive.api().task(o.id).fence > o.fence)
                .then(|| resumed.elapsed())
        },
    );
    assert!(
        moved <= LEASE_BOUND + SLACK,
        "the dead drone's leases were requeued {moved:?} after the queen resumed (bound {LEASE_BOUND:?} + {SLACK:?})"
    );
    for old in &before {
        let done = hive.wait_task(old.id, "succeeded on b", |t| t.state.is_terminal());
        assert_eq!(
            (done.state, done.attempts),
            (TaskState::Succeeded, 2),
            "{done:#?}"
        );
        assert!(done.errors[0].error.starts_with("lease lost"), "{done:#?}");
    }
    let summary = hive.check(DEADLINE);
    assert_eq!(summary.lost_leases, 2, "{summary}");
}

/// The drone's longest timer that can be armed while it is connected or connecting
/// (`WELCOME_TIMEOUT` and `SPAWN_REPORT_TIMEOUT`, 10 s; `CONNECT_TIMEOUT` is 5 s). Its
/// write timeout is the queen's heartbeat timeout, which a stall the queen forgives is
/// shorter than by definition.
const DRONE_TIMER: Duration = Duration::from_secs(10);

/// How long a drone stays stopped: past every drone timer and many heartbeat intervals,
/// within the queen's heartbeat timeout below.
const DRONE_STALL: Duration = Duration::from_secs(12);

/// Leases for the drone-stall test: a heartbeat every 200 ms, a 20 s timeout, so the
/// queen forgives `DRONE_STALL`.
const PATIENT_LEASES: [(&str, &str); 2] = [
    ("HIVE_LEASES__HEARTBEAT_INTERVAL_MS", "200"),
    ("HIVE_LEASES__HEARTBEAT_TIMEOUT_MS", "20000"),
];

/// Stops `pid` (SIGSTOP, without marking the drone harmed: the checker must hold it to
/// every guarantee of a healthy drone) and waits until the kernel says it is stopped.
fn freeze(pid: i32) -> Instant {
    signal(pid, libc::SIGSTOP);
    wait_until(DEADLINE, &format!("process {pid} to be stopped"), || {
        pid_state(pid) == Some('T')
    });
    Instant::now()
}

/// Lets `pid` go on once it has been stopped for `stall` (the fault's length, not a wait
/// for a condition).
fn thaw_after(pid: i32, stopped: Instant, stall: Duration) {
    if let Some(left) = stall.checked_sub(stopped.elapsed()) {
        std::thread::sleep(left);
    }
    signal(pid, libc::SIGCONT);
}

/// Guards "a stalled drone keeps its connection" with a task running: drone `a` (behind a
/// proxy that only counts connections) runs task X; it is stopped for `DRONE_STALL` —
/// longer than its heartbeat interval and every timer it has, shorter than the queen's
/// heartbeat timeout — while X finishes and the queen assigns it task Y, whose assign waits
/// in its socket. Afterwards the drone is still on its first and only connection (one
/// `connected` line, no `lost the queen`), the queen lists the same drone, both tasks
/// succeeded on attempt 1 with no error, each ran once, and the checker — which was not
/// told of the stop — passes. (The drone is pinned to one CPU, as in the handshake test
/// below. A connected drone arms no timeout unless a send is pending, so this passed before
/// the drone's timeouts counted awake time too; it guards the property as a whole.)
#[test]
fn a_stalled_drone_keeps_its_connection_and_its_leases() {
    assert!(DRONE_STALL > DRONE_TIMER);
    let mut hive = PATIENT_LEASES
        .iter()
        .fold(Hive::builder(), |b, (k, v)| b.env(k, v))
        .start();
    let id = hive.start_drone_behind_proxy("a", 2, &[]);
    let x = hive.api().submit(&hive.exec_log().task("sleep 2")).id;
    hive.wait_task(x, "running attempt 1", |t| {
        t.state == TaskState::Running && t.attempts == 1
    });
    let pid = hive.drone("a").pid();
    pin_to_one_cpu(pid);
    let stopped = freeze(pid);
    let y = hive.api().submit(&hive.exec_log().task("true")).id;
    hive.wait_task(y, "leased to the stopped drone", |t| {
        t.state == TaskState::Running
    });
    thaw_after(pid, stopped, DRONE_STALL);
    for task in [x, y] {
        let done = hive.wait_task(task, "succeeded", |t| t.state.is_terminal());
        assert_eq!(
            (done.state, done.attempts, done.errors.len()),
            (TaskState::Succeeded, 1, 0),
            "the drone's stall cost a task its lease: {done:#?}"
        );
        assert_eq!(hive.exec_log().starts(task), 1, "task {task} ran again");
    }
    let log = hive.drone("a").log();
    assert_eq!(
        (
            log_lines(&log, "connected to the queen", &[]).len(),
            log_lines(&log, "lost the queen", &[]).len(),
            hive.proxy("a").accepted(),
        ),
        (1, 0, 1),
        "the drone gave up its connection after its own stall"
    );
    let view = hive.drone_view("a").expect("the queen lists drone a");
    assert!(view.connected && view.id == id, "{view:?}");
    let summary = hive.check(DEADLINE);
    assert_eq!(
        (summary.rerun_tasks, summary.lost_leases),
        (0, 0),
        "{summary}"
    );
}

/// A hand-played queen for the handshake test: frames are a 4-byte big-endian length and
/// a JSON body.
fn read_frame(conn: &mut TcpStream) -> std::io::Result<DroneMessage> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    conn.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

fn write_frame(conn: &mut TcpStream, msg: &QueenMessage) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    conn.write_all(&len.to_be_bytes())?;
    conn.write_all(&body)
}

/// Guards "a stalled drone keeps its connection" in the handshake, the one place a drone
/// timer shorter than the queen's heartbeat timeout is armed: a real drone says hello to a
/// hand-played queen and is stopped while it waits for the answer; the welcome is sent
/// during the stop, which lasts past the drone's welcome timeout. After the resume the
/// drone must take the welcome that is waiting — heartbeating on that same connection, no
/// second connection — instead of timing the handshake out (which tokio's timeout did: the
/// first turn after a stop sees the expired timer before the socket's readiness). The
/// drone is pinned to one CPU, where that order is the scheduler's choice (before the fix
/// this test failed in most runs; with spare cores, rarely).
#[test]
fn a_drone_stalled_during_its_handshake_takes_the_welcome_that_waits() {
    let dir = tempfile::Builder::new()
        .prefix("hive-test-")
        .tempdir()
        .expect("a temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the hand-played queen");
    let addr = listener.local_addr().expect("its address");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let log = dir.path().join("drone-h.log");
    let mut drone = DroneProc::start(addr, "h", 1, &[], &log);
    let (mut conn, _) = wait_until(DEADLINE, "the drone to connect", || listener.accept().ok());
    conn.set_nonblocking(false).expect("a blocking connection");
    conn.set_read_timeout(Some(DEADLINE))
        .expect("a read timeout");
    let hello = read_frame(&mut conn).expect("the drone's hello");
    assert!(matches!(hello, DroneMessage::Hello(_)), "{hello:?}");

    // On one CPU the resumed drone's loop often runs before its runtime has looked at the
    // socket: the race a too-early timeout loses (with cores to spare it rarely shows).
    pin_to_one_cpu(drone.pid());
    let stopped = freeze(drone.pid());
    let welcome = QueenMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        heartbeat_interval_ms: 200,
        heartbeat_timeout_ms: 30_000,
        epoch: None,
        pongs: None,
        encoding: None,
    });
    write_frame(&mut conn, &welcome).expect("send the welcome");
    thaw_after(drone.pid(), stopped, DRONE_STALL);

    conn.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("a read timeout");
    let mut heartbeats = 0;
    let deadline = Instant::now() + DEADLINE;
    while heartbeats < 3 {
        assert!(
            Instant::now() < deadline,
            "no heartbeats from the resumed drone within {DEADLINE:?}\n{}",
            hive_tests::process::tail(&log, 40)
        );
        match read_frame(&mut conn) {
            Ok(DroneMessage::Heartbeat(_)) => heartbeats += 1,
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!(
                "the resumed drone dropped the connection its welcome waited on ({e})\n{}",
                hive_tests::process::tail(&log, 40)
            ),
        }
    }
    assert!(
        listener.accept().is_err(),
        "the drone opened a second connection"
    );
    assert!(drone.is_running(), "the drone exited");
    assert_eq!(
        (
            log_lines(&log, "connected to the queen", &[]).len(),
            log_lines(&log, "could not reach the queen", &[]).len(),
        ),
        (1, 0),
        "{}",
        hive_tests::process::tail(&log, 40)
    );
}
