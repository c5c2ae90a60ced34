//! Packets for fixtures, described as data and serialised by etherparse.
//!
//! etherparse computes every length and checksum from scratch, so an expected output
//! built here is an independent check of the datapath's incremental updates.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, Icmpv6Type, IpFragOffset,
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header,
    PacketBuilder, SingleVlanHeader, TcpHeader, VlanHeader, VlanId, VlanPcp, icmpv4, icmpv6,
};

pub type Mac = [u8; 6];

/// A TCP segment in an Ethernet frame.
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "TCP and IP flags are independent bits"
)]
pub struct Tcp {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub vlan: Option<u16>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub syn: bool,
    pub ack: Option<u32>,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    /// IPv4 "more fragments" flag and fragment offset (in 8-byte units); IPv6 uses a
    /// fragment extension header when either is set.
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub ttl: u8,
    /// TCP options, raw (a multiple of 4 bytes, at most 40); see [`Tcp::timestamps`].
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    /// A SYN from `src` to `dst`.
    #[must_use]
    pub fn syn(eth_src: Mac, eth_dst: Mac, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            eth_src,
            eth_dst,
            vlan: None,
            src,
            dst,
            syn: true,
            ack: None,
            rst: false,
            fin: false,
            seq: 0x1000_0000,
            ip_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            ttl: 64,
            tcp_options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// The same segment with a timestamp option (TSval, TSecr), laid out as Linux
    /// sends it: after MSS and SACK-permitted on a SYN, after two NOPs otherwise.
    #[must_use]
    pub fn timestamps(mut self, tsval: u32, tsecr: u32) -> Self {
        let mut o = if self.syn {
            vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10]
        } else {
            vec![1, 1, 8, 10]
        };
        o.extend_from_slice(&tsval.to_be_bytes());
        o.extend_from_slice(&tsecr.to_be_bytes());
        if self.syn {
            o.extend_from_slice(&[1, 3, 3, 7]);
        }
        self.tcp_options = o;
        self
    }

    /// The segment's (TSval, TSecr), if it carries them where [`Tcp::timestamps`]
    /// puts them; read from a built frame at the TCP header offset `l4`.
    #[must_use]
    pub fn timestamps_in(frame: &[u8], l4: usize) -> Option<(u32, u32)> {
        let doff = usize::from(frame.get(l4 + 12)? >> 4) * 4;
        let opts = frame.get(l4 + 20..l4 + doff)?;
        let at = opts.windows(2).position(|w| w == [8, 10])?;
        let word = |i: usize| u32::from_be_bytes(opts[i..i + 4].try_into().expect("4 bytes"));
        Some((word(at + 2), word(at + 6)))
    }

    /// The same segment as an established-flow data packet.
    #[must_use]
    pub fn data(mut self, payload: &[u8]) -> Self {
        self.syn = false;
        self.ack = Some(0x2000_0001);
        self.seq += 1;
        self.payload = payload.to_vec();
        self
    }

    /// The same segment with other MACs (what forwarding does).
    #[must_use]
    pub fn via(mut self, eth_src: Mac, eth_dst: Mac) -> Self {
        self.eth_src = eth_src;
        self.eth_dst = eth_dst;
        self
    }

    /// The same segment with other endpoints (what NAT does).
    #[must_use]
    pub fn between(mut self, src: SocketAddr, dst: SocketAddr) -> Self {
        self.src = src;
        self.dst = dst;
        self
    }

    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), self.seq, 64_240);
        tcp.set_options_raw(&self.tcp_options)
            .expect("tcp options: a multiple of 4 bytes, at most 40");
        tcp.syn = self.syn;
        tcp.rst = self.rst;
        tcp.fin = self.fin;
        if let Some(ack) = self.ack {
            tcp.ack = true;
            tcp.acknowledgment_number = ack;
        }
        let ip = match (self.src, self.dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                let mut h =
                    Ipv4Header::new(0, self.ttl, IpNumber::TCP, s.ip().octets(), d.ip().octets())
                        .expect("ipv4 header");
                h.identification = 0x4242;
                h.dont_fragment = !self.more_fragments && self.fragment_offset == 0;
                h.more_fragments = self.more_fragments;
                h.fragment_offset =
                    IpFragOffset::try_new(self.fragment_offset).expect("fragment offset");
                h.options = Ipv4Options::try_from(&self.ip_options[..]).expect("ipv4 options");
                IpHeaders::Ipv4(h, etherparse::Ipv4Extensions::default())
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                let fragmented = self.more_fragments || self.fragment_offset != 0;
                let h = Ipv6Header {
                    traffic_class: 0,
                    flow_label: etherparse::Ipv6FlowLabel::default(),
                    payload_length: 0,
                    next_header: if fragmented {
                        IpNumber::IPV6_FRAGMENTATION_HEADER
                    } else {
                        IpNumber::TCP
                    },
                    hop_limit: self.ttl,
                    source: s.ip().octets(),
                    destination: d.ip().octets(),
                };
                let mut ext = Ipv6Extensions::default();
                if fragmented {
                    ext.fragment = Some(Ipv6FragmentHeader::new(
                        IpNumber::TCP,
                        IpFragOffset::try_new(self.fragment_offset).expect("fragment offset"),
                        self.more_fragments,
                        0x4242,
                    ));
                }
                IpHeaders::Ipv6(h, ext)
            }
            _ => panic!("mixed address families in {self:?}"),
        };
        let eth = PacketBuilder::ethernet2(self.eth_src, self.eth_dst);
        let mut out = Vec::new();
        match self.vlan {
            Some(id) => eth
                .vlan(VlanHeader::Single(SingleVlanHeader {
                    pcp: VlanPcp::ZERO,
                    drop_eligible_indicator: false,
                    vlan_id: VlanId::try_new(id).expect("vlan id"),
                    ether_type: EtherType(0),
                }))
                .ip(ip)
                .tcp_header(tcp)
                .write(&mut out, &self.payload),
            None => eth.ip(ip).tcp_header(tcp).write(&mut out, &self.payload),
        }
        .expect("serialise tcp packet");
        out
    }

    /// The frame as a veth or tap peer with checksum offload hands it over: the
    /// TCP checksum field holds only the pseudo-header's sum, folded and not
    /// inverted (Linux's `~tcp_v4_check(len, saddr, daddr, 0)`), for a device to
    /// finish. Not for a VLAN-tagged segment.
    #[must_use]
    pub fn build_partial(&self) -> Vec<u8> {
        assert!(self.vlan.is_none(), "a partial checksum fixture has no tag");
        let mut out = self.build();
        let l4 = l4_offset(&out);
        let field = fold(pseudo_sum(&out, l4));
        out[l4 + 16..l4 + 18].copy_from_slice(&field.to_be_bytes());
        out
    }
}

/// The offset of the TCP header in an untagged IPv4 or IPv6 (no extension
/// header) frame.
#[must_use]
pub fn l4_offset(frame: &[u8]) -> usize {
    match frame[14] >> 4 {
        4 => 14 + usize::from(frame[14] & 0x0f) * 4,
        6 => 14 + 40,
        v => panic!("IP version {v}"),
    }
}

/// The one's-complement sum, in network order, of the TCP pseudo-header of the
/// segment at `l4` in `frame` (IPv4 or IPv6): addresses, protocol 6, length.
#[must_use]
pub fn pseudo_sum(frame: &[u8], l4: usize) -> u64 {
    let (addrs, len) = if frame[14] >> 4 == 4 {
        let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        (&frame[26..34], total - (l4 - 14))
    } else {
        (
            &frame[22..54],
            usize::from(u16::from_be_bytes([frame[18], frame[19]])),
        )
    };
    let words: u64 = addrs
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    words + 6 + u64::try_from(len).expect("small")
}

/// `sum` folded to 16 bits with the end-around carries, not inverted.
#[must_use]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// A UDP datagram from `src` to `dst`.
#[must_use]
pub fn udp(eth_src: Mac, eth_dst: Mac, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(eth_src, eth_dst);
    let b = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => b.ipv4(s.ip().octets(), d.ip().octets(), 64),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => b.ipv6(s.ip().octets(), d.ip().octets(), 64),
        _ => panic!("mixed address families"),
    };
    let mut out = Vec::new();
    b.udp(src.port(), dst.port())
        .write(&mut out, b"udp to a tcp vip")
        .expect("serialise udp");
    out
}

/// An ICMP destination unreachable from `from` about `segment` (a frame built by
/// [`Tcp::build`], its IP datagram quoted whole), sent to the segment's source:
/// port unreachable, or with `too_big` fragmentation needed (IPv4) or packet too
/// big (IPv6), both for an MTU of 1400.
#[must_use]
pub fn icmp_unreachable(
    eth_src: Mac,
    eth_dst: Mac,
    from: IpAddr,
    segment: &Tcp,
    too_big: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(eth_src, eth_dst);
    let quoted = &segment.build()[14..];
    let mut out = Vec::new();
    match (from, segment.src.ip()) {
        (IpAddr::V4(f), IpAddr::V4(to)) => {
            let code = if too_big {
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
            } else {
                icmpv4::DestUnreachableHeader::Port
            };
            b.ipv4(f.octets(), to.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(code))
                .write(&mut out, quoted)
        }
        (IpAddr::V6(f), IpAddr::V6(to)) => b
            .ipv6(f.octets(), to.octets(), 64)
            .icmpv6(if too_big {
                Icmpv6Type::PacketTooBig { mtu: 1400 }
            } else {
                Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
            })
            .write(&mut out, quoted),
        _ => panic!("mixed address families"),
    }
    .expect("serialise icmp");
    out
}

/// An ARP request for `target`.
#[must_use]
pub fn arp_request(eth_src: Mac, sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &eth_src,
        &sender,
        &[0; 6],
        &target,
    )
    .expect("arp packet");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(eth_src, [0xff; 6])
        .arp(arp)
        .write(&mut out)
        .expect("serialise arp");
    out
}

/// One line per layer, with every checksum recomputed independently, then a hex dump.
#[must_use]
pub fn describe(bytes: &[u8]) -> String {
    let mut s = String::new();
    match etherparse::SlicedPacket::from_ethernet(bytes) {
        Err(e) => {
            let _ = writeln!(s, "  (does not parse: {e})");
        }
        Ok(p) => {
            if let Some(etherparse::LinkSlice::Ethernet2(e)) = &p.link {
                let _ = writeln!(
                    s,
                    "  eth  {} -> {}  type {:?}",
                    mac(e.source()),
                    mac(e.destination()),
                    e.ether_type()
                );
            }
            if let Some(v) = &p.link_exts.first() {
                let _ = writeln!(s, "  vlan {v:?}");
            }
            match &p.net {
                Some(etherparse::NetSlice::Ipv4(ip)) => {
                    let h = ip.header().to_header();
                    let ok = h.calc_header_checksum() == h.header_checksum;
                    let _ = writeln!(
                        s,
                        "  ipv4 {} -> {}  ttl {} id {:#06x} mf {} off {} opts {}B  csum {:#06x} {}",
                        ip.header().source_addr(),
                        ip.header().destination_addr(),
                        h.time_to_live,
                        h.identification,
                        h.more_fragments,
                        h.fragment_offset.value(),
                        h.options.len(),
                        h.header_checksum,
                        if ok { "ok" } else { "BAD" }
                    );
                }
                Some(etherparse::NetSlice::Ipv6(ip)) => {
                    let _ = writeln!(
                        s,
                        "  ipv6 {} -> {}",
                        ip.header().source_addr(),
                        ip.header().destination_addr()
                    );
                }
                _ => {}
            }
            if let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport {
                let h = t.to_header();
                let want = match &p.net {
                    Some(etherparse::NetSlice::Ipv4(ip)) => h
                        .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                        .ok(),
                    Some(etherparse::NetSlice::Ipv6(ip)) => h
                        .calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                        .ok(),
                    _ => None,
                };
                let _ = writeln!(
                    s,
                    "  tcp  {} -> {}  {}{}{}{} seq {:#x} payload {}B  csum {:#06x} {}",
                    h.source_port,
                    h.destination_port,
                    if h.syn { "S" } else { "" },
                    if h.ack { "A" } else { "" },
                    if h.rst { "R" } else { "" },
                    if h.fin { "F" } else { "" },
                    h.sequence_number,
                    t.payload().len(),
                    h.checksum,
                    if want == Some(h.checksum) {
                        "ok"
                    } else {
                        "BAD"
                    }
                );
            }
        }
    }
    for chunk in bytes.chunks(16) {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(s, "    {}", hex.join(" "));
    }
    s
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_recomputes_checksums_and_flags_corruption() {
        let mut frame = Tcp::syn(
            [2; 6],
            [4; 6],
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:6443".parse().unwrap(),
        )
        .build();
        let good = describe(&frame);
        assert_eq!(good.matches(" ok").count(), 2, "{good}");
        frame[14 + 20 + 16] ^= 0xff; // flip a byte of the TCP checksum
        let bad = describe(&frame);
        assert_eq!(
            (bad.matches(" ok").count(), bad.matches("BAD").count()),
            (1, 1),
            "{bad}"
        );
    }
}
