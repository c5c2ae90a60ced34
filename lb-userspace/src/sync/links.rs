//! The authenticated connections between this node and its sync peers. They move
//! [`Message`]s and know nothing of the datapath: what the messages mean (a
//! flow to install, a bulk to send) is the caller's business.
//!
//! **One connection per ordered pair.** Each node listens and dials every peer, so
//! N nodes make N(N−1) connections, and each direction of flow data has one ordered,
//! acknowledged stream of its own:
//! - our **export** link is the connection we dial: our FLOWS, `BULK_CHUNK`s and
//!   `BULK_END`s go out on it; the peer's ACKs and `BULK_REQUEST`s come back on it;
//! - our **import** link is the connection the peer dials to us: its exports come in
//!   and our ACKs and `BULK_REQUEST`s go back.
//!
//! The exporter dials because it is the side with something to lose: it sees its
//! stream break (a write fails, ACKs stop) and reconnects, while the importer just
//! takes the next connection and asks for a bulk ([`Inbound::Connected`] on the
//! import link). A bulk request travels on the connection whose data it asks for,
//! so it belongs to that session: a request from a dead session cannot be answered
//! into a new one, and the bulk is ordered after the live records before it. One
//! connection per unordered pair would halve the sockets, but two nodes dialing at
//! once need a tie-break, and a fault in one direction would take the other down.
//!
//! **Handshake and trust.** A connection from an address that is not a peer's is
//! closed before anything is read from it (`unknown_peer`). At most peers + 2
//! handshakes run at once (a connection past that waits for a slot), and each must
//! finish within 2 s of the accept or the connect (`timeout`). The name the
//! handshake authenticates must be the one configured for the address
//! (`unknown_peer`). Peers are told apart by address alone (a dialer's port is
//! ephemeral), so our dialers bind their sockets to our listen address; where
//! several peers share an address (tests, or nodes on one host) the name picks
//! among them. The listener checks the dialer's [`Hello`] (`config_mismatch`). The
//! dialer counts its link up only when the listener's first session frame (a
//! KEEPALIVE) arrives, so a refused handshake never shows as a session.
//!
//! **Session.** Every frame is read as soon as it arrives, ACKs included, because a
//! socket closed with unread input resets and loses what it had not sent. A
//! KEEPALIVE goes out after 1 s without sending; 3 s without receiving closes the
//! session (`timeout`). The receiver ACKs the seq of the last message it has handed
//! to the caller, after 64 unacknowledged messages or 50 ms after the first of
//! them, whichever comes first; the sender's lag is the age of its oldest
//! unacknowledged message. A frame the codec refuses closes the connection and is
//! counted by its reason; records it skips are counted (`bad_record`) and the
//! session stays. The dialer reconnects after 100 ms doubling to 5 s, each wait
//! jittered (×0.5 to ×1.5), starting over after a session that lasted 10 s.
//!
//! **Queues.** Each link has a bounded queue; a message that does not fit is
//! dropped and counted (`overflow`), and an export dropped so marks the peer as
//! needing a resync ([`Links::take_resync`]). A queue outlives the sessions: what
//! is queued while a link is down goes out on its next session, before the bulk
//! the importer asks for then. Messages sent but not acknowledged when a session
//! breaks are lost; the bulk at the next session repairs that.
//!
//! **Tasks.** [`Links::start`] spawns on the caller's tokio runtime (the sync
//! thread's current-thread runtime): one task accepting connections (each handshake
//! a task of its own), and two per peer, export and import, each running one session
//! at a time with a reader and a writer polled side by side. The API is safe to
//! call from any thread: [`Links::send`] never waits.

mod accept;
mod dial;
mod faults;
mod frames;
mod link;
mod session;
mod status;
#[cfg(test)]
mod tests;

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{
        mpsc::{self, error::TrySendError},
        watch,
    },
    task::JoinSet,
    time::{Instant, timeout, timeout_at},
};
use tracing::{info, warn};

use self::{
    faults::FaultLog,
    link::{InFlight, LinkShared, Queued},
};
pub use self::{
    faults::{Fault, FaultCounts},
    status::{LinkState, LinkStatus, LinksStatus, PeerStatus, Traffic},
};
use super::{
    key::Key,
    wire::{Hello, Message, NodeName, Reject, WireError},
};

/// How long a handshake may take, from the accept or the connect.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A KEEPALIVE goes out after this long without sending anything.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// A session that receives nothing for this long is closed.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(3);
/// The receiver ACKs after this many unacknowledged messages...
const ACK_EVERY: u32 = 64;
/// ...or this long after the first of them, whichever comes first.
const ACK_DELAY: Duration = Duration::from_millis(50);
/// At shutdown, after our GOODBYE, how long the peer's last frames are read for.
const GOODBYE_GRACE: Duration = Duration::from_secs(1);
/// At shutdown, how long the tasks get before they are aborted.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// The default length of each link's queue, in messages. A live FLOWS message is a
/// batch of events, typically a few records; a bulk is up to 629 records a chunk.
pub const DEFAULT_QUEUE_LEN: usize = 1024;
/// The default length of the queue of [`Inbound`] events to the caller. When it is
/// full the links stop reading, and TCP pushes back on the exporters.
pub const DEFAULT_INBOUND_LEN: usize = 1024;

/// What [`Links::start`] needs.
#[derive(Clone, Debug)]
pub struct LinksConfig {
    /// This node's name in the handshake.
    pub name: NodeName,
    /// Where peers dial us; our dialed connections also leave from its address.
    pub listen: SocketAddr,
    pub peers: Vec<PeerConfig>,
    pub key: Key,
    /// This node's configuration, offered to the peers we dial.
    pub hello: Hello,
    /// Messages each link's queue holds.
    pub queue_len: usize,
    /// [`Inbound`] events the caller's queue holds.
    pub inbound_len: usize,
}

impl LinksConfig {
    /// A config with the default queue lengths.
    pub fn new(
        name: NodeName,
        listen: SocketAddr,
        peers: Vec<PeerConfig>,
        key: Key,
        hello: Hello,
    ) -> LinksConfig {
        LinksConfig {
            name,
            listen,
            peers,
            key,
            hello,
            queue_len: DEFAULT_QUEUE_LEN,
            inbound_len: DEFAULT_INBOUND_LEN,
        }
    }
}

/// A sync peer: its name and where it listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: NodeName,
    pub addr: SocketAddr,
}

/// Why the links cannot start, or cannot take a message.
#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("sync peer {name} is listed twice")]
    DuplicatePeer { name: String },
    #[error("sync peers {first} and {second} share the address {addr}")]
    DuplicateAddress {
        first: String,
        second: String,
        addr: SocketAddr,
    },
    #[error("sync peer {name} has this node's own name")]
    OwnName { name: String },
    #[error("sync peer {name} has this node's own listen address {addr}")]
    OwnAddress { name: String, addr: SocketAddr },
    #[error(
        "sync queue lengths must be at least 1 (queue_len {queue_len}, inbound_len {inbound_len})"
    )]
    QueueLen {
        queue_len: usize,
        inbound_len: usize,
    },
    #[error("cannot listen for sync peers on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{peer:?} is not a sync peer")]
    UnknownPeer { peer: String },
    #[error(
        "{kind} frames belong to the links themselves; callers send FLOWS, BULK_REQUEST, \
         BULK_CHUNK and BULK_END"
    )]
    NotSendable { kind: &'static str },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the sync queue to {peer} is full: message dropped")]
    Overflow { peer: String },
    #[error("the sync links are shut down")]
    Stopped,
}

/// One of the two connections with a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// The connection we dial: our exports out, the peer's ACKs and bulk requests in.
    Export,
    /// The connection the peer dials: its exports in, our ACKs and bulk requests out.
    Import,
}

impl Link {
    /// The status and metric label; stable.
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Export => "export",
            Link::Import => "import",
        }
    }

    /// The link a message goes out on, or `None` for the links' own frames.
    fn sending(message: &Message) -> Option<Link> {
        match message {
            Message::Flows(_) | Message::BulkChunk(_) | Message::BulkEnd { .. } => {
                Some(Link::Export)
            }
            Message::BulkRequest { .. } => Some(Link::Import),
            Message::Ack { .. } | Message::Keepalive | Message::Goodbye => None,
        }
    }

    /// The peer's link at the other end of this connection.
    fn other(self) -> Link {
        match self {
            Link::Export => Link::Import,
            Link::Import => Link::Export,
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the links hand to the caller, in order per link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A session is up. On [`Link::Import`], ask the peer for a bulk.
    Connected { peer: Arc<str>, link: Link },
    /// A session ended; what was sent on it and not acknowledged is lost.
    /// `closed`: the peer's end closed it without a GOODBYE (EOF or a reset):
    /// its process is gone, or its side gave up on this session.
    Disconnected {
        peer: Arc<str>,
        link: Link,
        closed: bool,
    },
    /// A message from a peer: FLOWS, `BULK_CHUNK` and `BULK_END` on the import link,
    /// `BULK_REQUEST` on the export link.
    Message { peer: Arc<str>, message: Message },
}

/// The connections with the sync peers. Dropping it aborts every task at once (a
/// kill, to the peers); [`Links::shutdown`] says GOODBYE first.
pub struct Links {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    local_addr: SocketAddr,
}

impl Links {
    /// Listens on `cfg.listen` and starts dialing the peers. The tasks run on the
    /// current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(cfg: LinksConfig) -> Result<(Links, mpsc::Receiver<Inbound>), LinksError> {
        let listen = |source| LinksError::Listen {
            addr: cfg.listen,
            source,
        };
        // std sets SO_REUSEADDR, so a restart binds while old connections linger.
        let listener = std::net::TcpListener::bind(cfg.listen).map_err(listen)?;
        Links::start_on(cfg, listener)
    }

    /// As [`Links::start`], on a listener bound already (to port 0, say: the
    /// links then dial from `cfg.listen`'s address and peers need the real port,
    /// [`Links::local_addr`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start_on(
        cfg: LinksConfig,
        listener: std::net::TcpListener,
    ) -> Result<(Links, mpsc::Receiver<Inbound>), LinksError> {
        validate(&cfg)?;
        let listen = |source| LinksError::Listen {
            addr: cfg.listen,
            source,
        };
        listener.set_nonblocking(true).map_err(listen)?;
        let local_addr = listener.local_addr().map_err(listen)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen)?;

        let (inbound, inbound_rx) = mpsc::channel(cfg.inbound_len);
        let mut peers = Vec::with_capacity(cfg.peers.len());
        let mut receivers = Vec::with_capacity(cfg.peers.len());
        for peer in &cfg.peers {
            let (peer, rx) = Peer::new(peer, cfg.queue_len);
            peers.push(peer);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            name: cfg.name,
            key: cfg.key,
            hello: cfg.hello,
            source: (!cfg.listen.ip().is_unspecified()).then_some(cfg.listen.ip()),
            peers,
            unattributed: Mutex::new(FaultLog::default()),
            inbound,
            progress: watch::Sender::new(()),
            shutdown: watch::Sender::new(false),
            unlisten: watch::Sender::new(false),
            listening: watch::Sender::new(true),
        });

        let mut tasks = JoinSet::new();
        tasks.spawn(accept::run_listener(Arc::clone(&shared), listener));
        for (index, rx) in receivers.into_iter().enumerate() {
            tasks.spawn(dial::run_export(Arc::clone(&shared), index, rx.export));
            tasks.spawn(accept::run_import(
                Arc::clone(&shared),
                index,
                rx.sessions,
                rx.import,
            ));
        }
        Ok((
            Links {
                shared,
                tasks,
                local_addr,
            },
            inbound_rx,
        ))
    }

    /// Where the links listen.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `message` for `peer`, on the link it goes out on ([`Link`]). Never
    /// waits: a full queue drops the message and counts `overflow`. After
    /// [`Links::shutdown`], [`LinksError::Stopped`].
    pub fn send(&self, peer: &str, message: Message) -> Result<(), LinksError> {
        let link = sendable(&message)?;
        let peer = self
            .shared
            .peer(peer)
            .ok_or_else(|| LinksError::UnknownPeer {
                peer: peer.to_owned(),
            })?;
        self.shared.enqueue(peer, link, Arc::new(message))
    }

    /// Queues `message` for every peer; returns how many queues took it (the others
    /// were full, and counted `overflow`).
    pub fn broadcast(&self, message: Message) -> Result<usize, LinksError> {
        let link = sendable(&message)?;
        let message = Arc::new(message);
        let mut queued = 0;
        for peer in &self.shared.peers {
            match self.shared.enqueue(peer, link, Arc::clone(&message)) {
                Ok(()) => queued += 1,
                Err(LinksError::Overflow { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(queued)
    }

    /// Waits until every peer has acknowledged every export queued before the call,
    /// and no export was dropped since the last [`Links::take_resync`]; `false` if
    /// that is not so within `timeout`. For a handover: our flows are at every peer.
    /// Bulk requests are not waited for: they are about the peers' flows.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut progress = self.shared.progress.subscribe();
        let targets: Vec<u64> = self
            .shared
            .peers
            .iter()
            .map(|peer| *lock(&peer.export.queued))
            .collect();
        let flushed = || {
            self.shared.peers.iter().zip(&targets).all(|(peer, &t)| {
                peer.export.acked.load(Ordering::Acquire) >= t
                    && !peer.needs_resync.load(Ordering::Acquire)
            })
        };
        loop {
            if flushed() {
                return true;
            }
            match timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return flushed(),
            }
        }
    }

    /// The ticket of the last export queued for `peer` (0: none yet), for
    /// [`Links::acknowledged`].
    pub fn last_queued(&self, peer: &str) -> Option<u64> {
        self.shared.peer(peer).map(|p| *lock(&p.export.queued))
    }

    /// Whether `peer` has acknowledged the export with `ticket` (or a later one),
    /// and no export to it was dropped since the last [`Links::take_resync`].
    pub fn acknowledged(&self, peer: &str, ticket: u64) -> bool {
        self.shared.peer(peer).is_some_and(|p| {
            p.export.acked.load(Ordering::Acquire) >= ticket
                && !p.needs_resync.load(Ordering::Acquire)
        })
    }

    /// Whether an export to `peer` was dropped since the last call: if so, send it
    /// a bulk. Clears the flag.
    pub fn take_resync(&self, peer: &str) -> bool {
        let Some(peer) = self.shared.peer(peer) else {
            return false;
        };
        let taken = peer.needs_resync.swap(false, Ordering::AcqRel);
        if taken {
            self.shared.progress.send_modify(|()| {});
        }
        taken
    }

    /// A snapshot of every peer.
    pub fn status(&self) -> LinksStatus {
        let now = Instant::now();
        LinksStatus {
            peers: self
                .shared
                .peers
                .iter()
                .map(|peer| PeerStatus {
                    name: Arc::clone(&peer.name),
                    addr: peer.addr,
                    export: peer.export.status(now),
                    import: peer.import.status(now),
                    needs_resync: peer.needs_resync.load(Ordering::Acquire),
                    faults: lock(&peer.faults).counts,
                })
                .collect(),
            unattributed: lock(&self.shared.unattributed).counts,
        }
    }

    /// Closes the listener, and returns once it is closed; the sessions up stay
    /// up. The datapath's liveness gate (`alive` in lb-ebpf's `sync`) asks for
    /// this socket, so from here on this node opens no flow of a synced VIP and
    /// completes no handshake its master had not answered yet: the first step
    /// of handing the VIPs over.
    pub async fn stop_listening(&self) {
        self.shared.unlisten.send_replace(true);
        let _ = self.shared.listening.subscribe().wait_for(|l| !*l).await;
    }

    /// Says GOODBYE on every session, reads what the peers still send for up to
    /// 1 s, and stops every task (aborting what is left after 2 s). Flush first.
    pub async fn shutdown(&mut self) {
        self.shared.shutdown.send_replace(true);
        let tasks = &mut self.tasks;
        let all = async { while tasks.join_next().await.is_some() {} };
        if timeout(SHUTDOWN_TIMEOUT, all).await.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// The link `message` goes out on, or why the caller may not send it.
fn sendable(message: &Message) -> Result<Link, LinksError> {
    let link = Link::sending(message).ok_or(LinksError::NotSendable {
        kind: match message {
            Message::Ack { .. } => "ACK",
            Message::Keepalive => "KEEPALIVE",
            _ => "GOODBYE",
        },
    })?;
    message.check()?;
    Ok(link)
}

fn validate(cfg: &LinksConfig) -> Result<(), LinksError> {
    if cfg.queue_len == 0 || cfg.inbound_len == 0 {
        return Err(LinksError::QueueLen {
            queue_len: cfg.queue_len,
            inbound_len: cfg.inbound_len,
        });
    }
    for (i, peer) in cfg.peers.iter().enumerate() {
        let name = || peer.name.to_string();
        if peer.name == cfg.name {
            return Err(LinksError::OwnName { name: name() });
        }
        if peer.addr == cfg.listen {
            return Err(LinksError::OwnAddress {
                name: name(),
                addr: peer.addr,
            });
        }
        for earlier in &cfg.peers[..i] {
            if earlier.name == peer.name {
                return Err(LinksError::DuplicatePeer { name: name() });
            }
            if earlier.addr == peer.addr {
                return Err(LinksError::DuplicateAddress {
                    first: earlier.name.to_string(),
                    second: name(),
                    addr: peer.addr,
                });
            }
        }
    }
    Ok(())
}

/// A mutex's guard; a panic elsewhere while it was held leaves counters, which are
/// still worth reading.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Resolves once [`Links::shutdown`] is called (or the links are gone).
async fn stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// What every task shares.
struct Shared {
    name: NodeName,
    key: Key,
    hello: Hello,
    /// The address our dialed connections leave from, so that peers know them.
    source: Option<IpAddr>,
    peers: Vec<Peer>,
    unattributed: Mutex<FaultLog>,
    inbound: mpsc::Sender<Inbound>,
    /// Changed on every ACK and every [`Links::take_resync`], for [`Links::flush`].
    progress: watch::Sender<()>,
    shutdown: watch::Sender<bool>,
    /// Set by [`Links::stop_listening`].
    unlisten: watch::Sender<bool>,
    /// Cleared once the listener is closed, however its task ended.
    listening: watch::Sender<bool>,
}

impl Shared {
    fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|peer| &*peer.name == name)
    }

    /// The peers configured at `ip`, by index.
    fn peers_at(&self, ip: IpAddr) -> Vec<usize> {
        let ip = ip.to_canonical();
        (0..self.peers.len())
            .filter(|&i| self.peers[i].addr.ip().to_canonical() == ip)
            .collect()
    }

    fn enqueue(&self, peer: &Peer, link: Link, message: Arc<Message>) -> Result<(), LinksError> {
        match peer.link(link).enqueue(message) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(LinksError::Stopped),
            Err(TrySendError::Full(_)) => {}
        }
        if link == Link::Export {
            peer.needs_resync.store(true, Ordering::Release);
        }
        self.fault(
            Some(peer),
            Fault::Overflow,
            1,
            format_args!("{link} queue full: message dropped"),
        );
        Err(LinksError::Overflow {
            peer: peer.name.to_string(),
        })
    }

    /// Counts `n` of `fault` against `peer` (or against no peer), and logs it unless
    /// the same was logged less than a second ago.
    fn fault(&self, peer: Option<&Peer>, fault: Fault, n: u64, what: fmt::Arguments<'_>) {
        let log = peer.map_or(&self.unattributed, |peer| &peer.faults);
        let due = lock(log).record(fault, n, Instant::now());
        if let Some(suppressed) = due {
            warn!(
                peer = peer.map_or("-", |peer| &peer.name),
                reason = fault.as_str(),
                suppressed,
                "sync: {what}"
            );
        }
    }

    /// Hands `event` to the caller; waits while the caller's queue is full. A
    /// caller that dropped its receiver gets nothing.
    async fn emit(&self, event: Inbound) {
        let _ = self.inbound.send(event).await;
    }

    /// A session of `peer` on `link` is up.
    async fn session_up(&self, peer: &Peer, link: Link) {
        {
            let mut inner = lock(&peer.link(link).inner);
            inner.state = LinkState::Up;
            inner.sessions += 1;
            inner.last_error = None;
            inner.in_flight.clear();
        }
        info!(peer = %peer.name, %link, "sync: session up");
        self.emit(Inbound::Connected {
            peer: Arc::clone(&peer.name),
            link,
        })
        .await;
    }

    /// A session of `peer` on `link` ended so.
    async fn session_down(&self, peer: &Peer, link: Link, end: &session::End) {
        {
            let mut inner = lock(&peer.link(link).inner);
            inner.state = LinkState::Down;
            inner.last_error = Some(end.to_string());
            inner.in_flight.clear();
        }
        if let session::End::Fault(fault) = *end {
            self.fault(
                Some(peer),
                fault,
                1,
                format_args!("{link} session closed: {end}"),
            );
        } else {
            info!(peer = %peer.name, %link, "sync: session ended: {end}");
        }
        self.emit(Inbound::Disconnected {
            peer: Arc::clone(&peer.name),
            link,
            closed: matches!(end, session::End::Closed | session::End::Io(_)),
        })
        .await;
    }
}

/// One peer's links and counters.
struct Peer {
    name: Arc<str>,
    addr: SocketAddr,
    export: LinkShared,
    import: LinkShared,
    /// Authenticated import sessions, from the acceptor to the import task.
    sessions: mpsc::Sender<session::Conn>,
    needs_resync: AtomicBool,
    faults: Mutex<FaultLog>,
}

/// The receiving ends a peer's tasks own.
struct PeerReceivers {
    export: mpsc::Receiver<Queued>,
    import: mpsc::Receiver<Queued>,
    sessions: mpsc::Receiver<session::Conn>,
}

impl Peer {
    fn new(cfg: &PeerConfig, queue_len: usize) -> (Peer, PeerReceivers) {
        let (export, export_rx) = LinkShared::new(queue_len, LinkState::Connecting);
        let (import, import_rx) = LinkShared::new(queue_len, LinkState::Down);
        let (sessions, sessions_rx) = mpsc::channel(1);
        (
            Peer {
                name: Arc::from(cfg.name.as_str()),
                addr: cfg.addr,
                export,
                import,
                sessions,
                needs_resync: AtomicBool::new(false),
                faults: Mutex::new(FaultLog::default()),
            },
            PeerReceivers {
                export: export_rx,
                import: import_rx,
                sessions: sessions_rx,
            },
        )
    }

    fn link(&self, link: Link) -> &LinkShared {
        match link {
            Link::Export => &self.export,
            Link::Import => &self.import,
        }
    }
}

/// Why a handshake failed.
#[derive(Debug)]
enum Failed {
    /// Counted against the peer (or against no peer).
    Fault(Fault),
    /// The connection broke; not the peer's fault as far as we can tell.
    Io(io::Error),
    /// The peer closed the connection. A listener does that when it refuses our
    /// name or our [`Hello`]: its own log and counters say which.
    Closed,
}

impl From<frames::ReadError> for Failed {
    fn from(error: frames::ReadError) -> Failed {
        match error {
            frames::ReadError::TooLong => Failed::Fault(Fault::Rejected(Reject::Malformed)),
            frames::ReadError::Io(error) => Failed::Io(error),
        }
    }
}

impl From<Reject> for Failed {
    fn from(reject: Reject) -> Failed {
        Failed::Fault(Fault::Rejected(reject))
    }
}

impl From<io::Error> for Failed {
    fn from(error: io::Error) -> Failed {
        Failed::Io(error)
    }
}

/// Only the system's random number generator fails a handshake's start.
impl From<WireError> for Failed {
    fn from(error: WireError) -> Failed {
        Failed::Io(io::Error::other(error))
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failed::Fault(Fault::Rejected(reject)) => {
                write!(f, "handshake refused: {reject} ({})", reject.as_str())
            }
            Failed::Fault(Fault::Timeout) => write!(
                f,
                "handshake not done within {}s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
            Failed::Fault(Fault::UnknownPeer) => {
                f.write_str("handshake names another node than the one at this address")
            }
            Failed::Fault(fault) => f.write_str(fault.as_str()),
            Failed::Io(error) => write!(f, "{error}"),
            Failed::Closed => f.write_str(
                "the peer closed the connection in the handshake (its log says why: \
                 config_mismatch or unknown_peer)",
            ),
        }
    }
}
