//! `cargo xtask bench controller`: the controller's idle cost. `apilb run` in the
//! `tests::plane` control plane (namespaces, three stub apiservers with TLS), probing each
//! master's /readyz over https every 500 ms with the defaults (a new TLS connection
//! per probe), with no traffic: CPU time and resident memory sampled from /proc
//! over 20 s.

use std::{
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::Shape,
    live::{cpu_ticks, ticks_per_second},
    plane::ControlPlane,
};

const WARMUP: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(20);

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss")
}

fn main() {
    let p = ControlPlane::start("apilb-bench-ctl", Shape::default());
    thread::sleep(WARMUP);
    let pid = p.apilb.pid();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    thread::sleep(WINDOW);
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid) - c0);
    let rss = rss_kib(pid);
    drop(p);
    let cpu = ticks as f64 / ticks_per_second();
    println!(
        "apilb run, 3 masters' /readyz probed over https every 500 ms, idle, {secs:.0} s window"
    );
    println!();
    println!("| CPU time | CPU share of one core | RSS |");
    println!("| ---: | ---: | ---: |");
    println!(
        "| {:.2} s | {:.2} % | {:.1} MiB |",
        cpu,
        cpu / secs * 100.0,
        rss as f64 / 1024.0
    );
}
