//! The announcements themselves: the bytes of a gratuitous ARP and of an unsolicited
//! neighbour advertisement, and the sockets that send them.
//!
//! Neighbours may still map a VIP to the previous owner's MAC, so the new owner tells
//! them otherwise:
//!
//! - **IPv4**: a gratuitous ARP (a request with sender = target = VIP and our MAC,
//!   to broadcast, as `arping -U` and keepalived send it), through an `AF_PACKET`
//!   socket bound to the interface;
//! - **IPv6**: an unsolicited neighbour advertisement (RFC 4861 7.2.6: to `ff02::1`,
//!   hop limit 255, Override set, Solicited clear, a Target Link-Layer Address option
//!   with our MAC), through a raw `ICMPv6` socket bound to the interface.
//!
//! Linux updates an existing neighbour entry from either even with
//! `arp_accept`/`accept_untracked_na` off.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::AsRawFd as _,
};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

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

/// Send one announcement of `vip` from `mac` out of interface `ifindex`: a gratuitous
/// ARP to broadcast through `packet` (a [`packet_socket`]), or an unsolicited
/// neighbour advertisement to all nodes through `icmpv6` (an [`icmpv6_socket`]).
pub(super) fn announce(
    packet: &Socket,
    icmpv6: &Socket,
    ifindex: u32,
    mac: [u8; 6],
    vip: IpAddr,
) -> io::Result<()> {
    match vip {
        IpAddr::V4(v4) => {
            let to = link_addr(ifindex, ETH_P_ARP, BROADCAST);
            packet.send_to(&gratuitous_arp(mac, v4), &to)?;
        }
        IpAddr::V6(v6) => {
            let to = SocketAddrV6::new(ALL_NODES, 0, 0, ifindex);
            icmpv6.send_to(&unsolicited_na(mac, v6), &to.into())?;
        }
    }
    Ok(())
}

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
pub(super) fn packet_socket(ifindex: u32) -> io::Result<Socket> {
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
pub(super) fn icmpv6_socket(interface: &str, ifindex: u32) -> io::Result<Socket> {
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
}
