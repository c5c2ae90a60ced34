//! Placeholder: filled by the etcd election work.
