//! `apilb run`: one event loop that wires config, loader, health probes and the
//! reconciler together.
//!
//! Health events and SIGHUP are its inputs; each ends in a reconcile, the only
//! place maps are written. SIGTERM and SIGINT end it, leaving the pinned datapath
//! running (unless `detach_on_exit`), so that a restart or upgrade loses nothing.
//! Backends start in rotation and `fall` failed probes take a dead one out: a
//! restarted controller must not pull not-yet-probed masters, and their live flows,
//! out of the ring one by one.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_common::COUNTER_NAMES;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    config::{BackendSettings, Config, ConfigError, Election, HealthSettings, ProbeKindSetting},
    controller::{ControllerError, Desired, Reconciler},
    datapath::Datapath,
    health::{
        Health, HealthError, HealthEvent, InitialState, ProbeKind, ProbeSpec, Prober, ProberHandle,
        TlsSpec,
    },
    loader::{self, LoaderError},
    ownership::Owners,
    passive::PassiveKind,
    status::{BackendStatus, SharedSnapshot, Snapshot, VipStatus},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Ownership(#[from] crate::ownership::OwnershipError),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error(transparent)]
    SockLb(#[from] crate::socklb::SockLbError),
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

/// Datapath events rare enough to log each second they occur. They are counted in
/// the kernel, where logging them would cost every packet; the controller reads
/// the counters once a second and logs what moved, so even a storm of them is one
/// line per second per reason.
const LOGGED_EVENTS: [u32; 5] = [
    lb_common::DROP_NO_BACKEND,
    lb_common::DROP_NO_NAT_PORT,
    lb_common::DROP_NO_SNAT_ADDR,
    lb_common::DROP_FLOW_INSERT,
    lb_common::PORT_RECLAIMED,
];

/// The logged events that moved between two counter readings, and by how much.
fn moved_events(before: &[u64], now: &[u64]) -> Vec<(&'static str, u64)> {
    LOGGED_EVENTS
        .iter()
        .map(|&i| i as usize)
        .filter_map(|i| {
            let delta = now.get(i)?.saturating_sub(*before.get(i)?);
            (delta > 0).then_some((COUNTER_NAMES[i], delta))
        })
        .collect()
}

/// The VIPs that have an election, with it.
fn elected(c: &Config) -> impl Iterator<Item = (SocketAddr, Election)> + '_ {
    c.vips
        .iter()
        .filter(|v| v.election != Election::Static)
        .map(|v| (v.addr, v.election))
}

/// A config change that only a restart can apply.
fn restart_only_change(old: &Config, new: &Config) -> Option<&'static str> {
    if old.instance != new.instance {
        Some("instance")
    } else if old.datapath.interfaces != new.datapath.interfaces {
        Some("datapath.interfaces")
    } else if old.datapath.xdp_mode != new.datapath.xdp_mode {
        Some("datapath.xdp_mode")
    } else if old.datapath.flow_table_size != new.datapath.flow_table_size {
        Some("datapath.flow_table_size")
    } else if old.admin_listen != new.admin_listen {
        Some("admin.listen")
    } else if old.datapath.nat_ports != new.datapath.nat_ports {
        // Replies of open flows arrive on the old ports, which the datapath would no
        // longer recognise, and the new range is reserved only at start.
        Some("datapath.nat_ports")
    } else if old.datapath.snat_v4 != new.datapath.snat_v4
        || old.datapath.snat_v6 != new.datapath.snat_v6
    {
        // Likewise: replies of open flows come back to the old address.
        Some("datapath.snat_ipv4/snat_ipv6")
    } else if old.election != new.election {
        Some("election")
    } else if old.local.enabled != new.local.enabled || old.local.cgroup != new.local.cgroup {
        // The socket programs are attached, or not, at start.
        Some("local.enabled/local.cgroup")
    } else if elected(old).ne(elected(new)) {
        // Elections run for a fixed set of VIPs; changing it means restarting them.
        Some("an elected vip (its election, vrid or priority)")
    } else {
        None
    }
}

fn probe_spec(h: &HealthSettings) -> ProbeSpec {
    let kind = match h.kind {
        ProbeKindSetting::Tcp => ProbeKind::Tcp,
        ProbeKindSetting::Http => ProbeKind::Http {
            path: h.path.clone(),
        },
        ProbeKindSetting::Https => ProbeKind::Https {
            path: h.path.clone(),
            tls: TlsSpec {
                ca_file: h.ca_file.clone(),
                server_name: h.server_name.clone(),
                client_cert: h.client_cert.clone(),
                insecure: h.insecure,
            },
        },
    };
    ProbeSpec {
        kind,
        interval: h.interval,
        timeout: h.timeout,
        rise: h.rise,
        fall: h.fall,
        jitter: h.jitter,
        // Each prober is started from its backend's known state (`Probes::sync`).
        initial: InitialState::Up,
    }
}

/// The probers of the configured backends, and their verdicts.
///
/// A prober starts in the state its backend is known to be in: masters configured
/// at start are up (a restarted controller must not pull not-yet-probed masters,
/// and their flows, out of the ring), a master added by a reload is down until
/// `rise` probes prove it, and one whose prober restarts with new settings keeps
/// its last verdict.
struct Probes {
    prober: Prober,
    settings: HealthSettings,
    handles: HashMap<SocketAddr, ProberHandle>,
    health: HashMap<SocketAddr, Health>,
    events: mpsc::Sender<HealthEvent>,
}

impl Probes {
    fn start(config: &Config, events: mpsc::Sender<HealthEvent>) -> Result<Self, HealthError> {
        let mut p = Self {
            prober: Prober::new(probe_spec(&config.health))?,
            settings: config.health.clone(),
            handles: HashMap::new(),
            health: config
                .backends
                .iter()
                .map(|b| (b.addr, Health::Ready))
                .collect(),
            events,
        };
        p.sync(config);
        Ok(p)
    }

    /// Probe exactly the configured backends; one not seen before starts down.
    fn sync(&mut self, config: &Config) {
        let wanted: HashSet<SocketAddr> = config.backends.iter().map(|b| b.addr).collect();
        self.handles.retain(|a, _| wanted.contains(a));
        self.health.retain(|a, _| wanted.contains(a));
        for addr in wanted {
            let health = *self.health.entry(addr).or_insert(Health::Down);
            self.handles
                .entry(addr)
                .or_insert_with(|| self.prober.spawn_as(addr, health, self.events.clone()));
        }
    }

    /// Apply new health settings: every prober restarts, from its last verdict, if
    /// they changed.
    fn reconfigure(&mut self, config: &Config) -> Result<(), HealthError> {
        if config.health != self.settings {
            self.prober = Prober::new(probe_spec(&config.health))?;
            self.settings = config.health.clone();
            self.handles.clear();
        }
        self.sync(config);
        Ok(())
    }
}

/// The loop's state: everything a reconcile or a snapshot needs.
struct Daemon {
    config: Config,
    config_path: PathBuf,
    dp: Datapath,
    reconciler: Reconciler,
    probes: Probes,
    snapshot: SharedSnapshot,
    reloads_applied: u64,
    reloads_refused: u64,
    /// Counters at the last `log_events`.
    seen: Vec<u64>,
    /// The last reconcile failed; the next tick retries it.
    dirty: bool,
    owners: Owners,
    /// When a passive failure last took each backend out (for flapping), and
    /// whether its flapping was logged since.
    passive_marked: HashMap<SocketAddr, (std::time::Instant, bool)>,
}

/// A backend that passive failures took out less than this long ago, and that
/// its probes have brought back since, is flapping: its passive failures are
/// ignored (and logged once) until the window ends.
const PASSIVE_FLAP_WINDOW: Duration = Duration::from_secs(10);

impl Daemon {
    /// The datapath saw backend `id` fail `passive_threshold` clients'
    /// connections in a row (see `crate::passive`): take it out of rotation now,
    /// unless it is flapping. Its probes bring it back after `rise` passes.
    fn passive_failure(&mut self, id: u32, why: PassiveKind) {
        let Some(addr) = self
            .reconciler
            .current()
            .and_then(|c| c.backends.get(&id))
            .map(|b| b.addr)
        else {
            return;
        };
        if self.probes.health.get(&addr) != Some(&Health::Ready) {
            return;
        }
        if let Some((at, logged)) = self.passive_marked.get_mut(&addr)
            && at.elapsed() < PASSIVE_FLAP_WINDOW
        {
            if !*logged {
                *logged = true;
                warn!(backend = %addr, "backend flapping: {why} while its probes pass; passive failures ignored for {}s", PASSIVE_FLAP_WINDOW.as_secs());
            }
            return;
        }
        self.passive_marked
            .insert(addr, (std::time::Instant::now(), false));
        if let Some(h) = self.probes.handles.get(&addr) {
            warn!(backend = %addr, "passive failure: {why}; taking it out now");
            h.mark_down(why);
        }
    }

    /// Log the rare datapath events since the last call (see `LOGGED_EVENTS`).
    fn log_events(&mut self) {
        let Ok(now) = self.dp.counters() else { return };
        for (event, count) in moved_events(&self.seen, &now.0) {
            if event == "port_reclaimed" {
                info!(event, count, "NAT ports of finished flows were reused");
            } else {
                warn!(event, count, "new flows dropped by the datapath");
            }
        }
        self.seen = now.0.to_vec();
    }

    fn reconcile(&mut self, why: &str) -> Result<(), ControllerError> {
        let desired =
            self.reconciler
                .desired(&self.config, &self.probes.health, self.owners.owned());
        self.owners.set_unhealthy(desired.fail_open);
        if desired.fail_open {
            error!(
                why,
                "no backend is healthy: failing open, every configured backend serves"
            );
        }
        let applied = self.reconciler.apply(&mut self.dp, desired)?;
        for (backend, flows) in &applied.flows_removed {
            warn!(%backend, flows, "backend down or removed; its flows were removed so its clients reconnect now");
        }
        if applied != crate::controller::Applied::default() {
            info!(
                why,
                backends = applied.backends_written,
                vips = applied.vips_written,
                vips_removed = applied.vips_removed,
                ring_slots = applied.ring_slots_written,
                "datapath updated"
            );
        }
        self.publish();
        Ok(())
    }

    /// Reconcile, and on failure log it and leave it for the next tick to retry: a
    /// failed map write must not end the daemon and freeze the maps.
    fn try_reconcile(&mut self, why: &str) {
        match self.reconcile(why) {
            Ok(()) => self.dirty = false,
            Err(e) => {
                self.dirty = true;
                error!(
                    why,
                    "updating the datapath failed (retrying every second): {e}"
                );
            }
        }
    }

    fn reload(&mut self) {
        let refuse = |d: &mut Self, reason: String| {
            d.reloads_refused += 1;
            error!(config = %d.config_path.display(), "config reload refused, running state unchanged: {reason}");
        };
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => return refuse(self, format!("{e}")),
        };
        if let Some(key) = restart_only_change(&self.config, &new) {
            return refuse(self, format!("{key} changed; that takes a restart"));
        }
        if let Err(e) = self.probes.reconfigure(&new) {
            return refuse(self, format!("{e}"));
        }
        self.config = new;
        self.reloads_applied += 1;
        match self.reconcile("reload") {
            Ok(()) => info!(config = %self.config_path.display(), "config reloaded"),
            Err(e) => {
                self.dirty = true;
                error!(config = %self.config_path.display(), "config reloaded, but updating the datapath failed (retrying every second): {e}");
            }
        }
    }

    /// One backend's row of the snapshot.
    fn backend_status(
        &self,
        desired: &Desired,
        id: u32,
        backend: &BackendSettings,
    ) -> BackendStatus {
        let traffic = self.dp.backend_stats(id).unwrap_or_default();
        let passive = self.dp.passive_stats(id).unwrap_or_default();
        let last = self
            .probes
            .handles
            .get(&backend.addr)
            .map(ProberHandle::latest);
        let health = self
            .probes
            .health
            .get(&backend.addr)
            .copied()
            .unwrap_or(Health::Down);
        BackendStatus {
            address: backend.addr,
            id,
            weight: backend.weight,
            healthy: health == Health::Ready,
            health: health.to_string(),
            in_rotation: desired.in_rotation.contains(&id),
            last_probe: last
                .as_ref()
                .map_or_else(|| "none yet".to_owned(), |e| e.reason.to_string()),
            probe_latency_seconds: last.as_ref().map_or(0.0, |e| e.latency.as_secs_f64()),
            probes: last.as_ref().map_or(0, |e| e.probes),
            transitions: last.as_ref().map_or(0, |e| e.transitions),
            failures: last.as_ref().map_or_else(Vec::new, |e| {
                let f = &e.failures;
                vec![
                    ("timeout".to_owned(), f.timeout),
                    ("refused".to_owned(), f.refused),
                    ("tls".to_owned(), f.tls),
                    ("http_status".to_owned(), f.http_status),
                    ("io".to_owned(), f.io),
                    ("passive".to_owned(), f.passive),
                ]
            }),
            passive_failures: [
                (PassiveKind::Rst, passive.rst),
                (PassiveKind::Icmp, passive.icmp),
                (PassiveKind::Silent, passive.silent),
            ]
            .into_iter()
            .map(|(k, n)| (k.label().to_owned(), n))
            .collect(),
            local_connects: self.dp.local_connects(id).unwrap_or_default(),
            packets: traffic.packets,
            bytes: traffic.bytes,
            new_flows: traffic.new_flows,
        }
    }

    /// Replace the published snapshot with the current state.
    fn publish(&self) {
        let current = self.reconciler.current();
        let counters = self
            .dp
            .counters()
            .map_or([0; lb_common::COUNTER_COUNT as usize], |c| c.0);
        let elections = self.owners.states();
        let vips = current
            .map(|d| {
                d.vips
                    .iter()
                    .map(|(v, _)| {
                        let s = self.dp.vip_stats(v.id).unwrap_or_default();
                        VipStatus {
                            address: v.addr,
                            owned: v.owned,
                            election: elections
                                .iter()
                                .find(|(a, _)| *a == v.addr.ip())
                                .map(|(_, e)| e.clone()),
                            packets: s.packets,
                            bytes: s.bytes,
                            new_flows: s.new_flows,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let backends = current
            .map(|d| {
                d.backends
                    .iter()
                    .map(|(&id, b)| self.backend_status(d, id, b))
                    .collect()
            })
            .unwrap_or_default();
        let snapshot = Snapshot {
            instance: self.config.instance.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            taken_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            vips,
            backends,
            fail_open: current.is_some_and(|d| d.fail_open),
            counters: COUNTER_NAMES
                .iter()
                .zip(counters)
                .map(|(n, v)| ((*n).to_owned(), v))
                .collect(),
            reloads_applied: self.reloads_applied,
            reloads_refused: self.reloads_refused,
        };
        if let Ok(mut s) = self.snapshot.write() {
            *s = snapshot;
        }
    }
}

/// Run until SIGTERM or SIGINT, serving `snapshot` on the admin endpoint.
pub async fn run(opts: &RunOptions, snapshot: SharedSnapshot) -> Result<(), DaemonError> {
    let config = Config::load(&opts.config_path)?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
    let listener = crate::admin::bind(config.admin_listen).await?;
    info!(listen = %config.admin_listen, "admin endpoint: /metrics /healthz /status");
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(crate::admin::serve(listener, snapshot.clone(), async {
        let _ = admin_stopped.await;
    }));
    let (mut programs, mut dp) = loader::start(&config)?;
    let mut reconciler = Reconciler::new();
    crate::socklb::start(&config, &mut programs, &mut reconciler)?;
    let (passive_tx, mut passive_rx) = mpsc::channel(256);
    let _passive_reader = crate::passive::spawn(dp.take_passive_events()?, passive_tx)
        .map_err(DaemonError::PassiveEvents)?;
    let (tx, mut rx) = mpsc::channel(256);
    let probes = Probes::start(&config, tx)?;
    let (owners, mut owner_rx) = Owners::start(&config).await?;
    let mut d = Daemon {
        config,
        config_path: opts.config_path.clone(),
        dp,
        reconciler,
        probes,
        snapshot,
        reloads_applied: 0,
        reloads_refused: 0,
        seen: Vec::new(),
        dirty: false,
        owners,
        passive_marked: HashMap::new(),
    };
    d.reconcile("start")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(ev) = rx.recv() => {
                // An event from a prober stopped by a reload is stale.
                if d.probes.handles.contains_key(&ev.backend) {
                    let health = ev.health();
                    d.probes.health.insert(ev.backend, health);
                    d.try_reconcile(&format!("backend {health}"));
                }
            }
            Some(ev) = owner_rx.recv() => {
                if d.owners.before_reconcile(&ev).await {
                    d.try_reconcile(&ev.reason);
                }
                d.owners.after_reconcile(&ev, !d.dirty).await;
            }
            Some((id, why)) = passive_rx.recv() => d.passive_failure(id, why),
            _ = hup.recv() => d.reload(),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if d.owners.retry_releases().await || d.dirty {
                    d.try_reconcile("retry");
                }
                d.owners.retry_claims(!d.dirty).await;
                d.log_events();
                d.owners.log_rejections();
                d.publish();
            }
        }
    }
    let pin = loader::pin_dir(&d.config.instance);
    // Stop answering for elected VIPs and balancing them, then hand them over;
    // ownership events that handing over produces are drained, not acted on.
    d.owners.release_all().await;
    d.try_reconcile("exit: elected VIPs released");
    let owners = std::mem::replace(&mut d.owners, Owners::none());
    let drain = async { while owner_rx.recv().await.is_some() {} };
    tokio::select! {
        () = owners.shutdown() => {}
        () = drain => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {
            warn!("handing elected VIPs over took over 5 s; exiting anyway");
        }
    }
    drop(d);
    drop(programs);
    let _ = stop_admin.send(());
    if let Ok(Err(e)) = admin.await {
        warn!("admin endpoint: {e}");
    }
    if opts.detach_on_exit {
        let removed = loader::detach(&pin)?;
        info!(pins = %pin.display(), removed = removed.len(), "detached the datapath and removed its pins");
    } else {
        info!(pins = %pin.display(), "exiting; the pinned datapath keeps balancing (apilb detach removes it)");
    }
    Ok(())
}

/// A snapshot to share between the loop and the admin endpoint.
#[must_use]
pub fn new_snapshot() -> SharedSnapshot {
    Arc::new(RwLock::new(Snapshot::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_logged_events_that_moved_are_reported_with_their_delta() {
        let mut before = vec![0u64; lb_common::COUNTER_COUNT as usize];
        before[lb_common::DROP_NO_NAT_PORT as usize] = 5;
        let mut now = before.clone();
        now[lb_common::DROP_NO_NAT_PORT as usize] = 12;
        now[lb_common::REDIRECT as usize] = 1_000; // not a logged event
        now[lb_common::PORT_RECLAIMED as usize] = 3;
        assert_eq!(
            moved_events(&before, &now),
            vec![("drop_no_nat_port", 7), ("port_reclaimed", 3)]
        );
        assert!(moved_events(&now, &now).is_empty());
        // The first reading (nothing seen yet) logs nothing.
        assert!(moved_events(&[], &now).is_empty());
    }
}
