//! Packet fixtures for the XDP datapath, run in the real kernel through
//! `BPF_PROG_TEST_RUN`. Each test loads its own datapath into its own namespace
//! (see `tests::fixture` for the lab's addresses) and provisions it as `apilb run`
//! does: a validated config, the backends' health and the owned VIPs, written by
//! the controller. Needs root and BPF, as every machine of this project has.

use std::{net::SocketAddr, time::Duration};

use lb_common::{
    FLOW_F_BACKEND_FIRST, FLOW_F_REFUSED, FLOW_F_TS, IFACE_F_PARTIAL, IFACE_F_SKB,
    counters::*,
    ct::{CT_ESTABLISHED, CT_SYN_SENT, CT_TIME_WAIT},
};
use lb_userspace::{datapath::BackendEntry, health::Health};
use tests::{
    fixture::*,
    flowfx::*,
    packets::{Mac, Tcp, arp_request, fold, icmp_unreachable, l4_offset, pseudo_sum, udp},
};

#[test]
fn non_vip_traffic_passes_unchanged() {
    let mut lab = lab("apilb-fx-nonvip");
    let node_ssh4 = client_syn(CLIENT4, "192.0.2.1:22").build();
    let node_ssh6 = client_syn(CLIENT6, "[2001:db8:1::1]:22").build();
    let vip_other_port = client_syn(CLIENT4, "192.0.2.100:80").build();
    // A master talking to the node's SNAT address, outside and inside the NAT port
    // range, with no NAT entry: not a reply of ours.
    let to_snat_low = Tcp::syn(
        master_mac(1),
        FX1_MAC,
        sa("198.51.100.11:6443"),
        sa("198.51.100.1:22"),
    )
    .build();
    let to_snat_range = Tcp::syn(
        master_mac(1),
        FX1_MAC,
        sa("198.51.100.11:6443"),
        sa("198.51.100.1:40500"),
    )
    .build();
    for f in [
        unchanged(
            "TCP to the node's own IPv4 address",
            Ingress::ClientSide,
            node_ssh4,
            PASS_NOT_VIP,
        ),
        unchanged(
            "TCP to the node's own IPv6 address",
            Ingress::ClientSide,
            node_ssh6,
            PASS_NOT_VIP,
        ),
        unchanged(
            "TCP to the VIP address on another port",
            Ingress::ClientSide,
            vip_other_port,
            PASS_NOT_VIP,
        ),
        unchanged(
            "TCP to the SNAT address below the NAT range",
            Ingress::MasterSide,
            to_snat_low,
            PASS_NOT_VIP,
        ),
        unchanged(
            "TCP to a NAT port with no flow",
            Ingress::MasterSide,
            to_snat_range,
            PASS_NOT_VIP,
        ),
        unchanged(
            "UDP to the IPv4 VIP's port",
            Ingress::ClientSide,
            udp(CLIENT_MAC, FX0_MAC, sa(CLIENT4), sa(VIP4)),
            PASS_NOT_TCP,
        ),
        unchanged(
            "UDP to the IPv6 VIP's port",
            Ingress::ClientSide,
            udp(CLIENT_MAC, FX0_MAC, sa(CLIENT6), sa(VIP6)),
            PASS_NOT_TCP,
        ),
        unchanged(
            "ARP request for the VIP",
            Ingress::ClientSide,
            arp_request(CLIENT_MAC, [192, 0, 2, 10], [192, 0, 2, 100]),
            PASS_NOT_IP,
        ),
    ] {
        lab.run(&f);
    }
    assert!(lab.all_flows().is_empty(), "non-VIP traffic created flows");
}

#[test]
fn vip_not_owned_by_this_node_passes_until_ownership_is_taken() {
    // An elected VIP, whose election this node has not won.
    let mut elected = LabConfig::new(&[sa(VIP4)], &addrs(&masters4()));
    elected.vips[0].1 = true;
    let mut lab = Lab::with_config("apilb-fx-owned", &elected);
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&unchanged(
        "SYN to a VIP owned elsewhere",
        Ingress::ClientSide,
        syn.build(),
        PASS_NOT_OWNED,
    ));
    assert!(lab.all_flows().is_empty());

    lab.set_owned(sa(VIP4).ip(), true);
    let (_, backend, mac) = picked(&lab, 0, CLIENT4, VIP4, &masters4());
    // An elected VIP is its own flows' source (`snat = "vip"`), so that the
    // master's replies follow it to whichever node holds it.
    let mut fx = new_flow_to(
        "the same SYN once this node owns the VIP, from the VIP itself",
        &syn,
        backend,
        40_000,
        mac,
    );
    fx.output = syn
        .clone()
        .via(FX1_MAC, mac)
        .between(SocketAddr::new(sa(VIP4).ip(), 40_000), backend)
        .build();
    lab.run(&fx);

    lab.set_owned(sa(VIP4).ip(), false);
    let data = syn.clone().data(b"GET /readyz");
    lab.run(&unchanged(
        "established flow after ownership moved away",
        Ingress::ClientSide,
        data.build(),
        PASS_NOT_OWNED,
    ));
}

fn syn_is_natted_to_the_maglev_pick(
    client: &str,
    vip: &str,
    vip_id: u32,
    masters: &[(u32, SocketAddr)],
) {
    let mut lab = lab("apilb-fx-syn");
    let syn = client_syn(client, vip);
    let (id, backend, mac) = picked(&lab, vip_id, client, vip, masters);
    let want = natted(&syn, backend, 40_000, mac).build();
    let got = lab.run(&Fixture {
        desc: "SYN to the VIP",
        ingress: Ingress::ClientSide,
        input: syn.build(),
        verdict: XDP_REDIRECT,
        output: want,
        counters: vec![(FLOW_NEW, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    });
    // The byte comparison already covers the checksums; say so explicitly, with
    // etherparse recomputing them from scratch over what the datapath produced.
    assert_eq!(
        checksums_valid(&got),
        (true, true),
        "rewritten packet has valid checksums"
    );
    let flows = lab.all_flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(
        (flows[0].1.backend_id, u16::from_be(flows[0].1.nat_port_be)),
        (id, 40_000)
    );
    assert_eq!(lab.all_replies().len(), 1);
    let v = lab.dp.vip_stats(vip_id).expect("vip stats");
    let b = lab.dp.backend_stats(id).expect("backend stats");
    let len = syn.build().len() as u64;
    assert_eq!((v.packets, v.bytes, v.new_flows), (1, len, 1));
    assert_eq!((b.packets, b.bytes, b.new_flows), (1, len, 1));
}

#[test]
fn ipv4_syn_is_natted_to_the_maglev_backend_with_valid_checksums() {
    syn_is_natted_to_the_maglev_pick(CLIENT4, VIP4, 0, &masters4());
}

#[test]
fn ipv6_syn_is_natted_to_the_maglev_backend_with_valid_checksums() {
    syn_is_natted_to_the_maglev_pick(CLIENT6, VIP6, 1, &masters6());
}

#[test]
fn established_flow_keeps_its_backend_after_the_ring_changes() {
    let mut lab = lab("apilb-fx-sticky");
    let masters = masters4();
    let syn = client_syn(CLIENT4, VIP4);
    let (id, backend, mac) = picked(&lab, 0, CLIENT4, VIP4, &masters);
    lab.run(&new_flow_to("SYN", &syn, backend, 40_000, mac));
    // Take the flow's backend out of the ring (its probes fail, short of down):
    // Maglev now sends this tuple elsewhere.
    lab.set_health(backend, Health::NotReady);
    assert_ne!(
        lab.maglev_pick(0, sa(CLIENT4), sa(VIP4)),
        id,
        "ring no longer picks the flow's backend"
    );
    let data = syn.clone().data(b"GET /api/v1/pods?watch=1");
    lab.run(&to_master(
        "data on the established flow after the ring changed (larger than the SYN, \
         so the FIB is asked again for its MTU check)",
        &data,
        backend,
        40_000,
        mac,
        vec![(FIB_LOOKUP, 1), (REDIRECT, 1)],
    ));
    lab.run(&to_master(
        "the same size again: the cached hop, no FIB lookup",
        &data,
        backend,
        40_000,
        mac,
        vec![(REDIRECT, 1)],
    ));
    // A new flow follows the new ring.
    let other = client_syn("192.0.2.10:51001", VIP4);
    let (new_id, new_backend, new_mac) = picked(&lab, 0, "192.0.2.10:51001", VIP4, &masters);
    assert_ne!(new_id, id);
    lab.run(&new_flow_to(
        "a new flow after the ring changed",
        &other,
        new_backend,
        40_000,
        new_mac,
    ));
}

fn reply_is_rewritten_back(client: &str, vip: &str, vip_id: u32, masters: &[(u32, SocketAddr)]) {
    let mut lab = lab("apilb-fx-reply");
    let syn = client_syn(client, vip);
    let (id, backend, mac) = picked(&lab, vip_id, client, vip, masters);
    lab.run(&new_flow_to("SYN", &syn, backend, 40_000, mac));
    let snat = SocketAddr::new(snat_for(backend.ip()), 40_000);
    let mut syn_ack = Tcp::syn(mac, FX1_MAC, backend, snat);
    syn_ack.ack = Some(syn.seq + 1);
    syn_ack.seq = 0x2000_0000;
    let back = syn_ack
        .clone()
        .via(FX0_MAC, CLIENT_MAC)
        .between(sa(vip), sa(client));
    let got = lab.run(&Fixture {
        desc: "SYN-ACK from the master to the SNAT port",
        ingress: Ingress::MasterSide,
        input: syn_ack.build(),
        verdict: XDP_REDIRECT,
        output: back.build(),
        counters: vec![(REPLY_HIT, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    });
    assert_eq!(checksums_valid(&got), (true, true));
    let b = lab.dp.backend_stats(id).expect("backend stats");
    assert_eq!(
        (b.packets, b.new_flows),
        (2, 1),
        "backend stats count both directions"
    );
}

#[test]
fn ipv4_reply_from_the_master_is_rewritten_to_vip_and_client_port() {
    reply_is_rewritten_back(CLIENT4, VIP4, 0, &masters4());
}

#[test]
fn ipv6_reply_from_the_master_is_rewritten_to_vip_and_client_port() {
    reply_is_rewritten_back(CLIENT6, VIP6, 1, &masters6());
}

#[test]
fn packets_truncated_at_each_layer_pass_with_no_byte_changed() {
    let mut lab = lab("apilb-fx-trunc");
    let syn4 = client_syn(CLIENT4, VIP4);
    let mut tagged = syn4.clone();
    tagged.vlan = Some(100);
    let mut opts = syn4.clone();
    opts.ip_options = vec![1, 1, 1, 0, 1, 1, 1, 0];
    let syn6 = client_syn(CLIENT6, VIP6);
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (and no NIC
    // delivers one), so the first cut is right after it.
    let cases: [(&'static str, Vec<u8>, usize); 8] = [
        (
            "after the Ethernet header (IPv4 ethertype)",
            syn4.build(),
            14,
        ),
        (
            "after the Ethernet header (VLAN ethertype)",
            tagged.build(),
            14,
        ),
        ("inside the VLAN tag", tagged.build(), 16),
        ("inside the IPv4 header", syn4.build(), 14 + 12),
        ("inside the IPv4 options", opts.build(), 14 + 24),
        ("inside the IPv6 header", syn6.build(), 14 + 30),
        ("inside the TCP header (IPv4)", syn4.build(), 14 + 20 + 12),
        ("inside the TCP header (IPv6)", syn6.build(), 14 + 40 + 19),
    ];
    for (desc, full, len) in cases {
        lab.run(&unchanged(
            desc,
            Ingress::ClientSide,
            full[..len].to_vec(),
            PASS_MALFORMED,
        ));
    }
    assert!(lab.all_flows().is_empty());
}

#[test]
fn ipv4_options_are_skipped_and_kept_when_natting() {
    let mut lab = lab("apilb-fx-opts");
    let mut syn = client_syn(CLIENT4, VIP4);
    // Router Alert (4 bytes) and a NOP-padded timestamp-free tail: 8 bytes, IHL 7.
    syn.ip_options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
    let (_, backend, mac) = picked(&lab, 0, CLIENT4, VIP4, &masters4());
    let want = natted(&syn, backend, 40_000, mac).build();
    let got = lab.run(&Fixture {
        desc: "SYN with 8 bytes of IPv4 options",
        ingress: Ingress::ClientSide,
        input: syn.build(),
        verdict: XDP_REDIRECT,
        output: want,
        counters: vec![(FLOW_NEW, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    });
    assert_eq!(checksums_valid(&got), (true, true));
}

#[test]
fn vlan_tagged_syn_is_natted_keeps_its_tag_and_goes_to_the_stack() {
    let mut lab = lab("apilb-fx-vlan");
    let mut syn = client_syn(CLIENT4, VIP4);
    syn.vlan = Some(100);
    let (_, backend, _) = picked(&lab, 0, CLIENT4, VIP4, &masters4());
    // Rewritten, but the MACs stay: the stack's VLAN device routes it.
    let want = syn
        .clone()
        .between(SocketAddr::new(snat_for(backend.ip()), 40_000), backend)
        .build();
    let got = lab.run(&Fixture {
        desc: "VLAN 100 SYN to the VIP",
        ingress: Ingress::ClientSide,
        input: syn.build(),
        verdict: XDP_PASS,
        output: want,
        counters: vec![(FLOW_NEW, 1), (PASS_VLAN, 1)],
    });
    assert_eq!(checksums_valid(&got), (true, true));
}

#[test]
fn ipv4_and_ipv6_fragments_pass_untouched() {
    let mut lab = lab("apilb-fx-frag");
    let mut first = client_syn(CLIENT4, VIP4).data(&[0x55; 64]);
    first.more_fragments = true;
    let mut later = client_syn(CLIENT4, VIP4).data(&[0x55; 64]);
    later.fragment_offset = 185;
    let mut frag6 = client_syn(CLIENT6, VIP6).data(&[0x55; 64]);
    frag6.more_fragments = true;
    for (desc, p) in [
        ("IPv4 first fragment (MF)", first),
        ("IPv4 later fragment", later),
        ("IPv6 fragment header", frag6),
    ] {
        lab.run(&unchanged(
            desc,
            Ingress::ClientSide,
            p.build(),
            PASS_FRAGMENT,
        ));
    }
    assert!(lab.all_flows().is_empty());
}

#[test]
fn fib_neighbour_miss_hands_the_rewritten_packet_to_the_stack() {
    let unresolved = sa("198.51.100.14:6443");
    let mut lab = Lab::with_config(
        "apilb-fx-fibmiss",
        &LabConfig::new(&[sa(VIP4)], &[unresolved]),
    );
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&Fixture {
        desc: "SYN to a VIP whose master has no neighbour entry",
        ingress: Ingress::ClientSide,
        input: syn.build(),
        verdict: XDP_PASS,
        output: syn
            .clone()
            .between(sa("198.51.100.1:40000"), unresolved)
            .build(),
        counters: vec![(FLOW_NEW, 1), (FIB_LOOKUP, 1), (PASS_FIB_MISS, 1)],
    });
}

#[test]
fn master_on_the_ingress_link_is_reached_with_xdp_tx() {
    let one_armed = sa("192.0.2.21:6443");
    let mut lab = Lab::with_config("apilb-fx-tx", &LabConfig::new(&[sa(VIP4)], &[one_armed]));
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&Fixture {
        desc: "SYN whose master is out of the interface it came in on",
        ingress: Ingress::ClientSide,
        input: syn.build(),
        verdict: XDP_TX,
        output: syn
            .clone()
            .via(FX0_MAC, ONE_ARMED_MAC)
            .between(sa("198.51.100.1:40000"), one_armed)
            .build(),
        counters: vec![(FLOW_NEW, 1), (FIB_LOOKUP, 1), (TX, 1)],
    });
}

#[test]
fn local_master_gets_the_packet_unmodified_and_the_flow_sticks() {
    let this_node = sa("192.0.2.1:6443");
    let mut setup = LabConfig::new(&[sa(VIP4)], &[this_node]);
    setup.backends[0].2 = true;
    let mut lab = Lab::with_config("apilb-fx-local", &setup);
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&Fixture {
        desc: "SYN whose master is this node",
        ingress: Ingress::ClientSide,
        input: syn.build(),
        verdict: XDP_PASS,
        output: syn.build(),
        counters: vec![(FLOW_NEW, 1), (PASS_LOCAL_BACKEND, 1)],
    });
    let data = syn.data(b"x").build();
    lab.run(&Fixture {
        desc: "data on the local flow",
        ingress: Ingress::ClientSide,
        output: data.clone(),
        input: data,
        verdict: XDP_PASS,
        counters: vec![(PASS_LOCAL_BACKEND, 1)],
    });
    let flows = lab.all_flows();
    assert_eq!(
        (flows.len(), flows[0].1.backend_id, flows[0].1.nat_port_be),
        (1, lab.backend_id(this_node), 0)
    );
    assert!(
        lab.all_replies().is_empty(),
        "a local flow needs no NAT entry"
    );
}

#[test]
fn new_flows_are_dropped_with_a_reason_when_they_cannot_be_served() {
    // The IPv4 VIP's only master is drained (weight 0), so its ring is empty; the
    // IPv6 master is there because a config needs one backend of weight above 0.
    let master = sa("198.51.100.11:6443");
    let mut drained = LabConfig::new(&[sa(VIP4)], &[master, masters6()[0].1]);
    drained.backends[0].1 = 0;
    let mut lab = Lab::with_config("apilb-fx-drop", &drained);
    let syn = client_syn(CLIENT4, VIP4);
    // A dropped frame comes back from BPF_PROG_TEST_RUN as it went in.
    let dropped = |desc, input: Vec<u8>, counter| Fixture {
        desc,
        ingress: Ingress::ClientSide,
        output: input.clone(),
        input,
        verdict: XDP_DROP,
        counters: vec![(counter, 1)],
    };
    lab.run(&dropped(
        "SYN to a VIP with an empty ring",
        syn.build(),
        DROP_NO_BACKEND,
    ));

    // Two NAT ports for one master: the third concurrent flow finds none free.
    let mut narrow = LabConfig::new(&[sa(VIP4)], &[master]);
    narrow.snat_v6 = false;
    narrow.nat_ports = 40_000..=40_001;
    lab.configure(&narrow);
    for port in [51_000, 51_001] {
        let s = client_syn(&format!("192.0.2.10:{port}"), VIP4);
        lab.run(&Fixture {
            desc: "SYN while NAT ports remain",
            ingress: Ingress::ClientSide,
            input: s.build(),
            verdict: XDP_REDIRECT,
            output: natted(
                &s,
                sa("198.51.100.11:6443"),
                40_000 + (port - 51_000),
                master_mac(1),
            )
            .build(),
            counters: vec![(FLOW_NEW, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
        });
    }
    let third = client_syn("192.0.2.10:51002", VIP4).build();
    lab.run(&dropped(
        "SYN when every NAT port towards the master is taken",
        third,
        DROP_NO_NAT_PORT,
    ));

    // IPv6 VIP with no IPv6 SNAT address configured. Config validation refuses
    // that, so the config is validated with the address and then loses it: the
    // datapath's own guard is what this checks.
    let mut six_vip = narrow.clone();
    six_vip.vips.push((sa(VIP6), false));
    six_vip
        .backends
        .extend(addrs(&masters6()).iter().map(|&a| (a, 1, false)));
    six_vip.snat_v6 = true;
    let mut config = Lab::parse(&six_vip);
    config.datapath.snat_v6 = Vec::new();
    lab.apply_config(config);
    let six = client_syn(CLIENT6, VIP6).build();
    lab.run(&dropped(
        "IPv6 SYN with no IPv6 SNAT address",
        six,
        DROP_NO_SNAT_ADDR,
    ));
}

#[test]
fn cached_next_hop_is_used_until_it_expires_then_refreshed_from_the_fib() {
    let (mut lab, master) = one_master_lab("apilb-fx-nexthop");
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&new_flow_to(
        "SYN: the FIB is asked",
        &syn,
        master,
        40_000,
        master_mac(1),
    ));
    let data = syn.clone().data(b"x");
    lab.run(&to_master(
        "a larger packet: the FIB is asked again (MTU check)",
        &data,
        master,
        40_000,
        master_mac(1),
        vec![(FIB_LOOKUP, 1), (REDIRECT, 1)],
    ));
    // The master's MAC changes (say, its NIC was replaced). Within the TTL (a minute
    // here) the flow keeps the cached answer.
    let new_mac: Mac = [2, 0, 0, 0, 0x0b, 0x99];
    lab.ns.ip(&[
        "neigh",
        "replace",
        "198.51.100.11",
        "lladdr",
        "02:00:00:00:0b:99",
        "dev",
        "fx1",
        "nud",
        "permanent",
    ]);
    lab.run(&to_master(
        "within the TTL: the cached hop and the old MAC",
        &data,
        master,
        40_000,
        master_mac(1),
        vec![(REDIRECT, 1)],
    ));
    // Once the TTL has passed (set to 0 rather than waited for), the FIB is asked
    // again and the new MAC used and stored.
    lab.reconfigure(|c| c.nexthop_ttl = Duration::ZERO);
    lab.run(&to_master(
        "after the TTL: the FIB is asked again, the new MAC",
        &data,
        master,
        40_000,
        new_mac,
        vec![(FIB_LOOKUP, 1), (REDIRECT, 1)],
    ));
    let flows = lab.all_flows();
    assert_eq!(
        flows[0].1.next_hop.dmac, new_mac,
        "the refreshed hop is stored in the flow entry"
    );
}

#[test]
fn packet_larger_than_the_egress_mtu_goes_to_the_stack() {
    let (mut lab, master) = one_master_lab("apilb-fx-mtu");
    lab.ns.ip(&["link", "set", "fx1", "mtu", "1280"]);
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&new_flow_to("SYN", &syn, master, 40_000, master_mac(1)));
    // 1400 bytes of IP datagram towards a 1280-byte link: the FIB refuses it
    // (FRAG_NEEDED), so it is handed, rewritten, to the stack.
    let big = syn.clone().data(&[0x55; 1400 - 40]);
    lab.run(&Fixture {
        desc: "a 1400-byte segment for a 1280-MTU link",
        ingress: Ingress::ClientSide,
        input: big.build(),
        verdict: XDP_PASS,
        output: big
            .clone()
            .between(sa("198.51.100.1:40000"), master)
            .build(),
        counters: vec![(FIB_LOOKUP, 1), (PASS_FIB_MISS, 1)],
    });
}

#[test]
fn only_a_syn_opens_a_flow() {
    let mut lab = lab("apilb-fx-synonly");
    let ack = client_syn(CLIENT4, VIP4).data(b"stray");
    let mut rst = client_syn(CLIENT4, VIP4);
    rst.syn = false;
    rst.rst = true;
    let mut syn_ack = client_syn(CLIENT4, VIP4);
    syn_ack.ack = Some(1);
    for (desc, p) in [
        ("ACK with data and no flow", ack),
        ("RST and no flow", rst),
        ("SYN-ACK and no flow", syn_ack),
    ] {
        lab.run(&unchanged(
            desc,
            Ingress::ClientSide,
            p.build(),
            PASS_NO_FLOW,
        ));
    }
    assert!(lab.all_flows().is_empty(), "no stray segment took a flow");
    assert!(lab.all_replies().is_empty(), "no stray segment took a port");
}

/// A master's segment to the client `client` on the flow natted to `port`, and what
/// the client receives.
#[test]
fn a_port_is_held_through_the_handshake_and_the_close_then_given_back_after_the_grace() {
    let (mut lab, master) = one_master_lab("apilb-fx-ports");
    let one_port = |close_ms: u64| {
        move |c: &mut LabConfig| {
            c.nat_ports = 40_000..=40_000;
            c.tcp_timeouts.close = Duration::from_millis(close_ms);
        }
    };
    lab.reconfigure(one_port(60_000));
    let a = client_syn("192.0.2.10:51000", VIP4);
    let b = client_syn("192.0.2.10:51001", VIP4);
    let b_dropped = |desc| Fixture {
        desc,
        ingress: Ingress::ClientSide,
        input: b.build(),
        verdict: XDP_DROP,
        output: b.build(),
        counters: vec![(DROP_NO_NAT_PORT, 1)],
    };
    lab.run(&new_flow_to(
        "flow A takes the port",
        &a,
        master,
        40_000,
        master_mac(1),
    ));
    let half = lab.dp.half_open_flows().expect("half-open flows");
    assert_eq!(
        (half.len(), half[0].1.state),
        (1, CT_SYN_SENT),
        "A is half-open"
    );
    assert!(
        lab.dp.flows().expect("flows").is_empty(),
        "and not established"
    );
    lab.run(&b_dropped("a second flow while A's SYN is unanswered"));

    let ack = handshake(&mut lab, &a, master);
    let flows = lab.dp.flows().expect("flows");
    assert_eq!(
        (flows.len(), flows[0].1.state),
        (1, CT_ESTABLISHED),
        "A is established"
    );
    assert!(
        lab.dp.half_open_flows().expect("half-open").is_empty(),
        "and left the half-open table"
    );
    assert_eq!(
        lab.dp.replies().expect("replies").len(),
        1,
        "its lease moved with it"
    );
    assert!(
        lab.dp
            .half_open_replies()
            .expect("half-open replies")
            .is_empty()
    );
    lab.run(&b_dropped("a second flow while A is established"));

    close_client_first(&mut lab, &a, &ack, master);
    let flows = lab.dp.flows().expect("flows");
    assert_eq!(flows[0].1.state, CT_TIME_WAIT, "A is over");
    assert_eq!(
        flows[0].1.flags & FLOW_F_BACKEND_FIRST,
        0,
        "and the client closed first"
    );
    lab.run(&b_dropped("a second flow within the close grace"));

    // Past the grace (shortened here to close's floor), B takes A's port, and A's
    // entry is gone.
    lab.reconfigure(one_port(100));
    std::thread::sleep(Duration::from_millis(150));
    lab.run(&to_master(
        "flow B reclaims the finished flow's port",
        &b,
        master,
        40_000,
        master_mac(1),
        vec![
            (FLOW_NEW, 1),
            (RECLAIM_CLOSED, 1),
            (FIB_LOOKUP, 1),
            (REDIRECT, 1),
        ],
    ));
    let late = a.clone().data(b"late");
    lab.run(&unchanged(
        "a late packet of flow A",
        Ingress::ClientSide,
        late.build(),
        PASS_NO_FLOW,
    ));
    assert!(lab.dp.flows().expect("flows").is_empty(), "A is gone");
    let half = lab.dp.half_open_flows().expect("half-open flows");
    assert_eq!(half.len(), 1, "only B is left");
    assert_eq!(u16::from_be(half[0].0.sport_be), 51_001);
}

/// The datapath's timestamp clock, `bpf_ktime_get_coarse_ns` in ms, as
/// userspace reads it (`CLOCK_MONOTONIC_COARSE`), truncated as TCP's is.
fn coarse_clock_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid, writable timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) },
        0
    );
    let ms = u64::try_from(ts.tv_sec).expect("seconds") * 1_000
        + u64::try_from(ts.tv_nsec).expect("nanoseconds") / 1_000_000;
    lb_common::ct::ts_clock(ms * 1_000_000)
}

#[test]
fn timestamps_are_shifted_to_the_ports_clock_and_back_with_valid_checksums() {
    let (mut lab, master) = one_master_lab("apilb-fx-ts");
    let client = "192.0.2.10:51000";
    let syn = client_syn(client, VIP4).timestamps(7_000_000, 0);
    let out = lab.test_run(lb_common::PROG_XDP, &syn.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT);
    assert_eq!(
        checksums_valid(&out.packet),
        (true, true),
        "the SYN's checksums"
    );
    let l4 = 14 + 20;
    let (sent, _) = Tcp::timestamps_in(&out.packet, l4).expect("the SYN keeps its timestamps");
    let flow = lab.dp.half_open_flows().expect("half-open")[0].1;
    assert_eq!(
        flow.flags & FLOW_F_TS,
        FLOW_F_TS,
        "the flow uses timestamps"
    );
    assert_eq!(
        sent,
        7_000_000u32.wrapping_add(flow.ts_off),
        "TSval shifted by the flow's offset"
    );
    // The port's clock: the datapath's milliseconds, not the client's.
    let clock = coarse_clock_ms();
    assert!(
        sent.abs_diff(clock) < 5_000,
        "TSval {sent} is the port's clock {clock}"
    );
    let port = u16::from_be(flow.nat_port_be);

    // The master echoes the shifted value; the client gets its own back.
    let mut syn_ack = Tcp::syn(master_mac(1), FX1_MAC, master, master).timestamps(99, sent);
    syn_ack.ack = Some(syn.seq + 1);
    syn_ack.dst = SocketAddr::new(sa("198.51.100.1:0").ip(), port);
    let back = lab.test_run(lb_common::PROG_XDP, &syn_ack.build(), Ingress::MasterSide);
    assert_eq!(back.action, XDP_REDIRECT);
    assert_eq!(
        checksums_valid(&back.packet),
        (true, true),
        "the SYN-ACK's checksums"
    );
    assert_eq!(
        Tcp::timestamps_in(&back.packet, l4),
        Some((99, 7_000_000)),
        "TSecr shifted back"
    );

    // Data segments carry NOP NOP TS: shifted alike.
    let mut ack = syn.clone().data(b"hello");
    ack.ack = Some(syn_ack.seq + 1);
    let ack = ack.timestamps(7_000_010, 99);
    let out = lab.test_run(lb_common::PROG_XDP, &ack.build(), Ingress::ClientSide);
    assert_eq!(
        checksums_valid(&out.packet),
        (true, true),
        "the ACK's checksums"
    );
    assert_eq!(
        Tcp::timestamps_in(&out.packet, l4),
        Some((sent.wrapping_add(10), 99))
    );
}

#[test]
fn passive_detection_drops_a_rst_to_an_unanswered_syn_and_steers_the_retransmit_away() {
    let HalfOpen {
        mut lab, syn, id, ..
    } = master_rst(true);
    assert_eq!(lab.dp.passive_stats(id).expect("passive stats").rst, 1);
    let flows = lab.all_flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].1.flags & FLOW_F_REFUSED, FLOW_F_REFUSED);
    assert!(lab.all_replies().is_empty(), "its NAT port is free");
    // The client's retransmit (the ring still names the master: the controller
    // has not rewritten it yet) goes to the fallback, and counts no second failure.
    let (other, to) = fallback_of(&lab, id);
    lab.run(&to_master(
        "the SYN again after the RST: a new flow, to the fallback",
        &syn,
        to,
        40_000,
        mac_of(&masters4(), other),
        vec![(FALLBACK, 1), (FLOW_NEW, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    ));
    assert_eq!(lab.dp.passive_stats(id).expect("passive stats").rst, 1);
    assert_eq!(lab.all_flows().len(), 1, "only the new flow");
    // With detection off the RST goes through and nothing is counted.
    let h = master_rst(false);
    assert_eq!(h.lab.dp.passive_stats(h.id).expect("passive stats").rst, 0);
    assert_eq!(h.lab.all_flows().len(), 1);
}

#[test]
fn a_rst_after_the_syn_ack_reaches_the_client_even_with_passive_detection() {
    let HalfOpen {
        mut lab,
        syn,
        id,
        backend,
        mac,
        snat,
    } = half_open("apilb-fx-prst2", true);
    let mut syn_ack = Tcp::syn(mac, FX1_MAC, backend, snat);
    syn_ack.ack = Some(syn.seq + 1);
    syn_ack.seq = 0x2000_0000;
    lab.run(&Fixture {
        desc: "SYN-ACK: the flow is answered",
        ingress: Ingress::MasterSide,
        input: syn_ack.build(),
        verdict: XDP_REDIRECT,
        output: syn_ack
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa(CLIENT4))
            .build(),
        counters: vec![(REPLY_HIT, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    });
    let mut rst = syn_ack.clone();
    rst.syn = false;
    rst.rst = true;
    rst.seq = 0x2000_0001;
    lab.run(&Fixture {
        desc: "mid-stream RST from the master: reaches the client as it must",
        ingress: Ingress::MasterSide,
        input: rst.build(),
        verdict: XDP_REDIRECT,
        output: rst
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa(CLIENT4))
            .build(),
        counters: vec![(REPLY_HIT, 1), (REDIRECT, 1)],
    });
    assert_eq!(lab.dp.passive_stats(id).expect("passive stats").rst, 0);
    assert_eq!(lab.all_flows().len(), 1, "the flow stays (closing)");
}

#[test]
fn passive_detection_balances_afresh_a_syn_sent_again_to_a_silent_master() {
    let HalfOpen {
        mut lab,
        syn,
        id,
        backend,
        mac,
        ..
    } = half_open("apilb-fx-psil", true);
    let (other, to) = fallback_of(&lab, id);
    // At once, the same SYN again is the same flow.
    lab.run(&to_master(
        "the SYN again at once: same flow, same port",
        &syn,
        backend,
        40_000,
        mac,
        vec![(REDIRECT, 1)],
    ));
    // After PASSIVE_SILENT_NS without an answer it is the client's retransmit: the
    // master is silent, the flow is forgotten and balanced anew, away from it (the
    // ring still names it: the controller has not rewritten it yet).
    std::thread::sleep(std::time::Duration::from_millis(600));
    lab.run(&to_master(
        "the SYN again after 600 ms unanswered: a new flow, to the fallback",
        &syn,
        to,
        40_000,
        mac_of(&masters4(), other),
        vec![
            (PASSIVE_SILENT, 1),
            (FALLBACK, 1),
            (FLOW_NEW, 1),
            (FIB_LOOKUP, 1),
            (REDIRECT, 1),
        ],
    ));
    let p = lab.dp.passive_stats(id).expect("passive stats");
    assert_eq!((p.silent, p.rst), (1, 0));
    assert_eq!(lab.all_flows().len(), 1, "only the new flow");
    assert_eq!(lab.all_replies().len(), 1);
}

#[test]
fn passive_detection_drops_an_icmp_unreachable_for_a_syn() {
    let HalfOpen {
        mut lab,
        syn,
        id,
        backend,
        mac,
        ..
    } = half_open("apilb-fx-picmp", true);
    let sent = natted(&syn, backend, 40_000, mac);
    let refused = icmp_unreachable(mac, FX1_MAC, backend.ip(), &sent, false);
    lab.run(&Fixture {
        desc: "ICMP port unreachable for the SYN: dropped, flow refused",
        ingress: Ingress::MasterSide,
        input: refused.clone(),
        verdict: XDP_DROP,
        output: refused.clone(),
        counters: vec![(REPLY_HIT, 1), (DROP_PASSIVE_ICMP, 1)],
    });
    let p = lab.dp.passive_stats(id).expect("passive stats");
    assert_eq!((p.icmp, p.rst, p.silent), (1, 0, 0));
    assert_eq!(lab.all_flows()[0].1.flags & FLOW_F_REFUSED, FLOW_F_REFUSED);
    assert!(lab.all_replies().is_empty());
    lab.run(&unchanged(
        "the same ICMP again, about no flow now: passed",
        Ingress::MasterSide,
        refused,
        PASS_NOT_VIP,
    ));
}

#[test]
fn passive_detection_reads_an_icmpv6_unreachable_for_a_syn() {
    let HalfOpen {
        mut lab,
        syn,
        id,
        backend,
        mac,
        ..
    } = half_open_at("apilb-fx-picmp6", true, (CLIENT6, VIP6, 1), &masters6());
    let refused = icmp_unreachable(
        mac,
        FX1_MAC,
        backend.ip(),
        &natted(&syn, backend, 40_000, mac),
        false,
    );
    lab.run(&Fixture {
        desc: "ICMPv6 port unreachable for the SYN: dropped, flow refused",
        ingress: Ingress::MasterSide,
        input: refused.clone(),
        verdict: XDP_DROP,
        output: refused,
        counters: vec![(REPLY_HIT, 1), (DROP_PASSIVE_ICMP, 1)],
    });
    assert_eq!(lab.dp.passive_stats(id).expect("passive stats").icmp, 1);
    assert!(lab.all_replies().is_empty());
}

#[test]
fn new_flows_whose_slot_names_a_master_out_of_rotation_follow_the_fallback_order() {
    let mut lab = lab("apilb-fx-fallback");
    let masters = masters4();
    // A client port whose slot names master `id`.
    let syn_to = |lab: &Lab, id: u32, skip: u16| {
        (skip..u16::MAX)
            .map(|port| client_syn(&format!("192.0.2.10:{port}"), VIP4))
            .find(|s| lab.maglev_pick(0, s.src, sa(VIP4)) == id)
            .expect("a port for every master")
    };
    // The controller links them 1 -> 2 -> 3 -> 1. It marks a master out of
    // rotation and then rewrites the rings without it, in one `apply`; what new
    // flows do in between, while a ring slot still names a marked master, is what
    // this checks. No config, health or election makes the controller stop there,
    // so the mark is written as `apply` writes it, through the map writer, and the
    // rings are left alone.
    assert_eq!(
        (1..=3).map(|id| lab.fallback(id).0).collect::<Vec<_>>(),
        [2, 3, 1]
    );
    let mark = |lab: &mut Lab, id: u32, down: bool| {
        let entry = lab.desired().entry(id).expect("configured");
        lab.dp
            .set_backend(id, &BackendEntry { down, ..entry })
            .expect("backend");
    };
    let mut syns = Vec::new();
    for (out, desc) in [
        (1_u8, "SYN to a slot of master 1, which is out: master 2"),
        (2, "SYN to a slot of master 1 with 2 out too: master 3"),
    ] {
        mark(&mut lab, u32::from(out), true);
        let from = syns.last().map_or(30_000, |s: &Tcp| s.src.port() + 1);
        let syn = syn_to(&lab, 1, from);
        lab.run(&to_master(
            desc,
            &syn,
            masters[usize::from(out)].1,
            40_000,
            master_mac(out + 1),
            vec![(FALLBACK, 1), (FLOW_NEW, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
        ));
        syns.push(syn);
    }
    let (a, b) = (&syns[0], &syns[1]);
    mark(&mut lab, 3, true);
    let c = syn_to(&lab, 1, b.src.port() + 1);
    lab.run(&new_flow_to(
        "SYN to a slot of master 1 with all out: the ring's choice",
        &c,
        masters[0].1,
        40_000,
        master_mac(1),
    ));
    // Flows already open keep their master (a larger packet asks the FIB again).
    lab.run(&to_master(
        "the first flow's next segment: still master 2",
        &a.clone().data(b"x"),
        masters[1].1,
        40_000,
        master_mac(2),
        vec![(FIB_LOOKUP, 1), (REDIRECT, 1)],
    ));
}

#[test]
fn a_vip_that_is_its_flows_source_never_gives_out_its_own_port() {
    let master = sa("198.51.100.11:6443");
    let mut c = LabConfig::new(&[sa(VIP4)], &[master]);
    c.vips[0].1 = true;
    // 6443, the VIP's port, and 6444: only 6444 may be a source port at the VIP.
    c.nat_ports = 6443..=6444;
    let mut lab = Lab::with_config("apilb-fx-vipport", &c);
    lab.set_owned(sa(VIP4).ip(), true);
    let (natted, no_port) = syns_from_many(&mut lab, 3);
    let ports: Vec<(u32, u16)> = lab
        .dp
        .half_open_flows()
        .expect("half-open flows")
        .iter()
        .map(|(_, f)| (f.snat_index.into(), u16::from_be(f.nat_port_be)))
        .collect();
    eprintln!("VIP as source, ports 6443-6444: {natted} natted {ports:?}, {no_port} dropped");
    assert_eq!((natted, no_port), (1, 2));
    // Index 1: the node's address first (198.51.100.1), then the VIP.
    assert_eq!(ports, [(1, 6444)]);
}

#[test]
fn a_synced_flow_is_exported_when_established_and_when_closed_and_no_sooner() {
    let (mut lab, master) = one_master_lab("apilb-fx-syncev");
    lab.reconfigure(|c| c.nat_ports = 40_000..=40_000);
    let mut events = lab.dp.take_sync_events().expect("the sync ring");
    let mut drain = || {
        let mut out = Vec::new();
        while let Some(item) = events.next() {
            out.push(lb_common::SyncEvent::from_bytes(&item).expect("a whole event"));
        }
        out
    };
    // The controller sets `VIP_F_SYNC` once flow sync is configured; here the
    // VIP is written with it directly (id 0, the lab's ring, the node's address).
    lab.dp
        .set_vip(&lb_userspace::datapath::Vip {
            addr: sa(VIP4),
            id: 0,
            ring_size: 65_537,
            owned: true,
            local: false,
            snat: (0, 1),
            sync: true,
        })
        .expect("VIP with sync");
    let a = client_syn("192.0.2.10:51000", VIP4);
    lab.run(&new_flow_to(
        "a synced flow's SYN",
        &a,
        master,
        40_000,
        master_mac(1),
    ));
    assert_eq!(drain(), [], "a half-open flow is not exported");
    let ack = handshake_on(&mut lab, &a, master, 40_000);
    let established = drain();
    assert_eq!(established.len(), 1, "{established:?}");
    let e = established[0];
    let flow = lab.dp.flows().expect("flows")[0];
    assert_eq!(
        (
            e.kind,
            e.state,
            e.key,
            e.backend_be,
            e.nat_port_be,
            e.seq,
            e.ack
        ),
        (
            lb_common::SYNC_EV_ESTABLISHED,
            CT_ESTABLISHED,
            flow.0,
            flow.1.backend_be,
            40_000u16.to_be(),
            flow.1.seq,
            flow.1.ack
        )
    );
    assert_ne!(e.flags & lb_common::ct::FLOW_F_SYNC, 0);
    // Data on the established flow exports nothing.
    for _ in 0..3 {
        let data = ack.clone().data(b"GET /").build();
        let out = lab.test_run(lb_common::PROG_XDP, &data, Ingress::ClientSide);
        assert_eq!(out.action, XDP_REDIRECT);
    }
    assert_eq!(drain(), []);
    close_client_first(&mut lab, &a, &ack, master);
    let closed = drain();
    assert_eq!(
        closed.iter().map(|e| (e.kind, e.state)).collect::<Vec<_>>(),
        [(lb_common::SYNC_EV_CLOSED, CT_TIME_WAIT)],
        "one event at the end, none for the FINs before it"
    );
    assert_eq!(lab.dp.counters().expect("counters").get(SYNC_EVENT_LOST), 0);
}

/// A SYN to `VIP4` from each of `count` sources (10.0.0.0 on): how many were
/// natted and how many dropped for want of a port.
fn syns_from_many(lab: &mut Lab, count: u32) -> (u32, u32) {
    let (mut natted, mut no_port) = (0, 0);
    for i in 0..count {
        let src = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let syn = Tcp::syn(
            CLIENT_MAC,
            FX0_MAC,
            SocketAddr::new(src.into(), 40_000),
            sa(VIP4),
        );
        match lab
            .test_run(lb_common::PROG_XDP, &syn.build(), Ingress::ClientSide)
            .action
        {
            XDP_REDIRECT => natted += 1,
            XDP_DROP => no_port += 1,
            other => panic!("SYN {i}: verdict {other}"),
        }
    }
    (natted, no_port)
}

#[test]
fn a_node_claims_ports_only_from_its_slice_of_the_range() {
    let (mut lab, _master) = one_master_lab("apilb-fx-slice");
    // Slice 1 of 2 of 256 ports: 40,128-40,255.
    lab.reconfigure(|c| {
        c.nat_ports = 40_000..=40_255;
        c.nat_slice = (1, 2);
    });
    let (natted, no_port) = syns_from_many(&mut lab, 200);
    let ports: std::collections::BTreeSet<u16> = lab
        .dp
        .half_open_flows()
        .expect("half-open flows")
        .iter()
        .map(|(_, f)| u16::from_be(f.nat_port_be))
        .collect();
    eprintln!(
        "slice 1 of 2: {natted} SYNs natted on {} ports ({:?}..={:?}), {no_port} dropped",
        ports.len(),
        ports.first(),
        ports.last()
    );
    assert_eq!(
        (natted, no_port),
        (128, 72),
        "the slice's 128 ports, no more"
    );
    assert_eq!(
        ports,
        (40_128..=40_255).collect(),
        "every port of the slice, once"
    );
}

#[test]
fn a_syn_flood_evicts_no_established_flow_and_holds_ports_only_for_the_half_open_timeout() {
    let (mut lab, master) = one_master_lab("apilb-fx-flood");
    let ports = 40_000..=40_511;
    lab.reconfigure(|c| {
        c.nat_ports = ports.clone();
        c.tcp_timeouts.syn_sent = Duration::from_millis(300);
        c.tcp_timeouts.syn_recv = Duration::from_millis(300);
    });
    // One proven flow before the flood.
    let a = client_syn("192.0.2.10:51000", VIP4);
    let out = lab.test_run(lb_common::PROG_XDP, &a.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT);
    let port = u16::from_be(lab.all_flows()[0].1.nat_port_be);
    let ack = handshake_on(&mut lab, &a, master, port);

    // Spoofed SYNs from 4,096 sources: four times the half-open table (1,024 in
    // the lab), eight times the ports.
    let flood = 4_096u32;
    let (natted, no_port) = syns_from_many(&mut lab, flood);
    eprintln!("flood: {natted} SYNs natted, {no_port} dropped for want of a port");
    assert_eq!(natted + no_port, flood);
    let half = lab.dp.half_open_flows().expect("half-open flows").len();
    assert!(
        half <= 1_024,
        "the half-open table holds {half}, past its size"
    );
    // The established flow is untouched, both ways.
    let flows = lab.dp.flows().expect("flows");
    assert_eq!(flows.len(), 1, "the proven flow is still there, alone");
    lab.run(&on_flow(
        "the proven flow after the flood",
        &ack,
        master,
        port,
        &[],
    ));

    // Right after the flood a new client may find every port held; once the
    // half-open timeout has passed, it gets one, reclaimed from the flood.
    std::thread::sleep(Duration::from_millis(400));
    let legit = client_syn("192.0.2.20:52000", VIP4);
    let before = lab.dp.counters().expect("counters");
    let out = lab.test_run(lb_common::PROG_XDP, &legit.build(), Ingress::ClientSide);
    let after = lab.dp.counters().expect("counters");
    assert_eq!(
        out.action, XDP_REDIRECT,
        "a new client is served after the half-open timeout"
    );
    let reclaimed = after.get(RECLAIM_HALF_OPEN) - before.get(RECLAIM_HALF_OPEN)
        + after.get(RECLAIM_ORPHAN)
        - before.get(RECLAIM_ORPHAN);
    let free = lab.all_replies().len() < ports.len();
    assert!(
        reclaimed == 1 || free,
        "its port was a flood flow's ({reclaimed}) or free"
    );
}

#[test]
fn forged_acks_on_a_half_open_flow_do_not_keep_its_port() {
    let (mut lab, _master) = one_master_lab("apilb-fx-forged");
    lab.reconfigure(|c| {
        c.nat_ports = 40_000..=40_000;
        c.tcp_timeouts.syn_sent = Duration::from_millis(300);
    });
    let spoofed = client_syn("203.0.113.7:41000", VIP4);
    let out = lab.test_run(lb_common::PROG_XDP, &spoofed.build(), Ingress::ClientSide);
    assert_eq!(
        out.action, XDP_REDIRECT,
        "the spoofed SYN takes the only port"
    );
    // Its sender keeps sending ACKs that prove nothing (no SYN-ACK came back).
    let ack = spoofed.clone().data(b"");
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(100));
        lab.test_run(lb_common::PROG_XDP, &ack.build(), Ingress::ClientSide);
    }
    // 600 ms after the SYN, past its 300 ms timeout, a real client gets the port.
    let before = lab.dp.counters().expect("counters");
    let real = client_syn("192.0.2.10:51000", VIP4);
    let out = lab.test_run(lb_common::PROG_XDP, &real.build(), Ingress::ClientSide);
    let after = lab.dp.counters().expect("counters");
    assert_eq!(out.action, XDP_REDIRECT, "the real client is served");
    assert_eq!(
        after.get(RECLAIM_HALF_OPEN) - before.get(RECLAIM_HALF_OPEN),
        1,
        "it took the spoofed flow's port"
    );
}

/// Both lab interfaces as veths in native mode: packets may carry partial
/// checksums.
const VETHS: [(Ingress, u32); 2] = [
    (Ingress::ClientSide, IFACE_F_PARTIAL),
    (Ingress::MasterSide, IFACE_F_PARTIAL),
];

/// On an interface that cannot deliver partial checksums (a NIC), the datapath
/// does not look for them: a segment whose field happens to hold the partial
/// form is natted as any other, checksum updated incrementally.
#[test]
fn a_nic_is_not_checked_for_partial_checksums() {
    let mut lab = lab("apilb-fx-nic");
    let syn = client_syn(CLIENT4, VIP4);
    let (_, backend, mac) = picked(&lab, 0, CLIENT4, VIP4, &masters4());
    let out = lab.test_run(
        lb_common::PROG_XDP,
        &syn.build_partial(),
        Ingress::ClientSide,
    );
    let want = natted(&syn, backend, 40_000, mac).build();
    assert_eq!(out.action, XDP_REDIRECT);
    let l4 = l4_offset(&want);
    assert_eq!(
        (&out.packet[..l4 + 16], &out.packet[l4 + 18..]),
        (&want[..l4 + 16], &want[l4 + 18..]),
        "natted as any SYN"
    );
    assert_eq!(
        checksums_valid(&out.packet),
        (true, false),
        "its TCP checksum updated as a full one, so not finished"
    );
}

/// A payload long enough to take two of the datapath's 512-byte sums and every
/// smaller piece after them, and odd, so the last byte is summed on its own.
fn long_payload() -> Vec<u8> {
    (0..1_333u32)
        .map(|i| (i * 7 + 3).to_le_bytes()[0])
        .collect()
}

/// A client's segment whose checksum a veth peer left partial (offloaded) leaves
/// under NAT with the full checksum, byte for byte what a sender that summed it
/// would have sent; a master's reply likewise. Both families.
#[test]
fn partial_checksums_from_a_veth_peer_are_finished_both_ways() {
    for (client, vip, vip_id, masters) in [
        (CLIENT4, VIP4, 0, masters4()),
        (CLIENT6, VIP6, 1, masters6()),
    ] {
        let mut lab = lab("apilb-fx-partial");
        lab.set_ifaces(&VETHS);
        let syn = client_syn(client, vip);
        let (_, backend, mac) = picked(&lab, vip_id, client, vip, &masters);
        let got = lab.run(&Fixture {
            input: syn.build_partial(),
            ..to_master(
                "SYN with a partial checksum",
                &syn,
                backend,
                40_000,
                mac,
                vec![
                    (FLOW_NEW, 1),
                    (FIB_LOOKUP, 1),
                    (REDIRECT, 1),
                    (CSUM_PARTIAL, 1),
                ],
            )
        });
        assert_eq!(checksums_valid(&got), (true, true), "{client}: SYN");
        let data = client_syn(client, vip).data(&long_payload());
        let got = lab.run(&Fixture {
            input: data.build_partial(),
            ..to_master(
                "1,333 bytes of data with a partial checksum",
                &data,
                backend,
                40_000,
                mac,
                vec![(FIB_LOOKUP, 1), (REDIRECT, 1), (CSUM_PARTIAL, 1)],
            )
        });
        assert_eq!(checksums_valid(&got), (true, true), "{client}: data");
        let snat = SocketAddr::new(snat_for(backend.ip()), 40_000);
        let reply = Tcp::syn(mac, FX1_MAC, backend, snat).data(&long_payload()[..999]);
        let got = lab.run(&Fixture {
            desc: "the master's 999 bytes with a partial checksum",
            ingress: Ingress::MasterSide,
            input: reply.build_partial(),
            verdict: XDP_REDIRECT,
            output: reply
                .clone()
                .via(FX0_MAC, CLIENT_MAC)
                .between(sa(vip), sa(client))
                .build(),
            counters: vec![
                (REPLY_HIT, 1),
                (FIB_LOOKUP, 1),
                (REDIRECT, 1),
                (CSUM_PARTIAL, 1),
            ],
        });
        assert_eq!(checksums_valid(&got), (true, true), "{client}: reply");
    }
}

/// A full checksum that happens to equal the pseudo-header's sum is not taken
/// for a partial one: the segment verifies as it is, and is only natted.
#[test]
fn a_full_checksum_equal_to_the_pseudo_header_sum_is_left_full() {
    let mut lab = lab("apilb-fx-lookalike");
    lab.set_ifaces(&VETHS);
    let syn = client_syn(CLIENT4, VIP4);
    let (_, backend, mac) = picked(&lab, 0, CLIENT4, VIP4, &masters4());
    lab.run(&new_flow_to("SYN", &syn, backend, 40_000, mac));
    // Choose the payload's first word so that the full checksum comes out as the
    // folded pseudo-header sum.
    let mut payload = vec![0u8; 64];
    payload[2..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i.to_le_bytes()[0]);
    let frame = syn.clone().data(&payload).build();
    let l4 = l4_offset(&frame);
    let p = fold(pseudo_sum(&frame, l4));
    let mut seg: u64 = frame[l4..]
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    seg -= u64::from(u16::from_be_bytes([frame[l4 + 16], frame[l4 + 17]]));
    // Wanted: !fold(P + seg + w) == p, so fold(P + seg + w) == !p.
    let have = fold(pseudo_sum(&frame, l4) + seg);
    let w = fold(u64::from(!p) + u64::from(!have));
    payload[..2].copy_from_slice(&w.to_be_bytes());
    let data = syn.clone().data(&payload);
    let input = data.build();
    assert_eq!(
        u16::from_be_bytes([input[l4 + 16], input[l4 + 17]]),
        p,
        "the fixture's full checksum equals the pseudo-header sum"
    );
    let got = lab.run(&to_master(
        "data whose full checksum looks partial",
        &data,
        backend,
        40_000,
        mac,
        vec![(FIB_LOOKUP, 1), (REDIRECT, 1)],
    ));
    assert_eq!(checksums_valid(&got), (true, true));
}

/// Where the kernel keeps the packet's socket buffer, and with it the state
/// that says its checksum is partial, the datapath leaves the checksum partial,
/// over the new addresses, for the device that finishes it: a packet handed to
/// the stack (a FIB miss), and every packet of an interface in generic mode.
#[test]
fn a_partial_checksum_stays_partial_where_the_kernel_keeps_the_socket_buffer() {
    let partial_natted =
        |pkt: &Tcp, to: SocketAddr, mac: Mac| natted(pkt, to, 40_000, mac).build_partial();
    let unresolved = sa("198.51.100.14:6443");
    let mut pass_lab = Lab::with_config(
        "apilb-fx-partial-pass",
        &LabConfig::new(&[sa(VIP4)], &[unresolved]),
    );
    pass_lab.set_ifaces(&[(Ingress::ClientSide, IFACE_F_PARTIAL)]);
    let syn = client_syn(CLIENT4, VIP4);
    let got = pass_lab.run(&Fixture {
        desc: "a partial SYN to a master with no neighbour entry",
        ingress: Ingress::ClientSide,
        input: syn.build_partial(),
        verdict: XDP_PASS,
        output: syn
            .clone()
            .between(sa("198.51.100.1:40000"), unresolved)
            .build_partial(),
        counters: vec![
            (FLOW_NEW, 1),
            (FIB_LOOKUP, 1),
            (PASS_FIB_MISS, 1),
            (CSUM_PARTIAL, 1),
        ],
    });
    assert!(checksums_valid(&got).0, "the IPv4 header's is full");

    let mut lab = lab("apilb-fx-partial-skb");
    lab.set_ifaces(&[
        (Ingress::ClientSide, IFACE_F_PARTIAL | IFACE_F_SKB),
        (Ingress::MasterSide, IFACE_F_PARTIAL),
    ]);
    let syn = client_syn(CLIENT4, VIP4);
    let (_, backend, mac) = picked(&lab, 0, CLIENT4, VIP4, &masters4());
    lab.run(&Fixture {
        desc: "a partial SYN on an interface in generic mode",
        ingress: Ingress::ClientSide,
        input: syn.build_partial(),
        verdict: XDP_REDIRECT,
        output: partial_natted(&syn, backend, mac),
        counters: vec![
            (FLOW_NEW, 1),
            (FIB_LOOKUP, 1),
            (REDIRECT, 1),
            (CSUM_PARTIAL, 1),
        ],
    });
    // The master side is not in generic mode: its replies leave finished.
    let snat = SocketAddr::new(snat_for(backend.ip()), 40_000);
    let reply = Tcp::syn(mac, FX1_MAC, backend, snat).data(b"ok");
    lab.run(&Fixture {
        desc: "a partial reply on an interface in native mode",
        ingress: Ingress::MasterSide,
        input: reply.build_partial(),
        verdict: XDP_REDIRECT,
        output: reply
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa(CLIENT4))
            .build(),
        counters: vec![
            (REPLY_HIT, 1),
            (FIB_LOOKUP, 1),
            (REDIRECT, 1),
            (CSUM_PARTIAL, 1),
        ],
    });
}
