//! The admin endpoint: how operators, Prometheus and `apilb status` see into a
//! running apilb. Each side of it has a module of its own:
//!
//! - [`server`]: the HTTP server and its routes, `/healthz`, `/status` and
//!   `/metrics`, answered from the [`Snapshot`](crate::status::Snapshot) the run
//!   loop publishes;
//! - [`metrics`]: the snapshot in the `OpenMetrics` text format;
//! - [`client`]: `GET /status` from another process, for `apilb status`;
//! - [`table`]: the snapshot as the tables `apilb status` prints.
//!
//! The snapshot itself, the one thing they share, is [`crate::status`]'s.

use std::collections::BTreeMap;

use crate::status::VipStatus;

pub mod client;
pub mod metrics;
pub mod server;
pub mod table;

pub use server::{ServerError, bind, serve};

/// The server's error under the name the run loop knows it by.
pub type AdminError = ServerError;

/// The node's VRRP refusals by reason, for both `/metrics` and the tables. Every
/// VRRP VIP's state carries them (its socket counts them for all), so they are read
/// from the first.
fn vrrp_rejections(vips: &[VipStatus]) -> Option<BTreeMap<String, u64>> {
    vips.iter()
        .filter_map(|v| v.election.as_ref())
        .find(|e| e.mode == "vrrp")
        .map(|e| e.rejected.clone())
}
