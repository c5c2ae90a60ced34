//! What kubelets and kubectl notice when the control plane changes under them:
//! new connections spread evenly over the masters; a master alive but not ready
//! leaves rotation and rejoins, its streams kept; a controller killed and restarted
//! fails no connection and breaks no stream; a master added by SIGHUP takes its
//! share of new connections and moves no stream; kubectl and curl reach the
//! apiservers through the VIP. Measured through the real `apilb run` in the
//! `tests::cluster` topology. All but
//! the spread (3000 plain TCP connections to echo masters, for speed) run TLS stub
//! apiservers with apilb's default probes (https `/readyz` every 500 ms, rise 2,
//! fall 2), under 30 watch streams and a new https connection every 20 ms. Each
//! prints its numbers as one `scenario ...` line. Root.
//!
//! A master killed outright, or gone silent, is caught by the datapath's passive
//! detection before any probe: `passive.rs` tests that.
//!
//! The scenarios run one at a time (`SERIAL`): they measure time, and two of them
//! sharing the machine's two CPUs would measure each other.

use std::{
    collections::HashMap,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Shape, Topology, VIP, apilb_config},
    live::{Apilb, Client, EchoServer, PinDir, TempDir},
    plane::{ControlPlane, FAILOVER_TARGET, STUB_VERSION},
    traffic::Traffic,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Continuous new connections: one started every 20 ms.
const EVERY: Duration = Duration::from_millis(20);
const STREAMS: usize = 30;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[test]
fn three_thousand_new_connections_land_on_the_three_masters_within_ten_percent_of_equal() {
    const CONNECTIONS: usize = 3000;
    let _serial = serial();
    let t = Topology::new("apilb-spread");
    let pins = PinDir::new("apilb-spread");
    let _servers: Vec<EchoServer> = MASTERS
        .iter()
        .map(|m| EchoServer::start(t.master_ns(m), m, Duration::from_mins(2)))
        .collect();
    let dir = TempDir::new("apilb-spread");
    let text = apilb_config(
        &pins.instance(),
        "nat_ports = [40000, 49999]",
        "kind = \"tcp\"",
    );
    let config = dir.0.join("apilb.toml");
    std::fs::write(&config, text).expect("config");
    let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
    assert!(
        apilb.wait_log("datapath updated", Duration::from_secs(15)),
        "log:\n{}",
        apilb.log_text()
    );

    let mut by: HashMap<String, usize> = HashMap::new();
    let mut failed = 0;
    for _ in 0..CONNECTIONS {
        match Client::connect(&t.client).and_then(|mut c| c.ask_master()) {
            Ok(m) => *by.entry(m).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    eprintln!("scenario spread: {CONNECTIONS} connections: {by:?}, {failed} failed");
    assert_eq!(failed, 0, "{by:?}");
    assert_eq!(by.len(), 3, "{by:?}");
    let equal = CONNECTIONS / 3;
    for (m, n) in &by {
        assert!(
            n.abs_diff(equal) * 10 <= equal,
            "{m} got {n} of {CONNECTIONS}, more than 10% off {equal}: {by:?}"
        );
    }
}

#[test]
fn a_master_that_is_alive_but_not_ready_leaves_rotation_keeps_its_streams_and_rejoins() {
    let _serial = serial();
    let p = ControlPlane::start("apilb-notready", Shape::default());
    let begin = Instant::now();
    let traffic = Traffic::start(&p.t.client, p.ca(), STREAMS, Some(EVERY));
    thread::sleep(Duration::from_secs(1));
    let on_it = traffic.record().watches_on("master-2");

    let failing = Instant::now();
    std::fs::write(p.readyz_fail(1), "").expect("fail /readyz");
    // Out of rotation: no new connection reaches it for a full second.
    let deadline = failing + FAILOVER_TARGET * 5 + Duration::from_secs(1);
    let left = loop {
        let r = traffic.record();
        let last = r.last_served_by("master-2", failing).unwrap_or(failing);
        if last.elapsed() > Duration::from_secs(1) || Instant::now() > deadline {
            break last - failing;
        }
        thread::sleep(Duration::from_millis(100));
    };

    let ready = Instant::now();
    std::fs::remove_file(p.readyz_fail(1)).expect("ready again");
    let deadline = ready + FAILOVER_TARGET * 5;
    let rejoined = loop {
        let r = traffic.record();
        if let Some(t) = r.first_served_by("master-2", ready) {
            break Some(t - ready);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let r = traffic.stop();
    let (_, failed) = r.spread_since(begin);
    let broken = r.broken_watches();
    eprintln!(
        "scenario not-ready: last new connection to master-2 {} after /readyz began failing; \
         back {rejoined:?} after it passed again; {failed} failed connects; broken streams \
         {broken:?} ({on_it} streams on master-2 kept)",
        secs(left),
    );
    assert!(left <= FAILOVER_TARGET * 5, "left rotation after {left:?}");
    assert!(
        rejoined.is_some_and(|d| d <= FAILOVER_TARGET * 5),
        "{rejoined:?}"
    );
    assert_eq!(
        failed, 0,
        "a not-ready master still answers: nothing may fail"
    );
    assert!(on_it > 0, "some streams were on master-2");
    assert!(
        broken.is_empty(),
        "its established streams are kept: {broken:?}"
    );
    let log = p.apilb.log_text();
    assert!(
        log.contains("not ready") && !log.contains("flows were removed"),
        "master-2 was not ready, never down:\n{log}"
    );
}

#[test]
fn a_controller_killed_and_restarted_under_load_fails_no_connection_and_breaks_no_stream() {
    let _serial = serial();
    let mut p = ControlPlane::start("apilb-ctlkill", Shape::default());
    let begin = Instant::now();
    let traffic = Traffic::start(&p.t.client, p.ca(), STREAMS, Some(EVERY));
    thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    p.kill_apilb();
    thread::sleep(Duration::from_secs(2));
    let alone = traffic.record().spread_since(killed);
    let restarted = Instant::now();
    p.restart_apilb();
    let restart_took = restarted.elapsed();
    thread::sleep(Duration::from_secs(2));
    let r = traffic.stop();
    let (all, failed) = r.spread_since(begin);
    let broken = r.broken_watches();
    eprintln!(
        "scenario controller-killed: {failed} failed connects of {}; broken streams {broken:?}; \
         with no controller for {}: {alone:?}; restart took {}",
        r.attempts.len(),
        secs(restarted - killed),
        secs(restart_took),
    );
    assert_eq!(failed, 0, "{all:?}");
    assert!(broken.is_empty(), "{broken:?}");
    assert_eq!(
        alone.0.len(),
        3,
        "the pinned datapath kept balancing: {alone:?}"
    );
}

#[test]
fn a_fourth_master_added_by_sighup_takes_a_quarter_of_new_connections_and_no_stream_moves() {
    let _serial = serial();
    let p = ControlPlane::start(
        "apilb-scale",
        Shape {
            lb_nodes: 1,
            masters: 4,
            ..Shape::default()
        },
    );
    let traffic = Traffic::start(&p.t.client, p.ca(), STREAMS, Some(EVERY / 2));
    thread::sleep(Duration::from_secs(1));
    let streams_before = traffic.record().watches_per_master();

    std::fs::write(
        &p.config,
        ControlPlane::config_text(&p.pins, &p.pki, true, "", ""),
    )
    .expect("config");
    let reloaded = Instant::now();
    p.apilb.signal(libc::SIGHUP);
    let joined = p.first_served(&traffic, "master-4", reloaded, FAILOVER_TARGET * 5);
    thread::sleep(Duration::from_secs(8));
    let r = traffic.stop();
    eprintln!(
        "scenario scale-out: master-4 served {} after SIGHUP; {}; before {streams_before:?}",
        secs(joined - reloaded),
        r.assert_joined("master-4", joined),
    );
}

/// Debian's kubectl (kubernetes-client), as `cargo xtask setup` unpacks it.
#[test]
fn kubectl_and_curl_get_the_stub_apiservers_version_through_the_vip() {
    let _serial = serial();
    let p = ControlPlane::start("apilb-kubectl", Shape::default());
    let seen = p.real_clients(&p.t.client, VIP);
    eprintln!(
        "scenario real-client: kubectl {} got server {}; curl got {}",
        seen.kubectl, seen.kubectl_got, seen.curl_got
    );
    assert_eq!(seen.kubectl_got, STUB_VERSION);
    assert_eq!(seen.curl_got, STUB_VERSION);
}
