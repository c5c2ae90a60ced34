//! `apilb manifest`, as operators run it: the real binary prints each form for a
//! config, and each is checked as what it is.
//!
//! - The pod forms are read back into `k8s-openapi`'s `Pod` and `DaemonSet` with
//!   unknown fields refused, and their spec is checked against what apilb needs:
//!   host network, exactly its capabilities, every file the config names mounted
//!   at its path, bpffs, the cgroup in node-local mode, the priority class.
//! - The unit passes `systemd-analyze verify`, then runs under a real systemd: this
//!   machine's PID 1 is not systemd, so the test boots one as PID 1 of a podman
//!   container (runc; the host's own root as a throw-away overlay) that shares the
//!   network namespace of the `tests::cluster` LB node. There `systemctl start`
//!   brings apilb up with the unit's sandbox and capabilities, `apilb status` sees
//!   the three masters, `systemctl reload` reloads, and connections through the VIP
//!   reach every master.
//! - A refused config prints no manifest, and its error names the key and value.
//!
//! Root (namespaces, bpffs, podman).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Pod, PodSpec},
};
use lb_userspace::{
    manifest::{BPFFS, CGROUP_DEFAULT, IMAGE_BINARY, parse_strict, to_yaml},
    privilege::{CAPABILITIES, Capability},
};
use tests::{
    cluster::{MASTERS, Topology, VIP, apilb_config, lb_addr},
    elect::{echo_masters, sync_key},
    fixture::sa,
    least::{decode_caps, status_field},
    live::{PinDir, TempDir, apilb_bin, master_names},
    pki::Pki,
};

const LIFETIME: Duration = Duration::from_mins(2);

/// `apilb <args>`, in the root namespace or in `netns`.
fn apilb(netns: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(apilb_bin());
            c
        }
        None => Command::new(apilb_bin()),
    };
    cmd.args(args).output().expect("run apilb")
}

/// The manifest `apilb manifest <form> -c <config> [extra]` prints; panics if it
/// fails.
fn manifest_with(netns: Option<&str>, form: &str, config: &Path, extra: &[&str]) -> String {
    let mut args = vec!["manifest", form, "-c", config.to_str().expect("path")];
    args.extend_from_slice(extra);
    let out = apilb(netns, &args);
    assert!(
        out.status.success(),
        "apilb manifest {form}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn manifest(netns: Option<&str>, form: &str, config: &Path) -> String {
    manifest_with(netns, form, config, &[])
}

/// A config that names every file it can (the health probe's CA, client
/// certificate and key, the same CA and certificate for etcd, the sync key), in
/// node-local mode, on `lo` so that any machine can validate it. Its files: the
/// config and the four distinct files it names.
fn config_naming_every_file(dir: &Path, local: bool) -> (PathBuf, Vec<PathBuf>) {
    let pki = Pki::generate(&dir.join("pki"), &master_names(), &[]);
    let (cert, key) = pki.cert(&master_names()[0].0);
    let sync = sync_key(dir);
    let mut text = format!(
        "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"{snat}\"\nnat_slice = [0, 2]\n\
         [[vip]]\naddress = \"198.51.100.100\"\nelection = \"etcd\"\n\
         [election.etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\n\
         ca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
         [health]\nca_file = \"{ca}\"\nclient_cert = \"{cert}\"\nclient_key = \"{key}\"\n\
         [local]\nenabled = {local}\n{sync}",
        snat = lb_addr(0),
        ca = pki.ca_pem.display(),
        cert = cert.display(),
        key = key.display(),
        sync = tests::elect::sync_tables(0, &sync),
    );
    for m in MASTERS {
        let _ = writeln!(text, "[[backend]]\naddress = \"{m}\"");
    }
    let config = dir.join("apilb.toml");
    std::fs::write(&config, text).expect("config");
    let files = vec![config.clone(), pki.ca_pem.clone(), cert, key, sync];
    (config, files)
}

/// Check a pod spec against what apilb needs; returns the number of mounts.
fn check_pod_spec(spec: &PodSpec, files: &[PathBuf], local: bool) -> usize {
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.service_account_name, None);
    assert_eq!(spec.containers.len(), 1);
    assert!(spec.init_containers.is_none());
    let c = &spec.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "never privileged");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let needed: Vec<&str> = CAPABILITIES.iter().map(Capability::k8s_name).collect();
    assert_eq!(added, needed, "exactly apilb's capabilities");

    let volumes = spec.volumes.as_deref().expect("volumes");
    let mounts = c.volume_mounts.as_deref().expect("volumeMounts");
    assert_eq!(volumes.len(), mounts.len(), "a volume per mount");
    for v in volumes {
        assert!(
            v.config_map.is_none() && v.secret.is_none() && v.projected.is_none(),
            "{} refers to an API object",
            v.name
        );
    }
    // (path in the container, read-only) -> the hostPath behind it.
    let mounted = |path: &str| -> (bool, String, String) {
        let m = mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .unwrap_or_else(|| panic!("no volume {}", m.name));
        let host = v.host_path.as_ref().expect("hostPath");
        (
            m.read_only == Some(true),
            host.path.clone(),
            host.type_.clone().unwrap_or_default(),
        )
    };
    for f in files {
        let p = f.to_str().expect("path");
        assert_eq!(mounted(p), (true, p.to_owned(), "File".to_owned()), "{p}");
    }
    assert_eq!(
        mounted(BPFFS),
        (false, BPFFS.to_owned(), "Directory".to_owned())
    );
    let expected = files.len() + 1 + usize::from(local);
    if local {
        assert_eq!(
            mounted(CGROUP_DEFAULT),
            (true, CGROUP_DEFAULT.to_owned(), "Directory".to_owned())
        );
    } else {
        assert!(mounts.iter().all(|m| m.mount_path != CGROUP_DEFAULT));
    }
    assert_eq!(mounts.len(), expected, "nothing else is mounted");

    let probe = c.liveness_probe.as_ref().expect("liveness");
    let get = probe.http_get.as_ref().expect("httpGet");
    assert_eq!(
        (get.host.as_deref(), get.path.as_deref()),
        (Some("127.0.0.1"), Some("/healthz"))
    );
    mounts.len()
}

#[test]
fn pod_forms_read_back_strictly_and_grant_exactly_what_apilb_needs() {
    let dir = TempDir::new("apilb-mf-pods");
    let (config, files) = config_naming_every_file(&dir.0, true);

    let text = manifest(None, "static-pod", &config);
    let pod: Pod = parse_strict(&text).expect("static pod, strictly");
    assert_eq!(
        to_yaml(&pod).expect("yaml"),
        text,
        "nothing was lost reading it back"
    );
    assert_eq!(pod.metadata.namespace.as_deref(), Some("kube-system"));
    let n = check_pod_spec(pod.spec.as_ref().expect("spec"), &files, true);
    println!(
        "static pod: {} lines, {n} hostPath mounts",
        text.lines().count()
    );

    let text = manifest(None, "daemonset", &config);
    let ds: DaemonSet = parse_strict(&text).expect("daemonset, strictly");
    assert_eq!(to_yaml(&ds).expect("yaml"), text);
    let spec = ds.spec.as_ref().expect("spec");
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(
        serde_json::to_value(&rolling.max_unavailable).expect("json"),
        serde_json::json!(1)
    );
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let tolerations = pod.tolerations.as_deref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint, control-plane ones included"
    );
    let n = check_pod_spec(pod, &files, true);
    println!(
        "daemonset: {} lines, {n} hostPath mounts",
        text.lines().count()
    );

    // Without node-local mode: no cgroup, and no DaemonSet.
    let (config, files) = config_naming_every_file(&dir.0, false);
    let pod: Pod = parse_strict(&manifest(None, "static-pod", &config)).expect("strict");
    check_pod_spec(pod.spec.as_ref().expect("spec"), &files, false);
    let out = apilb(
        None,
        &[
            "manifest",
            "daemonset",
            "-c",
            config.to_str().expect("path"),
        ],
    );
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("local.enabled = false: a DaemonSet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_refused_config_prints_no_manifest_and_names_key_and_value() {
    let dir = TempDir::new("apilb-mf-bad");
    let config = dir.0.join("bad.toml");
    std::fs::write(
        &config,
        "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"198.51.100.2\"\n\
         [[vip]]\naddress = \"198.51.100.100\"\n\
         [[backend]]\naddress = \"198.51.100.11:6443\"\nweight = -1\n\
         [health]\nkind = \"tcp\"\n",
    )
    .expect("config");
    for form in ["static-pod", "daemonset", "systemd"] {
        let out = apilb(
            None,
            &["manifest", form, "-c", config.to_str().expect("path")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{form}: {}", stderr.trim());
        assert_eq!(out.status.code(), Some(1), "{form}");
        assert!(out.stdout.is_empty(), "{form} printed a manifest");
        assert!(stderr.contains("backend[0].weight = -1"), "{stderr}");
    }
}

/// Capability names from a `/proc/<pid>/status` mask, as `capsh --decode` gives
/// them: `cap_bpf`.
#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = TempDir::new("apilb-mf-verify");
    let (config, _) = config_naming_every_file(&dir.0, true);
    let unit = manifest(None, "systemd", &config);
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert_eq!(
        exec,
        format!("{} run -c {}", apilb_bin().display(), config.display())
    );
    let caps: Vec<&str> = CAPABILITIES.iter().map(|c| c.name).collect();
    for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        assert!(
            unit.lines()
                .any(|l| l == format!("{key}{}", caps.join(" "))),
            "{key}:\n{unit}"
        );
    }
    let path = dir.0.join("apilb.service");
    std::fs::write(&path, &unit).expect("unit");
    // `Documentation=man:apilb(1)`: verify runs `man apilb`, which finds the page
    // `apilb man` printed, installed as an operator would.
    let man1 = dir.0.join("man/man1");
    std::fs::create_dir_all(&man1).expect("man1");
    let page = apilb(None, &["man"]);
    assert!(page.status.success() && !page.stdout.is_empty());
    std::fs::write(man1.join("apilb.1"), &page.stdout).expect("apilb.1");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.0.join("man"))
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "systemd-analyze verify: {} ({} lines)\n{said}",
        out.status,
        said.lines().count()
    );
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("apilb.service") || l.contains(dir.0.to_str().expect("path")))
        .collect();
    assert!(
        about_unit.is_empty(),
        "warnings about the unit: {about_unit:?}"
    );
    assert!(out.status.success(), "{said}");
}

/// A podman container running systemd as its PID 1; removed on drop.
struct SystemdContainer {
    name: String,
}

impl SystemdContainer {
    /// Boot systemd in the network namespace `netns`, with the host's root as a
    /// throw-away overlay, `unit` installed as `apilb.service` (its boot unit),
    /// `dir` and `bin` bound at their own paths and bpffs shared with the host.
    fn boot(netns: &str, unit: &Path, dir: &Path, bin: &Path) -> Self {
        let name = format!("apilb-mf-unit-{}", std::process::id());
        let _ = Command::new("podman").args(["rm", "-f", &name]).output();
        let bind = |p: &Path, opt: &str| format!("{0}:{0}{opt}", p.display());
        tests::netns::run(
            "podman",
            &[
                // crun refuses this machine's hybrid cgroup layout; runc takes it.
                "--runtime",
                "runc",
                "run",
                "-d",
                "--name",
                &name,
                // systemd as PID 1 needs its cgroups and mount namespaces; the unit
                // is what bounds apilb.
                "--privileged",
                "--systemd=always",
                // Podman's default rlimits are above this machine's, and raising
                // one needs CAP_SYS_RESOURCE.
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=4096:4096",
                "--network",
                &format!("ns:/run/netns/{netns}"),
                // Fresh /tmp and /run (copying the host's up races with other tests).
                "--tmpfs",
                "/tmp:rw,notmpcopyup",
                "--tmpfs",
                "/run:rw,notmpcopyup",
                "-v",
                &bind(dir, ""),
                "-v",
                &bind(bin, ":ro"),
                "-v",
                &format!("{}:/etc/systemd/system/apilb.service:ro", unit.display()),
                "-v",
                &bind(Path::new(BPFFS), ""),
                "--rootfs",
                "/:O",
                "/lib/systemd/systemd",
                "--unit=apilb.service",
            ],
        );
        Self { name }
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .args(["exec", &self.name])
            .args(args)
            .output()
            .expect("podman exec")
    }

    fn systemctl(&self, args: &[&str]) -> String {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// What systemd and the journal say about apilb, for failure messages.
    fn story(&self) -> String {
        let status = self.exec(&["systemctl", "status", "--no-pager", "-l", "apilb.service"]);
        let journal = self.exec(&[
            "journalctl",
            "--no-pager",
            "-n",
            "40",
            "-u",
            "apilb.service",
        ]);
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&journal.stdout)
        )
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

/// `reloads_applied` from `/status`, read in the LB namespace.
fn reloads_applied(t: &Topology) -> u64 {
    let text = t
        .lb()
        .exec("curl", &["-sf", "http://127.0.0.1:9464/status"]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
    v["reloads_applied"].as_u64().expect("counter")
}

/// An LB node of the `tests::cluster` topology with its three echo masters, the
/// pins and directory of one test, and an `apilb run` config for it.
struct LbNode {
    t: Topology,
    _servers: Vec<tests::live::EchoServer>,
    _pins: PinDir,
    dir: TempDir,
    config: PathBuf,
}

impl LbNode {
    fn new(prefix: &str) -> Self {
        Self::with(prefix, "")
    }

    /// [`Self::new`], with `more` sections after `[health]` (e.g. `[local]`).
    fn with(prefix: &str, more: &str) -> Self {
        let t = Topology::new(prefix);
        let servers = echo_masters(&t, LIFETIME);
        let pins = PinDir::new(prefix);
        let dir = TempDir::new(prefix);
        let config = dir.0.join("apilb.toml");
        std::fs::write(
            &config,
            apilb_config(
                &pins.instance(),
                "nat_ports = [40000, 40999]\nmaglev_size = 1009",
                &format!(
                    "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\n{more}"
                ),
            ),
        )
        .expect("config");
        Self {
            t,
            _servers: servers,
            _pins: pins,
            dir,
            config,
        }
    }

    fn netns(&self) -> String {
        self.t.lb().name().to_owned()
    }

    /// Wait (at most 60 s) until `apilb status` in the LB namespace shows the three
    /// masters healthy; its table. `story` explains a failure.
    fn wait_healthy(&self, story: impl Fn() -> String) -> String {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let out = apilb(Some(&self.netns()), &["status"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let healthy = MASTERS
                .iter()
                .filter(|m| text.lines().any(|l| l.contains(*m) && l.contains(" yes ")))
                .count();
            if healthy == MASTERS.len() {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no healthy status within 60 s: {text}\n{}",
                story()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// 30 connections through the VIP reach all three masters, none failing.
    fn balances(&self, story: impl Fn() -> String) {
        let (by, failed) = tests::live::spread(&self.t.client, sa(VIP), 30);
        assert_eq!((by.len(), failed), (3, 0), "{by:?}\n{}", story());
        println!("30 connections through the VIP: {by:?}");
    }
}

/// The capability sets of a process (`/proc/<pid>/status`) hold exactly apilb's
/// capabilities; `NoNewPrivs` is set.
fn assert_exact_caps(proc_status: &str, who: &str) {
    let field = |k: &str| status_field(proc_status, k);
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|c| c.name.to_lowercase()).collect();
    for k in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let mask = field(k);
        assert_eq!(decode_caps(&mask), wanted, "{who}: {k} {mask}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{who}");
    println!("{who}: CapEff {} = {wanted:?}", field("CapEff:"));
}

#[test]
fn the_unit_runs_under_systemd_and_apilb_status_answers() {
    let node = LbNode::new("apilb-mf-unit");
    let lb = node.netns();
    // Generated on the node itself: the config names its interfaces.
    let unit_text = manifest(Some(&lb), "systemd", &node.config);
    let unit = node.dir.0.join("apilb.service");
    std::fs::write(&unit, &unit_text).expect("unit");

    let started = Instant::now();
    let systemd = SystemdContainer::boot(&lb, &unit, &node.dir.0, &apilb_bin());
    let status = node.wait_healthy(|| systemd.story());
    println!(
        "systemd booted and apilb reported 3 healthy masters after {:?}:\n{status}",
        started.elapsed()
    );
    assert_eq!(systemd.systemctl(&["is-active", "apilb.service"]), "active");

    // The process holds exactly the unit's capabilities (ambient ones too), as
    // root's uid.
    let pid = systemd.systemctl(&["show", "-p", "MainPID", "--value", "apilb.service"]);
    let proc_status = systemd.exec(&["cat", &format!("/proc/{pid}/status")]);
    let proc_status = String::from_utf8_lossy(&proc_status.stdout).into_owned();
    assert_exact_caps(&proc_status, "apilb under systemd");
    let amb = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapAmb:"))
        .expect("CapAmb");
    assert_eq!(
        decode_caps(amb.trim()).len(),
        CAPABILITIES.len(),
        "ambient {amb}"
    );

    node.balances(|| systemd.story());

    // ExecReload: systemctl reload sends SIGHUP, and apilb applies the config.
    let before = reloads_applied(&node.t);
    let out = systemd.exec(&["systemctl", "reload", "apilb.service"]);
    assert!(out.status.success(), "reload: {}", systemd.story());
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads_applied(&node.t) == before {
        assert!(Instant::now() < deadline, "no reload: {}", systemd.story());
        thread::sleep(Duration::from_millis(100));
    }
    println!("reloads_applied {before} -> {}", reloads_applied(&node.t));

    // systemctl stop: a clean exit, the datapath left pinned for the next start.
    let out = systemd.exec(&["systemctl", "stop", "apilb.service"]);
    assert!(out.status.success(), "stop: {}", systemd.story());
    assert_eq!(
        systemd.systemctl(&["show", "-p", "ExecMainStatus", "--value", "apilb.service"]),
        "0",
        "{}",
        systemd.story()
    );
    assert!(node.t.lb_has_xdp(), "the pinned datapath outlives the unit");
    drop(systemd);
}

/// An image of the `apilb` binary this test runs, with the shared libraries it and
/// `/bin/sh` and `curl` need (podman runs a pod's httpGet probe as `curl` in the
/// container), from scratch with buildah: no registry. Removed on drop.
struct TestImage(String);

impl TestImage {
    fn build(name: &str) -> Self {
        let reference = format!("localhost/{name}:test");
        let ctr = tests::netns::run("buildah", &["from", "scratch"]);
        let ctr = ctr.trim();
        let copy = |from: &Path, to: &Path| {
            tests::netns::run(
                "buildah",
                &[
                    "copy",
                    ctr,
                    from.to_str().expect("path"),
                    to.to_str().expect("path"),
                ],
            );
        };
        let curl = PathBuf::from("/usr/bin/curl");
        let sh = PathBuf::from("/bin/sh");
        let mut libs = BTreeSet::new();
        for bin in [apilb_bin(), curl.clone(), sh.clone()] {
            let ldd = tests::netns::run("ldd", &[bin.to_str().expect("path")]);
            libs.extend(
                ldd.split_whitespace()
                    .filter(|w| w.starts_with('/'))
                    .map(PathBuf::from),
            );
        }
        for lib in &libs {
            copy(lib, lib);
        }
        copy(&apilb_bin(), Path::new(IMAGE_BINARY));
        copy(&curl, &curl);
        copy(&sh, &sh);
        tests::netns::run(
            "buildah",
            &["config", "--env", "PATH=/usr/local/bin:/usr/bin:/bin", ctr],
        );
        tests::netns::run("buildah", &["commit", "--rm", ctr, &reference]);
        println!(
            "image {reference}: apilb, sh, curl and {} libraries",
            libs.len()
        );
        Self(reference)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
    }
}

/// A pod `podman kube play` started; removed on drop.
struct PlayedPod(String);

impl Drop for PlayedPod {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["pod", "rm", "-f", "-t", "2", &self.0])
            .output();
    }
}

/// The pod's liveness probe as podman runs it (curl of its httpGet, in the pod,
/// whose network is the node's, as the kubelet's probe would be): once, since
/// podman schedules probes with systemd timers and PID 1 here is not systemd.
fn liveness_probe_passes(lb: &str, container: &str, story: &dyn Fn() -> String) {
    let probe = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{lb}"))
        .args(["podman", "healthcheck", "run", container])
        .output()
        .expect("podman healthcheck");
    let health = tests::netns::run(
        "podman",
        &[
            "inspect",
            "--format",
            "{{.State.Health.Status}} {{json .Config.Healthcheck.Test}}",
            container,
        ],
    );
    println!("liveness probe: {}, {}", probe.status, health.trim());
    assert!(
        probe.status.success() && health.starts_with("healthy "),
        "liveness: {health} {}\n{}",
        String::from_utf8_lossy(&probe.stderr),
        story()
    );
}

#[test]
fn the_static_pod_runs_under_podman_kube_play() {
    let node = LbNode::new("apilb-mf-pod");
    let name = format!("apilb-mf-pod-{}", std::process::id());
    let image = TestImage::build(&name);
    let yaml = manifest_with(
        Some(&node.netns()),
        "static-pod",
        &node.config,
        &["--image", &image.0],
    );
    let pod: Pod = parse_strict(&yaml).expect("strict");
    plays(&node, &name, pod, "the static pod");
    drop(image);
}

/// The `DaemonSet`'s pod, as its controller would create it on a node: the
/// template's spec under a name of its own (podman plays pods, not `DaemonSet`s),
/// with node-local mode on, as the `DaemonSet` form requires.
#[test]
fn the_daemonset_pod_runs_under_podman_kube_play() {
    let node = LbNode::with("apilb-mf-ds", "[local]\nenabled = true\n");
    let name = format!("apilb-mf-ds-{}", std::process::id());
    let image = TestImage::build(&name);
    let yaml = manifest_with(
        Some(&node.netns()),
        "daemonset",
        &node.config,
        &["--image", &image.0],
    );
    let ds: DaemonSet = parse_strict(&yaml).expect("strict");
    let template = ds.spec.expect("spec").template;
    let pod = Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: template.spec,
        ..Pod::default()
    };
    plays(&node, &name, pod, "the DaemonSet's pod");
    drop(image);
}

/// Start `pod` under `podman kube play` in `node`'s network namespace, as the
/// kubelet would with `hostNetwork`, named `name`: apilb in it reports the three
/// masters healthy, holds exactly its capabilities, passes its liveness probe
/// and balances; its pinned datapath outlives it.
fn plays(node: &LbNode, name: &str, mut pod: Pod, what: &str) {
    let lb = node.netns();
    // Under a name of this test's own. Podman 4.3's kube play ignores the
    // container's `seccompProfile` (its default filter refuses bpf(2) without
    // CAP_SYS_ADMIN: every map apilb creates, EPERM), so the test says
    // `Unconfined` again in the annotation podman reads.
    pod.metadata.name = Some(name.to_owned());
    let seccomp = pod.spec.as_ref().expect("spec").containers[0]
        .security_context
        .as_ref()
        .and_then(|sc| sc.seccomp_profile.as_ref())
        .map(|p| p.type_.clone());
    assert_eq!(seccomp.as_deref(), Some("Unconfined"));
    pod.metadata.annotations = Some(
        [(
            "container.seccomp.security.alpha.kubernetes.io/apilb".to_owned(),
            "unconfined".to_owned(),
        )]
        .into(),
    );
    let play = node.dir.0.join("pod.yaml");
    std::fs::write(&play, to_yaml(&pod).expect("yaml")).expect("pod.yaml");

    // What the README asks of the node, as a pod's /proc/sys is read-only.
    for sysctl in [
        "net.ipv4.conf.eth0.accept_local=1",
        "net.ipv4.ip_local_reserved_ports=40000-40999",
    ] {
        node.t.lb().exec("sysctl", &["-qw", sysctl]);
    }
    // runc, as for the unit's test; rlimits no higher than this machine's.
    let conf = node.dir.0.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
         [engine]\nruntime = \"runc\"\n",
    )
    .expect("containers.conf");
    // hostNetwork: the pod shares podman's network namespace, here the LB node's.
    let started = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{lb}"))
        .args(["podman", "kube", "play"])
        .arg(&play)
        .env("CONTAINERS_CONF", &conf)
        .output()
        .expect("podman kube play");
    let played = PlayedPod(name.to_owned());
    let container = format!("{name}-apilb");
    let story = || {
        let logs = Command::new("podman")
            .args(["logs", &container])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        format!("podman logs {container}:\n{logs}")
    };
    assert!(
        out.status.success(),
        "kube play: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = node.wait_healthy(story);
    println!(
        "{what} reported 3 healthy masters after {:?}:\n{status}",
        started.elapsed()
    );
    let pid = tests::netns::run(
        "podman",
        &["inspect", "--format", "{{.State.Pid}}", &container],
    );
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).expect("status");
    assert_exact_caps(&proc_status, &format!("apilb in {what}"));
    liveness_probe_passes(&lb, &container, &story);
    node.balances(story);
    assert!(
        tests::netns::run("podman", &["ps", "--format", "{{.Names}} {{.Status}}"])
            .lines()
            .any(|l| l.starts_with(&container) && l.contains("Up")),
        "still up: {}",
        story()
    );
    drop(played);
    assert!(node.t.lb_has_xdp(), "the pinned datapath outlives the pod");
}
