//! NAT capacity: how many flows a master can hold open through this node, and how
//! many new connections a second it can take, given the SNAT pool, the NAT port
//! range and the TCP timeouts; `apilb check` prints it, and warns when the node
//! falls short of `datapath.expected_connection_rate`.
//!
//! Every flow to a master takes one (SNAT address, port) pair, its NAT port, from
//! the SYN until its state's timeout has passed after its last packet
//! (`lb_common::ct::reusable`), so a master has P = ports in this node's slice of
//! `nat_ports` x SNAT addresses of its family: at most P flows open at once, and,
//! held up, P / hold new connections a second, where hold is how long a closed
//! flow keeps its port (README "NAT flow lifecycle"). Pure arithmetic on the config, so that it can
//! be tested and printed anywhere.

use std::time::Duration;

use crate::config::{Config, TcpTimeouts, VipSnat, range_len};

/// One master's NAT capacity through one family's SNAT pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NatCapacity {
    /// NAT ports per master (P): the range's ports at each SNAT address. Also the
    /// most flows a master can have open at once.
    pub ports: u64,
    /// New connections a second a master takes, held up, when each port comes back
    /// `tcp_timeouts.close` after its flow ends: client-first closes, RSTs, and
    /// master-first closes by clients that use TCP timestamps (the datapath keeps
    /// each port's timestamps monotonic, so the master's `TIME_WAIT` accepts the
    /// reuse, RFC 6191).
    pub rate_after_close: f64,
    /// The same when each port comes back `tcp_timeouts.time_wait` after its flow
    /// ends: master-first closes by clients without timestamps. The worst case.
    pub rate_after_time_wait: f64,
    /// The most NAT ports of a master a SYN flood can hold, each for
    /// `tcp_timeouts.syn_sent`: a half-open flow's lease lives in the half-open
    /// table, so no more than it holds, and no more than the master has.
    pub syn_flood_ports: u64,
}

/// A master's NAT capacity: `range_ports` NAT ports at each of `addresses` SNAT
/// addresses, with `half_open_table_size` half-open flows and the timeouts `t`.
#[must_use]
pub fn nat_capacity(
    range_ports: u32,
    addresses: u32,
    half_open_table_size: u32,
    t: &TcpTimeouts,
) -> NatCapacity {
    let ports = u64::from(range_ports) * u64::from(addresses);
    NatCapacity {
        ports,
        rate_after_close: per_second(ports, t.close),
        rate_after_time_wait: per_second(ports, t.time_wait),
        syn_flood_ports: ports.min(u64::from(half_open_table_size)),
    }
}

/// `ports` ports each held `hold`: how many a second come free, held up.
fn per_second(ports: u64, hold: Duration) -> f64 {
    ports as f64 / hold.as_secs_f64()
}

/// What `apilb check` prints about NAT capacity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The figures, one line each.
    pub lines: Vec<String>,
    /// What falls short, with the knob that raises it.
    pub warnings: Vec<String>,
}

/// The SNAT addresses a family's flows to one master spread over, its worst
/// VIP's (one for a VIP that is its flows' source, else the node's `node`), and
/// whether more node addresses would raise that.
fn sources(config: &Config, v4: bool, node: usize) -> (usize, bool) {
    let family = || config.vips.iter().filter(move |v| v.addr.is_ipv4() == v4);
    let worst = family()
        .map(|v| match v.snat {
            VipSnat::Vip => 1,
            VipSnat::Node => node,
        })
        .min()
        .unwrap_or(node);
    let more = node < crate::config::NODE_SNAT_MAX && family().all(|v| v.snat == VipSnat::Node);
    (worst, more)
}

/// The NAT capacity of `config`, per family that a VIP uses, and for the node.
#[must_use]
pub fn report(config: &Config) -> Report {
    let d = &config.datapath;
    let t = &d.tcp_timeouts;
    let range_ports = range_len(&d.nat_slice.of(&d.nat_ports));
    let mut out = Report::default();
    // The whole node, held up: without timestamps (the worst case), and with.
    let (mut node_worst, mut node_ts) = (0.0, 0.0);
    let mut knobs = Vec::new();
    for (family, v4, addresses, key) in [
        ("IPv4", true, d.snat_v4.len(), "datapath.snat_ipv4"),
        ("IPv6", false, d.snat_v6.len(), "datapath.snat_ipv6"),
    ] {
        if !config.vips.iter().any(|v| v.addr.is_ipv4() == v4) {
            continue;
        }
        // Masters that take new flows: configured, of the family, not drained.
        let masters = config
            .backends
            .iter()
            .filter(|b| b.addr.is_ipv4() == v4 && b.weight > 0)
            .count();
        let (addresses, more_node_addresses) = sources(config, v4, addresses);
        let addresses = u32::try_from(addresses).unwrap_or(u32::MAX);
        let c = nat_capacity(range_ports, addresses, d.half_open_table_size, t);
        let n = masters as f64;
        node_worst += n * c.rate_after_time_wait;
        node_ts += n * c.rate_after_close;
        if more_node_addresses {
            knobs.push(key);
        }
        out.lines.extend([
            format!(
                "NAT capacity, {family}: {addresses} SNAT address(es) x {range_ports} ports \
                 ({}-{}) = {} NAT ports per master, {masters} master(s) taking new flows",
                d.nat_slice.of(&d.nat_ports).start(),
                d.nat_slice.of(&d.nat_ports).end(),
                c.ports,
            ),
            format!("  per master: at most {} flows open at once", c.ports),
            format!(
                "  per master, held up: {:.0} new connections/s when ports come back after \
                 tcp_timeouts.close ({:?}): closed by the client, by a RST, or by the master \
                 with TCP timestamps",
                c.rate_after_close.floor(),
                t.close,
            ),
            format!(
                "  per master, held up: {:.0} new connections/s when ports come back after \
                 tcp_timeouts.time_wait ({:?}): closed by the master, without TCP timestamps",
                c.rate_after_time_wait.floor(),
                t.time_wait,
            ),
            format!(
                "  SYN flood: holds at most {} NAT ports of a master (half_open_table_size \
                 {}), each for tcp_timeouts.syn_sent ({:?})",
                c.syn_flood_ports, d.half_open_table_size, t.syn_sent,
            ),
        ]);
    }
    let expected = f64::from(d.expected_connection_rate);
    out.lines.push(format!(
        "node, held up: {:.0} new connections/s with TCP timestamps, {:.0} without \
         (datapath.expected_connection_rate {})",
        node_ts.floor(),
        node_worst.floor(),
        d.expected_connection_rate,
    ));
    if node_worst < expected {
        let more_addresses = if knobs.is_empty() {
            String::new()
        } else {
            format!(
                "more SNAT addresses ({}, up to {}), ",
                knobs.join(", "),
                crate::config::NODE_SNAT_MAX
            )
        };
        out.warnings.push(format!(
            "datapath.expected_connection_rate = {}: the node takes {:.0} new connections/s \
             held up when masters close first for clients without TCP timestamps (their NAT \
             ports held for tcp_timeouts.time_wait, {:?}); past that, new flows' SYNs are \
             dropped (drop_no_nat_port) until a port comes back. {more_addresses}a wider \
             datapath.nat_ports, or more masters raise it; a shorter tcp_timeouts.time_wait \
             does only if the masters' own TIME_WAIT is shorter (Linux: 60 s)",
            d.expected_connection_rate,
            node_worst.floor(),
            t.time_wait,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, path::Path};

    use super::*;

    const DEFAULT_PORTS: u32 = 32_768 - 1024;

    #[test]
    fn defaults_give_a_master_31744_flows_and_488_to_15872_new_connections_a_second() {
        let c = nat_capacity(DEFAULT_PORTS, 1, 32_768, &TcpTimeouts::default());
        assert_eq!(c.ports, 31_744);
        // Client-first, RST, or master-first with timestamps: 31744 / 2 s.
        assert!((c.rate_after_close - 15_872.0).abs() < 1e-9);
        // Master-first without timestamps: 31744 / 65 s.
        assert!((c.rate_after_time_wait - 31_744.0 / 65.0).abs() < 1e-9);
        // The half-open table (32768) is larger than a master's ports.
        assert_eq!(c.syn_flood_ports, 31_744);
    }

    #[test]
    fn every_snat_address_multiplies_the_ports_and_the_rates() {
        let t = TcpTimeouts::default();
        let one = nat_capacity(10_000, 1, 32_768, &t);
        let four = nat_capacity(10_000, 4, 32_768, &t);
        assert_eq!((one.ports, four.ports), (10_000, 40_000));
        assert!((four.rate_after_time_wait - 4.0 * one.rate_after_time_wait).abs() < 1e-9);
        assert!((four.rate_after_close - 20_000.0).abs() < 1e-9);
        // A flood now meets the half-open table's limit first.
        assert_eq!(
            (one.syn_flood_ports, four.syn_flood_ports),
            (10_000, 32_768)
        );
    }

    #[test]
    fn the_hold_is_whichever_timeout_a_close_ends_in() {
        let t = TcpTimeouts {
            close: Duration::from_millis(500),
            time_wait: Duration::from_mins(2),
            ..TcpTimeouts::default()
        };
        let c = nat_capacity(6_000, 1, 1_024, &t);
        assert!((c.rate_after_close - 12_000.0).abs() < 1e-9);
        assert!((c.rate_after_time_wait - 50.0).abs() < 1e-9);
        assert_eq!(c.syn_flood_ports, 1_024);
        assert_eq!(
            nat_capacity(6_000, 0, 1_024, &t).ports,
            0,
            "no address, no port"
        );
    }

    /// A config over `backends` masters, with `datapath` in its `[datapath]`, and
    /// a SNAT address unless that sets one.
    fn config(datapath: &str, backends: usize) -> Config {
        let snat = if datapath.contains("snat_ipv4") {
            ""
        } else {
            "snat_ipv4 = \"10.0.0.1\""
        };
        let mut text = format!(
            "[datapath]\ninterfaces = [\"lo\"]\nmaglev_size = 1009\nnat_ports = [1024, 32767]\n\
             {snat}\n{datapath}\n[[vip]]\naddress = \"10.0.0.100\"\n[health]\nkind = \"tcp\"\n"
        );
        for i in 0..backends {
            let _ = write!(text, "[[backend]]\naddress = \"10.0.0.{}:6443\"\n", 11 + i);
        }
        Config::parse(&text, Path::new("test.toml")).expect("valid test config")
    }

    #[test]
    fn three_masters_at_the_defaults_meet_1000_new_connections_a_second() {
        let r = report(&config("", 3));
        assert!(r.warnings.is_empty(), "{r:#?}");
        assert!(
            r.lines[0].contains("1 SNAT address(es) x 31744 ports (1024-32767) = 31744 NAT ports per master, 3 master(s)"),
            "{r:#?}"
        );
        assert_eq!(
            r.lines.last().unwrap(),
            "node, held up: 47616 new connections/s with TCP timestamps, 1465 without \
             (datapath.expected_connection_rate 1000)"
        );
    }

    #[test]
    fn two_masters_fall_short_and_the_warning_names_the_knobs() {
        let r = report(&config("", 2));
        assert_eq!(r.warnings.len(), 1, "{r:#?}");
        let w = &r.warnings[0];
        for part in [
            "datapath.expected_connection_rate = 1000",
            "takes 976 new connections/s",
            "tcp_timeouts.time_wait, 65s",
            "more SNAT addresses (datapath.snat_ipv4, up to 4)",
            "a wider datapath.nat_ports",
            "only if the masters' own TIME_WAIT is shorter",
        ] {
            assert!(w.contains(part), "{w:?} lacks {part:?}");
        }
        // A second address doubles it past the expectation.
        let r = report(&config("snat_ipv4 = [\"10.0.0.1\", \"10.0.0.2\"]", 2));
        assert!(r.warnings.is_empty(), "{r:#?}");
    }

    #[test]
    fn the_expected_rate_is_the_configured_one() {
        let r = report(&config("expected_connection_rate = 2000", 3));
        assert_eq!(r.warnings.len(), 1, "1465 < 2000: {r:#?}");
        let r = report(&config("expected_connection_rate = 100", 1));
        assert!(r.warnings.is_empty(), "488 >= 100: {r:#?}");
    }
}
