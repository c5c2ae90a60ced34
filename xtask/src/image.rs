//! `cargo xtask image`: apilb's container image, built on this machine with no
//! registry.
//!
//! - **Contents.** The static apilb of [`crate::musl`] at `/apilb`, and nothing
//!   else: the base is `scratch` (`buildah from scratch`), so nothing is pulled and
//!   the image has no shell, libc or package manager for anyone to use. Its
//!   entrypoint is `/apilb`, its default command `run -c /etc/apilb/apilb.toml`
//!   (mount the config there). OCI labels give the title, version, revision (git's
//!   HEAD), licence and, when git knows a remote, the source.
//! - **Tooling.** Debian's buildah assembles it and writes an OCI archive,
//!   `target/image/apilb-<version>.oci.tar`, which `podman load`, `skopeo copy
//!   oci-archive:…` and `docker load` (Docker 25 and later) take.
//! - **No trace on the machine.** buildah works in a storage of its own under the
//!   output directory, removed when the build ends, so the machine's container
//!   storage is never touched. Its driver is vfs: no overlay mount to undo if a
//!   build is interrupted, and copying one small layer costs nothing.
//! - **Reproducible.** The layer's files and the config are dated at HEAD's commit
//!   (`SOURCE_DATE_EPOCH` if set), so the same binary gives the same digest.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::Context as _;

use crate::{exec, musl, output, step, target_dir, workspace_root};

/// The binary's path in the image, and its entrypoint.
pub const BINARY: &str = "/apilb";
/// Where the image's default command reads the config.
pub const CONFIG: &str = "/etc/apilb/apilb.toml";

/// A built image.
pub struct Image {
    /// The OCI archive.
    pub archive: PathBuf,
    /// `apilb:<version>`, the name the archive gives the image (`podman load`
    /// names it `localhost/apilb:<version>`).
    pub name: String,
    /// The archive's size.
    pub bytes: u64,
    /// The manifest's digest, `sha256:…`: the image's identity in a registry.
    pub digest: String,
    /// The config's digest: the image ID `podman images` shows.
    pub id: String,
    /// The OCI labels set on it.
    pub labels: Vec<(String, String)>,
}

/// `cargo xtask image`: build into `target/image/` and say what was built.
pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let image = build(&target_dir().join("image"))?;
    step(&format!(
        "image built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    println!("archive  {}", image.archive.display());
    println!(
        "size     {} bytes ({:.1} MiB)",
        image.bytes,
        image.bytes as f64 / f64::from(1 << 20)
    );
    println!("name     {}", image.name);
    println!("digest   {}", image.digest);
    println!("id       {}", image.id);
    for (key, value) in &image.labels {
        println!("label    {key}={value}");
    }
    println!("load it  podman load -i {}", image.archive.display());
    Ok(())
}

/// Build apilb for musl and write its image as an OCI archive in `out_dir`.
pub fn build(out_dir: &Path) -> anyhow::Result<Image> {
    let binary = musl::build_apilb()?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("apilb:{version}");
    let labels = labels(version);
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let storage = Storage::new(out_dir)?;

    step("assembling the image with buildah: /apilb on scratch, nothing pulled");
    let container = output(
        storage
            .buildah()
            .args(["from", "--name", "apilb-image", "scratch"]),
    )?
    .trim()
    .to_owned();
    exec(
        storage
            .buildah()
            .args([
                "copy", "--quiet", "--chmod", "0755", "--chown", "0:0", &container,
            ])
            .arg(&binary)
            .arg(BINARY),
    )?;
    let mut config = storage.buildah();
    config
        .args(["config", "--entrypoint", &format!("[\"{BINARY}\"]")])
        .args(["--cmd", &format!("[\"run\", \"-c\", \"{CONFIG}\"]")]);
    for (key, value) in &labels {
        config.arg("--label").arg(format!("{key}={value}"));
    }
    exec(config.arg(&container))?;

    let id_file = storage.dir.join("id");
    let mut commit = storage.buildah();
    commit
        .args(["commit", "--quiet", "--rm", "--iidfile"])
        .arg(&id_file);
    if let Some(epoch) = source_date_epoch() {
        commit.args(["--timestamp", &epoch.to_string()]);
    }
    output(commit.args([&container, &name]))?;

    let archive = out_dir.join(format!("apilb-{version}.oci.tar"));
    // An archive from an earlier build is replaced, not appended to.
    let _ = fs::remove_file(&archive);
    let digest_file = storage.dir.join("digest");
    exec(
        storage
            .buildah()
            .args(["push", "--quiet", "--digestfile"])
            .arg(&digest_file)
            .arg(&name)
            .arg(format!("oci-archive:{}:{name}", archive.display())),
    )?;
    let read = |p: &Path| {
        fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("reading {}", p.display()))
    };
    let id = read(&id_file)?;
    Ok(Image {
        bytes: fs::metadata(&archive)
            .with_context(|| format!("{} was not written", archive.display()))?
            .len(),
        archive,
        name,
        digest: read(&digest_file)?,
        id: if id.starts_with("sha256:") {
            id
        } else {
            format!("sha256:{id}")
        },
        labels,
    })
}

/// The OCI labels: what the image is, which version and commit it was built from.
fn labels(version: &str) -> Vec<(String, String)> {
    let key = |k: &str| format!("org.opencontainers.image.{k}");
    let mut labels = vec![
        (key("title"), "apilb".to_owned()),
        (key("version"), version.to_owned()),
        (key("licenses"), env!("CARGO_PKG_LICENSE").to_owned()),
    ];
    match git(&["rev-parse", "HEAD"]) {
        Some(revision) => {
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty())
            {
                step(&format!(
                    "warning: the working tree has uncommitted changes, which the revision \
                     label ({revision}) does not name"
                ));
            }
            labels.push((key("revision"), revision));
        }
        None => step("not a git checkout: the image gets no revision label"),
    }
    if let Some(source) = git(&["remote", "get-url", "origin"]) {
        labels.push((key("source"), source));
    }
    labels
}

/// The build's date: `SOURCE_DATE_EPOCH` if set, else HEAD's commit time.
fn source_date_epoch() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%ct"]))
        .and_then(|s| s.trim().parse().ok())
}

/// `git <args>` in the workspace: its output, trimmed, if it succeeds.
fn git(args: &[&str]) -> Option<String> {
    output(
        Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args),
    )
    .ok()
    .map(|s| s.trim().to_owned())
}

/// buildah's storage for one build, under the output directory; removed on drop,
/// and with it the working container if a step failed.
struct Storage {
    dir: PathBuf,
}

impl Storage {
    fn new(out_dir: &Path) -> anyhow::Result<Self> {
        let dir = out_dir.join("buildah");
        // A build that was killed left its storage behind.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("tmp"))
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// `buildah` with this storage (`TMPDIR` too, where it stages blobs).
    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .env("TMPDIR", self.dir.join("tmp"));
        cmd
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
