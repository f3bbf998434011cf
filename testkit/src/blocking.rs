//! The [`FakeDrone`](crate::drone::FakeDrone) for tests that run no async runtime of their
//! own (the cross-process scenarios): the same drone, driven from the test thread on one
//! background runtime every blocking fake drone of the test process shares.

use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use serde_json::Value;
use shared::protocol::{Assign, DroneMessage, Held, Hello, QueenMessage, Welcome};
use shared::{DroneId, Fence, TaskId};
use tokio::runtime::Runtime;

use crate::drone::{self, Closing, Heartbeats, Incoming};

/// The runtime the blocking fake drones' connections run on: two threads are plenty for
/// a few connections that mostly wait.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-drone")
            .enable_all()
            .build()
            .expect("the fake drones' runtime starts")
    })
}

/// A fake drone driven from a thread without a runtime. See [`crate::drone`].
#[derive(Debug)]
pub struct FakeDrone {
    pub id: DroneId,
    pub name: String,
    /// What the queen said in its welcome (all zero on a connection that sent no hello).
    pub welcome: Welcome,
    inner: Mutex<drone::FakeDrone>,
}

impl FakeDrone {
    /// Connects, says `hello`, waits for the welcome (panicking on anything else) and then
    /// heartbeats every `welcome.heartbeat_interval_ms` on its own, reporting what it
    /// holds: every task assigned to it until [`FakeDrone::release`]d.
    pub fn connect(addr: SocketAddr, hello: Hello) -> FakeDrone {
        let d = runtime().block_on(drone::FakeDrone::connect_with(
            addr,
            hello,
            Heartbeats::Automatic,
        ));
        FakeDrone::wrap(d)
    }

    /// A bare connection to the queen's drone port, nothing said yet: for raw bytes and
    /// frames, and reading everything the queen answers.
    pub fn open(addr: SocketAddr) -> FakeDrone {
        FakeDrone::wrap(runtime().block_on(drone::FakeDrone::open(addr)))
    }

    fn wrap(d: drone::FakeDrone) -> FakeDrone {
        FakeDrone {
            id: d.id,
            name: d.name.clone(),
            welcome: d.welcome.clone().unwrap_or(Welcome {
                protocol_version: 0,
                heartbeat_interval_ms: 0,
                heartbeat_timeout_ms: 0,
                epoch: None,
                pongs: None,
                encoding: None,
            }),
            inner: Mutex::new(d),
        }
    }

    fn inner(&self) -> MutexGuard<'_, drone::FakeDrone> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn send(&self, msg: &DroneMessage) -> io::Result<()> {
        runtime().block_on(self.inner().try_send(msg))
    }

    /// Sends raw bytes on the connection.
    pub fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        runtime().block_on(self.inner().send_bytes(bytes))
    }

    pub fn send_frame(&self, body: &[u8]) -> io::Result<()> {
        runtime().block_on(self.inner().send_frame(body))
    }

    /// Stops heartbeating: from now on the drone says nothing unless a test sends for it.
    pub fn go_silent(&self) {
        self.inner().go_silent();
    }

    pub fn resume_heartbeats(&self) {
        self.inner().resume_heartbeats();
    }

    /// The tasks heartbeats report.
    pub fn held(&self) -> Vec<Held> {
        self.inner().held()
    }

    /// Stops reporting `task` in heartbeats.
    pub fn release(&self, task: TaskId) {
        self.inner().release(task);
    }

    pub fn complete(&self, task: TaskId, fence: Fence, result: Value) {
        runtime().block_on(self.inner().complete(task, fence, result));
    }

    pub fn fail(&self, task: TaskId, fence: Fence, error: &str) {
        runtime().block_on(self.inner().fail(task, fence, error));
    }

    /// The next thing received within `within`.
    pub fn recv(&self, within: Duration) -> Option<Incoming> {
        runtime().block_on(self.inner().next_within(within))
    }

    /// The next frame as JSON, or `None` if the stream ended or nothing came within
    /// `within`.
    pub fn recv_json(&self, within: Duration) -> Option<Value> {
        match self.recv(within)? {
            Incoming::Msg(m) => Some(serde_json::to_value(&m).expect("queen messages serialize")),
            Incoming::Unknown { frame, error } => {
                Some(serde_json::from_slice(&frame).unwrap_or_else(|_| {
                    panic!(
                        "the queen sent a frame that is not JSON ({error}): {:?}",
                        String::from_utf8_lossy(&frame)
                    )
                }))
            }
            Incoming::Closed(_) => None,
        }
    }

    /// Waits for a message `pick` accepts, discarding others; panics (listing what it
    /// discarded) if none comes within `within` or the connection closes first.
    pub fn expect<T>(
        &self,
        within: Duration,
        what: &str,
        pick: impl FnMut(QueenMessage) -> Option<T>,
    ) -> T {
        runtime().block_on(self.inner().expect_within(within, what, pick))
    }

    /// Waits for an assign.
    pub fn expect_assign(&self, within: Duration) -> Assign {
        runtime().block_on(self.inner().expect_assign_within(within))
    }

    /// Waits for the queen to close the connection, returning what it sent before.
    pub fn expect_closed(&self, within: Duration) -> Vec<Incoming> {
        runtime().block_on(self.inner().expect_closed(within))
    }

    /// Reads frames until the queen closes the connection. Panics if it is still open
    /// after `within`.
    pub fn read_until_closed(&self, within: Duration) -> Closing {
        runtime().block_on(self.inner().read_until_closed(within))
    }

    /// Closes the connection (the drone "crashes" or its network drops).
    pub fn disconnect(self) {
        drop(self);
    }
}
