//! One connection to etcd for one VIP: a client, a lease renewed by a keepalive task
//! of its own, and a watch on the VIP's key.
//!
//! The keepalive task keeps the session's `floor`, the instant before which the lease
//! cannot expire on the server, reopening its stream on the same lease when it
//! breaks; [`release_at`] derives from the floor the owner's release deadline: the
//! two halves of the safety argument in [`super`] that live in code.

use std::{collections::VecDeque, net::IpAddr, time::Duration};

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, WatchStream};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use super::{EtcdError, connect::Config};

/// One connection to etcd with one lease.
pub(super) struct Session {
    pub(super) client: Client,
    pub(super) lease: i64,
    /// The TTL etcd granted.
    pub(super) ttl: Duration,
    /// The lease cannot expire on the server before this instant (the safety argument
    /// in [`super`]).
    pub(super) floor: watch::Receiver<Instant>,
    pub(super) keepalive: AbortOnDrop,
    pub(super) watch: Option<WatchStream>,
}

impl Session {
    /// A new client, the previous session's lease revoked if possible, a fresh lease
    /// with its keepalive task, and a watch on `key`.
    pub(super) async fn open(
        config: &Config,
        vip: IpAddr,
        key: &str,
        stale_lease: &mut Option<i64>,
    ) -> Result<Self, EtcdError> {
        let mut client = config
            .request(
                "connect",
                Box::pin(Client::connect(
                    &config.settings.endpoints,
                    Some(config.options.clone()),
                )),
            )
            .await?;
        if let Some(old) = *stale_lease {
            match config
                .request("revoke old lease", client.lease_revoke(old))
                .await
            {
                Ok(_) => {
                    debug!(%vip, lease = old, "etcd election: revoked the previous session's lease");
                }
                Err(error) => {
                    debug!(%vip, %error, "etcd election: previous lease not revoked");
                }
            }
            *stale_lease = None;
        }
        let sent = Instant::now();
        let grant = config
            .request("lease grant", client.lease_grant(config.ttl_secs(), None))
            .await?;
        let lease = grant.id();
        let granted = positive_secs(grant.ttl()).ok_or_else(|| {
            config.session_error(format!("lease grant answered TTL {}", grant.ttl()))
        })?;
        *stale_lease = Some(lease);
        let mut floor = sent + granted;
        let sent = Instant::now();
        let (keeper, stream) = config
            .request("lease keepalive", client.lease_keep_alive(lease))
            .await?;
        floor = floor.max(sent + granted);
        let (floor_tx, floor_rx) = watch::channel(floor);
        let keepalive = tokio::spawn(keep_alive(
            client.clone(),
            (keeper, stream),
            granted,
            config.keepalive_every,
            floor_tx,
            config.endpoints.clone(),
        ));
        let mut session = Self {
            client,
            lease,
            ttl: granted,
            floor: floor_rx,
            keepalive: AbortOnDrop(keepalive),
            watch: None,
        };
        let until = Instant::now() + config.request_timeout;
        session.watch = Some(open_watch(config, key, &mut session.client, until).await?);
        debug!(%vip, lease, ttl = ?granted, "etcd election: session open");
        Ok(session)
    }
}

/// A watch on `key`, once etcd has confirmed it (so later changes are seen).
pub(super) async fn open_watch(
    config: &Config,
    key: &str,
    client: &mut Client,
    until: Instant,
) -> Result<WatchStream, EtcdError> {
    let mut stream = config
        .request_until("watch", until, client.watch(key, None))
        .await?;
    let created = config
        .request_until("watch", until, stream.message())
        .await?;
    match created {
        Some(resp) if resp.created() && !resp.canceled() => Ok(stream),
        Some(resp) => Err(config.session_error(format!(
            "watch on {key} not created: {}",
            resp.cancel_reason()
        ))),
        None => Err(config.session_error("watch stream closed at once".into())),
    }
}

/// Aborts the keepalive task when the session ends, however it ends.
pub(super) struct AbortOnDrop(pub(super) JoinHandle<EtcdError>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When an owner gives the VIP up: `guard` before the lease's earliest expiry.
pub(super) fn release_at(floor: Instant, guard: Duration) -> Instant {
    floor.checked_sub(guard).unwrap_or_else(Instant::now)
}

fn positive_secs(ttl: i64) -> Option<Duration> {
    u64::try_from(ttl)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// Keeps the lease alive: renews it every `every` and raises `floor` to (send
/// instant + TTL) at each positive answer. etcd answers each request once and in
/// order on the stream, so answers pair with send instants first in, first out.
///
/// A broken stream (the member restarted, a connection dropped, a request timed
/// out) is reopened on the same lease, with backoff, because the lease outlives
/// it on the server: the owner keeps the VIP meanwhile, and gives it up only at
/// its release deadline if no renewal comes by then. Only etcd saying the lease
/// is gone ends the task, with why.
async fn keep_alive(
    mut client: Client,
    opened: (LeaseKeeper, LeaseKeepAliveStream),
    granted: Duration,
    every: Duration,
    floor: watch::Sender<Instant>,
    endpoints: String,
) -> EtcdError {
    let lease = opened.0.id();
    let (mut keeper, mut stream) = opened;
    let mut backoff = Duration::from_millis(100);
    loop {
        match renew(keeper, stream, every, &floor, &endpoints).await {
            Renewal::Expired(error) => return error,
            Renewal::Broken(error) => {
                warn!(lease = format!("{lease:x}"), %error, "etcd lease keepalive broke; reopening it on the same lease (the VIP stays while the lease is provably valid)");
            }
        }
        (keeper, stream) = loop {
            let sent = Instant::now();
            match tokio::time::timeout(every, client.lease_keep_alive(lease)).await {
                Ok(Ok(open)) => {
                    raise(&floor, sent + granted);
                    info!(
                        lease = format!("{lease:x}"),
                        "etcd lease keepalive reopened"
                    );
                    backoff = Duration::from_millis(100);
                    break open;
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(why)))
                    if why == "lease not found" =>
                {
                    return EtcdError::Session {
                        endpoints,
                        what: format!("lease {lease:x} expired on the server"),
                    };
                }
                Ok(Err(error)) => {
                    debug!(lease = format!("{lease:x}"), %error, "etcd lease keepalive: reopening failed; retrying");
                }
                Err(_) => {
                    debug!(
                        lease = format!("{lease:x}"),
                        "etcd lease keepalive: reopening got no answer; retrying"
                    );
                }
            }
            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
            backoff = (backoff * 2).min(every);
        };
    }
}

/// Why [`renew`] stopped.
enum Renewal {
    /// etcd says the lease is gone.
    Expired(EtcdError),
    /// The stream broke; the lease may well be alive.
    Broken(EtcdError),
}

/// Raises `floor` to `to`, if later.
fn raise(floor: &watch::Sender<Instant>, to: Instant) {
    floor.send_if_modified(|f| {
        let raised = to > *f;
        if raised {
            *f = to;
        }
        raised
    });
}

/// Renews the lease on one stream until it breaks or etcd says the lease is gone.
async fn renew(
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    every: Duration,
    floor: &watch::Sender<Instant>,
    endpoints: &str,
) -> Renewal {
    let lease = keeper.id();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let request_error = |source| EtcdError::Request {
        endpoints: endpoints.to_owned(),
        op: "lease keepalive",
        source,
    };
    let session_error = |what: String| EtcdError::Session {
        endpoints: endpoints.to_owned(),
        what,
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A renewal unanswered for a whole period: this member cannot renew
                // (it lost its leader, or the connection is half dead); another may.
                if let Some(oldest) = sent.front().filter(|t| t.elapsed() >= every) {
                    return Renewal::Broken(session_error(format!("a keepalive unanswered for {:?}", oldest.elapsed())));
                }
                sent.push_back(Instant::now());
                match tokio::time::timeout(every, keeper.keep_alive()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(source)) => return Renewal::Broken(request_error(source)),
                    Err(_) => return Renewal::Broken(EtcdError::Timeout { endpoints: endpoints.to_owned(), op: "lease keepalive send", after: every }),
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    let Some(at) = sent.pop_front() else { continue };
                    let Some(ttl) = positive_secs(resp.ttl()) else {
                        return Renewal::Expired(session_error(format!("lease {lease:x} expired on the server")));
                    };
                    raise(floor, at + ttl);
                }
                Ok(None) => return Renewal::Broken(session_error("keepalive stream closed by the server".into())),
                Err(source) => return Renewal::Broken(request_error(source)),
            }
        }
    }
}
