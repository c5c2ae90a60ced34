//! `apilb run`: the event loop, and nothing else.
//!
//! Its inputs are health events, ownership events, passive failures from the
//! datapath, discovery's reports (with `[discovery]`), SIGHUP and a one-second
//! tick; each ends in a reconcile, the only place maps are written, through
//! [`Owners`], which orders it with the VIP addresses. SIGTERM and SIGINT end
//! it, leaving the pinned datapath running (unless `detach_on_exit`), so that a
//! restart or upgrade loses nothing. Each concern lives in its own module: probes
//! in `health`, passive events in `passive`, the members in `discovery`, the
//! snapshot in `status`, bring-up in `loader`, reload rules in `config`, the map
//! contents in `controller`.

use std::{collections::HashSet, fmt::Write as _, net::IpAddr, path::PathBuf, time::Duration};

use lb_common::ct::{CT_SYN_RECV, FLOW_F_SYNC};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigError},
    controller::{Applied, ControllerError, Reconciler},
    datapath::Datapath,
    discovery::{Discovery, Report},
    events::EventLog,
    health::{HealthError, Probes},
    loader::{self, LoaderError},
    ownership::{Owners, Reconcile, Reconciled, Step},
    passive::{self, PassiveKind},
    reaper::Reaper,
    status::{SharedSnapshot, Snapshot, Sources},
    sync::{
        links::LinksConfig,
        node::{NodeStats, SyncNode},
        wire::Hello,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privilege(#[from] crate::privilege::PrivilegeError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error(transparent)]
    Admin(#[from] crate::admin::ServerError),
    #[error(transparent)]
    Ownership(#[from] crate::ownership::OwnershipError),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error(transparent)]
    SockLb(#[from] crate::socklb::SockLbError),
    #[error("starting the thread that removes down backends' flows")]
    Reaper(#[source] std::io::Error),
    #[error(transparent)]
    Sync(#[from] crate::sync::node::NodeError),
    #[error("flow sync stopped while apilb ran (its links or its event ring failed)")]
    SyncStopped,
    #[error("reading passive failure events from the datapath")]
    PassiveEvents(#[source] std::io::Error),
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
}

/// How `apilb run` was asked to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config_path: PathBuf,
    /// Detach the datapath and remove its pins on SIGTERM/SIGINT.
    pub detach_on_exit: bool,
}

/// The loop's state, but for the elections ([`Owners`]), which drive it through
/// [`Reconcile`].
struct Core {
    /// The config file as last loaded.
    config: Config,
    /// What the controller and the probes work from: `config` with the members
    /// discovery keeps as its backends (`config` itself without discovery).
    live: Config,
    /// With `[discovery]`: the reader and the membership it feeds.
    discovery: Option<Discovery>,
    config_path: PathBuf,
    dp: Datapath,
    reconciler: Reconciler,
    /// Removes down backends' flows off this loop.
    reaper: Reaper,
    /// Flow sync with the other LB nodes, with `[sync]`.
    sync: Option<SyncNode>,
    probes: Probes,
    events: EventLog,
    snapshot: SharedSnapshot,
    reloads_applied: u64,
    reloads_refused: u64,
    /// The last reconcile found no healthy backend: logged when that starts and
    /// when it ends, not at every reconcile in between.
    failing_open: bool,
    /// The last reconcile failed; the next tick retries it.
    dirty: bool,
}

impl Reconcile for Core {
    fn reconcile(&mut self, owned: &HashSet<IpAddr>, why: &str) -> Reconciled {
        let desired = self
            .reconciler
            .desired(&self.live, self.probes.health(), owned);
        let fail_open = desired.fail_open;
        if fail_open != self.failing_open {
            if fail_open {
                error!(
                    why,
                    "no backend is healthy: failing open, every configured backend serves"
                );
            } else {
                info!(
                    why,
                    "fail-open ends: a backend is healthy again, and only healthy backends serve"
                );
            }
            self.failing_open = fail_open;
        }
        let written = self
            .reconciler
            .apply(&mut self.dp, desired)
            .map(|mut applied| {
                if let Some(keep) = applied.keep_flows.take() {
                    self.reaper.keep_only(keep);
                }
                if applied != Applied::default() {
                    info!(why, wrote = %applied.summary(), "datapath updated");
                }
            });
        self.dirty = written.is_err();
        if let Some(sync) = &self.sync {
            sync.set_view(self.reconciler.sync_view(&self.live));
        }
        Reconciled { fail_open, written }
    }

    fn dirty(&self) -> bool {
        self.dirty
    }
}

impl Core {
    /// `config` with discovery's members as its backends.
    fn live_config(&self, config: &Config) -> Config {
        let mut live = config.clone();
        if let Some(d) = &self.discovery {
            live.backends = d.members().iter().map(|m| m.settings).collect();
        }
        live
    }

    /// The members changed: the controller and the probes follow (a new master's
    /// prober starts down, so it holds no slot before `rise` probes pass).
    fn members_changed(&mut self) {
        self.live = self.live_config(&self.config);
        if let Err(e) = self
            .probes
            .reconfigure(&self.live.health, self.live.backend_addrs())
        {
            error!("discovery: probing the new members failed: {e}");
        }
        if let Some(d) = &self.discovery {
            d.publish_ready(self.probes.health());
        }
    }

    /// A report from discovery's reader; reconciles if the members changed.
    fn discovered(&mut self, report: Report, owners: &Owners) {
        let changed = match &mut self.discovery {
            Some(d) => d.take(report, self.probes.health(), std::time::Instant::now()),
            None => false,
        };
        if changed {
            self.members_changed();
            let _ = owners.reconcile(self, "discovery");
        }
    }

    /// A backend's health changed: discovery's joining and held masters may move.
    fn health_changed(&mut self) {
        let changed = match &mut self.discovery {
            Some(d) => d.observe(self.probes.health(), std::time::Instant::now()),
            None => false,
        };
        if changed {
            self.members_changed();
        }
    }

    /// Leaving members whose hold passed go, and the datapath with them.
    fn expire_members(&mut self, owners: &Owners) {
        let changed = self
            .discovery
            .as_mut()
            .is_some_and(|d| d.expire(std::time::Instant::now()));
        if changed {
            self.members_changed();
            let _ = owners.reconcile(self, "a leaving master's hold passed");
        }
    }

    /// The datapath saw backend `id` fail clients' connections (see `passive`): a
    /// hint, which its prober confirms or refutes.
    fn passive_failure(&mut self, id: u32, why: PassiveKind) {
        let backend = self
            .reconciler
            .current()
            .and_then(|c| c.backends.get(&id))
            .map(|b| b.addr);
        if let Some(backend) = backend {
            self.probes.confirm(backend, why);
        }
    }

    /// Load the config again; take it if it is valid and a reload can apply it
    /// (`Config::restart_needed`), else change nothing. Returns whether it was
    /// taken, so that the caller reconciles.
    fn reload(&mut self) -> bool {
        let path = self.config_path.display().to_string();
        let applied = Config::load(&self.config_path)
            .map_err(|e| e.to_string())
            .and_then(|new| match self.config.restart_needed(&new) {
                Some(key) => Err(format!("{key} changed; that takes a restart")),
                None => Ok(new),
            })
            .and_then(|new| {
                if let Some(d) = &mut self.discovery {
                    d.set_statics(&new);
                }
                let live = self.live_config(&new);
                if let Err(e) = self.probes.reconfigure(&new.health, live.backend_addrs()) {
                    if let Some(d) = &mut self.discovery {
                        d.set_statics(&self.config);
                    }
                    return Err(e.to_string());
                }
                Ok((new, live))
            });
        match applied {
            Ok((new, live)) => {
                self.config = new;
                self.live = live;
                self.reloads_applied += 1;
                true
            }
            Err(reason) => {
                self.reloads_refused += 1;
                error!(config = %path, "config reload refused, running state unchanged: {reason}");
                false
            }
        }
    }

    /// Replace the published snapshot with the current state.
    fn publish(&self, owners: &Owners) {
        let snapshot = Snapshot::take(&Sources {
            instance: &self.config.instance,
            desired: self.reconciler.current(),
            members: self
                .discovery
                .as_ref()
                .map(Discovery::members)
                .unwrap_or_default(),
            discovery: self.discovery.as_ref().map(Discovery::status),
            dp: &self.dp,
            probes: &self.probes,
            elections: owners.states(),
            reloads_applied: self.reloads_applied,
            reloads_refused: self.reloads_refused,
        });
        let mut snapshot = snapshot;
        if let Some(sync) = &self.sync {
            // Events the datapath could not put in the full ring.
            let lost = self
                .dp
                .counters()
                .map_or(0, |c| c.get(lb_common::counters::SYNC_EVENT_LOST));
            snapshot.sync = sync.links().map(|l| sync_snapshot(&l, &sync.stats(), lost));
        }
        if let Ok(mut s) = self.snapshot.write() {
            *s = snapshot;
        }
    }
}

/// SIGHUP: reload the config; if taken, retune the running VRRP election
/// (priorities, `track_weight`, preempt) and reconcile.
fn hangup(core: &mut Core, owners: &Owners) {
    if core.reload() {
        owners.retune(&core.config);
        let config = core.config_path.display().to_string();
        if let Err(e) = owners.reconcile(core, "reload") {
            error!(%config, "config reloaded, but updating the datapath failed (retrying every second): {e}");
        } else {
            info!(%config, "config reloaded");
        }
    }
}

/// The config, once this process is shown to hold the capabilities it needs
/// (`crate::privilege`): refused before anything is touched otherwise.
fn load_checked(path: &std::path::Path) -> Result<Config, DaemonError> {
    let config = Config::load(path)?;
    crate::privilege::check_effective(&crate::privilege::needed_by(&config))?;
    Ok(config)
}

/// Run until SIGTERM or SIGINT, serving the admin endpoint.
pub async fn run(opts: &RunOptions) -> Result<(), DaemonError> {
    let config = load_checked(&opts.config_path)?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
    let snapshot = crate::status::shared();
    let (admin, stop_admin) = start_admin(&config, &snapshot).await?;
    let (mut programs, mut dp) = loader::start(&config)?;
    let mut reconciler = Reconciler::new();
    reconciler.set_ifaces(programs.ifaces());
    crate::socklb::start(&config, &mut programs, &mut reconciler)?;
    let (passive_tx, mut passive_rx) = mpsc::channel(256);
    let _passive_reader = passive::spawn(dp.take_passive_events()?, passive_tx)
        .map_err(DaemonError::PassiveEvents)?;
    let reaper = Reaper::spawn(dp.flow_tables()?).map_err(DaemonError::Reaper)?;
    let sync = (config.sync.as_ref())
        .map(|s| start_sync(&config, s, &mut dp, &reconciler))
        .transpose()?;
    let (health_tx, mut health_rx) = mpsc::channel(256);
    let probes = Probes::start(&config.health, config.backend_addrs(), health_tx)?;
    let signals = sync.as_ref().map(SyncNode::signals);
    let (mut owners, mut owner_rx) = Owners::start(&config, signals).await?;
    let (discovery, mut discovery_rx) = start_discovery(&config);
    let mut core = Core {
        live: config.clone(),
        discovery,
        config,
        config_path: opts.config_path.clone(),
        dp,
        reconciler,
        reaper,
        sync,
        probes,
        events: EventLog::default(),
        snapshot,
        reloads_applied: 0,
        reloads_refused: 0,
        failing_open: false,
        dirty: false,
    };
    owners.reconcile(&mut core, "start")?;
    core.publish(&owners);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sync_ended = core.sync.as_mut().and_then(SyncNode::take_ended);
    let mut sync_failed = false;
    loop {
        tokio::select! {
            () = ended(&mut sync_ended) => {
                // Its datapath refuses the synced VIPs' new flows now: give
                // them up, and exit, so that the service manager restarts apilb.
                error!("flow sync stopped (see above); giving the VIPs up and exiting");
                sync_failed = true;
                break;
            }
            Some(ev) = health_rx.recv() => {
                if let Some(health) = core.probes.record(&ev) {
                    core.health_changed();
                    owners.step(Step::Changed(format!("backend {health}")), &mut core).await;
                }
            }
            Some(ev) = owner_rx.recv() => owners.step(Step::Election(ev), &mut core).await,
            Some((id, why)) = passive_rx.recv() => core.passive_failure(id, why),
            Some(report) = discovery_rx.recv() => core.discovered(report, &owners),
            _ = hup.recv() => hangup(&mut core, &owners),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                core.expire_members(&owners);
                owners.step(Step::Tick, &mut core).await;
                // A down master's flows go once the LB has shown it still reaches
                // another (see `controller`), which only time can show.
                if core.reconciler.removal_pending() {
                    let _ = owners.reconcile(&mut core, "down backend settled");
                }
                if let Ok(c) = core.dp.counters() {
                    core.events.log(&c.0);
                }
            }
        }
        core.publish(&owners);
    }
    let pin = loader::pin_dir(&core.config.instance);
    hand_over(&mut core, owners, &mut owner_rx).await;
    if let Some(node) = core.sync.take() {
        node.stop().await;
    }
    drop(core);
    drop(programs);
    let _ = stop_admin.send(());
    if let Ok(Err(e)) = admin.await {
        warn!("admin endpoint: {e}");
    }
    if opts.detach_on_exit {
        let done = loader::detach(&pin)?;
        info!(pins = %pin.display(), removed = done.removed.len(), restored = ?done.restored, "detached the datapath, removed its pins and restored the node settings it changed");
    } else {
        info!(pins = %pin.display(), "exiting; the pinned datapath keeps balancing (apilb detach removes it)");
    }
    if sync_failed {
        return Err(DaemonError::SyncStopped);
    }
    Ok(())
}

/// With `[discovery]`, its reader, and the channel of its reports (closed without).
fn start_discovery(config: &Config) -> (Option<Discovery>, mpsc::Receiver<Report>) {
    let (tx, rx) = mpsc::channel(16);
    let discovery = (config.discovery.as_ref()).map(|d| Discovery::start(config, d, tx));
    (discovery, rx)
}

/// The admin endpoint, serving `snapshot` until the returned sender says stop.
async fn start_admin(
    config: &Config,
    snapshot: &SharedSnapshot,
) -> Result<
    (
        tokio::task::JoinHandle<Result<(), crate::admin::ServerError>>,
        tokio::sync::oneshot::Sender<()>,
    ),
    DaemonError,
> {
    let listener = crate::admin::bind(config.admin_listen).await?;
    info!(listen = %config.admin_listen, "admin endpoint: /metrics /healthz /status");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(crate::admin::serve(listener, snapshot.clone(), async {
        let _ = stopped.await;
    }));
    Ok((admin, stop))
}

/// Resolves when the sync thread has ended (never without sync, and once).
async fn ended(rx: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    match rx {
        Some(r) => {
            let _ = r.await;
            *rx = None;
        }
        None => std::future::pending().await,
    }
}

/// Stop answering for elected VIPs and balancing them, then hand them over;
/// ownership events that handing over produces are drained, not acted on. With
/// sync, no handshake is caught halfway and no flow is left behind: the gate
/// shuts first (new flows of synced VIPs refused, their clients' SYN
/// retransmits going to the next owner), the handshakes the masters had
/// answered complete here, and once the VIPs are released (nothing is promoted
/// after) the peers acknowledge every flow before the election hands over.
async fn hand_over(
    core: &mut Core,
    mut owners: Owners,
    owner_rx: &mut mpsc::Receiver<crate::election::Ownership>,
) {
    if let Some(node) = &core.sync {
        node.stop_listening().await;
        let (answered, unfinished) = finish_handshakes(&core.dp, HANDSHAKES_MAX_WAIT).await;
        info!(
            answered,
            unfinished, "flow sync: new flows refused; waited for the handshakes under way"
        );
    }
    owners.release_all(core).await;
    if let (Some(node), Some(s)) = (&core.sync, &core.config.sync)
        && !node.flush(s.flush_timeout).await
    {
        warn!(
            timeout = ?s.flush_timeout,
            "flow sync: the peers did not acknowledge every flow in time"
        );
    }
    core.publish(&owners);
    let drain = async { while owner_rx.recv().await.is_some() {} };
    tokio::select! {
        () = owners.shutdown() => {}
        () = drain => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {
            warn!("handing elected VIPs over took over 5 s; exiting anyway");
        }
    }
}

/// The longest a handover waits for the clients whose SYN-ACK went out before
/// the gate shut: each owes one ACK, a round trip later, and new connections are
/// refused meanwhile.
const HANDSHAKES_MAX_WAIT: Duration = Duration::from_millis(500);

/// Waits, at most `within`, until every half-open flow of a synced VIP whose
/// master had answered (`CT_SYN_RECV`: the client's ACK is due) has become
/// established, and so exported, or gone. Returns how many there were, and how
/// many were still half-open at the end.
async fn finish_handshakes(dp: &Datapath, within: Duration) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + within;
    let mut due: Vec<lb_common::FlowKey> = match dp.half_open_flows() {
        Ok(half) => half
            .into_iter()
            .filter(|(_, f)| f.state == CT_SYN_RECV && f.flags & FLOW_F_SYNC != 0)
            .map(|(k, _)| k)
            .collect(),
        Err(e) => {
            warn!("flow sync: reading the half-open flows: {e}");
            return (0, 0);
        }
    };
    let answered = due.len();
    while !due.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
        due.retain(|k| matches!(dp.half_open_flow(k), Ok(Some(_))));
    }
    (answered, due.len())
}

/// Start flow sync: this node's links to its peers, on its own flow tables and
/// event ring.
fn start_sync(
    config: &Config,
    s: &crate::config::SyncSettings,
    dp: &mut Datapath,
    reconciler: &Reconciler,
) -> Result<SyncNode, DaemonError> {
    let d = &config.datapath;
    // What must match on every node: the NAT range and slicing, the VIPs and
    // their sources.
    let mut shape = format!("{:?} {}", d.nat_ports, d.nat_slice.count);
    for v in &config.vips {
        // Not a VRRP priority, which differs per node by design.
        let election = match v.election {
            crate::config::Election::Static => "static".to_owned(),
            crate::config::Election::Vrrp { vrid, .. } => format!("vrrp {vrid}"),
            crate::config::Election::Etcd => "etcd".to_owned(),
        };
        let _ = write!(shape, " {} {election} {:?}", v.addr, v.snat);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, shape.as_bytes());
    let mut config_digest = [0; 32];
    config_digest.copy_from_slice(digest.as_ref());
    let hello = Hello {
        slice: d.nat_slice.index,
        slices: d.nat_slice.count,
        nat_ports: d.nat_ports.clone(),
        config_digest,
    };
    let links = LinksConfig::new(
        s.node.clone(),
        s.listen,
        s.peers.clone(),
        s.key.clone(),
        hello,
    );
    info!(listen = %s.listen, peers = s.peers.len(), "flow sync: starting");
    Ok(SyncNode::start(
        links,
        dp.flow_tables()?,
        dp.take_sync_events()?,
        reconciler.sync_view(config),
        s.resync_interval,
    )?)
}

/// `/status`'s view of flow sync: the links' status with the node's counts.
fn sync_snapshot(
    links: &crate::sync::links::LinksStatus,
    stats: &NodeStats,
    events_lost: u64,
) -> crate::status::SyncSnapshot {
    use crate::status::{BulkStats, PeerSyncCounters, SyncCounters};
    let peers = stats
        .peers
        .iter()
        .map(|(peer, p)| PeerSyncCounters {
            peer: peer.clone(),
            flows_installed: p.installed,
            rejected: p.rejected.iter().map(|(r, n)| (*r, *n)).collect(),
            bulks_received: BulkStats {
                count: p.bulks_received,
                last_seconds: p.last_bulk_received.0.as_secs_f64(),
                last_records: p.last_bulk_received.1,
            },
            bulks_sent: BulkStats {
                count: p.bulks_sent,
                last_records: p.bulk_records_sent,
                ..BulkStats::default()
            },
        })
        .collect();
    crate::status::SyncSnapshot::from_links(
        links,
        SyncCounters {
            events_lost,
            flows_swept: stats.swept,
            peers,
        },
    )
}
