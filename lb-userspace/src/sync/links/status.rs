//! What `/status` and `/metrics` learn of the links: a snapshot per peer and link.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::FaultCounts;

/// Where a link is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Dialing (export links only).
    Connecting,
    /// Connected, handshake under way (export links only: an accepted connection is
    /// not a peer's until its handshake says which).
    Handshake,
    Up,
    /// No session: waiting to redial (export), or for the peer to dial (import).
    Down,
}

impl LinkState {
    /// The label of `apilb_sync_peer_state{state}`; stable.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Handshake => "handshake",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

/// Frames, bytes and flow records, one way on one link, over all its sessions and
/// their handshakes. Bytes are as on the wire, length fields included; records are
/// those of FLOWS and `BULK_CHUNK`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub frames: u64,
    pub bytes: u64,
    pub records: u64,
}

impl Traffic {
    pub(super) fn add(&mut self, other: Traffic) {
        self.frames += other.frames;
        self.bytes += other.bytes;
        self.records += other.records;
    }

    /// One frame of `bytes` (length field included) carrying `records`.
    pub(super) fn frame(bytes: u64, records: u64) -> Traffic {
        Traffic {
            frames: 1,
            bytes,
            records,
        }
    }
}

/// One link, for `/status` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub state: LinkState,
    /// Sessions that came up.
    pub sessions: u64,
    /// How long the oldest message sent and not yet acknowledged has waited; zero when
    /// everything sent is acknowledged.
    pub lag: Duration,
    /// Messages waiting in the queue.
    pub queued: usize,
    pub sent: Traffic,
    pub received: Traffic,
    /// Why the last session or attempt ended, if it did.
    pub last_error: Option<String>,
}

/// One peer, for `/status` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub export: LinkStatus,
    pub import: LinkStatus,
    /// An export to this peer was dropped: it needs a bulk
    /// ([`super::Links::take_resync`]).
    pub needs_resync: bool,
    /// Faults on both links.
    pub faults: FaultCounts,
}

/// Every peer, and the faults no peer can be blamed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinksStatus {
    pub peers: Vec<PeerStatus>,
    /// Connections from addresses that are no peer's (`unknown_peer`), and faults in
    /// handshakes from an address several peers share, before a name was proven.
    pub unattributed: FaultCounts,
}
