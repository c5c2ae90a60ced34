//! `cargo xtask bench controller`: the controller's idle cost. `apilb run` in the
//! live topology (namespaces, veths, three stub apiservers with TLS), probing each
//! master's /readyz over https every 500 ms with the defaults (a new TLS connection
//! per probe), with no traffic: CPU time and resident memory sampled from /proc
//! over 30 s.

use std::{
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{Topology, VIP_ADDR, apilb_config},
    live::{Apilb, PinDir, master_names, stub_apiservers},
    pki::Pki,
};

const WARMUP: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(30);

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

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
    let t = Topology::new("apilb-bench-ctl");
    let pins = PinDir::new("bench-ctl");
    let instance = pins.instance();
    let dir = std::env::temp_dir().join(format!("apilb-bench-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pki = Pki::generate(&dir, &master_names(), &[VIP_ADDR.parse().expect("vip")]);
    let _stubs = stub_apiservers(&t, &pki, &dir);
    let config = dir.join("apilb.toml");
    let text = apilb_config(
        &instance,
        "",
        &format!("kind = \"https\"\nca_file = \"{}\"", pki.ca_pem.display()),
    );
    std::fs::write(&config, text).expect("config");
    let mut apilb = Apilb::start(t.lb(), &config, &dir.join("apilb.log"));
    assert!(
        apilb.wait_log("XDP attached", Duration::from_secs(15)),
        "apilb started:\n{}",
        apilb.log_text()
    );
    thread::sleep(WARMUP);
    let pid = apilb.pid();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    thread::sleep(WINDOW);
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid) - c0);
    let rss = rss_kib(pid);
    apilb.signal(libc::SIGTERM);
    let _ = apilb.wait(Duration::from_secs(5));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = ticks as f64 / hz;
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
    let _ = std::fs::remove_dir_all(&dir);
}
