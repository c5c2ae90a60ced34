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

pub mod client;
pub mod metrics;
pub mod server;
pub mod table;

pub use server::{ServerError, bind, serve};
