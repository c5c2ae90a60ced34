//! The node-local balancer: the node's own processes (kubelet, kube-proxy,
//! kubectl) connecting to a VIP never send a packet past the XDP hook, so their
//! `connect()` is balanced instead, by cgroup programs (Cilium's socket-LB idea).
//!
//! The `connect4`/`connect6` programs (in the crate root) rewrite, through
//! [`connect`], a TCP connect to a `VIP_F_LOCAL` address into one
//! to a backend chosen with the same Maglev ring, health and fallback order as XDP
//! ([`crate::select::pick`]), and remember the address asked for under the socket's
//! cookie; `getpeername4`/`getpeername6` report that address again ([`peer`]). No packet is
//! touched afterwards: the socket talks to the master directly. Only sockets of
//! the network namespace named in `DatapathConfig::netns_cookie` are balanced.
#![cfg(target_arch = "bpf")]

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use lb_common::{AF_INET, BACKEND_NONE, IPPROTO_TCP, SockOrig, VIP_F_LOCAL, VipKey};

use crate::{
    maps::{CONFIG, LOCAL_STATS, SOCK_ORIG, VIPS},
    select::pick,
};

const SOCK_STREAM: u32 = 1;
/// A cgroup `sock_addr` program's verdict that lets the call go on.
pub const ALLOW: i32 = 1;

/// Point a TCP connect to a node-local VIP at a backend. Anything else, or a VIP
/// with no backend to give, is left as it was.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, family: u8) {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    // SAFETY: a helper that reads the context it is given.
    if sa.type_ != SOCK_STREAM
        || cfg.netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie
    {
        return;
    }
    let addr_be = if family == AF_INET {
        [sa.user_ip4, 0, 0, 0]
    } else {
        ip6(sa)
    };
    // The port is in network order in the low 16 bits, as in a sockaddr.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    let port_be = sa.user_port as u16;
    let key = VipKey {
        addr_be,
        port_be,
        proto: IPPROTO_TCP,
        family,
    };
    // SAFETY: VIP entries are replaced whole; at worst this reads the previous one.
    let Some(vip) = (unsafe { VIPS.get(&key) }) else {
        return;
    };
    if vip.flags & VIP_F_LOCAL == 0 {
        return;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The cookie, spread over 32 bits: a socket that calls connect() again (a
    // non-blocking one polling) gets the same backend.
    let hash = (cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
    let Ok((backend_id, backend)) = pick(vip, hash, family, BACKEND_NONE) else {
        return;
    };
    let orig = SockOrig {
        addr_be,
        port_be,
        family,
        _pad: 0,
    };
    // Without the original address getpeername() would name the master: better
    // to leave this connect alone.
    if SOCK_ORIG.insert(&cookie, &orig, 0).is_err() {
        return;
    }
    if family == AF_INET {
        sa.user_ip4 = backend.addr_be[0];
    } else {
        set_ip6(sa, &backend.addr_be);
    }
    sa.user_port = u32::from(backend.port_be);
    if let Some(n) = LOCAL_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot; this program runs to completion on its CPU.
        unsafe { *n += 1 };
    }
}

/// Report the address a balanced socket asked for as its peer.
#[inline(always)]
pub fn peer(ctx: &SockAddrContext, family: u8) {
    // SAFETY: a helper that reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: entries are written whole, once per connect.
    let Some(orig) = (unsafe { SOCK_ORIG.get(&cookie) }) else {
        return;
    };
    if orig.family != family {
        return;
    }
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if family == AF_INET {
        sa.user_ip4 = orig.addr_be[0];
    } else {
        set_ip6(sa, &orig.addr_be);
    }
    sa.user_port = u32::from(orig.port_be);
}

// The verifier allows only whole-word access to `user_ip6`; volatile accesses keep
// LLVM from turning the copies into byte-wise ones.

#[inline(always)]
fn ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    let mut a = [0; 4];
    for (i, w) in a.iter_mut().enumerate() {
        // SAFETY: an in-bounds, aligned field of a valid context.
        *w = unsafe { core::ptr::read_volatile(&raw const sa.user_ip6[i]) };
    }
    a
}

#[inline(always)]
fn set_ip6(sa: &mut bpf_sock_addr, a: &[u32; 4]) {
    for (i, w) in a.iter().enumerate() {
        // SAFETY: as above, for writing.
        unsafe { core::ptr::write_volatile(&raw mut sa.user_ip6[i], *w) };
    }
}
