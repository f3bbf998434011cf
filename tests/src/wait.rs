//! The only way scenarios wait: [`hive_testkit::wait_until`], polling a condition until it
//! holds or a deadline passes, here with this harness's deadline. On timeout the panic names
//! what was awaited, the last thing observed, and the tail of every queen and drone log on
//! this thread (registered by [`crate::process`] as the failure context).

use std::time::Duration;

pub use hive_testkit::wait::{poll_until, wait_until, Check, POLL};

/// The default deadline for anything that should take well under a second when healthy.
pub const DEADLINE: Duration = Duration::from_secs(20);
