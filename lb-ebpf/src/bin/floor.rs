//! The benchmark floor: an XDP program that drops every packet and does nothing
//! else, the cheapest there can be, which `cargo xtask bench xdp` measures the
//! balancer against.
//!
//! It is a binary, and so an object, of its own so that apilb's datapath neither
//! carries nor loads it: lb-userspace embeds it only with its `bench` feature.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[path = "../runtime.rs"]
mod runtime;

/// The program. Its name is lb-common's `PROG_XDP_DROP`.
#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    #[xdp]
    pub fn apilb_xdp_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }
}

/// Built for the host only so that workspace-wide commands do not fail; the real
/// program exists only for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
