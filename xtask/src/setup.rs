//! `cargo xtask setup`: install the build and test dependencies, idempotently.
//!
//! The facts behind each step are in shared TOOLCHAIN.md: the eBPF crate builds on
//! stable with `RUSTC_BOOTSTRAP=1 -Z build-std=core`, which needs `rust-src`, and
//! links with bpf-linker built against Debian's LLVM 22 (`LLVM_PREFIX` is required,
//! or the link fails with "unable to find library -lLLVM").

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{exec, step};

/// Debian packages: LLVM 22 for bpf-linker; protoc and the well-known `.proto`
/// files it imports (libprotobuf-dev, only a recommendation of protoc's package)
/// for etcd-client's generated code; iproute2, procps, ethtool, util-linux
/// (nsenter, and setpriv and unshare for the least-privilege tests), libcap2-bin
/// (capsh, which names a process's capabilities) and curl for the tests' namespaces; keepalived and etcd-server, the
/// real peers of the election tests; nftables, which makes a test master refuse or
/// reject SYNs; haproxy and iptables, what the master-failure benchmark compares
/// apilb with; nginx and its stream module (a separate package on Debian, loaded
/// with `load_module`), the node-local proxy the local benchmark compares apilb
/// with; wrk, the end-to-end benchmark's load generator; qemu, musl-tools (ring
/// builds C for the static binaries), busybox-static, cpio, xz-utils and zstd
/// (Debian's and Ubuntu's compressed modules) for `vm-test`; buildah, which builds
/// the container image, and podman with runc (crun, its default, refuses this
/// kind of machine's hybrid cgroup hierarchy), catatonit (the pause process of
/// `podman kube play`) and capsh (libcap2-bin), which run and inspect it in the
/// image and manifest tests; systemd, for `systemd-analyze` and a systemd to boot
/// in a container, where `tests/tests/manifest.rs` starts the unit, and man-db,
/// whose `man` that test's `systemd-analyze verify` runs to check the unit's
/// `Documentation=man:apilb(1)`; prometheus, for
/// the `promtool` that tests the shipped alerting rules (only `promtool` runs;
/// without systemd as PID 1, as on this project's machines, no package starts a
/// service).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "protobuf-compiler",
    "libprotobuf-dev",
    "iproute2",
    "procps",
    "ethtool",
    "util-linux",
    "libcap2-bin",
    "curl",
    "keepalived",
    "etcd-server",
    "nftables",
    "haproxy",
    "iptables",
    "nginx",
    "libnginx-mod-stream",
    "wrk",
    "qemu-system-x86",
    "musl-tools",
    "busybox-static",
    "cpio",
    "xz-utils",
    "zstd",
    "prometheus",
    "buildah",
    "podman",
    "runc",
    "catatonit",
    "systemd",
    "man-db",
];
/// The bpf-linker release known to work with rustc 1.95's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    apt()?;
    rust_components()?;
    bpf_linker()?;
    kubectl()?;
    step("setup complete");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step(&format!(
            "apt packages already installed: {}",
            APT_PACKAGES.join(" ")
        ));
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "apt packages missing ({}) and not running as root to install them",
            missing.join(" ")
        );
    }
    step(&format!("installing apt packages: {}", missing.join(" ")));
    exec(Command::new("apt-get").arg("update").arg("-q"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // On a systemd host nginx's postinst starts and enables its daemon (on :80); the
    // benchmark runs its own nginx in a namespace, and nothing else wants one.
    if missing.contains(&"nginx")
        && Command::new("systemctl")
            .args(["is-active", "--quiet", "nginx.service"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        step("stopping and disabling the nginx service the package started");
        exec(Command::new("systemctl").args(["disable", "--now", "nginx.service"]))?;
    }
    Ok(())
}

/// The rustup components: rust-src (the eBPF crate builds `core` from source) and
/// rustfmt (`cargo xtask test` checks formatting first).
fn rust_components() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("rustup is needed to add rust-src and rustfmt")?;
    let installed = String::from_utf8_lossy(&out.stdout).into_owned();
    for component in ["rust-src", "rustfmt"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            step(&format!("{component} already installed"));
            continue;
        }
        step(&format!(
            "installing {component} (rustup component add {component})"
        ));
        exec(Command::new("rustup").args(["component", "add", component]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && out.status.success()
    {
        step(&format!(
            "bpf-linker already installed: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"
    ));
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// Where the real-client scenario (`tests/tests/scenarios.rs`) looks for kubectl.
fn kubectl_root() -> PathBuf {
    let xtask = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask
        .parent()
        .unwrap_or(xtask)
        .join("target/tools/kubernetes-client")
}

/// Debian's kubectl (package kubernetes-client) for the real-client scenario,
/// unpacked under `target/tools` rather than installed: a machine may have another
/// kubectl owning `/usr/bin/kubectl` (Google Cloud SDK's, on the development VM),
/// and installing the package would collide with it.
fn kubectl() -> anyhow::Result<()> {
    let root = kubectl_root();
    let bin = root.join("usr/bin/kubectl");
    if bin.exists() {
        step(&format!(
            "kubectl (Debian kubernetes-client) already unpacked: {}",
            bin.display()
        ));
        return Ok(());
    }
    step(&format!(
        "downloading Debian's kubernetes-client and unpacking it under {}",
        root.display()
    ));
    let download = root.with_extension("download");
    // A download an earlier run left half done must not be unpacked.
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    let fetch = || {
        exec(
            Command::new("apt-get")
                .args(["download", "-q", "kubernetes-client"])
                .current_dir(&download),
        )
    };
    if fetch().is_err() {
        step("apt-get download failed; refreshing the package lists and trying again");
        exec(Command::new("apt-get").args(["update", "-q"]))?;
        fetch()?;
    }
    let deb = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_dir_all(&download)?;
    if !bin.exists() {
        bail!("{} is not in the kubernetes-client package", bin.display());
    }
    Ok(())
}
