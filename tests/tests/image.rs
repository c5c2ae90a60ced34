//! apilb's container image, built as `cargo xtask image` builds it
//! (`xtask::image::build`), under a real container runtime, Debian's podman: the
//! image holds one statically linked `/apilb` and nothing else, no shell; `apilb
//! check` validates a config in it; `apilb run` in it, as an unprivileged user
//! holding exactly the capabilities `lb_userspace::privilege::CAPABILITIES`
//! names, with the LB node's network, a bpffs, and the config and CA mounted
//! read-only, balances https connections over three stub apiservers; stopped, it
//! leaves no pin and no XDP program, and the test no container or image. Root;
//! skipped, saying so, where podman is not installed (`cargo xtask setup`
//! installs it).
//!
//! What podman is given beyond the capabilities, each for a reason:
//! - `--network ns:/run/netns/<LB node>`: the test's LB namespace, as a pod's
//!   `hostNetwork` is the node's (never the machine's own network).
//! - `--user 65532:65532`: apilb needs no root user, only its capabilities, which
//!   podman makes ambient for a user other than root. Not being uid 0 is what
//!   keeps the next option narrow.
//! - `--security-opt unmask=/proc/sys`: /proc/sys is read-only in a container, and
//!   apilb writes two sysctls of its network namespace (`accept_local` on its
//!   interface, `ip_local_reserved_ports`). runc refuses a mount inside /proc, so
//!   the `net` subtree cannot be opened alone. Unmasked, the sysctls are writable
//!   by whoever the kernel lets: the network namespace's ones by `CAP_NET_ADMIN`,
//!   which apilb holds anyway, and the rest only by uid 0, which apilb is not. (To
//!   root in the container, with no capability at all, every sysctl would be
//!   writable, `kernel.core_pattern` among them.)
//! - `--security-opt seccomp=<profile>`: podman's default seccomp profile
//!   (containers-common 0.50, Debian 12's) allows bpf(2) only to `CAP_SYS_ADMIN`.
//!   The profile given is that default with bpf(2) allowed to `CAP_BPF` too, as
//!   moby's default profile allows it, and nothing else changed.
//! - `-v <bpffs>:/sys/fs/bpf`: a bpffs of the test's own whose root the user owns,
//!   as an operator gives apilb's user its pin directory (`/sys/fs/bpf/apilb`):
//!   apilb creates and removes its pins there itself.
//! - `--runtime runc`: crun 1.8, podman's first choice on Debian 12, refuses a
//!   hybrid cgroup hierarchy whose cgroup2 holds controllers, as this machine's
//!   does ("cgroups in hybrid mode not supported").
//! - `--ulimit nofile=4096:4096 --ulimit nproc=4096:4096`: podman's defaults for
//!   root (2^20 and 2^22) exceed this machine's hard limits, and only
//!   `CAP_SYS_RESOURCE`, which root lacks here, may raise those. apilb holds a few
//!   dozen descriptors and threads.
//! - Storage: `--root`, `--runroot` and `--tmpdir` in the test's temporary
//!   directory, the vfs driver (nothing mounted) and events to a file there:
//!   the machine's own container storage is never touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_userspace::privilege::CAPABILITIES;

use tests::{
    cluster::{MASTERS, Topology, VIP_ADDR, apilb_config},
    least::{decode_caps, status_field},
    live::{TempDir, https_via_vip, master_names, stub_apiservers},
    netns,
    pki::Pki,
};
use xtask::image::{BINARY, CONFIG};

const PREFIX: &str = "apilb-im";
/// Where the CA is mounted in the container.
const CA: &str = "/etc/apilb/ca.pem";
/// https requests through the VIP: each of three masters gets one unless the
/// hash is broken (a fair spread misses one with a chance of 3 x (2/3)^60).
const N: usize = 60;
/// The user apilb runs as: no name in the image, which has no `/etc/passwd`.
const USER: &str = "65532:65532";
const UID: u32 = 65532;
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

#[test]
fn the_image_holds_only_a_static_apilb_and_balances_three_masters_under_podman_with_apilbs_capabilities()
 {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("image: skipped: podman is not installed (`cargo xtask setup` installs it)");
        return;
    }
    Bpffs::sweep();
    let dir = TempDir::new(PREFIX);
    let started = Instant::now();
    let image = xtask::image::build(&dir.0.join("image")).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "image: {} ({} bytes, {}) built in {:.1} s",
        image.name,
        image.bytes,
        image.digest,
        started.elapsed().as_secs_f64()
    );

    let t = Topology::new(PREFIX);
    let pki = Pki::generate(&dir.0, &master_names(), &[VIP_ADDR.parse().expect("vip")]);
    let _stubs = stub_apiservers(&t, &pki, &dir.0);
    let bpffs = Bpffs::mount(&dir.0.join("bpffs"));
    let instance = format!("{PREFIX}-{}", std::process::id());
    let config = dir.0.join("apilb.toml");
    let text = apilb_config(&instance, "", &format!("ca_file = \"{CA}\""));
    std::fs::write(&config, text).expect("config");

    // Declared last, dropped first: its containers go before the bpffs and the
    // namespaces they use.
    let podman = Podman::new(&dir.0.join("podman"));
    let archive = image.archive.to_str().expect("utf-8 path");
    podman.ok(&["load", "--quiet", "--input", archive]);
    let reference = format!("localhost/{}", image.name);
    image_is_what_xtask_built(&podman, &reference, &image);
    image_holds_only_a_static_apilb(&podman, &reference);

    let node = Node {
        network: format!("ns:/run/netns/{}", t.lb().name()),
        mounts: vec![
            "-v".to_owned(),
            format!("{}:/sys/fs/bpf", bpffs.0.display()),
            "-v".to_owned(),
            format!("{}:{CONFIG}:ro", config.display()),
            "-v".to_owned(),
            format!("{}:{CA}:ro", pki.ca_pem.display()),
        ],
    };
    let mut check = vec!["run", "--rm", "--network", node.network.as_str()];
    check.extend(["--user", USER, "--cap-drop", "ALL"]);
    check.extend(ULIMITS);
    check.extend(strs(&node.mounts));
    check.extend([reference.as_str(), "check", "-c", CONFIG]);
    let check = podman.ok(&check);
    eprintln!("image: apilb check in the container: {}", check.trim());
    assert!(check.contains(": valid: 1 VIP(s), 3 backend(s)"), "{check}");

    let seccomp = dir.0.join("seccomp.json");
    std::fs::write(&seccomp, seccomp_allowing_bpf(&podman).to_string()).expect("profile");
    let name = start_apilb(&podman, &reference, &node, &seccomp);
    let deadline = Instant::now() + Duration::from_secs(30);
    while https_via_vip(&t.client, &pki.ca_pem, "/version").is_none() {
        assert!(
            Instant::now() < deadline,
            "nothing answers through the VIP; the container's log:\n{}",
            podman.logs(&name)
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (uid, caps) = identity(&podman, &name);
    let granted: BTreeSet<String> = CAPABILITIES.iter().map(|c| c.name.to_lowercase()).collect();
    eprintln!("image: apilb runs in the container as uid {uid} with {caps:?}");
    assert_eq!(
        (uid, caps),
        (UID.to_string(), granted),
        "apilb's user and capabilities"
    );
    every_master_serves_and_is_up(&podman, &name, &t, &pki);

    podman.ok(&["stop", "--time", "10", &name]);
    let code = podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    let log = podman.logs(&name);
    assert_eq!(code.trim(), "0", "apilb's exit code; its log:\n{log}");
    assert!(
        log.contains("detached the datapath, removed its pins"),
        "{log}"
    );
    let pins = bpffs.0.join("apilb").join(&instance);
    assert!(
        !pins.exists() && !t.lb_has_xdp(),
        "the stopped container left pins or XDP behind"
    );
    podman.ok(&["rm", &name]);
    podman.ok(&["rmi", &reference]);
    let left = podman.ok(&["ps", "--all", "--quiet"]) + &podman.ok(&["images", "--quiet"]);
    assert_eq!(left.trim(), "", "containers or images left");
    eprintln!(
        "image: stopped with exit code 0, no pins, no XDP, no container or image left; \
         {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// What every container of the test shares: the LB node's network namespace, its
/// bpffs, and the config and CA mounted read-only.
struct Node {
    network: String,
    mounts: Vec<String>,
}

/// Start `apilb run` (detaching on exit) in a container, as [`USER`] with exactly
/// apilb's capabilities, the seccomp profile at `seccomp` and the node's mounts;
/// return its name.
fn start_apilb(podman: &Podman, reference: &str, node: &Node, seccomp: &Path) -> String {
    let name = format!("{PREFIX}-{}", std::process::id());
    let mut run: Vec<String> = [
        "run",
        "--detach",
        "--name",
        name.as_str(),
        "--network",
        node.network.as_str(),
    ]
    .map(str::to_owned)
    .into();
    run.extend(["--user", USER, "--cap-drop", "ALL"].map(str::to_owned));
    for cap in CAPABILITIES {
        run.extend(["--cap-add".to_owned(), cap.name.to_owned()]);
    }
    run.extend([
        "--security-opt".to_owned(),
        format!("seccomp={}", seccomp.display()),
        "--security-opt".to_owned(),
        "unmask=/proc/sys".to_owned(),
    ]);
    run.extend(ULIMITS.map(str::to_owned));
    run.extend(node.mounts.iter().cloned());
    run.extend([reference, "run", "-c", CONFIG, "--detach-on-exit"].map(str::to_owned));
    podman.ok(&strs(&run));
    name
}

/// [`N`] https requests from the client namespace through the VIP reach all three
/// masters, and `apilb status` in the container shows each one healthy and in
/// rotation.
fn every_master_serves_and_is_up(podman: &Podman, name: &str, t: &Topology, pki: &Pki) {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..N {
        match https_via_vip(&t.client, &pki.ca_pem, "/version") {
            Some(master) => *by.entry(master).or_insert(0) += 1,
            None => failed += 1,
        }
    }
    eprintln!("image: {N} https requests through the VIP: {by:?}, {failed} failed");
    assert_eq!(
        (by.len(), failed),
        (3, 0),
        "{by:?}; the container's log:\n{}",
        podman.logs(name)
    );

    // The snapshot behind /status is republished every second.
    thread::sleep(Duration::from_millis(1100));
    let status = podman.ok(&["exec", name, BINARY, "status"]);
    eprintln!("image: apilb status in the container:\n{status}");
    for m in MASTERS {
        assert!(
            status.lines().any(|l| l.contains(m) && l.contains(" yes ")),
            "{m} healthy and in rotation in:\n{status}"
        );
    }
}

/// The labels xtask set, the entrypoint and the default command, as podman reads
/// them from the loaded image.
fn image_is_what_xtask_built(podman: &Podman, reference: &str, image: &xtask::image::Image) {
    let inspect = podman.ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        reference,
    ]);
    let config: serde_json::Value = serde_json::from_str(&inspect).expect("podman's JSON");
    for (key, value) in &image.labels {
        assert_eq!(config["Labels"][key], value.as_str(), "label {key}");
    }
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(config["Entrypoint"], serde_json::json!([BINARY]));
    assert_eq!(
        BINARY,
        lb_userspace::manifest::IMAGE_BINARY,
        "the pods `apilb manifest` prints run the image's binary"
    );
    assert_eq!(config["Cmd"], serde_json::json!(["run", "-c", CONFIG]));
}

/// The image's files: `/apilb` alone (so no shell), statically linked (no
/// program interpreter, no shared library needed).
fn image_holds_only_a_static_apilb(podman: &Podman, reference: &str) {
    let root = PathBuf::from(podman.ok(&["image", "mount", reference]).trim());
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let binary = root.join(BINARY.trim_start_matches('/'));
    let headers = netns::run("readelf", &["-lW", binary.to_str().expect("utf-8")]);
    let dynamic = netns::run("readelf", &["-dW", binary.to_str().expect("utf-8")]);
    podman.ok(&["image", "unmount", reference]);
    assert_eq!(files, [BINARY], "the image's files");
    assert!(
        !headers.contains("INTERP") && !dynamic.contains("(NEEDED)"),
        "{BINARY} is not static:\n{headers}\n{dynamic}"
    );
    eprintln!("image: its only file is {BINARY}, statically linked");
}

/// Every file and directory under `dir`, as `/<path>` from `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir)
        .expect("read the image's files")
        .flatten()
    {
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("under the root");
        out.push(format!("/{}", rel.display()));
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &path, out);
        }
    }
}

/// The user and the effective capabilities of the container's process, as the
/// kernel has them (`/proc/<pid>/status`; the capabilities decoded by `capsh`, as
/// lower-case names, `cap_bpf`).
fn identity(podman: &Podman, name: &str) -> (String, BTreeSet<String>) {
    let pid = podman.ok(&["inspect", "--format", "{{.State.Pid}}", name]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).expect("status");
    let uid = status_field(&status, "Uid:")
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    (uid, decode_caps(&status_field(&status, "CapEff:")))
}

/// podman's default seccomp profile, with bpf(2) allowed to `CAP_BPF` as well as
/// `CAP_SYS_ADMIN`, as moby's default profile allows it. The default's rule that
/// answers EPERM to a process without `CAP_SYS_ADMIN` keeps its other syscalls;
/// bpf(2) gets EPERM only without either capability.
fn seccomp_allowing_bpf(podman: &Podman) -> serde_json::Value {
    let path = podman.ok(&["info", "--format", "{{.Host.Security.SECCOMPProfilePath}}"]);
    let text = std::fs::read_to_string(path.trim())
        .unwrap_or_else(|e| panic!("podman's seccomp profile {}: {e}", path.trim()));
    let mut profile: serde_json::Value = serde_json::from_str(&text).expect("the profile's JSON");
    let rules = profile["syscalls"].as_array_mut().expect("syscalls");
    for rule in rules.iter_mut() {
        let denies_without_sys_admin = rule["action"] == "SCMP_ACT_ERRNO"
            && rule["excludes"]["caps"]
                .as_array()
                .is_some_and(|caps| caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
        if denies_without_sys_admin && let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != "bpf");
        }
    }
    rules.push(serde_json::json!({
        "names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}
    }));
    rules.push(serde_json::json!({
        "names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
        "excludes": {"caps": ["CAP_BPF", "CAP_SYS_ADMIN"]}
    }));
    profile
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A bpffs of the test's own, its root owned by [`USER`] (mode 0700), for the
/// container's `/sys/fs/bpf`. Unmounted on drop, which unpins whatever is left
/// (a pinned XDP link detaches with its last reference); one a killed run left
/// behind is unmounted by the next.
struct Bpffs(PathBuf);

impl Bpffs {
    /// Unmount the bpffs a killed run left in its temporary directory (before
    /// [`TempDir::new`] removes that directory).
    fn sweep() {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        for point in mounts
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{PREFIX} ")))
        {
            let point = point.split_whitespace().next().unwrap_or_default();
            let owner = Path::new(point).parent().and_then(Path::file_name);
            if owner.is_some_and(|o| netns::left_by_dead_process(&o.to_string_lossy(), PREFIX)) {
                let _ = Command::new("umount").arg(point).status();
            }
        }
    }

    fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let point = path.to_str().expect("utf-8 path");
        netns::run("mount", &["-t", "bpf", PREFIX, point]);
        let fs = Self(path.to_owned());
        std::os::unix::fs::chown(path, Some(UID), Some(UID)).expect("chown the bpffs");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        fs
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// podman with a storage, state and events of its own under a directory of the
/// test's; every container and image in it is removed on drop.
struct Podman {
    /// The options before every subcommand.
    global: Vec<String>,
}

impl Podman {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("tmp")).expect("podman's directory");
        let path = |d: &str| dir.join(d).to_str().expect("utf-8 path").to_owned();
        let mut global = vec!["--root".to_owned(), path("root"), "--runroot".to_owned()];
        global.extend([path("run"), "--tmpdir".to_owned(), path("tmp")]);
        global.extend(
            ["--storage-driver", "vfs", "--events-backend", "file"]
                .into_iter()
                .chain(["--runtime", "runc"])
                .map(str::to_owned),
        );
        Self { global }
    }

    /// `podman <args>`: its standard output; panics with its error if it fails.
    fn ok(&self, args: &[&str]) -> String {
        netns::run("podman", &[strs(&self.global), args.to_vec()].concat())
    }

    /// A container's log (apilb logs to stderr, which podman keeps with stdout).
    fn logs(&self, name: &str) -> String {
        Command::new("podman")
            .args(&self.global)
            .args(["logs", name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["rmi", "--all", "--force"],
        ] {
            let _ = Command::new("podman")
                .args(&self.global)
                .args(args)
                .output();
        }
    }
}
