//! `lb_userspace::announce::Announcer` on a real segment: two namespaces, A and B,
//! joined by a veth pair. The announcer runs in A; B is the neighbour whose cache
//! must follow the VIP.
//!
//! B's reachability checks are a TCP connect to the VIP (port 9, nothing listens):
//! a refusal is A's kernel answering for the VIP, as an echo reply would be, and a
//! timeout is nothing answering, whereas `ping` is not among the packages the tests
//! may assume. Announcements are counted with an `AF_PACKET` socket in B.
//!
//! Needs root (namespaces, raw sockets). Namespaces are named `apilb-ann-*` and
//! removed on drop, panics included.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_userspace::announce::{AnnounceError, Announcer};
use tests::{capture::Capture, netns::Netns};

const PREFIX: &str = "apilb-ann";
const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0a, 0x01];
const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0b, 0x01];
const BOGUS_MAC: &str = "02:00:00:00:00:99";
const VIP4: &str = "203.0.113.100";
const VIP6: &str = "fd00:203::100";

/// Namespaces A and B, each with an `eth0` of the same veth pair:
/// 203.0.113.1/24 and `fd00:203::1/64` in A, .2 and `::2` in B, no default routes.
struct Segment {
    a: Netns,
    b: Netns,
}

impl Segment {
    fn new() -> Self {
        let a = Netns::with_role(PREFIX, "a");
        let b = Netns::with_role(PREFIX, "b");
        a.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            &mac(MAC_A),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac(MAC_B),
            "netns",
            b.name(),
        ]);
        for (ns, v4, v6) in [
            (&a, "203.0.113.1/24", "fd00:203::1/64"),
            (&b, "203.0.113.2/24", "fd00:203::2/64"),
        ] {
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
            ns.ip(&["addr", "add", v4, "dev", "eth0"]);
            ns.ip(&["addr", "add", v6, "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        for ns in [&a, &b] {
            ipv6_ready(ns);
        }
        Self { a, b }
    }
}

/// Wait until IPv6 runs on `ns`'s eth0: until then (carrier news travels through
/// the kernel's linkwatch, up to a second) the interface has no link-local address
/// and no `ff00::/8` route, and B would drop the very NA the test is about.
fn ipv6_ready(ns: &Netns) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let local = ns.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "link"]);
        if local.contains("fe80::") && !local.contains("tentative") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no IPv6 on {}'s eth0 yet:\n{local}",
            ns.name()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Run `scenario` on a thread inside `ns`, on a current-thread tokio runtime
/// there, and return its result (or its panic).
fn in_netns<F, Fut, T>(ns: &Netns, scenario: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    thread::scope(|s| {
        s.spawn(|| {
            let _inside = ns.enter();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(scenario())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Whether something in `ns` answers for `ip`: a TCP connect to port 9 is refused
/// (answered with a RST) within `timeout`.
fn answers(ns: &Netns, ip: IpAddr, timeout: Duration) -> bool {
    thread::scope(|s| {
        s.spawn(|| {
            let _inside = ns.enter();
            match TcpStream::connect_timeout(&SocketAddr::new(ip, 9), timeout) {
                Ok(_) => true,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => true,
                Err(e) => {
                    eprintln!("connect to {ip} from {}: {e}", ns.name());
                    false
                }
            }
        })
        .join()
        .expect("probe thread")
    })
}

/// `ns`'s neighbour entry for `ip` on eth0: its link-layer address, if any, and
/// its state (`STALE`, `INCOMPLETE`, ...).
fn neighbour(ns: &Netns, ip: IpAddr) -> Option<(Option<String>, String)> {
    let out = ns.ip(&["neigh", "show", "to", &ip.to_string(), "dev", "eth0"]);
    let words: Vec<&str> = out.lines().next()?.split_whitespace().collect();
    let lladdr = words
        .iter()
        .position(|w| *w == "lladdr")
        .and_then(|i| words.get(i + 1))
        .map(|m| (*m).to_owned());
    Some((lladdr, (*words.last()?).to_owned()))
}

/// Poll `ns`'s entry for `ip` until it carries `want`, or panic after 2 s.
fn wait_for_lladdr(ns: &Netns, ip: IpAddr, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let entry = neighbour(ns, ip);
        if entry.as_ref().and_then(|(l, _)| l.as_deref()) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s entry for {ip} is {entry:?}, never {want}",
            ns.name()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The whole life of a VIP as B sees it: a stale entry pointing elsewhere, the
/// claim, B's entry following, B reaching the VIP, the release, and silence.
async fn claim_then_release(seg: &Segment, vip: IpAddr) {
    let announcer = Announcer::new("eth0").await.expect("announcer on eth0");
    assert_eq!(announcer.mac(), MAC_A);
    assert!(!announcer.holds(vip).await.unwrap());
    let vip_s = vip.to_string();
    seg.b.ip(&[
        "neigh", "replace", &vip_s, "lladdr", BOGUS_MAC, "dev", "eth0", "nud", "stale",
    ]);
    assert_eq!(
        neighbour(&seg.b, vip).and_then(|(l, _)| l).as_deref(),
        Some(BOGUS_MAC)
    );

    announcer
        .claim(vip, 3, Duration::from_millis(100))
        .await
        .expect("claim");
    wait_for_lladdr(&seg.b, vip, &mac(MAC_A));
    assert!(announcer.holds(vip).await.unwrap());
    let dev = seg.a.ip(&["addr", "show", "dev", "eth0"]);
    let host = if vip.is_ipv4() { "/32" } else { "/128" };
    assert!(dev.contains(&format!("{vip}{host}")), "{dev}");
    assert!(
        answers(&seg.b, vip, Duration::from_secs(2)),
        "B cannot reach {vip}"
    );
    // Claiming again is idempotent.
    announcer
        .claim(vip, 1, Duration::ZERO)
        .await
        .expect("claim again");

    announcer.release(vip).await.expect("release");
    assert!(!announcer.holds(vip).await.unwrap());
    announcer
        .release(vip)
        .await
        .expect("releasing an absent VIP");
    seg.b.ip(&["neigh", "flush", "to", &vip_s, "dev", "eth0"]);
    assert!(
        !answers(&seg.b, vip, Duration::from_secs(1)),
        "{vip} still answers after release"
    );
    let entry = neighbour(&seg.b, vip);
    assert!(
        matches!(&entry, Some((None, s)) if s == "INCOMPLETE" || s == "FAILED"),
        "B's entry for {vip} after release: {entry:?}"
    );
}

#[test]
fn ipv4_gratuitous_arp_moves_the_neighbour_and_release_silences_it() {
    let seg = Segment::new();
    in_netns(&seg.a, || claim_then_release(&seg, VIP4.parse().unwrap()));
}

#[test]
fn ipv6_unsolicited_na_moves_the_neighbour_and_release_silences_it() {
    let seg = Segment::new();
    in_netns(&seg.a, || claim_then_release(&seg, VIP6.parse().unwrap()));
}

// ---------------------------------------------------------------------------------
// Counting announcements on the wire.

/// Whether `frame` is a gratuitous ARP for `vip` from A: a broadcast ARP request
/// with sender = target = VIP and sender MAC A's.
fn is_garp(frame: &[u8], vip: IpAddr) -> bool {
    let IpAddr::V4(vip) = vip else { return false };
    frame.len() >= 42
        && frame[0..6] == [0xff; 6]
        && frame[6..12] == MAC_A
        && frame[12..14] == [0x08, 0x06]
        && frame[14..22] == [0, 1, 0x08, 0x00, 6, 4, 0, 1]
        && frame[22..28] == MAC_A
        && frame[28..32] == vip.octets()
        && frame[38..42] == vip.octets()
}

/// Whether `frame` is an unsolicited NA for `vip` from A: to `ff02::1`, hop limit
/// 255, `ICMPv6` type 136 code 0, Override set and Solicited clear, target the VIP,
/// a Target Link-Layer Address option with A's MAC.
fn is_unsolicited_na(frame: &[u8], vip: IpAddr) -> bool {
    let IpAddr::V6(vip) = vip else { return false };
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let icmp = frame.get(54..).unwrap_or_default();
    frame.len() >= 54 + 32
        && frame[0..6] == [0x33, 0x33, 0, 0, 0, 1]
        && frame[6..12] == MAC_A
        && frame[12..14] == [0x86, 0xdd]
        && frame[20] == 58 // next header: ICMPv6
        && frame[21] == 255 // hop limit
        && frame[38..54] == all_nodes
        && icmp[0..2] == [136, 0]
        && icmp[4] & 0xe0 == 0x20 // R and S clear, O set
        && icmp[8..24] == vip.octets()
        && icmp[24..32] == [2, 1, MAC_A[0], MAC_A[1], MAC_A[2], MAC_A[3], MAC_A[4], MAC_A[5]]
}

/// Capture in B while `scenario` runs in A; return when each announcement of `vip`
/// arrived (relative to the first). The capture lasts `listen` after B is ready.
fn capture_announcements<F, Fut>(
    seg: &Segment,
    vip: IpAddr,
    listen: Duration,
    scenario: F,
) -> Vec<Duration>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    let ifindex = seg.b.ifindex("eth0");
    let (ready_tx, ready_rx) = mpsc::channel();
    thread::scope(|s| {
        let capture = s.spawn(move || {
            let _inside = seg.b.enter();
            let capture = Capture::open(ifindex);
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + listen;
            let mut seen = Vec::new();
            while Instant::now() < deadline {
                if let Some(frame) = capture.next_incoming()
                    && (is_garp(&frame, vip) || is_unsolicited_na(&frame, vip))
                {
                    seen.push(Instant::now());
                }
            }
            seen
        });
        ready_rx.recv().expect("capture ready");
        in_netns(&seg.a, scenario);
        let seen = capture.join().expect("capture thread");
        seen.iter().map(|t| t.duration_since(seen[0])).collect()
    })
}

fn assert_spaced(arrivals: &[Duration], count: usize, interval: Duration) {
    assert_eq!(arrivals.len(), count, "announcements at {arrivals:?}");
    for pair in arrivals.windows(2) {
        let gap = pair[1].saturating_sub(pair[0]);
        assert!(
            gap >= interval.mul_f64(0.8) && gap <= interval + Duration::from_millis(150),
            "announcements {interval:?} apart expected, got {arrivals:?}"
        );
    }
}

fn count_announcements(vip: &str) {
    let seg = Segment::new();
    let vip: IpAddr = vip.parse().unwrap();
    let interval = Duration::from_millis(200);
    let arrivals = capture_announcements(&seg, vip, Duration::from_millis(1500), || async move {
        let announcer = Announcer::new("eth0").await.unwrap();
        announcer.claim(vip, 3, interval).await.unwrap();
        // Keep the runtime (and the announcer) alive for the repeats.
        tokio::time::sleep(interval * 3 + Duration::from_millis(300)).await;
    });
    assert_spaced(&arrivals, 3, interval);
}

#[test]
fn ipv4_claim_sends_count_gratuitous_arps_interval_apart() {
    count_announcements(VIP4);
}

#[test]
fn ipv6_claim_sends_count_unsolicited_nas_interval_apart() {
    count_announcements(VIP6);
}

#[test]
fn release_stops_pending_announcements() {
    let seg = Segment::new();
    let vip: IpAddr = VIP4.parse().unwrap();
    let interval = Duration::from_millis(200);
    let arrivals = capture_announcements(&seg, vip, Duration::from_millis(1500), || async move {
        let announcer = Announcer::new("eth0").await.unwrap();
        announcer.claim(vip, 5, interval).await.unwrap();
        tokio::time::sleep(interval + interval / 2).await;
        announcer.release(vip).await.unwrap();
        tokio::time::sleep(interval * 4).await;
    });
    // At 0 and 200 ms; the ones due at 400, 600 and 800 ms were called off.
    assert_spaced(&arrivals, 2, interval);
}

#[test]
fn missing_interface_is_an_error_naming_it() {
    let seg = Segment::new();
    for name in ["apilb-nosuch", "a-name-too-long-for-linux"] {
        let err = in_netns(&seg.a, || Announcer::new(name))
            .err()
            .expect("no announcer for a missing interface");
        assert!(
            matches!(&err, AnnounceError::NoSuchInterface { interface } if interface == name),
            "{err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}
