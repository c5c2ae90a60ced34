//! Real frames through the XDP program attached (native mode) to veths: a client
//! namespace, an LB namespace holding the VIP, and a master namespace running a TCP
//! server. The master's neighbour is unresolved when the first SYN arrives, so that
//! SYN takes the FIB-miss path: rewritten and handed to the LB's stack, which must
//! accept a packet whose source is its own SNAT address (`accept_local`, set by
//! `Datapath::attach`) and resolve the neighbour for the packets after it.
//!
//! Needs root. Addresses (documentation ranges, only inside these namespaces, none
//! with a default route): client 192.0.2.10/24 on c0; LB 192.0.2.1/24 and the VIP
//! 192.0.2.100/32 on l0, 198.51.100.1/24 on l1; master 198.51.100.11/24 on m0.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_common::counters::*;
use lb_userspace::datapath::{Datapath, LoadOptions, NodeConfig, Vip, XdpMode};
use tests::{
    fixture::{chain, sa},
    netns::{self, Netns},
};

const VIP: &str = "192.0.2.100:6443";
const MASTER: &str = "198.51.100.11:6443";
const CONNECTIONS: usize = 5;

struct Topology {
    client: Netns,
    lb: Netns,
    master: Netns,
}

fn topology() -> Topology {
    let t = Topology {
        client: Netns::new("apilb-live-c"),
        lb: Netns::new("apilb-live-l"),
        master: Netns::new("apilb-live-m"),
    };
    t.lb.ip(&[
        "link",
        "add",
        "l0",
        "type",
        "veth",
        "peer",
        "name",
        "c0",
        "netns",
        t.client.name(),
    ]);
    t.lb.ip(&[
        "link",
        "add",
        "l1",
        "type",
        "veth",
        "peer",
        "name",
        "m0",
        "netns",
        t.master.name(),
    ]);
    for (ns, dev, addrs) in [
        (&t.client, "c0", &["192.0.2.10/24"][..]),
        (&t.lb, "l0", &["192.0.2.1/24", "192.0.2.100/32"][..]),
        (&t.lb, "l1", &["198.51.100.1/24"][..]),
        (&t.master, "m0", &["198.51.100.11/24"][..]),
    ] {
        for a in addrs {
            ns.ip(&["addr", "add", a, "dev", dev]);
        }
        ns.ip(&["link", "set", dev, "up"]);
    }
    t.lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    // Their own sends must carry full checksums, as frames off a wire do, rather
    // than veth's offloaded partial ones.
    for (ns, dev) in [(&t.client, "c0"), (&t.master, "m0")] {
        ns.exec("ethtool", &["-K", dev, "tx", "off"]);
    }
    t
}

/// Serve `n` connections on the master: read a line, answer with the peer address.
fn serve(master: &Netns, n: usize, ready: mpsc::Sender<()>) -> thread::JoinHandle<Vec<SocketAddr>> {
    let name = master.name().to_owned();
    thread::spawn(move || {
        let _inside = netns::enter(&name);
        let listener = TcpListener::bind(MASTER).expect("bind the master's port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        ready.send(()).expect("signal ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut peers = Vec::new();
        while peers.len() < n && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    conn.set_nonblocking(false).expect("blocking conn");
                    conn.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    let mut line = String::new();
                    BufReader::new(&conn)
                        .read_line(&mut line)
                        .expect("request line");
                    writeln!(conn, "master saw {peer}").expect("answer");
                    peers.push(peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        peers
    })
}

/// The balancer on the LB's two veths, configured through the map writer, and a
/// second datapath with no VIPs on the peers.
fn balancer(t: &Topology) -> (Datapath, Datapath) {
    // A veth delivers XDP_TX and redirected frames only to a peer that has NAPI on,
    // which here means an XDP program of its own (turning GRO on, the other way,
    // did not take on this kernel: see the closing note of issue 2). The peers get a
    // second datapath with no VIPs, which passes every packet.
    let mut peers = Datapath::load(&LoadOptions {
        flow_table_size: 16,
    })
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    for (ns, dev) in [(&t.client, "c0"), (&t.master, "m0")] {
        let _inside = ns.enter();
        peers
            .attach(dev, XdpMode::Driver)
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
    }
    let mut dp = Datapath::load(&LoadOptions {
        flow_table_size: 4096,
    })
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    {
        let _inside = t.lb.enter();
        for dev in ["l0", "l1"] {
            dp.attach(dev, XdpMode::Driver)
                .unwrap_or_else(|e| panic!("{}", chain(&e)));
        }
    }
    dp.set_node_config(&NodeConfig::new(
        Some("198.51.100.1".parse().unwrap()),
        None,
        40_000..=40_999,
    ))
    .expect("node config");
    dp.set_backend(1, sa(MASTER), false).expect("backend");
    dp.set_vip(&Vip {
        addr: sa(VIP),
        id: 0,
        ring_size: 251,
        owned: true,
    })
    .expect("vip");
    let ring: Vec<(u32, u32)> = (0..251).map(|slot| (slot, 1)).collect();
    dp.write_maglev(0, &ring).expect("ring");
    for dev in ["l0", "l1"] {
        let v = t.lb.exec(
            "sysctl",
            &["-n", &format!("net.ipv4.conf.{dev}.accept_local")],
        );
        assert_eq!(v.trim(), "1", "attach set accept_local on {dev}");
    }

    (dp, peers)
}

#[test]
fn tcp_connections_through_the_attached_datapath_reach_the_master_via_nat() {
    let t = topology();
    let (dp, _peers) = balancer(&t);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = serve(&t.master, CONNECTIONS, ready_tx);
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("master listening");

    let mut answers = Vec::new();
    {
        let _inside = t.client.enter();
        for _ in 0..CONNECTIONS {
            let mut conn = TcpStream::connect_timeout(&sa(VIP), Duration::from_secs(5))
                .unwrap_or_else(|e| {
                    panic!("connect to the VIP: {e}; counters {:?}", dp.counters())
                });
            conn.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            assert_eq!(
                conn.peer_addr().expect("peer"),
                sa(VIP),
                "the client talks to the VIP"
            );
            conn.write_all(b"hello\n").expect("send");
            let mut line = String::new();
            BufReader::new(&conn)
                .read_line(&mut line)
                .expect("answer from the master");
            answers.push(line.trim().to_owned());
        }
    }
    let peers = server.join().expect("server thread");
    assert_eq!(
        peers.len(),
        CONNECTIONS,
        "the master accepted every connection"
    );
    let ports: HashSet<u16> = peers.iter().map(SocketAddr::port).collect();
    for (peer, answer) in peers.iter().zip(&answers) {
        assert_eq!(
            peer.ip().to_string(),
            "198.51.100.1",
            "the master sees the LB's SNAT address"
        );
        assert!(
            (40_000..=40_999).contains(&peer.port()),
            "NAT port {} in range",
            peer.port()
        );
        assert_eq!(answer, &format!("master saw {peer}"));
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
        c.get(REDIRECT) >= 4 * CONNECTIONS as u64,
        "both directions were redirected by XDP"
    );
    assert_eq!(
        c.get(DROP_NO_NAT_PORT) + c.get(DROP_NO_BACKEND) + c.get(DROP_FLOW_INSERT),
        0
    );
}
