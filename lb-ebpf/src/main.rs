//! apilb's kernel programs: the XDP balancer, which sends VIP:6443 connections to
//! healthy masters in NAT mode, and the socket programs of node-local mode.
//!
//! This is the crate root: the modules and the programs' entry points (`runtime`
//! adds the panic handler and the license). Per packet,
//! the XDP program parses (`packet`); a client's packet to an owned VIP keeps its
//! flow's backend or gets one (`ingress`, `select`, `flow`, `ports`), a backend's
//! reply is turned back to the VIP's (`reply`), and either is rewritten with
//! incremental checksums and forwarded through the FIB (`forward`). Everything else
//! passes untouched. A backend refusing SYNs is noticed on the wire (`passive`).
//! Every packet bumps exactly one outcome counter (`outcome`, `maps`); nothing is
//! logged per packet.
//!
//! The node's own processes never reach the XDP hook; `sock` balances their
//! `connect()` calls with the same rings.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `ports::advance` adds to a shared cursor atomically; `core::sync::atomic` has no
// atomic types on the BPF target, whose generic CPU has only the non-fetching add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// `offload::opaque` hides a value from LLVM with an empty `asm!`, which the BPF
// target has only as an experimental feature.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::needless_borrows_for_generic_args,
        reason = "aya-ebpf's map methods take `impl Borrow`: a key or value passed by value \
                  is a copy on the 512-byte BPF stack, a borrow is a pointer"
    )
)]

// Every module is kernel-only (`#![cfg(target_arch = "bpf")]` at its top), so on
// the host this crate is the empty `main` below.
mod flow;
mod forward;
mod ingress;
mod maps;
mod offload;
mod outcome;
mod packet;
mod passive;
mod ports;
mod reply;
mod runtime;
mod select;
mod sock;
mod sync;
mod toobig;
mod ts;

/// The programs. Their names are lb-common's `PROG_XDP` and `PROG_SOCK`.
#[cfg(target_arch = "bpf")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macros take the context by value, as the kernel passes it"
)]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_sock_addr, xdp},
        programs::{SockAddrContext, XdpContext},
    };
    use lb_common::{AF_INET, AF_INET6};

    use crate::{ingress::try_balance, maps::count, sock};

    /// The XDP balancer, attached to the node's uplinks.
    #[xdp]
    pub fn apilb_xdp(ctx: XdpContext) -> u32 {
        let outcome = match try_balance(&ctx) {
            Ok(o) | Err(o) => o,
        };
        count(outcome.counter);
        outcome.action
    }

    #[cgroup_sock_addr(connect4)]
    pub fn apilb_connect4(ctx: SockAddrContext) -> i32 {
        sock::connect(&ctx, AF_INET);
        sock::ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn apilb_connect6(ctx: SockAddrContext) -> i32 {
        sock::connect(&ctx, AF_INET6);
        sock::ALLOW
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn apilb_getpeername4(ctx: SockAddrContext) -> i32 {
        sock::peer(&ctx, AF_INET);
        sock::ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn apilb_getpeername6(ctx: SockAddrContext) -> i32 {
        sock::peer(&ctx, AF_INET6);
        sock::ALLOW
    }
}

/// Built for the host only so that workspace-wide commands do not fail; the real
/// program exists only for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
