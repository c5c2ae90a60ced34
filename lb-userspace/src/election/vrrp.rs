//! VRRP for VIP ownership (see [`crate::election`]): each VRRP VIP is one virtual
//! router, so apilb can stand in for keepalived on a node, or share a VRID with it.
//!
//! [`packet`] encodes and checks adverts, [`fsm`] is RFC 5798's state machine
//! without I/O, [`socket`] the raw sockets; this module is their clock and glue.
//! One task per address family serves that family's VIPs:
//!
//! - **Receive.** The TTL (hop limit) must be 255, or the advert may come from
//!   off-link; in unicast mode the sender must be a configured peer; then the VRID
//!   must be known, and [`packet::decode`] checks version, checksum and
//!   authentication, and the addresses must include the VIP. Each refusal is
//!   counted by reason (`ElectionState::rejected`).
//! - **Send.** To 224.0.0.18 / `ff02::12`, or to each unicast peer of the family.
//! - **Rivals.** A master that hears another master (one that was stopped or cut
//!   off and came back) and stays master announces the VIP again, since the
//!   network may have followed the other's announcements meanwhile.
//! - **Flow sync.** Each advert is weighed with what `crate::sync::ready` knows
//!   of its sender (`fsm::Instance::on_advert_synced`): no preemption before this
//!   node holds the master's flows, no yielding to a rival that lacks ours. A
//!   master whose apilb is known gone (its sync sessions closed by its kernel)
//!   is treated as having resigned: its backup takes over after `Skew_Time`.
//! - **Tracking.** While the node fails open (a VIP has no healthy backend of its
//!   family; see `controller`) every VIP's priority drops by
//!   `track_weight`, so a peer with working backends takes over.
//! - **Reload.** [`VrrpElection::retune`] applies a new [`Tuning`] (each VIP's
//!   priority, `track_weight`, `preempt`, `preempt_delay`) to the running
//!   instances, as keepalived's reload does, without a restart that would move a
//!   master's VIP twice.
//! - **Refusals** are counted by reason from the start (zeros included, so an
//!   alert on their increase sees the first one) and logged by [`refusals`].
//! - **Shutdown.** [`VrrpElection::shutdown`] makes each instance that is master send
//!   a priority-0 advert, so its backup takes over after `Skew_Time` rather than the
//!   whole `Master_Down_Interval`.

pub mod fsm;
pub mod packet;
pub mod refusals;
pub mod socket;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{Departed, ElectionState, Ownership, PeerSync, SyncSignals, next_departure};
use crate::announce::{AnnounceError, Announcer};
use crate::config::VrrpSettings;
use crate::sync::ready::{self, Readiness};
use fsm::{Instance, Output, Params, State};
use packet::{Advert, Auth, Reject, Version};
use socket::VrrpSocket;

#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("VRRP socket on {interface}: {step}{}", crate::privilege::denied(.source, &[crate::privilege::CAP_NET_RAW]))]
    Socket {
        interface: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {interface} has no {family} address to send VRRP adverts from{hint}")]
    NoSource {
        interface: String,
        family: &'static str,
        hint: &'static str,
    },
    #[error("election.vrrp.auth_pass: {0}")]
    Auth(#[from] packet::PacketError),
    #[error(transparent)]
    Interface(#[from] AnnounceError),
}

/// One VRRP VIP: its virtual router id and this node's configured priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VrrpVip {
    pub addr: IpAddr,
    pub vrid: u8,
    pub priority: u8,
}

/// What a reload may change in a running VRRP election (`Config::restart_needed`
/// lets exactly these through): each VIP's configured priority, by VRID, and
/// the settings all VIPs share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub priorities: BTreeMap<u8, u8>,
    pub track_weight: i32,
    pub preempt: bool,
    pub preempt_delay: Duration,
}

impl Tuning {
    #[must_use]
    pub fn new(settings: &VrrpSettings, vips: &[VrrpVip]) -> Self {
        Self {
            priorities: vips.iter().map(|v| (v.vrid, v.priority)).collect(),
            track_weight: settings.track_weight,
            preempt: settings.preempt,
            preempt_delay: settings.preempt_delay,
        }
    }
}

/// The running VRRP tasks, one per address family in use.
pub struct VrrpElection {
    tasks: Vec<(JoinHandle<()>, oneshot::Sender<()>)>,
    states: Vec<(IpAddr, watch::Receiver<ElectionState>)>,
    tuning: watch::Sender<Tuning>,
}

impl VrrpElection {
    /// Each VIP's election state.
    #[must_use]
    pub fn states(&self) -> Vec<(IpAddr, ElectionState)> {
        self.states
            .iter()
            .map(|(a, s)| (*a, s.borrow().clone()))
            .collect()
    }

    /// Apply a reloaded [`Tuning`] to every instance; nothing if it is the same.
    pub fn retune(&self, tuning: Tuning) {
        self.tuning.send_if_modified(|t| {
            let changed = *t != tuning;
            *t = tuning;
            changed
        });
    }

    /// Give up every VIP this node is master of, with a priority-0 advert, and stop.
    pub async fn shutdown(mut self) {
        for (task, stop) in std::mem::take(&mut self.tasks) {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

impl Drop for VrrpElection {
    fn drop(&mut self) {
        for (task, _) in &self.tasks {
            task.abort();
        }
    }
}

/// Start VRRP for `vips` on `interface` (inside a tokio runtime, in the network
/// namespace of the interface). `unhealthy` is true while the node fails open.
/// Ownership changes go to `events`.
pub async fn spawn(
    settings: &VrrpSettings,
    announcer: &Announcer,
    vips: &[VrrpVip],
    unhealthy: watch::Receiver<bool>,
    sync: Option<SyncSignals>,
    events: mpsc::Sender<Ownership>,
) -> Result<VrrpElection, VrrpError> {
    let version = if settings.version == 2 {
        Version::V2
    } else {
        Version::V3
    };
    let auth = match &settings.auth_pass {
        Some(p) => Auth::password(p)?,
        None => Auth::None,
    };
    let (tuning, _) = watch::channel(Tuning::new(settings, vips));
    let mut election = VrrpElection {
        tasks: Vec::new(),
        states: Vec::new(),
        tuning,
    };
    for v6 in [false, true] {
        let family: Vec<&VrrpVip> = vips.iter().filter(|v| v.addr.is_ipv6() == v6).collect();
        if family.is_empty() {
            continue;
        }
        let configured = settings.source.filter(|s| s.is_ipv6() == v6);
        let interface = announcer.interface();
        let source = match configured {
            Some(s) => s,
            None => announcer
                .own_address(v6)
                .await?
                .ok_or_else(|| VrrpError::NoSource {
                    interface: interface.to_owned(),
                    family: if v6 { "IPv6 link-local" } else { "IPv4" },
                    hint: if v6 { "" } else { "; set election.vrrp.source" },
                })?,
        };
        let peers: Vec<IpAddr> = settings
            .unicast_peers
            .iter()
            .copied()
            .filter(|p| p.is_ipv6() == v6)
            .collect();
        // IPv4 unicast: bound to the source, so adverts leave from the address the
        // checksum was computed with, and only those sent to it arrive.
        let socket = VrrpSocket::open(
            interface,
            announcer.ifindex(),
            source,
            peers.is_empty(),
            !peers.is_empty() && !v6,
        )?;
        let mut routers = BTreeMap::new();
        for v in family {
            let (tx, rx) = watch::channel(ElectionState {
                mode: "vrrp".into(),
                state: "initialize".into(),
                priority: Some(u32::from(v.priority)),
                rejected: rejection_counts(&no_rejections()),
                ..ElectionState::default()
            });
            election.states.push((v.addr, rx));
            let params = Params {
                version,
                vrid: v.vrid,
                priority: v.priority,
                advert_interval: settings.advert_interval,
                preempt: settings.preempt,
                preempt_delay: settings.preempt_delay,
                primary: source,
            };
            routers.insert(
                v.vrid,
                Router {
                    vip: *v,
                    fsm: Instance::new(params),
                    state: tx,
                },
            );
        }
        let io = Io {
            socket,
            peers,
            version,
            auth: auth.clone(),
            interval: settings.advert_interval,
            track_weight: settings.track_weight,
            sync: sync.as_ref().map(|s| s.readiness.clone()),
            strangers: std::sync::Mutex::new(std::collections::HashSet::new()),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let inputs = Inputs {
            unhealthy: unhealthy.clone(),
            departed: sync.as_ref().map(|s| s.departed.clone()),
            tuning: election.tuning.subscribe(),
            events: events.clone(),
            stop: stop_rx,
        };
        let task = tokio::spawn(run(io, routers, inputs));
        election.tasks.push((task, stop_tx));
    }
    Ok(election)
}

struct Io {
    socket: VrrpSocket,
    peers: Vec<IpAddr>,
    version: Version,
    auth: Auth,
    interval: Duration,
    track_weight: i32,
    /// What flow sync knows of each peer; `None` without `[sync]`.
    sync: Option<watch::Receiver<Readiness>>,
    /// Advert sources that are no sync peer's address, warned of once each.
    strangers: std::sync::Mutex<std::collections::HashSet<IpAddr>>,
}

struct Router {
    vip: VrrpVip,
    fsm: Instance,
    state: watch::Sender<ElectionState>,
}

/// What the task listens to besides its socket.
struct Inputs {
    /// Whether the node fails open (health tracking).
    unhealthy: watch::Receiver<bool>,
    /// Sync peers whose process is gone; `None` without `[sync]`.
    departed: Option<watch::Receiver<Departed>>,
    /// What reloads set (`VrrpElection::retune`).
    tuning: watch::Receiver<Tuning>,
    events: mpsc::Sender<Ownership>,
    stop: oneshot::Receiver<()>,
}

impl Io {
    fn send(&self, r: &Router, priority: u8) {
        let advert = Advert {
            version: self.version,
            vrid: r.vip.vrid,
            priority,
            interval: self.interval,
            addresses: vec![r.vip.addr],
            auth: self.auth.clone(),
        };
        let group = [self.socket.group()];
        let targets = if self.peers.is_empty() {
            &group[..]
        } else {
            &self.peers[..]
        };
        for &dst in targets {
            let bytes = match packet::encode(&advert, self.socket.source, dst) {
                Ok(b) => b,
                Err(e) => {
                    warn!(vrid = r.vip.vrid, "cannot encode a VRRP advert: {e}");
                    return;
                }
            };
            if let Err(e) = self.socket.send(&bytes, dst) {
                warn!(vrid = r.vip.vrid, %dst, "sending a VRRP advert failed: {e}");
            }
        }
    }
}

async fn run(mut io: Io, mut routers: BTreeMap<u8, Router>, inputs: Inputs) {
    let Inputs {
        mut unhealthy,
        mut departed,
        mut tuning,
        events,
        mut stop,
    } = inputs;
    let mut rejected = no_rejections();
    let mut refusals = refusals::Refusals::default();
    let now = Instant::now();
    for r in routers.values_mut() {
        let out = r.fsm.startup(now);
        handle(&io, r, out, &events).await;
    }
    let mut buf = vec![0u8; 2048];
    loop {
        let next = routers.values().filter_map(|r| r.fsm.next_timeout()).min();
        let sleep = next.map_or(Duration::from_hours(1), |t| {
            t.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(sleep) => {
                let now = Instant::now();
                for r in routers.values_mut() {
                    if r.fsm.next_timeout().is_some_and(|t| t <= now) {
                        let out = r.fsm.on_timeout(now);
                        handle(&io, r, out, &events).await;
                    }
                }
            }
            gone = next_departure(&mut departed) => {
                let now = Instant::now();
                for r in routers.values_mut() {
                    if gone.addr.is_some_and(|a| r.fsm.on_master_gone(now, a)) {
                        info!(vrid = r.vip.vrid, master = gone.name, "VRRP: the master's apilb is gone (flow sync); taking over after the skew time");
                    }
                }
            }
            Ok(()) = tuning.changed() => {
                let t = tuning.borrow_and_update().clone();
                let down = *unhealthy.borrow();
                retune(&mut io, &mut routers, &t, down, &events).await;
            }
            changed = unhealthy.changed() => {
                if changed.is_err() {
                    break;
                }
                let down = *unhealthy.borrow_and_update();
                let now = Instant::now();
                for r in routers.values_mut() {
                    let p = effective_priority(r.vip.priority, down, io.track_weight);
                    info!(vrid = r.vip.vrid, priority = p, no_healthy_backend = down, "VRRP priority changed by health tracking");
                    let out = r.fsm.set_priority(now, p);
                    handle(&io, r, out, &events).await;
                }
            }
            got = io.socket.recv(&mut buf) => match got {
                Ok((envelope, msg)) => {
                    let msg = &buf[msg];
                    if let Err(reason) = receive(&io, &mut routers, envelope, msg, &events).await {
                        *rejected.entry(reason.reason()).or_insert(0) += 1;
                        publish_rejections(&routers, &rejected);
                        refusals.refused(Instant::now(), envelope.src, msg.get(1).copied(), reason);
                    }
                }
                Err(e) => {
                    warn!("VRRP receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let now = Instant::now();
    for r in routers.values_mut() {
        let out = r.fsm.shutdown(now);
        handle(&io, r, out, &events).await;
    }
}

/// A reload's [`Tuning`], applied to each instance: a master advertises a new
/// priority at once; a backup uses it, and the preempt settings, from the next
/// advert it hears.
async fn retune(
    io: &mut Io,
    routers: &mut BTreeMap<u8, Router>,
    t: &Tuning,
    down: bool,
    events: &mpsc::Sender<Ownership>,
) {
    io.track_weight = t.track_weight;
    let now = Instant::now();
    for r in routers.values_mut() {
        let configured = t
            .priorities
            .get(&r.vip.vrid)
            .copied()
            .unwrap_or(r.vip.priority);
        r.vip.priority = configured;
        r.fsm.set_preempt(t.preempt, t.preempt_delay);
        let p = effective_priority(configured, down, io.track_weight);
        info!(
            vrid = r.vip.vrid,
            priority = configured,
            advertised = p,
            track_weight = t.track_weight,
            preempt = t.preempt,
            preempt_delay = ?t.preempt_delay,
            state = r.fsm.state().as_str(),
            "VRRP: reload applied in place"
        );
        let out = r.fsm.set_priority(now, p);
        handle(io, r, out, events).await;
    }
}

/// The priority to advertise: `track_weight` (<= 0) applied while no backend is
/// healthy, kept within 1-254.
fn effective_priority(configured: u8, no_healthy_backend: bool, track_weight: i32) -> u8 {
    if !no_healthy_backend {
        return configured;
    }
    let p = (i32::from(configured) + track_weight).clamp(1, 254);
    u8::try_from(p).unwrap_or(1)
}

async fn receive(
    io: &Io,
    routers: &mut BTreeMap<u8, Router>,
    envelope: socket::Envelope,
    msg: &[u8],
    events: &mpsc::Sender<Ownership>,
) -> Result<(), Reject> {
    let socket::Envelope { ttl, src, dst } = envelope;
    if ttl != packet::TTL {
        return Err(Reject::Ttl);
    }
    if !io.peers.is_empty() && !io.peers.contains(&src) {
        return Err(Reject::Peer);
    }
    let vrid = *msg.get(1).ok_or(Reject::Malformed)?;
    let r = routers.get_mut(&vrid).ok_or(Reject::Vrid)?;
    let advert = packet::decode(msg, src, dst, io.version, &io.auth)?;
    // A peer may carry more addresses on the VRID (keepalived's virtual_ipaddress
    // list); it must carry ours.
    if !advert.addresses.contains(&r.vip.addr) {
        return Err(Reject::Addresses);
    }
    let sync = io.sync.as_ref().map_or(PeerSync::IN_SYNC, |s| {
        let known = s.borrow();
        // Once the sync thread has published its peers, an advert from an
        // address none of them has cannot be matched to a peer's flows.
        if !known.is_empty()
            && !known.contains_key(&src)
            && io
                .strangers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(src)
        {
            warn!(vrid, %src, "VRRP: an advert from an address that is no sync peer's: this node will not wait for its flows before preempting it, nor know when its apilb is gone (a sync peer's address must be the one it sends adverts from)");
        }
        ready::of(&known, src)
    });
    let was_master = r.fsm.state() == State::Master;
    let out =
        r.fsm
            .on_advert_synced(Instant::now(), src, advert.priority, advert.interval, sync)?;
    handle(io, r, out, events).await;
    hold(r, src);
    // A master hearing another master (one that was cut off or stopped and came
    // back) and keeping the VIP announces it again: the network may have
    // followed the other node's announcements meanwhile.
    let rival = was_master && r.fsm.state() == State::Master && advert.priority != 0;
    if rival {
        let _ = events
            .send(Ownership {
                vip: r.vip.addr,
                owned: true,
                reason: format!("vrrp: lower-priority master {src} heard; announcing again"),
            })
            .await;
    }
    Ok(())
}

/// Say whether a backup holds back a preemption for want of the master's flows
/// (`/status`, `vip_preempt_held`), and log when that starts and ends.
fn hold(r: &Router, master: IpAddr) {
    let held = r.fsm.held();
    let why = if held {
        format!("flow sync: master {master}'s flows not all installed here yet")
    } else {
        String::new()
    };
    r.state.send_if_modified(|s| {
        if s.held == why {
            return false;
        }
        if held {
            info!(vip = %r.vip.addr, %master, "VRRP: preemption held until flow sync holds the master's flows");
        } else {
            info!(vip = %r.vip.addr, "VRRP: preemption no longer held by flow sync");
        }
        s.held = why;
        true
    });
}

async fn handle(io: &Io, r: &mut Router, outputs: Vec<Output>, events: &mpsc::Sender<Ownership>) {
    for o in outputs {
        match o {
            Output::SendAdvert { priority } => io.send(r, priority),
            Output::Owned { owned, reason } => {
                if owned {
                    info!(vip = %r.vip.addr, vrid = r.vip.vrid, reason, "VRRP: this node is now master");
                } else {
                    warn!(vip = %r.vip.addr, vrid = r.vip.vrid, reason, "VRRP: this node is no longer master");
                }
                r.state.send_modify(|s| {
                    s.owned = owned;
                    s.transitions += 1;
                    reason.clone_into(&mut s.reason);
                });
                let _ = events
                    .send(Ownership {
                        vip: r.vip.addr,
                        owned,
                        reason: format!("vrrp: {reason}"),
                    })
                    .await;
            }
        }
    }
    let state = match r.fsm.state() {
        State::Initialize => "initialize",
        State::Backup => "backup",
        State::Master => "master",
    };
    let priority = u32::from(r.fsm.priority());
    r.state.send_if_modified(|s| {
        let changed = s.state != state || s.priority != Some(priority);
        state.clone_into(&mut s.state);
        s.priority = Some(priority);
        changed
    });
}

/// Every refusal reason, at 0.
fn no_rejections() -> BTreeMap<&'static str, u64> {
    Reject::ALL.iter().map(|r| (r.reason(), 0)).collect()
}

fn rejection_counts(rejected: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    rejected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect()
}

fn publish_rejections(routers: &BTreeMap<u8, Router>, rejected: &BTreeMap<&'static str, u64>) {
    let counts = rejection_counts(rejected);
    for r in routers.values() {
        r.state.send_modify(|s| s.rejected.clone_from(&counts));
    }
}
