//! Partial checksums: segments whose sender left the TCP checksum for a device
//! to finish.
//!
//! A veth (or tap) peer with transmit checksum offload on, the default in
//! containers, kind clusters and containerlab, hands over its TCP segments with
//! only the pseudo-header's sum in the checksum field (`CHECKSUM_PARTIAL`): the
//! stack trusts the device to sum the rest. XDP sees the bytes, not that state.
//! An incremental update of such a field is wrong in kind (a partial field is
//! not inverted and covers no header word but the addresses), and a frame sent
//! on with `XDP_TX` or a redirect loses the state that would have finished it, so
//! the master gets a bad checksum and drops the segment.
//!
//! So before a segment the balancer may rewrite is looked at further, [`finish`]
//! recognises a partial field (it equals the folded pseudo-header sum, and the
//! segment does not verify as a full checksum) and completes it: from then on
//! the rewrite is the usual one.
//! Where the kernel keeps the socket buffer, and so its partial state, past the
//! program (`XDP_PASS`, or any verdict in generic mode), [`restore`] puts the
//! partial form back, over the new addresses, for the device that finishes it.
//!
//! Only interfaces that can deliver such segments are looked at: a veth, a tun
//! device, or any interface in generic mode, as the loader found them
//! (`CONFIG.ifaces`, [`iface_flags`]); a NIC in native mode costs one scan of
//! that short list. There the check is a compare against a sum of the
//! addresses, and only partial segments pay for a sum over the segment.
#![cfg(target_arch = "bpf")]

use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_csum_diff, programs::XdpContext};
use lb_common::{
    AF_INET, IFACE_F_PARTIAL, IFACE_F_SKB, IFACES_MAX, VipKey,
    counters::CSUM_PARTIAL,
    csum::{fold, pseudo_header},
};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    maps::{CONFIG, SCRATCH, VIPS, count},
    outcome::Outcome,
    packet::{Parsed, addr6, ptr_at},
    ports::is_snat_addr,
};

/// The largest piece `bpf_csum_diff` sums at once.
const CHUNK: usize = 512;
/// Whole chunks summed at most: a segment of up to 4 KiB, the most a page-sized
/// XDP frame can hold.
const MAX_CHUNKS: usize = 8;

/// The TCP segment's length from the IP header, if the frame holds all of it.
#[inline(always)]
fn tcp_len(ctx: &XdpContext, p: &Parsed) -> Option<u16> {
    let headers = u16::from(p.l4 - p.l3);
    let len = p.ip_len.checked_sub(headers)?;
    if ctx.data() + usize::from(p.l4) + usize::from(len) > ctx.data_end() {
        return None;
    }
    Some(len)
}

/// `x`, hidden from the optimiser, which would otherwise merge or drop checks
/// that the verifier needs to see as written (each use says which).
#[inline(always)]
fn opaque(mut x: usize) -> usize {
    // SAFETY: moves a register into itself; no memory, no side effect.
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack));
    }
    x
}

/// The one's-complement sum of the `len` bytes (20 to 4,096) of the segment at
/// `l4`, as they sit in memory, the checksum field included.
///
/// The segment's last whole 512-byte chunks go to `bpf_csum_diff`, and so does
/// the head before them (under 512 bytes), in pieces of 256, 128, ... 4 bytes
/// as its length's bits say, its last 0-3 bytes as the tail of the 4 bytes
/// that end it. Straight-line code with a read at an offset from the segment's
/// start or its end alone, never from where the part before stopped: the
/// verifier walks it once per path, where a loop over the head's words cost
/// it 64 rounds. A chunk that starts at an odd offset pairs its bytes the
/// other way round from the head's: its sum is byte-swapped (RFC 1071 2(B)).
#[inline(never)]
fn segment_sum(ctx: &XdpContext, l4: usize, len: usize) -> u64 {
    let end = l4 + len;
    let chunks = len / CHUNK;
    let head = len - chunks * CHUNK;
    // Each piece starts where the larger ones before it end: at an even
    // offset, as they are multiples of 4.
    let mut sum = piece::<256>(ctx, l4, head)
        + piece::<128>(ctx, l4, head)
        + piece::<64>(ctx, l4, head)
        + piece::<32>(ctx, l4, head)
        + piece::<16>(ctx, l4, head)
        + piece::<8>(ctx, l4, head)
        + piece::<4>(ctx, l4, head);
    let rest = head % 4;
    if rest > 0
        && l4 + head >= 4
        && let Ok(w) = ptr_at::<u32>(ctx, opaque(l4 + head - 4))
    {
        // SAFETY: `ptr_at` proved the word lies inside the packet (the IP
        // header before the segment, if the head is shorter).
        let w = unsafe { w.read_unaligned() };
        // Only its last `rest` bytes are the head's. Shifted down (the BPF target
        // is little-endian: the first byte in memory is the lowest), they sit as
        // they would at an even offset, an odd last one padded with a zero byte.
        sum += u64::from(w >> (8 * (4 - rest)));
    }
    let mut tail = 0u64;
    for i in 0..MAX_CHUNKS {
        // `end` hidden, or LLVM drops the check as implied by `chunks`, which
        // the verifier cannot see.
        let (back, e) = ((i + 1) * CHUNK, opaque(end));
        if opaque(i) >= chunks || e < back {
            break;
        }
        tail += csum_of::<CHUNK>(ctx, opaque(e - back));
    }
    if head % 2 == 1 {
        tail = u64::from(fold(tail).swap_bytes());
    }
    sum + tail
}

/// The sum of the head's piece of `N` bytes, if its length has that bit: the
/// piece starts after the larger ones, at the head's bits above `N`.
#[inline(always)]
fn piece<const N: usize>(ctx: &XdpContext, l4: usize, head: usize) -> u64 {
    if head & N == 0 {
        return 0;
    }
    // The start hidden, or LLVM turns the sum into an OR of disjoint bits,
    // which Linux 6.1's verifier cannot bound; the offset hidden, or LLVM folds
    // its constant part into the load's, past the bounds check the verifier
    // holds it to.
    csum_of::<N>(ctx, opaque(l4 + opaque(head & !(2 * N - 1))))
}

/// `bpf_csum_diff`'s sum of the `N` bytes (a multiple of 4) at `off`; 0 if they
/// are not all in the packet.
#[inline(always)]
fn csum_of<const N: usize>(ctx: &XdpContext, off: usize) -> u64 {
    let Ok(ptr) = ptr_at::<[u8; N]>(ctx, off) else {
        return 0;
    };
    #[expect(clippy::cast_possible_truncation, reason = "at most 512")]
    // SAFETY: `ptr_at` proved the bytes lie inside the packet; the helper only
    // reads them, and their number is a multiple of 4 as it requires.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, ptr.cast(), N as u32, 0) };
    #[expect(clippy::cast_sign_loss, reason = "a 32-bit sum, or negative on error")]
    if s >= 0 { s as u64 } else { 0 }
}

/// If the segment came in on an interface that can deliver partial checksums
/// ([`iface_flags`]), carries one, and is one the balancer may rewrite (to a
/// VIP, or to a SNAT address's port range), finish it in place and note so in
/// the scratch slot, with the interface's flags, for [`restore`]. Segments with
/// a full checksum, right or wrong, are left as they are: a wrong one is the
/// sender's, for the receiver to drop.
///
/// It runs once, right after parsing, rather than on each path that rewrites:
/// the verifier walks the sum once per path that reaches it. What it found is
/// kept in the scratch slot, not in a register live across the balancing,
/// where the verifier would walk every path of the program once for each
/// value (half its work, measured).
///
/// Like [`restore`], a call of its own: inlined, their locals would sit in the
/// program's main frame, under the deepest call chain, which Linux 6.1 limits to
/// 512 bytes.
#[inline(never)]
pub fn finish(ctx: &XdpContext, p: &Parsed) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; XDP runs to completion on a CPU.
    let s = unsafe { &mut *scratch };
    let iface = iface_flags(ctx);
    s.iface = iface;
    s.partial = u32::from(iface & IFACE_F_PARTIAL != 0 && p.icmp == 0 && finished(ctx, p));
}

/// [`finish`]'s work: whether it finished a partial checksum.
#[inline(always)]
fn finished(ctx: &XdpContext, p: &Parsed) -> bool {
    let Some(len) = tcp_len(ctx, p) else {
        return false;
    };
    // A frame XDP sees whole fits a page: a longer segment cannot be here.
    if usize::from(len) < TcpHdr::LEN || usize::from(len) > MAX_CHUNKS * CHUNK {
        return false;
    }
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, usize::from(p.l4)) else {
        return false;
    };
    // SAFETY: `ptr_at` proved the header lies inside the packet.
    let check = u16::from_ne_bytes(unsafe { (*tcp).check });
    let k = &p.key;
    let pseudo = pseudo_header(k.family == AF_INET, &k.src_be, &k.dst_be, len);
    if check != fold(pseudo) || !maybe_ours(p) {
        return false;
    }
    let sum = segment_sum(ctx, usize::from(p.l4), usize::from(len));
    // A full checksum that happens to equal the pseudo-header's sum verifies.
    if fold(sum + pseudo) == 0xffff {
        return false;
    }
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, usize::from(p.l4)) else {
        return false;
    };
    // SAFETY: as above; the packet has not changed length since.
    unsafe { (*tcp).check = (!fold(sum)).to_ne_bytes() };
    count(CSUM_PARTIAL);
    true
}

/// To a VIP, or to a SNAT address's port range: a segment the balancer may
/// rewrite. Everything else passes untouched, its partial checksum with it.
#[inline(always)]
fn maybe_ours(p: &Parsed) -> bool {
    let k = &p.key;
    let vip = VipKey {
        addr_be: k.dst_be,
        port_be: k.dport_be,
        proto: k.proto,
        family: k.family,
    };
    // SAFETY: only whether the entry exists is read.
    if unsafe { VIPS.get(&vip) }.is_some() {
        return true;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    let port = u16::from_be(k.dport_be);
    port >= cfg.port_min_host && port <= cfg.port_max_host && is_snat_addr(cfg, k.family, &k.dst_be)
}

/// After a segment [`finish`] completed got its verdict: where the kernel keeps
/// the socket buffer, and with it the state that says the checksum is partial
/// (`XDP_PASS`, or any verdict in generic mode), or drops it, put the partial
/// form back, the
/// pseudo-header sum of the addresses the segment now carries, for the device
/// or stack that finishes it.
#[inline(never)]
pub fn restore(ctx: &XdpContext, p: &Parsed, outcome: &Outcome) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, as in `finish`.
    let s = unsafe { &mut *scratch };
    if s.partial == 0 {
        return;
    }
    s.partial = 0;
    // A dropped segment gets its partial form back too: whatever looks at
    // drops (xdpdump, the fuzzer) sees the bytes that arrived.
    if outcome.action != xdp_action::XDP_PASS
        && outcome.action != xdp_action::XDP_DROP
        && s.iface & IFACE_F_SKB == 0
    {
        return;
    }
    let Some(len) = tcp_len(ctx, p) else {
        return;
    };
    let v4 = p.key.family == AF_INET;
    let (mut src, mut dst) = ([0u32; 4], [0u32; 4]);
    if v4 {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, usize::from(p.l3)) else {
            return;
        };
        // SAFETY: `ptr_at` proved the header lies inside the packet.
        let ip = unsafe { &*ip };
        src[0] = u32::from_ne_bytes(ip.src_addr);
        dst[0] = u32::from_ne_bytes(ip.dst_addr);
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, usize::from(p.l3)) else {
            return;
        };
        // SAFETY: `ptr_at` proved the header lies inside the packet.
        let ip = unsafe { &*ip };
        src = addr6(&ip.src_addr);
        dst = addr6(&ip.dst_addr);
    }
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, usize::from(p.l4)) else {
        return;
    };
    // SAFETY: `ptr_at` proved the header lies inside the packet.
    unsafe { (*tcp).check = fold(pseudo_header(v4, &src, &dst, len)).to_ne_bytes() };
}

/// `IFACE_F_*` of the packet's interface from `CONFIG`, 0 if it is not listed:
/// a NIC in native mode, whose packets never carry partial checksums.
#[inline(always)]
fn iface_flags(ctx: &XdpContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return 0;
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the kernel's field is a u32; aya widens it to usize"
    )]
    let ifindex = ctx.ingress_ifindex() as u32;
    let mut i = 0;
    while i < IFACES_MAX {
        let iface = &cfg.ifaces[i];
        // The controller fills the list from the front: on a node with no veth
        // the first slot ends the scan.
        if iface.ifindex == 0 {
            return 0;
        }
        if iface.ifindex == ifindex {
            return iface.flags;
        }
        i += 1;
    }
    0
}
