//! The balancers apilb is measured against, in the [`crate::cluster`] topology's LB
//! node instead of `apilb run`: haproxy as kubeadm's HA guide configures it, haproxy
//! at its defaults, and kube-proxy-style iptables DNAT; and, with no LB node at
//! all, the guide's keepalived and `check_apiserver.sh` on the masters
//! ([`Proxy::KeepalivedScript`]).
//!
//! The guide's haproxy.cfg is kubernetes/kubeadm `docs/ha-considerations.md`
//! ("haproxy configuration", tested there with haproxy 2.1.4). Its values are kept:
//! `retries 1`, `option redispatch`, `timeout connect 5s`, `client`/`server 20s`,
//! `check 10s` (and its HTTP-only options, which a `mode tcp` proxy ignores), and a
//! backend with `option httpchk GET /healthz`, `http-check expect status 200`,
//! `option ssl-hello-chk`, `balance roundrobin` and plain `check` servers (inter 2s,
//! fall 3, rise 2). `ssl-hello-chk` comes last, so it is the check haproxy runs: a
//! TLS hello (`L6OK`), not the `/healthz` request. Left out: its logging (`log`,
//! `httplog`, `dontlognull`, `tcplog`) and `daemon` (haproxy runs in the foreground,
//! `-db`); added: a stats socket, so that a run starts once every server has passed
//! a check.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cluster::{MASTERS, SNAT, Shape, Topology, VIP, VIP_ADDR},
    elect::{Keepalived, holds},
    live::{
        Spawned, TempDir, https_via_vip, master_name, master_names, stub_apiserver_on,
        stub_apiservers,
    },
    netns::Netns,
    pki::Pki,
};

/// What balances the VIP.
#[derive(Clone, Copy, Debug)]
pub enum Proxy {
    /// haproxy with the kubeadm HA guide's config.
    HaproxyKubeadm,
    /// The guide's config without `retries 1`, `option redispatch` and its check
    /// options: haproxy's defaults, 3 retries to the same server, no redispatch, and
    /// a layer-4 check (a TCP connect).
    HaproxyDefaults,
    /// [`Proxy::HaproxyDefaults`] with checks at apilb's default rate: every
    /// 500 ms, out after 2 failures, back after 2 passes (`inter 500ms fall 2
    /// rise 2`).
    HaproxyTuned,
    /// iptables DNAT, a random third per master, no health checks.
    IptablesDnat,
    /// No LB node: keepalived on each master moves the VIP among them, and
    /// kubeadm's HA guide's `check_apiserver.sh` lowers the holder's priority once
    /// its own apiserver fails. Nothing balances: every connection goes to the
    /// holder, master-2 (priority 101, the others 100), whose apiserver listens on
    /// `0.0.0.0:6443`.
    KeepalivedScript,
}

/// haproxy's config for `proxy` (a `Haproxy*` one), listening on `bind`, with its
/// stats socket at `stats`.
#[must_use]
fn haproxy_config(proxy: Proxy, bind: &str, stats: &Path) -> String {
    let (retries, check) = match proxy {
        Proxy::HaproxyKubeadm => (
            "    option redispatch\n    retries 1\n",
            "    option httpchk GET /healthz\n    http-check expect status 200\n    \
             option ssl-hello-chk\n",
        ),
        _ => ("", ""),
    };
    let rate = if let Proxy::HaproxyTuned = proxy {
        " inter 500ms fall 2 rise 2"
    } else {
        ""
    };
    let servers = MASTERS.map(|m| format!("    server {} {m} check{rate}", master_name(m)));
    format!(
        "global
    stats socket {stats}
defaults
    mode http
    option http-server-close
    option forwardfor except 127.0.0.0/8
{retries}    timeout http-request 10s
    timeout queue 20s
    timeout connect 5s
    timeout client 20s
    timeout server 20s
    timeout http-keep-alive 10s
    timeout check 10s
frontend apiserver
    bind {bind}
    mode tcp
    default_backend apiserver
backend apiserver
{check}    mode tcp
    balance roundrobin
{}\n",
        servers.join("\n"),
        stats = stats.display()
    )
}

/// haproxy in the foreground in a namespace, killed on drop.
pub struct Haproxy {
    process: Spawned,
    stats: PathBuf,
}

impl Haproxy {
    /// Start haproxy in `ns` with `proxy`'s config listening on `bind`, written
    /// under `dir`.
    ///
    /// # Panics
    /// If the config cannot be written.
    #[must_use]
    pub fn start(ns: &Netns, dir: &Path, proxy: Proxy, bind: &str) -> Self {
        let (config, stats) = (dir.join("haproxy.cfg"), dir.join("haproxy.sock"));
        std::fs::write(&config, haproxy_config(proxy, bind, &stats)).expect("haproxy config");
        let config = config.to_str().expect("utf-8 path");
        let process = Spawned::start(ns, Path::new("/usr/sbin/haproxy"), &["-db", "-f", config]);
        Self { process, stats }
    }

    /// SIGTERM it (haproxy's hard stop: its connections close at once) and wait
    /// at most 5 s for it to go.
    pub fn terminate(&mut self) {
        let pid = libc::pid_t::try_from(self.process.0.id()).expect("pid");
        // SAFETY: signalling a child this struct spawned and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.process.0.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Each server's state and last check from `show stat`, e.g. `master-1 UP L6OK`;
    /// none while the stats socket is not up.
    #[must_use]
    pub fn servers(&self) -> Vec<String> {
        let mut csv = String::new();
        let _ = UnixStream::connect(&self.stats).and_then(|mut sock| {
            sock.write_all(b"show stat\n")?;
            sock.read_to_string(&mut csv)
        });
        let mut rows = csv
            .lines()
            .map(|l| l.trim_start_matches("# ").split(',').collect());
        let header: Vec<&str> = rows.next().unwrap_or_default();
        let cols = ["svname", "status", "check_status"]
            .map(|name| header.iter().position(|h| *h == name).unwrap_or(usize::MAX));
        rows.filter(|f| f.get(cols[0]).is_some_and(|sv| sv.starts_with("master-")))
            .map(|f| {
                cols.iter()
                    .filter_map(|&c| f.get(c).copied())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    /// Wait (at most `limit`) until every master is up and has passed a check.
    ///
    /// # Panics
    /// If that takes longer, with the servers' states.
    pub fn wait_checked(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let servers = self.servers();
            let ok = servers
                .iter()
                .filter(|s| s.contains(" UP ") && s.ends_with("OK"));
            if ok.count() == MASTERS.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy's checks did not pass: {servers:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// nginx as kubespray's `nginx-proxy` runs on every node (its nginx.conf.j2, one
/// worker per CPU instead of its fixed 2, without its /healthz http server),
/// listening on `listen`, in the foreground with its files under `dir`. nginx's
/// workers outlive a master that gets SIGKILL, so it is pid 1 of its own pid
/// namespace (`unshare --kill-child`), whose end takes them along, even when this
/// process is the one killed.
#[must_use]
pub fn nginx_stream(ns: &Netns, dir: &Path, listen: &str, cpus: usize) -> Spawned {
    let servers: String = MASTERS.map(|m| format!("    server {m};\n")).concat();
    nginx(
        ns,
        dir,
        &format!(
            "worker_processes {cpus};
worker_rlimit_nofile 130048;
worker_shutdown_timeout 10s;
events {{ multi_accept on; use epoll; worker_connections 16384; }}
stream {{
  upstream kube_apiserver {{ least_conn;
{servers}  }}
  server {{ listen {listen}; proxy_pass kube_apiserver;
           proxy_timeout 10m; proxy_connect_timeout 1s; }}
}}
"
        ),
    )
}

/// nginx with `config` (after its module, log and pid lines), in the foreground
/// in its own pid namespace, with its files under `dir` (see [`nginx_stream`]).
#[must_use]
pub fn nginx(ns: &Netns, dir: &Path, config: &str) -> Spawned {
    let d = dir.display();
    std::fs::create_dir_all(dir).expect("nginx dir");
    let config = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
error_log {d}/error.log notice;
pid {d}/nginx.pid;
{config}"
    );
    std::fs::write(dir.join("nginx.conf"), config).expect("nginx config");
    let cmd =
        format!("--pid --kill-child /usr/sbin/nginx -p {d} -c {d}/nginx.conf -e {d}/error.log");
    let args: Vec<&str> = cmd.split(' ').chain(["-g", "daemon off;"]).collect();
    Spawned::start(ns, Path::new("/usr/bin/unshare"), &args)
}

/// DNAT of `to` (VIP:6443 for the failover benchmark) in `lb`'s PREROUTING to the
/// three masters, as kube-proxy's iptables mode writes a service (a random third,
/// then half of the rest, then the last), and SNAT to the node's own address so
/// that replies come back through it (`snat`).
pub fn iptables_dnat(lb: &Netns, to: &str, snat: &str) {
    let (addr, port) = to.rsplit_once(':').expect("address:port");
    lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let odds = [
        "-m statistic --mode random --probability 0.3333333333",
        "-m statistic --mode random --probability 0.5000000000",
        "",
    ];
    for (m, odds) in MASTERS.iter().zip(odds) {
        let rule = format!(
            "-t nat -A PREROUTING -d {addr} -p tcp --dport {port} {odds} -j DNAT --to-destination {m}"
        );
        lb.exec("iptables", &rule.split_whitespace().collect::<Vec<_>>());
    }
    let rule =
        format!("-t nat -A POSTROUTING -m conntrack --ctstate DNAT -j SNAT --to-source {snat}");
    lb.exec("iptables", &rule.split_whitespace().collect::<Vec<_>>());
}

/// The topology, CA and stub apiservers of [`crate::plane::ControlPlane`], with
/// `proxy` instead of apilb: on the LB node, or for [`Proxy::KeepalivedScript`]
/// on the masters.
pub struct ProxyPlane {
    // Field order is drop order.
    pub haproxy: Option<Haproxy>,
    pub keepalived: Vec<Keepalived>,
    /// Stub apiservers by master index (`None`: killed).
    pub stubs: Vec<Option<Spawned>>,
    pub t: Topology,
    pub pki: Pki,
    pub dir: TempDir,
}

impl ProxyPlane {
    /// Start everything; return once every master passed haproxy's checks (if
    /// haproxy) and a request through the VIP succeeds.
    ///
    /// # Panics
    /// If something does not start, or nothing answers through the VIP in 15 s.
    #[must_use]
    pub fn start(prefix: &str, proxy: Proxy) -> Self {
        let on_masters = matches!(proxy, Proxy::KeepalivedScript);
        let shape = Shape {
            vip_on_first_lb: !on_masters,
            ..Shape::default()
        };
        let t = Topology::with_shape(prefix, shape);
        let dir = TempDir::new(prefix);
        let pki = Pki::generate(&dir.0, &master_names(), &[VIP_ADDR.parse().expect("vip")]);
        let stubs = if on_masters {
            MASTERS
                .iter()
                .map(|m| stub_apiserver_on(&t, &pki, &dir.0, m, "0.0.0.0:6443"))
                .collect()
        } else {
            stub_apiservers(&t, &pki, &dir.0)
        };
        let (mut haproxy, mut keepalived) = (None, Vec::new());
        match proxy {
            Proxy::IptablesDnat => iptables_dnat(t.lb(), VIP, SNAT),
            Proxy::KeepalivedScript => keepalived = keepalived_on_masters(&t, &dir.0),
            _ => {
                let h = Haproxy::start(t.lb(), &dir.0, proxy, VIP);
                h.wait_checked(Duration::from_secs(15));
                haproxy = Some(h);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while https_via_vip(&t.client, &pki.ca_pem, "/version").is_none() {
            assert!(Instant::now() < deadline, "nothing answers through the VIP");
            thread::sleep(Duration::from_millis(100));
        }
        Self {
            haproxy,
            keepalived,
            stubs: stubs.into_iter().map(Some).collect(),
            t,
            pki,
            dir,
        }
    }

    /// SIGKILL the stub apiserver of master `i` (0-based).
    pub fn kill_master(&mut self, i: usize) {
        drop(self.stubs[i].take());
    }
}

/// kubeadm's HA guide's `check_apiserver.sh` (`docs/ha-considerations.md`,
/// "keepalived configuration", its current form; the apiserver's own port for
/// `APISERVER_DEST_PORT`, as there is no haproxy): one `GET /healthz` with a 2 s
/// limit.
const CHECK_APISERVER: &str = "#!/bin/sh
errorExit() {
    echo \"*** $*\" 1>&2
    exit 1
}
curl -sfk --max-time 2 https://localhost:6443/healthz -o /dev/null || errorExit \"Error GET https://localhost:6443/healthz\"
";

/// The guide's keepalived.conf for a node that starts as `state` with `priority`:
/// the script every 3 s, weight -2, fall 10, rise 2; VRID 51, PASS
/// authentication; `advert_int` left at its default of 1 s.
fn kubeadm_keepalived_config(state: &str, priority: u8, script: &Path) -> String {
    format!(
        "global_defs {{
    router_id LVS_DEVEL
}}
vrrp_script check_apiserver {{
    script \"{script}\"
    interval 3
    weight -2
    fall 10
    rise 2
}}
vrrp_instance VI_1 {{
    state {state}
    interface eth0
    virtual_router_id 51
    priority {priority}
    authentication {{
        auth_type PASS
        auth_pass 42
    }}
    virtual_ipaddress {{
        {VIP_ADDR}
    }}
    track_script {{
        check_apiserver
    }}
}}
",
        script = script.display()
    )
}

/// keepalived in `ns` with the kubeadm HA guide's config and check script
/// (written under `dir`, as `name`), starting as `state` with `priority`: on a
/// master, or on an LB node whose haproxy listens on `*:6443`, where the script's
/// `https://localhost:6443/healthz` goes through that haproxy.
///
/// # Panics
/// If the script cannot be written.
#[must_use]
pub fn kubeadm_keepalived(
    ns: &Netns,
    dir: &Path,
    name: &str,
    (state, priority): (&str, u8),
) -> Keepalived {
    let script = dir.join("check_apiserver.sh");
    std::fs::write(&script, CHECK_APISERVER).expect("check script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("check script mode");
    let config = kubeadm_keepalived_config(state, priority, &script);
    Keepalived::start(ns, dir, name, &config)
}

/// The master that holds the VIP at the start under [`Proxy::KeepalivedScript`].
const KEEPALIVED_HOLDER: usize = 1;

/// [`Proxy::KeepalivedScript`]'s keepalived on every master, master-2 first, so
/// that the others start by hearing its adverts; returns once it holds the VIP.
///
/// # Panics
/// If the script cannot be written, or master-2 does not take the VIP in 15 s.
fn keepalived_on_masters(t: &Topology, dir: &Path) -> Vec<Keepalived> {
    let start = |i: usize| {
        let (state, priority) = if i == KEEPALIVED_HOLDER {
            ("MASTER", 101)
        } else {
            ("BACKUP", 100)
        };
        kubeadm_keepalived(
            t.master_ns(MASTERS[i]),
            dir,
            &format!("ka-m{}", i + 1),
            (state, priority),
        )
    };
    let mut keepalived = vec![start(KEEPALIVED_HOLDER)];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !holds(t.master_ns(MASTERS[KEEPALIVED_HOLDER]), VIP_ADDR) {
        assert!(Instant::now() < deadline, "master-2 did not take the VIP");
        thread::sleep(Duration::from_millis(50));
    }
    keepalived.extend(
        (0..MASTERS.len())
            .filter(|&i| i != KEEPALIVED_HOLDER)
            .map(start),
    );
    keepalived
}
