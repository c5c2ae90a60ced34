//! Every duration key's rules in one place: its floor (or cap), and how it must
//! stand to the keys it works with. A timeout is sane or not only next to the
//! others (an idle established flow must not lose its NAT port before a closing
//! one; a probe must end before the next one starts), so the rules are read, and
//! tested, together rather than spread over each section's validation, which
//! calls in here.
//!
//! Values that are legal but cost something are not refused: `apilb check` prints
//! them from [`Config::timeout_warnings`].

use std::{fmt, time::Duration};

use serde::{Deserializer, de};

use super::{Config, ConfigError, TcpTimeouts, invalid};
use crate::election::etcd::MIN_LEASE_TTL;

/// A duration as a config file may write it: `1m 5s`, `100ms`, `50days`. Days are
/// the largest unit, so that a long `established` does not read as months.
fn shown(d: Duration) -> String {
    const DAY: u64 = 86_400;
    let format = humantime_serde::re::humantime::format_duration;
    let days = d.as_secs() / DAY;
    let rest = Duration::new(d.as_secs() % DAY, d.subsec_nanos());
    match (days, rest.is_zero()) {
        (0, _) => format(d).to_string(),
        (_, true) => format!("{days}days"),
        (_, false) => format!("{days}days {}", format(rest)),
    }
}

/// Every duration key's parser (`#[serde(deserialize_with)]`): humantime text
/// such as `"1s"`, `"500ms"` or `"1m 30s"`. A bare number, keepalived's habit
/// (`advert_int 1`), is refused with the quoted text to write instead; the
/// caller's error adds the key (`Config::parse`).
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl DurationVisitor {
    /// The error for a bare number, as written, with the text to write for it.
    fn bare<E: de::Error>(written: impl fmt::Display, example: &str) -> E {
        E::custom(format!(
            "{written} is a bare number, but this key is a duration: write it quoted, \
             with its unit, e.g. {example}"
        ))
    }

    fn integer<E: de::Error>(n: impl fmt::Display) -> E {
        Self::bare(
            &n,
            &format!("\"{n}s\" if seconds, \"{n}ms\" if milliseconds"),
        )
    }
}

impl de::Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration, quoted, with its unit: \"1s\", \"500ms\", \"1m 30s\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        humantime_serde::re::humantime::parse_duration(v).map_err(|e| {
            E::custom(format!(
                "{v:?} is not a duration ({e}): write e.g. \"1s\", \"500ms\" or \"1m 30s\""
            ))
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(Self::integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(Self::integer(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(Self::bare(
            v,
            "\"1s 500ms\" for 1.5 seconds (units, no decimal point)",
        ))
    }
}

/// `key = value` is at least `floor`, else refused saying `why` nothing shorter is
/// sane.
fn at_least(key: &str, value: Duration, floor: Duration, why: &str) -> Result<(), ConfigError> {
    if value < floor {
        return Err(invalid(
            key,
            shown(value),
            format!("must be at least {}: {why}", shown(floor)),
        ));
    }
    Ok(())
}

/// `key = value` is less than `other_key`'s `other`, else refused saying `why`.
fn less_than(
    key: &str,
    value: Duration,
    other_key: &str,
    other: Duration,
    why: &str,
) -> Result<(), ConfigError> {
    if value >= other {
        return Err(invalid(
            key,
            shown(value),
            format!("must be less than {other_key} ({}): {why}", shown(other)),
        ));
    }
    Ok(())
}

/// The longest `datapath.nexthop_ttl`.
const NEXTHOP_TTL_MAX: Duration = Duration::from_mins(1);

/// `datapath.nexthop_ttl`: 0 (ask the FIB for every packet) up to
/// [`NEXTHOP_TTL_MAX`].
pub(super) fn nexthop_ttl(ttl: Duration) -> Result<Duration, ConfigError> {
    if ttl > NEXTHOP_TTL_MAX {
        return Err(invalid(
            "datapath.nexthop_ttl",
            shown(ttl),
            format!(
                "must be at most {}: a flow keeps its cached next hop this long, so a \
                 longer one keeps sending to a neighbour that is gone or has moved \
                 (0 asks the FIB for every packet)",
                shown(NEXTHOP_TTL_MAX)
            ),
        ));
    }
    Ok(ttl)
}

/// Each `[datapath.tcp_timeouts]` key's floor, and why nothing shorter is sane, in
/// the order of [`TcpTimeouts::by_key`]. The tests' shortest values (100 ms
/// `close`, 300 ms `syn_sent`) stay within them.
const TCP_FLOORS: [(Duration, &str); 7] = [
    (
        Duration::from_millis(100),
        "the master's SYN-ACK may still be on its way when a shorter one gives the NAT \
         port to another flow",
    ),
    (
        Duration::from_millis(100),
        "the client's ACK may still be on its way when a shorter one gives the NAT port \
         to another flow",
    ),
    (
        Duration::from_mins(1),
        "a live connection may idle longer between keepalives (Go clients send one every \
         15 s, others far less often) and would lose its NAT port",
    ),
    (
        Duration::from_secs(1),
        "the side that has not sent its FIN may still be sending (an answer after the \
         client's FIN)",
    ),
    (
        Duration::from_millis(100),
        "the last ACK may still be on its way",
    ),
    (
        Duration::from_secs(1),
        "it stands for the master's TIME_WAIT, which no TCP keeps this short (Linux: 60 s)",
    ),
    (
        Duration::from_millis(100),
        "segments still in flight would reach the NAT port's next flow",
    ),
];

/// `[datapath.tcp_timeouts]`: each at least its floor ([`TCP_FLOORS`]), at most
/// `u32::MAX` ms in whole milliseconds (the datapath keeps milliseconds in 32
/// bits); `established` at least every other state's timeout, so that an idle
/// established flow never loses its NAT port before a closing one; and `close` at
/// most `time_wait`, both being holds after a connection is over, `close` the one
/// no `TIME_WAIT` stands behind.
pub(super) fn tcp_timeouts(t: TcpTimeouts) -> Result<TcpTimeouts, ConfigError> {
    let key = |name: &str| format!("datapath.tcp_timeouts.{name}");
    let max = Duration::from_millis(u64::from(u32::MAX));
    for ((name, _, d), (floor, why)) in t.by_key().into_iter().zip(TCP_FLOORS) {
        at_least(&key(name), d, floor, why)?;
        if d > max {
            return Err(invalid(
                key(name),
                shown(d),
                format!(
                    "must be at most {}ms ({}): the datapath keeps milliseconds in 32 bits",
                    u32::MAX,
                    shown(max)
                ),
            ));
        }
        if d.subsec_nanos() % 1_000_000 != 0 {
            return Err(invalid(key(name), shown(d), "must be whole milliseconds"));
        }
    }
    for (name, _, d) in t.by_key() {
        if d > t.established {
            return Err(invalid(
                key("established"),
                shown(t.established),
                format!(
                    "must be at least {} ({}): an idle established flow must not lose its \
                     NAT port before a closing one",
                    key(name),
                    shown(d)
                ),
            ));
        }
    }
    if t.close > t.time_wait {
        return Err(invalid(
            key("close"),
            shown(t.close),
            format!(
                "must not exceed {} ({}): both hold a NAT port after its connection is \
                 over, time_wait while the master's TIME_WAIT may meet the next flow",
                key("time_wait"),
                shown(t.time_wait)
            ),
        ));
    }
    Ok(t)
}

/// `health.interval` and `health.timeout`: floors, and each probe ends before the
/// next begins.
pub(super) fn probe(interval: Duration, timeout: Duration) -> Result<(), ConfigError> {
    at_least(
        "health.interval",
        interval,
        Duration::from_millis(100),
        "each node probes every master this often; more often loads the apiservers and \
         finds a dead one no sooner than passive detection does",
    )?;
    at_least(
        "health.timeout",
        timeout,
        Duration::from_millis(10),
        "a connect to a master, let alone a TLS handshake and a GET, can take longer on a \
         loaded node, and a healthy master would fail its probes",
    )?;
    less_than(
        "health.timeout",
        timeout,
        "health.interval",
        interval,
        "a probe ends before the next one starts",
    )
}

/// `election.announce_interval`: at most 10 s. No floor: 0 sends the
/// announcements back to back, as keepalived does by default
/// (`vrrp_garp_interval`), and any gap between that and 100 ms is as sane.
pub(super) fn announce_interval(interval: Duration) -> Result<Duration, ConfigError> {
    let max = Duration::from_secs(10);
    if interval > max {
        return Err(invalid(
            "election.announce_interval",
            shown(interval),
            format!(
                "must be at most {}: the last announcement would come long after the \
                 VIP moved",
                shown(max)
            ),
        ));
    }
    Ok(interval)
}

/// `election.vrrp.advert_interval` as VRRP `version` carries it: VRRPv2 in whole
/// seconds in 8 bits, VRRPv3 in centiseconds in 12 bits (RFC 5798 5.2.7). No
/// floor of apilb's own: a VRRPv3 backup follows the master's interval, whatever
/// its own (RFC 5798 6.4.2). `preempt_delay` takes any value: 0 preempts at once.
pub(super) fn advert_interval(version: u8, interval: Duration) -> Result<Duration, ConfigError> {
    let key = "election.vrrp.advert_interval";
    if version == 2 {
        if interval.subsec_nanos() != 0 || !(1..=255).contains(&interval.as_secs()) {
            return Err(invalid(
                key,
                shown(interval),
                "VRRPv2 adverts are 1-255 whole seconds",
            ));
        }
    } else if !interval.as_nanos().is_multiple_of(10_000_000)
        || !(Duration::from_millis(10)..=Duration::from_millis(40_950)).contains(&interval)
    {
        return Err(invalid(
            key,
            shown(interval),
            "VRRPv3 adverts are 10ms-40.95s in whole centiseconds",
        ));
    }
    Ok(interval)
}

/// `election.etcd.lease_ttl` and `dial_timeout`: floors, and a connection attempt
/// shorter than the lease.
pub(super) fn etcd(lease_ttl: Duration, dial_timeout: Duration) -> Result<(), ConfigError> {
    at_least(
        "election.etcd.lease_ttl",
        lease_ttl,
        MIN_LEASE_TTL,
        "etcd rounds shorter leases up",
    )?;
    at_least(
        "election.etcd.dial_timeout",
        dial_timeout,
        Duration::from_millis(100),
        "a connection to etcd takes round trips (and a TLS handshake), and a loaded etcd \
         would never be reached",
    )?;
    less_than(
        "election.etcd.dial_timeout",
        dial_timeout,
        "election.etcd.lease_ttl",
        lease_ttl,
        "an owner that reconnects must learn whether it still holds its lease before \
         the lease runs out",
    )
}

/// The shortest `sync.resync_interval`.
const RESYNC_INTERVAL_MIN: Duration = Duration::from_secs(10);
/// The shortest `sync.flush_timeout`: a peer ACKs up to 50 ms after a message
/// (`sync::links`), and the ACK has a round trip to make.
const FLUSH_TIMEOUT_MIN: Duration = Duration::from_millis(100);
/// The longest `sync.flush_timeout`.
const FLUSH_TIMEOUT_MAX: Duration = Duration::from_secs(5);

/// `sync.resync_interval`: a floor, and less than half of `established`, which is
/// the one that matters. An established flow exports nothing while it carries
/// data (only its establishment and end do), so the peers' copy of its last packet
/// ages until a resync refreshes it; it must be refreshed before it looks idle for
/// `established`, with one resync to spare. `sync.flush_timeout`: long enough for
/// an ACK, short enough not to hold a SIGTERM or a handover up.
pub(super) fn sync(
    resync_interval: Duration,
    flush_timeout: Duration,
    established: Duration,
) -> Result<(), ConfigError> {
    at_least(
        "sync.resync_interval",
        resync_interval,
        RESYNC_INTERVAL_MIN,
        "each resync sends every flow this node owns to every peer; more often spends \
         the links and the CPU on flows the peers already hold",
    )?;
    less_than(
        "sync.resync_interval",
        resync_interval,
        "half of datapath.tcp_timeouts.established",
        established / 2,
        "an established flow exports nothing while it carries data, so only a resync \
         tells the peers it is alive, and their copy must be refreshed, with a resync to \
         spare, before it looks idle for that long",
    )?;
    at_least(
        "sync.flush_timeout",
        flush_timeout,
        FLUSH_TIMEOUT_MIN,
        "a peer acknowledges up to 50ms after a message, and the ACK takes a round trip",
    )?;
    if flush_timeout > FLUSH_TIMEOUT_MAX {
        return Err(invalid(
            "sync.flush_timeout",
            shown(flush_timeout),
            format!(
                "must be at most {}: a SIGTERM waits up to twice this for a peer that is \
                 gone before the VIP moves, and a handover as long",
                shown(FLUSH_TIMEOUT_MAX)
            ),
        ));
    }
    Ok(())
}

/// Linux's `TIME_WAIT` (`TCP_TIMEWAIT_LEN`), fixed: what `time_wait` stands for.
const LINUX_TIME_WAIT: Duration = Duration::from_mins(1);
/// Linux's initial RTO: a client sends its SYN again this long after the first.
const SYN_RETRANSMIT: Duration = Duration::from_secs(1);

impl Config {
    /// What `apilb check` warns of in the timeouts of a valid config: values that
    /// may be right for some masters and clients but cost something with Linux's.
    #[must_use]
    pub fn timeout_warnings(&self) -> Vec<String> {
        let t = &self.datapath.tcp_timeouts;
        let mut out = Vec::new();
        if t.time_wait < LINUX_TIME_WAIT {
            out.push(format!(
                "datapath.tcp_timeouts.time_wait = {}: shorter than a Linux master's \
                 TIME_WAIT ({}, fixed): after the master closes first, the NAT port's next \
                 flow can meet it, and a client without TCP timestamps has its SYN answered \
                 with the old connection's ACK and waits for a retransmit (README \"NAT flow \
                 lifecycle\")",
                shown(t.time_wait),
                shown(LINUX_TIME_WAIT),
            ));
        }
        if self.passive.enabled && t.syn_sent <= SYN_RETRANSMIT {
            out.push(format!(
                "datapath.tcp_timeouts.syn_sent = {} with health.passive = true: a client \
                 sends its SYN again {} after the first (Linux's initial RTO), when the \
                 flow's NAT port may have gone to another flow and its entry with it; the \
                 retransmit then opens a new flow, possibly to the same master, and a \
                 silent master goes unnoticed. Above {} the retransmit finds its flow",
                shown(t.syn_sent),
                shown(SYN_RETRANSMIT),
                shown(SYN_RETRANSMIT),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{GOOD, check, refused, with_etcd, with_timeouts};

    /// The last line of `GOOD`: what `refused` replaces to add keys to `[health]`,
    /// or sections after it.
    const KIND: &str = "kind = \"tcp\"";

    /// `GOOD` with `[datapath.tcp_timeouts]` holding `body` is refused, its message
    /// holding `want`.
    fn timeouts_refused(body: &str, want: &str) {
        refused(
            KIND,
            &format!("{KIND}\n[datapath.tcp_timeouts]\n{body}"),
            &[want],
        );
    }

    /// `text` is refused, its message starting with `want`.
    fn refused_as(text: &str, want: &str) {
        let msg = check(text).expect_err(want).to_string();
        assert!(
            msg.starts_with(want),
            "{msg:?} does not start with {want:?}"
        );
    }

    #[test]
    fn each_tcp_timeout_below_its_floor_is_refused_naming_key_value_and_floor() {
        for (key, floor, below) in [
            ("syn_sent", "100ms", "99ms"),
            ("syn_recv", "100ms", "99ms"),
            ("established", "1m", "59s"),
            ("fin_wait", "1s", "999ms"),
            ("last_ack", "100ms", "99ms"),
            ("time_wait", "1s", "999ms"),
            ("close", "100ms", "99ms"),
        ] {
            for value in ["0s", below] {
                timeouts_refused(
                    &format!("{key} = \"{value}\""),
                    &format!("datapath.tcp_timeouts.{key} = {value}: must be at least {floor}: "),
                );
            }
        }
    }

    #[test]
    fn every_tcp_timeout_at_its_floor_and_the_test_suites_values_are_accepted() {
        let c = check(&with_timeouts(
            "syn_sent = \"100ms\"\nsyn_recv = \"100ms\"\nestablished = \"1m\"\n\
             fin_wait = \"1s\"\nlast_ack = \"100ms\"\ntime_wait = \"1s\"\nclose = \"100ms\"",
        ))
        .expect("every floor");
        assert_eq!(
            c.datapath.tcp_timeouts.by_state_ms(),
            [0, 100, 100, 60_000, 1_000, 100, 1_000, 100]
        );
        // tests/tests/port_reuse.rs, and the fixtures' handshake timeouts.
        check(&with_timeouts("close = \"100ms\"")).expect("port_reuse");
        check(&with_timeouts("syn_sent = \"300ms\"\nsyn_recv = \"300ms\"")).expect("fixtures");
    }

    #[test]
    fn tcp_timeouts_past_32_bit_milliseconds_or_in_fractions_of_one_are_refused() {
        timeouts_refused(
            "established = \"50days\"",
            "datapath.tcp_timeouts.established = 50days: must be at most 4294967295ms \
             (49days 17h 2m 47s 295ms): the datapath keeps milliseconds in 32 bits",
        );
        timeouts_refused(
            "fin_wait = \"1s 500us\"",
            "datapath.tcp_timeouts.fin_wait = 1s 500us: must be whole milliseconds",
        );
    }

    #[test]
    fn established_must_be_at_least_every_other_states_timeout() {
        for key in [
            "syn_sent",
            "syn_recv",
            "fin_wait",
            "last_ack",
            "time_wait",
            "close",
        ] {
            timeouts_refused(
                &format!("{key} = \"2h\""),
                &format!(
                    "datapath.tcp_timeouts.established = 1h: must be at least \
                     datapath.tcp_timeouts.{key} (2h): "
                ),
            );
        }
        // The default time_wait (65s) is longer than the floor of established.
        timeouts_refused(
            "established = \"1m\"",
            "datapath.tcp_timeouts.established = 1m: must be at least \
             datapath.tcp_timeouts.time_wait (1m 5s)",
        );
        let c = check(&with_timeouts("established = \"2h\"\nfin_wait = \"2h\""))
            .expect("as long is enough");
        assert_eq!(c.datapath.tcp_timeouts.established, Duration::from_hours(2));
    }

    #[test]
    fn close_must_not_exceed_time_wait() {
        timeouts_refused(
            "close = \"70s\"",
            "datapath.tcp_timeouts.close = 1m 10s: must not exceed \
             datapath.tcp_timeouts.time_wait (1m 5s): ",
        );
        timeouts_refused(
            "time_wait = \"1s\"",
            "datapath.tcp_timeouts.close = 2s: must not exceed \
             datapath.tcp_timeouts.time_wait (1s): ",
        );
        check(&with_timeouts("close = \"65s\"")).expect("as long as time_wait");
    }

    #[test]
    fn tcp_timeouts_that_are_unknown_or_no_duration_are_refused_by_name() {
        refused(
            KIND,
            &format!("{KIND}\n[datapath.tcp_timeouts]\ntimewait = \"60s\""),
            &["unknown field", "timewait"],
        );
        refused(
            KIND,
            &format!("{KIND}\n[datapath.tcp_timeouts]\nclose = \"soon\""),
            &["close", "soon"],
        );
    }

    #[test]
    fn nexthop_ttl_is_0_for_every_packet_up_to_a_minute() {
        let ttl = |v: &str| {
            check(&GOOD.replacen(
                "[datapath]",
                &format!("[datapath]\nnexthop_ttl = \"{v}\""),
                1,
            ))
            .map(|c| c.datapath.nexthop_ttl)
        };
        assert_eq!(ttl("0s").expect("0: every packet"), Duration::ZERO);
        assert_eq!(ttl("60s").expect("the cap"), Duration::from_mins(1));
        assert_eq!(ttl("1s").expect("the default"), Duration::from_secs(1));
        for (value, shown) in [("61s", "1m 1s"), ("1h", "1h")] {
            refused(
                "[datapath]",
                &format!("[datapath]\nnexthop_ttl = \"{value}\""),
                &[&format!(
                    "datapath.nexthop_ttl = {shown}: must be at most 1m: a flow keeps its \
                     cached next hop this long"
                )],
            );
        }
    }

    #[test]
    fn health_interval_and_timeout_have_floors_and_a_probe_ends_before_the_next() {
        let health = |keys: &str| format!("{KIND}\n{keys}");
        for (keys, want) in [
            (
                "interval = \"0s\"\ntimeout = \"50ms\"",
                "health.interval = 0s: must be at least 100ms: ",
            ),
            (
                "interval = \"99ms\"\ntimeout = \"50ms\"",
                "health.interval = 99ms: must be at least 100ms: ",
            ),
            (
                "timeout = \"0s\"",
                "health.timeout = 0s: must be at least 10ms: ",
            ),
            (
                "timeout = \"9ms\"",
                "health.timeout = 9ms: must be at least 10ms: ",
            ),
            (
                "interval = \"500ms\"\ntimeout = \"500ms\"",
                "health.timeout = 500ms: must be less than health.interval (500ms): ",
            ),
            (
                "interval = \"100ms\"\ntimeout = \"1s\"",
                "health.timeout = 1s: must be less than health.interval (100ms): ",
            ),
        ] {
            refused(KIND, &health(keys), &[want]);
        }
        // The floors, and the integration tests' fast probes.
        for keys in [
            "interval = \"100ms\"\ntimeout = \"10ms\"",
            "interval = \"100ms\"\ntimeout = \"80ms\"",
        ] {
            let c = check(&GOOD.replacen(KIND, &health(keys), 1)).expect(keys);
            assert_eq!(c.health.interval, Duration::from_millis(100));
        }
    }

    #[test]
    fn announce_interval_is_0_for_back_to_back_up_to_10s() {
        let announce = |v: &str| format!("{KIND}\n[election]\nannounce_interval = \"{v}\"");
        for (value, want) in [("0s", Duration::ZERO), ("10s", Duration::from_secs(10))] {
            let c = check(&GOOD.replacen(KIND, &announce(value), 1)).expect(value);
            assert_eq!(c.election.announce_interval, want);
        }
        refused(
            KIND,
            &announce("11s"),
            &["election.announce_interval = 11s: must be at most 10s: "],
        );
    }

    #[test]
    fn a_vrrp_advert_interval_of_0_is_refused_and_a_preempt_delay_of_0_is_not() {
        let vrrp = |section: &str| {
            GOOD.replacen(
                "address = \"192.168.19.200\"",
                "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 1",
                1,
            ) + "[election.vrrp]\n"
                + section
        };
        for (section, want) in [
            (
                "advert_interval = \"0s\"",
                "election.vrrp.advert_interval = 0s: VRRPv3 adverts are 10ms-40.95s",
            ),
            (
                "version = 2\nadvert_interval = \"0s\"",
                "election.vrrp.advert_interval = 0s: VRRPv2 adverts are 1-255 whole seconds",
            ),
            (
                "advert_interval = \"41s\"",
                "election.vrrp.advert_interval = 41s: VRRPv3 adverts are 10ms-40.95s",
            ),
        ] {
            refused_as(&vrrp(section), want);
        }
        let c = check(&vrrp("preempt_delay = \"0s\"\nadvert_interval = \"10ms\""))
            .expect("preempt at once, the shortest v3 advert");
        assert_eq!(
            (
                c.election.vrrp.preempt_delay,
                c.election.vrrp.advert_interval
            ),
            (Duration::ZERO, Duration::from_millis(10))
        );
    }

    #[test]
    fn etcd_dial_timeout_has_a_floor_and_is_shorter_than_the_lease() {
        let etcd = |keys: &str| with_etcd(&format!("endpoints = [\"http://a:2379\"]\n{keys}\n"));
        for (keys, want) in [
            (
                "lease_ttl = \"0s\"",
                "election.etcd.lease_ttl = 0s: must be at least 2s: ",
            ),
            (
                "dial_timeout = \"0s\"",
                "election.etcd.dial_timeout = 0s: must be at least 100ms: ",
            ),
            (
                "dial_timeout = \"99ms\"",
                "election.etcd.dial_timeout = 99ms: must be at least 100ms: ",
            ),
            (
                "dial_timeout = \"3s\"",
                "election.etcd.dial_timeout = 3s: must be less than election.etcd.lease_ttl \
                 (3s): ",
            ),
            (
                "lease_ttl = \"2s\"\ndial_timeout = \"2500ms\"",
                "election.etcd.dial_timeout = 2s 500ms: must be less than \
                 election.etcd.lease_ttl (2s): ",
            ),
        ] {
            refused_as(&etcd(keys), want);
        }
        // tests/src/elect.rs: the shortest lease, and a second to dial.
        let c = check(&etcd("lease_ttl = \"2s\"\ndial_timeout = \"1s\""))
            .expect("the election tests' settings");
        let e = c.election.etcd.expect("etcd");
        assert_eq!(
            (e.lease_ttl, e.dial_timeout),
            (Duration::from_secs(2), Duration::from_secs(1))
        );
    }

    #[test]
    fn a_short_time_wait_and_a_short_syn_sent_are_warned_of_not_refused() {
        let warnings = |body: &str| {
            check(&with_timeouts(body))
                .expect("a warning is no refusal")
                .timeout_warnings()
        };
        assert!(warnings("").is_empty(), "{:?}", warnings(""));
        assert!(warnings("time_wait = \"60s\"\nsyn_sent = \"1001ms\"").is_empty());
        let w = warnings("time_wait = \"30s\"");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "datapath.tcp_timeouts.time_wait = 30s: shorter than a Linux master's \
                 TIME_WAIT (1m, fixed)"
            ),
            "{w:?}"
        );
        let w = warnings("syn_sent = \"1s\"");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "datapath.tcp_timeouts.syn_sent = 1s with health.passive = true: a client \
                 sends its SYN again 1s after the first"
            ),
            "{w:?}"
        );
        // Without passive detection nothing waits for the retransmit.
        let passive_off = GOOD.replacen(KIND, &format!("{KIND}\npassive = false"), 1);
        let c = check(&(passive_off + "[datapath.tcp_timeouts]\nsyn_sent = \"300ms\"\n"))
            .expect("valid");
        assert!(
            c.timeout_warnings().is_empty(),
            "{:?}",
            c.timeout_warnings()
        );
    }

    #[test]
    fn sync_resyncs_within_half_of_established_and_flushes_within_bounds() {
        use super::super::sync::tests::{sync_check, sync_refused, sync_with};
        let node = "node = \"lb1\"";
        let with = |keys: &str| sync_with(node, &format!("{node}\n{keys}"));
        for (keys, want) in [
            (
                "resync_interval = \"9s\"",
                "sync.resync_interval = 9s: must be at least 10s: ",
            ),
            (
                "resync_interval = \"30m\"",
                "sync.resync_interval = 30m: must be less than half of \
                 datapath.tcp_timeouts.established (30m): an established flow exports nothing",
            ),
            (
                "flush_timeout = \"99ms\"",
                "sync.flush_timeout = 99ms: must be at least 100ms: ",
            ),
            (
                "flush_timeout = \"5001ms\"",
                "sync.flush_timeout = 5s 1ms: must be at most 5s: ",
            ),
        ] {
            sync_refused(&with(keys), want);
        }
        // The default resync against a short established timeout.
        sync_refused(
            &(with("") + "[datapath.tcp_timeouts]\nestablished = \"1m\"\ntime_wait = \"20s\"\n"),
            "sync.resync_interval = 10m: must be less than half of \
             datapath.tcp_timeouts.established (30s): ",
        );
        for keys in [
            "resync_interval = \"10s\"\nflush_timeout = \"100ms\"",
            "resync_interval = \"29m 59s\"\nflush_timeout = \"5s\"",
        ] {
            sync_check(&with(keys)).expect(keys);
        }
    }
}
