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
    discovery::{DiscoveryStatus, Member, Source, Stage},
    election::ElectionState,
    health::{Health, Probes},
    passive::PassiveKind,
    sync::{
        install::InstallReject,
        links::{FaultCounts, LinkStatus, LinksStatus, Traffic},
    },
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
    /// Flow sync; `None` while it is off. [`Snapshot::take`] leaves it so: the
    /// daemon sets it from the sync thread's [`SyncSnapshot::from_links`].
    #[serde(default)]
    pub sync: Option<SyncSnapshot>,
    /// Discovery (`[discovery]`); `None` while it is off.
    #[serde(default)]
    pub discovery: Option<DiscoveryStatus>,
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
    /// `static` (the `[[backend]]` list) or `discovered` (the `EndpointSlice` alone).
    #[serde(default = "static_source")]
    pub source: String,
    /// `member`, `joining` (discovered, not yet seen ready: no slots) or
    /// `leaving` (no longer in the slice: draining for `discovery.hold`).
    #[serde(default = "member_stage")]
    pub membership: String,
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

fn static_source() -> String {
    Source::Static.label().to_owned()
}

fn member_stage() -> String {
    Stage::Member.label().to_owned()
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
    /// Discovery's members (empty without discovery: every backend is static).
    pub members: Vec<Member>,
    pub discovery: Option<DiscoveryStatus>,
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
            sync: None,
            discovery: s.discovery.clone(),
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
    let member = s.members.iter().find(|m| m.settings.addr == backend.addr);
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
        source: member
            .map_or(Source::Static, |m| m.source)
            .label()
            .to_owned(),
        membership: member.map_or(Stage::Member, |m| m.stage).label().to_owned(),
        healthy: health == Health::Ready,
        health: health.to_string(),
        in_rotation: desired.in_rotation.contains(&id),
        last_probe: last
            .as_ref()
            .map_or_else(|| "none yet".to_owned(), |e| e.reason.to_string()),
        probe_latency_seconds: last.as_ref().map_or(0.0, |e| e.latency.as_secs_f64()),
        probes: last.as_ref().map_or(0, |e| e.probes),
        transitions: last.as_ref().map_or(0, |e| e.transitions),
        // Every reason and outcome from the first snapshot on, at 0 before the
        // first probe, so that an alert on their increase sees the first one.
        failures: {
            let f = last.as_ref().map(|e| e.failures).unwrap_or_default();
            vec![
                ("timeout".to_owned(), f.timeout),
                ("refused".to_owned(), f.refused),
                ("tls".to_owned(), f.tls),
                ("http_status".to_owned(), f.http_status),
                ("io".to_owned(), f.io),
                ("broken".to_owned(), f.broken),
            ]
        },
        passive_hints: {
            let h = last.as_ref().map(|e| e.hints).unwrap_or_default();
            vec![
                ("confirmed".to_owned(), h.confirmed),
                ("refuted".to_owned(), h.refuted),
            ]
        },
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

/// Flow sync with every peer, for `/status` and `/metrics`: the links' own status
/// ([`LinksStatus`]) and what the sync thread counts around them
/// ([`SyncCounters`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncSnapshot {
    /// In config order.
    pub peers: Vec<SyncPeerStatus>,
    /// Faults no peer can be blamed for (connections from addresses that are no
    /// peer's, handshakes that proved no name), by reason, every link fault listed.
    pub unattributed: Vec<(String, u64)>,
    /// Flow events lost before they reached the links: the datapath's ring was
    /// full (its `sync_event_lost` counter, as the sync thread last read it), or
    /// the sync thread could not use them. Each calls for a resync, which repairs
    /// what the peers missed.
    pub events_lost: u64,
    /// Peers' flows parked here and removed as over: the peer stopped speaking of
    /// them for longer than their state's timeout and a resync interval.
    #[serde(default)]
    pub flows_swept: u64,
}

/// One sync peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncPeerStatus {
    pub name: String,
    pub address: SocketAddr,
    /// The connection this node dials: its flows out, the peer's ACKs in.
    pub export: SyncLinkStatus,
    /// The connection the peer dials: its flows in, this node's ACKs out.
    pub import: SyncLinkStatus,
    /// An export to the peer was dropped (its queue was full): it is owed a bulk.
    pub needs_resync: bool,
    /// Frames, records and sessions refused, by reason: every fault of the links
    /// (`sync::links::Fault`), zeros included, then the installer's reasons for the
    /// records it refused; a reason both count (`bad_record`) is their sum.
    pub rejected: Vec<(String, u64)>,
    /// The peer's flows written to this node's flow tables.
    pub flows_installed: u64,
    /// Bulks of the peer's flows this node took in, and of its own it sent.
    pub bulks_received: BulkStats,
    pub bulks_sent: BulkStats,
}

/// One of the two connections with a sync peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncLinkStatus {
    /// `connecting`, `handshake`, `up` or `down` (`sync::links::LinkState`).
    pub state: String,
    /// Sessions that came up.
    pub sessions: u64,
    /// How long the oldest message sent and not yet acknowledged has waited.
    pub lag_seconds: f64,
    /// Messages waiting to be sent.
    pub queued: u64,
    pub sent: SyncTraffic,
    pub received: SyncTraffic,
    /// Why the last session or attempt ended, until the next session is up.
    pub last_error: Option<String>,
}

/// Frames, bytes (as on the wire) and flow records, one way on one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncTraffic {
    pub frames: u64,
    pub bytes: u64,
    pub records: u64,
}

/// Bulk resyncs one way with one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkStats {
    /// Bulks finished: their `BULK_END` sent, or received.
    pub count: u64,
    /// The last one's duration, from its request to its `BULK_END`; 0 before the
    /// first.
    pub last_seconds: f64,
    /// The records the last one carried.
    pub last_records: u64,
}

/// What the sync thread counts beyond the links: the node's lost events, and per
/// peer the flows installed, the records the installer refused and the bulks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncCounters {
    /// [`SyncSnapshot::events_lost`].
    pub events_lost: u64,
    /// [`SyncSnapshot::flows_swept`].
    pub flows_swept: u64,
    /// By peer name; a peer the links do not know is left out.
    pub peers: Vec<PeerSyncCounters>,
}

/// [`SyncCounters`] of one peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerSyncCounters {
    pub peer: String,
    pub flows_installed: u64,
    /// Records the installer refused, by reason (`unknown_vip`, `foreign_snat`,
    /// ...). List every reason, zeros included, so that each series exists from the
    /// start.
    pub rejected: Vec<(&'static str, u64)>,
    pub bulks_received: BulkStats,
    pub bulks_sent: BulkStats,
}

impl SyncSnapshot {
    /// The links' status joined with the sync thread's counters, peer by peer.
    #[must_use]
    pub fn from_links(links: &LinksStatus, extra: SyncCounters) -> SyncSnapshot {
        let mut extra_peers = extra.peers;
        let peers = links
            .peers
            .iter()
            .map(|p| {
                let counters = extra_peers
                    .iter()
                    .position(|c| *c.peer == *p.name)
                    .map(|i| extra_peers.swap_remove(i))
                    .unwrap_or_default();
                // Every link fault and install refusal, zeros included.
                let mut rejected = by_fault(&p.faults);
                for r in InstallReject::ALL.map(InstallReject::as_str) {
                    if !rejected.iter().any(|(f, _)| f == r) {
                        rejected.push((r.to_owned(), 0));
                    }
                }
                for (reason, n) in counters.rejected {
                    match rejected.iter_mut().find(|(r, _)| r == reason) {
                        Some((_, total)) => *total += n,
                        None => rejected.push((reason.to_owned(), n)),
                    }
                }
                SyncPeerStatus {
                    name: p.name.to_string(),
                    address: p.addr,
                    export: SyncLinkStatus::from(&p.export),
                    import: SyncLinkStatus::from(&p.import),
                    needs_resync: p.needs_resync,
                    rejected,
                    flows_installed: counters.flows_installed,
                    bulks_received: counters.bulks_received,
                    bulks_sent: counters.bulks_sent,
                }
            })
            .collect();
        SyncSnapshot {
            peers,
            unattributed: by_fault(&links.unattributed),
            events_lost: extra.events_lost,
            flows_swept: extra.flows_swept,
        }
    }
}

/// Every fault's label with its count, zeros included.
fn by_fault(faults: &FaultCounts) -> Vec<(String, u64)> {
    faults
        .iter()
        .map(|(fault, n)| (fault.as_str().to_owned(), n))
        .collect()
}

impl From<&LinkStatus> for SyncLinkStatus {
    fn from(link: &LinkStatus) -> SyncLinkStatus {
        SyncLinkStatus {
            state: link.state.as_str().to_owned(),
            sessions: link.sessions,
            lag_seconds: link.lag.as_secs_f64(),
            queued: link.queued as u64,
            sent: link.sent.into(),
            received: link.received.into(),
            last_error: link.last_error.clone(),
        }
    }
}

impl From<Traffic> for SyncTraffic {
    fn from(t: Traffic) -> SyncTraffic {
        SyncTraffic {
            frames: t.frames,
            bytes: t.bytes,
            records: t.records,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::sync::links::{Fault, LinkState, PeerStatus};

    fn link(state: LinkState, lag_ms: u64, sent_records: u64, received_records: u64) -> LinkStatus {
        LinkStatus {
            state,
            sessions: 2,
            lag: Duration::from_millis(lag_ms),
            queued: 3,
            sent: Traffic {
                frames: 10,
                bytes: 1000,
                records: sent_records,
            },
            received: Traffic {
                frames: 4,
                bytes: 400,
                records: received_records,
            },
            last_error: (state == LinkState::Down).then(|| "connection refused".to_owned()),
        }
    }

    fn peer(name: &str, addr: &str) -> PeerStatus {
        PeerStatus {
            name: Arc::from(name),
            addr: addr.parse().unwrap(),
            export: link(LinkState::Up, 2, 120, 0),
            import: link(LinkState::Down, 0, 0, 80),
            needs_resync: name == "lb3",
            faults: FaultCounts::default(),
        }
    }

    #[test]
    fn from_links_joins_each_peer_with_its_counters_and_merges_rejections_by_reason() {
        let links = LinksStatus {
            peers: vec![peer("lb2", "192.0.2.2:9465"), peer("lb3", "192.0.2.3:9465")],
            unattributed: FaultCounts::default(),
        };
        let bulk = BulkStats {
            count: 3,
            last_seconds: 0.25,
            last_records: 1500,
        };
        let extra = SyncCounters {
            events_lost: 4,
            flows_swept: 6,
            peers: vec![
                // Out of order, and one the links do not know.
                PeerSyncCounters {
                    peer: "lb3".to_owned(),
                    flows_installed: 70,
                    rejected: vec![("unknown_vip", 2), ("bad_record", 5)],
                    bulks_received: bulk,
                    bulks_sent: BulkStats::default(),
                },
                PeerSyncCounters {
                    peer: "lb9".to_owned(),
                    flows_installed: 1,
                    ..PeerSyncCounters::default()
                },
            ],
        };
        let s = SyncSnapshot::from_links(&links, extra);
        assert_eq!((s.events_lost, s.flows_swept), (4, 6));
        let names: Vec<&str> = s.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["lb2", "lb3"], "the links' order, lb9 left out");
        let (lb2, lb3) = (&s.peers[0], &s.peers[1]);

        assert_eq!(lb2.address, "192.0.2.2:9465".parse().unwrap());
        assert_eq!(
            (lb2.flows_installed, lb2.bulks_received, lb2.needs_resync),
            (0, BulkStats::default(), false),
            "no counters: zeros"
        );
        assert_eq!(
            lb2.export,
            SyncLinkStatus {
                state: "up".to_owned(),
                sessions: 2,
                lag_seconds: 0.002,
                queued: 3,
                sent: SyncTraffic {
                    frames: 10,
                    bytes: 1000,
                    records: 120
                },
                received: SyncTraffic {
                    frames: 4,
                    bytes: 400,
                    records: 0
                },
                last_error: None,
            }
        );
        assert_eq!(
            (lb2.import.state.as_str(), lb2.import.last_error.as_deref()),
            ("down", Some("connection refused"))
        );
        // Every link fault, then every install refusal, zeros included.
        let labels: Vec<&str> = Fault::ALL
            .iter()
            .map(|f| f.as_str())
            .chain(InstallReject::ALL.iter().map(|r| r.as_str()))
            .collect();
        let got: Vec<&str> = lb2.rejected.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(got, labels);
        assert!(lb2.rejected.iter().all(|&(_, n)| n == 0));

        assert_eq!(
            (lb3.flows_installed, lb3.bulks_received, lb3.needs_resync),
            (70, bulk, true)
        );
        // The installer's `bad_record` adds to the codec's; `unknown_vip` is one
        // of its own reasons, each listed after the link faults.
        assert_eq!(
            lb3.rejected.len(),
            Fault::ALL.len() + InstallReject::ALL.len()
        );
        let count = |reason: &str| lb3.rejected.iter().find(|(r, _)| r == reason).unwrap().1;
        assert_eq!(
            (count("bad_record"), count("unknown_vip"), count("auth")),
            (5, 2, 0)
        );
        assert_eq!(lb3.rejected[Fault::ALL.len()].0, "unknown_vip");
        assert_eq!(s.unattributed.len(), Fault::ALL.len());
    }

    #[test]
    fn a_snapshot_without_sync_still_decodes_and_one_with_it_round_trips() {
        let mut json = serde_json::to_value(Snapshot::default()).unwrap();
        json.as_object_mut().unwrap().remove("sync");
        let old: Snapshot = serde_json::from_value(json).unwrap();
        assert_eq!(old.sync, None);

        let links = LinksStatus {
            peers: vec![peer("lb2", "[fd00::2]:9465")],
            unattributed: FaultCounts::default(),
        };
        let snapshot = Snapshot {
            sync: Some(SyncSnapshot::from_links(&links, SyncCounters::default())),
            ..Snapshot::default()
        };
        let text = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), snapshot);
    }
}
