//! Proving that `socket cgroupv2` matches the agent's own sockets before trusting it.
//!
//! One transient chain counts, per candidate level, the agent's own loopback connection to a
//! listener it opened. The level whose counter moved is the kernel's answer (outside a cgroup
//! namespace there is one candidate; inside one, kernels differ: 6.11+ take levels relative to
//! the namespace, older ones the global level). No counter moving, or nft refusing the rule
//! (v1-only host, no `socket` support, a kernel that refuses in a container), means the agent
//! falls back to `meta skuid 0` and says why.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::Value;

use super::nft::Nft;
use super::render::render_selftest;
use super::{FirewallError, Identity, SELFTEST_CHAIN};
use crate::cgroup::{CgroupError, CgroupPlacement};

/// The identity the agent's rules will use, and how it was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    pub identity: Identity,
    /// `level - visible_level` of the cgroup that matched: what `firewall-allow` adds to a
    /// job's visible depth (non-zero only in a namespace on older kernels).
    pub level_offset: i64,
}

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
                if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                    return None;
                }
                let lo_up = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                lo_up.then(|| probe_here(nft, p, levels))
            })
            .join()
            .ok()
            .flatten()
    });
    match isolated {
        Some(res) => res,
        None => {
            let res = probe_here(nft, p, levels);
            let cleanup = nft.apply(&super::render::render_selftest_cleanup());
            let level = res?;
            cleanup?;
            Ok(level)
        }
    }
}

fn probe_here(
    nft: &Nft,
    p: &CgroupPlacement,
    levels: &[u32],
) -> Result<Option<u32>, FirewallError> {
    let io = |source| FirewallError::Io {
        path: "127.0.0.1 self-test listener".into(),
        source,
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io)?;
    let addr: SocketAddr = listener.local_addr().map_err(io)?;
    nft.apply(&render_selftest(&p.nft_path, levels, addr))?;
    // The SYN is what the rules count; the handshake completes in the listener's backlog.
    let connected = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    let listing = nft.list_chain(SELFTEST_CHAIN);
    drop(connected);
    let listing = listing?.ok_or_else(|| FirewallError::Parse {
        context: "self-test".into(),
        detail: "the self-test chain vanished".into(),
    })?;
    Ok(matched_level(&listing))
}

/// The level of the first self-test rule whose counter saw packets. Pure.
pub fn matched_level(listing: &Value) -> Option<u32> {
    let objs = listing.get("nftables")?.as_array()?;
    objs.iter().filter_map(|o| o.get("rule")).find_map(|r| {
        let level = r
            .get("comment")?
            .as_str()?
            .strip_prefix("level=")?
            .parse()
            .ok()?;
        let packets = r
            .get("expr")?
            .as_array()?
            .iter()
            .find_map(|e| e.get("counter")?.get("packets")?.as_u64())?;
        (packets > 0).then_some(level)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_level_whose_counter_moved_wins() {
        let listing: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {}},
            {"rule": {"chain": "selftest", "handle": 2, "comment": "level=0", "expr": [{"counter": {"packets": 0, "bytes": 0}}]}},
            {"rule": {"chain": "selftest", "handle": 3, "comment": "level=2", "expr": [{"match": {}}, {"counter": {"packets": 1, "bytes": 60}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(matched_level(&listing), Some(2));
    }

    #[test]
    fn no_counter_moved_means_no_level() {
        let listing: Value = serde_json::from_str(
            r#"{"nftables": [{"rule": {"chain": "selftest", "comment": "level=1", "expr": [{"counter": {"packets": 0}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(matched_level(&listing), None);
        assert_eq!(matched_level(&serde_json::json!({})), None);
    }
}
