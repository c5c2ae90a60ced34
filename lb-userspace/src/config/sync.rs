//! The `[sync]` section: which LB nodes this one streams its flows to and takes
//! theirs from (see `crate::sync`), and with which key.
//!
//! Sync is for elected VIPs, whose owner can change; a static VIP is held by every
//! node that lists it and its flows are never synced. Most of the checks are about
//! what the other nodes must agree on, as far as one node's file can tell: every
//! node claims NAT ports from a slice of its own, and an elected VIP's flows leave
//! from the VIP's own address, so that the masters' replies follow the VIP to the
//! node that takes it over.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ring::hmac;
use serde::Deserialize;

use super::{
    ConfigError, DatapathSettings, Election, ElectionSettings, Facts, VipSettings, VipSnat,
    invalid, socket_addr,
};
use crate::sync::{
    key::{self, Key, KeyError},
    links::PeerConfig,
    wire::{NAME_MAX, NodeName},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    /// Required; an `Option` so that its absence is refused by key, like the rest.
    listen: Option<String>,
    /// Unset: `election.etcd.node` if etcd is configured, else the hostname.
    node: Option<String>,
    key_file: Option<PathBuf>,
    #[serde(
        default = "default_resync_interval",
        deserialize_with = "super::timeouts::duration"
    )]
    resync_interval: Duration,
    #[serde(
        default = "default_flush_timeout",
        deserialize_with = "super::timeouts::duration"
    )]
    flush_timeout: Duration,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    address: Option<String>,
}

fn default_resync_interval() -> Duration {
    Duration::from_mins(10)
}
fn default_flush_timeout() -> Duration {
    Duration::from_millis(500)
}

/// The validated `[sync]` section: flow sync is on.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// Where this node listens for its peers; its connections to them leave from
    /// this address too, which is how they know it.
    pub listen: SocketAddr,
    /// This node's name in the handshake.
    pub node: NodeName,
    /// The shared key K, checked and read at load ([`key::read_key`]).
    pub key: Key,
    /// Where `key` was read from.
    pub key_file: PathBuf,
    /// At least one; none of them this node, by name or by address.
    pub peers: Vec<PeerConfig>,
    /// How often an owner sends each peer a bulk of its flows unasked.
    pub resync_interval: Duration,
    /// At SIGTERM and handover, how long to wait for the peers' ACKs.
    pub flush_timeout: Duration,
}

/// Two settings are equal if everything is, the key's bytes included, so that a
/// reload sees a key file rewritten in place.
impl PartialEq for SyncSettings {
    fn eq(&self, other: &Self) -> bool {
        self.first_change(other).is_none()
    }
}

/// Whether two keys are the same bytes, told by the tag each gives one message:
/// [`Key`] keeps its bytes to itself.
fn same_key(a: &Key, b: &Key) -> bool {
    let tag = |key: &Key| hmac::sign(key.hmac(), b"apilb config: the same sync key?");
    tag(a).as_ref() == tag(b).as_ref()
}

impl SyncSettings {
    /// The first key of `[sync]` that differs between `self` and `other`, for a
    /// reload's refusal; `None` if none does.
    pub(super) fn first_change(&self, other: &Self) -> Option<&'static str> {
        if self.listen != other.listen {
            Some("sync.listen")
        } else if self.node != other.node {
            Some("sync.node")
        } else if self.peers != other.peers {
            Some("sync.peer")
        } else if self.resync_interval != other.resync_interval {
            Some("sync.resync_interval")
        } else if self.flush_timeout != other.flush_timeout {
            Some("sync.flush_timeout")
        } else if self.key_file != other.key_file {
            Some("sync.key_file")
        } else if !same_key(&self.key, &other.key) {
            Some("sync.key_file (the key in it)")
        } else {
            None
        }
    }
}

/// Validate `[sync]` against the rest of the file, validated. The key file is read
/// last, so that a file with other faults is refused for them before anything is
/// read from disk.
pub(super) fn validate(
    raw: RawSync,
    vips: &[VipSettings],
    datapath: &DatapathSettings,
    election: &ElectionSettings,
    facts: &dyn Facts,
) -> Result<SyncSettings, ConfigError> {
    let listen = listen(raw.listen.as_deref())?;
    let node = node(raw.node.as_deref(), election, facts)?;
    let peers = peers(&raw.peer, listen, &node)?;
    slices(datapath, peers.len())?;
    elected_vips(vips)?;
    super::timeouts::sync(
        raw.resync_interval,
        raw.flush_timeout,
        datapath.tcp_timeouts.established,
    )?;
    let key_file = raw.key_file.ok_or_else(|| {
        invalid(
            "sync.key_file",
            "(unset)",
            "name the sync key file, the same on every node (head -c 32 /dev/urandom > \
             /etc/apilb/sync.key; chmod 600 /etc/apilb/sync.key)",
        )
    })?;
    let key = if facts.reads_files() {
        key::read_key(&key_file).map_err(|e| {
            invalid(
                "sync.key_file",
                format!("{:?}", key_file.display()),
                why(&e),
            )
        })?
    } else {
        facts.skipped(format!(
            "sync.key_file = {:?}: not read",
            key_file.display()
        ));
        // Never used: an offline config is only checked (`Config::load_offline`).
        key::Key::from_bytes(&[0; key::KEY_MIN_LEN])
    };
    Ok(SyncSettings {
        listen,
        node,
        key,
        key_file,
        peers,
        resync_interval: raw.resync_interval,
        flush_timeout: raw.flush_timeout,
    })
}

/// A key file's refusal, with the I/O error under it if there is one.
fn why(e: &KeyError) -> String {
    match e {
        KeyError::Read { source, .. } => format!("{e}: {source}"),
        _ => e.to_string(),
    }
}

/// An address a node can be known by: no wildcard, multicast or broadcast.
fn is_node_address(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST))
}

fn listen(raw: Option<&str>) -> Result<SocketAddr, ConfigError> {
    let key = "sync.listen";
    let text = raw.ok_or_else(|| {
        invalid(
            key,
            "(unset)",
            "say where this node listens for its sync peers, e.g. \"192.0.2.1:9465\"",
        )
    })?;
    let addr = socket_addr(key, text)?;
    if !is_node_address(addr.ip()) {
        return Err(invalid(
            key,
            format!("{text:?}"),
            "must be an address of this node: peers know this node by it, and its \
             connections to them leave from it",
        ));
    }
    Ok(addr)
}

/// `sync.node`, or its default: `election.etcd.node` if etcd is configured (which
/// is itself the hostname unless set), else the hostname.
fn node(
    raw: Option<&str>,
    election: &ElectionSettings,
    facts: &dyn Facts,
) -> Result<NodeName, ConfigError> {
    let key = "sync.node";
    if let Some(name) = raw {
        return node_name(key, name);
    }
    let (name, from) = match &election.etcd {
        Some(etcd) => (etcd.node.clone(), "election.etcd.node"),
        None => (
            facts.hostname().map_err(|reason| {
                invalid(
                    key,
                    "(unset)",
                    format!("defaults to this node's hostname, which {reason}; set it"),
                )
            })?,
            "this node's hostname",
        ),
    };
    NodeName::new(&name).map_err(|_| {
        invalid(
            key,
            "(unset)",
            format!(
                "defaults to {from}, {name:?}, which is {} bytes; a sync node name is 1-{NAME_MAX} \
                 bytes: set it",
                name.len()
            ),
        )
    })
}

fn node_name(key: &str, name: &str) -> Result<NodeName, ConfigError> {
    NodeName::new(name).map_err(|_| {
        invalid(
            key,
            format!("{name:?}"),
            format!("must be 1-{NAME_MAX} bytes ({} here)", name.len()),
        )
    })
}

/// `[[sync.peer]]`: at least one; names and addresses unique, neither this node's;
/// every address a node's, of `listen`'s family (connections to a peer leave from
/// `listen`'s address).
fn peers(
    raw: &[RawPeer],
    listen: SocketAddr,
    node: &NodeName,
) -> Result<Vec<PeerConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "sync.peer",
            "[]",
            "name at least one [[sync.peer]]: the other LB nodes of the elected VIPs",
        ));
    }
    let mut out: Vec<PeerConfig> = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let key = |k: &str| format!("sync.peer[{i}].{k}");
        let text = p
            .name
            .as_deref()
            .ok_or_else(|| invalid(key("name"), "(unset)", "name the peer, as its sync.node"))?;
        let name = node_name(&key("name"), text)?;
        if name == *node {
            return Err(invalid(
                key("name"),
                format!("{text:?}"),
                "is this node's own name (sync.node)",
            ));
        }
        if let Some(j) = out.iter().position(|o| o.name == name) {
            return Err(invalid(
                key("name"),
                format!("{text:?}"),
                format!("sync.peer[{j}] has the same name"),
            ));
        }
        let text = p.address.as_deref().ok_or_else(|| {
            invalid(
                key("address"),
                "(unset)",
                "say where the peer listens: its sync.listen",
            )
        })?;
        let addr = socket_addr(&key("address"), text)?;
        let refuse = |why: String| invalid(key("address"), format!("{text:?}"), why);
        if !is_node_address(addr.ip()) {
            return Err(refuse(
                "must be an address of the peer, which it listens on".to_owned(),
            ));
        }
        if addr == listen {
            return Err(refuse("is this node's own sync.listen".to_owned()));
        }
        if addr.is_ipv4() != listen.is_ipv4() {
            return Err(refuse(format!(
                "is not of the address family of sync.listen ({listen}), which this \
                 node's connections to it leave from"
            )));
        }
        if let Some(j) = out.iter().position(|o| o.addr == addr) {
            return Err(refuse(format!("sync.peer[{j}] has the same address")));
        }
        out.push(PeerConfig { name, addr });
    }
    Ok(out)
}

/// Every node, this one and each peer, claims NAT ports from a slice of its own.
fn slices(datapath: &DatapathSettings, peers: usize) -> Result<(), ConfigError> {
    let slice = datapath.nat_slice;
    let nodes = peers + 1;
    if usize::from(slice.count) >= nodes {
        return Ok(());
    }
    Err(invalid(
        "datapath.nat_slice",
        format!("[{}, {}]", slice.index, slice.count),
        format!(
            "[sync] makes {nodes} nodes ({peers} peer(s) and this one), and each claims \
             NAT ports from a slice of its own, so that two owners of a VIP never hand \
             out the same port: set [index, count] with count at least {nodes} and a \
             different index on each node"
        ),
    ))
}

/// Sync is for elected VIPs, and each of them must take its flows' source from its
/// own address.
fn elected_vips(vips: &[VipSettings]) -> Result<(), ConfigError> {
    if vips.iter().all(|v| v.election == Election::Static) {
        return Err(invalid(
            "sync",
            "(set)",
            "every [[vip]] is static, and static VIPs are not synced (every node that \
             lists one holds it); sync is for VIPs with election = \"vrrp\" or \"etcd\"",
        ));
    }
    for (i, v) in vips.iter().enumerate() {
        if v.election != Election::Static && v.snat == VipSnat::Node {
            return Err(invalid(
                format!("vip[{i}].snat"),
                "\"node\"",
                "an elected VIP's flows must leave from the VIP's own address (snat = \
                 \"vip\") with [sync] on: from this node's datapath.snat_ipv4/snat_ipv6, \
                 the masters' replies to them would not follow the VIP to the node that \
                 takes it over",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        fs,
        os::unix::fs::PermissionsExt,
        path::{Path, PathBuf},
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use super::super::{
        Config, ConfigError,
        tests::{FakeFacts, GOOD, NoHostname, check, check_on},
    };
    use super::*;

    /// A sync key file in the temp dir, removed on drop.
    pub(in crate::config) struct KeyFile(pub PathBuf);

    impl KeyFile {
        pub(in crate::config) fn new(bytes: &[u8], mode: u32) -> KeyFile {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "apilb-config-sync-key-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            KeyFile(path)
        }

        /// 32 bytes of `byte`, mode 0600.
        pub(in crate::config) fn good(byte: u8) -> KeyFile {
            KeyFile::new(&[byte; 32], 0o600)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for KeyFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    /// Where `SYNC` and `text` name the key file; `with_key` puts a real one there.
    const KEY: &str = "@KEY@";

    /// A `[sync]` body with one peer, its key file at [`KEY`].
    const SYNC: &str = "listen = \"192.168.19.158:9465\"\nnode = \"lb1\"\nkey_file = \"@KEY@\"\n\
                        [[sync.peer]]\nname = \"lb2\"\naddress = \"192.168.19.157:9465\"\n";

    /// `GOOD` with its VIP elected by VRRP, two NAT slices, and `[sync]` holding
    /// `sync`.
    pub(in crate::config) fn text(sync: &str) -> String {
        GOOD.replacen(
            "address = \"192.168.19.200\"",
            "address = \"192.168.19.200\"\nelection = \"vrrp\"\nvrid = 1",
            1,
        )
        .replacen("[datapath]", "[datapath]\nnat_slice = [0, 2]", 1)
            + "\n[sync]\n"
            + sync
    }

    /// `text` checked with `key` at [`KEY`].
    fn with_key(text: &str, key: &KeyFile) -> Result<Config, ConfigError> {
        check(&text.replace(KEY, key.path().to_str().unwrap()))
    }

    /// `text` checked with a good key file at [`KEY`].
    pub(in crate::config) fn sync_check(text: &str) -> Result<Config, ConfigError> {
        with_key(text, &KeyFile::good(7))
    }

    /// `text(SYNC)` with `from` replaced by `to`.
    pub(in crate::config) fn sync_with(from: &str, to: &str) -> String {
        assert!(SYNC.contains(from), "test setup: {from:?} not in SYNC");
        text(&SYNC.replacen(from, to, 1))
    }

    /// `text` is refused, the message starting with `want`.
    pub(in crate::config) fn sync_refused(text: &str, want: &str) {
        let msg = sync_check(text).expect_err(want).to_string();
        assert!(
            msg.starts_with(want),
            "{msg:?} does not start with {want:?}"
        );
    }

    #[test]
    fn without_a_sync_section_sync_is_off() {
        assert_eq!(check(GOOD).expect("valid").sync, None);
    }

    #[test]
    fn a_sync_section_gets_its_values_and_defaults() {
        let key = KeyFile::good(7);
        let c = with_key(&text(SYNC), &key).expect("valid");
        let s = c.sync.expect("sync on");
        assert_eq!(s.listen, "192.168.19.158:9465".parse().unwrap());
        assert_eq!(s.node.as_str(), "lb1");
        assert_eq!(s.key_file, key.0);
        assert_eq!(
            s.peers,
            vec![PeerConfig {
                name: NodeName::new("lb2").unwrap(),
                addr: "192.168.19.157:9465".parse().unwrap(),
            }]
        );
        assert_eq!(
            (s.resync_interval, s.flush_timeout),
            (Duration::from_mins(10), Duration::from_millis(500))
        );
        let s = sync_check(&sync_with(
            "node = \"lb1\"",
            "node = \"lb1\"\nresync_interval = \"5m\"\nflush_timeout = \"1s\"",
        ))
        .expect("valid")
        .sync
        .unwrap();
        assert_eq!(
            (s.resync_interval, s.flush_timeout),
            (Duration::from_mins(5), Duration::from_secs(1))
        );
    }

    #[test]
    fn three_nodes_with_three_slices_and_ipv6_peers_are_accepted() {
        let sync = "listen = \"[fd00::1]:9465\"\nnode = \"lb1\"\nkey_file = \"@KEY@\"\n\
                    [[sync.peer]]\nname = \"lb2\"\naddress = \"[fd00::2]:9465\"\n\
                    [[sync.peer]]\nname = \"lb3\"\naddress = \"[fd00::3]:9465\"\n";
        let c = sync_check(&text(sync).replacen("[0, 2]", "[2, 3]", 1)).expect("valid");
        let names: Vec<&str> = c
            .sync
            .as_ref()
            .unwrap()
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["lb2", "lb3"]);
        // A static VIP beside the elected one keeps its node SNAT and is not synced.
        let static_vip = text(SYNC).replacen(
            "[[backend]]",
            "[[vip]]\naddress = \"192.168.19.201\"\n[[backend]]",
            1,
        );
        let c = sync_check(&static_vip).expect("a static VIP beside");
        assert_eq!(c.vips[1].snat, VipSnat::Node);
    }

    #[test]
    fn the_node_name_defaults_to_election_etcd_node_then_the_hostname() {
        let unnamed = sync_with("node = \"lb1\"\n", "");
        let node = |c: Config| c.sync.unwrap().node.as_str().to_owned();
        assert_eq!(node(sync_check(&unnamed).expect("valid")), "node-a");
        let etcd = |node: &str| {
            unnamed.replacen("election = \"vrrp\"\nvrid = 1", "election = \"etcd\"", 1)
                + &format!("[election.etcd]\nendpoints = [\"http://10.0.0.1:2379\"]\n{node}\n")
        };
        assert_eq!(
            node(sync_check(&etcd("node = \"etcd-lb1\"")).expect("valid")),
            "etcd-lb1"
        );
        assert_eq!(node(sync_check(&etcd("")).expect("valid")), "node-a");
        sync_refused(
            &etcd(&format!("node = \"{}\"", "n".repeat(65))),
            &format!(
                "sync.node = (unset): defaults to election.etcd.node, \"{}\", which is 65 \
                 bytes; a sync node name is 1-64 bytes: set it",
                "n".repeat(65)
            ),
        );
        let key = KeyFile::good(7);
        let msg = check_on(
            &unnamed.replace(KEY, key.path().to_str().unwrap()),
            &NoHostname,
        )
        .expect_err("no hostname")
        .to_string();
        assert!(
            msg.starts_with("sync.node = (unset): defaults to this node's hostname, which cannot")
                && msg.ends_with("; set it"),
            "{msg}"
        );
        check_on(
            &text(SYNC).replace(KEY, key.path().to_str().unwrap()),
            &NoHostname,
        )
        .expect("a named node needs no hostname");
        check_on(
            &text(SYNC).replace(KEY, key.path().to_str().unwrap()),
            &FakeFacts,
        )
        .expect("valid");
    }

    #[test]
    fn bad_listen_and_peer_addresses_are_refused_by_key_and_value() {
        let listen = "listen = \"192.168.19.158:9465\"\n";
        let address = "address = \"192.168.19.157:9465\"\n";
        let second = |a: &str| {
            text(&format!(
                "{SYNC}[[sync.peer]]\nname = \"lb3\"\naddress = \"{a}\"\n"
            ))
            .replacen("[0, 2]", "[0, 3]", 1)
        };
        for (text, want) in [
            (
                sync_with(listen, ""),
                "sync.listen = (unset): say where this node listens",
            ),
            (
                sync_with(listen, "listen = \"192.168.19.158\"\n"),
                "sync.listen = \"192.168.19.158\": not an address:port",
            ),
            (
                sync_with(listen, "listen = \"192.168.19.158:0\"\n"),
                "sync.listen = \"192.168.19.158:0\": a port must be 1-65535",
            ),
            (
                sync_with(listen, "listen = \"0.0.0.0:9465\"\n"),
                "sync.listen = \"0.0.0.0:9465\": must be an address of this node",
            ),
            (
                sync_with(address, ""),
                "sync.peer[0].address = (unset): say where the peer listens",
            ),
            (
                sync_with(address, "address = \"lb2:9465\"\n"),
                "sync.peer[0].address = \"lb2:9465\": not an address:port",
            ),
            (
                sync_with(address, "address = \"224.0.0.1:9465\"\n"),
                "sync.peer[0].address = \"224.0.0.1:9465\": must be an address of the peer",
            ),
            (
                sync_with(address, "address = \"192.168.19.158:9465\"\n"),
                "sync.peer[0].address = \"192.168.19.158:9465\": is this node's own sync.listen",
            ),
            (
                sync_with(address, "address = \"[fd00::2]:9465\"\n"),
                "sync.peer[0].address = \"[fd00::2]:9465\": is not of the address family of \
                 sync.listen (192.168.19.158:9465)",
            ),
            (
                second("192.168.19.157:9465"),
                "sync.peer[1].address = \"192.168.19.157:9465\": sync.peer[0] has the same address",
            ),
        ] {
            sync_refused(&text, want);
        }
        // Another port on a peer's address is another peer (nodes on one host).
        sync_check(&second("192.168.19.157:9466")).expect("same host, other port");
    }

    #[test]
    fn bad_node_and_peer_names_are_refused_by_key_and_value() {
        let long = "x".repeat(65);
        let second = |name: &str| {
            text(&format!(
                "{SYNC}[[sync.peer]]\nname = \"{name}\"\naddress = \"192.168.19.156:9465\"\n"
            ))
            .replacen("[0, 2]", "[0, 3]", 1)
        };
        for (text, want) in [
            (
                sync_with("node = \"lb1\"", "node = \"\""),
                "sync.node = \"\": must be 1-64 bytes (0 here)".to_owned(),
            ),
            (
                sync_with("node = \"lb1\"", &format!("node = \"{long}\"")),
                format!("sync.node = \"{long}\": must be 1-64 bytes (65 here)"),
            ),
            (
                sync_with("name = \"lb2\"\n", ""),
                "sync.peer[0].name = (unset): name the peer, as its sync.node".to_owned(),
            ),
            (
                sync_with("name = \"lb2\"", &format!("name = \"{long}\"")),
                format!("sync.peer[0].name = \"{long}\": must be 1-64 bytes (65 here)"),
            ),
            (
                sync_with("name = \"lb2\"", "name = \"lb1\""),
                "sync.peer[0].name = \"lb1\": is this node's own name (sync.node)".to_owned(),
            ),
            (
                second("lb2"),
                "sync.peer[1].name = \"lb2\": sync.peer[0] has the same name".to_owned(),
            ),
        ] {
            sync_refused(&text, &want);
        }
        // 64 bytes is the longest name.
        sync_check(&sync_with(
            "name = \"lb2\"",
            &format!("name = \"{}\"", &long[..64]),
        ))
        .expect("64 bytes");
    }

    #[test]
    fn a_sync_section_without_peers_is_refused() {
        let alone = "listen = \"192.168.19.158:9465\"\nnode = \"lb1\"\nkey_file = \"@KEY@\"\n";
        sync_refused(
            &text(alone),
            "sync.peer = []: name at least one [[sync.peer]]",
        );
    }

    #[test]
    fn every_node_needs_a_nat_slice_of_its_own() {
        sync_refused(
            &text(SYNC).replacen("[datapath]\nnat_slice = [0, 2]", "[datapath]", 1),
            "datapath.nat_slice = [0, 1]: [sync] makes 2 nodes (1 peer(s) and this one), and \
             each claims NAT ports from a slice of its own",
        );
        let three =
            format!("{SYNC}[[sync.peer]]\nname = \"lb3\"\naddress = \"192.168.19.156:9465\"\n");
        sync_refused(
            &text(&three),
            "datapath.nat_slice = [0, 2]: [sync] makes 3 nodes (2 peer(s) and this one)",
        );
        // More slices than nodes is fine: room for a node to come.
        sync_check(&text(SYNC).replacen("[0, 2]", "[1, 4]", 1)).expect("4 slices, 2 nodes");
    }

    #[test]
    fn an_elected_vip_must_take_the_vips_own_address_as_its_source() {
        sync_refused(
            &text(SYNC).replacen("vrid = 1", "vrid = 1\nsnat = \"node\"", 1),
            "vip[0].snat = \"node\": an elected VIP's flows must leave from the VIP's own \
             address (snat = \"vip\") with [sync] on: from this node's datapath.snat_ipv4/\
             snat_ipv6, the masters' replies to them would not follow the VIP",
        );
        sync_refused(
            &text(SYNC).replacen("\nelection = \"vrrp\"\nvrid = 1", "", 1),
            "sync = (set): every [[vip]] is static, and static VIPs are not synced",
        );
    }

    #[test]
    fn a_key_file_that_is_unset_unreadable_loose_or_short_is_refused() {
        sync_refused(
            &sync_with("key_file = \"@KEY@\"\n", ""),
            "sync.key_file = (unset): name the sync key file",
        );
        let missing = text(SYNC).replace(KEY, "/nonexistent/apilb-sync.key");
        let msg = check(&missing).expect_err("missing").to_string();
        assert!(
            msg.starts_with(
                "sync.key_file = \"/nonexistent/apilb-sync.key\": cannot read sync key file \
                 /nonexistent/apilb-sync.key: No such file or directory"
            ),
            "{msg}"
        );
        let loose = KeyFile::new(&[7; 32], 0o644);
        let msg = with_key(&text(SYNC), &loose).expect_err("0644").to_string();
        let path = loose.path().display();
        assert_eq!(
            msg,
            format!(
                "sync.key_file = \"{path}\": sync key file {path} has mode 0644, which lets \
                 group or others at the key; chmod 600 (or 400) it"
            )
        );
        let short = KeyFile::new(&[7; 31], 0o400);
        let msg = with_key(&text(SYNC), &short)
            .expect_err("31 bytes")
            .to_string();
        assert!(
            msg.contains("holds 31 bytes; a sync key needs at least 32"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_sync_keys_are_refused_by_name() {
        for (from, to, name) in [
            ("node = \"lb1\"", "nod = \"lb1\"", "nod"),
            ("name = \"lb2\"", "name = \"lb2\"\nport = 9465", "port"),
        ] {
            let msg = sync_check(&sync_with(from, to))
                .expect_err(name)
                .to_string();
            assert!(msg.contains("unknown field") && msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn any_change_to_sync_takes_a_restart_the_key_file_contents_included() {
        let key = KeyFile::good(7);
        let load = |text: &str| with_key(text, &key).expect("valid");
        let old = load(&text(SYNC));
        assert_eq!(old.restart_needed(&load(&text(SYNC))), None);
        let off = check(text(SYNC).split("\n[sync]\n").next().unwrap()).expect("valid");
        assert_eq!(old.restart_needed(&off), Some("sync"));
        assert_eq!(off.restart_needed(&old), Some("sync"));
        for (from, to, changed) in [
            (
                "listen = \"192.168.19.158:9465\"",
                "listen = \"192.168.19.158:9466\"",
                "sync.listen",
            ),
            ("node = \"lb1\"", "node = \"lb9\"", "sync.node"),
            (
                "address = \"192.168.19.157:9465\"",
                "address = \"192.168.19.157:9466\"",
                "sync.peer",
            ),
            (
                "node = \"lb1\"",
                "node = \"lb1\"\nresync_interval = \"5m\"",
                "sync.resync_interval",
            ),
            (
                "node = \"lb1\"",
                "node = \"lb1\"\nflush_timeout = \"1s\"",
                "sync.flush_timeout",
            ),
        ] {
            assert_eq!(
                old.restart_needed(&load(&sync_with(from, to))),
                Some(changed)
            );
        }
        let other_file = KeyFile::good(7);
        assert_eq!(
            old.restart_needed(&with_key(&text(SYNC), &other_file).unwrap()),
            Some("sync.key_file")
        );
        // The same file, rewritten with another key.
        fs::write(&key.0, [8; 32]).unwrap();
        assert_eq!(
            old.restart_needed(&load(&text(SYNC))),
            Some("sync.key_file (the key in it)")
        );
    }
}
