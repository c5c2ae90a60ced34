//! Path MTU discovery through the NAT: an ICMP "fragmentation needed" (IPv4) or
//! "packet too big" (IPv6) about a segment the balancer sent a backend is
//! translated back to that flow's client, as conntrack and Cilium do.
//!
//! The error arrives from a router between the balancer and the master (or the
//! master), addressed to the SNAT address and quoting the segment as it left
//! (SNAT address:port -> master:port). The client knows none of these, so the
//! whole message is turned around: the outer source becomes the VIP and the outer
//! destination the client; the quote becomes client:port -> VIP:port. The IPv4
//! header checksums, the quoted TCP checksum (when the quote holds it) and the
//! ICMP checksum are updated incrementally. The MTU it reports is kept: the NAT
//! adds no header. Without this, a smaller MTU behind the balancer leaves every
//! large request of a client hanging.
//!
//! The client's stack checks that the quoted sequence number is one it has in
//! flight, so nothing is checked here that it checks better; a forged message
//! can only make it send smaller segments, as it could without a balancer.
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    AF_INET, NextHop, ReplyState,
    counters::{ICMP_TOO_BIG_TRANSLATED, PASS_MALFORMED, PASS_NOT_VIP},
    csum::Delta,
};
use network_types::ip::Ipv6Hdr;

use crate::{
    flow::coarse_now,
    forward::{Tuple, forward},
    maps::{CONFIG, HALF_REPLIES, REPLIES, count},
    outcome::Outcome,
    packet::{ICMP_HDR_LEN, Parsed, ptr_at},
    ports::is_snat_addr,
};

/// Translate and forward a packet too big about a flow under NAT; pass anything
/// else. A BPF-to-BPF call beside `reply::to_client`, not under it, so that its
/// frame and the FIB lookup's fit the verifier's 512-byte sum over a call chain.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, p: &Parsed) -> Outcome {
    let not_ours = Outcome::pass(PASS_NOT_VIP);
    let Some(cfg) = CONFIG.get(0) else {
        return not_ours;
    };
    if !is_snat_addr(cfg, p.key.family, &p.key.dst_be) {
        return not_ours;
    }
    // SAFETY: entries are replaced whole but for their next hop and flags, which
    // are not read here.
    let reply = unsafe {
        match REPLIES.get(&p.key) {
            Some(r) => r,
            None => match HALF_REPLIES.get(&p.key) {
                Some(r) => r,
                None => return not_ours,
            },
        }
    };
    let translated = if p.key.family == AF_INET {
        translate4(ctx, p, reply)
    } else {
        translate6(ctx, p, reply)
    };
    if translated.is_none() {
        return Outcome::pass(PASS_MALFORMED);
    }
    count(ICMP_TOO_BIG_TRANSLATED);
    let t = Tuple {
        src_be: reply.vip_be,
        dst_be: reply.client_be,
        sport_be: reply.vip_port_be,
        dport_be: reply.client_port_be,
    };
    // No cached hop: such messages are rare, and the FIB answers each.
    let mut hop = NextHop {
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        max_len_host: 0,
        _pad: [0; 6],
        checked_ns: 0,
    };
    forward(ctx, p, &t, &mut hop, cfg.nexthop_ttl_ns, coarse_now()).0
}

/// Rewrite an IPv4 fragmentation needed in place for the client of `reply` (see
/// the module docs). The ICMP checksum covers the quote, but the quoted IP
/// header sums to the same after its addresses and its checksum are updated
/// together, so only the quoted ports and TCP checksum change what it sees.
#[inline(never)]
fn translate4(ctx: &XdpContext, p: &Parsed, reply: &ReplyState) -> Option<()> {
    let l3 = usize::from(p.l3);
    let outer = swap(ctx, l3 + 12, &reply.vip_be[..1], Delta::default())?;
    let outer = swap(ctx, l3 + 16, &reply.client_be[..1], outer)?;
    fix(ctx, l3 + 10, outer)?;
    let inner = usize::from(p.l4) + ICMP_HDR_LEN;
    let quote = swap(ctx, inner + 12, &reply.client_be[..1], Delta::default())?;
    let quote = swap(ctx, inner + 16, &reply.vip_be[..1], quote)?;
    fix(ctx, inner + 10, quote)?;
    // Four bytes, not one: LLVM turns a one-byte bounds check into a comparison
    // the verifier cannot use.
    let head = ptr_at::<[u8; 4]>(ctx, inner).ok()?;
    // SAFETY: `ptr_at` proved the bytes inside the packet.
    let ihl = usize::from(unsafe { (*head)[0] } & 0x0f) * 4;
    let icmp = quoted_tcp(ctx, inner + ihl, reply, quote)?;
    fix(ctx, usize::from(p.l4) + 2, icmp)
}

/// [`translate4`] for an IPv6 packet too big, whose checksum also covers the
/// outer addresses (the pseudo-header) and the quoted ones.
#[inline(never)]
fn translate6(ctx: &XdpContext, p: &Parsed, reply: &ReplyState) -> Option<()> {
    let l3 = usize::from(p.l3);
    let icmp = swap(ctx, l3 + 8, &reply.vip_be, Delta::default())?;
    let icmp = swap(ctx, l3 + 24, &reply.client_be, icmp)?;
    let inner = usize::from(p.l4) + ICMP_HDR_LEN;
    let quote = swap(ctx, inner + 8, &reply.client_be, Delta::default())?;
    let quote = swap(ctx, inner + 24, &reply.vip_be, quote)?;
    let tcp = quoted_tcp(ctx, inner + Ipv6Hdr::LEN, reply, quote)?;
    fix(ctx, usize::from(p.l4) + 2, icmp.and(quote).and(tcp))
}

/// Replace the address of `new.len()` 32-bit words at `at` with `new`, adding
/// the change to `delta`. Word by word, each read and written volatile and each
/// sum taken at once: LLVM would otherwise load every byte of both addresses
/// ahead of the stores and keep them all, spilled far past the 512-byte stack.
#[inline(always)]
fn swap(ctx: &XdpContext, at: usize, new: &[u32], mut delta: Delta) -> Option<Delta> {
    let mut i = 0;
    while i < new.len() && i < 4 {
        let word = ptr_at::<[u8; 4]>(ctx, at + 4 * i).ok()?;
        // SAFETY: `ptr_at` proved the four bytes inside the packet, which XDP may
        // write; volatile only keeps the order.
        let old = u32::from_ne_bytes(unsafe { core::ptr::read_volatile(word) });
        // Summed here and now: left to the end, every byte read stays live.
        delta = core::hint::black_box(delta.word32(old, new[i]));
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(word, new[i].to_ne_bytes()) };
        i += 1;
    }
    Some(delta)
}

/// Apply `delta` to the checksum at `at`.
#[inline(always)]
fn fix(ctx: &XdpContext, at: usize, delta: Delta) -> Option<()> {
    let check = ptr_at::<[u8; 2]>(ctx, at).ok()?;
    // SAFETY: `ptr_at` proved the checksum inside the packet.
    let check = unsafe { &mut *check };
    *check = delta.apply(u16::from_ne_bytes(*check)).to_ne_bytes();
    Some(())
}

/// Turn the quoted ports back (NAT port -> client port, backend port -> VIP
/// port) and update the quoted TCP checksum for them and for the quoted
/// addresses' change `quote`, if the quote reaches it (IPv4 routers may quote
/// only 8 bytes). Returns what changed in the bytes the ICMP checksum covers.
#[inline(always)]
fn quoted_tcp(ctx: &XdpContext, at: usize, reply: &ReplyState, quote: Delta) -> Option<Delta> {
    let ports = ptr_at::<[[u8; 2]; 2]>(ctx, at).ok()?;
    // SAFETY: `ptr_at` proved both ports inside the packet.
    let ports = unsafe { &mut *ports };
    let moved = Delta::default()
        .word16(u16::from_ne_bytes(ports[0]), reply.client_port_be)
        .word16(u16::from_ne_bytes(ports[1]), reply.vip_port_be);
    ports[0] = reply.client_port_be.to_ne_bytes();
    ports[1] = reply.vip_port_be.to_ne_bytes();
    let Ok(check) = ptr_at::<[u8; 2]>(ctx, at + 16) else {
        return Some(moved);
    };
    // SAFETY: `ptr_at` proved the two bytes inside the packet.
    let check = unsafe { &mut *check };
    let old = u16::from_ne_bytes(*check);
    let new = quote.and(moved).apply(old);
    *check = new.to_ne_bytes();
    Some(moved.word16(old, new))
}
