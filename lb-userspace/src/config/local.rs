//! The `[local]` section: node-local mode, where the node's own processes
//! connecting to a VIP are balanced in their `connect()` (see `crate::socklb`).

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::{ConfigError, VipSettings, invalid, socket_addr};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocal {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    addresses: Vec<String>,
    cgroup: Option<PathBuf>,
}

/// Node-local mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalSettings {
    pub enabled: bool,
    /// Extra addresses that mean the VIP to the node's processes (e.g.
    /// `127.0.0.1:6443`, for kubeconfigs that point at localhost): each is
    /// balanced like the first VIP of its address family.
    pub addresses: Vec<SocketAddr>,
    /// The cgroup-v2 directory the socket programs attach to; `None`: the root of
    /// the node's cgroup-v2 hierarchy, found (or mounted) at start.
    pub cgroup: Option<PathBuf>,
}

pub(super) fn validate(raw: RawLocal, vips: &[VipSettings]) -> Result<LocalSettings, ConfigError> {
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for (i, a) in raw.addresses.iter().enumerate() {
        let key = format!("local.addresses[{i}]");
        let addr = socket_addr(&key, a)?;
        if !raw.enabled {
            return Err(invalid(key, format!("{a:?}"), "needs local.enabled = true"));
        }
        if vips.iter().any(|v| v.addr == addr) || addresses.contains(&addr) {
            return Err(invalid(
                key,
                format!("{a:?}"),
                "already a VIP or listed before",
            ));
        }
        if !vips.iter().any(|v| v.addr.is_ipv4() == addr.is_ipv4()) {
            return Err(invalid(
                key,
                format!("{a:?}"),
                "no [[vip]] of its address family to stand for",
            ));
        }
        addresses.push(addr);
    }
    if let Some(path) = &raw.cgroup
        && !path.is_absolute()
    {
        return Err(invalid(
            "local.cgroup",
            format!("{:?}", path.display()),
            "not an absolute path",
        ));
    }
    Ok(LocalSettings {
        enabled: raw.enabled,
        addresses,
        cgroup: raw.cgroup,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(local: &str) -> Result<Config, String> {
        let text = format!(
            "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"10.0.0.1\"\n\
             [[vip]]\naddress = \"10.0.0.100\"\n[[backend]]\naddress = \"10.0.0.11:6443\"\n\
             [health]\nkind = \"tcp\"\n\
             [local]\n{local}\n"
        );
        Config::parse(&text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn local_addresses_are_checked_by_key_and_value() {
        let c = parse("enabled = true\naddresses = [\"127.0.0.1:6443\"]").expect("valid");
        assert_eq!(c.local.addresses, vec!["127.0.0.1:6443".parse().unwrap()]);
        for (local, error) in [
            (
                "addresses = [\"127.0.0.1:6443\"]",
                "local.addresses[0] = \"127.0.0.1:6443\": needs local.enabled = true",
            ),
            (
                "enabled = true\naddresses = [\"[::1]:6443\"]",
                "local.addresses[0] = \"[::1]:6443\": no [[vip]] of its address family to stand for",
            ),
            (
                "enabled = true\naddresses = [\"10.0.0.100:6443\"]",
                "local.addresses[0] = \"10.0.0.100:6443\": already a VIP or listed before",
            ),
            (
                "enabled = true\ncgroup = \"sys/fs/cgroup\"",
                "local.cgroup = \"sys/fs/cgroup\": not an absolute path",
            ),
        ] {
            assert_eq!(parse(local).unwrap_err(), error);
        }
    }
}
