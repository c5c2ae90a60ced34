//! The import links: accept the peers' connections, authenticate them, and run
//! each peer's newest session.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    select,
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::{Instant, sleep, timeout_at},
};
use tracing::{debug, warn};

use super::{
    Failed, Fault, HANDSHAKE_TIMEOUT, Link, Queued, Shared, Traffic,
    frames::{self, LENGTH_FIELD},
    session::{self, Conn},
    stopping,
};
use crate::sync::wire::{ListenerHandshake, Message};

/// After `accept` fails (out of file descriptors, say), wait this long before
/// the next, rather than spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections until shutdown or [`super::Links::stop_listening`]; each
/// handshake is a task of its own. The listener is closed when this returns.
pub(super) async fn run_listener(shared: Arc<Shared>, listener: TcpListener) {
    // Said on drop, so that a task that panicked or was aborted cannot leave a
    // SIGTERM waiting for it forever.
    let closed = Closed(Arc::clone(&shared));
    accept_until_stopped(&shared, listener).await;
    drop(closed);
}

/// Clears `listening` when dropped, after the listener it stands for.
struct Closed(Arc<Shared>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.listening.send_replace(false);
    }
}

async fn accept_until_stopped(shared: &Arc<Shared>, listener: TcpListener) {
    // Handshakes need no state of their own beyond their socket, so only their
    // number is bounded: peers + 2 lets every peer redial at once, with room for
    // two stale connections still in their 2 s.
    let slots = Arc::new(Semaphore::new(shared.peers.len() + 2));
    // Dropped with this task, which aborts handshakes under way.
    let mut handshakes = JoinSet::new();
    let mut shutdown = shared.shutdown.subscribe();
    let mut unlisten = shared.unlisten.subscribe();
    loop {
        select! {
            () = stopping(&mut shutdown) => return,
            () = stopping(&mut unlisten) => return,
            Some(_) = handshakes.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let accepted_at = Instant::now();
                    let candidates = shared.peers_at(from.ip());
                    if candidates.is_empty() {
                        // Closed before anything is read: a stranger gets no HELLO
                        // (no nonce to collect) and costs no more than the accept.
                        drop(stream);
                        shared.fault(
                            None,
                            Fault::UnknownPeer,
                            1,
                            format_args!("closed a connection from {from}: no peer's address"),
                        );
                        continue;
                    }
                    handshakes.spawn(handshake(
                        Arc::clone(shared),
                        stream,
                        from,
                        candidates,
                        Arc::clone(&slots),
                        accepted_at,
                    ));
                }
                Err(error) => {
                    warn!(%error, "sync: accept failed");
                    sleep(ACCEPT_PAUSE).await;
                }
            },
        }
    }
}

/// The handshake of a connection from `from`, where the peers `candidates` are
/// configured; an authenticated session goes to its peer's import task.
async fn handshake(
    shared: Arc<Shared>,
    stream: TcpStream,
    from: SocketAddr,
    candidates: Vec<usize>,
    slots: Arc<Semaphore>,
    accepted_at: Instant,
) {
    // Before the handshake proves a name, blame the address's peer, if only one.
    let blamed = match candidates[..] {
        [only] => Some(only),
        _ => None,
    };
    let deadline = accepted_at + HANDSHAKE_TIMEOUT;
    let done = timeout_at(deadline, async {
        // The semaphore is never closed.
        let _slot = slots.acquire().await;
        handshake_slotted(&shared, stream, &candidates).await
    })
    .await
    .unwrap_or(Err((blamed, Failed::Fault(Fault::Timeout))));
    match done {
        Ok((index, conn)) => {
            // The import task lives as long as the links.
            let _ = shared.peers[index].sessions.send(conn).await;
        }
        Err((index, failed)) => {
            let peer = index.or(blamed).map(|i| &shared.peers[i]);
            if let Failed::Fault(fault) = failed {
                shared.fault(peer, fault, 1, format_args!("from {from}: {failed}"));
            } else {
                debug!(%from, "sync: accepted connection: {failed}");
            }
        }
    }
}

/// The listener's half of the handshake: HELLO out, `HELLO_REPLY` in, the name
/// and [`crate::sync::wire::Hello`] checked, the first session frame (a KEEPALIVE)
/// out. On success, the peer's index; on failure, the peer's index if the name
/// was proven.
async fn handshake_slotted(
    shared: &Shared,
    stream: TcpStream,
    candidates: &[usize],
) -> Result<(usize, Conn), (Option<usize>, Failed)> {
    let unproven = |failed: Failed| (None, failed);
    frames::tune(&stream).map_err(|e| unproven(e.into()))?;
    let (mut reader, mut writer) = frames::split(stream);
    let mut sent = Traffic::default();

    let handshake =
        ListenerHandshake::new(&shared.key, shared.name.clone()).map_err(|e| unproven(e.into()))?;
    sent.add(Traffic::frame(writer.push(handshake.hello()), 0));
    writer.flush().await.map_err(|e| unproven(e.into()))?;
    let reply = reader
        .next()
        .await
        .map_err(|e| unproven(e.into()))?
        .ok_or(unproven(Failed::Closed))?;
    let accepted = handshake.finish(&reply).map_err(|r| unproven(r.into()))?;
    let index = candidates
        .iter()
        .copied()
        .find(|&i| *shared.peers[i].name == *accepted.peer.as_str())
        .ok_or(unproven(Failed::Fault(Fault::UnknownPeer)))?;
    let proven = |failed: Failed| (Some(index), failed);
    shared
        .hello
        .check_peer(&accepted.hello)
        .map_err(|r| proven(r.into()))?;

    let mut codec = accepted.codec;
    let first = codec
        .seal(&Message::Keepalive)
        .map_err(|e| proven(e.into()))?;
    sent.add(Traffic::frame(writer.push(first), 0));
    writer.flush().await.map_err(|e| proven(e.into()))?;
    let import = &shared.peers[index].import;
    import.count_sent(sent);
    import.count_received(Traffic::frame(reply.len() as u64 + LENGTH_FIELD, 0));
    Ok((
        index,
        Conn {
            reader,
            writer,
            codec,
        },
    ))
}

/// The import link of peer `index`, until shutdown: one session at a time, the
/// newest (a peer that redials has given up on its old connection, which may take
/// 3 s of silence to notice here).
pub(super) async fn run_import(
    shared: Arc<Shared>,
    index: usize,
    mut sessions: mpsc::Receiver<Conn>,
    mut queue: mpsc::Receiver<Queued>,
) {
    let peer = &shared.peers[index];
    let mut shutdown = shared.shutdown.subscribe();
    let mut newer = None;
    loop {
        if newer.is_none() {
            newer = select! {
                conn = sessions.recv() => conn,
                () = stopping(&mut shutdown) => None,
            };
        }
        let Some(conn) = newer.take() else { return };
        shared.session_up(peer, Link::Import).await;
        let end = select! {
            end = session::run(&shared, peer, Link::Import, conn, &mut queue) => end,
            conn = sessions.recv() => {
                newer = conn;
                session::End::Replaced
            }
        };
        shared.session_down(peer, Link::Import, &end).await;
        if matches!(end, session::End::Shutdown) {
            return;
        }
    }
}
