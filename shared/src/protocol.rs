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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    /// How often the drone must send something (a heartbeat when idle).
    pub heartbeat_interval_ms: u64,
    /// Silence longer than this loses the drone its leases.
    pub heartbeat_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub reason: String,
    /// The protocol versions the queen speaks, so a drone can say what to upgrade.
    pub supported_versions: Vec<u32>,
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
