//! What the XDP program does with a packet, and the counter that says why.
//!
//! Every path ends in one [`Outcome`]; the program's entry point bumps its counter
//! and returns its action, so every packet bumps exactly one outcome counter.
#![cfg(target_arch = "bpf")]

use aya_ebpf::bindings::xdp_action;

/// What to do with a packet, and the outcome counter that says why.
pub struct Outcome {
    pub action: u32,
    pub counter: u32,
}

impl Outcome {
    pub const fn pass(counter: u32) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            counter,
        }
    }
    pub const fn drop(counter: u32) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            counter,
        }
    }
}
