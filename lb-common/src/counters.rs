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

/// Number of outcome counters: indices `0..OUTCOMES` sum to the packet count.
pub const OUTCOMES: u32 = 19;

/// Event: a new flow was recorded. (Packets on existing flows are not counted here:
/// they are the VIP's packets minus its new flows, from `VIP_STATS`.)
pub const FLOW_NEW: u32 = 19;
/// Event: a backend's reply matched a flow under NAT.
pub const REPLY_HIT: u32 = 20;
/// Event: the FIB was asked for a next hop (new flow, cached one expired, or a
/// packet larger than the path has carried so far).
pub const FIB_LOOKUP: u32 = 21;
/// Event: a NAT port held by a closed or idle flow was reclaimed for a new one.
pub const PORT_RECLAIMED: u32 = 22;
/// Event: a client sent a SYN again on a flow its backend never answered (passive
/// detection): the flow was forgotten and the SYN balanced as a new flow, away
/// from that backend. (A SYN sent again after a refusal is balanced the same way,
/// and counted as the refusal.)
pub const PASSIVE_SILENT: u32 = 23;
/// Event: a new flow's Maglev slot named a backend out of rotation (or the one
/// that just left its SYN unanswered), and the flow went to the next one along
/// the fallback order instead.
pub const FALLBACK: u32 = 24;

/// Size of the `COUNTERS` array.
pub const COUNTER_COUNT: u32 = 25;

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
    "flow_new",
    "reply_hit",
    "fib_lookup",
    "port_reclaimed",
    "passive_silent",
    "fallback",
];
