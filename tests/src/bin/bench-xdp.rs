//! `cargo xtask bench xdp`: nanoseconds per packet through the XDP program.
//!
//! Every figure comes from `BPF_PROG_TEST_RUN` with repeat = 1, one syscall per
//! packet: the program rewrites packets in place, so a kernel-side repeat would feed
//! every run after the first an already-rewritten packet. The kernel times each run
//! itself, so syscall cost is not included; timer overhead is, equally for every row,
//! including the `XDP_DROP` floor measured in the same run. The thread is pinned to
//! CPU 0 and the lab namespace gives the FIB real, permanent neighbours, so the
//! forwarding rows include a real `bpf_fib_lookup`.

use std::time::Duration;

use lb_common::{FLOW_TABLE_SIZE, NEXTHOP_TTL_DEFAULT_NS, PROG_XDP};
use lb_userspace::{floor::Floor, loader::LoadOptions};
use tests::{
    fixture::{
        CLIENT_MAC, FX0_MAC, FX1_MAC, Ingress, Lab, LabConfig, XDP_DROP, XDP_PASS, XDP_REDIRECT,
        chain, master_mac, sa, test_run,
    },
    packets::Tcp,
};

const ROUNDS: usize = 20;
const PER_ROUND: usize = 2_500;
const RUNS: usize = ROUNDS * PER_ROUND;
const VIP: &str = "192.0.2.100:6443";

/// Which program a row runs: the balancer, or the floor, an object of its own that
/// only this benchmark loads.
#[derive(Clone, Copy)]
enum Prog {
    Balancer,
    Floor,
}

/// One benchmark row: which program, on which packets, and the verdict every run
/// must return (so a row can never silently measure another path).
struct Case {
    name: &'static str,
    prog: Prog,
    ingress: Ingress,
    packets: Vec<Vec<u8>>,
    action: u32,
    /// Index of the next packet to send; never reset, so the new-flow row never
    /// resends a SYN whose flow the warm-up already recorded.
    next: usize,
    ns: Vec<u64>,
}

impl Case {
    fn new(
        name: &'static str,
        prog: Prog,
        ingress: Ingress,
        packets: Vec<Vec<u8>>,
        action: u32,
    ) -> Self {
        Self {
            name,
            prog,
            ingress,
            packets,
            action,
            next: 0,
            ns: Vec::with_capacity(RUNS),
        }
    }

    /// Run the next `PER_ROUND` packets, one syscall each.
    fn round(&mut self, lab: &mut Lab, floor: &mut Floor) {
        for _ in 0..PER_ROUND {
            let i = self.next % self.packets.len();
            self.next += 1;
            let out = match self.prog {
                Prog::Balancer => lab.test_run(PROG_XDP, &self.packets[i], self.ingress),
                Prog::Floor => {
                    let floor = floor
                        .program()
                        .unwrap_or_else(|e| panic!("the floor: {}", chain(&e)));
                    test_run(floor, &self.packets[i], lab.ifindex(self.ingress))
                        .unwrap_or_else(|e| panic!("{}: {}", self.name, chain(&e)))
                }
            };
            assert_eq!(
                out.action,
                self.action,
                "{}: run {} took another path",
                self.name,
                self.ns.len()
            );
            self.ns
                .push(u64::try_from(out.duration.as_nanos()).unwrap_or(u64::MAX));
        }
    }

    fn permille(&self, p: usize) -> u64 {
        let mut v = self.ns.clone();
        v.sort_unstable();
        v[(v.len() - 1) * p / 1000]
    }

    fn mean(&self) -> f64 {
        self.ns.iter().sum::<u64>() as f64 / self.ns.len() as f64
    }
}

fn main() {
    let mut lab = Lab::with_options(
        "apilb-bench-xdp",
        &LoadOptions {
            flow_table_size: FLOW_TABLE_SIZE,
            half_open_table_size: lb_common::HALF_OPEN_TABLE_SIZE,
            pin_dir: None,
        },
    );
    let mut floor = Floor::load().unwrap_or_else(|e| panic!("the floor: {}", chain(&e)));
    let mut rows = cases(&mut lab);
    // Warm up, then interleave the rows round by round so that any drift of the
    // machine during the run weighs on every row alike.
    for row in &mut rows {
        row.round(&mut lab, &mut floor);
        row.ns.clear();
    }
    for _ in 0..ROUNDS {
        for row in &mut rows {
            row.round(&mut lab, &mut floor);
        }
    }
    report(&rows);
}

/// Provision the lab with one VIP over three masters and build the five rows.
fn cases(lab: &mut Lab) -> [Case; 7] {
    // Ids 1-3, as the controller numbers the backends in config order.
    let masters: Vec<_> = (1..=3)
        .map(|n| (n, sa(&format!("198.51.100.1{n}:6443"))))
        .collect();
    let addrs: Vec<_> = masters.iter().map(|(_, a)| *a).collect();
    let mut setup = LabConfig::new(&[sa(VIP)], &addrs);
    setup.snat_v6 = false;
    setup.nat_ports = 1024..=65_535;
    setup.nexthop_ttl = Duration::from_nanos(NEXTHOP_TTL_DEFAULT_NS);
    lab.configure(&setup);

    // Two established flows (handshake done), for the established and reply
    // rows: one without TCP timestamps, one with them, which the datapath
    // rewrites both ways.
    let (data, reply) = established(lab, &masters, 50_000, false);
    let (data_ts, reply_ts) = established(lab, &masters, 50_002, true);

    let non_vip = Tcp::syn(
        CLIENT_MAC,
        FX0_MAC,
        sa("192.0.2.10:50001"),
        sa("192.0.2.1:22"),
    )
    .data(b"ssh")
    .build();
    let new_flows: Vec<Vec<u8>> = (0..RUNS + PER_ROUND)
        .map(|i| {
            let client = format!("192.0.2.{}:{}", 11 + i / 60_000, 1024 + i % 60_000);
            Tcp::syn(CLIENT_MAC, FX0_MAC, sa(&client), sa(VIP)).build()
        })
        .collect();
    [
        Case::new(
            "XDP_DROP (floor)",
            Prog::Floor,
            Ingress::ClientSide,
            vec![data.clone()],
            XDP_DROP,
        ),
        Case::new(
            "non-VIP packet",
            Prog::Balancer,
            Ingress::ClientSide,
            vec![non_vip],
            XDP_PASS,
        ),
        Case::new(
            "established flow",
            Prog::Balancer,
            Ingress::ClientSide,
            vec![data],
            XDP_REDIRECT,
        ),
        Case::new(
            "reply (reverse NAT)",
            Prog::Balancer,
            Ingress::MasterSide,
            vec![reply],
            XDP_REDIRECT,
        ),
        Case::new(
            "established flow, timestamps",
            Prog::Balancer,
            Ingress::ClientSide,
            vec![data_ts],
            XDP_REDIRECT,
        ),
        Case::new(
            "reply, timestamps",
            Prog::Balancer,
            Ingress::MasterSide,
            vec![reply_ts],
            XDP_REDIRECT,
        ),
        Case::new(
            "new flow (SYN)",
            Prog::Balancer,
            Ingress::ClientSide,
            new_flows,
            XDP_REDIRECT,
        ),
    ]
}

/// Open a flow from client port `port` through its handshake (SYN, the master's
/// SYN-ACK, the client's ACK), with or without timestamps, and return a data
/// segment of it from the client and one from its master.
fn established(
    lab: &mut Lab,
    masters: &[(u32, std::net::SocketAddr)],
    port: u16,
    ts: bool,
) -> (Vec<u8>, Vec<u8>) {
    let stamp = |t: Tcp, val: u32, ecr: u32| if ts { t.timestamps(val, ecr) } else { t };
    let syn = Tcp::syn(
        CLIENT_MAC,
        FX0_MAC,
        sa(&format!("192.0.2.10:{port}")),
        sa(VIP),
    );
    let first = lab.test_run(
        PROG_XDP,
        &stamp(syn.clone(), 1_000, 0).build(),
        Ingress::ClientSide,
    );
    assert_eq!(first.action, XDP_REDIRECT);
    let flow = lab
        .all_flows()
        .into_iter()
        .find(|(k, _)| u16::from_be(k.sport_be) == port)
        .expect("the new flow")
        .1;
    let backend = masters
        .iter()
        .find(|(id, _)| *id == flow.backend_id)
        .expect("backend")
        .1;
    let nat = sa(&format!("198.51.100.1:{}", u16::from_be(flow.nat_port_be)));
    let mac = master_mac(u8::try_from(flow.backend_id).expect("lab backend ids are small"));
    let mut syn_ack = Tcp::syn(mac, FX1_MAC, backend, nat);
    syn_ack.ack = Some(syn.seq + 1);
    let syn_ack = stamp(syn_ack, 500, 1_000);
    let out = lab.test_run(PROG_XDP, &syn_ack.build(), Ingress::MasterSide);
    assert_eq!(out.action, XDP_REDIRECT);
    let ack = stamp(syn.clone().data(b""), 1_001, 500);
    let out = lab.test_run(PROG_XDP, &ack.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT);
    assert!(
        lab.dp
            .flows()
            .expect("flows")
            .iter()
            .any(|(k, _)| u16::from_be(k.sport_be) == port),
        "the flow is established"
    );
    let data = stamp(
        syn.clone()
            .data(b"GET /api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\n"),
        1_002,
        500,
    );
    let mut reply = Tcp::syn(mac, FX1_MAC, backend, nat);
    reply.ack = Some(syn.seq + 1);
    let reply = stamp(reply.data(&[0x42; 64]), 501, 1_002);
    (data.build(), reply.build())
}

fn report(rows: &[Case]) {
    let floor = rows[0].permille(500) as f64;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "XDP ns/packet, BPF_PROG_TEST_RUN repeat=1, {RUNS} runs per row in {ROUNDS} interleaved rounds, CPU 0 pinned"
    );
    println!("kernel {}, {cpu}", kernel.trim());
    println!();
    println!("| path | median ns | mean ns | p99 ns | median / XDP_DROP |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {:.1} | {} | {:.2}x |",
            r.name,
            r.permille(500),
            r.mean(),
            r.permille(990),
            r.permille(500) as f64 / floor
        );
    }
    let established = rows[2].permille(500) as f64 / floor;
    println!();
    println!("target: established flow <= 2.50x XDP_DROP; measured {established:.2}x");
}
