//! Flow sync between LB nodes (NAT mode): the node that owns an elected VIP streams
//! its established flows (client, backend, NAT port, TCP state) to its peers, so
//! that a node taking the VIP over after a crash, a cable cut or a handover already
//! holds every flow, and no client connection through the VIP notices the move.
//!
//! The peers only park what they receive: a synced flow is used once its VIP is
//! owned here. Anything that arrives is authenticated with the cluster's sync key
//! first, because whoever can write flows can steer traffic.

pub mod install;
pub mod key;
pub mod links;
pub mod node;
pub mod ready;
#[cfg(test)]
mod testing;
pub mod wire;
