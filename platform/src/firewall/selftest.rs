//! Proving that `socket cgroupv2` matches the agent's own sockets before trusting it.
//!
//! One transient chain gives each candidate level its own loopback listener: a connection to
//! it is accepted when `socket cgroupv2` matches the agent's socket at that level, and reset
//! otherwise. The level whose connection succeeds is the kernel's answer (outside a cgroup
//! namespace there is one candidate; inside one, kernels differ: 6.11+ take levels relative to
//! the namespace, older ones the global level). No connection succeeding, or nft refusing the rule
//! (v1-only host, no `socket` support, a kernel that refuses in a container), means the agent
//! falls back to `meta skuid 0` and says why.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::nft::Nft;
use super::render::render_selftest;
use super::{FirewallError, Identity};
use crate::cgroup::{CgroupError, CgroupPlacement};

/// The identity the agent's rules will use, and how it was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    pub identity: Identity,
    /// `level - visible_level` of the cgroup that matched: what `firewall-allow` adds to a
    /// job's visible depth (non-zero only in a namespace on older kernels).
    pub level_offset: i64,
}

/// Bounds one probe connection (a match or a reset answers at once on loopback).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The uid the fallback matches: the agent runs as root.
pub const FALLBACK_UID: u32 = 0;

/// Establishes the agent's identity from its cgroup placement (or the reason there is none).
/// Never fails: every failure becomes the uid fallback with its reason, for the caller to log
/// at warn level and show in `firewall status`.
pub fn establish(nft: &Nft, placement: &Result<CgroupPlacement, CgroupError>) -> Established {
    let fallback = |reason: String| Established {
        identity: Identity::Uid {
            uid: FALLBACK_UID,
            reason,
        },
        level_offset: 0,
    };
    let p = match placement {
        Ok(p) => p,
        Err(e) => return fallback(format!("cgroup undetectable: {e}")),
    };
    if p.nft_path.as_str().is_empty() || p.nft_path.as_str() == "unified" {
        return fallback("the agent runs in the root cgroup, which every process shares".into());
    }
    let levels = p.candidate_levels();
    match probe(nft, p, &levels) {
        Ok(Some(level)) => Established {
            identity: Identity::Cgroup {
                path: p.nft_path.clone(),
                level,
            },
            level_offset: i64::from(level) - i64::from(p.visible_level),
        },
        Ok(None) => fallback(format!(
            "self-test: no rule at levels {levels:?} for {} matched the agent's own loopback connection",
            p.nft_path
        )),
        Err(e) => fallback(format!("self-test: {e}")),
    }
}

/// Runs the probe in a private network namespace entered by a dedicated thread (network
/// namespaces are per thread; the nft and the sockets it starts live there): the probe table
/// then never touches the live one and vanishes with the namespace, so nothing is deleted —
/// a deletion makes nft wait 10–15 ms on the kernel. `socket cgroupv2` matches the socket's
/// cgroup, which no network namespace changes. Where a namespace cannot be made, the probe runs
/// in the agent's own namespace and its chain is removed afterwards.
fn probe(nft: &Nft, p: &CgroupPlacement, levels: &[u32]) -> Result<Option<u32>, FirewallError> {
    let isolated = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
                loopback_up().ok()?;
                Some(probe_here(nft, p, levels, true))
            })
            .join()
            .ok()
            .flatten()
    });
    match isolated {
        Some(res) => res,
        None => {
            let res = probe_here(nft, p, levels, false);
            let cleanup = nft.apply(&super::render::render_selftest_cleanup());
            let level = res?;
            cleanup?;
            Ok(level)
        }
    }
}

/// One listener per candidate level; the level whose port accepts the agent's connection is
/// the one the kernel matches (the others are reset by the probe chain).
fn probe_here(
    nft: &Nft,
    p: &CgroupPlacement,
    levels: &[u32],
    fresh: bool,
) -> Result<Option<u32>, FirewallError> {
    let io = |source| FirewallError::Io {
        path: "127.0.0.1 self-test listener".into(),
        source,
    };
    // The listeners stay open until the probe ends: a handshake completes in their backlog.
    let mut listeners = Vec::with_capacity(levels.len());
    for &level in levels {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io)?;
        let addr: SocketAddr = listener.local_addr().map_err(io)?;
        listeners.push((level, addr, listener));
    }
    let probes: Vec<(u32, u16)> = listeners.iter().map(|(l, a, _)| (*l, a.port())).collect();
    nft.apply(&render_selftest(&p.nft_path, &probes, fresh))?;
    // A match completes the handshake at once; a refusal is an immediate reset. The timeout
    // only bounds a kernel that neither accepts nor resets.
    Ok(listeners.iter().find_map(|(level, addr, _)| {
        TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)
            .ok()
            .map(|_| *level)
    }))
}

/// Brings `lo` up in the calling thread's (new, private) network namespace with one
/// RTM_NEWLINK request over rtnetlink — in-process, where `ip link set lo up` would cost a
/// process spawn on the agent's start-up path. `lo` is always interface 1 in a namespace.
fn loopback_up() -> Result<(), nix::Error> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::os::fd::AsRawFd;
    const RTM_NEWLINK: u16 = 16;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const IFF_UP: u32 = 0x1;
    const LOOPBACK_IFINDEX: i32 = 1;

    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes), native endian as the kernel reads them.
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel assigns
    msg.extend_from_slice(&[0, 0]); // ifi_family AF_UNSPEC, padding
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 256];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    netlink_ack(&buf[..n]).map_err(nix::Error::from_raw)
}

/// The errno of a netlink acknowledgement (`NLMSG_ERROR` with error 0 is success). Pure.
fn netlink_ack(reply: &[u8]) -> Result<(), i32> {
    const NLMSG_ERROR: u16 = 2;
    let field = |at: usize, len: usize| reply.get(at..at + len);
    let kind = field(4, 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let error = field(16, 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, error) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(e)) => Err(e.saturating_neg()),
        _ => Err(nix::libc::EPROTO),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reply(kind: u16, error: i32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&36u32.to_ne_bytes());
        r.extend_from_slice(&kind.to_ne_bytes());
        r.extend_from_slice(&[0; 10]);
        r.extend_from_slice(&error.to_ne_bytes());
        r.extend_from_slice(&[0; 16]);
        r
    }

    #[test]
    fn netlink_acks_are_read_as_errno() {
        assert_eq!(netlink_ack(&reply(2, 0)), Ok(()));
        assert_eq!(netlink_ack(&reply(2, -1)), Err(1), "EPERM");
        assert_eq!(
            netlink_ack(&reply(3, 0)),
            Err(nix::libc::EPROTO),
            "not an ack"
        );
        assert_eq!(netlink_ack(&[2, 0]), Err(nix::libc::EPROTO), "truncated");
        assert_eq!(netlink_ack(&[]), Err(nix::libc::EPROTO));
    }
}
