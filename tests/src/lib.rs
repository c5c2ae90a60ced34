//! apilb's test harness, shared by the scenario tests in `tests/tests/`.
//!
//! - [`netns`]: network namespaces that clean up after themselves, even on panic.
//! - [`packets`]: declarative TCP/IP packets, built and checksummed by etherparse
//!   (independently of the datapath's own checksum code), and a readable dump.
//! - [`fixture`]: Katran-style packet fixtures run through `BPF_PROG_TEST_RUN`
//!   against a datapath provisioned as `apilb run` provisions it: a validated
//!   config, written into the maps by the controller.
//! - [`flowfx`]: the fixtures' flows: the lab's masters and clients, and each
//!   segment of a flow's life as the datapath must rewrite it.
//! - [`cluster`]: a client, a router, LB nodes and masters on an L2 segment, in
//!   namespaces, for tests that send real frames.
//! - [`elect`]: two LB nodes running apilb or keepalived for one VIP, and who
//!   holds and serves it.
//! - [`live`]: the processes that run there: echo masters, clients, stub
//!   apiservers and `apilb run`.
//! - [`plane`]: all of it started in one call: topology, CA, stub apiservers, apilb.
//! - [`traffic`]: new https connections and watch streams through the VIP, recorded
//!   per master, for the scenarios and the demo.
//! - [`lbdeath`]: an LB node dies under load (30 watch streams, 100 new https
//!   connections a second, kubectl): what broke, what failed, what waited.
//! - [`pki`]: a CA and certificates for the stub apiservers.
//! - [`endpointslice`] and [`sliceapi`]: the `default/kubernetes` `EndpointSlice` a
//!   test writes to a file and the stub apiservers serve on list and watch.
//! - [`model`]: a reference model of the XDP datapath, and the fuzzer that holds
//!   the kernel's program against it frame by frame (`cargo xtask fuzz`).
//! - [`natstate`]: apilb's NAT counters by name and its flow tables' occupancy,
//!   for datapaths before and after per-state timeouts alike.
//! - [`oneshot`]: one HTTP request per connection, the side that closes first
//!   chosen, checked to the last byte: the benchmarks' client-first load and the
//!   soak's.
//! - [`preload`]: established flows copied into a running apilb's pinned tables,
//!   to time a bulk resync at a full table's size.
//! - [`flood`]: an attacker on the segment flooding the LB node with raw frames.
//! - [`alerts`]: the series the shipped alerting rules name, held against a real
//!   `/metrics`.
//! - [`capture`]: the frames an interface receives and sends, by `AF_PACKET`.

pub mod alerts;
pub mod capture;
pub mod cluster;
pub mod elect;
pub mod endpointslice;
pub mod fixture;
pub mod flood;
pub mod flowfx;
pub mod lbdeath;
pub mod least;
pub mod live;
pub mod model;
pub mod natstate;
pub mod netns;
pub mod nodelocal;
pub mod oneshot;
pub mod packets;
pub mod pki;
pub mod plane;
pub mod preload;
pub mod proxies;
pub mod report;
pub mod sliceapi;
pub mod traffic;
