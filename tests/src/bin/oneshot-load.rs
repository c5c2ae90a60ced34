//! A load generator for the one workload wrk cannot make: a new connection per
//! request with the client closing first (it reads the whole answer, whose length
//! `Content-Length` gives, then closes), or aborting with a RST. `bench-e2e` runs
//! it in the client namespace as it runs wrk, pinned to one CPU (`taskset -c 0`),
//! so that its figures compare across paths.
//!
//! It works as wrk does: one thread, an event loop (tokio's current-thread
//! runtime), and `--connections` connections, each starting its next exchange as
//! soon as the last ended; or, with `--rate`, it starts that many a second
//! whatever the answers do (`bench sync` needs a given rate of new flows). It prints `key value` lines: `requests`, `seconds`,
//! `rps`, `p99_ms` (connect to the answer's last byte, of the good exchanges),
//! `errors`, and one `error_<kind>` line per kind of failure.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use tests::oneshot::{Closer, Request, closed_loop, open_loop};

#[derive(Parser)]
#[command(about = "one HTTP request per connection, the client closing first")]
struct Args {
    /// Where to connect, address:port.
    #[arg(long)]
    to: SocketAddr,
    /// The path to GET.
    #[arg(long, default_value = "/")]
    path: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Close with a RST (`SO_LINGER` 0) instead of a FIN.
    #[arg(long)]
    reset: bool,
    /// Start this many connections a second instead (open loop), at most
    /// `--connections` in flight.
    #[arg(long)]
    rate: Option<u32>,
}

fn main() {
    let args = Args::parse();
    let closer = if args.reset {
        Closer::Reset
    } else {
        Closer::Client
    };
    let expect = Request {
        path: args.path,
        host: args.to.to_string(),
        body_contains: String::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let run_for = Duration::from_secs(args.seconds);
    let (mut tally, took) = rt.block_on(async {
        match args.rate {
            Some(rate) => {
                open_loop(args.to, closer, &expect, (rate, run_for), args.connections).await
            }
            None => closed_loop(args.to, closer, &expect, args.connections, run_for).await,
        }
    });
    let secs = took.as_secs_f64();
    println!("requests {}", tally.ok);
    println!("seconds {secs:.3}");
    println!("rps {:.1}", tally.ok as f64 / secs);
    println!("p99_ms {:.3}", tally.quantile_ms(0.99));
    println!("errors {}", tally.failures());
    for (kind, n) in &tally.failed {
        println!("error_{kind} {n}");
    }
    for s in &tally.samples {
        eprintln!("oneshot-load: {s}");
    }
}
