//! The XDP mode an interface runs its program in, as the kernel reports it
//! (`IFLA_XDP_ATTACHED`). An adopted link keeps the mode it was created with, and
//! the link itself does not say which that was, so the loader asks the interface.

use std::io;

use aya::programs::XdpMode;
use rtnetlink::{
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

/// The mode of the XDP program attached to interface `ifindex` in this thread's
/// network namespace; `None` if none is attached or the kernel reports a mode
/// apilb never uses (offloaded, or several at once).
pub(super) fn attached(ifindex: u32) -> io::Result<Option<XdpMode>> {
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
    let link = match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
        NetlinkPayload::Error(e) => return Err(e.to_io()),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to RTM_GETLINK: {other:?}"),
            ));
        }
    };
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
