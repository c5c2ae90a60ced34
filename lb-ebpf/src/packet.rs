//! Packet access and header parsing: the only place that touches packet memory.
//!
//! [`ptr_at`] is the single bounds check every access goes through; the verifier
//! rejects any packet read it cannot prove in bounds, so all parsing funnels here.
//!
//! Besides TCP, it reads one kind of ICMP: a destination unreachable that quotes a
//! TCP segment, which is how a backend (or a router on the way) refuses a SYN that
//! the balancer sent it. Passive failure detection needs that segment's flow.
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_TCP,
    counters::{PASS_FRAGMENT, PASS_MALFORMED, PASS_NOT_IP, PASS_NOT_TCP},
    ct::TCP_SYN,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP (IPv4) destination unreachable, and its one code that is no refusal: the path
/// MTU is smaller ("fragmentation needed"), which the client must see.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMP (IPv6) destination unreachable (packet too big is another type).
const ICMPV6_DEST_UNREACH: u8 = 1;
/// ICMP header ahead of the quoted datagram: type, code, checksum, 4 bytes unused
/// (or the next hop's MTU).
pub const ICMP_HDR_LEN: usize = 8;
/// ICMPv6 packet too big.
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// [`Parsed::icmp`]: a destination unreachable (a refusal).
pub const ICMP_UNREACH: u8 = 1;
/// [`Parsed::icmp`]: fragmentation needed (IPv4) or packet too big (IPv6).
pub const ICMP_TOO_BIG: u8 = 2;
/// IPv4 `frags` field: the MF bit and the 13-bit offset, in host order.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// TCP option kinds and lengths (RFC 9293, RFC 7323, RFC 2018).
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;
const TCPOPT_WINDOW: u8 = 3;
const TCPOLEN_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOLEN_SACK_PERM: u8 = 2;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOLEN_TIMESTAMP: u8 = 10;

/// A pointer to a `T` at `offset` bytes into the packet, or `Err` if the packet is
/// too short. Callers must still only dereference it while the packet is unchanged
/// in length (we never grow or shrink packets).
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// A TCP/IP packet located in the frame, with its flow key read out.
///
/// It keeps header *offsets*, not pointers: the compiler may spill a struct of
/// packet pointers in pieces, which the verifier refuses. Users re-derive pointers
/// through [`ptr_at`]. The offsets are `u8` for the same reason: however LLVM
/// splits the spill, a reload is zero-extended and so provably below 256, small
/// enough for the verifier to track packet ranges from it (it gives up at 64 KiB).
/// The TCP header starts at most at 14 + 4 + 60 = 78.
pub struct Parsed {
    /// Offset of the IP header; `key.family` says which.
    pub l3: u8,
    /// Offset of the TCP header.
    pub l4: u8,
    /// Source -> destination as received; `proto` is always TCP.
    pub key: FlowKey,
    pub vlan: bool,
    /// IP datagram length (header included), for the FIB's MTU check.
    pub ip_len: u16,
    /// IPv4 TOS byte (0 for IPv6), for the FIB's policy routing.
    pub tos: u8,
    /// TCP flags byte (`TCP_*` bits); 0 for an ICMP error.
    pub tcp_flags: u8,
    /// An ICMP error about a TCP segment the balancer may have sent (`ICMP_*`; 0
    /// for TCP): `key` is that segment's flow turned around, the way the
    /// backend's answer would arrive (backend -> SNAT address), so it finds the
    /// reply entry. A destination unreachable is passive detection's, never
    /// forwarded; a packet too big is translated back to the client (`toobig`).
    pub icmp: u8,
}

#[inline(always)]
pub fn addr6(bytes: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
    ]
}

/// Parse Ethernet, one optional VLAN tag, IPv4 (with options) or IPv6, then TCP or
/// an ICMP destination unreachable about TCP.
/// `Err` carries the pass counter for a packet the balancer leaves alone.
///
/// Always inlined: as a BPF-to-BPF call, LLVM would pass it the loaded packet
/// pointers instead of the context, and the verifier refuses what it then does
/// with `data_end`.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).map_err(|()| PASS_MALFORMED)?;
    // SAFETY: `ptr_at` proved the Ethernet header lies inside the packet.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let tag: *mut VlanHdr = ptr_at(ctx, l3).map_err(|()| PASS_MALFORMED)?;
        // SAFETY: `ptr_at` proved the tag lies inside the packet.
        ether_type = u16::from_be(unsafe { (*tag).ether_type });
        l3 += VlanHdr::LEN;
        vlan = true;
    }
    let mut key = FlowKey {
        proto: IPPROTO_TCP,
        ..FlowKey::default()
    };
    let mut tos = 0;
    let (l4, ip_len, proto) = match ether_type {
        ETH_P_IP => {
            let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).map_err(|()| PASS_MALFORMED)?;
            // SAFETY: `ptr_at` proved the fixed IPv4 header lies inside the packet.
            let h = unsafe { &*ip };
            let ihl = usize::from(h.vihl & 0x0f) * 4;
            let tot_len = u16::from_be_bytes(h.tot_len);
            if h.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || usize::from(tot_len) < ihl {
                return Err(PASS_MALFORMED);
            }
            if u16::from_be_bytes(h.frags) & IPV4_MF_OR_OFFSET != 0 {
                return Err(PASS_FRAGMENT);
            }
            if h.proto != IPPROTO_TCP && h.proto != IPPROTO_ICMP {
                return Err(PASS_NOT_TCP);
            }
            key.family = AF_INET;
            tos = h.tos;
            key.src_be[0] = u32::from_ne_bytes(h.src_addr);
            key.dst_be[0] = u32::from_ne_bytes(h.dst_addr);
            (l3 + ihl, tot_len, h.proto)
        }
        ETH_P_IPV6 => {
            let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).map_err(|()| PASS_MALFORMED)?;
            // SAFETY: `ptr_at` proved the IPv6 header lies inside the packet.
            let h = unsafe { &*ip };
            if h.vcf[0] >> 4 != 6 {
                return Err(PASS_MALFORMED);
            }
            match h.next_hdr {
                IPPROTO_TCP | IPPROTO_ICMPV6 => {}
                IPPROTO_FRAGMENT => return Err(PASS_FRAGMENT),
                _ => return Err(PASS_NOT_TCP),
            }
            key.family = AF_INET6;
            key.src_be = addr6(&h.src_addr);
            key.dst_be = addr6(&h.dst_addr);
            #[expect(clippy::cast_possible_truncation, reason = "the header is 40 bytes")]
            let len = u16::from_be_bytes(h.payload_len).saturating_add(Ipv6Hdr::LEN as u16);
            (l3 + Ipv6Hdr::LEN, len, h.next_hdr)
        }
        _ => return Err(PASS_NOT_IP),
    };
    let mut icmp = 0;
    let tcp_flags = if proto != IPPROTO_TCP {
        icmp = quoted_tcp(ctx, l4, &mut key)?;
        0
    } else {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4).map_err(|()| PASS_MALFORMED)?;
        // SAFETY: `ptr_at` proved the TCP header lies inside the packet.
        let t = unsafe { &*tcp };
        key.sport_be = u16::from_ne_bytes(t.source);
        key.dport_be = u16::from_ne_bytes(t.dest);
        // SAFETY: byte 13 of the 20-byte header `ptr_at` proved present.
        unsafe { *tcp.cast::<u8>().add(13) }
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the TCP header starts at most at byte 78 (see `Parsed`)"
    )]
    let (l3, l4) = (l3 as u8, l4 as u8);
    Ok(Parsed {
        l3,
        l4,
        key,
        vlan,
        ip_len,
        tos,
        tcp_flags,
        icmp,
    })
}

/// Read the ICMP message at `l4` (the outer header's family in `key.family`): if
/// it is a destination unreachable or a packet too big quoting a TCP segment of
/// that family, set `key` to the segment's flow turned around and return which
/// (see [`Parsed::icmp`]); else `PASS_NOT_TCP`.
#[inline(always)]
fn quoted_tcp(ctx: &XdpContext, l4: usize, key: &mut FlowKey) -> Result<u8, u32> {
    let head: *const [u8; 2] = ptr_at(ctx, l4).map_err(|()| PASS_MALFORMED)?;
    // SAFETY: `ptr_at` proved the ICMP type and code lie inside the packet.
    let [kind, code] = unsafe { *head };
    let inner = l4 + ICMP_HDR_LEN;
    let mut which = ICMP_UNREACH;
    let ports_at = if key.family == AF_INET {
        if kind != ICMP_DEST_UNREACH {
            return Err(PASS_NOT_TCP);
        }
        if code == ICMP_FRAG_NEEDED {
            which = ICMP_TOO_BIG;
        }
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner).map_err(|()| PASS_MALFORMED)?;
        // SAFETY: `ptr_at` proved the quoted IPv4 header lies inside the packet.
        let h = unsafe { &*ip };
        let ihl = usize::from(h.vihl & 0x0f) * 4;
        if h.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || h.proto != IPPROTO_TCP {
            return Err(PASS_NOT_TCP);
        }
        key.src_be = [u32::from_ne_bytes(h.dst_addr), 0, 0, 0];
        key.dst_be = [u32::from_ne_bytes(h.src_addr), 0, 0, 0];
        inner + ihl
    } else {
        if kind == ICMPV6_PACKET_TOO_BIG {
            which = ICMP_TOO_BIG;
        } else if kind != ICMPV6_DEST_UNREACH {
            return Err(PASS_NOT_TCP);
        }
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner).map_err(|()| PASS_MALFORMED)?;
        // SAFETY: `ptr_at` proved the quoted IPv6 header lies inside the packet.
        let h = unsafe { &*ip };
        if h.vcf[0] >> 4 != 6 || h.next_hdr != IPPROTO_TCP {
            return Err(PASS_NOT_TCP);
        }
        key.src_be = addr6(&h.dst_addr);
        key.dst_be = addr6(&h.src_addr);
        inner + Ipv6Hdr::LEN
    };
    // An ICMP error quotes at least the first 8 bytes of the segment: its ports.
    let ports: *const [u8; 4] = ptr_at(ctx, ports_at).map_err(|()| PASS_MALFORMED)?;
    // SAFETY: `ptr_at` proved both ports lie inside the packet.
    let [s0, s1, d0, d1] = unsafe { *ports };
    key.sport_be = u16::from_ne_bytes([d0, d1]);
    key.dport_be = u16::from_ne_bytes([s0, s1]);
    Ok(which)
}

/// The segment's sequence and acknowledgement numbers (host order), as one value:
/// sequence number high, acknowledgement low (0 if unreadable, which `parse`
/// rules out). One value, so that it passes as one argument of a BPF call.
#[inline(always)]
pub fn seq_ack(ctx: &XdpContext, p: &Parsed) -> u64 {
    let Ok(field) = ptr_at::<[u8; 8]>(ctx, usize::from(p.l4) + 4) else {
        return 0;
    };
    // SAFETY: `ptr_at` proved bytes 4..12 of the TCP header present.
    u64::from_be_bytes(unsafe { *field })
}

/// The sequence number of the segment an ICMP error quotes (host order), which
/// `parse` found to be TCP (see [`Parsed::icmp`]); `None` if the quote is too
/// short to hold it.
#[inline(always)]
pub fn quoted_seq(ctx: &XdpContext, p: &Parsed) -> Option<u32> {
    let inner = usize::from(p.l4) + ICMP_HDR_LEN;
    let ihl = if p.key.family == AF_INET {
        // Four bytes, not one: LLVM turns a one-byte bounds check into a
        // comparison the verifier cannot use.
        let head: *const [u8; 4] = ptr_at(ctx, inner).ok()?;
        // SAFETY: `ptr_at` proved the bytes present.
        usize::from(unsafe { (*head)[0] } & 0x0f) * 4
    } else {
        Ipv6Hdr::LEN
    };
    let seq: *const [u8; 4] = ptr_at(ctx, inner + ihl + 4).ok()?;
    // SAFETY: `ptr_at` proved the four bytes present.
    Some(u32::from_be_bytes(unsafe { *seq }))
}

/// Where the segment's TSval sits (its TSecr follows), as an offset into the
/// packet; `None` if it carries no timestamp option where stacks put it.
///
/// The option is looked for at fixed places, not by walking the options: a walk's
/// variable offsets multiply the verifier's states past its limit. After the SYN
/// every stack opens the options with `NOP NOP TS` (RFC 7323 appendix A); a SYN or
/// SYN-ACK puts it after `MSS, SACK-permitted` or `MSS, NOP, NOP` (Linux), or
/// after `MSS, NOP, window scale` and two more bytes (the BSDs, macOS). A segment
/// with it elsewhere reads as without: its flow is then treated as one without
/// timestamps, which is only slower to reuse its port (`ct::reusable`).
/// Always inlined: it reads the packet (see [`parse`]).
#[inline(always)]
pub fn tsval_at(ctx: &XdpContext, p: &Parsed) -> Option<usize> {
    let l4 = usize::from(p.l4);
    let head: *const [u8; 4] = ptr_at(ctx, l4 + 12).ok()?;
    // SAFETY: `ptr_at` proved bytes 12..16 of the TCP header present.
    let doff = usize::from(unsafe { (*head)[0] } >> 4) * 4;
    if doff < 32 {
        return None;
    }
    let first = word(ctx, l4 + 20)?;
    if first == [TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP] {
        return Some(l4 + 24);
    }
    if p.tcp_flags & TCP_SYN == 0 || first[..2] != [TCPOPT_MSS, TCPOLEN_MSS] {
        return None;
    }
    let second = word(ctx, l4 + 24)?;
    if doff >= 36 && pads_timestamp(second) {
        return Some(l4 + 28);
    }
    if doff >= 40
        && second[..3] == [TCPOPT_NOP, TCPOPT_WINDOW, TCPOLEN_WINDOW]
        && pads_timestamp(word(ctx, l4 + 28)?)
    {
        return Some(l4 + 32);
    }
    None
}

/// Four option bytes that end with a timestamp option's kind and length, after
/// two NOPs or a SACK-permitted option.
#[inline(always)]
fn pads_timestamp(w: [u8; 4]) -> bool {
    (w[..2] == [TCPOPT_NOP, TCPOPT_NOP] || w[..2] == [TCPOPT_SACK_PERM, TCPOLEN_SACK_PERM])
        && w[2..] == [TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP]
}

/// Four bytes of the packet at `at`.
#[inline(always)]
fn word(ctx: &XdpContext, at: usize) -> Option<[u8; 4]> {
    let w: *const [u8; 4] = ptr_at(ctx, at).ok()?;
    // SAFETY: `ptr_at` proved the four bytes present.
    Some(unsafe { *w })
}

/// Read the 32-bit field at `at` (a TSval or TSecr) as it sits in memory.
#[inline(always)]
pub fn read_u32(ctx: &XdpContext, at: usize) -> Option<u32> {
    let field: *const [u8; 4] = ptr_at(ctx, at).ok()?;
    // SAFETY: `ptr_at` proved the four bytes present.
    Some(u32::from_ne_bytes(unsafe { *field }))
}

/// Write a 32-bit field at `at`, given as it goes into memory.
#[inline(always)]
pub fn write_u32(ctx: &XdpContext, at: usize, value: u32) -> Option<()> {
    let field: *mut [u8; 4] = ptr_at(ctx, at).ok()?;
    // SAFETY: `ptr_at` proved the four bytes present; the packet is writable in XDP.
    unsafe { *field = value.to_ne_bytes() };
    Some(())
}
