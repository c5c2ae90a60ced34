//! A VIP's address on this node's interface, and its announcement to the segment.
//!
//! apilb decides (by VRRP or etcd) that this node owns a VIP; this module makes the
//! network agree. The election says who should have the address; [`Announcer`] gives
//! it to this node and tells the neighbours.
//!
//! - **The address is on the interface** (IPv4 `/32`, IPv6 `/128` with
//!   `IFA_F_NODAD`, so it is usable at once rather than after duplicate address
//!   detection). With it there, the kernel itself answers ARP and neighbour
//!   solicitations for the VIP, and accepts the VIP's traffic that the XDP program
//!   passes up (anything but the balanced ports: ICMP, probes, the node's own
//!   connections). [`Announcer::release`] removes it, and both stop: nothing on
//!   this node answers for the VIP any more.
//! - **The announcement.** Neighbours may still map the VIP to the previous owner's
//!   MAC, so [`Announcer::claim`] announces the new mapping `count` times,
//!   `interval` apart: for IPv4 a gratuitous ARP (a request with sender = target =
//!   VIP and our MAC, to broadcast, as `arping -U` and keepalived send it), through
//!   an `AF_PACKET` socket bound to the interface; for IPv6 an unsolicited neighbour
//!   advertisement (RFC 4861 7.2.6: to `ff02::1`, hop limit 255, Override set,
//!   Solicited clear, a Target Link-Layer Address option with our MAC), through a
//!   raw `ICMPv6` socket bound to the interface. Linux updates an existing neighbour
//!   entry from either even with `arp_accept`/`accept_untracked_na` off.
//!
//! Every socket (netlink, packet, `ICMPv6`) is opened by [`Announcer::new`], so an
//! announcer works in the network namespace it was created in, whichever thread
//! later drives it. Netlink requests go through `rtnetlink`'s socket and message
//! types directly, over that one socket.

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rtnetlink::{
    AddressMessageBuilder,
    packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer,
        NetlinkMessage, NetlinkPayload,
    },
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
        link::{LinkAttribute, LinkLayerType, LinkMessage},
    },
    sys::{
        AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE,
    },
};
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

/// Why an [`Announcer`] could not be made or could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface {interface:?} does not exist in this network namespace")]
    NoSuchInterface { interface: String },
    #[error("interface {interface:?} is not Ethernet (no 6-byte MAC address to announce)")]
    NotEthernet { interface: String },
    #[error("interface {interface:?}: {step}")]
    Setup {
        interface: String,
        step: SetupStep,
        #[source]
        source: io::Error,
    },
    #[error("VIP {vip} on interface {interface:?}: {step}")]
    Vip {
        interface: String,
        vip: IpAddr,
        step: VipStep,
        #[source]
        source: io::Error,
    },
}

/// The step of [`Announcer::new`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    OpenNetlink,
    LookUpLink,
    OpenPacketSocket,
    OpenIcmpv6Socket,
}

impl fmt::Display for SetupStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OpenNetlink => "opening a netlink socket",
            Self::LookUpLink => "looking up its index and MAC address",
            Self::OpenPacketSocket => "opening the AF_PACKET socket for gratuitous ARP",
            Self::OpenIcmpv6Socket => "opening the raw ICMPv6 socket for neighbour advertisements",
        })
    }
}

/// The step of [`Announcer::claim`], [`Announcer::release`] or [`Announcer::holds`]
/// that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipStep {
    ListAddresses,
    AddAddress,
    RemoveAddress,
    SendGratuitousArp,
    SendNeighbourAdvertisement,
}

impl fmt::Display for VipStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ListAddresses => "listing the interface's addresses",
            Self::AddAddress => "adding the address",
            Self::RemoveAddress => "removing the address",
            Self::SendGratuitousArp => "sending a gratuitous ARP",
            Self::SendNeighbourAdvertisement => "sending an unsolicited neighbour advertisement",
        })
    }
}

/// One interface's VIP addresses and their announcements.
///
/// Made inside the network namespace it is to work in (the process's, or the
/// calling thread's after `setns`), on the tokio runtime that will drive it.
/// Dropping it stops announcements still pending; the addresses stay.
pub struct Announcer {
    link: Arc<Link>,
    netlink: Netlink,
    /// Repeat announcements still running, per VIP, so that a new claim or a
    /// release stops them: a late announcement for a released VIP would pull its
    /// traffic back from the node that owns it now.
    repeats: Mutex<HashMap<IpAddr, AbortHandle>>,
    /// Held for a whole claim or release, so that concurrent ones of a VIP cannot
    /// interleave (a release between a claim's check and its scheduling of repeats
    /// would leave the repeats running).
    ops: tokio::sync::Mutex<()>,
}

/// The interface and the sockets that announce on it, shared with the tasks that
/// send repeat announcements.
struct Link {
    interface: String,
    ifindex: u32,
    mac: [u8; 6],
    /// `AF_PACKET`, bound to the interface with protocol 0, so it receives nothing.
    packet: Socket,
    /// Raw `ICMPv6`, bound to the interface, hop limits 255, every type filtered out
    /// on receive.
    icmpv6: Socket,
}

impl Announcer {
    /// Look `interface` up (index and MAC, through rtnetlink) and open the sockets
    /// that announce on it.
    pub async fn new(interface: &str) -> Result<Self, AnnounceError> {
        let setup = |step| {
            move |source| AnnounceError::Setup {
                interface: interface.to_owned(),
                step,
                source,
            }
        };
        let netlink = Netlink::open().map_err(setup(SetupStep::OpenNetlink))?;
        let (ifindex, mac) = netlink.link(interface).await?;
        let packet = packet_socket(ifindex).map_err(setup(SetupStep::OpenPacketSocket))?;
        let icmpv6 =
            icmpv6_socket(interface, ifindex).map_err(setup(SetupStep::OpenIcmpv6Socket))?;
        debug!(interface, ifindex, mac = %Mac(mac), "announcer ready");
        Ok(Self {
            link: Arc::new(Link {
                interface: interface.to_owned(),
                ifindex,
                mac,
                packet,
                icmpv6,
            }),
            netlink,
            repeats: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    pub fn interface(&self) -> &str {
        &self.link.interface
    }

    pub fn ifindex(&self) -> u32 {
        self.link.ifindex
    }

    /// The MAC address the announcements carry (read once, by [`Announcer::new`]).
    pub fn mac(&self) -> [u8; 6] {
        self.link.mac
    }

    /// Put `vip` on the interface unless it is there already, then announce it
    /// `count` times, `interval` apart. The first announcement is sent before this
    /// returns (its failure is this call's error); the rest run in a spawned task,
    /// which a later `claim` or [`Announcer::release`] of the same VIP stops, and
    /// whose failures are logged.
    pub async fn claim(
        &self,
        vip: IpAddr,
        count: u32,
        interval: Duration,
    ) -> Result<(), AnnounceError> {
        let _op = self.ops.lock().await;
        self.stop_repeats(vip);
        if self.find(vip).await?.is_none() {
            self.netlink
                .add_address(self.link.ifindex, vip)
                .await
                .map_err(|e| self.link.error(vip, VipStep::AddAddress, e))?;
            info!(interface = %self.link.interface, %vip, "VIP address added");
        }
        if count == 0 {
            return Ok(());
        }
        self.link.announce(vip)?;
        if count > 1 {
            let link = Arc::clone(&self.link);
            let task = tokio::spawn(async move {
                for _ in 1..count {
                    tokio::time::sleep(interval).await;
                    if let Err(e) = link.announce(vip) {
                        warn!(error = %e, cause = %source_of(&e), "repeat announcement failed");
                    }
                }
            });
            let mut repeats = self.repeats.lock().unwrap_or_else(PoisonError::into_inner);
            repeats.retain(|_, task| !task.is_finished());
            if let Some(earlier) = repeats.insert(vip, task.abort_handle()) {
                earlier.abort();
            }
        }
        Ok(())
    }

    /// Stop announcing `vip` and take its address off the interface (an absent
    /// address is fine). Afterwards nothing on this node answers ARP or neighbour
    /// solicitations for it.
    pub async fn release(&self, vip: IpAddr) -> Result<(), AnnounceError> {
        let _op = self.ops.lock().await;
        self.stop_repeats(vip);
        let Some(found) = self.find(vip).await? else {
            return Ok(());
        };
        self.netlink
            .del_address(found)
            .await
            .map_err(|e| self.link.error(vip, VipStep::RemoveAddress, e))?;
        info!(interface = %self.link.interface, %vip, "VIP address removed");
        Ok(())
    }

    /// Whether `vip` is an address of the interface (with any prefix length).
    pub async fn holds(&self, vip: IpAddr) -> Result<bool, AnnounceError> {
        Ok(self.find(vip).await?.is_some())
    }

    /// The node's own address of a family on the interface, that its VRRP adverts
    /// leave from: IPv4, the first that is not a /32 (a VIP); IPv6, the link-local
    /// one.
    pub async fn own_address(&self, v6: bool) -> Result<Option<IpAddr>, AnnounceError> {
        let probe = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let addresses = self
            .netlink
            .addresses(self.link.ifindex, probe)
            .await
            .map_err(|e| self.link.error(probe, VipStep::ListAddresses, e))?;
        Ok(addresses.iter().find_map(|a| match local_address(a)? {
            IpAddr::V4(v4) if a.header.prefix_len != 32 => Some(IpAddr::V4(v4)),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(IpAddr::V6(v6)),
            _ => None,
        }))
    }

    async fn find(&self, vip: IpAddr) -> Result<Option<AddressMessage>, AnnounceError> {
        let addresses = self
            .netlink
            .addresses(self.link.ifindex, vip)
            .await
            .map_err(|e| self.link.error(vip, VipStep::ListAddresses, e))?;
        Ok(addresses
            .into_iter()
            .find(|a| a.header.index == self.link.ifindex && local_address(a) == Some(vip)))
    }

    fn stop_repeats(&self, vip: IpAddr) {
        let mut repeats = self.repeats.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = repeats.remove(&vip) {
            task.abort();
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let repeats = self
            .repeats
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, task) in repeats.drain() {
            task.abort();
        }
    }
}

impl Link {
    /// Send one announcement of `vip`: gratuitous ARP or unsolicited NA.
    fn announce(&self, vip: IpAddr) -> Result<(), AnnounceError> {
        match vip {
            IpAddr::V4(v4) => {
                let frame = gratuitous_arp(self.mac, v4);
                let to = link_addr(self.ifindex, ETH_P_ARP, BROADCAST);
                self.packet
                    .send_to(&frame, &to)
                    .map_err(|e| self.error(vip, VipStep::SendGratuitousArp, e))?;
            }
            IpAddr::V6(v6) => {
                let message = unsolicited_na(self.mac, v6);
                let to = SocketAddrV6::new(ALL_NODES, 0, 0, self.ifindex);
                self.icmpv6
                    .send_to(&message, &to.into())
                    .map_err(|e| self.error(vip, VipStep::SendNeighbourAdvertisement, e))?;
            }
        }
        debug!(interface = %self.interface, %vip, "VIP announced");
        Ok(())
    }

    fn error(&self, vip: IpAddr, step: VipStep, source: io::Error) -> AnnounceError {
        AnnounceError::Vip {
            interface: self.interface.clone(),
            vip,
            step,
            source,
        }
    }
}

/// The underlying OS error of `e`, for logs that show one line.
fn source_of(e: &AnnounceError) -> String {
    std::error::Error::source(e).map_or_else(String::new, ToString::to_string)
}

/// A MAC address printed the usual way.
struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Frames.

const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// The Override flag, in the first byte after the `ICMPv6` checksum (R = 0x80 and
/// S = 0x40 stay clear: we do not claim to be a router, and nobody asked).
const NA_FLAG_OVERRIDE: u8 = 0x20;
const ND_OPT_TARGET_LINKADDR: u8 = 2;

/// A gratuitous ARP for `vip` from `mac`: an Ethernet broadcast carrying an ARP
/// request (RFC 826) whose sender and target protocol addresses are both the VIP,
/// sender hardware address ours and target hardware address broadcast, the form of
/// `arping -U` and keepalived. 14 bytes of Ethernet header, 28 of ARP.
fn gratuitous_arp(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0; 42];
    frame[0..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let arp = &mut frame[14..];
    arp[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    arp[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    arp[4] = 6; // hardware address length
    arp[5] = 4; // protocol address length
    arp[6..8].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&mac); // sender hardware address
    arp[14..18].copy_from_slice(&vip.octets()); // sender protocol address
    arp[18..24].copy_from_slice(&BROADCAST); // target hardware address
    arp[24..28].copy_from_slice(&vip.octets()); // target protocol address
    frame
}

/// An unsolicited neighbour advertisement for `vip` from `mac` (RFC 4861 4.4 and
/// 7.2.6), as the `ICMPv6` message a raw socket sends: type 136, code 0, checksum left
/// 0 for the kernel, Override set, target the VIP, then a Target Link-Layer Address
/// option (type 2, length 1 = 8 bytes) with our MAC.
fn unsolicited_na(mac: [u8; 6], vip: Ipv6Addr) -> [u8; 32] {
    let mut message = [0; 32];
    message[0] = ND_NEIGHBOR_ADVERT;
    message[4] = NA_FLAG_OVERRIDE;
    message[8..24].copy_from_slice(&vip.octets());
    message[24] = ND_OPT_TARGET_LINKADDR;
    message[25] = 1;
    message[26..32].copy_from_slice(&mac);
    message
}

// ---------------------------------------------------------------------------------
// Sockets.

/// A `sockaddr_ll` for the interface: `protocol` (host order; 0 for "none") and the
/// destination hardware address `dest`.
fn link_addr(ifindex: u32, protocol: u16, dest: [u8; 6]) -> SockAddr {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: `sockaddr_ll` is one of this platform's socket address types, and
    // `view_as` checks that it fits in the storage.
    let ll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    ll.sll_family = AF_PACKET;
    ll.sll_protocol = protocol.to_be();
    ll.sll_ifindex = ifindex.cast_signed();
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&dest);
    let len = u32::try_from(size_of::<libc::sockaddr_ll>()).expect("sockaddr_ll fits a socklen_t");
    // SAFETY: the storage holds a `sockaddr_ll` (zeroed, then every field that
    // matters set) with family AF_PACKET, and `len` is that type's size.
    unsafe { SockAddr::new(storage, len) }
}

#[expect(clippy::cast_possible_truncation, reason = "AF_PACKET is 17")]
const AF_PACKET: u16 = libc::AF_PACKET as u16;

/// An `AF_PACKET` raw socket bound to the interface with protocol 0: it sends
/// whole frames there and receives nothing.
fn packet_socket(ifindex: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::PACKET, Type::RAW, None)?;
    socket.bind(&link_addr(ifindex, 0, [0; 6]))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// `ICMP6_FILTER` at level `IPPROTO_ICMPV6` (linux/icmpv6.h), which libc lacks.
const ICMPV6_FILTER: libc::c_int = 1;

/// A raw `ICMPv6` socket bound to the interface, hop limits 255 (receivers drop
/// neighbour discovery with less), multicast out of the interface and not looped
/// back, every `ICMPv6` type filtered out on receive. The kernel fills in the `ICMPv6`
/// checksum of raw `ICMPv6` sockets.
fn icmpv6_socket(interface: &str, ifindex: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_multicast_if_v6(ifindex)?;
    socket.set_multicast_hops_v6(255)?;
    socket.set_unicast_hops_v6(255)?;
    socket.set_multicast_loop_v6(false)?;
    // Bit set = type blocked; all set, so no ICMPv6 message queues up unread.
    let block_all = [u32::MAX; 8];
    let len = u32::try_from(size_of_val(&block_all)).expect("32 bytes fit a socklen_t");
    // SAFETY: the fd is a valid socket for the call; the option value points to
    // `block_all`, a `struct icmp6_filter` (8 x u32) that lives across the call, and
    // `len` is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMPV6_FILTER,
            block_all.as_ptr().cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

// ---------------------------------------------------------------------------------
// Netlink.

/// An `NETLINK_ROUTE` socket with one request in flight at a time.
struct Netlink {
    /// The socket and the last sequence number used. Replies with another sequence
    /// number (left over from a request whose future was dropped) are skipped.
    socket: tokio::sync::Mutex<(TokioSocket, u32)>,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket.socket_mut().bind_auto()?;
        socket.socket_mut().connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket: tokio::sync::Mutex::new((socket, 0)),
        })
    }

    /// The index and MAC address of `interface`.
    async fn link(&self, interface: &str) -> Result<(u32, [u8; 6]), AnnounceError> {
        // IFNAMSIZ is 16 with the NUL: a longer name cannot exist.
        if interface.is_empty() || interface.len() > 15 {
            return Err(AnnounceError::NoSuchInterface {
                interface: interface.to_owned(),
            });
        }
        let mut request = LinkMessage::default();
        request
            .attributes
            .push(LinkAttribute::IfName(interface.to_owned()));
        let replies = self
            .request(RouteNetlinkMessage::GetLink(request), NLM_F_ACK)
            .await
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::ENODEV) {
                    AnnounceError::NoSuchInterface {
                        interface: interface.to_owned(),
                    }
                } else {
                    AnnounceError::Setup {
                        interface: interface.to_owned(),
                        step: SetupStep::LookUpLink,
                        source,
                    }
                }
            })?;
        let link = replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .ok_or_else(|| AnnounceError::NoSuchInterface {
                interface: interface.to_owned(),
            })?;
        let mac = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => None,
        });
        match mac {
            Some(mac) if link.header.link_layer_type == LinkLayerType::Ether => {
                Ok((link.header.index, mac))
            }
            _ => Err(AnnounceError::NotEthernet {
                interface: interface.to_owned(),
            }),
        }
    }

    /// The addresses of `vip`'s family on interface `ifindex`.
    async fn addresses(&self, ifindex: u32, vip: IpAddr) -> io::Result<Vec<AddressMessage>> {
        let mut request = AddressMessage::default();
        request.header.family = family(vip);
        request.header.index = ifindex;
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(request), NLM_F_DUMP)
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == ifindex => Some(a),
                _ => None,
            })
            .collect())
    }

    /// Add `vip` as a host address (IPv6 without duplicate address detection).
    /// One that appeared meanwhile is fine.
    async fn add_address(&self, ifindex: u32, vip: IpAddr) -> io::Result<()> {
        let request = match vip {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(ifindex)
                .address(v4, 32)
                .build(),
            IpAddr::V6(v6) => {
                let mut m = AddressMessageBuilder::<Ipv6Addr>::new()
                    .index(ifindex)
                    .address(v6, 128)
                    .build();
                m.header.flags = AddressHeaderFlags::Nodad;
                m
            }
        };
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        match self
            .request(RouteNetlinkMessage::NewAddress(request), flags)
            .await
        {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Delete the address `found` (as listed). One that went meanwhile is fine.
    async fn del_address(&self, found: AddressMessage) -> io::Result<()> {
        let mut request = AddressMessage::default();
        request.header = found.header;
        request.attributes = found
            .attributes
            .into_iter()
            .filter(|a| matches!(a, AddressAttribute::Address(_) | AddressAttribute::Local(_)))
            .collect();
        match self
            .request(RouteNetlinkMessage::DelAddress(request), NLM_F_ACK)
            .await
        {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Send one request (`flags` besides `NLM_F_REQUEST`: `NLM_F_ACK` for a
    /// single-shot request, `NLM_F_DUMP` for a dump) and collect its replies up to
    /// the ACK or the end of the dump. A kernel error comes back as the `io::Error`.
    async fn request(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut guard = self.socket.lock().await;
        let (socket, last_seq) = &mut *guard;
        *last_seq = last_seq.wrapping_add(1);
        let seq = *last_seq;
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | flags;
        request.header.sequence_number = seq;
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf).await?;

        let mut replies = Vec::new();
        loop {
            let (datagram, _) = socket.recv_from_full().await?;
            for reply in split_messages(&datagram)? {
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(replies),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }
}

/// The netlink messages in one datagram, each starting at a 4-byte boundary.
fn split_messages(mut datagram: &[u8]) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut messages = Vec::new();
    while !datagram.is_empty() {
        let len = NetlinkBuffer::new_checked(datagram)
            .map_err(invalid)?
            .length() as usize;
        let message = NetlinkMessage::deserialize(&datagram[..len]).map_err(invalid)?;
        messages.push(message);
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
    }
    Ok(messages)
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// An address message's own address: `IFA_LOCAL` where there is one (on a
/// point-to-point link `IFA_ADDRESS` is the peer), else `IFA_ADDRESS`.
fn local_address(message: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(local) => return Some(*local),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    address
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0a, 0x01];

    #[test]
    fn gratuitous_arp_bytes() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(203, 0, 113, 100));
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            // Ethernet: broadcast, from us, ARP
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x02, 0x00, 0x00, 0x00, 0x0a, 0x01,
            0x08, 0x06,
            // ARP: Ethernet, IPv4, 6, 4, request
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
            // sender: our MAC, the VIP
            0x02, 0x00, 0x00, 0x00, 0x0a, 0x01, 203, 0, 113, 100,
            // target: broadcast, the VIP
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 203, 0, 113, 100,
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn unsolicited_na_bytes() {
        let message = unsolicited_na(MAC, "fd00:203::100".parse().unwrap());
        #[rustfmt::skip]
        let expected: [u8; 32] = [
            // type 136, code 0, checksum for the kernel
            136, 0, 0, 0,
            // R = 0, S = 0, O = 1, reserved
            0x20, 0, 0, 0,
            // target
            0xfd, 0x00, 0x02, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00,
            // Target Link-Layer Address option, 8 bytes, our MAC
            2, 1, 0x02, 0x00, 0x00, 0x00, 0x0a, 0x01,
        ];
        assert_eq!(message, expected);
    }

    #[test]
    fn link_addr_is_a_sockaddr_ll() {
        let addr = link_addr(7, ETH_P_ARP, BROADCAST);
        assert_eq!(addr.family(), AF_PACKET);
        assert_eq!(addr.len() as usize, size_of::<libc::sockaddr_ll>());
        // SAFETY: `link_addr` built a sockaddr_ll, which the storage holds.
        let ll = unsafe { &*addr.as_ptr().cast::<libc::sockaddr_ll>() };
        assert_eq!(u16::from_be(ll.sll_protocol), 0x0806);
        assert_eq!(ll.sll_ifindex, 7);
        assert_eq!(ll.sll_halen, 6);
        assert_eq!(ll.sll_addr, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
    }

    #[test]
    fn local_address_prefers_ifa_local() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let local: IpAddr = "10.0.0.1".parse().unwrap();
        let mut m = AddressMessage::default();
        m.attributes.push(AddressAttribute::Address(peer));
        assert_eq!(local_address(&m), Some(peer));
        m.attributes.push(AddressAttribute::Local(local));
        assert_eq!(local_address(&m), Some(local));
    }

    #[test]
    fn split_messages_reads_every_message_of_a_datagram() {
        let mut one = AddressMessage::default();
        one.header.index = 3;
        let mut two = AddressMessage::default();
        two.header.index = 4;
        let mut datagram = Vec::new();
        for m in [one, two] {
            let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(m));
            message.finalize();
            let mut buf = vec![0; message.buffer_len()];
            message.serialize(&mut buf);
            datagram.extend_from_slice(&buf);
        }
        let indexes: Vec<u32> = split_messages(&datagram)
            .unwrap()
            .into_iter()
            .map(|m| match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => a.header.index,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(indexes, [3, 4]);
    }

    #[test]
    fn errors_name_interface_address_and_step() {
        let e = AnnounceError::Vip {
            interface: "eth0".into(),
            vip: "203.0.113.100".parse().unwrap(),
            step: VipStep::AddAddress,
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            e.to_string(),
            "VIP 203.0.113.100 on interface \"eth0\": adding the address"
        );
        let e = AnnounceError::NoSuchInterface {
            interface: "nosuch0".into(),
        };
        assert!(e.to_string().contains("\"nosuch0\""), "{e}");
    }
}
