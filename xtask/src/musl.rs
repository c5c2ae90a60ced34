//! apilb as a static binary (musl, release): what the container image ships and
//! what `vm-test` runs on other kernels. Nothing to match on the other side, no
//! libc, no loader. The eBPF objects it embeds are built for `bpfel-unknown-none`
//! whatever the host target is, so they are the same as a glibc build's.

use std::{path::PathBuf, process::Command};

use crate::{cargo, exec, step, target_dir, workspace_root};

/// The target: ring builds C for it with `musl-gcc` (Debian's musl-tools, which
/// `cargo xtask setup` installs).
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// Add the rust target if missing, build `apilb` for [`TARGET`] (release) and
/// return its path.
pub fn build_apilb() -> anyhow::Result<PathBuf> {
    step(&format!(
        "adding the rust target {TARGET} (skipped if present)"
    ));
    exec(
        Command::new("rustup")
            .args(["target", "add", TARGET])
            .current_dir(workspace_root()),
    )?;
    step("building apilb as a static binary (musl, release)");
    let mut build = cargo();
    build
        .args(["build", "--quiet", "--release", "--target", TARGET])
        .args(["-p", "lb-userspace", "--bin", "apilb"])
        .current_dir(workspace_root());
    exec(without_crate_env(&mut build))?;
    Ok(target_dir().join(TARGET).join("release").join("apilb"))
}

/// `cmd` without the variables cargo sets for the crate it runs (xtask under
/// `cargo xtask`, a test under `cargo test`), for every nested build of
/// [`TARGET`]. Build scripts that read one are rerun when it changes (ring reads
/// `CARGO_MANIFEST_DIR`), so builds started by xtask, by the image test and from a
/// shell would each rebuild ring and all above it, about two minutes here.
pub fn without_crate_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
            .iter()
            .any(|p| name.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}
