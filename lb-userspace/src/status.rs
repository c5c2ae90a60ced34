//! A snapshot of what the controller knows, published for the admin endpoint.
//!
//! The run loop is the only writer: after every reconcile and on a timer it
//! replaces the snapshot whole. The admin endpoint only reads it, so serving
//! `/status` or `/metrics` never waits on, or touches, the datapath.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

/// Everything `/status` shows and `/metrics` exports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub instance: String,
    pub version: String,
    /// Seconds since the Unix epoch when this snapshot was taken.
    pub taken_at: u64,
    pub vips: Vec<VipStatus>,
    pub backends: Vec<BackendStatus>,
    /// No backend is healthy, so all configured ones serve (see `controller`).
    pub fail_open: bool,
    /// Every datapath counter, by `lb_common::COUNTER_NAMES`, summed over CPUs.
    pub counters: Vec<(String, u64)>,
    /// Config reloads: applied and refused.
    pub reloads_applied: u64,
    pub reloads_refused: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub address: SocketAddr,
    pub owned: bool,
    /// Its election, unless the VIP is static.
    #[serde(default)]
    pub election: Option<crate::election::ElectionState>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: SocketAddr,
    pub id: u32,
    pub weight: u32,
    pub healthy: bool,
    /// "ready", "not ready" (answers its probes but fails them: out of rotation,
    /// its connections kept) or "down" (its connections removed).
    pub health: String,
    /// Holds Maglev slots (healthy and weighted, or everyone while failing open).
    pub in_rotation: bool,
    /// Why the last probe succeeded or failed, e.g. "ok", "timeout", "http 500".
    pub last_probe: String,
    pub probe_latency_seconds: f64,
    pub probes: u64,
    pub transitions: u64,
    /// Failed probes by reason: `timeout`, `refused`, `tls`, `http_status`, `io`,
    /// and `passive` (times a passive failure took it out).
    pub failures: Vec<(String, u64)>,
    /// Failures the datapath saw on the wire, by kind: `rst`, `icmp`, `silent`
    /// (see `crate::passive`).
    pub passive_failures: Vec<(String, u64)>,
    /// The node's own connects sent to this backend (node-local mode).
    pub local_connects: u64,
    /// Both directions through this backend.
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// The shared, replace-whole snapshot.
pub type SharedSnapshot = Arc<RwLock<Snapshot>>;
