//! apilb's test harness, shared by the scenario tests in `tests/tests/`.
//!
//! - [`netns`]: network namespaces that clean up after themselves, even on panic.
//! - [`packets`]: declarative TCP/IP packets, built and checksummed by etherparse
//!   (independently of the datapath's own checksum code), and a readable dump.
//! - [`fixture`]: Katran-style packet fixtures run through `BPF_PROG_TEST_RUN`
//!   against a datapath provisioned through the production map writer.
//! - [`live`]: client, LB and master namespaces for tests that send real frames.

pub mod fixture;
pub mod live;
pub mod netns;
pub mod packets;
pub mod pki;
