//! `apilb`: the Kubernetes apiserver load balancer.
use clap::{Parser, Subcommand};

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
    /// Print the version.
    Version,
}

fn main() {
    match Cli::parse().command {
        Command::Version => println!("apilb {}", env!("CARGO_PKG_VERSION")),
    }
}
