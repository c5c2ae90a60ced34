//! One VIP's election, in a task of its own: it opens sessions, campaigns, follows the
//! key's watch, checks the key as owner, and gives the VIP up at the release deadline
//! of the safety argument in [`super`], which it alone enforces.

use std::{net::IpAddr, sync::Arc, time::Duration};

use etcd_client::{
    Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchResponse,
    WatchStream,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep, sleep_until, timeout_at},
};
use tracing::{debug, info, warn};

use super::{
    EtcdError,
    connect::Config,
    session::{Session, open_watch, release_at},
};
use crate::election::{Departed, ElectionState, Ownership, next_departure};

/// Starts the election task of `vip`; returns its state, for `/status`, and the task.
pub(super) fn start(
    vip: IpAddr,
    config: &Arc<Config>,
    events: mpsc::Sender<Ownership>,
    shutdown: watch::Receiver<bool>,
    departed: Option<watch::Receiver<Departed>>,
) -> (watch::Receiver<ElectionState>, JoinHandle<()>) {
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
        config: Arc::clone(config),
        events,
        state,
        owned: false,
        transitions: 0,
        departed,
    };
    (state_rx, tokio::spawn(task.run(shutdown)))
}

/// Resolves when [`super::EtcdElection::resign`] asks the tasks to stop; never when the
/// election is dropped (the tasks are aborted then).
async fn resign_requested(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One VIP's election: what it reports to the daemon and to `/status`.
struct VipTask {
    vip: IpAddr,
    key: String,
    config: Arc<Config>,
    events: mpsc::Sender<Ownership>,
    state: watch::Sender<ElectionState>,
    owned: bool,
    transitions: u64,
    /// Flow sync's word that a peer's apilb is gone; `None` without sync.
    departed: Option<watch::Receiver<Departed>>,
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
            s = Session::open(&self.config, self.vip, &self.key, stale_lease) => s?,
            () = resign_requested(shutdown) => return Ok(()),
        };
        *stale_lease = Some(session.lease);
        let ended = self.elect(&mut session, shutdown).await;
        if ended.is_ok() {
            let revoke = session.client.lease_revoke(session.lease);
            match self.config.request("lease revoke", revoke).await {
                Ok(_) => *stale_lease = None,
                Err(error) => {
                    warn!(vip = %self.vip, %error, "etcd election: revoking the lease failed; it will expire");
                }
            }
        }
        ended
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
                    let error = self.config.session_error(format!(
                        "no keepalive answered for {since:?}; giving the VIP up {guard:?} before the lease may expire"
                    ));
                    return Err(self.cut_off(error).await);
                }
                joined = &mut s.keepalive.0 => {
                    let error = joined.unwrap_or_else(|e| self.config.session_error(format!("keepalive task: {e}")));
                    return Err(self.cut_off(error).await);
                }
                changed = s.floor.changed() => {
                    if changed.is_err() {
                        let joined = (&mut s.keepalive.0).await;
                        let error = joined.unwrap_or_else(|e| self.config.session_error(format!("keepalive task: {e}")));
                        return Err(self.cut_off(error).await);
                    }
                }
                msg = next_watch(&mut s.watch) => {
                    campaign |= self.on_watch(s, msg).await;
                }
                gone = next_departure(&mut self.departed) => {
                    if !self.owned {
                        self.revoke_departed(s, &gone.name).await;
                    }
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
        let resp = self.config.request("campaign", s.client.txn(txn)).await?;
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
            let error = self.config.session_error(
                "campaign won past the release deadline; not claiming the VIP".into(),
            );
            return Err(self.cut_off(error).await);
        }
        self.acquire(reason, release_at).await
    }

    /// The peer `name`'s apilb is gone: if the key holds its name, revoke the
    /// lease it holds the key with (it can no longer be renewed), so that the key
    /// goes now rather than at the lease's expiry; the watch then says so.
    async fn revoke_departed(&mut self, s: &mut Session, name: &str) {
        let key = self.key.as_str();
        let held = match self
            .config
            .request("read key", s.client.get(key, None))
            .await
        {
            Ok(resp) => resp
                .kvs()
                .first()
                .filter(|kv| kv.value() == name.as_bytes() && kv.lease() != 0)
                .map(etcd_client::KeyValue::lease),
            Err(error) => {
                debug!(vip = %self.vip, %error, "etcd election: reading the key of a departed owner failed");
                None
            }
        };
        let Some(lease) = held else { return };
        info!(vip = %self.vip, owner = name, lease = format_args!("{lease:x}"), "etcd election: the owner's apilb is gone (flow sync); revoking its lease");
        if let Err(error) = self
            .config
            .request("revoke lease", s.client.lease_revoke(lease))
            .await
        {
            warn!(vip = %self.vip, %error, "etcd election: revoking the departed owner's lease failed; it will expire");
        }
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
            .config
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
        match open_watch(&self.config, &self.key, &mut s.client, until).await {
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
                let error = self.config.session_error(
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
