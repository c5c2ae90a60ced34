//! Placeholder: the VRRP state machine.
