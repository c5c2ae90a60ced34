//! VRRP for VIP ownership (see [`crate::election`]): each VRRP VIP is one virtual
//! router, so apilb can stand in for keepalived on a node, or share a VRID with it.
//!
//! [`packet`] encodes and checks adverts, [`fsm`] is RFC 5798's state machine
//! without I/O; this module gives them a raw IPv4 socket (protocol 112) on the
//! election interface and a clock. One task serves every VRRP VIP:
//!
//! - **Receive.** The kernel hands a raw IPv4 socket the whole datagram, so the TTL
//!   is checked here (255, or the advert may come from off-link), then the sender
//!   (in unicast mode, a configured peer), then the VRID; [`packet::decode`] checks
//!   version, checksum and authentication. Each refusal is counted by reason.
//! - **Send.** TTL 255, to 224.0.0.18 (multicast loop off, so a node never hears
//!   itself) or to each unicast peer. With `source` set, multicast adverts leave
//!   from it (`IP_MULTICAST_IF`) and in unicast mode the socket is bound to it;
//!   otherwise the kernel picks the interface's address for the route.
//! - **Rivals.** A master that hears a lower-priority master (one that was
//!   stopped or cut off and came back) stays master and announces the VIP again,
//!   since the network may have followed the other's announcements meanwhile.
//! - **Tracking.** While no backend is healthy every VIP's priority drops by
//!   `track_weight`, so a peer with working backends takes over.
//! - **Shutdown.** [`VrrpElection::shutdown`] makes each instance that is master send
//!   a priority-0 advert, so its backup takes over after `Skew_Time` rather than the
//!   whole `Master_Down_Interval`.
//!
//! IPv6 VIPs are not served by this task yet; config validation lets a VRRP VIP be
//! IPv4 only.

pub mod fsm;
pub mod packet;

use std::{
    collections::{BTreeMap, HashMap},
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{ElectionState, Ownership};
use crate::config::VrrpSettings;
use fsm::{Instance, Output, Params, State};
use packet::{Advert, Auth, Reject, Version};

const IPPROTO_VRRP: i32 = 112;
const VRRP_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);

#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("VRRP socket on {interface}: {step}")]
    Socket {
        interface: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("VRRP VIP {0} is IPv6; only IPv4 VIPs take part in VRRP so far")]
    Ipv6(IpAddr),
    #[error(
        "interface {0} has no IPv4 address to send VRRP adverts from; set election.vrrp.source"
    )]
    NoSource(String),
    #[error("election.vrrp.auth_pass: {0}")]
    Auth(#[from] packet::PacketError),
}

/// One VRRP VIP: its virtual router id and this node's configured priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VrrpVip {
    pub addr: IpAddr,
    pub vrid: u8,
    pub priority: u8,
}

/// The running VRRP task.
pub struct VrrpElection {
    task: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    states: Vec<(IpAddr, watch::Receiver<ElectionState>)>,
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

    /// Give up every VIP this node is master of, with a priority-0 advert, and stop.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for VrrpElection {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Start VRRP for `vips` on `interface` (inside a tokio runtime, in the network
/// namespace of the interface). `unhealthy` is true while no backend is healthy.
/// Ownership changes go to `events`.
pub async fn spawn(
    settings: &VrrpSettings,
    interface: &str,
    vips: &[VrrpVip],
    unhealthy: watch::Receiver<bool>,
    events: mpsc::Sender<Ownership>,
) -> Result<VrrpElection, VrrpError> {
    if let Some(v) = vips.iter().find(|v| v.addr.is_ipv6()) {
        return Err(VrrpError::Ipv6(v.addr));
    }
    let source = match settings.source {
        Some(IpAddr::V4(a)) => a,
        _ => primary_v4(interface)
            .await
            .ok_or_else(|| VrrpError::NoSource(interface.to_owned()))?,
    };
    let socket = open_v4(settings, interface, source)?;
    let version = if settings.version == 2 {
        Version::V2
    } else {
        Version::V3
    };
    let auth = match &settings.auth_pass {
        Some(p) => Auth::password(p)?,
        None => Auth::None,
    };
    let mut routers = BTreeMap::new();
    let mut states = Vec::new();
    for v in vips {
        let (tx, rx) = watch::channel(ElectionState {
            mode: "vrrp".into(),
            state: "initialize".into(),
            priority: Some(u32::from(v.priority)),
            ..ElectionState::default()
        });
        states.push((v.addr, rx));
        let params = Params {
            version,
            vrid: v.vrid,
            priority: v.priority,
            advert_interval: settings.advert_interval,
            preempt: settings.preempt,
            preempt_delay: settings.preempt_delay,
            primary: IpAddr::V4(source),
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
    let peers: Vec<Ipv4Addr> = settings
        .unicast_peers
        .iter()
        .filter_map(|p| match p {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    // SAFETY: the socket owns its descriptor, which stays open and the same until
    // the AsyncFd (which owns the socket) drops.
    let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| VrrpError::Socket {
        interface: interface.to_owned(),
        step: "registering with tokio",
        source: e.into_parts().1,
    })?;
    let io = Io {
        socket,
        source,
        peers,
        version,
        auth,
        interval: settings.advert_interval,
        track_weight: settings.track_weight,
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(run(io, routers, unhealthy, events, stop_rx));
    Ok(VrrpElection {
        task: Some(task),
        stop: Some(stop_tx),
        states,
    })
}

/// The first IPv4 address of `interface` that is not a /32 (the node's own
/// address, not a VIP), as the kernel lists them.
pub async fn primary_v4(interface: &str) -> Option<Ipv4Addr> {
    use futures_util::TryStreamExt as _;
    use rtnetlink::packet_route::address::AddressAttribute;
    let index = if_index(interface).ok()?;
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    let conn = tokio::spawn(conn);
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut found = None;
    while let Ok(Some(msg)) = addrs.try_next().await {
        if msg.header.prefix_len == 32 {
            continue;
        }
        found = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(v4)) | AddressAttribute::Address(IpAddr::V4(v4)) => {
                Some(*v4)
            }
            _ => None,
        });
        if found.is_some() {
            break;
        }
    }
    conn.abort();
    found
}

fn open_v4(
    settings: &VrrpSettings,
    interface: &str,
    source: Ipv4Addr,
) -> Result<Socket, VrrpError> {
    let err = |step: &'static str| {
        let interface = interface.to_owned();
        move |source| VrrpError::Socket {
            interface,
            step,
            source,
        }
    };
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_VRRP)))
        .map_err(err("opening a raw socket for protocol 112"))?;
    s.bind_device(Some(interface.as_bytes()))
        .map_err(err("binding to the interface"))?;
    s.set_ttl_v4(255).map_err(err("setting TTL 255"))?;
    s.set_multicast_ttl_v4(255)
        .map_err(err("setting multicast TTL 255"))?;
    s.set_multicast_loop_v4(false)
        .map_err(err("turning multicast loop off"))?;
    if settings.unicast_peers.is_empty() {
        let index = if_index(interface).map_err(err("looking up the interface index"))?;
        s.join_multicast_v4_n(&VRRP_GROUP_V4, &InterfaceIndexOrAddress::Index(index))
            .map_err(err("joining 224.0.0.18"))?;
        s.set_multicast_if_v4(&source)
            .map_err(err("choosing the multicast source address"))?;
    } else if settings.source.is_some() {
        // Unicast adverts come to our own address; binding both sets the source
        // of ours and keeps only those.
        s.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))
            .map_err(err("binding to election.vrrp.source"))?;
    }
    s.set_nonblocking(true)
        .map_err(err("making the socket non-blocking"))?;
    Ok(s)
}

fn if_index(interface: &str) -> std::io::Result<u32> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

struct Io {
    socket: AsyncFd<Socket>,
    source: Ipv4Addr,
    peers: Vec<Ipv4Addr>,
    version: Version,
    auth: Auth,
    interval: Duration,
    track_weight: i32,
}

struct Router {
    vip: VrrpVip,
    fsm: Instance,
    state: watch::Sender<ElectionState>,
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
        let targets: Vec<Ipv4Addr> = if self.peers.is_empty() {
            vec![VRRP_GROUP_V4]
        } else {
            self.peers.clone()
        };
        for dst in targets {
            let bytes = match packet::encode(&advert, IpAddr::V4(self.source), IpAddr::V4(dst)) {
                Ok(b) => b,
                Err(e) => {
                    warn!(vrid = r.vip.vrid, "cannot encode a VRRP advert: {e}");
                    return;
                }
            };
            let to = SockAddr::from(SocketAddrV4::new(dst, 0));
            if let Err(e) = self.socket.get_ref().send_to(&bytes, &to) {
                warn!(vrid = r.vip.vrid, %dst, "sending a VRRP advert failed: {e}");
            }
        }
    }

    /// One datagram from the socket, if one is waiting.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&mut self.socket.get_ref()).read(buf)
    }
}

/// A received datagram's IPv4 header fields and its VRRP payload.
fn split_ipv4(datagram: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, &[u8])> {
    let ihl = usize::from(datagram.first()? & 0x0f) * 4;
    if ihl < 20 || datagram.len() < ihl {
        return None;
    }
    let ttl = datagram[8];
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    let dst = Ipv4Addr::new(datagram[16], datagram[17], datagram[18], datagram[19]);
    Some((ttl, src, dst, &datagram[ihl..]))
}

async fn run(
    io: Io,
    mut routers: BTreeMap<u8, Router>,
    mut unhealthy: watch::Receiver<bool>,
    events: mpsc::Sender<Ownership>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut rejected: HashMap<&'static str, u64> = HashMap::new();
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
            ready = io.socket.readable() => {
                let Ok(mut guard) = ready else { break };
                loop {
                    match guard.try_io(|_| io.recv(&mut buf)) {
                        Ok(Ok(n)) => {
                            if let Err(reason) = receive(&io, &mut routers, &buf[..n], &events).await {
                                *rejected.entry(reason.reason()).or_insert(0) += 1;
                                publish_rejections(&routers, &rejected);
                            }
                        }
                        Ok(Err(e)) => {
                            warn!("VRRP receive failed: {e}");
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
        }
    }
    let now = Instant::now();
    for r in routers.values_mut() {
        let out = r.fsm.shutdown(now);
        handle(&io, r, out, &events).await;
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
    datagram: &[u8],
    events: &mpsc::Sender<Ownership>,
) -> Result<(), Reject> {
    let (ttl, src, dst, msg) = split_ipv4(datagram).ok_or(Reject::Malformed)?;
    if ttl != 255 {
        return Err(Reject::Ttl);
    }
    if !io.peers.is_empty() && !io.peers.contains(&src) {
        return Err(Reject::Peer);
    }
    let vrid = *msg.get(1).ok_or(Reject::Malformed)?;
    let r = routers.get_mut(&vrid).ok_or(Reject::Vrid)?;
    let advert = packet::decode(msg, IpAddr::V4(src), IpAddr::V4(dst), io.version, &io.auth)?;
    if advert.addresses != [r.vip.addr] {
        return Err(Reject::Addresses);
    }
    // A master hearing a lower-priority master (one that was cut off or stopped
    // and came back) keeps the VIP, and announces it again: the network may have
    // followed the other node's announcements meanwhile.
    let rival = r.fsm.state() == State::Master
        && advert.priority != 0
        && (advert.priority, u32::from(src)) < (r.fsm.priority(), u32::from(io.source));
    let out = r.fsm.on_advert(
        Instant::now(),
        IpAddr::V4(src),
        advert.priority,
        advert.interval,
    )?;
    handle(io, r, out, events).await;
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

fn publish_rejections(routers: &BTreeMap<u8, Router>, rejected: &HashMap<&'static str, u64>) {
    let counts: BTreeMap<String, u64> = rejected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
    for r in routers.values() {
        r.state.send_modify(|s| s.rejected.clone_from(&counts));
    }
}
