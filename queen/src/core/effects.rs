//! What a pass decided that must reach the disk before anyone hears of it: commits, each
//! with the continuation that answers once it is durable. The core never waits on the
//! writer while deciding; the loop hands the pass's commits over at its end.

use shared::protocol::QueenMessage;
use shared::TaskId;
use tokio::sync::{broadcast, oneshot};

use super::api::{Conn, CoreError};
use crate::store::{AfterCommit, Commit, CommitError, Mutation};

/// The commits of the current pass, in the order they were made.
#[derive(Debug, Default)]
pub struct Effects {
    outgoing: Vec<Commit>,
    /// Commits made so far (the writer numbers them alike, from 1).
    made: u64,
    /// Told the id of every task whose terminal state became durable (for clients waiting
    /// on a task: `GET /v1/tasks/{id}?wait_ms=`). Dropped with the core, which ends every
    /// wait.
    ended: Option<broadcast::Sender<TaskId>>,
}

/// Task ends buffered for slow waiters; one that falls further behind reads its task again.
pub const ENDED_BUFFER: usize = 4_096;

impl Effects {
    /// Queues mutations as one atomic commit; `after` runs once they are durable (commits
    /// become durable in the order they are made, so `after` may rely on every commit
    /// before it being durable, not on its continuation having run: see
    /// [`Commit::first`]). Returns the commit's number.
    pub fn commit(&mut self, mutations: Vec<Mutation>, after: Option<AfterCommit>) -> u64 {
        self.push(mutations, after, false)
    }

    fn push(&mut self, mutations: Vec<Mutation>, after: Option<AfterCommit>, first: bool) -> u64 {
        let after = match &self.ended {
            Some(tx) => announce_ends(tx, &mutations, after),
            None => after,
        };
        self.outgoing.push(Commit {
            mutations,
            after,
            first,
        });
        self.made += 1;
        self.made
    }

    /// Announces, on `tx`, every task a commit finishes once it is durable.
    pub fn announce_ends_on(&mut self, tx: broadcast::Sender<TaskId>) {
        self.ended = Some(tx);
    }

    /// Queues mutations nobody waits for.
    pub fn write(&mut self, mutations: Vec<Mutation>) -> u64 {
        self.commit(mutations, None)
    }

    /// Answers a client once `mutations`, and everything decided before them, are
    /// durable: with `answer` then, or with why the write was not.
    pub fn reply_when_durable<T: Send + 'static>(
        &mut self,
        mutations: Vec<Mutation>,
        reply: oneshot::Sender<Result<T, CoreError>>,
        answer: Result<T, CoreError>,
    ) -> u64 {
        self.commit(
            mutations,
            Some(Box::new(move |r: Result<(), CommitError>| {
                let _ = reply.send(r.map_err(CoreError::from).and(answer));
            })),
        )
    }

    /// Sends `msg` to a drone once `mutations`, and everything decided before them, are
    /// durable; never if they are not (the next queen decides again from the disk). It
    /// goes out before the answers to clients that the same sync makes durable
    /// ([`Commit::first`]): a drone's work starts sooner, a client's answer waits a write.
    pub fn send_when_durable(&mut self, mutations: Vec<Mutation>, conn: &Conn, msg: QueenMessage) {
        let conn = conn.clone();
        self.push(
            mutations,
            Some(Box::new(move |r: Result<(), CommitError>| {
                if r.is_ok() {
                    conn.send(msg);
                }
            })),
            true,
        );
    }

    /// Commits made so far.
    pub fn made(&self) -> u64 {
        self.made
    }

    /// The pass's commits, for the writer.
    pub fn take(&mut self) -> Vec<Commit> {
        std::mem::take(&mut self.outgoing)
    }
}

/// `after`, plus: once the commit is durable, the ids of the tasks it finished go to `tx`.
fn announce_ends(
    tx: &broadcast::Sender<TaskId>,
    mutations: &[Mutation],
    after: Option<AfterCommit>,
) -> Option<AfterCommit> {
    let ended: Vec<TaskId> = mutations
        .iter()
        .filter_map(|m| match m {
            Mutation::Finish { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    if ended.is_empty() {
        return after;
    }
    let tx = tx.clone();
    Some(Box::new(move |r: Result<(), CommitError>| {
        if r.is_ok() {
            for id in ended {
                // No waiter is fine.
                let _ = tx.send(id);
            }
        }
        if let Some(after) = after {
            after(r);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// What the store runs first: messages to drones, never a client's answer or a write
    /// nobody waits for.
    #[test]
    fn messages_to_drones_are_marked_to_go_before_answers() {
        let mut fx = Effects::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let conn = Conn {
            id: 1,
            tx,
            close: CancellationToken::new(),
        };
        let (reply, _answer) = oneshot::channel::<Result<(), CoreError>>();
        fx.reply_when_durable(Vec::new(), reply, Ok(()));
        fx.send_when_durable(Vec::new(), &conn, QueenMessage::Pong);
        fx.write(Vec::new());
        let first: Vec<bool> = fx.take().iter().map(|c| c.first).collect();
        assert_eq!(first, [false, true, false]);
    }
}
