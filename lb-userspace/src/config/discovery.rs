//! The `[discovery]` section: where apilb learns the masters from the cluster
//! itself (`crate::discovery`), with the `[[backend]]` list as the bootstrap set.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, Facts, invalid, timeouts};

/// `discovery.hold` when the config leaves it out.
pub const HOLD_DEFAULT: Duration = Duration::from_mins(10);
/// The shortest `discovery.hold`: a master leaving the slice keeps its
/// established flows at least this long unless it goes down.
pub const HOLD_FLOOR: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    kind: String,
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    in_cluster: bool,
    #[serde(default = "default_hold", deserialize_with = "timeouts::duration")]
    hold: Duration,
}

fn default_hold() -> Duration {
    HOLD_DEFAULT
}

/// How the discovery client authenticates to the apiserver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// A kubeconfig file: its current context's cluster CA, server name and user.
    Kubeconfig(PathBuf),
    /// The pod's service account (`/var/run/secrets/kubernetes.io/serviceaccount`)
    /// and `KUBERNETES_SERVICE_HOST`, as `kube::Config::incluster` reads them.
    InCluster,
}

/// `[discovery]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoverySettings {
    pub credentials: Credentials,
    /// How long a master that left the slice keeps its established flows (it
    /// takes no new ones), unless it goes down first.
    pub hold: Duration,
    /// The files the kubeconfig names (CA, client certificate and key, token
    /// file), absolute, with the kubeconfig key naming each, for `apilb
    /// manifest`; empty in-cluster and when checked offline.
    pub kubeconfig_files: Vec<(&'static str, PathBuf)>,
}

impl DiscoverySettings {
    /// What `apilb check` says of it.
    #[must_use]
    pub fn describe(&self) -> String {
        let from = match &self.credentials {
            Credentials::Kubeconfig(p) => format!("kubeconfig {}", p.display()),
            Credentials::InCluster => "in-cluster".to_owned(),
        };
        format!(
            "discovery: the default/kubernetes EndpointSlice ({from}), the backends as bootstrap, \
             a master that leaves held {}",
            humantime_serde::re::humantime::format_duration(self.hold)
        )
    }
}

pub(super) fn validate(
    raw: RawDiscovery,
    facts: &dyn Facts,
) -> Result<DiscoverySettings, ConfigError> {
    if raw.kind != "endpointslice" {
        return Err(invalid(
            "discovery.kind",
            format!("{:?}", raw.kind),
            "the only kind is \"endpointslice\" (the default/kubernetes EndpointSlice)",
        ));
    }
    let credentials = match (raw.kubeconfig, raw.in_cluster) {
        (Some(path), false) => Credentials::Kubeconfig(path),
        (None, true) => Credentials::InCluster,
        (Some(path), true) => {
            return Err(invalid(
                "discovery.kubeconfig",
                format!("{:?}", path.display()),
                "give a kubeconfig or in_cluster = true, not both",
            ));
        }
        (None, false) => {
            return Err(invalid(
                "discovery.kubeconfig",
                "(unset)",
                "give a kubeconfig path or in_cluster = true",
            ));
        }
    };
    if raw.hold < HOLD_FLOOR {
        return Err(invalid(
            "discovery.hold",
            format!(
                "{:?}",
                humantime_serde::re::humantime::format_duration(raw.hold).to_string()
            ),
            "must be at least \"1s\": a master leaving the slice keeps its established flows that long",
        ));
    }
    let mut kubeconfig_files = Vec::new();
    if let Credentials::Kubeconfig(path) = &credentials {
        if !path.is_absolute() {
            return Err(invalid(
                "discovery.kubeconfig",
                format!("{:?}", path.display()),
                "not an absolute path",
            ));
        }
        if facts.reads_files() {
            kubeconfig_files = named_files(path)?;
        } else {
            facts.skipped(format!(
                "discovery.kubeconfig {:?}: not read",
                path.display()
            ));
        }
    }
    Ok(DiscoverySettings {
        credentials,
        hold: raw.hold,
        kubeconfig_files,
    })
}

/// Read the kubeconfig at `path` and return the files it names, each once.
fn named_files(path: &Path) -> Result<Vec<(&'static str, PathBuf)>, ConfigError> {
    let refused = |reason: String| {
        invalid(
            "discovery.kubeconfig",
            format!("{:?}", path.display()),
            reason,
        )
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| refused(e.to_string()))?;
    if kc
        .clusters
        .iter()
        .all(|c| c.cluster.as_ref().and_then(|c| c.server.as_ref()).is_none())
    {
        return Err(refused("names no cluster with a server".to_owned()));
    }
    let mut files: Vec<(&'static str, PathBuf)> = Vec::new();
    let clusters = kc.clusters.iter().filter_map(|c| c.cluster.as_ref());
    for ca in clusters.filter_map(|c| c.certificate_authority.as_ref()) {
        files.push((
            "discovery.kubeconfig certificate-authority",
            PathBuf::from(ca),
        ));
    }
    for user in kc.auth_infos.iter().filter_map(|a| a.auth_info.as_ref()) {
        let named = [
            (
                "discovery.kubeconfig client-certificate",
                &user.client_certificate,
            ),
            ("discovery.kubeconfig client-key", &user.client_key),
            ("discovery.kubeconfig tokenFile", &user.token_file),
        ];
        for (key, file) in named {
            if let Some(file) = file {
                files.push((key, PathBuf::from(file)));
            }
        }
    }
    for (key, file) in &files {
        std::fs::metadata(file).map_err(|e| {
            refused(format!(
                "its {} {:?} cannot be read: {e}",
                &key["discovery.kubeconfig ".len()..],
                file.display()
            ))
        })?;
    }
    files.dedup_by(|a, b| a.1 == b.1);
    Ok(files)
}

/// A kubeconfig in `dir` (created) whose cluster names the CA file `ca`
/// (written beside it), for unit tests.
#[cfg(test)]
pub(crate) fn write_kubeconfig(dir: &Path, ca: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(ca), "x").unwrap();
    let kc = dir.join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.100:6443\n    \
             certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  \
             context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    kc
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    use super::*;

    fn parse(discovery: &str) -> Result<Config, String> {
        let text = format!(
            "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"10.0.0.1\"\n\
             [[vip]]\naddress = \"10.0.0.100\"\n[[backend]]\naddress = \"10.0.0.11:6443\"\n\
             [health]\nkind = \"tcp\"\n\
             [discovery]\n{discovery}\n"
        );
        Config::parse(&text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn in_cluster_discovery_gets_the_default_hold() {
        let c = parse("kind = \"endpointslice\"\nin_cluster = true").expect("valid");
        let d = c.discovery.expect("discovery on");
        assert_eq!(d.credentials, Credentials::InCluster);
        assert_eq!(d.hold, HOLD_DEFAULT);
        assert!(d.kubeconfig_files.is_empty());
    }

    #[test]
    fn a_kubeconfig_is_read_and_the_files_it_names_are_listed() {
        let dir = std::env::temp_dir().join(format!("apilb-disc-cfg-{}", std::process::id()));
        let kc = write_kubeconfig(&dir, "ca.pem");
        let c = parse(&format!(
            "kind = \"endpointslice\"\nkubeconfig = \"{}\"\nhold = \"30s\"",
            kc.display()
        ))
        .expect("valid");
        let d = c.discovery.expect("on");
        assert_eq!(d.hold, Duration::from_secs(30));
        assert_eq!(
            d.kubeconfig_files,
            vec![(
                "discovery.kubeconfig certificate-authority",
                dir.join("ca.pem")
            )]
        );
        std::fs::remove_file(dir.join("ca.pem")).unwrap();
        let e = parse(&format!(
            "kind = \"endpointslice\"\nkubeconfig = \"{}\"",
            kc.display()
        ))
        .unwrap_err();
        assert!(
            e.starts_with(&format!(
                "discovery.kubeconfig = {:?}: its certificate-authority",
                kc.display()
            )),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_discovery_settings_are_refused_by_key_and_value() {
        for (discovery, error) in [
            (
                "kind = \"endpoints\"\nin_cluster = true",
                "discovery.kind = \"endpoints\": the only kind is \"endpointslice\" (the default/kubernetes EndpointSlice)",
            ),
            (
                "kind = \"endpointslice\"",
                "discovery.kubeconfig = (unset): give a kubeconfig path or in_cluster = true",
            ),
            (
                "kind = \"endpointslice\"\nin_cluster = true\nkubeconfig = \"/k\"",
                "discovery.kubeconfig = \"/k\": give a kubeconfig or in_cluster = true, not both",
            ),
            (
                "kind = \"endpointslice\"\nkubeconfig = \"k.conf\"",
                "discovery.kubeconfig = \"k.conf\": not an absolute path",
            ),
            (
                "kind = \"endpointslice\"\nin_cluster = true\nhold = \"100ms\"",
                "discovery.hold = \"100ms\": must be at least \"1s\": a master leaving the slice keeps its established flows that long",
            ),
            (
                "kind = \"endpointslice\"\nkubeconfig = \"/nonexistent/apilb/kubeconfig\"",
                "discovery.kubeconfig = \"/nonexistent/apilb/kubeconfig\": ",
            ),
        ] {
            let e = parse(discovery).unwrap_err();
            assert!(e.starts_with(error), "{discovery:?}: {e}");
        }
        let e = parse("kind = \"endpointslice\"\nin_cluster = true\nhold = 10").unwrap_err();
        assert!(
            e.contains("key discovery.hold") && e.contains("\"10s\""),
            "{e}"
        );
    }
}
