//! The export link: dial the peer, answer its HELLO, run the session, and dial
//! again with backoff when it ends.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpSocket, TcpStream},
    select,
    sync::mpsc,
    time::{Instant, sleep, timeout_at},
};
use tracing::debug;

use super::{
    Failed, Fault, HANDSHAKE_TIMEOUT, Link, LinkState, Peer, Queued, Shared, Traffic,
    frames::{self, LENGTH_FIELD},
    session::{self, Conn},
    stopping,
};
use crate::sync::wire::{DialerHandshake, Message, Reject};

/// The first wait before redialing.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest step, before jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long was healthy: the backoff starts over.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);

/// Waits between attempts: 100 ms doubling to 5 s, each scaled by a random factor
/// in [0.5, 1.5) so that nodes restarted together do not dial in step.
pub(super) struct Backoff {
    step: Duration,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff { step: BACKOFF_MIN }
    }

    /// The wait before the next attempt.
    pub(super) fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(0.5 + fastrand::f64());
        self.step = (self.step * 2).min(BACKOFF_MAX);
        wait
    }

    pub(super) fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }
}

/// The export link of peer `index`, until shutdown.
pub(super) async fn run_export(
    shared: Arc<Shared>,
    index: usize,
    mut queue: mpsc::Receiver<Queued>,
) {
    let peer = &shared.peers[index];
    let link = &peer.export;
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Backoff::new();
    loop {
        link.set_state(LinkState::Connecting);
        let dialed = select! {
            dialed = dial(&shared, peer) => dialed,
            () = stopping(&mut shutdown) => return,
        };
        match dialed {
            Ok(conn) => {
                shared.session_up(peer, Link::Export).await;
                let started = Instant::now();
                let end = session::run(&shared, peer, Link::Export, conn, &mut queue).await;
                shared.session_down(peer, Link::Export, &end).await;
                if matches!(end, session::End::Shutdown) {
                    return;
                }
                if started.elapsed() >= BACKOFF_RESET_AFTER {
                    backoff.reset();
                }
            }
            Err(failed) => {
                if let Failed::Fault(fault) = failed {
                    shared.fault(Some(peer), fault, 1, format_args!("dialing: {failed}"));
                } else {
                    debug!(peer = %peer.name, "sync: dialing: {failed}");
                }
                link.set_error(failed.to_string());
            }
        }
        select! {
            () = sleep(backoff.next_wait()) => {}
            () = stopping(&mut shutdown) => return,
        }
    }
}

/// A connection to `peer` with its handshake done: the listener's HELLO answered
/// and its first session frame received, all within [`HANDSHAKE_TIMEOUT`] of the
/// start of the connect.
async fn dial(shared: &Shared, peer: &Peer) -> Result<Conn, Failed> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let Ok(stream) = timeout_at(deadline, connect(shared.source, peer.addr)).await else {
        // Nothing answered: no peer to blame.
        return Err(Failed::Io(std::io::ErrorKind::TimedOut.into()));
    };
    let stream = stream?;
    peer.export.set_state(LinkState::Handshake);
    timeout_at(deadline, handshake(shared, peer, stream))
        .await
        .unwrap_or(Err(Failed::Fault(Fault::Timeout)))
}

/// A socket to `to`, from `source` when it has `to`'s family: peers know our
/// connections by their source address.
async fn connect(source: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == to.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(to).await
}

async fn handshake(shared: &Shared, peer: &Peer, stream: TcpStream) -> Result<Conn, Failed> {
    frames::tune(&stream)?;
    let (mut reader, mut writer) = frames::split(stream);
    let mut received = Traffic::default();
    let mut sent = Traffic::default();

    let hello = reader.next().await?.ok_or(Failed::Closed)?;
    received.add(Traffic::frame(hello.len() as u64 + LENGTH_FIELD, 0));
    let answered = DialerHandshake::new(&shared.key, shared.name.clone(), shared.hello.clone())?
        .answer(&hello)?;
    if answered.peer.as_str() != &*peer.name {
        return Err(Failed::Fault(Fault::UnknownPeer));
    }
    sent.add(Traffic::frame(writer.push(answered.reply), 0));
    writer.flush().await?;

    // The listener has checked our name and Hello when its first frame comes.
    let mut codec = answered.codec;
    let first = reader.next().await?.ok_or(Failed::Closed)?;
    received.add(Traffic::frame(first.len() as u64 + LENGTH_FIELD, 0));
    if codec.open(&first)?.message != Message::Keepalive {
        return Err(Reject::Malformed.into());
    }
    peer.export.count_sent(sent);
    peer.export.count_received(received);
    Ok(Conn {
        reader,
        writer,
        codec,
    })
}
