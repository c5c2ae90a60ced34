//! `cargo xtask bench failover`, "LB node dies": what clients see when the LB
//! node that owns the VIP dies, in the `tests::cluster` topology with two LB
//! nodes in front of three TLS stub apiservers, under 30 watch streams, 100 new
//! https connections a second and a kubectl loop (`tests::lbdeath`):
//!
//! - apilb with VRRP (100 ms adverts, preempt) and with etcd (3 s lease), flow
//!   sync on and off;
//! - keepalived + haproxy as kubeadm's HA guide sets them up, on both LB nodes:
//!   keepalived (`advert_int 1`, its check script) moves the VIP, and each node's
//!   haproxy, listening on `*:6443`, proxies to the masters.
//!
//! The owner, lb1, gets SIGKILL (for keepalived + haproxy: both daemons), SIGTERM,
//! has its cable cut for 5 s, or gets SIGKILL and comes back. One run each;
//! `bench-lbdeath FILTER` runs only the setups whose name contains FILTER.

use tests::lbdeath::{self, Election, Fate, Stack, TABLE_HEAD};

const STACKS: [Stack; 5] = [
    Stack::Apilb {
        election: Election::Vrrp,
        sync: true,
    },
    Stack::Apilb {
        election: Election::Vrrp,
        sync: false,
    },
    Stack::Apilb {
        election: Election::Etcd,
        sync: true,
    },
    Stack::Apilb {
        election: Election::Etcd,
        sync: false,
    },
    Stack::KeepalivedHaproxy,
];

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    let mut rows = Vec::new();
    for (i, stack) in STACKS.into_iter().enumerate() {
        if !stack.name().contains(&filter) {
            continue;
        }
        for (j, fate) in Fate::ALL.into_iter().enumerate() {
            let out = lbdeath::run(&format!("apilb-bld{i}{j}"), stack, fate);
            eprintln!("  {}, {}: {}", stack.name(), fate.name(), out.summary());
            rows.push(out.row(&stack.name(), fate));
        }
    }
    println!(
        "\nAn LB node dies under 30 watch streams, 100 new https connections/s and a \
         kubectl loop (one run each; the VIP's move is timed to the router's ARP entry)\n"
    );
    println!("{TABLE_HEAD}");
    for row in rows {
        println!("{row}");
    }
}
