//! The model of the datapath's partial checksums (README, "Container networks"),
//! on interfaces that may deliver them (the fuzzer's lab says both do): a TCP
//! segment to a VIP or to a SNAT port whose checksum field holds only the
//! pseudo-header's sum, and which does not verify as a full checksum, is
//! finished before the balancer looks at it; if the verdict leaves the kernel's
//! socket buffer in place (a pass; the fuzz lab has no interface in generic
//! mode) or drops it, the field is put back to the pseudo-header sum of the addresses the
//! segment then carries.

use lb_common::{AF_INET, VipKey, counters::CSUM_PARTIAL};

use super::{
    Tx,
    frame::{Icmp, Parsed, be16, fold, sum},
};
use crate::fixture::{XDP_DROP, XDP_PASS};

/// The most a segment can be for the datapath to finish it (a page).
const MAX_SEGMENT: usize = 4096;

/// The segment's length, if the IP header's length leaves room for a TCP header
/// and the frame holds it all.
pub(super) fn segment(f: &[u8], p: &Parsed) -> Option<(usize, usize)> {
    let len = usize::from(p.ip_len).checked_sub(p.l4 - p.l3)?;
    (p.l4 + len <= f.len()).then_some((p.l4, len))
}

/// The pseudo-header's sum for the addresses at `l3` in `f` and length `len`.
pub(super) fn pseudo(f: &[u8], p: &Parsed, len: usize) -> u64 {
    let addrs = if p.key.family == AF_INET {
        &f[p.l3 + 12..p.l3 + 20]
    } else {
        &f[p.l3 + 8..p.l3 + 40]
    };
    sum(addrs, 6 + len as u64)
}

/// Finish a partial checksum; whether it did.
pub fn finish(tx: &mut Tx, f: &mut [u8], p: &Parsed) -> bool {
    if p.icmp != Icmp::No {
        return false;
    }
    let Some((l4, len)) = segment(f, p) else {
        return false;
    };
    if !(20..=MAX_SEGMENT).contains(&len) {
        return false;
    }
    let pseudo = pseudo(f, p, len);
    if be16(f, l4 + 16) != Some(fold(pseudo)) || !maybe_ours(tx, p) {
        return false;
    }
    let s = sum(&f[l4..l4 + len], 0);
    if fold(s + pseudo) == 0xffff {
        return false;
    }
    f[l4 + 16..l4 + 18].copy_from_slice(&(!fold(s)).to_be_bytes());
    tx.count(CSUM_PARTIAL);
    true
}

/// To any VIP, owned or not, or to a SNAT address's port range.
fn maybe_ours(tx: &Tx, p: &Parsed) -> bool {
    let k = &p.key;
    let vip = VipKey {
        addr_be: k.dst_be,
        port_be: k.dport_be,
        proto: k.proto,
        family: k.family,
    };
    if tx.m.vips.contains_key(&vip) {
        return true;
    }
    let port = u16::from_be(k.dport_be);
    (tx.m.cfg.port_min..=tx.m.cfg.port_max).contains(&port)
        && tx.m.snat(k.family).contains(&k.dst_be)
}

/// After a finished segment's verdict `action`: partial again if it passes or
/// is dropped.
pub fn restore(f: &mut [u8], p: &Parsed, action: u32) {
    if action != XDP_PASS && action != XDP_DROP {
        return;
    }
    let Some((l4, len)) = segment(f, p) else {
        return;
    };
    let field = fold(pseudo(f, p, len));
    f[l4 + 16..l4 + 18].copy_from_slice(&field.to_be_bytes());
}

/// Put `f`'s TCP checksum in the partial form a veth peer with offload hands
/// over, if it is a TCP segment the frame holds whole (for the generator).
pub fn make_partial(f: &mut [u8]) {
    let Ok(p) = super::frame::parse(f) else {
        return;
    };
    if p.icmp != Icmp::No {
        return;
    }
    let Some((l4, len)) = segment(f, &p) else {
        return;
    };
    if len < 20 {
        return;
    }
    let field = fold(pseudo(f, &p, len));
    f[l4 + 16..l4 + 18].copy_from_slice(&field.to_be_bytes());
}
