//! The configuration file: TOML parsed by serde, then validated into typed values.
//!
//! Parsing and validation are separate steps so that every error can name the key it
//! is about, as a path (`backend[1].weight`), and the value it refused. Validation
//! never touches the kernel; it only reads files the config names (CA, client
//! certificate, sync key) and `/sys/class/net`, so `apilb check` can run it anywhere.
//! `examples/apilb.toml` documents every key.

use std::{
    collections::HashSet,
    fmt::Display,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    FLOW_TABLE_SIZE, HALF_OPEN_TABLE_SIZE, MAGLEV_SIZE_DEFAULT, MAGLEV_SIZE_MAX, MAX_BACKENDS,
    MAX_VIPS,
};
use serde::Deserialize;

use crate::{
    health::{ProbeKind, ProbeSpec, TlsSpec, Trust},
    loader::AttachMode,
    maglev::is_prime,
    passive::PassiveSettings,
};

mod discovery;
mod election;
mod local;
mod nat;
mod reload;
mod sync;
mod timeouts;

#[cfg(test)]
pub(crate) use discovery::write_kubeconfig;
pub use discovery::{Credentials, DiscoverySettings, HOLD_DEFAULT};
pub use election::{Election, ElectionSettings, VrrpSettings};
pub use local::LocalSettings;
pub use nat::{
    NAT_PORTS_FLOOR, NAT_PORTS_MIN_DEFAULT, NODE_SNAT_MAX, NatSlice, TcpTimeouts,
    default_nat_ports, range_len,
};
pub use sync::SyncSettings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML error is part of the message, not a source: its text is the whole
    /// story (line, column, snippet), and a report that walks the source chain
    /// would print it twice. `key` is the path to the value at fault
    /// (`election.vrrp.advert_interval`), empty for a syntax error.
    #[error("config file {path}{}: {error}", at_key(.key))]
    Parse {
        path: PathBuf,
        key: String,
        error: Box<toml::de::Error>,
    },
    #[error("{key} = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// `, key <key>` for a [`ConfigError::Parse`], if it has one.
fn at_key(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!(", key {key}")
    }
}

fn invalid(key: impl Display, value: impl Display, reason: impl Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

// ---- The file as written. ----

/// The file as written, or the TOML or type error with the key it is about
/// (serde reports the value and what was expected, not where).
fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    let parse_error = |key: String, error| ConfigError::Parse {
        path: path.to_owned(),
        key,
        error: Box::new(error),
    };
    let de = toml::Deserializer::parse(text).map_err(|e| parse_error(String::new(), e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        parse_error(key, e.into_inner())
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_instance")]
    instance: String,
    datapath: RawDatapath,
    #[serde(default)]
    vip: Vec<RawVip>,
    #[serde(default)]
    backend: Vec<RawBackend>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    election: election::RawElection,
    #[serde(default)]
    local: local::RawLocal,
    sync: Option<sync::RawSync>,
    discovery: Option<discovery::RawDiscovery>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    interfaces: Vec<String>,
    #[serde(default)]
    xdp_mode: AttachMode,
    #[serde(default = "default_mode")]
    mode: String,
    snat_ipv4: Option<nat::RawAddrs>,
    snat_ipv6: Option<nat::RawAddrs>,
    /// Unset: from the node's ephemeral port range (`nat::nat_ports`).
    nat_ports: Option<Vec<i64>>,
    /// `[index, count]`; unset: the whole range (`nat::nat_slice`).
    nat_slice: Option<Vec<i64>>,
    #[serde(default = "default_maglev_size")]
    maglev_size: i64,
    #[serde(default = "default_flow_table_size")]
    flow_table_size: i64,
    /// Unset: `HALF_OPEN_TABLE_SIZE`, or `flow_table_size` if that is smaller.
    half_open_table_size: Option<i64>,
    #[serde(
        default = "default_nexthop_ttl",
        deserialize_with = "timeouts::duration"
    )]
    nexthop_ttl: Duration,
    #[serde(default)]
    tcp_timeouts: TcpTimeouts,
    #[serde(default = "default_expected_connection_rate")]
    expected_connection_rate: i64,
    /// Replaced by `tcp_timeouts`; read only to refuse them by name.
    flow_close_grace: Option<toml::Value>,
    flow_idle_timeout: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    #[serde(default = "default_port")]
    port: i64,
    #[serde(default = "default_election")]
    election: String,
    vrid: Option<i64>,
    priority: Option<i64>,
    /// `"vip"` or `"node"`; unset: `"vip"` for elected VIPs, `"node"` for static.
    snat: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    #[serde(default = "default_weight")]
    weight: i64,
    #[serde(default)]
    local: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    kind: RawProbeKind,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_interval", deserialize_with = "timeouts::duration")]
    interval: Duration,
    #[serde(default = "default_timeout", deserialize_with = "timeouts::duration")]
    timeout: Duration,
    #[serde(default = "default_rise_fall")]
    rise: i64,
    #[serde(default = "default_rise_fall")]
    fall: i64,
    #[serde(default = "default_jitter")]
    jitter: f64,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    #[serde(default = "default_true")]
    passive: bool,
    #[serde(default = "default_passive_threshold")]
    passive_threshold: i64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            kind: RawProbeKind::default(),
            path: default_path(),
            interval: default_interval(),
            timeout: default_timeout(),
            rise: default_rise_fall(),
            fall: default_rise_fall(),
            jitter: default_jitter(),
            ca_file: None,
            server_name: None,
            client_cert: None,
            client_key: None,
            insecure: false,
            passive: true,
            passive_threshold: default_passive_threshold(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_passive_threshold() -> i64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_listen")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

/// `instance` when the config leaves it out; also what `apilb detach` detaches.
pub const INSTANCE_DEFAULT: &str = "default";

fn default_instance() -> String {
    INSTANCE_DEFAULT.to_owned()
}
fn default_mode() -> String {
    "nat".to_owned()
}
/// `datapath.expected_connection_rate` when the config leaves it out: new
/// connections a second, the whole node.
pub const EXPECTED_CONNECTION_RATE_DEFAULT: u32 = 1000;

fn default_expected_connection_rate() -> i64 {
    i64::from(EXPECTED_CONNECTION_RATE_DEFAULT)
}
fn default_maglev_size() -> i64 {
    i64::from(MAGLEV_SIZE_DEFAULT)
}
fn default_flow_table_size() -> i64 {
    i64::from(FLOW_TABLE_SIZE)
}
fn default_nexthop_ttl() -> Duration {
    Duration::from_nanos(lb_common::NEXTHOP_TTL_DEFAULT_NS)
}
fn default_port() -> i64 {
    6443
}
fn default_election() -> String {
    "static".to_owned()
}
fn default_weight() -> i64 {
    1
}
fn default_path() -> String {
    "/readyz".to_owned()
}
fn default_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_timeout() -> Duration {
    Duration::from_millis(400)
}
fn default_rise_fall() -> i64 {
    2
}
fn default_jitter() -> f64 {
    0.1
}
/// `admin.listen` when the config leaves it out; also where `apilb status` looks.
pub const ADMIN_LISTEN_DEFAULT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

fn default_listen() -> String {
    ADMIN_LISTEN_DEFAULT.to_string()
}

// ---- The validated configuration. ----

/// `health.kind` as written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawProbeKind {
    #[default]
    Https,
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Pins live under `/sys/fs/bpf/apilb/<instance>/`.
    pub instance: String,
    pub datapath: DatapathSettings,
    pub vips: Vec<VipSettings>,
    pub backends: Vec<BackendSettings>,
    /// `[health]`: how the masters are probed.
    pub health: ProbeSpec,
    /// `health.passive` and `health.passive_threshold`.
    pub passive: PassiveSettings,
    pub admin_listen: SocketAddr,
    pub election: ElectionSettings,
    pub local: LocalSettings,
    /// `[sync]`; `None`: flow sync is off.
    pub sync: Option<SyncSettings>,
    /// `[discovery]`; `None`: the masters are the `[[backend]]` list alone.
    pub discovery: Option<DiscoverySettings>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DatapathSettings {
    pub interfaces: Vec<String>,
    pub xdp_mode: AttachMode,
    /// The SNAT pools, at most `SNAT_POOL_MAX` addresses each; empty: none.
    pub snat_v4: Vec<Ipv4Addr>,
    pub snat_v6: Vec<Ipv6Addr>,
    /// NAT source ports, at each SNAT address.
    pub nat_ports: RangeInclusive<u16>,
    /// The slice of `nat_ports` this node claims new flows' ports from.
    pub nat_slice: NatSlice,
    pub maglev_size: u32,
    pub flow_table_size: u32,
    /// Entries in each table of half-open flows; at most `flow_table_size`.
    pub half_open_table_size: u32,
    pub nexthop_ttl: Duration,
    pub tcp_timeouts: TcpTimeouts,
    /// New connections a second the whole node should take, for `apilb check`'s
    /// capacity warning (`crate::capacity`).
    pub expected_connection_rate: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSettings {
    pub addr: SocketAddr,
    pub election: Election,
    /// The source address of its flows towards the masters.
    pub snat: VipSnat,
}

/// Where a VIP's flows come from, as the masters see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipSnat {
    /// The VIP's own address, which moves with the VIP, so that the masters'
    /// replies follow it to a node that takes it over (flow sync). The default
    /// for an elected VIP.
    Vip,
    /// This node's `datapath.snat_ipv4`/`snat_ipv6` pool. The default for a
    /// static VIP, which several nodes may hold at once.
    Node,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSettings {
    pub addr: SocketAddr,
    /// Relative share of new flows; 0 drains the backend (no new flows).
    pub weight: u32,
    /// This node itself (the masters-run-apilb topology).
    pub local: bool,
}

impl Config {
    /// The masters' addresses, in config order.
    pub fn backend_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.backends.iter().map(|b| b.addr)
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate config text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        validate(parse_raw(text, path)?, &SystemFacts)
    }

    /// [`Config::load`] on a machine that is not the node (`apilb check --offline`,
    /// for config pipelines): nothing about this machine is asked, no interface
    /// looked up, no file the config names read, no sysctl. Returns, beside the
    /// config, what was therefore not checked, one line each. A config from here
    /// is for checking only: its sync key is not the file's.
    pub fn load_offline(path: &Path) -> Result<(Self, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw = parse_raw(&text, path)?;
        let facts = OfflineFacts::default();
        let config = validate(raw, &facts)?;
        Ok((config, facts.skipped.into_inner()))
    }

    /// What `apilb check` warns of in a valid config, about the node it runs on: a
    /// NAT port range that overlaps the node's ephemeral ports.
    #[must_use]
    pub fn node_warnings(&self) -> Vec<String> {
        self.node_warnings_on(&SystemFacts)
    }

    fn node_warnings_on(&self, facts: &dyn Facts) -> Vec<String> {
        nat::ephemeral_overlap(&self.datapath.nat_ports, facts)
            .into_iter()
            .collect()
    }
}

/// What validation needs to know about the machine; a trait so unit tests can say
/// which interfaces exist without depending on the machine they run on.
trait Facts {
    fn interface_exists(&self, name: &str) -> bool;
    /// This node's hostname (the default `election.etcd.node`), or why there is
    /// none.
    fn hostname(&self) -> Result<String, String>;
    /// `net.ipv4.ip_local_port_range` (the default `datapath.nat_ports` lies below
    /// it), or why it cannot be read.
    fn ip_local_port_range(&self) -> Result<(u16, u16), String>;
    /// Whether the files the config names are read (not by `apilb check
    /// --offline`, which calls [`Facts::skipped`] for each instead).
    fn reads_files(&self) -> bool {
        true
    }
    /// Note a check left out because this is not the node.
    fn skipped(&self, _what: String) {}
}

/// The facts of a machine that is not the node: every interface exists, the
/// ephemeral port range is Linux's default, and every check that needs the node
/// is noted as skipped.
#[derive(Default)]
struct OfflineFacts {
    skipped: std::cell::RefCell<Vec<String>>,
}

impl Facts for OfflineFacts {
    fn interface_exists(&self, name: &str) -> bool {
        self.skipped(format!("interface {name:?} exists: not looked up"));
        true
    }

    fn hostname(&self) -> Result<String, String> {
        self.skipped(
            "the node's hostname (a default node name): not known offline, stood in by \"node\""
                .to_owned(),
        );
        Ok("node".to_owned())
    }

    fn ip_local_port_range(&self) -> Result<(u16, u16), String> {
        self.skipped(
            "net.ipv4.ip_local_port_range (the default datapath.nat_ports): not read, \
             Linux's default 32768-60999 assumed"
                .to_owned(),
        );
        Ok((32_768, 60_999))
    }

    fn reads_files(&self) -> bool {
        false
    }

    fn skipped(&self, what: String) {
        self.skipped.borrow_mut().push(what);
    }
}

struct SystemFacts;

impl Facts for SystemFacts {
    /// Asks the kernel in this process's own network namespace; `/sys/class/net`
    /// would show whichever namespace mounted sysfs.
    fn interface_exists(&self, name: &str) -> bool {
        crate::loader::ifindex(name).is_some()
    }

    fn hostname(&self) -> Result<String, String> {
        let path = "/proc/sys/kernel/hostname";
        let name = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot be read from {path}: {e}"))?;
        match name.trim() {
            "" => Err(format!("is empty in {path}")),
            name => Ok(name.to_owned()),
        }
    }

    /// Read in this process's own network namespace, where the range is kept.
    fn ip_local_port_range(&self) -> Result<(u16, u16), String> {
        let path = "/proc/sys/net/ipv4/ip_local_port_range";
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot be read from {path}: {e}"))?;
        let ports: Vec<u16> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| format!("is not two ports in {path}: {:?}", text.trim()))?;
        match ports[..] {
            [lo, hi] if lo <= hi => Ok((lo, hi)),
            _ => Err(format!("is not two ports in {path}: {:?}", text.trim())),
        }
    }
}

fn validate(raw: RawConfig, facts: &dyn Facts) -> Result<Config, ConfigError> {
    let RawConfig {
        instance,
        datapath,
        vip,
        backend,
        health,
        admin,
        election,
        local,
        sync,
        discovery,
    } = raw;
    if instance.is_empty()
        || !instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "instance",
            format!("{instance:?}"),
            "use letters, digits, '-' and '_'",
        ));
    }
    let backends = validate_backends(&backend)?;
    let vips = validate_vips(&vip)?;
    let datapath = validate_datapath(datapath, &vips, &backends, facts)?;
    let elections: Vec<(SocketAddr, Election)> =
        vips.iter().map(|v| (v.addr, v.election)).collect();
    let election = election::validate(election, &elections, &datapath.interfaces, facts)?;
    let (health, passive) = validate_health(health, facts)?;
    let local = local::validate(local, &vips)?;
    let admin_listen = admin.listen.parse().map_err(|_| {
        invalid(
            "admin.listen",
            format!("{:?}", admin.listen),
            "not an address:port",
        )
    })?;
    // Last: they read the key file and the kubeconfig.
    let sync = sync
        .map(|s| sync::validate(s, &vips, &datapath, &election, facts))
        .transpose()?;
    let discovery = discovery
        .map(|d| discovery::validate(d, facts))
        .transpose()?;
    Ok(Config {
        instance,
        datapath,
        vips,
        backends,
        health,
        passive,
        admin_listen,
        election,
        local,
        sync,
        discovery,
    })
}

fn port(key: &str, value: i64) -> Result<u16, ConfigError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(key, value, "a port must be 1-65535")),
    }
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?}"),
            "not an address:port (IPv6 as [addr]:port)",
        )
    })?;
    if addr.port() == 0 {
        return Err(invalid(key, format!("{value:?}"), "a port must be 1-65535"));
    }
    Ok(addr)
}

fn validate_backends(raw: &[RawBackend]) -> Result<Vec<BackendSettings>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "backend",
            "[]",
            "at least one [[backend]] is needed",
        ));
    }
    if raw.len() >= MAX_BACKENDS as usize {
        return Err(invalid(
            "backend",
            raw.len(),
            format!("at most {} backends", MAX_BACKENDS - 1),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, b) in raw.iter().enumerate() {
        let addr = socket_addr(&format!("backend[{i}].address"), &b.address)?;
        if !seen.insert(addr) {
            return Err(invalid(
                format!("backend[{i}].address"),
                format!("{:?}", b.address),
                "duplicate backend",
            ));
        }
        let weight = u32::try_from(b.weight).map_err(|_| {
            invalid(
                format!("backend[{i}].weight"),
                b.weight,
                "must be 0 (drained) or more",
            )
        })?;
        out.push(BackendSettings {
            addr,
            weight,
            local: b.local,
        });
    }
    if out.iter().all(|b| b.weight == 0) {
        return Err(invalid(
            "backend[*].weight",
            0,
            "every backend has weight 0: no backend could take a flow",
        ));
    }
    Ok(out)
}

fn validate_vips(raw: &[RawVip]) -> Result<Vec<VipSettings>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid("vip", "[]", "at least one [[vip]] is needed"));
    }
    if raw.len() > MAX_VIPS as usize {
        return Err(invalid(
            "vip",
            raw.len(),
            format!("at most {MAX_VIPS} VIPs"),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, v) in raw.iter().enumerate() {
        let ip: IpAddr = v.address.parse().map_err(|_| {
            invalid(
                format!("vip[{i}].address"),
                format!("{:?}", v.address),
                "not an IP address",
            )
        })?;
        let addr = SocketAddr::new(ip, port(&format!("vip[{i}].port"), v.port)?);
        if !seen.insert(addr) {
            return Err(invalid(
                format!("vip[{i}].address"),
                format!("{:?}", v.address),
                format!("duplicate VIP {addr}"),
            ));
        }
        let election = election::vip_election(i, &v.election, v.vrid, v.priority)?;
        let snat = match (v.snat.as_deref(), &election) {
            (None, Election::Static) | (Some("node"), _) => VipSnat::Node,
            (None | Some("vip"), _) => VipSnat::Vip,
            (Some(other), _) => {
                return Err(invalid(
                    format!("vip[{i}].snat"),
                    format!("{other:?}"),
                    "must be \"vip\" (the VIP's own address) or \"node\" (datapath.snat_ipv4/snat_ipv6)",
                ));
            }
        };
        out.push(VipSettings {
            addr,
            election,
            snat,
        });
    }
    Ok(out)
}

fn validate_datapath(
    raw: RawDatapath,
    vips: &[VipSettings],
    backends: &[BackendSettings],
    facts: &dyn Facts,
) -> Result<DatapathSettings, ConfigError> {
    if raw.interfaces.is_empty() {
        return Err(invalid(
            "datapath.interfaces",
            "[]",
            "name at least one interface",
        ));
    }
    for (i, name) in raw.interfaces.iter().enumerate() {
        if !facts.interface_exists(name) {
            return Err(invalid(
                format!("datapath.interfaces[{i}]"),
                format!("{name:?}"),
                "no such interface",
            ));
        }
    }
    if raw.mode != "nat" {
        return Err(invalid(
            "datapath.mode",
            format!("{:?}", raw.mode),
            "only \"nat\" is supported",
        ));
    }
    nat::replaced_keys(
        raw.flow_close_grace.as_ref(),
        raw.flow_idle_timeout.as_ref(),
    )?;
    let (snat_v4, snat_v6) = snat_addresses(&raw, vips, backends)?;
    let nat_ports = nat::nat_ports(raw.nat_ports.as_deref(), facts)?;
    let nat_slice = nat::nat_slice(raw.nat_slice.as_deref(), &nat_ports)?;
    nat::vip_sources(vips, snat_v4.len(), snat_v6.len(), &nat_ports)?;
    let maglev_size = u32::try_from(raw.maglev_size)
        .ok()
        .filter(|&m| is_prime(m) && m <= MAGLEV_SIZE_MAX)
        .ok_or_else(|| {
            invalid(
                "datapath.maglev_size",
                raw.maglev_size,
                format!("must be a prime no larger than {MAGLEV_SIZE_MAX}"),
            )
        })?;
    let need = 100 * backends.len() as u64;
    if u64::from(maglev_size) <= need {
        return Err(invalid(
            "datapath.maglev_size",
            maglev_size,
            format!(
                "must exceed 100 x {} backends = {need}, to keep shares within 1%",
                backends.len()
            ),
        ));
    }
    let table_size = |key: &str, value: i64| {
        u32::try_from(value)
            .ok()
            .filter(|&n| (1024..=1 << 24).contains(&n))
            .ok_or_else(|| invalid(key, value, "must be 1024-16777216"))
    };
    let flow_table_size = table_size("datapath.flow_table_size", raw.flow_table_size)?;
    let half_open_table_size = match raw.half_open_table_size {
        None => HALF_OPEN_TABLE_SIZE.min(flow_table_size),
        Some(n) => {
            let n = table_size("datapath.half_open_table_size", n)?;
            if n > flow_table_size {
                return Err(invalid(
                    "datapath.half_open_table_size",
                    n,
                    format!("must not exceed datapath.flow_table_size ({flow_table_size})"),
                ));
            }
            n
        }
    };
    let nexthop_ttl = timeouts::nexthop_ttl(raw.nexthop_ttl)?;
    let tcp_timeouts = timeouts::tcp_timeouts(raw.tcp_timeouts)?;
    let expected_connection_rate = u32::try_from(raw.expected_connection_rate)
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| {
            invalid(
                "datapath.expected_connection_rate",
                raw.expected_connection_rate,
                "must be 1 or more new connections a second",
            )
        })?;
    Ok(DatapathSettings {
        interfaces: raw.interfaces,
        xdp_mode: raw.xdp_mode,
        snat_v4,
        snat_v6,
        nat_ports,
        nat_slice,
        maglev_size,
        flow_table_size,
        half_open_table_size,
        nexthop_ttl,
        tcp_timeouts,
        expected_connection_rate,
    })
}

/// An optional address key: `None` if unset, an error naming it if malformed.
fn optional_ip<T: std::str::FromStr>(
    key: &str,
    value: Option<&str>,
    what: &str,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|s| {
            s.parse()
                .map_err(|_| invalid(key, format!("{s:?}"), format!("not an {what} address")))
        })
        .transpose()
}

/// The NAT source pools; each family that a VIP uses must have an address, and a
/// backend.
fn snat_addresses(
    raw: &RawDatapath,
    vips: &[VipSettings],
    backends: &[BackendSettings],
) -> Result<(Vec<Ipv4Addr>, Vec<Ipv6Addr>), ConfigError> {
    let v4: Vec<Ipv4Addr> =
        nat::snat_pool("datapath.snat_ipv4", raw.snat_ipv4.as_ref(), "IPv4", vips)?;
    let v6: Vec<Ipv6Addr> =
        nat::snat_pool("datapath.snat_ipv6", raw.snat_ipv6.as_ref(), "IPv6", vips)?;
    for (i, v) in vips.iter().enumerate() {
        let missing = match v.addr.ip() {
            _ if v.snat == VipSnat::Vip => None,
            IpAddr::V4(_) if v4.is_empty() => Some(("datapath.snat_ipv4", &raw.snat_ipv4)),
            IpAddr::V6(_) if v6.is_empty() => Some(("datapath.snat_ipv6", &raw.snat_ipv6)),
            _ => None,
        };
        if let Some((key, written)) = missing {
            return Err(invalid(
                key,
                if written.is_some() { "[]" } else { "(unset)" },
                format!(
                    "vip[{i}] {} has snat = \"node\" and needs a NAT source address of its family",
                    v.addr
                ),
            ));
        }
        if !backends
            .iter()
            .any(|b| b.addr.is_ipv4() == v.addr.is_ipv4())
        {
            return Err(invalid(
                format!("vip[{i}].address"),
                v.addr.ip(),
                "no [[backend]] of its address family",
            ));
        }
    }
    Ok((v4, v6))
}

/// The https settings: files readable, certificate and key together, a valid
/// server name, and either a CA file or an explicit `insecure`.
fn validate_tls(raw: &RawHealth, facts: &dyn Facts) -> Result<TlsSpec, ConfigError> {
    for (key, file) in [
        ("health.ca_file", &raw.ca_file),
        ("health.client_cert", &raw.client_cert),
        ("health.client_key", &raw.client_key),
    ] {
        if let Some(path) = file {
            if !facts.reads_files() {
                facts.skipped(format!("{key} = {:?}: not read", path.display()));
                continue;
            }
            std::fs::read(path)
                .map_err(|e| invalid(key, path.display(), format!("cannot be read: {e}")))?;
        }
    }
    let client_cert = match (raw.client_cert.clone(), raw.client_key.clone()) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(c), None) => {
            return Err(invalid(
                "health.client_key",
                "(unset)",
                format!("health.client_cert {} needs its key", c.display()),
            ));
        }
        (None, Some(k)) => {
            return Err(invalid(
                "health.client_cert",
                "(unset)",
                format!("health.client_key {} needs its certificate", k.display()),
            ));
        }
    };
    let trust = match (&raw.ca_file, raw.insecure) {
        (Some(ca), false) => Trust::CaFile(ca.clone()),
        (None, true) => Trust::AnyCertificate,
        (None, false) => {
            return Err(invalid(
                "health.ca_file",
                "(unset)",
                "an https probe verifies the apiserver against a CA file; set it, or insecure = true",
            ));
        }
        (Some(_), true) => {
            return Err(invalid(
                "health.insecure",
                true,
                "conflicts with health.ca_file: choose one",
            ));
        }
    };
    let server_name = raw
        .server_name
        .as_ref()
        .map(|name| {
            rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
                invalid(
                    "health.server_name",
                    format!("{name:?}"),
                    "not a valid DNS name or IP address",
                )
            })
        })
        .transpose()?;
    Ok(TlsSpec {
        trust,
        server_name,
        client_cert,
    })
}

fn validate_health(
    raw: RawHealth,
    facts: &dyn Facts,
) -> Result<(ProbeSpec, PassiveSettings), ConfigError> {
    timeouts::probe(raw.interval, raw.timeout)?;
    let count = |key: &str, v: i64| {
        u32::try_from(v)
            .ok()
            .filter(|&n| (1..=100).contains(&n))
            .ok_or_else(|| invalid(key, v, "must be 1-100"))
    };
    let rise = count("health.rise", raw.rise)?;
    let fall = count("health.fall", raw.fall)?;
    if !(0.0..=0.5).contains(&raw.jitter) {
        return Err(invalid(
            "health.jitter",
            raw.jitter,
            "must be 0-0.5 (a fraction of the interval)",
        ));
    }
    if !crate::health::is_request_path(&raw.path) {
        return Err(invalid(
            "health.path",
            format!("{:?}", raw.path),
            "must be a URL path starting with '/'",
        ));
    }
    let passive_threshold = u32::try_from(raw.passive_threshold)
        .ok()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| {
            invalid(
                "health.passive_threshold",
                raw.passive_threshold,
                "must be 1-1000",
            )
        })?;
    let tls_keys = raw.ca_file.is_some()
        || raw.insecure
        || raw.client_cert.is_some()
        || raw.client_key.is_some();
    if raw.kind != RawProbeKind::Https && tls_keys {
        return Err(invalid(
            "health.kind",
            format!("{:?}", raw.kind).to_lowercase(),
            "TLS settings need kind = \"https\"",
        ));
    }
    let kind = match raw.kind {
        RawProbeKind::Tcp => ProbeKind::Tcp,
        RawProbeKind::Http => ProbeKind::Http { path: raw.path },
        RawProbeKind::Https => ProbeKind::Https {
            tls: validate_tls(&raw, facts)?,
            path: raw.path,
        },
    };
    let spec = ProbeSpec {
        kind,
        interval: raw.interval,
        timeout: raw.timeout,
        rise,
        fall,
        jitter: raw.jitter,
    };
    let passive = PassiveSettings {
        enabled: raw.passive,
        threshold: passive_threshold,
    };
    Ok((spec, passive))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) struct FakeFacts;
    impl Facts for FakeFacts {
        fn interface_exists(&self, name: &str) -> bool {
            name == "eth0"
        }
        fn hostname(&self) -> Result<String, String> {
            Ok("node-a".to_owned())
        }
        /// Linux's default.
        fn ip_local_port_range(&self) -> Result<(u16, u16), String> {
            Ok((32_768, 60_999))
        }
    }

    /// A machine whose hostname cannot be read.
    pub(super) struct NoHostname;
    impl Facts for NoHostname {
        fn interface_exists(&self, name: &str) -> bool {
            FakeFacts.interface_exists(name)
        }
        fn hostname(&self) -> Result<String, String> {
            Err("cannot be read from /proc/sys/kernel/hostname: denied".to_owned())
        }
        fn ip_local_port_range(&self) -> Result<(u16, u16), String> {
            FakeFacts.ip_local_port_range()
        }
    }

    pub(super) const GOOD: &str = r#"
        [datapath]
        interfaces = ["eth0"]
        snat_ipv4 = "192.168.19.159"
        [[vip]]
        address = "192.168.19.200"
        [[backend]]
        address = "192.168.19.160:6443"
        [[backend]]
        address = "192.168.19.161:6443"
        weight = 2
        [health]
        kind = "tcp"
    "#;

    pub(super) fn check(text: &str) -> Result<Config, ConfigError> {
        check_on(text, &FakeFacts)
    }

    pub(super) fn check_on(text: &str, facts: &dyn Facts) -> Result<Config, ConfigError> {
        validate(parse_raw(text, Path::new("test.toml"))?, facts)
    }

    /// `GOOD` with its VIP elected through etcd, `[election.etcd]` holding `etcd`.
    pub(super) fn with_etcd(etcd: &str) -> String {
        GOOD.replacen(
            "address = \"192.168.19.200\"",
            "address = \"192.168.19.200\"\nelection = \"etcd\"",
            1,
        ) + "[election.etcd]\n"
            + etcd
    }

    /// `GOOD` with `from` replaced by `to`, which must be refused with a message
    /// containing every one of `want`.
    pub(super) fn refused(from: &str, to: &str, want: &[&str]) {
        assert!(GOOD.contains(from), "test setup: {from:?} not in GOOD");
        let msg = check(&GOOD.replacen(from, to, 1))
            .expect_err("must be refused")
            .to_string();
        for w in want {
            assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
        }
    }

    /// Check an example file, a CA file and a sync key of the test's standing in for
    /// the ones it names.
    fn check_example(name: &str, text: &str) -> Config {
        let ca = std::env::temp_dir().join(format!("apilb-{name}-{}.crt", std::process::id()));
        std::fs::write(&ca, "not parsed here, only read").unwrap();
        let key = sync::tests::KeyFile::good(7);
        let c = check(
            &text
                .replace("/etc/kubernetes/pki/ca.crt", ca.to_str().unwrap())
                .replace("/etc/apilb/sync.key", key.0.to_str().unwrap()),
        );
        std::fs::remove_file(&ca).unwrap();
        c.unwrap_or_else(|e| panic!("examples/{name}: {e}"))
    }

    #[test]
    fn the_shipped_example_is_valid_once_its_ca_file_exists() {
        let c = check_example("apilb.toml", include_str!("../../examples/apilb.toml"));
        assert_eq!((c.vips.len(), c.backends.len()), (1, 3));
        let ProbeKind::Https { tls, .. } = &c.health.kind else {
            panic!("the example probes https: {:?}", c.health.kind);
        };
        assert_eq!(
            tls.server_name,
            Some(rustls::pki_types::ServerName::try_from("kubernetes").unwrap())
        );
    }

    #[test]
    fn the_election_examples_are_valid() {
        for (name, text) in [
            ("vrrp.toml", include_str!("../../examples/vrrp.toml")),
            ("etcd.toml", include_str!("../../examples/etcd.toml")),
            (
                "active-active.toml",
                include_str!("../../examples/active-active.toml"),
            ),
        ] {
            let c = check_example(name, text);
            assert!(
                c.vips.iter().all(|v| v.election != Election::Static),
                "{name}"
            );
            assert_eq!(c.sync.is_some(), name == "vrrp.toml", "{name}");
        }
    }

    #[test]
    fn the_node_local_example_is_valid() {
        let c = check_example("local.toml", include_str!("../../examples/local.toml"));
        assert!(c.local.enabled);
        assert_eq!(c.local.addresses, vec!["127.0.0.1:6443".parse().unwrap()]);
    }

    #[test]
    fn a_good_file_gets_its_values_and_defaults() {
        let c = check(GOOD).expect("valid");
        assert_eq!(c.vips[0].addr, "192.168.19.200:6443".parse().unwrap());
        assert_eq!((c.backends.len(), c.backends[1].weight), (2, 2));
        let d = &c.datapath;
        assert_eq!(d.maglev_size, 65_537);
        assert_eq!(d.snat_v4, vec![Ipv4Addr::new(192, 168, 19, 159)]);
        assert!(d.snat_v6.is_empty());
        // Below the fake node's ephemeral range, 32768-60999.
        assert_eq!(d.nat_ports, 1024..=32_767);
        assert_eq!(
            (d.flow_table_size, d.half_open_table_size),
            (131_072, 32_768)
        );
        assert_eq!(
            d.tcp_timeouts.by_state_ms(),
            lb_common::ct::TIMEOUTS_DEFAULT_MS
        );
        assert_eq!(d.expected_connection_rate, 1000);
        assert_eq!(
            (
                c.health.interval,
                c.health.timeout,
                c.health.rise,
                c.health.fall
            ),
            (Duration::from_millis(500), Duration::from_millis(400), 2, 2)
        );
        assert_eq!(c.admin_listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(c.instance, "default");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        refused(
            "kind = \"tcp\"",
            "kind = \"tcp\"\nintervall = \"1s\"",
            &["unknown field", "intervall"],
        );
        refused(
            "[datapath]",
            "[datapath]\nxdp = 1",
            &["unknown field", "xdp"],
        );
    }

    #[test]
    fn malformed_addresses_and_port_zero_are_refused() {
        refused(
            "\"192.168.19.200\"",
            "\"192.168.19.300\"",
            &["vip[0].address", "192.168.19.300", "not an IP address"],
        );
        refused(
            "\"192.168.19.160:6443\"",
            "\"192.168.19.160\"",
            &["backend[0].address", "192.168.19.160", "address:port"],
        );
        refused(
            "\"192.168.19.160:6443\"",
            "\"192.168.19.160:0\"",
            &["backend[0].address", ":0", "1-65535"],
        );
        refused(
            "address = \"192.168.19.200\"",
            "address = \"192.168.19.200\"\nport = 0",
            &["vip[0].port = 0", "1-65535"],
        );
        refused(
            "\"192.168.19.159\"",
            "\"fe80::1\"",
            &["datapath.snat_ipv4", "fe80::1"],
        );
    }

    #[test]
    fn duplicates_and_missing_sections_are_refused() {
        refused(
            "\"192.168.19.161:6443\"",
            "\"192.168.19.160:6443\"",
            &["backend[1].address", "duplicate backend"],
        );
        let two_vips = GOOD.replacen(
            "[[backend]]",
            "[[vip]]\naddress = \"192.168.19.200\"\n[[backend]]",
            1,
        );
        let msg = check(&two_vips).expect_err("duplicate vip").to_string();
        assert!(
            msg.contains("vip[1].address") && msg.contains("duplicate VIP 192.168.19.200:6443"),
            "{msg}"
        );
        let no_backends: String =
            GOOD.split("[[backend]]").next().unwrap().to_owned() + "[health]\nkind = \"tcp\"\n";
        let msg = check(&no_backends).expect_err("no backends").to_string();
        assert!(
            msg.contains("backend = []") && msg.contains("at least one"),
            "{msg}"
        );
    }

    #[test]
    fn negative_weights_and_all_zero_weights_are_refused() {
        refused(
            "weight = 2",
            "weight = -1",
            &["backend[1].weight = -1", "0 (drained) or more"],
        );
        let all_zero = GOOD.replacen("weight = 2", "weight = 0", 1).replacen(
            "address = \"192.168.19.160:6443\"",
            "address = \"192.168.19.160:6443\"\nweight = 0",
            1,
        );
        let msg = check(&all_zero).expect_err("all zero").to_string();
        assert!(
            msg.contains("weight") && msg.contains("no backend could take a flow"),
            "{msg}"
        );
        // One drained backend among live ones is fine.
        check(&GOOD.replacen("weight = 2", "weight = 0", 1)).expect("one drained backend");
    }

    #[test]
    fn maglev_sizes_that_are_not_prime_or_too_small_are_refused() {
        refused(
            "[datapath]",
            "[datapath]\nmaglev_size = 65536",
            &["datapath.maglev_size = 65536", "prime"],
        );
        refused(
            "[datapath]",
            "[datapath]\nmaglev_size = 199",
            &["datapath.maglev_size = 199", "100 x 2 backends = 200"],
        );
        check(&GOOD.replacen("[datapath]", "[datapath]\nmaglev_size = 211", 1))
            .expect("211 > 200 and prime");
    }

    #[test]
    fn a_missing_interface_and_an_unreadable_ca_file_are_refused() {
        refused(
            "[\"eth0\"]",
            "[\"eth9\"]",
            &["datapath.interfaces[0] = \"eth9\"", "no such interface"],
        );
        refused(
            "kind = \"tcp\"",
            "ca_file = \"/nonexistent/ca.crt\"",
            &["health.ca_file = /nonexistent/ca.crt", "cannot be read"],
        );
    }

    #[test]
    fn https_probes_need_a_ca_file_or_an_explicit_insecure() {
        refused(
            "kind = \"tcp\"",
            "kind = \"https\"",
            &["health.ca_file = (unset)", "insecure = true"],
        );
        check(&GOOD.replacen("kind = \"tcp\"", "kind = \"https\"\ninsecure = true", 1))
            .expect("explicitly insecure");
    }

    #[test]
    fn a_vip_needs_a_backend_of_its_family() {
        let text = GOOD
            .replacen("\"192.168.19.200\"", "\"fd00::200\"", 1)
            .replacen(
                "snat_ipv4 = \"192.168.19.159\"",
                "snat_ipv4 = \"192.168.19.159\"\nsnat_ipv6 = \"fd00::1\"",
                1,
            );
        let msg = check(&text).expect_err("no IPv6 backend").to_string();
        assert_eq!(
            msg,
            "vip[0].address = fd00::200: no [[backend]] of its address family"
        );
    }

    #[test]
    fn tls_settings_need_https_and_a_vip_needs_a_snat_address_of_its_family() {
        refused(
            "kind = \"tcp\"",
            "kind = \"tcp\"\ninsecure = true",
            &["health.kind = tcp", "kind = \"https\""],
        );
        refused(
            "snat_ipv4 = \"192.168.19.159\"",
            "",
            &["datapath.snat_ipv4 = (unset)", "vip[0] 192.168.19.200:6443"],
        );
    }

    #[test]
    fn vrrp_vips_get_their_vrid_priority_and_the_section_defaults() {
        let c = check(&GOOD.replacen(
            "address = \"192.168.19.200\"",
            "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 51\npriority = 150",
            1,
        ))
        .expect("valid");
        assert_eq!(
            c.vips[0].election,
            Election::Vrrp {
                vrid: 51,
                priority: 150
            }
        );
        let e = &c.election;
        assert_eq!((e.interface.as_str(), e.announce_count), ("eth0", 3));
        assert_eq!(
            (e.vrrp.version, e.vrrp.advert_interval, e.vrrp.preempt),
            (3, Duration::from_secs(1), true)
        );
        assert_eq!((e.vrrp.track_weight, e.etcd.is_none()), (-50, true));
    }

    #[test]
    fn election_errors_name_the_key_and_value() {
        let vip = "address = \"192.168.19.200\"";
        let vrrp = |extra: &str| format!("{vip}\nelection = \"vrrp\"\n{extra}");
        refused(vip, &vrrp(""), &["vip[0].vrid = (unset)"]);
        refused(vip, &vrrp("vrid = 0"), &["vip[0].vrid = 0", "1-255"]);
        refused(
            vip,
            &vrrp("vrid = 1\npriority = 255"),
            &["vip[0].priority = 255"],
        );
        refused(
            vip,
            &format!("{vip}\nvrid = 3"),
            &["vip[0].vrid = 3", "only for election"],
        );
        refused(
            vip,
            &format!("{vip}\nelection = \"raft\""),
            &["vip[0].election = \"raft\""],
        );
        refused(
            vip,
            &format!("{vip}\nelection = \"etcd\""),
            &["election.etcd = (missing)"],
        );
        let with = |section: &str| format!("{}\n{section}", vrrp("vrid = 1"));
        refused(
            vip,
            &with("[election.vrrp]\nversion = 2\nadvert_interval = \"500ms\""),
            &["election.vrrp.advert_interval = 500ms", "whole seconds"],
        );
        refused(
            vip,
            &with("[election.vrrp]\nadvert_interval = \"15ms\""),
            &["election.vrrp.advert_interval = 15ms", "centiseconds"],
        );
        refused(
            vip,
            &with("[election.vrrp]\nauth_pass = \"secret\""),
            &["election.vrrp.auth_pass", "only VRRPv2"],
        );
        refused(
            vip,
            &with("[election.vrrp]\nversion = 2\nauth_pass = \"123456789\""),
            &["election.vrrp.auth_pass = (9 bytes)"],
        );
        refused(
            vip,
            &with("[election.vrrp]\nunicast_peers = [\"fd00::2\"]"),
            &[
                "election.vrrp.unicast_peers[0] = \"fd00::2\"",
                "no VRRP VIP is of this address family",
            ],
        );
        refused(
            vip,
            &with("[election]\ninterface = \"eth9\""),
            &["election.interface = \"eth9\"", "no such interface"],
        );
        refused(
            vip,
            &with("[election.vrrp]\ntrack_weight = 10"),
            &["election.vrrp.track_weight = 10"],
        );
        refused(
            vip,
            &format!("{}\n[[vip]]\n{vip}\nport = 443", vrrp("vrid = 1")),
            &["vip[1].address = \"192.168.19.200\"", "must be its own"],
        );
    }

    #[test]
    fn a_bare_number_for_any_duration_key_gets_its_key_and_the_text_to_write() {
        let vrrp_vip = GOOD.replacen(
            "address = \"192.168.19.200\"",
            "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 1",
            1,
        );
        let appended = |table: &str| format!("{vrrp_vip}\n{table}\n");
        let cases = [
            (
                "[election.vrrp]\nadvert_interval = 1",
                "election.vrrp.advert_interval",
            ),
            (
                "[election.vrrp]\npreempt_delay = 30",
                "election.vrrp.preempt_delay",
            ),
            (
                "[election]\nannounce_interval = 1",
                "election.announce_interval",
            ),
            (
                "[election.etcd]\nendpoints = []\nlease_ttl = 1",
                "election.etcd.lease_ttl",
            ),
            (
                "[election.etcd]\nendpoints = []\ndial_timeout = 1",
                "election.etcd.dial_timeout",
            ),
            ("[sync]\nresync_interval = 1", "sync.resync_interval"),
            ("[sync]\nflush_timeout = 1", "sync.flush_timeout"),
            (
                "[datapath.tcp_timeouts]\nestablished = 1",
                "datapath.tcp_timeouts.established",
            ),
            // [health] is GOOD's last table.
            ("interval = 1", "health.interval"),
            ("timeout = 1", "health.timeout"),
        ];
        let mut texts: Vec<(String, &str)> = cases
            .iter()
            .map(|&(table, key)| (appended(table), key))
            .collect();
        texts.push((
            vrrp_vip.replacen(
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\nnexthop_ttl = 1",
                1,
            ),
            "datapath.nexthop_ttl",
        ));
        for (text, key) in &texts {
            let msg = check(text).expect_err("a bare number").to_string();
            let value = if key.ends_with("preempt_delay") {
                "30"
            } else {
                "1"
            };
            for want in [
                format!("key {key}:"),
                format!("{value} is a bare number, but this key is a duration"),
                format!("\"{value}s\" if seconds"),
            ] {
                assert!(msg.contains(&want), "{key}: {msg:?} lacks {want:?}");
            }
        }
        eprintln!("{}", check(&texts[0].0).expect_err("bare"));
        let msg = check(&appended("[election.vrrp]\nadvert_interval = 0.5"))
            .expect_err("a decimal")
            .to_string();
        assert!(msg.contains("\"1s 500ms\""), "{msg}");
        let msg = check(&appended(
            "[election.vrrp]\nadvert_interval = \"one second\"",
        ))
        .expect_err("no such unit")
        .to_string();
        assert!(
            msg.contains("\"one second\" is not a duration") && msg.contains("\"500ms\""),
            "{msg}"
        );
        // An array's index is part of the key.
        let msg = check(&GOOD.replacen("weight = 2", "weight = \"2\"", 1))
            .expect_err("a quoted weight")
            .to_string();
        assert!(msg.contains("key backend[1].weight:"), "{msg}");
    }

    #[test]
    fn keepalived_passwords_are_taken_unquoted_and_a_long_one_gets_its_first_8_bytes() {
        let vrrp = |auth: &str| {
            GOOD.replacen(
                "address = \"192.168.19.200\"",
                &format!(
                    "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 1\n\
                     [election.vrrp]\nversion = 2\n{auth}"
                ),
                1,
            )
        };
        let c = check(&vrrp("auth_pass = 123456")).expect("digits, unquoted");
        assert_eq!(c.election.vrrp.auth_pass.as_deref(), Some("123456"));
        let msg = check(&vrrp("auth_pass = \"k8s-vip-pass\""))
            .expect_err("12 bytes")
            .to_string();
        eprintln!("{msg}");
        assert!(
            msg.starts_with("election.vrrp.auth_pass = (12 bytes): ")
                && msg.ends_with("write auth_pass = \"k8s-vip-\""),
            "{msg}"
        );
        let msg = check(&vrrp("auth_pass = 123456789"))
            .expect_err("9 digits")
            .to_string();
        assert!(msg.ends_with("write auth_pass = \"12345678\""), "{msg}");
        let msg = check(&vrrp("auth_pass = \"1234567\u{e9}\""))
            .expect_err("the 8th byte inside a character")
            .to_string();
        assert!(msg.contains("choose a password of 1-8 bytes"), "{msg}");
        let msg = check(&vrrp("auth_pass = true"))
            .expect_err("not a password")
            .to_string();
        assert!(
            msg.contains("key election.vrrp.auth_pass:") && msg.contains("quoted"),
            "{msg}"
        );
    }

    #[test]
    fn a_toml_error_is_said_once() {
        let err = check("[datapath\n").expect_err("not TOML");
        let full = format!("{:#}", anyhow_like(&err));
        assert_eq!(
            full.matches("TOML parse error at line 1, column 10")
                .count(),
            1,
            "the TOML error once, with its source chain: {full}"
        );
    }

    /// The message and every source under it, as `anyhow`'s `{:#}` prints them.
    fn anyhow_like(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            out = format!("{out}: {s}");
            source = s.source();
        }
        out
    }

    #[test]
    fn etcd_settings_come_out_checked_and_ready_to_run() {
        let c = check(&with_etcd(
            "endpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"/ca.pem\"\n\
             cert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
        ))
        .expect("valid");
        let etcd = c.election.etcd.expect("etcd settings");
        assert_eq!(etcd.node, "node-a", "the hostname, by default");
        assert_eq!(
            etcd.tls,
            Some(crate::election::etcd::EtcdTls {
                ca_file: "/ca.pem".into(),
                client_cert: Some(("/c.pem".into(), "/k.pem".into())),
            })
        );
    }

    #[test]
    fn an_etcd_client_certificate_without_a_ca_file_is_refused_not_dropped() {
        let msg = check(&with_etcd(
            "endpoints = [\"https://10.0.0.1:2379\"]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
        ))
        .expect_err("a client certificate without TLS")
        .to_string();
        assert!(
            msg.starts_with("election.etcd.ca_file = (unset): election.etcd.cert_file /c.pem"),
            "{msg}"
        );
    }

    #[test]
    fn an_unreadable_hostname_fails_the_check_not_the_run() {
        let text = with_etcd("endpoints = [\"http://10.0.0.1:2379\"]\n");
        let msg = check_on(&text, &NoHostname)
            .expect_err("no node name")
            .to_string();
        assert!(
            msg.starts_with("election.etcd.node = (unset): defaults to this node's hostname")
                && msg.contains("denied")
                && msg.ends_with("; set it"),
            "{msg}"
        );
        // Naming the node needs no hostname.
        check_on(
            &with_etcd("endpoints = [\"http://10.0.0.1:2379\"]\nnode = \"lb1\"\n"),
            &NoHostname,
        )
        .expect("node given");
    }

    #[test]
    fn etcd_endpoints_and_lease_are_checked_by_apilb_check() {
        for (etcd, want) in [
            (
                "endpoints = [\"ftp://etcd:2379\"]\n",
                "election.etcd.endpoints[0] = \"ftp://etcd:2379\": only http:// and https://",
            ),
            (
                "endpoints = [\"https://a:2379\", \"http://b:2379\"]\nca_file = \"/ca.pem\"\n",
                "election.etcd.endpoints[1] = \"http://b:2379\": http:// with TLS settings",
            ),
            (
                "endpoints = [\" \"]\n",
                "election.etcd.endpoints[0] = \" \": expected host:port",
            ),
            (
                "endpoints = [\"http://a:2379\"]\nlease_ttl = \"1s\"\n",
                "election.etcd.lease_ttl = 1s: must be at least 2s",
            ),
        ] {
            let msg = check(&with_etcd(etcd)).expect_err(etcd).to_string();
            assert!(msg.starts_with(want), "{etcd}: {msg}");
        }
    }

    #[test]
    fn probe_paths_and_server_names_are_checked_by_apilb_check() {
        refused(
            "kind = \"tcp\"",
            "kind = \"https\"\ninsecure = true\nserver_name = \"not a name\"",
            &[
                "health.server_name = \"not a name\"",
                "not a valid DNS name",
            ],
        );
        refused(
            "kind = \"tcp\"",
            "kind = \"http\"\npath = \"/ready z\"",
            &["health.path = \"/ready z\"", "URL path"],
        );
    }

    #[test]
    fn a_reload_applies_weights_and_health_but_not_interfaces_or_elections() {
        let old = check(GOOD).expect("valid");
        let weights = check(&GOOD.replacen("weight = 2", "weight = 3", 1)).expect("valid");
        assert_eq!(old.restart_needed(&weights), None);
        let health =
            check(&GOOD.replacen("kind = \"tcp\"", "kind = \"tcp\"\nrise = 3", 1)).expect("valid");
        assert_eq!(old.restart_needed(&health), None);
        let ports =
            check(&GOOD.replacen("[datapath]", "[datapath]\nnat_ports = [30000, 30999]", 1))
                .expect("valid");
        assert_eq!(old.restart_needed(&ports), Some("datapath.nat_ports"));
        let vrrp = check(&GOOD.replacen(
            "address = \"192.168.19.200\"",
            "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 5",
            1,
        ))
        .expect("valid");
        assert_eq!(
            old.restart_needed(&vrrp),
            Some("an elected vip (its address, election or vrid)")
        );
    }

    #[test]
    fn a_reload_applies_vrrp_priority_track_weight_and_preempt_and_names_other_election_keys() {
        let vrrp = |vip: &str, section: &str| {
            check(&GOOD.replacen(
                "address = \"192.168.19.200\"",
                &format!(
                    "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 5\n{vip}\n\
                     [election.vrrp]\n{section}"
                ),
                1,
            ))
            .expect("valid")
        };
        let old = vrrp("priority = 100", "");
        let tuned = vrrp(
            "priority = 200",
            "track_weight = -120\npreempt = false\npreempt_delay = \"30s\"",
        );
        assert_eq!(old.restart_needed(&tuned), None);
        assert_eq!(tuned.restart_needed(&old), None);
        for (vip, section, key) in [
            (
                "vrid = 6",
                "",
                "an elected vip (its address, election or vrid)",
            ),
            (
                "",
                "advert_interval = \"2s\"",
                "election.vrrp.advert_interval",
            ),
            (
                "",
                "unicast_peers = [\"192.168.19.9\"]",
                "election.vrrp.unicast_peers",
            ),
            ("", "version = 2\nauth_pass = 1234", "election.vrrp.version"),
            ("", "source = \"192.168.19.159\"", "election.vrrp.source"),
        ] {
            let new = if vip.is_empty() {
                vrrp("priority = 100", section)
            } else {
                check(&GOOD.replacen(
                    "address = \"192.168.19.200\"",
                    &format!("address = \"192.168.19.200\"\nelection = \"vrrp\"\n{vip}"),
                    1,
                ))
                .expect("valid")
            };
            assert_eq!(old.restart_needed(&new), Some(key), "{vip} {section}");
        }
    }

    /// A node whose `ip_local_port_range` is `range` (or cannot be read).
    struct PortRange(Result<(u16, u16), &'static str>);
    impl Facts for PortRange {
        fn interface_exists(&self, name: &str) -> bool {
            FakeFacts.interface_exists(name)
        }
        fn hostname(&self) -> Result<String, String> {
            FakeFacts.hostname()
        }
        fn ip_local_port_range(&self) -> Result<(u16, u16), String> {
            self.0.map_err(str::to_owned)
        }
    }

    /// `GOOD` with `[datapath.tcp_timeouts]` holding `body`.
    pub(super) fn with_timeouts(body: &str) -> String {
        format!("{GOOD}\n[datapath.tcp_timeouts]\n{body}\n")
    }

    #[test]
    fn a_snat_key_takes_one_address_or_a_pool_of_up_to_four() {
        let c = check(&GOOD.replacen(
            "snat_ipv4 = \"192.168.19.159\"",
            "snat_ipv4 = [\"192.168.19.159\", \"192.168.19.158\"]\n\
             snat_ipv6 = [\"fd00::1\", \"fd00::2\", \"fd00::3\", \"fd00::4\"]",
            1,
        ))
        .expect("valid pools");
        assert_eq!(
            c.datapath.snat_v4,
            vec![
                Ipv4Addr::new(192, 168, 19, 159),
                Ipv4Addr::new(192, 168, 19, 158)
            ]
        );
        assert_eq!(c.datapath.snat_v6.len(), 4);
        assert_eq!(
            c.datapath.snat_v6[3],
            "fd00::4".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn bad_snat_pools_are_refused_by_entry_and_value() {
        let snat = "snat_ipv4 = \"192.168.19.159\"";
        for (to, want) in [
            (
                "snat_ipv4 = [\"10.0.0.1\", \"10.0.0.2\", \"10.0.0.3\", \"10.0.0.4\", \"10.0.0.5\"]",
                "datapath.snat_ipv4 = [\"10.0.0.1\", \"10.0.0.2\", \"10.0.0.3\", \"10.0.0.4\", \
                 \"10.0.0.5\"]: at most 4 addresses",
            ),
            (
                "snat_ipv4 = [\"10.0.0.1\", \"10.0.0.1\"]",
                "datapath.snat_ipv4[1] = \"10.0.0.1\": listed twice",
            ),
            (
                "snat_ipv4 = [\"10.0.0.1\", \"fd00::1\"]",
                "datapath.snat_ipv4[1] = \"fd00::1\": not an IPv4 address",
            ),
            (
                "snat_ipv4 = \"10.0.0.1\"\nsnat_ipv6 = [\"10.0.0.2\"]",
                "datapath.snat_ipv6[0] = \"10.0.0.2\": not an IPv6 address",
            ),
            (
                "snat_ipv4 = \"192.168.19.200\"",
                "datapath.snat_ipv4 = \"192.168.19.200\": is the address of vip[0]",
            ),
            (
                "snat_ipv4 = [\"10.0.0.1\", \"0.0.0.0\"]",
                "datapath.snat_ipv4[1] = \"0.0.0.0\": must be a unicast address",
            ),
            (
                "snat_ipv4 = \"10.0.0.1\"\nsnat_ipv6 = \"ff02::1\"",
                "datapath.snat_ipv6 = \"ff02::1\": must be a unicast address",
            ),
            (
                "snat_ipv4 = []",
                "datapath.snat_ipv4 = []: vip[0] 192.168.19.200:6443 has snat = \"node\" and needs a NAT source \
                 address of its family",
            ),
        ] {
            let msg = check(&GOOD.replacen(snat, to, 1))
                .expect_err(to)
                .to_string();
            assert!(msg.starts_with(want), "{to}: {msg}");
        }
        refused(
            snat,
            "snat_ipv4 = 5",
            &["snat_ipv4", "an address, or a list of up to 4 addresses"],
        );
    }

    #[test]
    fn nat_ports_default_to_what_lies_below_the_nodes_ephemeral_range() {
        let on = |range| check_on(GOOD, &PortRange(range)).map(|c| c.datapath.nat_ports);
        assert_eq!(on(Ok((32_768, 60_999))).unwrap(), 1024..=32_767);
        assert_eq!(on(Ok((10_000, 20_000))).unwrap(), 1024..=9_999);
        // 1024 ports is the least the default may hold.
        assert_eq!(on(Ok((2048, 60_999))).unwrap(), 1024..=2047);
        for (range, ports) in [((2047, 60_999), 1023), ((1024, 65_535), 0), ((1, 2), 0)] {
            let msg = on(Ok(range)).expect_err("too few").to_string();
            assert_eq!(
                msg,
                format!(
                    "datapath.nat_ports = (unset): the default, 1024 up to below \
                     net.ipv4.ip_local_port_range ({}-{}), would hold {ports} ports, fewer \
                     than 1024: set datapath.nat_ports explicitly",
                    range.0, range.1
                )
            );
        }
        let msg = on(Err(
            "cannot be read from /proc/sys/net/ipv4/ip_local_port_range: denied",
        ))
        .expect_err("unreadable")
        .to_string();
        assert!(
            msg.starts_with("datapath.nat_ports = (unset): defaults to 1024 up to below")
                && msg.contains("denied")
                && msg.ends_with("set datapath.nat_ports explicitly"),
            "{msg}"
        );
        // An explicit range needs nothing of the node.
        let explicit = GOOD.replacen("[datapath]", "[datapath]\nnat_ports = [1500, 1600]", 1);
        let c = check_on(&explicit, &PortRange(Err("denied"))).expect("explicit");
        assert_eq!(c.datapath.nat_ports, 1500..=1600);
    }

    #[test]
    fn a_nat_slice_is_a_contiguous_part_of_the_range_and_bad_ones_are_named() {
        let with = |slice: &str| {
            check(&GOOD.replacen(
                "[datapath]",
                &format!("[datapath]\nnat_ports = [1024, 32767]\nnat_slice = {slice}"),
                1,
            ))
        };
        let d = check(GOOD).expect("default").datapath;
        assert_eq!(
            d.nat_slice.of(&d.nat_ports),
            d.nat_ports,
            "unset: the whole range"
        );
        let halves: Vec<_> = ["[0, 2]", "[1, 2]"]
            .iter()
            .map(|s| {
                let d = with(s).expect(s).datapath;
                d.nat_slice.of(&d.nat_ports)
            })
            .collect();
        assert_eq!(halves, [1024..=16_895, 16_896..=32_767]);
        // Three slices tile the range with nothing left over or shared.
        let thirds: Vec<_> = (0..3)
            .map(|i| NatSlice { index: i, count: 3 }.of(&(1024..=32_767)))
            .collect();
        assert_eq!(thirds, [1024..=11_604, 11_605..=22_185, 22_186..=32_767]);
        for (slice, expected) in [
            (
                "[2, 2]",
                "datapath.nat_slice = [2, 2]: index must be 0-1 (below count)",
            ),
            ("[0, 0]", "datapath.nat_slice = [0, 0]: count must be 1-64"),
            ("[0]", "datapath.nat_slice = [0]: write [index, count]"),
            ("[-1, 2]", "datapath.nat_slice = [-1, 2]: index must be 0-1"),
        ] {
            let e = with(slice).expect_err(slice).to_string();
            assert!(e.starts_with(expected), "{slice}: {e}");
        }
        let narrow = check(&GOOD.replacen(
            "[datapath]",
            "[datapath]\nnat_ports = [2000, 2100]\nnat_slice = [0, 2]",
            1,
        ))
        .expect_err("slices too small")
        .to_string();
        assert!(
            narrow.contains("each of 2 slices of datapath.nat_ports [2000, 2100] would hold 50 ports, fewer than 64"),
            "{narrow}"
        );
    }

    #[test]
    fn nat_ports_in_the_ephemeral_range_are_accepted_with_a_warning() {
        let ports = |range: &str| {
            check(&GOOD.replacen("[datapath]", &format!("[datapath]\nnat_ports = {range}"), 1))
                .expect("accepted")
        };
        let warnings = ports("[30000, 40999]").node_warnings_on(&FakeFacts);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with(
                "datapath.nat_ports = [30000, 40999] overlaps net.ipv4.ip_local_port_range \
                 (32768-60999) in 32768-40999: the node's own connections"
            ),
            "{warnings:?}"
        );
        assert!(
            ports("[20000, 32767]")
                .node_warnings_on(&FakeFacts)
                .is_empty()
        );
        assert!(check(GOOD).unwrap().node_warnings_on(&FakeFacts).is_empty());
        refused(
            "[datapath]",
            "[datapath]\nnat_ports = [40000]",
            &["datapath.nat_ports = [40000]: write [lowest, highest]"],
        );
    }

    #[test]
    fn the_half_open_table_is_checked_like_the_flow_table_and_no_larger() {
        let c = check(&GOOD.replacen("[datapath]", "[datapath]\nflow_table_size = 4096", 1))
            .expect("valid");
        assert_eq!(
            c.datapath.half_open_table_size, 4096,
            "by default no larger than the flow table"
        );
        let c = check(&GOOD.replacen("[datapath]", "[datapath]\nhalf_open_table_size = 1024", 1))
            .expect("valid");
        assert_eq!(c.datapath.half_open_table_size, 1024);
        refused(
            "[datapath]",
            "[datapath]\nhalf_open_table_size = 1000",
            &["datapath.half_open_table_size = 1000: must be 1024-16777216"],
        );
        refused(
            "[datapath]",
            "[datapath]\nhalf_open_table_size = 262144",
            &["datapath.half_open_table_size = 262144: must not exceed \
                 datapath.flow_table_size (131072)"],
        );
    }

    #[test]
    fn tcp_timeouts_are_read_by_state() {
        let c = check(&with_timeouts(
            "syn_sent = \"3s\"\nsyn_recv = \"4s\"\nestablished = \"2h\"\nfin_wait = \"30s\"\n\
             last_ack = \"5s\"\ntime_wait = \"61s\"\nclose = \"500ms\"",
        ))
        .expect("valid");
        let t = c.datapath.tcp_timeouts;
        assert_eq!(
            (t.syn_sent, t.close),
            (Duration::from_secs(3), Duration::from_millis(500))
        );
        assert_eq!(
            t.by_state_ms(),
            [0, 3_000, 4_000, 7_200_000, 30_000, 5_000, 61_000, 500]
        );
        // A key left out keeps its default.
        let c = check(&with_timeouts("close = \"1s\"")).expect("valid");
        let mut want = lb_common::ct::TIMEOUTS_DEFAULT_MS;
        want[lb_common::ct::CT_CLOSE as usize] = 1_000;
        assert_eq!(c.datapath.tcp_timeouts.by_state_ms(), want);
    }

    #[test]
    fn the_replaced_keys_are_refused_naming_their_replacement() {
        refused(
            "[datapath]",
            "[datapath]\nflow_close_grace = \"30s\"",
            &["datapath.flow_close_grace = \"30s\": replaced by datapath.tcp_timeouts.close"],
        );
        refused(
            "[datapath]",
            "[datapath]\nflow_idle_timeout = \"1h\"",
            &["datapath.flow_idle_timeout = \"1h\": replaced by \
                 datapath.tcp_timeouts.established"],
        );
    }

    #[test]
    fn the_expected_connection_rate_is_a_positive_rate() {
        let c = check(&GOOD.replacen(
            "[datapath]",
            "[datapath]\nexpected_connection_rate = 5000",
            1,
        ))
        .expect("valid");
        assert_eq!(c.datapath.expected_connection_rate, 5000);
        for bad in ["0", "-1", "4294967296"] {
            refused(
                "[datapath]",
                &format!("[datapath]\nexpected_connection_rate = {bad}"),
                &[&format!(
                    "datapath.expected_connection_rate = {bad}: must be 1 or more"
                )],
            );
        }
    }

    #[test]
    fn nat_pools_ports_and_table_sizes_take_a_restart_and_timeouts_apply_live() {
        let old = check(GOOD).expect("valid");
        let with = |from: &str, to: &str| check(&GOOD.replacen(from, to, 1)).expect("valid");
        let snat = "snat_ipv4 = \"192.168.19.159\"";
        assert_eq!(
            old.restart_needed(&with(
                snat,
                "snat_ipv4 = [\"192.168.19.159\", \"192.168.19.158\"]"
            )),
            Some("datapath.snat_ipv4/snat_ipv6")
        );
        assert_eq!(
            old.restart_needed(&with(
                "[datapath]",
                "[datapath]\nhalf_open_table_size = 4096"
            )),
            Some("datapath.half_open_table_size")
        );
        assert_eq!(
            old.restart_needed(&with("[datapath]", "[datapath]\nflow_table_size = 262144")),
            Some("datapath.flow_table_size")
        );
        let timeouts =
            check(&with_timeouts("established = \"30m\"\nclose = \"1s\"")).expect("valid");
        assert_eq!(old.restart_needed(&timeouts), None);
        assert_ne!(old.datapath.tcp_timeouts, timeouts.datapath.tcp_timeouts);
        let rate = with("[datapath]", "[datapath]\nexpected_connection_rate = 9000");
        assert_eq!(old.restart_needed(&rate), None);
    }
}
