//! Node-local mode (issue 7): processes on the LB node itself connect to the VIP,
//! and `apilb run` balances their `connect()` calls with its socket programs. The
//! VIP is on no interface and has no election: only the socket programs make it
//! reachable. Real processes in the `tests::cluster` topology, echo masters that
//! name themselves; the programs see only the LB node's namespace.

use std::{
    collections::HashMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Shape, Topology, VIP, apilb_config},
    fixture::sa,
    live::{Apilb, Client, EchoServer, PinDir, TempDir},
};

const LIFETIME: Duration = Duration::from_mins(2);
const LOCALHOST: &str = "127.0.0.1:6443";
/// Connects for the spread.
const N: usize = 3000;

/// A topology whose VIP is on no interface, echo masters, and `apilb run` in
/// node-local mode on the LB node. Field order is drop order.
struct Local {
    apilb: Apilb,
    masters: Vec<Option<EchoServer>>,
    _pins: PinDir,
    _dir: TempDir,
    t: Topology,
}

impl Local {
    fn start(prefix: &str) -> Self {
        let t = Topology::with_shape(
            prefix,
            Shape {
                vip_on_first_lb: false,
                ..Shape::default()
            },
        );
        let masters = MASTERS
            .iter()
            .enumerate()
            .map(|(i, m)| Some(EchoServer::start(&t.masters[i], m, LIFETIME)))
            .collect();
        let pins = PinDir::new(prefix);
        let dir = TempDir::new(prefix);
        let config = dir.0.join("apilb.toml");
        let mut text = apilb_config(
            &pins.instance(),
            "maglev_size = 1009",
            "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\njitter = 0.0",
        );
        text.push_str("[local]\nenabled = true\naddresses = [\"127.0.0.1:6443\"]\n");
        std::fs::write(&config, text).expect("config");
        let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
        assert!(
            apilb.wait_log("datapath updated", Duration::from_secs(15)),
            "apilb did not start:\n{}",
            apilb.log_text()
        );
        let local = Self {
            apilb,
            masters,
            _pins: pins,
            _dir: dir,
            t,
        };
        local.wait_spread(Duration::from_secs(10), |m| m.len() == 3);
        local
    }

    /// `n` new connections from the LB node to `to`: how many each master answered
    /// (by address), and how many failed.
    fn spread(&self, to: SocketAddr, n: usize) -> (HashMap<String, usize>, usize) {
        let mut by = HashMap::new();
        let mut failed = 0;
        for _ in 0..n {
            match Client::connect_to(self.t.lb(), to).and_then(|mut c| c.ask_master()) {
                Ok(m) => *by.entry(m).or_insert(0) += 1,
                Err(_) => failed += 1,
            }
        }
        (by, failed)
    }

    /// Wait (bounded) until 30 connections to the VIP all succeed and spread as
    /// `pred` wants.
    fn wait_spread(&self, limit: Duration, pred: impl Fn(&HashMap<String, usize>) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let (by, failed) = self.spread(sa(VIP), 30);
            if failed == 0 && pred(&by) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "spread {by:?}; apilb's log:\n{}",
                self.apilb.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self) -> String {
        self.t
            .lb()
            .exec("curl", &["-sf", "http://127.0.0.1:9464/metrics"])
    }
}

#[test]
fn the_nodes_own_connects_to_the_vip_reach_the_masters_and_name_the_vip_as_peer() {
    let local = Local::start("apilb-local");
    for to in [VIP, LOCALHOST] {
        let mut c = Client::connect_to(local.t.lb(), sa(to)).expect("connect");
        let master = c.ask_master().expect("answer");
        assert!(MASTERS.contains(&master.as_str()), "{master}");
        assert_eq!(c.peer(), sa(to), "getpeername names what was asked for");
    }
    // Sockets of other namespaces are left alone: the client's connect goes out as
    // asked, to a VIP no one holds here.
    assert!(
        Client::connect_to(&local.t.client, sa(VIP)).is_err(),
        "only the LB node's own sockets are balanced"
    );

    let started = Instant::now();
    let (by, failed) = local.spread(sa(VIP), N);
    eprintln!(
        "local: {N} connects in {:.2} s: {by:?}, {failed} failed",
        started.elapsed().as_secs_f64()
    );
    assert_eq!((by.len(), failed), (3, 0), "{by:?}");
    for (m, n) in &by {
        assert!(
            n * 3 * 10 >= N * 9 && n * 3 * 10 <= N * 11,
            "{m} got {n} of {N}: not within 10 % of equal"
        );
    }
    thread::sleep(Duration::from_millis(1100)); // the snapshot is republished every second
    let counted: u64 = local
        .metrics()
        .lines()
        .filter(|l| l.starts_with("apilb_backend_local_connects_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(counted >= N as u64, "local connects counted: {counted}");
}

#[test]
fn a_dead_master_gets_no_new_local_connects_and_the_others_keep_theirs() {
    let mut local = Local::start("apilb-localdie");
    // Open connections to each master first.
    let mut open: Vec<(String, Client)> = Vec::new();
    while open.len() < 12 {
        let mut c = Client::connect_to(local.t.lb(), sa(VIP)).expect("connect");
        let m = c.ask_master().expect("answer");
        open.push((m, c));
    }
    let dead = MASTERS[1];
    drop(local.masters[1].take());
    let died = Instant::now();
    local.wait_spread(Duration::from_secs(5), |by| !by.contains_key(dead));
    eprintln!(
        "local: no new connect reaches {dead} {:.2} s after it died",
        died.elapsed().as_secs_f64()
    );
    let (by, failed) = local.spread(sa(VIP), 300);
    assert_eq!((by.len(), failed), (2, 0), "{by:?}");
    for (m, c) in open.iter_mut().filter(|(m, _)| m != dead) {
        assert_eq!(&c.ask_master().expect("still open"), m);
    }
}
