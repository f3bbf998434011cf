//! The queen's limits under hostile clients (G7 in docs/GUARANTEES.md; every limit is
//! bounded): idle and trickling connections are closed on time while real drones and API
//! clients are served, the connection caps hold, and every limit that is exceeded answers
//! with an error naming the config key.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{fast_config, hello, FakeDrone, TestQueen, PATIENCE};
use hive_testkit::Incoming;
use serde_json::{json, Value};
use shared::api::{Stats, TaskState};
use shared::protocol::{AckStatus, Checkpoint, DroneMessage, Heartbeat, QueenMessage};
use shared::DroneId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a test waits to be sure something does *not* happen (a capped connection
/// stays unserved). A bounded wait for an absence; it can only make a broken cap pass,
/// never a working one fail.
const QUIET: Duration = Duration::from_millis(500);

/// Raises this process's open-file limit to its hard limit: the slow-loris test holds
/// four thousand sockets (both ends live in this process).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn stats(q: &TestQueen) -> Stats {
    let (status, body) = q.call("GET", "/v1/stats", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("stats")
}

fn total(s: &Stats) -> u64 {
    s.by_state.values().sum()
}

/// Reads until the peer closes (EOF or reset); returns when that happened and the bytes
/// read before it.
async fn read_until_closed(mut r: tokio::net::tcp::OwnedReadHalf) -> (Instant, Vec<u8>) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (Instant::now(), seen),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// One raw HTTP/1.1 exchange on a fresh connection: writes `head` and then `body` in
/// pieces of `chunk` bytes every `pause`, and returns the status and body of the answer.
async fn raw_http(
    addr: SocketAddr,
    head: &str,
    body: &[u8],
    chunk: usize,
    pause: Duration,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    let (mut r, mut w) = s.into_split();
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        for piece in body.chunks(chunk.max(1)) {
            if w.write_all(piece).await.is_err() {
                return;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        let _ = w.flush().await;
        // Keep the write half open until the answer is read.
        std::future::pending::<()>().await;
    });
    let mut raw = Vec::new();
    let answer = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    if let Some(parsed) = parse_response(&raw) {
                        return Some(parsed);
                    }
                }
            }
        }
        parse_response(&raw)
    })
    .await;
    writer.abort();
    answer
        .unwrap_or_else(|_| {
            panic!(
                "no answer in time; got so far {:?}",
                String::from_utf8_lossy(&raw)
            )
        })
        .unwrap_or_else(|| panic!("no complete answer: {:?}", String::from_utf8_lossy(&raw)))
}

/// A complete HTTP/1.1 response with a content-length body: (status, body).
fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    (body.len() >= len).then(|| (status, body[..len].to_string()))
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    let msg = v["error"].as_str().unwrap_or_default().to_string();
    assert!(!msg.is_empty(), "no error message in {body}");
    msg
}

// ----- slow loris -----------------------------------------------------------------------

/// Guards against slow-loris and idle-connection exhaustion: 1,000 connections to the drone
/// port and 1,000 to the API that send nothing or trickle a byte every 200 ms (a frame
/// header that never completes, a request line that never ends) must not stop a real
/// drone from saying hello and running a task, nor an API client from being answered; and
/// the queen must close every one of them once `hello_timeout_ms` /
/// `http_header_timeout_ms` have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed_while_the_queen_keeps_serving() {
    const PER_PORT: usize = 1_000;
    const TIMEOUT_MS: u64 = 3_000;
    const TRICKLE: Duration = Duration::from_millis(200);
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.queen.hello_timeout_ms = TIMEOUT_MS;
    cfg.queen.http_header_timeout_ms = TIMEOUT_MS;
    let q = TestQueen::start(cfg).await;

    let opened = Instant::now();
    let mut readers = Vec::new();
    let mut trickling = Vec::new();
    let mut silent = Vec::new();
    for i in 0..2 * PER_PORT {
        let to_drones = i % 2 == 0;
        let addr = if to_drones { q.drones } else { q.http };
        let s = TcpStream::connect(addr).await.expect("connect");
        let (r, w) = s.into_split();
        readers.push((to_drones, tokio::spawn(read_until_closed(r))));
        // Half of each port's connections trickle, half stay silent.
        if (i / 2) % 2 == 0 {
            trickling.push((to_drones, w));
        } else {
            silent.push(w);
        }
    }
    // A frame header announcing 200 bytes and the start of a JSON body; an HTTP request
    // line and a header that never end. One byte per connection every 200 ms.
    let frame_bytes: Vec<u8> = [&200u32.to_be_bytes()[..], br#"{"type":"hello","name":"#].concat();
    let http_bytes = b"GET /v1/stats HTTP/1.1\r\nHost: loris\r\nX-Slow: aaaaaaaaaaaaaaaa".to_vec();
    let trickler = tokio::spawn(async move {
        let mut pos = 0;
        loop {
            let mut alive = 0;
            for (to_drones, w) in trickling.iter_mut() {
                let src = if *to_drones {
                    &frame_bytes
                } else {
                    &http_bytes
                };
                let Some(b) = src.get(pos) else { continue };
                if w.write_all(&[*b]).await.is_ok() {
                    alive += 1;
                }
            }
            pos += 1;
            if alive == 0 {
                return;
            }
            tokio::time::sleep(TRICKLE).await;
        }
    });
    let all_open = opened.elapsed();

    // Meanwhile a real drone and a real client are served, end to end.
    let served = tokio::time::timeout(PATIENCE, async {
        let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
        let t = q
            .submit(json!({"kind": "echo", "payload": "under siege"}))
            .await;
        let a = d.expect_assign().await;
        assert_eq!(a.task_id, t.id);
        d.complete(a.task_id, a.fence, json!("done")).await;
        let (_, _, status) = d.expect_ack().await;
        assert_eq!(status, AckStatus::Recorded);
        let view = q.task(t.id).await;
        assert_eq!(view.state, TaskState::Succeeded);
        assert_eq!(stats(&q).await.by_state.get("succeeded"), Some(&1));
    })
    .await;
    let served_after = opened.elapsed();
    assert!(
        served.is_ok(),
        "the queen did not serve a real drone and client within {PATIENCE:?} while {} connections were held",
        2 * PER_PORT
    );
    let still_open = readers.iter().filter(|(_, h)| !h.is_finished()).count();
    eprintln!(
        "{} idle connections opened in {all_open:.1?}; real drone and client served {served_after:.1?} after the first, with {still_open} still open",
        2 * PER_PORT
    );
    assert!(
        served_after < Duration::from_millis(TIMEOUT_MS) && still_open == 2 * PER_PORT,
        "the real work must be done while every idle connection is still held (served after {served_after:?}, {still_open} open)"
    );

    // Every idle connection is closed by the queen once its timeout has passed.
    let deadline = opened + Duration::from_millis(TIMEOUT_MS) + PATIENCE;
    let mut latest = [Duration::ZERO; 2];
    for (to_drones, h) in readers {
        let (closed_at, _) = tokio::time::timeout_at(deadline, h)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "an idle {} connection was still open {:?} after it was opened",
                    if to_drones { "drone" } else { "HTTP" },
                    deadline - opened
                )
            })
            .expect("reader");
        let port = usize::from(!to_drones);
        latest[port] = latest[port].max(closed_at - opened);
    }
    trickler.abort();
    drop(silent);
    eprintln!(
        "all closed by the queen: drone port within {:.1?}, HTTP port within {:.1?} (timeouts {TIMEOUT_MS} ms)",
        latest[0], latest[1]
    );
    // The queen still serves afterwards.
    assert_eq!(total(&stats(&q).await), 1);
    q.stop().await;
}

// ----- connection caps --------------------------------------------------------------------

/// Guards `queen.max_http_connections`: with the cap at N and N connections open, the
/// next connection's request is not answered until one of them closes — then it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_connection_cap_holds_the_next_connection_until_one_closes() {
    const CAP: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.queen.max_http_connections = CAP;
    cfg.queen.http_header_timeout_ms = 60_000;
    let q = TestQueen::start(cfg).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: cap\r\n\r\n";

    // N connections, each proven served by one answered request, then left open (idle
    // keep-alive).
    let mut holders = Vec::new();
    for _ in 0..CAP {
        let mut s = TcpStream::connect(q.http).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .expect("a holder is answered")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        holders.push(s);
    }
    let mut next = TcpStream::connect(q.http)
        .await
        .expect("connect (kernel backlog)");
    next.write_all(request).await.expect("write");
    let mut buf = [0u8; 1024];
    assert!(
        tokio::time::timeout(QUIET, next.read(&mut buf))
            .await
            .is_err(),
        "connection {} was served with {CAP} open and the cap at {CAP}",
        CAP + 1
    );
    drop(holders.pop());
    let n = tokio::time::timeout(PATIENCE, next.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    q.stop().await;
}

/// Guards `queen.max_connections` on the drone port: with the cap at N and N drones
/// connected, drone N+1's hello is not answered until one of them disconnects — then it
/// is welcomed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drone_connection_cap_holds_the_next_drone_until_one_leaves() {
    const CAP: usize = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.queen.max_connections = CAP;
    let q = TestQueen::start(cfg).await;
    let mut drones = Vec::new();
    for _ in 0..CAP {
        drones.push(FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await);
    }
    let mut next = FakeDrone::open(q.drones).await;
    next.try_send(&DroneMessage::Hello(hello(DroneId::generate(), 1, vec![])))
        .await
        .expect("send hello");
    assert!(
        next.next_within(QUIET).await.is_none(),
        "drone {} was answered with {CAP} connected and the cap at {CAP}",
        CAP + 1
    );
    drop(drones.pop());
    let reply = next
        .next_within(PATIENCE)
        .await
        .expect("answered once a slot is free");
    assert!(
        matches!(reply, Incoming::Msg(QueenMessage::Welcome(_))),
        "{reply:?}"
    );
    q.stop().await;
}

// ----- each limit's error -----------------------------------------------------------------

/// Guards `queen.max_frame_len`: a frame over it — before or after the hello — gets an
/// `error` naming the limit and the connection closes; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_max_frame_len_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.queen.max_frame_len = 4096;
    let q = TestQueen::start(cfg).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;
    let big = DroneMessage::Heartbeat(Heartbeat {
        held: vec![shared::protocol::Held {
            task_id: a.task_id,
            fence: a.fence,
        }],
        assigns_seen: 1,
        checkpoints: vec![Checkpoint {
            task_id: a.task_id,
            fence: a.fence,
            data: json!("x".repeat(5_000)),
        }],
        pools: Vec::new(),
    });
    let mut messages = Vec::new();
    // After the hello (the drone's own connection), then as the first frame.
    d.send(big.clone()).await;
    let mut error = None;
    while let Some(m) = d.recv().await {
        if let QueenMessage::Error { message } = m {
            error = Some(message);
        }
    }
    messages.push(error.expect("an error before the close"));
    let mut raw = FakeDrone::open(q.drones).await;
    raw.try_send(&big).await.expect("send");
    let mut error = None;
    while let Some(m) = raw.recv().await {
        if let QueenMessage::Error { message } = m {
            error = Some(message);
        }
    }
    messages.push(error.expect("an error before the close"));
    for m in &messages {
        assert!(
            m.contains("max_frame_len") && m.contains("4096"),
            "the error must name the limit (queen.max_frame_len = 4096): {m:?}"
        );
    }
    // The checkpoint in the refused frame was not stored.
    assert_eq!(q.task(t.id).await.checkpoint, None);
    q.stop().await;
}

/// Guards `tasks.max_payload_bytes`: a payload over it is a 400 naming the key — alone, in
/// a batch and in a schedule — and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_max_payload_bytes_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.tasks.max_payload_bytes = 1024;
    let q = TestQueen::start(cfg).await;
    let fat = json!({"kind": "echo", "payload": "p".repeat(2_000)});
    for (path, body) in [
        ("/v1/tasks", fat.clone()),
        (
            "/v1/tasks/batch",
            json!({"tasks": [{"kind": "echo"}, fat.clone()]}),
        ),
        (
            "/v1/schedules",
            json!({"name": "fat", "every_ms": 60_000, "task": fat.clone()}),
        ),
    ] {
        let (status, body) = q.call("POST", path, Some(body)).await;
        assert_eq!(status, 400, "{path}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains("tasks.max_payload_bytes"), "{path}: {msg}");
    }
    // Just under the limit is fine.
    q.submit(json!({"kind": "echo", "payload": "p".repeat(1_000)}))
        .await;
    assert_eq!(total(&stats(&q).await), 1);
    let (_, schedules) = q.call("GET", "/v1/schedules", None).await;
    assert_eq!(schedules["schedules"], json!([]), "{schedules}");
    q.stop().await;
}

/// Guards `tasks.max_batch`: a batch over it is a 413 naming the key, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_max_batch_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.tasks.max_batch = 5;
    let q = TestQueen::start(cfg).await;
    let tasks: Vec<Value> = (0..6)
        .map(|i| json!({"kind": "echo", "payload": i}))
        .collect();
    let (status, body) = q
        .call("POST", "/v1/tasks/batch", Some(json!({ "tasks": tasks })))
        .await;
    assert_eq!(status, 413, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("tasks.max_batch") && msg.contains('5'),
        "{msg}"
    );
    assert_eq!(total(&stats(&q).await), 0);
    let (status, body) = q
        .call(
            "POST",
            "/v1/tasks/batch",
            Some(json!({ "tasks": &tasks[..5] })),
        )
        .await;
    assert_eq!(status, 201, "a batch of exactly max_batch is fine: {body}");
    q.stop().await;
}

/// Guards `tasks.max_body_bytes`: a request body over it — with a Content-Length or
/// chunked without one — is a 413 naming the key, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_bytes_is_413_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.tasks.max_body_bytes = 64 * 1024;
    cfg.tasks.max_payload_bytes = 1024 * 1024;
    let q = TestQueen::start(cfg).await;
    let body = json!({"kind": "echo", "payload": "p".repeat(100 * 1024)}).to_string();

    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (status, text) = raw_http(q.http, &head, body.as_bytes(), 64 * 1024, Duration::ZERO).await;
    assert_eq!(status, 413, "{text}");
    assert!(error_of(&text).contains("tasks.max_body_bytes"), "{text}");

    let mut chunked = Vec::new();
    for piece in body.as_bytes().chunks(8 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (status, text) = raw_http(q.http, head, &chunked, 64 * 1024, Duration::ZERO).await;
    assert_eq!(status, 413, "{text}");
    assert!(error_of(&text).contains("tasks.max_body_bytes"), "{text}");

    assert_eq!(total(&stats(&q).await), 0);
    q.stop().await;
}

/// Guards `queen.http_request_timeout_ms`: a body trickled slower than the deadline is
/// answered 408 naming the key (the headers arrived in time), and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_is_408_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.queen.http_request_timeout_ms = 500;
    let q = TestQueen::start(cfg).await;
    let body = json!({"kind": "echo", "payload": "slow"}).to_string();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let (status, text) = raw_http(
        q.http,
        &head,
        body.as_bytes(),
        1,
        Duration::from_millis(100),
    )
    .await;
    assert_eq!(status, 408, "{text}");
    assert!(
        error_of(&text).contains("queen.http_request_timeout_ms"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500) + PATIENCE / 2,
        "answered only after {:?}",
        started.elapsed()
    );
    assert_eq!(total(&stats(&q).await), 0);
    q.stop().await;
}

/// Guards `tasks.max_result_bytes`: a result over it is kept truncated, marked so with its
/// original size, instead of being stored whole or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_max_result_bytes_is_kept_truncated_and_marked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_config(dir.path());
    cfg.tasks.max_result_bytes = 1024;
    let q = TestQueen::start(cfg).await;
    let t = q.submit(json!({"kind": "echo"})).await;
    let mut d = FakeDrone::connect(q.drones, hello(DroneId::generate(), 1, vec![])).await;
    let a = d.expect_assign().await;
    let huge = "r".repeat(10_000);
    d.complete(a.task_id, a.fence, json!(huge)).await;
    let (_, _, status) = d.expect_ack().await;
    assert_eq!(status, AckStatus::Recorded);
    let view = q.task(t.id).await;
    let result = view.result.expect("a result");
    assert_eq!(result["truncated"], json!(true), "{result}");
    assert_eq!(result["original_bytes"], json!(huge.len() + 2), "{result}");
    assert!(
        result.to_string().len() <= 1024 + 256,
        "{}",
        result.to_string().len()
    );
    q.stop().await;
}
