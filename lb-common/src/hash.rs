//! The flow hash that picks a Maglev slot.
//!
//! It lives here, not in the kernel crate, because every consumer must agree on it
//! bit for bit: the XDP program, the socket hooks, and the tests that predict which
//! backend a flow lands on. It is `MurmurHash3`'s 32-bit block mix and finaliser over
//! the key's words: a handful of multiplies, cheap enough for the per-packet path and
//! free of the collisions a plain XOR fold gives on symmetric tuples.

use crate::FlowKey;

const SEED: u32 = 0x6170_696c; // "apil"

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a client flow as the XDP program sees it (client -> VIP).
#[inline(always)]
#[must_use]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    let mut i = 0;
    while i < 4 {
        h = mix(h, key.src_be[i]);
        h = mix(h, key.dst_be[i]);
        i += 1;
    }
    h = mix(h, (u32::from(key.sport_be) << 16) | u32::from(key.dport_be));
    h = mix(h, (u32::from(key.proto) << 8) | u32::from(key.family));
    finish(h)
}
