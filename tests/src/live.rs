//! A live topology for tests that send real frames: client, LB and master namespaces
//! joined by veths, a TCP echo server on the master, and the balancer attached to
//! the LB's veths.
//!
//! Addresses (documentation ranges, only inside these namespaces, none with a
//! default route): client 192.0.2.10/24 on `c0`; LB 192.0.2.1/24 and the VIP
//! 192.0.2.100/32 on `l0`, 198.51.100.1/24 on `l1`; master 198.51.100.11/24 on `m0`.

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
            (&master, "m0", &["198.51.100.11/24"][..]),
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

/// A TCP server on the master: for every line a client sends, it answers
/// `master saw <peer>`, until the client closes. It accepts at most `max`
/// connections and stops after `lifetime`.
pub struct EchoServer {
    /// Peer addresses of the connections accepted so far.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    #[must_use]
    pub fn start(master: &Netns, max: usize, lifetime: Duration) -> Self {
        let name = master.name().to_owned();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&peers);
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = thread::spawn(move || {
            let _inside = netns::enter(&name);
            let listener = TcpListener::bind(MASTER).expect("bind the master's port");
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            ready_tx.send(()).expect("signal ready");
            let deadline = Instant::now() + lifetime;
            let mut workers = Vec::new();
            while seen.lock().expect("lock").len() < max && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        seen.lock().expect("lock").push(peer);
                        workers.push(thread::spawn(move || echo(conn, peer, deadline)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("master listening");
        Self {
            peers,
            handle: Some(handle),
        }
    }

    /// Wait for the server to stop (all `max` connections closed, or its lifetime
    /// over) and return the peers it saw.
    #[must_use]
    pub fn join(mut self) -> Vec<SocketAddr> {
        if let Some(h) = self.handle.take() {
            h.join().expect("server thread");
        }
        self.peers.lock().expect("lock").clone()
    }
}

fn echo(conn: TcpStream, peer: SocketAddr, deadline: Instant) {
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
                if writeln!(writer, "master saw {peer}").is_err() {
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

    /// The address the socket reports for its peer.
    pub fn peer(&self) -> SocketAddr {
        self.writer.peer_addr().expect("peer")
    }
}

/// A bpffs pin directory for one test, removed (detaching what is pinned) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        lb_userspace::loader::ensure_bpffs(Path::new(lb_userspace::loader::BPFFS)).expect("bpffs");
        Self(lb_userspace::loader::pin_dir(&format!(
            "{prefix}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = lb_userspace::loader::detach(&self.0);
        // `apilb/` itself stays only if another instance still uses it.
        let _ = std::fs::remove_dir(self.0.parent().expect("parent"));
    }
}
