//! The admin endpoint over real loopback HTTP: `/healthz`, `/status`, `/metrics`,
//! the error routes, shutdown, and the `apilb status` table.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_common::COUNTER_NAMES;
use lb_userspace::{
    admin::{
        self, ServerError,
        client::{self, ClientError},
        metrics, table,
    },
    status::{
        BackendStatus, BulkStats, PeerSyncCounters, SharedSnapshot, Snapshot, SyncCounters,
        SyncSnapshot, VipStatus,
    },
    sync::{
        install::InstallReject,
        links::{Fault, FaultCounts, LinkState, LinkStatus, LinksStatus, PeerStatus, Traffic},
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

/// Every test finishes well within this, or fails.
const BOUND: Duration = Duration::from_secs(5);

const HEALTHY: &str = "10.0.0.1:6443";
const UNHEALTHY: &str = "10.0.0.2:6443";
const VIP: &str = "192.0.2.10:6443";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// One owned VIP; one healthy backend and one that has been timing out.
fn sample() -> Snapshot {
    Snapshot {
        instance: "test".to_owned(),
        version: "0.1.0".to_owned(),
        taken_at: now(),
        vips: vec![VipStatus {
            address: VIP.parse().unwrap(),
            owned: true,
            election: Some(lb_userspace::election::ElectionState {
                mode: "vrrp".to_owned(),
                state: "master".to_owned(),
                owned: true,
                priority: Some(150),
                transitions: 1,
                reason: "master down timer expired".to_owned(),
                held: String::new(),
                rejected: [("ttl".to_owned(), 2)].into_iter().collect(),
            }),
            packets: 5000,
            bytes: 2048,
            new_flows: 17,
        }],
        backends: vec![
            BackendStatus {
                address: HEALTHY.parse().unwrap(),
                id: 0,
                weight: 1,
                source: "static".to_owned(),
                membership: "member".to_owned(),
                healthy: true,
                health: "ready".to_owned(),
                in_rotation: true,
                last_probe: "ok".to_owned(),
                probe_latency_seconds: 0.0125,
                probes: 120,
                transitions: 1,
                failures: vec![("timeout".to_owned(), 0), ("refused".to_owned(), 0)],
                passive_failures: vec![("rst".to_owned(), 0)],
                passive_hints: vec![("confirmed".to_owned(), 0), ("refuted".to_owned(), 3)],
                local_connects: 9,
                packets: 4000,
                bytes: 1_258_291,
                new_flows: 17,
            },
            BackendStatus {
                address: UNHEALTHY.parse().unwrap(),
                id: 1,
                weight: 2,
                source: "discovered".to_owned(),
                membership: "leaving".to_owned(),
                healthy: false,
                health: "down".to_owned(),
                in_rotation: false,
                last_probe: "timeout".to_owned(),
                probe_latency_seconds: 0.4,
                probes: 118,
                transitions: 2,
                failures: vec![("timeout".to_owned(), 3), ("refused".to_owned(), 1)],
                passive_failures: vec![("rst".to_owned(), 2), ("silent".to_owned(), 1)],
                passive_hints: vec![("confirmed".to_owned(), 1), ("refuted".to_owned(), 0)],
                local_connects: 0,
                packets: 0,
                bytes: 0,
                new_flows: 0,
            },
        ],
        fail_open: false,
        counters: COUNTER_NAMES
            .iter()
            .map(|&name| {
                let n = match name {
                    "redirect" => 42,
                    "drop_no_backend" => 7,
                    _ => 0,
                };
                (name.to_owned(), n)
            })
            .collect(),
        reloads_applied: 2,
        reloads_refused: 1,
        sync: None,
        discovery: None,
    }
}

/// The installer's reasons, as the sync thread will list them.
const INSTALL_REASONS: [&str; 5] = [
    "unknown_vip",
    "foreign_snat",
    "unknown_backend",
    "conflict",
    "bad_record",
];

/// One direction of a link: `frames`, 100 bytes each, carrying `records`.
fn traffic(frames: u64, records: u64) -> Traffic {
    Traffic {
        frames,
        bytes: 100 * frames,
        records,
    }
}

fn link(
    state: LinkState,
    sessions: u64,
    lag: Duration,
    sent: Traffic,
    received: Traffic,
) -> LinkStatus {
    LinkStatus {
        state,
        sessions,
        lag,
        queued: 0,
        sent,
        received,
        last_error: None,
    }
}

/// `sample()` with flow sync to two peers: lb2 in sync both ways, after two auth
/// failures and a record for a VIP this node does not have; lb3 unreachable and
/// owed a resync. Three connections came from no peer's address, and five flow
/// events were lost.
fn sample_with_sync() -> Snapshot {
    let lb2 = PeerStatus {
        name: "lb2".into(),
        addr: "192.0.2.2:9465".parse().unwrap(),
        export: link(
            LinkState::Up,
            1,
            Duration::from_micros(1500),
            traffic(40, 3400),
            traffic(12, 0),
        ),
        import: link(
            LinkState::Up,
            3,
            Duration::ZERO,
            traffic(9, 0),
            traffic(30, 1200),
        ),
        needs_resync: false,
        faults: FaultCounts::default(),
    };
    let mut lb3 = PeerStatus {
        name: "lb3".into(),
        addr: "192.0.2.3:9465".parse().unwrap(),
        export: link(
            LinkState::Connecting,
            0,
            Duration::ZERO,
            Traffic::default(),
            Traffic::default(),
        ),
        import: link(
            LinkState::Down,
            0,
            Duration::ZERO,
            Traffic::default(),
            Traffic::default(),
        ),
        needs_resync: true,
        faults: FaultCounts::default(),
    };
    lb3.export.last_error = Some("connection refused (os error 111)".to_owned());
    let links = LinksStatus {
        peers: vec![lb2, lb3],
        unattributed: FaultCounts::default(),
    };
    let lb2_counters = PeerSyncCounters {
        peer: "lb2".to_owned(),
        flows_installed: 1150,
        rejected: INSTALL_REASONS
            .map(|r| (r, u64::from(r == "unknown_vip")))
            .to_vec(),
        bulks_received: BulkStats {
            count: 2,
            last_seconds: 0.25,
            last_records: 1000,
        },
        bulks_sent: BulkStats {
            count: 3,
            last_seconds: 0.5,
            last_records: 2000,
        },
    };
    let lb3_counters = PeerSyncCounters {
        peer: "lb3".to_owned(),
        rejected: INSTALL_REASONS.map(|r| (r, 0)).to_vec(),
        ..PeerSyncCounters::default()
    };
    let mut sync = SyncSnapshot::from_links(
        &links,
        SyncCounters {
            events_lost: 5,
            flows_swept: 9,
            peers: vec![lb2_counters, lb3_counters],
        },
    );
    // What the links would have counted: `FaultCounts` are theirs to write.
    let count = |list: &mut Vec<(String, u64)>, reason: &str, n: u64| {
        list.iter_mut().find(|(r, _)| r == reason).unwrap().1 = n;
    };
    count(&mut sync.peers[0].rejected, "auth", 2);
    count(&mut sync.unattributed, "unknown_peer", 3);
    Snapshot {
        sync: Some(sync),
        ..sample()
    }
}

/// A running admin server on an ephemeral loopback port.
struct Server {
    addr: SocketAddr,
    snapshot: SharedSnapshot,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Server {
    async fn start(snapshot: Snapshot) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let snapshot = Arc::new(RwLock::new(snapshot));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(admin::serve(listener, Arc::clone(&snapshot), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            snapshot,
            stop: Some(stop),
            task,
        }
    }

    /// Signals shutdown and waits for `serve` to return.
    async fn stop(mut self) -> Result<(), ServerError> {
        self.stop.take().unwrap().send(()).unwrap();
        (&mut self.task)
            .await
            .expect("the admin server task panicked")
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// One request over a fresh connection, written by hand so that the test does not
/// share code with the client under test.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .unwrap_or_else(|e| panic!("reading the answer to {method} {path}: {e}"));
    let raw = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    Reply {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test did not finish within its bound")
}

#[tokio::test]
async fn healthz_is_200_when_fresh_and_503_when_60s_stale() {
    bounded(async {
        let server = Server::start(sample()).await;
        let fresh = request(server.addr, "GET", "/healthz").await;
        assert_eq!((fresh.status, fresh.body.as_str()), (200, "ok\n"));

        // The run loop replaces the snapshot whole; the server reads the new one.
        server.snapshot.write().unwrap().taken_at = now() - 60;
        let stale = request(server.addr, "GET", "/healthz").await;
        assert_eq!(stale.status, 503);
        assert!(stale.body.starts_with("stale"), "body {:?}", stale.body);

        server.snapshot.write().unwrap().taken_at = 0;
        let starting = request(server.addr, "GET", "/healthz").await;
        assert_eq!(starting.status, 503);
        assert!(
            starting.body.starts_with("starting"),
            "body {:?}",
            starting.body
        );

        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn fetch_status_returns_exactly_the_served_snapshot() {
    bounded(async {
        let snapshot = sample_with_sync();
        let server = Server::start(snapshot.clone()).await;
        let fetched = client::fetch_status(server.addr).await.unwrap();
        assert_eq!(fetched, snapshot);

        let raw = request(server.addr, "GET", "/status").await;
        assert_eq!(raw.status, 200);
        assert!(raw.headers.contains("content-type: application/json"));
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn fetch_status_names_the_address_it_cannot_reach() {
    bounded(async {
        // Bind, then close, to get a loopback port nobody listens on.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = client::fetch_status(addr).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Connect { addr: a, .. } if a == addr),
            "{err:?}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    })
    .await;
}

#[tokio::test]
async fn fetch_status_gives_up_after_2s_on_a_silent_endpoint() {
    bounded(async {
        // The kernel completes the handshake from the backlog; nobody ever answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = tokio::time::Instant::now();
        let err = client::fetch_status(addr).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, ClientError::Timeout { addr: a, after } if a == addr && after == Duration::from_secs(2)),
            "{err:?}"
        );
        assert!(
            (Duration::from_secs(2)..Duration::from_millis(2500)).contains(&took),
            "gave up after {took:?}"
        );
        drop(silent);
    })
    .await;
}

#[tokio::test]
async fn metrics_carry_the_snapshot_numbers_as_valid_openmetrics_text() {
    bounded(async {
        let server = Server::start(sample()).await;
        let reply = request(server.addr, "GET", "/metrics").await;
        server.stop().await.unwrap();
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .headers
                .contains("content-type: application/openmetrics-text; version=1.0.0"),
            "headers {:?}",
            reply.headers
        );

        let lines: Vec<&str> = reply.body.lines().collect();
        for expected in [
            format!(r#"apilb_backend_healthy{{backend="{HEALTHY}"}} 1"#),
            format!(r#"apilb_backend_healthy{{backend="{UNHEALTHY}"}} 0"#),
            format!(r#"apilb_backend_in_rotation{{backend="{UNHEALTHY}"}} 0"#),
            format!(r#"apilb_backend_probe_latency_seconds{{backend="{HEALTHY}"}} 0.0125"#),
            format!(r#"apilb_backend_probes_total{{backend="{HEALTHY}"}} 120"#),
            format!(r#"apilb_backend_transitions_total{{backend="{UNHEALTHY}"}} 2"#),
            format!(
                r#"apilb_backend_probe_failures_total{{backend="{UNHEALTHY}",reason="timeout"}} 3"#
            ),
            format!(
                r#"apilb_backend_probe_failures_total{{backend="{UNHEALTHY}",reason="refused"}} 1"#
            ),
            format!(
                r#"apilb_backend_passive_failures_total{{backend="{UNHEALTHY}",kind="rst"}} 2"#
            ),
            format!(
                r#"apilb_backend_passive_failures_total{{backend="{UNHEALTHY}",kind="silent"}} 1"#
            ),
            format!(
                r#"apilb_backend_passive_hints_total{{backend="{HEALTHY}",outcome="refuted"}} 3"#
            ),
            format!(
                r#"apilb_backend_passive_hints_total{{backend="{UNHEALTHY}",outcome="confirmed"}} 1"#
            ),
            format!(r#"apilb_backend_bytes_total{{backend="{HEALTHY}"}} 1258291"#),
            format!(r#"apilb_backend_local_connects_total{{backend="{HEALTHY}"}} 9"#),
            format!(r#"apilb_vip_owned{{vip="{VIP}"}} 1"#),
            format!(r#"apilb_vip_election_state{{vip="{VIP}",mode="vrrp",state="master"}} 1"#),
            format!(r#"apilb_vip_election_transitions_total{{vip="{VIP}"}} 1"#),
            r#"apilb_vrrp_adverts_rejected_total{reason="ttl"} 2"#.to_owned(),
            format!(r#"apilb_vip_packets_total{{vip="{VIP}"}} 5000"#),
            format!(r#"apilb_vip_new_flows_total{{vip="{VIP}"}} 17"#),
            r#"apilb_datapath_packets_total{counter="redirect"} 42"#.to_owned(),
            r#"apilb_datapath_packets_total{counter="drop_no_backend"} 7"#.to_owned(),
            r#"apilb_datapath_packets_total{counter="tx"} 0"#.to_owned(),
            "apilb_fail_open 0".to_owned(),
            r#"apilb_config_reloads_total{result="applied"} 2"#.to_owned(),
            r#"apilb_config_reloads_total{result="refused"} 1"#.to_owned(),
            format!(
                r#"apilb_backend_membership{{backend="{UNHEALTHY}",source="discovered",stage="leaving"}} 1"#
            ),
        ] {
            assert!(
                lines.contains(&expected.as_str()),
                "no line {expected:?} in\n{}",
                reply.body
            );
        }
        let datapath = lines
            .iter()
            .filter(|l| l.starts_with("apilb_datapath_packets_total{"))
            .count();
        assert_eq!(
            datapath,
            COUNTER_NAMES.len(),
            "one series per datapath counter"
        );
        // Series keep the snapshot's order, so two scrapes diff cleanly.
        let order: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(r#"apilb_datapath_packets_total{counter=""#))
            .filter_map(|l| l.split_once('"').map(|(name, _)| name))
            .collect();
        assert_eq!(order, COUNTER_NAMES);

        assert_valid_exposition(&reply.body);
        let samples = lines.iter().filter(|l| !l.starts_with('#')).count();
        // build, timestamp, fail_open, 2 reloads; 4 per VIP plus 4 for its election
        // (state, preemption held, transitions, one rejection reason); 10 per
        // backend (membership included) plus 4 failure
        // reasons, 3 passive failure kinds and 4 passive hint outcomes; one per
        // datapath counter.
        assert_eq!(
            samples,
            5 + 4 + 4 + 2 * 10 + 4 + 3 + 4 + COUNTER_NAMES.len(),
            "every series"
        );
    })
    .await;
}

#[tokio::test]
async fn metrics_carry_every_sync_series_of_two_peers() {
    bounded(async {
        let server = Server::start(sample_with_sync()).await;
        let reply = request(server.addr, "GET", "/metrics").await;
        server.stop().await.unwrap();
        assert_eq!(reply.status, 200);
        let lines: Vec<&str> = reply.body.lines().collect();
        for expected in [
            r#"apilb_sync_peer_up{peer="lb2",link="export"} 1"#,
            r#"apilb_sync_peer_up{peer="lb2",link="import"} 1"#,
            r#"apilb_sync_peer_up{peer="lb3",link="export"} 0"#,
            r#"apilb_sync_peer_up{peer="lb3",link="import"} 0"#,
            r#"apilb_sync_lag_seconds{peer="lb2",link="export"} 0.0015"#,
            r#"apilb_sync_lag_seconds{peer="lb3",link="export"} 0.0"#,
            r#"apilb_sync_frames_total{peer="lb2",link="export",dir="sent"} 40"#,
            r#"apilb_sync_frames_total{peer="lb2",link="export",dir="received"} 12"#,
            r#"apilb_sync_bytes_total{peer="lb2",link="import",dir="received"} 3000"#,
            r#"apilb_sync_records_total{peer="lb2",link="export",dir="sent"} 3400"#,
            r#"apilb_sync_records_total{peer="lb2",link="import",dir="received"} 1200"#,
            r#"apilb_sync_records_total{peer="lb3",link="import",dir="received"} 0"#,
            r#"apilb_sync_sessions_total{peer="lb2",link="import"} 3"#,
            r#"apilb_sync_sessions_total{peer="lb3",link="export"} 0"#,
            r#"apilb_sync_needs_resync{peer="lb2"} 0"#,
            r#"apilb_sync_needs_resync{peer="lb3"} 1"#,
            r#"apilb_sync_rejected_total{peer="lb2",reason="auth"} 2"#,
            r#"apilb_sync_rejected_total{peer="lb2",reason="unknown_vip"} 1"#,
            r#"apilb_sync_rejected_total{peer="lb2",reason="bad_record"} 0"#,
            r#"apilb_sync_rejected_total{peer="lb3",reason="overflow"} 0"#,
            r#"apilb_sync_rejected_total{peer="",reason="unknown_peer"} 3"#,
            r#"apilb_sync_flows_installed_total{peer="lb2"} 1150"#,
            r#"apilb_sync_flows_installed_total{peer="lb3"} 0"#,
            r#"apilb_sync_bulks_total{peer="lb2",dir="sent"} 3"#,
            r#"apilb_sync_bulks_total{peer="lb2",dir="received"} 2"#,
            r#"apilb_sync_bulk_seconds{peer="lb2",dir="sent"} 0.5"#,
            r#"apilb_sync_bulk_seconds{peer="lb2",dir="received"} 0.25"#,
            r#"apilb_sync_bulk_records{peer="lb2",dir="received"} 1000"#,
            r#"apilb_sync_bulk_records{peer="lb3",dir="sent"} 0"#,
            "apilb_sync_events_lost_total 5",
            "apilb_sync_flows_swept_total 9",
        ] {
            assert!(
                lines.contains(&expected),
                "no line {expected:?} in\n{}",
                reply.body
            );
        }
        assert_valid_exposition(&reply.body);
        // Per peer: every fault of the links and every install refusal, zeros
        // included (the counters' bad_record adds to the codec's).
        let reasons = Fault::ALL.len() + InstallReject::ALL.len();
        for (peer, want) in [("lb2", reasons), ("lb3", reasons), ("", Fault::ALL.len())] {
            let prefix = format!(r#"apilb_sync_rejected_total{{peer="{peer}",reason="#);
            let got = lines.iter().filter(|l| l.starts_with(&prefix)).count();
            assert_eq!(got, want, "rejection series of peer {peer:?}");
        }
        let sync = lines
            .iter()
            .filter(|l| l.starts_with("apilb_sync_"))
            .count();
        // Per peer and link: up, lag, sessions, and 2 directions of frames, bytes
        // and records; per peer: needs_resync, flows_installed and 2 directions of
        // bulks, bulk_seconds and bulk_records; the rejections; events lost and
        // flows swept.
        assert_eq!(
            sync,
            2 * 2 * (3 + 2 * 3) + 2 * (2 + 2 * 3) + 2 * reasons + Fault::ALL.len() + 2,
            "every sync series"
        );
        let off = metrics::render_metrics(&sample()).unwrap();
        assert!(
            !off.contains("apilb_sync_"),
            "sync off, no sync series:\n{off}"
        );
    })
    .await;
}

#[test]
fn metrics_of_an_empty_snapshot_are_still_valid() {
    let text = metrics::render_metrics(&Snapshot::default()).unwrap();
    assert_valid_exposition(&text);
    assert!(text.lines().any(|l| l == "apilb_fail_open 0"), "\n{text}");
    assert!(
        text.lines()
            .any(|l| l == "apilb_snapshot_timestamp_seconds 0"),
        "\n{text}"
    );
    assert!(
        !text.contains("apilb_backend_"),
        "no backend families without backends:\n{text}"
    );
}

/// Checks the text exposition's shape: `# EOF` last; every other comment is HELP,
/// TYPE or UNIT; every sample is `name{labels} value`, with a TYPE for its family.
fn assert_valid_exposition(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "the exposition must end with # EOF"
    );
    let mut typed = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let kind = words.next().unwrap();
            let name = words
                .next()
                .unwrap_or_else(|| panic!("bare comment {line:?}"));
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT"), "comment {line:?}");
            assert!(is_metric_name(name), "name in {line:?}");
            if kind == "TYPE" {
                typed.push(name.to_owned());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("value in {line:?}: {e}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                assert_valid_labels(labels, line);
                name
            }
            None => series,
        };
        assert!(is_metric_name(name), "name in {line:?}");
        let family = ["_total", "_info"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|family| typed.iter().any(|t| t == family))
            .unwrap_or(name);
        assert!(typed.iter().any(|t| t == family), "no TYPE for {line:?}");
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `k="v",k="v"` with simple (unescaped) values, which is all apilb emits.
fn assert_valid_labels(labels: &str, line: &str) {
    for pair in labels.split("\",") {
        let (key, value) = pair
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label {pair:?} in {line:?}"));
        assert!(
            is_metric_name(key) && !key.contains(':'),
            "label name in {line:?}"
        );
        assert!(
            !value.trim_end_matches('"').contains('"'),
            "label value in {line:?}"
        );
    }
}

#[tokio::test]
async fn unknown_path_is_404_and_post_is_405() {
    bounded(async {
        let server = Server::start(sample()).await;
        assert_eq!(request(server.addr, "GET", "/nope").await.status, 404);
        let post = request(server.addr, "POST", "/status").await;
        assert_eq!(post.status, 405);
        assert!(
            post.headers.contains("allow: get"),
            "headers {:?}",
            post.headers
        );
        // The known routes still answer afterwards.
        assert_eq!(request(server.addr, "GET", "/metrics").await.status, 200);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_the_server_and_refuses_new_connections() {
    bounded(async {
        let server = Server::start(sample()).await;
        let addr = server.addr;
        // A keep-alive connection, idle after one answered request, as a scraper
        // leaves it: it must not hold the shutdown up.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nok\n") {
            let mut buf = [0u8; 512];
            let n = idle.read(&mut buf).await.unwrap();
            assert_ne!(
                n,
                0,
                "closed before answering: {:?}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200 "));

        let started = tokio::time::Instant::now();
        server.stop().await.unwrap();
        let took = started.elapsed();
        // Well under the 1 s grace: idle connections are closed, not waited for.
        assert!(took < Duration::from_millis(500), "shutdown took {took:?}");

        let err = TcpStream::connect(addr)
            .await
            .expect_err("connecting after shutdown must fail");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        // The server closed the idle connection: EOF, no bytes.
        let mut buf = [0u8; 16];
        assert_eq!(idle.read(&mut buf).await.unwrap(), 0);
    })
    .await;
}

#[test]
fn render_status_shows_each_backend_with_its_health_and_numbers() {
    let table = table::render_status(&sample());
    let row = |address: &str| -> Vec<&str> {
        let line = table
            .lines()
            .find(|l| l.starts_with(address))
            .unwrap_or_else(|| panic!("no row for {address} in\n{table}"));
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    };
    assert_eq!(
        row(HEALTHY),
        [
            HEALTHY, "0", "1", "static", "ready", "yes", "ok", "12.5", "4000", "1.2 MiB", "17"
        ],
        "\n{table}"
    );
    assert_eq!(
        row(UNHEALTHY),
        [
            UNHEALTHY,
            "1",
            "2",
            "discovered, leaving",
            "down",
            "no",
            "timeout",
            "400.0",
            "0",
            "0 B",
            "0"
        ],
        "\n{table}"
    );
    assert_eq!(
        row(VIP),
        [VIP, "yes", "vrrp master", "5000", "2.0 KiB", "17"],
        "\n{table}"
    );
    assert!(!table.contains("WARNING"), "\n{table}");
    let elected = table
        .lines()
        .find(|l| l.starts_with("192.0.2.10 "))
        .unwrap_or_else(|| panic!("no election row in\n{table}"));
    let cells: Vec<&str> = elected
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        cells,
        [
            "192.0.2.10",
            "vrrp",
            "master",
            "150",
            "1",
            "master down timer expired"
        ],
        "\n{table}"
    );
    assert!(table.contains("VRRP adverts refused: ttl 2"), "\n{table}");

    // Columns line up: the health word starts under the HEALTH header.
    let header = table.lines().find(|l| l.starts_with("BACKEND")).unwrap();
    let column = header.find("HEALTH").unwrap();
    for (address, word) in [(HEALTHY, "ready"), (UNHEALTHY, "down")] {
        let line = table.lines().find(|l| l.starts_with(address)).unwrap();
        assert_eq!(line.find(word), Some(column), "\n{table}");
    }
    assert!(!table.contains('\x1b'), "no colour codes");
}

#[test]
fn render_status_shows_a_sync_row_per_peer_with_its_links_records_and_faults() {
    let table = table::render_status(&sample_with_sync());
    let cells = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let row = |peer: &str| {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{peer} ")))
            .unwrap_or_else(|| panic!("no row for {peer} in\n{table}"));
        cells(line)
    };
    let header = table
        .lines()
        .find(|l| l.starts_with("SYNC PEER"))
        .unwrap_or_else(|| panic!("no sync table in\n{table}"));
    assert_eq!(
        cells(header),
        [
            "SYNC PEER",
            "EXPORT",
            "IMPORT",
            "RECORDS IN",
            "RECORDS OUT",
            "REJECTED",
            "LAST ERROR"
        ]
    );
    assert_eq!(
        row("lb2"),
        [
            "lb2",
            "up, lag 1.5 ms",
            "up, lag 0.0 ms",
            "1200",
            "3400",
            "auth 2, unknown_vip 1",
            "-"
        ],
        "\n{table}"
    );
    assert_eq!(
        row("lb3"),
        [
            "lb3",
            "connecting, resync due",
            "down",
            "0",
            "0",
            "-",
            "export: connection refused (os error 111)"
        ],
        "\n{table}"
    );
    let lines: Vec<&str> = table.lines().collect();
    for line in [
        "Sync connections refused before a peer was known: unknown_peer 3",
        "Sync flow events lost before reaching the peers: 5",
    ] {
        assert!(lines.contains(&line), "no line {line:?} in\n{table}");
    }
    // The sync table sits between the elected VIPs and the backends.
    let at = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(at("ELECTED VIP") < at("SYNC PEER") && at("SYNC PEER") < at("BACKEND"));

    let off = table::render_status(&sample());
    assert!(!off.contains("SYNC"), "sync off, no sync table:\n{off}");
}

#[test]
fn render_status_warns_when_failing_open() {
    let mut snapshot = sample();
    snapshot.fail_open = true;
    let table = table::render_status(&snapshot);
    let warning = table.lines().nth(1).unwrap_or_default();
    assert!(warning.starts_with("WARNING: failing open"), "\n{table}");
}

#[test]
fn render_status_says_where_discovery_stands_and_metrics_count_its_refusals() {
    let snapshot = Snapshot {
        discovery: Some(lb_userspace::discovery::DiscoveryStatus {
            state: "unreadable".to_owned(),
            resource_version: "42".to_owned(),
            server: "198.51.100.11:6443".to_owned(),
            last_error: "403 Forbidden".to_owned(),
            lists: 3,
            expired: 1,
            accepted: 5,
            refusals: vec![("empty".to_owned(), 0), ("healthy_dropped".to_owned(), 2)],
        }),
        ..sample()
    };
    let table = table::render_status(&snapshot);
    let line = table.lines().nth(1).unwrap_or_default();
    assert_eq!(
        line,
        "discovery: unreadable, resourceVersion 42 from 198.51.100.11:6443; 3 list(s) (1 after \
         410 Gone), 5 update(s) taken; refused: empty 0, healthy_dropped 2; last error: 403 Forbidden",
        "\n{table}"
    );
    let text = metrics::render_metrics(&snapshot).expect("metrics");
    for expected in [
        r#"apilb_discovery_state{state="unreadable"} 1"#,
        r#"apilb_discovery_state{state="synced"} 0"#,
        "apilb_discovery_resource_version 42",
        "apilb_discovery_lists_total 3",
        "apilb_discovery_watches_expired_total 1",
        "apilb_discovery_slice_updates_total 5",
        r#"apilb_discovery_refusals_total{reason="empty"} 0"#,
        r#"apilb_discovery_refusals_total{reason="healthy_dropped"} 2"#,
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "no {expected:?} in\n{text}"
        );
    }
    assert!(
        !metrics::render_metrics(&sample())
            .unwrap()
            .contains("apilb_discovery_")
    );
}
