//! Talking to this Linux box: cgroup detection and the agent's nftables firewall.
//!
//! `platform` never depends on `agent`, `mbus` or `jobs`; the agent wires it in.
#![forbid(unsafe_code)]

pub mod arp;
pub mod cgroup;
pub mod datadir;
pub mod dns;
pub mod files;
pub mod firewall;
pub mod mountinfo;
pub mod power;
pub mod settings_source;
pub mod users;
pub mod vitals;
