//! VRRP for VIP ownership (see [`crate::election`]).

pub mod fsm;
pub mod packet;
