//! A small rtnetlink client: the interface's index and MAC, and its addresses
//! listed, added and deleted.
//!
//! [`super::Announcer`] needs four requests and no more, so they go through
//! `rtnetlink`'s socket and message types directly, over one `NETLINK_ROUTE` socket
//! that [`Netlink::open`] opens in the network namespace of the caller.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

use super::{AnnounceError, SetupStep};

/// An `NETLINK_ROUTE` socket with one request in flight at a time.
pub(super) struct Netlink {
    /// The socket and the last sequence number used. Replies with another sequence
    /// number (left over from a request whose future was dropped) are skipped.
    socket: tokio::sync::Mutex<(TokioSocket, u32)>,
}

impl Netlink {
    pub(super) fn open() -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket.socket_mut().bind_auto()?;
        socket.socket_mut().connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket: tokio::sync::Mutex::new((socket, 0)),
        })
    }

    /// The index and MAC address of `interface`.
    pub(super) async fn link(&self, interface: &str) -> Result<(u32, [u8; 6]), AnnounceError> {
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
    pub(super) async fn addresses(
        &self,
        ifindex: u32,
        vip: IpAddr,
    ) -> io::Result<Vec<AddressMessage>> {
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
    pub(super) async fn add_address(&self, ifindex: u32, vip: IpAddr) -> io::Result<()> {
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
    pub(super) async fn del_address(&self, found: AddressMessage) -> io::Result<()> {
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
pub(super) fn local_address(message: &AddressMessage) -> Option<IpAddr> {
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
}
