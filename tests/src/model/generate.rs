//! The fuzzer's frames, deterministic from a seed.
//!
//! Three sources, then mutations:
//! - **conversations**: for a client tuple from a small pool (so flows live
//!   through their whole life and ports get reused), the segment its flow's state
//!   calls for, or a plausible wrong one: a SYN (with timestamps in the layouts
//!   stacks use, or none), the master's SYN-ACK to its NAT port, the client's ACK,
//!   data either way, FINs and RSTs near or far from where the flow is, SYNs sent
//!   again, refusals (RST, ICMP unreachable quoting the SYN or another sequence
//!   number), ICMP fragmentation needed or packet too big about its segments;
//! - **the fixtures' other frames**: UDP, ARP, TCP to the node or another port,
//!   VLAN tags, IPv4 options, fragments, frames cut at every layer, ICMP that is
//!   no error, a VIP this node does not own;
//! - **random bytes**, some behind an IPv4 or IPv6 Ethernet type.
//!
//! A third of the frames are then mutated: bits flipped, bytes set to boundary
//! values at the headers' fields (Ethernet type, IHL, total length, fragment
//! bits, protocol, data offset, flags, options, ICMP type and code, the quote),
//! cut short or lengthened, a VLAN tag pushed in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{
    AF_INET, FlowKey, FlowState,
    ct::{
        CT_CLOSE, CT_ESTABLISHED, CT_FIN_WAIT, CT_LAST_ACK, CT_SYN_RECV, CT_SYN_SENT, CT_TIME_WAIT,
    },
};

use super::Model;
use crate::{
    fixture::{CLIENT_MAC, FX0_MAC, FX1_MAC, Ingress, master_mac, sa},
    packets::{Tcp, arp_request, icmp_unreachable, udp},
};

/// A frame for the datapath, with where it arrives and what it was meant as.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub ingress: Ingress,
    pub kind: &'static str,
    pub mutated: bool,
}

/// The VIPs the fuzzer's lab serves ([`super::run`]): two it owns, one it does not.
pub const VIPS4: [&str; 2] = ["192.0.2.100:6443", "192.0.2.101:6443"];
pub const VIP6: &str = "[2001:db8:1::100]:6443";

/// The frame generator.
pub struct Generator {
    rng: fastrand::Rng,
    clients: Vec<SocketAddr>,
}

fn ip(w: &[u32; 4], family: u8) -> IpAddr {
    let b: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let o: [u8; 16] = b.try_into().expect("16 bytes");
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

fn key_of(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    let (s, family) = lb_userspace::datapath::addr_words(src.ip());
    FlowKey {
        src_be: s,
        dst_be: lb_userspace::datapath::addr_words(dst.ip()).0,
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: 6,
        family,
        _pad: 0,
    }
}

impl Generator {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        let mut clients = Vec::new();
        // Clients the FIB resolves (on the client link, and a master as a client),
        // one on the link it does not, one it has no route to.
        for a in [
            "192.0.2.10",
            "192.0.2.21",
            "192.0.2.20",
            "203.0.113.7",
            "198.51.100.12",
            "2001:db8:1::10",
            "2001:db8:1::20",
            "2001:db8:2::12",
        ] {
            for port in 51_000..51_008 {
                clients.push(SocketAddr::new(a.parse().expect("address"), port));
            }
        }
        Self {
            rng: fastrand::Rng::with_seed(seed),
            clients,
        }
    }

    fn pct(&mut self, p: u32) -> bool {
        self.rng.u32(0..100) < p
    }

    /// The next frame, given what the model holds now.
    pub fn next(&mut self, m: &Model) -> Frame {
        if self.rng.u32(0..4000) == 0 {
            return self.slow(m);
        }
        let mut f = match self.rng.u32(0..100) {
            0..62 => self.conversation(m),
            62..72 => self.stray_reply(m),
            72..90 => self.fixture_frame(),
            _ => self.random_frame(),
        };
        // As a veth peer with checksum offload sends it.
        if self.pct(10) {
            super::offload::make_partial(&mut f.bytes);
        }
        if self.pct(33) {
            self.mutate(&mut f);
        }
        if self.pct(8) {
            f.ingress = match f.ingress {
                Ingress::ClientSide => Ingress::MasterSide,
                Ingress::MasterSide => Ingress::ClientSide,
            };
        }
        f
    }

    fn client(&mut self) -> SocketAddr {
        self.clients[self.rng.usize(0..self.clients.len())]
    }

    fn vip_for(&mut self, client: SocketAddr) -> SocketAddr {
        if client.is_ipv4() {
            sa(VIPS4[usize::from(self.pct(8))])
        } else {
            sa(VIP6)
        }
    }

    fn small(&mut self) -> u32 {
        match self.rng.u32(0..4) {
            0 => 0,
            1 => 1,
            2 => self.rng.u32(0..3000),
            _ => self.rng.u32(0..70_000),
        }
    }

    /// A timestamp option for a segment, in one of the layouts stacks use, or
    /// an odd one, or none.
    fn options(&mut self, syn: bool) -> Vec<u8> {
        let (tsval, tsecr) = (self.rng.u32(..), self.rng.u32(..));
        let ts = |v: &mut Vec<u8>| {
            v.extend_from_slice(&tsval.to_be_bytes());
            v.extend_from_slice(&tsecr.to_be_bytes());
        };
        let mut o = Vec::new();
        match self.rng.u32(0..if syn { 6 } else { 4 }) {
            0 | 1 => {}
            2 => {
                o.extend_from_slice(&[1, 1, 8, 10]);
                ts(&mut o);
            }
            3 => {
                // Something else entirely: SACK blocks, or NOPs and an MSS.
                let n = 4 * self.rng.usize(1..=4);
                o = (0..n).map(|_| self.rng.u8(..)).collect();
            }
            4 => {
                // Linux: MSS, SACK-permitted, TS, NOP, window scale.
                o.extend_from_slice(&[2, 4, 5, 0xb4, 4, 2, 8, 10]);
                ts(&mut o);
                o.extend_from_slice(&[1, 3, 3, 7]);
            }
            _ => {
                if self.pct(50) {
                    // The BSDs: MSS, NOP, window scale, NOP, NOP, TS.
                    o.extend_from_slice(&[2, 4, 5, 0xb4, 1, 3, 3, 6, 1, 1, 8, 10]);
                } else {
                    // MSS, NOP, NOP, TS.
                    o.extend_from_slice(&[2, 4, 5, 0xb4, 1, 1, 8, 10]);
                }
                ts(&mut o);
            }
        }
        o
    }

    /// A client's segment from `c` to `v`.
    fn client_seg(
        &mut self,
        c: SocketAddr,
        v: SocketAddr,
        flags: &str,
        seq: u32,
        ack: Option<u32>,
    ) -> Tcp {
        let mut t = Tcp::syn(CLIENT_MAC, FX0_MAC, c, v);
        t.seq = seq;
        t.ack = ack;
        set_flags(&mut t, flags);
        t.tcp_options = self.options(t.syn);
        if !t.syn && self.pct(40) {
            // Now and then as long as a frame goes, for the partial checksums'
            // chunked sum.
            let most = if self.pct(10) { 1460 } else { 200 };
            let n = self.rng.usize(1..most);
            t.payload = (0..n).map(|i| (i * 13).to_le_bytes()[0]).collect();
        }
        t
    }

    /// A master's segment on `fl` (client key `k`) to its NAT port.
    fn backend_seg(
        &mut self,
        m: &Model,
        k: &FlowKey,
        fl: &FlowState,
        flags: &str,
        seq: u32,
        ack: Option<u32>,
    ) -> Tcp {
        let family = k.family;
        let backend = SocketAddr::new(ip(&fl.backend_be, family), u16::from_be(fl.backend_port_be));
        let snat = m
            .snat(family)
            .get(usize::from(fl.snat_index))
            .copied()
            .unwrap_or_default();
        let to = SocketAddr::new(ip(&snat, family), u16::from_be(fl.nat_port_be));
        let mut t = Tcp::syn(master_mac(2), FX1_MAC, backend, to);
        t.seq = seq;
        t.ack = ack;
        set_flags(&mut t, flags);
        t.tcp_options = self.options(t.syn);
        if !t.syn && self.pct(40) {
            let n = self.rng.usize(1..300);
            t.payload = vec![0x62; n];
        }
        t
    }

    fn frame(bytes: Vec<u8>, ingress: Ingress, kind: &'static str) -> Frame {
        Frame {
            bytes,
            ingress,
            kind,
            mutated: false,
        }
    }

    /// A segment on a client tuple's flow, as its state calls for or not.
    #[expect(
        clippy::too_many_lines,
        clippy::many_single_char_names,
        reason = "one arm per segment a state calls for, each one line; c, v, k, t as in \
                  the fixtures"
    )]
    fn conversation(&mut self, m: &Model) -> Frame {
        let c = self.client();
        let v = self.vip_for(c);
        let k = key_of(c, v);
        let flow = m
            .flows
            .get(&(false, k))
            .or_else(|| m.flows.get(&(true, k)))
            .copied();
        let Some(fl) = flow else {
            if self.pct(80) {
                let isn = self.rng.u32(..);
                let t = self.client_seg(c, v, "S", isn, None);
                return Self::frame(t.build(), Ingress::ClientSide, "syn");
            }
            let (flags, kind) = [
                ("A", "stray ack"),
                ("R", "stray rst"),
                ("SA", "stray syn-ack"),
                ("FA", "stray fin"),
            ][self.rng.usize(0..4)];
            let (seq, ack) = (self.rng.u32(..), self.rng.u32(..));
            let t = self.client_seg(c, v, flags, seq, Some(ack));
            return Self::frame(t.build(), Ingress::ClientSide, kind);
        };
        let cseq = fl.seq.wrapping_add(self.small());
        let bseq = fl.ack.wrapping_add(self.small());
        let near_ack = fl.seq.wrapping_add(1);
        let r = self.rng.u32(0..100);
        let (t, ingress, kind) = match (fl.state, r) {
            (CT_SYN_SENT, 0..35) | (CT_SYN_RECV, 0..10) => {
                let isn = self.rng.u32(..);
                let ack = if self.pct(85) {
                    near_ack
                } else {
                    self.rng.u32(..)
                };
                (
                    self.backend_seg(m, &k, &fl, "SA", isn, Some(ack)),
                    Ingress::MasterSide,
                    "syn-ack",
                )
            }
            (CT_TIME_WAIT | CT_CLOSE, 0..60) => {
                let isn = self.rng.u32(..);
                (
                    self.client_seg(c, v, "S", isn, None),
                    Ingress::ClientSide,
                    "syn on a closed flow",
                )
            }
            (CT_SYN_SENT, 35..50) => (
                self.client_seg(c, v, "S", fl.seq, None),
                Ingress::ClientSide,
                "syn again",
            ),
            (CT_SYN_SENT, 50..62) => {
                let ack = if self.pct(70) {
                    near_ack
                } else {
                    near_ack.wrapping_add(self.small())
                };
                (
                    self.backend_seg(m, &k, &fl, "RA", 0, Some(ack)),
                    Ingress::MasterSide,
                    "refusing rst",
                )
            }
            (CT_SYN_SENT, 62..75) => return self.icmp_about(m, &k, &fl, false),
            (CT_SYN_RECV, 10..70) | (CT_LAST_ACK, 0..40) => (
                self.client_seg(c, v, "A", cseq, Some(fl.ack)),
                Ingress::ClientSide,
                "ack",
            ),
            (CT_LAST_ACK, 40..70) => (
                self.backend_seg(m, &k, &fl, "A", bseq, Some(fl.seq)),
                Ingress::MasterSide,
                "master ack",
            ),
            (CT_ESTABLISHED | CT_FIN_WAIT, 0..30) => (
                self.client_seg(c, v, "A", cseq, Some(fl.ack)),
                Ingress::ClientSide,
                "data",
            ),
            (CT_ESTABLISHED | CT_FIN_WAIT, 30..55) => (
                self.backend_seg(m, &k, &fl, "A", bseq, Some(fl.seq)),
                Ingress::MasterSide,
                "master data",
            ),
            (CT_ESTABLISHED | CT_FIN_WAIT, 55..67) => (
                self.client_seg(c, v, "FA", cseq, Some(fl.ack)),
                Ingress::ClientSide,
                "fin",
            ),
            (CT_ESTABLISHED | CT_FIN_WAIT, 67..79) => (
                self.backend_seg(m, &k, &fl, "FA", bseq, Some(fl.seq)),
                Ingress::MasterSide,
                "master fin",
            ),
            (_, 79..84) => (
                self.client_seg(c, v, "R", cseq, None),
                Ingress::ClientSide,
                "rst",
            ),
            (_, 84..89) => (
                self.backend_seg(m, &k, &fl, "RA", bseq, Some(fl.seq)),
                Ingress::MasterSide,
                "master rst",
            ),
            (_, 89..92) => return self.icmp_about(m, &k, &fl, true),
            (_, 92..96) => {
                let seq = self.rng.u32(..);
                (
                    self.client_seg(c, v, "S", seq, None),
                    Ingress::ClientSide,
                    "syn on a flow",
                )
            }
            _ => {
                let flags = ["A", "FA", "R", "SA", "SF", "SR", "", "FPU"][self.rng.usize(0..8)];
                let (a, b) = (self.rng.u32(..), self.rng.u32(..));
                if self.pct(50) {
                    (
                        self.client_seg(c, v, flags, a, Some(b)),
                        Ingress::ClientSide,
                        "odd flags",
                    )
                } else {
                    (
                        self.backend_seg(m, &k, &fl, flags, a, Some(b)),
                        Ingress::MasterSide,
                        "master odd flags",
                    )
                }
            }
        };
        Self::frame(t.build(), ingress, kind)
    }

    /// A tuple visited about every second or two: its SYN, then the same SYN
    /// again (with passive detection, a master that stayed silent for 500 ms).
    #[expect(
        clippy::many_single_char_names,
        reason = "c, v, k, t as in the fixtures"
    )]
    fn slow(&mut self, m: &Model) -> Frame {
        let v6 = self.pct(30);
        let port = 52_000 + self.rng.u16(0..4);
        let (c, v) = if v6 {
            (
                SocketAddr::new("2001:db8:1::10".parse().expect("v6"), port),
                sa(VIP6),
            )
        } else {
            (
                SocketAddr::new("192.0.2.10".parse().expect("v4"), port),
                sa(VIPS4[0]),
            )
        };
        let k = key_of(c, v);
        let flow = m
            .flows
            .get(&(false, k))
            .or_else(|| m.flows.get(&(true, k)))
            .copied();
        let t = match flow {
            Some(fl) if fl.state == CT_SYN_SENT => {
                let mut t = Tcp::syn(CLIENT_MAC, FX0_MAC, c, v);
                t.seq = fl.seq;
                t
            }
            Some(fl) if fl.state != CT_TIME_WAIT && fl.state != CT_CLOSE => {
                let mut t = Tcp::syn(CLIENT_MAC, FX0_MAC, c, v);
                set_flags(&mut t, "R");
                t.seq = fl.seq.wrapping_add(1);
                t
            }
            _ => {
                let mut t = Tcp::syn(CLIENT_MAC, FX0_MAC, c, v);
                t.seq = self.rng.u32(..);
                t
            }
        };
        Self::frame(t.build(), Ingress::ClientSide, "slow syn")
    }

    /// An ICMP error about a flow's segment as it left for the master: an
    /// unreachable (quoting its SYN, or another number) or a packet too big
    /// (from a router), the quote whole or cut to the first 8 bytes of TCP.
    fn icmp_about(&mut self, m: &Model, k: &FlowKey, fl: &FlowState, too_big: bool) -> Frame {
        let family = k.family;
        let backend = SocketAddr::new(ip(&fl.backend_be, family), u16::from_be(fl.backend_port_be));
        let snat = m
            .snat(family)
            .get(usize::from(fl.snat_index))
            .copied()
            .unwrap_or_default();
        let from_port = SocketAddr::new(ip(&snat, family), u16::from_be(fl.nat_port_be));
        let mut sent = Tcp::syn(FX1_MAC, master_mac(1), from_port, backend);
        sent.seq = if self.pct(80) {
            fl.seq
        } else {
            self.rng.u32(..)
        };
        if too_big {
            sent = sent.data(&[0x42; 1200]);
        }
        let router: IpAddr = match (family == AF_INET, too_big) {
            (true, true) => "198.51.100.254".parse().expect("v4"),
            (false, true) => "2001:db8:2::fe".parse().expect("v6"),
            _ => backend.ip(),
        };
        let mut bytes = icmp_unreachable(master_mac(1), FX1_MAC, router, &sent, too_big);
        if self.pct(25) {
            // A quote of the IP header and 8 bytes of TCP only, as RFC 792 asks.
            let ip_len = if family == AF_INET { 20 } else { 40 };
            let outer = if family == AF_INET {
                14 + 20 + 8
            } else {
                14 + 40 + 8
            };
            bytes.truncate(outer + ip_len + 8);
            fix_lengths(&mut bytes);
        }
        let kind = if too_big {
            "icmp too big"
        } else {
            "icmp unreachable"
        };
        Self::frame(bytes, Ingress::MasterSide, kind)
    }

    /// A master's segment to a NAT port of the range with no flow, or about one.
    fn stray_reply(&mut self, m: &Model) -> Frame {
        let leases: Vec<&(bool, FlowKey)> = m.replies.keys().collect();
        if !leases.is_empty() && self.pct(60) {
            let (_, rk) = *leases[self.rng.usize(0..leases.len())];
            let family = rk.family;
            let from = SocketAddr::new(ip(&rk.src_be, family), u16::from_be(rk.sport_be));
            let to = SocketAddr::new(ip(&rk.dst_be, family), u16::from_be(rk.dport_be));
            let flags = ["A", "SA", "FA", "RA", "R", "S"][self.rng.usize(0..6)];
            let mut t = Tcp::syn(master_mac(1), FX1_MAC, from, to);
            t.seq = self.rng.u32(..);
            t.ack = Some(self.rng.u32(..));
            set_flags(&mut t, flags);
            t.tcp_options = self.options(t.syn);
            return Self::frame(t.build(), Ingress::MasterSide, "master segment on a lease");
        }
        let v4 = self.pct(60);
        let from = if v4 {
            sa("198.51.100.11:6443")
        } else {
            sa("[2001:db8:2::11]:6443")
        };
        let port = 39_990 + self.rng.u16(0..1020);
        let to = if v4 {
            SocketAddr::new("198.51.100.1".parse().expect("v4"), port)
        } else {
            SocketAddr::new("2001:db8:2::1".parse().expect("v6"), port)
        };
        let mut t = Tcp::syn(master_mac(1), FX1_MAC, from, to);
        t.ack = Some(self.rng.u32(..));
        set_flags(&mut t, ["A", "SA", "R", "FA"][self.rng.usize(0..4)]);
        Self::frame(t.build(), Ingress::MasterSide, "master segment, no lease")
    }

    /// One of the fixtures' frames that are no flow's.
    fn fixture_frame(&mut self) -> Frame {
        let c = self.client();
        let v = self.vip_for(c);
        let mut syn = Tcp::syn(CLIENT_MAC, FX0_MAC, c, v);
        syn.seq = self.rng.u32(..);
        let (bytes, kind) = match self.rng.u32(0..12) {
            0 => (udp(CLIENT_MAC, FX0_MAC, c, v), "udp to a vip"),
            1 => (
                arp_request(CLIENT_MAC, [192, 0, 2, 10], [192, 0, 2, 100]),
                "arp",
            ),
            2 => {
                let node = if c.is_ipv4() {
                    sa("192.0.2.1:22")
                } else {
                    sa("[2001:db8:1::1]:22")
                };
                (syn.clone().between(c, node).build(), "tcp to the node")
            }
            3 => {
                let other = SocketAddr::new(v.ip(), [80, 6444, 0, 65_535][self.rng.usize(0..4)]);
                (
                    syn.clone().between(c, other).build(),
                    "tcp to a vip's other port",
                )
            }
            4 => {
                syn.vlan = Some(self.rng.u16(1..4095));
                (syn.build(), "vlan")
            }
            5 if c.is_ipv4() => {
                let n = 4 * self.rng.usize(1..=10);
                syn.ip_options = (0..n)
                    .map(|_| [0, 1, 0x94, 7, 0x44][self.rng.usize(0..5)])
                    .collect();
                (syn.build(), "ipv4 options")
            }
            6 => {
                let mut d = syn.data(&[0x55; 64]);
                if self.pct(50) {
                    d.more_fragments = true;
                } else {
                    d.fragment_offset = self.rng.u16(1..8191);
                }
                (d.build(), "fragment")
            }
            7 => {
                let full = syn.build();
                let cut = self.rng.usize(14..full.len());
                (full[..cut].to_vec(), "truncated")
            }
            8 => {
                let mut b = syn.build();
                // An ICMP echo request or another type: not an error about TCP.
                if c.is_ipv4() {
                    b[23] = 1;
                    b[34] = [8, 0, 11, 5][self.rng.usize(0..4)];
                } else {
                    b[20] = 58;
                    b[54] = [128, 129, 135, 3][self.rng.usize(0..4)];
                }
                (b, "icmp, no error about tcp")
            }
            9 => {
                let mut d = syn.data(&[0x66; 1500]);
                d.ack = Some(self.rng.u32(..));
                (d.build(), "large segment")
            }
            _ => {
                // An ICMP unreachable about a segment of no flow.
                let mut sent = Tcp::syn(
                    FX1_MAC,
                    master_mac(1),
                    sa("198.51.100.1:40001"),
                    sa("198.51.100.11:6443"),
                );
                sent.seq = self.rng.u32(..);
                let too_big = self.pct(50);
                (
                    icmp_unreachable(
                        master_mac(1),
                        FX1_MAC,
                        sa("198.51.100.11:0").ip(),
                        &sent,
                        too_big,
                    ),
                    "icmp about no flow",
                )
            }
        };
        let ingress = if kind.starts_with("icmp about") {
            Ingress::MasterSide
        } else {
            Ingress::ClientSide
        };
        Self::frame(bytes, ingress, kind)
    }

    fn random_frame(&mut self) -> Frame {
        let n = self.rng.usize(14..160);
        let mut b: Vec<u8> = (0..n).map(|_| self.rng.u8(..)).collect();
        match self.rng.u32(0..3) {
            0 if n >= 15 => {
                b[12..14].copy_from_slice(&[8, 0]);
                b[14] = 0x40 | (b[14] & 0x0f);
            }
            1 if n >= 15 => {
                b[12..14].copy_from_slice(&[0x86, 0xdd]);
                b[14] = 0x60 | (b[14] & 0x0f);
            }
            _ => {}
        }
        let ingress = if self.pct(50) {
            Ingress::ClientSide
        } else {
            Ingress::MasterSide
        };
        Self::frame(b, ingress, "random bytes")
    }

    /// One to three mutations.
    #[expect(clippy::too_many_lines, reason = "one arm per kind of mutation")]
    fn mutate(&mut self, f: &mut Frame) {
        f.mutated = true;
        for _ in 0..self.rng.u32(1..=3) {
            let b = &mut f.bytes;
            let l3 = if b.len() >= 14 && matches!([b[12], b[13]], [0x81, 0] | [0x88, 0xa8]) {
                18
            } else {
                14
            };
            let ihl = b.get(l3).map_or(20, |v| usize::from(v & 0x0f) * 4);
            let v6 = b.get(l3).is_some_and(|v| v >> 4 == 6);
            let l4 = l3 + if v6 { 40 } else { ihl.max(20) };
            // Offsets of the fields a parser decides on.
            let fields = [
                12,
                13,
                l3,
                l3 + 1,
                l3 + 2,
                l3 + 3,
                l3 + 4,
                l3 + 5,
                l3 + 6,
                l3 + 7,
                l3 + 9,
                l4,
                l4 + 1,
                l4 + 2,
                l4 + 3,
                l4 + 12,
                l4 + 13,
                l4 + 20,
                l4 + 21,
                l4 + 22,
                l4 + 23,
                l4 + 24,
                l4 + 25,
                l4 + 28,
                l4 + 8,
                l4 + 9,
                l4 + 14,
                l4 + 8 + 9,
                l4 + 8 + 6,
            ];
            match self.rng.u32(0..10) {
                0 | 1 => {
                    let i = if self.pct(70) {
                        self.rng.usize(0..b.len().min(90))
                    } else {
                        self.rng.usize(0..b.len())
                    };
                    b[i] ^= 1 << self.rng.u32(0..8);
                }
                2..=4 => {
                    let i = fields[self.rng.usize(0..fields.len())];
                    if i < b.len() {
                        b[i] = [
                            0,
                            1,
                            2,
                            3,
                            4,
                            5,
                            6,
                            8,
                            10,
                            0x0f,
                            0x10,
                            0x3f,
                            0x40,
                            0x45,
                            0x4f,
                            0x60,
                            0x7f,
                            0x80,
                            0xf0,
                            0xff,
                            self.rng.u8(..),
                        ][self.rng.usize(0..21)];
                    }
                }
                5 => {
                    let cut = self.rng.usize(14.min(b.len())..=b.len());
                    b.truncate(cut.max(14));
                }
                6 => {
                    let n = self.rng.usize(1..40);
                    b.extend((0..n).map(|_| self.rng.u8(..)));
                }
                7 => {
                    // Lengths that lie.
                    let at = if v6 { l3 + 4 } else { l3 + 2 };
                    if at + 2 <= b.len() {
                        let v = [0u16, 1, 19, 20, 40, 0x7fff, 0xffff, self.rng.u16(..)]
                            [self.rng.usize(0..8)];
                        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
                    }
                }
                8 => {
                    // A VLAN tag pushed in.
                    if b.len() >= 14 && b.len() < 1500 {
                        let tpid: [u8; 2] = if self.pct(50) {
                            [0x81, 0]
                        } else {
                            [0x88, 0xa8]
                        };
                        let tag = self.rng.u16(..).to_be_bytes();
                        let mut tagged = b[..12].to_vec();
                        tagged.extend_from_slice(&[tpid[0], tpid[1], tag[0], tag[1]]);
                        tagged.extend_from_slice(&b[12..]);
                        *b = tagged;
                    }
                }
                _ => {
                    // TCP flags.
                    if l4 + 13 < b.len() {
                        b[l4 + 13] = self.rng.u8(..);
                    }
                }
            }
        }
    }
}

/// Set TCP flags from letters (S, A, F, R; others ignored): ACK only with `A`,
/// acknowledging what the segment says or 0.
fn set_flags(t: &mut Tcp, flags: &str) {
    t.syn = flags.contains('S');
    t.fin = flags.contains('F');
    t.rst = flags.contains('R');
    t.ack = if flags.contains('A') {
        Some(t.ack.unwrap_or(0))
    } else {
        None
    };
}

/// After cutting an ICMP error's quote: the outer lengths and checksums as a
/// router would send it.
fn fix_lengths(b: &mut [u8]) {
    use super::frame::{fold, sum};
    let v4 = b[12..14] == [8, 0];
    if v4 {
        let tot = u16::try_from(b.len() - 14).expect("small");
        b[16..18].copy_from_slice(&tot.to_be_bytes());
        b[24..26].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&b[14..34], 0));
        b[24..26].copy_from_slice(&c.to_be_bytes());
        b[36..38].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&b[34..], 0));
        b[36..38].copy_from_slice(&c.to_be_bytes());
    } else {
        let plen = u16::try_from(b.len() - 54).expect("small");
        b[18..20].copy_from_slice(&plen.to_be_bytes());
        b[56..58].copy_from_slice(&[0, 0]);
        let pseudo = sum(&b[22..54], 0) + 58 + u64::from(plen);
        let c = !fold(sum(&b[54..], pseudo));
        b[56..58].copy_from_slice(&c.to_be_bytes());
    }
}
