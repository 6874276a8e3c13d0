//! Types and pure logic shared by every part of the Planetary Survival mesh.
//!
//! Nothing in this crate performs I/O, spawns threads or awaits: it is the
//! vocabulary the coordinator, the game servers and the tools agree on, and
//! the place where the geometric and temporal rules of the mesh are decided
//! once. The wire types of gRPC live in `proto`; conversions happen at the
//! edges of the crates that speak gRPC.

pub mod chunk;
mod codec;
pub mod component;
pub mod controller;
pub mod edit;
pub mod geom;
pub mod ids;
pub mod rate;
pub mod region;
pub mod rng;
pub mod snapshot;
pub mod terrain;
pub mod ticket;
pub mod time;
pub mod wire;

pub use geom::{Aabb, WorldPos};
pub use ids::{EntityId, Epoch, PlayerId, ServerId};
pub use region::{Contact, RegionKey, RegionTree};
pub use time::{TICK_HZ, Tick, TickClock};
