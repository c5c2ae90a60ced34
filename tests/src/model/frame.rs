//! Frames as the reference model reads and writes them: its own parse of the
//! datapath's documented rules (README "The datapath", step 1), byte by byte, and
//! its own Internet checksum. Nothing here comes from lb-ebpf or lb-common's
//! `csum`: a bug shared by both sides would hide itself.
//!
//! What the datapath's parse reads (and so what the model must read alike):
//! Ethernet, one 802.1Q or 802.1ad tag, IPv4 (version 4, IHL of at least 5, a
//! total length of at least the header, neither MF nor an offset; options are
//! skipped by `IHL` and never read) or IPv6 (version 6; TCP or `ICMPv6` directly,
//! fragment header = fragment, any other = not TCP), then 20 bytes of TCP, or an
//! ICMP error quoting a TCP segment of the same family (its type, the quoted IP
//! header, and the quoted ports). Lengths are checked against the frame only;
//! the total length or payload length fields are never checked against it.

use lb_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_TCP,
    counters::{PASS_FRAGMENT, PASS_MALFORMED, PASS_NOT_IP, PASS_NOT_TCP},
    ct::TCP_SYN,
};

pub const ETH_LEN: usize = 14;

/// What kind of ICMP error a frame is, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Icmp {
    /// A TCP segment, not ICMP.
    No,
    /// A destination unreachable other than fragmentation needed.
    Unreach,
    /// Fragmentation needed (IPv4) or packet too big (IPv6).
    TooBig,
}

/// A frame the datapath takes up: where its headers are and its flow key (for
/// an ICMP error, the quoted segment's flow turned around).
#[derive(Clone, Debug)]
pub struct Parsed {
    pub l3: usize,
    pub l4: usize,
    pub key: FlowKey,
    pub vlan: bool,
    /// The IP header's own idea of the datagram's length (for the FIB).
    pub ip_len: u16,
    pub tos: u8,
    /// TCP flags; 0 for ICMP.
    pub flags: u8,
    pub icmp: Icmp,
}

/// `N` bytes of `f` at `at`, if the frame holds them.
pub fn bytes<const N: usize>(f: &[u8], at: usize) -> Option<[u8; N]> {
    f.get(at..at + N)?.try_into().ok()
}

pub fn be16(f: &[u8], at: usize) -> Option<u16> {
    bytes::<2>(f, at).map(u16::from_be_bytes)
}

pub fn be32(f: &[u8], at: usize) -> Option<u32> {
    bytes::<4>(f, at).map(u32::from_be_bytes)
}

/// An address as the datapath's maps hold it: the wire bytes in `[u32; 4]`.
pub fn words(b: &[u8]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, c) in b.chunks(4).take(4).enumerate() {
        w[i] = u32::from_ne_bytes(c.try_into().expect("4 bytes"));
    }
    w
}

/// The wire bytes of an address held as [`words`] does, `n` words of it.
pub fn wire(w: &[u32; 4], n: usize) -> Vec<u8> {
    w[..n].iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// Read the frame as the datapath does. `Err` is the pass counter of a frame it
/// leaves alone.
pub fn parse(f: &[u8]) -> Result<Parsed, u32> {
    let mut et = be16(f, 12).ok_or(PASS_MALFORMED)?;
    let mut l3 = ETH_LEN;
    let mut vlan = false;
    if et == 0x8100 || et == 0x88a8 {
        et = be16(f, 16).ok_or(PASS_MALFORMED)?;
        l3 += 4;
        vlan = true;
    }
    let mut key = FlowKey {
        proto: IPPROTO_TCP,
        ..FlowKey::default()
    };
    let mut tos = 0;
    let (l4, ip_len, proto) = match et {
        0x0800 => {
            let h: [u8; 20] = bytes(f, l3).ok_or(PASS_MALFORMED)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let tot = u16::from_be_bytes([h[2], h[3]]);
            if h[0] >> 4 != 4 || ihl < 20 || usize::from(tot) < ihl {
                return Err(PASS_MALFORMED);
            }
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return Err(PASS_FRAGMENT);
            }
            if h[9] != 6 && h[9] != 1 {
                return Err(PASS_NOT_TCP);
            }
            key.family = AF_INET;
            tos = h[1];
            key.src_be = words(&h[12..16]);
            key.dst_be = words(&h[16..20]);
            (l3 + ihl, tot, h[9])
        }
        0x86dd => {
            let h: [u8; 40] = bytes(f, l3).ok_or(PASS_MALFORMED)?;
            if h[0] >> 4 != 6 {
                return Err(PASS_MALFORMED);
            }
            match h[6] {
                6 | 58 => {}
                44 => return Err(PASS_FRAGMENT),
                _ => return Err(PASS_NOT_TCP),
            }
            key.family = AF_INET6;
            key.src_be = words(&h[8..24]);
            key.dst_be = words(&h[24..40]);
            let len = u16::from_be_bytes([h[4], h[5]]).saturating_add(40);
            (l3 + 40, len, h[6])
        }
        _ => return Err(PASS_NOT_IP),
    };
    let mut icmp = Icmp::No;
    let mut flags = 0;
    if proto == 6 {
        let t: [u8; 20] = bytes(f, l4).ok_or(PASS_MALFORMED)?;
        key.sport_be = u16::from_ne_bytes([t[0], t[1]]);
        key.dport_be = u16::from_ne_bytes([t[2], t[3]]);
        flags = t[13];
    } else {
        icmp = quoted(f, l4, &mut key)?;
    }
    Ok(Parsed {
        l3,
        l4,
        key,
        vlan,
        ip_len,
        tos,
        flags,
        icmp,
    })
}

/// An ICMP error at `l4` quoting TCP of the outer family: which kind, with `key`
/// set to the quoted flow turned around.
fn quoted(f: &[u8], l4: usize, key: &mut FlowKey) -> Result<Icmp, u32> {
    let [kind, code] = bytes::<2>(f, l4).ok_or(PASS_MALFORMED)?;
    let inner = l4 + 8;
    let ports_at = if key.family == AF_INET {
        if kind != 3 {
            return Err(PASS_NOT_TCP);
        }
        let h: [u8; 20] = bytes(f, inner).ok_or(PASS_MALFORMED)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if h[0] >> 4 != 4 || ihl < 20 || h[9] != 6 {
            return Err(PASS_NOT_TCP);
        }
        key.src_be = words(&h[16..20]);
        key.dst_be = words(&h[12..16]);
        inner + ihl
    } else {
        if kind != 1 && kind != 2 {
            return Err(PASS_NOT_TCP);
        }
        let h: [u8; 40] = bytes(f, inner).ok_or(PASS_MALFORMED)?;
        if h[0] >> 4 != 6 || h[6] != 6 {
            return Err(PASS_NOT_TCP);
        }
        key.src_be = words(&h[24..40]);
        key.dst_be = words(&h[8..24]);
        inner + 40
    };
    let p: [u8; 4] = bytes(f, ports_at).ok_or(PASS_MALFORMED)?;
    key.sport_be = u16::from_ne_bytes([p[2], p[3]]);
    key.dport_be = u16::from_ne_bytes([p[0], p[1]]);
    let too_big = if key.family == AF_INET {
        code == 4
    } else {
        kind == 2
    };
    Ok(if too_big { Icmp::TooBig } else { Icmp::Unreach })
}

/// The segment's sequence and acknowledgement numbers.
pub fn seq_ack(f: &[u8], p: &Parsed) -> (u32, u32) {
    (
        be32(f, p.l4 + 4).unwrap_or(0),
        be32(f, p.l4 + 8).unwrap_or(0),
    )
}

/// Where the TSval sits, if the segment carries timestamps where the datapath
/// looks for them (README "NAT flow lifecycle": after `NOP NOP`, or on a SYN after
/// `MSS, SACK-permitted`, `MSS, NOP, NOP` or `MSS, NOP, window scale, 2 bytes`),
/// judged by the data offset and the bytes present in the frame.
pub fn tsval_at(f: &[u8], p: &Parsed) -> Option<usize> {
    let l4 = p.l4;
    let doff = usize::from(*f.get(l4 + 12)? >> 4) * 4;
    if doff < 32 {
        return None;
    }
    let first: [u8; 4] = bytes(f, l4 + 20)?;
    if first == [1, 1, 8, 10] {
        return Some(l4 + 24);
    }
    if p.flags & TCP_SYN == 0 || first[..2] != [2, 4] {
        return None;
    }
    let second: [u8; 4] = bytes(f, l4 + 24)?;
    let pads = |w: [u8; 4]| (w[..2] == [1, 1] || w[..2] == [4, 2]) && w[2..] == [8, 10];
    if doff >= 36 && pads(second) {
        return Some(l4 + 28);
    }
    if doff >= 40 && second[..3] == [1, 3, 3] && pads(bytes(f, l4 + 28)?) {
        return Some(l4 + 32);
    }
    None
}

/// One's-complement fold of a sum down to 16 bits.
#[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A checksum after the 16-bit words `(old, new)` changed (RFC 1624 eqn. 3,
/// `HC' = ~(~HC + ~m + m')`), words and checksum big-endian.
pub fn updated(check: u16, words: &[(u16, u16)]) -> u16 {
    let mut s = u64::from(!check);
    for &(old, new) in words {
        s += u64::from(!old) + u64::from(new);
    }
    !fold(s)
}

/// The 16-bit words of `old` and `new` (equal lengths, even), paired.
pub fn pairs(old: &[u8], new: &[u8]) -> Vec<(u16, u16)> {
    old.chunks(2)
        .zip(new.chunks(2))
        .map(|(o, n)| {
            (
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([n[0], n[1]]),
            )
        })
        .collect()
}

/// The one's-complement sum of `b` (an odd last byte padded with zero) and `extra`.
pub fn sum(b: &[u8], extra: u64) -> u64 {
    let mut s = extra;
    for c in b.chunks(2) {
        s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    s
}

/// Whether data summing to `s` with its checksum in it checks out.
pub fn checks(s: u64) -> bool {
    fold(s) == 0xffff
}

/// Replace `new.len()` bytes at `at`, returning the changed words for checksums.
pub fn put(f: &mut [u8], at: usize, new: &[u8]) -> Vec<(u16, u16)> {
    let old = f[at..at + new.len()].to_vec();
    f[at..at + new.len()].copy_from_slice(new);
    pairs(&old, new)
}

/// Apply a checksum update to the big-endian checksum at `at`.
pub fn fix(f: &mut [u8], at: usize, words: &[(u16, u16)]) -> (u16, u16) {
    let old = u16::from_be_bytes([f[at], f[at + 1]]);
    let new = updated(old, words);
    f[at..at + 2].copy_from_slice(&new.to_be_bytes());
    (old, new)
}

/// How a frame's checksums stand, by the model's own full computation: `None`
/// where a frame's lengths do not describe it exactly (trailing bytes, a lying
/// length, a cut header), so that no checksum is defined; else whether every
/// checksum present checks out (IPv4 header, TCP, ICMP, and the quoted IPv4
/// header of an ICMP error).
pub fn checksums_ok(f: &[u8]) -> Option<bool> {
    let p = parse(f).ok()?;
    let family = p.key.family;
    let (payload, pseudo_addrs) = if family == AF_INET {
        let tot = usize::from(be16(f, p.l3 + 2)?);
        if p.l3 + tot != f.len() {
            return None;
        }
        if !checks(sum(&f[p.l3..p.l4], 0)) {
            return Some(false);
        }
        (&f[p.l4..], sum(&f[p.l3 + 12..p.l3 + 20], 0))
    } else {
        let plen = usize::from(be16(f, p.l3 + 4)?);
        if p.l3 + 40 + plen != f.len() {
            return None;
        }
        (&f[p.l4..], sum(&f[p.l3 + 8..p.l3 + 40], 0))
    };
    let len = payload.len() as u64;
    match p.icmp {
        Icmp::No => {
            if payload.len() < usize::from(payload[12] >> 4) * 4 {
                return None;
            }
            Some(checks(sum(payload, pseudo_addrs + 6 + len)))
        }
        _ if family == AF_INET => {
            let inner = &payload[8..];
            let ihl = usize::from(inner[0] & 0x0f) * 4;
            Some(checks(sum(payload, 0)) && inner.len() >= ihl && checks(sum(&inner[..ihl], 0)))
        }
        _ => Some(checks(sum(payload, pseudo_addrs + 58 + len))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fixture::sa,
        packets::{Tcp, icmp_unreachable, udp},
    };

    fn syn() -> Tcp {
        Tcp::syn(
            [2; 6],
            [4; 6],
            sa("192.0.2.10:51000"),
            sa("192.0.2.100:6443"),
        )
    }

    #[test]
    fn reads_what_the_datapath_reads_and_passes_the_rest() {
        let p = parse(&syn().build()).expect("tcp");
        assert_eq!((p.l3, p.l4, p.flags, p.icmp), (14, 34, TCP_SYN, Icmp::No));
        assert_eq!(u16::from_be(p.key.dport_be), 6443);
        let mut opts = syn();
        opts.ip_options = vec![1; 8];
        assert_eq!(parse(&opts.build()).expect("options").l4, 42);
        let mut tagged = syn();
        tagged.vlan = Some(7);
        assert!(parse(&tagged.build()).expect("vlan").vlan);
        let mut frag = syn();
        frag.more_fragments = true;
        assert_eq!(parse(&frag.build()).err(), Some(PASS_FRAGMENT));
        let u = udp([2; 6], [4; 6], sa("192.0.2.10:1"), sa("192.0.2.100:6443"));
        assert_eq!(parse(&u).err(), Some(PASS_NOT_TCP));
        assert_eq!(parse(&syn().build()[..40]).err(), Some(PASS_MALFORMED));
        let icmp = icmp_unreachable([2; 6], [4; 6], sa("192.0.2.100:0").ip(), &syn(), true);
        let p = parse(&icmp).expect("icmp");
        assert_eq!(p.icmp, Icmp::TooBig);
        assert_eq!(
            u16::from_be(p.key.sport_be),
            6443,
            "the quote turned around"
        );
    }

    #[test]
    fn checksums_are_judged_by_a_full_sum_and_updated_incrementally() {
        let mut f = syn().data(b"hello").build();
        assert_eq!(checksums_ok(&f), Some(true));
        let p = parse(&f).expect("tcp");
        // NAT by hand, with the incremental update, must stay valid.
        let mut words = put(&mut f, p.l3 + 12, &[198, 51, 100, 1]);
        fix(&mut f, p.l3 + 10, &words);
        words.extend(put(&mut f, p.l4, &40_000u16.to_be_bytes()));
        fix(&mut f, p.l4 + 16, &words);
        assert_eq!(checksums_ok(&f), Some(true));
        f[p.l4 + 21] ^= 1;
        assert_eq!(checksums_ok(&f), Some(false));
        f.push(0);
        assert_eq!(
            checksums_ok(&f),
            None,
            "trailing bytes: no defined checksum"
        );
    }

    #[test]
    fn finds_timestamps_where_stacks_put_them() {
        let linux = syn().timestamps(7, 9).build();
        let p = parse(&linux).expect("tcp");
        assert_eq!(
            tsval_at(&linux, &p).map(|at| be32(&linux, at)),
            Some(Some(7))
        );
        let later = syn().data(b"").timestamps(8, 10).build();
        let p = parse(&later).expect("tcp");
        assert_eq!(
            tsval_at(&later, &p).map(|at| be32(&later, at)),
            Some(Some(8))
        );
        let p = parse(&syn().build()).expect("tcp");
        assert_eq!(tsval_at(&syn().build(), &p), None);
    }
}
