//! The XDP datapath fuzzed against its reference model (`tests::model`): 300,000
//! random and mutated frames (10-30 s here in a debug build), seeded from the
//! fixtures' frames, through `BPF_PROG_TEST_RUN`, each held against the model (verdict, output bytes,
//! checksums, counters, and the flow tables entry by entry). `cargo xtask fuzz`
//! runs the long version (10^6 frames). `APILB_FUZZ_SEED` replays a run;
//! `APILB_FUZZ_FRAMES` changes its length. Needs root and BPF.

use tests::model::run::{Settings, run};

#[test]
fn the_datapath_answers_every_fuzzed_frame_as_the_model_does() {
    let frames = std::env::var("APILB_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    let settings = Settings::new(frames, "apilb-fz-t");
    eprintln!(
        "fuzz: seed {} (APILB_FUZZ_SEED), {frames} frames",
        settings.seed
    );
    let summary = run(&settings).unwrap_or_else(|m| panic!("{m}"));
    eprintln!("{summary}");
    assert!(
        summary.findings.is_empty(),
        "the kernel's flow tables broke a first-principles check:\n{}",
        summary.findings.join("\n")
    );
}

// ---- What the fuzzer found, as fixtures. ----
//
// Both come from a flow whose SYN its master refused (passive detection: the
// RST dropped, the flow kept as refused, its NAT port given back) and which its
// client then resets (a RST near its ISN moves it to `CT_CLOSE`, still in the
// half-open table). The port it gave back may be another flow's by then; the
// datapath treats it as the refused flow's own again.

use lb_common::counters::{DROP_NO_NAT_PORT, DROP_PASSIVE_RST, REPLY_HIT};
use tests::{
    fixture::{
        CLIENT_MAC, FX0_MAC, FX1_MAC, Fixture, Ingress, Lab, LabConfig, XDP_DROP, XDP_REDIRECT,
        master_mac, sa,
    },
    flowfx::{CLIENT4, VIP4, client_syn, new_flow_to},
    packets::Tcp,
};

/// One master, one NAT port, passive detection on: X's SYN took the port, the
/// master refused it (port given back), Y's SYN took it; then X's client RST,
/// which the datapath passes on to the master. Returns the lab, X's SYN and Y's.
fn refused_then_reset(prefix: &str, rst_payload: usize) -> (Lab, Tcp, Tcp) {
    let master = sa("198.51.100.11:6443");
    let mut setup = LabConfig::new(&[sa(VIP4)], &[master]);
    setup.passive = true;
    setup.nat_ports = 40_000..=40_000;
    let mut lab = Lab::with_config(prefix, &setup);
    let x = client_syn(CLIENT4, VIP4);
    lab.run(&new_flow_to("X's SYN", &x, master, 40_000, master_mac(1)));
    let mut refusal = Tcp::syn(master_mac(1), FX1_MAC, master, sa("198.51.100.1:40000"));
    refusal.syn = false;
    refusal.rst = true;
    refusal.seq = 0;
    refusal.ack = Some(x.seq + 1);
    lab.run(&Fixture {
        desc: "the master refuses X's SYN: dropped, X's port given back",
        ingress: Ingress::MasterSide,
        input: refusal.build(),
        verdict: XDP_DROP,
        output: refusal.build(),
        counters: vec![(REPLY_HIT, 1), (DROP_PASSIVE_RST, 1)],
    });
    let y = client_syn("192.0.2.10:51001", VIP4);
    lab.run(&new_flow_to(
        "Y's SYN takes the port",
        &y,
        master,
        40_000,
        master_mac(1),
    ));
    let mut reset = x.clone();
    reset.syn = false;
    reset.rst = true;
    reset.seq = x.seq + 1;
    reset.payload = vec![0; rst_payload];
    let out = lab.test_run(lb_common::PROG_XDP, &reset.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT, "X's RST goes on to the master");
    (lab, x, y)
}

/// Fuzzer finding 1 (seed 3, round "4 NAT ports"): the RST, a little larger
/// than X's SYN, makes X's flow ask the FIB again; the flow is no longer
/// half-open (`CT_CLOSE`), so `to_backend` calls `restore_reply`, which puts a
/// lease for X's old port into `REPLIES`. Y's master's SYN-ACK then matches
/// that lease before Y's own (in `HALF_REPLIES`) and is rewritten to X.
#[test]

fn a_refused_flow_reset_by_its_client_does_not_take_back_its_port_for_replies() {
    let (mut lab, _x, y) = refused_then_reset("apilb-fz-b1", 8);
    let master = sa("198.51.100.11:6443");
    let mut syn_ack = Tcp::syn(master_mac(1), FX1_MAC, master, sa("198.51.100.1:40000"));
    syn_ack.ack = Some(y.seq + 1);
    syn_ack.seq = 0x2000_0000;
    lab.run(&Fixture {
        desc: "Y's master answers Y's SYN: it reaches Y, not X",
        ingress: Ingress::MasterSide,
        input: syn_ack.build(),
        verdict: XDP_REDIRECT,
        output: syn_ack
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa("192.0.2.10:51001"))
            .build(),
        counters: vec![
            (REPLY_HIT, 1),
            (lb_common::counters::FIB_LOOKUP, 1),
            (lb_common::counters::REDIRECT, 1),
        ],
    });
}

/// Fuzzer finding 2 (seed 2, round "4 NAT ports"): X's client opens again. X's
/// flow is over (`CT_CLOSE`), so `ingress` forgets it with `forget`, which
/// removes the lease under X's old port from `HALF_REPLIES`: Y's lease. X's
/// new flow then finds the port free and takes it while Y holds it too.
#[test]

fn a_refused_flow_reset_and_reopened_leaves_the_ports_new_flow_its_lease() {
    let (mut lab, x, _y) = refused_then_reset("apilb-fz-b2", 0);
    lab.run(&Fixture {
        desc: "X's SYN again: the only port is Y's, so no port for X",
        ingress: Ingress::ClientSide,
        input: x.build(),
        verdict: XDP_DROP,
        output: x.build(),
        counters: vec![(DROP_NO_NAT_PORT, 1)],
    });
}

/// Fuzzer finding 1 without passive detection, and so in every configuration:
/// a client that resets its flow before the handshake completes (a client that
/// gave up and then gets the SYN-ACK answers it with a RST) leaves a copy of
/// its half-open lease in `REPLIES` once its next hop is refreshed (here by a
/// larger segment; in life by `nexthop_ttl`, a second). When its port goes to
/// the next flow, that copy still takes the port's replies, ahead of the new
/// flow's own lease.
#[test]

fn a_flow_reset_before_its_handshake_leaves_no_lease_behind_for_the_ports_next_flow() {
    let master = sa("198.51.100.11:6443");
    let mut setup = LabConfig::new(&[sa(VIP4)], &[master]);
    setup.nat_ports = 40_000..=40_000;
    setup.tcp_timeouts.close = std::time::Duration::from_millis(100);
    let mut lab = Lab::with_config("apilb-fz-b3", &setup);
    let x = client_syn(CLIENT4, VIP4);
    lab.run(&new_flow_to("X's SYN", &x, master, 40_000, master_mac(1)));
    let mut reset = x.clone();
    reset.syn = false;
    reset.rst = true;
    reset.seq = x.seq + 1;
    reset.payload = vec![0; 8];
    let out = lab.test_run(lb_common::PROG_XDP, &reset.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT, "X's RST goes on to the master");
    std::thread::sleep(std::time::Duration::from_millis(150));
    let y = client_syn("192.0.2.10:51001", VIP4);
    let out = lab.test_run(lb_common::PROG_XDP, &y.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT, "Y takes X's port once X is over");
    let mut syn_ack = Tcp::syn(master_mac(1), FX1_MAC, master, sa("198.51.100.1:40000"));
    syn_ack.ack = Some(y.seq + 1);
    syn_ack.seq = 0x2000_0000;
    let out = lab.test_run(lb_common::PROG_XDP, &syn_ack.build(), Ingress::MasterSide);
    assert_eq!(
        out.packet,
        syn_ack
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa("192.0.2.10:51001"))
            .build(),
        "Y's master's SYN-ACK reaches Y, not X"
    );
}
