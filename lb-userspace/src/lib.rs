//! apilb's userspace: everything the `apilb` binary does, as a library so that the
//! tests and benchmarks drive the very same code.

pub mod admin;
pub mod announce;
pub mod capacity;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod discovery;
pub mod election;
pub mod events;
#[cfg(feature = "bench")]
pub mod floor;
pub mod health;
pub mod kernel;
pub mod loader;
pub mod maglev;
pub mod manifest;
pub mod ownership;
pub mod passive;
pub mod privilege;
pub mod reaper;
pub mod socklb;
pub mod status;
pub mod sync;
