//! `apilb manifest`: a ready deployment for a validated config, so that operators
//! do not hand-write one. Three forms:
//!
//! - a static pod (`pod::static_pod`), for LB nodes and masters under kubeadm: the
//!   kubelet starts it from `/etc/kubernetes/manifests` before any apiserver exists;
//! - a `DaemonSet` (`pod::daemon_set`), for node-local mode on every node;
//! - a systemd unit (`systemd::unit`), for nodes where apilb runs beside the kubelet.
//!
//! Each grants exactly [`crate::privilege::CAPABILITIES`] and mounts exactly what
//! the config names ([`host_files`]), so a manifest follows its config: a CA added
//! to the config is a mount added to the manifest. The Kubernetes objects are
//! `k8s-openapi`'s typed ones, serialized by `yaml_serde`; [`parse_strict`] reads
//! one back refusing any field the type does not know.

mod pod;
mod systemd;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;

use crate::{config::Config, health::ProbeKind, health::Trust};

pub use pod::{ADMIN_HEALTH_PATH, BPFFS, CGROUP_DEFAULT, CONTAINER, IMAGE_BINARY, NAMESPACE};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the config path {}: {source}", path.display())]
    ConfigPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A pod mounts each file at the path the config gives, and a unit runs from
    /// `/`: a relative path would name a different file there.
    #[error(
        "{key} = {:?}: a manifest mounts each file the config names at the same path, \
         so it must be absolute",
        path.display()
    )]
    RelativePath { key: &'static str, path: PathBuf },
    #[error(
        "local.enabled = false: a DaemonSet runs apilb on every node, which only node-local \
         mode wants (every node would claim the VIPs); use static-pod or systemd for LB nodes"
    )]
    NotNodeLocal,
    #[error(
        "discovery.in_cluster = true: only a DaemonSet pod has a service account token; \
         give a static pod or a unit discovery.kubeconfig"
    )]
    InClusterOutsideDaemonSet,
    #[error("--image {0:?}: a systemd unit runs the binary, not an image")]
    ImageForUnit(String),
    #[error("--image {0:?}: not an image reference (empty, or has whitespace)")]
    BadImage(String),
    #[error("{directive}={value:?}: {reason}")]
    UnitValue {
        directive: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("finding this binary's path for ExecStart")]
    Exe(#[source] std::io::Error),
    #[error("writing the manifest as YAML")]
    Yaml(#[source] yaml_serde::Error),
    #[error("reading a manifest back: {0}")]
    ParseBack(#[source] yaml_serde::Error),
    #[error("reading a manifest back: unknown fields {0:?}")]
    UnknownFields(Vec<String>),
}

/// What `apilb manifest` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Form {
    /// A static pod for `/etc/kubernetes/manifests`.
    StaticPod,
    /// A `DaemonSet` for node-local mode on every node.
    Daemonset,
    /// A systemd unit for `/etc/systemd/system/apilb.service`.
    Systemd,
}

/// The image a pod runs when `--image` is not given: what `cargo xtask image`
/// builds, loaded into the node's container runtime (no registry).
#[must_use]
pub fn default_image() -> String {
    format!("apilb:{}", env!("CARGO_PKG_VERSION"))
}

/// `form` for `config`, read from `config_path`, as text to print.
pub fn render(
    form: Form,
    config: &Config,
    config_path: &Path,
    image: Option<&str>,
) -> Result<String, ManifestError> {
    let files = host_files(config, config_path)?;
    let in_cluster = config
        .discovery
        .as_ref()
        .is_some_and(|d| d.credentials == crate::config::Credentials::InCluster);
    if in_cluster && form != Form::Daemonset {
        return Err(ManifestError::InClusterOutsideDaemonSet);
    }
    if form == Form::Systemd {
        if let Some(image) = image {
            return Err(ManifestError::ImageForUnit(image.to_owned()));
        }
        let exe = std::env::current_exe().map_err(ManifestError::Exe)?;
        return systemd::unit(&files, &exe);
    }
    let image = image.map_or_else(default_image, str::to_owned);
    if image.is_empty() || image.contains(char::is_whitespace) {
        return Err(ManifestError::BadImage(image));
    }
    match form {
        Form::StaticPod => to_yaml(&pod::static_pod(config, &files, &image)),
        Form::Daemonset => {
            if !config.local.enabled {
                return Err(ManifestError::NotNodeLocal);
            }
            to_yaml(&pod::daemon_set(config, &files, &image))
        }
        Form::Systemd => unreachable!("rendered above"),
    }
}

/// A Kubernetes object as YAML, the way `apilb manifest` prints it.
pub fn to_yaml<T: serde::Serialize>(object: &T) -> Result<String, ManifestError> {
    yaml_serde::to_string(object).map_err(ManifestError::Yaml)
}

/// A file apilb reads, named by the config (or the config file itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFile {
    /// The config key that names it, `config` for the config file itself.
    pub key: &'static str,
    /// Absolute.
    pub path: PathBuf,
}

/// Every file `apilb run` reads: the config file (absolute, as given) and each file
/// it names, each once, in config order. A relative path is refused by its key.
pub fn host_files(config: &Config, config_path: &Path) -> Result<Vec<HostFile>, ManifestError> {
    let config_path =
        std::path::absolute(config_path).map_err(|source| ManifestError::ConfigPath {
            path: config_path.to_owned(),
            source,
        })?;
    let mut named: Vec<(&'static str, &Path)> = Vec::new();
    if let ProbeKind::Https { tls, .. } = &config.health.kind {
        if let Trust::CaFile(ca) = &tls.trust {
            named.push(("health.ca_file", ca));
        }
        if let Some((cert, key)) = &tls.client_cert {
            named.push(("health.client_cert", cert));
            named.push(("health.client_key", key));
        }
    }
    if let Some(tls) = config.election.etcd.as_ref().and_then(|e| e.tls.as_ref()) {
        named.push(("election.etcd.ca_file", &tls.ca_file));
        if let Some((cert, key)) = &tls.client_cert {
            named.push(("election.etcd.cert_file", cert));
            named.push(("election.etcd.key_file", key));
        }
    }
    if let Some(sync) = &config.sync {
        named.push(("sync.key_file", &sync.key_file));
    }
    if let Some(d) = &config.discovery {
        if let crate::config::Credentials::Kubeconfig(path) = &d.credentials {
            named.push(("discovery.kubeconfig", path));
        }
        for (key, file) in &d.kubeconfig_files {
            named.push((key, file));
        }
    }
    let mut files = vec![HostFile {
        key: "config",
        path: config_path,
    }];
    for (key, path) in named {
        if !path.is_absolute() {
            return Err(ManifestError::RelativePath {
                key,
                path: path.to_owned(),
            });
        }
        if !files.iter().any(|f| f.path == path) {
            files.push(HostFile {
                key,
                path: path.to_owned(),
            });
        }
    }
    Ok(files)
}

/// Where a local probe (the kubelet's, on the node's network) reaches the admin
/// endpoint: its own address, or loopback if it listens on every address.
#[must_use]
pub fn admin_probe_host(config: &Config) -> IpAddr {
    match config.admin_listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// Read a manifest back into its typed object, refusing any field the type does not
/// know: `k8s-openapi` skips unknown fields silently, which would let a misspelt
/// field (`hostNetwrok`) pass as the default.
pub fn parse_strict<T: DeserializeOwned>(yaml: &str) -> Result<T, ManifestError> {
    let mut unknown = Vec::new();
    let value = serde_ignored::deserialize(yaml_serde::Deserializer::from_str(yaml), |path| {
        unknown.push(path.to_string());
    })
    .map_err(ManifestError::ParseBack)?;
    if unknown.is_empty() {
        Ok(value)
    } else {
        Err(ManifestError::UnknownFields(unknown))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};

    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"10.0.0.1\"\n\
             [[vip]]\naddress = \"10.0.0.100\"\n[[backend]]\naddress = \"10.0.0.11:6443\"\n\
             [health]\nkind = \"tcp\"\n{extra}"
        );
        Config::parse(&text, Path::new("t.toml")).expect("valid")
    }

    #[test]
    fn a_misspelt_field_is_refused_by_name() {
        let good = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\nspec:\n  hostNetwork: true\n  containers: []\n";
        let pod: Pod = parse_strict(good).expect("strict parse");
        assert_eq!(pod.spec.and_then(|s| s.host_network), Some(true));
        let bad = good.replace("hostNetwork", "hostNetwrok");
        match parse_strict::<Pod>(&bad) {
            Err(ManifestError::UnknownFields(f)) => assert_eq!(f, ["spec.?.hostNetwrok"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn static_pod_reads_back_strictly_and_equal() {
        let c = config("");
        let yaml = render(
            Form::StaticPod,
            &c,
            Path::new("/etc/apilb/apilb.toml"),
            None,
        )
        .expect("render");
        let pod: Pod = parse_strict(&yaml).expect("strict");
        assert_eq!(to_yaml(&pod).expect("again"), yaml);
        let spec = pod.spec.expect("spec");
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let args = spec.containers[0].args.clone().expect("args");
        assert_eq!(args, ["run", "-c", "/etc/apilb/apilb.toml"]);
    }

    #[test]
    fn discovery_mounts_the_kubeconfig_and_its_files_or_takes_a_service_account() {
        let dir = std::env::temp_dir().join(format!("apilb-disc-manifest-{}", std::process::id()));
        let kc = crate::config::write_kubeconfig(&dir, "ca.crt");
        let c = config(&format!(
            "[discovery]\nkind = \"endpointslice\"\nkubeconfig = \"{}\"\n",
            kc.display()
        ));
        let files = host_files(&c, Path::new("/etc/apilb/apilb.toml")).expect("files");
        let keys: Vec<(&str, PathBuf)> = files.iter().map(|f| (f.key, f.path.clone())).collect();
        assert_eq!(
            keys[1..],
            [
                ("discovery.kubeconfig", kc.clone()),
                (
                    "discovery.kubeconfig certificate-authority",
                    dir.join("ca.crt")
                ),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let c = config(
            "[local]\nenabled = true\n[discovery]\nkind = \"endpointslice\"\nin_cluster = true\n",
        );
        let err = render(Form::StaticPod, &c, Path::new("/a.toml"), None).unwrap_err();
        assert!(
            matches!(err, ManifestError::InClusterOutsideDaemonSet),
            "{err}"
        );
        let yaml = render(Form::Daemonset, &c, Path::new("/a.toml"), None).expect("daemonset");
        let ds: DaemonSet = parse_strict(&yaml).expect("strict");
        let spec = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some(pod::SERVICE_ACCOUNT)
        );
        assert_eq!(spec.automount_service_account_token, Some(true));
    }

    #[test]
    fn daemonset_needs_node_local_mode() {
        let c = config("");
        let err = render(Form::Daemonset, &c, Path::new("/a.toml"), None).unwrap_err();
        assert!(
            err.to_string().starts_with("local.enabled = false: "),
            "{err}"
        );
        let c = config("[local]\nenabled = true\ncgroup = \"/sys/fs/cgroup/kubepods.slice\"\n");
        let yaml = render(
            Form::Daemonset,
            &c,
            Path::new("/a.toml"),
            Some("reg/apilb:1"),
        )
        .expect("render");
        let ds: DaemonSet = parse_strict(&yaml).expect("strict");
        let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
        let cgroup = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/sys/fs/cgroup/kubepods.slice");
        assert!(cgroup.is_some(), "{yaml}");
        assert_eq!(pod.containers[0].image.as_deref(), Some("reg/apilb:1"));
    }

    #[test]
    fn a_unit_takes_no_image_and_a_pod_no_blank_one() {
        let c = config("");
        let p = Path::new("/a.toml");
        assert_eq!(
            render(Form::Systemd, &c, p, Some("x"))
                .unwrap_err()
                .to_string(),
            "--image \"x\": a systemd unit runs the binary, not an image"
        );
        assert!(matches!(
            render(Form::StaticPod, &c, p, Some("a b")),
            Err(ManifestError::BadImage(_))
        ));
    }

    #[test]
    fn the_probe_reaches_an_unspecified_listener_on_loopback() {
        let c = config("[admin]\nlisten = \"0.0.0.0:9464\"\n");
        assert_eq!(admin_probe_host(&c), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let c = config("[admin]\nlisten = \"[::]:9464\"\n");
        assert_eq!(admin_probe_host(&c), IpAddr::V6(Ipv6Addr::LOCALHOST));
        let c = config("[admin]\nlisten = \"10.0.0.1:9464\"\n");
        assert_eq!(admin_probe_host(&c).to_string(), "10.0.0.1");
    }
}
