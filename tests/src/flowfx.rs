//! The packet fixtures' vocabulary: the lab's VIPs, masters and clients, and the
//! segments of a flow's life as the datapath must rewrite them (a new flow, its
//! handshake, its close, a refused SYN), shared by the fixture suites.

use std::net::SocketAddr;

use lb_common::counters::{
    DROP_PASSIVE_RST, FIB_LOOKUP, FLOW_ESTABLISHED, FLOW_NEW, REDIRECT, REPLY_HIT,
};

use crate::{
    fixture::{
        CLIENT_MAC, FX0_MAC, FX1_MAC, Fixture, Ingress, Lab, LabConfig, XDP_DROP, XDP_PASS,
        XDP_REDIRECT, master_mac, sa, snat_for,
    },
    packets::{Mac, Tcp},
};

pub const VIP4: &str = "192.0.2.100:6443";
pub const VIP6: &str = "[2001:db8:1::100]:6443";
pub const CLIENT4: &str = "192.0.2.10:51000";
pub const CLIENT6: &str = "[2001:db8:1::10]:51000";

/// The IPv4 masters 1-3 with the ids the controller gives them in [`lab`]'s
/// config, where they come first.
pub fn masters4() -> Vec<(u32, SocketAddr)> {
    (1..=3)
        .map(|n| (n, sa(&format!("198.51.100.1{n}:6443"))))
        .collect()
}

/// The IPv6 masters 1-3 with their ids in [`lab`]'s config, after the IPv4 ones.
pub fn masters6() -> Vec<(u32, SocketAddr)> {
    (1..=3)
        .map(|n| (3 + n, sa(&format!("[2001:db8:2::1{n}]:6443"))))
        .collect()
}

pub fn addrs(masters: &[(u32, SocketAddr)]) -> Vec<SocketAddr> {
    masters.iter().map(|(_, a)| *a).collect()
}

/// The MAC of the master with id `id` among `masters` (master `n` is the `n`th).
pub fn mac_of(masters: &[(u32, SocketAddr)], id: u32) -> Mac {
    let n = masters
        .iter()
        .position(|(b, _)| *b == id)
        .expect("one of these masters");
    master_mac(u8::try_from(n + 1).expect("three masters"))
}

/// VIP 0 (IPv4) and VIP 1 (IPv6), static (owned), each over its three masters.
pub fn two_vips() -> LabConfig {
    LabConfig::new(
        &[sa(VIP4), sa(VIP6)],
        &[addrs(&masters4()), addrs(&masters6())].concat(),
    )
}

/// A lab configured with [`two_vips`].
pub fn lab(prefix: &str) -> Lab {
    Lab::with_config(prefix, &two_vips())
}

/// A lab whose IPv4 VIP balances one master, id 1 (198.51.100.11:6443).
pub fn one_master_lab(prefix: &str) -> (Lab, SocketAddr) {
    let master = sa("198.51.100.11:6443");
    let lab = Lab::with_config(prefix, &LabConfig::new(&[sa(VIP4)], &[master]));
    (lab, master)
}

pub fn client_syn(client: &str, vip: &str) -> Tcp {
    Tcp::syn(CLIENT_MAC, FX0_MAC, sa(client), sa(vip))
}

/// What a client's packet looks like after NAT to `backend` with source port `port`.
pub fn natted(pkt: &Tcp, backend: SocketAddr, port: u16, dst_mac: Mac) -> Tcp {
    pkt.clone()
        .via(FX1_MAC, dst_mac)
        .between(SocketAddr::new(snat_for(backend.ip()), port), backend)
}

/// A client packet that must leave under NAT to `backend`, from source port `port`,
/// redirected to the master side.
pub fn to_master(
    desc: &'static str,
    pkt: &Tcp,
    backend: SocketAddr,
    port: u16,
    mac: Mac,
    counters: Vec<(u32, u64)>,
) -> Fixture {
    Fixture {
        desc,
        ingress: Ingress::ClientSide,
        input: pkt.build(),
        verdict: XDP_REDIRECT,
        output: natted(pkt, backend, port, mac).build(),
        counters,
    }
}

/// The first SYN of a flow, under NAT to `backend`: a new flow, a FIB lookup, a redirect.
pub fn new_flow_to(
    desc: &'static str,
    syn: &Tcp,
    backend: SocketAddr,
    port: u16,
    mac: Mac,
) -> Fixture {
    to_master(
        desc,
        syn,
        backend,
        port,
        mac,
        vec![(FLOW_NEW, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
    )
}

pub fn unchanged(desc: &'static str, ingress: Ingress, input: Vec<u8>, counter: u32) -> Fixture {
    Fixture {
        desc,
        ingress,
        output: input.clone(),
        input,
        verdict: XDP_PASS,
        counters: vec![(counter, 1)],
    }
}

/// The master a SYN is natted to, and its MAC, as the lab's Maglev ring says.
pub fn picked(
    lab: &Lab,
    vip_id: u32,
    client: &str,
    vip: &str,
    masters: &[(u32, SocketAddr)],
) -> (u32, SocketAddr, Mac) {
    let id = lab.maglev_pick(vip_id, sa(client), sa(vip));
    let (_, addr) = *masters
        .iter()
        .find(|(b, _)| *b == id)
        .expect("ring holds a configured master");
    (id, addr, mac_of(masters, id))
}

pub fn from_master(
    desc: &'static str,
    master: SocketAddr,
    port: u16,
    client: &str,
    seg: Tcp,
    first: bool,
) -> Fixture {
    let mut m = seg
        .via(master_mac(1), FX1_MAC)
        .between(master, sa("198.51.100.1:0"));
    m.dst.set_port(port);
    Fixture {
        desc,
        ingress: Ingress::MasterSide,
        input: m.build(),
        verdict: XDP_REDIRECT,
        output: m
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa(client))
            .build(),
        counters: if first {
            vec![(REPLY_HIT, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)]
        } else {
            vec![(REPLY_HIT, 1), (REDIRECT, 1)]
        },
    }
}

/// A client's segment on its established flow natted to `port`: forwarded with the
/// cached next hop.
pub fn on_flow(
    desc: &'static str,
    seg: &Tcp,
    master: SocketAddr,
    port: u16,
    extra: &[(u32, u64)],
) -> Fixture {
    let mut counters = vec![(REDIRECT, 1)];
    counters.extend_from_slice(extra);
    to_master(desc, seg, master, port, master_mac(1), counters)
}

/// The master's SYN-ACK to flow `a` (natted to port 40000), then the client's
/// ACK, which proves the flow; returns that ACK.
pub fn handshake(lab: &mut Lab, a: &Tcp, master: SocketAddr) -> Tcp {
    handshake_on(lab, a, master, 40_000)
}

/// [`handshake`] for a flow natted to `port`.
pub fn handshake_on(lab: &mut Lab, a: &Tcp, master: SocketAddr, port: u16) -> Tcp {
    // The handshake: the master's SYN-ACK, then the client's ACK proves the flow.
    let mut syn_ack = Tcp::syn(master_mac(1), FX1_MAC, master, master);
    syn_ack.ack = Some(a.seq + 1);
    lab.run(&from_master(
        "the master's SYN-ACK",
        master,
        port,
        "192.0.2.10:51000",
        syn_ack,
        true,
    ));
    let mut ack = a.clone().data(b"");
    ack.ack = Some(0x1000_0001);
    lab.run(&on_flow(
        "the client's ACK",
        &ack,
        master,
        port,
        &[(FLOW_ESTABLISHED, 1)],
    ));
    ack
}

/// Close flow `a` (natted to port 40000, its last client segment `ack`) client
/// first: its FIN, the master's FIN, its last ACK.
pub fn close_client_first(lab: &mut Lab, a: &Tcp, ack: &Tcp, master: SocketAddr) {
    let mut fin = ack.clone();
    fin.fin = true;
    lab.run(&on_flow("the client's FIN", &fin, master, 40_000, &[]));
    let mut master_fin = Tcp::syn(master_mac(1), FX1_MAC, master, master);
    master_fin.syn = false;
    master_fin.fin = true;
    master_fin.ack = Some(a.seq + 2);
    lab.run(&from_master(
        "the master's FIN",
        master,
        40_000,
        "192.0.2.10:51000",
        master_fin,
        false,
    ));
    let mut last = ack.clone();
    last.seq += 1;
    last.ack = Some(0x1000_0002);
    lab.run(&on_flow(
        "the client's last ACK",
        &last,
        master,
        40_000,
        &[],
    ));
}

/// A lab with passive detection `on` or off and one half-open IPv4 flow: the
/// client's SYN, the master it went to (id, address, MAC) and the SNAT side.
pub struct HalfOpen {
    pub lab: Lab,
    pub syn: Tcp,
    pub id: u32,
    pub backend: SocketAddr,
    pub mac: Mac,
    pub snat: SocketAddr,
}

pub fn half_open(prefix: &str, on: bool) -> HalfOpen {
    half_open_at(prefix, on, (CLIENT4, VIP4, 0), &masters4())
}

/// [`half_open`] from `client` to VIP `vip_id` at `vip`.
pub fn half_open_at(
    prefix: &str,
    on: bool,
    (client, vip, vip_id): (&str, &str, u32),
    masters: &[(u32, SocketAddr)],
) -> HalfOpen {
    let mut setup = two_vips();
    setup.passive = on;
    let mut lab = Lab::with_config(prefix, &setup);
    let syn = client_syn(client, vip);
    let (id, backend, mac) = picked(&lab, vip_id, client, vip, masters);
    lab.run(&new_flow_to("SYN", &syn, backend, 40_000, mac));
    let snat = SocketAddr::new(snat_for(backend.ip()), 40_000);
    HalfOpen {
        lab,
        syn,
        id,
        backend,
        mac,
        snat,
    }
}

impl HalfOpen {
    /// A RST from the master to the SNAT side, acknowledging `ack` (the SYN's
    /// sequence number plus one refuses that SYN).
    #[must_use]
    pub fn rst(&self, ack: u32) -> Tcp {
        let mut rst = Tcp::syn(self.mac, FX1_MAC, self.backend, self.snat);
        rst.syn = false;
        rst.rst = true;
        rst.ack = Some(ack);
        rst.seq = 0;
        rst
    }
}

/// A master's RST answering the SYN it was sent (nothing listens there), with
/// passive detection `on` or off.
pub fn master_rst(on: bool) -> HalfOpen {
    let prefix = if on {
        "apilb-fx-prst"
    } else {
        "apilb-fx-prst0"
    };
    let mut h = half_open(prefix, on);
    let rst = h.rst(h.syn.seq + 1);
    if on {
        h.lab.run(&Fixture {
            desc: "RST from a master that never answered the SYN: dropped, flow refused",
            ingress: Ingress::MasterSide,
            input: rst.build(),
            verdict: XDP_DROP,
            output: rst.build(),
            counters: vec![(REPLY_HIT, 1), (DROP_PASSIVE_RST, 1)],
        });
    } else {
        let back = rst
            .clone()
            .via(FX0_MAC, CLIENT_MAC)
            .between(sa(VIP4), sa(CLIENT4));
        h.lab.run(&Fixture {
            desc: "RST from a master, passive detection off: reaches the client",
            ingress: Ingress::MasterSide,
            input: rst.build(),
            verdict: XDP_REDIRECT,
            output: back.build(),
            counters: vec![(REPLY_HIT, 1), (FIB_LOOKUP, 1), (REDIRECT, 1)],
        });
    }
    h
}

/// The master after `id` in the controller's fallback order (by address), which
/// a SYN balanced away from `id` goes to.
pub fn fallback_of(lab: &Lab, id: u32) -> (u32, SocketAddr) {
    let (other, to) = lab.fallback(id);
    assert_ne!(other, id, "three masters");
    (other, to)
}
