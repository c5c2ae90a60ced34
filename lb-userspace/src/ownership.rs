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

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    announce::{AnnounceError, Announcer},
    config::{Config, Election},
    election::{
        ElectionState, Ownership,
        etcd::{self, EtcdElection, EtcdError, EtcdSettings, EtcdTls},
        vrrp::{self, VrrpElection, VrrpError, VrrpVip},
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

/// The elections and what they decided.
pub struct Owners {
    owned: HashSet<IpAddr>,
    announcer: Option<Announcer>,
    vrrp: Option<VrrpElection>,
    etcd: Option<EtcdElection>,
    announce_count: u32,
    announce_interval: Duration,
    unhealthy: watch::Sender<bool>,
    /// VRRP rejections by reason at the last `log_rejections`.
    rejections_seen: BTreeMap<String, u64>,
    /// Address changes that failed, with the state wanted (owned or not).
    pending: HashMap<IpAddr, bool>,
}

impl Owners {
    /// Start the elections of `config`'s elected VIPs; their ownership changes
    /// come out of the returned receiver. The VIPs' addresses are removed first: a
    /// process killed while owning may have left one, and a node that has not won
    /// an election must not answer for a VIP.
    pub async fn start(
        config: &Config,
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
            rejections_seen: BTreeMap::new(),
            pending: HashMap::new(),
        };
        let vrrp_vips: Vec<VrrpVip> = config
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
            .collect();
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
            owners.vrrp =
                Some(vrrp::spawn(&e.vrrp, &announcer, &vrrp_vips, unhealthy_rx, tx.clone()).await?);
        }
        owners.announcer = Some(announcer);
        if let Some(s) = &e.etcd {
            let settings = EtcdSettings {
                endpoints: s.endpoints.clone(),
                prefix: s.prefix.clone(),
                lease_ttl: s.lease_ttl,
                node: s.node.clone(),
                tls: s.ca_file.clone().map(|ca_file| EtcdTls {
                    ca_file,
                    cert_file: s.client_cert.as_ref().map(|c| c.0.clone()),
                    key_file: s.client_cert.as_ref().map(|c| c.1.clone()),
                }),
                dial_timeout: s.dial_timeout,
            };
            owners.etcd = Some(etcd::spawn(settings, &etcd_vips, tx)?);
        }
        Ok((owners, events))
    }

    /// No elections at all (what is left after [`Owners::shutdown`]).
    #[must_use]
    pub fn none() -> Self {
        Self {
            owned: HashSet::new(),
            announcer: None,
            vrrp: None,
            etcd: None,
            announce_count: 0,
            announce_interval: Duration::ZERO,
            unhealthy: watch::channel(false).0,
            rejections_seen: BTreeMap::new(),
            pending: HashMap::new(),
        }
    }

    /// The elected VIPs this node owns now.
    #[must_use]
    pub fn owned(&self) -> &HashSet<IpAddr> {
        &self.owned
    }

    /// Tell the elections whether no backend is healthy (VRRP lowers its
    /// priority by `track_weight` while so).
    pub fn set_unhealthy(&self, no_healthy_backend: bool) {
        self.unhealthy.send_if_modified(|v| {
            let changed = *v != no_healthy_backend;
            *v = no_healthy_backend;
            changed
        });
    }

    /// Before the reconcile that follows `ev`: a lost VIP's address goes now.
    /// Returns whether the owned set changed. If the address cannot be removed the
    /// kernel still answers for the VIP, so the node keeps balancing it, and the
    /// removal is retried ([`Owners::retry`]).
    pub async fn before_reconcile(&mut self, ev: &Ownership) -> bool {
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
    /// is retried ([`Owners::retry`]). Also for a VIP already owned: an election
    /// may ask to announce it again.
    pub async fn after_reconcile(&mut self, ev: &Ownership, reconciled: bool) {
        if !ev.owned || !self.owned.contains(&ev.vip) {
            return;
        }
        if !reconciled || !self.claim(ev.vip).await {
            self.pending.insert(ev.vip, true);
        }
    }

    /// Retry the address changes that failed: removals first (returns whether the
    /// owned set changed, so the caller reconciles), then, if `reconciled`, the
    /// additions.
    pub async fn retry_releases(&mut self) -> bool {
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

    /// See [`Owners::retry_releases`].
    pub async fn retry_claims(&mut self, reconciled: bool) {
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
    /// owned set emptied (the caller then reconciles). The first step of a clean
    /// exit, before [`Owners::shutdown`] hands the VIPs over.
    pub async fn release_all(&mut self) {
        let owned: Vec<IpAddr> = self.owned.iter().copied().collect();
        for vip in owned {
            if self.release(vip).await {
                self.owned.remove(&vip);
            }
        }
    }

    /// Log the VRRP adverts refused since the last call, by reason: a peer with
    /// the wrong password, VRID or TTL shows up here rather than as a silent
    /// split brain.
    pub fn log_rejections(&mut self) {
        let Some(v) = &self.vrrp else { return };
        // Every VRRP VIP shares one socket, so each carries the same totals.
        let Some((_, state)) = v.states().into_iter().next() else {
            return;
        };
        for (reason, &n) in &state.rejected {
            let before = self.rejections_seen.get(reason).copied().unwrap_or(0);
            if n > before {
                warn!(reason, count = n - before, "VRRP adverts refused");
            }
        }
        self.rejections_seen = state.rejected;
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
