//! The datapath's maps, as one table that both sides read.
//!
//! lb-ebpf builds each `#[map]` static from its [`MapSpec`] here, with a
//! compile-time check that the static's key and value types have the spec's sizes;
//! userspace opens, pins and checks every map by the same spec. A map's name, kind,
//! key size, value size and entry count are therefore written exactly once.
//!
//! This table is compile-time data and never sits in a map, so unlike the shared
//! structs it may use `Option`, `bool` and an `enum`.
//!
//! What userspace can check of each map (`bpf_map_info`): its type, key size and
//! entry count always; its value size wherever [`MapSpec::value_size`] is `Some`.
//! That covers the maps whose value the kernel defines too: `TX_PORTS` holds the
//! kernel's `struct bpf_devmap_val`, and `PASSIVE_EVENTS`, a ring buffer, has key and
//! value size 0 and its byte size as its entry count. Only `SCRATCH`'s value is
//! private to the kernel object, so only its type, key size and entry count are.

use crate::{
    Backend, COUNTER_COUNT, DatapathConfig, FLOW_TABLE_SIZE, FlowKey, FlowState,
    HALF_OPEN_TABLE_SIZE, MAGLEV_ENTRIES, MAX_BACKENDS, MAX_TX_PORTS, MAX_VIPS,
    PASSIVE_EVENTS_BYTES, PassiveState, PassiveStats, ReplyState, SYNC_EVENTS_BYTES, SockOrig,
    TrafficStats, VipInfo, VipKey,
};

/// A map's `BPF_MAP_TYPE_*`, with the kernel's (uapi) numbers, as `bpf_map_info`
/// reports it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    DevMapHash = 25,
    RingBuf = 27,
}

/// One map of the datapath object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The map's name: the identifier of its `#[map]` static in lb-ebpf, and the
    /// file name of its pin.
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    /// `None` where the value is private to the kernel object (`SCRATCH`).
    pub value_size: Option<u32>,
    /// The entry count the object is built with; for a ring buffer, its bytes.
    pub max_entries: u32,
    /// Whether the loader replaces `max_entries` with a configured size.
    pub sized_by: Sizing,
}

/// Where a map's real entry count comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// `MapSpec::max_entries`, as built.
    Fixed,
    /// `LoadOptions::flow_table_size` (`FLOWS`, `REPLIES`).
    FlowTable,
    /// `LoadOptions::half_open_table_size` (`HALF_FLOWS`, `HALF_REPLIES`).
    HalfOpenTable,
}

/// Value size of a devmap: the kernel's `struct bpf_devmap_val`, an interface index
/// and a program to run on it (aya-ebpf's `DevMapHash` declares it whole; the kernel
/// would also accept the index alone).
pub const DEVMAP_VALUE_SIZE: u32 = 8;

/// `size_of::<T>()` as a map's key or value size.
#[expect(
    clippy::cast_possible_truncation,
    reason = "every shared type is a few dozen bytes (see the size asserts in lib.rs)"
)]
const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

const fn spec(
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size,
        value_size: Some(value_size),
        max_entries,
        sized_by: Sizing::Fixed,
    }
}

/// VIP (address, port, protocol) -> its id, flags and ring size.
pub const VIPS: MapSpec = spec(
    "VIPS",
    MapType::Hash,
    size::<VipKey>(),
    size::<VipInfo>(),
    MAX_VIPS,
);
/// Backend id -> address, flags and fallback.
pub const BACKENDS: MapSpec = spec(
    "BACKENDS",
    MapType::Array,
    4,
    size::<Backend>(),
    MAX_BACKENDS,
);
/// Backend ids, one ring of `MAGLEV_SIZE_MAX` slots per VIP id.
pub const MAGLEV: MapSpec = spec("MAGLEV", MapType::Array, 4, 4, MAGLEV_ENTRIES);
/// Established client flow (client -> VIP) -> its backend, NAT port, TCP state
/// and next hop.
pub const FLOWS: MapSpec = MapSpec {
    sized_by: Sizing::FlowTable,
    ..spec(
        "FLOWS",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<FlowState>(),
        FLOW_TABLE_SIZE,
    )
};
/// An established flow's reply (backend -> SNAT address:port) -> the client and
/// VIP to restore; the lease on a NAT port.
pub const REPLIES: MapSpec = MapSpec {
    sized_by: Sizing::FlowTable,
    ..spec(
        "REPLIES",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<ReplyState>(),
        FLOW_TABLE_SIZE,
    )
};
/// As `FLOWS`, for flows whose handshake is not complete: a SYN flood evicts only
/// these.
pub const HALF_FLOWS: MapSpec = MapSpec {
    sized_by: Sizing::HalfOpenTable,
    ..spec(
        "HALF_FLOWS",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<FlowState>(),
        HALF_OPEN_TABLE_SIZE,
    )
};
/// As `REPLIES`, for flows whose handshake is not complete.
pub const HALF_REPLIES: MapSpec = MapSpec {
    sized_by: Sizing::HalfOpenTable,
    ..spec(
        "HALF_REPLIES",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<ReplyState>(),
        HALF_OPEN_TABLE_SIZE,
    )
};
/// The one node-wide `DatapathConfig`.
pub const CONFIG: MapSpec = spec("CONFIG", MapType::Array, 4, size::<DatapathConfig>(), 1);
/// Per CPU: the counters of `crate::counters`.
pub const COUNTERS: MapSpec = spec("COUNTERS", MapType::PerCpuArray, 4, 8, COUNTER_COUNT);
/// Per CPU, per VIP id: traffic.
pub const VIP_STATS: MapSpec = spec(
    "VIP_STATS",
    MapType::PerCpuArray,
    4,
    size::<TrafficStats>(),
    MAX_VIPS,
);
/// Per CPU, per backend id: traffic.
pub const BACKEND_STATS: MapSpec = spec(
    "BACKEND_STATS",
    MapType::PerCpuArray,
    4,
    size::<TrafficStats>(),
    MAX_BACKENDS,
);
/// Interfaces (by ifindex) that rewritten packets may be redirected to.
pub const TX_PORTS: MapSpec = spec(
    "TX_PORTS",
    MapType::DevMapHash,
    4,
    DEVMAP_VALUE_SIZE,
    MAX_TX_PORTS,
);
/// Per backend id, shared by every CPU: the cursor into the NAT source-port range
/// towards that backend (`lb-ebpf`'s `ports`).
pub const PORT_CURSOR: MapSpec = spec("PORT_CURSOR", MapType::Array, 4, 4, MAX_BACKENDS);
/// Per CPU: the kernel's scratch space (lb-ebpf's `Scratch`); userspace never reads
/// or writes it. Its value size is the object's: a reused pin too small for it
/// fails the verifier at load, which checks every access against the map's size.
pub const SCRATCH: MapSpec = MapSpec {
    value_size: None,
    ..spec("SCRATCH", MapType::PerCpuArray, 4, 0, 1)
};
/// Per CPU, per backend id: failures seen on the wire (passive detection).
pub const PASSIVE_STATS: MapSpec = spec(
    "PASSIVE_STATS",
    MapType::PerCpuArray,
    4,
    size::<PassiveStats>(),
    MAX_BACKENDS,
);
/// Passive failure events for the controller: a ring buffer of `PASSIVE_EVENTS_BYTES`.
pub const PASSIVE_EVENTS: MapSpec = spec(
    "PASSIVE_EVENTS",
    MapType::RingBuf,
    0,
    0,
    PASSIVE_EVENTS_BYTES,
);
/// Synced flows' events for the controller to send to its peers: a ring buffer
/// of `SYNC_EVENTS_BYTES`.
pub const SYNC_EVENTS: MapSpec = spec("SYNC_EVENTS", MapType::RingBuf, 0, 0, SYNC_EVENTS_BYTES);
/// Per backend id: failures in a row, and when its last event was sent.
pub const PASSIVE_STATE: MapSpec = spec(
    "PASSIVE_STATE",
    MapType::Array,
    4,
    size::<PassiveState>(),
    MAX_BACKENDS,
);
/// Socket cookie -> the address a node-local socket asked for.
pub const SOCK_ORIG: MapSpec = spec(
    "SOCK_ORIG",
    MapType::LruHash,
    8,
    size::<SockOrig>(),
    FLOW_TABLE_SIZE,
);
/// Per CPU, per backend id: node-local connects sent to it.
pub const LOCAL_STATS: MapSpec = spec("LOCAL_STATS", MapType::PerCpuArray, 4, 8, MAX_BACKENDS);

/// Every map the datapath object defines, for pinning and for the loader's checks.
pub const MAPS: [MapSpec; 20] = [
    VIPS,
    BACKENDS,
    MAGLEV,
    FLOWS,
    REPLIES,
    HALF_FLOWS,
    HALF_REPLIES,
    CONFIG,
    COUNTERS,
    VIP_STATS,
    BACKEND_STATS,
    TX_PORTS,
    PORT_CURSOR,
    SCRATCH,
    PASSIVE_STATS,
    PASSIVE_EVENTS,
    PASSIVE_STATE,
    SYNC_EVENTS,
    SOCK_ORIG,
    LOCAL_STATS,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LAYOUT_VERSION;

    #[test]
    fn names_are_unique_identifiers() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{} is not the identifier of a static",
                m.name
            );
            assert!(
                MAPS[..i].iter().all(|other| other.name != m.name),
                "{} is listed twice",
                m.name
            );
        }
    }

    #[test]
    fn only_the_flow_tables_are_resized_at_load() {
        for m in MAPS {
            let expected = if m == FLOWS || m == REPLIES {
                Sizing::FlowTable
            } else if m == HALF_FLOWS || m == HALF_REPLIES {
                Sizing::HalfOpenTable
            } else {
                Sizing::Fixed
            };
            assert_eq!(m.sized_by, expected, "{}", m.name);
        }
    }

    #[test]
    fn only_scratch_hides_its_value_size() {
        for m in MAPS {
            assert_eq!(m.value_size.is_none(), m == SCRATCH, "{}", m.name);
        }
    }

    #[test]
    fn ring_buffer_is_a_power_of_two_of_pages() {
        assert!(PASSIVE_EVENTS.max_entries.is_power_of_two());
        assert_eq!(PASSIVE_EVENTS.max_entries % 4096, 0);
    }

    /// The table is part of the pinned layout: a change to any map's type, sizes or
    /// entries must come with a new `LAYOUT_VERSION` (and a new fingerprint here),
    /// or an upgraded apilb would reuse pinned maps of the old shape.
    #[test]
    fn layout_version_covers_the_table() {
        // FNV-1a over every field of every spec.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for m in MAPS {
            eat(m.name.as_bytes());
            eat(&(m.map_type as u32).to_le_bytes());
            eat(&m.key_size.to_le_bytes());
            eat(&m.value_size.unwrap_or(u32::MAX).to_le_bytes());
            eat(&m.max_entries.to_le_bytes());
            eat(&[m.sized_by as u8]);
        }
        assert_eq!(
            (LAYOUT_VERSION, h),
            (13, 0xca6b_2073_e7da_5a45),
            "bump LAYOUT_VERSION, then the fingerprint"
        );
    }
}
