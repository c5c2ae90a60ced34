//! Why a peer's frame is refused ([`Reject`]) and why one of ours cannot be sent
//! ([`WireError`]): the two error types of the codec, in one place because every
//! other part of it returns them and the metrics label them.

use std::net::{IpAddr, SocketAddr};

use super::NAME_MAX;

/// Why a peer's frame was refused, one label per reason for
/// `apilb_sync_rejected_total{reason}` ([`Reject::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    /// The length is out of bounds, the type unknown (or not expected here), the body
    /// does not fit the type and count, or a handshake field is not valid.
    #[error("malformed frame")]
    Malformed,
    /// A protocol version other than [`VERSION`].
    ///
    /// [`VERSION`]: super::VERSION
    #[error("unknown protocol version")]
    Version,
    /// The tag does not verify: another key, another session, another direction, or
    /// a changed byte.
    #[error("frame fails authentication")]
    Auth,
    /// The sequence number is not the last one plus one: a replayed, reordered or
    /// lost frame.
    #[error("frame out of sequence")]
    Replay,
    /// The peer's [`Hello`] does not fit ours ([`Hello::check_peer`]).
    ///
    /// [`Hello`]: super::Hello
    /// [`Hello::check_peer`]: super::Hello::check_peer
    #[error("peer's sync configuration does not match ours")]
    ConfigMismatch,
    /// A record (or a VIP of a `BULK_REQUEST`) this version cannot use: unknown kind or
    /// family, mixed families, a state a synced flow cannot be in, or port 0. It is
    /// skipped and counted; the session stays up.
    #[error("flow record not usable")]
    BadRecord,
}

impl Reject {
    /// Every reason, e.g. to register each metric label up front.
    pub const ALL: [Reject; 6] = [
        Reject::Malformed,
        Reject::Version,
        Reject::Auth,
        Reject::Replay,
        Reject::ConfigMismatch,
        Reject::BadRecord,
    ];

    /// The metric and status label for this reason; stable.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Version => "version",
            Reject::Auth => "auth",
            Reject::Replay => "replay",
            Reject::ConfigMismatch => "config_mismatch",
            Reject::BadRecord => "bad_record",
        }
    }

    /// Whether the caller must close the connection: every reason but
    /// [`Reject::BadRecord`].
    pub fn closes_session(self) -> bool {
        self != Reject::BadRecord
    }
}

/// Why a message cannot be sent. Each is a bug in the caller, caught before a frame
/// the peer would refuse leaves this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("sync node name {name:?} is {len} bytes long; it must be 1 to {NAME_MAX} bytes")]
    NodeName { name: String, len: usize },
    #[error("a {kind} frame carries at most {max} entries, not {count}")]
    TooLarge {
        kind: &'static str,
        count: usize,
        max: usize,
    },
    #[error("flow record mixes address families: client {client}, {field} {addr}")]
    MixedFamilies {
        client: SocketAddr,
        field: &'static str,
        addr: IpAddr,
    },
    #[error("the system's random number generator failed")]
    Random,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_labels_are_stable_and_only_bad_records_keep_the_session() {
        let labels: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "version",
                "auth",
                "replay",
                "config_mismatch",
                "bad_record"
            ]
        );
        let closing: Vec<bool> = Reject::ALL.iter().map(|r| r.closes_session()).collect();
        assert_eq!(closing, [true, true, true, true, true, false]);
    }
}
