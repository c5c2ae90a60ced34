//! Real frames through the XDP program attached (native mode) to the LB node's
//! veth, in the `tests::cluster` topology. The master's neighbour is unresolved when the first SYN
//! arrives, so that SYN takes the FIB-miss path: rewritten and handed to the LB's
//! stack, which must accept a packet whose source is its own SNAT address
//! (`accept_local`, set by `Programs::attach`) and resolve the neighbour for the
//! packets after it. Needs root.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use lb_common::counters::*;
use tests::{
    cluster::{LB_DEV, MASTERS, SNAT, Shape, Topology, VIP},
    fixture::sa,
    live::{Client, EchoServer},
};

const CONNECTIONS: usize = 5;

#[test]
fn tcp_connections_through_the_attached_datapath_reach_the_master_via_nat() {
    // Two LB nodes on the segment, as a VRRP pair would be; the VIP is the first's.
    let t = Topology::with_shape(
        "apilb-live",
        Shape {
            lb_nodes: 2,
            masters: 3,
            ..Shape::default()
        },
    );
    let balancer = t.balancer(None);
    let dp = &balancer.dp;
    let v = t.lb().exec(
        "sysctl",
        &["-n", &format!("net.ipv4.conf.{LB_DEV}.accept_local")],
    );
    assert_eq!(v.trim(), "1", "attach set accept_local on {LB_DEV}");
    let master = MASTERS[0];
    let server = EchoServer::start(t.master_ns(master), master, Duration::from_secs(30));
    let mut answers = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = Client::connect(&t.client)
            .unwrap_or_else(|e| panic!("connect: {e}; {:?}", dp.counters()));
        assert_eq!(c.peer(), sa(VIP), "the client talks to the VIP");
        answers.push(c.ask().expect("answer from the master"));
    }
    let peers = server.stop();
    // The router resolved the VIP to the first LB node only.
    let mac = |ns: &tests::netns::Netns| {
        ns.ip(&["-br", "link", "show", "dev", LB_DEV])
            .split_whitespace()
            .nth(2)
            .expect("MAC")
            .to_owned()
    };
    let neigh = t.router.ip(&["neigh", "show", "198.51.100.100"]);
    assert!(
        neigh.contains(&mac(&t.lbs[0])) && !neigh.contains(&mac(&t.lbs[1])),
        "{neigh}"
    );
    assert_eq!(
        peers.len(),
        CONNECTIONS,
        "the master accepted every connection"
    );
    let ports: HashSet<u16> = peers.iter().map(SocketAddr::port).collect();
    for (peer, answer) in peers.iter().zip(&answers) {
        assert_eq!(
            peer.ip().to_string(),
            SNAT,
            "the master sees the LB's SNAT address"
        );
        assert!(
            (40_000..=40_999).contains(&peer.port()),
            "NAT port {} in range",
            peer.port()
        );
        assert_eq!(answer, &format!("master {master} saw {peer}"));
    }
    assert_eq!(
        ports.len(),
        CONNECTIONS,
        "each connection got its own NAT port"
    );

    let c = dp.counters().expect("counters");
    assert_eq!(
        c.get(FLOW_NEW),
        CONNECTIONS as u64,
        "one flow per connection"
    );
    assert!(
        c.get(PASS_FIB_MISS) >= 1,
        "the first SYN met an unresolved master and went via the stack"
    );
    assert!(
        c.get(REPLY_HIT) >= 2 * CONNECTIONS as u64,
        "SYN-ACKs and answers came back through XDP"
    );
    assert!(
        c.get(TX) >= 4 * CONNECTIONS as u64,
        "the one-armed LB sent both directions back out of eth0 from XDP"
    );
    assert_eq!(
        c.get(DROP_NO_NAT_PORT) + c.get(DROP_NO_BACKEND) + c.get(DROP_FLOW_INSERT),
        0
    );
}
