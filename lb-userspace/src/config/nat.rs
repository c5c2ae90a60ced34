//! The NAT keys of `[datapath]`: the SNAT address pools, the NAT port range and
//! its default (as wide as the node can spare below its ephemeral ports), and how
//! long a flow holds its NAT port in each TCP state (`[datapath.tcp_timeouts]`).
//!
//! Kept apart from the rest of `[datapath]` because these keys are the NAT
//! capacity (`crate::capacity`): each one moves how many flows and new
//! connections a master can take through this node.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
    str::FromStr,
    time::Duration,
};

use lb_common::{SNAT_POOL_MAX, ct};
use serde::{Deserialize, Deserializer, de};

use super::{ConfigError, Facts, VipSettings, VipSnat, invalid, port};

/// `datapath.snat_ipv4` / `snat_ipv6` as written: one address, or a list of them.
#[derive(Debug, Default)]
pub(super) struct RawAddrs {
    addrs: Vec<String>,
    /// Written as a list: errors then name the entry (`snat_ipv4[1]`).
    list: bool,
}

impl<'de> Deserialize<'de> for RawAddrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = RawAddrs;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "an address, or a list of up to {NODE_SNAT_MAX} addresses"
                )
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawAddrs, E> {
                Ok(RawAddrs {
                    addrs: vec![s.to_owned()],
                    list: false,
                })
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawAddrs, A::Error> {
                let mut addrs = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    addrs.push(a);
                }
                Ok(RawAddrs { addrs, list: true })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// One family's SNAT pool: at most `NODE_SNAT_MAX` distinct unicast addresses of
/// that family, none of them a VIP's. Unset or `[]` is an empty pool.
pub(super) fn snat_pool<T>(
    key: &str,
    raw: Option<&RawAddrs>,
    what: &str,
    vips: &[VipSettings],
) -> Result<Vec<T>, ConfigError>
where
    T: FromStr + Copy + PartialEq + Into<IpAddr>,
{
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if raw.addrs.len() > NODE_SNAT_MAX {
        return Err(invalid(
            key,
            format!("{:?}", raw.addrs),
            format!("at most {NODE_SNAT_MAX} addresses"),
        ));
    }
    let mut pool: Vec<T> = Vec::with_capacity(raw.addrs.len());
    for (i, text) in raw.addrs.iter().enumerate() {
        let key = if raw.list {
            format!("{key}[{i}]")
        } else {
            key.to_owned()
        };
        let value = format!("{text:?}");
        let addr: T = text
            .parse()
            .map_err(|_| invalid(&key, &value, format!("not an {what} address")))?;
        let ip: IpAddr = addr.into();
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(invalid(
                &key,
                &value,
                "must be a unicast address of this node",
            ));
        }
        if pool.contains(&addr) {
            return Err(invalid(&key, &value, "listed twice"));
        }
        if let Some(j) = vips.iter().position(|v| v.addr.ip() == ip) {
            return Err(invalid(
                &key,
                &value,
                format!(
                    "is the address of vip[{j}]: NAT needs an address of the node's own, \
                     which replies come back to"
                ),
            ));
        }
        pool.push(addr);
    }
    Ok(pool)
}

/// Where the default NAT port range starts: the ports below are privileged.
pub const NAT_PORTS_FLOOR: u16 = 1024;
/// The fewest ports the default range may hold; a node whose ephemeral range
/// leaves fewer below it must set `datapath.nat_ports`.
pub const NAT_PORTS_MIN_DEFAULT: u32 = 1024;

/// The default NAT port range on a node whose `net.ipv4.ip_local_port_range` starts
/// at `ephemeral_low`: from [`NAT_PORTS_FLOOR`] up to just below it, so that the
/// node's own connections never take a NAT port. `None` if that leaves fewer than
/// [`NAT_PORTS_MIN_DEFAULT`] ports.
#[must_use]
pub fn default_nat_ports(ephemeral_low: u16) -> Option<RangeInclusive<u16>> {
    let highest = ephemeral_low.checked_sub(1)?;
    let range = NAT_PORTS_FLOOR..=highest;
    (range_len(&range) >= NAT_PORTS_MIN_DEFAULT).then_some(range)
}

/// How many ports a range holds.
#[must_use]
pub fn range_len(range: &RangeInclusive<u16>) -> u32 {
    if range.is_empty() {
        0
    } else {
        u32::from(*range.end()) - u32::from(*range.start()) + 1
    }
}

/// `nat_ports = [lowest, highest]`, or the default from the node's ephemeral range.
pub(super) fn nat_ports(
    raw: Option<&[i64]>,
    facts: &dyn Facts,
) -> Result<RangeInclusive<u16>, ConfigError> {
    let Some(raw) = raw else {
        let unset = |reason: String| {
            invalid(
                "datapath.nat_ports",
                "(unset)",
                format!("{reason}: set datapath.nat_ports explicitly"),
            )
        };
        let (lo, hi) = facts.ip_local_port_range().map_err(|reason| {
            unset(format!(
                "defaults to {NAT_PORTS_FLOOR} up to below net.ipv4.ip_local_port_range, \
                 which {reason}"
            ))
        })?;
        return default_nat_ports(lo).ok_or_else(|| {
            let left = u32::from(lo).saturating_sub(u32::from(NAT_PORTS_FLOOR));
            unset(format!(
                "the default, {NAT_PORTS_FLOOR} up to below net.ipv4.ip_local_port_range \
                 ({lo}-{hi}), would hold {left} ports, fewer than {NAT_PORTS_MIN_DEFAULT}"
            ))
        });
    };
    let [lo, hi] = raw[..] else {
        return Err(invalid(
            "datapath.nat_ports",
            format!("{raw:?}"),
            "write [lowest, highest]",
        ));
    };
    let (lo, hi) = (
        port("datapath.nat_ports[0]", lo)?,
        port("datapath.nat_ports[1]", hi)?,
    );
    if lo > hi {
        return Err(invalid(
            "datapath.nat_ports",
            format!("[{lo}, {hi}]"),
            "write [lowest, highest]",
        ));
    }
    Ok(lo..=hi)
}

/// The most addresses `datapath.snat_ipv4` or `snat_ipv6` may list; the rest of
/// the datapath's pool of `SNAT_POOL_MAX` is for VIPs with `snat = "vip"`.
pub const NODE_SNAT_MAX: usize = 4;

/// Checks what `snat = "vip"` needs: room in the datapath's pool for the node's
/// addresses and every such VIP address of a family, and no other VIP on such an
/// address whose port lies in `nat_ports` (a master's reply to that port would be
/// taken for a client's packet to that VIP; a VIP's own port is never claimed).
pub(super) fn vip_sources(
    vips: &[VipSettings],
    node_v4: usize,
    node_v6: usize,
    nat_ports: &RangeInclusive<u16>,
) -> Result<(), ConfigError> {
    for (v4, node, key) in [
        (true, node_v4, "datapath.snat_ipv4"),
        (false, node_v6, "datapath.snat_ipv6"),
    ] {
        let mut addrs: Vec<IpAddr> = vips
            .iter()
            .filter(|v| v.snat == VipSnat::Vip && v.addr.is_ipv4() == v4)
            .map(|v| v.addr.ip())
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        if node + addrs.len() > SNAT_POOL_MAX {
            return Err(invalid(
                key,
                format!("{node} address(es)"),
                format!(
                    "with {} VIP address(es) of snat = \"vip\", more than the {SNAT_POOL_MAX} NAT \
                     source addresses a family can have",
                    addrs.len()
                ),
            ));
        }
    }
    for (i, v) in vips.iter().enumerate() {
        if v.snat != VipSnat::Vip {
            continue;
        }
        if let Some((j, other)) = vips.iter().enumerate().find(|(j, o)| {
            *j != i && o.addr.ip() == v.addr.ip() && nat_ports.contains(&o.addr.port())
        }) {
            return Err(invalid(
                format!("vip[{j}].port"),
                other.addr.port(),
                format!(
                    "lies in datapath.nat_ports [{}, {}], and vip[{i}] {} takes its flows' \
                     source ports there (snat = \"vip\"): move the port out of the range, \
                     or set vip[{i}].snat = \"node\"",
                    nat_ports.start(),
                    nat_ports.end(),
                    v.addr
                ),
            ));
        }
    }
    Ok(())
}

/// The most slices `datapath.nat_slice` may cut the range into.
pub const NAT_SLICES_MAX: u16 = 64;
/// The fewest ports a slice may hold.
pub const NAT_SLICE_MIN_PORTS: u32 = 64;

/// Which part of `nat_ports` a node claims new flows' ports from: slice `index`
/// of `count` equal, contiguous slices. Every LB node of a VIP takes a slice of
/// its own, so that two nodes that both believe they own it (a preemption, a
/// split brain) never give one master two clients on one `(SNAT address, port)`.
/// Every node recognises replies on the whole range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatSlice {
    pub index: u16,
    pub count: u16,
}

impl Default for NatSlice {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl NatSlice {
    /// This slice of `ports`.
    #[must_use]
    pub fn of(self, ports: &RangeInclusive<u16>) -> RangeInclusive<u16> {
        let (lo, n) = (u32::from(*ports.start()), range_len(ports));
        let (i, count) = (u32::from(self.index), u32::from(self.count.max(1)));
        let at = |k: u32| lo + k * n / count;
        let first = u16::try_from(at(i)).unwrap_or(u16::MAX);
        let last = u16::try_from(at(i + 1) - 1).unwrap_or(u16::MAX);
        first..=last
    }
}

/// `nat_slice = [index, count]`, or the whole range.
pub(super) fn nat_slice(
    raw: Option<&[i64]>,
    ports: &RangeInclusive<u16>,
) -> Result<NatSlice, ConfigError> {
    let Some(raw) = raw else {
        return Ok(NatSlice::default());
    };
    let bad = |why: String| invalid("datapath.nat_slice", format!("{raw:?}"), why);
    let [index, count] = raw[..] else {
        return Err(bad(
            "write [index, count], e.g. [0, 2] on one node and [1, 2] on the other".into(),
        ));
    };
    let count = u16::try_from(count)
        .ok()
        .filter(|c| (1..=NAT_SLICES_MAX).contains(c))
        .ok_or_else(|| bad(format!("count must be 1-{NAT_SLICES_MAX}")))?;
    let index = u16::try_from(index)
        .ok()
        .filter(|i| *i < count)
        .ok_or_else(|| bad(format!("index must be 0-{} (below count)", count - 1)))?;
    let per = range_len(ports) / u32::from(count);
    if count > 1 && per < NAT_SLICE_MIN_PORTS {
        return Err(bad(format!(
            "each of {count} slices of datapath.nat_ports [{}, {}] would hold {per} ports, \
             fewer than {NAT_SLICE_MIN_PORTS}",
            ports.start(),
            ports.end()
        )));
    }
    Ok(NatSlice { index, count })
}

/// A warning if `nat_ports` overlaps the node's ephemeral ports (accepted: `apilb
/// run` reserves the NAT ports, but connections the node opened before, or opens
/// where the reservation does not reach, could share a 4-tuple with a NAT flow).
pub(super) fn ephemeral_overlap(
    nat_ports: &RangeInclusive<u16>,
    facts: &dyn Facts,
) -> Option<String> {
    let (lo, hi) = facts.ip_local_port_range().ok()?;
    let overlap = (*nat_ports.start()).max(lo)..=(*nat_ports.end()).min(hi);
    (!overlap.is_empty()).then(|| {
        format!(
            "datapath.nat_ports = [{}, {}] overlaps net.ipv4.ip_local_port_range ({lo}-{hi}) \
             in {}-{}: the node's own connections opened before apilb reserves the range \
             (net.ipv4.ip_local_reserved_ports) could collide with NAT flows to a master, \
             and the reservation shrinks the node's ephemeral ports",
            nat_ports.start(),
            nat_ports.end(),
            overlap.start(),
            overlap.end(),
        )
    })
}

/// `[datapath.tcp_timeouts]`: how long after its last packet a flow in each TCP
/// state holds its NAT port (`lb_common::ct::reusable`). README "NAT flow
/// lifecycle" says why each default is what it is.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TcpTimeouts {
    /// The client's SYN went to the master, no answer yet.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub syn_sent: Duration,
    /// The master answered with a SYN-ACK; the client has not acknowledged it.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub syn_recv: Duration,
    /// Both directions proven, no FIN or RST yet.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub established: Duration,
    /// One side sent a FIN.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub fin_wait: Duration,
    /// Both sides sent a FIN; the last ACK has not gone by.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub last_ack: Duration,
    /// The connection is over and the master closed first: its `TIME_WAIT` holds
    /// the 4-tuple against a SYN without timestamps.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub time_wait: Duration,
    /// Over, the master holding no `TIME_WAIT` that a new SYN could meet (a RST, a
    /// client-first close, or timestamps on both flows): segments still in flight.
    #[serde(deserialize_with = "super::timeouts::duration")]
    pub close: Duration,
}

impl Default for TcpTimeouts {
    fn default() -> Self {
        let d =
            |state: u8| Duration::from_millis(u64::from(ct::TIMEOUTS_DEFAULT_MS[state as usize]));
        Self {
            syn_sent: d(ct::CT_SYN_SENT),
            syn_recv: d(ct::CT_SYN_RECV),
            established: d(ct::CT_ESTABLISHED),
            fin_wait: d(ct::CT_FIN_WAIT),
            last_ack: d(ct::CT_LAST_ACK),
            time_wait: d(ct::CT_TIME_WAIT),
            close: d(ct::CT_CLOSE),
        }
    }
}

impl TcpTimeouts {
    /// Each timeout with its key and its state (`ct::CT_*`).
    #[must_use]
    pub fn by_key(&self) -> [(&'static str, u8, Duration); 7] {
        [
            ("syn_sent", ct::CT_SYN_SENT, self.syn_sent),
            ("syn_recv", ct::CT_SYN_RECV, self.syn_recv),
            ("established", ct::CT_ESTABLISHED, self.established),
            ("fin_wait", ct::CT_FIN_WAIT, self.fin_wait),
            ("last_ack", ct::CT_LAST_ACK, self.last_ack),
            ("time_wait", ct::CT_TIME_WAIT, self.time_wait),
            ("close", ct::CT_CLOSE, self.close),
        ]
    }

    /// `DatapathConfig::timeouts_ms`: milliseconds, indexed by state (`CT_NONE`'s
    /// is 0, never used). Validation keeps every one within a `u32`.
    #[must_use]
    pub fn by_state_ms(&self) -> [u32; ct::CT_STATES] {
        let mut out = [0; ct::CT_STATES];
        for (_, state, d) in self.by_key() {
            out[state as usize] = u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        }
        out
    }
}

/// The replaced keys `flow_close_grace` and `flow_idle_timeout`: refused, naming
/// what took their place, rather than silently ignored or unknown.
pub(super) fn replaced_keys(
    flow_close_grace: Option<&toml::Value>,
    flow_idle_timeout: Option<&toml::Value>,
) -> Result<(), ConfigError> {
    if let Some(v) = flow_close_grace {
        return Err(invalid(
            "datapath.flow_close_grace",
            v,
            "replaced by datapath.tcp_timeouts.close (and tcp_timeouts.time_wait for \
             master-first closes): a NAT port now comes back by its flow's TCP state",
        ));
    }
    if let Some(v) = flow_idle_timeout {
        return Err(invalid(
            "datapath.flow_idle_timeout",
            v,
            "replaced by datapath.tcp_timeouts.established (and a timeout for each other \
             TCP state)",
        ));
    }
    Ok(())
}
