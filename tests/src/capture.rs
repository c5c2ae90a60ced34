//! Frames on one interface, as an `AF_PACKET` socket sees them: those it
//! receives and those it sends. For tests that check what went on the wire
//! (announcements, VRRP adverts) without tcpdump.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// An `AF_PACKET` socket in the calling thread's namespace that sees every frame
/// on one interface.
pub struct Capture {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    /// Open in the calling thread's namespace, on interface `ifindex`.
    #[must_use]
    pub fn open(ifindex: u32) -> Self {
        let protocol = i32::from(ETH_P_ALL.to_be());
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a socket just opened and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };

        // SAFETY: all zeros is a valid sockaddr_ll (plain integers and arrays).
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex.cast_signed();
        let len = u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap();
        // SAFETY: `sll` is a sockaddr_ll that lives across the call, `len` its size.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), len) };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());

        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        let len = u32::try_from(size_of::<libc::timeval>()).unwrap();
        // SAFETY: the option value is a timeval that lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                len,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        Self { fd }
    }

    /// The next frame, if one arrives within 20 ms and is incoming (not one this
    /// namespace sends).
    #[must_use]
    pub fn next_incoming(&self) -> Option<Vec<u8>> {
        self.next_frame()
            .and_then(|(frame, outgoing)| (!outgoing).then_some(frame))
    }

    /// The next frame in either direction, if one comes within 20 ms, and
    /// whether this namespace sent it.
    #[must_use]
    pub fn next_frame(&self) -> Option<(Vec<u8>, bool)> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: as in `open`.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut from_len = u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap();
        // SAFETY: `buf` and `from` are writable for the lengths passed, and live
        // across the call.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some((buf, from.sll_pkttype == libc::PACKET_OUTGOING))
    }
}
