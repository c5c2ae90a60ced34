//! `/metrics`: the [`Snapshot`] in the `OpenMetrics` text format, for Prometheus.
//! It is a module of its own because the metric names, labels and help texts are
//! an interface that dashboards and alerts depend on: they are all here, in one
//! place, and change only on purpose.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};

use crate::discovery::DiscoveryStatus;
use crate::status::BackendStatus;
use crate::status::vrrp_rejections;
use crate::status::{
    BulkStats, Snapshot, SyncLinkStatus, SyncPeerStatus, SyncSnapshot, SyncTraffic, VipStatus,
};

/// The `Content-Type` of `/metrics`: what `prometheus-client`'s text encoder emits.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label sets: a few `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

/// Renders `snapshot` in the `OpenMetrics` text format.
///
/// The snapshot already holds every total, so each scrape encodes it afresh and
/// nothing is kept between scrapes. Series come out in snapshot order (backends
/// and VIPs as configured, datapath counters as in `lb_common::COUNTER_NAMES`), so
/// two scrapes diff cleanly. Names, all prefixed `apilb_` (counters end in
/// `_total`, as `OpenMetrics` wants):
///
/// - `build_info{instance,version}` 1; `snapshot_timestamp_seconds`;
///   `fail_open` 0/1 (no backend is healthy, so all configured ones serve);
///   `config_reloads_total{result="applied"|"refused"}`.
/// - Per VIP, label `vip`: `vip_owned` 0/1, `vip_packets_total`,
///   `vip_bytes_total`, `vip_new_flows_total`; for an elected VIP also
///   `vip_election_state{mode,state}` 1 and `vip_election_transitions_total`.
/// - `vrrp_adverts_rejected_total{reason}`: adverts this node refused.
/// - Per backend, label `backend` (its address): `backend_healthy` 0/1,
///   `backend_in_rotation` 0/1, `backend_probe_latency_seconds` (last probe),
///   `backend_probes_total`, `backend_transitions_total`,
///   `backend_probe_failures_total{reason}`,
///   `backend_passive_failures_total{kind}` (failures the datapath saw),
///   `backend_passive_hints_total{outcome}` (what probing on them showed),
///   `backend_local_connects_total` (node-local mode), `backend_packets_total`,
///   `backend_bytes_total`, `backend_new_flows_total`; `backend_membership{source,stage}`
///   1 (source `static` or `discovered`; stage `member`, `joining` or `leaving`).
/// - With discovery on: `discovery_state{state}` 1 for the current state and 0
///   for the others (`bootstrap`, `synced`, `unreadable`),
///   `discovery_resource_version` (the last slice's, as a number),
///   `discovery_lists_total`, `discovery_watches_expired_total` (410 Gone),
///   `discovery_slice_updates_total` (taken) and
///   `discovery_refusals_total{reason}` (`empty`, `wrong_family`, `bogus_port`,
///   `healthy_dropped`).
/// - With flow sync on, per peer (label `peer`, its name) and link (`link`:
///   `export`, the connection this node dials and sends its flows on, or
///   `import`): `sync_peer_up` 0/1, `sync_lag_seconds` (the oldest message not
///   yet acknowledged), `sync_frames_total`, `sync_bytes_total` and
///   `sync_records_total` (label `dir`: `sent` or `received`),
///   `sync_sessions_total`; per peer `sync_needs_resync` 0/1,
///   `sync_rejected_total{reason}` (every reason of the links and of the
///   installer; `peer=""` for connections no peer can be blamed for),
///   `sync_flows_installed_total`, and by `dir` `sync_bulks_total`,
///   `sync_bulk_seconds` and `sync_bulk_records` (the last bulk's duration and
///   records); `sync_events_lost_total`, `sync_flows_swept_total`.
/// - Every datapath counter, as `datapath_packets_total{counter="<name>"}`. The
///   outcome counters (`pass_*`, `drop_*`, `tx`, `redirect`) partition the packets
///   the program saw, so their sum is its packet count; the event counters
///   (`flow_new`, `reply_hit`, `reclaim_*`, ...) count packets on which that
///   event happened and overlap the outcomes.
///
/// Every labelled counter whose label values are known up front (reasons, kinds,
/// outcomes, and every configured VIP and backend) has each series from the first
/// scrape, at 0, so that an alert on `increase()` sees the first burst.
pub fn render_metrics(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    encode_metrics(snapshot.clone())
}

/// [`render_metrics`] of a snapshot the caller has already copied, so the server
/// copies it once.
pub(super) fn encode_metrics(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("apilb");
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// Encodes one snapshot. A collector rather than registered metric families: those
/// keep their series in a hash map, so the output order would change per scrape.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let e = &mut encoder;
        encode_controller(e, s)?;
        encode_vips(e, &s.vips)?;
        encode_backends(e, &s.backends)?;
        encode_membership(e, &s.backends)?;
        if let Some(d) = &s.discovery {
            encode_discovery(e, d)?;
        }
        if let Some(sync) = &s.sync {
            encode_sync(e, sync)?;
        }
        counters(
            e,
            "datapath_packets",
            "Datapath counters, summed over CPUs: outcomes (pass_*, drop_*, tx, redirect) \
             partition the packets seen; events (flow_new, reply_hit, reclaim_*, ...) \
             count packets on which they happened",
            None,
            s.counters
                .iter()
                .map(|(name, n)| (vec![("counter", name.clone())], *n)),
        )
    }
}

/// The controller itself: identity, freshness, fail-open, reloads.
fn encode_controller(e: &mut DescriptorEncoder, s: &Snapshot) -> std::fmt::Result {
    let info = Info::new(vec![
        ("instance", s.instance.clone()),
        ("version", s.version.clone()),
    ]);
    info.encode(e.encode_descriptor(
        "build",
        "The apilb instance and version this endpoint belongs to",
        None,
        info.metric_type(),
    )?)?;
    let taken_at = ConstGauge::new(i64::try_from(s.taken_at).unwrap_or(i64::MAX));
    taken_at.encode(e.encode_descriptor(
        "snapshot_timestamp",
        "When the controller last published its state, in seconds since the Unix epoch",
        Some(&Unit::Seconds),
        MetricType::Gauge,
    )?)?;
    ConstGauge::new(i64::from(s.fail_open)).encode(e.encode_descriptor(
        "fail_open",
        "1 while no backend is healthy and every configured backend serves",
        None,
        MetricType::Gauge,
    )?)?;
    counters(
        e,
        "config_reloads",
        "Config reloads (SIGHUP), by result",
        None,
        [
            (vec![("result", "applied".to_owned())], s.reloads_applied),
            (vec![("result", "refused".to_owned())], s.reloads_refused),
        ],
    )
}

/// Per VIP, labelled `vip`: ownership and traffic.
fn encode_vips(e: &mut DescriptorEncoder, vips: &[VipStatus]) -> std::fmt::Result {
    let vip = |v: &VipStatus| vec![("vip", v.address.to_string())];
    gauges(
        e,
        "vip_owned",
        "1 while this node owns the VIP and balances its traffic",
        None,
        vips.iter().map(|v| (vip(v), i64::from(v.owned))),
    )?;
    counters(
        e,
        "vip_packets",
        "Packets the datapath handled for the VIP",
        None,
        vips.iter().map(|v| (vip(v), v.packets)),
    )?;
    // The encoder appends the unit: `vip_bytes`.
    counters(
        e,
        "vip",
        "Bytes the datapath handled for the VIP",
        Some(&Unit::Bytes),
        vips.iter().map(|v| (vip(v), v.bytes)),
    )?;
    counters(
        e,
        "vip_new_flows",
        "Flows the datapath created for the VIP",
        None,
        vips.iter().map(|v| (vip(v), v.new_flows)),
    )?;
    let elected = || vips.iter().filter_map(|v| Some((v, v.election.as_ref()?)));
    gauges(
        e,
        "vip_election_state",
        "1 for the VIP's election state (vrrp: initialize, backup, master; etcd: \
         candidate, owner, cut off)",
        None,
        elected().map(|(v, s)| {
            let mut l = vip(v);
            l.push(("mode", s.mode.clone()));
            l.push(("state", s.state.clone()));
            (l, 1)
        }),
    )?;
    gauges(
        e,
        "vip_preempt_held",
        "1 while this node would preempt the VIP's master but holds back: flow sync \
         has not installed all of the master's flows here yet",
        None,
        elected().map(|(v, s)| (vip(v), i64::from(!s.held.is_empty()))),
    )?;
    counters(
        e,
        "vip_election_transitions",
        "Times this node gained or lost the VIP",
        None,
        elected().map(|(v, s)| (vip(v), s.transitions)),
    )?;
    counters(
        e,
        "vrrp_adverts_rejected",
        "VRRP adverts this node refused, by reason (ttl, version, checksum, auth, vrid, \
         peer, interval, addresses, malformed)",
        None,
        vrrp_rejections(vips)
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason)], n)),
    )
}

/// A counter per backend and per value of `label`, from the `(value, count)`
/// pairs `pairs` gives for each backend.
fn by_label(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    backends: &[BackendStatus],
    pairs: impl Fn(&BackendStatus) -> &Vec<(String, u64)>,
) -> std::fmt::Result {
    counters(
        e,
        name,
        help,
        None,
        backends.iter().flat_map(|b| {
            pairs(b).iter().map(move |(value, n)| {
                (
                    vec![("backend", b.address.to_string()), (label, value.clone())],
                    *n,
                )
            })
        }),
    )
}

/// Per backend, labelled `backend` (its address): health, probes and traffic.
fn encode_backends(e: &mut DescriptorEncoder, backends: &[BackendStatus]) -> std::fmt::Result {
    let backend = |b: &BackendStatus| vec![("backend", b.address.to_string())];
    gauges(
        e,
        "backend_healthy",
        "1 while the backend passes its health probes",
        None,
        backends.iter().map(|b| (backend(b), i64::from(b.healthy))),
    )?;
    gauges(
        e,
        "backend_in_rotation",
        "1 while the backend holds Maglev slots",
        None,
        backends
            .iter()
            .map(|b| (backend(b), i64::from(b.in_rotation))),
    )?;
    // The encoder appends the unit: `backend_probe_latency_seconds`.
    gauges(
        e,
        "backend_probe_latency",
        "How long the backend's last health probe took",
        Some(&Unit::Seconds),
        backends
            .iter()
            .map(|b| (backend(b), b.probe_latency_seconds)),
    )?;
    counters(
        e,
        "backend_probes",
        "Health probes sent to the backend",
        None,
        backends.iter().map(|b| (backend(b), b.probes)),
    )?;
    counters(
        e,
        "backend_transitions",
        "Times the backend changed between ready, not ready and down",
        None,
        backends.iter().map(|b| (backend(b), b.transitions)),
    )?;
    by_label(
        e,
        "backend_probe_failures",
        "Failed health probes, by reason",
        "reason",
        backends,
        |b| &b.failures,
    )?;
    by_label(
        e,
        "backend_passive_failures",
        "Clients' connections the backend failed on the wire, as the datapath saw: \
         a RST or an ICMP unreachable for a SYN, or a SYN left unanswered",
        "kind",
        backends,
        |b| &b.passive_failures,
    )?;
    by_label(
        e,
        "backend_passive_hints",
        "Passive failures reported to the controller, by what the probe they \
         triggered showed: confirmed (`fall` probes failed in a row; the backend left rotation) \
         or refuted (a probe passed)",
        "outcome",
        backends,
        |b| &b.passive_hints,
    )?;
    counters(
        e,
        "backend_local_connects",
        "The node's own connects to a VIP sent to the backend (node-local mode)",
        None,
        backends.iter().map(|b| (backend(b), b.local_connects)),
    )?;
    counters(
        e,
        "backend_packets",
        "Packets the datapath carried to and from the backend",
        None,
        backends.iter().map(|b| (backend(b), b.packets)),
    )?;
    // The encoder appends the unit: `backend_bytes`.
    counters(
        e,
        "backend",
        "Bytes the datapath carried to and from the backend",
        Some(&Unit::Bytes),
        backends.iter().map(|b| (backend(b), b.bytes)),
    )?;
    counters(
        e,
        "backend_new_flows",
        "Flows the datapath created to the backend",
        None,
        backends.iter().map(|b| (backend(b), b.new_flows)),
    )
}

/// Per backend: where it comes from and where it stands (discovery).
fn encode_membership(e: &mut DescriptorEncoder, backends: &[BackendStatus]) -> std::fmt::Result {
    gauges(
        e,
        "backend_membership",
        "1 for where the backend comes from (source: static, discovered) and stands \
         (stage: member; joining, with no slots until its probes pass; leaving, draining)",
        None,
        backends.iter().map(|b| {
            let mut l = vec![("backend", b.address.to_string())];
            l.push(("source", b.source.clone()));
            l.push(("stage", b.membership.clone()));
            (l, 1)
        }),
    )
}

/// Discovery: its state, the last slice's version, lists, updates and refusals.
fn encode_discovery(e: &mut DescriptorEncoder, d: &DiscoveryStatus) -> std::fmt::Result {
    gauges(
        e,
        "discovery_state",
        "1 for discovery's state: bootstrap (no slice read yet: the static backends), \
         synced, or unreadable (the last read failed; the last members stay)",
        None,
        ["bootstrap", "synced", "unreadable"]
            .into_iter()
            .map(|st| (vec![("state", st.to_owned())], i64::from(d.state == st))),
    )?;
    let version = d.resource_version.parse::<u64>().unwrap_or(0);
    ConstGauge::new(i64::try_from(version).unwrap_or(i64::MAX)).encode(e.encode_descriptor(
        "discovery_resource_version",
        "The resourceVersion of the last EndpointSlice read, as a number (0 before any)",
        None,
        MetricType::Gauge,
    )?)?;
    for (name, help, n) in [
        (
            "discovery_lists",
            "Lists of the EndpointSlices: the first, then one per relist (410 Gone, another master)",
            d.lists,
        ),
        (
            "discovery_watches_expired",
            "Watches too old to resume (410 Gone: compacted), each followed by a list",
            d.expired,
        ),
        (
            "discovery_slice_updates",
            "EndpointSlice updates taken",
            d.accepted,
        ),
    ] {
        ConstCounter::new(n).encode(e.encode_descriptor(
            name,
            help,
            None,
            MetricType::Counter,
        )?)?;
    }
    counters(
        e,
        "discovery_refusals",
        "EndpointSlice updates refused, by reason: empty, wrong_family, bogus_port, \
         healthy_dropped (more than half of the masters the probes see ready left out)",
        None,
        d.refusals
            .iter()
            .map(|(reason, n)| (vec![("reason", reason.clone())], *n)),
    )
}

/// Flow sync: per peer and link, then per peer, then the node's lost events.
fn encode_sync(e: &mut DescriptorEncoder, sync: &SyncSnapshot) -> std::fmt::Result {
    encode_sync_links(e, &sync.peers)?;
    encode_sync_peers(e, sync)?;
    ConstCounter::new(sync.flows_swept).encode(e.encode_descriptor(
        "sync_flows_swept",
        "Peers' flows parked here and removed as over: silent, as of the peer's last \
         word, for longer than their state's timeout and a resync interval",
        None,
        MetricType::Counter,
    )?)?;
    ConstCounter::new(sync.events_lost).encode(e.encode_descriptor(
        "sync_events_lost",
        "Flow events lost before they reached the sync links (the datapath's ring was \
         full, or the sync thread could not use them); a resync repairs what the peers \
         missed",
        None,
        MetricType::Counter,
    )?)
}

/// A sync peer's labels.
fn peer(p: &SyncPeerStatus) -> Labels {
    vec![("peer", p.name.clone())]
}

/// `labels` and one more.
fn and(mut labels: Labels, name: &'static str, value: &str) -> Labels {
    labels.push((name, value.to_owned()));
    labels
}

/// Per sync peer and link, labelled `peer` and `link`: sessions and traffic.
fn encode_sync_links(e: &mut DescriptorEncoder, peers: &[SyncPeerStatus]) -> std::fmt::Result {
    let links = || {
        peers.iter().flat_map(|p| {
            [("export", &p.export), ("import", &p.import)]
                .map(|(name, link)| (and(peer(p), "link", name), link))
        })
    };
    gauges(
        e,
        "sync_peer_up",
        "1 while a session with the sync peer is up on the link (export: this node's \
         flows out; import: the peer's in)",
        None,
        links().map(|(l, link)| (l, i64::from(link.state == "up"))),
    )?;
    gauges(
        e,
        "sync_lag",
        "How long the oldest message sent on the link has waited for the peer's ACK",
        Some(&Unit::Seconds),
        links().map(|(l, link)| (l, link.lag_seconds)),
    )?;
    let by_dir = |what: fn(&SyncTraffic) -> u64| {
        links().flat_map(move |(l, link): (Labels, &SyncLinkStatus)| {
            [("sent", &link.sent), ("received", &link.received)]
                .map(|(dir, t)| (and(l.clone(), "dir", dir), what(t)))
        })
    };
    counters(
        e,
        "sync_frames",
        "Sync frames on the link, handshakes, ACKs and keepalives included",
        None,
        by_dir(|t| t.frames),
    )?;
    // The encoder appends the unit: `sync_bytes`.
    counters(
        e,
        "sync",
        "Bytes of sync frames on the link, as on the wire",
        Some(&Unit::Bytes),
        by_dir(|t| t.bytes),
    )?;
    counters(
        e,
        "sync_records",
        "Flow records on the link, live and in bulks",
        None,
        by_dir(|t| t.records),
    )?;
    counters(
        e,
        "sync_sessions",
        "Sessions with the sync peer that came up on the link",
        None,
        links().map(|(l, link)| (l, link.sessions)),
    )
}

/// Per sync peer, labelled `peer`: resyncs owed, rejections, installs and bulks.
fn encode_sync_peers(e: &mut DescriptorEncoder, sync: &SyncSnapshot) -> std::fmt::Result {
    gauges(
        e,
        "sync_needs_resync",
        "1 while the sync peer is owed a bulk: an export to it was dropped",
        None,
        sync.peers
            .iter()
            .map(|p| (peer(p), i64::from(p.needs_resync))),
    )?;
    let unattributed = sync
        .unattributed
        .iter()
        .map(|(reason, n)| (and(vec![("peer", String::new())], "reason", reason), *n));
    counters(
        e,
        "sync_rejected",
        "Sync frames, records and connections refused, by reason; peer=\"\" for those no \
         peer can be blamed for",
        None,
        sync.peers
            .iter()
            .flat_map(|p| {
                p.rejected
                    .iter()
                    .map(|(reason, n)| (and(peer(p), "reason", reason), *n))
            })
            .chain(unattributed),
    )?;
    counters(
        e,
        "sync_flows_installed",
        "The sync peer's flows written to this node's flow tables",
        None,
        sync.peers.iter().map(|p| (peer(p), p.flows_installed)),
    )?;
    counters(
        e,
        "sync_bulks",
        "Bulk resyncs finished with the sync peer: this node's flows sent, or the peer's \
         received",
        None,
        by_bulk(&sync.peers, |b| b.count),
    )?;
    // The encoder appends the unit: `sync_bulk_seconds`.
    gauges(
        e,
        "sync_bulk",
        "How long the last bulk resync with the sync peer took, request to end",
        Some(&Unit::Seconds),
        by_bulk(&sync.peers, |b| b.last_seconds),
    )?;
    gauges(
        e,
        "sync_bulk_records",
        "Flow records the last bulk resync with the sync peer carried",
        None,
        by_bulk(&sync.peers, |b| b.last_records),
    )
}

/// `what` of each peer's bulks, labelled `peer` and `dir` (`sent`, `received`).
fn by_bulk<V>(
    peers: &[SyncPeerStatus],
    what: impl Fn(&BulkStats) -> V,
) -> impl Iterator<Item = (Labels, V)> {
    peers.iter().flat_map(move |p| {
        [("sent", &p.bulks_sent), ("received", &p.bulks_received)]
            .map(|(dir, b)| (and(peer(p), "dir", dir), what(b)))
    })
}

/// A counter family with one series per sample, in order; nothing if no samples.
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    family(
        e,
        name,
        help,
        unit,
        MetricType::Counter,
        samples,
        ConstCounter::new,
    )
}

/// A gauge family with one series per sample, in order; nothing if no samples.
fn gauges<V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result {
    family(
        e,
        name,
        help,
        unit,
        MetricType::Gauge,
        samples,
        ConstGauge::new,
    )
}

fn family<V, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Labels, V)>,
    metric: impl Fn(V) -> M,
) -> std::fmt::Result {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut family = e.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in samples {
        metric(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
