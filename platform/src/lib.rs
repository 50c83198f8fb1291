//! Talking to this Linux box: cgroup detection, the agent's nftables firewall and persistent disks.
//!
//! `platform` never depends on `agent`, `mbus` or `jobs`; the agent wires it in.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod datadir;
pub mod disk;
pub mod files;
pub mod firewall;
pub mod mountinfo;
pub mod vitals;
