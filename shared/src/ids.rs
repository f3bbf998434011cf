//! Newtype identifiers, so a task id can never be passed where a drone id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A task's identity: a UUIDv7, so ids sort by creation time (the store and the ready
/// queues rely on that for FIFO order among equal priorities).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// A fresh id that sorts after every id made before it by this process.
    pub fn generate() -> Self {
        TaskId(Uuid::now_v7())
    }

    /// The id as 16 big-endian bytes, which sort like the id itself (used as a store key).
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// Rebuilds an id from the bytes made by [`TaskId::to_bytes`].
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        TaskId(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TaskId)
    }
}

/// A drone's identity. A drone process picks one at start and keeps it across reconnects,
/// which is how the queen re-attaches that drone's leases after a connection drop or a
/// queen restart. A restarted drone process is a new drone: its children died with it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct DroneId(pub Uuid);

impl DroneId {
    pub fn generate() -> Self {
        DroneId(Uuid::new_v4())
    }
}

impl fmt::Display for DroneId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for DroneId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(DroneId)
    }
}

/// The lease fence: grows with every lease of one task and never repeats, across queen
/// restarts too (the grant is durable before the drone hears of it). An outcome is
/// recorded only when it carries the fence of the task's current lease.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct Fence(pub u64);

impl Fence {
    /// The fence a task has before its first lease.
    pub const ZERO: Fence = Fence(0);

    /// The fence of the next lease.
    pub fn next(self) -> Fence {
        Fence(self.0 + 1)
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A shared secret. Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// Compares in time that depends only on the lengths, not on where the first
    /// difference is, so a network peer cannot guess a token byte by byte.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
        for i in 0..a.len().max(b.len()) {
            let x = a.get(i).copied().unwrap_or(0);
            let y = b.get(i).copied().unwrap_or(0);
            diff |= x ^ y;
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_sort_by_creation_and_round_trip_through_bytes() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert!(a < b, "v7 ids made later must sort later");
        assert!(a.to_bytes() < b.to_bytes(), "byte keys must sort like ids");
        assert_eq!(TaskId::from_bytes(a.to_bytes()), a);
        assert_eq!(a.to_string().parse::<TaskId>().ok(), Some(a));
    }

    #[test]
    fn secret_matches_only_the_exact_value_and_never_prints_it() {
        let s = Secret("hunter2".into());
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!s.matches("hunter"));
        assert!(!s.matches("hunter22"));
        assert!(!s.matches(""));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
