//! Talking to this Linux box: cgroups, the agent's nftables firewall, persistent disks, ssh
//! users, DNS records, ARP, power, settings sources of the IaaS, vitals.
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
