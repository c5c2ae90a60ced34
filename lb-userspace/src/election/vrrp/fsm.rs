//! The VRRP state machine of RFC 5798 section 6 (and RFC 3768 for v2), without I/O.
//!
//! Who owns a VIP is decided here, so the decision must be exact and testable to the
//! nanosecond: the machine reads no clock, opens no socket and sleeps nowhere. Its
//! driver (the VRRP socket task) feeds it verified adverts, timer expiries and
//! priority changes, each with the current time, and carries out what it returns:
//! [`Output::SendAdvert`] (build an [`Advert`](super::packet::Advert) with the
//! configured interval and addresses, and send it) and [`Output::Owned`] (take or
//! give up the VIP). It then sleeps until [`Instance::next_timeout`].
//!
//! Semantics, per instance:
//!
//! - [`Instance::startup`] goes from Initialize to Backup and arms the
//!   `Master_Down_Timer`. The node starts as not owning the VIP; no output says so.
//!   Priority 255 (address owner) is refused by the config, so startup never goes
//!   straight to Master.
//! - Timers: v3 `Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256` and
//!   `Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time`, where a backup
//!   learns `Master_Adver_Interval` from the master's adverts. v2 `Skew_Time =
//!   (256 - Priority) / 256` s and `Master_Down_Interval = 3 *
//!   Advertisement_Interval + Skew_Time`; a v2 advert with another interval is
//!   refused ([`Reject::Interval`]). Everything is a [`Duration`], so priority 100 at
//!   1 s gives exactly 3.609375 s.
//! - Backup, advert with priority 0 (the master is leaving): the timer is set to
//!   `Skew_Time`. Any other advert resets the timer to `Master_Down_Interval` unless we
//!   preempt (preempt on, our priority higher, and `preempt_delay` since startup
//!   over): then it is ignored, and the timer running out makes us master.
//! - Backup, `Master_Down_Timer` expires: Master; send an advert, own the VIP.
//! - Master, `Adver_Timer` expires: send an advert. An advert with priority 0 is
//!   answered at once. One with a higher priority, or the same priority from a
//!   higher primary address (compared as unsigned integers), sends us to Backup.
//! - The effective priority ([`Instance::set_priority`], health tracking) is what we
//!   advertise and what the comparisons and `Skew_Time` use; a master advertises a
//!   change at once, so that a backup with preemption can take over.
//! - A reload ([`Instance::set_preempt`], and `set_priority` for a new
//!   configured priority) changes the machine in place, as keepalived does: a
//!   master advertises a new priority at once, a backup that now outranks its
//!   master and may preempt ignores the master's next advert and takes over
//!   when its timer runs out, and one that may no longer preempt defers to the
//!   next advert it hears.
//! - [`Instance::shutdown`]: a master sends priority 0 and gives up the VIP.
//! - Flow sync ([`Instance::on_advert_synced`], [`PeerSync`]): a backup does not
//!   preempt a master whose flows it does not hold yet. Two masters meeting
//!   (after a partition, a cut cable) settle by flows before priority: one that
//!   does not hold the other's flows keeps the VIP if it carried traffic the other
//!   has not heard of, and otherwise steps back to Backup (and preempts, if it
//!   may, once it holds them); one that holds the other's stays master against a
//!   higher priority until the other holds its own. Master-down expiry and
//!   priority 0 still take over at once: the owner is gone or has handed its flows
//!   over.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use super::packet::{Reject, Version};
use crate::election::PeerSync;

/// Why the node became master because its `Master_Down_Timer` ran out with no master
/// heard.
const REASON_MASTER_DOWN: &str = "master down timer expired";
/// Why the node became master after the master resigned (priority 0).
const REASON_MASTER_RESIGNED: &str = "master resigned (priority 0)";
/// Why the node became master while a lower-priority master was still advertising.
const REASON_PREEMPTED: &str = "preempted a lower-priority master";
/// Why the node went back to backup: a better master.
const REASON_HIGHER_PRIORITY: &str = "higher-priority master";
/// Why the node went back to backup: a master of equal priority and higher address.
const REASON_TIE_BREAK: &str = "equal-priority master with a higher address";
/// Why the node went back to backup: another master (one that took over while
/// we were cut off) may carry flows we do not hold, and holds all of ours; we
/// preempt it, if we may, once we hold its flows.
const REASON_RIVAL_UNSYNCED: &str = "another master, whose flows we do not hold yet";
/// Why the node gave the VIP up on [`Instance::shutdown`].
const REASON_SHUTDOWN: &str = "shutdown";

/// One virtual router's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub version: Version,
    pub vrid: u8,
    /// Configured priority, 1 to 254 (255, the address owner, is refused by the
    /// config; out-of-range values are clamped).
    pub priority: u8,
    /// Our `Advertisement_Interval` (v3: what we send as Max Adver Int).
    pub advert_interval: Duration,
    /// Whether a backup with a higher priority takes over from a running master.
    pub preempt: bool,
    /// After startup, how long preemption waits (adverts are accepted meanwhile).
    pub preempt_delay: Duration,
    /// Our own source address, compared with the sender's to break priority ties.
    pub primary: IpAddr,
}

/// The RFC 5798 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Not started, or shut down.
    Initialize,
    /// Listening; takes over when the master falls silent.
    Backup,
    /// Owns the VIP and advertises.
    Master,
}

impl State {
    /// The name `/status` shows: "initialize", "backup" or "master".
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send an advert with this priority (0: we are leaving), the configured
    /// interval and addresses.
    SendAdvert { priority: u8 },
    /// We now own (or no longer own) the VIP; `reason` is for the log and `/status`.
    Owned { owned: bool, reason: &'static str },
}

/// The one timer a state runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Backup: when to declare the master dead.
    MasterDown(Instant),
    /// Master: when to send the next advert.
    Adver(Instant),
}

/// What armed the `Master_Down_Timer` last, for the reason given when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownCause {
    /// Startup or a master's advert: it fires if the master falls silent.
    Silence,
    /// A priority-0 advert: it fires after `Skew_Time`.
    Resigned,
    /// We ignore a lower-priority master's adverts so as to preempt it.
    Preempt,
}

/// One VRRP virtual router: the state, its timer and the effective priority.
#[derive(Debug, Clone)]
pub struct Instance {
    params: Params,
    state: State,
    priority: u8,
    master_adver_interval: Duration,
    timer: Option<Timer>,
    started: Option<Instant>,
    down_cause: DownCause,
    /// Backup: the sender of the last advert we deferred to (it re-armed the
    /// timer): the master we wait on.
    master: Option<IpAddr>,
    /// Backup: the last advert would have been preempted but for flow sync
    /// (this node does not hold the master's flows yet).
    held: bool,
}

impl Instance {
    /// An instance in Initialize, at its configured priority.
    pub fn new(params: Params) -> Self {
        Self {
            state: State::Initialize,
            priority: params.priority.clamp(1, 254),
            master_adver_interval: params.advert_interval,
            timer: None,
            started: None,
            down_cause: DownCause::Silence,
            master: None,
            held: false,
            params,
        }
    }

    /// Startup event: Initialize to Backup with the `Master_Down_Timer` armed. Nothing
    /// to do yet, so the list is empty; no-op outside Initialize.
    pub fn startup(&mut self, now: Instant) -> Vec<Output> {
        if self.state != State::Initialize {
            return Vec::new();
        }
        self.state = State::Backup;
        self.started = Some(now);
        self.master_adver_interval = self.params.advert_interval;
        self.arm_master_down(now + self.master_down_interval(), DownCause::Silence);
        Vec::new()
    }

    /// A verified advert for our VRID from `src`. v2: [`Reject::Interval`] when its
    /// interval differs from ours; v3: when it is zero. Ignored in Initialize.
    pub fn on_advert(
        &mut self,
        now: Instant,
        src: IpAddr,
        priority: u8,
        interval: Duration,
    ) -> Result<Vec<Output>, Reject> {
        self.on_advert_synced(now, src, priority, interval, PeerSync::IN_SYNC)
    }

    /// [`Instance::on_advert`], knowing what flow sync knows of the sender
    /// (`sync`): a backup does not preempt a sender whose flows it does not hold;
    /// a master meeting another master whose flows it does not hold keeps the VIP
    /// if it carried flows the other lacks (`pending`) and otherwise steps back
    /// to Backup, whatever the priorities; one that holds them yields to a higher
    /// priority only once the other holds its own.
    pub fn on_advert_synced(
        &mut self,
        now: Instant,
        src: IpAddr,
        priority: u8,
        interval: Duration,
        sync: PeerSync,
    ) -> Result<Vec<Output>, Reject> {
        let usable = match self.params.version {
            Version::V2 => interval == self.params.advert_interval,
            Version::V3 => !interval.is_zero(),
        };
        if !usable {
            return Err(Reject::Interval);
        }
        Ok(match self.state {
            State::Initialize => Vec::new(),
            State::Backup => {
                self.backup_advert(now, src, priority, interval, sync);
                Vec::new()
            }
            State::Master => self.master_advert(now, src, priority, interval, sync),
        })
    }

    /// The process at `gone` is known to be gone (flow sync saw its kernel close
    /// both sessions): if it is the master this backup waits on, that counts as
    /// its priority-0 advert, and the backup takes over after `Skew_Time`, not
    /// the whole `Master_Down_Interval`. Whether it did.
    pub fn on_master_gone(&mut self, now: Instant, gone: IpAddr) -> bool {
        if self.state != State::Backup || self.master != Some(gone) {
            return false;
        }
        self.master = None;
        self.arm_master_down(now + self.skew_time(), DownCause::Resigned);
        true
    }

    /// Fires the armed timer if it is due at `now`; otherwise does nothing.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Output> {
        match (self.state, self.timer) {
            (State::Backup, Some(Timer::MasterDown(due))) if due <= now => {
                let reason = match self.down_cause {
                    DownCause::Silence => REASON_MASTER_DOWN,
                    DownCause::Resigned => REASON_MASTER_RESIGNED,
                    DownCause::Preempt => REASON_PREEMPTED,
                };
                self.state = State::Master;
                self.master_adver_interval = self.params.advert_interval;
                self.arm_adver(now);
                vec![
                    Output::SendAdvert {
                        priority: self.priority,
                    },
                    Output::Owned {
                        owned: true,
                        reason,
                    },
                ]
            }
            (State::Master, Some(Timer::Adver(due))) if due <= now => {
                self.arm_adver(now);
                vec![Output::SendAdvert {
                    priority: self.priority,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// When [`Instance::on_timeout`] must next be called; `None` in Initialize.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timer.map(|t| match t {
            Timer::MasterDown(due) | Timer::Adver(due) => due,
        })
    }

    /// Sets the effective priority (clamped to 1..=254: tracking must neither
    /// resign with 0 nor claim ownership with 255). A master advertises a change at
    /// once; a backup uses it from its next advert on.
    pub fn set_priority(&mut self, now: Instant, priority: u8) -> Vec<Output> {
        let priority = priority.clamp(1, 254);
        if priority == self.priority {
            return Vec::new();
        }
        self.priority = priority;
        if self.state != State::Master {
            return Vec::new();
        }
        self.arm_adver(now);
        vec![Output::SendAdvert { priority }]
    }

    /// Sets whether (and how long after startup) a backup with a higher priority
    /// takes over from a running master. A backup already ignoring a master so as
    /// to preempt it goes back to deferring at the master's next advert, if it
    /// may no longer preempt.
    pub fn set_preempt(&mut self, preempt: bool, delay: Duration) {
        self.params.preempt = preempt;
        self.params.preempt_delay = delay;
    }

    /// Shutdown event: a master sends priority 0 (so a backup takes over after
    /// `Skew_Time`) and gives up the VIP. Then Initialize, with no timer.
    pub fn shutdown(&mut self, _now: Instant) -> Vec<Output> {
        let out = if self.state == State::Master {
            vec![
                Output::SendAdvert { priority: 0 },
                Output::Owned {
                    owned: false,
                    reason: REASON_SHUTDOWN,
                },
            ]
        } else {
            Vec::new()
        };
        self.state = State::Initialize;
        self.timer = None;
        self.started = None;
        out
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether this backup would preempt the master it last heard but for flow
    /// sync: it does not hold the master's flows yet.
    pub fn held(&self) -> bool {
        self.state == State::Backup && self.held
    }

    /// The effective priority: what we advertise and compare.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// v3: the master's interval as learned in Backup (ours until then, and as
    /// master). v2: always our `Advertisement_Interval`.
    pub fn master_adver_interval(&self) -> Duration {
        self.master_adver_interval
    }

    /// How much sooner than a lower-priority backup this one declares the master
    /// dead.
    pub fn skew_time(&self) -> Duration {
        let weight = 256 - u32::from(self.priority);
        match self.params.version {
            Version::V3 => self.master_adver_interval.saturating_mul(weight) / 256,
            Version::V2 => Duration::from_secs(u64::from(weight)) / 256,
        }
    }

    /// How long a backup waits for a master's advert before taking over.
    pub fn master_down_interval(&self) -> Duration {
        let interval = match self.params.version {
            Version::V3 => self.master_adver_interval,
            Version::V2 => self.params.advert_interval,
        };
        interval.saturating_mul(3).saturating_add(self.skew_time())
    }

    fn backup_advert(
        &mut self,
        now: Instant,
        src: IpAddr,
        priority: u8,
        interval: Duration,
        sync: PeerSync,
    ) {
        if priority == 0 {
            self.arm_master_down(now + self.skew_time(), DownCause::Resigned);
            self.master = None;
            self.held = false;
            return;
        }
        let in_delay = self
            .started
            .is_some_and(|t| now.saturating_duration_since(t) < self.params.preempt_delay);
        self.held =
            self.params.preempt && priority < self.priority && !in_delay && !sync.have_theirs;
        // Not holding the master's flows is a preempt delay with no end but the
        // bulk's.
        if !self.params.preempt || priority >= self.priority || in_delay || !sync.have_theirs {
            self.learn_interval(interval);
            self.arm_master_down(now + self.master_down_interval(), DownCause::Silence);
            self.master = Some(src);
        } else if self.down_cause == DownCause::Silence {
            // Discarded: the running timer makes us master when it fires.
            self.down_cause = DownCause::Preempt;
        }
    }

    fn master_advert(
        &mut self,
        now: Instant,
        src: IpAddr,
        priority: u8,
        interval: Duration,
        sync: PeerSync,
    ) -> Vec<Output> {
        if priority == 0 {
            self.arm_adver(now);
            return vec![Output::SendAdvert {
                priority: self.priority,
            }];
        }
        let above = priority > self.priority
            || (priority == self.priority && address_above(src, self.params.primary));
        // Two masters (after a partition, a cut cable): whichever priority
        // wins, the VIP stays with the one carrying flows the other lacks.
        let reason = if !sync.have_theirs && sync.pending {
            // We carried traffic it has not heard of: keep the VIP until it
            // holds those flows (an RFC deviation, towards sync peers only).
            return Vec::new();
        } else if !sync.have_theirs {
            // It may carry flows we lack; it holds all of ours: step back, and
            // preempt, if we may, once its flows are here.
            REASON_RIVAL_UNSYNCED
        } else if above && !sync.they_have_mine {
            // It would reset our flows: we stay master until it holds them.
            return Vec::new();
        } else if priority > self.priority {
            REASON_HIGHER_PRIORITY
        } else if above {
            REASON_TIE_BREAK
        } else {
            return Vec::new();
        };
        self.state = State::Backup;
        self.master = Some(src);
        self.learn_interval(interval);
        self.arm_master_down(now + self.master_down_interval(), DownCause::Silence);
        vec![Output::Owned {
            owned: false,
            reason,
        }]
    }

    /// v3 backups follow the master's interval; v2 intervals are equal by rule.
    fn learn_interval(&mut self, interval: Duration) {
        if self.params.version == Version::V3 {
            self.master_adver_interval = interval;
        }
    }

    fn arm_master_down(&mut self, due: Instant, cause: DownCause) {
        self.timer = Some(Timer::MasterDown(due));
        self.down_cause = cause;
    }

    fn arm_adver(&mut self, now: Instant) {
        self.timer = Some(Timer::Adver(now + self.params.advert_interval));
    }
}

/// Whether `a` is above `b` as an unsigned integer in network byte order (RFC 5798
/// section 6.4.3). Addresses of different families never are.
fn address_above(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.to_bits() > b.to_bits(),
        (IpAddr::V6(a), IpAddr::V6(b)) => a.to_bits() > b.to_bits(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const OURS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));
    const LOWER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 8));
    const SECOND: Duration = Duration::from_secs(1);

    fn params(version: Version, priority: u8, interval: Duration) -> Params {
        Params {
            version,
            vrid: 51,
            priority,
            advert_interval: interval,
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary: OURS,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    /// A started instance, and the time it started.
    fn started(p: Params) -> (Instance, Instant) {
        let t0 = Instant::now();
        let mut vr = Instance::new(p);
        assert_eq!(vr.startup(t0), []);
        (vr, t0)
    }

    /// A started instance made master by its first `Master_Down_Timer`.
    fn master(p: Params) -> (Instance, Instant) {
        let (mut vr, _) = started(p);
        let due = vr.next_timeout().unwrap();
        vr.on_timeout(due);
        assert_eq!(vr.state(), State::Master);
        (vr, due)
    }

    /// `vr` (priority 150) preempts when its timer runs out at `due`.
    fn assert_preempts(vr: &mut Instance, due: Instant) {
        assert_eq!(
            vr.on_timeout(due),
            [
                Output::SendAdvert { priority: 150 },
                owned(REASON_PREEMPTED)
            ]
        );
    }

    fn owned(reason: &'static str) -> Output {
        Output::Owned {
            owned: true,
            reason,
        }
    }

    fn lost(reason: &'static str) -> Output {
        Output::Owned {
            owned: false,
            reason,
        }
    }

    #[test]
    fn v3_timers_at_one_second_for_priorities_100_and_150() {
        // (256 - 100) / 256 * 1 s = 0.609375 s; (256 - 150) / 256 * 1 s = 0.4140625 s.
        let (vr, t0) = started(params(Version::V3, 100, SECOND));
        assert_eq!(vr.skew_time(), ns(609_375_000));
        assert_eq!(vr.master_down_interval(), ns(3_609_375_000));
        assert_eq!(vr.next_timeout(), Some(t0 + ns(3_609_375_000)));

        let vr = Instance::new(params(Version::V3, 150, SECOND));
        assert_eq!(vr.skew_time(), ns(414_062_500));
        assert_eq!(vr.master_down_interval(), ns(3_414_062_500));
    }

    #[test]
    fn v3_timers_at_100ms_for_priorities_100_and_150() {
        // 156 * 100 ms / 256 = 60.9375 ms; 106 * 100 ms / 256 = 41.40625 ms.
        let vr = Instance::new(params(Version::V3, 100, ms(100)));
        assert_eq!(vr.skew_time(), ns(60_937_500));
        assert_eq!(vr.master_down_interval(), ns(360_937_500));

        let vr = Instance::new(params(Version::V3, 150, ms(100)));
        assert_eq!(vr.skew_time(), ns(41_406_250));
        assert_eq!(vr.master_down_interval(), ns(341_406_250));
    }

    #[test]
    fn v2_skew_is_in_seconds_whatever_the_interval() {
        let vr = Instance::new(params(Version::V2, 100, SECOND));
        assert_eq!(vr.skew_time(), ns(609_375_000));
        assert_eq!(vr.master_down_interval(), ns(3_609_375_000));
        let vr = Instance::new(params(Version::V2, 150, Duration::from_secs(3)));
        assert_eq!(vr.skew_time(), ns(414_062_500));
        assert_eq!(vr.master_down_interval(), ns(9_414_062_500));
    }

    #[test]
    fn v3_backup_learns_the_masters_interval() {
        // We advertise every second; the master (priority 150) every 100 ms.
        let (mut vr, t0) = started(params(Version::V3, 100, SECOND));
        let t = t0 + ms(50);
        assert_eq!(vr.on_advert(t, PEER, 150, ms(100)), Ok(vec![]));
        assert_eq!(vr.master_adver_interval(), ms(100));
        assert_eq!(vr.next_timeout(), Some(t + ns(360_937_500)));
    }

    #[test]
    fn silent_master_makes_backup_master_at_the_down_interval_then_it_advertises() {
        let (mut vr, t0) = started(params(Version::V3, 100, SECOND));
        let due = t0 + ns(3_609_375_000);
        assert_eq!(vr.on_timeout(due.checked_sub(ns(1)).unwrap()), []);
        assert_eq!(vr.state(), State::Backup);
        assert_eq!(
            vr.on_timeout(due),
            [
                Output::SendAdvert { priority: 100 },
                owned(REASON_MASTER_DOWN)
            ]
        );
        assert_eq!(vr.next_timeout(), Some(due + SECOND));
        assert_eq!(
            vr.on_timeout(due + SECOND),
            [Output::SendAdvert { priority: 100 }]
        );
        assert_eq!(vr.next_timeout(), Some(due + 2 * SECOND));
    }

    #[test]
    fn preempting_backup_ignores_a_lower_master_and_takes_over() {
        let (mut vr, t0) = started(params(Version::V3, 150, SECOND));
        for s in 1..=3 {
            let t = t0 + SECOND * s;
            assert_eq!(vr.on_advert(t, PEER, 100, SECOND), Ok(vec![]));
            assert_eq!(vr.next_timeout(), Some(t0 + ns(3_414_062_500)));
        }
        assert_preempts(&mut vr, t0 + ns(3_414_062_500));
    }

    #[test]
    fn non_preempting_backup_stays_backup_while_a_lower_master_advertises() {
        let (mut vr, t0) = started(Params {
            preempt: false,
            ..params(Version::V3, 150, SECOND)
        });
        for s in 1..=10 {
            let t = t0 + SECOND * s;
            assert_eq!(vr.on_timeout(t), []);
            assert_eq!(vr.on_advert(t, PEER, 100, SECOND), Ok(vec![]));
            assert_eq!(vr.next_timeout(), Some(t + ns(3_414_062_500)));
        }
        assert_eq!(vr.state(), State::Backup);
    }

    #[test]
    fn preempt_delay_accepts_lower_master_until_it_has_passed() {
        let (mut vr, t0) = started(Params {
            preempt_delay: Duration::from_secs(5),
            ..params(Version::V3, 150, SECOND)
        });
        // Seconds 1 to 4 are inside the delay: each advert resets the timer.
        for s in 1..=4 {
            let t = t0 + SECOND * s;
            vr.on_advert(t, PEER, 100, SECOND).unwrap();
            assert_eq!(vr.next_timeout(), Some(t + ns(3_414_062_500)));
        }
        // From second 5 on they are ignored; the timer armed at second 4 runs out.
        let due = t0 + Duration::from_secs(4) + ns(3_414_062_500);
        for s in 5..=7 {
            vr.on_advert(t0 + SECOND * s, PEER, 100, SECOND).unwrap();
            assert_eq!(vr.next_timeout(), Some(due));
        }
        assert_preempts(&mut vr, due);
    }

    #[test]
    fn master_yields_to_equal_priority_from_a_higher_address_only() {
        // 10.0.0.10 is above 10.0.0.9 as an integer (as text it would sort below).
        let (mut vr, t) = master(params(Version::V3, 100, SECOND));
        assert_eq!(vr.on_advert(t, LOWER, 100, SECOND), Ok(vec![]));
        assert_eq!(vr.on_advert(t, OURS, 100, SECOND), Ok(vec![]));
        assert_eq!(vr.state(), State::Master);
        assert_eq!(
            vr.on_advert(t, PEER, 100, ms(200)),
            Ok(vec![lost(REASON_TIE_BREAK)])
        );
        assert_eq!(vr.state(), State::Backup);
        // 3 * 200 ms + 156 * 200 ms / 256 = 600 ms + 121.875 ms.
        assert_eq!(vr.next_timeout(), Some(t + ns(721_875_000)));
    }

    const UNSYNCED: PeerSync = PeerSync {
        have_theirs: false,
        they_have_mine: false,
        pending: false,
    };

    #[test]
    fn preempting_backup_waits_for_the_masters_flows_however_long_it_takes() {
        let (mut vr, t0) = started(params(Version::V3, 150, SECOND));
        // Ten seconds of adverts from a master whose bulk has not ended: each
        // one re-arms the timer, as for a backup that does not preempt.
        for s in 1..=10 {
            let t = t0 + SECOND * s;
            assert_eq!(vr.on_timeout(t), []);
            assert_eq!(
                vr.on_advert_synced(t, PEER, 100, SECOND, UNSYNCED),
                Ok(vec![])
            );
            assert_eq!(vr.next_timeout(), Some(t + ns(3_414_062_500)));
            assert!(vr.held());
        }
        assert_eq!(vr.state(), State::Backup);
        // The bulk ended: the next advert is ignored, and the timer running out
        // makes us master.
        let t = t0 + SECOND * 11;
        let synced = PeerSync {
            have_theirs: true,
            they_have_mine: false,
            pending: false,
        };
        assert_eq!(
            vr.on_advert_synced(t, PEER, 100, SECOND, synced),
            Ok(vec![])
        );
        assert!(!vr.held());
        let due = t0 + SECOND * 10 + ns(3_414_062_500);
        assert_eq!(vr.next_timeout(), Some(due));
        assert_preempts(&mut vr, due);
    }

    #[test]
    fn master_meeting_a_lower_rival_whose_flows_it_lacks_steps_back_until_it_has_them() {
        // Cut off, we stayed master; PEER took over meanwhile. Back on the
        // wire, its flows are not ours yet: we give the VIP up.
        let (mut vr, t) = master(params(Version::V3, 150, SECOND));
        assert_eq!(
            vr.on_advert_synced(t, LOWER, 100, SECOND, UNSYNCED),
            Ok(vec![lost(REASON_RIVAL_UNSYNCED)])
        );
        assert_eq!(vr.state(), State::Backup);
        // Its adverts hold us back until the bulk ends, then we preempt.
        let t1 = t + SECOND;
        assert_eq!(
            vr.on_advert_synced(t1, LOWER, 100, SECOND, UNSYNCED),
            Ok(vec![])
        );
        assert_eq!(vr.next_timeout(), Some(t1 + ns(3_414_062_500)));
        assert_eq!(
            vr.on_advert_synced(t1 + SECOND, LOWER, 100, SECOND, PeerSync::IN_SYNC),
            Ok(vec![])
        );
        assert_preempts(&mut vr, t1 + ns(3_414_062_500));
        // A lower rival whose flows we hold is ignored, as before.
        let t2 = t1 + SECOND * 4;
        assert_eq!(
            vr.on_advert_synced(t2, LOWER, 100, SECOND, PeerSync::IN_SYNC),
            Ok(vec![])
        );
        assert_eq!(vr.state(), State::Master);
    }

    #[test]
    fn master_keeps_the_vip_from_a_higher_rival_until_flows_are_even() {
        // We took over while PEER (higher) was cut off and carried new flows;
        // or we hold PEER's flows and it does not hold ours yet.
        let carried = PeerSync {
            pending: true,
            ..UNSYNCED
        };
        let theirs_only = PeerSync {
            have_theirs: true,
            ..UNSYNCED
        };
        for sync in [carried, theirs_only] {
            let (mut vr, t) = master(params(Version::V3, 100, SECOND));
            let adver_due = vr.next_timeout();
            assert_eq!(vr.on_advert_synced(t, PEER, 150, SECOND, sync), Ok(vec![]));
            assert_eq!((vr.state(), vr.next_timeout()), (State::Master, adver_due));
            // Each holds the other's flows: VRRP decides again.
            assert_eq!(
                vr.on_advert_synced(t, PEER, 150, SECOND, PeerSync::IN_SYNC),
                Ok(vec![lost(REASON_HIGHER_PRIORITY)])
            );
        }
    }

    #[test]
    fn master_yields_to_higher_priority_and_ignores_lower() {
        let (mut vr, t) = master(params(Version::V3, 100, SECOND));
        let adver_due = vr.next_timeout();
        assert_eq!(vr.on_advert(t, PEER, 99, SECOND), Ok(vec![]));
        assert_eq!(vr.next_timeout(), adver_due);
        assert_eq!(
            vr.on_advert(t, LOWER, 101, SECOND),
            Ok(vec![lost(REASON_HIGHER_PRIORITY)])
        );
        assert_eq!(vr.state(), State::Backup);
    }

    #[test]
    fn priority_zero_lets_the_backup_take_over_after_skew_time() {
        let (mut vr, t0) = started(params(Version::V3, 100, SECOND));
        let t = t0 + SECOND;
        vr.on_advert(t, PEER, 200, SECOND).unwrap();
        vr.on_advert(t + ms(10), PEER, 0, SECOND).unwrap();
        let due = t + ms(10) + ns(609_375_000);
        assert_eq!(vr.next_timeout(), Some(due));
        assert_eq!(
            vr.on_timeout(due),
            [
                Output::SendAdvert { priority: 100 },
                owned(REASON_MASTER_RESIGNED)
            ]
        );
    }

    #[test]
    fn a_master_known_gone_is_taken_over_after_skew_time() {
        let (mut vr, t0) = started(params(Version::V3, 100, ms(100)));
        vr.on_advert(t0, PEER, 150, ms(100)).unwrap();
        let t = t0 + ms(10);
        // Another node gone is not the master gone.
        assert!(!vr.on_master_gone(t, LOWER));
        assert!(vr.on_master_gone(t, PEER));
        // 156 * 100 ms / 256.
        assert_eq!(vr.next_timeout(), Some(t + ns(60_937_500)));
        assert_eq!(
            vr.on_timeout(t + ns(60_937_500)),
            [
                Output::SendAdvert { priority: 100 },
                owned(REASON_MASTER_RESIGNED)
            ]
        );
        // A master is not moved by it.
        assert!(!vr.on_master_gone(t + SECOND, PEER));
        assert_eq!(vr.state(), State::Master);
    }

    #[test]
    fn master_answers_priority_zero_at_once() {
        let (mut vr, t) = master(params(Version::V3, 100, SECOND));
        let now = t + ms(300);
        assert_eq!(
            vr.on_advert(now, PEER, 0, SECOND),
            Ok(vec![Output::SendAdvert { priority: 100 }])
        );
        assert_eq!(vr.next_timeout(), Some(now + SECOND));
        assert_eq!(vr.state(), State::Master);
    }

    #[test]
    fn tracking_lowers_master_priority_and_a_preempting_backup_takes_over() {
        let (mut a, t) = master(params(Version::V3, 150, SECOND));
        let (mut b, _) = started(Params {
            primary: PEER,
            ..params(Version::V3, 100, SECOND)
        });
        b.on_advert(t, OURS, 150, SECOND).unwrap();
        let b_due = t + ns(3_609_375_000);
        assert_eq!(b.next_timeout(), Some(b_due));

        // A's health check fails: tracking drops it to 50, advertised at once.
        let t1 = t + ms(500);
        assert_eq!(
            a.set_priority(t1, 50),
            [Output::SendAdvert { priority: 50 }]
        );
        assert_eq!(a.next_timeout(), Some(t1 + SECOND));
        assert_eq!(a.set_priority(t1, 50), []);
        // B preempts: the adverts at 50 no longer reset its timer.
        b.on_advert(t1, OURS, 50, SECOND).unwrap();
        b.on_advert(t1 + SECOND, OURS, 50, SECOND).unwrap();
        assert_eq!(b.next_timeout(), Some(b_due));
        assert_eq!(
            b.on_timeout(b_due),
            [
                Output::SendAdvert { priority: 100 },
                owned(REASON_PREEMPTED)
            ]
        );
        // A hears B's advert at 100 and steps down.
        assert_eq!(
            a.on_advert(b_due, PEER, 100, SECOND),
            Ok(vec![lost(REASON_HIGHER_PRIORITY)])
        );
    }

    #[test]
    fn a_reloaded_priority_lets_the_backup_preempt_and_nopreempt_holds_it_back() {
        // B, backup at 100 under A at 150, gets 200 from a reload, preempt off.
        let (mut b, t0) = started(Params {
            primary: PEER,
            preempt: false,
            ..params(Version::V3, 100, SECOND)
        });
        b.on_advert(t0, OURS, 150, SECOND).unwrap();
        assert_eq!(
            b.set_priority(t0 + ms(10), 200),
            [],
            "a backup sends nothing"
        );
        b.set_preempt(false, Duration::ZERO);
        // nopreempt: A's adverts keep resetting the timer.
        for s in 1..=5 {
            let t = t0 + SECOND * s;
            assert_eq!(b.on_timeout(t), []);
            b.on_advert(t, OURS, 150, SECOND).unwrap();
            assert_eq!(b.next_timeout(), Some(t + b.master_down_interval()));
        }
        // A reload turns preempt on: the next advert is ignored, and the timer
        // it armed last runs out.
        b.set_preempt(true, Duration::ZERO);
        let last = t0 + SECOND * 5;
        let due = last + b.master_down_interval();
        // (256 - 200) / 256 s = 218.75 ms of skew.
        assert_eq!(due, last + ns(3_218_750_000));
        b.on_advert(last + SECOND, OURS, 150, SECOND).unwrap();
        assert_eq!(b.next_timeout(), Some(due));
        assert_eq!(
            b.on_timeout(due),
            [
                Output::SendAdvert { priority: 200 },
                owned(REASON_PREEMPTED)
            ]
        );
        // A master whose priority a reload lowers advertises it at once.
        let (mut a, t) = master(params(Version::V3, 150, SECOND));
        assert_eq!(a.set_priority(t, 90), [Output::SendAdvert { priority: 90 }]);
        assert_eq!(
            a.on_advert(due, PEER, 200, SECOND),
            Ok(vec![lost(REASON_HIGHER_PRIORITY)])
        );
        // Preempt turned off while ignoring a master: the next advert is obeyed.
        let (mut c, t0) = started(params(Version::V3, 150, SECOND));
        c.on_advert(t0, PEER, 100, SECOND).unwrap();
        let armed = c.next_timeout();
        c.set_preempt(false, Duration::ZERO);
        c.on_advert(t0 + SECOND, PEER, 100, SECOND).unwrap();
        assert_eq!(
            c.next_timeout(),
            Some(t0 + SECOND + c.master_down_interval())
        );
        assert_ne!(c.next_timeout(), armed);
    }

    #[test]
    fn tracked_priority_is_clamped_to_1_through_254() {
        let (mut vr, t) = master(params(Version::V3, 100, SECOND));
        assert_eq!(vr.set_priority(t, 0), [Output::SendAdvert { priority: 1 }]);
        assert_eq!(
            vr.set_priority(t, 255),
            [Output::SendAdvert { priority: 254 }]
        );
        assert_eq!(vr.priority(), 254);
    }

    #[test]
    fn v2_refuses_an_advert_with_another_interval() {
        let (mut vr, t0) = started(params(Version::V2, 100, SECOND));
        let armed = vr.next_timeout();
        assert_eq!(
            vr.on_advert(t0 + SECOND, PEER, 200, Duration::from_secs(2)),
            Err(Reject::Interval)
        );
        assert_eq!(vr.next_timeout(), armed);
        assert_eq!(vr.master_adver_interval(), SECOND);
        // The same advert at our interval is accepted.
        assert_eq!(vr.on_advert(t0 + SECOND, PEER, 200, SECOND), Ok(vec![]));
        assert_eq!(vr.next_timeout(), Some(t0 + SECOND + ns(3_609_375_000)));
        // v3 accepts any nonzero interval, refuses zero.
        let (mut v3, t0) = started(params(Version::V3, 100, SECOND));
        assert_eq!(
            v3.on_advert(t0, PEER, 200, Duration::ZERO),
            Err(Reject::Interval)
        );
    }

    #[test]
    fn shutdown_as_master_resigns_with_priority_zero() {
        let (mut vr, t) = master(params(Version::V3, 100, SECOND));
        assert_eq!(
            vr.shutdown(t),
            [Output::SendAdvert { priority: 0 }, lost(REASON_SHUTDOWN)]
        );
        assert_eq!(vr.state(), State::Initialize);
        assert_eq!(vr.next_timeout(), None);
        assert_eq!(vr.on_advert(t, PEER, 200, SECOND), Ok(vec![]));

        let (mut backup, t0) = started(params(Version::V3, 100, SECOND));
        assert_eq!(backup.shutdown(t0), []);
        assert_eq!(backup.state(), State::Initialize);
        // It can start again.
        backup.startup(t0 + SECOND);
        assert_eq!(backup.state(), State::Backup);
    }

    #[test]
    fn state_names_are_the_status_names() {
        assert_eq!(
            [State::Initialize, State::Backup, State::Master].map(State::as_str),
            ["initialize", "backup", "master"]
        );
    }
}
