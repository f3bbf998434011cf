//! Finished tasks whose outcome the queen has not yet acknowledged.
//!
//! An outcome leaves the outbox only on an `ack` for its task and fence (recorded or
//! stale: either way the queen has it). It survives any number of disconnects and is
//! sent again after every welcome, so a queen outage never loses a result (G6, docs/GUARANTEES.md).

use shared::frame::Encoding;
use shared::protocol::{DroneMessage, Held, TaskComplete, TaskFailed};

/// How a task attempt ended, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete(TaskComplete),
    Failed(TaskFailed),
}

impl Outcome {
    /// The task and fence this outcome is for.
    pub fn held(&self) -> Held {
        match self {
            Outcome::Complete(c) => Held {
                task_id: c.task_id,
                fence: c.fence,
            },
            Outcome::Failed(f) => Held {
                task_id: f.task_id,
                fence: f.fence,
            },
        }
    }

    pub fn to_message(&self) -> DroneMessage {
        match self {
            Outcome::Complete(c) => DroneMessage::TaskComplete(c.clone()),
            Outcome::Failed(f) => DroneMessage::TaskFailed(f.clone()),
        }
    }

    /// A failure outcome with no result.
    pub fn failed(held: Held, error: impl Into<String>, retryable: bool) -> Self {
        Outcome::Failed(TaskFailed {
            task_id: held.task_id,
            fence: held.fence,
            error: error.into(),
            result: None,
            retryable,
        })
    }

    /// The same outcome, or, when it would not fit in one frame, a permanent failure saying
    /// so. Without this an oversized outcome would fail to send, the drone would reconnect
    /// and send it again, forever.
    ///
    /// Measured in JSON and in each encoding in `also` (the ones the hello offers): the
    /// queen may answer in any of them, and one is not always smaller than the other
    /// (MessagePack writes `0.5` in 9 bytes, JSON in 3).
    pub fn fit_to_frame(self, max_frame_len: usize, also: &[Encoding]) -> Self {
        let message = self.to_message();
        let len = std::iter::once(Encoding::Json)
            .chain(also.iter().copied())
            .map(|e| match e.encode(&message) {
                Ok(body) => body.len(),
                // The encoders cannot fail on these types; if one ever did, the same
                // message would fail at send time too, so treat it as unsendable.
                Err(_) => usize::MAX,
            })
            .max()
            .unwrap_or(usize::MAX);
        if len <= max_frame_len {
            return self;
        }
        let size = if len == usize::MAX {
            "an unencodable size".to_owned()
        } else {
            format!("{len} bytes")
        };
        Outcome::failed(
            self.held(),
            format!(
                "the task's outcome ({size}) does not fit in a protocol frame \
                 (max_frame_len is {max_frame_len} bytes)"
            ),
            false,
        )
    }
}

/// The unacknowledged outcomes, oldest first, at most one per task and fence.
#[derive(Debug, Default)]
pub struct Outbox {
    entries: Vec<Outcome>,
}

impl Outbox {
    /// Adds an outcome. A second outcome for the same task and fence replaces the first
    /// (the queen records only one per lease anyway).
    pub fn push(&mut self, outcome: Outcome) {
        let held = outcome.held();
        match self.entries.iter_mut().find(|o| o.held() == held) {
            Some(slot) => *slot = outcome,
            None => self.entries.push(outcome),
        }
    }

    /// Removes the outcome the queen acknowledged; false when there was none (a late or
    /// repeated ack).
    pub fn ack(&mut self, held: Held) -> bool {
        let before = self.entries.len();
        self.entries.retain(|o| o.held() != held);
        self.entries.len() != before
    }

    pub fn contains(&self, held: Held) -> bool {
        self.entries.iter().any(|o| o.held() == held)
    }

    pub fn held(&self) -> impl Iterator<Item = Held> + '_ {
        self.entries.iter().map(Outcome::held)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Outcome> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shared::{Fence, TaskId};

    fn complete(task_id: TaskId, fence: u64) -> Outcome {
        Outcome::Complete(TaskComplete {
            task_id,
            fence: Fence(fence),
            result: json!({"n": fence}),
        })
    }

    #[test]
    fn an_ack_removes_only_the_outcome_with_that_fence() {
        let t = TaskId::generate();
        let mut outbox = Outbox::default();
        outbox.push(complete(t, 1));
        outbox.push(complete(t, 2));
        assert!(!outbox.ack(Held {
            task_id: t,
            fence: Fence(3)
        }));
        assert!(outbox.ack(Held {
            task_id: t,
            fence: Fence(1)
        }));
        assert_eq!(
            outbox.held().collect::<Vec<_>>(),
            vec![Held {
                task_id: t,
                fence: Fence(2)
            }]
        );
        // A repeated ack is harmless.
        assert!(!outbox.ack(Held {
            task_id: t,
            fence: Fence(1)
        }));
    }

    #[test]
    fn outcomes_keep_their_order_and_one_per_lease() {
        let (a, b) = (TaskId::generate(), TaskId::generate());
        let mut outbox = Outbox::default();
        outbox.push(complete(a, 1));
        outbox.push(complete(b, 1));
        outbox.push(Outcome::failed(
            Held {
                task_id: a,
                fence: Fence(1),
            },
            "x",
            true,
        ));
        assert_eq!(outbox.len(), 2);
        let ids: Vec<_> = outbox.held().map(|h| h.task_id).collect();
        assert_eq!(ids, vec![a, b]);
        assert!(matches!(outbox.iter().next(), Some(Outcome::Failed(_))));
    }

    #[test]
    fn an_outcome_too_big_for_a_frame_becomes_a_permanent_failure() {
        let t = TaskId::generate();
        let big = Outcome::Complete(TaskComplete {
            task_id: t,
            fence: Fence(4),
            result: json!("x".repeat(10_000)),
        });
        assert_eq!(big.clone().fit_to_frame(20_000, &[]), big);
        match big.fit_to_frame(5_000, &[Encoding::MessagePack]) {
            Outcome::Failed(f) => {
                assert_eq!((f.task_id, f.fence), (t, Fence(4)));
                assert!(!f.retryable, "retrying would produce the same outcome");
                assert!(f.error.contains("max_frame_len"), "{}", f.error);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
