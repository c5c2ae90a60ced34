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
//!   this node answers for the VIP any more. The address goes on and off through
//!   `netlink`, a small rtnetlink client.
//! - **The announcement.** Neighbours may still map the VIP to the previous owner's
//!   MAC, so [`Announcer::claim`] announces the new mapping `count` times,
//!   `interval` apart: a gratuitous ARP for IPv4, an unsolicited neighbour
//!   advertisement for IPv6 (`frames` has their bytes and the sockets that send
//!   them).
//!
//! Every socket (netlink, packet, `ICMPv6`) is opened by [`Announcer::new`], so an
//! announcer works in the network namespace it was created in, whichever thread
//! later drives it.

mod frames;
mod netlink;

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rtnetlink::packet_route::address::AddressMessage;
use socket2::Socket;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use frames::{icmpv6_socket, packet_socket};
use netlink::{Netlink, local_address};

/// Why an [`Announcer`] could not be made or could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface {interface:?} does not exist in this network namespace")]
    NoSuchInterface { interface: String },
    #[error("interface {interface:?} is not Ethernet (no 6-byte MAC address to announce)")]
    NotEthernet { interface: String },
    #[error("interface {interface:?}: {step}{}", crate::privilege::denied(.source, .step.needs()))]
    Setup {
        interface: String,
        step: SetupStep,
        #[source]
        source: io::Error,
    },
    #[error("VIP {vip} on interface {interface:?}: {step}{}", crate::privilege::denied(.source, .step.needs()))]
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

impl SetupStep {
    /// The capabilities the step needs (`crate::privilege`).
    fn needs(self) -> &'static [&'static str] {
        match self {
            Self::OpenNetlink | Self::LookUpLink => &[],
            Self::OpenPacketSocket | Self::OpenIcmpv6Socket => &[crate::privilege::CAP_NET_RAW],
        }
    }
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

impl VipStep {
    /// The capabilities the step needs (`crate::privilege`).
    fn needs(self) -> &'static [&'static str] {
        match self {
            Self::ListAddresses => &[],
            Self::AddAddress | Self::RemoveAddress => &[crate::privilege::CAP_NET_ADMIN],
            Self::SendGratuitousArp | Self::SendNeighbourAdvertisement => {
                &[crate::privilege::CAP_NET_RAW]
            }
        }
    }
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
        let step = match vip {
            IpAddr::V4(_) => VipStep::SendGratuitousArp,
            IpAddr::V6(_) => VipStep::SendNeighbourAdvertisement,
        };
        frames::announce(&self.packet, &self.icmpv6, self.ifindex, self.mac, vip)
            .map_err(|e| self.error(vip, step, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_interface_address_and_step() {
        let e = AnnounceError::Vip {
            interface: "eth0".into(),
            vip: "203.0.113.100".parse().unwrap(),
            step: VipStep::AddAddress,
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        // EPERM: the message also names the capability the step needs.
        let said = e.to_string();
        assert!(
            said.starts_with("VIP 203.0.113.100 on interface \"eth0\": adding the address; denied"),
            "{said}"
        );
        assert!(said.contains(crate::privilege::CAP_NET_ADMIN), "{said}");
        let e = AnnounceError::NoSuchInterface {
            interface: "nosuch0".into(),
        };
        assert!(e.to_string().contains("\"nosuch0\""), "{e}");
    }
}
