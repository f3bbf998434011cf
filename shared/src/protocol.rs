//! The drone ↔ queen protocol: one JSON object per frame, its kind in a `"type"` field.
//!
//! A drone opens with [`Hello`]; the queen answers [`Welcome`] or [`Reject`]. After that
//! the queen sends [`Assign`], [`CancelTask`] and [`Ack`]; the drone sends heartbeats and
//! outcomes. Every drone message counts as a heartbeat.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{DroneId, Fence, Secret, TaskId};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every protocol version this build's queen accepts in a hello.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// The most slots a drone may announce in its hello. The queen keeps per-slot state for
/// every drone, so one hello must not be able to ask for an unbounded amount; 10,000 is far
/// beyond what one host runs at once. The drone checks its own config against it at start,
/// so a typo fails there with a clear message instead of as a reject on every reconnect.
pub const MAX_SLOTS: u32 = 10_000;

/// The longest name both sides must agree on, in bytes: a drone's name, and every queue
/// name, label and kind. They are map keys and log fields, not documents.
pub const MAX_NAME_LEN: usize = 128;

/// A message from a drone to the queen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DroneMessage {
    Hello(Hello),
    Heartbeat(Heartbeat),
    TaskComplete(TaskComplete),
    TaskFailed(TaskFailed),
    /// The drone is shutting down gracefully: lease it nothing more; its running tasks
    /// will still report.
    Drain,
}

/// A message from the queen to a drone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum QueenMessage {
    Welcome(Welcome),
    Reject(Reject),
    Assign(Assign),
    Cancel(CancelTask),
    Ack(Ack),
    /// The answer to a heartbeat, sent only to a drone whose hello asked for it (`pongs`):
    /// a sign of life. A queen that is frozen sends none, though its kernel still accepts
    /// the drone's bytes.
    Pong,
    /// The drone sent something the queen could not accept; the connection closes after it.
    Error {
        message: String,
    },
}

/// A task the drone holds: still running, or finished with its outcome not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Held {
    pub task_id: TaskId,
    pub fence: Fence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Stable for the drone process's lifetime, across reconnects.
    pub drone_id: DroneId,
    pub name: String,
    /// A task with labels goes only to drones that have all of them.
    #[serde(default)]
    pub labels: Vec<String>,
    /// How many tasks the drone runs at once; the queen never leases more.
    pub slots: u32,
    /// The task kinds this drone can run.
    pub kinds: Vec<String>,
    #[serde(default)]
    pub token: Option<Secret>,
    /// Tasks the drone still holds from before this connection, with their fences, so the
    /// queen can re-attach their leases instead of running them again.
    #[serde(default)]
    pub held: Vec<Held>,
    /// The drone is draining: it reconnects only to deliver outcomes.
    #[serde(default)]
    pub draining: bool,
    /// The drone asks the queen to answer each heartbeat with a [`QueenMessage::Pong`], so
    /// it can tell a queen that stopped (frozen, its host paused) from one with nothing
    /// to say. Absent (false) from drones before this field; queens before it ignore it
    /// and say so by leaving `pongs` out of their welcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pongs: bool,
    /// The drone's worker pools as they are at connect (heartbeats keep them current);
    /// absent from drones without pools and from drones before this field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    /// Encodings besides JSON the drone can speak after the handshake, most wanted first
    /// (`"msgpack"`: [`crate::frame::Encoding`]). Absent: JSON. A queen picks one it
    /// knows, or none, and says which in its welcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encodings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    /// How often the drone must send something (a heartbeat when idle).
    pub heartbeat_interval_ms: u64,
    /// Silence longer than this loses the drone its leases.
    pub heartbeat_timeout_ms: u64,
    /// The leader's term when the queen shares a database with standbys (HA on
    /// PostgreSQL): it grows with every failover. A drone that has been welcomed in a term
    /// ignores a queen that welcomes it with an older one (a deposed leader that woke up).
    /// Absent from a single queen and from queens before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// `Some(true)`: this queen answers every heartbeat on this connection with a
    /// [`QueenMessage::Pong`] (the hello asked for it), so a connection on which nothing
    /// arrives for `heartbeat_timeout_ms` is dead. Absent from queens before this field
    /// and when the hello did not ask: the drone must not judge the queen's silence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pongs: Option<bool>,
    /// The encoding both sides use after this welcome, one the hello offered. Absent
    /// (from queens before this field too): JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    /// For the operator: what was wrong, in words. Drones must not parse it; see `code`.
    pub reason: String,
    /// The protocol versions the queen speaks, so a drone can say what to upgrade.
    pub supported_versions: Vec<u32>,
    /// Why, for the drone to act on. Optional on the wire in both directions: queens
    /// before this field send none, and drones before it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<RejectCode>,
    /// With [`RejectCode::NotLeader`]: the leader's drone address (`HOST:PORT`) when the
    /// standby knows it, so the drone tries it next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// Why a queen rejected a hello, as a drone can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The hello's `protocol_version` is not in the queen's `supported_versions`.
    UnsupportedVersion,
    /// The queen wants a drone token and the hello had none, or the wrong one.
    Unauthorized,
    /// The hello itself is out of bounds (slots, name): the same hello will be refused again.
    BadHello,
    /// This queen is a standby (HA): it leads nothing. Try the `leader` named in the
    /// reject, or the drone's other queen addresses.
    NotLeader,
    /// A code this build does not know (from a newer queen). Receive-side only: a queen
    /// never sends it.
    #[serde(other)]
    Unknown,
}

/// A hello the queen refuses, and why: the code for the drone, the reason for the
/// operator. The texts are the ones queens have always sent; tests and operators' log
/// searches depend on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RejectCode,
    pub reason: String,
}

impl Refusal {
    /// The `reject` message that tells a drone about this refusal.
    pub fn to_reject(&self) -> Reject {
        Reject {
            reason: self.reason.clone(),
            supported_versions: SUPPORTED_VERSIONS.to_vec(),
            code: Some(self.code),
            leader: None,
        }
    }
}

/// Whether a hello is one the queen can take, checked in the order queens always have:
/// protocol version, then the token (`expected`, when the queen has one; compared in
/// constant time), then the hello's shape. Pure, so both the queen's edge and tests use it.
pub fn check_hello(hello: &Hello, expected: Option<&Secret>) -> Result<(), Refusal> {
    if !SUPPORTED_VERSIONS.contains(&hello.protocol_version) {
        return Err(Refusal {
            code: RejectCode::UnsupportedVersion,
            reason: format!(
                "protocol version {} is not supported; this queen speaks {:?}",
                hello.protocol_version, SUPPORTED_VERSIONS
            ),
        });
    }
    if let Some(token) = expected {
        let ok = hello.token.as_ref().is_some_and(|t| token.matches(&t.0));
        if !ok {
            return Err(Refusal {
                code: RejectCode::Unauthorized,
                reason: "invalid or missing auth token".to_owned(),
            });
        }
    }
    check_hello_shape(hello)
}

/// Whether a hello's announced shape is within the limits both sides agree on: 1 to
/// [`MAX_SLOTS`] slots, a name of 1 to [`MAX_NAME_LEN`] bytes.
pub fn check_hello_shape(hello: &Hello) -> Result<(), Refusal> {
    if hello.slots == 0 || hello.slots > MAX_SLOTS {
        return Err(Refusal {
            code: RejectCode::BadHello,
            reason: format!(
                "slots must be between 1 and {MAX_SLOTS}, got {}",
                hello.slots
            ),
        });
    }
    if hello.name.is_empty() || hello.name.len() > MAX_NAME_LEN {
        return Err(Refusal {
            code: RejectCode::BadHello,
            reason: format!("name must be 1-{MAX_NAME_LEN} bytes"),
        });
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Every task the drone holds, running or awaiting an ack. A lease the queen granted
    /// that is missing here (and that the drone has seen, see `assigns_seen`) is requeued.
    pub held: Vec<Held>,
    /// How many `assign` messages the drone has received on this connection. An assign
    /// still in flight when the heartbeat was sent is not yet expected in `held`.
    pub assigns_seen: u64,
    /// New checkpoints of running tasks since the last heartbeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<Checkpoint>,
    /// The drone's worker pools, as they are now (absent from drones without pools and
    /// from drones before this field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
}

/// One worker pool of a drone (docs/POOLS.md), as its heartbeats report it: shown in
/// `GET /v1/drones` and the `hive_pool_*` metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub name: String,
    /// The kinds its processes handle.
    pub kinds: Vec<String>,
    /// How many processes it is configured to keep.
    pub processes: u32,
    /// Processes that said `ready` and are alive now.
    pub ready: u32,
    /// Of those, the ones running a task.
    pub busy: u32,
    /// Processes started again since the drone started, after one exited or was killed
    /// for any reason but recycling (`max_tasks`, `max_memory_mib`).
    pub restarts: u64,
    /// The last reason a process of the pool failed to start or died, while processes
    /// keep failing (cleared once one completes a task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<String>,
}

/// A running task's checkpoint: small JSON it wrote to resume from (for `exec`, the content
/// of `$HIVE_CHECKPOINT_FILE`). A number in its `progress` field is shown as progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub task_id: TaskId,
    pub fence: Fence,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    pub task_id: TaskId,
    pub fence: Fence,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub kind: String,
    pub queue: String,
    pub payload: Value,
    /// The drone kills the attempt past this.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The last checkpoint an earlier attempt reported, to resume from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelTask {
    pub task_id: TaskId,
    pub fence: Fence,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskComplete {
    pub task_id: TaskId,
    pub fence: Fence,
    #[serde(default)]
    pub result: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub task_id: TaskId,
    pub fence: Fence,
    pub error: String,
    /// What the attempt produced before failing (e.g. an exec's exit code and output).
    #[serde(default)]
    pub result: Option<Value>,
    /// False when retrying cannot help; the task then fails without further attempts.
    #[serde(default = "yes")]
    pub retryable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// The outcome is durable and is the task's outcome.
    Recorded,
    /// The fence was not the current lease's (or the task already ended): nothing changed.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub task_id: TaskId,
    pub fence: Fence,
    pub status: AckStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_type_in_a_type_field() {
        let m = DroneMessage::Drain;
        assert_eq!(
            serde_json::to_string(&m).ok().as_deref(),
            Some(r#"{"type":"drain"}"#)
        );
        let ack = QueenMessage::Ack(Ack {
            task_id: TaskId::generate(),
            fence: Fence(3),
            status: AckStatus::Stale,
        });
        let v = serde_json::to_value(&ack).unwrap_or_default();
        assert_eq!(v["type"], "ack");
        assert_eq!(v["status"], "stale");
        assert_eq!(v["fence"], 3);
    }

    #[test]
    fn an_unknown_message_type_is_an_error_naming_it() {
        let err = serde_json::from_str::<DroneMessage>(r#"{"type":"launch_missiles"}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("launch_missiles"), "{err}");
    }

    fn reject_from(json: &str) -> Reject {
        match serde_json::from_str::<QueenMessage>(json) {
            Ok(QueenMessage::Reject(r)) => r,
            other => panic!("not a reject: {other:?}"),
        }
    }

    #[test]
    fn a_reject_from_an_older_queen_has_no_code_and_still_parses() {
        let r = reject_from(r#"{"type":"reject","reason":"no","supported_versions":[1]}"#);
        assert_eq!(r.code, None);
        assert_eq!(r.reason, "no");
        // And a codeless reject is written without the field, as older queens wrote it.
        let v = serde_json::to_value(QueenMessage::Reject(r)).unwrap_or_default();
        assert!(v.get("code").is_none(), "{v}");
    }

    #[test]
    fn reject_codes_round_trip_in_snake_case() {
        for (code, text) in [
            (RejectCode::UnsupportedVersion, "unsupported_version"),
            (RejectCode::Unauthorized, "unauthorized"),
            (RejectCode::BadHello, "bad_hello"),
            (RejectCode::NotLeader, "not_leader"),
        ] {
            let sent = QueenMessage::Reject(Reject {
                reason: "r".into(),
                supported_versions: vec![1],
                code: Some(code),
                leader: (code == RejectCode::NotLeader).then(|| "127.0.0.1:7001".into()),
            });
            let v = serde_json::to_value(&sent).unwrap_or_default();
            assert_eq!(v["code"], text);
            let back = serde_json::from_value::<QueenMessage>(v).ok();
            assert_eq!(back, Some(sent));
        }
    }

    #[test]
    fn a_code_from_a_newer_queen_parses_as_unknown() {
        let r = reject_from(
            r#"{"type":"reject","reason":"later","supported_versions":[1],"code":"queen_on_fire"}"#,
        );
        assert_eq!(r.code, Some(RejectCode::Unknown));
    }

    fn good_hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            drone_id: DroneId::generate(),
            name: "d".into(),
            labels: vec![],
            slots: 1,
            kinds: vec!["echo".into()],
            token: None,
            held: vec![],
            draining: false,
            pongs: false,
            pools: Vec::new(),
            encodings: Vec::new(),
        }
    }

    fn refusal(hello: &Hello, token: Option<&Secret>) -> Option<(RejectCode, String)> {
        check_hello(hello, token).err().map(|r| (r.code, r.reason))
    }

    #[test]
    fn the_hello_check_refuses_with_the_code_and_the_queens_wording() {
        assert_eq!(refusal(&good_hello(), None), None);
        let edges = [
            (1, "d".to_owned(), None),
            (MAX_SLOTS, "n".repeat(MAX_NAME_LEN), None),
            (
                0,
                "d".to_owned(),
                Some("slots must be between 1 and 10000, got 0"),
            ),
            (
                MAX_SLOTS + 1,
                "d".to_owned(),
                Some("slots must be between 1 and 10000, got 10001"),
            ),
            (1, String::new(), Some("name must be 1-128 bytes")),
            (
                1,
                "n".repeat(MAX_NAME_LEN + 1),
                Some("name must be 1-128 bytes"),
            ),
        ];
        for (slots, name, want) in edges {
            let h = Hello {
                slots,
                name,
                ..good_hello()
            };
            let want = want.map(|w| (RejectCode::BadHello, w.to_owned()));
            assert_eq!(refusal(&h, None), want, "slots {slots}");
            assert_eq!(
                check_hello_shape(&h).err().map(|r| (r.code, r.reason)),
                want
            );
        }

        let old = Hello {
            protocol_version: 99,
            ..good_hello()
        };
        assert_eq!(
            refusal(&old, None),
            Some((
                RejectCode::UnsupportedVersion,
                "protocol version 99 is not supported; this queen speaks [1]".to_owned()
            ))
        );

        let secret = Secret("s3cret".into());
        let unauthorized = Some((
            RejectCode::Unauthorized,
            "invalid or missing auth token".to_owned(),
        ));
        assert_eq!(refusal(&good_hello(), Some(&secret)), unauthorized);
        let wrong = Hello {
            token: Some(Secret("s3cre".into())),
            ..good_hello()
        };
        assert_eq!(refusal(&wrong, Some(&secret)), unauthorized);
        let right = Hello {
            token: Some(secret.clone()),
            ..good_hello()
        };
        assert_eq!(refusal(&right, Some(&secret)), None);

        // The order queens have always checked in: version, then token, then shape.
        let everything_wrong = Hello {
            protocol_version: 99,
            slots: 0,
            ..good_hello()
        };
        assert_eq!(
            refusal(&everything_wrong, Some(&secret)).map(|r| r.0),
            Some(RejectCode::UnsupportedVersion)
        );
        let bad_token_and_shape = Hello {
            slots: 0,
            ..good_hello()
        };
        assert_eq!(
            refusal(&bad_token_and_shape, Some(&secret)).map(|r| r.0),
            Some(RejectCode::Unauthorized)
        );
        let r = check_hello(&old, None).err().map(|r| r.to_reject());
        assert_eq!(
            r.as_ref().map(|r| r.supported_versions.clone()),
            Some(SUPPORTED_VERSIONS.to_vec())
        );
        assert_eq!(r.and_then(|r| r.code), Some(RejectCode::UnsupportedVersion));
    }

    #[test]
    fn pongs_are_optional_on_the_wire_both_ways() {
        // A hello and a welcome from before pongs parse, and say no.
        let mut hello = serde_json::to_value(DroneMessage::Hello(good_hello())).unwrap_or_default();
        assert!(hello.get("pongs").is_none(), "{hello}");
        let parsed = serde_json::from_value::<DroneMessage>(hello.clone()).ok();
        assert!(matches!(parsed, Some(DroneMessage::Hello(h)) if !h.pongs));
        hello["pongs"] = true.into();
        let parsed = serde_json::from_value::<DroneMessage>(hello).ok();
        assert!(matches!(parsed, Some(DroneMessage::Hello(h)) if h.pongs));

        let old = r#"{"type":"welcome","protocol_version":1,"heartbeat_interval_ms":5,"heartbeat_timeout_ms":15}"#;
        match serde_json::from_str::<QueenMessage>(old) {
            Ok(QueenMessage::Welcome(w)) => assert_eq!(w.pongs, None),
            other => panic!("not a welcome: {other:?}"),
        }
        assert_eq!(
            serde_json::to_string(&QueenMessage::Pong).ok().as_deref(),
            Some(r#"{"type":"pong"}"#)
        );
        assert_eq!(
            serde_json::from_str::<QueenMessage>(r#"{"type":"pong"}"#).ok(),
            Some(QueenMessage::Pong)
        );
    }

    #[test]
    fn task_failed_is_retryable_unless_said_otherwise() {
        let id = TaskId::generate();
        let raw = format!(r#"{{"type":"task_failed","task_id":"{id}","fence":1,"error":"x"}}"#);
        match serde_json::from_str::<DroneMessage>(&raw) {
            Ok(DroneMessage::TaskFailed(f)) => assert!(f.retryable),
            other => panic!("unexpected {other:?}"),
        }
    }
}
