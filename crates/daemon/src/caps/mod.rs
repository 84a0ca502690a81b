//! The built-in capabilities (see [`crate::capability`]).

pub mod contain;
pub mod dns;
pub mod network;
pub mod ports;
