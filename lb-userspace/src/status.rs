//! A snapshot of what the controller knows, published for the admin endpoint.
//!
//! The run loop is the only writer: after every input it handles (a health or
//! election event, a reload, its one-second tick) it assembles a snapshot
//! ([`Snapshot::take`]) and replaces the shared one whole. The
//! admin endpoint only reads it, so serving `/status` or `/metrics` never waits
//! on, or touches, the datapath.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::{COUNTER_COUNT, COUNTER_NAMES};
use serde::{Deserialize, Serialize};

use crate::{
    config::BackendSettings,
    controller::Desired,
    datapath::Datapath,
    election::ElectionState,
    health::{Health, Probes},
    passive::PassiveKind,
};

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
    /// Failed probes by reason: `timeout`, `refused`, `tls`, `http_status`, `io`
    /// (before the connection opened), `broken` (after).
    pub failures: Vec<(String, u64)>,
    /// The datapath's passive hints by outcome: `confirmed` by a failed probe,
    /// which took it out, or `refuted` by a passing one.
    pub passive_hints: Vec<(String, u64)>,
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

/// The node's VRRP refusals by reason, for both `/metrics` and the tables. Every
/// VRRP VIP's state carries them (its socket counts them for all), so they are read
/// from the first.
#[must_use]
pub fn vrrp_rejections(vips: &[VipStatus]) -> Option<BTreeMap<String, u64>> {
    vips.iter()
        .filter_map(|v| v.election.as_ref())
        .find(|e| e.mode == "vrrp")
        .map(|e| e.rejected.clone())
}

/// The shared, replace-whole snapshot.
pub type SharedSnapshot = Arc<RwLock<Snapshot>>;

/// A snapshot to share between the loop and the admin endpoint.
#[must_use]
pub fn shared() -> SharedSnapshot {
    Arc::new(RwLock::new(Snapshot::default()))
}

/// What a snapshot is taken from: the run loop's state, borrowed.
pub struct Sources<'a> {
    pub instance: &'a str,
    /// What the last reconcile wrote, if any did.
    pub desired: Option<&'a Desired>,
    pub dp: &'a Datapath,
    pub probes: &'a Probes,
    pub elections: Vec<(IpAddr, ElectionState)>,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
}

impl Snapshot {
    /// Assemble the current state: the controller's view joined with the
    /// datapath's counters. A counter that cannot be read shows as 0.
    #[must_use]
    pub fn take(s: &Sources<'_>) -> Self {
        let counters = s.dp.counters().map_or([0; COUNTER_COUNT as usize], |c| c.0);
        let vips = s
            .desired
            .map(|d| {
                d.vips
                    .iter()
                    .map(|(v, _)| {
                        let t = s.dp.vip_stats(v.id).unwrap_or_default();
                        VipStatus {
                            address: v.addr,
                            owned: v.owned,
                            election: s
                                .elections
                                .iter()
                                .find(|(a, _)| *a == v.addr.ip())
                                .map(|(_, e)| e.clone()),
                            packets: t.packets,
                            bytes: t.bytes,
                            new_flows: t.new_flows,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let backends = s
            .desired
            .map(|d| {
                d.backends
                    .iter()
                    .map(|(&id, b)| backend_status(s, d, id, b))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            instance: s.instance.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            taken_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            vips,
            backends,
            fail_open: s.desired.is_some_and(|d| d.fail_open),
            counters: COUNTER_NAMES
                .iter()
                .zip(counters)
                .map(|(n, v)| ((*n).to_owned(), v))
                .collect(),
            reloads_applied: s.reloads_applied,
            reloads_refused: s.reloads_refused,
        }
    }
}

/// One backend's row.
fn backend_status(
    s: &Sources<'_>,
    desired: &Desired,
    id: u32,
    backend: &BackendSettings,
) -> BackendStatus {
    let traffic = s.dp.backend_stats(id).unwrap_or_default();
    let passive = s.dp.passive_stats(id).unwrap_or_default();
    let last = s.probes.latest(backend.addr);
    let health = s
        .probes
        .health()
        .get(&backend.addr)
        .copied()
        .unwrap_or(Health::Down);
    BackendStatus {
        address: backend.addr,
        id,
        weight: backend.weight,
        healthy: health == Health::Ready,
        health: health.to_string(),
        in_rotation: desired.in_rotation.contains(&id),
        last_probe: last
            .as_ref()
            .map_or_else(|| "none yet".to_owned(), |e| e.reason.to_string()),
        probe_latency_seconds: last.as_ref().map_or(0.0, |e| e.latency.as_secs_f64()),
        probes: last.as_ref().map_or(0, |e| e.probes),
        transitions: last.as_ref().map_or(0, |e| e.transitions),
        failures: last.as_ref().map_or_else(Vec::new, |e| {
            let f = &e.failures;
            vec![
                ("timeout".to_owned(), f.timeout),
                ("refused".to_owned(), f.refused),
                ("tls".to_owned(), f.tls),
                ("http_status".to_owned(), f.http_status),
                ("io".to_owned(), f.io),
                ("broken".to_owned(), f.broken),
            ]
        }),
        passive_hints: last.as_ref().map_or_else(Vec::new, |e| {
            vec![
                ("confirmed".to_owned(), e.hints.confirmed),
                ("refuted".to_owned(), e.hints.refuted),
            ]
        }),
        passive_failures: [
            (PassiveKind::Rst, passive.rst),
            (PassiveKind::Icmp, passive.icmp),
            (PassiveKind::Silent, passive.silent),
        ]
        .into_iter()
        .map(|(k, n)| (k.label().to_owned(), n))
        .collect(),
        local_connects: s.dp.local_connects(id).unwrap_or_default(),
        packets: traffic.packets,
        bytes: traffic.bytes,
        new_flows: traffic.new_flows,
    }
}
