//! `cargo xtask bench [<part>]`: benchmarks print tables; they never assert targets.
//!
//! Each part is a release binary of the `tests` crate, which holds the harness the
//! measurement needs (namespaces, packet builders, the provisioned datapath). A
//! part's tables (its binaries' stdout, shown as they come) are kept in
//! `target/bench/<part>.md`. The whole suite (no part named) then writes
//! `BENCHMARKS.md`: the machine, every peer's version, and each part's tables;
//! the plots it links are drawn by the parts into `tests/plots/`. One part run
//! alone replaces only its own section there, which then says so.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

use crate::{cargo, exec, step, tests_bin};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Part {
    /// HTTP through every path (direct, iptables DNAT, haproxy, nginx stream,
    /// apilb XDP, apilb socket-LB) at steady state, apilb running throughout:
    /// keep-alive and a new connection per request with the server closing first
    /// (wrk), and with the client closing first (oneshot-load); requests/s, p99,
    /// the LB's CPU per 10k requests, apilb's dropped SYNs and reclaimed NAT ports,
    /// and its new-connection rate against iptables DNAT. About 25 minutes.
    E2e,
    /// The soak (`cargo xtask soak`) at its full length: 10 minutes of 5,000 new
    /// connections a second (client, server and RST closes, IPv4 and IPv6), 30
    /// watch streams and a master flapping every 20 s; failures, port drops, flow
    /// table peaks and apilb's RSS. About 12 minutes.
    Soak,
    /// VIP failover time between two LB nodes: apilb VRRP and keepalived at 100 ms
    /// and at 1 s adverts, apilb etcd; 4 trials each. Then (`bench-masters`) what
    /// clients see when a master's apiserver is killed or its host goes silent,
    /// behind apilb (default and fast probes), haproxy (kubeadm's HA guide config,
    /// its defaults, its checks at apilb's rate), iptables DNAT, and keepalived on
    /// the masters with kubeadm's check script; 3 concurrent trials each. Then
    /// (`bench-lbdeath`) an LB node dying (SIGKILL, SIGTERM, a cut cable, a
    /// return) under 30 watch streams, 100 new https connections/s and kubectl:
    /// apilb VRRP and etcd with flow sync on and off, and keepalived + haproxy as
    /// in kubeadm's HA guide; broken streams, failed and delayed connections.
    Failover,
    /// Flow sync between two LB nodes (`bench-sync`): at 1,000, 5,000 and 10,000
    /// new connections a second through the VIP, the sync bytes each way, records
    /// sent and installed, each apilb's CPU against the same load with sync off,
    /// and the links' lag; then how fast the peer takes in one bulk resync of
    /// the owner's full flow table (about 94,000 flows). About 4 minutes.
    Sync,
    /// ns per packet through `BPF_PROG_TEST_RUN` for each path, against `XDP_DROP`,
    /// and what a VIP that syncs adds to a new flow's handshake.
    Xdp,
    /// Maglev table build and delta times for M = 65537 and N = 3, 100, 1000.
    Maglev,
    /// The controller's idle CPU and RSS with three masters probed every 500 ms.
    Controller,
    /// New connections from the LB node itself (connect, first byte, close, 4
    /// workers): node-local mode's socket-LB to the VIP against a direct connect to
    /// one master and kubespray's nginx stream proxy on localhost; connections/s and
    /// p50/p99 connect + first-byte latency, as ratios to direct.
    Local,
    /// A spoofed SYN flood at the VIP (30,000 SYNs/s for 10 s from unrouted
    /// sources, an attacker on the segment) behind apilb, iptables DNAT
    /// (conntrack) and haproxy: new https connections that succeeded during it
    /// and their p99, watch streams lost, the machine's busy CPU; 3 rounds.
    /// About 3 minutes.
    Hostile,
}

impl Part {
    /// The whole suite, in the order `BENCHMARKS.md` shows it.
    const ALL: [Part; 9] = [
        Part::E2e,
        Part::Soak,
        Part::Failover,
        Part::Sync,
        Part::Xdp,
        Part::Maglev,
        Part::Controller,
        Part::Local,
        Part::Hostile,
    ];

    fn name(self) -> &'static str {
        match self {
            Part::E2e => "e2e",
            Part::Soak => "soak",
            Part::Failover => "failover",
            Part::Sync => "sync",
            Part::Xdp => "xdp",
            Part::Maglev => "maglev",
            Part::Controller => "controller",
            Part::Local => "local",
            Part::Hostile => "hostile",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Part::E2e => "End to end: requests through each path",
            Part::Soak => "Soak: ten minutes of churn",
            Part::Failover => "Failover: a VIP moving, a master dying",
            Part::Sync => "Flow sync: its cost, and a bulk resync",
            Part::Xdp => "The XDP program, ns per packet",
            Part::Maglev => "Maglev table builds",
            Part::Controller => "The controller at rest",
            Part::Local => "Node-local connects",
            Part::Hostile => "Hostile: a spoofed SYN flood",
        }
    }

    fn bins(self) -> &'static [&'static str] {
        match self {
            Part::E2e => &["bench-e2e"],
            Part::Soak => &["soak"],
            Part::Failover => &["bench-failover", "bench-masters", "bench-lbdeath"],
            Part::Sync => &["bench-sync"],
            Part::Xdp => &["bench-xdp"],
            Part::Maglev => &["bench-maglev"],
            Part::Controller => &["bench-controller"],
            Part::Local => &["bench-local"],
            Part::Hostile => &["bench-hostile"],
        }
    }

    /// Whether its binaries run `apilb run` (or the stub apiserver) themselves.
    fn runs_apilb(self) -> bool {
        !matches!(self, Part::Xdp | Part::Maglev)
    }
}

pub fn run(part: Option<Part>) -> anyhow::Result<()> {
    let started = Instant::now();
    let parts: Vec<Part> = part.map_or_else(|| Part::ALL.to_vec(), |p| vec![p]);
    if parts.iter().any(|p| p.runs_apilb()) {
        build_apilb_and_stub()?;
    }
    let out = root()?.join("target").join("bench");
    std::fs::create_dir_all(&out)?;
    let mut sections = String::new();
    for part in &parts {
        let part_started = Instant::now();
        let mut text = String::new();
        for bin in part.bins() {
            text.push_str(&run_bin(bin)?);
            text.push('\n');
        }
        std::fs::write(out.join(format!("{}.md", part.name())), &text)?;
        let took = part_started.elapsed().as_secs_f64();
        step(&format!("{} took {took:.0} s", part.name()));
        let _ = write!(
            sections,
            "\n## {}\n\n`cargo xtask bench {}` ({took:.0} s)\n\n{}",
            part.title(),
            part.name(),
            text.trim_end()
        );
        sections.push('\n');
    }
    let path = root()?.join("BENCHMARKS.md");
    match part {
        None => {
            let page = format!("{}{sections}", header(started.elapsed().as_secs_f64()));
            std::fs::write(&path, page)?;
        }
        Some(p) => {
            let page = match std::fs::read_to_string(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                read => read.with_context(|| format!("reading {}", path.display()))?,
            };
            std::fs::write(&path, splice(&page, p, &sections))?;
        }
    }
    step(&format!(
        "wrote {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// `page` with part `p`'s section replaced by `section` (marked as re-run alone,
/// with its commit and date), or inserted where the suite's order puts it.
fn splice(page: &str, p: Part, section: &str) -> String {
    let page = &page.replacen(
        "(the whole suite); do not edit by hand.",
        "(the whole suite, or one part re-run alone, whose section says so); do not \
         edit by hand.",
        1,
    );
    let marker = format!("`cargo xtask bench {}` (", p.name());
    let note = format!(
        "{marker}re-run alone at {} on {}, ",
        git_commit(),
        first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let section = section.replacen(&marker, &note, 1);
    let start_of = |q: Part| page.find(&format!("\n## {}\n", q.title()));
    let end_after = |at: usize| {
        page[at + 1..]
            .find("\n## ")
            .map_or(page.len(), |e| at + 1 + e)
    };
    if let Some(at) = start_of(p) {
        return format!(
            "{}{}\n{}",
            &page[..at],
            section.trim_end(),
            &page[end_after(at)..]
        );
    }
    let later = Part::ALL
        .iter()
        .skip_while(|q| **q != p)
        .skip(1)
        .find_map(|q| start_of(*q));
    let at = later.unwrap_or(page.len());
    format!("{}{}\n{}", &page[..at], section.trim_end(), &page[at..])
}

fn root() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has a parent")?
        .to_owned())
}

fn build_apilb_and_stub() -> anyhow::Result<()> {
    step(
        "building apilb, the stub apiserver and oneshot-load (release), which the \
         benchmarks run",
    );
    for (package, bin) in [
        ("lb-userspace", "apilb"),
        ("tests", "stub-apiserver"),
        ("tests", "oneshot-load"),
    ] {
        exec(cargo().args(["build", "--quiet", "--release", "-p", package, "--bin", bin]))?;
    }
    Ok(())
}

/// Run a benchmark binary (release), showing its stdout as it comes; return it.
fn run_bin(bin: &str) -> anyhow::Result<String> {
    step(&format!("running {bin} (release build)"));
    let mut child = tests_bin(bin)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    if !child.wait()?.success() {
        bail!("{bin} failed");
    }
    Ok(text)
}

/// The page's head: when, where, and with which versions of everything compared.
fn header(took: f64) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown", |m| m.trim_start_matches([' ', '\t', ':']))
        .to_owned();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let commit = git_commit();
    let mut s = String::from(
        "# apilb benchmarks\n\n\
         Written by `cargo xtask bench` (the whole suite, or one part re-run alone, \
         whose section says so); do not edit by hand. Each section says how it measures; the README's Benchmarks section discusses the \
         figures. Targets are reported, never asserted.\n\n",
    );
    let _ = writeln!(s, "| | |\n| --- | --- |");
    let rows = [
        ("date", first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
        ("apilb commit", commit),
        ("kernel", first_line("uname", &["-r"])),
        ("CPU", format!("{cpus} x {model}")),
        ("haproxy", first_line("haproxy", &["-v"])),
        ("nginx", first_line("nginx", &["-v"])),
        ("iptables", first_line("iptables", &["--version"])),
        ("keepalived", first_line("keepalived", &["--version"])),
        ("etcd", first_line("etcd", &["--version"])),
        ("wrk", first_line("wrk", &["--version"])),
        ("suite took", format!("{took:.0} s")),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {} |", v.replace('|', "/"));
    }
    s
}

/// The first non-empty line `program args` prints (stdout, then stderr).
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program).args(args).output().ok().map_or_else(
        || "not installed".to_owned(),
        |o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .trim()
                .to_owned()
        },
    )
}

/// The short hash of the commit checked out.
fn git_commit() -> String {
    first_line(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# apilb benchmarks\n\nWritten by `cargo xtask bench` (the whole \
        suite); do not edit by hand.\n\n## Failover: a VIP moving, a master dying\n\n\
        `cargo xtask bench failover` (421 s)\n\nold failover\n\n## The XDP program, ns \
        per packet\n\n`cargo xtask bench xdp` (35 s)\n\nxdp\n";

    fn section(p: Part, text: &str) -> String {
        format!(
            "\n## {}\n\n`cargo xtask bench {}` (9 s)\n\n{text}\n",
            p.title(),
            p.name()
        )
    }

    #[test]
    fn a_part_run_alone_replaces_its_section_or_takes_its_place_in_the_order() {
        let page = splice(
            PAGE,
            Part::Failover,
            &section(Part::Failover, "new failover"),
        );
        assert!(!page.contains("old failover"), "{page}");
        assert!(
            page.contains("new failover\n\n## The XDP program"),
            "{page}"
        );
        assert!(page.contains("`cargo xtask bench failover` (re-run alone at "));
        assert!(page.contains("or one part re-run alone"));
        // Sync has no section yet: it goes between failover and xdp.
        let page = splice(&page, Part::Sync, &section(Part::Sync, "sync"));
        let (f, s, x) = (
            page.find("new failover").unwrap(),
            page.find("\nsync\n").unwrap(),
            page.find("\nxdp\n").unwrap(),
        );
        assert!(f < s && s < x, "{page}");
        // The last section, replaced, keeps nothing of the old one.
        let page = splice(&page, Part::Xdp, &section(Part::Xdp, "xdp 2"));
        assert!(page.ends_with("\n\nxdp 2\n"), "{page}");
    }
}
