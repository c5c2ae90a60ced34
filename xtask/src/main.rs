//! `cargo xtask`: the project's own commands, so a fresh machine needs nothing but
//! cargo. Each subcommand lives in its own small module; the ones another crate
//! runs too (the image, which the tests crate's container test builds as `cargo
//! xtask image` does) and the helpers they share are in the library (`lib.rs`).
//!
//! xtask deliberately does not depend on the apilb crates: building those needs
//! bpf-linker, which `setup` is what installs.

mod bench;
mod fuzz;
mod setup;
mod soak;
mod vm;

use std::process::Command;

use clap::{Parser, Subcommand};
use xtask::{cargo, exec, image, step};

#[derive(Parser)]
#[command(about = "apilb developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src, rustfmt,
    /// bpf-linker, Debian's kubectl), skipping what is already there.
    Setup,
    /// Run `setup`, check formatting, then every test: unit tests, packet fixtures
    /// in the kernel, the namespace scenarios, then `vm-test` (the fixtures and
    /// the smoke test on Debian's and Ubuntu's kernels in qemu), then a one-minute
    /// `soak`. Needs root.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter;
        /// with any, `vm-test` and the soak are skipped.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The main job: apilb balancing TLS apiservers in network namespaces, a master
    /// killed and brought back, with the numbers. Needs root; about a minute.
    Demo,
    /// Run the benchmark suite (writing BENCHMARKS.md), or one part, and print
    /// the tables.
    Bench {
        /// One part; without, the whole suite, which also writes BENCHMARKS.md.
        #[arg(value_enum)]
        part: Option<bench::Part>,
    },
    /// apilb under 5,000 new connections a second (client-first, server-first
    /// and RST closes; IPv4 and IPv6), 30 watch streams and a master flapping
    /// every 20 s, for N minutes; asserts no failed connection or stream, no SYN
    /// dropped for want of a NAT port, bounded flow tables and flat RSS. Needs
    /// root.
    Soak {
        /// How long the connection load runs.
        #[arg(long, default_value_t = 10)]
        minutes: u32,
    },
    /// The XDP program against its reference model: N random and mutated
    /// frames (10^6 by default) through `BPF_PROG_TEST_RUN`, each checked for
    /// verdict, output bytes, checksums, counters and flow tables; a summary
    /// table at the end. Needs root.
    Fuzz {
        /// How many frames.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// The generator's seed, to replay a run (default: drawn at random).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build static binaries, boot other kernels in qemu (by default Debian 12's
    /// 6.1 and 6.12, Ubuntu's 5.15 and 6.8) and run the packet fixtures and the
    /// smoke test in each; a row per kernel.
    VmTest(vm::Args),
    /// Build apilb's container image: a static (musl) apilb on an empty base,
    /// assembled by buildah with nothing pulled, written as an OCI archive under
    /// `target/image/`; prints its path, size and digest. Needs root.
    Image,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cargo_bin_on_path();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            step("checking formatting (cargo fmt --all -- --check)");
            exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
            step(
                "running the test suite (cargo test --workspace --exclude lb-ebpf: the default \
                 members, and the tests crate's root-only namespace tests)",
            );
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--exclude", "lb-ebpf", "--"])
                .args(&args);
            exec(&mut cmd)?;
            if !args.is_empty() {
                step("test arguments given: skipping vm-test and the soak");
                return Ok(());
            }
            step("running the suite on other kernels (cargo xtask vm-test)");
            vm::run(&vm::Args::default())?;
            step("soaking for a minute (cargo xtask soak --minutes 1, on vm-test's static build)");
            soak::run_static(1)
        }
        Task::Demo => {
            setup::run()?;
            step("building apilb, the stub apiserver and the demo (release)");
            build_with_apilb("demo")?;
            exec(&mut tests_bin("demo"))
        }
        Task::Bench { part } => {
            setup::run()?;
            bench::run(part)
        }
        Task::Soak { minutes } => {
            setup::run()?;
            soak::run(minutes)
        }
        Task::Fuzz { frames, seed } => {
            setup::run()?;
            fuzz::run(frames, seed)
        }
        Task::VmTest(args) => {
            setup::run()?;
            vm::run(&args)
        }
        Task::Image => {
            setup::run()?;
            image::run()
        }
    }
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`; make sure every process
/// xtask starts (setup's check, cargo test and the eBPF build under it) finds it,
/// even where cargo itself is reached some other way.
fn cargo_bin_on_path() {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    let Some(bin) = home.map(|h| h.join("bin")) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // SAFETY: called at the start of main, before xtask starts any thread.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

/// Build (release) apilb, the stub apiserver and the tests crate's binary `bin`,
/// which runs them: the demo and the soak.
pub fn build_with_apilb(bin: &str) -> anyhow::Result<()> {
    for (package, bin) in [
        ("lb-userspace", "apilb"),
        ("tests", "stub-apiserver"),
        ("tests", bin),
    ] {
        exec(cargo().args(["build", "--quiet", "--release", "-p", package, "--bin", bin]))?;
    }
    Ok(())
}

/// `cargo run` of the tests crate's binary `bin`, release-built as the benchmarks
/// are; the caller adds `--` and its arguments.
pub fn tests_bin(bin: &str) -> Command {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "tests", "--bin", bin]);
    cmd
}
