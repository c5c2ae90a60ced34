//! Packet fixtures for what a forged, stale or foreign packet may do to a flow:
//! nothing that the endpoints themselves would not let it do. Run in the real
//! kernel through `BPF_PROG_TEST_RUN`, each test in its own namespace, as in
//! `xdp_fixtures`.
//!
//! - A RST ends a flow only near where the other side is (`ct::near`).
//! - A FIN closes a flow only near where the client is (`ct::fin_proven`).
//! - A refusal of an unanswered SYN must match that SYN (`ct::refuses_syn`).
//! - A SYN on an answered flow goes to its master and moves nothing.
//! - An ICMP packet too big about a flow reaches its client, translated.

use std::{net::SocketAddr, time::Duration};

use lb_common::{
    FLOW_F_REFUSED,
    counters::*,
    ct::{CT_CLOSE, CT_ESTABLISHED, CT_FIN_WAIT, CT_LAST_ACK, CT_SYN_SENT},
};
use tests::{
    fixture::*,
    flowfx::*,
    packets::{Tcp, icmp_unreachable},
};

/// A lab whose IPv4 VIP balances one master (id 1) with passive detection on,
/// and one established flow from [`CLIENT4`] through it, natted to port 40000:
/// the lab, the master, the client's SYN and its ACK of the handshake.
fn established(prefix: &str) -> (Lab, SocketAddr, Tcp, Tcp) {
    let master = sa("198.51.100.11:6443");
    let mut setup = LabConfig::new(&[sa(VIP4)], &[master]);
    setup.passive = true;
    let mut lab = Lab::with_config(prefix, &setup);
    let syn = client_syn(CLIENT4, VIP4);
    lab.run(&new_flow_to("SYN", &syn, master, 40_000, master_mac(1)));
    let ack = handshake(&mut lab, &syn, master);
    assert_eq!(state(&lab), CT_ESTABLISHED);
    (lab, master, syn, ack)
}

/// The state of the lab's one flow.
fn state(lab: &Lab) -> u8 {
    let flows = lab.all_flows();
    assert_eq!(flows.len(), 1, "one flow");
    flows[0].1.state
}

/// A RST from `master` with sequence number `seq` (the SNAT side filled in by
/// `from_master`).
fn rst_from(master: SocketAddr, seq: u32) -> Tcp {
    let mut rst = Tcp::syn(master_mac(1), FX1_MAC, master, master);
    rst.syn = false;
    rst.rst = true;
    rst.seq = seq;
    rst
}

#[test]
fn a_rst_far_from_where_the_flow_is_moves_nothing_and_one_near_ends_it() {
    let (mut lab, master, syn, ack) = established("apilb-tr-rst");
    // Blind forgeries, one each way. Each goes on to its endpoint, which drops
    // it (RFC 5961); the flow keeps its state, so its port is not freed.
    let mut forged = from_master(
        "a RST from the master's side far from where the client acknowledged: \
         to the client, flow unchanged",
        master,
        40_000,
        CLIENT4,
        rst_from(master, 0x9000_0000),
        false,
    );
    forged.counters.push((RST_UNPROVEN, 1));
    lab.run(&forged);
    let mut client_rst = ack.clone();
    client_rst.rst = true;
    client_rst.ack = None;
    client_rst.seq = syn.seq.wrapping_add(0x4000_0000);
    lab.run(&on_flow(
        "a RST from the client's side far from its sequence number: to the \
         master, flow unchanged",
        &client_rst,
        master,
        40_000,
        &[(RST_UNPROVEN, 1)],
    ));
    assert_eq!(state(&lab), CT_ESTABLISHED);
    assert_eq!(lab.all_replies().len(), 1, "the port is still the flow's");
    // The master's own RST, at the sequence number the client acknowledged
    // (the SYN-ACK's, 0x1000_0000, plus one).
    lab.run(&from_master(
        "the master's RST where the client expects it: ends the flow",
        master,
        40_000,
        CLIENT4,
        rst_from(master, 0x1000_0001),
        false,
    ));
    assert_eq!(state(&lab), CT_CLOSE);
}

#[test]
fn a_fin_far_from_where_the_client_is_moves_nothing_and_one_near_closes() {
    let (mut lab, master, syn, ack) = established("apilb-tr-fin");
    // Blind forgeries, one each way: to their endpoints, flow unchanged.
    let mut client_fin = ack.clone();
    client_fin.fin = true;
    client_fin.seq = syn.seq.wrapping_add(0x4000_0000);
    lab.run(&on_flow(
        "a FIN from the client's side far from its sequence number: to the \
         master, flow unchanged",
        &client_fin,
        master,
        40_000,
        &[(FIN_UNPROVEN, 1)],
    ));
    let master_fin = |ack: u32| {
        let mut fin = Tcp::syn(master_mac(1), FX1_MAC, master, master);
        fin.syn = false;
        fin.fin = true;
        fin.seq = 0x1000_0001;
        fin.ack = Some(ack);
        fin
    };
    let mut forged = from_master(
        "a FIN from the master's side acknowledging far from the client: to the \
         client, flow unchanged",
        master,
        40_000,
        CLIENT4,
        master_fin(syn.seq.wrapping_add(0x8000_0000)),
        false,
    );
    forged.counters.push((FIN_UNPROVEN, 1));
    lab.run(&forged);
    assert_eq!(state(&lab), CT_ESTABLISHED);
    let f = lab.all_flows()[0].1;
    assert_eq!((f.client_fin, f.backend_fin), (0, 0));
    assert_eq!(f.seq, ack.seq, "a forged FIN does not move the record");
    // The master's real FIN acknowledges what the client sent, then the
    // client's real FIN: both move the flow, and each side's byte records it.
    lab.run(&from_master(
        "the master's FIN",
        master,
        40_000,
        CLIENT4,
        master_fin(ack.seq),
        false,
    ));
    assert_eq!(state(&lab), CT_FIN_WAIT);
    let mut fin = ack.clone();
    fin.fin = true;
    lab.run(&on_flow("the client's FIN", &fin, master, 40_000, &[]));
    assert_eq!(state(&lab), CT_LAST_ACK);
    let f = lab.all_flows()[0].1;
    assert_eq!((f.client_fin, f.backend_fin), (1, 1));
}

#[test]
fn a_bulk_flows_record_follows_it_by_the_stride() {
    let (mut lab, master, _syn, ack) = established("apilb-tr-stride");
    // 100 full segments in well under a second: the record must keep up, or
    // the flow's own FIN would read as forged.
    let mut seg = ack.clone().data(&[0x42; 1400]);
    seg.seq = ack.seq;
    seg.ack = ack.ack;
    for _ in 0..100 {
        let out = lab.test_run(lb_common::PROG_XDP, &seg.build(), Ingress::ClientSide);
        assert_eq!(out.action, XDP_REDIRECT, "a data segment to the master");
        seg.seq = seg.seq.wrapping_add(1400);
    }
    let recorded = lab.all_flows()[0].1.seq;
    let behind = seg.seq.wrapping_sub(recorded);
    assert!(
        behind <= lb_common::ct::RECORD_STRIDE + 1400,
        "the record trails the client by {behind} bytes"
    );
    let mut fin = seg.clone().data(b"");
    fin.seq = seg.seq;
    fin.ack = ack.ack;
    fin.fin = true;
    lab.run(&on_flow(
        "the client's FIN after 140 kB",
        &fin,
        master,
        40_000,
        &[],
    ));
    assert_eq!(state(&lab), CT_FIN_WAIT);
}

#[test]
fn a_clients_rst_near_its_sequence_number_ends_the_flow() {
    let (mut lab, master, _syn, ack) = established("apilb-tr-crst");
    let mut rst = ack.clone();
    rst.rst = true;
    rst.ack = None;
    rst.seq = ack.seq.wrapping_add(1);
    lab.run(&on_flow("the client's RST", &rst, master, 40_000, &[]));
    assert_eq!(state(&lab), CT_CLOSE);
}

#[test]
fn a_refusal_that_does_not_match_the_syn_is_dropped_and_the_flow_kept() {
    for on in [true, false] {
        let prefix = if on { "apilb-tr-ref" } else { "apilb-tr-ref0" };
        let h = half_open(prefix, on);
        let rst = h.rst(h.syn.seq.wrapping_add(7));
        let HalfOpen {
            mut lab,
            syn,
            id,
            backend,
            mac,
            ..
        } = h;
        lab.run(&Fixture {
            desc: "a RST that does not acknowledge the SYN: dropped, flow kept",
            ingress: Ingress::MasterSide,
            input: rst.build(),
            verdict: XDP_DROP,
            output: rst.build(),
            counters: vec![(REPLY_HIT, 1), (DROP_UNPROVEN_REFUSAL, 1)],
        });
        if on {
            let mut other = natted(&syn, backend, 40_000, mac);
            other.seq = syn.seq.wrapping_add(7);
            let icmp = icmp_unreachable(mac, FX1_MAC, backend.ip(), &other, false);
            lab.run(&Fixture {
                desc: "an ICMP unreachable quoting another sequence number: dropped, \
                       flow kept",
                ingress: Ingress::MasterSide,
                input: icmp.clone(),
                verdict: XDP_DROP,
                output: icmp,
                counters: vec![(REPLY_HIT, 1), (DROP_UNPROVEN_REFUSAL, 1)],
            });
        }
        let flows = lab.all_flows();
        assert_eq!(flows.len(), 1);
        assert_eq!(
            (flows[0].1.state, flows[0].1.flags & FLOW_F_REFUSED),
            (CT_SYN_SENT, 0),
            "passive {on}: the flow is as it was"
        );
        assert_eq!(lab.all_replies().len(), 1, "its port is still its own");
        let p = lab.dp.passive_stats(id).expect("passive stats");
        assert_eq!((p.rst, p.icmp, p.silent), (0, 0, 0), "no failure counted");
    }
}

#[test]
fn a_syn_on_an_established_flow_goes_to_its_master_and_moves_nothing() {
    let (mut lab, master, syn, _ack) = established("apilb-tr-syn");
    let mut spoofed = syn.clone();
    spoofed.seq = 0x7777_0000;
    for desc in [
        "a SYN with another sequence number on the established flow: to its \
         master, which answers it with a challenge ACK",
        "the same SYN after 600 ms, when a SYN sent again on a half-open flow \
         would be a retransmit: still to its master",
    ] {
        lab.run(&on_flow(desc, &spoofed, master, 40_000, &[]));
        assert_eq!(state(&lab), CT_ESTABLISHED);
        std::thread::sleep(Duration::from_millis(600));
    }
}

#[test]
fn another_syn_on_a_silent_half_open_flow_is_no_retransmit() {
    let HalfOpen {
        mut lab,
        syn,
        id,
        backend,
        mac,
        ..
    } = half_open("apilb-tr-silent", true);
    std::thread::sleep(Duration::from_millis(600));
    let mut other = syn.clone();
    other.seq = syn.seq.wrapping_add(1000);
    lab.run(&to_master(
        "a SYN on the flow 600 ms on, with another sequence number: not the \
         client's retransmit, so no sign of a silent master",
        &other,
        backend,
        40_000,
        mac,
        vec![(REDIRECT, 1)],
    ));
    let p = lab.dp.passive_stats(id).expect("passive stats");
    assert_eq!(p.silent, 0);
    assert_eq!(state(&lab), CT_SYN_SENT);
}

/// A packet too big about a client's large segment, sent by a router between the
/// LB node and the master, reaches the client as if the VIP had sent it, about
/// the segment as the client sent it.
fn too_big_is_translated(
    prefix: &str,
    (client, vip, vip_id): (&str, &str, u32),
    masters: &[(u32, SocketAddr)],
    router: &str,
) {
    let mut lab = lab(prefix);
    let syn = client_syn(client, vip);
    let (_, backend, mac) = picked(&lab, vip_id, client, vip, masters);
    lab.run(&new_flow_to("SYN", &syn, backend, 40_000, mac));
    let big = syn.clone().data(&[0x42; 1200]);
    let sent = natted(&big, backend, 40_000, mac);
    let router = sa(router).ip();
    let got = lab.run(&Fixture {
        desc: "a packet too big about the flow's segment: translated to the client",
        ingress: Ingress::MasterSide,
        input: icmp_unreachable(mac, FX1_MAC, router, &sent, true),
        verdict: XDP_REDIRECT,
        output: icmp_unreachable(FX0_MAC, CLIENT_MAC, sa(vip).ip(), &big, true),
        counters: vec![(ICMP_TOO_BIG_TRANSLATED, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    });
    // The expected frame is etherparse's own, checksums computed from scratch;
    // the quoted segment's TCP checksum is checked on its own as well.
    let quote_at = got.len() - (big.build().len() - 14);
    let mut quoted = got[..14].to_vec();
    quoted.extend_from_slice(&got[quote_at..]);
    assert_eq!(checksums_valid(&quoted), (true, true), "the quoted segment");
}

#[test]
fn ipv4_fragmentation_needed_about_a_flow_reaches_its_client_translated() {
    too_big_is_translated(
        "apilb-tr-mtu4",
        (CLIENT4, VIP4, 0),
        &masters4(),
        "198.51.100.254:0",
    );
}

#[test]
fn ipv6_packet_too_big_about_a_flow_reaches_its_client_translated() {
    too_big_is_translated(
        "apilb-tr-mtu6",
        (CLIENT6, VIP6, 1),
        &masters6(),
        "[2001:db8:2::fe]:0",
    );
}
