//! Links on loopback: each test binds its own ports (port 0) and passes the real
//! addresses around. A peer that must not answer is configured at 127.0.0.9:1,
//! where nothing listens (and no other test's port can turn up); raw peers that
//! pose as it dial from 127.0.0.9.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use lb_common::ct;
use tokio::{
    io::AsyncReadExt,
    net::{TcpSocket, TcpStream},
    sync::mpsc,
    time::{Instant, sleep, timeout},
};

use super::{
    faults::LOG_EVERY,
    frames::{self, FrameReader, FrameWriter},
    *,
};
use crate::sync::{
    testing::{hello, key, name},
    wire::{self, DialerHandshake, FlowRecord, RecordKind, SessionCodec},
};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DEAD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
/// A peer address where nothing listens: dialing it is refused.
const DEAD: SocketAddr = SocketAddr::new(DEAD_IP, 1);
/// How long any expected event may take, on a loaded 2-vCPU machine.
const WITHIN: Duration = Duration::from_secs(5);

/// A listener on 127.0.0.1, port 0: a node's address before the node starts.
fn reserve() -> std::net::TcpListener {
    std::net::TcpListener::bind((LOCAL, 0)).unwrap()
}

fn config(me: &str, listen: SocketAddr, peers: &[(&str, SocketAddr)], slice: u16) -> LinksConfig {
    let peers = peers
        .iter()
        .map(|&(peer, addr)| PeerConfig {
            name: name(peer),
            addr,
        })
        .collect();
    LinksConfig::new(name(me), listen, peers, key(7), hello(slice))
}

fn start(cfg: LinksConfig, listener: std::net::TcpListener) -> (Links, mpsc::Receiver<Inbound>) {
    Links::start_on(cfg, listener).unwrap()
}

/// Nodes a (slice 0) and b (slice 1), each the other's peer, under one key.
fn pair() -> (
    (Links, mpsc::Receiver<Inbound>),
    (Links, mpsc::Receiver<Inbound>),
) {
    let (la, lb) = (reserve(), reserve());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let a = start(config("a", a_addr, &[("b", b_addr)], 0), la);
    let b = start(config("b", b_addr, &[("a", a_addr)], 1), lb);
    (a, b)
}

/// A node a whose one peer, b, is at [`DEAD`].
fn alone() -> (Links, mpsc::Receiver<Inbound>) {
    let listener = reserve();
    let addr = listener.local_addr().unwrap();
    start(config("a", addr, &[("b", DEAD)], 0), listener)
}

fn record(client_port: u16) -> FlowRecord {
    FlowRecord {
        kind: RecordKind::Established,
        state: ct::CT_ESTABLISHED,
        flags: 0,
        client: SocketAddr::new([203, 0, 113, 7].into(), client_port),
        vip: "198.51.100.100:6443".parse().unwrap(),
        backend: "192.168.19.160:6443".parse().unwrap(),
        snat: "198.51.100.100".parse().unwrap(),
        nat_port: 1025,
        ts_off: 1,
        fin_tsval: 2,
        seq: 3,
        ack: 4,
        age_ms: 5,
    }
}

fn records(n: usize, first_port: u16) -> Vec<FlowRecord> {
    (first_port..).take(n).map(record).collect()
}

fn flows(n: usize, first_port: u16) -> Message {
    Message::Flows(records(n, first_port))
}

fn vip() -> IpAddr {
    "198.51.100.100".parse().unwrap()
}

/// The one peer's status.
fn peer(links: &Links) -> PeerStatus {
    let mut status = links.status();
    assert_eq!(status.peers.len(), 1);
    status.peers.remove(0)
}

/// The next event `want` accepts, skipping others; panics after [`WITHIN`].
async fn next(
    rx: &mut mpsc::Receiver<Inbound>,
    what: &str,
    want: impl Fn(&Inbound) -> bool,
) -> Inbound {
    let found = timeout(WITHIN, async {
        loop {
            let event = rx.recv().await.expect("the links are gone");
            if want(&event) {
                return event;
            }
        }
    });
    found
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WITHIN:?}"))
}

const UP: bool = true;
const DOWN: bool = false;

/// The link of `event` if it is `peer`'s session coming up (`up`) or ending.
fn session_event(event: &Inbound, peer: &str, up: bool) -> Option<Link> {
    match event {
        Inbound::Connected { peer: p, link } if up && &**p == peer => Some(*link),
        Inbound::Disconnected { peer: p, link, .. } if !up && &**p == peer => Some(*link),
        _ => None,
    }
}

fn describe(peer: &str, up: bool) -> String {
    let event = if up { "Connected" } else { "Disconnected" };
    format!("{event}({peer})")
}

/// `peer`'s session on `link` comes up (`up`) or ends.
async fn session(rx: &mut mpsc::Receiver<Inbound>, peer: &str, link: Link, up: bool) {
    let what = format!("{} on {link}", describe(peer, up));
    next(rx, &what, |e| session_event(e, peer, up) == Some(link)).await;
}

/// Both of `peer`'s sessions come up (`up`) or end, in either order.
async fn both(rx: &mut mpsc::Receiver<Inbound>, peer: &str, up: bool) {
    let what = describe(peer, up);
    let mut links = Vec::new();
    while links.len() < 2 {
        let event = next(rx, &what, |e| session_event(e, peer, up).is_some()).await;
        let link = session_event(&event, peer, up);
        assert!(!links.contains(&link), "{what} twice on {link:?}");
        links.push(link);
    }
}

/// The next `n` messages, skipping session events.
async fn messages(rx: &mut mpsc::Receiver<Inbound>, n: usize) -> Vec<Message> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        if let Inbound::Message { message, .. } =
            next(rx, "a message", |e| matches!(e, Inbound::Message { .. })).await
        {
            got.push(message);
        }
    }
    got
}

/// Polls `cond` every 10 ms; panics if it does not hold within [`WITHIN`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WITHIN;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {WITHIN:?}: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// A peer written by hand, to do what real links never do.
struct RawPeer {
    reader: FrameReader,
    writer: FrameWriter,
    codec: SessionCodec,
}

/// A TCP connection to `to` from `from`.
async fn dial_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

impl RawPeer {
    /// Dials `to` from `from` and answers its HELLO as `me`, under [`key`]`(7)`.
    /// The listener's first frame is not read yet.
    async fn dial(from: IpAddr, to: SocketAddr, me: &str) -> RawPeer {
        let (mut reader, mut writer) = frames::split(dial_from(from, to).await);
        let hello_frame = reader.next().await.unwrap().expect("a HELLO");
        let answered = DialerHandshake::new(&key(7), name(me), hello(1))
            .unwrap()
            .answer(&hello_frame)
            .unwrap();
        writer.push(answered.reply);
        writer.flush().await.unwrap();
        RawPeer {
            reader,
            writer,
            codec: answered.codec,
        }
    }

    /// The next message, or `None` once the connection is closed.
    async fn recv(&mut self) -> Option<Message> {
        let frame = timeout(WITHIN, self.reader.next())
            .await
            .expect("a frame or the end of stream");
        let frame = frame.ok()??;
        Some(self.codec.open(&frame).unwrap().message)
    }

    /// Seals and sends `message`; returns the frame, to replay.
    async fn send(&mut self, message: &Message) -> Bytes {
        let frame = self.codec.seal(message).unwrap();
        self.send_raw(frame.clone()).await;
        frame
    }

    async fn send_raw(&mut self, frame: Bytes) {
        self.writer.push(frame);
        self.writer.flush().await.unwrap();
    }
}

#[tokio::test]
async fn two_links_exchange_flows_both_ways_flush_and_their_counts_match_exactly() {
    let ((mut a, mut a_rx), (mut b, mut b_rx)) = pair();
    both(&mut a_rx, "b", UP).await;
    both(&mut b_rx, "a", UP).await;

    let a_exports = [
        flows(1, 1000),
        flows(5, 2000),
        flows(wire::MAX_RECORDS, 3000),
    ];
    for message in &a_exports {
        a.send("b", message.clone()).unwrap();
    }
    let b_exports = [
        Message::BulkChunk(records(7, 4000)),
        Message::BulkEnd {
            generation: 1,
            count: 7,
        },
    ];
    for message in &b_exports {
        b.send("a", message.clone()).unwrap();
    }
    // Each asks the other for a bulk, on its import link.
    a.send(
        "b",
        Message::BulkRequest {
            generation: 1,
            vips: vec![vip()],
        },
    )
    .unwrap();
    b.send(
        "a",
        Message::BulkRequest {
            generation: 1,
            vips: vec![vip()],
        },
    )
    .unwrap();

    // Per link in order; the two links of a pair interleave as they like.
    let at_b = messages(&mut b_rx, 4).await;
    let (requests, exports): (Vec<_>, Vec<_>) = at_b
        .into_iter()
        .partition(|m| matches!(m, Message::BulkRequest { .. }));
    assert_eq!(exports, a_exports);
    assert_eq!(
        requests,
        [Message::BulkRequest {
            generation: 1,
            vips: vec![vip()]
        }]
    );
    let at_a = messages(&mut a_rx, 3).await;
    let (requests, exports): (Vec<_>, Vec<_>) = at_a
        .into_iter()
        .partition(|m| matches!(m, Message::BulkRequest { .. }));
    assert_eq!(exports, b_exports);
    assert_eq!(
        requests,
        [Message::BulkRequest {
            generation: 1,
            vips: vec![vip()]
        }]
    );

    assert!(a.flush(WITHIN).await, "a's exports acknowledged");
    assert!(b.flush(WITHIN).await, "b's exports acknowledged");
    until("b's bulk request acknowledged", || {
        peer(&a).import.lag.is_zero() && peer(&b).import.lag.is_zero()
    })
    .await;
    assert_eq!(peer(&a).export.lag, Duration::ZERO);
    assert_eq!(peer(&b).export.lag, Duration::ZERO);

    // Shut down together: each says GOODBYE and reads the other to its end, so that
    // every frame one side counts as sent, the other counts as received.
    tokio::join!(a.shutdown(), b.shutdown());
    let (a, b) = (peer(&a), peer(&b));
    assert_eq!(a.export.sent, b.import.received, "a to b");
    assert_eq!(
        b.import.sent, a.export.received,
        "b to a, on a's export link"
    );
    assert_eq!(b.export.sent, a.import.received, "b to a");
    assert_eq!(
        a.import.sent, b.export.received,
        "a to b, on b's export link"
    );
    assert_eq!(a.export.sent.records, 1 + 5 + wire::MAX_RECORDS as u64);
    assert_eq!(b.export.sent.records, 7);
    assert_eq!((a.import.sent.records, b.import.sent.records), (0, 0));
    // HELLO_REPLY, 3 FLOWS, GOODBYE at least; KEEPALIVEs as the clock went.
    assert!(a.export.sent.frames >= 5, "{:?}", a.export.sent);
    for side in [&a, &b] {
        assert_eq!(side.faults.total(), 0, "{side:?}");
        assert_eq!((side.export.sessions, side.import.sessions), (1, 1));
        assert_eq!(side.export.state, LinkState::Down);
        assert!(!side.needs_resync);
    }
}

#[tokio::test]
async fn a_message_is_acknowledged_50_ms_after_it_is_handed_over() {
    let (a, mut a_rx) = alone();
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(
        raw.recv().await,
        Some(Message::Keepalive),
        "the first frame"
    );
    session(&mut a_rx, "b", Link::Import, UP).await;

    let sent_at = Instant::now();
    raw.send(&flows(2, 1000)).await;
    let got = messages(&mut a_rx, 1).await;
    assert_eq!(got, [flows(2, 1000)]);
    let ack = raw.recv().await;
    let waited = sent_at.elapsed();
    assert_eq!(ack, Some(Message::Ack { seq: 1 }));
    assert!(
        (ACK_DELAY..Duration::from_secs(1)).contains(&waited),
        "acknowledged after {waited:?}"
    );
    let status = peer(&a);
    assert_eq!(status.import.received.records, 2);
    assert_eq!(status.faults.total(), 0, "{status:?}");
}

#[tokio::test]
async fn a_wrong_key_makes_no_session_counts_auth_and_is_retried_with_backoff() {
    let (la, lb) = (reserve(), reserve());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let (a, mut a_rx) = start(config("a", a_addr, &[("b", b_addr)], 0), la);
    let mut cfg = config("b", b_addr, &[("a", a_addr)], 1);
    cfg.key = key(8);
    let (b, _b_rx) = start(cfg, lb);

    sleep(Duration::from_millis(1500)).await;
    for (node, side) in [("a", peer(&a)), ("b", peer(&b))] {
        // Each dialer fails on the listener's HELLO. Without backoff that would be
        // thousands; with it, attempts at 0, ~0.1, ~0.3, ~0.7 s (each wait ×0.5
        // to ×1.5): 3 to 5 in 1.5 s, give or take a loaded machine.
        let auth = side.faults.get(Fault::Rejected(Reject::Auth));
        assert!((2..=8).contains(&auth), "{node}: {auth} auth failures");
        assert_eq!(side.faults.total(), auth, "{node}: {:?}", side.faults);
        assert_eq!(
            (side.export.sessions, side.import.sessions),
            (0, 0),
            "{node}"
        );
        assert!(
            side.export
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("auth")),
            "{node}: {:?}",
            side.export.last_error
        );
    }
    assert!(a_rx.try_recv().is_err(), "no session event");
}

#[tokio::test]
async fn a_client_from_an_address_that_is_no_peers_is_closed_unread_and_counted() {
    let (a, _a_rx) = alone();
    let mut stranger = dial_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), a.local_addr()).await;
    let mut buf = [0; 64];
    let read = timeout(WITHIN, stranger.read(&mut buf)).await.unwrap();
    // Closed, without a HELLO (nor its nonce) to read.
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let status = a.status();
    assert_eq!(status.unattributed.get(Fault::UnknownPeer), 1);
    assert_eq!(status.unattributed.total(), 1);
    assert_eq!(status.peers[0].faults.total(), 0);
}

#[tokio::test]
async fn a_peers_address_claiming_another_name_is_closed_and_counted_unknown_peer() {
    let (a, _a_rx) = alone();
    let mut mallory = RawPeer::dial(DEAD_IP, a.local_addr(), "mallory").await;
    assert_eq!(mallory.recv().await, None, "closed after the handshake");
    let status = peer(&a);
    assert_eq!(status.faults.get(Fault::UnknownPeer), 1, "{status:?}");
    assert_eq!(status.faults.total(), 1);
    assert_eq!(status.import.sessions, 0);
}

/// Forwards each connection accepted on `listener` to `to`, frame by frame. In the
/// first connection, the client's first FLOWS frame is sent twice.
async fn replaying_proxy(listener: tokio::net::TcpListener, to: SocketAddr) {
    /// Frames from `from` to `to`; the first FLOWS twice if `replay`.
    async fn pump(mut from: FrameReader, mut to: FrameWriter, mut replay: bool) {
        const FLOWS: u8 = 3;
        while let Ok(Some(frame)) = from.next().await {
            let frame = frame.freeze();
            let again = (replay && frame[1] == FLOWS).then(|| frame.clone());
            to.push(frame);
            if let Some(frame) = again {
                to.push(frame);
                replay = false;
            }
            if to.flush().await.is_err() {
                return;
            }
        }
    }

    let mut replay = true;
    loop {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        let (client_rd, client_wr) = frames::split(client);
        let (server_rd, server_wr) = frames::split(server);
        let replay = std::mem::replace(&mut replay, false);
        tokio::spawn(async move {
            // When either side closes, both are closed.
            tokio::select! {
                () = pump(client_rd, server_wr, replay) => {}
                () = pump(server_rd, client_wr, false) => {}
            }
        });
    }
}

#[tokio::test]
async fn a_replayed_frame_is_counted_closes_the_session_and_the_next_session_works() {
    // b reaches a through a proxy at 127.0.0.1, b's address in a's config.
    let (la, lb) = (reserve(), reserve());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let proxy = tokio::net::TcpListener::bind((LOCAL, 0)).await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    tokio::spawn(replaying_proxy(proxy, a_addr));
    let (a, mut a_rx) = start(config("a", a_addr, &[("b", b_addr)], 0), la);
    let (b, mut b_rx) = start(config("b", b_addr, &[("a", proxy_addr)], 1), lb);
    session(&mut a_rx, "b", Link::Import, UP).await;
    session(&mut b_rx, "a", Link::Export, UP).await;

    b.send("a", flows(2, 1000)).unwrap();
    assert_eq!(messages(&mut a_rx, 1).await, [flows(2, 1000)]);
    session(&mut a_rx, "b", Link::Import, DOWN).await;
    let status = peer(&a);
    assert_eq!(
        status.faults.get(Fault::Rejected(Reject::Replay)),
        1,
        "{status:?}"
    );
    assert_eq!(status.faults.total(), 1);

    // b sees its connection close and redials; the proxy only replays once.
    session(&mut b_rx, "a", Link::Export, DOWN).await;
    session(&mut a_rx, "b", Link::Import, UP).await;
    b.send("a", flows(3, 2000)).unwrap();
    // The replayed copy was never handed over: the next message is the new one.
    assert_eq!(messages(&mut a_rx, 1).await, [flows(3, 2000)]);
    assert!(b.flush(WITHIN).await);
    let status = peer(&a);
    assert_eq!(status.import.sessions, 2);
    assert_eq!(status.faults.total(), 1, "{status:?}");
}

#[tokio::test]
async fn a_peer_dropped_and_restarted_is_disconnected_then_connected_and_traffic_resumes() {
    let (la, lb) = (reserve(), reserve());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let (a, mut a_rx) = start(config("a", a_addr, &[("b", b_addr)], 0), la);
    let (b, b_rx) = start(config("b", b_addr, &[("a", a_addr)], 1), lb);
    both(&mut a_rx, "b", UP).await;

    // Killed: no GOODBYE, the sockets just close.
    drop((b, b_rx));
    both(&mut a_rx, "b", DOWN).await;

    // Back on the same address, as soon as the old listener is gone.
    let deadline = Instant::now() + WITHIN;
    let lb = loop {
        match std::net::TcpListener::bind(b_addr) {
            Ok(listener) => break listener,
            Err(e) => {
                assert!(Instant::now() < deadline, "rebinding {b_addr}: {e}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let (b, mut b_rx) = start(config("b", b_addr, &[("a", a_addr)], 1), lb);
    both(&mut a_rx, "b", UP).await;
    both(&mut b_rx, "a", UP).await;

    a.send("b", flows(4, 1000)).unwrap();
    b.send("a", flows(5, 2000)).unwrap();
    assert_eq!(messages(&mut b_rx, 1).await, [flows(4, 1000)]);
    assert_eq!(messages(&mut a_rx, 1).await, [flows(5, 2000)]);
    assert!(a.flush(WITHIN).await);
    let status = peer(&a);
    assert_eq!((status.export.sessions, status.import.sessions), (2, 2));
    assert_eq!(status.export.state, LinkState::Up);
}

#[tokio::test]
async fn a_config_mismatch_is_counted_by_each_listener_and_no_session_comes_up() {
    let (la, lb) = (reserve(), reserve());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    // Both on slice 0: they would hand out the same NAT ports.
    let (a, mut a_rx) = start(config("a", a_addr, &[("b", b_addr)], 0), la);
    let (b, _b_rx) = start(config("b", b_addr, &[("a", a_addr)], 0), lb);

    until("both listeners refuse", || {
        [&a, &b]
            .iter()
            .all(|n| peer(n).faults.get(Fault::Rejected(Reject::ConfigMismatch)) >= 1)
    })
    .await;
    for side in [peer(&a), peer(&b)] {
        assert_eq!((side.export.sessions, side.import.sessions), (0, 0));
        let mismatches = side.faults.get(Fault::Rejected(Reject::ConfigMismatch));
        assert_eq!(side.faults.total(), mismatches, "{:?}", side.faults);
    }
    until("a's dialer learns of the refusal", || {
        peer(&a)
            .export
            .last_error
            .is_some_and(|e| e.contains("closed the connection in the handshake"))
    })
    .await;
    assert!(a_rx.try_recv().is_err(), "no session event");
}

#[tokio::test]
async fn a_full_queue_counts_overflow_flags_a_resync_and_sends_the_rest_on_connect() {
    // b's address is bound but nobody accepts yet: a's dial waits for a HELLO.
    let (la, lb) = (reserve(), reserve());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let mut cfg = config("a", a_addr, &[("b", b_addr)], 0);
    cfg.queue_len = 4;
    let (a, _a_rx) = start(cfg, la);

    let sent: Vec<bool> = (0..6)
        .map(|i| a.send("b", flows(1, 1000 + i)).is_ok())
        .collect();
    assert_eq!(sent, [true, true, true, true, false, false]);
    let status = peer(&a);
    assert_eq!(status.faults.get(Fault::Overflow), 2);
    assert_eq!(status.export.queued, 4);
    assert!(status.needs_resync);
    assert!(
        !a.flush(Duration::from_millis(100)).await,
        "not while flagged"
    );

    // b comes up within a's 2 s handshake: what was queued goes out in order.
    let (_b, mut b_rx) = start(config("b", b_addr, &[("a", a_addr)], 1), lb);
    let got = messages(&mut b_rx, 4).await;
    assert_eq!(got, (0..4).map(|i| flows(1, 1000 + i)).collect::<Vec<_>>());
    assert!(a.take_resync("b"));
    assert!(!a.take_resync("b"), "taken");
    assert!(a.flush(WITHIN).await);
    assert_eq!(peer(&a).export.queued, 0);
}

#[tokio::test]
async fn at_most_peers_plus_two_handshakes_run_and_each_times_out_after_2_s() {
    let (a, _a_rx) = alone();
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(frames::split(dial_from(DEAD_IP, a.local_addr()).await));
    }
    // One peer: three slots. The fourth gets no HELLO while they are taken.
    let mut greeted = 0;
    for (reader, _) in &mut silent {
        if timeout(Duration::from_millis(300), reader.next())
            .await
            .is_ok()
        {
            greeted += 1;
        }
    }
    assert_eq!(greeted, 3);
    for (reader, _) in &mut silent {
        // Whatever is left, then the end: each closed at its deadline.
        while let Ok(Some(_)) = timeout(WITHIN, reader.next()).await.unwrap() {}
    }
    let took = started.elapsed();
    assert!(
        (HANDSHAKE_TIMEOUT..HANDSHAKE_TIMEOUT * 2).contains(&took),
        "{took:?}"
    );
    let status = peer(&a);
    assert_eq!(status.faults.get(Fault::Timeout), 4, "{status:?}");
    assert_eq!(status.faults.total(), 4);
}

#[tokio::test]
async fn a_silent_session_gets_keepalives_and_is_closed_after_3_s() {
    let (a, mut a_rx) = alone();
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    let up = Instant::now();
    let mut keepalives = 0;
    while let Some(message) = raw.recv().await {
        assert_eq!(message, Message::Keepalive);
        keepalives += 1;
    }
    let closed_after = up.elapsed();
    // The first frame, then one a second of our silence.
    assert!((3..=4).contains(&keepalives), "{keepalives} keepalives");
    assert!(
        (SILENCE_TIMEOUT..SILENCE_TIMEOUT + Duration::from_secs(1)).contains(&closed_after),
        "{closed_after:?}"
    );
    session(&mut a_rx, "b", Link::Import, DOWN).await;
    let status = peer(&a);
    assert_eq!(status.faults.get(Fault::Timeout), 1, "{status:?}");
    assert!(
        status
            .import
            .last_error
            .is_some_and(|e| e.contains("nothing received"))
    );
}

#[tokio::test]
async fn a_newer_session_from_the_same_peer_replaces_the_older() {
    let (a, mut a_rx) = alone();
    let mut first = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(first.recv().await, Some(Message::Keepalive));
    session(&mut a_rx, "b", Link::Import, UP).await;
    let mut second = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(second.recv().await, Some(Message::Keepalive));
    session(&mut a_rx, "b", Link::Import, DOWN).await;
    session(&mut a_rx, "b", Link::Import, UP).await;
    assert_eq!(first.recv().await, None, "the older is closed");

    second.send(&flows(1, 1000)).await;
    assert_eq!(messages(&mut a_rx, 1).await, [flows(1, 1000)]);
    let status = peer(&a);
    assert_eq!(status.import.sessions, 2);
    assert_eq!(status.import.state, LinkState::Up);
    assert_eq!(status.faults.total(), 0, "{status:?}");
}

#[tokio::test]
async fn shutdown_acknowledges_says_goodbye_and_ends_with_the_peers_close() {
    let (mut a, mut a_rx) = alone();
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(raw.recv().await, Some(Message::Keepalive));
    raw.send(&flows(1, 1000)).await;
    messages(&mut a_rx, 1).await;

    let started = Instant::now();
    let peer_side = async {
        let mut got = Vec::new();
        while let Some(message) = raw.recv().await {
            let goodbye = message == Message::Goodbye;
            got.push(message);
            if goodbye {
                break;
            }
        }
        drop(raw);
        got
    };
    let ((), mut got) = tokio::join!(a.shutdown(), peer_side);
    // The ACK went out on its timer or before the GOODBYE, whichever came first.
    got.retain(|m| *m != Message::Keepalive);
    assert_eq!(got, [Message::Ack { seq: 1 }, Message::Goodbye]);
    assert!(
        started.elapsed() < GOODBYE_GRACE,
        "the peer's close ends it: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_links_own_frames_unknown_peers_and_unsealable_messages_are_refused() {
    let (a, _a_rx) = alone();
    for own in [
        Message::Ack { seq: 1 },
        Message::Keepalive,
        Message::Goodbye,
    ] {
        assert!(
            matches!(
                a.send("b", own.clone()),
                Err(LinksError::NotSendable { .. })
            ),
            "{own:?}"
        );
        assert!(matches!(
            a.broadcast(own),
            Err(LinksError::NotSendable { .. })
        ));
    }
    assert!(matches!(
        a.send("c", flows(1, 1000)),
        Err(LinksError::UnknownPeer { .. })
    ));
    let mut mixed = record(1000);
    mixed.backend = "[fd00::160]:6443".parse().unwrap();
    assert!(matches!(
        a.send("b", Message::Flows(vec![mixed])),
        Err(LinksError::Wire(WireError::MixedFamilies { .. }))
    ));
    assert!(matches!(
        a.send("b", flows(wire::MAX_RECORDS + 1, 1)),
        Err(LinksError::Wire(WireError::TooLarge { .. }))
    ));
    assert_eq!(a.broadcast(flows(1, 1000)).unwrap(), 1);
    assert_eq!(peer(&a).export.queued, 1);
    assert_eq!(peer(&a).faults.total(), 0);
}

#[test]
fn a_config_naming_ourselves_or_a_peer_twice_is_refused() {
    let me: SocketAddr = "127.0.0.1:9465".parse().unwrap();
    let other: SocketAddr = "127.0.0.2:9465".parse().unwrap();
    let cases = [
        (config("a", me, &[("a", other)], 0), "own name"),
        (config("a", me, &[("b", me)], 0), "own address"),
        (
            config("a", me, &[("b", other), ("b", DEAD)], 0),
            "duplicate name",
        ),
        (
            config("a", me, &[("b", other), ("c", other)], 0),
            "duplicate address",
        ),
    ];
    for (cfg, what) in cases {
        let err = validate(&cfg).unwrap_err();
        let ok = match what {
            "own name" => matches!(err, LinksError::OwnName { .. }),
            "own address" => matches!(err, LinksError::OwnAddress { .. }),
            "duplicate name" => matches!(err, LinksError::DuplicatePeer { .. }),
            _ => matches!(err, LinksError::DuplicateAddress { .. }),
        };
        assert!(ok, "{what}: {err}");
    }
    let mut cfg = config("a", me, &[("b", other)], 0);
    validate(&cfg).unwrap();
    cfg.queue_len = 0;
    assert!(matches!(validate(&cfg), Err(LinksError::QueueLen { .. })));
}

#[test]
fn backoff_doubles_from_100_ms_to_5_s_jittered_and_starts_over_on_reset() {
    let ms = Duration::from_millis;
    let mut backoff = dial::Backoff::new();
    let steps = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
    for _ in 0..200 {
        backoff.reset();
        for step in steps {
            let wait = backoff.next_wait();
            assert!(
                (ms(step / 2)..ms(step * 3 / 2)).contains(&wait),
                "step {step} ms: waited {wait:?}"
            );
        }
    }
}

#[test]
fn fault_labels_are_stable_and_each_is_logged_at_most_once_a_second() {
    let labels: Vec<&str> = Fault::ALL.iter().map(|f| f.as_str()).collect();
    let rejects: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels[..rejects.len()], rejects, "the codec's first");
    assert_eq!(
        labels[rejects.len()..],
        ["unknown_peer", "timeout", "overflow"]
    );
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        assert_eq!(fault.index(), i);
    }

    let mut log = FaultLog::default();
    let t0 = Instant::now();
    let replay = Fault::Rejected(Reject::Replay);
    assert_eq!(log.record(replay, 1, t0), Some(0), "the first is logged");
    assert_eq!(log.record(replay, 2, t0 + Duration::from_millis(500)), None);
    assert_eq!(
        log.record(Fault::Timeout, 1, t0 + Duration::from_millis(500)),
        Some(0),
        "another reason has its own clock"
    );
    assert_eq!(
        log.record(replay, 1, t0 + LOG_EVERY),
        Some(2),
        "with the 2 unlogged"
    );
    assert_eq!(log.counts.get(replay), 4);
    assert_eq!(log.counts.total(), 5);
    assert_eq!(
        format!("{:?}", log.counts),
        r#"{"replay": 4, "timeout": 1}"#
    );
}

#[tokio::test]
async fn stream_faults_close_the_session_and_are_counted_malformed() {
    let (a, _a_rx) = alone();
    // A length above the 65,536-byte limit, before any of the frame is sent.
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(raw.recv().await, Some(Message::Keepalive));
    raw.writer
        .write_raw(&65_537_u32.to_be_bytes())
        .await
        .unwrap();
    assert_eq!(raw.recv().await, None, "closed after a length too large");
    // A bulk request from the dialer: it belongs on the other connection.
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(raw.recv().await, Some(Message::Keepalive));
    raw.send(&Message::BulkRequest {
        generation: 1,
        vips: vec![vip()],
    })
    .await;
    assert_eq!(
        raw.recv().await,
        None,
        "closed after a message on the wrong link"
    );
    // An ACK of a frame a never sent (it sent one, the KEEPALIVE).
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(raw.recv().await, Some(Message::Keepalive));
    raw.send(&Message::Ack { seq: 2 }).await;
    assert_eq!(
        raw.recv().await,
        None,
        "closed after an ACK from the future"
    );

    until("three sessions counted", || peer(&a).import.sessions == 3).await;
    let malformed = Fault::Rejected(Reject::Malformed);
    until("three malformed", || peer(&a).faults.get(malformed) == 3).await;
    assert_eq!(peer(&a).faults.total(), 3, "{:?}", peer(&a).faults);
}

#[tokio::test]
async fn a_bad_record_is_skipped_and_counted_and_the_session_stays_up() {
    let (a, mut a_rx) = alone();
    let mut raw = RawPeer::dial(DEAD_IP, a.local_addr(), "b").await;
    assert_eq!(raw.recv().await, Some(Message::Keepalive));
    let mut bad = record(1001);
    bad.state = ct::CT_NONE;
    raw.send(&Message::Flows(vec![record(1000), bad])).await;
    assert_eq!(messages(&mut a_rx, 1).await, [flows(1, 1000)]);
    raw.send(&flows(1, 2000)).await;
    assert_eq!(messages(&mut a_rx, 1).await, [flows(1, 2000)]);
    let status = peer(&a);
    assert_eq!(status.faults.get(Fault::Rejected(Reject::BadRecord)), 1);
    assert_eq!(status.faults.total(), 1);
    assert_eq!(status.import.received.records, 2, "the good ones");
    assert_eq!(status.import.state, LinkState::Up);
}

#[tokio::test]
async fn after_shutdown_sends_are_refused_uncounted() {
    let (mut a, _a_rx) = alone();
    a.shutdown().await;
    assert!(matches!(
        a.send("b", flows(1, 1000)),
        Err(LinksError::Stopped)
    ));
    assert!(matches!(
        a.broadcast(flows(1, 1000)),
        Err(LinksError::Stopped)
    ));
    let status = peer(&a);
    assert_eq!(status.faults.total(), 0);
    assert!(!status.needs_resync);
}
