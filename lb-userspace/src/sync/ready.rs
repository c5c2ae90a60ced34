//! Which peers this node is in sync with, for the elections. A node that takes a
//! VIP by preemption before it holds the owner's flows resets them all (loxilb
//! #565), and a master that yields to a rival that does not hold its flows does
//! the same from the other side. So VRRP asks, of an advert's sender:
//!
//! - **have theirs**: our import session from it is up and has received a whole
//!   bulk (`BULK_END`) since it came up, so every flow the peer owned then is
//!   installed here, and live records keep it so;
//! - **they have mine**: our export session to it is up, we have queued it a
//!   whole bulk since, and it has acknowledged the bulk's end, with no export to
//!   it dropped since (live records keep it so, as for the other side).
//!
//! No timeout lifts the hold: loxilb's (90 s) is how #565 comes back. A peer
//! that never syncs keeps its VIP until it dies, which any node may then take.
//!
//! It also tells the elections when a peer's process is gone ([`Departed`]):
//! both sessions with it closed by its end, as its kernel does when it dies.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::info;

use super::{
    links::{Inbound, Link, LinkState, LinksStatus},
    wire::Message,
};
use crate::election::{Departed, PeerSync};

/// What is known of each sync peer, by its address.
pub type Readiness = BTreeMap<IpAddr, PeerSync>;

/// What an advert from `src` may be trusted with: a sender that is no sync peer
/// (keepalived sharing the VRID, or sync off) is in sync by definition, since
/// there is nothing to wait for.
#[must_use]
pub fn of(readiness: &Readiness, src: IpAddr) -> PeerSync {
    readiness.get(&src).copied().unwrap_or(PeerSync::IN_SYNC)
}

/// Both sessions with a peer closed by its end within this long: its process
/// is gone ([`Departed`]).
const DEPARTURE_WINDOW: Duration = Duration::from_secs(2);
/// An export unacknowledged this long says the peer is not keeping up with
/// our flows (ACKs come within 50 ms of a record on a working link).
const LAGGING: Duration = Duration::from_millis(500);
/// A publish tick (every 100 ms) this late means the sync thread stalled.
const STALL: Duration = Duration::from_secs(1);
/// After a stall, how long peers' closes are put down to it: their silence
/// timeout (3 s) may fire a little after we resume.
const SILENCE_GRACE: Duration = Duration::from_secs(5);

/// Follows the sessions and bulks, and publishes [`Readiness`] and
/// [`Departed`].
pub struct Tracker {
    /// Peers whose bulk to us ended on the current import session.
    bulk_in: HashSet<Arc<str>>,
    /// The generation of the bulk asked of each peer on the current import
    /// session: only its end completes the import (an end left in the peer's
    /// queue by an earlier session, its chunks lost with it, does not).
    asked: HashMap<Arc<str>, u32>,
    /// Peers we queued a whole bulk for on the current export session, with the
    /// ticket of its end (`Links::last_queued`).
    bulk_out: HashMap<Arc<str>, u64>,
    /// The last export queued for each peer when our export session with it
    /// broke: anything queued after is what it lacks of ours, until a bulk of
    /// ours is acknowledged.
    broke_at: HashMap<Arc<str>, u64>,
    tx: watch::Sender<Readiness>,
    /// When each peer's end last closed each of our links with it (export,
    /// import).
    closed: HashMap<Arc<str>, [Option<Instant>; 2]>,
    /// Each peer's address, from the last status.
    addrs: HashMap<Arc<str>, IpAddr>,
    departed: watch::Sender<Departed>,
    /// The last [`Tracker::publish`] (every 100 ms while the thread runs).
    last_publish: Option<Instant>,
    /// Until when sessions closed by peers are blamed on our own stall.
    stalled_until: Option<Instant>,
}

impl Tracker {
    /// A tracker that knows nothing yet (no peer in sync), and its receivers.
    #[must_use]
    pub fn new() -> (Self, watch::Receiver<Readiness>, watch::Receiver<Departed>) {
        let (tx, rx) = watch::channel(Readiness::new());
        let (departed, departed_rx) = watch::channel(Departed::default());
        let t = Self {
            bulk_in: HashSet::new(),
            asked: HashMap::new(),
            bulk_out: HashMap::new(),
            broke_at: HashMap::new(),
            tx,
            closed: HashMap::new(),
            addrs: HashMap::new(),
            departed,
            last_publish: None,
            stalled_until: None,
        };
        (t, rx, departed_rx)
    }

    /// A session coming or going starts its link over; a `BULK_END` completes
    /// the import; both links closed by the peer's end make it departed.
    pub fn on_inbound(&mut self, event: &Inbound) {
        match event {
            Inbound::Connected { peer, link } => {
                self.set(*link, peer, false);
                self.closed.remove(peer);
            }
            Inbound::Disconnected { peer, link, closed } => {
                self.set(*link, peer, false);
                if *closed {
                    self.closed_by_peer(peer, *link);
                }
            }
            Inbound::Message {
                peer,
                message: Message::BulkEnd { generation, .. },
            } => {
                if self.asked.get(peer) == Some(generation) {
                    self.set(Link::Import, peer, true);
                }
            }
            Inbound::Message { .. } => {}
        }
    }

    /// We asked `peer` for the bulk of `generation`.
    pub fn expect_bulk(&mut self, peer: &Arc<str>, generation: u32) {
        self.asked.insert(Arc::clone(peer), generation);
    }

    /// Our export session with `peer` broke, the last export queued for it
    /// then having `ticket` (kept from the first break until a bulk of ours is
    /// acknowledged).
    pub fn export_broke(&mut self, peer: &Arc<str>, ticket: u64) {
        self.broke_at.entry(Arc::clone(peer)).or_insert(ticket);
    }

    /// A whole bulk went into `peer`'s export queue, its end with `ticket`.
    pub fn bulk_sent(&mut self, peer: &Arc<str>, ticket: u64) {
        self.bulk_out.insert(Arc::clone(peer), ticket);
    }

    fn closed_by_peer(&mut self, peer: &Arc<str>, link: Link) {
        let now = Instant::now();
        // A peer closes our sessions too when it has heard nothing from us for
        // its silence timeout: that says our thread stalled, not that it died.
        if self.stalled(now) {
            info!(%peer, "flow sync: a session closed by the peer while this node's sync thread was stalled: not taken for the peer's death");
            self.closed.remove(peer);
            return;
        }
        let times = self.closed.entry(Arc::clone(peer)).or_default();
        times[usize::from(link == Link::Import)] = Some(now);
        let both = times
            .iter()
            .all(|t| t.is_some_and(|t| now.duration_since(t) <= DEPARTURE_WINDOW));
        if !both {
            return;
        }
        self.closed.remove(peer);
        let addr = self.addrs.get(peer).copied();
        info!(%peer, "flow sync: both sessions closed by the peer's end: its apilb is gone");
        self.departed.send_modify(|d| {
            d.seq += 1;
            peer.as_ref().clone_into(&mut d.name);
            d.addr = addr;
            d.at = Some(now);
        });
    }

    /// Whether this node's sync thread has just been stalled (its publish tick
    /// came late), or is now.
    fn stalled(&self, now: Instant) -> bool {
        self.last_publish
            .is_some_and(|t| now.duration_since(t) > STALL)
            || self.stalled_until.is_some_and(|u| now < u)
    }

    fn set(&mut self, link: Link, peer: &Arc<str>, done: bool) {
        match (link, done) {
            (Link::Import, true) => {
                self.bulk_in.insert(Arc::clone(peer));
            }
            (Link::Import, false) => {
                self.bulk_in.remove(peer);
                self.asked.remove(peer);
            }
            (Link::Export, _) => {
                self.bulk_out.remove(peer);
            }
        }
    }

    /// Publish what `status` (the links now), the bulks, `acknowledged` (the
    /// peer has acknowledged the export with this ticket, `Links::acknowledged`)
    /// and `queued` (the last export queued for the peer, `Links::last_queued`)
    /// say, if it changed.
    pub fn publish(
        &mut self,
        status: &LinksStatus,
        acknowledged: impl Fn(&str, u64) -> bool,
        queued: impl Fn(&str) -> u64,
    ) {
        let now = Instant::now();
        if self
            .last_publish
            .is_some_and(|t| now.duration_since(t) > STALL)
        {
            self.stalled_until = Some(now + SILENCE_GRACE);
        }
        self.last_publish = Some(now);
        for p in &status.peers {
            self.addrs.insert(Arc::clone(&p.name), p.addr.ip());
        }
        let now: Readiness = status
            .peers
            .iter()
            .map(|p| {
                // A live record waiting long for its ACK (a cable cut too short
                // to break the session) is one the peer lacks.
                let they_have_mine = p.export.state == LinkState::Up
                    && p.export.lag < LAGGING
                    && self
                        .bulk_out
                        .get(&p.name)
                        .is_some_and(|t| acknowledged(&p.name, *t));
                if they_have_mine {
                    self.broke_at.remove(&p.name);
                }
                let sync = PeerSync {
                    have_theirs: p.import.state == LinkState::Up && self.bulk_in.contains(&p.name),
                    they_have_mine,
                    pending: p.needs_resync
                        || self
                            .broke_at
                            .get(&p.name)
                            .is_some_and(|t| queued(&p.name) > *t),
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
            Inbound::Disconnected {
                peer,
                link,
                closed: false,
            }
        }
    }

    #[test]
    fn a_peer_is_in_sync_only_after_a_whole_bulk_on_the_session_that_is_up() {
        use LinkState::{Down, Up};
        let (mut t, rx, _) = Tracker::new();
        // The peer has acknowledged our exports up to ticket `acked`.
        let now = |t: &mut Tracker, s: &LinksStatus, acked: u64| {
            t.publish(s, |_, ticket| acked >= ticket, |_| 9);
            of(&rx.borrow(), PEER)
        };
        let none = PeerSync::default();
        t.on_inbound(&event(Link::Import, true));
        t.on_inbound(&event(Link::Export, true));
        assert_eq!(now(&mut t, &status(Up, Up, 0), 7), none);
        // We ask for bulk 5. An end left from an earlier session, or of a bulk
        // sent unasked, does not complete it; its own end does.
        t.expect_bulk(&"lb2".into(), 5);
        let end = |generation| Inbound::Message {
            peer: "lb2".into(),
            message: Message::BulkEnd {
                generation,
                count: 3,
            },
        };
        for stale in [4, 0] {
            t.on_inbound(&end(stale));
            assert_eq!(now(&mut t, &status(Up, Up, 0), 7), none);
        }
        t.on_inbound(&end(5));
        let theirs = PeerSync {
            have_theirs: true,
            they_have_mine: false,
            pending: false,
        };
        assert_eq!(now(&mut t, &status(Up, Up, 0), 7), theirs);
        // Ours is queued, its end with ticket 7: not yet acknowledged, then it
        // is (later live records in flight do not matter).
        t.bulk_sent(&"lb2".into(), 7);
        assert_eq!(now(&mut t, &status(Up, Up, 0), 6), theirs);
        assert_eq!(now(&mut t, &status(Up, Up, 0), 7), PeerSync::IN_SYNC);
        // A session that drops starts over, even once it is back.
        assert!(!now(&mut t, &status(Down, Up, 0), 7).have_theirs);
        t.on_inbound(&event(Link::Import, false));
        t.on_inbound(&event(Link::Import, true));
        assert!(!now(&mut t, &status(Up, Up, 0), 7).have_theirs);
        t.on_inbound(&event(Link::Export, false));
        assert_eq!(now(&mut t, &status(Up, Up, 0), 7), none);
        // A sender that is no sync peer has nothing to wait for.
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 4));
        assert_eq!(of(&rx.borrow(), other), PeerSync::IN_SYNC);
    }

    #[test]
    fn a_peer_whose_end_closes_both_sessions_has_departed_and_one_session_is_not_enough() {
        let (mut t, _, departed) = Tracker::new();
        t.publish(&status(LinkState::Up, LinkState::Up, 0), |_, _| true, |_| 0);
        let closed = |link| Inbound::Disconnected {
            peer: "lb2".into(),
            link,
            closed: true,
        };
        // One session closed by the peer (it gave up on it): nothing more.
        t.on_inbound(&closed(Link::Export));
        assert_eq!(departed.borrow().seq, 0);
        // A timeout on the other (a cut cable) is not its end closing it.
        t.on_inbound(&event(Link::Import, false));
        assert_eq!(departed.borrow().seq, 0);
        // Back, then both closed at once: its process is gone.
        t.on_inbound(&event(Link::Export, true));
        t.on_inbound(&closed(Link::Import));
        assert_eq!(departed.borrow().seq, 0);
        t.on_inbound(&closed(Link::Export));
        let d = departed.borrow().clone();
        assert_eq!(
            (d.seq, d.name.as_str(), d.addr, d.at.is_some()),
            (1, "lb2", Some(PEER), true)
        );
    }

    #[test]
    fn sessions_closed_by_a_peer_after_this_node_stalled_are_no_departure() {
        let (mut t, _, departed) = Tracker::new();
        let up = status(LinkState::Up, LinkState::Up, 0);
        t.publish(&up, |_, _| true, |_| 0);
        // The thread was held up past the peer's patience; the peer closed both.
        std::thread::sleep(STALL + Duration::from_millis(100));
        t.publish(&up, |_, _| true, |_| 0);
        for link in [Link::Export, Link::Import] {
            t.on_inbound(&Inbound::Disconnected {
                peer: "lb2".into(),
                link,
                closed: true,
            });
        }
        assert_eq!(departed.borrow().seq, 0);
    }

    #[test]
    fn flows_exported_after_the_session_broke_are_pending_until_a_bulk_is_acknowledged() {
        use LinkState::{Down, Up};
        let (mut t, rx, _) = Tracker::new();
        let pending = |t: &mut Tracker, s: &LinksStatus, queued: u64, acked: u64| {
            t.publish(s, |_, ticket| acked >= ticket, |_| queued);
            of(&rx.borrow(), PEER).pending
        };
        assert!(!pending(&mut t, &status(Up, Up, 0), 10, 10));
        t.export_broke(&"lb2".into(), 10);
        // Nothing new since the break: the peer lacks nothing of ours.
        assert!(!pending(&mut t, &status(Up, Down, 0), 10, 10));
        // New flows while cut off; a second break keeps the first mark.
        assert!(pending(&mut t, &status(Up, Down, 0), 14, 10));
        t.export_broke(&"lb2".into(), 14);
        assert!(pending(&mut t, &status(Up, Down, 0), 14, 10));
        // Back: our bulk (ticket 20) acknowledged, nothing pending any more.
        t.on_inbound(&event(Link::Export, true));
        t.bulk_sent(&"lb2".into(), 20);
        assert!(pending(&mut t, &status(Up, Up, 0), 20, 19));
        assert!(!pending(&mut t, &status(Up, Up, 0), 20, 20));
    }
}
