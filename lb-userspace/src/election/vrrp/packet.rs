//! The VRRP advertisement codec: one advert's bytes to an [`Advert`] and back.
//!
//! apilb joins keepalived setups as an ordinary VRRP router, so its adverts must be
//! exactly what keepalived sends and accepts. This module holds that wire format and
//! nothing else: no sockets, no clock, no state. Tests pin it with hand-derived bytes,
//! and the socket layer only moves bytes and checks what only it can see (the IP
//! TTL, the VRID, the peer, the address list).
//!
//! The message starts after the IP header (keepalived's `auth_type AH` is not supported):
//!
//! ```text
//! byte 0       1        2          3
//!      ver|typ  VRID     priority   count of addresses
//!      v2: auth type, Adver Int (s)      | checksum
//!      v3: 4 bits reserved, 12 bits Max Adver Int (cs) | checksum
//!      addresses: 4 bytes each (IPv4) or 16 bytes each (IPv6)
//!      v2 only: 8 bytes of authentication data
//! ```
//!
//! - **VRRPv3** (RFC 5798 section 5) runs over IPv4 or IPv6, carries its interval in
//!   centiseconds and has no authentication. Its checksum covers a pseudo-header
//!   (source, destination, protocol 112 and the message length, as for UDP) and then
//!   the message, so [`encode`] and [`decode`] need the packet's real source and
//!   destination addresses.
//! - **VRRPv2** (RFC 3768 section 5) is IPv4 only, carries whole seconds, and its
//!   checksum covers the message alone. It always ends in 8 bytes of authentication
//!   data. RFC 3768 dropped authentication, but keepalived's `auth_type PASS` still
//!   sends the simple text password of RFC 2338 section 5.3.6: auth type 1 and the
//!   password zero-padded to 8 bytes, compared in full by the receiver.
//!
//! [`decode`] checks, in order: length of the fixed part, version and type, address
//! family and length, checksum, then (v2) authentication. Everything else that can
//! make an advert unusable is a [`Reject`] the caller reports, so that all refusals
//! share one set of metric labels.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// IP protocol number of VRRP (both versions).
pub const PROTOCOL: u8 = 112;
/// The IPv4 TTL or IPv6 hop limit an advert is sent with and, on a multicast
/// segment, must arrive with (RFC 5798 section 5.1.1.3).
pub const TTL: u8 = 255;
/// The IPv4 multicast group adverts go to, `224.0.0.18`.
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The IPv6 multicast group adverts go to, `ff02::12`.
pub const MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);

/// Length of the fixed header common to both versions.
const HEADER_LEN: usize = 8;
/// Length of the v2 authentication data that ends every VRRPv2 message.
const AUTH_LEN: usize = 8;
/// The only VRRP message type: an advertisement.
const TYPE_ADVERT: u8 = 1;
/// v2 auth type: none.
const AUTH_TYPE_NONE: u8 = 0;
/// v2 auth type: simple text password (RFC 2338).
const AUTH_TYPE_PASSWORD: u8 = 1;
/// One v3 interval unit.
const CENTISECOND: Duration = Duration::from_millis(10);
/// Largest v3 Max Adver Int, in centiseconds (12 bits).
const MAX_V3_CENTIS: u64 = 0x0fff;

/// Which VRRP version an instance speaks; the two do not interoperate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// RFC 3768, IPv4 only, interval in whole seconds, optional password.
    V2,
    /// RFC 5798, IPv4 or IPv6, interval in centiseconds, no authentication.
    V3,
}

impl Version {
    /// The value of the version nibble on the wire.
    pub fn number(self) -> u8 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VRRPv{}", self.number())
    }
}

/// VRRPv2 authentication. VRRPv3 adverts always use [`Auth::None`].
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// Auth type 0; the 8 data bytes are sent as zeros and ignored on receipt.
    #[default]
    None,
    /// Auth type 1, keepalived's `auth_type PASS`: the password, zero-padded.
    Password([u8; AUTH_LEN]),
}

impl Auth {
    /// The password as keepalived stores `auth_pass`: its bytes, zero-padded to 8.
    /// keepalived truncates a longer one (with a warning); apilb refuses it, so both
    /// sides never silently disagree about what the password is.
    pub fn password(text: &str) -> Result<Auth, PacketError> {
        let bytes = text.as_bytes();
        if bytes.len() > AUTH_LEN {
            return Err(PacketError::PasswordTooLong { len: bytes.len() });
        }
        let mut data = [0; AUTH_LEN];
        data[..bytes.len()].copy_from_slice(bytes);
        Ok(Auth::Password(data))
    }
}

/// Passwords stay out of logs.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

/// One VRRP advertisement, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub version: Version,
    /// Virtual router ID, 1 to 255.
    pub vrid: u8,
    /// 0 means "the master is leaving", 255 "the address owner".
    pub priority: u8,
    /// v3: Max Adver Int (multiples of 10 ms up to 40.95 s); v2: Adver Int (whole
    /// seconds up to 255 s).
    pub interval: Duration,
    /// The virtual addresses, all of the packet's address family.
    pub addresses: Vec<IpAddr>,
    /// v2 only; decoded adverts carry what the packet carried.
    pub auth: Auth,
}

/// Why an advert cannot be encoded (a configuration the wire format cannot carry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("auth_pass is {len} bytes long; VRRPv2 carries at most 8")]
    PasswordTooLong { len: usize },
    #[error("advert interval {interval:?} does not fit VRRPv2: whole seconds from 1 to 255")]
    IntervalV2 { interval: Duration },
    #[error(
        "advert interval {interval:?} does not fit VRRPv3: a multiple of 10 ms from 10 ms to 40.95 s"
    )]
    IntervalV3 { interval: Duration },
    #[error("VRRPv2 runs over IPv4 only")]
    V2OverIpv6,
    #[error("VRRPv3 has no authentication; a password needs VRRPv2")]
    AuthOnV3,
    #[error("{addr} is not of the same address family as the source {src}")]
    MixedFamilies { addr: IpAddr, src: IpAddr },
    #[error("an advert carries 1 to 255 addresses, not {count}")]
    AddressCount { count: usize },
    #[error("VRID 0 is not valid; VRIDs are 1 to 255")]
    Vrid,
}

/// Why a received advert was dropped. One enum for every layer, so that each
/// refusal is counted under one label ([`Reject::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    /// The IP TTL (hop limit) is not 255 on a multicast segment. Socket layer.
    #[error("IP TTL is not 255")]
    Ttl,
    /// The version nibble is not the configured version, or the type is not 1.
    #[error("not an advertisement of the configured VRRP version")]
    Version,
    /// The checksum does not verify.
    #[error("bad checksum")]
    Checksum,
    /// v2: the auth type or password differs from the configured one.
    #[error("authentication type or password differs from ours")]
    Auth,
    /// Another virtual router's advert. Socket layer.
    #[error("VRID differs from ours")]
    Vrid,
    /// The source is not a configured unicast peer. Socket layer.
    #[error("source is not a configured peer")]
    Peer,
    /// v2: the interval differs from ours (RFC 3768 section 7.1); v3: zero.
    /// State machine.
    #[error("advertisement interval differs from ours or is zero")]
    Interval,
    /// The advertised addresses are not the configured ones. Socket layer.
    #[error("advertised addresses differ from ours")]
    Addresses,
    /// Truncated, its count disagrees with its length, or its family with the source.
    #[error("truncated or inconsistent advert")]
    Malformed,
}

impl Reject {
    /// Every reason, e.g. to register each metric label up front.
    pub const ALL: [Reject; 9] = [
        Reject::Ttl,
        Reject::Version,
        Reject::Checksum,
        Reject::Auth,
        Reject::Vrid,
        Reject::Peer,
        Reject::Interval,
        Reject::Addresses,
        Reject::Malformed,
    ];

    /// The metric and status label for this reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::Ttl => "ttl",
            Reject::Version => "version",
            Reject::Checksum => "checksum",
            Reject::Auth => "auth",
            Reject::Vrid => "vrid",
            Reject::Peer => "peer",
            Reject::Interval => "interval",
            Reject::Addresses => "addresses",
            Reject::Malformed => "malformed",
        }
    }
}

/// The advert's bytes (no IP header) with the checksum filled in, as sent from `src`
/// to `dst`. v3 over IPv4 needs the real `dst` (the multicast group or the unicast
/// peer): it is part of the checksum.
pub fn encode(a: &Advert, src: IpAddr, dst: IpAddr) -> Result<Vec<u8>, PacketError> {
    if a.vrid == 0 {
        return Err(PacketError::Vrid);
    }
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(PacketError::MixedFamilies { addr: dst, src });
    }
    if let Some(&addr) = a.addresses.iter().find(|x| x.is_ipv4() != src.is_ipv4()) {
        return Err(PacketError::MixedFamilies { addr, src });
    }
    let count = u8::try_from(a.addresses.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or(PacketError::AddressCount {
            count: a.addresses.len(),
        })?;

    // Bytes 4 and 5: v2 auth type and seconds; v3 reserved bits and centiseconds.
    let word = match a.version {
        Version::V2 => {
            if src.is_ipv6() {
                return Err(PacketError::V2OverIpv6);
            }
            let secs = (a.interval.subsec_nanos() == 0)
                .then(|| u8::try_from(a.interval.as_secs()).ok())
                .flatten()
                .filter(|&s| s > 0)
                .ok_or(PacketError::IntervalV2 {
                    interval: a.interval,
                })?;
            let auth_type = match a.auth {
                Auth::None => AUTH_TYPE_NONE,
                Auth::Password(_) => AUTH_TYPE_PASSWORD,
            };
            [auth_type, secs]
        }
        Version::V3 => {
            if a.auth != Auth::None {
                return Err(PacketError::AuthOnV3);
            }
            let centis = v3_centis(a.interval).ok_or(PacketError::IntervalV3 {
                interval: a.interval,
            })?;
            centis.to_be_bytes()
        }
    };

    let mut msg = Vec::with_capacity(message_len(a.version, src, a.addresses.len()));
    msg.extend_from_slice(&[
        (a.version.number() << 4) | TYPE_ADVERT,
        a.vrid,
        a.priority,
        count,
        word[0],
        word[1],
        0,
        0,
    ]);
    for addr in &a.addresses {
        match addr {
            IpAddr::V4(v4) => msg.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => msg.extend_from_slice(&v6.octets()),
        }
    }
    if a.version == Version::V2 {
        match a.auth {
            Auth::None => msg.extend_from_slice(&[0; AUTH_LEN]),
            Auth::Password(data) => msg.extend_from_slice(&data),
        }
    }
    let sum = checksum(a.version, &msg, src, dst);
    msg[6..8].copy_from_slice(&sum.to_be_bytes());
    Ok(msg)
}

/// Parses and verifies one advert (no IP header) received from `src` at `dst`, for
/// an instance configured with `version` and (v2) `auth`; `auth` is ignored for v3.
/// Returns [`Reject::Version`], [`Reject::Malformed`], [`Reject::Checksum`] or
/// [`Reject::Auth`]; the other checks are the caller's.
pub fn decode(
    msg: &[u8],
    src: IpAddr,
    dst: IpAddr,
    version: Version,
    auth: &Auth,
) -> Result<Advert, Reject> {
    let Some(&[vers_type, vrid, priority, count, b4, b5, _, _]) = msg.first_chunk::<HEADER_LEN>()
    else {
        return Err(Reject::Malformed);
    };
    if vers_type >> 4 != version.number() || vers_type & 0x0f != TYPE_ADVERT {
        return Err(Reject::Version);
    }
    if src.is_ipv4() != dst.is_ipv4() || (version == Version::V2 && src.is_ipv6()) {
        return Err(Reject::Malformed);
    }
    if msg.len() != message_len(version, src, usize::from(count)) {
        return Err(Reject::Malformed);
    }
    if checksum(version, msg, src, dst) != 0 {
        return Err(Reject::Checksum);
    }

    let addr_end = msg.len() - if version == Version::V2 { AUTH_LEN } else { 0 };
    let raw = &msg[HEADER_LEN..addr_end];
    let addresses = if src.is_ipv4() {
        raw.as_chunks::<4>()
            .0
            .iter()
            .map(|&a| IpAddr::from(a))
            .collect()
    } else {
        raw.as_chunks::<16>()
            .0
            .iter()
            .map(|&a| IpAddr::from(a))
            .collect()
    };

    let (interval, auth) = match version {
        Version::V2 => {
            let data: [u8; AUTH_LEN] = msg[addr_end..].try_into().map_err(|_| Reject::Malformed)?;
            let received = match (b4, auth) {
                (AUTH_TYPE_NONE, Auth::None) => Auth::None,
                (AUTH_TYPE_PASSWORD, Auth::Password(ours)) if data == *ours => Auth::Password(data),
                _ => return Err(Reject::Auth),
            };
            (Duration::from_secs(u64::from(b5)), received)
        }
        Version::V3 => {
            // The 4 reserved bits are ignored on receipt (RFC 5798 section 5.2.6).
            let centis = u16::from_be_bytes([b4, b5]) & 0x0fff;
            (CENTISECOND * u32::from(centis), Auth::None)
        }
    };

    Ok(Advert {
        version,
        vrid,
        priority,
        interval,
        addresses,
        auth,
    })
}

/// The v3 Max Adver Int for `interval`, if it is a whole number of centiseconds
/// from 1 to 4095.
fn v3_centis(interval: Duration) -> Option<u16> {
    let nanos = interval.as_nanos();
    let unit = CENTISECOND.as_nanos();
    if !nanos.is_multiple_of(unit) {
        return None;
    }
    u16::try_from(nanos / unit)
        .ok()
        .filter(|&c| c > 0 && u64::from(c) <= MAX_V3_CENTIS)
}

/// The message length for `count` addresses of `src`'s family.
fn message_len(version: Version, src: IpAddr, count: usize) -> usize {
    let addr_len = if src.is_ipv4() { 4 } else { 16 };
    let auth_len = match version {
        Version::V2 => AUTH_LEN,
        Version::V3 => 0,
    };
    HEADER_LEN + count * addr_len + auth_len
}

/// The Internet checksum of `msg` (v3: preceded by the pseudo-header). With the
/// checksum field zero this is the value to send; over a received message it is 0
/// when the message verifies.
fn checksum(version: Version, msg: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    let mut acc = 0;
    if version == Version::V3 {
        // IPv4 (RFC 768 layout): src, dst, zero, protocol, 16-bit length. IPv6 (RFC
        // 8200 section 8.1): src, dst, 32-bit length, 3 zero bytes, next header.
        // Either way the sum is src + dst + protocol + length.
        for addr in [src, dst] {
            acc = match addr {
                IpAddr::V4(v4) => add_words(&v4.octets(), acc),
                IpAddr::V6(v6) => add_words(&v6.octets(), acc),
            };
        }
        let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
        acc = add_words(&len.to_be_bytes(), acc);
        acc += u32::from(PROTOCOL);
    }
    acc = add_words(msg, acc);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !u16::try_from(acc).unwrap_or(u16::MAX)
}

/// Adds `bytes` to `acc` as big-endian 16-bit words (an odd last byte padded with
/// zero). A message is at most a few KiB, so the 32-bit sum cannot overflow.
fn add_words(bytes: &[u8], mut acc: u32) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 19, 158));
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 19, 159));
    const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 19, 200));
    const GROUP: IpAddr = IpAddr::V4(MULTICAST_V4);

    /// keepalived: `vrrp_version 2`, `virtual_router_id 51`, `priority 100`,
    /// `advert_int 1`, `auth_type PASS`, `auth_pass 123456`, VIP 192.168.19.200.
    fn keepalived_v2() -> Advert {
        Advert {
            version: Version::V2,
            vrid: 51,
            priority: 100,
            interval: Duration::from_secs(1),
            addresses: vec![VIP],
            auth: Auth::password("123456").unwrap(),
        }
    }

    /// The same instance with `vrrp_version 3` (and no authentication).
    fn keepalived_v3() -> Advert {
        Advert {
            version: Version::V3,
            auth: Auth::None,
            ..keepalived_v2()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn v6(last: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
    }

    // Hand derivation, as 16-bit big-endian words:
    //   0x2133  version 2, type 1 | VRID 51 = 0x33
    //   0x6401  priority 100 = 0x64 | 1 address
    //   0x0101  auth type 1 | Adver Int 1 s
    //   0x0000  checksum (zero while summing)
    //   0xc0a8 0x13c8                 192.168.19.200
    //   0x3132 0x3334 0x3536 0x0000   "123456" and two zero bytes of padding
    // Sum = 0x1f441; fold the carry: 0xf441 + 0x1 = 0xf442; complement: 0x0bbd.
    // No pseudo-header in v2, so the addresses of the IP header do not matter.
    const KEEPALIVED_V2_BYTES: [u8; 20] = [
        0x21, 0x33, 0x64, 0x01, 0x01, 0x01, 0x0b, 0xbd, 192, 168, 19, 200, b'1', b'2', b'3', b'4',
        b'5', b'6', 0, 0,
    ];

    // Hand derivation, as 16-bit big-endian words:
    //   message: 0x3133 (v3, type 1 | VRID 51), 0x6401, 0x0064 (Max Adver Int 100 cs),
    //            0x0000 (checksum), 0xc0a8 0x13c8 (the VIP)      sum 0x16a08
    //   pseudo-header: 0xc0a8 0x139e (src .158), 0xc0a8 0x139f (dst .159),
    //            0x0070 (zero | protocol 112), 0x000c (length 12)  sum 0x1a909
    // Total 0x31311; fold: 0x1311 + 0x3 = 0x1314; complement: 0xeceb.
    const KEEPALIVED_V3_UNICAST_BYTES: [u8; 12] = [
        0x31, 0x33, 0x64, 0x01, 0x00, 0x64, 0xec, 0xeb, 192, 168, 19, 200,
    ];

    #[test]
    fn v2_password_advert_matches_hand_derived_keepalived_bytes() {
        assert_eq!(
            encode(&keepalived_v2(), SRC, PEER).unwrap(),
            KEEPALIVED_V2_BYTES
        );
        // The same bytes to the multicast group: v2 has no pseudo-header.
        assert_eq!(
            encode(&keepalived_v2(), SRC, GROUP).unwrap(),
            KEEPALIVED_V2_BYTES
        );
        let auth = Auth::password("123456").unwrap();
        let decoded = decode(&KEEPALIVED_V2_BYTES, SRC, PEER, Version::V2, &auth).unwrap();
        assert_eq!(decoded, keepalived_v2());
    }

    #[test]
    fn v3_ipv4_unicast_advert_matches_hand_derived_keepalived_bytes() {
        assert_eq!(
            encode(&keepalived_v3(), SRC, PEER).unwrap(),
            KEEPALIVED_V3_UNICAST_BYTES
        );
        let decoded = decode(
            &KEEPALIVED_V3_UNICAST_BYTES,
            SRC,
            PEER,
            Version::V3,
            &Auth::None,
        )
        .unwrap();
        assert_eq!(decoded, keepalived_v3());
    }

    #[test]
    fn v3_ipv4_multicast_checksum_covers_the_group_address() {
        // Only the pseudo-header's destination changes: 0xe000 0x0012 instead of
        // 0xc0a8 0x139f. Pseudo-header sum 0x1b4d4, total 0x31edc, folded 0x1edf,
        // complement 0xe120.
        let bytes = encode(&keepalived_v3(), SRC, GROUP).unwrap();
        assert_eq!(bytes[6..8], [0xe1, 0x20]);
        assert_eq!(bytes[..6], KEEPALIVED_V3_UNICAST_BYTES[..6]);
        assert_eq!(bytes[8..], KEEPALIVED_V3_UNICAST_BYTES[8..]);
    }

    #[test]
    fn password_is_zero_padded_and_refused_beyond_eight_bytes() {
        assert_eq!(
            Auth::password("123456").unwrap(),
            Auth::Password(*b"123456\0\0")
        );
        assert_eq!(
            Auth::password("12345678").unwrap(),
            Auth::Password(*b"12345678")
        );
        assert_eq!(
            Auth::password("123456789"),
            Err(PacketError::PasswordTooLong { len: 9 })
        );
    }

    #[test]
    fn password_is_redacted_in_debug_output() {
        let shown = format!("{:?}", keepalived_v2());
        assert!(shown.contains("Password(<redacted>)"), "{shown}");
        assert!(!shown.contains("49"), "{shown}");
    }

    #[test]
    fn v2_without_auth_sends_eight_zero_bytes_and_round_trips() {
        let advert = Advert {
            auth: Auth::None,
            ..keepalived_v2()
        };
        let bytes = encode(&advert, SRC, GROUP).unwrap();
        assert_eq!(bytes.len(), 20);
        assert_eq!(bytes[4], 0, "auth type");
        assert_eq!(bytes[12..], [0; 8]);
        assert_eq!(
            decode(&bytes, SRC, GROUP, Version::V2, &Auth::None).unwrap(),
            advert
        );
    }

    #[test]
    fn v3_ipv4_round_trips_several_addresses_and_a_100ms_interval() {
        let advert = Advert {
            version: Version::V3,
            vrid: 7,
            priority: 254,
            interval: Duration::from_millis(100),
            addresses: vec![VIP, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
            auth: Auth::None,
        };
        let bytes = encode(&advert, SRC, GROUP).unwrap();
        assert_eq!(bytes.len(), 16);
        assert_eq!(bytes[4..6], [0x00, 0x0a], "10 centiseconds");
        assert_eq!(
            decode(&bytes, SRC, GROUP, Version::V3, &Auth::None).unwrap(),
            advert
        );
    }

    #[test]
    fn v3_ipv6_round_trips_with_the_ipv6_pseudo_header() {
        let advert = Advert {
            version: Version::V3,
            vrid: 51,
            priority: 100,
            interval: Duration::from_secs(40) + Duration::from_millis(950),
            addresses: vec![v6(0x200), v6(0x201)],
            auth: Auth::None,
        };
        let dst = IpAddr::V6(MULTICAST_V6);
        let bytes = encode(&advert, v6(1), dst).unwrap();
        assert_eq!(bytes.len(), 8 + 2 * 16);
        assert_eq!(bytes[4..6], [0x0f, 0xff], "4095 centiseconds");
        assert_eq!(
            decode(&bytes, v6(1), dst, Version::V3, &Auth::None).unwrap(),
            advert
        );
        // The source is in the pseudo-header.
        assert_eq!(
            decode(&bytes, v6(2), dst, Version::V3, &Auth::None),
            Err(Reject::Checksum)
        );
    }

    /// The error `encode` gives for `advert` sent from `src` (to a destination of
    /// the same family).
    fn refused(advert: &Advert, src: IpAddr) -> PacketError {
        let dst = if src.is_ipv4() {
            PEER
        } else {
            IpAddr::V6(MULTICAST_V6)
        };
        encode(advert, src, dst).unwrap_err()
    }

    #[test]
    fn encode_refuses_intervals_the_version_cannot_carry() {
        let v2 = |interval| Advert {
            interval,
            ..keepalived_v2()
        };
        let v3 = |interval| Advert {
            interval,
            ..keepalived_v3()
        };
        for interval in [ms(1500), ms(256_000), Duration::ZERO] {
            assert_eq!(
                refused(&v2(interval), SRC),
                PacketError::IntervalV2 { interval }
            );
        }
        for interval in [ms(15), ms(40_960), Duration::ZERO, Duration::from_nanos(1)] {
            assert_eq!(
                refused(&v3(interval), SRC),
                PacketError::IntervalV3 { interval }
            );
        }
        // The limits themselves fit.
        assert!(encode(&v2(ms(255_000)), SRC, PEER).is_ok());
        assert!(encode(&v3(ms(10)), SRC, PEER).is_ok());
        assert!(encode(&v3(ms(40_950)), SRC, PEER).is_ok());
    }

    #[test]
    fn encode_refuses_wrong_families_auth_on_v3_address_counts_and_vrid_0() {
        let v2 = keepalived_v2();
        let v3 = keepalived_v3();
        let only_v6 = Advert {
            addresses: vec![v6(0x200)],
            ..v2.clone()
        };
        assert_eq!(refused(&only_v6, v6(1)), PacketError::V2OverIpv6);
        let password = Advert {
            auth: Auth::password("x").unwrap(),
            ..v3.clone()
        };
        assert_eq!(refused(&password, SRC), PacketError::AuthOnV3);
        let mixed = Advert {
            addresses: vec![VIP, v6(0x200)],
            ..v3.clone()
        };
        assert_eq!(
            refused(&mixed, SRC),
            PacketError::MixedFamilies {
                addr: v6(0x200),
                src: SRC
            }
        );
        assert_eq!(
            encode(&v3, SRC, v6(1)),
            Err(PacketError::MixedFamilies {
                addr: v6(1),
                src: SRC
            })
        );
        for count in [0, 256] {
            let advert = Advert {
                addresses: vec![VIP; count],
                ..v3.clone()
            };
            assert_eq!(refused(&advert, SRC), PacketError::AddressCount { count });
        }
        assert_eq!(refused(&Advert { vrid: 0, ..v3 }, SRC), PacketError::Vrid);
    }

    #[test]
    fn reject_labels_are_the_metric_labels() {
        let labels: Vec<_> = Reject::ALL.iter().map(Reject::reason).collect();
        assert_eq!(
            labels,
            [
                "ttl",
                "version",
                "checksum",
                "auth",
                "vrid",
                "peer",
                "interval",
                "addresses",
                "malformed"
            ]
        );
    }

    #[test]
    fn reject_version_for_the_other_version_or_a_non_advert_type() {
        let auth = Auth::password("123456").unwrap();
        assert_eq!(
            decode(&KEEPALIVED_V2_BYTES, SRC, PEER, Version::V3, &Auth::None),
            Err(Reject::Version)
        );
        assert_eq!(
            decode(&KEEPALIVED_V3_UNICAST_BYTES, SRC, PEER, Version::V2, &auth),
            Err(Reject::Version)
        );
        let mut other_type = KEEPALIVED_V2_BYTES;
        other_type[0] = 0x22;
        assert_eq!(
            decode(&other_type, SRC, PEER, Version::V2, &auth),
            Err(Reject::Version)
        );
    }

    #[test]
    fn reject_checksum_for_a_flipped_bit_or_the_wrong_pseudo_header() {
        let auth = Auth::password("123456").unwrap();
        let mut flipped = KEEPALIVED_V2_BYTES;
        flipped[11] ^= 1; // 192.168.19.201
        assert_eq!(
            decode(&flipped, SRC, PEER, Version::V2, &auth),
            Err(Reject::Checksum)
        );
        // A unicast v3 advert checksummed as if sent to the multicast group, as
        // keepalived 1.3.6 and earlier did (and later ones do with
        // `old_unicast_checksum`).
        let group_summed = encode(&keepalived_v3(), SRC, GROUP).unwrap();
        assert_eq!(
            decode(&group_summed, SRC, PEER, Version::V3, &Auth::None),
            Err(Reject::Checksum)
        );
    }

    #[test]
    fn reject_auth_when_password_or_auth_type_differ() {
        let other = Auth::password("1234567").unwrap();
        assert_eq!(
            decode(&KEEPALIVED_V2_BYTES, SRC, PEER, Version::V2, &other),
            Err(Reject::Auth)
        );
        // We expect no authentication, the packet carries a password.
        assert_eq!(
            decode(&KEEPALIVED_V2_BYTES, SRC, PEER, Version::V2, &Auth::None),
            Err(Reject::Auth)
        );
        // We expect a password, the packet carries none.
        let none = encode(
            &Advert {
                auth: Auth::None,
                ..keepalived_v2()
            },
            SRC,
            PEER,
        )
        .unwrap();
        let ours = Auth::password("123456").unwrap();
        assert_eq!(
            decode(&none, SRC, PEER, Version::V2, &ours),
            Err(Reject::Auth)
        );
    }

    #[test]
    fn reject_malformed_for_short_inconsistent_or_wrong_family_adverts() {
        let auth = Auth::password("123456").unwrap();
        let v2 = KEEPALIVED_V2_BYTES;
        let v3 = KEEPALIVED_V3_UNICAST_BYTES;
        // Shorter than the fixed header.
        assert_eq!(
            decode(&v2[..7], SRC, PEER, Version::V2, &auth),
            Err(Reject::Malformed)
        );
        // The password cut off.
        assert_eq!(
            decode(&v2[..19], SRC, PEER, Version::V2, &auth),
            Err(Reject::Malformed)
        );
        // Count says 2 addresses, the packet holds 1.
        let mut count = v3;
        count[3] = 2;
        assert_eq!(
            decode(&count, SRC, PEER, Version::V3, &Auth::None),
            Err(Reject::Malformed)
        );
        // Trailing bytes.
        let mut long = v3.to_vec();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(
            decode(&long, SRC, PEER, Version::V3, &Auth::None),
            Err(Reject::Malformed)
        );
        // IPv4-sized addresses from an IPv6 source.
        assert_eq!(
            decode(&v3, v6(1), v6(2), Version::V3, &Auth::None),
            Err(Reject::Malformed)
        );
        // Source and destination of different families.
        assert_eq!(
            decode(&v3, SRC, v6(2), Version::V3, &Auth::None),
            Err(Reject::Malformed)
        );
        // VRRPv2 over IPv6.
        assert_eq!(
            decode(&v2, v6(1), v6(2), Version::V2, &auth),
            Err(Reject::Malformed)
        );
    }
}
