//! `apilb`: the Kubernetes apiserver load balancer. This file is only the command
//! line; every behaviour lives in the library modules it calls.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "Kernel (XDP) load balancer for the Kubernetes API server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file without touching the kernel; exit non-zero if it is
    /// refused, naming the key and value at fault.
    Check {
        /// The config file (TOML; see examples/apilb.toml).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apilb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let c = Config::load(&config)
                .with_context(|| format!("{} is refused", config.display()))?;
            println!(
                "{}: valid: {} VIP(s), {} backend(s), interfaces {}, health {:?} every {:?}",
                config.display(),
                c.vips.len(),
                c.backends.len(),
                c.datapath.interfaces.join(","),
                c.health.kind,
                c.health.interval,
            );
        }
        Command::Version => println!("apilb {}", env!("CARGO_PKG_VERSION")),
    }
    Ok(())
}
