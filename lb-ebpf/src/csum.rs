//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! NAT changes only addresses and ports, so instead of re-summing the packet we add
//! the difference. One's-complement sums are byte-order independent (RFC 1071), so
//! every word is taken exactly as it sits in memory.

/// The accumulated `~m + m'` of every changed word.
#[derive(Clone, Copy, Default)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub fn word32(self, old: u32, new: u32) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline(always)]
    pub fn word16(self, old: u16, new: u16) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline(always)]
    pub fn addr(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        self.word32(old[0], new[0])
            .word32(old[1], new[1])
            .word32(old[2], new[2])
            .word32(old[3], new[3])
    }

    /// Apply the delta to a checksum field read from memory; the result goes back
    /// into memory as is.
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        let mut s = u64::from(!csum) + self.0;
        // Four folds take any u64 down to 16 bits with the end-around carries.
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}
