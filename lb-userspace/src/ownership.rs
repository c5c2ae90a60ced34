//! The elected VIPs this node owns: runs the elections the config asks for and
//! turns their verdicts into the owned set the reconciler reads and the VIP
//! addresses on the election interface.
//!
//! The address is how the VIP answers ARP and NDP: while it is on the interface
//! the kernel answers for it (and takes its non-6443 traffic, and answers a stray
//! segment without a flow with a RST); [`crate::announce`] removes it on loss, so
//! nothing on this node answers for the VIP any more. Order keeps connections:
//! on gaining a VIP the datapath's owned flag is written (by the caller's
//! reconcile) before the address is added and announced, so the first packet the
//! new ARP entries bring is balanced; on losing it the address goes first, so the
//! node stops answering ARP before it stops balancing. An address change that
//! fails is retried every second, and until then the datapath follows what the
//! kernel answers for. A clean exit removes the addresses and the owned flags
//! first, then hands the VIPs over (priority 0, lease revoked).
//!
//! A static VIP is never touched: its address is the operator's business.
//!
//! The run loop drives all of this through [`Owners::step`] (an election's event,
//! or the one-second tick that retries what failed) and [`Owners::reconcile`] (any
//! other cause), handing in what converges the datapath as a [`Reconcile`].

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    announce::{AnnounceError, Announcer},
    config::{Config, Election},
    controller::ControllerError,
    election::{
        ElectionState, Ownership, SyncSignals,
        etcd::{self, EtcdElection, EtcdError},
        vrrp::{self, Tuning, VrrpElection, VrrpError, VrrpVip},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error(transparent)]
    Announce(#[from] AnnounceError),
    #[error(transparent)]
    Vrrp(#[from] VrrpError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// What converges the datapath: the daemon's side of a step.
pub trait Reconcile {
    /// Converge the maps to the config, health and the `owned` elected VIPs. On an
    /// error, [`Reconcile::dirty`] holds until a reconcile succeeds.
    fn reconcile(&mut self, owned: &HashSet<IpAddr>, why: &str) -> Reconciled;
    /// The last reconcile failed, so the datapath may lag behind what is wanted.
    fn dirty(&self) -> bool;
}

/// What a reconcile found and did.
#[derive(Debug)]
pub struct Reconciled {
    /// No backend is healthy (so every configured one serves): known before the
    /// maps are written, and true whether or not writing them worked.
    pub fail_open: bool,
    pub written: Result<(), ControllerError>,
}

/// An input of [`Owners::step`].
#[derive(Clone, Debug)]
pub enum Step {
    /// An election changed its mind, or asks to announce a VIP again.
    Election(Ownership),
    /// Something else the maps follow changed (a backend's health, the config).
    Changed(String),
    /// The loop's one-second tick: retry failed address changes and reconciles.
    Tick,
}

/// The elections and what they decided.
pub struct Owners {
    owned: HashSet<IpAddr>,
    announcer: Option<Announcer>,
    vrrp: Option<VrrpElection>,
    etcd: Option<EtcdElection>,
    announce_count: u32,
    announce_interval: Duration,
    unhealthy: watch::Sender<bool>,
    /// Address changes that failed, with the state wanted (owned or not).
    pending: HashMap<IpAddr, bool>,
}

impl Owners {
    /// Start the elections of `config`'s elected VIPs; their ownership changes
    /// come out of the returned receiver. `sync`: what flow sync knows of the
    /// peers, which VRRP weighs with their adverts, and which of them are gone. The VIPs' addresses are removed first: a
    /// process killed while owning may have left one, and a node that has not won
    /// an election must not answer for a VIP.
    pub async fn start(
        config: &Config,
        sync: Option<SyncSignals>,
    ) -> Result<(Self, mpsc::Receiver<Ownership>), OwnershipError> {
        let (tx, events) = mpsc::channel(64);
        let (unhealthy, unhealthy_rx) = watch::channel(false);
        let e = &config.election;
        let mut owners = Self {
            owned: HashSet::new(),
            announcer: None,
            vrrp: None,
            etcd: None,
            announce_count: e.announce_count,
            announce_interval: e.announce_interval,
            unhealthy,
            pending: HashMap::new(),
        };
        let vrrp_vips = vrrp_vips(config);
        let etcd_vips: Vec<IpAddr> = config
            .vips
            .iter()
            .filter(|v| v.election == Election::Etcd)
            .map(|v| v.addr.ip())
            .collect();
        if vrrp_vips.is_empty() && etcd_vips.is_empty() {
            return Ok((owners, events));
        }
        let announcer = Announcer::new(&e.interface).await?;
        for vip in vrrp_vips
            .iter()
            .map(|v| v.addr)
            .chain(etcd_vips.iter().copied())
        {
            if announcer.holds(vip).await? {
                info!(%vip, interface = %e.interface, "removing a VIP address no election has given this node yet");
                announcer.release(vip).await?;
            }
        }
        if !vrrp_vips.is_empty() {
            owners.vrrp = Some(
                vrrp::spawn(
                    &e.vrrp,
                    &announcer,
                    &vrrp_vips,
                    unhealthy_rx,
                    sync.clone(),
                    tx.clone(),
                )
                .await?,
            );
        }
        owners.announcer = Some(announcer);
        if let Some(s) = &e.etcd {
            let departed = sync.map(|s| s.departed);
            owners.etcd = Some(etcd::spawn(s.clone(), &etcd_vips, tx, departed)?);
        }
        Ok((owners, events))
    }

    /// A reloaded config's VRRP tuning (priorities, `track_weight`, preempt),
    /// applied to the running election; the rest of the election a reload may
    /// not change (`Config::restart_needed`).
    pub fn retune(&self, config: &Config) {
        if let Some(v) = &self.vrrp {
            v.retune(Tuning::new(&config.election.vrrp, &vrrp_vips(config)));
        }
    }

    /// Reconcile with the VIPs this node owns, and tell the elections whether any
    /// backend is healthy (VRRP lowers its priority by `track_weight` while none
    /// is), whether or not the maps could be written.
    pub fn reconcile(&self, r: &mut impl Reconcile, why: &str) -> Result<(), ControllerError> {
        let Reconciled { fail_open, written } = r.reconcile(&self.owned, why);
        self.unhealthy.send_if_modified(|v| {
            let changed = *v != fail_open;
            *v = fail_open;
            changed
        });
        written
    }

    /// [`Owners::reconcile`] inside a step: a failed map write must not end the
    /// daemon and freeze the maps, so it is logged and the tick retries it while
    /// [`Reconcile::dirty`].
    fn reconcile_or_retry(&self, r: &mut impl Reconcile, why: &str) {
        if let Err(e) = self.reconcile(r, why) {
            error!(
                why,
                "updating the datapath failed (retrying every second): {e}"
            );
        }
    }

    /// One step of the loop for ownership.
    ///
    /// An election's event: a lost VIP's address goes first, then the reconcile
    /// (if the owned set changed), then a gained VIP's address is added and
    /// announced, once the datapath balances it. If an address cannot be removed
    /// the kernel still answers for the VIP, so the node keeps balancing it; a
    /// failed change is retried on the tick, removals before additions. The tick
    /// also retries a failed reconcile.
    pub async fn step(&mut self, input: Step, r: &mut impl Reconcile) {
        match input {
            Step::Election(ev) => {
                if self.begin(&ev).await {
                    self.reconcile_or_retry(r, &ev.reason);
                }
                self.finish(&ev, !r.dirty()).await;
            }
            Step::Changed(why) => self.reconcile_or_retry(r, &why),
            Step::Tick => {
                if self.retry_releases().await || r.dirty() {
                    self.reconcile_or_retry(r, "retry");
                }
                self.retry_claims(!r.dirty()).await;
            }
        }
    }

    /// Before the reconcile that follows `ev`: a lost VIP's address goes now.
    /// Returns whether the owned set changed.
    async fn begin(&mut self, ev: &Ownership) -> bool {
        if ev.owned {
            self.pending.remove(&ev.vip);
            return self.owned.insert(ev.vip);
        }
        if self.release(ev.vip).await {
            self.pending.remove(&ev.vip);
            self.owned.remove(&ev.vip)
        } else {
            self.pending.insert(ev.vip, false);
            false
        }
    }

    /// After that reconcile: a gained VIP's address is added and announced, once
    /// the datapath balances it (`reconciled`); otherwise, or if adding fails, it
    /// is retried. Also for a VIP already owned: an election may ask to announce
    /// it again.
    async fn finish(&mut self, ev: &Ownership, reconciled: bool) {
        if !ev.owned || !self.owned.contains(&ev.vip) {
            return;
        }
        if !reconciled || !self.claim(ev.vip).await {
            self.pending.insert(ev.vip, true);
        }
    }

    /// Retry the address removals that failed; returns whether the owned set
    /// changed, so that the step reconciles.
    async fn retry_releases(&mut self) -> bool {
        let mut changed = false;
        let releases: Vec<IpAddr> = self
            .pending
            .iter()
            .filter(|&(_, &want)| !want)
            .map(|(v, _)| *v)
            .collect();
        for vip in releases {
            if self.release(vip).await {
                self.pending.remove(&vip);
                changed |= self.owned.remove(&vip);
            }
        }
        changed
    }

    /// Retry the address additions that failed, if the datapath is `reconciled`.
    async fn retry_claims(&mut self, reconciled: bool) {
        if !reconciled {
            return;
        }
        let claims: Vec<IpAddr> = self
            .pending
            .iter()
            .filter(|&(_, &want)| want)
            .map(|(v, _)| *v)
            .collect();
        for vip in claims {
            if !self.owned.contains(&vip) || self.claim(vip).await {
                self.pending.remove(&vip);
            }
        }
    }

    async fn release(&self, vip: IpAddr) -> bool {
        let Some(a) = &self.announcer else {
            return true;
        };
        match a.release(vip).await {
            Ok(()) => true,
            Err(e) => {
                warn!(%vip, "removing the VIP address failed (retrying every second): {e}");
                false
            }
        }
    }

    async fn claim(&self, vip: IpAddr) -> bool {
        let Some(a) = &self.announcer else {
            return true;
        };
        match a
            .claim(vip, self.announce_count, self.announce_interval)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(%vip, "adding or announcing the VIP address failed (retrying every second): {e}");
                false
            }
        }
    }

    /// Stop answering for every elected VIP this node owns: addresses removed,
    /// owned set emptied, datapath reconciled. The first step of a clean exit,
    /// before [`Owners::shutdown`] hands the VIPs over.
    pub async fn release_all(&mut self, r: &mut impl Reconcile) {
        let owned: Vec<IpAddr> = self.owned.iter().copied().collect();
        for vip in owned {
            if self.release(vip).await {
                self.owned.remove(&vip);
            }
        }
        self.reconcile_or_retry(r, "exit: elected VIPs released");
    }

    /// Each elected VIP's election state.
    #[must_use]
    pub fn states(&self) -> Vec<(IpAddr, ElectionState)> {
        let mut all = self
            .vrrp
            .as_ref()
            .map(VrrpElection::states)
            .unwrap_or_default();
        all.extend(
            self.etcd
                .as_ref()
                .map(EtcdElection::states)
                .unwrap_or_default(),
        );
        all
    }

    /// Hand the VIPs over, after [`Owners::release_all`]: VRRP sends priority 0,
    /// etcd revokes its leases.
    pub async fn shutdown(mut self) {
        if let Some(v) = self.vrrp.take() {
            v.shutdown().await;
        }
        if let Some(e) = self.etcd.take() {
            e.resign().await;
        }
    }
}

/// The config's VRRP VIPs, with their VRID and priority.
fn vrrp_vips(config: &Config) -> Vec<VrrpVip> {
    config
        .vips
        .iter()
        .filter_map(|v| match v.election {
            Election::Vrrp { vrid, priority } => Some(VrrpVip {
                addr: v.addr.ip(),
                vrid,
                priority,
            }),
            _ => None,
        })
        .collect()
}
