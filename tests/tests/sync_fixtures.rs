//! Flow sync through two real datapaths, run with `BPF_PROG_TEST_RUN`: a flow
//! established on the VIP's owner is exported through `SYNC_EVENTS`, carried as a
//! wire record, installed on a peer that does not own the VIP (where it stays
//! unused), and carried by that peer, same master, same NAT port, same source,
//! the moment it owns the VIP. Root and BPF, as the other fixtures.

use std::net::{IpAddr, SocketAddr};

use lb_common::{
    PROG_XDP, SyncEvent,
    ct::{CT_ESTABLISHED, FLOW_F_FROM_PEER},
};
use lb_userspace::{
    datapath::Vip,
    sync::install::{entries_of, record_of},
};
use tests::{
    fixture::*,
    flowfx::{CLIENT4, VIP4, client_syn},
    packets::Tcp,
};

const MASTER: &str = "198.51.100.11:6443";

/// `CLOCK_MONOTONIC_COARSE`, the datapath's clock, in ns.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0);
    u64::try_from(ts.tv_sec).expect("s") * 1_000_000_000 + u64::try_from(ts.tv_nsec).expect("ns")
}

#[test]
fn a_flow_synced_to_a_peer_is_carried_there_once_the_peer_owns_the_vip() {
    let master = sa(MASTER);
    let vip: IpAddr = sa(VIP4).ip();
    let mut cfg = LabConfig::new(&[sa(VIP4)], &[master]);
    cfg.vips[0].1 = true;
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

/// The VIP's owner, with a flow from `CLIENT4` established through it on a VIP
/// that syncs: the owner, the client's ACK, the flow's NAT port, and the event
/// the datapath exported for it.
fn owner_with_a_synced_flow(cfg: &LabConfig) -> (Lab, Tcp, u16, SyncEvent) {
    let (master, vip) = (sa(MASTER), sa(VIP4).ip());
    let mut owner = Lab::with_config("apilb-fx-sya", cfg);
    owner.set_owned(vip, true);
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
    let mut events = owner.dp.take_sync_events().expect("the sync ring");
    // The handshake: SYN, the master's SYN-ACK to VIP:port, ACK.
    let mut run = |seg: &Tcp, ingress| owner.test_run(PROG_XDP, &seg.build(), ingress).action;
    let syn = client_syn(CLIENT4, VIP4);
    assert_eq!(run(&syn, Ingress::ClientSide), XDP_REDIRECT);
    let half = owner.dp.half_open_flows().expect("half-open");
    let port = u16::from_be(half[0].1.nat_port_be);
    let mut syn_ack = Tcp::syn(master_mac(1), FX1_MAC, master, SocketAddr::new(vip, port));
    syn_ack.ack = Some(syn.seq + 1);
    let mut run = |seg: &Tcp, ingress| owner.test_run(PROG_XDP, &seg.build(), ingress).action;
    assert_eq!(run(&syn_ack, Ingress::MasterSide), XDP_REDIRECT);
    let mut ack = syn.clone().data(b"");
    ack.ack = Some(0x1000_0001);
    assert_eq!(run(&ack, Ingress::ClientSide), XDP_REDIRECT);
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
