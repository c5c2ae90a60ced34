//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! NAT changes only addresses and ports, so instead of re-summing the packet we add
//! the difference. One's-complement sums are byte-order independent (RFC 1071), so
//! every word is taken exactly as it sits in memory.
//!
//! It lives here, not in the kernel crate, so that host tests can hold it against a
//! full recomputation; the XDP program's rewrite (`lb-ebpf`'s `forward`) uses it.

/// The accumulated `~m + m'` of every changed word.
#[derive(Clone, Copy, Debug, Default)]
#[must_use]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub fn word32(self, old: u32, new: u32) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline(always)]
    pub fn word16(self, old: u16, new: u16) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline(always)]
    pub fn addr(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        self.word32(old[0], new[0])
            .word32(old[1], new[1])
            .word32(old[2], new[2])
            .word32(old[3], new[3])
    }

    /// Both deltas: the changes of two places covered by one checksum.
    #[inline(always)]
    pub fn and(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    /// Apply the delta to a checksum field read from memory; the result goes back
    /// into memory as is.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the four folds leave at most 16 bits"
    )]
    pub fn apply(self, csum: u16) -> u16 {
        let mut s = u64::from(!csum) + self.0;
        // Four folds take any u64 down to 16 bits with the end-around carries.
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}

/// Fold a one's-complement sum to 16 bits, end-around carries included; not
/// inverted. A partial (offloaded) TCP checksum field holds exactly this of the
/// pseudo-header's sum; a finished one holds its inverse over the whole segment.
#[inline(always)]
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the four folds leave at most 16 bits"
)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The unfolded sum of a TCP pseudo-header (RFC 9293 3.1, RFC 8200 8.1): both
/// addresses (IPv4 uses the first word of each), the protocol and the segment's
/// length, every word as it sits in memory.
#[inline(always)]
#[must_use]
pub fn pseudo_header(v4: bool, src: &[u32; 4], dst: &[u32; 4], tcp_len: u16) -> u64 {
    // Protocol 6 and the length, each a 16-bit word in network order.
    let mut s = u64::from(u16::from_ne_bytes([0, 6])) + u64::from(tcp_len.to_be());
    let words = if v4 { 1 } else { 4 };
    let mut i = 0;
    while i < words {
        s += u64::from(src[i]) + u64::from(dst[i]);
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::Delta;

    /// A full RFC 1071 checksum of `bytes` (an even number of them) and `extra`
    /// (pre-summed words, e.g. a pseudo-header's): the reference to test against.
    fn full(bytes: &[u8], extra: u64) -> u16 {
        let mut s = extra;
        for w in bytes.chunks(2) {
            s += u64::from(u16::from_ne_bytes([w[0], w[1]]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !u16::try_from(s).expect("folded")
    }

    /// xorshift64: a fixed, dependency-free stream of test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next().to_le_bytes()[0])
        }
        fn u16(&mut self) -> u16 {
            u16::from_ne_bytes(self.bytes())
        }
    }

    fn words(a: &[u8; 16]) -> [u32; 4] {
        core::array::from_fn(|i| {
            u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]])
        })
    }

    fn port(tcp: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([tcp[at], tcp[at + 1]])
    }

    /// A random TCP segment (header and payload) with its checksum over `pseudo`.
    fn segment(rng: &mut Rng, pseudo: impl Fn(usize) -> u64) -> Vec<u8> {
        let len = 20 + 2 * usize::try_from(rng.next() % 40).expect("small");
        let mut tcp: Vec<u8> = (0..len).map(|_| rng.bytes::<1>()[0]).collect();
        tcp[16] = 0;
        tcp[17] = 0;
        let c = full(&tcp, pseudo(len));
        tcp[16..18].copy_from_slice(&c.to_ne_bytes());
        tcp
    }

    /// The sum of an IPv4 pseudo-header: addresses, protocol 6 and TCP length.
    fn pseudo4(src: [u8; 4], dst: [u8; 4], len: usize) -> u64 {
        let mut b = Vec::new();
        b.extend_from_slice(&src);
        b.extend_from_slice(&dst);
        b.extend_from_slice(&[0, 6]);
        b.extend_from_slice(&u16::try_from(len).expect("small").to_be_bytes());
        u64::from(!full(&b, 0))
    }

    /// The sum of an IPv6 pseudo-header.
    fn pseudo6(src: [u8; 16], dst: [u8; 16], len: usize) -> u64 {
        let mut b = Vec::new();
        b.extend_from_slice(&src);
        b.extend_from_slice(&dst);
        b.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 6]);
        u64::from(!full(&b, 0))
    }

    /// The TCP checksum after NAT, updated by `addrs` (the addresses' delta) and
    /// the new `ports`; the segment gets the new ports and a zero checksum field,
    /// ready for a full recomputation.
    fn nat_ports(tcp: &mut [u8], addrs: Delta, ports: (u16, u16)) -> u16 {
        let check = addrs
            .word16(port(tcp, 0), ports.0)
            .word16(port(tcp, 2), ports.1)
            .apply(port(tcp, 16));
        tcp[0..2].copy_from_slice(&ports.0.to_ne_bytes());
        tcp[2..4].copy_from_slice(&ports.1.to_ne_bytes());
        tcp[16..18].copy_from_slice(&[0, 0]);
        check
    }

    /// NAT of an IPv4 packet, as the XDP program does it: new addresses and ports,
    /// the IPv4 header checksum and the TCP checksum updated by the delta, equal to
    /// both recomputed from scratch, for many random headers.
    #[test]
    fn incremental_update_equals_full_recomputation_v4() {
        let mut rng = Rng(0x6170_696c_6c62_0001);
        for _ in 0..20_000 {
            let mut ip: [u8; 20] = rng.bytes();
            ip[10] = 0;
            ip[11] = 0;
            let c = full(&ip, 0);
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            let (src, dst) = (
                ip[12..16].try_into().unwrap(),
                ip[16..20].try_into().unwrap(),
            );
            let mut tcp = segment(&mut rng, |len| pseudo4(src, dst, len));
            let (nsrc, ndst): ([u8; 4], [u8; 4]) = (rng.bytes(), rng.bytes());
            let ports = (rng.u16(), rng.u16());

            let addrs = Delta::default()
                .word32(u32::from_ne_bytes(src), u32::from_ne_bytes(nsrc))
                .word32(u32::from_ne_bytes(dst), u32::from_ne_bytes(ndst));
            let ip_check = addrs.apply(u16::from_ne_bytes([ip[10], ip[11]]));
            let tcp_check = nat_ports(&mut tcp, addrs, ports);

            ip[12..16].copy_from_slice(&nsrc);
            ip[16..20].copy_from_slice(&ndst);
            ip[10] = 0;
            ip[11] = 0;
            assert_eq!(ip_check, full(&ip, 0), "IPv4 header {ip:02x?}");
            assert_eq!(
                tcp_check,
                full(&tcp, pseudo4(nsrc, ndst, tcp.len())),
                "TCP {tcp:02x?}"
            );
        }
    }

    /// The same for IPv6, whose addresses go through `Delta::addr` (four words).
    #[test]
    fn incremental_update_equals_full_recomputation_v6() {
        let mut rng = Rng(0x6170_696c_6c62_0006);
        for _ in 0..20_000 {
            let (src, dst): ([u8; 16], [u8; 16]) = (rng.bytes(), rng.bytes());
            let mut tcp = segment(&mut rng, |len| pseudo6(src, dst, len));
            let (nsrc, ndst): ([u8; 16], [u8; 16]) = (rng.bytes(), rng.bytes());
            let ports = (rng.u16(), rng.u16());

            let addrs = Delta::default()
                .addr(&words(&src), &words(&nsrc))
                .addr(&words(&dst), &words(&ndst));
            let tcp_check = nat_ports(&mut tcp, addrs, ports);
            assert_eq!(
                tcp_check,
                full(&tcp, pseudo6(nsrc, ndst, tcp.len())),
                "TCP {tcp:02x?}"
            );
        }
    }

    /// Rewriting a word to itself changes nothing, whatever the checksum.
    #[test]
    fn unchanged_words_keep_the_checksum() {
        let mut rng = Rng(0x6170_696c_6c62_0000);
        for _ in 0..10_000 {
            let (w, c) = (u32::from_ne_bytes(rng.bytes()), rng.u16());
            // 0xffff and 0x0000 are the same one's-complement sum (-0 and +0); an
            // update can only give the form a non-zero sum takes.
            let kept = Delta::default().word32(w, w).word16(c, c).apply(c);
            assert!(
                kept == c || (c == 0xffff && kept == 0),
                "{c:#06x} -> {kept:#06x}"
            );
        }
    }

    /// A partial checksum field, as a sender's stack leaves it for its device to
    /// finish (`~tcp_v4_check(len, saddr, daddr, 0)`), is `fold(pseudo_header)`;
    /// the sum of the segment with that field in it, inverted, is the full
    /// checksum; and the full checksum verifies to all ones. For both families.
    #[test]
    fn a_partial_checksum_is_the_folded_pseudo_header_and_finishes_to_the_full_one() {
        use super::{fold, pseudo_header};
        let mut rng = Rng(0x6170_696c_6c62_00c5);
        for i in 0..20_000 {
            let v4 = i % 2 == 0;
            let (src, dst): ([u8; 16], [u8; 16]) = (rng.bytes(), rng.bytes());
            let mut tcp = if v4 {
                let (s4, d4) = (src[..4].try_into().unwrap(), dst[..4].try_into().unwrap());
                segment(&mut rng, |len| pseudo4(s4, d4, len))
            } else {
                segment(&mut rng, |len| pseudo6(src, dst, len))
            };
            let full_check = port(&tcp, 16);
            let (ws, wd) = (words(&src), words(&dst));
            let len = u16::try_from(tcp.len()).unwrap();
            let p = pseudo_header(v4, &ws, &wd, len);
            let expect_p = if v4 {
                pseudo4(
                    src[..4].try_into().unwrap(),
                    dst[..4].try_into().unwrap(),
                    tcp.len(),
                )
            } else {
                pseudo6(src, dst, tcp.len())
            };
            assert_eq!(fold(p), fold(expect_p));
            // The full checksum verifies: segment plus pseudo-header folds to ones.
            let seg: u64 = tcp
                .chunks(2)
                .map(|w| u64::from(u16::from_ne_bytes([w[0], w[1]])))
                .sum();
            assert_eq!(fold(seg + p), 0xffff);
            // The partial form, finished.
            tcp[16..18].copy_from_slice(&fold(p).to_ne_bytes());
            let seg: u64 = tcp
                .chunks(2)
                .map(|w| u64::from(u16::from_ne_bytes([w[0], w[1]])))
                .sum();
            assert_eq!(!fold(seg), full_check, "{tcp:02x?}");
        }
    }
}
