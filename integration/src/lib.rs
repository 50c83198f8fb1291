//! The sandbox the integration tests, the benchmarks and the demo run the real agent in: a
//! fresh network namespace (so the host's ruleset is never touched: every `nft` runs inside
//! it), cgroups created for the occasion under the cgroup2 mount, processes placed "in netns N,
//! cgroup C, as uid U", and the agent and its one-shot commands with a private run directory.
//!
//! ```no_run
//! use integration::{Sandbox, Probe, NOBODY, MONIT_V4};
//! let sb = Sandbox::new("example").expect("sandbox");
//! let agent_cg = sb.cgroup("agent").expect("cgroup");
//! let other = sb.cgroup("other").expect("cgroup");
//! let _monit = sb.listen(MONIT_V4).expect("listener");
//! let _agent = sb.start_agent(&agent_cg, "{}").expect("agent");
//! assert_eq!(sb.probe(&agent_cg, Some(NOBODY), MONIT_V4).expect("probe"), Probe::Connected);
//! assert_eq!(sb.probe(&other, Some(NOBODY), MONIT_V4).expect("probe"), Probe::TimedOut);
//! ```
//!
//! Everything is cleaned up by `Drop`, also when a test fails: processes the harness started
//! are killed by pid (never by name), then the cgroups it created are removed, then the
//! network namespace is unmounted, then the temporary directory is deleted. Processes must be
//! dropped before their [`Sandbox`] (declare them after it, as locals naturally are).
//!
//! Processes are placed and stopped by `testkit` ([`Exec`], [`Proc`]): by pid, never by name.
//!
//! Modules, one idea each: [`prereq`] (root, tools, the cgroup2 mount, the binaries under
//! test), [`netns`], [`cgroup`], [`sandbox`] (the world of one test), [`nft`] (reading the
//! agent's table), [`probe`] (connection attempts from a cgroup as a uid), [`agent`] (the
//! agent process), [`crash`] (table snapshots and seeded kill points), [`fleet`] (many agents on
//! a 3-node NATS cluster), [`monit`], [`nats`]
//! (nats-server, dnsmasq and the director in the sandbox), [`dav`] (testkit's nginx
//! blobstore), [`vm`] (a simulated VM: a mount namespace the agent and monit share, loop
//! devices as its disks), [`sim`] (the director simulator's release and message sequences) and
//! [`bench`] (what the benchmark binaries share).
#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod crash;
pub mod fleet;
pub mod monit;
pub mod nats;
pub mod netns;
pub mod nft;
pub mod prereq;
pub mod probe;
pub mod sandbox;
pub mod sim;
pub mod vm;

use std::time::Duration;

pub use agent::Agent;
pub use cgroup::{Cgroup, CgroupDir, remove_cgroup_tree};
pub use netns::Netns;
pub use nft::JobRule;
pub use prereq::{Tools, cgroup2_mount, check_prerequisites};
pub use probe::Probe;
pub use sandbox::Sandbox;
pub use testkit::dav;
pub use testkit::{
    Error, Exec, Pending, Proc, Result, TempDir, describe, run_with_timeout, wait_for,
};

/// Monit's API on IPv4 loopback: what the agent's table protects.
pub const MONIT_V4: &str = "127.0.0.1:2822";
/// Monit's API on IPv6 loopback.
pub const MONIT_V6: &str = "[::1]:2822";
/// An unprivileged uid for "non-root" processes (nobody).
pub const NOBODY: u32 = 65534;
/// Where nft resolves `socket cgroupv2` paths (nft prefixes every path with it).
pub const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a probe waits for a connection that should be dropped. A SYN on loopback is
/// answered in microseconds, so a second distinguishes "dropped" from "slow" with a wide margin
/// while keeping the suite fast.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long the agent may take from start to its first successful apply.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for any one-shot command (nft, firewall-allow, status).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}
