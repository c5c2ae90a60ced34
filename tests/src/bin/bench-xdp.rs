//! `cargo xtask bench xdp`: nanoseconds per packet through the XDP program.
//!
//! Every figure comes from `BPF_PROG_TEST_RUN` with repeat = 1, one syscall per
//! packet: the program rewrites packets in place, so a kernel-side repeat would feed
//! every run after the first an already-rewritten packet. The kernel times each run
//! itself, so syscall cost is not included; timer overhead is, equally for every row,
//! including the `XDP_DROP` floor measured in the same run. The thread is pinned to
//! CPU 0 and the lab namespace gives the FIB real, permanent neighbours, so the
//! forwarding rows include a real `bpf_fib_lookup`.
//!
//! A second VIP syncs its flows (`VIP_F_SYNC`, as the controller sets it with
//! `[sync]`, and a sync listener, so that its SYNs pay the liveness gate's
//! socket lookup): the ACK that completes a handshake is where the datapath writes a
//! flow's event into `SYNC_EVENTS`, so its rows, that ACK on each VIP (the SYN
//! and the master's SYN-ACK run untimed before each), are the export's cost on
//! the new-flow path. The ring is drained between rounds, as the sync thread
//! would, so that no run finds it full.

use std::time::Duration;

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use lb_common::{
    FLOW_TABLE_SIZE, IFACE_F_PARTIAL, NEXTHOP_TTL_DEFAULT_NS, PROG_XDP, counters::SYNC_EVENT_LOST,
};
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
/// A VIP whose flows sync.
const SYNC_VIP: &str = "192.0.2.101:6443";
/// Runs per round of the handshake rows, each three runs (two untimed): fewer,
/// so that their established flows leave the NAT ports enough room.
const ACK_PER_ROUND: usize = 1_000;

/// Which program a row runs: the balancer, or the floor, an object of its own that
/// only this benchmark loads.
#[derive(Clone, Copy)]
enum Prog {
    Balancer,
    Floor,
}

/// What a row sends.
enum Packets {
    /// These frames, in turn.
    Frames(Vec<Vec<u8>>),
    /// The client's ACK completing a handshake with `vip`, from each client in
    /// turn: its SYN and the master's SYN-ACK run first, untimed.
    Acks {
        vip: SocketAddr,
        clients: Vec<SocketAddr>,
    },
}

/// One benchmark row: which program, on which packets, and the verdict every run
/// must return (so a row can never silently measure another path).
struct Case {
    name: &'static str,
    prog: Prog,
    ingress: Ingress,
    packets: Packets,
    action: u32,
    per_round: usize,
    /// Index of the next packet to send; never reset, so the new-flow row never
    /// resends a SYN whose flow the warm-up already recorded.
    next: usize,
    ns: Vec<u64>,
    /// The ingress is a veth (`IFACE_F_PARTIAL`: its packets are looked at for
    /// partial checksums) for this row's runs; every other row's is a NIC.
    veth: bool,
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
            packets: Packets::Frames(packets),
            action,
            per_round: PER_ROUND,
            next: 0,
            ns: Vec::with_capacity(RUNS),
            veth: false,
        }
    }

    /// The same row with its ingress a veth.
    fn on_veth(mut self) -> Self {
        self.veth = true;
        self
    }

    /// The handshake-completing ACK to `vip` from `clients`' addresses, one each.
    fn acks(name: &'static str, vip: SocketAddr, clients: Vec<SocketAddr>) -> Self {
        Self {
            name,
            prog: Prog::Balancer,
            ingress: Ingress::ClientSide,
            packets: Packets::Acks { vip, clients },
            action: XDP_REDIRECT,
            per_round: ACK_PER_ROUND,
            next: 0,
            ns: Vec::with_capacity(ROUNDS * ACK_PER_ROUND),
            veth: false,
        }
    }

    /// Run the next `per_round` packets, one syscall each.
    fn round(&mut self, lab: &mut Lab, floor: &mut Floor) {
        if self.veth {
            lab.set_ifaces(&[(self.ingress, IFACE_F_PARTIAL)]);
        }
        for _ in 0..self.per_round {
            let n = self.next;
            self.next += 1;
            let ack;
            let packet = match &self.packets {
                Packets::Frames(frames) => &frames[n % frames.len()],
                Packets::Acks { vip, clients } => {
                    ack = handshake_up_to_ack(lab, clients[n % clients.len()], *vip);
                    &ack
                }
            };
            let out = match self.prog {
                Prog::Balancer => lab.test_run(PROG_XDP, packet, self.ingress),
                Prog::Floor => {
                    let floor = floor
                        .program()
                        .unwrap_or_else(|e| panic!("the floor: {}", chain(&e)));
                    test_run(floor, packet, lab.ifindex(self.ingress))
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
        if self.veth {
            lab.set_ifaces(&[]);
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
    let mut events = lab.dp.take_sync_events().expect("the sync ring");
    let mut exported = 0;
    // Warm up, then interleave the rows round by round so that any drift of the
    // machine during the run weighs on every row alike.
    for row in &mut rows {
        row.round(&mut lab, &mut floor);
        row.ns.clear();
        exported += drain(&mut events);
    }
    for _ in 0..ROUNDS {
        for row in &mut rows {
            row.round(&mut lab, &mut floor);
            exported += drain(&mut events);
        }
    }
    let lost = lab.dp.counters().expect("counters").get(SYNC_EVENT_LOST);
    report(&rows);
    report_sync(&rows, exported, lost);
}

/// Read every event in the ring, as the sync thread would; how many.
fn drain(events: &mut RingBuf<MapData>) -> usize {
    let mut n = 0;
    while events.next().is_some() {
        n += 1;
    }
    n
}

/// The client's ACK that completes a handshake from `client` to `vip`, after its
/// SYN and the master's SYN-ACK, both run here: the master, its MAC and the NAT
/// port read from the SYN as the datapath forwarded it.
fn handshake_up_to_ack(lab: &mut Lab, client: SocketAddr, vip: SocketAddr) -> Vec<u8> {
    let syn = Tcp::syn(CLIENT_MAC, FX0_MAC, client, vip);
    let out = lab.test_run(PROG_XDP, &syn.build(), Ingress::ClientSide);
    assert_eq!(out.action, XDP_REDIRECT, "the SYN from {client}");
    let p = etherparse::SlicedPacket::from_ethernet(&out.packet).expect("the SYN forwarded");
    let (Some(etherparse::LinkSlice::Ethernet2(eth)), Some(etherparse::NetSlice::Ipv4(ip))) =
        (&p.link, &p.net)
    else {
        panic!("the SYN forwarded is not Ethernet and IPv4");
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = &p.transport else {
        panic!("the SYN forwarded is not TCP");
    };
    let master = SocketAddr::new(
        ip.header().destination_addr().into(),
        tcp.destination_port(),
    );
    let nat = SocketAddr::new(ip.header().source_addr().into(), tcp.source_port());
    let mut syn_ack = Tcp::syn(eth.destination(), FX1_MAC, master, nat);
    syn_ack.ack = Some(syn.seq + 1);
    let out = lab.test_run(PROG_XDP, &syn_ack.build(), Ingress::MasterSide);
    // Towards a client with no neighbour entry, the reply goes to the stack.
    assert!(
        out.action == XDP_REDIRECT || out.action == XDP_PASS,
        "the SYN-ACK to {client}: action {}",
        out.action
    );
    let mut ack = syn.data(b"");
    ack.ack = Some(syn_ack.seq + 1);
    ack.build()
}

/// Provision the lab with two VIPs over three masters, the second syncing its
/// flows, and build the rows.
fn cases(lab: &mut Lab) -> Vec<Case> {
    // Ids 1-3, as the controller numbers the backends in config order.
    let masters: Vec<_> = (1..=3)
        .map(|n| (n, sa(&format!("198.51.100.1{n}:6443"))))
        .collect();
    let addrs: Vec<_> = masters.iter().map(|(_, a)| *a).collect();
    let mut setup = LabConfig::new(&[sa(VIP), sa(SYNC_VIP)], &addrs);
    setup.snat_v6 = false;
    setup.nat_ports = 1024..=65_535;
    setup.nexthop_ttl = Duration::from_nanos(NEXTHOP_TTL_DEFAULT_NS);
    lab.configure(&setup);
    // The controller sets `VIP_F_SYNC` with `[sync]` on an elected VIP; here the
    // flag is written on the static VIP as the controller wrote it otherwise.
    let mut synced = lab
        .desired()
        .vips
        .iter()
        .find(|(v, _)| v.addr == sa(SYNC_VIP))
        .expect("the second VIP")
        .0;
    synced.sync = true;
    lab.dp.set_vip(&synced).expect("VIP_F_SYNC");
    // With `[sync]`, every new flow of that VIP asks the kernel for the node's
    // sync listener (the liveness gate): one listens here, as apilb's would,
    // for the process's life.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a sync listener");
    let mut node = lab.desired().node.clone();
    node.sync_listener = Some(listener.local_addr().expect("its address"));
    lab.dp.set_node_config(&node).expect("the node config");
    std::mem::forget(listener);

    // Two established flows (handshake done), for the established and reply
    // rows: one without TCP timestamps, one with them, which the datapath
    // rewrites both ways.
    let (data, reply) = established(lab, &masters, (sa(VIP), 50_000), false);
    let (data_ts, reply_ts) = established(lab, &masters, (sa(VIP), 50_002), true);

    let non_vip = Tcp::syn(
        CLIENT_MAC,
        FX0_MAC,
        sa("192.0.2.10:50001"),
        sa("192.0.2.1:22"),
    )
    .data(b"ssh")
    .build();
    let new_flows: Vec<Vec<u8>> = clients(11, RUNS + PER_ROUND)
        .map(|c| Tcp::syn(CLIENT_MAC, FX0_MAC, c, sa(VIP)).build())
        .collect();
    let mut rows = vec![
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
    ];
    rows.extend(full_size_cases());
    rows.extend(sync_cases(lab, &masters));
    rows
}

/// A full-size segment on the established flow from a NIC, from a veth (whose
/// packets are looked at for partial checksums, `offload`), and from a veth
/// whose peer left its checksum partial: what each step costs.
fn full_size_cases() -> [Case; 3] {
    let segment = Tcp::syn(CLIENT_MAC, FX0_MAC, sa("192.0.2.10:50000"), sa(VIP)).data(
        &(0..1_400u32)
            .map(|i| i.to_le_bytes()[0])
            .collect::<Vec<u8>>(),
    );
    let case = |name, frame| {
        Case::new(
            name,
            Prog::Balancer,
            Ingress::ClientSide,
            vec![frame],
            XDP_REDIRECT,
        )
    };
    [
        case("established flow, 1,400 bytes", segment.build()),
        case("established flow, 1,400 bytes, veth", segment.build()).on_veth(),
        case(
            "established flow, 1,400 bytes, veth, partial checksum",
            segment.build_partial(),
        )
        .on_veth(),
    ]
}

/// The rows of the VIP that syncs, and the handshake's ACK without it to
/// compare.
fn sync_cases(lab: &mut Lab, masters: &[(u32, SocketAddr)]) -> [Case; 4] {
    let (synced_data, _) = established(lab, masters, (sa(SYNC_VIP), 50_004), false);
    let synced_syns: Vec<Vec<u8>> = clients(11, RUNS + PER_ROUND)
        .map(|c| Tcp::syn(CLIENT_MAC, FX0_MAC, c, sa(SYNC_VIP)).build())
        .collect();
    let acks = (ROUNDS + 1) * ACK_PER_ROUND;
    [
        Case::new(
            "new flow (SYN), VIP that syncs",
            Prog::Balancer,
            Ingress::ClientSide,
            synced_syns,
            XDP_REDIRECT,
        ),
        Case::acks(
            "handshake-completing ACK",
            sa(VIP),
            clients(101, acks).collect(),
        ),
        Case::acks(
            "handshake-completing ACK, VIP that syncs (event exported)",
            sa(SYNC_VIP),
            clients(101, acks).collect(),
        ),
        Case::new(
            "established flow, VIP that syncs",
            Prog::Balancer,
            Ingress::ClientSide,
            vec![synced_data],
            XDP_REDIRECT,
        ),
    ]
}

/// `n` client addresses from `192.0.2.<first>`, 60,000 ports each.
fn clients(first: usize, n: usize) -> impl Iterator<Item = SocketAddr> {
    (0..n).map(move |i| {
        sa(&format!(
            "192.0.2.{}:{}",
            first + i / 60_000,
            1024 + i % 60_000
        ))
    })
}

/// Open a flow from client port `port` through its handshake (SYN, the master's
/// SYN-ACK, the client's ACK), with or without timestamps, and return a data
/// segment of it from the client and one from its master.
fn established(
    lab: &mut Lab,
    masters: &[(u32, SocketAddr)],
    (vip, port): (SocketAddr, u16),
    ts: bool,
) -> (Vec<u8>, Vec<u8>) {
    let stamp = |t: Tcp, val: u32, ecr: u32| if ts { t.timestamps(val, ecr) } else { t };
    let syn = Tcp::syn(CLIENT_MAC, FX0_MAC, sa(&format!("192.0.2.10:{port}")), vip);
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
        "XDP ns/packet, BPF_PROG_TEST_RUN repeat=1, {RUNS} runs per row ({} for the \
         handshake's ACK, each after its SYN and SYN-ACK, untimed) in {ROUNDS} interleaved \
         rounds, CPU 0 pinned",
        ROUNDS * ACK_PER_ROUND
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

/// What a VIP that syncs costs: the export on the handshake's ACK, nothing on an
/// established flow's packets; and that every event reached the ring.
fn report_sync(rows: &[Case], exported: usize, lost: u64) {
    let median = |name: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}"))
            .permille(500)
    };
    let (ack, ack_synced) = (
        median("handshake-completing ACK"),
        median("handshake-completing ACK, VIP"),
    );
    let (est, est_synced) = (median("established flow"), median("established flow, VIP"));
    println!(
        "sync export on the new-flow path: the handshake's ACK {ack_synced} ns with it, \
         {ack} ns without ({:+} ns); established flow {est_synced} ns on the VIP that \
         syncs, {est} ns on the other ({:.2}x); {exported} events read from the ring \
         ({} runs of the exporting row), {lost} lost",
        i128::from(ack_synced) - i128::from(ack),
        est_synced as f64 / est as f64,
        (ROUNDS + 1) * ACK_PER_ROUND,
    );
}
