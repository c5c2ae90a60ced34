//! Container networks (issue 20, item 6): the LB node's interface is a veth
//! whose peer keeps the partial checksums the client and the masters send with
//! offload on, as in kind clusters and containerlab. The router finishes in
//! software whatever leaves the LB node still partial (`Shape::tx_offload`), so
//! a wrong checksum would be counted by the receiving kernel
//! (`TcpInCsumErrors`), and a segment it drops would fail a connection.
//!
//! Run in native mode, which the topology's peer programs make work on a veth,
//! and in the generic mode `auto` takes on a veth, where the kernel keeps each
//! packet's socket buffer and the datapath must leave the checksum partial.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tests::{
    cluster::Shape,
    live::{https_via_vip, metric_sum, metrics},
    netns::Netns,
    plane::ControlPlane,
};

/// New https connections through the VIP, each a TLS handshake whose
/// certificate flight fills full-size segments.
const CONNECTIONS: usize = 60;

/// `Tcp: InCsumErrors` from `/proc/net/snmp` in `ns`: segments its stack
/// dropped for a bad checksum.
fn csum_errors(ns: &Netns) -> u64 {
    let snmp = ns.exec("cat", &["/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .expect("InCsumErrors");
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// Balance through a veth with offload on its peer, which runs XDP if
/// `peer_xdp`; apilb's log.
/// apilb's `/metrics` from a snapshot taken after now: it takes one a second.
fn fresh_metrics(lb: &Netns) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(lb);
        let taken = m
            .lines()
            .find_map(|l| l.strip_prefix("apilb_snapshot_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if taken > now || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn balances_partial_checksums(prefix: &str, peer_xdp: bool, datapath: &str) -> String {
    let shape = Shape {
        tx_offload: true,
        peer_xdp,
        ..Shape::default()
    };
    let p = ControlPlane::start_configured(prefix, shape, datapath, "");
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..CONNECTIONS {
        match https_via_vip(&p.t.client, p.ca(), "/version") {
            Some(master) => *by.entry(master).or_default() += 1,
            None => failed += 1,
        }
    }
    let m = fresh_metrics(p.t.lb());
    let partial = metric_sum(&m, "apilb_datapath_packets_total{counter=\"csum_partial\"}");
    let errors: Vec<u64> = std::iter::once(&p.t.client)
        .chain(&p.t.masters)
        .map(csum_errors)
        .collect();
    println!(
        "{prefix}: {CONNECTIONS} connections, {failed} failed, by master {by:?}; \
         {partial} partial checksums finished; checksum errors (client, masters) {errors:?}"
    );
    assert_eq!(
        failed,
        0,
        "connections failed; apilb:\n{}",
        p.apilb.log_text()
    );
    assert_eq!(errors, vec![0; 4], "bad checksums reached an endpoint");
    assert_eq!(by.len(), 3, "every master served: none was taken out");
    // Both directions, every segment of every connection arrived partial.
    assert!(
        partial >= 10 * CONNECTIONS as u64,
        "only {partial} partial checksums seen"
    );
    p.apilb.log_text()
}

/// Native mode, as the topology's peer programs allow.
#[test]
fn native_mode_on_a_veth_finishes_partial_checksums() {
    let log = balances_partial_checksums("apilb-vo-native", true, "");
    assert!(log.contains("mode=Driver"), "{log}");
}

/// `auto`, which takes generic mode on a veth: there native mode would send
/// back frames that a peer without XDP of its own, as here, drops (every
/// connection failed when this topology's LB node ran native).
#[test]
fn auto_mode_takes_generic_on_a_veth_and_keeps_partial_checksums_partial() {
    let log = balances_partial_checksums("apilb-vo-auto", false, "xdp_mode = \"auto\"");
    assert!(
        log.contains("XDP attached interface=eth0 mode=Skb"),
        "auto on a veth attaches in generic mode:\n{log}"
    );
}
