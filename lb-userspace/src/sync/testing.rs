//! What the sync tests share: a key, names and a [`Hello`] two nodes can sync with.

use super::{
    key::Key,
    wire::{Hello, NodeName},
};

/// A key of 32 `byte`s: tests tell keys apart by the byte.
pub(crate) fn key(byte: u8) -> Key {
    Key::from_bytes(&[byte; 32])
}

pub(crate) fn name(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

/// The configuration of the node on `slice` of 2: slices 0 and 1 sync together.
pub(crate) fn hello(slice: u16) -> Hello {
    Hello {
        slice,
        slices: 2,
        nat_ports: 1024..=32_767,
        config_digest: [0xd1; 32],
    }
}
