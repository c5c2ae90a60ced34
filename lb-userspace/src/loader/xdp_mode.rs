//! What the loader asks the kernel about an interface: the XDP mode it runs its
//! program in (`IFLA_XDP_ATTACHED`; an adopted link keeps the mode it was created
//! with, and the link itself does not say which that was), and whether it is a
//! veth, where native mode needs what apilb cannot see (`is_veth`).

use std::io;

use aya::programs::XdpMode;
use rtnetlink::{
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

/// The mode of the XDP program attached to interface `ifindex` in this thread's
/// network namespace; `None` if none is attached or the kernel reports a mode
/// apilb never uses (offloaded, or several at once).
pub(super) fn attached(ifindex: u32) -> io::Result<Option<XdpMode>> {
    let link = get_link(ifindex)?;
    let attached = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::Attached(a) => Some(*a),
            _ => None,
        }),
        _ => None,
    });
    Ok(match attached {
        Some(XdpAttached::Driver) => Some(XdpMode::Driver),
        Some(XdpAttached::SocketBuffer) => Some(XdpMode::Skb),
        _ => None,
    })
}

/// Whether interface `ifindex` is one end of a veth pair.
///
/// A veth delivers the frames its native XDP program sends back (`XDP_TX`) or
/// redirects into it only while its peer has NAPI on, which in practice means
/// an XDP program on the peer (turning the peer's GRO on did not, on 6.18);
/// otherwise the kernel drops them without a word. The peer of a container's or
/// a kind node's interface is in the host's namespace, out of apilb's reach.
pub(super) fn is_veth(ifindex: u32) -> io::Result<bool> {
    Ok(kind(ifindex)? == Some(InfoKind::Veth))
}

/// Whether interface `ifindex` may hand the program TCP segments with partial
/// checksums: a veth (its peer's transmit offload) or a tun/tap device (a
/// writer's `virtio_net_hdr`). A NIC's receive path never does.
pub(super) fn may_send_partial(ifindex: u32) -> io::Result<bool> {
    Ok(matches!(
        kind(ifindex)?,
        Some(InfoKind::Veth | InfoKind::Tun)
    ))
}

/// The interface's link kind (`IFLA_INFO_KIND`), if it has one: a NIC has none.
fn kind(ifindex: u32) -> io::Result<Option<InfoKind>> {
    let link = get_link(ifindex)?;
    Ok(link.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    }))
}

/// The kernel's `RTM_GETLINK` answer for interface `ifindex`.
fn get_link(ifindex: u32) -> io::Result<LinkMessage> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let mut msg = NetlinkMessage::from(RouteNetlinkMessage::GetLink(request));
    msg.header.flags = NLM_F_REQUEST;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut reply = Vec::with_capacity(32 * 1024);
    socket.recv(&mut reply, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(link),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to RTM_GETLINK: {other:?}"),
        )),
    }
}
