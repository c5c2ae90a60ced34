//! Shared pieces of the VIP-ownership tests: two LB nodes in the
//! [`crate::cluster`] topology, each running its own `apilb run` (or keepalived),
//! TCP echo masters, and the questions the tests ask: which node holds a VIP's
//! address, and which node's datapath served a connection to it (the master sees
//! that node's SNAT address).

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    cluster::{LB_DEV, MASTERS, Topology, lb_addr},
    live::{Apilb, EchoServer, PinDir, Spawned},
    netns::Netns,
};

/// Two LB nodes, three masters, and the VIP on no node until an election puts it
/// there; with a temporary directory of the same prefix.
#[must_use]
pub fn two_lb_nodes(prefix: &str) -> (Topology, crate::live::TempDir) {
    let t = Topology::with_shape(
        prefix,
        crate::cluster::Shape {
            lb_nodes: 2,
            vip_on_first_lb: false,
            ..crate::cluster::Shape::default()
        },
    );
    (t, crate::live::TempDir::new(prefix))
}

/// One VIP and this node's VRRP settings for it.
#[derive(Clone, Copy, Debug)]
pub struct VrrpVip<'a> {
    pub addr: &'a str,
    pub vrid: u8,
    pub priority: u8,
}

/// `apilb run`'s config for LB node `node`: its own address as SNAT, slice `node`
/// of 2 of the NAT ports, TCP probes of
/// the three masters every 100 ms, and `vips` (each `[[vip]]` body) with
/// `election` as the `[election]` tables.
#[must_use]
pub fn node_config(node: usize, instance: &str, vips: &[String], election: &str) -> String {
    node_config_with_ports(node, instance, vips, election, 40_000..=40_999)
}

/// [`node_config`] with `nat_ports` the NAT port range the two nodes split, e.g.
/// a wide one for thousands of new flows a second.
#[must_use]
pub fn node_config_with_ports(
    node: usize,
    instance: &str,
    vips: &[String],
    election: &str,
    nat_ports: std::ops::RangeInclusive<u16>,
) -> String {
    let mut text = format!(
        "instance = \"{instance}\"\n[datapath]\ninterfaces = [\"{LB_DEV}\"]\nxdp_mode = \"native\"\nsnat_ipv4 = \"{}\"\n\
         nat_ports = [{}, {}]\nnat_slice = [{node}, 2]\nmaglev_size = 1009\n",
        lb_addr(node),
        nat_ports.start(),
        nat_ports.end()
    );
    for v in vips {
        text.push_str("[[vip]]\n");
        text.push_str(v);
        text.push('\n');
    }
    text.push_str(
        "[health]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\njitter = 0.0\n",
    );
    for m in MASTERS {
        text.push_str("[[backend]]\naddress = \"");
        text.push_str(m);
        text.push_str("\"\n");
    }
    text.push_str(election);
    text
}

/// A `[[vip]]` body for a VRRP VIP.
#[must_use]
pub fn vrrp_vip(v: VrrpVip) -> String {
    format!(
        "address = \"{}\"\nelection = \"vrrp\"\nvrid = {}\npriority = {}",
        v.addr, v.vrid, v.priority
    )
}

/// A flow-sync key file for both nodes, `sync.key` in `dir` (32 bytes, mode 0600,
/// as apilb requires); its path.
#[must_use]
pub fn sync_key(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let key = dir.join("sync.key");
    std::fs::write(&key, [0x5a; 32]).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("mode");
    key
}

/// The `[sync]` tables of LB node `node` (of two, named `lb<node+1>`): it listens
/// on its address, port 9465, with the other node its one peer, and `key` (from
/// [`sync_key`]).
#[must_use]
pub fn sync_tables(node: usize, key: &Path) -> String {
    let other = 1 - node;
    format!(
        "[sync]\nlisten = \"{}:9465\"\nnode = \"lb{}\"\nkey_file = \"{}\"\n\
         [[sync.peer]]\nname = \"lb{}\"\naddress = \"{}:9465\"\n",
        lb_addr(node),
        node + 1,
        key.display(),
        other + 1,
        lb_addr(other),
    )
}

/// Echo masters on all three masters, for `lifetime`.
#[must_use]
pub fn echo_masters(t: &Topology, lifetime: Duration) -> Vec<EchoServer> {
    MASTERS
        .iter()
        .map(|m| EchoServer::start(t.master_ns(m), m, lifetime))
        .collect()
}

/// One `apilb run` on an LB node, with its pins and config file.
pub struct Node {
    pub apilb: Option<Apilb>,
    pub pins: PinDir,
    pub config: std::path::PathBuf,
    pub index: usize,
    starts: usize,
    /// Every run's log, the stopped ones' too.
    logs: Vec<std::path::PathBuf>,
}

impl Node {
    /// Write `config` (from [`node_config`], given this node's instance name) and
    /// start `apilb run` on LB node `index`.
    pub fn start(
        t: &Topology,
        dir: &Path,
        prefix: &str,
        index: usize,
        config: impl Fn(&str) -> String,
    ) -> Self {
        let pins = PinDir::new(&format!("{prefix}-n{index}"));
        let path = dir.join(format!("apilb-{index}.toml"));
        std::fs::write(&path, config(&pins.instance())).expect("config");
        let mut n = Self {
            apilb: None,
            pins,
            config: path,
            index,
            starts: 0,
            logs: Vec::new(),
        };
        n.restart(t, dir);
        n
    }

    /// (Re)start apilb with the config file as it is now, and wait until it has
    /// written its datapath.
    pub fn restart(&mut self, t: &Topology, dir: &Path) {
        self.starts += 1;
        let log = dir.join(format!("apilb-{}-{}.log", self.index, self.starts));
        let apilb = Apilb::start(&t.lbs[self.index], &self.config, &log);
        self.logs.push(log);
        assert!(
            apilb.wait_log("datapath updated", Duration::from_secs(15)),
            "apilb on lb{} did not start:\n{}",
            self.index + 1,
            apilb.log_text()
        );
        self.apilb = Some(apilb);
    }

    /// The logs of every run so far, oldest first, each under a header.
    #[must_use]
    pub fn logs_text(&self) -> String {
        let mut all = String::new();
        for (i, log) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let _ = write!(all, "(run {})\n{text}", i + 1);
        }
        all
    }

    #[must_use]
    pub fn apilb(&self) -> &Apilb {
        self.apilb.as_ref().expect("running")
    }

    /// SIGKILL apilb and wait for it to go.
    pub fn kill(&mut self) {
        self.stop_with(libc::SIGKILL);
    }

    /// SIGTERM apilb (it hands its VIPs over) and wait for it to go.
    pub fn terminate(&mut self) {
        self.stop_with(libc::SIGTERM);
    }

    fn stop_with(&mut self, signal: i32) {
        let mut a = self.apilb.take().expect("running");
        a.signal(signal);
        assert!(
            a.wait(Duration::from_secs(10)).is_some(),
            "apilb did not stop on signal {signal}"
        );
    }
}

/// The LB nodes (0-based) whose interface holds `vip`.
#[must_use]
pub fn holders(t: &Topology, vip: &str) -> Vec<usize> {
    t.lbs
        .iter()
        .enumerate()
        .filter(|(_, ns)| holds(ns, vip))
        .map(|(i, _)| i)
        .collect()
}

/// Whether `ns`'s election interface holds `vip`.
#[must_use]
pub fn holds(ns: &Netns, vip: &str) -> bool {
    ns.ip(&["-o", "addr", "show", "dev", LB_DEV])
        .split_whitespace()
        .any(|w| w == format!("{vip}/32") || w == format!("{vip}/128"))
}

/// Which LB node served one new connection to `vip:6443` from the client: the
/// node whose SNAT address, or slice of NAT ports at the VIP, the master saw (0-based), `Some(usize::MAX)` for a
/// stand-in responder on a node ("master 0.0.0.0:6443 ..."), `None` on failure.
#[must_use]
pub fn served_by(client: &Netns, vip: &str) -> Option<usize> {
    let _inside = client.enter();
    let addr: SocketAddr = format!("{vip}:6443").parse().expect("vip");
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    std::io::Write::write_all(&mut conn, b"hello\n").ok()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(conn), &mut line).ok()?;
    // "master <addr> saw <peer ip>:<port>"
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.get(1) == Some(&"0.0.0.0:6443") {
        return Some(usize::MAX);
    }
    let (peer_ip, peer_port) = words.get(3)?.rsplit_once(':')?;
    // A node's own address (`snat = "node"`), or the VIP itself, from the node's
    // slice of the NAT ports (`node_config`: 40000-40499 for lb1, the rest lb2).
    (0..2).find(|&i| lb_addr(i) == peer_ip).or_else(|| {
        let port: u16 = peer_port.parse().ok()?;
        (peer_ip.trim_matches(['[', ']']) == vip).then_some(usize::from(port >= 40_500))
    })
}

/// Poll `served_by` every 20 ms until it answers `want`, at most `limit`; how long
/// that took from `since`.
#[must_use]
pub fn wait_served_by(
    client: &Netns,
    vip: &str,
    want: usize,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        if served_by(client, vip) == Some(want) {
            return Some(since.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Wait (at most `limit`) until new connections to `vip` are served by `node`,
/// which runs on LB node `index`; panics with its log if they are not.
pub fn assert_served_by(t: &Topology, vip: &str, node: &Node, limit: Duration) {
    let served = wait_served_by(&t.client, vip, node.index, Instant::now(), limit);
    assert!(
        served.is_some(),
        "lb{} never served {vip}:\n{}",
        node.index + 1,
        node.apilb().log_text()
    );
}

/// The MAC address of an LB node's election interface.
#[must_use]
pub fn mac(ns: &Netns) -> String {
    ns.ip(&["-br", "link", "show", "dev", LB_DEV])
        .split_whitespace()
        .nth(2)
        .expect("MAC")
        .to_owned()
}

/// The LB node (0 or 1) the router's ARP entry for `vip` points at, given each
/// node's [`mac`]: where the traffic goes, whoever holds the address.
#[must_use]
pub fn arp_owner(t: &Topology, vip: &str, macs: &[String; 2]) -> Option<usize> {
    let n = t.router.ip(&["neigh", "show", vip]);
    macs.iter().position(|m| n.contains(m.as_str()))
}

/// keepalived (Debian's, 2.2) on a node, VRRP only, in the foreground, killed on
/// drop. Its config and pid files are written to `dir`.
pub struct Keepalived {
    pub process: Option<Spawned>,
    pub config: std::path::PathBuf,
    vrrp_pid: std::path::PathBuf,
}

impl Keepalived {
    #[must_use]
    pub fn start(ns: &Netns, dir: &Path, name: &str, config: &str) -> Self {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, config).expect("keepalived config");
        let arg = |f: &str| dir.join(format!("{name}.{f}")).display().to_string();
        let args = [
            "--dont-fork".to_owned(),
            "--log-console".to_owned(),
            "--vrrp".to_owned(),
            "-f".to_owned(),
            path.display().to_string(),
            "-p".to_owned(),
            arg("pid"),
            "-r".to_owned(),
            arg("vrrp.pid"),
        ];
        let process = Spawned::start(
            ns,
            Path::new("/usr/sbin/keepalived"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        Self {
            process: Some(process),
            config: path,
            vrrp_pid: dir.join(format!("{name}.vrrp.pid")),
        }
    }

    /// SIGTERM the parent, as `systemctl stop` does (its VRRP child sends a
    /// priority-0 advert first), and wait at most 5 s for it to go.
    pub fn terminate(&mut self) {
        let Some(mut parent) = self.process.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(parent.0.id()).expect("pid");
        // SAFETY: signalling a child this struct spawned and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(parent.0.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
        drop(parent);
    }

    /// SIGKILL its VRRP child (so it sends nothing more, not even a priority-0
    /// advert), then the parent. Once only: a pid read later may be reused.
    pub fn kill(&mut self) {
        let Some(parent) = self.process.take() else {
            return;
        };
        if let Some(pid) = std::fs::read_to_string(&self.vrrp_pid)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill with a pid from keepalived's own pid file, read while its
            // parent (whose child it is) still runs.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        drop(parent);
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.kill();
    }
}

/// etcd's client address in the topology: on the router's loopback, one routed hop
/// from the LB nodes (`route_to_etcd`), so cutting a node off is one route.
pub const ETCD_ADDR: &str = "203.0.113.1";

/// etcd (Debian's etcd-server) in the router namespace: member `i` listens for
/// clients on [`ETCD_ADDR`]`:2379 + 10 i` and for peers on loopback, with its data
/// under `dir`; every member is killed on drop.
pub struct Etcd {
    members: Vec<Spawned>,
    args: Vec<Vec<String>>,
}

impl Etcd {
    /// A single member.
    #[must_use]
    pub fn start(t: &Topology, dir: &Path) -> Self {
        Self::cluster(t, dir, 1)
    }

    /// A cluster of `n` members, each taking clients once started.
    #[must_use]
    pub fn cluster(t: &Topology, dir: &Path, n: usize) -> Self {
        t.router
            .ip(&["addr", "add", &format!("{ETCD_ADDR}/32"), "dev", "lo"]);
        for lb in &t.lbs {
            lb.ip(&["route", "add", ETCD_ADDR, "via", "198.51.100.1"]);
        }
        let peer = |i: usize| format!("http://127.0.0.1:{}", 2380 + 10 * i);
        let initial: Vec<String> = (0..n).map(|i| format!("m{i}={}", peer(i))).collect();
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let url = format!("http://{ETCD_ADDR}:{}", etcd_port(i));
                let data = dir.join(format!("etcd-data-{i}")).display().to_string();
                [
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    &data,
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                    "--listen-peer-urls",
                    &peer(i),
                    "--initial-advertise-peer-urls",
                    &peer(i),
                    "--initial-cluster",
                    &initial.join(","),
                ]
                .map(str::to_owned)
                .to_vec()
            })
            .collect();
        let mut etcd = Self {
            members: Vec::new(),
            args,
        };
        for i in 0..n {
            let member = etcd.spawn(t, i);
            etcd.members.push(member);
        }
        for i in 0..n {
            wait_up(t, i);
        }
        etcd
    }

    /// Stop member `i` as kubelet stops a static pod (SIGTERM: a leader hands its
    /// leadership over first) and start it again on its data; returns once it
    /// takes clients.
    pub fn restart(&mut self, t: &Topology, i: usize) {
        let pid = libc::pid_t::try_from(self.members[i].0.id()).expect("pid");
        // SAFETY: signalling a child this struct spawned and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.members[i].0.wait();
        self.members[i] = self.spawn(t, i);
        wait_up(t, i);
    }

    fn spawn(&self, t: &Topology, i: usize) -> Spawned {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        Spawned::start(&t.router, Path::new("/usr/bin/etcd"), &args)
    }
}

/// Member `i`'s client port.
fn etcd_port(i: usize) -> usize {
    2379 + 10 * i
}

/// Wait until member `i` accepts connections from an LB node.
fn wait_up(t: &Topology, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = format!("{ETCD_ADDR}:{}", etcd_port(i))
        .parse()
        .expect("addr");
    loop {
        let up = {
            let _inside = t.lbs[0].enter();
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        };
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "etcd member {i} did not start");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The `[election.etcd]` tables for node `node` (named `lb<node+1>`), naming the
/// first `members` members of an [`Etcd`] cluster.
#[must_use]
pub fn etcd_election(node: usize, lease_ttl: &str, members: usize) -> String {
    let endpoints: Vec<String> = (0..members)
        .map(|i| format!("\"http://{ETCD_ADDR}:{}\"", etcd_port(i)))
        .collect();
    format!(
        "[election.etcd]\nendpoints = [{}]\nlease_ttl = \"{lease_ttl}\"\n\
         node = \"lb{}\"\ndial_timeout = \"1s\"\n",
        endpoints.join(", "),
        node + 1
    )
}

/// Failover and preemption by VRRP (100 ms adverts) between two apilb nodes:
/// lb1 (priority 150) owns [`crate::cluster::VIP_ADDR`]; killed (SIGKILL), lb2 takes
/// it over; restarted, lb1 preempts it and lb2 gives the address up. Each within
/// `limit`; prints and returns (takeover, preemption).
#[must_use]
pub fn vrrp_kill_and_preempt(prefix: &str, limit: Duration) -> (Duration, Duration) {
    use crate::cluster::VIP_ADDR;
    let (t, dir) = two_lb_nodes(prefix);
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let election = "[election.vrrp]\nadvert_interval = \"100ms\"\npreempt = true\n";
    let vip = |priority| {
        vec![vrrp_vip(VrrpVip {
            addr: VIP_ADDR,
            vrid: 51,
            priority,
        })]
    };
    let mut lb1 = Node::start(&t, &dir.0, prefix, 0, |i| {
        node_config(0, i, &vip(150), election)
    });
    let _lb2 = Node::start(&t, &dir.0, prefix, 1, |i| {
        node_config(1, i, &vip(100), election)
    });
    let won = wait_served_by(
        &t.client,
        VIP_ADDR,
        0,
        Instant::now(),
        Duration::from_secs(5),
    );
    assert!(
        won.is_some(),
        "lb1 never served the VIP:\n{}",
        lb1.apilb().log_text()
    );
    assert_eq!(holders(&t, VIP_ADDR), [0], "only lb1 holds the address");

    let killed = Instant::now();
    lb1.kill();
    let took = wait_served_by(&t.client, VIP_ADDR, 1, killed, limit);
    eprintln!("vrrp 100ms: SIGKILL -> served by lb2 after {took:?}");
    let takeover = took.expect("lb2 did not take over");
    assert!(holders(&t, VIP_ADDR).contains(&1));

    // lb1 comes back: it drops the address it left, then preempts (150 > 100).
    let back = Instant::now();
    lb1.restart(&t, &dir.0);
    let took = wait_served_by(&t.client, VIP_ADDR, 0, back, limit);
    eprintln!("vrrp 100ms: lb1 restarted -> preempted after {took:?}");
    let preemption = took.expect("lb1 did not preempt");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(holders(&t, VIP_ADDR), [0], "lb2 gave the address up");
    assert_eq!(served_by(&t.client, VIP_ADDR), Some(0));
    (takeover, preemption)
}
