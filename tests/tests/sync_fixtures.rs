//! Flow sync through two real datapaths, run with `BPF_PROG_TEST_RUN`: a flow
//! established on the VIP's owner is exported through `SYNC_EVENTS`, carried as a
//! wire record, installed on a peer that does not own the VIP (where it stays
//! unused), and carried by that peer, same master, same NAT port, same source,
//! the moment it owns the VIP. Root and BPF, as the other fixtures.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use lb_common::{
    PROG_XDP, SyncEvent,
    counters::DROP_SYNC_DOWN,
    ct::{CT_ESTABLISHED, CT_SYN_RECV, FLOW_F_FROM_PEER},
};
use lb_userspace::{
    datapath::Vip,
    sync::{
        install::{entries_of, record_of, stale},
        key::read_key,
        links::{LinksConfig, PeerConfig},
        node::{SyncNode, coarse_ns},
        wire::{Hello, NodeName},
    },
};
use tests::{
    fixture::*,
    flowfx::{CLIENT4, VIP4, client_syn},
    packets::Tcp,
};

const MASTER: &str = "198.51.100.11:6443";

#[test]
fn a_flow_synced_to_a_peer_is_carried_there_once_the_peer_owns_the_vip() {
    let master = sa(MASTER);
    let vip: IpAddr = sa(VIP4).ip();
    let cfg = elected_vip4();
    let (owner, ack, port, event) = owner_with_a_synced_flow(&cfg);
    let mut peer = Lab::with_config("apilb-fx-syb", &cfg);
    let at_vip = SocketAddr::new(vip, port);
    let run = |lab: &mut Lab, seg: &Tcp, ingress| lab.test_run(PROG_XDP, &seg.build(), ingress);

    // Exported, as the peers will be told it.
    let record = record_of(&event, &owner.sync_view(), coarse_ns()).expect("a record");
    assert_eq!(
        (
            record.client,
            record.vip,
            record.backend,
            record.snat,
            record.nat_port,
            record.state
        ),
        (sa(CLIENT4), sa(VIP4), master, vip, port, CT_ESTABLISHED)
    );

    // Installed on the peer, which does not own the VIP: parked, unused.
    let (key, flow, rkey, reply) =
        entries_of(&record, &peer.sync_view(), coarse_ns()).expect("entries");
    assert!(
        peer.dp
            .install_peer_flow(&key, &flow, &rkey, &reply)
            .expect("install")
    );
    // The same port reused by another client on the owner: its record replaces
    // the parked flow the lease named, and the first comes back after.
    let mut reused = record;
    reused.client = sa("192.0.2.10:51099");
    let (k2, f2, rk2, r2) = entries_of(&reused, &peer.sync_view(), coarse_ns()).expect("entries");
    assert!(
        peer.dp
            .install_peer_flow(&k2, &f2, &rk2, &r2)
            .expect("install")
    );
    assert_eq!(
        peer.dp.flows().expect("flows").len(),
        1,
        "the earlier parked flow went"
    );
    assert!(
        peer.dp
            .install_peer_flow(&key, &flow, &rkey, &reply)
            .expect("install")
    );
    assert_eq!(peer.dp.flows().expect("flows").len(), 1);
    let data = ack.clone().data(b"GET /readyz");
    assert_eq!(run(&mut peer, &data, Ingress::ClientSide).action, XDP_PASS);
    assert_eq!(
        peer.dp
            .counters()
            .expect("c")
            .get(lb_common::counters::FLOW_NEW),
        0
    );

    // The peer takes the VIP over: the client's next segment leaves exactly as it
    // would have from the owner, and the master's answer reaches the client.
    peer.set_owned(vip, true);
    let out = run(&mut peer, &data, Ingress::ClientSide);
    let natted = data
        .clone()
        .via(FX1_MAC, master_mac(1))
        .between(at_vip, master);
    assert_eq!((out.action, out.packet), (XDP_REDIRECT, natted.build()));
    let answer = Tcp::syn(master_mac(1), FX1_MAC, master, at_vip).data(b"ok");
    let out = run(&mut peer, &answer, Ingress::MasterSide);
    let back = answer
        .clone()
        .via(FX0_MAC, CLIENT_MAC)
        .between(sa(VIP4), sa(CLIENT4));
    assert_eq!((out.action, out.packet), (XDP_REDIRECT, back.build()));
    let c = peer.dp.counters().expect("counters");
    assert_eq!(
        (
            c.get(lb_common::counters::FLOW_NEW),
            c.get(lb_common::counters::REPLY_HIT)
        ),
        (0, 1),
        "no new flow: the synced one carried both directions"
    );
    // The first plain segment re-anchored the record and cleared the mark.
    let carried = peer.dp.flows().expect("flows")[0].1;
    assert_eq!(carried.flags & FLOW_F_FROM_PEER, 0);
    assert_eq!(carried.seq, data.seq);
}

/// The liveness gate: a node whose controller is gone (nothing listens at its
/// sync address) keeps its program and the VIP until another node takes over, but
/// opens no synced flow meanwhile: the client's SYN is dropped, and so is the
/// master's SYN-ACK to a SYN that passed just before. With the listener there,
/// both pass.
#[test]
fn without_its_sync_listener_a_node_opens_no_synced_flow() {
    let cfg = elected_vip4();
    let mut owner = owner_lab("apilb-fx-syg", &cfg);
    // The controller writes its `[sync] listen` address; the lab has no `[sync]`.
    let listen = sa("127.0.0.1:9465");
    let mut node = owner.desired().node.clone();
    node.sync_listener = Some(listen);
    owner.dp.set_node_config(&node).expect("node config");
    let gated = |lab: &Lab| lab.dp.counters().expect("counters").get(DROP_SYNC_DOWN);
    let syn = client_syn(CLIENT4, VIP4);
    let run = |lab: &mut Lab, seg: &Tcp, ingress| lab.test_run(PROG_XDP, &seg.build(), ingress);

    // No listener: the SYN is dropped and holds nothing.
    assert_eq!(run(&mut owner, &syn, Ingress::ClientSide).action, XDP_DROP);
    assert_eq!(gated(&owner), 1);
    assert_eq!(owner.dp.half_open_flows().expect("half-open").len(), 0);

    // The controller is back (its listener, in the lab's namespace, where the
    // program runs): the SYN opens a flow.
    let listener = std::net::TcpListener::bind(listen).expect("listen");
    assert_eq!(
        run(&mut owner, &syn, Ingress::ClientSide).action,
        XDP_REDIRECT
    );
    let half = owner.dp.half_open_flows().expect("half-open");
    assert_eq!(half.len(), 1);
    let port = u16::from_be(half[0].1.nat_port_be);

    // Gone again before the master answers: its SYN-ACK is dropped, the flow
    // stays half-open, and the master is not blamed (it answered).
    drop(listener);
    let syn_ack = master_syn_ack(&syn, sa(VIP4).ip(), port);
    assert_eq!(
        run(&mut owner, &syn_ack, Ingress::MasterSide).action,
        XDP_DROP
    );
    assert_eq!(gated(&owner), 2);
    let half = owner.dp.half_open_flows().expect("half-open");
    assert_eq!((half.len(), half[0].1.state), (1, CT_SYN_RECV));

    // Back: the master's SYN-ACK retransmit goes through to the client.
    let _listener = std::net::TcpListener::bind(listen).expect("listen");
    assert_eq!(
        run(&mut owner, &syn_ack, Ingress::MasterSide).action,
        XDP_REDIRECT
    );
    assert_eq!(gated(&owner), 2);
}

/// A flow parked on a peer that its owner stopped speaking of (its close lost
/// with a broken link) goes, lease and all, once it has been silent for its
/// state's timeout and a resync interval; a fresh one stays, and so does any on
/// a VIP the peer owns.
#[test]
fn a_parked_flow_its_owner_stopped_speaking_of_is_swept_with_its_lease() {
    let mut cfg = elected_vip4();
    // The shortest `established` allowed, not the hour of the default: the old
    // record's age must stay below the machine's uptime, or its last-seen time
    // clamps to boot and it reads younger than it is (a fresh CI machine).
    cfg.tcp_timeouts.established = cfg.tcp_timeouts.time_wait;
    let (owner, _, _, event) = owner_with_a_synced_flow(&cfg);
    let mut peer = Lab::with_config("apilb-fx-syw", &cfg);
    let fresh = record_of(&event, &owner.sync_view(), coarse_ns()).expect("a record");
    let view = peer.sync_view();
    let established_ms = view.timeouts_ms[usize::from(CT_ESTABLISHED)];
    let mut old = fresh;
    old.client = sa("192.0.2.10:51099");
    old.nat_port = fresh.nat_port + 1;
    // Silent a second longer than its timeout and the one-second slack.
    old.age_ms = established_ms + 2_000;
    let install = |lab: &mut Lab, r| {
        let (k, f, rk, rv) = entries_of(r, &lab.sync_view(), coarse_ns()).expect("entries");
        assert!(lab.dp.install_peer_flow(&k, &f, &rk, &rv).expect("install"));
    };
    install(&mut peer, &fresh);
    install(&mut peer, &old);
    let slack = 1_000_000_000;
    let sweep = |lab: &mut Lab| {
        let (view, now) = (lab.sync_view(), coarse_ns());
        lab.dp
            .sweep_parked(|k, f| stale(&view, k, f, now, slack))
            .expect("sweep")
    };
    assert_eq!(sweep(&mut peer), 1);
    let clients = |lab: &Lab| -> (Vec<u16>, Vec<u16>) {
        (
            lab.dp
                .flows()
                .expect("flows")
                .iter()
                .map(|(k, _)| u16::from_be(k.sport_be))
                .collect(),
            lab.dp
                .replies()
                .expect("replies")
                .iter()
                .map(|(_, r)| u16::from_be(r.client_port_be))
                .collect(),
        )
    };
    let port = fresh.client.port();
    assert_eq!(clients(&peer), (vec![port], vec![port]));
    // On a VIP the node owns, a flow is never swept: it may be in use.
    install(&mut peer, &old);
    peer.set_owned(sa(VIP4).ip(), true);
    assert_eq!(sweep(&mut peer), 0);
    assert_eq!(clients(&peer).0.len(), 2);
}

/// The lab config of these fixtures: `VIP4`, elected (sync carries only elected
/// VIPs' flows), over `MASTER`.
fn elected_vip4() -> LabConfig {
    let mut cfg = LabConfig::new(&[sa(VIP4)], &[sa(MASTER)]);
    cfg.vips[0].1 = true;
    cfg
}

/// A lab that owns the elected `VIP4` and exports its flows (`VIP_F_SYNC`).
fn owner_lab(prefix: &str, cfg: &LabConfig) -> Lab {
    let mut owner = Lab::with_config(prefix, cfg);
    owner.set_owned(sa(VIP4).ip(), true);
    // The controller sets `VIP_F_SYNC` once `[sync]` is configured; here it is
    // written directly: VIP id 0, the lab's ring, the VIP its own source (index 1
    // of the pool, after the node's address).
    owner
        .dp
        .set_vip(&Vip {
            addr: sa(VIP4),
            id: 0,
            ring_size: 65_537,
            owned: true,
            local: false,
            snat: (1, 1),
            sync: true,
        })
        .expect("VIP with sync");
    owner
}

/// A flow from `client` through the owner to `MASTER`, established (SYN, the
/// master's SYN-ACK to VIP:port, ACK): the client's ACK and the flow's NAT port.
fn establish(owner: &mut Lab, client: &str) -> (Tcp, u16) {
    establish_at(owner, client, VIP4)
}

/// [`establish`], to the VIP at `to`.
fn establish_at(owner: &mut Lab, client: &str, to: &str) -> (Tcp, u16) {
    let syn = client_syn(client, to);
    let port = answered(owner, &syn, to);
    let ack = client_ack(&syn);
    let action = owner
        .test_run(PROG_XDP, &ack.build(), Ingress::ClientSide)
        .action;
    assert_eq!(action, XDP_REDIRECT);
    (ack, port)
}

/// The client's `syn` to the VIP at `to` through the owner, and `MASTER`'s
/// SYN-ACK back through it: a handshake waiting for the client's ACK. Its NAT port.
fn answered(owner: &mut Lab, syn: &Tcp, to: &str) -> u16 {
    let mut run = |seg: &Tcp, ingress| owner.test_run(PROG_XDP, &seg.build(), ingress).action;
    assert_eq!(run(syn, Ingress::ClientSide), XDP_REDIRECT);
    let half = owner.dp.half_open_flows().expect("half-open");
    let port = u16::from_be(half[0].1.nat_port_be);
    let syn_ack = master_syn_ack(syn, sa(to).ip(), port);
    let mut run = |seg: &Tcp, ingress| owner.test_run(PROG_XDP, &seg.build(), ingress).action;
    assert_eq!(run(&syn_ack, Ingress::MasterSide), XDP_REDIRECT);
    port
}

/// `MASTER`'s SYN-ACK to the client's `syn`, sent to `vip`:`port` (the SNAT side).
fn master_syn_ack(syn: &Tcp, vip: IpAddr, port: u16) -> Tcp {
    let mut syn_ack = Tcp::syn(
        master_mac(1),
        FX1_MAC,
        sa(MASTER),
        SocketAddr::new(vip, port),
    );
    syn_ack.ack = Some(syn.seq + 1);
    syn_ack
}

/// The client's ACK completing the handshake of `syn`.
fn client_ack(syn: &Tcp) -> Tcp {
    let mut ack = syn.clone().data(b"");
    ack.ack = Some(0x1000_0001);
    ack
}

/// The VIP's owner, with a flow from `CLIENT4` established through it: the owner,
/// the client's ACK, the flow's NAT port, and the event the datapath exported.
fn owner_with_a_synced_flow(cfg: &LabConfig) -> (Lab, Tcp, u16, SyncEvent) {
    let mut owner = owner_lab("apilb-fx-sya", cfg);
    let mut events = owner.dp.take_sync_events().expect("the sync ring");
    let (ack, port) = establish(&mut owner, CLIENT4);
    let event = events
        .next()
        .map(|item| SyncEvent::from_bytes(&item).expect("whole"));
    (
        owner,
        ack,
        port,
        event.expect("the established flow's event"),
    )
}

/// Two sync nodes on loopback, each on its own real datapath, with a real key
/// file: a flow the owner had before its node started reaches the peer in the
/// bulk the peer asks for when it connects, and a flow made after reaches it
/// live; both are then carried by the peer once it owns the VIP.
#[test]
fn two_sync_nodes_hand_the_peer_every_flow_by_bulk_and_live() {
    let cfg = elected_vip4();
    let mut owner = owner_lab("apilb-fx-syn1", &cfg);
    let mut peer = Lab::with_config("apilb-fx-syn2", &cfg);

    // Flow A exists before the owner's node starts: its event is drained
    // unsent, so only a bulk can carry it.
    let mut events = owner.dp.take_sync_events().expect("ring");
    let (ack_a, port_a) = establish(&mut owner, CLIENT4);
    while events.next().is_some() {}
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let (a, b, _, _dir) = node_pair(&owner, events, &mut peer, &cfg, "apilb-fx-synkey");
    let installed = |n: u64| {
        let until = Instant::now() + Duration::from_secs(10);
        while b.stats().installed() < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        b.stats()
    };
    let after_bulk = installed(1);
    let from_a = &after_bulk.peers["lb1"];
    assert_eq!(
        (from_a.installed, from_a.bulks_received),
        (1, 1),
        "{after_bulk:?}"
    );
    // Flow B, made now, goes live.
    let (ack_b, port_b) = establish(&mut owner, "192.0.2.10:51001");
    let after_live = installed(2);
    assert_eq!(after_live.installed(), 2, "{after_live:?}");
    assert!(
        after_live.peers["lb1"].rejected.is_empty(),
        "{after_live:?}"
    );
    let to_b = a.stats();
    let sent = &to_b.peers["lb2"];
    assert_eq!(
        (sent.bulks_sent, sent.bulk_records_sent, to_b.exported),
        (1, 1, 1)
    );

    // The peer takes the VIP over and carries both.
    peer.set_owned(sa(VIP4).ip(), true);
    carries(&mut peer, &[(ack_a, port_a, VIP4), (ack_b, port_b, VIP4)]);
    rt.block_on(async {
        b.stop().await;
        a.stop().await;
    });
}

/// A handover's first step (`apilb run` on SIGTERM): the owner's node stops
/// listening, which shuts its datapath's gate. A new client's SYN is dropped
/// from then on (its retransmit goes to the next owner), but a client whose
/// SYN-ACK went out before still completes its handshake here, and the flush
/// that follows puts that flow on the peer, which carries it.
#[test]
fn a_node_that_stops_listening_opens_no_flow_but_exports_the_handshake_under_way() {
    let cfg = elected_vip4();
    let mut owner = owner_lab("apilb-fx-syh1", &cfg);
    let mut peer = Lab::with_config("apilb-fx-syh2", &cfg);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let events = owner.dp.take_sync_events().expect("ring");
    let (a, b, a_addr, _dir) = node_pair(&owner, events, &mut peer, &cfg, "apilb-fx-syhkey");
    // The peer's first bulk (empty) is in, so that the flow goes live.
    let until = Instant::now() + Duration::from_secs(10);
    while b
        .stats()
        .peers
        .get("lb1")
        .is_none_or(|p| p.bulks_received == 0)
    {
        assert!(Instant::now() < until, "no bulk: {:?}", b.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The owner's gate asks for its node's listener, as the controller sets it.
    let mut node = owner.desired().node.clone();
    node.sync_listener = Some(a_addr);
    owner.dp.set_node_config(&node).expect("node config");
    let gated = |lab: &Lab| lab.dp.counters().expect("counters").get(DROP_SYNC_DOWN);
    let run = |lab: &mut Lab, seg: &Tcp, ingress| lab.test_run(PROG_XDP, &seg.build(), ingress);

    // A handshake under way: the SYN through, the master's SYN-ACK through.
    let syn = client_syn(CLIENT4, VIP4);
    let port = answered(&mut owner, &syn, VIP4);

    rt.block_on(a.stop_listening());
    // A new client is refused...
    let late = client_syn("192.0.2.10:51002", VIP4);
    assert_eq!(run(&mut owner, &late, Ingress::ClientSide).action, XDP_DROP);
    assert_eq!(gated(&owner), 1);
    // ...the answered one completes, and the flush puts it on the peer.
    let ack = client_ack(&syn);
    assert_eq!(
        run(&mut owner, &ack, Ingress::ClientSide).action,
        XDP_REDIRECT
    );
    assert!(
        rt.block_on(a.flush(Duration::from_secs(5))),
        "the peer acknowledged"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while b.stats().installed() < 1 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (a.stats().exported, b.stats().installed()),
        (1, 1),
        "{:?}",
        b.stats()
    );
    peer.set_owned(sa(VIP4).ip(), true);
    carries(&mut peer, &[(ack, port, VIP4)]);
    rt.block_on(async {
        b.stop().await;
        a.stop().await;
    });
}

/// Three nodes, active-active: lb1 owns `VIP4`, lb2 owns a second VIP, lb3 owns
/// neither. Each owner's flow reaches both other nodes live (lb3 takes from two
/// peers at once), and lb3, taking both VIPs over, carries both flows.
#[test]
fn three_sync_nodes_active_active_each_hold_the_flows_of_the_vips_they_do_not_own() {
    const VIP_B: &str = "192.0.2.101:6443";
    let mut cfg = LabConfig::new(&[sa(VIP4), sa(VIP_B)], &[sa(MASTER)]);
    cfg.vips = vec![(sa(VIP4), true), (sa(VIP_B), true)];
    let mut labs = [
        synced_lab("apilb-fx-sy3a", &cfg, Some(VIP4)),
        synced_lab("apilb-fx-sy3b", &cfg, Some(VIP_B)),
        synced_lab("apilb-fx-sy3c", &cfg, None),
    ];
    let dir = tests::live::TempDir::new("apilb-fx-sy3key");
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        })
        .collect();
    let names = ["lb1", "lb2", "lb3"];
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let nodes: Vec<SyncNode> = (0..3)
        .map(|i| {
            let peers: Vec<(&str, SocketAddr)> = (0..3)
                .filter(|j| *j != i)
                .map(|j| (names[j], addrs[j]))
                .collect();
            let slice = u16::try_from(i).expect("slice");
            let lab = &mut labs[i];
            SyncNode::start(
                links_config(&dir, &cfg, (names[i], addrs[i]), &peers, slice),
                lab.dp.flow_tables().expect("tables"),
                lab.dp.take_sync_events().expect("ring"),
                lab.sync_view(),
                Duration::from_mins(10),
            )
            .expect("node")
        })
        .collect();
    // Each node's bulk from each peer has ended (empty: no flow yet).
    let until = Instant::now() + Duration::from_secs(10);
    let bulks = |n: &SyncNode| {
        n.stats()
            .peers
            .values()
            .filter(|p| p.bulks_received > 0)
            .count()
    };
    while nodes.iter().any(|n| bulks(n) < 2) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ack_a, port_a) = establish_at(&mut labs[0], CLIENT4, VIP4);
    let (ack_b, port_b) = establish_at(&mut labs[1], CLIENT4, VIP_B);
    let until = Instant::now() + Duration::from_secs(10);
    let installed = |n: &SyncNode| n.stats().installed();
    while (installed(&nodes[0]) < 1 || installed(&nodes[1]) < 1 || installed(&nodes[2]) < 2)
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let from = |n: &SyncNode, peer: &str| n.stats().peers.get(peer).map_or(0, |p| p.installed);
    assert_eq!(
        [
            from(&nodes[0], "lb2"),
            from(&nodes[1], "lb1"),
            from(&nodes[2], "lb1"),
            from(&nodes[2], "lb2"),
        ],
        [1, 1, 1, 1],
        "flows installed by node and peer"
    );
    // lb3 takes both VIPs over and carries both flows, creating none.
    let lab = &mut labs[2];
    lab.set_owned(sa(VIP4).ip(), true);
    lab.set_owned(sa(VIP_B).ip(), true);
    let vips: Vec<Vip> = lab.desired().vips.iter().map(|(v, _)| *v).collect();
    for v in vips {
        lab.dp.set_vip(&Vip { sync: true, ..v }).expect("VIP");
    }
    carries(lab, &[(ack_a, port_a, VIP4), (ack_b, port_b, VIP_B)]);
    rt.block_on(async {
        for n in nodes {
            n.stop().await;
        }
    });
}

/// `lab` carries each synced flow (a client's segment after `ack`, sent on under NAT to
/// `MASTER` from the VIP at `to`, port `port`) as its old owner did, opening
/// no flow of its own.
fn carries(lab: &mut Lab, flows: &[(Tcp, u16, &str)]) {
    for (ack, port, to) in flows {
        let data = ack.clone().data(b"GET /readyz");
        let out = lab.test_run(PROG_XDP, &data.build(), Ingress::ClientSide);
        let at_vip = SocketAddr::new(sa(to).ip(), *port);
        let natted = data
            .clone()
            .via(FX1_MAC, master_mac(1))
            .between(at_vip, sa(MASTER));
        assert_eq!((out.action, out.packet), (XDP_REDIRECT, natted.build()));
    }
    let counters = lab.dp.counters().expect("counters");
    assert_eq!(counters.get(lb_common::counters::FLOW_NEW), 0);
}

/// A lab whose elected VIPs sync (as the controller marks them with `[sync]`
/// on), owning the one at `owned`, if any.
fn synced_lab(prefix: &str, cfg: &LabConfig, owned: Option<&str>) -> Lab {
    let mut lab = Lab::with_config(prefix, cfg);
    if let Some(v) = owned {
        lab.set_owned(sa(v).ip(), true);
    }
    let vips: Vec<Vip> = lab.desired().vips.iter().map(|(v, _)| *v).collect();
    for v in vips {
        lab.dp
            .set_vip(&Vip { sync: true, ..v })
            .expect("VIP with sync");
    }
    lab
}

/// Two sync nodes on loopback with a real key file (in a directory named
/// `key_dir`, returned to be kept while they run): lb1 on `owner`'s flow tables
/// and its event ring `events`, lb2 on `peer`'s; and where lb1 listens.
fn node_pair(
    owner: &Lab,
    events: RingBuf<MapData>,
    peer: &mut Lab,
    cfg: &LabConfig,
    key_dir: &str,
) -> (SyncNode, SyncNode, SocketAddr, tests::live::TempDir) {
    let dir = tests::live::TempDir::new(key_dir);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    };
    let (a_addr, b_addr) = (free(), free());
    let links =
        |me, at, other, there, slice| links_config(&dir, cfg, (me, at), &[(other, there)], slice);
    let a = SyncNode::start(
        links("lb1", a_addr, "lb2", b_addr, 0),
        owner.dp.flow_tables().expect("tables"),
        events,
        owner.sync_view(),
        Duration::from_mins(10),
    )
    .expect("owner's node");
    let b = SyncNode::start(
        links("lb2", b_addr, "lb1", a_addr, 1),
        peer.dp.flow_tables().expect("tables"),
        peer.dp.take_sync_events().expect("ring"),
        peer.sync_view(),
        Duration::from_mins(10),
    )
    .expect("peer's node");
    (a, b, a_addr, dir)
}

/// Node `me` at `at` with `peers`, slice `slice` of as many as there are nodes,
/// the key in `dir`.
fn links_config(
    dir: &tests::live::TempDir,
    cfg: &LabConfig,
    (me, at): (&str, SocketAddr),
    peers: &[(&str, SocketAddr)],
    slice: u16,
) -> LinksConfig {
    let key_path = dir.0.join("sync.key");
    std::fs::write(&key_path, [7u8; 32]).expect("key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("mode");
    let hello = Hello {
        slice,
        slices: u16::try_from(peers.len() + 1).expect("a few nodes"),
        nat_ports: cfg.nat_ports.clone(),
        config_digest: [0; 32],
    };
    let peers = peers
        .iter()
        .map(|&(name, addr)| PeerConfig {
            name: NodeName::new(name).expect("name"),
            addr,
        })
        .collect();
    let key = read_key(&key_path).expect("key file");
    LinksConfig::new(NodeName::new(me).expect("name"), at, peers, key, hello)
}
