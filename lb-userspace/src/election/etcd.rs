//! VIP ownership through etcd (see [`crate::election`]): `election = "etcd"`.
//!
//! Where the LB nodes already share an etcd (a kubeadm control plane has one on every
//! master), a lease and a transaction per VIP decide ownership without multicast, a
//! VRRP peer configuration or a shared L2 segment for adverts, and `/status` can say
//! which node holds each VIP by reading one key.
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
//!    the session fails (`"cut off"`), or at its release deadline (below);
//! 5. after a failed session the task reconnects with a new client, revokes the old
//!    lease if it still can (so the other node need not wait for it to expire), and
//!    starts again with a fresh lease.
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

use std::{
    collections::VecDeque,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchResponse, WatchStream,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout_at},
};
use tracing::{debug, info, warn};

use super::{ElectionState, Ownership};

/// The shortest lease accepted: etcd's own minimum with default timing (1.5 s of
/// election timeout, rounded up) and room for three keepalives and the guard.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The least time an owner releases a VIP before its lease could expire.
const MIN_GUARD: Duration = Duration::from_millis(500);

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

/// Starts one election task per VIP (inside a tokio runtime). Settings and TLS files
/// are checked here; etcd itself is reached by the tasks, which keep retrying.
pub fn spawn(
    settings: EtcdSettings,
    vips: &[IpAddr],
    events: mpsc::Sender<Ownership>,
) -> Result<EtcdElection, EtcdError> {
    let config = Arc::new(Config::new(settings)?);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let resign_timeout = config.request_timeout + Duration::from_secs(1);
    let start = move |vip: IpAddr| {
        let initial = ElectionState {
            mode: "etcd".into(),
            state: "candidate".into(),
            reason: "starting".into(),
            ..ElectionState::default()
        };
        let (state, state_rx) = watch::channel(initial);
        let task = VipTask {
            vip,
            key: format!("{}vip/{vip}", config.settings.prefix),
            config: Arc::clone(&config),
            events: events.clone(),
            state,
            owned: false,
            transitions: 0,
        };
        ((vip, state_rx), tokio::spawn(task.run(shutdown_rx.clone())))
    };
    let (states, tasks) = vips.iter().copied().map(start).unzip();
    Ok(EtcdElection {
        vips: states,
        tasks,
        shutdown,
        resign_timeout,
    })
}

/// Settings checked and derived once, shared by the VIP tasks.
struct Config {
    settings: EtcdSettings,
    options: ConnectOptions,
    /// The endpoints, comma-separated, for errors and logs.
    endpoints: String,
    /// `lease_ttl` rounded up to whole seconds: what is asked of etcd.
    ttl: Duration,
    keepalive_every: Duration,
    guard: Duration,
    request_timeout: Duration,
}

impl Config {
    fn new(settings: EtcdSettings) -> Result<Self, EtcdError> {
        let mut options = ConnectOptions::new().with_connect_timeout(settings.dial_timeout);
        if let Some(tls) = &settings.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let ttl = Duration::from_secs(
            settings.lease_ttl.as_secs() + u64::from(settings.lease_ttl.subsec_nanos() > 0),
        );
        Ok(Self {
            endpoints: settings.endpoints.join(","),
            options,
            ttl,
            keepalive_every: ttl / 3,
            guard: (ttl / 4).max(MIN_GUARD),
            request_timeout: settings.dial_timeout + ttl / 2,
            settings,
        })
    }

    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)
    }
}

/// Whether `endpoint` is one the client can dial (`crate::config` asks, so that a
/// bad one fails `apilb check`); the error is why not.
pub fn check_endpoint(endpoint: &str, tls: bool) -> Result<(), &'static str> {
    let bad = Err;
    let rest = if let Some(rest) = endpoint.strip_prefix("http://") {
        if tls {
            return bad("http:// with TLS settings; use https:// or no scheme");
        }
        rest
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        rest
    } else if endpoint.contains("://") {
        return bad("only http:// and https:// are supported");
    } else {
        endpoint
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.chars().any(char::is_whitespace) {
        return bad("expected host:port");
    }
    Ok(())
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    let bytes = std::fs::read(path).map_err(|source| EtcdError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(EtcdError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    let ca = read_pem("ca_file", &tls.ca_file)?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = &tls.client_cert {
        let identity = Identity::from_pem(read_pem("cert_file", cert)?, read_pem("key_file", key)?);
        options = options.identity(identity);
    }
    Ok(options)
}

/// Resolves when [`EtcdElection::resign`] asks the tasks to stop; never when the
/// election is dropped (the tasks are aborted then).
async fn resign_requested(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Aborts the keepalive task when the session ends, however it ends.
struct AbortOnDrop(JoinHandle<EtcdError>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection to etcd with one lease.
struct Session {
    client: Client,
    lease: i64,
    /// The TTL etcd granted.
    ttl: Duration,
    /// The lease cannot expire on the server before this instant (module docs).
    floor: watch::Receiver<Instant>,
    keepalive: AbortOnDrop,
    watch: Option<WatchStream>,
}

struct VipTask {
    vip: IpAddr,
    key: String,
    config: Arc<Config>,
    events: mpsc::Sender<Ownership>,
    state: watch::Sender<ElectionState>,
    owned: bool,
    transitions: u64,
}

impl VipTask {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut stale_lease = None;
        loop {
            let started = Instant::now();
            match Box::pin(self.session(&mut shutdown, &mut stale_lease)).await {
                Ok(()) => return,
                Err(error) => {
                    debug_assert!(!self.owned, "a failed session releases first");
                    if self.state.borrow().state != "cut off" {
                        self.set_state("cut off", format!("etcd session failed: {error}"));
                    }
                    warn!(vip = %self.vip, %error, "etcd election: session failed; reconnecting");
                }
            }
            // A session that lasted a while was healthy: start the backoff over.
            if started.elapsed() > self.config.ttl * 2 {
                backoff = Duration::from_millis(100);
            }
            let wait = backoff.mul_f64(0.5 + fastrand::f64());
            tokio::select! {
                () = sleep(wait) => {}
                () = resign_requested(&mut shutdown) => return,
            }
            backoff = (backoff * 2).min(self.config.ttl);
        }
    }

    /// Connects, takes a lease and runs the election until resigned (Ok) or until the
    /// session fails (Err, having released the VIP first if it was owned).
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        stale_lease: &mut Option<i64>,
    ) -> Result<(), EtcdError> {
        let mut session = tokio::select! {
            s = self.open(stale_lease) => s?,
            () = resign_requested(shutdown) => return Ok(()),
        };
        *stale_lease = Some(session.lease);
        let ended = self.elect(&mut session, shutdown).await;
        if ended.is_ok() {
            let revoke = session.client.lease_revoke(session.lease);
            match self.request("lease revoke", revoke).await {
                Ok(_) => *stale_lease = None,
                Err(error) => {
                    warn!(vip = %self.vip, %error, "etcd election: revoking the lease failed; it will expire");
                }
            }
        }
        ended
    }

    /// A new client, the previous session's lease revoked if possible, a fresh lease
    /// with its keepalive task, and a watch on the key.
    async fn open(&self, stale_lease: &mut Option<i64>) -> Result<Session, EtcdError> {
        let config = &self.config;
        let mut client = self
            .request(
                "connect",
                Box::pin(Client::connect(
                    &config.settings.endpoints,
                    Some(config.options.clone()),
                )),
            )
            .await?;
        if let Some(old) = *stale_lease {
            match self
                .request("revoke old lease", client.lease_revoke(old))
                .await
            {
                Ok(_) => {
                    debug!(vip = %self.vip, lease = old, "etcd election: revoked the previous session's lease");
                }
                Err(error) => {
                    debug!(vip = %self.vip, %error, "etcd election: previous lease not revoked");
                }
            }
            *stale_lease = None;
        }
        let sent = Instant::now();
        let grant = self
            .request("lease grant", client.lease_grant(config.ttl_secs(), None))
            .await?;
        let lease = grant.id();
        let granted = positive_secs(grant.ttl()).ok_or_else(|| {
            self.session_error(format!("lease grant answered TTL {}", grant.ttl()))
        })?;
        *stale_lease = Some(lease);
        let mut floor = sent + granted;
        let sent = Instant::now();
        let (keeper, stream) = self
            .request("lease keepalive", client.lease_keep_alive(lease))
            .await?;
        floor = floor.max(sent + granted);
        let (floor_tx, floor_rx) = watch::channel(floor);
        let keepalive = tokio::spawn(keep_alive(
            keeper,
            stream,
            config.keepalive_every,
            floor_tx,
            config.endpoints.clone(),
        ));
        let mut session = Session {
            client,
            lease,
            ttl: granted,
            floor: floor_rx,
            keepalive: AbortOnDrop(keepalive),
            watch: None,
        };
        let until = Instant::now() + config.request_timeout;
        session.watch = Some(self.open_watch(&mut session.client, until).await?);
        debug!(vip = %self.vip, lease, ttl = ?granted, "etcd election: session open");
        Ok(session)
    }

    /// A watch on the key, once etcd has confirmed it (so later changes are seen).
    async fn open_watch(
        &self,
        client: &mut Client,
        until: Instant,
    ) -> Result<WatchStream, EtcdError> {
        let mut stream = self
            .request_until("watch", until, client.watch(self.key.as_str(), None))
            .await?;
        let created = self.request_until("watch", until, stream.message()).await?;
        match created {
            Some(resp) if resp.created() && !resp.canceled() => Ok(stream),
            Some(resp) => Err(self.session_error(format!(
                "watch on {} not created: {}",
                self.key,
                resp.cancel_reason()
            ))),
            None => Err(self.session_error("watch stream closed at once".into())),
        }
    }

    /// The election proper, on an open session: `Ok` once resigned.
    async fn elect(
        &mut self,
        s: &mut Session,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), EtcdError> {
        let guard = self.config.guard;
        let mut campaign = true;
        let mut retry_at = self.next_retry();
        loop {
            if campaign && !self.owned {
                campaign = false;
                self.campaign(s).await?;
            }
            let release_at = release_at(*s.floor.borrow(), guard);
            tokio::select! {
                biased;
                () = resign_requested(shutdown) => {
                    self.release("candidate", "resigned".into()).await;
                    return Ok(());
                }
                () = sleep_until(release_at) => {
                    let floor = *s.floor.borrow();
                    let since = floor.checked_sub(s.ttl).map_or(s.ttl, |sent| sent.elapsed());
                    let error = self.session_error(format!(
                        "no keepalive answered for {since:?}; giving the VIP up {guard:?} before the lease may expire"
                    ));
                    return Err(self.cut_off(error).await);
                }
                joined = &mut s.keepalive.0 => {
                    let error = joined.unwrap_or_else(|e| self.session_error(format!("keepalive task: {e}")));
                    return Err(self.cut_off(error).await);
                }
                changed = s.floor.changed() => {
                    if changed.is_err() {
                        let joined = (&mut s.keepalive.0).await;
                        let error = joined.unwrap_or_else(|e| self.session_error(format!("keepalive task: {e}")));
                        return Err(self.cut_off(error).await);
                    }
                }
                msg = next_watch(&mut s.watch) => {
                    campaign |= self.on_watch(s, msg).await;
                }
                () = sleep_until(retry_at) => {
                    retry_at = self.next_retry();
                    if self.owned {
                        campaign |= self.verify(s, release_at).await;
                    } else {
                        campaign = true;
                        if s.watch.is_none() {
                            s.watch = self.reopen_watch(s, Instant::now() + self.config.request_timeout).await;
                        }
                    }
                }
            }
        }
    }

    /// The transaction: create the key with our lease if it does not exist.
    async fn campaign(&mut self, s: &mut Session) -> Result<(), EtcdError> {
        let key = self.key.as_str();
        let node = self.config.settings.node.as_str();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                node,
                Some(PutOptions::new().with_lease(s.lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.request("campaign", s.client.txn(txn)).await?;
        let reason = if resp.succeeded() {
            format!("lease acquired: created {key} with lease {:x}", s.lease)
        } else {
            let holder = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.lease())),
                _ => None,
            });
            match holder {
                Some((value, lease)) if value == node.as_bytes() && lease == s.lease => {
                    format!("lease acquired: {key} already holds this node with lease {lease:x}")
                }
                Some((value, _)) => {
                    let holder = String::from_utf8_lossy(&value).into_owned();
                    if self.state.borrow().state != "candidate"
                        || self.state.borrow().reason != format!("held by {holder}")
                    {
                        self.set_state("candidate", format!("held by {holder}"));
                    }
                    return Ok(());
                }
                // Deleted between the compare and the read: campaign again soon.
                None => {
                    self.set_state("candidate", format!("{key} vanished during the campaign"));
                    return Ok(());
                }
            }
        };
        let release_at = release_at(*s.floor.borrow(), self.config.guard);
        if Instant::now() >= release_at {
            let error = self.session_error(
                "campaign won past the release deadline; not claiming the VIP".into(),
            );
            return Err(self.cut_off(error).await);
        }
        self.acquire(reason, release_at).await
    }

    /// A watch message. Returns whether to campaign.
    async fn on_watch(
        &mut self,
        s: &mut Session,
        msg: Option<Result<WatchResponse, etcd_client::Error>>,
    ) -> bool {
        let resp = match msg {
            Some(Ok(resp)) if !resp.canceled() => resp,
            Some(Ok(resp)) => {
                warn!(vip = %self.vip, reason = resp.cancel_reason(), "etcd election: watch canceled; reopening at the next retry");
                s.watch = None;
                return false;
            }
            Some(Err(error)) => {
                warn!(vip = %self.vip, %error, "etcd election: watch failed; reopening at the next retry");
                s.watch = None;
                return false;
            }
            None => {
                warn!(vip = %self.vip, "etcd election: watch closed; reopening at the next retry");
                s.watch = None;
                return false;
            }
        };
        let config = self.config.clone();
        let node = config.settings.node.as_bytes();
        let mut campaign = false;
        for event in resp.events() {
            match event.event_type() {
                EventType::Delete => {
                    if self.owned {
                        self.release("candidate", format!("{} deleted under this node", self.key))
                            .await;
                    }
                    campaign = true;
                }
                EventType::Put => {
                    let ours = event
                        .kv()
                        .is_some_and(|kv| kv.value() == node && kv.lease() == s.lease);
                    if self.owned && !ours {
                        self.release(
                            "candidate",
                            format!("{} rewritten under this node", self.key),
                        )
                        .await;
                    }
                }
            }
        }
        campaign
    }

    /// As owner at a retry: make sure a watch is open and the key is still ours, each
    /// step bounded by the release deadline. Returns whether to campaign.
    async fn verify(&mut self, s: &mut Session, release_at: Instant) -> bool {
        let until = release_at.min(Instant::now() + self.config.request_timeout);
        if s.watch.is_none() {
            s.watch = self.reopen_watch(s, until).await;
        }
        match self
            .request_until("check key", until, s.client.get(self.key.as_str(), None))
            .await
        {
            Ok(resp) => {
                let node = self.config.settings.node.as_bytes();
                let ours = resp
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.value() == node && kv.lease() == s.lease);
                if !ours {
                    self.release(
                        "candidate",
                        format!("{} no longer holds this node's lease", self.key),
                    )
                    .await;
                    return true;
                }
                false
            }
            Err(error) => {
                debug!(vip = %self.vip, %error, "etcd election: owner check failed");
                false
            }
        }
    }

    async fn reopen_watch(&self, s: &mut Session, until: Instant) -> Option<WatchStream> {
        match self.open_watch(&mut s.client, until).await {
            Ok(watch) => Some(watch),
            Err(error) => {
                debug!(vip = %self.vip, %error, "etcd election: reopening the watch failed");
                None
            }
        }
    }

    fn next_retry(&self) -> Instant {
        Instant::now() + self.config.ttl.mul_f64(0.8 + 0.4 * fastrand::f64())
    }

    /// Reports the VIP owned, unless the event cannot be handed over before the
    /// release deadline.
    async fn acquire(&mut self, reason: String, release_at: Instant) -> Result<(), EtcdError> {
        let event = Ownership {
            vip: self.vip,
            owned: true,
            reason: reason.clone(),
        };
        match timeout_at(release_at, self.events.send(event)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                debug!(vip = %self.vip, "etcd election: nobody listens to ownership events");
            }
            Err(_) => {
                let error = self.session_error(
                    "the daemon did not take the ownership event before the release deadline"
                        .into(),
                );
                return Err(self.cut_off(error).await);
            }
        }
        self.owned = true;
        self.transitions += 1;
        self.set_state("owner", reason.clone());
        info!(vip = %self.vip, node = %self.config.settings.node, %reason, "etcd election: VIP owned");
        Ok(())
    }

    /// Gives the VIP up if owned: state first, then the event.
    async fn release(&mut self, state: &str, reason: String) {
        if !self.owned {
            self.set_state(state, reason);
            return;
        }
        self.owned = false;
        self.transitions += 1;
        self.set_state(state, reason.clone());
        warn!(vip = %self.vip, node = %self.config.settings.node, %reason, "etcd election: VIP released");
        let event = Ownership {
            vip: self.vip,
            owned: false,
            reason,
        };
        if self.events.send(event).await.is_err() {
            debug!(vip = %self.vip, "etcd election: nobody listens to ownership events");
        }
    }

    /// The session failed: release as "cut off" and hand the error back.
    async fn cut_off(&mut self, error: EtcdError) -> EtcdError {
        self.release("cut off", format!("cut off: {error}")).await;
        error
    }

    fn set_state(&self, state: &str, reason: String) {
        let owned = self.owned;
        let transitions = self.transitions;
        self.state.send_modify(|s| {
            state.clone_into(&mut s.state);
            s.owned = owned;
            s.transitions = transitions;
            s.reason = reason;
        });
    }

    fn session_error(&self, what: String) -> EtcdError {
        EtcdError::Session {
            endpoints: self.config.endpoints.clone(),
            what,
        }
    }

    async fn request<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        self.request_until(op, Instant::now() + self.config.request_timeout, fut)
            .await
    }

    async fn request_until<T>(
        &self,
        op: &'static str,
        until: Instant,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        let started = Instant::now();
        match timeout_at(until, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(EtcdError::Request {
                endpoints: self.config.endpoints.clone(),
                op,
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.config.endpoints.clone(),
                op,
                after: started.elapsed(),
            }),
        }
    }
}

/// When an owner gives the VIP up: `guard` before the lease's earliest expiry.
fn release_at(floor: Instant, guard: Duration) -> Instant {
    floor.checked_sub(guard).unwrap_or_else(Instant::now)
}

fn positive_secs(ttl: i64) -> Option<Duration> {
    u64::try_from(ttl)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// The next watch message, or never without a watch.
async fn next_watch(
    watch: &mut Option<WatchStream>,
) -> Option<Result<WatchResponse, etcd_client::Error>> {
    match watch {
        Some(stream) => stream.message().await.transpose(),
        None => std::future::pending().await,
    }
}

/// Renews the lease every `every` and raises `floor` to (send instant + TTL) at each
/// positive answer. etcd answers each request once and in order on the stream, so
/// answers pair with send instants first in, first out. Returns why it stopped.
async fn keep_alive(
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    every: Duration,
    floor: watch::Sender<Instant>,
    endpoints: String,
) -> EtcdError {
    let lease = keeper.id();
    let mut sent = VecDeque::new();
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let request_error = |source| EtcdError::Request {
        endpoints: endpoints.clone(),
        op: "lease keepalive",
        source,
    };
    let session_error = |what: String| EtcdError::Session {
        endpoints: endpoints.clone(),
        what,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sent.push_back(Instant::now());
                match tokio::time::timeout(every, keeper.keep_alive()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(source)) => return request_error(source),
                    Err(_) => return EtcdError::Timeout { endpoints: endpoints.clone(), op: "lease keepalive send", after: every },
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    let Some(at) = sent.pop_front() else { continue };
                    let Some(ttl) = positive_secs(resp.ttl()) else {
                        return session_error(format!("lease {lease:x} expired on the server"));
                    };
                    floor.send_if_modified(|f| {
                        let raised = at + ttl > *f;
                        if raised {
                            *f = at + ttl;
                        }
                        raised
                    });
                }
                Ok(None) => return session_error("keepalive stream closed by the server".into()),
                Err(source) => return request_error(source),
            }
        }
    }
}
