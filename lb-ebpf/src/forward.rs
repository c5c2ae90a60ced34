//! Rewriting a parsed packet's addresses and ports, and sending it on.
//!
//! Forwarding asks the kernel FIB for the next hop (`bpf_fib_lookup`) and then
//! transmits straight from the driver: `XDP_TX` when the next hop is out of the
//! ingress interface, a devmap redirect otherwise. Whenever the FIB cannot give a
//! complete answer the packet, already rewritten but with its MACs untouched, goes to
//! the stack, which routes it and resolves the neighbour for the next packet.
//!
//! A FIB lookup costs about 200 ns, more than the rest of the established path, so
//! each flow entry caches its answer and re-asks once per `nexthop_ttl_ns`.
#![cfg(target_arch = "bpf")]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    AF_INET, NextHop,
    counters::{
        FIB_LOOKUP, PASS_FIB_MISS, PASS_MALFORMED, PASS_NO_TX_PORT, PASS_VLAN, REDIRECT, TX,
    },
    csum::Delta,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    maps::{SCRATCH, TX_PORTS, count},
    outcome::Outcome,
    packet::{Parsed, ptr_at},
};

/// The size of a FIB request, as `bpf_fib_lookup` takes it.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "the request is 64 bytes"
)]
const FIB_REQUEST_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;

/// The new 4-tuple of a packet.
#[expect(
    clippy::struct_field_names,
    reason = "`_be` says the byte order, as in every shared type"
)]
pub struct Tuple {
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Rewrite addresses and ports in place, updating the IPv4 and TCP checksums;
/// `l4` is what else the caller changed in the segment (its timestamps, `ts`).
/// `Err` only if the headers `parse` found are no longer there (never, in practice).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, p: &Parsed, t: &Tuple, l4: Delta) -> Result<(), ()> {
    let k = &p.key;
    let addrs = Delta::default()
        .addr(&k.src_be, &t.src_be)
        .addr(&k.dst_be, &t.dst_be);
    if k.family == AF_INET {
        let ip = ptr_at::<Ipv4Hdr>(ctx, usize::from(p.l3))?;
        // SAFETY: `ptr_at` proved the header lies inside the packet.
        let ip = unsafe { &mut *ip };
        ip.src_addr = t.src_be[0].to_ne_bytes();
        ip.dst_addr = t.dst_be[0].to_ne_bytes();
        let check = u16::from_ne_bytes(ip.check);
        ip.check = addrs.apply(check).to_ne_bytes();
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, usize::from(p.l3))?;
        // SAFETY: `ptr_at` proved the header lies inside the packet.
        let ip = unsafe { &mut *ip };
        ip.src_addr = bytes6(&t.src_be);
        ip.dst_addr = bytes6(&t.dst_be);
    }
    let tcp = ptr_at::<TcpHdr>(ctx, usize::from(p.l4))?;
    // SAFETY: `ptr_at` proved the header lies inside the packet.
    let tcp = unsafe { &mut *tcp };
    tcp.source = t.sport_be.to_ne_bytes();
    tcp.dest = t.dport_be.to_ne_bytes();
    let delta = addrs
        .word16(k.sport_be, t.sport_be)
        .word16(k.dport_be, t.dport_be)
        .and(l4);
    tcp.check = delta.apply(u16::from_ne_bytes(tcp.check)).to_ne_bytes();
    Ok(())
}

#[inline(always)]
fn bytes6(a: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

/// Ask the FIB for the next hop towards `t.dst_be` and store it in `hop`; false on
/// any miss. A call, not inlined: it runs once per next-hop TTL. Its 64-byte
/// request lives in the scratch slot: on the stack it made this call's frame, with
/// the `memset` that zeroes it as one more call below, too deep for the 6.1
/// verifier's 512-byte sum over a call chain.
#[inline(never)]
fn fib_next_hop(ctx: &XdpContext, p: &Parsed, t: &Tuple, now: u64, hop: &mut NextHop) -> bool {
    count(FIB_LOOKUP);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot; only its `fib` field is borrowed, through
    // the raw pointer, as `t` or the caller's flow may point into other fields.
    let fib = unsafe { &mut (*scratch).fib };
    // All zero is the request's documented start. Word by word, volatile: LLVM
    // would make a plain zeroing a `memset` call, one more frame in the deepest
    // call chain (main, a direction, this), which Linux 5.15 and 6.1 sum past
    // their 512-byte stack.
    let words = (&raw mut *fib).cast::<u64>();
    for i in 0..size_of::<bpf_fib_lookup>() / 8 {
        // SAFETY: `i` words into the 64-byte request, which is 8-aligned in the
        // scratch map value; `bpf_fib_lookup` is plain old data.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    fib.family = p.key.family;
    fib.l4_protocol = p.key.proto;
    fib.sport = t.sport_be;
    fib.dport = t.dport_be;
    fib.__bindgen_anon_1.tot_len = p.ip_len;
    fib.ifindex = ingress_ifindex(ctx);
    if p.key.family == AF_INET {
        fib.__bindgen_anon_2.tos = p.tos;
        fib.__bindgen_anon_3.ipv4_src = t.src_be[0];
        fib.__bindgen_anon_4.ipv4_dst = t.dst_be[0];
    } else {
        fib.__bindgen_anon_3.ipv6_src = t.src_be;
        fib.__bindgen_anon_4.ipv6_dst = t.dst_be;
    }
    // SAFETY: `fib` is a valid, initialised `bpf_fib_lookup` in the scratch slot
    // and the size passed is its size; the context pointer is the program's own.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &raw mut *fib, FIB_REQUEST_LEN, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return false;
    }
    // Field by field, for the same reason (the padding is never read).
    hop.ifindex = fib.ifindex;
    hop.smac = fib.smac;
    hop.dmac = fib.dmac;
    hop.max_len_host = p.ip_len;
    hop.checked_ns = now;
    true
}

/// Send a rewritten packet towards `t.dst_be` through the flow's cached next hop,
/// asking the FIB first when the cache is empty, older than `ttl_ns`, or has not
/// yet carried a packet this large (the FIB's MTU check). Returns the outcome and
/// whether `hop` changed, for the caller to persist.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    p: &Parsed,
    t: &Tuple,
    hop: &mut NextHop,
    ttl_ns: u64,
    now: u64,
) -> (Outcome, bool) {
    if p.vlan {
        return (Outcome::pass(PASS_VLAN), false);
    }
    let mut changed = false;
    if hop.ifindex == 0 || now.wrapping_sub(hop.checked_ns) >= ttl_ns || p.ip_len > hop.max_len_host
    {
        if !fib_next_hop(ctx, p, t, now, hop) {
            // Forget a stale answer so the next packet asks again.
            changed = hop.ifindex != 0;
            *hop = NextHop::default();
            return (Outcome::pass(PASS_FIB_MISS), changed);
        }
        changed = true;
    }
    let outcome = if hop.ifindex == ingress_ifindex(ctx) {
        Outcome {
            action: xdp_action::XDP_TX,
            counter: TX,
        }
    } else {
        // The redirect happens after the program returns, so the MACs can still be
        // written below; on failure they stay untouched and the stack routes it.
        match TX_PORTS.redirect(hop.ifindex, 0) {
            Ok(action) => Outcome {
                action,
                counter: REDIRECT,
            },
            Err(_) => return (Outcome::pass(PASS_NO_TX_PORT), changed),
        }
    };
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (Outcome::pass(PASS_MALFORMED), changed);
    };
    // SAFETY: `ptr_at` proved the Ethernet header lies inside the packet.
    let eth = unsafe { &mut *eth };
    eth.dst_addr = hop.dmac;
    eth.src_addr = hop.smac;
    (outcome, changed)
}

/// The interface the packet came in on: the kernel's `u32`, which aya widens.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the kernel's field is a u32; aya widens it to usize"
)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    ctx.ingress_ifindex() as u32
}
