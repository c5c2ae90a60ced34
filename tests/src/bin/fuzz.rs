//! `cargo xtask fuzz`: the XDP datapath against its reference model for 10^6
//! frames (by default), then a summary table for the README. Needs root.
//! Exits non-zero at the first disagreement, printing the frame that caused it
//! and the ones before it, as hex, with the seed that replays the run.

use clap::Parser;
use tests::model::run::{Settings, run};

#[derive(Parser)]
#[command(about = "Fuzz apilb's XDP program against its reference model")]
struct Args {
    /// How many frames.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// The generator's seed (default: `APILB_FUZZ_SEED`, else drawn at random).
    #[arg(long)]
    seed: Option<u64>,
    /// Check the counters every this many frames.
    #[arg(long, default_value_t = 16)]
    counter_every: u64,
    /// Hold the flow tables against the model every this many frames.
    #[arg(long, default_value_t = 512)]
    state_every: u64,
}

fn main() {
    let args = Args::parse();
    let mut s = Settings::new(args.frames, "apilb-fz-x");
    if let Some(seed) = args.seed {
        s.seed = seed;
    }
    s.counter_every = args.counter_every.max(1);
    s.state_every = args.state_every.max(1);
    println!("fuzzing {} frames, seed {}", s.frames, s.seed);
    match run(&s) {
        Ok(summary) => {
            println!("{summary}");
            for f in &summary.findings {
                eprintln!("{f}");
            }
            if !summary.findings.is_empty() {
                std::process::exit(2);
            }
        }
        Err(m) => {
            eprintln!("{m}");
            std::process::exit(1);
        }
    }
}
