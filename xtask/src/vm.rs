//! `cargo xtask vm-test`: the datapath loaded and run on other kernels, the
//! distribution kernels users run, each booted in qemu (TCG: a KVM boot hung on
//! this kind of machine, see `../shared/TOOLCHAIN.md`).
//!
//! 1. apilb and the packet-fixture suite are built as static (musl) binaries.
//! 2. Each kernel comes from Debian's archive (`apt-get download` and `dpkg-deb
//!    -x`) and is cached under `target/vm/kernels/<package>_<version>/`.
//! 3. An initramfs holds busybox, iproute2's `ip` with its libraries (busybox's
//!    `ip` has no `netns`), the kernel's `veth` module, the binaries, and an `/init`
//!    that mounts proc, sys, bpffs and cgroup2, runs the suite and powers off.
//! 4. The console is read line by line: libtest's `test <name> ... ok|FAILED`,
//!    and `APILB-VM` lines from `/init`.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, exec, step};

/// Debian 12's kernels: 6.1 LTS (the default) and 6.12 (bookworm's newest).
pub const DEFAULT_KERNELS: [&str; 2] = ["linux-image-amd64", "linux-image-6.12-amd64"];
const MUSL: &str = "x86_64-unknown-linux-musl";
/// A boot and the whole suite, under TCG, must finish within this.
const RUN_LIMIT: Duration = Duration::from_mins(15);

#[derive(clap::Args)]
pub struct Args {
    /// A Debian kernel package (a metapackage such as `linux-image-amd64`, or a
    /// concrete `linux-image-<release>`). Repeat for several. Default: Debian 12's
    /// 6.1 and 6.12.
    #[arg(long = "kernel")]
    kernels: Vec<String>,
}

/// One kernel's result.
struct Row {
    package: String,
    version: String,
    release: String,
    boot: Option<Duration>,
    took: Duration,
    passed: Vec<String>,
    failed: Vec<String>,
    done: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let root = target_dir()?.join("vm");
    let bins = build_static()?;
    let kernels: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|&k| k.to_owned()).collect()
    } else {
        args.kernels.clone()
    };
    let mut rows = Vec::new();
    for meta in &kernels {
        let (package, version) = resolve(meta)?;
        let dir = fetch(&root, &package, &version)?;
        let release = release_of(&dir)?;
        let initrd = initramfs(&root, &dir, &release, &bins)?;
        step(&format!(
            "booting {package} {version} ({release}) in qemu (TCG)"
        ));
        let mut row = boot(
            &dir.join("boot").join(format!("vmlinuz-{release}")),
            &initrd,
        )?;
        row.package = package;
        row.version = version;
        row.release = release;
        rows.push(row);
    }
    println!("\n{}", table(&rows));
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.done || !r.failed.is_empty() || r.passed.is_empty())
        .map(|r| r.release.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("vm-test failed on {}", bad.join(", "));
    }
    Ok(())
}

fn target_dir() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(here.parent().context("xtask has a parent")?.join("target"))
}

/// The static binaries the VM runs: apilb and the packet-fixture test binary.
struct Bins {
    apilb: PathBuf,
    fixtures: PathBuf,
}

fn build_static() -> anyhow::Result<Bins> {
    step(&format!(
        "adding the rust target {MUSL} (skipped if present)"
    ));
    exec(Command::new("rustup").args(["target", "add", MUSL]))?;
    step("building apilb and the packet-fixture suite as static binaries (musl, release)");
    exec(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--target",
        MUSL,
        "-p",
        "lb-userspace",
    ]))?;
    let out = cargo()
        .args([
            "test",
            "--no-run",
            "--release",
            "--target",
            MUSL,
            "-p",
            "tests",
        ])
        .args(["--test", "xdp_fixtures", "--message-format", "json"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the fixture suite for {MUSL} failed");
    }
    let fixtures = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"executable\"") && l.contains("xdp_fixtures"))
        .find_map(|l| {
            let (_, rest) = l.split_once("\"executable\":\"")?;
            Some(PathBuf::from(rest.split_once('"')?.0))
        })
        .context("cargo did not name the fixture binary")?;
    Ok(Bins {
        apilb: target_dir()?.join(MUSL).join("release").join("apilb"),
        fixtures,
    })
}

/// The concrete image package behind `meta` and its candidate version.
fn resolve(meta: &str) -> anyhow::Result<(String, String)> {
    let depends = output(Command::new("apt-cache").args(["depends", meta]))?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .map_or_else(|| meta.to_owned(), str::to_owned);
    let policy = output(Command::new("apt-cache").args(["policy", &package]))?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .with_context(|| format!("no candidate version of {package} in the apt sources"))?;
    Ok((package, version.to_owned()))
}

/// The unpacked package, downloading it unless cached.
fn fetch(root: &Path, package: &str, version: &str) -> anyhow::Result<PathBuf> {
    let dir = root.join("kernels").join(format!("{package}_{version}"));
    if dir.join("boot").exists() {
        step(&format!(
            "kernel {package} {version} already cached: {}",
            dir.display()
        ));
        return Ok(dir);
    }
    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads)?;
    step(&format!("downloading {package} {version}"));
    exec(
        Command::new("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(&downloads),
    )?;
    let deb = std::fs::read_dir(&downloads)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
        })
        .context("apt-get download left no .deb")?;
    // Unpacked beside its final name, then renamed: a cut-off unpack is never
    // taken for a cached kernel.
    let partial = root
        .join("kernels")
        .join(format!("{package}_{version}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &dir)?;
    std::fs::remove_file(&deb)?;
    Ok(dir)
}

/// The kernel release (`uname -r`) of an unpacked image: its `boot/vmlinuz-*`.
fn release_of(dir: &Path) -> anyhow::Result<String> {
    std::fs::read_dir(dir.join("boot"))?
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vmlinuz-").map(str::to_owned)
        })
        .context("no boot/vmlinuz-* in the package")
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin /var
/bin/busybox --install -s
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -s /run /var/run
mount -t bpf bpf /sys/fs/bpf
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "APILB-VM kernel $(uname -r)"
echo "APILB-VM init"
if insmod /lib/veth.ko; then echo "APILB-VM PASS veth module"; else echo "APILB-VM FAIL veth module"; fi
ip link set lo up
/apilb/apilb --version
/apilb/xdp_fixtures --test-threads=1 2>&1
echo "APILB-VM DONE"
poweroff -f
"#;

/// Build the initramfs for the kernel unpacked at `dir`.
fn initramfs(root: &Path, dir: &Path, release: &str, bins: &Bins) -> anyhow::Result<PathBuf> {
    let stage = root.join(format!("initramfs-{release}"));
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["bin", "lib", "apilb", "usr/local/bin"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))?;
    // iproute2's ip and the shared libraries it loads, at their own paths.
    let ip = "/usr/bin/ip";
    std::fs::copy(ip, stage.join("usr/local/bin/ip"))?;
    for lib in output(Command::new("ldd").arg(ip))?
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let to = stage.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("a library has a directory")?)?;
        std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
    }
    std::fs::copy(&bins.apilb, stage.join("apilb/apilb"))?;
    std::fs::copy(&bins.fixtures, stage.join("apilb/xdp_fixtures"))?;
    let modules = dir
        .join("lib/modules")
        .join(release)
        .join("kernel/drivers/net");
    let veth = stage.join("lib/veth.ko");
    if modules.join("veth.ko").exists() {
        std::fs::copy(modules.join("veth.ko"), &veth)?;
    } else {
        let xz = Command::new("xz")
            .arg("-dc")
            .arg(modules.join("veth.ko.xz"))
            .output()
            .context("xz")?;
        if !xz.status.success() {
            bail!("cannot unpack veth.ko.xz of {release}");
        }
        std::fs::write(&veth, xz.stdout)?;
    }
    let init = stage.join("init");
    std::fs::write(&init, INIT)?;
    exec(Command::new("chmod").arg("+x").arg(&init))?;
    let image = root.join(format!("initramfs-{release}.cpio"));
    let packed = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            stage.display(),
            image.display()
        ))
        .status()?;
    if !packed.success() {
        bail!("packing the initramfs failed");
    }
    Ok(image)
}

/// Boot `kernel` with `initrd` and read the console until `/init` powers off or
/// `RUN_LIMIT` passes.
fn boot(kernel: &Path, initrd: &Path) -> anyhow::Result<Row> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu's console")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut row = Row {
        package: String::new(),
        version: String::new(),
        release: String::new(),
        boot: None,
        took: Duration::ZERO,
        passed: Vec::new(),
        failed: Vec::new(),
        done: false,
    };
    loop {
        let left = RUN_LIMIT.saturating_sub(started.elapsed());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        println!("  | {line}");
        let line = line.trim_end_matches('\r');
        if line.contains("APILB-VM init") {
            row.boot = Some(started.elapsed());
        } else if line.contains("APILB-VM DONE") {
            row.done = true;
        } else if let Some(name) = line.split("APILB-VM PASS ").nth(1) {
            row.passed.push(name.to_owned());
        } else if let Some(name) = line.split("APILB-VM FAIL ").nth(1) {
            row.failed.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                row.passed.push(name.to_owned());
            } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                row.failed.push(name.to_owned());
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    row.took = started.elapsed();
    Ok(row)
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| kernel | package | boot to init | whole run | passed | failed |\n\
         | --- | --- | ---: | ---: | ---: | --- |\n",
    );
    for r in rows {
        let failed = if r.done {
            r.failed.join(", ")
        } else {
            format!(
                "did not finish within {} s; {}",
                RUN_LIMIT.as_secs(),
                r.failed.join(", ")
            )
        };
        let _ = writeln!(
            t,
            "| {} | {} {} | {} | {:.0} s | {} | {} |",
            r.release,
            r.package,
            r.version,
            r.boot.map_or_else(
                || "never".to_owned(),
                |b| format!("{:.1} s", b.as_secs_f64())
            ),
            r.took.as_secs_f64(),
            r.passed.len(),
            if failed.is_empty() { "0" } else { &failed },
        );
    }
    t
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
