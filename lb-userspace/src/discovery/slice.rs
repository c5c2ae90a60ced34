//! What an `EndpointSlice` says, checked: the masters it lists, or why it is refused
//! before it can touch the membership. Pure, so the rule is unit-tested here.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Why a slice update was refused; every reason is counted, from 0, in
/// `apilb_discovery_refusals_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// No ready endpoint at all.
    Empty,
    /// An address type other than IPv4 or IPv6, an address not of its slice's
    /// type, or a family no `[[vip]]` serves.
    WrongFamily,
    /// No `https` port (nor a single unnamed one), or one outside 1-65535.
    BogusPort,
    /// The update would take out more than half of the masters the probes see
    /// ready (see `crate::discovery::members`).
    HealthyDropped,
}

impl Refusal {
    pub const ALL: [Self; 4] = [
        Self::Empty,
        Self::WrongFamily,
        Self::BogusPort,
        Self::HealthyDropped,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::WrongFamily => "wrong_family",
            Self::BogusPort => "bogus_port",
            Self::HealthyDropped => "healthy_dropped",
        }
    }
}

/// The address families that have a `[[vip]]`: (IPv4, IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    fn serves(self, ip: IpAddr) -> bool {
        if ip.is_ipv4() { self.v4 } else { self.v6 }
    }
}

/// The ready masters `slices` list, as `address:port` with the slice's `https`
/// port, or the first reason to refuse them all: a slice that is wrong in part is
/// not trusted in the rest.
pub fn masters(
    slices: &[EndpointSlice],
    families: Families,
) -> Result<BTreeSet<SocketAddr>, Refusal> {
    let mut out = BTreeSet::new();
    for slice in slices {
        let v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            _ => return Err(Refusal::WrongFamily),
        };
        let ready: Vec<&String> = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter())
            .collect();
        if ready.is_empty() {
            continue;
        }
        let port = https_port(slice).ok_or(Refusal::BogusPort)?;
        for a in ready {
            let ip: IpAddr = a.parse().map_err(|_| Refusal::WrongFamily)?;
            if ip.is_ipv4() != v4 || !families.serves(ip) {
                return Err(Refusal::WrongFamily);
            }
            out.insert(SocketAddr::new(ip, port));
        }
    }
    if out.is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(out)
}

/// The slice's port named `https` (as the `kubernetes` Service names it), else its
/// only port; `None` if there is none or it is not 1-65535.
fn https_port(slice: &EndpointSlice) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = match ports.iter().find(|p| p.name.as_deref() == Some("https")) {
        Some(p) => p,
        None if ports.len() == 1 => &ports[0],
        None => return None,
    };
    port.port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    const V4: Families = Families {
        v4: true,
        v6: false,
    };

    fn slice(kind: &str, port: Option<i32>, addrs: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: kind.to_owned(),
            endpoints: addrs
                .iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![(*a).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("https".to_owned()),
                port,
                protocol: Some("TCP".to_owned()),
                ..EndpointPort::default()
            }]),
            ..EndpointSlice::default()
        }
    }

    fn set(addrs: &[&str]) -> BTreeSet<SocketAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn ready_endpoints_are_the_masters_at_the_https_port() {
        let s = slice(
            "IPv4",
            Some(6443),
            &[
                ("10.0.0.11", Some(true)),
                ("10.0.0.12", None),
                ("10.0.0.13", Some(false)),
            ],
        );
        assert_eq!(
            masters(&[s], V4),
            Ok(set(&["10.0.0.11:6443", "10.0.0.12:6443"]))
        );
    }

    #[test]
    fn empty_wrong_family_and_bogus_port_slices_are_refused_whole() {
        let none_ready = slice("IPv4", Some(6443), &[("10.0.0.11", Some(false))]);
        assert_eq!(masters(&[none_ready], V4), Err(Refusal::Empty));
        assert_eq!(masters(&[], V4), Err(Refusal::Empty));
        let v6 = slice("IPv6", Some(6443), &[("fd00::11", Some(true))]);
        assert_eq!(
            masters(std::slice::from_ref(&v6), V4),
            Err(Refusal::WrongFamily),
            "no IPv6 VIP"
        );
        assert_eq!(
            masters(&[v6], Families { v4: true, v6: true }),
            Ok(set(&["[fd00::11]:6443"]))
        );
        let mixed = slice(
            "IPv4",
            Some(6443),
            &[("10.0.0.11", Some(true)), ("fd00::11", Some(true))],
        );
        assert_eq!(masters(&[mixed], V4), Err(Refusal::WrongFamily));
        let fqdn = slice("FQDN", Some(6443), &[("master-1", Some(true))]);
        assert_eq!(masters(&[fqdn], V4), Err(Refusal::WrongFamily));
        for port in [None, Some(0), Some(70_000), Some(-1)] {
            let s = slice("IPv4", port, &[("10.0.0.11", Some(true))]);
            assert_eq!(masters(&[s], V4), Err(Refusal::BogusPort), "{port:?}");
        }
        let good = slice("IPv4", Some(6443), &[("10.0.0.11", Some(true))]);
        let bad = slice("IPv4", Some(0), &[("10.0.0.12", Some(true))]);
        assert_eq!(
            masters(&[good, bad], V4),
            Err(Refusal::BogusPort),
            "one bad slice spoils all"
        );
    }
}
