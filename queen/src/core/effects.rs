//! What a pass decided that must reach the disk before anyone hears of it: commits, each
//! with the continuation that answers once it is durable. The core never waits on the
//! writer while deciding; the loop hands the pass's commits over at its end.

use shared::protocol::QueenMessage;
use tokio::sync::oneshot;

use super::api::{Conn, CoreError};
use crate::store::{AfterCommit, Commit, CommitError, Mutation};

/// The commits of the current pass, in the order they were made.
#[derive(Debug, Default)]
pub struct Effects {
    outgoing: Vec<Commit>,
    /// Commits made so far (the writer numbers them alike, from 1).
    made: u64,
}

impl Effects {
    /// Queues mutations as one atomic commit; `after` runs once they are durable (commits
    /// become durable in the order they are made, so `after` may rely on every commit
    /// before it). Returns the commit's number.
    pub fn commit(&mut self, mutations: Vec<Mutation>, after: Option<AfterCommit>) -> u64 {
        self.outgoing.push(Commit { mutations, after });
        self.made += 1;
        self.made
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
    /// durable; never if they are not (the next queen decides again from the disk).
    pub fn send_when_durable(&mut self, mutations: Vec<Mutation>, conn: &Conn, msg: QueenMessage) {
        let conn = conn.clone();
        self.commit(
            mutations,
            Some(Box::new(move |r: Result<(), CommitError>| {
                if r.is_ok() {
                    conn.send(msg);
                }
            })),
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
