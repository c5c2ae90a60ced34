//! What of xtask another crate uses too: the container image's build, which the
//! tests crate's container test runs exactly as `cargo xtask image` does, the
//! static apilb it ships, and the helpers every subcommand shares.

pub mod image;
pub mod musl;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Print a step of what xtask is doing.
pub fn step(msg: &str) {
    println!("[xtask] {msg}");
}

/// The cargo that runs us, so toolchain overrides carry through.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Run a command, failing with its name if it does not succeed.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Run a command and return its standard output, failing with its name and its
/// standard error if it does not succeed.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's root directory.
#[must_use]
pub fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or_else(|| xtask.clone(), PathBuf::from)
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else the workspace's `target/`.
#[must_use]
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}
