//! What the soak measured, its summary table, and the bounds it asserts.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use tests::{natstate::NatCounters, oneshot::Closer};

use crate::{
    FLAP_PERIOD, FLAP_SETTLE, FLAPPING, RSS_GROWTH, Sample, WATCHES,
    load::{Load, MAX_IN_FLIGHT},
    streams::Watch,
};

/// Everything measured.
pub struct Outcome {
    pub run_for: Duration,
    pub rate: u32,
    pub load: Load,
    pub watches: Vec<Watch>,
    pub flaps: Vec<(Duration, bool)>,
    pub samples: Vec<Sample>,
    pub nat: NatCounters,
    /// Health transitions of each backend during the run, as apilb counted them:
    /// (master index, address, transitions).
    pub transitions: Vec<(usize, SocketAddr, u64)>,
    /// Per master, connections its kernel dropped for a full accept queue.
    pub overflows: Vec<u64>,
}

impl Outcome {
    /// The flapping master's share of new connections in each settled window,
    /// out of rotation and in: (out shares, in shares).
    fn flap_shares(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut inn) = (Vec::new(), Vec::new());
        let secs = self.load.per_second.len();
        for (k, &(at, ready)) in self.flaps.iter().enumerate() {
            let end = self
                .flaps
                .get(k + 1)
                .map_or(secs as f64, |(next, _)| next.as_secs_f64());
            let from = (at + FLAP_SETTLE).as_secs_f64().ceil();
            let mut by = [0u64; 3];
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "whole seconds within the run"
            )]
            for s in (from as usize)..(end.floor() as usize).min(secs) {
                for (m, n) in self.load.per_second[s].iter().enumerate() {
                    by[m] += u64::from(*n);
                }
            }
            let all: u64 = by.iter().sum();
            if all == 0 {
                continue;
            }
            let share = by[FLAPPING] as f64 / all as f64;
            if ready { &mut inn } else { &mut out }.push(share);
        }
        (out, inn)
    }

    /// RSS at the end of the first minute (or half the run), and the most after it.
    fn rss_growth(&self) -> (u64, u64) {
        let mark = Duration::from_mins(1).min(self.run_for / 2);
        let base = self
            .samples
            .iter()
            .find(|s| s.at >= mark)
            .map_or(0, |s| s.rss_kib);
        let after = self
            .samples
            .iter()
            .filter(|s| s.at >= mark)
            .map(|s| s.rss_kib)
            .max()
            .unwrap_or(0);
        (base, after)
    }

    /// Per flow table: its peak entries and its size.
    fn table_peaks(&self) -> BTreeMap<&'static str, (usize, u32)> {
        let mut peaks = BTreeMap::new();
        for t in self.samples.iter().flat_map(|s| &s.tables) {
            let e = peaks.entry(t.name).or_insert((0, t.size));
            e.0 = e.0.max(t.entries);
        }
        peaks
    }

    fn broken(&self) -> Vec<&Watch> {
        self.watches.iter().filter(|w| w.broken()).collect()
    }

    /// The summary table, fit for `BENCHMARKS.md`.
    pub fn summary(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        self.load_rows(&mut rows);
        self.health_rows(&mut rows);
        self.footprint_rows(&mut rows);
        let mut s = format!(
            "Soak: {:.0} min of {} new connections/s through apilb, equal thirds client \
             closes / server closes / client RST, half to an IPv4 VIP and half to an IPv6 VIP, \
             plain HTTP; {WATCHES} TLS watch streams; master-2's /readyz off and on every \
             {} s. Load took {:.1} s to finish.\n\n| | |\n| --- | --- |\n",
            self.run_for.as_secs_f64() / 60.0,
            self.rate,
            FLAP_PERIOD.as_secs() / 2,
            self.load.took.as_secs_f64()
        );
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        s
    }

    /// The connections: started, answered, per closer and VIP, failed.
    fn load_rows(&self, rows: &mut Vec<(String, String)>) {
        let l = &self.load;
        let (ok, failed) = l.totals();
        let secs = self.run_for.as_secs_f64();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row(
            "new connections",
            format!(
                "{} started of {} scheduled ({}/s for {secs:.0} s), {ok} answered: \
                 {:.0}/s; at most {} behind schedule",
                l.started,
                l.scheduled,
                self.rate,
                ok as f64 / secs,
                l.max_behind
            ),
        );
        for (c, closer) in Closer::ALL.iter().enumerate() {
            let mut t = l.tally[0][c].clone();
            t.merge(l.tally[1][c].clone());
            let p99 = t.quantile_ms(0.99);
            row(
                closer.name(),
                format!(
                    "{} answered, {} failed, p99 {p99:.2} ms (connect to last byte)",
                    t.ok,
                    t.failures()
                ),
            );
        }
        for (v, name) in ["IPv4 VIP", "IPv6 VIP"].iter().enumerate() {
            let (ok, failed) = l.tally[v]
                .iter()
                .fold((0, 0), |(o, f), t| (o + t.ok, f + t.failures()));
            row(name, format!("{ok} answered, {failed} failed"));
        }
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for t in l.tally.iter().flatten() {
            for (k, n) in &t.failed {
                *kinds.entry(k).or_insert(0) += n;
            }
        }
        if l.skipped > 0 {
            kinds.insert("not started (in-flight cap)", l.skipped);
        }
        row(
            "failed connections",
            format!(
                "{failed} {kinds:?}; {} more took over 1 s (a SYN sent again)",
                l.slow
            ),
        );
    }

    /// The streams and the flapping master.
    fn health_rows(&self, rows: &mut Vec<(String, String)>) {
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        let max_gap = self
            .watches
            .iter()
            .map(|w| w.max_gap)
            .max()
            .unwrap_or_default();
        row(
            "watch streams",
            format!(
                "{} of {WATCHES} broken; the longest silence {:.2} s",
                self.broken().len(),
                max_gap.as_secs_f64()
            ),
        );
        let (out, inn) = self.flap_shares();
        let pct = |v: &[f64]| {
            v.iter()
                .map(|s| format!("{:.1} %", s * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let moves: Vec<String> = self
            .transitions
            .iter()
            .map(|(m, a, n)| format!("master-{} {a} {n}", m + 1))
            .collect();
        row(
            "master-2 flapping",
            format!(
                "/readyz off {} times; health transitions apilb counted: {}; master-2's share \
                 of new connections while out of rotation: {}; while in: {}",
                self.flaps.iter().filter(|f| !f.1).count(),
                moves.join(", "),
                pct(&out),
                pct(&inn)
            ),
        );
        row(
            "masters' accept queues overflowed (a master too busy, not the LB)",
            format!("{:?} times", self.overflows),
        );
    }

    /// NAT counters, RSS and the flow tables.
    fn footprint_rows(&self, rows: &mut Vec<(String, String)>) {
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row(
            "SYNs dropped for want of a NAT port",
            self.nat.dropped.to_string(),
        );
        row(
            "NAT ports reclaimed",
            format!(
                "{} of {} new flows",
                self.nat.reclaimed_text(),
                self.nat.flow_new
            ),
        );
        let rss: Vec<u64> = self.samples.iter().map(|s| s.rss_kib).collect();
        let (base, after) = self.rss_growth();
        row(
            "apilb RSS",
            format!(
                "min {} KiB, max {} KiB; {base} KiB after the first minute (or half the \
                 run), at most {after} KiB since",
                rss.iter().min().unwrap_or(&0),
                rss.iter().max().unwrap_or(&0),
            ),
        );
        let peaks: Vec<String> = self
            .table_peaks()
            .iter()
            .map(|(n, (p, s))| format!("{n} {p} / {s}"))
            .collect();
        row("flow tables, peak / size", peaks.join(", "));
    }

    /// Every bound the soak holds apilb to; one panic naming each that failed,
    /// with its numbers.
    pub fn assert_all(&self) {
        let mut failed = Vec::new();
        let mut check = |ok: bool, why: String| {
            if !ok {
                failed.push(why);
            }
        };
        let l = &self.load;
        let (_, failures) = l.totals();
        let samples: Vec<&String> = l
            .tally
            .iter()
            .flatten()
            .flat_map(|t| &t.samples)
            .take(6)
            .collect();
        check(
            failures == 0,
            format!(
                "{failures} of {} new connections failed ({} not started for \
                 {MAX_IN_FLIGHT} in flight), e.g. {samples:?}",
                l.started, l.skipped
            ),
        );
        check(
            l.started == l.scheduled,
            format!(
                "the load started {} of {} connections",
                l.started, l.scheduled
            ),
        );
        let broken = self.broken();
        check(
            broken.is_empty(),
            format!(
                "{} of {WATCHES} watch streams broke: {broken:?}",
                broken.len()
            ),
        );
        check(
            self.nat.dropped == 0,
            format!(
                "apilb dropped {} SYNs for want of a NAT port ({} new flows, {} ports \
                 reclaimed)",
                self.nat.dropped,
                self.nat.flow_new,
                self.nat.reclaimed_text()
            ),
        );
        for (name, (peak, size)) in self.table_peaks() {
            check(
                peak < size as usize,
                format!("{name} filled up: {peak} entries of {size}"),
            );
        }
        // Each /readyz off that was turned back on is two transitions (out, in);
        // the last may still be off at the end. No other master may move.
        let offs = self.flaps.iter().filter(|f| !f.1).count() as u64;
        check(
            offs > 0,
            "the run was too short for master-2 to flap".into(),
        );
        for (m, addr, n) in &self.transitions {
            let expected = if *m == FLAPPING {
                offs.saturating_mul(2).saturating_sub(1)..=offs * 2
            } else {
                0..=0
            };
            check(
                expected.contains(n),
                format!(
                    "master-{} ({addr}) moved in or out of rotation {n} times, expected \
                     {expected:?} (apilb's warnings are above)",
                    m + 1
                ),
            );
        }
        let (base, after) = self.rss_growth();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "KiB, far below 2^52"
        )]
        let bound = (base as f64 * (1.0 + RSS_GROWTH)) as u64;
        check(
            after <= bound,
            format!(
                "apilb's RSS grew from {base} KiB to {after} KiB, over {:.0} %",
                RSS_GROWTH * 100.0
            ),
        );
        assert!(
            failed.is_empty(),
            "the soak failed {} of its checks:\n- {}",
            failed.len(),
            failed.join("\n- ")
        );
    }
}

/// apilb's log lines at `WARN` and above, counted by their text without the
/// fields that vary (time, addresses, counts, latencies).
pub fn warnings(log: &str) -> String {
    const VARYING: [&str; 6] = [
        "backend=",
        "latency=",
        "transitions=",
        "count=",
        "flows=",
        "elapsed=",
    ];
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines().map(strip_ansi) {
        let mut words = line.split_whitespace().skip(1);
        if !matches!(words.next(), Some("WARN" | "ERROR")) {
            continue;
        }
        let text: Vec<&str> = words
            .filter(|w| !VARYING.iter().any(|v| w.starts_with(v)))
            .collect();
        *by.entry(text.join(" ")).or_insert(0) += 1;
    }
    by.iter()
        .map(|(m, n)| format!("  {n:>5} x {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `line` without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
