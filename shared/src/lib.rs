//! Everything the queen, its drones and API clients must agree on, and nothing else:
//! identifiers, the drone protocol's messages and framing, and the HTTP API's JSON shapes.
//!
//! Both sides compile against these definitions, so a message cannot drift between them.
//! This crate never depends on the queen or the drone.

pub mod api;
pub mod frame;
pub mod ids;
pub mod protocol;

pub use ids::{DroneId, Fence, TaskId};
