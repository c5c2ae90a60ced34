//! `cargo xtask vm-test`: the datapath loaded and run on other kernels, the
//! distribution kernels users run, each booted in qemu: under KVM if it reaches
//! `/init` within 15 s, else TCG (a KVM boot hangs on this kind of machine, see
//! `../shared/TOOLCHAIN.md`).
//!
//! 1. apilb and the VM's test binaries ([`SUITES`]: the packet fixtures and the
//!    smoke test) are built as static (musl) binaries.
//! 2. Each kernel comes from Debian's archive (`apt-get download`) or Ubuntu's
//!    (its `Packages` index, then the image and modules packages), is unpacked
//!    with `dpkg-deb -x` and cached under `target/vm/kernels/<package>_<version>/`.
//! 3. An initramfs holds busybox, iproute2's `ip` and `ethtool` with their
//!    libraries, the kernel's modules for veth and bridges, the binaries, and an
//!    `/init` that mounts proc, sys, bpffs and cgroup2, runs the suites and powers
//!    off.
//! 4. The kernels boot two at a time (a TCG guest keeps one host thread busy),
//!    and each console is read line by line, echoed with its release in front:
//!    libtest's `test <name> ... ok|FAILED`, and `APILB-VM` lines from `/init`.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use xtask::{cargo, exec, musl, musl::TARGET as MUSL, output, step, target_dir};

/// Debian 12's kernels, 6.1 LTS (its default) and 6.12 (its newest), then Ubuntu
/// 22.04's 5.15 (the oldest here, near apilb's minimum, see `lb-userspace/src/
/// kernel.rs`) and 24.04's 6.8.
pub const DEFAULT_KERNELS: [&str; 4] = [
    "linux-image-amd64",
    "linux-image-6.12-amd64",
    "ubuntu/jammy",
    "ubuntu/noble",
];
/// How many kernels boot at once: a TCG guest keeps one host thread busy, and
/// this machine has two.
const PARALLEL_BOOTS: usize = 2;
/// A boot and the whole suite, under TCG, must finish within this.
const RUN_LIMIT: Duration = Duration::from_mins(15);
/// A KVM boot must reach `/init` within this, or TCG takes over (a KVM boot hung
/// on this kind of machine; TCG reaches `/init` in about 5 s).
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Default)]
pub struct Args {
    /// A Debian kernel package (a metapackage such as `linux-image-amd64`, or a
    /// concrete `linux-image-<release>`), `ubuntu/<suite>` for the newest generic
    /// kernel of an Ubuntu release, or `debian/<suite>` for a Debian release
    /// outside the apt sources. Repeat for several. Default: Debian
    /// 12's 6.1 and 6.12, Ubuntu's jammy (5.15) and noble (6.8).
    #[arg(long = "kernel")]
    kernels: Vec<String>,
}

/// One kernel's result.
struct Row {
    package: String,
    version: String,
    release: String,
    /// `kvm` or `tcg`.
    accel: String,
    boot: Option<Duration>,
    took: Duration,
    passed: Vec<String>,
    failed: Vec<String>,
    done: bool,
    /// Why the run ended before `/init` powered off, when it did.
    cut_short: Option<String>,
    /// The console's first `Oops:` or `BUG:` report.
    oops: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let root = target_dir().join("vm");
    let bins = build_static()?;
    let kernels: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|&k| k.to_owned()).collect()
    } else {
        args.kernels.clone()
    };
    let mut ready = Vec::new();
    for meta in &kernels {
        let kernel = resolve(&root, meta)?;
        let dir = fetch(&root, &kernel)?;
        let release = release_of(&dir)?;
        let initrd = initramfs(&root, &dir, &release, &bins)?;
        ready.push((kernel, dir, release, initrd));
    }
    // Under TCG a guest runs on one host thread: the kernels boot
    // `PARALLEL_BOOTS` at a time, each console line prefixed with its release.
    let kvm = AtomicBool::new(kvm_available());
    let next = AtomicUsize::new(0);
    let rows: Mutex<Vec<(usize, Row)>> = Mutex::new(Vec::new());
    let boot_all = || -> anyhow::Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some((kernel, dir, release, initrd)) = ready.get(i) else {
                return Ok(());
            };
            step(&format!(
                "booting {} {} ({release}) in qemu",
                kernel.package, kernel.version
            ));
            let mut row = boot(
                &dir.join("boot").join(format!("vmlinuz-{release}")),
                initrd,
                &kvm,
                release,
            )?;
            row.package.clone_from(&kernel.package);
            row.version.clone_from(&kernel.version);
            row.release.clone_from(release);
            rows.lock().expect("rows").push((i, row));
        }
    };
    thread::scope(|s| {
        let workers: Vec<_> = (0..PARALLEL_BOOTS).map(|_| s.spawn(boot_all)).collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a boot thread panicked"))
    })?;
    let mut rows = rows.into_inner().expect("rows");
    rows.sort_by_key(|(i, _)| *i);
    let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
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

/// The static binaries the VM runs: apilb and the test binaries of [`SUITES`].
struct Bins {
    apilb: PathBuf,
    tests: Vec<(&'static str, PathBuf)>,
}

/// The test binaries run in the VM, in order: the packet fixtures (every program
/// loads and rewrites packets as the host's run expects), then the smoke test
/// (`apilb run` balancing real connections in network namespaces).
const SUITES: [&str; 2] = ["xdp_fixtures", "smoke"];

fn build_static() -> anyhow::Result<Bins> {
    let apilb = musl::build_apilb()?;
    step("building the VM's test binaries as static binaries (musl, release)");
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--no-run",
        "--release",
        "--target",
        MUSL,
        "-p",
        "tests",
        "--message-format",
        "json",
    ]);
    for suite in SUITES {
        cmd.args(["--test", suite]);
    }
    let out = musl::without_crate_env(&mut cmd)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the VM's test binaries for {MUSL} failed");
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let tests = SUITES
        .iter()
        .map(|&suite| {
            json.lines()
                .filter(|l| l.contains(&format!("\"name\":\"{suite}\"")))
                .find_map(|l| {
                    let (_, rest) = l.split_once("\"executable\":\"")?;
                    Some((suite, PathBuf::from(rest.split_once('"')?.0)))
                })
                .with_context(|| format!("cargo did not name the {suite} binary"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Bins { apilb, tests })
}

/// A kernel to boot: its image package, the version, and where its `.deb`s come
/// from.
struct Kernel {
    package: String,
    version: String,
    /// Empty: `apt-get download <package>=<version>` from this machine's sources.
    /// Otherwise the URLs of the image and modules packages.
    urls: Vec<String>,
}

/// `ubuntu/<suite>` and `debian/<suite>`: a release's kernel, from its archive.
const UBUNTU: &str = "http://archive.ubuntu.com/ubuntu";
const DEBIAN: &str = "http://deb.debian.org/debian";

/// The concrete image package behind `spec`: a Debian package (a metapackage
/// such as `linux-image-amd64` or a concrete `linux-image-<release>`) and its
/// candidate version in the apt sources; `ubuntu/<suite>`: the newest
/// `linux-image-generic` in `<suite>-updates`; or `debian/<suite>`, a Debian
/// release not in the apt sources (e.g. `debian/bullseye`): its
/// `linux-image-amd64`.
fn resolve(root: &Path, spec: &str) -> anyhow::Result<Kernel> {
    if let Some(suite) = spec.strip_prefix("ubuntu/") {
        let dist = format!("{suite}-updates");
        return resolve_archive(root, UBUNTU, &dist, "linux-image-generic", true);
    }
    if let Some(suite) = spec.strip_prefix("debian/") {
        return resolve_archive(root, DEBIAN, suite, "linux-image-amd64", false);
    }
    let depends = output(Command::new("apt-cache").args(["depends", spec]))?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .map_or_else(|| spec.to_owned(), str::to_owned);
    let policy = output(Command::new("apt-cache").args(["policy", &package]))?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .with_context(|| format!("no candidate version of {package} in the apt sources"))?;
    Ok(Kernel {
        package,
        version: version.to_owned(),
        urls: Vec::new(),
    })
}

/// The image package `meta` depends on in `archive`'s `dist`, read from its
/// `Packages` index. Ubuntu splits a kernel in two packages (`split_modules`):
/// `linux-image-<release>` holds `vmlinuz`, `linux-modules-<release>` the modules,
/// veth and bridge among them.
fn resolve_archive(
    root: &Path,
    archive: &str,
    dist: &str,
    meta: &str,
    split_modules: bool,
) -> anyhow::Result<Kernel> {
    let index_url = format!("{archive}/dists/{dist}/main/binary-amd64/Packages.gz");
    let index = root.join("downloads").join(format!(
        "{}-Packages.gz",
        index_url.replace(['/', ':'], "_")
    ));
    std::fs::create_dir_all(index.parent().context("downloads dir")?)?;
    step(&format!("reading {index_url}"));
    exec(
        Command::new("curl")
            .args(["-fsS", "--retry", "3", "-o"])
            .arg(&index)
            .arg(&index_url),
    )?;
    let text = output(Command::new("zcat").arg(&index))?;
    let stanza = |name: &str| {
        text.split("\n\n")
            .find(|s| s.lines().next() == Some(&format!("Package: {name}")))
            .map(str::to_owned)
            .with_context(|| format!("no {name} in {index_url}"))
    };
    let field = |stanza: &str, key: &str| {
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .map(str::to_owned)
            .with_context(|| format!("no {key} in {stanza}"))
    };
    let package = field(&stanza(meta)?, "Depends")?
        .split(", ")
        .find_map(|d| {
            d.split_whitespace()
                .next()
                .filter(|n| n.starts_with("linux-image-"))
        })
        .map(str::to_owned)
        .with_context(|| format!("{meta} names no image"))?;
    let mut stanzas = vec![stanza(&package)?];
    if split_modules {
        stanzas.push(stanza(&package.replace("linux-image-", "linux-modules-"))?);
    }
    Ok(Kernel {
        version: field(&stanzas[0], "Version")?,
        urls: stanzas
            .iter()
            .map(|s| Ok(format!("{archive}/{}", field(s, "Filename")?)))
            .collect::<anyhow::Result<_>>()?,
        package,
    })
}

/// The unpacked packages, downloading them unless cached.
fn fetch(root: &Path, kernel: &Kernel) -> anyhow::Result<PathBuf> {
    let (package, version) = (&kernel.package, &kernel.version);
    let dir = root.join("kernels").join(format!("{package}_{version}"));
    if dir.join("boot").exists() {
        step(&format!(
            "kernel {package} {version} already cached: {}",
            dir.display()
        ));
        return Ok(dir);
    }
    let downloads = root.join("downloads").join(format!("{package}_{version}"));
    let _ = std::fs::remove_dir_all(&downloads);
    std::fs::create_dir_all(&downloads)?;
    step(&format!("downloading {package} {version}"));
    if kernel.urls.is_empty() {
        exec(
            Command::new("apt-get")
                .args(["download", "-q", &format!("{package}={version}")])
                .current_dir(&downloads),
        )?;
    }
    for url in &kernel.urls {
        exec(
            Command::new("curl")
                .args(["-fsS", "--retry", "3", "-O", url])
                .current_dir(&downloads),
        )?;
    }
    // Unpacked beside its final name, then renamed: a cut-off unpack is never
    // taken for a cached kernel.
    let partial = root
        .join("kernels")
        .join(format!("{package}_{version}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    for deb in std::fs::read_dir(&downloads)?.flatten() {
        exec(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&partial),
        )?;
    }
    std::fs::rename(&partial, &dir)?;
    std::fs::remove_dir_all(&downloads)?;
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
for m in /lib/mods/*.ko; do
  name=${m##*/}; name=${name#*-}; name=${name%.ko}
  if insmod "$m"; then echo "APILB-VM PASS module $name"; else echo "APILB-VM FAIL module $name"; fi
done
ip link set lo up
/apilb/apilb --version
for t in SUITES; do "/apilb/$t" --test-threads=1 FILTER 2>&1; done
echo "APILB-VM DONE"
poweroff -f
"#;

/// Kernel modules the tests need, in load order (dependencies first): the
/// topology's veth pairs and its bridge. One that is built in is skipped.
const MODULES: [&str; 4] = ["llc", "stp", "bridge", "veth"];

/// Host programs the tests run beyond busybox: iproute2's `ip` (busybox's has no
/// `netns`) and `ethtool`, each with the shared libraries it loads.
const HOST_TOOLS: [&str; 2] = ["/usr/bin/ip", "/usr/sbin/ethtool"];

/// Build the initramfs for the kernel unpacked at `dir`.
fn initramfs(root: &Path, dir: &Path, release: &str, bins: &Bins) -> anyhow::Result<PathBuf> {
    let stage = root.join(format!("initramfs-{release}"));
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["bin", "lib/mods", "apilb", "usr/local/bin"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))?;
    for tool in HOST_TOOLS {
        let name = Path::new(tool).file_name().context("a tool has a name")?;
        std::fs::copy(tool, stage.join("usr/local/bin").join(name))
            .with_context(|| format!("copying {tool}"))?;
        for lib in output(Command::new("ldd").arg(tool))?
            .lines()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        {
            let to = stage.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().context("a library has a directory")?)?;
            std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
        }
    }
    std::fs::copy(&bins.apilb, stage.join("apilb/apilb"))?;
    for (suite, bin) in &bins.tests {
        std::fs::copy(bin, stage.join("apilb").join(suite))?;
    }
    let modules = dir.join("lib/modules").join(release);
    for (i, module) in MODULES.iter().enumerate() {
        let to = stage.join(format!("lib/mods/{i}-{module}.ko"));
        match find_module(&modules.join("kernel"), module) {
            Some(file) => unpack_module(&file, &to)?,
            None if builtin(&modules, module) => {}
            None => bail!("kernel {release} has no module {module}, built in or loadable"),
        }
    }
    let init = stage.join("init");
    // `APILB_VM_FILTER`: only the tests whose names contain it, to read one
    // test's verifier log without waiting for the whole suite under TCG.
    let filter = std::env::var("APILB_VM_FILTER").unwrap_or_default();
    std::fs::write(
        &init,
        INIT.replace("SUITES", &SUITES.join(" "))
            .replace("FILTER", &filter),
    )?;
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

/// Boot `kernel` with `initrd`, with KVM first while it works: a KVM boot that
/// does not reach `/init` within [`KVM_BOOT_LIMIT`] is killed, and this kernel
/// and every later one boot under TCG.
fn boot(kernel: &Path, initrd: &Path, kvm: &AtomicBool, tag: &str) -> anyhow::Result<Row> {
    if kvm.load(Ordering::SeqCst) {
        let row = boot_with("kvm", kernel, initrd, KVM_BOOT_LIMIT, tag)?;
        if row.boot.is_some() {
            return Ok(row);
        }
        step(&format!(
            "KVM did not reach /init within {} s; using TCG from here on",
            KVM_BOOT_LIMIT.as_secs()
        ));
        kvm.store(false, Ordering::SeqCst);
    }
    boot_with("tcg", kernel, initrd, RUN_LIMIT, tag)
}

/// Whether KVM is there to try: `/dev/kvm` opens read-write.
fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boot under `accel` and read the console until `/init` powers off, `/init` is
/// not reached within `boot_limit`, or `RUN_LIMIT` passes.
fn boot_with(
    accel: &str,
    kernel: &Path,
    initrd: &Path,
    boot_limit: Duration,
    tag: &str,
) -> anyhow::Result<Row> {
    step(&format!("booting {tag} under {accel}"));
    // TCG runs both vCPUs on one host thread. With a thread each (MTTCG), a
    // 6.12 guest once died of `Oops: int3` in `inet_ehashfn`: a vCPU ran the
    // breakpoint of a static-key patch after the patching CPU had finished and
    // synced every CPU, which real hardware and KVM rule out.
    let accel_arg = if accel == "tcg" {
        "tcg,thread=single"
    } else {
        accel
    };
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            accel_arg,
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
    let mut row = Row::new(accel);
    loop {
        let limit = if row.boot.is_some() {
            RUN_LIMIT
        } else {
            boot_limit
        };
        let left = limit.saturating_sub(started.elapsed());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                row.cut_short = Some(format!("did not finish within {} s", limit.as_secs()));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        println!("  {tag} | {line}");
        row.read(line.trim_end_matches('\r'), started.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    row.took = started.elapsed();
    if !row.done {
        let why = row
            .cut_short
            .take()
            .unwrap_or_else(|| "qemu exited before /init powered off".to_owned());
        row.cut_short = Some(match row.oops.take() {
            Some(oops) => format!("{why}, after `{oops}`"),
            None => why,
        });
    }
    Ok(row)
}

impl Row {
    fn new(accel: &str) -> Self {
        Self {
            package: String::new(),
            version: String::new(),
            release: String::new(),
            accel: accel.to_owned(),
            boot: None,
            took: Duration::ZERO,
            passed: Vec::new(),
            failed: Vec::new(),
            done: false,
            cut_short: None,
            oops: None,
        }
    }

    /// Take in one console line, read `elapsed` after qemu started.
    fn read(&mut self, line: &str, elapsed: Duration) {
        if line.contains("APILB-VM init") {
            self.boot = Some(elapsed);
        } else if line.contains("APILB-VM DONE") {
            self.done = true;
        } else if self.oops.is_none() && (line.contains("Oops:") || line.contains("BUG:")) {
            self.oops = line.split_once("] ").map(|(_, oops)| oops.to_owned());
        } else if let Some(panic) = line.split("Kernel panic - ").nth(1) {
            self.cut_short = Some(format!("kernel panic: {}", panic.trim()));
        } else if let Some(name) = line.split("APILB-VM PASS ").nth(1) {
            self.passed.push(name.to_owned());
        } else if let Some(name) = line.split("APILB-VM FAIL ").nth(1) {
            self.failed.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                self.passed.push(name.to_owned());
            } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                self.failed.push(name.to_owned());
            }
        }
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| kernel | package | qemu | boot to init | whole run | passed | failed |\n\
         | --- | --- | --- | ---: | ---: | ---: | --- |\n",
    );
    for r in rows {
        let failed = match &r.cut_short {
            None => r.failed.join(", "),
            Some(why) => [why.clone()]
                .into_iter()
                .chain(r.failed.iter().cloned())
                .collect::<Vec<_>>()
                .join("; "),
        };
        let _ = writeln!(
            t,
            "| {} | {} {} | {} | {} | {:.0} s | {} | {} |",
            r.release,
            r.package,
            r.version,
            r.accel,
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

/// `<name>.ko`, compressed or not, anywhere under `dir`.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if ["ko", "ko.xz", "ko.zst"]
            .iter()
            .any(|ext| entry.file_name().to_str() == Some(&format!("{name}.{ext}")))
        {
            return Some(path);
        }
    }
    None
}

/// Whether the kernel has `name` built in (`modules.builtin`).
fn builtin(modules: &Path, name: &str) -> bool {
    std::fs::read_to_string(modules.join("modules.builtin"))
        .is_ok_and(|list| list.lines().any(|l| l.ends_with(&format!("/{name}.ko"))))
}

/// Copy a module, decompressing it: busybox's `insmod` takes plain `.ko` only.
fn unpack_module(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tool = match from.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => {
            std::fs::copy(from, to)?;
            return Ok(());
        }
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(from)
        .output()
        .with_context(|| format!("cannot start {tool}"))?;
    if !out.status.success() {
        bail!("{tool} could not unpack {}", from.display());
    }
    std::fs::write(to, out.stdout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_from(console: &str) -> Row {
        let mut row = Row::new("tcg");
        for line in console.lines() {
            row.read(line, Duration::from_secs(3));
        }
        row
    }

    #[test]
    fn a_kernel_panic_is_named_with_its_first_oops() {
        // Lines from the console of a 6.12 run that died under MTTCG.
        let row = row_from(
            "APILB-VM init\n\
             test only_a_syn_opens_a_flow ... ok\n\
             [   42.441209] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI\n\
             [   42.441316] RIP: 0010:inet_ehashfn+0x33/0x110\n\
             [   42.441574] Kernel panic - not syncing: Fatal exception in interrupt\n",
        );
        assert_eq!(row.boot, Some(Duration::from_secs(3)));
        assert_eq!(row.passed, ["only_a_syn_opens_a_flow"]);
        assert!(!row.done);
        assert_eq!(
            row.cut_short.as_deref(),
            Some("kernel panic: not syncing: Fatal exception in interrupt")
        );
        assert_eq!(
            row.oops.as_deref(),
            Some("Oops: int3: 0000 [#2] PREEMPT SMP NOPTI")
        );
    }

    #[test]
    fn a_finished_run_counts_its_passes_and_failures() {
        let row = row_from(
            "APILB-VM init\n\
             APILB-VM PASS module veth\n\
             test a ... ok\n\
             test b ... FAILED\n\
             APILB-VM DONE\n",
        );
        assert!(row.done);
        assert_eq!(row.passed, ["module veth", "a"]);
        assert_eq!(row.failed, ["b"]);
        assert_eq!(row.cut_short, None);
    }
}
