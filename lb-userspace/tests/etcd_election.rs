//! The etcd election (`lb_userspace::election::etcd`) against a real etcd: each test
//! starts `/usr/bin/etcd` on loopback with free ports and a fresh data directory, and
//! removes both when it ends, panics included. Node a's connection goes through a
//! small TCP proxy where a test needs to cut it.
//!
//! Run with `-- --nocapture` to see the measured times, and with
//! `RUST_LOG=lb_userspace=debug` as well to see the elections' logs.

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, GetOptions};
use lb_userspace::election::{
    Departed, ElectionState, Ownership,
    etcd::{EtcdElection, EtcdSettings, EtcdTls, spawn},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{sleep, timeout},
};

const ETCD: &str = "/usr/bin/etcd";
const TTL: Duration = Duration::from_secs(2);
const PREFIX: &str = "/apilb/";

/// A single-member etcd on 127.0.0.1, killed and its directory removed on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Etcd {
    async fn start() -> Self {
        // A port picked free may be taken by a parallel test before etcd binds it: then
        // etcd exits at once and another pair is tried.
        for _ in 0..3 {
            let mut etcd = Self::spawn();
            if etcd.wait_ready().await {
                return etcd;
            }
        }
        panic!("etcd did not start in 3 attempts");
    }

    fn spawn() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "apilb-etcd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd test directory");
        let (client_port, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = File::create(dir.join("etcd.log")).expect("create etcd.log");
        let child = Command::new(ETCD)
            // Debian's etcd 3.4 refuses to start when this is set to anything but the
            // running architecture; the tests never need it.
            .env_remove("ETCD_UNSUPPORTED_ARCH")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone etcd.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {ETCD}: {e}"));
        Self { child, dir, url }
    }

    /// Waits (at most 15 s) until etcd answers a read; false if it exited.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("etcd exited ({status}):\n{}", self.log_tail());
                return false;
            }
            let url = self.url.clone();
            let probe = async move {
                let mut client = Client::connect([url], None).await.ok()?;
                client.get("probe", None).await.ok()
            };
            if let Ok(Some(_)) = timeout(Duration::from_secs(1), probe).await {
                return true;
            }
            sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not serve within 15 s:\n{}", self.log_tail());
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut log) = File::open(self.dir.join("etcd.log")) {
            let len = log.metadata().map_or(0, |m| m.len());
            let _ = log.seek(SeekFrom::Start(len.saturating_sub(3000)));
            let _ = log.read_to_string(&mut text);
        }
        text
    }

    async fn client(&self) -> Client {
        timeout(
            Duration::from_secs(5),
            Client::connect([self.url.as_str()], None),
        )
        .await
        .expect("connect to etcd in time")
        .expect("connect to etcd")
    }

    /// The key's value and lease, if it exists.
    async fn key(&self, key: &str) -> Option<(String, i64)> {
        let mut client = self.client().await;
        let resp = timeout(Duration::from_secs(5), client.get(key, None))
            .await
            .expect("get in time")
            .expect("get");
        resp.kvs()
            .first()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("etcd log tail:\n{}", self.log_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The elections' logs, if `RUST_LOG` asks for them.
fn logs() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A TCP proxy on loopback towards `upstream` that a test can cut (close every
/// connection, refuse new ones) or freeze (keep connections open, forward nothing).
struct Proxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    frozen: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (frozen, frozen_rx) = watch::channel(false);
        let accept = tokio::spawn({
            let conns = conns.clone();
            async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    let mut frozen = frozen_rx.clone();
                    let conn = tokio::spawn(async move {
                        // Frozen first, and checked before any byte is copied: a
                        // connection opened after the freeze must not get a request
                        // through in its first poll.
                        let hold = async { drop(frozen.wait_for(|f| *f).await) };
                        tokio::select! {
                            biased;
                            () = hold => {}
                            () = async {
                                if let Ok(mut up) = TcpStream::connect(upstream).await {
                                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                                }
                            } => return,
                        }
                        // Hold the client's socket open and forward nothing.
                        std::future::pending::<()>().await;
                    });
                    conns.lock().expect("proxy connections").push(conn);
                }
            }
        });
        Self {
            addr,
            accept,
            conns,
            frozen,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection and stops accepting (new ones are refused).
    fn cut(&self) {
        self.accept.abort();
        for conn in self.conns.lock().expect("proxy connections").drain(..) {
            conn.abort();
        }
    }

    /// Packets stop flowing both ways; connections stay open, new ones are accepted
    /// and held.
    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn settings(endpoint: &str, node: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: vec![endpoint.to_owned()],
        prefix: PREFIX.to_owned(),
        lease_ttl: TTL,
        node: node.to_owned(),
        tls: None,
        dial_timeout: Duration::from_secs(1),
    }
}

fn vip(s: &str) -> IpAddr {
    s.parse().expect("VIP")
}

fn key_of(vip: IpAddr) -> String {
    format!("{PREFIX}vip/{vip}")
}

/// One LB node's election and the events it sent to its (absent) daemon.
struct Node {
    election: Option<EtcdElection>,
    events: mpsc::Receiver<Ownership>,
}

impl Node {
    fn start(endpoint: &str, name: &str, vips: &[IpAddr]) -> Self {
        Self::with_sync(endpoint, name, vips, None)
    }

    /// With flow sync's word on departed peers coming from `departed`.
    fn with_sync(
        endpoint: &str,
        name: &str,
        vips: &[IpAddr],
        departed: Option<watch::Receiver<Departed>>,
    ) -> Self {
        let (tx, events) = mpsc::channel(64);
        let election =
            spawn(settings(endpoint, name), vips, tx, departed).expect("spawn the election");
        Self {
            election: Some(election),
            events,
        }
    }

    fn state(&self, vip: IpAddr) -> ElectionState {
        self.election
            .as_ref()
            .expect("election running")
            .states()
            .into_iter()
            .find(|(v, _)| *v == vip)
            .expect("VIP in the election")
            .1
    }

    fn owned(&self, vip: IpAddr) -> bool {
        self.state(vip).owned
    }

    async fn resign(&mut self) {
        let election = self.election.take().expect("election running");
        timeout(Duration::from_secs(5), election.resign())
            .await
            .expect("resign in time");
    }

    fn kill(&mut self) {
        drop(self.election.take());
    }

    /// Assert that this node reported exactly one gain, then one release, and
    /// print the release's reason.
    fn gained_then_released(&mut self, what: &str) {
        let events = self.drain_events();
        assert_eq!(
            events.iter().map(|e| e.owned).collect::<Vec<_>>(),
            [true, false],
            "{events:?}"
        );
        eprintln!("{what}: the owner's release reason: {}", events[1].reason);
    }

    fn drain_events(&mut self) -> Vec<Ownership> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            out.push(event);
        }
        out
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `limit`. Returns the time
/// it took.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?} ({:?} so far)",
            start.elapsed()
        );
        sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_node_owns_the_vip() {
    logs();
    let etcd = Etcd::start().await;
    let v = vip("10.0.0.10");
    let a = Node::start(&etcd.url, "a", &[v]);
    let b = Node::start(&etcd.url, "b", &[v]);

    let took = wait_until("one owner", Duration::from_secs(5), || {
        a.owned(v) || b.owned(v)
    })
    .await;
    let (owner, other, owner_name) = if a.owned(v) {
        (&a, &b, "a")
    } else {
        (&b, &a, "b")
    };
    wait_until("the other is a candidate", Duration::from_secs(5), || {
        other.state(v).state == "candidate"
    })
    .await;
    eprintln!("exactly_one: {owner_name} owns {v} after {took:?}");

    // Stable for a while: keepalives keep the owner, the other never claims.
    let hold = Instant::now();
    while hold.elapsed() < TTL + Duration::from_secs(1) {
        assert!(owner.owned(v), "the owner kept the VIP");
        assert!(!other.owned(v), "never two owners");
        sleep(Duration::from_millis(20)).await;
    }
    let state = owner.state(v);
    assert_eq!(
        (state.mode.as_str(), state.state.as_str(), state.transitions),
        ("etcd", "owner", 1)
    );
    let other_state = other.state(v);
    assert_eq!(other_state.state, "candidate");
    assert!(!other_state.owned);
    assert_eq!(other_state.transitions, 0);
    let (value, lease) = etcd.key(&key_of(v)).await.expect("the key exists");
    assert_eq!(value, owner_name);
    assert_ne!(lease, 0, "the key is attached to a lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_hands_over_when_its_lease_expires() {
    logs();
    let etcd = Etcd::start().await;
    let v = vip("10.0.0.10");
    let mut a = Node::start(&etcd.url, "a", &[v]);
    wait_until("a owns", Duration::from_secs(5), || a.owned(v)).await;
    let b = Node::start(&etcd.url, "b", &[v]);
    wait_until("b is a candidate", Duration::from_secs(5), || {
        b.state(v).state == "candidate" && b.state(v).reason.contains("held by a")
    })
    .await;

    // As on SIGKILL: the tasks stop, nothing is revoked.
    a.kill();
    let took = wait_until("b owns after a died", TTL + Duration::from_secs(3), || {
        b.owned(v)
    })
    .await;
    eprintln!("killed owner: b owns {v} {took:?} after a was killed (lease TTL {TTL:?})");
    assert!(
        took <= TTL + Duration::from_secs(2),
        "takeover took {took:?}"
    );
    assert_eq!(etcd.key(&key_of(v)).await.expect("key").0, "b");
}

/// Flow sync saw the owner's sessions closed by its kernel: the candidate
/// revokes the owner's lease and takes over at once, not at the lease's expiry;
/// word of a node that does not hold the key revokes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_whose_sync_sessions_closed_hands_over_at_once() {
    logs();
    let etcd = Etcd::start().await;
    let v = vip("10.0.0.10");
    let mut a = Node::start(&etcd.url, "a", &[v]);
    wait_until("a owns", Duration::from_secs(5), || a.owned(v)).await;
    let (departed, departed_rx) = watch::channel(Departed::default());
    let b = Node::with_sync(&etcd.url, "b", &[v], Some(departed_rx));
    wait_until("b is a candidate", Duration::from_secs(5), || {
        b.state(v).state == "candidate" && b.state(v).reason.contains("held by a")
    })
    .await;
    // Another peer gone: the key is a's, so nothing moves.
    departed.send_modify(|d| {
        d.seq += 1;
        "c".clone_into(&mut d.name);
        d.at = Some(std::time::Instant::now());
    });
    sleep(Duration::from_millis(500)).await;
    assert!(
        a.owned(v) && !b.owned(v),
        "word of another peer moved the VIP"
    );

    a.kill();
    let start = Instant::now();
    departed.send_modify(|d| {
        d.seq += 1;
        "a".clone_into(&mut d.name);
        d.at = Some(std::time::Instant::now());
    });
    let took = wait_until(
        "b owns after a's sync sessions closed",
        Duration::from_secs(1),
        || b.owned(v),
    )
    .await;
    eprintln!("departed owner: b owns {v} {took:?} after word that a is gone (lease TTL {TTL:?})");
    assert!(start.elapsed() < Duration::from_secs(1), "took {took:?}");
    assert_eq!(etcd.key(&key_of(v)).await.expect("key").0, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_over_at_once() {
    logs();
    let etcd = Etcd::start().await;
    let v = vip("10.0.0.10");
    let mut a = Node::start(&etcd.url, "a", &[v]);
    wait_until("a owns", Duration::from_secs(5), || a.owned(v)).await;
    let b = Node::start(&etcd.url, "b", &[v]);
    wait_until("b is a candidate", Duration::from_secs(5), || {
        b.state(v).state == "candidate"
    })
    .await;

    let start = Instant::now();
    a.resign().await;
    let resigned = start.elapsed();
    let events = a.drain_events();
    assert_eq!(
        events.last().map(|e| (e.owned, e.reason.as_str())),
        Some((false, "resigned")),
        "a reported the VIP given up: {events:?}"
    );
    wait_until("b owns after a resigned", Duration::from_secs(1), || {
        b.owned(v)
    })
    .await;
    let took = start.elapsed();
    eprintln!(
        "resign: resign() returned after {resigned:?}; b owns {v} {took:?} after it was called"
    );
    assert!(took < Duration::from_secs(1), "takeover took {took:?}");
}

/// Samples both nodes every 20 ms after `disrupt`, until b owns the VIP: never both
/// at once, a gives up, b takes over. Returns (a's release, b's takeover) times.
async fn handover_after(
    a: &Node,
    b: &Node,
    v: IpAddr,
    disrupt: impl FnOnce(),
) -> (Duration, Duration) {
    let start = Instant::now();
    disrupt();
    let (mut released, mut taken) = (None, None);
    let limit = TTL + Duration::from_secs(5);
    while released.is_none() || taken.is_none() {
        assert!(start.elapsed() < limit, "no handover within {limit:?}");
        let (a_owned, b_owned) = (a.owned(v), b.owned(v));
        let at = start.elapsed();
        assert!(!(a_owned && b_owned), "both own {v} {at:?} after the cut");
        if !a_owned && released.is_none() {
            released = Some(at);
        }
        if b_owned && taken.is_none() {
            taken = Some(at);
        }
        sleep(Duration::from_millis(20)).await;
    }
    // And it stays that way for a while: a cannot reach etcd to campaign again.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(1) {
        assert!(!a.owned(v) && b.owned(v), "b keeps the VIP");
        sleep(Duration::from_millis(20)).await;
    }
    (released.expect("a released"), taken.expect("b took over"))
}

async fn a_behind_proxy_owns(etcd: &Etcd, v: IpAddr) -> (Proxy, Node, Node) {
    let upstream: SocketAddr = etcd
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    let proxy = Proxy::start(upstream).await;
    let a = Node::start(&proxy.url(), "a", &[v]);
    wait_until("a owns", Duration::from_secs(5), || a.owned(v)).await;
    let b = Node::start(&etcd.url, "b", &[v]);
    wait_until("b is a candidate", Duration::from_secs(5), || {
        b.state(v).state == "candidate"
    })
    .await;
    (proxy, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_owner_releases_before_the_other_takes_over() {
    logs();
    let etcd = Etcd::start().await;
    let v = vip("10.0.0.10");
    let (proxy, mut a, b) = a_behind_proxy_owns(&etcd, v).await;

    let (released, taken) = handover_after(&a, &b, v, || proxy.cut()).await;
    eprintln!(
        "cut (connections closed): a released {v} {released:?} after the cut, b took over {taken:?} after it"
    );
    assert!(released < taken);
    let state = a.state(v);
    assert_eq!((state.state.as_str(), state.owned), ("cut off", false));
    a.gained_then_released("cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_owner_releases_at_its_deadline_before_the_lease_expires() {
    logs();
    let etcd = Etcd::start().await;
    let v = vip("10.0.0.10");
    let (proxy, mut a, b) = a_behind_proxy_owns(&etcd, v).await;

    let (released, taken) = handover_after(&a, &b, v, || proxy.freeze()).await;
    eprintln!(
        "freeze (connections open, nothing forwarded): a released {v} {released:?} after the freeze, b took over {taken:?} after it"
    );
    assert!(released < taken);
    // No keepalive got through after the freeze, so a let go at most TTL - guard
    // (1.5 s) after it, before the lease (2 s) could expire; 400 ms of slack for
    // sampling on a loaded machine.
    assert!(
        released <= Duration::from_millis(1900),
        "released after {released:?}"
    );
    // The lease outlives a's release by the guard (500 ms), less 20 ms of sampling and
    // some slack; etcd's expiry check (every 500 ms) only adds to it.
    let gap = taken.saturating_sub(released);
    assert!(
        gap >= Duration::from_millis(400),
        "b took over {gap:?} after a let go"
    );
    assert_eq!(a.state(v).state, "cut off");
    a.gained_then_released("freeze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vips_have_their_own_keys_and_elections() {
    logs();
    let etcd = Etcd::start().await;
    let (v1, v2) = (vip("10.0.0.10"), vip("fd00::10"));
    // a runs for v1 only, b for both: a owns v1, b owns v2 and waits for v1.
    let mut a = Node::start(&etcd.url, "a", &[v1]);
    wait_until("a owns v1", Duration::from_secs(5), || a.owned(v1)).await;
    let b = Node::start(&etcd.url, "b", &[v1, v2]);
    wait_until("b owns v2", Duration::from_secs(5), || b.owned(v2)).await;
    wait_until("b is a candidate for v1", Duration::from_secs(5), || {
        b.state(v1).state == "candidate"
    })
    .await;
    assert!(!b.owned(v1));

    let mut client = etcd.client().await;
    let keys = client
        .get(
            format!("{PREFIX}vip/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("list keys");
    let mut listed: Vec<(String, String, i64)> = keys
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.lease(),
            )
        })
        .collect();
    listed.sort();
    eprintln!("two VIPs: keys {listed:?}");
    assert_eq!(
        listed
            .iter()
            .map(|(k, v, _)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        [(key_of(v1).as_str(), "a"), (key_of(v2).as_str(), "b")]
    );
    assert_ne!(listed[0].2, listed[1].2, "one lease per VIP");

    // v1 moves to b; v2's election is not disturbed.
    a.resign().await;
    wait_until("b owns v1", Duration::from_secs(1), || b.owned(v1)).await;
    let s2 = b.state(v2);
    assert!(s2.owned);
    assert_eq!(s2.transitions, 1, "v2 never changed hands");
    assert_eq!(b.state(v1).transitions, 1);
    let mut states = b.election.as_ref().expect("b runs").states();
    states.sort_by_key(|(v, _)| *v);
    assert_eq!(states.len(), 2);
    assert!(states.iter().all(|(_, s)| s.owned && s.state == "owner"));
}

/// The settings themselves are checked by `crate::config`; what `spawn` still
/// refuses is a TLS file it cannot load.
#[tokio::test]
async fn an_unreadable_tls_file_is_refused_naming_it() {
    let (tx, _rx) = mpsc::channel(1);
    let mut tls = settings("https://127.0.0.1:2379", "a");
    tls.tls = Some(EtcdTls {
        ca_file: "/nonexistent/etcd-ca.pem".into(),
        client_cert: None,
    });
    let err = spawn(tls, &[vip("10.0.0.10")], tx, None)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("/nonexistent/etcd-ca.pem"),
        "{err}"
    );
}
