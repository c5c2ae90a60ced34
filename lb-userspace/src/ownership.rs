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
//! node stops answering ARP before it stops balancing.
//!
//! A static VIP is never touched: its address is the operator's business.

use std::{
    collections::{BTreeMap, HashSet},
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
        owners.announcer = Some(announcer);
        if !vrrp_vips.is_empty() {
            owners.vrrp = Some(
                vrrp::spawn(&e.vrrp, &e.interface, &vrrp_vips, unhealthy_rx, tx.clone()).await?,
            );
        }
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
    /// Returns whether the owned set changed.
    pub async fn before_reconcile(&mut self, ev: &Ownership) -> bool {
        if ev.owned {
            return self.owned.insert(ev.vip);
        }
        if let Some(a) = &self.announcer
            && let Err(e) = a.release(ev.vip).await
        {
            warn!(vip = %ev.vip, "removing the VIP address failed: {e}");
        }
        self.owned.remove(&ev.vip)
    }

    /// After that reconcile: a gained VIP's address is added and announced.
    pub async fn after_reconcile(&self, ev: &Ownership) {
        if !ev.owned || !self.owned.contains(&ev.vip) {
            return;
        }
        if let Some(a) = &self.announcer
            && let Err(e) = a
                .claim(ev.vip, self.announce_count, self.announce_interval)
                .await
        {
            warn!(vip = %ev.vip, "adding or announcing the VIP address failed: {e}");
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

    /// Hand every owned VIP over: VRRP sends priority 0, etcd revokes its leases,
    /// and the addresses go.
    pub async fn shutdown(mut self) {
        if let Some(v) = self.vrrp.take() {
            v.shutdown().await;
        }
        if let Some(e) = self.etcd.take() {
            e.resign().await;
        }
        if let Some(a) = &self.announcer {
            for vip in self.owned.drain() {
                if let Err(e) = a.release(vip).await {
                    warn!(%vip, "removing the VIP address failed: {e}");
                }
            }
        }
    }
}
