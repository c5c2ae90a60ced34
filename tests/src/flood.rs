//! A packet flooder for the hostile tests (`tests/tests/hostile.rs`) and `cargo
//! xtask bench hostile`: an attacker on the [`crate::cluster`] topology's L2
//! segment sending frames built by etherparse ([`crate::packets`]) to the LB
//! node's MAC through an `AF_PACKET` socket, as fast as one thread can, bounded
//! by a count (the frames it is given) and a deadline.
//!
//! The attacker is a namespace of its own wired to the segment's bridge as a
//! master is, with no address and no route: it only sends raw frames, and the
//! socket receives nothing (it is bound to protocol 0). The LB node is
//! one-armed, so its `eth0` is where its XDP program sees both the clients'
//! packets and the masters'; a frame sent here is one the program must judge,
//! whatever source it claims.
//!
//! On veth the whole path of a frame (the attacker's veth, the bridge, the LB's
//! veth and its XDP program, which runs in the sender's softirq) is paid by the
//! sending CPU, so the flood runs as fast as the LB takes it, and few frames are
//! dropped before the program sees them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::{
    cluster::{LB_DEV, SNAT, Topology, VIP},
    fixture::sa,
    netns::Netns,
    packets::{Mac, Tcp, icmp_unreachable},
};

/// A small, fast pseudo-random generator (`SplitMix64`): attack traffic needs
/// spread, not secrecy.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock and the process id.
    #[must_use]
    pub fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        #[expect(clippy::cast_possible_truncation, reason = "seed bits")]
        Self(t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A port in `lo..=hi`.
    pub fn port(&mut self, lo: u16, hi: u16) -> u16 {
        let span = u32::from(hi - lo) + 1;
        #[expect(clippy::cast_possible_truncation, reason = "below `span`")]
        let off = (self.next_u32() % span) as u16;
        lo + off
    }

    /// A spoofed client: an address in 10.0.0.0/8, which no namespace of the
    /// topology routes (an answer to it dies at the LB node), and a port.
    pub fn unrouted_client(&mut self) -> SocketAddr {
        let [_, b, c, d] = self.next_u32().to_be_bytes();
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, b, c, d.max(1))),
            self.port(1024, 65535),
        )
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// The MAC address of `dev` in `ns`.
#[must_use]
pub fn mac_of(ns: &Netns, dev: &str) -> Mac {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]);
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"));
    let mut mac = [0; 6];
    for (b, h) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(h, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}"));
    }
    mac
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Frames the kernel took.
    pub frames: u64,
    /// Frames refused by the socket (a full device queue): not sent.
    pub refused: u64,
    pub took: Duration,
}

impl Sent {
    /// Frames a second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.frames as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} frames in {:.2} s ({:.0}/s{})",
            self.frames,
            self.took.as_secs_f64(),
            self.rate(),
            if self.refused > 0 {
                format!(", {} refused by the socket", self.refused)
            } else {
                String::new()
            }
        )
    }
}

/// Frames handed to `sendmmsg` at once.
const BATCH: usize = 64;

/// An attacker on the segment: its namespace, its raw socket, its MAC and the LB
/// node's. Dropping it deletes the namespace, and with it its veth and the
/// bridge port.
pub struct Attacker {
    pub mac: Mac,
    pub lb_mac: Mac,
    socket: OwnedFd,
    ifindex: i32,
    pub ns: Netns,
}

impl Attacker {
    /// A namespace `<prefix>-<pid>-<n>x` with an `eth0` on the segment's bridge
    /// (port `p-x` on the router), up, with no address, route or IPv6, and a raw
    /// socket on it.
    ///
    /// # Panics
    /// If the socket cannot be made, or the namespace is the machine's own.
    #[must_use]
    pub fn on_segment(t: &Topology, prefix: &str) -> Self {
        let ns = Netns::with_role(prefix, "x");
        t.router.ip(&[
            "link",
            "add",
            "p-x",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        t.router.ip(&["link", "set", "p-x", "master", "seg"]);
        t.router.ip(&["link", "set", "p-x", "up"]);
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.eth0.disable_ipv6=1"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let ifindex = i32::try_from(ns.ifindex("eth0")).expect("ifindex");
        let socket = {
            let _inside = ns.enter();
            assert!(
                !in_host_namespace(),
                "the flooder must run inside a test namespace"
            );
            raw_socket(ifindex)
        };
        Self {
            mac: mac_of(&ns, "eth0"),
            lb_mac: mac_of(t.lb(), LB_DEV),
            socket,
            ifindex,
            ns,
        }
    }

    /// Send `frames` (whole Ethernet frames) as fast as they go, until they run
    /// out or `limit` has passed.
    pub fn send(&self, frames: impl IntoIterator<Item = Vec<u8>>, limit: Duration) -> Sent {
        self.send_paced(frames, None, limit)
    }

    /// [`Self::send`], at most `per_second` frames a second (in batches) if
    /// given: the same offered load whatever the receiver's speed.
    pub fn send_paced(
        &self,
        frames: impl IntoIterator<Item = Vec<u8>>,
        per_second: Option<f64>,
        limit: Duration,
    ) -> Sent {
        let started = Instant::now();
        let deadline = started + limit;
        let mut sent = Sent::default();
        let mut frames = frames.into_iter();
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
        let mut offered = 0_u64;
        loop {
            batch.clear();
            batch.extend(frames.by_ref().take(BATCH));
            if batch.is_empty() || Instant::now() >= deadline {
                break;
            }
            if let Some(rate) = per_second {
                let due = started + Duration::from_secs_f64(offered as f64 / rate);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            offered += batch.len() as u64;
            let (ok, refused) = self.send_batch(&batch);
            sent.frames += ok;
            sent.refused += refused;
        }
        sent.took = started.elapsed();
        sent
    }

    /// One `sendmmsg` of `batch`, retried past a frame the socket refuses: how
    /// many frames went, and how many were refused.
    fn send_batch(&self, batch: &[Vec<u8>]) -> (u64, u64) {
        // SAFETY: sockaddr_ll is plain data; zeroes are a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET");
        addr.sll_protocol = u16::try_from(libc::ETH_P_IP).expect("ETH_P_IP").to_be();
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&self.lb_mac);
        let mut iov: Vec<libc::iovec> = batch
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: msghdr is plain data; zeroes are a valid start.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = (&raw mut addr).cast();
                h.msg_namelen = u32::try_from(size_of::<libc::sockaddr_ll>()).expect("size");
                h.msg_iov = v;
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        let (mut at, mut refused) = (0, 0);
        while at < msgs.len() {
            let left = u32::try_from(msgs.len() - at).expect("batch size");
            // SAFETY: `msgs[at..]` are valid headers whose name and buffers
            // (`addr`, `iov`, `batch`) outlive the call.
            let n = unsafe {
                libc::sendmmsg(self.socket.as_raw_fd(), msgs[at..].as_mut_ptr(), left, 0)
            };
            if let Ok(n) = usize::try_from(n)
                && n > 0
            {
                at += n;
            } else {
                let e = std::io::Error::last_os_error();
                assert!(
                    matches!(
                        e.raw_os_error(),
                        Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                    ),
                    "sendmmsg: {e}"
                );
                if e.raw_os_error() != Some(libc::EINTR) {
                    // The frame at `at` did not go: skip it, as a NIC drops
                    // a frame its ring has no room for.
                    at += 1;
                    refused += 1;
                }
            }
        }
        (u64::try_from(at).expect("count") - refused, refused)
    }

    /// A bare SYN (no options, as flood tools send it) from `from` to the VIP,
    /// with sequence number `seq`.
    #[must_use]
    pub fn syn_to_vip(&self, from: SocketAddr, seq: u32) -> Vec<u8> {
        let mut syn = self.to_vip(from);
        syn.seq = seq;
        syn.build()
    }

    /// A segment from `from` to the VIP, to the LB node's MAC: a bare SYN for
    /// the caller to change.
    #[must_use]
    pub fn to_vip(&self, from: SocketAddr) -> Tcp {
        Tcp::syn(self.mac, self.lb_mac, from, sa(VIP))
    }

    /// A segment from `master` (address:port) to the LB's SNAT address at
    /// `port`, to the LB node's MAC: a bare SYN for the caller to change.
    #[must_use]
    pub fn to_snat(&self, master: SocketAddr, port: u16) -> Tcp {
        Tcp::syn(self.mac, self.lb_mac, master, snat(port))
    }

    /// A SYN to the VIP from a random unrouted client, with a random sequence
    /// number.
    #[must_use]
    pub fn spoofed_syn(&self, rng: &mut Rng) -> Vec<u8> {
        let from = rng.unrouted_client();
        self.syn_to_vip(from, rng.next_u32())
    }

    /// A RST from `master` (address:port) to the LB's SNAT address at `port`,
    /// with random sequence and (every other one, by `rng`) acknowledgement
    /// numbers: what a blind attacker forges to end a flow under NAT.
    #[must_use]
    pub fn forged_rst(&self, rng: &mut Rng, master: SocketAddr, port: u16) -> Vec<u8> {
        let mut rst = self.to_snat(master, port);
        rst.syn = false;
        rst.rst = true;
        rst.seq = rng.next_u32();
        let ack = rng.next_u32();
        rst.ack = (ack & 1 == 1).then_some(ack);
        rst.build()
    }

    /// An ICMP port unreachable from `master`'s address to the LB's SNAT
    /// address, quoting a SYN from the SNAT address at `port` to `master` with a
    /// random sequence number: a forged refusal of a flow's SYN.
    #[must_use]
    pub fn forged_unreachable(&self, rng: &mut Rng, master: SocketAddr, port: u16) -> Vec<u8> {
        let mut quoted = Tcp::syn(self.lb_mac, self.mac, snat(port), master);
        quoted.seq = rng.next_u32();
        icmp_unreachable(self.mac, self.lb_mac, master.ip(), &quoted, false)
    }
}

/// The LB's SNAT address at `port`.
fn snat(port: u16) -> SocketAddr {
    SocketAddr::new(SNAT.parse().expect("SNAT address"), port)
}

/// The kernel's counter `group` `field` from `/proc/net/snmp` or `/proc/net/netstat` in `ns`, e.g.
/// `Tcp` `InCsumErrors`: what an endpoint of the attack did with its frames.
pub fn kernel_counter(ns: &Netns, group: &str, field: &str) -> u64 {
    let text = ns.exec("cat", &["/proc/net/snmp", "/proc/net/netstat"]);
    let head = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&head));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names.split_whitespace().position(|f| f == field) {
            return values
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{group} {field} in {values:?}"));
        }
    }
    panic!("no {group} {field} in\n{text}")
}

/// Spoil the TCP checksum of `frame` (an untagged IPv4 frame): a receiver drops
/// it, and a NAT that updates checksums incrementally keeps it spoiled.
pub fn spoil_tcp_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let at = 14 + ihl + 16;
    frame[at] ^= 0x5a;
    frame[at + 1] ^= 0xa5;
}

/// Whether the calling thread is in the namespace of PID 1: the machine's own,
/// whose default route leads off the machine.
fn in_host_namespace() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    ino("/proc/thread-self/ns/net").ok() == ino("/proc/1/ns/net").ok()
}

/// An `AF_PACKET` raw socket of the calling thread's namespace, bound to
/// `ifindex` for protocol 0: it sends, and receives nothing.
fn raw_socket(ifindex: i32) -> OwnedFd {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroes are a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET");
    addr.sll_ifindex = ifindex;
    // SAFETY: a valid sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).expect("size"),
        )
    };
    assert_eq!(
        rc,
        0,
        "bind AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    socket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spoiled_checksum_stays_spoiled_and_nothing_else_changes() {
        let mut frame = Tcp::syn(
            [2; 6],
            [4; 6],
            "10.1.2.3:1000".parse().unwrap(),
            "198.51.100.100:6443".parse().unwrap(),
        )
        .build();
        let good = frame.clone();
        spoil_tcp_checksum(&mut frame);
        let d = crate::packets::describe(&frame);
        assert_eq!(
            (d.matches(" ok").count(), d.matches("BAD").count()),
            (1, 1),
            "{d}"
        );
        let differ: Vec<usize> = (0..frame.len()).filter(|&i| frame[i] != good[i]).collect();
        assert_eq!(differ, [50, 51]);
    }

    #[test]
    fn spoofed_clients_are_unrouted_and_spread() {
        let mut rng = Rng::new();
        let clients: Vec<SocketAddr> = (0..1000).map(|_| rng.unrouted_client()).collect();
        assert!(clients.iter().all(|c| match c.ip() {
            IpAddr::V4(v4) => v4.octets()[0] == 10 && c.port() >= 1024,
            IpAddr::V6(_) => false,
        }));
        let distinct: std::collections::HashSet<_> = clients.iter().collect();
        assert!(distinct.len() > 990, "{}", distinct.len());
    }
}
