//! Which peers this node is in sync with, for the elections. A node that takes a
//! VIP by preemption before it holds the owner's flows resets them all (loxilb
//! #565), and a master that yields to a rival that does not hold its flows does
//! the same from the other side. So VRRP asks, of an advert's sender:
//!
//! - **have theirs**: our import session from it is up and has received a whole
//!   bulk (`BULK_END`) since it came up, so every flow the peer owned then is
//!   installed here, and live records keep it so;
//! - **they have mine**: our export session to it is up, we have sent it a whole
//!   bulk since, and it has acknowledged everything we sent.
//!
//! No timeout lifts the hold: loxilb's (90 s) is how #565 comes back. A peer
//! that never syncs keeps its VIP until it dies, which any node may then take.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use tokio::sync::watch;

use super::{
    links::{Inbound, Link, LinkState, LinksStatus},
    wire::Message,
};
use crate::election::PeerSync;

/// What is known of each sync peer, by its address.
pub type Readiness = BTreeMap<IpAddr, PeerSync>;

/// What an advert from `src` may be trusted with: a sender that is no sync peer
/// (keepalived sharing the VRID, or sync off) is in sync by definition, since
/// there is nothing to wait for.
#[must_use]
pub fn of(readiness: &Readiness, src: IpAddr) -> PeerSync {
    readiness.get(&src).copied().unwrap_or(PeerSync::IN_SYNC)
}

/// Follows the sessions and bulks, and publishes [`Readiness`].
pub struct Tracker {
    /// Peers whose bulk to us ended on the current import session.
    bulk_in: HashSet<Arc<str>>,
    /// Peers we sent a whole bulk on the current export session.
    bulk_out: HashSet<Arc<str>>,
    tx: watch::Sender<Readiness>,
}

impl Tracker {
    /// A tracker that knows nothing yet (no peer in sync), and its receiver.
    #[must_use]
    pub fn new() -> (Self, watch::Receiver<Readiness>) {
        let (tx, rx) = watch::channel(Readiness::new());
        let t = Self {
            bulk_in: HashSet::new(),
            bulk_out: HashSet::new(),
            tx,
        };
        (t, rx)
    }

    /// A session coming or going starts its link over; a `BULK_END` completes
    /// the import.
    pub fn on_inbound(&mut self, event: &Inbound) {
        match event {
            Inbound::Connected { peer, link } | Inbound::Disconnected { peer, link } => {
                self.set(*link, peer, false);
            }
            Inbound::Message {
                peer,
                message: Message::BulkEnd { .. },
            } => self.set(Link::Import, peer, true),
            Inbound::Message { .. } => {}
        }
    }

    /// A whole bulk went into `peer`'s export queue.
    pub fn bulk_sent(&mut self, peer: &Arc<str>) {
        self.set(Link::Export, peer, true);
    }

    fn set(&mut self, link: Link, peer: &Arc<str>, done: bool) {
        let set = match link {
            Link::Import => &mut self.bulk_in,
            Link::Export => &mut self.bulk_out,
        };
        if done {
            set.insert(Arc::clone(peer));
        } else {
            set.remove(peer);
        }
    }

    /// Publish what `status` (the links now) and the bulks say, if it changed.
    pub fn publish(&self, status: &LinksStatus) {
        let now: Readiness = status
            .peers
            .iter()
            .map(|p| {
                let sync = PeerSync {
                    have_theirs: p.import.state == LinkState::Up && self.bulk_in.contains(&p.name),
                    they_have_mine: p.export.state == LinkState::Up
                        && self.bulk_out.contains(&p.name)
                        && p.export.queued == 0
                        && p.export.lag.is_zero(),
                };
                (p.addr.ip(), sync)
            })
            .collect();
        self.tx.send_if_modified(|r| {
            let changed = *r != now;
            *r = now;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr},
        time::Duration,
    };

    use super::*;
    use crate::sync::links::{FaultCounts, LinkStatus, PeerStatus, Traffic};

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));

    fn link(state: LinkState, lag_ms: u64) -> LinkStatus {
        LinkStatus {
            state,
            sessions: 1,
            lag: Duration::from_millis(lag_ms),
            queued: 0,
            sent: Traffic::default(),
            received: Traffic::default(),
            last_error: None,
        }
    }

    fn status(import: LinkState, export: LinkState, lag_ms: u64) -> LinksStatus {
        LinksStatus {
            peers: vec![PeerStatus {
                name: "lb2".into(),
                addr: SocketAddr::new(PEER, 9465),
                export: link(export, lag_ms),
                import: link(import, 0),
                needs_resync: false,
                faults: FaultCounts::default(),
            }],
            unattributed: FaultCounts::default(),
        }
    }

    fn event(link: Link, up: bool) -> Inbound {
        let peer: Arc<str> = "lb2".into();
        if up {
            Inbound::Connected { peer, link }
        } else {
            Inbound::Disconnected { peer, link }
        }
    }

    #[test]
    fn a_peer_is_in_sync_only_after_a_whole_bulk_on_the_session_that_is_up() {
        use LinkState::{Down, Up};
        let (mut t, rx) = Tracker::new();
        let now = |t: &Tracker, s: &LinksStatus| {
            t.publish(s);
            of(&rx.borrow(), PEER)
        };
        let none = PeerSync::default();
        t.on_inbound(&event(Link::Import, true));
        t.on_inbound(&event(Link::Export, true));
        assert_eq!(now(&t, &status(Up, Up, 0)), none);
        // Their bulk ends: we hold their flows.
        t.on_inbound(&Inbound::Message {
            peer: "lb2".into(),
            message: Message::BulkEnd {
                generation: 0,
                count: 3,
            },
        });
        let theirs = PeerSync {
            have_theirs: true,
            they_have_mine: false,
        };
        assert_eq!(now(&t, &status(Up, Up, 0)), theirs);
        // Ours is sent, but not yet acknowledged; then it is.
        t.bulk_sent(&"lb2".into());
        assert_eq!(now(&t, &status(Up, Up, 20)), theirs);
        assert_eq!(now(&t, &status(Up, Up, 0)), PeerSync::IN_SYNC);
        // A session that drops starts over, even once it is back.
        assert!(!now(&t, &status(Down, Up, 0)).have_theirs);
        t.on_inbound(&event(Link::Import, false));
        t.on_inbound(&event(Link::Import, true));
        assert!(!now(&t, &status(Up, Up, 0)).have_theirs);
        t.on_inbound(&event(Link::Export, false));
        assert_eq!(now(&t, &status(Up, Up, 0)), none);
        // A sender that is no sync peer has nothing to wait for.
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 4));
        assert_eq!(of(&rx.borrow(), other), PeerSync::IN_SYNC);
    }
}
