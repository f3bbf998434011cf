//! The core's only reads: a narrow trait, implemented by the sled reader and, in tests,
//! by an in-memory map. Every read returns a `Result`: the core treats a failed read as
//! it treats a failed write — the queen stops rather than decide on what it could not
//! see (a failed read is never "no such task").

use std::fmt::Debug;

use shared::TaskId;

use crate::store::{Expired, StoreError, StoreReader};
use crate::task::Task;

pub trait Lookup: Debug + Send + Sync {
    /// An active task's stored record (read back when it was demoted).
    fn active(&self, id: TaskId) -> Result<Option<Task>, StoreError>;
    /// A finished task's record.
    fn finished(&self, id: TaskId) -> Result<Option<Task>, StoreError>;
    /// The task an idempotency key points at, if it is still retained.
    fn idempotent(&self, key: &str) -> Result<Option<TaskId>, StoreError>;
    /// Up to `limit` finished tasks that finished before `cutoff_ms`, oldest first.
    fn expired(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Expired>, StoreError>;
}

impl Lookup for StoreReader {
    fn active(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        StoreReader::active(self, id)
    }

    fn finished(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        StoreReader::finished(self, id)
    }

    fn idempotent(&self, key: &str) -> Result<Option<TaskId>, StoreError> {
        StoreReader::idempotent(self, key)
    }

    fn expired(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Expired>, StoreError> {
        StoreReader::expired(self, cutoff_ms, limit)
    }
}
