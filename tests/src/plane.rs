//! The control plane the scenarios and the demo run, started in one call: the
//! [`crate::cluster`] topology, a CA, a TLS stub apiserver on each master, and
//! `apilb run` on the first LB node with default health probes (https `/readyz`
//! with that CA, every 500 ms, rise 2, fall 2).
//!
//! With discovery ([`ControlPlane::start_discovering`]) the stubs also serve the
//! `default/kubernetes` `EndpointSlice` from a file the test rewrites
//! ([`ControlPlane::set_slice`]), and apilb reads it with a kubeconfig for the VIP.
//!
//! Dropping it stops apilb, the stubs, removes the pins, the namespaces and the
//! temporary directory, in that order.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    cluster::{FOURTH_MASTER, Shape, Topology, VIP, VIP_ADDR, apilb_config, master_addrs},
    endpointslice::SliceFile,
    live::{Apilb, PinDir, Spawned, TempDir, https_via_vip, master_names, stub_apiserver_with},
    netns::Netns,
    pki::Pki,
};

/// How soon the default probes (every 500 ms, fall 2) should take a dead master
/// out of rotation: `fall` intervals plus a timeout, 1.5 s. The scenarios allow
/// five times this, for a loaded machine.
pub const FAILOVER_TARGET: Duration = Duration::from_millis(1500);

pub struct ControlPlane {
    // Field order is drop order.
    pub apilb: Apilb,
    /// Stub apiservers by master index (`None`: not running).
    pub stubs: Vec<Option<Spawned>>,
    pub pins: PinDir,
    pub t: Topology,
    pub pki: Pki,
    pub config: PathBuf,
    pub dir: TempDir,
    restarts: usize,
    /// Arguments every stub gets beyond its own (the slice file, with discovery).
    stub_args: Vec<String>,
}

impl ControlPlane {
    /// Start everything, with a stub on every wired master (the fourth, if wired,
    /// is not in apilb's config); return once a request through the VIP succeeds.
    #[must_use]
    pub fn start(prefix: &str, shape: Shape) -> Self {
        Self::start_with(prefix, shape, "")
    }

    /// [`Self::start`], with `health` lines added to apilb's `[health]` section
    /// (after which they may open sections of their own, e.g. `[local]`).
    #[must_use]
    pub fn start_with(prefix: &str, shape: Shape, health: &str) -> Self {
        Self::start_configured(prefix, shape, "", health)
    }

    /// [`Self::start_with`], with `datapath` lines added to apilb's `[datapath]`
    /// section too.
    #[must_use]
    pub fn start_configured(prefix: &str, shape: Shape, datapath: &str, health: &str) -> Self {
        let plane = Self::start_inner(prefix, shape, datapath, health, None);
        plane.wait_serving(Duration::from_secs(15));
        plane
    }

    /// [`Self::start_with`] with discovery: every stub serves `slice` (see
    /// [`Self::set_slice`]) and apilb's config gets `[discovery]` with a kubeconfig
    /// for `https://VIP` and `discovery` lines (e.g. `hold = "30s"`); `health` as
    /// there. Returns once apilb has written the datapath (the VIP may be on no
    /// interface, in node-local mode).
    #[must_use]
    pub fn start_discovering(
        prefix: &str,
        shape: Shape,
        slice: &SliceFile,
        health: &str,
        discovery: &str,
    ) -> Self {
        let plane = Self::start_inner(prefix, shape, "", health, Some((slice, discovery)));
        assert!(
            plane
                .apilb
                .wait_log("datapath updated", Duration::from_secs(15)),
            "apilb did not start:\n{}",
            plane.apilb.log_text()
        );
        plane
    }

    fn start_inner(
        prefix: &str,
        shape: Shape,
        datapath: &str,
        health: &str,
        discovery: Option<(&SliceFile, &str)>,
    ) -> Self {
        let t = Topology::with_shape(prefix, shape);
        let dir = TempDir::new(prefix);
        // 127.0.0.1 too, as k3s and kubespray's node-local proxies have it: a
        // node-local kubeconfig may point there (`[local] addresses`).
        let pki = Pki::generate(
            &dir.0,
            &master_names(),
            &[
                VIP_ADDR.parse().expect("vip"),
                std::net::Ipv4Addr::LOCALHOST.into(),
            ],
        );
        let mut stub_args = Vec::new();
        let mut text = String::new();
        if let Some((slice, lines)) = discovery {
            let file = dir.0.join("endpointslice");
            slice.write(&file);
            stub_args = vec!["--endpointslice".to_owned(), path_text(&file)];
            let (_, kubeconfig) = kubeconfig(&dir.0, VIP, &pki.ca_pem);
            text = format!(
                "[discovery]\nkind = \"endpointslice\"\nkubeconfig = \"{}\"\n{lines}\n",
                kubeconfig.display()
            );
        }
        let stubs = master_addrs(shape.masters)
            .map(|m| Some(start_stub(&t, &pki, &dir.0, m, &stub_args)))
            .collect();
        let pins = PinDir::new(prefix);
        let config = dir.0.join("apilb.toml");
        // `[discovery]` after everything `health` may open: it is a section.
        text.insert_str(0, &Self::config_text(&pins, &pki, false, datapath, health));
        std::fs::write(&config, text).expect("config");
        let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb-0.log"));
        Self {
            apilb,
            stubs,
            pins,
            t,
            pki,
            config,
            dir,
            restarts: 0,
            stub_args,
        }
    }

    /// The file every stub serves the `EndpointSlice` from.
    #[must_use]
    pub fn slice_file(&self) -> PathBuf {
        self.dir.0.join("endpointslice")
    }

    /// Serve `slice` from now on (every stub, on list and watch).
    pub fn set_slice(&self, slice: &SliceFile) {
        slice.write(&self.slice_file());
    }

    /// apilb's config: defaults but for the topology's facts and the `datapath`
    /// and `health` lines; the fourth master too if `four`.
    #[must_use]
    pub fn config_text(
        pins: &PinDir,
        pki: &Pki,
        four: bool,
        datapath: &str,
        health: &str,
    ) -> String {
        let mut text = apilb_config(
            &pins.instance(),
            datapath,
            &format!("ca_file = \"{}\"\n{health}", pki.ca_pem.display()),
        );
        if four {
            text.push_str("[[backend]]\naddress = \"");
            text.push_str(FOURTH_MASTER);
            text.push_str("\"\n");
        }
        text
    }

    /// Wait (at most `limit`) until `GET /version` through the VIP succeeds.
    pub fn wait_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while https_via_vip(&self.t.client, &self.pki.ca_pem, "/version").is_none() {
            assert!(
                Instant::now() < deadline,
                "nothing answers through the VIP; apilb's log:\n{}",
                self.apilb.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (at most `limit` after `since`) until master `name` has served one of
    /// `traffic`'s new connections started since `since`; when it did.
    pub fn first_served(
        &self,
        traffic: &crate::traffic::Traffic,
        name: &str,
        since: Instant,
        limit: Duration,
    ) -> Instant {
        loop {
            if let Some(at) = traffic.record().first_served_by(name, since) {
                return at;
            }
            assert!(
                Instant::now() < since + limit,
                "{name} never served:\n{}",
                self.apilb.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL the stub apiserver of master `i` (0-based).
    pub fn kill_master(&mut self, i: usize) {
        drop(self.stubs[i].take());
    }

    /// Start the stub apiserver of master `i` again.
    pub fn start_master(&mut self, i: usize) {
        let addr = master_addrs(self.t.masters.len())
            .nth(i)
            .expect("wired master");
        self.stubs[i] = Some(start_stub(
            &self.t,
            &self.pki,
            &self.dir.0,
            addr,
            &self.stub_args,
        ));
    }

    /// The control file that makes master `i`'s `/readyz` fail while it exists.
    #[must_use]
    pub fn readyz_fail(&self, i: usize) -> PathBuf {
        self.dir
            .0
            .join(format!("master-{}", i + 1))
            .join("readyz-fail")
    }

    /// SIGKILL apilb (its pinned datapath stays) and return when it is gone.
    pub fn kill_apilb(&mut self) {
        self.apilb.signal(libc::SIGKILL);
        assert!(
            self.apilb.wait(Duration::from_secs(5)).is_some(),
            "apilb did not die"
        );
    }

    /// Start apilb again, with the same config, and wait until it has written the
    /// datapath.
    pub fn restart_apilb(&mut self) {
        self.restarts += 1;
        let log = self.dir.0.join(format!("apilb-{}.log", self.restarts));
        self.apilb = Apilb::start(self.t.lb(), &self.config, &log);
        assert!(
            self.apilb
                .wait_log("datapath updated", Duration::from_secs(15)),
            "apilb did not come back:\n{}",
            self.apilb.log_text()
        );
    }

    #[must_use]
    pub fn ca(&self) -> &Path {
        &self.pki.ca_pem
    }

    /// Debian's kubectl (`version -o json`, with a kubeconfig as a kubelet's or an
    /// admin's looks: the server, the cluster CA and a bearer token the stub does
    /// not check) and curl (`/version`), run in `ns` against `https://{server}`:
    /// the server version each got, and kubectl's own.
    ///
    /// # Panics
    /// If either fails.
    #[must_use]
    pub fn real_clients(&self, ns: &Netns, server: &str) -> RealClients {
        let (home, kubeconfig) = kubeconfig(&self.dir.0, server, self.ca());
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(kubectl_bin())
            .args(["version", "-o", "json"])
            .env("HOME", &home)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("run kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("kubectl's JSON");
        let curl = ns.exec(
            "curl",
            &[
                "-sS",
                "--cacert",
                &self.ca().display().to_string(),
                &format!("https://{server}/version"),
            ],
        );
        let c: serde_json::Value = serde_json::from_str(&curl).expect("curl's JSON");
        RealClients {
            kubectl: v["clientVersion"]["gitVersion"].to_string(),
            kubectl_got: v["serverVersion"]["gitVersion"].to_string(),
            curl_got: c["gitVersion"].to_string(),
        }
    }
}

/// The stub apiserver of `addr`, with `extra` arguments.
fn start_stub(t: &Topology, pki: &Pki, dir: &Path, addr: &str, extra: &[String]) -> Spawned {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    stub_apiserver_with(t, pki, dir, addr, addr, &extra)
}

fn path_text(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// A home directory under `dir` for kubectl, and a kubeconfig in it as a
/// kubelet's or an admin's looks: `https://{server}`, the cluster CA `ca` and a
/// bearer token the stub does not check. Returns (home, kubeconfig).
///
/// # Panics
/// If they cannot be written.
#[must_use]
pub fn kubeconfig(dir: &Path, server: &str, ca: &Path) -> (PathBuf, PathBuf) {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let kubeconfig = home.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: apilb\n  cluster:\n    \
             server: https://{server}\n    certificate-authority: {}\nusers:\n- name: test\n  \
             user:\n    token: apilb-test\ncontexts:\n- name: apilb\n  context:\n    \
             cluster: apilb\n    user: test\ncurrent-context: apilb\n",
            ca.display()
        ),
    )
    .expect("kubeconfig");
    (home, kubeconfig)
}

/// What [`ControlPlane::real_clients`] saw: JSON strings, quotes included.
pub struct RealClients {
    pub kubectl: String,
    pub kubectl_got: String,
    pub curl_got: String,
}

/// The server version the stub apiserver reports, as `RealClients` holds it.
pub const STUB_VERSION: &str = "\"v1.30.0-apilb-stub\"";

/// Debian's kubectl, unpacked by `cargo xtask setup` (or `APILB_KUBECTL`).
///
/// # Panics
/// If it is missing.
#[must_use]
pub fn kubectl_bin() -> PathBuf {
    let path = std::env::var_os("APILB_KUBECTL").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/kubernetes-client/usr/bin/kubectl")
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`",
        path.display()
    );
    path
}
