//! The `[election]` section and each VIP's `election`, `vrid` and `priority`: how
//! this node decides whether it owns a VIP (see `crate::election`).
//!
//! Parsed like the rest of the file: raw serde structs, then validation that names
//! the key and value at fault.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};

use super::{ConfigError, Facts, invalid};
use crate::election::etcd::{self, EtcdSettings, EtcdTls};

/// How one VIP's owner is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Election {
    /// This node always owns it; apilb leaves its address alone.
    Static,
    /// VRRP, as virtual router `vrid` with this node's `priority` (1-254).
    Vrrp { vrid: u8, priority: u8 },
    /// A lease on a key in etcd.
    Etcd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawElection {
    interface: Option<String>,
    #[serde(default = "default_announce_count")]
    announce_count: i64,
    #[serde(
        default = "default_announce_interval",
        deserialize_with = "super::timeouts::duration"
    )]
    announce_interval: Duration,
    #[serde(default)]
    vrrp: RawVrrp,
    etcd: Option<RawEtcd>,
}

impl Default for RawElection {
    fn default() -> Self {
        Self {
            interface: None,
            announce_count: default_announce_count(),
            announce_interval: default_announce_interval(),
            vrrp: RawVrrp::default(),
            etcd: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVrrp {
    #[serde(default = "default_version")]
    version: i64,
    #[serde(
        default = "default_advert_interval",
        deserialize_with = "super::timeouts::duration"
    )]
    advert_interval: Duration,
    #[serde(default = "super::default_true")]
    preempt: bool,
    #[serde(default, deserialize_with = "super::timeouts::duration")]
    preempt_delay: Duration,
    source: Option<String>,
    #[serde(default)]
    unicast_peers: Vec<String>,
    #[serde(default, deserialize_with = "password")]
    auth_pass: Option<String>,
    #[serde(default = "default_track_weight")]
    track_weight: i64,
}

impl Default for RawVrrp {
    fn default() -> Self {
        Self {
            version: default_version(),
            advert_interval: default_advert_interval(),
            preempt: true,
            preempt_delay: Duration::ZERO,
            source: None,
            unicast_peers: Vec::new(),
            auth_pass: None,
            track_weight: default_track_weight(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(
        default = "default_lease_ttl",
        deserialize_with = "super::timeouts::duration"
    )]
    lease_ttl: Duration,
    node: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(
        default = "default_dial_timeout",
        deserialize_with = "super::timeouts::duration"
    )]
    dial_timeout: Duration,
}

/// `auth_pass`: a string, or digits left unquoted as keepalived's `auth_pass
/// 123456` is, taken as the same text. TOML reads `1_000` and `0x10` as numbers
/// too, so a password written so must be quoted to mean those characters.
fn password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Password;
    impl de::Visitor<'_> for Password {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a password, quoted: auth_pass = \"secret\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(Password)
}

fn default_announce_count() -> i64 {
    3
}
fn default_announce_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_version() -> i64 {
    3
}
fn default_advert_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_track_weight() -> i64 {
    -50
}
fn default_prefix() -> String {
    "/apilb/".to_owned()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(3)
}
fn default_dial_timeout() -> Duration {
    Duration::from_secs(2)
}

/// The validated `[election]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct ElectionSettings {
    /// Where owned VIP addresses go and VRRP adverts flow.
    pub interface: String,
    /// Gratuitous ARPs / unsolicited NAs sent on becoming owner, and their spacing.
    pub announce_count: u32,
    pub announce_interval: Duration,
    pub vrrp: VrrpSettings,
    /// Present if any VIP uses etcd.
    pub etcd: Option<EtcdSettings>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VrrpSettings {
    /// 2 (RFC 3768, keepalived's default) or 3 (RFC 5798).
    pub version: u8,
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// Source of this node's adverts; `None`: the interface's primary address.
    pub source: Option<IpAddr>,
    /// Empty: multicast (224.0.0.18, `ff02::12`).
    pub unicast_peers: Vec<IpAddr>,
    /// VRRPv2 simple password (RFC 2338 type 1, keepalived's `auth_type PASS`).
    pub auth_pass: Option<String>,
    /// Added to each VIP's priority while no backend is healthy (<= 0).
    pub track_weight: i32,
}

/// One VIP's `election` (with `vrid` and `priority` for VRRP). `i` is its index.
pub(super) fn vip_election(
    i: usize,
    election: &str,
    vrid: Option<i64>,
    priority: Option<i64>,
) -> Result<Election, ConfigError> {
    let key = |k: &str| format!("vip[{i}].{k}");
    let only_vrrp = |k: &str, v: i64| {
        Err(invalid(
            key(k),
            v,
            format!("only for election = \"vrrp\", not {election:?}"),
        ))
    };
    match election {
        "static" | "etcd" => {
            if let Some(v) = vrid {
                return only_vrrp("vrid", v);
            }
            if let Some(p) = priority {
                return only_vrrp("priority", p);
            }
            Ok(if election == "etcd" {
                Election::Etcd
            } else {
                Election::Static
            })
        }
        "vrrp" => {
            let vrid = vrid
                .ok_or_else(|| invalid(key("vrid"), "(unset)", "a VRRP VIP needs a vrid, 1-255"))?;
            let vrid = u8::try_from(vrid)
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| invalid(key("vrid"), vrid, "must be 1-255"))?;
            let priority = priority.unwrap_or(100);
            let priority = u8::try_from(priority)
                .ok()
                .filter(|p| (1..=254).contains(p))
                .ok_or_else(|| {
                    invalid(
                        key("priority"),
                        priority,
                        "must be 1-254 (255 is for the address owner, which a VIP never is)",
                    )
                })?;
            Ok(Election::Vrrp { vrid, priority })
        }
        other => Err(invalid(
            key("election"),
            format!("{other:?}"),
            "must be \"static\", \"vrrp\" or \"etcd\"",
        )),
    }
}

/// Validate `[election]` against the VIPs that use it.
pub(super) fn validate(
    raw: RawElection,
    vips: &[(SocketAddr, Election)],
    interfaces: &[String],
    facts: &dyn Facts,
) -> Result<ElectionSettings, ConfigError> {
    let interface = match raw.interface {
        Some(name) => {
            if !facts.interface_exists(&name) {
                return Err(invalid(
                    "election.interface",
                    format!("{name:?}"),
                    "no such interface",
                ));
            }
            name
        }
        None => interfaces.first().cloned().unwrap_or_default(),
    };
    let announce_count = u32::try_from(raw.announce_count)
        .ok()
        .filter(|n| (1..=100).contains(n))
        .ok_or_else(|| {
            invalid(
                "election.announce_count",
                raw.announce_count,
                "must be 1-100",
            )
        })?;
    let announce_interval = super::timeouts::announce_interval(raw.announce_interval)?;
    // An elected VIP's address is added and removed by its election, so no other
    // [[vip]] (another port, another election) may share it.
    for (i, &(addr, e)) in vips.iter().enumerate() {
        if e != Election::Static
            && let Some((j, _)) = vips
                .iter()
                .enumerate()
                .find(|&(j, (other, _))| j != i && other.ip() == addr.ip())
        {
            return Err(invalid(
                format!("vip[{}].address", i.max(j)),
                format!("{:?}", addr.ip().to_string()),
                format!(
                    "vip[{}] has the same address; an elected VIP's address must be its own",
                    i.min(j)
                ),
            ));
        }
    }
    let vrrp_vips: Vec<(SocketAddr, u8)> = vips
        .iter()
        .filter_map(|&(addr, e)| match e {
            Election::Vrrp { vrid, .. } => Some((addr, vrid)),
            _ => None,
        })
        .collect();
    let vrrp = validate_vrrp(raw.vrrp, &vrrp_vips)?;
    let uses_etcd = vips.iter().any(|(_, e)| *e == Election::Etcd);
    let etcd = match (raw.etcd, uses_etcd) {
        (Some(e), true) => Some(validate_etcd(e, facts)?),
        (None, true) => {
            return Err(invalid(
                "election.etcd",
                "(missing)",
                "a VIP has election = \"etcd\"; say where etcd is",
            ));
        }
        (_, false) => None,
    };
    Ok(ElectionSettings {
        interface,
        announce_count,
        announce_interval,
        vrrp,
        etcd,
    })
}

fn validate_vrrp(raw: RawVrrp, vips: &[(SocketAddr, u8)]) -> Result<VrrpSettings, ConfigError> {
    let mut vrids: HashMap<u8, SocketAddr> = HashMap::new();
    for &(addr, vrid) in vips {
        if let Some(other) = vrids.insert(vrid, addr) {
            return Err(invalid(
                "vip.vrid",
                vrid,
                format!("used by both {} and {}", other.ip(), addr.ip()),
            ));
        }
    }
    let version = match raw.version {
        2 => 2,
        3 => 3,
        v => return Err(invalid("election.vrrp.version", v, "must be 2 or 3")),
    };
    let interval = super::timeouts::advert_interval(version, raw.advert_interval)?;
    if version == 2
        && let Some((addr, _)) = vips.iter().find(|(a, _)| a.is_ipv6())
    {
        return Err(invalid(
            "election.vrrp.version",
            2,
            format!("VRRPv2 is IPv4 only; VIP {} needs version 3", addr.ip()),
        ));
    }
    if let Some(pass) = &raw.auth_pass {
        if version != 2 {
            return Err(invalid(
                "election.vrrp.auth_pass",
                "(set)",
                "only VRRPv2 has authentication",
            ));
        }
        check_password(pass)?;
    }
    let source = super::optional_ip("election.vrrp.source", raw.source.as_deref(), "IP")?;
    let mut unicast_peers = Vec::with_capacity(raw.unicast_peers.len());
    for (i, p) in raw.unicast_peers.iter().enumerate() {
        let key = format!("election.vrrp.unicast_peers[{i}]");
        let ip: IpAddr = p
            .parse()
            .map_err(|_| invalid(&key, format!("{p:?}"), "not an IP address"))?;
        if !vips.is_empty() && !vips.iter().any(|(a, _)| a.is_ipv4() == ip.is_ipv4()) {
            return Err(invalid(
                &key,
                format!("{p:?}"),
                "no VRRP VIP is of this address family",
            ));
        }
        unicast_peers.push(ip);
    }
    let track_weight = i32::try_from(raw.track_weight)
        .ok()
        .filter(|w| (-253..=0).contains(w))
        .ok_or_else(|| {
            invalid(
                "election.vrrp.track_weight",
                raw.track_weight,
                "must be -253 to 0 (added to the priority while no backend is healthy)",
            )
        })?;
    Ok(VrrpSettings {
        version,
        advert_interval: interval,
        preempt: raw.preempt,
        preempt_delay: raw.preempt_delay,
        source,
        unicast_peers,
        auth_pass: raw.auth_pass,
        track_weight,
    })
}

/// A VRRPv2 password carries 1-8 bytes. keepalived sends the first 8 of a longer
/// one (and logs that it truncated it); apilb refuses it and says what to write
/// for the same 8 bytes on the wire. The password travels in clear in every
/// advert, so the error may show them.
fn check_password(pass: &str) -> Result<(), ConfigError> {
    let key = "election.vrrp.auth_pass";
    let bytes = format!("({} bytes)", pass.len());
    if pass.is_empty() {
        return Err(invalid(key, bytes, "must be 1-8 bytes"));
    }
    if pass.len() <= 8 {
        return Ok(());
    }
    let reason = match pass.get(..8) {
        Some(first) => format!(
            "VRRPv2 carries at most 8 bytes of password; keepalived sends only the first 8 \
             of a longer one, so to match its peers write auth_pass = {first:?}"
        ),
        None => "VRRPv2 carries at most 8 bytes of password, and the 8th byte of this one \
                 is inside a character: choose a password of 1-8 bytes for every node"
            .to_owned(),
    };
    Err(invalid(key, bytes, reason))
}

fn validate_etcd(raw: RawEtcd, facts: &dyn Facts) -> Result<EtcdSettings, ConfigError> {
    if raw.endpoints.is_empty() {
        return Err(invalid(
            "election.etcd.endpoints",
            "[]",
            "name at least one etcd endpoint",
        ));
    }
    super::timeouts::etcd(raw.lease_ttl, raw.dial_timeout)?;
    if !raw.prefix.starts_with('/') {
        return Err(invalid(
            "election.etcd.prefix",
            format!("{:?}", raw.prefix),
            "must start with '/'",
        ));
    }
    let client_cert = match (raw.cert_file, raw.key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (c, _) => {
            return Err(invalid(
                if c.is_some() {
                    "election.etcd.key_file"
                } else {
                    "election.etcd.cert_file"
                },
                "(unset)",
                "cert_file and key_file go together",
            ));
        }
    };
    let tls = match (raw.ca_file, client_cert) {
        (Some(ca_file), client_cert) => Some(EtcdTls {
            ca_file,
            client_cert,
        }),
        (None, None) => None,
        (None, Some((cert, _))) => {
            return Err(invalid(
                "election.etcd.ca_file",
                "(unset)",
                format!(
                    "election.etcd.cert_file {} is a TLS client certificate: \
                     set ca_file to the CA that signed etcd's serving certificate",
                    cert.display()
                ),
            ));
        }
    };
    for (i, endpoint) in raw.endpoints.iter().enumerate() {
        etcd::check_endpoint(endpoint, tls.is_some()).map_err(|reason| {
            invalid(
                format!("election.etcd.endpoints[{i}]"),
                format!("{endpoint:?}"),
                reason,
            )
        })?;
    }
    let node = match raw.node {
        Some(n) if !n.is_empty() => n,
        Some(_) => return Err(invalid("election.etcd.node", "\"\"", "must not be empty")),
        None => facts.hostname().map_err(|reason| {
            invalid(
                "election.etcd.node",
                "(unset)",
                format!("defaults to this node's hostname, which {reason}; set it"),
            )
        })?,
    };
    Ok(EtcdSettings {
        endpoints: raw.endpoints,
        prefix: raw.prefix,
        lease_ttl: raw.lease_ttl,
        node,
        tls,
        dial_timeout: raw.dial_timeout,
    })
}
