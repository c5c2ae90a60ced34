//! The admin HTTP endpoint: the one window operators and Prometheus have into a
//! running apilb, plus the client half that `apilb status` uses to look through it.
//!
//! It serves three read-only routes from the [`Snapshot`] the run loop publishes,
//! so answering a scrape never waits on, or touches, the datapath:
//!
//! - `GET /healthz`: `200 ok` while the run loop is alive. The run loop replaces
//!   the snapshot after every reconcile and on a timer, so a snapshot older than
//!   [`STALE_AFTER`] means the loop is stuck: that is `503 stale`. Before the first
//!   snapshot (`taken_at == 0`) it is `503 starting`.
//! - `GET /status`: the snapshot as JSON; [`fetch_status`] reads it back.
//! - `GET /metrics`: the snapshot in the `OpenMetrics` text format (see
//!   [`render_metrics`] for the metric names).
//!
//! Any other path is `404`; any other method on a known path is `405`.

use std::{
    convert::Infallible,
    error::Error as StdError,
    fmt::Write as _,
    future::Future,
    io,
    net::SocketAddr,
    pin::pin,
    sync::{Arc, PoisonError, RwLockReadGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

use crate::status::{BackendStatus, SharedSnapshot, Snapshot, VipStatus};

/// A snapshot older than this makes `/healthz` answer `503`: the run loop
/// republishes far more often than this, so it has stopped.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// How long [`fetch_status`] waits for the whole exchange.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The `Content-Type` of `/metrics`: what `prometheus-client`'s text encoder emits.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once. Scrapers and `apilb status` need a handful; the cap
/// keeps a misbehaving local client from exhausting file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// A client must send its request head within this, so idle sockets don't pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// On shutdown, in-flight requests get this long to finish before being dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Pause after a transient `accept` failure (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The largest `/status` body [`fetch_status`] accepts.
const MAX_STATUS_BYTES: usize = 16 << 20;

/// Errors of the admin endpoint, server and client side.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin listener to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the admin listener's local address")]
    LocalAddr(#[source] io::Error),
    #[error("the admin listener on {addr} failed")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the admin endpoint at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HTTP exchange with the admin endpoint at {addr} failed")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the admin endpoint at {addr} answered GET /status with {status}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
    #[error("cannot read the /status body from {addr}")]
    Body {
        addr: SocketAddr,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("cannot decode the /status JSON from {addr}")]
    Json {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error("the admin endpoint at {addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

/// Binds the admin listener, naming the address if that fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves `/healthz`, `/status` and `/metrics` from `snapshot` on `listener` until
/// `shutdown` completes.
///
/// On shutdown the listener is closed first (new connections are refused), then
/// open connections get a second to finish their request; none outlive
/// this function. Transient `accept` failures are logged and retried; only a
/// broken listener ends it early, with [`AdminError::Serve`].
pub async fn serve(
    listener: TcpListener,
    snapshot: SharedSnapshot,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AdminError> {
    let addr = listener.local_addr().map_err(AdminError::LocalAddr)?;
    let mut shutdown = pin!(shutdown);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);

    let result = loop {
        // Reap finished connections so the set stays as small as the live ones.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore lives in this function and is never closed.
                Err(_closed) => break Ok(()),
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(%addr, error = %e, "admin: accept failed; retrying");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break Ok(()),
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
                Err(source) => break Err(AdminError::Serve { addr, source }),
            },
        };
        // Responses are one small write; don't let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let snapshot = Arc::clone(&snapshot);
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(&request, &snapshot, SystemTime::now());
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "admin: connection ended with an error");
            }
            drop(permit);
        });
    };

    // Refuse new connections at once, then let in-flight requests finish.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(%addr, "admin: connections still open after the grace period; dropping them");
    }
    // Abort whatever is left, and wait until it is gone.
    connections.shutdown().await;
    result
}

/// Whether an `accept` error is about one connection or a passing shortage,
/// rather than a broken listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The route a path names.
enum Route {
    Healthz,
    Status,
    Metrics,
}

/// Answers one request from the current snapshot.
fn respond<B>(
    request: &Request<B>,
    snapshot: &SharedSnapshot,
    now: SystemTime,
) -> Response<Full<Bytes>> {
    let route = match request.uri().path() {
        "/healthz" => Route::Healthz,
        "/status" => Route::Status,
        "/metrics" => Route::Metrics,
        _ => return text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    if request.method() != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let snapshot = read(snapshot);
    match route {
        Route::Healthz => {
            let (status, body) = health(&snapshot, now);
            text(status, body)
        }
        Route::Status => match serde_json::to_vec(&*snapshot) {
            Ok(json) => body(StatusCode::OK, "application/json", json.into()),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the snapshot: {e}\n"),
            ),
        },
        Route::Metrics => {
            // Copy, so that the run loop is not kept waiting while this encodes.
            let copy = snapshot.clone();
            drop(snapshot);
            metrics_response(copy)
        }
    }
}

fn metrics_response(snapshot: Snapshot) -> Response<Full<Bytes>> {
    match encode_metrics(snapshot) {
        Ok(metrics) => body(StatusCode::OK, METRICS_CONTENT_TYPE, metrics.into()),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics: {e}\n"),
        ),
    }
}

/// Reads the shared snapshot. A writer that panicked mid-way still left a whole
/// snapshot behind (it is replaced whole), so a poisoned lock is still readable.
fn read(snapshot: &SharedSnapshot) -> RwLockReadGuard<'_, Snapshot> {
    snapshot.read().unwrap_or_else(PoisonError::into_inner)
}

/// `/healthz`: alive while the run loop keeps publishing.
fn health(snapshot: &Snapshot, now: SystemTime) -> (StatusCode, String) {
    if snapshot.taken_at == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: no snapshot yet\n".to_owned(),
        );
    }
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // A snapshot from the future (the clock stepped back) counts as fresh.
    let age = now.saturating_sub(snapshot.taken_at);
    if age > STALE_AFTER.as_secs() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stale: the last snapshot is {age}s old\n"),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", message.into())
}

fn body(status: StatusCode, content_type: &'static str, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

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
///   `backend_probe_failures_total{reason}`, `backend_packets_total`,
///   `backend_bytes_total`, `backend_new_flows_total`.
/// - Every datapath counter, as `datapath_packets_total{counter="<name>"}`. The
///   outcome counters (`pass_*`, `drop_*`, `tx`, `redirect`) partition the packets
///   the program saw, so their sum is its packet count; the event counters
///   (`flow_new`, `reply_hit`, `fib_lookup`, `port_reclaimed`) count packets on
///   which that event happened and overlap the outcomes.
pub fn render_metrics(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    encode_metrics(snapshot.clone())
}

fn encode_metrics(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
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
             partition the packets seen; events (flow_new, reply_hit, fib_lookup, \
             port_reclaimed) count packets on which they happened",
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

/// The elected VIPs' table of `apilb status`, and the node's VRRP refusals.
fn render_elections(out: &mut String, snapshot: &Snapshot) {
    let elected: Vec<Vec<String>> = snapshot
        .vips
        .iter()
        .filter_map(|v| {
            let e = v.election.as_ref()?;
            Some(vec![
                v.address.ip().to_string(),
                e.mode.clone(),
                e.state.clone(),
                e.priority.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                e.transitions.to_string(),
                if e.reason.is_empty() {
                    "-".to_owned()
                } else {
                    e.reason.clone()
                },
            ])
        })
        .collect();
    if !elected.is_empty() {
        out.push('\n');
        write_table(
            out,
            &[
                ("ELECTED VIP", Align::Left),
                ("MODE", Align::Left),
                ("STATE", Align::Left),
                ("PRIORITY", Align::Right),
                ("CHANGES", Align::Right),
                ("LAST CHANGE", Align::Left),
            ],
            &elected,
        );
        if let Some(rejected) = vrrp_rejections(&snapshot.vips)
            && !rejected.is_empty()
        {
            let list: Vec<String> = rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
            let _ = writeln!(out, "VRRP adverts refused: {}", list.join(", "));
        }
    }
}

/// The node's VRRP refusals by reason. Every VRRP VIP's state carries them (its
/// socket counts them for all), so they are read from the first.
fn vrrp_rejections(vips: &[VipStatus]) -> Option<std::collections::BTreeMap<String, u64>> {
    vips.iter()
        .filter_map(|v| v.election.as_ref())
        .find(|e| e.mode == "vrrp")
        .map(|e| e.rejected.clone())
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
    counters(
        e,
        "backend_probe_failures",
        "Failed health probes, by reason",
        None,
        backends.iter().flat_map(|b| {
            b.failures.iter().map(|(reason, n)| {
                let mut labels = backend(b);
                labels.push(("reason", reason.clone()));
                (labels, *n)
            })
        }),
    )?;
    counters(
        e,
        "backend_passive_failures",
        "Clients' connections the backend failed on the wire, as the datapath saw: \
         a RST or an ICMP unreachable for a SYN, or a SYN left unanswered",
        None,
        backends.iter().flat_map(|b| {
            b.passive_failures.iter().map(|(kind, n)| {
                let mut labels = backend(b);
                labels.push(("kind", kind.clone()));
                (labels, *n)
            })
        }),
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

/// `GET /status` from the apilb whose admin endpoint is at `addr`, within
/// [`FETCH_TIMEOUT`]. This is what `apilb status` shows.
pub async fn fetch_status(addr: SocketAddr) -> Result<Snapshot, AdminError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch(addr))
        .await
        .unwrap_or(Err(AdminError::Timeout {
            addr,
            after: FETCH_TIMEOUT,
        }))
}

async fn fetch(addr: SocketAddr) -> Result<Snapshot, AdminError> {
    let http = move |source| AdminError::Http { addr, source };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| AdminError::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = hyper::Uri::from_static("/status");
    let host =
        HeaderValue::from_str(&addr.to_string()).expect("a socket address is a valid header");
    request.headers_mut().insert(HOST, host);
    // One request: let the server close the connection once it has answered.
    request
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));

    let mut exchange = pin!(async move {
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status() != StatusCode::OK {
            return Err(AdminError::Status {
                addr,
                status: response.status(),
            });
        }
        let bytes = Limited::new(response.into_body(), MAX_STATUS_BYTES)
            .collect()
            .await
            .map_err(|source| AdminError::Body { addr, source })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|source| AdminError::Json { addr, source })
    });
    // The connection future does the socket I/O: drive it here, together with the
    // exchange, so that nothing outlives the call.
    tokio::select! {
        biased;
        snapshot = &mut exchange => snapshot,
        ended = connection => match ended {
            // The server closed after answering: the exchange finishes from what
            // is buffered, or fails with hyper's own error.
            Ok(()) => exchange.await,
            Err(source) => Err(AdminError::Http { addr, source }),
        },
    }
}

/// The readable table `apilb status` prints: a header, the VIPs, the backends.
pub fn render_status(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let age = if snapshot.taken_at == 0 {
        "no snapshot yet".to_owned()
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("snapshot {}s old", now.saturating_sub(snapshot.taken_at))
    };
    let _ = writeln!(
        out,
        "apilb {}, instance {:?}, {age}, config reloads: {} applied, {} refused",
        snapshot.version, snapshot.instance, snapshot.reloads_applied, snapshot.reloads_refused,
    );
    if snapshot.fail_open {
        out.push_str(
            "WARNING: failing open: no backend is healthy, so every configured backend serves\n",
        );
    }

    out.push('\n');
    let vips: Vec<Vec<String>> = snapshot
        .vips
        .iter()
        .map(|v| {
            vec![
                v.address.to_string(),
                yes_no(v.owned),
                v.election.as_ref().map_or_else(
                    || "static".to_owned(),
                    |e| format!("{} {}", e.mode, e.state),
                ),
                v.packets.to_string(),
                human_bytes(v.bytes),
                v.new_flows.to_string(),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("VIP", Align::Left),
            ("OWNED", Align::Left),
            ("ELECTION", Align::Left),
            ("PACKETS", Align::Right),
            ("BYTES", Align::Right),
            ("NEW FLOWS", Align::Right),
        ],
        &vips,
    );

    render_elections(&mut out, snapshot);

    out.push('\n');
    let backends: Vec<Vec<String>> = snapshot
        .backends
        .iter()
        .map(|b| {
            vec![
                b.address.to_string(),
                b.id.to_string(),
                b.weight.to_string(),
                b.health.clone(),
                yes_no(b.in_rotation),
                if b.last_probe.is_empty() {
                    "-".to_owned()
                } else {
                    b.last_probe.clone()
                },
                if b.probes == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}", b.probe_latency_seconds * 1000.0)
                },
                b.packets.to_string(),
                human_bytes(b.bytes),
                b.new_flows.to_string(),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("BACKEND", Align::Left),
            ("ID", Align::Right),
            ("WEIGHT", Align::Right),
            ("HEALTH", Align::Left),
            ("IN ROTATION", Align::Left),
            ("LAST PROBE", Align::Left),
            ("LATENCY MS", Align::Right),
            ("PACKETS", Align::Right),
            ("BYTES", Align::Right),
            ("NEW FLOWS", Align::Right),
        ],
        &backends,
    );
    out
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// `n` bytes in binary units with one decimal, e.g. `1.2 MiB`; exact below 1 KiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Writes `rows` under `columns`, each column as wide as its widest cell, two
/// spaces apart, without trailing blanks.
fn write_table(out: &mut String, columns: &[(&str, Align)], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = columns.iter().map(|(name, _)| name.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, ((_, align), width))) in
            row.iter().zip(columns.iter().zip(&widths)).enumerate()
        {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = match align {
                Align::Left => write!(line, "{cell:<width$}"),
                Align::Right => write!(line, "{cell:>width$}"),
            };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}
