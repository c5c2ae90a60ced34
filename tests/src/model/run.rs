//! The fuzzing loop: frames from the [`Generator`] through the real datapath
//! (`BPF_PROG_TEST_RUN`, in a [`Lab`]) and through the [`Model`], held against
//! each other.
//!
//! Per frame: the verdict and every output byte as the model predicts them; a
//! frame the model finds not the balancer's, or dropped, comes out byte for byte
//! as it went in; a rewritten frame whose checksums were valid has valid
//! checksums (IPv4 header, TCP, ICMP, by the model's own full computation); no
//! frame changes length. Every `counter_every` frames, each counter moved exactly
//! as predicted (one outcome per frame); every `state_every` frames, and at the
//! end of each round, the kernel's four flow tables equal the model's, entry by
//! entry and field by field, and the passive failure counts per master too.
//!
//! Time: the datapath reads the coarse monotonic clock, which userspace reads as
//! `CLOCK_MONOTONIC_COARSE`. It is read before and after each frame; when it
//! ticked in between and the clock mattered, the model answers for every value
//! the clock took (a vCPU held up mid-frame sees more than one tick) and the
//! kernel's output (or, failing that, its tables) says which was right.
//!
//! Rounds: each runs on a fresh lab with its own settings (passive detection on
//! and off; four NAT ports with the shortest timeouts, for port reuse).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::{self, Write as _},
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_F_DOWN, COUNTER_COUNT, COUNTER_NAMES, FlowKey, OUTCOMES, PROG_XDP,
    counters::{
        DROP_FLOW_INSERT, DROP_NO_BACKEND, DROP_NO_NAT_PORT, DROP_NO_SNAT_ADDR, DROP_PASSIVE_ICMP,
        DROP_PASSIVE_RST, DROP_UNPROVEN_REFUSAL, PASS_FRAGMENT, PASS_LOCAL_BACKEND, PASS_MALFORMED,
        PASS_NO_FLOW, PASS_NOT_IP, PASS_NOT_OWNED, PASS_NOT_TCP, PASS_NOT_VIP,
    },
};

use lb_userspace::datapath::BackendEntry;

use super::{
    Half, Model, Prediction,
    frame::checksums_ok,
    generate::{Frame, Generator, VIP6, VIPS4},
};
use crate::{
    fixture::{Ingress, Lab, LabConfig, sa},
    flowfx::{addrs, masters4, masters6},
    packets::describe,
};

/// How a run goes.
#[derive(Clone, Debug)]
pub struct Settings {
    pub frames: u64,
    pub seed: u64,
    /// Check the counters every this many frames.
    pub counter_every: u64,
    /// Hold the flow tables against the model every this many frames.
    pub state_every: u64,
    /// Namespace prefix of the labs.
    pub prefix: String,
}

impl Settings {
    /// `frames` frames from `APILB_FUZZ_SEED` (or one drawn now), checked as
    /// the test suite checks them.
    #[must_use]
    pub fn new(frames: u64, prefix: &str) -> Self {
        let seed = std::env::var("APILB_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        let every = |var: &str, default: u64| {
            std::env::var(var)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default)
                .max(1)
        };
        Self {
            frames,
            seed,
            counter_every: every("APILB_FUZZ_COUNTER_EVERY", 16),
            state_every: every("APILB_FUZZ_STATE_EVERY", 512),
            prefix: prefix.to_string(),
        }
    }
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub frames: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
    pub by_outcome: BTreeMap<&'static str, u64>,
    pub by_verdict: BTreeMap<&'static str, u64>,
    pub mutated: u64,
    pub unchanged_checked: u64,
    pub rewritten: u64,
    pub checksums_checked: u64,
    pub clock_ticks: u64,
    pub table_checks: u64,
    pub counter_checks: u64,
    pub rounds: Vec<String>,
    /// Violations of the first-principles checks on the kernel's tables that
    /// the model shares (so both sides agree, and both are wrong): at most
    /// one per round, each with the frames that led to it.
    pub findings: Vec<String>,
    pub elapsed: Duration,
    /// Time in `BPF_PROG_TEST_RUN` alone.
    pub in_kernel: Duration,
}

impl Summary {
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn verdict_name(v: u32) -> &'static str {
    [
        "XDP_ABORTED",
        "XDP_DROP",
        "XDP_PASS",
        "XDP_TX",
        "XDP_REDIRECT",
    ]
    .get(v as usize)
    .copied()
    .unwrap_or("other")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| fuzz run | |")?;
        writeln!(f, "| --- | ---: |")?;
        writeln!(f, "| seed (`APILB_FUZZ_SEED`) | {} |", self.seed)?;
        writeln!(f, "| frames | {} |", self.frames)?;
        writeln!(f, "| of which mutated | {} |", self.mutated)?;
        writeln!(f, "| rounds | {} |", self.rounds.join("; "))?;
        writeln!(
            f,
            "| time | {:.1} s ({:.1} s in BPF_PROG_TEST_RUN) |",
            self.elapsed.as_secs_f64(),
            self.in_kernel.as_secs_f64()
        )?;
        writeln!(f, "| frames/s | {:.0} |", self.rate())?;
        writeln!(f, "| mismatches with the model | 0 |")?;
        writeln!(
            f,
            "| rounds whose tables broke a first-principles check | {} |",
            self.findings.len()
        )?;
        writeln!(
            f,
            "| checked unchanged (not the balancer's, or dropped) | {} |",
            self.unchanged_checked
        )?;
        writeln!(f, "| rewritten | {} |", self.rewritten)?;
        writeln!(
            f,
            "| rewritten with valid checksums in, checked valid out | {} |",
            self.checksums_checked
        )?;
        writeln!(
            f,
            "| counter checks / table checks | {} / {} |",
            self.counter_checks, self.table_checks
        )?;
        writeln!(
            f,
            "| frames the coarse clock ticked through | {} |",
            self.clock_ticks
        )?;
        writeln!(f)?;
        table(f, "verdict", &self.by_verdict)?;
        table(f, "outcome counter", &self.by_outcome)?;
        table(f, "frame class (generator)", &self.by_kind)
    }
}

/// A table of frame counts, largest first.
fn table(f: &mut fmt::Formatter<'_>, title: &str, m: &BTreeMap<&'static str, u64>) -> fmt::Result {
    writeln!(f, "| {title} | frames |")?;
    writeln!(f, "| --- | ---: |")?;
    let mut rows: Vec<_> = m.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    for (k, v) in rows {
        writeln!(f, "| {k} | {v} |")?;
    }
    writeln!(f)
}

/// A disagreement between the datapath and the model, with what it takes to
/// reproduce it.
#[derive(Debug)]
pub struct Mismatch(pub String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One round's lab settings, and the masters marked out of rotation with the
/// rings not rewritten yet (as the controller leaves them for an instant).
fn rounds() -> Vec<(&'static str, LabConfig, Vec<&'static str>)> {
    let vips = [sa(VIPS4[0]), sa(VIP6), sa(VIPS4[1])];
    let mut base = LabConfig::new(&vips, &[addrs(&masters4()), addrs(&masters6())].concat());
    // The third VIP is elected, and this node has not won it.
    base.vips[2].1 = true;
    base.passive = true;
    let mut off = base.clone();
    off.passive = false;
    // And this node is one of the IPv4 VIP's masters (delivered locally, no NAT).
    off.backends.insert(3, (sa("192.0.2.1:6443"), 1, true));
    let mut tight = base.clone();
    tight.nat_ports = 40_000..=40_003;
    let t = &mut tight.tcp_timeouts;
    t.syn_sent = Duration::from_millis(100);
    t.syn_recv = Duration::from_millis(100);
    t.fin_wait = Duration::from_secs(1);
    t.last_ack = Duration::from_millis(100);
    t.time_wait = Duration::from_secs(1);
    t.close = Duration::from_millis(100);
    vec![
        ("passive detection on", base.clone(), vec![]),
        ("passive off, a local master", off, vec![]),
        ("4 NAT ports, shortest timeouts", tight, vec![]),
        (
            "a master of each family marked out",
            base,
            vec!["198.51.100.11:6443", "[2001:db8:2::11]:6443"],
        ),
    ]
}

/// How far `CLOCK_MONOTONIC_COARSE` moves at a tick (a jiffy), in ns.
fn coarse_resolution_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid, writable timespec.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0, "clock_getres");
    u64::try_from(ts.tv_nsec).expect("nanoseconds")
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the datapath's `bpf_ktime_get_coarse_ns`.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).expect("seconds") * 1_000_000_000
        + u64::try_from(ts.tv_nsec).expect("nanoseconds")
}

/// Outcomes after which the frame must come out as it went in.
const UNCHANGED: [u32; 15] = [
    PASS_NOT_IP,
    PASS_NOT_TCP,
    PASS_FRAGMENT,
    PASS_MALFORMED,
    PASS_NOT_VIP,
    PASS_NOT_OWNED,
    PASS_NO_FLOW,
    PASS_LOCAL_BACKEND,
    DROP_NO_BACKEND,
    DROP_NO_NAT_PORT,
    DROP_NO_SNAT_ADDR,
    DROP_FLOW_INSERT,
    DROP_PASSIVE_RST,
    DROP_PASSIVE_ICMP,
    DROP_UNPROVEN_REFUSAL,
];

/// Run the fuzzer; `Err` at the first disagreement.
pub fn run(s: &Settings) -> Result<Summary, Mismatch> {
    let mut sum = Summary {
        seed: s.seed,
        ..Summary::default()
    };
    let start = Instant::now();
    let mut gen_ = Generator::new(s.seed);
    let all = rounds();
    let per_round = s.frames.div_ceil(all.len() as u64);
    for (r, (name, setup, down)) in all.into_iter().enumerate() {
        let n = per_round.min(s.frames - sum.frames);
        if n == 0 {
            break;
        }
        sum.rounds.push(format!("{name}: {n}"));
        let mut lab = Lab::with_config(&format!("{}{r}", s.prefix), &setup);
        // Both interfaces as veths: the datapath looks for partial checksums.
        lab.set_ifaces(&[
            (Ingress::ClientSide, lb_common::IFACE_F_PARTIAL),
            (Ingress::MasterSide, lb_common::IFACE_F_PARTIAL),
        ]);
        let mut model = Model::of(&lab);
        for addr in down {
            let id = lab.backend_id(sa(addr));
            let entry = lab.desired().entry(id).expect("configured");
            lab.dp
                .set_backend(
                    id,
                    &BackendEntry {
                        down: true,
                        ..entry
                    },
                )
                .expect("mark a backend out");
            model.backends.get_mut(&id).expect("configured").flags |= BACKEND_F_DOWN;
        }
        let mut round = Round::new(lab, model, s, r, name);
        round.go(&mut gen_, n, &mut sum)?;
    }
    sum.elapsed = start.elapsed();
    Ok(sum)
}

struct Round<'a> {
    lab: Lab,
    model: Model,
    s: &'a Settings,
    index: usize,
    name: &'static str,
    base: [u64; COUNTER_COUNT as usize],
    pending: [u64; COUNTER_COUNT as usize],
    /// Frames since the last counter check, with their predictions.
    window: Vec<(u64, Frame, Prediction)>,
    recent: Vec<(u64, Frame)>,
    /// The first first-principles violation of this round, once found.
    finding: Option<String>,
    finding_reported: bool,
}

impl<'a> Round<'a> {
    fn new(lab: Lab, model: Model, s: &'a Settings, index: usize, name: &'static str) -> Self {
        let base = lab.dp.counters().expect("counters").0;
        Self {
            lab,
            model,
            s,
            index,
            name,
            base,
            pending: [0; COUNTER_COUNT as usize],
            window: Vec::new(),
            recent: Vec::new(),
            finding: None,
            finding_reported: false,
        }
    }

    fn fail(&self, at: u64, what: &str) -> Mismatch {
        let mut m = format!(
            "datapath and model disagree: {what}\n  seed {} (APILB_FUZZ_SEED), round {} ({}), frame {at}\n",
            self.s.seed, self.index, self.name
        );
        let _ = writeln!(m, "  frames before it, newest last:");
        for (i, f) in &self.recent {
            let _ = writeln!(
                m,
                "  #{i} {} ({:?}{}): {}",
                f.kind,
                f.ingress,
                if f.mutated { ", mutated" } else { "" },
                hex(&f.bytes)
            );
        }
        Mismatch(m)
    }

    fn go(&mut self, g: &mut Generator, n: u64, sum: &mut Summary) -> Result<(), Mismatch> {
        for _ in 0..n {
            let at = sum.frames;
            let frame = g.next(&self.model);
            let ifindex = self.lab.ifindex(frame.ingress);
            let t0 = coarse_ns();
            let out = self.lab.test_run(PROG_XDP, &frame.bytes, frame.ingress);
            let t1 = coarse_ns();
            sum.in_kernel += out.duration;
            let a = self.model.step(&frame.bytes, ifindex, t0);
            let same = |p: &Prediction| p.verdict == out.action && p.output == out.packet;
            let ticked = t1 != t0 && a.timed;
            // Whether the model's tables already hold the frame's changes.
            let mut applied = false;
            let chosen = if ticked {
                sum.clock_ticks += 1;
                // Every value the coarse clock took from t0 to t1: a vCPU held up
                // mid-frame can see it tick more than once.
                let mut matching: Vec<Prediction> = Vec::new();
                if same(&a) {
                    matching.push(a.clone());
                }
                // The ticks in between, spread evenly. A tick is a jiffy give or
                // take the nanosecond the timekeeper's adjustment adds to some, so
                // a guess between t0 and t1 may store times a little off: the
                // tables settle those (`check_tables` takes the kernel's times
                // within the window).
                let ticks =
                    ((t1 - t0 + coarse_resolution_ns() / 2) / coarse_resolution_ns().max(1)).max(1);
                let mut guessed = false;
                for k in 1..=ticks {
                    let then = t0 + (t1 - t0) * k / ticks;
                    let guess = self.model.step(&frame.bytes, ifindex, then);
                    if same(&guess)
                        && !matching
                            .iter()
                            .any(|m| m.changes == guess.changes && m.counters == guess.counters)
                    {
                        guessed |= k < ticks;
                        matching.push(guess);
                    }
                }
                match matching.len() {
                    0 => {
                        return Err(self.frame_mismatch(at, &frame, &a, out.action, &out.packet));
                    }
                    1 if !guessed => matching.remove(0),
                    _ => {
                        applied = true;
                        self.by_tables(at, &frame, matching, (t0, t1))?
                    }
                }
            } else if same(&a) {
                a
            } else {
                return Err(self.frame_mismatch(at, &frame, &a, out.action, &out.packet));
            };
            if !applied {
                self.model.apply(&chosen.changes);
            }
            if let Some(port) = trace_port() {
                trace(at, &frame, &chosen, port);
            }
            self.frame_checks(at, &frame, &chosen, sum)?;
            for &c in &chosen.counters {
                self.pending[c as usize] += 1;
            }
            self.recent.push((at, frame.clone()));
            if self.recent.len() > 12 {
                self.recent.remove(0);
            }
            self.window.push((at, frame, chosen));
            sum.frames += 1;
            if sum.frames.is_multiple_of(self.s.counter_every) {
                self.check_counters(at)?;
                sum.counter_checks += 1;
            }
            if sum.frames.is_multiple_of(self.s.state_every) {
                self.check_tables(None).map_err(|e| self.fail(at, &e))?;
                sum.table_checks += 1;
            }
            if let Some(e) = &self.finding
                && !self.finding_reported
            {
                self.finding_reported = true;
                sum.findings.push(self.fail(at, e).0.replacen(
                    "datapath and model disagree",
                    "a first-principles check failed (the model agrees with the datapath)",
                    1,
                ));
            }
        }
        self.check_counters(sum.frames)?;
        self.check_tables(None)
            .map_err(|e| self.fail(sum.frames, &e))?;
        self.check_passive()
            .map_err(|e| self.fail(sum.frames, &e))?;
        sum.counter_checks += 1;
        sum.table_checks += 1;
        Ok(())
    }

    /// The clock ticked during the frame and both readings give the kernel's
    /// output but change the tables differently: the tables say which (each
    /// time field may hold either reading, as the program may read the clock
    /// more than once). The model is left with that one's changes made.
    fn by_tables(
        &mut self,
        at: u64,
        frame: &Frame,
        candidates: Vec<Prediction>,
        window: (u64, u64),
    ) -> Result<Prediction, Mismatch> {
        let saved = self.model.clone();
        for p in candidates {
            self.model.apply(&p.changes);
            if self.check_tables(Some(window)).is_ok() {
                return Ok(p);
            }
            self.model = saved.clone();
        }
        let mut e = self.fail(at, "the tables after a frame the clock ticked through");
        let _ = writeln!(e.0, "  frame:\n{}", describe(&frame.bytes));
        Err(e)
    }

    fn frame_mismatch(
        &self,
        at: u64,
        frame: &Frame,
        p: &Prediction,
        verdict: u32,
        got: &[u8],
    ) -> Mismatch {
        let mut e = self.fail(at, "verdict or output bytes");
        let _ = write!(
            e.0,
            "  frame #{at}: {} ({:?}{})\n  input:\n{}  model: {} ({})\n{}  datapath: {}\n{}",
            frame.kind,
            frame.ingress,
            if frame.mutated { ", mutated" } else { "" },
            describe(&frame.bytes),
            verdict_name(p.verdict),
            COUNTER_NAMES[p.outcome as usize],
            describe(&p.output),
            verdict_name(verdict),
            describe(got),
        );
        e
    }

    fn frame_checks(
        &self,
        at: u64,
        frame: &Frame,
        p: &Prediction,
        sum: &mut Summary,
    ) -> Result<(), Mismatch> {
        *sum.by_kind.entry(frame.kind).or_default() += 1;
        *sum.by_outcome
            .entry(COUNTER_NAMES[p.outcome as usize])
            .or_default() += 1;
        *sum.by_verdict.entry(verdict_name(p.verdict)).or_default() += 1;
        sum.mutated += u64::from(frame.mutated);
        if p.output.len() != frame.bytes.len() {
            return Err(self.fail(at, "the frame changed length"));
        }
        if UNCHANGED.contains(&p.outcome) {
            if p.output != frame.bytes {
                return Err(self.fail(
                    at,
                    "a frame that is not the balancer's, or dropped, was changed",
                ));
            }
            sum.unchanged_checked += 1;
        } else if p.output != frame.bytes {
            sum.rewritten += 1;
            if checksums_ok(&frame.bytes) == Some(true) {
                if checksums_ok(&p.output) != Some(true) {
                    let mut e = self.fail(at, "a rewritten frame's checksums");
                    let _ = write!(e.0, "{}", describe(&p.output));
                    return Err(e);
                }
                sum.checksums_checked += 1;
            }
        }
        Ok(())
    }

    fn check_counters(&mut self, at: u64) -> Result<(), Mismatch> {
        let now = self.lab.dp.counters().expect("counters").0;
        let mut bad = Vec::new();
        let mut outcomes = 0;
        for i in 0..COUNTER_COUNT as usize {
            let moved = now[i] - self.base[i];
            if i < OUTCOMES as usize {
                outcomes += moved;
            }
            if moved != self.pending[i] {
                bad.push(format!(
                    "{}: datapath +{moved}, model +{}",
                    COUNTER_NAMES[i], self.pending[i]
                ));
            }
        }
        let frames = self.window.len() as u64;
        if !bad.is_empty() || outcomes != frames {
            let mut e = self.fail(at, "counters");
            let _ = writeln!(
                e.0,
                "  {outcomes} outcomes for {frames} frames; {}",
                bad.join(", ")
            );
            for (i, f, p) in &self.window {
                let _ = writeln!(
                    e.0,
                    "  #{i} {} -> {} [{}]",
                    f.kind,
                    COUNTER_NAMES[p.outcome as usize],
                    p.counters
                        .iter()
                        .map(|&c| COUNTER_NAMES[c as usize])
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            return Err(e);
        }
        self.base = now;
        self.pending = [0; COUNTER_COUNT as usize];
        self.window.clear();
        Ok(())
    }

    /// Hold the kernel's four flow tables against the model's. With `window`,
    /// a time field may differ where both values lie in it (the clock ticked
    /// during the last frame), and the model takes the kernel's.
    fn check_tables(&mut self, window: Option<(u64, u64)>) -> Result<(), String> {
        let dp = &self.lab.dp;
        let flows = [
            (false, dp.flows().expect("flows")),
            (true, dp.half_open_flows().expect("half-open flows")),
        ];
        let replies = [
            (false, dp.replies().expect("replies")),
            (true, dp.half_open_replies().expect("half-open replies")),
        ];
        if self.finding.is_none()
            && let Err(e) = ports_held_once(&flows, &replies, &self.model)
        {
            self.finding = Some(e);
        }
        let in_window = |a: u64, b: u64| {
            window.is_some_and(|(t0, t1)| (t0..=t1).contains(&a) && (t0..=t1).contains(&b))
        };
        let mut adopt_f = Vec::new();
        let mut adopt_r = Vec::new();
        compare(
            "flow",
            &flows,
            &self.model.flows,
            |k, v| {
                let mut m = *v;
                m.last_seen_ns = k.last_seen_ns;
                m.next_hop.checked_ns = k.next_hop.checked_ns;
                m == *k
                    && (v.last_seen_ns == k.last_seen_ns
                        || in_window(v.last_seen_ns, k.last_seen_ns))
                    && (v.next_hop.checked_ns == k.next_hop.checked_ns
                        || in_window(v.next_hop.checked_ns, k.next_hop.checked_ns))
            },
            &mut adopt_f,
        )?;
        compare(
            "lease",
            &replies,
            &self.model.replies,
            |k, v| {
                let mut m = *v;
                m.claimed_ns = k.claimed_ns;
                m.next_hop.checked_ns = k.next_hop.checked_ns;
                m == *k
                    && (v.claimed_ns == k.claimed_ns || in_window(v.claimed_ns, k.claimed_ns))
                    && (v.next_hop.checked_ns == k.next_hop.checked_ns
                        || in_window(v.next_hop.checked_ns, k.next_hop.checked_ns))
            },
            &mut adopt_r,
        )?;
        for (k, v) in adopt_f {
            self.model.flows.insert(k, v);
        }
        for (k, v) in adopt_r {
            self.model.replies.insert(k, v);
        }
        Ok(())
    }

    fn check_passive(&self) -> Result<(), String> {
        for &id in self.model.backends.keys() {
            let p = self.lab.dp.passive_stats(id).expect("passive stats");
            let m = self.model.passive.get(&id).copied().unwrap_or_default();
            if [p.rst, p.silent, p.icmp] != m {
                return Err(format!(
                    "passive failures of backend {id}: datapath (rst, silent, icmp) {:?}, model {m:?}",
                    (p.rst, p.silent, p.icmp)
                ));
            }
        }
        Ok(())
    }
}

/// First principles, on the kernel's tables alone: every NAT port a flow or a
/// lease holds is at a pool address, within the configured range, and no port
/// is held by two flows that are not over (a refused flow gave its port back),
/// nor leased in both tables.
fn ports_held_once(
    flows: &[(Half, Vec<(FlowKey, lb_common::FlowState)>); 2],
    replies: &[(Half, Vec<(FlowKey, lb_common::ReplyState)>); 2],
    m: &Model,
) -> Result<(), String> {
    let range = m.cfg.port_min..=m.cfg.port_max;
    let mut held = HashMap::new();
    for (_, entries) in flows {
        for (k, f) in entries {
            if f.nat_port_be == 0 || f.flags & lb_common::FLOW_F_REFUSED != 0 {
                continue;
            }
            if !range.contains(&u16::from_be(f.nat_port_be)) {
                return Err(format!(
                    "flow {k:?} holds port {} outside the range",
                    u16::from_be(f.nat_port_be)
                ));
            }
            let port = (f.backend_be, f.backend_port_be, f.snat_index, f.nat_port_be);
            if let Some(other) = held.insert(port, *k) {
                return Err(format!(
                    "flows {other:?} and {k:?} hold one NAT port: {f:?}"
                ));
            }
        }
    }
    for k in &replies[1].1 {
        if replies[0].1.iter().any(|(e, _)| *e == k.0) {
            return Err(format!(
                "lease {:?} is in both the established and the half-open table",
                k.0
            ));
        }
    }
    for (_, entries) in replies {
        for (k, _) in entries {
            if !range.contains(&u16::from_be(k.dport_be)) || !m.snat(k.family).contains(&k.dst_be) {
                return Err(format!("lease {k:?} is outside the pool or the range"));
            }
        }
    }
    Ok(())
}

/// Compare a pair of kernel tables with the model's; `close` says whether a
/// kernel value the model does not hold exactly is acceptable (then adopted).
fn compare<V: PartialEq + Copy + fmt::Debug>(
    what: &str,
    kernel: &[(Half, Vec<(FlowKey, V)>); 2],
    model: &HashMap<(Half, FlowKey), V>,
    close: impl Fn(&V, &V) -> bool,
    adopt: &mut Vec<((Half, FlowKey), V)>,
) -> Result<(), String> {
    let mut seen = 0;
    for (half, entries) in kernel {
        let table = if *half { "half-open" } else { "established" };
        for (k, v) in entries {
            seen += 1;
            match model.get(&(*half, *k)) {
                Some(m) if m == v => {}
                Some(m) if close(v, m) => adopt.push(((*half, *k), *v)),
                Some(m) => {
                    return Err(format!(
                        "{table} {what} {k:?}:\n  datapath {v:?}\n  model    {m:?}"
                    ));
                }
                None => return Err(format!("{table} {what} {k:?} only in the datapath: {v:?}")),
            }
        }
    }
    if seen != model.len() {
        let missing: Vec<_> = model
            .keys()
            .filter(|(h, k)| !kernel[usize::from(*h)].1.iter().any(|(x, _)| x == k))
            .take(3)
            .collect();
        return Err(format!("{what}s only in the model: {missing:?}"));
    }
    Ok(())
}

/// `APILB_FUZZ_TRACE_PORT`: a NAT port whose every change to print.
fn trace_port() -> Option<u16> {
    static PORT: std::sync::OnceLock<Option<u16>> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        std::env::var("APILB_FUZZ_TRACE_PORT")
            .ok()
            .and_then(|s| s.parse().ok())
    })
}

/// Print a frame's changes to flows and leases of NAT port `port`.
fn trace(at: u64, frame: &Frame, p: &Prediction, port: u16) {
    let port_be = port.to_be();
    let flows: Vec<String> = p
        .changes
        .flows
        .iter()
        .filter(|(_, v)| port == 0 || v.is_none_or(|f| f.nat_port_be == port_be))
        .map(|((h, k), v)| {
            format!(
                "flow{} {}:{} -> {:?}",
                if *h { "(half)" } else { "" },
                k.src_be[3],
                u16::from_be(k.sport_be),
                v.map(|f| (f.state, f.flags, f.backend_id, u16::from_be(f.nat_port_be)))
            )
        })
        .collect();
    let leases: Vec<String> = p
        .changes
        .replies
        .iter()
        .filter(|((_, k), _)| port == 0 || k.dport_be == port_be)
        .map(|((h, k), v)| {
            format!(
                "lease{} b{}:{} -> {:?}",
                if *h { "(half)" } else { "" },
                k.src_be[3],
                u16::from_be(k.dport_be),
                v.map(|r| (r.client_be[3], u16::from_be(r.client_port_be)))
            )
        })
        .collect();
    if !leases.is_empty() || !flows.is_empty() {
        eprintln!(
            "#{at} {} -> {}: {} | {}\n   {}",
            frame.kind,
            COUNTER_NAMES[p.outcome as usize],
            flows.join(", "),
            leases.join(", "),
            hex(&frame.bytes)
        );
    }
}

/// A frame as hex, for reproducers.
#[must_use]
pub fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
