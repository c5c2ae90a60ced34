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

#[cfg(test)]
mod tests {
    use super::flow_hash;
    use crate::{AF_INET, AF_INET6, FlowKey, IPPROTO_TCP};

    /// `192.0.2.10:50000 -> 192.0.2.100:6443`, as the XDP program reads it off the
    /// wire (words and ports in memory order).
    fn v4() -> FlowKey {
        FlowKey {
            src_be: [u32::from_ne_bytes([192, 0, 2, 10]), 0, 0, 0],
            dst_be: [u32::from_ne_bytes([192, 0, 2, 100]), 0, 0, 0],
            sport_be: 50_000u16.to_be(),
            dport_be: 6443u16.to_be(),
            proto: IPPROTO_TCP,
            family: AF_INET,
            _pad: 0,
        }
    }

    /// `[2001:db8::10]:50000 -> [2001:db8::64]:6443`.
    fn v6() -> FlowKey {
        let addr = |last: u8| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            b[15] = last;
            core::array::from_fn(|i| {
                u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
            })
        };
        FlowKey {
            src_be: addr(0x10),
            dst_be: addr(0x64),
            family: AF_INET6,
            ..v4()
        }
    }

    /// Every node must agree on the hash: with another one, two LB nodes (or two
    /// versions during a rolling upgrade) would send a flow to different backends.
    /// These values may change only on purpose. (Keys hold wire bytes in memory
    /// order, so the values are those of a little-endian host, like bpfel.)
    #[test]
    fn fixed_vectors() {
        let got = [
            flow_hash(&FlowKey::default()),
            flow_hash(&v4()),
            flow_hash(&v6()),
        ];
        assert_eq!(got, [0x3858_3427, 0x3fa5_5e0d, 0x4a77_7c83]);
    }

    /// Every bit of every hashed field moves the hash: each mixing step is a
    /// bijection of the running state, so no change in a word can cancel out.
    #[test]
    fn each_field_changes_the_hash() {
        for base in [v4(), v6()] {
            let h = flow_hash(&base);
            for (field, bits) in FIELD_BITS.into_iter().enumerate() {
                for bit in 0..bits {
                    assert_ne!(
                        flow_hash(&flipped(base, field, bit)),
                        h,
                        "field {field} bit {bit}"
                    );
                }
            }
        }
    }

    /// The width of each hashed field of a `FlowKey`, in the order of [`flipped`].
    const FIELD_BITS: [u32; 12] = [32, 32, 32, 32, 32, 32, 32, 32, 16, 16, 8, 8];

    /// `k` with one bit flipped in one hashed field: 0..4 the source words, 4..8 the
    /// destination words, then the source port, destination port, protocol, family.
    fn flipped(mut k: FlowKey, field: usize, bit: u32) -> FlowKey {
        match field {
            0..4 => k.src_be[field] ^= 1 << bit,
            4..8 => k.dst_be[field - 4] ^= 1 << bit,
            8 => k.sport_be ^= 1 << bit,
            9 => k.dport_be ^= 1 << bit,
            10 => k.proto ^= 1 << bit,
            _ => k.family ^= 1 << bit,
        }
        k
    }

    /// Swapping the two ends of a flow gives another hash (a plain XOR fold would
    /// not), and the padding is not hashed.
    #[test]
    fn direction_counts_and_padding_does_not() {
        for k in [v4(), v6()] {
            let turned = FlowKey {
                src_be: k.dst_be,
                dst_be: k.src_be,
                sport_be: k.dport_be,
                dport_be: k.sport_be,
                ..k
            };
            assert_ne!(flow_hash(&turned), flow_hash(&k));
            assert_eq!(flow_hash(&FlowKey { _pad: 0xffff, ..k }), flow_hash(&k));
        }
    }

    /// An IPv4 flow and an IPv6 one with the same words differ by family alone, and
    /// hash apart.
    #[test]
    fn v4_and_v6_hash_apart() {
        let k = v4();
        assert_ne!(
            flow_hash(&FlowKey {
                family: AF_INET6,
                ..k
            }),
            flow_hash(&k)
        );
        assert_ne!(flow_hash(&v6()), flow_hash(&v4()));
    }
}
