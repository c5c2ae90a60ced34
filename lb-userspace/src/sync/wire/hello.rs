//! What the handshake says: a node's [`NodeName`] and the [`Hello`] configuration
//! that must match for two nodes to sync, and how both are laid out in the HELLO and
//! `HELLO_REPLY` bodies. Apart from the handshake's steps, so that the checks a peer's
//! identity and configuration pass stand on their own.

use std::{fmt, ops::RangeInclusive};

use bytes::{BufMut, BytesMut};

use super::{
    NAME_MAX, NONCE_LEN,
    errors::{Reject, WireError},
};

/// A node's name in the handshake (1 to 64 bytes of UTF-8). It enters the session
/// key, so both ends agree on who is who.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, WireError> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(WireError::NodeName {
                name: name.to_owned(),
                len: name.len(),
            });
        }
        Ok(NodeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dialer's configuration, in its `HELLO_REPLY`: what must agree between two
/// nodes for one to take over the other's flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// This node's slice of `nat_ports` (0-based).
    pub slice: u16,
    /// The number of slices, the same on every node.
    pub slices: u16,
    /// `datapath.nat_ports`.
    pub nat_ports: RangeInclusive<u16>,
    /// SHA-256 of the VIPs with their SNAT pools, which must match too.
    pub config_digest: [u8; 32],
}

impl Hello {
    /// [`Reject::ConfigMismatch`] unless a peer with `peer` can sync with a node with
    /// `self`: the same slices, NAT ports and digest, and another slice (two nodes on
    /// one slice would hand out the same `(VIP, port)`), in range.
    pub fn check_peer(&self, peer: &Hello) -> Result<(), Reject> {
        let fits = peer.slices == self.slices
            && peer.nat_ports == self.nat_ports
            && peer.config_digest == self.config_digest
            && peer.slice < peer.slices
            && peer.slice != self.slice;
        if fits {
            Ok(())
        } else {
            Err(Reject::ConfigMismatch)
        }
    }
}

/// `nonce[16] name_len u8 name[64]`, the start of both handshake bodies.
pub(super) fn put_greeting(out: &mut BytesMut, nonce: &[u8; NONCE_LEN], name: &NodeName) {
    out.put_slice(nonce);
    let name = name.as_str().as_bytes();
    // NodeName holds at most NAME_MAX (64) bytes.
    out.put_u8(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.put_slice(name);
    out.put_bytes(0, NAME_MAX - name.len());
}

/// The nonce and name at the start of a handshake body.
pub(super) fn parse_greeting(body: &[u8]) -> Result<([u8; NONCE_LEN], NodeName), Reject> {
    let (nonce, rest) = body
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(Reject::Malformed)?;
    let (&len, name) = rest.split_first().ok_or(Reject::Malformed)?;
    let name = name.get(..usize::from(len)).ok_or(Reject::Malformed)?;
    let name = std::str::from_utf8(name).map_err(|_| Reject::Malformed)?;
    let name = NodeName::new(name).map_err(|_| Reject::Malformed)?;
    Ok((*nonce, name))
}

/// `slice u16 slices u16 nat_min u16 nat_max u16 digest[32]`.
pub(super) fn parse_hello(b: &[u8]) -> Result<Hello, Reject> {
    let (&[s0, s1, n0, n1, lo0, lo1, hi0, hi1], digest) =
        b.split_first_chunk::<8>().ok_or(Reject::Malformed)?;
    Ok(Hello {
        slice: u16::from_be_bytes([s0, s1]),
        slices: u16::from_be_bytes([n0, n1]),
        nat_ports: u16::from_be_bytes([lo0, lo1])..=u16::from_be_bytes([hi0, hi1]),
        config_digest: *digest.first_chunk().ok_or(Reject::Malformed)?,
    })
}

pub(super) fn put_hello(out: &mut BytesMut, hello: &Hello) {
    out.put_u16(hello.slice);
    out.put_u16(hello.slices);
    out.put_u16(*hello.nat_ports.start());
    out.put_u16(*hello.nat_ports.end());
    out.put_slice(&hello.config_digest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{
        testing::{hello as config, key},
        wire::{DIR_FROM_LISTENER, DialerHandshake, HELLO_LEN, VERSION, testing::tag_raw},
    };

    #[test]
    fn node_names_are_1_to_64_bytes_of_utf8() {
        assert!(NodeName::new("").is_err());
        assert!(NodeName::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            NodeName::new(&"a".repeat(65)),
            Err(WireError::NodeName {
                name: "a".repeat(65),
                len: 65
            })
        );
        assert!(NodeName::new(&"é".repeat(32)).is_ok(), "64 bytes");
        assert!(NodeName::new(&"é".repeat(33)).is_err(), "66 bytes");
    }

    #[test]
    fn check_peer_refuses_every_difference_and_our_own_slice() {
        let ours = config(0);
        assert_eq!(ours.check_peer(&config(1)), Ok(()));
        let mismatches = [
            config(0),
            Hello {
                slices: 3,
                ..config(1)
            },
            Hello {
                slice: 2,
                ..config(1)
            },
            Hello {
                nat_ports: 1024..=32_766,
                ..config(1)
            },
            Hello {
                config_digest: [0; 32],
                ..config(1)
            },
        ];
        for peer in mismatches {
            assert_eq!(
                ours.check_peer(&peer),
                Err(Reject::ConfigMismatch),
                "{peer:?}"
            );
        }
    }

    #[test]
    fn a_hello_with_a_bad_name_is_malformed() {
        let k = key(1);
        for (len, name) in [(0, &b""[..]), (65, &[b'a'; 65][..]), (2, &[0xff, 0xfe][..])] {
            let mut body = vec![7; NONCE_LEN];
            body.push(len);
            body.extend_from_slice(name);
            body.resize(HELLO_LEN, 0);
            let hello = tag_raw(k.hmac(), DIR_FROM_LISTENER, [VERSION, 1, 0, 0], 0, &body);
            let dialer =
                DialerHandshake::new(&k, NodeName::new("lb2").unwrap(), config(1)).unwrap();
            assert_eq!(
                dialer.answer(&hello).unwrap_err(),
                Reject::Malformed,
                "{name:?}"
            );
        }
    }
}
