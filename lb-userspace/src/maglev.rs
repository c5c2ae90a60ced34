//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as pure functions.
//!
//! [`build_table`] turns weighted backends into a lookup table of M slots; [`delta`]
//! lists only the slots that differ from the table already in the kernel, so an
//! update is one small batch write. The table depends only on the set of backends
//! (their keys, ids and weights), never on input order or on the host, so every LB
//! node computes the same table and a flow hashes to the same master everywhere.

use lb_common::BACKEND_NONE;
use twox_hash::XxHash64;

/// A backend as Maglev sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedBackend {
    /// Stable identity that seeds the backend's permutation, e.g. "10.0.0.1:6443".
    pub key: String,
    /// The id the datapath knows the backend by.
    pub id: u32,
    /// Relative share of slots; 0 takes the backend out of the table.
    pub weight: u32,
}

/// Whether `n` is prime; ring sizes must be (the permutation's skip must be coprime
/// with M for every backend to reach every slot).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..=n.isqrt()).all(|d| !n.is_multiple_of(d))
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001;
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002;

/// Build the lookup table of `size` slots (`size` must be prime), each holding a
/// backend id, or `BACKEND_NONE` everywhere if no backend has a positive weight.
///
/// Backends take turns claiming their next preferred free slot. A backend of weight
/// `w` gets `w / max_weight` of a turn per round, so shares follow the weights; with
/// equal weights this is the paper's algorithm and every backend gets ⌊M/N⌋ or ⌈M/N⌉.
#[must_use]
pub fn build_table(backends: &[WeightedBackend], size: u32) -> Vec<u32> {
    let m = size as usize;
    let mut table = vec![BACKEND_NONE; m];
    let mut live: Vec<&WeightedBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || size < 2 {
        return table;
    }
    live.sort_by(|a, b| a.key.cmp(&b.key).then(a.id.cmp(&b.id)));
    let perms: Vec<(usize, usize)> = live
        .iter()
        .map(|b| {
            let offset = XxHash64::oneshot(OFFSET_SEED, b.key.as_bytes()) % u64::from(size);
            let skip = XxHash64::oneshot(SKIP_SEED, b.key.as_bytes()) % u64::from(size - 1) + 1;
            let small = |v: u64| usize::try_from(v).expect("below size, a u32");
            (small(offset), small(skip))
        })
        .collect();
    let max_weight = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut next = vec![0usize; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0usize;
    loop {
        for (i, b) in live.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = perms[i];
            let mut slot = (offset + next[i] * skip) % m;
            while table[slot] != BACKEND_NONE {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            table[slot] = b.id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// The `(slot, backend id)` pairs where `new` differs from `old`. An `old` of another
/// length (e.g. empty, for a ring never written) counts as all `BACKEND_NONE`.
#[must_use]
pub fn delta(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|&(i, id)| {
            old.get(i).copied().unwrap_or(BACKEND_NONE) != *id || old.len() != new.len()
        })
        .map(|(i, id)| {
            (
                u32::try_from(i).expect("a ring has at most u32::MAX slots"),
                *id,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<WeightedBackend> {
        (1..=n)
            .map(|i| WeightedBackend {
                key: format!("10.0.{}.{}:6443", i / 250, i % 250),
                id: i,
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], n: u32) -> Vec<usize> {
        (1..=n)
            .map(|id| table.iter().filter(|&&t| t == id).count())
            .collect()
    }

    #[test]
    fn equal_weights_give_each_backend_floor_or_ceil_of_m_over_n() {
        for n in [1, 2, 3, 5, 7] {
            let t = build_table(&backends(n), 65_537);
            let (lo, hi) = (65_537 / n as usize, 65_537_usize.div_ceil(n as usize));
            for (i, s) in shares(&t, n).into_iter().enumerate() {
                assert!(
                    s == lo || s == hi,
                    "n={n} backend {} has {s} slots, want {lo} or {hi}",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let mut b = backends(3);
        b[0].weight = 1;
        b[1].weight = 2;
        b[2].weight = 3;
        let s = shares(&build_table(&b, 65_537), 3);
        for (got, w) in s.iter().zip([1.0, 2.0, 3.0]) {
            let want = 65_537.0 * w / 6.0;
            assert!((*got as f64 - want).abs() / want < 0.01, "shares {s:?}");
        }
    }

    #[test]
    fn input_order_and_repeated_runs_give_identical_tables() {
        let b = backends(5);
        let mut r = b.clone();
        r.reverse();
        assert_eq!(build_table(&b, 65_537), build_table(&r, 65_537));
        assert_eq!(build_table(&b, 65_537), build_table(&b, 65_537));
    }

    #[test]
    fn removing_one_of_five_moves_its_slots_and_under_two_percent_of_the_rest() {
        let all = backends(5);
        let before = build_table(&all, 65_537);
        let after = build_table(&all[..4], 65_537);
        let orphaned = before.iter().filter(|&&id| id == 5).count();
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|&(b, a)| *b != 5 && b != a)
            .count();
        assert!(after.iter().all(|&id| id != 5));
        assert!(
            moved_others * 100 < (65_537 - orphaned) * 2,
            "{moved_others} slots of survivors moved"
        );
    }

    #[test]
    fn delta_lists_exactly_the_changed_slots() {
        let all = backends(3);
        let before = build_table(&all, 251);
        let after = build_table(&all[..2], 251);
        let d = delta(&before, &after);
        assert_eq!(
            d.len(),
            before.iter().zip(&after).filter(|(a, b)| a != b).count()
        );
        assert_eq!(delta(&[], &after).len(), 251);
        let mut patched = before.clone();
        for (slot, id) in d {
            patched[slot as usize] = id;
        }
        assert_eq!(patched, after);
    }

    #[test]
    fn primes_are_told_apart() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537) && is_prime(251) && !is_prime(65_535) && !is_prime(65_541));
    }

    #[test]
    fn no_weighted_backend_leaves_the_table_empty() {
        let mut b = backends(2);
        for x in &mut b {
            x.weight = 0;
        }
        assert!(build_table(&b, 251).iter().all(|&id| id == BACKEND_NONE));
    }
}
