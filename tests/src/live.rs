//! What runs in the [`crate::cluster`] topology: TCP echo masters and clients, stub
//! apiservers, `apilb run` itself, and the bpffs pins and processes each test owns,
//! all removed on drop.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cluster::{MASTERS, Topology, VIP, master_addrs, master_index},
    fixture::sa,
    netns::{self, Netns},
};

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
        Self::connect_to(client, sa(VIP))
    }

    /// Connect to `addr` from namespace `ns`.
    pub fn connect_to(ns: &Netns, addr: SocketAddr) -> std::io::Result<Self> {
        let _inside = ns.enter();
        Self::from_stream(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    }

    /// A client over a connected stream.
    pub fn from_stream(conn: TcpStream) -> std::io::Result<Self> {
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

static NEXT_DIR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `n` new connections from `ns` to `to`, each asking an echo master its name:
/// how many each master answered (by address), and how many failed.
#[must_use]
pub fn spread(ns: &Netns, to: SocketAddr, n: usize) -> (HashMap<String, usize>, usize) {
    let mut by = HashMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match Client::connect_to(ns, to).and_then(|mut c| c.ask_master()) {
            Ok(m) => *by.entry(m).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (by, failed)
}

/// apilb's `/metrics` as served in namespace `ns` (on the default admin address).
#[must_use]
pub fn metrics(ns: &Netns) -> String {
    ns.exec("curl", &["-sf", "http://127.0.0.1:9464/metrics"])
}

/// The sum of the samples in `metrics` (Prometheus text) whose line starts with
/// `series`, e.g. `apilb_datapath_packets_total{counter="flow_new"}`; 0 if none.
#[must_use]
pub fn metric_sum(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// utime + stime of process `pid` (all its threads), in clock ticks.
#[must_use]
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
#[must_use]
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    hz as f64
}

/// Raise the open-files limit to its hard limit, raised first as far as root
/// may: thousands of connections in flight, and the stubs' and apilb's, which
/// inherit it.
pub fn raise_open_files() {
    let want = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: setrlimit with a valid resource and a pointer to a live struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) } != 0 {
        let mut have = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above; getrlimit writes into the struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut have) };
        have.rlim_cur = have.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const have) };
    }
}

/// A temporary directory for one test, `<tmp>/<prefix>-<pid>-<n>`, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Directories of the same prefix left by a process that is gone (a killed
    /// test, an interrupted demo) are removed first.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                if netns::left_by_dead_process(&e.file_name().to_string_lossy(), prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let n = NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

/// `cmd`'s process gets SIGKILL when the thread that starts it ends, so nothing a
/// killed test or an interrupted demo started outlives it.
fn dies_with_parent(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe, and this closure touches nothing else
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
}

/// A process started inside a namespace (`ip netns exec`), killed on drop.
pub struct Spawned(pub std::process::Child);

impl Spawned {
    #[must_use]
    pub fn start(ns: &Netns, program: &Path, args: &[&str]) -> Self {
        let child = dies_with_parent(&mut std::process::Command::new("ip"))
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

/// Start a stub apiserver (TLS, certificates from `pki`) on each of the three
/// masters; `control` holds each one's control files (`<control>/<name>/readyz-fail`
/// makes its /readyz fail).
#[must_use]
pub fn stub_apiservers(t: &Topology, pki: &crate::pki::Pki, control: &Path) -> Vec<Spawned> {
    MASTERS
        .iter()
        .map(|m| stub_apiserver(t, pki, control, m))
        .collect()
}

/// Start the stub apiserver of the master at `addr`, in its namespace, named
/// `master-<n>` like its certificate.
#[must_use]
pub fn stub_apiserver(t: &Topology, pki: &crate::pki::Pki, control: &Path, addr: &str) -> Spawned {
    stub_apiserver_on(t, pki, control, addr, addr)
}

/// [`stub_apiserver`] listening on `listen` instead of the master's address, e.g.
/// `0.0.0.0:6443` for a master that may hold the VIP itself.
#[must_use]
pub fn stub_apiserver_on(
    t: &Topology,
    pki: &crate::pki::Pki,
    control: &Path,
    addr: &str,
    listen: &str,
) -> Spawned {
    stub_apiserver_with(t, pki, control, addr, listen, &[])
}

/// [`stub_apiserver_on`] with `extra` arguments, e.g. `--plain-http`.
#[must_use]
pub fn stub_apiserver_with(
    t: &Topology,
    pki: &crate::pki::Pki,
    control: &Path,
    addr: &str,
    listen: &str,
    extra: &[&str],
) -> Spawned {
    let name = master_name(addr);
    let (crt, key) = pki.cert(&name);
    let dir = control.join(&name);
    std::fs::create_dir_all(&dir).expect("control dir");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let args = [
        "--listen".to_owned(),
        listen.to_owned(),
        "--name".to_owned(),
        name,
        "--cert".to_owned(),
        path(&crt),
        "--key".to_owned(),
        path(&key),
        "--control-dir".to_owned(),
        path(&dir),
    ];
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect();
    Spawned::start(t.master_ns(addr), &sibling_bin("stub-apiserver"), &args)
}

/// `master-<n>` for the master at `addr`.
#[must_use]
pub fn master_name(addr: &str) -> String {
    format!("master-{}", master_index(addr) + 1)
}

/// Every master's name and address (the fourth included), as `Pki::generate`
/// takes them.
#[must_use]
pub fn master_names() -> Vec<(String, std::net::IpAddr)> {
    master_addrs(4)
        .map(|m| (master_name(m), sa(m).ip()))
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
    /// `--detach-on-exit`. With least privilege ([`crate::least::enabled`]) it
    /// runs as a non-root user holding only apilb's documented capabilities.
    #[must_use]
    pub fn start_with(ns: &Netns, config: &Path, log: &Path, extra: &[&str]) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let least = if crate::least::enabled() {
            crate::least::prepare(config);
            crate::least::setpriv(lb_userspace::privilege::CAPABILITIES)
        } else {
            Vec::new()
        };
        let child = dies_with_parent(&mut std::process::Command::new("nsenter"))
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .args(least)
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
