//! G7: bad input is refused, never harmful. Malformed, oversized and unknown protocol frames
//! get an `error` naming the problem and close only their own connection while a real drone
//! keeps working; invalid API requests get a 4xx naming the problem and store nothing.

use std::time::Duration;

use hive_tests::api::count;
use hive_tests::execlog::Phase;
use hive_tests::{echo, named_hello, wait_until, FakeDrone, Hive, DEADLINE};
use serde_json::{json, Value};
use shared::api::TaskState;
use shared::protocol::{DroneMessage, Heartbeat, SUPPORTED_VERSIONS};

/// One abusive connection: what it sends, whether it says a valid hello first, and what the
/// queen's `error` message must mention.
struct Abuse {
    name: &'static str,
    after_hello: bool,
    bytes: Vec<u8>,
    mentions: &'static str,
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn abuses() -> Vec<Abuse> {
    let oversized = ((2u32 << 20).to_be_bytes()).to_vec();
    let unknown = framed(br#"{"type":"launch_missiles","target":"moon"}"#);
    let garbage = framed(b"\xff\xfe this is not json {");
    let heartbeat_first = framed(
        &serde_json::to_vec(&DroneMessage::Heartbeat(Heartbeat {
            held: vec![],
            assigns_seen: 0,
            checkpoints: vec![],
            pools: vec![],
        }))
        .expect("json"),
    );
    let mut cases = Vec::new();
    for after_hello in [false, true] {
        cases.push(Abuse {
            name: "garbage body",
            after_hello,
            bytes: garbage.clone(),
            mentions: "",
        });
        cases.push(Abuse {
            name: "length prefix of 2 MiB",
            after_hello,
            bytes: oversized.clone(),
            mentions: "frame",
        });
        cases.push(Abuse {
            name: "unknown message type",
            after_hello,
            bytes: unknown.clone(),
            mentions: "launch_missiles",
        });
    }
    cases.push(Abuse {
        name: "heartbeat before hello",
        after_hello: false,
        bytes: heartbeat_first,
        mentions: "hello",
    });
    // An HTTP client on the drone port: "GET " read as a length is ~1.1 GB.
    cases.push(Abuse {
        name: "HTTP request",
        after_hello: false,
        bytes: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        mentions: "frame",
    });
    cases
}

fn msg_type(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("?")
}

/// Guards against one bad peer harming the queen or anyone else (G7): each abusive
/// connection (garbage, a hostile 2 MiB length prefix, an unknown message type — before and
/// after a valid hello — a heartbeat instead of a hello, an HTTP request on the drone port, a
/// frame cut short, an unsupported protocol version) must get an `error` (or `reject`) naming
/// the problem and then be closed, while a real drone connected throughout keeps its
/// connection, finishes the task it was running (once) and runs a task submitted afterwards.
#[test]
fn bad_frames_close_only_their_connection_and_a_real_drone_keeps_working() {
    let mut hive = Hive::start();
    let drone_id = hive.start_drone("d1", 2);
    let addr = hive.queen.drones_addr;
    let long = hive.api().submit(&hive.exec_log().task("sleep 1")).id;
    wait_until(DEADLINE, "the long task to start", || {
        hive.exec_log().starts(long) == 1
    });

    for case in abuses() {
        let label = format!(
            "{} ({} hello)",
            case.name,
            if case.after_hello { "after" } else { "before" }
        );
        let conn = FakeDrone::open(addr);
        if case.after_hello {
            conn.send(&DroneMessage::Hello(named_hello(
                &format!("abuser-{}", case.name),
                &["nothing"],
                1,
            )))
            .expect("send hello");
            let welcome = conn
                .recv_json(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{label}: no welcome"));
            assert_eq!(msg_type(&welcome), "welcome", "{label}: {welcome}");
        }
        conn.send_bytes(&case.bytes).expect("send abuse");
        let closing = conn.read_until_closed(DEADLINE);
        let errors: Vec<&Value> = closing
            .frames
            .iter()
            .filter(|f| msg_type(f) == "error")
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{label}: expected one error message before the close, got {closing:?}"
        );
        let message = errors[0]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{label}: empty error message");
        assert!(
            message.contains(case.mentions),
            "{label}: error {message:?} does not mention {:?}",
            case.mentions
        );
        assert_eq!(
            closing.frames.last().map(msg_type),
            Some("error"),
            "{label}: nothing may follow the error"
        );
        hive.queen.assert_running();
    }

    // A frame cut short by the peer closing: nothing to answer, the queen just lets go.
    let conn = FakeDrone::open(addr);
    conn.send_bytes(&[0, 0, 0, 100, b'{', b'"'])
        .expect("send a partial frame");
    drop(conn);

    // Version skew: a clear reject saying which versions this queen speaks.
    let conn = FakeDrone::open(addr);
    let mut future = named_hello("from-the-future", &["echo"], 1);
    future.protocol_version = 999;
    conn.send(&DroneMessage::Hello(future)).expect("send hello");
    let closing = conn.read_until_closed(DEADLINE);
    let reject = closing
        .frames
        .iter()
        .find(|f| msg_type(f) == "reject")
        .unwrap_or_else(|| panic!("no reject: {closing:?}"));
    assert!(
        reject["reason"].as_str().is_some_and(|r| r.contains("999")),
        "{reject}"
    );
    let supported: Vec<u32> =
        serde_json::from_value(reject["supported_versions"].clone()).expect("versions");
    assert_eq!(supported, SUPPORTED_VERSIONS);

    // The real drone never noticed: same connection (listed, same id), its task ran once, and
    // new work runs.
    hive.queen.assert_running();
    let after = hive.api().submit(&echo(json!("after the abuse"))).id;
    let views = hive.wait_all_succeeded(DEADLINE, &[long, after]);
    assert_eq!(
        views[0].attempts, 1,
        "the running task was disturbed: {:#?}",
        views[0]
    );
    let runs = hive.exec_log().by_task().remove(&long).unwrap_or_default();
    assert_eq!(
        runs.iter().map(|e| e.phase).collect::<Vec<_>>(),
        vec![Phase::Start, Phase::Done]
    );
    let d1 = hive.drone_view("d1").expect("d1 listed");
    assert!(d1.connected && d1.id == drone_id, "{d1:#?}");
    let drone_log = std::fs::read_to_string(hive.drone("d1").log()).unwrap_or_default();
    assert!(
        !drone_log.contains("lost the queen"),
        "the real drone lost its connection during the abuse:\n{drone_log}"
    );
    // Nothing stored changed: exactly our two tasks exist.
    let stats = hive.api().stats();
    let total: u64 = stats.by_state.values().sum();
    assert_eq!(
        (total, count(&stats, TaskState::Succeeded)),
        (2, 2),
        "{stats:?}"
    );
}

/// Guards against invalid API input being half-applied or silently accepted (G7): each bad
/// request gets a 4xx with an `{"error"}` naming the problem, a batch with one bad spec
/// stores none of it, and nothing stored changes.
#[test]
fn invalid_api_requests_are_refused_naming_the_problem_and_store_nothing() {
    let hive = Hive::start();
    let api = hive.api();
    let kept = api.submit(&echo(json!("kept"))).id;

    // (what, method + path, body, expected status, what the error must mention)
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        (
            "unknown field",
            "POST /v1/tasks",
            r#"{"kind":"echo","priorty":3}"#,
            400,
            "priorty",
        ),
        (
            "missing kind",
            "POST /v1/tasks",
            r#"{"payload":1}"#,
            400,
            "kind",
        ),
        ("not json", "POST /v1/tasks", "{{{", 400, ""),
        (
            "batch with one bad spec",
            "POST /v1/tasks/batch",
            r#"{"tasks":[{"kind":"echo"},{"kind":"echo","bogus":1}]}"#,
            400,
            "bogus",
        ),
        (
            "empty batch",
            "POST /v1/tasks/batch",
            r#"{"tasks":[]}"#,
            400,
            "empty",
        ),
        (
            "cancel of an unknown task",
            "POST /v1/tasks/01960000-0000-7000-8000-000000000000/cancel",
            "",
            404,
            "",
        ),
        (
            "cancel with a bad id",
            "POST /v1/tasks/not-a-uuid/cancel",
            "",
            400,
            "not-a-uuid",
        ),
        (
            "get of an unknown task",
            "GET /v1/tasks/01960000-0000-7000-8000-000000000000",
            "",
            404,
            "",
        ),
        (
            "get with a bad id",
            "GET /v1/tasks/not-a-uuid",
            "",
            400,
            "not-a-uuid",
        ),
        (
            "list with an unknown state",
            "GET /v1/tasks?state=done",
            "",
            400,
            "done",
        ),
        (
            "list with limit 0",
            "GET /v1/tasks?limit=0",
            "",
            400,
            "limit",
        ),
    ];
    for (name, target, body, status, mentions) in cases {
        let (method, path) = target.split_once(' ').expect("method and path");
        let answer = if method == "GET" {
            api.get_raw(path)
        } else {
            api.post_raw(path, body)
        };
        let (code, text) = answer.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(code, status, "{name}: {text}");
        let err: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}: error body is not JSON ({e}): {text}"));
        let message = err["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no `error` field: {text}"));
        assert!(
            message.contains(mentions),
            "{name}: {message:?} does not mention {mentions:?}"
        );
    }

    let all = api.list_all(None, None);
    assert_eq!(
        all.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![kept],
        "only the valid task is stored"
    );
    let stats = api.stats();
    assert_eq!(stats.by_state.values().sum::<u64>(), 1, "{stats:?}");
    let mut hive = hive;
    hive.queen.assert_running();
}
