//! VIP ownership: which LB node holds each VIP, decided without another daemon.
//!
//! Several nodes run apilb for the same VIPs; exactly one of them must answer ARP
//! for a VIP and balance its connections. Each VIP has its own election (so two VIPs
//! with inverse priorities make an active-active pair), run by one of:
//!
//! - [`vrrp`]: VRRPv3 (RFC 5798) or VRRPv2 (RFC 3768) with keepalived's simple
//!   password, multicast or unicast, so apilb joins keepalived setups;
//! - [`etcd`]: a lease and a transaction on a key per VIP in etcd.
//!
//! An election reports changes as [`Ownership`] events to the daemon, which writes
//! the datapath's owned flag (through the reconciler) and has [`crate::announce`]
//! add or remove the address and announce it. Each also publishes an
//! [`ElectionState`] per VIP for `/status` and `/metrics`.

pub mod etcd;
pub mod vrrp;

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::sync::ready::Readiness;

/// This node gained or lost one VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub vip: IpAddr,
    pub owned: bool,
    /// Why, for the log: e.g. "master down timer expired", "lease acquired".
    pub reason: String,
}

/// What flow sync knows of another LB node (`crate::sync::ready`), which VRRP
/// weighs with its adverts: no preemption of a node whose flows this one does not
/// hold, and no yielding to one that does not hold this node's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSync {
    /// Every flow the peer owned when our session with it came up is installed
    /// here.
    pub have_theirs: bool,
    /// The peer has acknowledged every flow we own.
    pub they_have_mine: bool,
    /// Since our session with the peer last broke, this node has exported flows
    /// the peer has not had yet: we carried traffic it does not know of.
    pub pending: bool,
}

impl PeerSync {
    /// Nothing to wait for: sync is off, or the sender is no sync peer.
    pub const IN_SYNC: Self = Self {
        have_theirs: true,
        they_have_mine: true,
        pending: false,
    };
}

/// A sync peer whose apilb process is gone: both its sync sessions with this
/// node were closed by its end without a GOODBYE, which a killed or crashed
/// process does at once (its kernel closes the sockets), while a cut cable or a
/// hung process closes nothing. The elections take this as the owner's
/// resignation: VRRP as a priority-0 advert from it, etcd by revoking its lease,
/// so the VIP moves without waiting for a timeout. `seq` counts departures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Departed {
    pub seq: u64,
    /// Its `[[sync.peer]] name` (the same as its `election.etcd.node`).
    pub name: String,
    /// Its sync address's IP (the one it sends VRRP adverts from).
    pub addr: Option<IpAddr>,
    /// When its sessions closed: word older than [`DEPARTURE_FRESH`] is not
    /// acted on (a node may have come back and won the VIP since).
    pub at: Option<std::time::Instant>,
}

/// How long word of a departure may be acted on.
pub const DEPARTURE_FRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// What flow sync tells the elections (`crate::sync::ready`).
#[derive(Clone, Debug)]
pub struct SyncSignals {
    pub readiness: watch::Receiver<Readiness>,
    pub departed: watch::Receiver<Departed>,
}

/// Resolves with the next departure `departed` reports, while it is fresh (an
/// election busy elsewhere, an etcd session reconnecting, may see it late);
/// never without sync.
pub async fn next_departure(departed: &mut Option<watch::Receiver<Departed>>) -> Departed {
    while let Some(rx) = departed
        && rx.changed().await.is_ok()
    {
        let d = rx.borrow_and_update().clone();
        if d.at.is_some_and(|t| t.elapsed() <= DEPARTURE_FRESH) {
            return d;
        }
    }
    // No sync, or the sync thread is gone: nothing more will depart.
    *departed = None;
    std::future::pending().await
}

/// One VIP's election as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionState {
    /// "vrrp" or "etcd".
    pub mode: String,
    /// vrrp: "initialize", "backup" or "master"; etcd: "candidate", "owner" or
    /// "cut off".
    pub state: String,
    pub owned: bool,
    /// vrrp: the priority this node advertises now (tracking applied).
    pub priority: Option<u32>,
    /// Ownership changes so far.
    pub transitions: u64,
    /// Why the last change happened.
    pub reason: String,
    /// vrrp: why this node does not preempt the master yet, though it would
    /// (flow sync: the master's flows are not all installed here); empty if not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub held: String,
    /// vrrp: adverts refused, by reason ("ttl", "checksum", "auth", "vrid", "peer",
    /// "interval", "version", "malformed", "addresses").
    pub rejected: BTreeMap<String, u64>,
}
