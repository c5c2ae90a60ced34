//! Node-local mode in the [`crate::cluster`] topology: the VIP on no interface,
//! echo masters, and `apilb run` with its socket programs on the LB node, so that
//! only the node's own connects reach the VIP. Shared by `tests/local.rs`,
//! `tests/least_privilege.rs` and `tests/node_state.rs`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use crate::{
    cluster::{MASTERS, Shape, Topology, VIP, apilb_config},
    fixture::sa,
    live::{Apilb, EchoServer, PinDir, TempDir},
};

const LIFETIME: Duration = Duration::from_mins(2);

/// A topology whose VIP is on no interface, echo masters, and `apilb run` in
/// node-local mode on the LB node. Field order is drop order.
pub struct Local {
    pub apilb: Apilb,
    pub masters: Vec<Option<EchoServer>>,
    pub pins: PinDir,
    pub dir: TempDir,
    pub t: Topology,
}

impl Local {
    #[must_use]
    pub fn start(prefix: &str) -> Self {
        Self::start_after(prefix, |_| {})
    }

    /// [`Local::start`], running `prepare` on the topology before apilb starts.
    #[must_use]
    pub fn start_after(prefix: &str, prepare: impl FnOnce(&Topology)) -> Self {
        Self::start_custom(prefix, prepare, "", "")
    }

    /// [`Local::start_after`] with `datapath` lines added to `[datapath]` and
    /// `local` lines to `[local]`.
    #[must_use]
    pub fn start_custom(
        prefix: &str,
        prepare: impl FnOnce(&Topology),
        datapath: &str,
        local: &str,
    ) -> Self {
        let t = Topology::with_shape(
            prefix,
            Shape {
                vip_on_first_lb: false,
                ..Shape::default()
            },
        );
        prepare(&t);
        let masters = MASTERS
            .iter()
            .enumerate()
            .map(|(i, m)| Some(EchoServer::start(&t.masters[i], m, LIFETIME)))
            .collect();
        let pins = PinDir::new(prefix);
        let dir = TempDir::new(prefix);
        let config = dir.0.join("apilb.toml");
        let mut text = apilb_config(
            &pins.instance(),
            &format!("maglev_size = 1009\n{datapath}"),
            "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\njitter = 0.0",
        );
        text.push_str("[local]\nenabled = true\naddresses = [\"127.0.0.1:6443\"]\n");
        text.push_str(local);
        std::fs::write(&config, text).expect("config");
        let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
        assert!(
            apilb.wait_log("datapath updated", Duration::from_secs(15)),
            "apilb did not start:\n{}",
            apilb.log_text()
        );
        let local = Self {
            apilb,
            masters,
            pins,
            dir,
            t,
        };
        local.wait_spread(Duration::from_secs(10), |m| m.len() == 3);
        local
    }

    /// `n` new connections from the LB node to `to`.
    #[must_use]
    pub fn spread(&self, to: SocketAddr, n: usize) -> (HashMap<String, usize>, usize) {
        crate::live::spread(self.t.lb(), to, n)
    }

    /// Wait (bounded) until 30 connections to the VIP all succeed and spread as
    /// `pred` wants.
    pub fn wait_spread(&self, limit: Duration, pred: impl Fn(&HashMap<String, usize>) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let (by, failed) = self.spread(sa(VIP), 30);
            if failed == 0 && pred(&by) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "spread {by:?}; apilb's log:\n{}",
                self.apilb.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `n` new connections from the LB node to the VIP: all succeed and land on
    /// the three masters within 10 % of equal. Prints the spread, tagged `what`.
    pub fn assert_even_spread(&self, what: &str, n: usize) {
        let started = Instant::now();
        let (by, failed) = self.spread(sa(VIP), n);
        eprintln!(
            "{what}: {n} connects in {:.2} s: {by:?}, {failed} failed",
            started.elapsed().as_secs_f64()
        );
        assert_eq!((by.len(), failed), (3, 0), "{by:?}");
        for (m, got) in &by {
            assert!(
                got * 3 * 10 >= n * 9 && got * 3 * 10 <= n * 11,
                "{m} got {got} of {n}: not within 10 % of equal"
            );
        }
    }

    /// Wait (5 s at most) until the node's connects to the VIP, on no interface,
    /// fail: the socket programs are gone. Unpinning drops a link's last
    /// reference, and the kernel frees the link (so detaches its program) from a
    /// workqueue just after.
    pub fn wait_unbalanced(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::live::Client::connect_to(self.t.lb(), sa(VIP)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "5 s after apilb detach, connects are still balanced"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}
