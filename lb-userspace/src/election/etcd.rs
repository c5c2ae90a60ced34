//! VIP ownership through etcd (see [`crate::election`]): `election = "etcd"`.
//!
//! Where the LB nodes already share an etcd (a kubeadm control plane has one on every
//! master), a lease and a transaction per VIP decide ownership without multicast, a
//! VRRP peer configuration or a shared L2 segment for adverts, and `/status` can say
//! which node holds each VIP by reading one key.
//!
//! [`spawn`] starts the election; `connect` derives from the settings what the tasks
//! use (client options with TLS, lease timing, bounded requests); `session` is one
//! connection with its lease, its keepalive floor and its watch; `task` is one VIP's
//! election on such sessions.
//!
//! # The election
//!
//! Each VIP runs its own task with its own etcd client and lease, so one VIP's trouble
//! never stalls another's. The key is `<prefix>vip/<address>`, its value the node's
//! name. A session:
//!
//! 1. grants a lease of `lease_ttl` (rounded up to whole seconds) and opens its
//!    keepalive stream, renewed every `lease_ttl / 3`;
//! 2. watches the key, then campaigns: a transaction that, if the key's
//!    `create_revision` is 0 (no such key), puts it with the lease, else reads it. The
//!    node owns the VIP iff its put succeeded, or the key already holds its name with
//!    its lease;
//! 3. a candidate campaigns again when the watch reports the key deleted (its owner's
//!    lease expired or was revoked), and every `lease_ttl` or so anyway, so a lost
//!    watch cannot stall it;
//! 4. an owner gives the VIP up when the key is deleted or rewritten under it, when
//!    etcd says its lease is gone, or at its release deadline (below), and at no
//!    other time: a broken keepalive stream (a restarted member, a dropped
//!    connection) is reopened on the same lease while the VIP stays, since the
//!    lease provably outlives the break until that deadline;
//! 5. after a failed session the task reconnects with a new client, revokes the old
//!    lease if it still can (so the other node need not wait for it to expire), and
//!    starts again with a fresh lease;
//! 6. with flow sync, a candidate told that the owner's apilb is gone (both its sync
//!    sessions closed by its kernel, as a killed process's are) revokes the owner's
//!    lease if the key still holds the owner's name: the owner can no longer renew
//!    it, so this only spares the wait for its expiry, and the candidates' watches
//!    fire at once. A cut cable closes no session, so then the lease expires.
//!
//! [`EtcdElection::resign`] reports every owned VIP as not owned, then revokes the
//! leases, so the other node's watch fires and it takes over at once. Dropping the
//! [`EtcdElection`] aborts the tasks and revokes nothing: the other node takes over when
//! the leases expire, as after a crash.
//!
//! # Safety: two nodes never own a VIP at once
//!
//! This holds as long as etcd keeps its lease contract (a lease outlives every
//! keepalive it acknowledged by its TTL) and the two nodes' clocks run at about the
//! same rate; the guard absorbs the rest.
//!
//! Another node can only win the key once it is deleted (its transaction requires
//! `create_revision == 0`). While this node owns it, the key is attached to this node's
//! lease, so it is deleted only when this node revokes the lease (after it has already
//! reported the VIP not owned), by an operator (the watch reports it, and the node gives
//! up), or when the lease expires on the server. The last is the case to rule out, and
//! it is ruled out by releasing early on the local clock:
//!
//! - etcd's leader sets a lease's expiry to *(the moment it processes the grant or a
//!   renewal) + TTL*. A request is processed after it was sent, so once a keepalive
//!   sent at local instant `t` is answered with a positive TTL, the lease cannot expire
//!   before `t + TTL`. A later renewal only moves the expiry later; a renewal that
//!   arrives after the expiry does not revive the lease (etcd answers TTL 0); a new
//!   etcd leader restarts every lease's countdown from its own election (or from a
//!   checkpoint of the remaining TTL), which is later again, never earlier.
//! - The node records the send instant of every keepalive and, at each positive
//!   answer, raises its floor to `send + TTL` (the grant and the first keepalive count
//!   as well). It releases the VIP (`Ownership { owned: false }`, state `"cut off"`) at
//!   `floor - guard`, `guard = max(lease_ttl / 4, 500 ms)`, unless a newer answer has
//!   raised the floor by then. A campaign that wins after that instant is not reported
//!   as owned.
//! - So this node has released before the server can expire the lease, hence before
//!   the key can disappear, hence before any other node's transaction can succeed.
//!   The guard absorbs what the argument treats as zero: the rate difference of the
//!   two machines' monotonic clocks (parts per million), the timer's wake-up delay, and
//!   the daemon's time to act on the event (datapath flag, address removal). It needs
//!   no synchronised wall clocks.
//!
//! The deadline is enforced by the VIP's task alone: keepalives run in a task of their
//! own, and every await the VIP task makes while it owns the VIP is bounded by the
//! deadline, so a hung connection cannot hold the release back. What no lease can
//! cover is this process frozen (SIGSTOP, a paused VM) for longer than the guard while
//! it owns a VIP: the kernel datapath keeps serving the VIP meanwhile. The events
//! channel must be drained promptly too: a release waits for room in it.

mod connect;
mod session;
mod task;

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, timeout_at},
};
use tracing::warn;

use super::{Departed, ElectionState, Ownership};
use connect::Config;
pub use connect::check_endpoint;

/// The shortest lease accepted: etcd's own minimum with default timing (1.5 s of
/// election timeout, rounded up) and room for three keepalives and the guard.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// `election.etcd` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `http://host:port`, `https://host:port`, or `host:port` (https with `tls`).
    pub endpoints: Vec<String>,
    /// Keys live under it: `<prefix>vip/<address>`, e.g. `/apilb/vip/10.0.0.10`.
    pub prefix: String,
    /// The lease's time to live, at least [`MIN_LEASE_TTL`]; rounded up to seconds.
    pub lease_ttl: Duration,
    /// This node's name: the value of the keys it owns.
    pub node: String,
    pub tls: Option<EtcdTls>,
    /// Time to open a connection to an endpoint; each request may take this plus half
    /// the lease TTL.
    pub dial_timeout: Duration,
}

/// TLS towards etcd: the CA that signed its serving certificate, and an optional
/// client certificate and key, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// `(cert_file, key_file)`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd TLS {what} {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd TLS {what} {}: no PEM block in it", path.display())]
    NotPem { what: &'static str, path: PathBuf },
    #[error("etcd at {endpoints}: {op}: {source}")]
    Request {
        endpoints: String,
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: {op}: no answer within {after:?}")]
    Timeout {
        endpoints: String,
        op: &'static str,
        after: Duration,
    },
    #[error("etcd at {endpoints}: {what}")]
    Session { endpoints: String, what: String },
}

/// The running etcd election: one task per VIP.
pub struct EtcdElection {
    vips: Vec<(IpAddr, watch::Receiver<ElectionState>)>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    resign_timeout: Duration,
}

impl EtcdElection {
    /// Every VIP's election, in the order given to [`spawn`].
    pub fn states(&self) -> Vec<(IpAddr, ElectionState)> {
        self.vips
            .iter()
            .map(|(vip, rx)| (*vip, rx.borrow().clone()))
            .collect()
    }

    /// Clean shutdown: every owned VIP is reported not owned, then every lease is
    /// revoked, so the other node takes over at once. Bounded: a task that has not
    /// finished within a request timeout is aborted (its lease then expires).
    pub async fn resign(mut self) {
        self.shutdown.send_replace(true);
        let deadline = Instant::now() + self.resign_timeout;
        for mut task in std::mem::take(&mut self.tasks) {
            if timeout_at(deadline, &mut task).await.is_err() {
                warn!("etcd election: a VIP task did not finish resigning in time; aborted");
                task.abort();
            }
        }
    }
}

impl Drop for EtcdElection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts one election task per VIP (inside a tokio runtime). The settings come
/// validated from `crate::config`; the TLS files are loaded here, and etcd itself is
/// reached by the tasks, which keep retrying. `departed`: flow sync's word that a
/// peer's apilb is gone; a candidate then revokes that peer's lease on the key, if
/// the key holds the peer's name, instead of waiting for the lease to expire.
pub fn spawn(
    settings: EtcdSettings,
    vips: &[IpAddr],
    events: mpsc::Sender<Ownership>,
    departed: Option<watch::Receiver<Departed>>,
) -> Result<EtcdElection, EtcdError> {
    let config = Arc::new(Config::new(settings)?);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let resign_timeout = config.request_timeout + Duration::from_secs(1);
    let start = move |vip: IpAddr| {
        let (state_rx, task) = task::start(
            vip,
            &config,
            events.clone(),
            shutdown_rx.clone(),
            departed.clone(),
        );
        ((vip, state_rx), task)
    };
    let (states, tasks) = vips.iter().copied().map(start).unzip();
    Ok(EtcdElection {
        vips: states,
        tasks,
        shutdown,
        resign_timeout,
    })
}
