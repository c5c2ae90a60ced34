//! The `default/kubernetes` `EndpointSlice` as the stub apiservers serve it, driven
//! by a test at run time through one file that every stub reads: the test writes
//! a [`SliceFile`] ([`SliceFile::write`]), the stubs serve it on list and watch
//! (`src/bin/stub-apiserver.rs`), and a `<file>.fail` beside it makes every
//! request fail with `403 Forbidden`, as a missing RBAC grant does.
//!
//! The file is a few lines of text, one fact each:
//!
//! ```text
//! resourceVersion 7
//! compacted 0
//! addressType IPv4
//! port 6443
//! endpoint 198.51.100.11
//! endpoint 198.51.100.12
//! ```
//!
//! `compacted N` stands for etcd's compaction: a watch from a `resourceVersion`
//! below `N` gets `410 Gone`, and the client must list again.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// What one slice file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceFile {
    pub resource_version: u64,
    /// Watches from below this version get `410 Gone`.
    pub compacted: u64,
    pub address_type: String,
    /// The `https` port; anything, so a test can write a bogus one.
    pub port: i32,
    /// Ready endpoints' addresses.
    pub endpoints: Vec<String>,
}

impl SliceFile {
    /// An IPv4 slice of `masters` (`address:port`, the port taken from the first)
    /// at `resource_version`.
    #[must_use]
    pub fn of(resource_version: u64, masters: &[&str]) -> Self {
        let port = masters
            .first()
            .and_then(|m| m.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(6443);
        Self {
            resource_version,
            compacted: 0,
            address_type: "IPv4".to_owned(),
            port,
            endpoints: masters
                .iter()
                .map(|m| m.rsplit_once(':').map_or(*m, |(a, _)| a).to_owned())
                .collect(),
        }
    }

    #[must_use]
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "resourceVersion {}\ncompacted {}\naddressType {}\nport {}\n",
            self.resource_version, self.compacted, self.address_type, self.port
        );
        for e in &self.endpoints {
            let _ = writeln!(text, "endpoint {e}");
        }
        text
    }

    /// Parse the file's text; `None` if a line is not one of the facts above.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut s = Self::of(0, &[]);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once(' ')?;
            match key {
                "resourceVersion" => s.resource_version = value.parse().ok()?,
                "compacted" => s.compacted = value.parse().ok()?,
                "addressType" => value.clone_into(&mut s.address_type),
                "port" => s.port = value.parse().ok()?,
                "endpoint" => s.endpoints.push(value.to_owned()),
                _ => return None,
            }
        }
        Some(s)
    }

    /// Replace `path` whole (write beside it, then rename), so a stub never reads
    /// half a file.
    pub fn write(&self, path: &Path) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.to_text()).expect("write the slice file");
        std::fs::rename(&tmp, path).expect("rename the slice file");
    }

    /// The slice as the apiserver serves it.
    #[must_use]
    pub fn to_object(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some("kubernetes".to_owned()),
                namespace: Some("default".to_owned()),
                resource_version: Some(self.resource_version.to_string()),
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_owned(),
                        "kubernetes".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            address_type: self.address_type.clone(),
            endpoints: self
                .endpoints
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("https".to_owned()),
                port: Some(self.port),
                protocol: Some("TCP".to_owned()),
                ..EndpointPort::default()
            }]),
        }
    }
}

/// The file that makes every `EndpointSlice` request fail while it exists.
#[must_use]
pub fn fail_file(slice_file: &Path) -> PathBuf {
    let mut name = slice_file.as_os_str().to_owned();
    name.push(".fail");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_file_reads_back_as_written() {
        let mut s = SliceFile::of(7, &["198.51.100.11:6443", "198.51.100.12:6443"]);
        s.compacted = 3;
        assert_eq!(SliceFile::parse(&s.to_text()), Some(s.clone()));
        assert_eq!(s.endpoints, ["198.51.100.11", "198.51.100.12"]);
        assert_eq!(s.port, 6443);
        assert_eq!(SliceFile::parse("nonsense here"), None);
    }
}
