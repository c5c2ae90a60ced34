//! Placeholder: the VRRP advertisement codec.
