//! The tools the test crates share, so there is one of each:
//!
//! - [`wait`]: the only way a test waits — poll a condition until it holds or a deadline
//!   passes, then fail naming what was awaited and what was last observed. Never a bare
//!   sleep as synchronization.
//! - [`drone`]: [`FakeDrone`], a drone played by the test over the real protocol (shared
//!   types, shared framing) on any stream (plain TCP, or TLS the test set up), one frame at a
//!   time or heartbeating on its own; it also sends raw bytes and frames for hostile tests.
//! - [`blocking`]: the same fake drone for tests without an async runtime of their own.
//!
//! Dev-only. It depends on the wire types (`shared`) and tokio, never on the queen or the
//! drone, so both can use it in their tests without a cycle.

pub mod blocking;
pub mod drone;
pub mod wait;

pub use drone::{hello, Closing, FakeDrone, Incoming, PATIENCE};
pub use wait::{poll_until, poll_until_async, wait_until, wait_until_async, Check, POLL};
