//! Tests of the core. `recovery` runs on a real store; `rooms` and `model` drive the core
//! through [`harness::Hive`]: no sled, no sockets, no sleeps — the test owns the clocks,
//! decides when commits become durable, and reads what drones were sent.

mod harness;
mod model;
mod recovery;
mod rooms;
