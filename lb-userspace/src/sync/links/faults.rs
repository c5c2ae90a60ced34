//! What the links count against a peer, by the reason of
//! `apilb_sync_rejected_total{reason}`, and how often they log it: a peer that
//! keeps sending garbage must not flood the log.

use std::{fmt, time::Duration};

use tokio::time::Instant;

use crate::sync::wire::Reject;

/// A fault is logged at most this often per peer and reason.
pub(super) const LOG_EVERY: Duration = Duration::from_secs(1);

/// What the links count against a peer: each [`Reject`] of the codec, and the
/// faults of the connection around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    Rejected(Reject),
    /// A connection from an address that is no peer's, or a name in the handshake
    /// other than the one configured for the address.
    UnknownPeer,
    /// A handshake that took more than 2 s, or a session silent for 3 s.
    Timeout,
    /// A message dropped because the link's queue was full.
    Overflow,
}

impl Fault {
    pub(super) const COUNT: usize = 9;

    /// Every fault, in the order of [`FaultCounts::iter`].
    pub const ALL: [Fault; Fault::COUNT] = [
        Fault::Rejected(Reject::Malformed),
        Fault::Rejected(Reject::Version),
        Fault::Rejected(Reject::Auth),
        Fault::Rejected(Reject::Replay),
        Fault::Rejected(Reject::ConfigMismatch),
        Fault::Rejected(Reject::BadRecord),
        Fault::UnknownPeer,
        Fault::Timeout,
        Fault::Overflow,
    ];

    /// The label of `apilb_sync_rejected_total{reason}`; stable.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Rejected(reject) => reject.as_str(),
            Fault::UnknownPeer => "unknown_peer",
            Fault::Timeout => "timeout",
            Fault::Overflow => "overflow",
        }
    }

    /// Its place in [`Fault::ALL`].
    pub(super) fn index(self) -> usize {
        match self {
            Fault::Rejected(Reject::Malformed) => 0,
            Fault::Rejected(Reject::Version) => 1,
            Fault::Rejected(Reject::Auth) => 2,
            Fault::Rejected(Reject::Replay) => 3,
            Fault::Rejected(Reject::ConfigMismatch) => 4,
            Fault::Rejected(Reject::BadRecord) => 5,
            Fault::UnknownPeer => 6,
            Fault::Timeout => 7,
            Fault::Overflow => 8,
        }
    }
}

/// A count per [`Fault`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts([u64; Fault::COUNT]);

impl FaultCounts {
    pub fn get(&self, fault: Fault) -> u64 {
        self.0[fault.index()]
    }

    /// Every fault with its count, zeros included, in the order of [`Fault::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Fault, u64)> + '_ {
        Fault::ALL.into_iter().zip(self.0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub(super) fn add(&mut self, fault: Fault, n: u64) {
        self.0[fault.index()] += n;
    }
}

/// The faults that happened, by label.
impl fmt::Debug for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .filter(|&(_, n)| n > 0)
                    .map(|(fault, n)| (fault.as_str(), n)),
            )
            .finish()
    }
}

/// Fault counts, and when each was last logged.
#[derive(Default)]
pub(super) struct FaultLog {
    pub(super) counts: FaultCounts,
    logged_at: [Option<Instant>; Fault::COUNT],
    /// Counted since the last log line.
    unlogged: [u64; Fault::COUNT],
}

impl FaultLog {
    /// Counts `n` of `fault`. If a log line is due, returns how many went unlogged
    /// before these.
    pub(super) fn record(&mut self, fault: Fault, n: u64, now: Instant) -> Option<u64> {
        let i = fault.index();
        self.counts.add(fault, n);
        let due = self.logged_at[i].is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
        if due {
            self.logged_at[i] = Some(now);
            Some(std::mem::take(&mut self.unlogged[i]))
        } else {
            self.unlogged[i] += n;
            None
        }
    }
}
