//! The raw VRRP sockets (IP protocol 112) on the election interface, one per
//! address family: they send with TTL / hop limit 255 and hand the runner what it
//! must check on receipt (sender, destination, TTL / hop limit).
//!
//! - **IPv4.** A raw IPv4 socket receives the whole datagram, header included, so
//!   TTL and addresses come from the header. Multicast goes to 224.0.0.18 from
//!   `IP_MULTICAST_IF`'s address; in unicast mode the socket is bound to the
//!   source (which also keeps only adverts sent to it).
//! - **IPv6.** A raw IPv6 socket receives the payload only; the hop limit and the
//!   destination arrive as ancillary data (`IPV6_RECVHOPLIMIT`,
//!   `IPV6_RECVPKTINFO`). Adverts leave from the interface's link-local address, as
//!   RFC 5798 requires, to `ff02::12` or the peers. `IPV6_CHECKSUM` makes the kernel
//!   fill and verify the checksum with the pseudo-header of the addresses it
//!   actually used, as keepalived does.
//!
//! Multicast loop is off, so a node never hears its own adverts. Adverts are
//! marked network control (TOS / traffic class 0xc0, DSCP CS6), as keepalived
//! marks them, so that a queue that honours it does not drop them under load.

use std::{
    io::Read as _,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd as _,
};

use socket2::{
    Domain, InterfaceIndexOrAddress, MaybeUninitSlice, MsgHdrMut, Protocol, SockAddr, Socket, Type,
};
use tokio::io::unix::AsyncFd;

use super::{VrrpError, packet};

/// The IPv4 TOS and IPv6 traffic class of every advert: network control (DSCP
/// CS6, `IPTOS_PREC_INTERNETCONTROL`), keepalived's marking.
pub const TOS: u8 = 0xc0;

/// A received advert's envelope.
#[derive(Clone, Copy, Debug)]
pub struct Envelope {
    pub ttl: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// One address family's VRRP socket.
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    ifindex: u32,
    /// The address adverts leave from (and the tie-break address).
    pub source: IpAddr,
}

impl VrrpSocket {
    /// Open the socket of `source`'s family on `interface` (index `ifindex`);
    /// `multicast` joins the VRRP group, `bind` (IPv4 unicast) binds to the source.
    pub fn open(
        interface: &str,
        ifindex: u32,
        source: IpAddr,
        multicast: bool,
        bind: bool,
    ) -> Result<Self, VrrpError> {
        let err = |step: &'static str| {
            let interface = interface.to_owned();
            move |source| VrrpError::Socket {
                interface,
                step,
                source,
            }
        };

        let domain = if source.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = Socket::new(
            domain,
            Type::RAW,
            Some(Protocol::from(i32::from(packet::PROTOCOL))),
        )
        .map_err(err("opening a raw socket for protocol 112"))?;
        s.bind_device(Some(interface.as_bytes()))
            .map_err(err("binding to the interface"))?;
        match source {
            IpAddr::V4(src) => {
                s.set_ttl_v4(u32::from(packet::TTL))
                    .map_err(err("setting TTL 255"))?;
                s.set_tos_v4(u32::from(TOS))
                    .map_err(err("setting TOS 0xc0 (network control)"))?;
                s.set_multicast_ttl_v4(u32::from(packet::TTL))
                    .map_err(err("setting multicast TTL 255"))?;
                s.set_multicast_loop_v4(false)
                    .map_err(err("turning multicast loop off"))?;
                if multicast {
                    s.join_multicast_v4_n(
                        &packet::MULTICAST_V4,
                        &InterfaceIndexOrAddress::Index(ifindex),
                    )
                    .map_err(err("joining 224.0.0.18"))?;
                    s.set_multicast_if_v4(&src)
                        .map_err(err("choosing the multicast source address"))?;
                } else if bind {
                    s.bind(&SockAddr::from(SocketAddr::new(source, 0)))
                        .map_err(err("binding to the advert source address"))?;
                }
            }
            IpAddr::V6(_) => {
                s.set_unicast_hops_v6(u32::from(packet::TTL))
                    .map_err(err("setting hop limit 255"))?;
                s.set_tclass_v6(u32::from(TOS))
                    .map_err(err("setting traffic class 0xc0 (network control)"))?;
                s.set_multicast_hops_v6(u32::from(packet::TTL))
                    .map_err(err("setting multicast hop limit 255"))?;
                s.set_multicast_loop_v6(false)
                    .map_err(err("turning multicast loop off"))?;
                s.set_multicast_if_v6(ifindex)
                    .map_err(err("choosing the multicast interface"))?;
                s.set_recv_hoplimit_v6(true)
                    .map_err(err("asking for the hop limit"))?;
                set_int(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
                    .map_err(err("asking for the destination address"))?;
                // The checksum field is at offset 6 of the VRRP message.
                set_int(&s, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 6)
                    .map_err(err("handing the checksum to the kernel"))?;
                if multicast {
                    s.join_multicast_v6(&packet::MULTICAST_V6, ifindex)
                        .map_err(err("joining ff02::12"))?;
                }
            }
        }
        s.set_nonblocking(true)
            .map_err(err("making the socket non-blocking"))?;
        // SAFETY: the socket owns its descriptor, which stays open and the same
        // until the AsyncFd (which owns the socket) drops.
        let fd = unsafe { AsyncFd::register(s) }.map_err(|e| VrrpError::Socket {
            interface: interface.to_owned(),
            step: "registering with tokio",
            source: e.into_parts().1,
        })?;
        Ok(Self {
            fd,
            ifindex,
            source,
        })
    }

    /// The multicast group of this family.
    #[must_use]
    pub fn group(&self) -> IpAddr {
        match self.source {
            IpAddr::V4(_) => IpAddr::V4(packet::MULTICAST_V4),
            IpAddr::V6(_) => IpAddr::V6(packet::MULTICAST_V6),
        }
    }

    /// Send one VRRP message to `dst`.
    pub fn send(&self, msg: &[u8], dst: IpAddr) -> std::io::Result<()> {
        let to = match dst {
            IpAddr::V4(a) => SockAddr::from(SocketAddr::new(IpAddr::V4(a), 0)),
            // A link-local or multicast peer needs the interface as its scope.
            IpAddr::V6(a) => SockAddr::from(SocketAddrV6::new(a, 0, 0, self.ifindex)),
        };
        self.fd.get_ref().send_to(msg, &to).map(|_| ())
    }

    /// Wait for one datagram; its envelope and the VRRP message's range in `buf`.
    pub async fn recv(
        &self,
        buf: &mut [u8],
    ) -> std::io::Result<(Envelope, std::ops::Range<usize>)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| match self.source {
                IpAddr::V4(_) => recv_v4(fd.get_ref(), buf),
                IpAddr::V6(_) => recv_v6(fd.get_ref(), buf),
            }) {
                Ok(Ok(Some(got))) => return Ok(got),
                // Too short to carry an IPv4 header: nothing to check, skip it.
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

fn recv_v4(
    s: &Socket,
    buf: &mut [u8],
) -> std::io::Result<Option<(Envelope, std::ops::Range<usize>)>> {
    let n = (&mut &*s).read(buf)?;
    let d = &buf[..n];
    let ihl = usize::from(d.first().copied().unwrap_or(0) & 0x0f) * 4;
    if ihl < 20 || n < ihl {
        return Ok(None);
    }
    let addr = |i: usize| IpAddr::V4(Ipv4Addr::new(d[i], d[i + 1], d[i + 2], d[i + 3]));
    Ok(Some((
        Envelope {
            ttl: d[8],
            src: addr(12),
            dst: addr(16),
        },
        ihl..n,
    )))
}

fn recv_v6(
    s: &Socket,
    buf: &mut [u8],
) -> std::io::Result<Option<(Envelope, std::ops::Range<usize>)>> {
    let mut control = [MaybeUninit::<u8>::uninit(); 128];
    let mut from = SockAddr::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    // SAFETY: the kernel only writes initialized bytes into the buffer, and every
    // byte of `buf` is initialized already, so viewing it as possibly
    // uninitialized loses nothing and exposes nothing.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    let mut bufs = [MaybeUninitSlice::new(uninit)];
    let mut msg = MsgHdrMut::new()
        .with_addr(&mut from)
        .with_buffers(&mut bufs)
        .with_control(&mut control);
    let n = s.recvmsg(&mut msg, 0)?;
    let control_len = msg.control_len();
    // SAFETY: recvmsg initialized the first `control_len` bytes of `control`.
    let control: &[u8] =
        unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), control_len) };
    let (mut ttl, mut dst) = (0u8, None);
    for (level, kind, data) in cmsgs(control) {
        if level != libc::IPPROTO_IPV6 {
            continue;
        }
        if kind == libc::IPV6_HOPLIMIT && data.len() >= 4 {
            let hops = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
            ttl = u8::try_from(hops).unwrap_or(0);
        } else if kind == libc::IPV6_PKTINFO && data.len() >= 16 {
            let mut a = [0u8; 16];
            a.copy_from_slice(&data[..16]);
            dst = Some(IpAddr::V6(Ipv6Addr::from(a)));
        }
    }
    let (Some(src), Some(dst)) = (from.as_socket().map(|a| a.ip()), dst) else {
        return Ok(None);
    };
    Ok(Some((Envelope { ttl, src, dst }, 0..n)))
}

/// The (level, type, data) of each control message in `control`, laid out as
/// Linux does: a `cmsghdr` (length, level, type), then the data, each message
/// aligned to the size of a pointer.
fn cmsgs(control: &[u8]) -> Vec<(i32, i32, &[u8])> {
    const WORD: usize = std::mem::size_of::<usize>();
    let header = std::mem::size_of::<libc::cmsghdr>();
    let mut out = Vec::new();
    let mut off = 0;
    while off + header <= control.len() {
        let mut len = [0u8; WORD];
        len.copy_from_slice(&control[off..off + WORD]);
        let len = usize::from_ne_bytes(len);
        let int = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&control[at..at + 4]);
            i32::from_ne_bytes(b)
        };
        if len < header || off + len > control.len() {
            break;
        }
        out.push((
            int(off + WORD),
            int(off + WORD + 4),
            &control[off + header..off + len],
        ));
        off += len.div_ceil(WORD) * WORD;
    }
    out
}

fn set_int(s: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt on a valid descriptor with a pointer to an int and its
    // exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<i32>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_are_walked_at_pointer_alignment() {
        const W: usize = std::mem::size_of::<usize>();
        let mut c = Vec::new();
        // hop limit: header + 4 bytes, padded to the word.
        c.extend_from_slice(&(W + 8 + 4).to_ne_bytes());
        c.extend_from_slice(&libc::IPPROTO_IPV6.to_ne_bytes());
        c.extend_from_slice(&libc::IPV6_HOPLIMIT.to_ne_bytes());
        c.extend_from_slice(&255i32.to_ne_bytes());
        c.resize(c.len().div_ceil(W) * W, 0);
        // pktinfo: header + 16 + 4 bytes.
        c.extend_from_slice(&(W + 8 + 20).to_ne_bytes());
        c.extend_from_slice(&libc::IPPROTO_IPV6.to_ne_bytes());
        c.extend_from_slice(&libc::IPV6_PKTINFO.to_ne_bytes());
        c.extend_from_slice(&packet::MULTICAST_V6.octets());
        c.extend_from_slice(&7u32.to_ne_bytes());
        let got = cmsgs(&c);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].1, got[0].2),
            (libc::IPV6_HOPLIMIT, &255i32.to_ne_bytes()[..])
        );
        assert_eq!(
            (got[1].1, &got[1].2[..16]),
            (libc::IPV6_PKTINFO, &packet::MULTICAST_V6.octets()[..])
        );
    }
}
