//! The sync node: one thread, with a runtime of its own, between this node's
//! datapath and its peers, so that nothing of sync can delay the daemon loop
//! (which must act on an election's release in time).
//!
//! - Out: the datapath's `SYNC_EVENTS` become records, sent to every peer as
//!   they come (one FLOWS frame per drain); a peer asking (`BULK_REQUEST`, at each
//!   session it opens) gets every synced flow of the VIPs this node owns, in
//!   chunks, then `BULK_END`. A peer whose export queue overflowed gets one unasked.
//! - In: a peer's records are installed parked ([`super::install`]); at each
//!   session this node's import side opens it asks the peer for a bulk.
//!
//! The daemon hands it the translation [`View`] after every reconcile and reads
//! its [`NodeStats`] and the links' status for `/status` and `/metrics`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use lb_common::{SyncEvent, ct::FLOW_F_SYNC};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, info, warn};

use super::{
    install::{View, entries_of, record_of, record_of_flow, stale},
    links::{Inbound, Link, Links, LinksConfig, LinksStatus},
    ready::{Readiness, Tracker},
    wire::{FlowRecord, MAX_RECORDS, Message},
};
use crate::{
    datapath::Datapath,
    election::{Departed, SyncSignals},
};

/// What the node counts, beside the links' own counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Datapath events sent on.
    pub exported: u64,
    /// Peers' flows removed as stale (`install::stale`).
    pub swept: u64,
    /// By peer.
    pub peers: BTreeMap<String, PeerStats>,
}

/// What the node counts of one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's records installed here.
    pub installed: u64,
    /// The peer's records not installed, by `InstallReject::as_str`.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Bulks sent to it, and their records.
    pub bulks_sent: u64,
    pub bulk_records_sent: u64,
    /// Bulks received from it to their end.
    pub bulks_received: u64,
    /// When the bulk under way from it began: this node's request, or its first
    /// chunk for a bulk it sent unasked.
    pub bulk_started: Option<Instant>,
    /// The last bulk received from it: from its start to its end (its chunks
    /// installed), and the records its end counted.
    pub last_bulk_received: (Duration, u64),
}

/// How often parked flows are looked over for ones their peer no longer
/// speaks of (`install::stale`).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

impl NodeStats {
    /// Every peer's records installed here.
    #[must_use]
    pub fn installed(&self) -> u64 {
        self.peers.values().map(|p| p.installed).sum()
    }
}

/// What the daemon keeps of the running node.
pub struct SyncNode {
    view: watch::Sender<Arc<View>>,
    readiness: watch::Receiver<Readiness>,
    departed: watch::Receiver<Departed>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    ended: Option<oneshot::Receiver<()>>,
}

#[derive(Default)]
struct Shared {
    stats: Mutex<NodeStats>,
    links: Mutex<Option<LinksStatus>>,
}

enum Command {
    Flush(Duration, oneshot::Sender<bool>),
    StopListening(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("starting the sync thread")]
    Thread(#[source] std::io::Error),
    #[error("flow sync did not start: {0}")]
    Start(String),
}

impl SyncNode {
    /// Starts the thread: links per `links`, this node's flow tables `tables`
    /// (`Datapath::flow_tables`), its event ring `events`, translating with `view`;
    /// every `resync` each peer gets a bulk unasked, which refreshes what the
    /// live records could not (lost events, flows the LRU evicted here).
    pub fn start(
        links: LinksConfig,
        tables: Datapath,
        events: RingBuf<MapData>,
        view: View,
        resync: Duration,
    ) -> Result<Self, NodeError> {
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (ready, readiness, departed) = Tracker::new();
        let shared = Arc::new(Shared::default());
        let (commands, command_rx) = mpsc::unbounded_channel();
        let worker = Arc::clone(&shared);
        let (started_tx, started) = std::sync::mpsc::channel();
        // Dropped when the thread ends, which `SyncNode::take_ended` reports.
        let (alive, ended) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("apilb-sync".into())
            .spawn(move || {
                let _alive = alive;
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(format!("no runtime: {e}")));
                        return;
                    }
                };
                let now = tokio::time::Instant::now();
                let state = State {
                    tables,
                    view: view_rx,
                    shared: worker,
                    resync,
                    ready,
                    last_resync: now,
                    last_sweep: now,
                };
                rt.block_on(run(links, events, command_rx, state, started_tx));
            })
            .map_err(NodeError::Thread)?;
        // Listening, or not: a node whose sync cannot start must not run, since
        // its datapath refuses new flows while nothing listens there.
        match started.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(NodeError::Start(why)),
            Err(_) => return Err(NodeError::Start("the sync thread did not start".into())),
        }
        Ok(Self {
            view: view_tx,
            readiness,
            departed,
            shared,
            commands,
            thread: Some(thread),
            ended: Some(ended),
        })
    }

    /// The translation the records use from now on.
    pub fn set_view(&self, view: View) {
        self.view.send_replace(Arc::new(view));
    }

    /// Resolves when the sync thread has ended, which it does on its own only
    /// when its links or its event ring failed; once.
    pub fn take_ended(&mut self) -> Option<oneshot::Receiver<()>> {
        self.ended.take()
    }

    /// What the elections learn of sync: its readiness and departures.
    #[must_use]
    pub fn signals(&self) -> SyncSignals {
        SyncSignals {
            readiness: self.readiness(),
            departed: self.departed(),
        }
    }

    /// Which peers this node is in sync with, for the elections.
    #[must_use]
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.readiness.clone()
    }

    /// The last peer whose process is gone, for the elections.
    #[must_use]
    pub fn departed(&self) -> watch::Receiver<Departed> {
        self.departed.clone()
    }

    #[must_use]
    pub fn stats(&self) -> NodeStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The links' status as of the last second.
    #[must_use]
    pub fn links(&self) -> Option<LinksStatus> {
        self.shared
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until every peer has acknowledged what was sent, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Flush(timeout, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Closes the sync listener, which shuts the datapath's liveness gate: no
    /// new flow of a synced VIP from here on (`Links::stop_listening`).
    pub async fn stop_listening(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::StopListening(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Says goodbye to the peers and stops the thread.
    pub async fn stop(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the datapath's clock (`bpf_ktime_get_coarse_ns`),
/// which flow ages are measured against.
#[must_use]
pub fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// What the sync thread works with, beside its links, ring and commands.
struct State {
    /// This node's flow tables (`Datapath::flow_tables`).
    tables: Datapath,
    view: watch::Receiver<Arc<View>>,
    shared: Arc<Shared>,
    /// How often every peer gets a bulk unasked.
    resync: Duration,
    ready: Tracker,
    last_resync: tokio::time::Instant,
    last_sweep: tokio::time::Instant,
}

async fn run(
    cfg: LinksConfig,
    events: RingBuf<MapData>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut state: State,
    started: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let (mut links, mut inbound) = match Links::start(cfg) {
        Ok(l) => l,
        Err(e) => {
            let _ = started.send(Err(e.to_string()));
            return;
        }
    };
    // SAFETY: the ring buffer owns its map descriptor, which stays open and the
    // same until the AsyncFd (which owns the ring buffer) drops.
    let mut ring = match unsafe { AsyncFd::register(events) } {
        Ok(fd) => fd,
        Err(e) => {
            let _ = started.send(Err(format!("the event ring: {}", e.into_parts().1)));
            return;
        }
    };
    let _ = started.send(Ok(()));
    // Often, for the elections: an acknowledged bulk makes a peer in sync.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let Ok(mut guard) = ready else { warn!("flow sync: the event ring failed"); return };
                state.export(guard.get_inner_mut(), &links);
                guard.clear_ready();
            }
            Some(event) = inbound.recv() => state.inbound(&links, event),
            Some(cmd) = commands.recv() => match cmd {
                Command::Flush(timeout, done) => {
                    // What the datapath emitted before the call is owed too,
                    // though the ring's wakeup may not have been served yet.
                    state.export(ring.get_mut(), &links);
                    let _ = done.send(links.flush(timeout).await);
                }
                Command::StopListening(done) => {
                    links.stop_listening().await;
                    let _ = done.send(());
                }
                Command::Stop(done) => {
                    links.shutdown().await;
                    let _ = done.send(());
                    return;
                }
            },
            _ = tick.tick() => state.tick(&links),
        }
    }
}

impl State {
    /// Sends the datapath's pending events on to every peer, as records.
    fn export(&self, ring: &mut RingBuf<MapData>, links: &Links) {
        let v = Arc::clone(&self.view.borrow());
        let now = coarse_ns();
        let mut records = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(r) = SyncEvent::from_bytes(&item).and_then(|e| record_of(&e, &v, now)) {
                records.push(r);
            }
        }
        let n = records.len() as u64;
        for chunk in records.chunks(MAX_RECORDS) {
            let _ = links.broadcast(Message::Flows(chunk.to_vec()));
        }
        self.count(|s| s.exported += n);
    }

    fn count(&self, f: impl FnOnce(&mut NodeStats)) {
        f(&mut self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }

    /// A session came or went, or a peer's message arrived.
    fn inbound(&mut self, links: &Links, event: Inbound) {
        self.ready.on_inbound(&event);
        if let Inbound::Disconnected {
            peer,
            link: Link::Export,
            ..
        } = &event
        {
            let ticket = links.last_queued(peer).unwrap_or(0);
            self.ready.export_broke(peer, ticket);
        }
        let v = Arc::clone(&self.view.borrow());
        match event {
            Inbound::Message {
                peer,
                message: Message::Flows(records),
            } => {
                install(&mut self.tables, &peer, &records, &v, &self.shared);
                debug!(%peer, records = records.len(), "flow sync: records installed");
            }
            Inbound::Message {
                peer,
                message: Message::BulkChunk(records),
            } => {
                // An unasked bulk starts with its first chunk.
                self.count(|s| {
                    let p = s.peers.entry(peer.to_string()).or_default();
                    p.bulk_started.get_or_insert_with(Instant::now);
                });
                install(&mut self.tables, &peer, &records, &v, &self.shared);
            }
            Inbound::Message {
                peer,
                message: Message::BulkRequest { generation, vips },
            } => self.send_bulk(links, &peer, &v, &vips, generation),
            Inbound::Message {
                peer,
                message: Message::BulkEnd { count: n, .. },
            } => {
                info!(%peer, records = n, "flow sync: bulk received");
                self.count(|s| {
                    let p = s.peers.entry(peer.to_string()).or_default();
                    p.bulks_received += 1;
                    let took = p
                        .bulk_started
                        .take()
                        .map_or(Duration::ZERO, |t| t.elapsed());
                    p.last_bulk_received = (took, u64::from(n));
                });
            }
            Inbound::Connected {
                peer,
                link: Link::Import,
            } => {
                let vips: Vec<_> = v.vips.iter().map(std::net::SocketAddr::ip).collect();
                // Never 0, the generation of bulks sent unasked.
                let generation = fastrand::u32(1..);
                self.ready.expect_bulk(&peer, generation);
                let _ = links.send(&peer, Message::BulkRequest { generation, vips });
                self.count(|s| {
                    s.peers.entry(peer.to_string()).or_default().bulk_started =
                        Some(Instant::now());
                });
            }
            _ => {}
        }
    }

    /// Every 100 ms: the bulks owed or due, the sweep when due, and what the
    /// elections and `/status` learn of the links.
    fn tick(&mut self, links: &Links) {
        let v = Arc::clone(&self.view.borrow());
        let due = self.last_resync.elapsed() >= self.resync;
        if due {
            self.last_resync = tokio::time::Instant::now();
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = tokio::time::Instant::now();
            self.sweep(&v);
        }
        let peers: Vec<Arc<str>> = links.status().peers.into_iter().map(|p| p.name).collect();
        for peer in &peers {
            if links.take_resync(peer) || due {
                self.send_bulk(links, peer, &v, &[], 0);
            }
        }
        // After the bulks: one queued now is not yet acknowledged.
        let status = links.status();
        self.ready.publish(
            &status,
            |peer, ticket| links.acknowledged(peer, ticket),
            |peer| links.last_queued(peer).unwrap_or(0),
        );
        *self
            .shared
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(status);
    }

    /// [`bulk`] to `peer`, counted, and known to the elections.
    fn send_bulk(
        &mut self,
        links: &Links,
        peer: &Arc<str>,
        view: &View,
        vips: &[std::net::IpAddr],
        generation: u32,
    ) {
        let (sent, whole) = bulk(links, peer, &mut self.tables, view, (generation, vips));
        // Only a bulk queued whole (listed, and every chunk and its end taken by
        // the queue) can make the peer hold our flows.
        if whole && let Some(ticket) = links.last_queued(peer) {
            self.ready.bulk_sent(peer, ticket);
        }
        self.count(|s| {
            let p = s.peers.entry(peer.to_string()).or_default();
            p.bulks_sent += 1;
            p.bulk_records_sent += sent;
        });
    }

    /// Remove the peers' flows parked here that are over (`install::stale`, with
    /// a resync interval's slack), counted.
    fn sweep(&mut self, view: &View) {
        let now = coarse_ns();
        let slack = u64::try_from(self.resync.as_nanos()).unwrap_or(u64::MAX);
        match self
            .tables
            .sweep_parked(|k, f| stale(view, k, f, now, slack))
        {
            Ok(0) => {}
            Ok(n) => {
                debug!(flows = n, "flow sync: stale parked flows removed");
                self.count(|s| s.swept += n as u64);
            }
            Err(e) => warn!("flow sync: sweeping parked flows: {e}"),
        }
    }
}

/// Install a peer's records, counting each outcome.
fn install(
    tables: &mut Datapath,
    peer: &str,
    records: &[FlowRecord],
    view: &View,
    shared: &Shared,
) {
    let now = coarse_ns();
    let mut all = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
    let stats = all.peers.entry(peer.to_owned()).or_default();
    for r in records {
        let outcome = entries_of(r, view, now).and_then(|(k, f, rk, rv)| {
            match tables.install_peer_flow(&k, &f, &rk, &rv) {
                Ok(true) => Ok(()),
                Ok(false) => Err(super::install::InstallReject::Conflict),
                Err(e) => {
                    warn!("flow sync: writing a peer's flow: {e}");
                    Err(super::install::InstallReject::WriteFailed)
                }
            }
        });
        match outcome {
            Ok(()) => stats.installed += 1,
            Err(why) => *stats.rejected.entry(why.as_str()).or_insert(0) += 1,
        }
    }
}

/// Send `peer` every synced flow of the VIPs this node owns (of `vips`, or all
/// if empty), in chunks, then the end; returns how many records, and whether
/// the queue took all of it.
fn bulk(
    links: &Links,
    peer: &str,
    tables: &mut Datapath,
    view: &View,
    (generation, vips): (u32, &[std::net::IpAddr]),
) -> (u64, bool) {
    let now = coarse_ns();
    let flows = match tables.flows() {
        Ok(f) => f,
        Err(e) => {
            warn!(%peer, "flow sync: listing the flows for a bulk: {e}");
            return (0, false);
        }
    };
    let records: Vec<FlowRecord> = flows
        .iter()
        .filter(|(_, f)| f.flags & FLOW_F_SYNC != 0)
        .filter_map(|(k, f)| record_of_flow(k, f, view, now))
        .filter(|r| {
            view.owned.contains(&r.vip.ip()) && (vips.is_empty() || vips.contains(&r.vip.ip()))
        })
        .collect();
    let mut whole = true;
    for chunk in records.chunks(MAX_RECORDS) {
        whole &= links.send(peer, Message::BulkChunk(chunk.to_vec())).is_ok();
    }
    let n = u32::try_from(records.len()).unwrap_or(u32::MAX);
    whole &= links
        .send(
            peer,
            Message::BulkEnd {
                generation,
                count: n,
            },
        )
        .is_ok();
    (u64::from(n), whole)
}
