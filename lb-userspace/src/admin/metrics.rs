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

use crate::status::vrrp_rejections;
use crate::status::{BackendStatus, Snapshot, VipStatus};

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
///   `backend_bytes_total`, `backend_new_flows_total`.
/// - Every datapath counter, as `datapath_packets_total{counter="<name>"}`. The
///   outcome counters (`pass_*`, `drop_*`, `tx`, `redirect`) partition the packets
///   the program saw, so their sum is its packet count; the event counters
///   (`flow_new`, `reply_hit`, `reclaim_*`, ...) count packets on which that
///   event happened and overlap the outcomes.
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
