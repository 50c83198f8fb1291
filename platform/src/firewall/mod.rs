//! The agent's nftables firewall: typed desired state → pure renderer → one atomic
//! `nft -f -` transaction → read back and compare.
//!
//! The nft JSON API cannot express `socket cgroupv2`, so the renderer writes nft text; every
//! string that enters a script is validated by a type ([`crate::cgroup::NftCgroupPath`],
//! [`Comment`]) so that no input can add nft syntax.

pub mod jobs;
pub mod netlink;
pub mod nft;
pub mod policy;
pub mod policy_config;
pub mod readback;
pub mod render;
pub mod selftest;
pub mod shape;
pub mod state;
pub mod status;
pub mod table;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::cgroup::{NftCgroupPath, is_safe_byte};

/// The agent's table (upstream's name, family `inet`).
pub const TABLE: &str = "bosh_agent";
/// Base chain guarding monit's API (upstream's name).
pub const MONIT_CHAIN: &str = "monit_access";
/// Regular chain holding `firewall-allow monit` job rules; created when missing, never flushed.
pub const MONIT_JOBS_CHAIN: &str = "monit_access_jobs";
/// Regular chain reached only by packets addressed to monit: who may pass.
pub const MONIT_GUARD_CHAIN: &str = "monit_guard";
/// Base chain guarding the director's NATS endpoints (upstream's name).
pub const NATS_CHAIN: &str = "nats_access";
/// Regular chain reached only by packets addressed to a NATS endpoint.
pub const NATS_GUARD_CHAIN: &str = "nats_guard";
/// Sets of protected NATS endpoints, keyed by address . port.
pub const NATS_SET_V4: &str = "nats_v4";
/// IPv6 counterpart of [`NATS_SET_V4`].
pub const NATS_SET_V6: &str = "nats_v6";
/// Transient chain of the cgroup self-test.
pub const SELFTEST_CHAIN: &str = "selftest";
/// Base chain of the egress deny list on locally generated traffic (hook output).
pub const EGRESS_CHAIN: &str = "egress_output";
/// Base chain of the egress deny list on forwarded traffic (hook forward, before SNAT).
pub const EGRESS_FORWARD_CHAIN: &str = "egress_forward";
/// Regular chain reached by local packets to a denied range: who may pass.
pub const EGRESS_GUARD_CHAIN: &str = "egress_guard";
/// Regular chain reached by forwarded packets to a denied range.
pub const EGRESS_FORWARD_GUARD_CHAIN: &str = "egress_forward_guard";
/// Regular chain holding `firewall-allow metadata` job rules; created when the egress list is
/// on, never flushed.
pub const EGRESS_JOBS_CHAIN: &str = "egress_access_jobs";
/// Denied destinations (interval sets).
pub const EGRESS_DENY_V4: &str = "egress_deny_v4";
/// IPv6 counterpart of [`EGRESS_DENY_V4`].
pub const EGRESS_DENY_V6: &str = "egress_deny_v6";
/// The prefilter of [`EGRESS_DENY_V4`]: the first 16 bits of every denied destination, in a
/// plain 16-bit set (a bitmap in the kernel: one test whatever the deny list's size).
pub const EGRESS_DENY_V4_HI: &str = "egress_deny_v4_hi";
/// IPv6 counterpart of [`EGRESS_DENY_V4_HI`].
pub const EGRESS_DENY_V6_HI: &str = "egress_deny_v6_hi";
/// Excepted `address . protocol . port` (concatenated interval sets).
pub const EGRESS_EXCEPT_V4: &str = "egress_except_v4";
/// IPv6 counterpart of [`EGRESS_EXCEPT_V4`].
pub const EGRESS_EXCEPT_V6: &str = "egress_except_v6";
/// Named counter of packets the egress list denied.
pub const EGRESS_COUNTER: &str = "egress_denied";
/// Base chain of the ingress allow-list (hook input, priority filter: after conntrack).
pub const INGRESS_CHAIN: &str = "ingress_filter";
/// Wide port ranges open to every source: `protocol . port` (a concatenated interval set).
pub const INGRESS_PORTS: &str = "ingress_ports";
/// TCP ports open to every source, one element per port (a 16-bit key without intervals,
/// which the kernel keeps as a bitmap: one bit test per packet).
pub const INGRESS_TCP_PORTS: &str = "ingress_tcp_ports";
/// UDP counterpart of [`INGRESS_TCP_PORTS`].
pub const INGRESS_UDP_PORTS: &str = "ingress_udp_ports";
/// Ports open to some sources: `address . protocol . port`.
pub const INGRESS_SRC_V4: &str = "ingress_src_v4";
/// IPv6 counterpart of [`INGRESS_SRC_V4`].
pub const INGRESS_SRC_V6: &str = "ingress_src_v6";
/// Named counter of inbound packets the allow-list dropped.
pub const INGRESS_COUNTER: &str = "ingress_dropped";
/// Base chain of the localhost guard (hook input).
pub const LOCALHOST_CHAIN: &str = "localhost_guard";
/// Named counter of the localhost guard.
pub const LOCALHOST_COUNTER: &str = "localhost_dropped";
/// Base chain guarding the agent's alert listener (hook output).
pub const ALERTS_CHAIN: &str = "alerts_access";
/// Regular chain reached only by packets addressed to the alert listener.
pub const ALERTS_GUARD_CHAIN: &str = "alerts_guard";
/// Named counter of connection attempts to the alert listener that were refused.
pub const ALERTS_COUNTER: &str = "alerts_dropped";
/// The agent's monit-alert listener port (upstream's, on 127.0.0.1).
pub const ALERTS_PORT: u16 = 2825;
/// Comment prefix of `firewall-allow metadata` job rules.
pub const METADATA_COMMENT_PREFIX: &str = "bosh-metadata-access:";
/// Mark set on every packet the agent's table accepts, so that the stemcell's table
/// (`inet bosh_firewall`) lets it through.
pub const ALLOW_MARK: u32 = 0xb054;
/// Monit's HTTP API port.
pub const MONIT_PORT: u16 = 2822;
/// Monit's API endpoints: IPv4 loopback, and IPv6 loopback in case monit is bound there.
pub const MONIT_ENDPOINTS: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), MONIT_PORT),
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), MONIT_PORT),
];
/// Comment prefix of job rules (upstream's, so rules of existing releases are recognised).
pub const JOB_COMMENT_PREFIX: &str = "bosh-monit-access:";

/// Who the agent is, as the kernel can match it on outgoing packets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Identity {
    /// `socket cgroupv2 level <level> "<path>"`: the agent's cgroup and its descendants.
    Cgroup { path: NftCgroupPath, level: u32 },
    /// `meta skuid <uid>`: the fallback where cgroup matching was proved not to work.
    Uid { uid: u32, reason: String },
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Cgroup { path, level } => write!(f, "cgroup v2 at level {level} ({path})"),
            Identity::Uid { uid, reason } => write!(f, "uid {uid} fallback ({reason})"),
        }
    }
}

/// The monit policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MonitPolicy {
    /// `Platform.Linux.UseMonitIptablesFirewall: true`: the stemcell guards monit itself.
    Disabled,
    /// Only the agent, allowed job cgroups and (if `allow_root`) uid 0 reach monit.
    Enabled { allow_root: bool },
}

/// The NATS policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NatsPolicy {
    /// `Platform.Linux.EnableNATSFirewall` is false: no NATS rules exist.
    Disabled,
    /// Only the agent reaches these endpoints.
    Enabled { endpoints: BTreeSet<SocketAddr> },
}

/// Everything the agent's table should contain, except job rules (which belong to jobs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DesiredState {
    pub identity: Identity,
    pub monit: MonitPolicy,
    pub nats: NatsPolicy,
    /// Egress deny list, ingress allow-list, localhost guard, alert listener: all off by
    /// default, and then the script is exactly what it is without them.
    pub workload: policy::WorkloadPolicy,
}

/// A comment that is safe inside a double-quoted nft string and fits nft's 128-byte limit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Comment(String);

/// nft stores at most 128 bytes of comment (NFT_USERDATA_MAXLEN is larger, but the comment
/// attribute is limited to 128 by nft's parser).
pub const MAX_COMMENT_LEN: usize = 128;

/// A value that cannot be written into an nft script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} cannot be written into an nft script: {reason}")]
pub struct UnsafeValue {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl Comment {
    /// Validates a comment: printable safe characters and single spaces only, at most 128
    /// bytes. Guarantees the script's meaning cannot change through the comment.
    pub fn new(text: &str) -> Result<Self, UnsafeValue> {
        let bad = |reason| UnsafeValue {
            what: "comment",
            value: text.to_string(),
            reason,
        };
        if text.len() > MAX_COMMENT_LEN {
            return Err(bad("longer than 128 bytes"));
        }
        if !text
            .bytes()
            .all(|c| is_safe_byte(c) || c == b' ' || c == b'/')
        {
            return Err(bad(
                "contains a character outside A-Za-z0-9_.-@:+=,/ and space",
            ));
        }
        Ok(Comment(text.to_string()))
    }

    /// The comment text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A job's allow rule in `monit_access_jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRule {
    /// Who is allowed.
    pub identity: Identity,
    /// `bosh-monit-access:<key> cgid=<inode>`: what identifies the rule across calls.
    pub comment: Comment,
}

/// Errors of the firewall pipeline. Each says what was being done; nft failures carry nft's
/// own message.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("nft {action} failed (exit {code:?}): {stderr}")]
    Nft {
        action: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("nft printed output that is not the JSON expected ({context}): {detail}")]
    Parse { context: String, detail: String },
    #[error("the agent's state file {path} is corrupt (not the JSON the agent writes): {detail}")]
    CorruptState {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Unsafe(#[from] UnsafeValue),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "table inet {TABLE} or chain {MONIT_JOBS_CHAIN} is absent: no monit firewall is installed"
    )]
    NotInstalled,
    #[error("cgroup matching does not work here and no fallback is possible: {0}")]
    NoIdentity(String),
    #[error(
        "the firewall lock {path} is still held by another process after {waited_secs} s; giving up for now"
    )]
    LockTimeout {
        path: std::path::PathBuf,
        waited_secs: u64,
    },
}
