//! The membership: which masters the controller balances over, from the static
//! `[[backend]]` list and the slices discovery offers, and the rule that keeps a
//! bad slice from taking healthy masters out. Pure (time comes in as an argument),
//! so the rule is unit-tested here; the daemon feeds it and the controller reads
//! its output as the backend list.
//!
//! - Until a slice is accepted, the members are the static list.
//! - An accepted slice replaces the members of each address family it lists
//!   (families it does not list keep their static masters). A master that is new
//!   **joins** with weight 0, so it holds no Maglev slot, even failing open,
//!   until apilb's own probes see it ready once; then it is a member like any.
//! - A master the slice no longer lists is **leaving**: weight 0 (no new flows),
//!   its established flows kept until it goes down or `discovery.hold` passes,
//!   then it is gone. Listed again meanwhile, it is a member again at once.
//! - **The rule.** An update that would leave fewer than half (rounded up) of
//!   the members the probes see ready is refused (`healthy_dropped`) and held:
//!   it is offered again at each health change, and taken once enough of the
//!   masters it drops have stopped passing their probes. So a slice dropping to
//!   one master while three pass is refused, one master leaving of three is
//!   taken (it drains), and the last ready master is never removed by a slice.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_common::MAX_BACKENDS;

use super::slice::Refusal;
use crate::{config::BackendSettings, health::Health};

/// Where a member comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The `[[backend]]` list.
    Static,
    /// The slice alone.
    Discovered,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Discovered => "discovered",
        }
    }
}

/// Where a member stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Balanced over as its health allows.
    Member,
    /// Discovered, not yet seen ready by the probes: no slots.
    Joining,
    /// No longer in the slice: no new flows, its flows kept for the hold time.
    Leaving,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Joining => "joining",
            Self::Leaving => "leaving",
        }
    }
}

/// One master as the controller gets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub settings: BackendSettings,
    pub source: Source,
    pub stage: Stage,
}

/// What an offered slice came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Taken; the members changed or not.
    Accepted { changed: bool },
    /// Refused, the members unchanged.
    Refused(Refusal),
}

#[derive(Debug)]
pub struct Membership {
    statics: Vec<BackendSettings>,
    hold: Duration,
    /// The last accepted slice's masters; `None` before the first.
    accepted: Option<BTreeSet<SocketAddr>>,
    /// A set refused for `healthy_dropped`, offered again at health changes.
    held: Option<BTreeSet<SocketAddr>>,
    /// Masters that left the slice, since when.
    leaving: BTreeMap<SocketAddr, Instant>,
    /// Discovered masters seen ready since they joined.
    proven: BTreeSet<SocketAddr>,
    refusals: BTreeMap<Refusal, u64>,
}

impl Membership {
    #[must_use]
    pub fn new(statics: Vec<BackendSettings>, hold: Duration) -> Self {
        Self {
            statics,
            hold,
            accepted: None,
            held: None,
            leaving: BTreeMap::new(),
            proven: BTreeSet::new(),
            refusals: Refusal::ALL.into_iter().map(|r| (r, 0)).collect(),
        }
    }

    /// A reload's static list: the bootstrap set, and the weights of the
    /// masters it names.
    pub fn set_statics(&mut self, statics: Vec<BackendSettings>) {
        self.statics = statics;
    }

    /// Whether a slice has been accepted since start.
    pub fn synced(&self) -> bool {
        self.accepted.is_some()
    }

    /// Whether a slice refused for `healthy_dropped` waits to be offered again.
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// Refusals so far, every reason from 0.
    pub fn refusals(&self) -> &BTreeMap<Refusal, u64> {
        &self.refusals
    }

    /// A slice that failed its own checks (`crate::discovery::slice`).
    pub fn refuse(&mut self, why: Refusal) {
        *self.refusals.entry(why).or_default() += 1;
    }

    fn static_of(&self, addr: SocketAddr) -> Option<&BackendSettings> {
        self.statics.iter().find(|b| b.addr == addr)
    }

    /// The members, in address order.
    #[must_use]
    pub fn members(&self) -> Vec<Member> {
        let Some(accepted) = &self.accepted else {
            return self
                .statics
                .iter()
                .map(|b| Member {
                    settings: *b,
                    source: Source::Static,
                    stage: Stage::Member,
                })
                .collect();
        };
        let covers = |a: &SocketAddr| accepted.iter().any(|m| m.is_ipv4() == a.is_ipv4());
        let mut out: BTreeMap<SocketAddr, Member> = BTreeMap::new();
        for b in self.statics.iter().filter(|b| !covers(&b.addr)) {
            out.insert(
                b.addr,
                Member {
                    settings: *b,
                    source: Source::Static,
                    stage: Stage::Member,
                },
            );
        }
        for &addr in accepted {
            let proven = self.proven.contains(&addr);
            let m = self.static_of(addr).map_or(
                Member {
                    settings: BackendSettings {
                        addr,
                        weight: u32::from(proven),
                        local: false,
                    },
                    source: Source::Discovered,
                    stage: if proven {
                        Stage::Member
                    } else {
                        Stage::Joining
                    },
                },
                |b| Member {
                    settings: *b,
                    source: Source::Static,
                    stage: Stage::Member,
                },
            );
            out.insert(addr, m);
        }
        for &addr in self.leaving.keys() {
            let (settings, source) = match self.static_of(addr) {
                Some(b) => (*b, Source::Static),
                None => (
                    BackendSettings {
                        addr,
                        weight: 0,
                        local: false,
                    },
                    Source::Discovered,
                ),
            };
            out.entry(addr).or_insert(Member {
                settings: BackendSettings {
                    weight: 0,
                    ..settings
                },
                source,
                stage: Stage::Leaving,
            });
        }
        // The datapath holds at most MAX_BACKENDS - 1 backends; the excess (a
        // slice that long is itself suspect) is left out, leaving ones first.
        let mut members: Vec<Member> = out.into_values().collect();
        members.sort_by_key(|m| (m.stage == Stage::Leaving, m.settings.addr));
        members.truncate(MAX_BACKENDS as usize - 1);
        members.sort_by_key(|m| m.settings.addr);
        members
    }

    /// Offer the masters a slice lists (already past its own checks).
    pub fn offer(
        &mut self,
        set: BTreeSet<SocketAddr>,
        health: &HashMap<SocketAddr, Health>,
        now: Instant,
    ) -> Offer {
        if !self.keeps_enough(&set, health) {
            self.refuse(Refusal::HealthyDropped);
            self.held = Some(set);
            return Offer::Refused(Refusal::HealthyDropped);
        }
        self.held = None;
        Offer::Accepted {
            changed: self.accept(set, now),
        }
    }

    /// Whether `set` keeps at least half (rounded up) of the members of its
    /// families that the probes see ready.
    fn keeps_enough(
        &self,
        set: &BTreeSet<SocketAddr>,
        health: &HashMap<SocketAddr, Health>,
    ) -> bool {
        let ready: Vec<SocketAddr> = self
            .members()
            .into_iter()
            .filter(|m| m.stage == Stage::Member)
            .map(|m| m.settings.addr)
            .filter(|a| set.iter().any(|s| s.is_ipv4() == a.is_ipv4()))
            .filter(|a| health.get(a) == Some(&Health::Ready))
            .collect();
        let kept = ready.iter().filter(|a| set.contains(a)).count();
        kept * 2 >= ready.len()
    }

    fn accept(&mut self, set: BTreeSet<SocketAddr>, now: Instant) -> bool {
        let before = self.members();
        for m in &before {
            let of_family = set.iter().any(|s| s.is_ipv4() == m.settings.addr.is_ipv4());
            if of_family && !set.contains(&m.settings.addr) && m.stage != Stage::Leaving {
                self.leaving.insert(m.settings.addr, now);
            }
        }
        self.leaving.retain(|a, _| !set.contains(a));
        self.proven.retain(|a| set.contains(a));
        self.accepted = Some(set);
        self.members() != before
    }

    /// The probes' verdicts changed: joining masters seen ready become members,
    /// and a held slice is offered again. Returns whether the members changed.
    pub fn observe(&mut self, health: &HashMap<SocketAddr, Health>, now: Instant) -> bool {
        let before = self.members();
        for m in &before {
            if m.stage == Stage::Joining && health.get(&m.settings.addr) == Some(&Health::Ready) {
                self.proven.insert(m.settings.addr);
            }
        }
        if let Some(held) = self.held.take() {
            if self.keeps_enough(&held, health) {
                self.accept(held, now);
            } else {
                self.held = Some(held);
            }
        }
        self.members() != before
    }

    /// Leaving masters whose hold has passed are gone. Returns whether any was.
    pub fn expire(&mut self, now: Instant) -> bool {
        let hold = self.hold;
        let n = self.leaving.len();
        self.leaving
            .retain(|_, since| now.duration_since(*since) < hold);
        self.leaving.len() != n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "10.0.0.11:6443";
    const B: &str = "10.0.0.12:6443";
    const C: &str = "10.0.0.13:6443";
    const D: &str = "10.0.0.14:6443";
    const HOLD: Duration = Duration::from_mins(1);

    fn sa(a: &str) -> SocketAddr {
        a.parse().unwrap()
    }

    fn set(addrs: &[&str]) -> BTreeSet<SocketAddr> {
        addrs.iter().map(|a| sa(a)).collect()
    }

    fn ready(addrs: &[&str]) -> HashMap<SocketAddr, Health> {
        addrs.iter().map(|a| (sa(a), Health::Ready)).collect()
    }

    fn statics(addrs: &[&str]) -> Membership {
        Membership::new(
            addrs
                .iter()
                .map(|a| BackendSettings {
                    addr: sa(a),
                    weight: 1,
                    local: false,
                })
                .collect(),
            HOLD,
        )
    }

    /// (address, weight, stage) of each member.
    fn view(m: &Membership) -> Vec<(String, u32, &'static str)> {
        m.members()
            .iter()
            .map(|m| {
                (
                    m.settings.addr.to_string(),
                    m.settings.weight,
                    m.stage.label(),
                )
            })
            .collect()
    }

    #[test]
    fn a_new_master_joins_without_slots_until_its_probes_pass() {
        let mut m = statics(&[A, B, C]);
        let t0 = Instant::now();
        assert_eq!(
            m.offer(set(&[A, B, C, D]), &ready(&[A, B, C]), t0),
            Offer::Accepted { changed: true }
        );
        assert_eq!(view(&m)[3], (D.to_owned(), 0, "joining"));
        assert_eq!(m.members()[3].source, Source::Discovered);
        assert!(!m.observe(&ready(&[A, B, C]), t0), "not ready yet");
        assert!(m.observe(&ready(&[A, B, C, D]), t0));
        assert_eq!(view(&m)[3], (D.to_owned(), 1, "member"));
        assert_eq!(m.members()[0].source, Source::Static);
    }

    #[test]
    fn a_master_that_leaves_drains_for_the_hold_time_then_goes() {
        let mut m = statics(&[A, B, C]);
        let t0 = Instant::now();
        assert_eq!(
            m.offer(set(&[A, B]), &ready(&[A, B, C]), t0),
            Offer::Accepted { changed: true }
        );
        assert_eq!(view(&m)[2], (C.to_owned(), 0, "leaving"));
        assert!(!m.expire(t0 + HOLD / 2));
        assert!(m.expire(t0 + HOLD));
        assert_eq!(view(&m).len(), 2);
        // Listed again while leaving: a member at once, and no longer leaving.
        let mut m = statics(&[A, B, C]);
        m.offer(set(&[A, B]), &ready(&[A, B, C]), t0);
        m.offer(set(&[A, B, C]), &ready(&[A, B, C]), t0);
        assert_eq!(view(&m)[2], (C.to_owned(), 1, "member"));
        assert!(!m.expire(t0 + HOLD * 2));
    }

    #[test]
    fn a_drop_to_one_of_three_ready_masters_is_refused_and_held_until_they_fail() {
        let mut m = statics(&[A, B, C]);
        let t0 = Instant::now();
        let all = ready(&[A, B, C]);
        assert_eq!(
            m.offer(set(&[A]), &all, t0),
            Offer::Refused(Refusal::HealthyDropped)
        );
        assert_eq!(m.refusals()[&Refusal::HealthyDropped], 1);
        assert!(view(&m).iter().all(|(_, w, s)| *w == 1 && *s == "member"));
        // One of the dropped two stops passing: still one kept of two ready.
        let mut h = ready(&[A, C]);
        h.insert(sa(B), Health::NotReady);
        assert!(m.observe(&h, t0), "1 of 2 ready kept: taken now");
        assert_eq!(view(&m)[1], (B.to_owned(), 0, "leaving"));
        assert_eq!(m.refusals()[&Refusal::HealthyDropped], 1, "counted once");
    }

    #[test]
    fn the_last_ready_master_is_never_removed_by_a_slice() {
        let mut m = statics(&[A, B]);
        let t0 = Instant::now();
        let mut h = ready(&[A]);
        h.insert(sa(B), Health::Down);
        assert_eq!(
            m.offer(set(&[B]), &h, t0),
            Offer::Refused(Refusal::HealthyDropped)
        );
        // While none is ready the slice is trusted.
        assert_eq!(
            m.offer(set(&[B]), &ready(&[]), t0),
            Offer::Accepted { changed: true }
        );
    }

    #[test]
    fn one_of_three_leaving_is_taken_and_other_families_keep_their_statics() {
        let mut m = statics(&[A, B, C, "[fd00::11]:6443"]);
        let t0 = Instant::now();
        assert_eq!(
            m.offer(set(&[A, B]), &ready(&[A, B, C]), t0),
            Offer::Accepted { changed: true }
        );
        let v = view(&m);
        assert_eq!(v.len(), 4);
        assert!(
            v.contains(&("[fd00::11]:6443".to_owned(), 1, "member")),
            "{v:?}"
        );
        assert_eq!(m.refusals().values().sum::<u64>(), 0);
    }
}
