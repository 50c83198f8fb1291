//! Talking to this Linux box: cgroup detection, the agent's nftables firewall and persistent disks.
//!
//! `platform` never depends on `agent`, `mbus` or `jobs`; the agent wires it in.
#![forbid(unsafe_code)]

pub mod arp;
pub mod cgroup;
pub mod datadir;
pub mod disk;
pub mod dns;
pub mod files;
pub mod firewall;
pub mod mountinfo;
pub mod power;
pub mod settings_source;
pub mod users;
pub mod vitals;
