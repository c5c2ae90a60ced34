//! A live topology for tests that send real frames: client, LB and master namespaces
//! joined by veths, a TCP echo server on the master, and the balancer attached to
//! the LB's veths.
//!
//! Addresses (documentation ranges, only inside these namespaces, none with a
//! default route): client 192.0.2.10/24 on `c0`; LB 192.0.2.1/24 and the VIP
//! 192.0.2.100/32 on `l0`, 198.51.100.1/24 on `l1`; masters 198.51.100.11-13/24 on
//! `m0` (one namespace, three apiserver addresses).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use lb_userspace::{
    datapath::{Datapath, NodeConfig, Vip},
    loader::{AttachMode, LoadOptions},
};

use crate::{
    fixture::{chain, sa},
    netns::{self, Netns},
};

pub const VIP: &str = "192.0.2.100:6443";
pub const MASTER: &str = "198.51.100.11:6443";
/// The three masters' apiserver addresses.
pub const MASTERS: [&str; 3] = [
    "198.51.100.11:6443",
    "198.51.100.12:6443",
    "198.51.100.13:6443",
];
pub const SNAT: &str = "198.51.100.1";

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub master: Netns,
    /// A datapath with no VIPs on `c0` and `m0`, which passes every packet. A veth
    /// delivers `XDP_TX` and redirected frames only to a peer with NAPI on, which here
    /// means an XDP program of its own (switching GRO on, the other documented way,
    /// did not take on kernel 6.18).
    _peers: Datapath,
}

impl Topology {
    /// Create the namespaces, each prefixed with `prefix`.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let client = Netns::new(&format!("{prefix}-c"));
        let lb = Netns::new(&format!("{prefix}-l"));
        let master = Netns::new(&format!("{prefix}-m"));
        lb.ip(&[
            "link",
            "add",
            "l0",
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            client.name(),
        ]);
        lb.ip(&[
            "link",
            "add",
            "l1",
            "type",
            "veth",
            "peer",
            "name",
            "m0",
            "netns",
            master.name(),
        ]);
        for (ns, dev, addrs) in [
            (&client, "c0", &["192.0.2.10/24"][..]),
            (&lb, "l0", &["192.0.2.1/24", "192.0.2.100/32"][..]),
            (&lb, "l1", &["198.51.100.1/24"][..]),
            (
                &master,
                "m0",
                &["198.51.100.11/24", "198.51.100.12/24", "198.51.100.13/24"][..],
            ),
        ] {
            for a in addrs {
                ns.ip(&["addr", "add", a, "dev", dev]);
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
        lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        // Frames the endpoints send must carry full checksums, as frames off a wire
        // do, rather than veth's offloaded partial ones.
        for (ns, dev) in [(&client, "c0"), (&master, "m0")] {
            ns.exec("ethtool", &["-K", dev, "tx", "off"]);
        }
        let mut peers = Datapath::load(&LoadOptions {
            flow_table_size: 1024,
            pin_dir: None,
        })
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
        for (ns, dev) in [(&client, "c0"), (&master, "m0")] {
            let _inside = ns.enter();
            peers
                .attach(dev, AttachMode::Native, None)
                .unwrap_or_else(|e| panic!("{}", chain(&e)));
        }
        Self {
            client,
            lb,
            master,
            _peers: peers,
        }
    }

    /// Load the balancer (pinned under `pin_dir` if given), attach it to `l0` and
    /// `l1`, and provision VIP:6443 -> the master through the map writer.
    #[must_use]
    pub fn balancer(&self, pin_dir: Option<&Path>) -> Datapath {
        let mut dp = Datapath::load(&LoadOptions {
            flow_table_size: 4096,
            pin_dir: pin_dir.map(Path::to_owned),
        })
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
        {
            let _inside = self.lb.enter();
            for dev in ["l0", "l1"] {
                dp.attach(dev, AttachMode::Native, pin_dir)
                    .unwrap_or_else(|e| panic!("{}", chain(&e)));
            }
        }
        dp.set_node_config(&NodeConfig::new(
            Some(SNAT.parse().expect("v4")),
            None,
            40_000..=40_999,
        ))
        .expect("node config");
        dp.set_backend(1, sa(MASTER), false).expect("backend");
        dp.set_vip(&Vip {
            addr: sa(VIP),
            id: 0,
            ring_size: 251,
            owned: true,
        })
        .expect("vip");
        let ring: Vec<(u32, u32)> = (0..251).map(|slot| (slot, 1)).collect();
        dp.write_maglev(0, &ring).expect("ring");
        dp
    }

    /// Whether an XDP program is attached to the LB interface `dev`.
    #[must_use]
    pub fn lb_has_xdp(&self, dev: &str) -> bool {
        self.lb.ip(&["link", "show", "dev", dev]).contains(" xdp")
    }
}

/// `apilb run`'s config for this topology: instance `instance`, the LB's two
/// interfaces, the SNAT address, the VIP and the three masters, with `datapath`
/// lines added to `[datapath]` and `health` as the `[health]` section's body.
#[must_use]
pub fn apilb_config(instance: &str, datapath: &str, health: &str) -> String {
    let mut text = format!(
        "instance = \"{instance}\"\n[datapath]\ninterfaces = [\"l0\", \"l1\"]\nsnat_ipv4 = \"{SNAT}\"\n{datapath}\n\
         [[vip]]\naddress = \"192.0.2.100\"\n[health]\n{health}\n"
    );
    for m in MASTERS {
        text.push_str("[[backend]]\naddress = \"");
        text.push_str(m);
        text.push_str("\"\n");
    }
    text
}

/// One https request to the VIP from the client namespace, on a new connection
/// (`curl --cacert ca`): the master that answered (its `x-apiserver` header), or
/// `None` if the request failed.
#[must_use]
pub fn https_via_vip(client: &Netns, ca: &Path, path: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            client.name(),
            "curl",
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            "--cacert",
        ])
        .arg(ca)
        .arg(format!("https://{VIP}{path}"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    headers
        .lines()
        .find_map(|l| l.strip_prefix("x-apiserver: "))
        .map(|n| n.trim().to_owned())
}

/// A TCP server on a master address: for every line a client sends, it answers
/// `master <its address> saw <peer>`, until the client closes. It stops when told
/// to, or after `lifetime`; stopping closes its listener, so new connections are
/// refused, while connections already open keep being served.
pub struct EchoServer {
    /// Peer addresses of the connections accepted so far.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Serve on `addr` inside `master`'s namespace.
    #[must_use]
    pub fn start(master: &Netns, addr: &str, lifetime: Duration) -> Self {
        let name = master.name().to_owned();
        let addr = sa(addr);
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&peers), Arc::clone(&stop));
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = thread::spawn(move || {
            let _inside = netns::enter(&name);
            let listener = TcpListener::bind(addr).expect("bind the master's port");
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            ready_tx.send(()).expect("signal ready");
            let deadline = Instant::now() + lifetime;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        seen.lock().expect("lock").push(peer);
                        // Detached: a worker ends with its connection or the deadline.
                        thread::spawn(move || echo(conn, addr, peer, deadline));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("master listening");
        Self {
            peers,
            stop,
            handle: Some(handle),
        }
    }

    /// Close the listener (new connections are refused) and return the peers seen.
    pub fn stop(mut self) -> Vec<SocketAddr> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("server thread");
        }
        self.peers.lock().expect("lock").clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn echo(conn: TcpStream, local: SocketAddr, peer: SocketAddr, deadline: Instant) {
    conn.set_nonblocking(false).expect("blocking conn");
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writeln!(writer, "master {local} saw {peer}").is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A client connection to the VIP, made from inside the client namespace.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connect to the VIP from the client namespace (the calling thread returns to
    /// its own namespace afterwards; the socket stays in the client's).
    pub fn connect(client: &Netns) -> std::io::Result<Self> {
        let _inside = client.enter();
        let conn = TcpStream::connect_timeout(&sa(VIP), Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            reader: BufReader::new(conn.try_clone()?),
            writer: conn,
        })
    }

    /// Send a line and return the master's answer.
    pub fn ask(&mut self) -> std::io::Result<String> {
        self.writer.write_all(b"hello\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    /// Which master answered: the address in `master <addr> saw <peer>`.
    pub fn ask_master(&mut self) -> std::io::Result<String> {
        let answer = self.ask()?;
        Ok(answer
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned())
    }

    /// The address the socket reports for its peer.
    pub fn peer(&self) -> SocketAddr {
        self.writer.peer_addr().expect("peer")
    }
}

/// A bpffs pin directory for one test, removed (detaching what is pinned) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// The pin directory of instance `<prefix>-<pid>`. Pins left by an earlier run
    /// of the same prefix whose process is gone (a killed test) are removed first.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        lb_userspace::loader::ensure_bpffs(Path::new(lb_userspace::loader::BPFFS)).expect("bpffs");
        let root = Path::new(lb_userspace::loader::BPFFS).join("apilb");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if netns::left_by_dead_process(&e.file_name().to_string_lossy(), prefix) {
                    let _ = lb_userspace::loader::detach(&e.path());
                }
            }
        }
        Self(lb_userspace::loader::pin_dir(&format!(
            "{prefix}-{}",
            std::process::id()
        )))
    }

    /// The instance name these pins belong to (the config's `instance`).
    #[must_use]
    pub fn instance(&self) -> String {
        self.0
            .file_name()
            .and_then(|n| n.to_str())
            .expect("instance name")
            .to_owned()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = lb_userspace::loader::detach(&self.0);
        // `apilb/` itself stays only if another instance still uses it.
        let _ = std::fs::remove_dir(self.0.parent().expect("parent"));
    }
}

/// A binary of this workspace that cargo built beside the running one: test
/// binaries live in `target/<profile>/deps`, other binaries in `target/<profile>`.
#[must_use]
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own binary path");
    let mut dir = exe.parent().expect("binary dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile dir");
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with cargo build",
        bin.display()
    );
    bin
}

/// The `apilb` binary.
#[must_use]
pub fn apilb_bin() -> PathBuf {
    sibling_bin("apilb")
}

/// A process started inside a namespace (`ip netns exec`), killed on drop.
pub struct Spawned(pub std::process::Child);

impl Spawned {
    #[must_use]
    pub fn start(ns: &Netns, program: &Path, args: &[&str]) -> Self {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn in namespace");
        Self(child)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a stub apiserver (TLS, certificates from `pki`) for each master, inside
/// the master namespace; `control` holds each one's control files
/// (`<control>/<name>/readyz-fail` makes its /readyz fail).
#[must_use]
pub fn stub_apiservers(master: &Netns, pki: &crate::pki::Pki, control: &Path) -> Vec<Spawned> {
    (0..MASTERS.len())
        .map(|i| stub_apiserver(master, pki, control, i))
        .collect()
}

/// Start the stub apiserver of master `index` (0-based; named `master-<index+1>`).
#[must_use]
pub fn stub_apiserver(
    master: &Netns,
    pki: &crate::pki::Pki,
    control: &Path,
    index: usize,
) -> Spawned {
    let name = format!("master-{}", index + 1);
    let (crt, key) = pki.cert(&name);
    let dir = control.join(&name);
    std::fs::create_dir_all(&dir).expect("control dir");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let args = [
        "--listen".to_owned(),
        MASTERS[index].to_owned(),
        "--name".to_owned(),
        name,
        "--cert".to_owned(),
        path(&crt),
        "--key".to_owned(),
        path(&key),
        "--control-dir".to_owned(),
        path(&dir),
    ];
    Spawned::start(
        master,
        &sibling_bin("stub-apiserver"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// The masters' names and addresses, as `Pki::generate` takes them.
#[must_use]
pub fn master_names() -> Vec<(String, std::net::IpAddr)> {
    MASTERS
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("master-{}", i + 1), sa(m).ip()))
        .collect()
}

/// A running `apilb run`, inside a namespace (`nsenter --net`, which keeps the
/// host's mounts, bpffs included). Killed on drop; its log is kept for assertions.
pub struct Apilb {
    child: Option<std::process::Child>,
    pub log: PathBuf,
}

impl Apilb {
    /// Start `apilb run -c config` in namespace `ns`.
    #[must_use]
    pub fn start(ns: &Netns, config: &Path, log: &Path) -> Self {
        Self::start_with(ns, config, log, &[])
    }

    /// [`Apilb::start`] with extra arguments after `run -c <config>`, e.g.
    /// `--detach-on-exit`.
    #[must_use]
    pub fn start_with(ns: &Netns, config: &Path, log: &Path, extra: &[&str]) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .arg(apilb_bin())
            .args(["run", "-c"])
            .arg(config)
            .args(extra)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start apilb");
        Self {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    #[must_use]
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().expect("running").id()).expect("pid")
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a valid pid of our own child and a signal number.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "signal {sig}");
    }

    /// Wait (at most `limit`) for the process to exit; its exit code, if it did.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("running")
                .try_wait()
                .expect("wait")
            {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Wait (at most `limit`) until the log contains `needle`; whether it did.
    #[must_use]
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The log so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Apilb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
