//! Builds lb-ebpf for bpfel-unknown-none so that `apilb` embeds its own datapath and
//! never reads an object from a path at run time. aya-build builds every binary of
//! the package into `OUT_DIR`: the datapath (`lb-ebpf`), and the benchmark floor
//! (`floor`), which only the `bench` feature embeds.
//!
//! The toolchain here is stable (1.95.0, pinned in `rust-toolchain.toml` for its
//! LLVM 22, the one bpf-linker reads), so `-Z build-std=core` needs `RUSTC_BOOTSTRAP=1`,
//! which aya-build honours (see shared TOOLCHAIN.md). `cargo xtask setup` installs
//! the pieces this needs: rust-src and bpf-linker.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let ebpf_dir = format!("{root}/lb-ebpf");
    // aya-build watches lb-ebpf itself; the shared types are a dependency it can't see.
    println!("cargo:rerun-if-changed={root}/lb-common");
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    // The nested cargo's stderr becomes `cargo:warning` lines: keep only real diagnostics.
    // SAFETY: as above.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
