//! Indices into the per-CPU `COUNTERS` array.
//!
//! Every packet the XDP program sees bumps exactly one *outcome* counter, so the sum of
//! the outcomes is the packet count and each verdict is the sum of its reasons. The
//! *event* counters after them count flow-table activity and may overlap outcomes.
//! Names and indices live here so that metrics and tests never use a magic offset.

/// Not IPv4 or IPv6 (ARP, LLDP, ...): passed.
pub const PASS_NOT_IP: u32 = 0;
/// IP but not TCP, including UDP to a VIP's port, IPv6 extension headers and ICMP
/// other than destination unreachable about TCP: passed.
pub const PASS_NOT_TCP: u32 = 1;
/// An IPv4 fragment or an IPv6 fragment header: passed untouched.
pub const PASS_FRAGMENT: u32 = 2;
/// Headers cut short or inconsistent (IHL, version, total length): passed
/// untouched for the stack to judge.
pub const PASS_MALFORMED: u32 = 3;
/// TCP that is neither for a VIP nor a reply to a flow under NAT, or an ICMP
/// destination unreachable about no half-open flow under NAT: passed.
pub const PASS_NOT_VIP: u32 = 4;
/// For a VIP that this node does not own: passed.
pub const PASS_NOT_OWNED: u32 = 5;
/// The chosen backend is this node: passed unmodified to the local stack.
pub const PASS_LOCAL_BACKEND: u32 = 6;
/// Rewritten, but VLAN-tagged: handed to the stack, which routes the tagged frame.
pub const PASS_VLAN: u32 = 7;
/// Rewritten, but the FIB or neighbour lookup missed: the stack routes it.
pub const PASS_FIB_MISS: u32 = 8;
/// Rewritten, but the egress interface is not in `TX_PORTS`: the stack routes it.
pub const PASS_NO_TX_PORT: u32 = 9;
/// The VIP's Maglev slot holds no backend, or one of another address family: dropped.
pub const DROP_NO_BACKEND: u32 = 10;
/// No free NAT source port for this backend: dropped.
pub const DROP_NO_NAT_PORT: u32 = 11;
/// No SNAT address is configured for the packet's family: dropped.
pub const DROP_NO_SNAT_ADDR: u32 = 12;
/// The flow table refused the new entry: dropped (a reply could not be matched).
pub const DROP_FLOW_INSERT: u32 = 13;
/// Not a SYN, and no flow: passed, untouched, for the stack to answer (with the VIP
/// held locally, a RST, so the client reconnects at once instead of timing out).
pub const PASS_NO_FLOW: u32 = 14;
/// Rewritten and sent back out of the interface it came in on.
pub const TX: u32 = 15;
/// Rewritten and redirected to another interface through `TX_PORTS`.
pub const REDIRECT: u32 = 16;
/// A backend answered a SYN it was sent with a RST (nothing listens there: a
/// dead apiserver on a live host), passive detection is on: the RST is dropped and
/// the half-open flow marked refused (`FLOW_F_REFUSED`), so the client's SYN
/// retransmit goes to another backend instead of the client failing.
pub const DROP_PASSIVE_RST: u32 = 17;
/// An ICMP destination unreachable about a SYN the backend never answered, with
/// passive detection on: dropped, and the half-open flow marked refused, as for a
/// RST.
pub const DROP_PASSIVE_ICMP: u32 = 18;

/// A RST or ICMP error about a SYN its backend never answered that does not
/// match that SYN (a RST that does not acknowledge it, an ICMP error quoting
/// another sequence number): forged or stale, dropped, the flow left as it was.
/// (The client's stack would drop such a RST too.)
pub const DROP_UNPROVEN_REFUSAL: u32 = 19;
/// A SYN to a VIP that syncs, or a master's SYN-ACK on such a VIP's half-open
/// flow, while this node's controller is gone (its sync listener is not there:
/// killed, or not started yet): dropped, so that the client's SYN retransmit
/// reaches the node taking the VIP over, rather than opening a flow that no peer
/// will ever hold.
pub const DROP_SYNC_DOWN: u32 = 20;
/// Number of outcome counters: indices `0..OUTCOMES` sum to the packet count.
pub const OUTCOMES: u32 = 21;

/// Event: a new flow was recorded. (Packets on existing flows are not counted here:
/// they are the VIP's packets minus its new flows, from `VIP_STATS`.)
pub const FLOW_NEW: u32 = 21;
/// Event: a backend's reply matched a flow under NAT.
pub const REPLY_HIT: u32 = 22;
/// Event: the FIB was asked for a next hop (new flow, cached one expired, or a
/// packet larger than the path has carried so far).
pub const FIB_LOOKUP: u32 = 23;
/// Event: a NAT port held by a half-open flow, silent for its state's timeout
/// (`ct`), was given to a new flow.
pub const RECLAIM_HALF_OPEN: u32 = 24;
/// Event: a client sent a SYN again on a flow its backend never answered (passive
/// detection): the flow was forgotten and the SYN balanced as a new flow, away
/// from that backend. (A SYN sent again after a refusal is balanced the same way,
/// and counted as the refusal.)
pub const PASSIVE_SILENT: u32 = 25;
/// Event: a new flow's Maglev slot named a backend out of rotation (or the one
/// that just left its SYN unanswered), and the flow went to the next one along
/// the fallback order instead.
pub const FALLBACK: u32 = 26;

/// Event: a NAT port held by an established flow idle for its timeout was given
/// to a new flow.
pub const RECLAIM_IDLE: u32 = 27;
/// Event: a NAT port held by a closing or closed flow (a FIN or RST went by)
/// whose state's timeout had passed was given to a new flow.
pub const RECLAIM_CLOSED: u32 = 28;
/// Event: a NAT port whose lease had lost its flow (evicted, or replaced by
/// another flow of the same client tuple) was given to a new flow.
pub const RECLAIM_ORPHAN: u32 = 29;
/// Event: a half-open flow's handshake completed (the client acknowledged the
/// backend's SYN-ACK): it moved to the established tables.
pub const FLOW_ESTABLISHED: u32 = 30;
/// Event: a handshake completed on a half-open flow whose port lease had been
/// evicted (a flood of half-open flows filled their table); the segment passed
/// to the stack, which resets it, and the client connects again.
pub const HALF_OPEN_LOST: u32 = 31;
/// Event: an established flow's reply entry had been evicted from its table and
/// was put back.
pub const REPLY_RESTORED: u32 = 32;

/// Event: a RST on an answered flow whose sequence number was not near the one
/// the flow last recorded (`ct::near`): passed on for the endpoint to judge, and
/// the flow kept its state, so that a forged RST cannot free its port.
pub const RST_UNPROVEN: u32 = 33;
/// Event: an ICMP fragmentation needed or packet too big about a flow under NAT
/// was translated back to the flow's client (`toobig`).
pub const ICMP_TOO_BIG_TRANSLATED: u32 = 34;
/// Event: a FIN on an answered flow that is not near where its flow is (`ct::
/// fin_proven`): passed on for the endpoint to judge, and the flow kept its
/// state, so that a forged FIN cannot shorten its port's hold.
pub const FIN_UNPROVEN: u32 = 35;
/// Event: a synced flow's event found `SYNC_EVENTS` full and was lost; the
/// controller's next bulk resync repairs what its peers miss.
pub const SYNC_EVENT_LOST: u32 = 36;
/// Event: a TCP segment arrived with a partial checksum (a veth or tap peer's
/// offload: the field holds only the pseudo-header's sum) and the datapath
/// completed it before rewriting the segment (`lb-ebpf`'s `offload`).
pub const CSUM_PARTIAL: u32 = 37;
/// Size of the `COUNTERS` array.
pub const COUNTER_COUNT: u32 = 38;
const _: () = assert!(OUTCOMES <= COUNTER_COUNT);

/// Metric-friendly names, indexed by counter.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "pass_not_ip",
    "pass_not_tcp",
    "pass_fragment",
    "pass_malformed",
    "pass_not_vip",
    "pass_not_owned",
    "pass_local_backend",
    "pass_vlan",
    "pass_fib_miss",
    "pass_no_tx_port",
    "drop_no_backend",
    "drop_no_nat_port",
    "drop_no_snat_addr",
    "drop_flow_insert",
    "pass_no_flow",
    "tx",
    "redirect",
    "drop_passive_rst",
    "drop_passive_icmp",
    "drop_unproven_refusal",
    "drop_sync_down",
    "flow_new",
    "reply_hit",
    "fib_lookup",
    "reclaim_half_open",
    "passive_silent",
    "fallback",
    "reclaim_idle",
    "reclaim_closed",
    "reclaim_orphan",
    "flow_established",
    "half_open_lost",
    "reply_restored",
    "rst_unproven",
    "icmp_too_big_translated",
    "fin_unproven",
    "sync_event_lost",
    "csum_partial",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every counter by its constant and the name a metric shows it under.
    const NAMED: [(u32, &str); COUNTER_COUNT as usize] = [
        (PASS_NOT_IP, "pass_not_ip"),
        (PASS_NOT_TCP, "pass_not_tcp"),
        (PASS_FRAGMENT, "pass_fragment"),
        (PASS_MALFORMED, "pass_malformed"),
        (PASS_NOT_VIP, "pass_not_vip"),
        (PASS_NOT_OWNED, "pass_not_owned"),
        (PASS_LOCAL_BACKEND, "pass_local_backend"),
        (PASS_VLAN, "pass_vlan"),
        (PASS_FIB_MISS, "pass_fib_miss"),
        (PASS_NO_TX_PORT, "pass_no_tx_port"),
        (DROP_NO_BACKEND, "drop_no_backend"),
        (DROP_NO_NAT_PORT, "drop_no_nat_port"),
        (DROP_NO_SNAT_ADDR, "drop_no_snat_addr"),
        (DROP_FLOW_INSERT, "drop_flow_insert"),
        (PASS_NO_FLOW, "pass_no_flow"),
        (TX, "tx"),
        (REDIRECT, "redirect"),
        (DROP_PASSIVE_RST, "drop_passive_rst"),
        (DROP_PASSIVE_ICMP, "drop_passive_icmp"),
        (DROP_UNPROVEN_REFUSAL, "drop_unproven_refusal"),
        (DROP_SYNC_DOWN, "drop_sync_down"),
        (FLOW_NEW, "flow_new"),
        (REPLY_HIT, "reply_hit"),
        (FIB_LOOKUP, "fib_lookup"),
        (RECLAIM_HALF_OPEN, "reclaim_half_open"),
        (PASSIVE_SILENT, "passive_silent"),
        (FALLBACK, "fallback"),
        (RECLAIM_IDLE, "reclaim_idle"),
        (RECLAIM_CLOSED, "reclaim_closed"),
        (RECLAIM_ORPHAN, "reclaim_orphan"),
        (FLOW_ESTABLISHED, "flow_established"),
        (HALF_OPEN_LOST, "half_open_lost"),
        (REPLY_RESTORED, "reply_restored"),
        (RST_UNPROVEN, "rst_unproven"),
        (ICMP_TOO_BIG_TRANSLATED, "icmp_too_big_translated"),
        (FIN_UNPROVEN, "fin_unproven"),
        (SYNC_EVENT_LOST, "sync_event_lost"),
        (CSUM_PARTIAL, "csum_partial"),
    ];

    #[test]
    fn each_constant_indexes_its_own_name() {
        for (index, name) in NAMED {
            assert_eq!(COUNTER_NAMES[index as usize], name, "counter {index}");
        }
    }

    #[test]
    fn indices_and_names_are_unique_and_cover_the_array() {
        let mut seen = [false; COUNTER_COUNT as usize];
        for (index, name) in NAMED {
            assert!(!seen[index as usize], "index {index} is used twice");
            seen[index as usize] = true;
            let same = COUNTER_NAMES.iter().filter(|n| **n == name).count();
            assert_eq!(same, 1, "{name}");
        }
        assert!(seen.iter().all(|s| *s));
    }

    /// Outcomes (one per packet: a pass or drop reason, TX or redirect) come first,
    /// so that `0..OUTCOMES` sums to the packet count; events come after.
    #[test]
    fn outcomes_come_before_events() {
        for (index, name) in NAMED {
            let outcome = name.starts_with("pass_")
                || name.starts_with("drop_")
                || name == "tx"
                || name == "redirect";
            assert_eq!(index < OUTCOMES, outcome, "{name} at {index}");
        }
    }
}
