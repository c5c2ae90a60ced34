//! `cargo xtask demo`: apilb doing its job on a cluster of its own.
//!
//! The `tests::plane` control plane (client, router, an LB node and three masters in
//! network namespaces; TLS stub apiservers; `apilb run` with default probes) and
//! `tests::traffic` (30 watch streams, a new https connection every 20 ms). It shows
//! the spread live, kills a master with SIGKILL and reports how many new
//! connections failed or had to wait for a SYN retransmit and how many streams on
//! the surviving masters broke, brings the master back, and removes everything.
//! All traffic stays inside the namespaces.

use std::{
    io::Write as _,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{Shape, VIP},
    plane::ControlPlane,
    traffic::{Record, Traffic},
};

const STREAMS: usize = 30;
const EVERY: Duration = Duration::from_millis(20);

/// New connections per master since `since`, and those that failed or are still
/// waiting (in flight for over 500 ms).
fn bars(r: &Record, since: Instant) -> String {
    let (by, _) = r.spread_since(since);
    let total = by.values().sum::<usize>().max(1);
    let mut line: Vec<String> = by
        .iter()
        .map(|(m, n)| format!("{m} {n:>4} {:<16}", "#".repeat(n * 30 / total)))
        .collect();
    let failed = r.errors_since(since).len();
    let waiting = r
        .since(since)
        .filter(|a| a.result.is_none() && a.failed(r.taken))
        .count();
    if waiting > 0 {
        line.push(format!("waiting {waiting}"));
    }
    if failed > 0 {
        line.push(format!("FAILED {failed}"));
    }
    line.join("  ")
}

fn say(text: &str) {
    println!("{text}");
    let _ = std::io::stdout().flush();
}

/// Print, every `step`, the spread of the new connections since `since`, until
/// `until` says stop (or `limit` passes).
fn watch_live(
    traffic: &Traffic,
    since: Instant,
    step: Duration,
    limit: Duration,
    until: impl Fn(&Record) -> bool,
) -> Record {
    loop {
        thread::sleep(step);
        let r = traffic.record();
        say(&format!(
            "   {:>5.2} s  {}",
            since.elapsed().as_secs_f64(),
            bars(&r, since)
        ));
        if until(&r) || since.elapsed() > limit {
            return r;
        }
    }
}

fn main() {
    let started = Instant::now();
    say("apilb demo: a client, a router, an LB node running apilb and three TLS apiservers,");
    say("all in network namespaces (addresses: tests/src/cluster.rs).\n");
    let mut p = ControlPlane::start("apilb-demo", Shape::default());
    say(&format!(
        "apilb's config ({}):\n{}\n",
        p.config.display(),
        std::fs::read_to_string(&p.config)
            .expect("config")
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));

    say(&format!(
        "1. {STREAMS} watch streams (like kubelets) open through https://{VIP}, and a new\n   \
         connection (GET /version) starts every {} ms. New connections per master, so far:",
        EVERY.as_millis()
    ));
    let traffic = Traffic::start(&p.t.client, p.ca(), STREAMS, Some(EVERY));
    let begin = Instant::now();
    watch_live(
        &traffic,
        begin,
        Duration::from_secs(1),
        Duration::from_secs(3),
        |_| false,
    );
    say(&format!(
        "   streams per master: {:?}\n",
        traffic.record().watches_per_master()
    ));

    say("2. master-2 is killed (SIGKILL). New connections since then:");
    let killed = Instant::now();
    p.kill_master(1);
    let r = watch_live(
        &traffic,
        killed,
        Duration::from_millis(250),
        Duration::from_secs(10),
        |r| {
            let last = r.last_failure_since(killed).unwrap_or(killed);
            r.taken.duration_since(last) > Duration::from_secs(2)
        },
    );
    let failed = r.errors_since(killed).len();
    let delayed = r.delayed_since(killed);
    let waited = delayed
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    let mut broken = r.broken_watches();
    let on_dead = broken.remove("master-2").unwrap_or(0);
    say(&format!(
        "   => {} new connections since the kill: {failed} failed; {} waited for their SYN \
         retransmit (at most {:.2} s)",
        r.since(killed).count(),
        delayed.len(),
        waited.as_secs_f64()
    ));
    say(&format!(
        "   => watch streams broken on the surviving masters: {} (on master-2 itself: {on_dead})\n",
        broken.values().sum::<usize>()
    ));

    say("3. master-2 restarts; once its /readyz passes twice (rise 2) it takes connections again:");
    p.start_master(1);
    let back = Instant::now();
    let r = watch_live(
        &traffic,
        back,
        Duration::from_millis(500),
        Duration::from_secs(10),
        |r| r.spread_since(back).0.contains_key("master-2"),
    );
    let rejoined = r.first_served_by("master-2", back).map(|t| t - back);
    match rejoined {
        Some(d) => say(&format!(
            "   => master-2 serving again {:.2} s after it restarted",
            d.as_secs_f64()
        )),
        None => say("   => master-2 did not rejoin within 10 s"),
    }
    let since = Instant::now();
    watch_live(
        &traffic,
        since,
        Duration::from_secs(1),
        Duration::from_secs(2),
        |_| false,
    );

    drop(traffic);
    drop(p);
    say(&format!(
        "\ndone in {:.0} s; namespaces, pins and processes removed.",
        started.elapsed().as_secs_f64()
    ));
}
