//! What `firewall status` and the heartbeat need besides the rules: the policies' counters,
//! conntrack usage, bridge netfilter for the forward path, and whether the kernel can load
//! the rules at all. Parsers are pure; readers are thin.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::nft::Nft;
use super::{
    ALERTS_COUNTER, EGRESS_COUNTER, FirewallError, INGRESS_COUNTER, LOCALHOST_COUNTER, TABLE,
};

/// A named counter of the agent's table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyCounter {
    /// The counter's name (`egress_denied`, `ingress_dropped`, …).
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters the workload policies keep, in a fixed order.
pub const POLICY_COUNTERS: [&str; 4] = [
    EGRESS_COUNTER,
    INGRESS_COUNTER,
    LOCALHOST_COUNTER,
    ALERTS_COUNTER,
];

/// The named counters of the agent's table in an `nft -j list counters table …` answer.
/// Pure.
pub fn parse_counters(listing: &Value) -> Result<Vec<PolicyCounter>, FirewallError> {
    let objs = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| FirewallError::Parse {
            context: "list counters".into(),
            detail: "no top-level \"nftables\" array".into(),
        })?;
    let mut out: Vec<PolicyCounter> = objs
        .iter()
        .filter_map(|o| o.get("counter"))
        .filter(|c| c.get("table").and_then(Value::as_str) == Some(TABLE))
        .filter_map(|c| {
            Some(PolicyCounter {
                name: c.get("name")?.as_str()?.to_string(),
                packets: c.get("packets")?.as_u64()?,
                bytes: c.get("bytes")?.as_u64()?,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads the policy counters of the live table (empty when the table does not exist).
pub fn read_counters(nft: &Nft) -> Result<Vec<PolicyCounter>, FirewallError> {
    match nft.list_json(&["counters", "table", "inet", TABLE])? {
        Some(v) => parse_counters(&v),
        None => Ok(Vec::new()),
    }
}

/// Conntrack table usage.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ConntrackUsage {
    pub count: u64,
    pub max: u64,
    /// Above [`CONNTRACK_WARN_RATIO`] of `max`: new connections are soon dropped.
    pub warn: bool,
}

/// The fill ratio above which status warns (a full table drops new connections).
pub const CONNTRACK_WARN_RATIO: f64 = 0.8;

/// Parses `nf_conntrack_count` and `nf_conntrack_max` as the kernel prints them. Pure.
pub fn parse_conntrack(count: &str, max: &str) -> Result<ConntrackUsage, String> {
    let n = |what: &str, t: &str| -> Result<u64, String> {
        t.trim()
            .parse()
            .map_err(|_| format!("{what} {:?} is not a number", t.trim()))
    };
    let count = n("nf_conntrack_count", count)?;
    let max = n("nf_conntrack_max", max)?;
    let warn = max == 0 || (count as f64) > (max as f64) * CONNTRACK_WARN_RATIO;
    Ok(ConntrackUsage { count, max, warn })
}

/// Reads conntrack usage from `/proc/sys/net/netfilter` (`None` when conntrack is not loaded:
/// the files appear with the module).
pub fn read_conntrack(proc_sys: &Path) -> Result<Option<ConntrackUsage>, FirewallError> {
    let dir = proc_sys.join("net/netfilter");
    let read = |name: &str| -> Result<Option<String>, FirewallError> {
        let p = dir.join(name);
        match fs::read_to_string(&p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FirewallError::Io { path: p, source }),
        }
    };
    let (Some(count), Some(max)) = (read("nf_conntrack_count")?, read("nf_conntrack_max")?) else {
        return Ok(None);
    };
    parse_conntrack(&count, &max)
        .map(Some)
        .map_err(|detail| FirewallError::Parse {
            context: dir.display().to_string(),
            detail,
        })
}

// ---------------------------------------------------------------------------------------------
// Bridge netfilter

/// Where bridge netfilter is looked at and switched on. [`BridgePaths::system`] is the host's.
#[derive(Debug, Clone)]
pub struct BridgePaths {
    /// `/sys/class/net`: a bridge has a `bridge` directory there.
    pub sys_class_net: PathBuf,
    /// `/proc/sys/net/bridge`: present once `br_netfilter` is loaded.
    pub proc_sys_bridge: PathBuf,
    /// `modprobe`, run as `modprobe br_netfilter` when the sysctls are absent.
    pub modprobe: PathBuf,
}

impl BridgePaths {
    /// The running system's paths.
    pub fn system() -> Self {
        BridgePaths {
            sys_class_net: PathBuf::from("/sys/class/net"),
            proc_sys_bridge: PathBuf::from("/proc/sys/net/bridge"),
            modprobe: PathBuf::from("modprobe"),
        }
    }
}

/// The sysctls that make switched IPv4 and IPv6 traffic pass the inet forward hook.
pub const BRIDGE_SYSCTLS: [&str; 2] = ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"];

/// Bridge netfilter as found (and left).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BridgeNetfilter {
    /// No bridge: every forwarded packet is routed and meets the forward hook.
    NoBridge,
    /// Bridges exist and both sysctls read back 1; `switched_on` says whether the agent
    /// turned them on (or loaded the module) just now.
    On {
        bridges: Vec<String>,
        switched_on: bool,
    },
}

/// Bridges exist but switched traffic cannot be made to pass the forward hook: the egress
/// deny list does not cover it. The firewall report is degraded until it is fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bridges {bridges:?} exist but bridge netfilter cannot be turned on ({detail}): traffic switched on them bypasses the egress deny list"
)]
pub struct BridgeNetfilterError {
    pub bridges: Vec<String>,
    pub detail: String,
}

/// The bridges under `sys_class_net`, sorted.
pub fn bridges(sys_class_net: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(sys_class_net)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("bridge").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// Makes switched traffic on bridges meet the forward hook, or fails closed: with no bridge
/// nothing is done; otherwise `br_netfilter` is loaded when its sysctls are absent, both are
/// set to 1 and read back. Guarantees: `Ok(On)` only when both sysctls read back 1.
pub fn ensure_bridge_netfilter(
    paths: &BridgePaths,
) -> Result<BridgeNetfilter, BridgeNetfilterError> {
    let bridges = bridges(&paths.sys_class_net);
    if bridges.is_empty() {
        return Ok(BridgeNetfilter::NoBridge);
    }
    let fail = |detail: String| BridgeNetfilterError {
        bridges: bridges.clone(),
        detail,
    };
    let mut switched_on = false;
    if !paths.proc_sys_bridge.join(BRIDGE_SYSCTLS[0]).exists() {
        let out = Command::new(&paths.modprobe)
            .arg("br_netfilter")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                fail(format!(
                    "running {} br_netfilter: {e}",
                    paths.modprobe.display()
                ))
            })?;
        if !out.status.success() {
            return Err(fail(format!(
                "{} br_netfilter failed: {}",
                paths.modprobe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        switched_on = true;
    }
    for name in BRIDGE_SYSCTLS {
        let p = paths.proc_sys_bridge.join(name);
        let read = || {
            fs::read_to_string(&p)
                .map(|t| t.trim() == "1")
                .map_err(|e| fail(format!("reading {}: {e}", p.display())))
        };
        if read()? {
            continue;
        }
        fs::write(&p, "1\n").map_err(|e| fail(format!("writing 1 to {}: {e}", p.display())))?;
        if !read()? {
            return Err(fail(format!(
                "{} reads back 0 after writing 1",
                p.display()
            )));
        }
        switched_on = true;
    }
    Ok(BridgeNetfilter::On {
        bridges,
        switched_on,
    })
}

// ---------------------------------------------------------------------------------------------
// Kernel capabilities

/// A script that uses every kernel feature the workload rules need — conntrack state and
/// status, socket cgroup matching, fib address types, reject, named counters, concatenated
/// interval sets — in a scratch table, for `nft --check`: the kernel initialises each
/// expression (loading its module) and then the transaction is aborted, so nothing changes.
pub fn capability_probe() -> String {
    let t = format!("inet {TABLE}_probe");
    format!(
        "add table {t}\n\
         add counter {t} c\n\
         add set {t} s {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}\n\
         add chain {t} probe\n\
         add rule {t} probe ct state established,related accept\n\
         add rule {t} probe ct status dnat accept\n\
         add rule {t} probe socket cgroupv2 level 1 \"\" accept\n\
         add rule {t} probe fib daddr type local accept\n\
         add rule {t} probe ip daddr . meta l4proto . th dport @s accept\n\
         add rule {t} probe meta l4proto tcp counter name \"c\" reject with tcp reset\n"
    )
}

/// Checks, without changing anything, that the kernel has what the workload rules need; the
/// error carries nft's message (for example "Could not process rule: No such file or
/// directory" where `nft_socket` is missing). Run before the first commit of a policy.
pub fn check_kernel(nft: &Nft) -> Result<(), FirewallError> {
    nft.check(&capability_probe())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn conntrack_parses_and_warns_above_80_percent() {
        let u = parse_conntrack("850\n", "1000\n").unwrap();
        assert_eq!((u.count, u.max, u.warn), (850, 1000, true));
        assert!(!parse_conntrack("800", "1000").unwrap().warn);
        assert!(!parse_conntrack("0", "262144").unwrap().warn);
        assert!(parse_conntrack("1", "0").unwrap().warn);
        let e = parse_conntrack("many", "1000").unwrap_err();
        assert!(
            e.contains("nf_conntrack_count") && e.contains("many"),
            "{e}"
        );
        assert!(parse_conntrack("1", "-3").is_err());
    }

    #[test]
    fn conntrack_absent_is_none_and_present_is_read() {
        let d = std::env::temp_dir().join(format!("ct-{}", std::process::id()));
        let nf = d.join("net/netfilter");
        fs::create_dir_all(&nf).unwrap();
        assert_eq!(read_conntrack(&d).unwrap(), None);
        fs::write(nf.join("nf_conntrack_count"), "9\n").unwrap();
        fs::write(nf.join("nf_conntrack_max"), "10\n").unwrap();
        let u = read_conntrack(&d).unwrap().unwrap();
        assert!(u.warn && u.count == 9);
        fs::write(nf.join("nf_conntrack_max"), "x\n").unwrap();
        assert!(read_conntrack(&d).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn counters_of_our_table_only() {
        let v: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{"json_schema_version":1}},
            {"counter":{"family":"inet","name":"ingress_dropped","table":"bosh_agent","handle":3,"packets":7,"bytes":420}},
            {"counter":{"family":"inet","name":"egress_denied","table":"bosh_agent","handle":2,"packets":1,"bytes":60}},
            {"counter":{"family":"inet","name":"x","table":"other","handle":2,"packets":1,"bytes":60}}]}"#,
        )
        .unwrap();
        let c = parse_counters(&v).unwrap();
        assert_eq!(
            c,
            vec![
                PolicyCounter {
                    name: "egress_denied".into(),
                    packets: 1,
                    bytes: 60
                },
                PolicyCounter {
                    name: "ingress_dropped".into(),
                    packets: 7,
                    bytes: 420
                },
            ]
        );
        assert!(parse_counters(&serde_json::json!({})).is_err());
    }

    #[test]
    fn no_bridge_needs_nothing_and_a_bridge_without_the_sysctls_fails_closed() {
        let d = std::env::temp_dir().join(format!("brnf-{}", std::process::id()));
        let net = d.join("net");
        fs::create_dir_all(net.join("eth0")).unwrap();
        let paths = BridgePaths {
            sys_class_net: net.clone(),
            proc_sys_bridge: d.join("bridge"),
            modprobe: PathBuf::from("/bin/false"),
        };
        assert_eq!(
            ensure_bridge_netfilter(&paths),
            Ok(BridgeNetfilter::NoBridge)
        );
        fs::create_dir_all(net.join("br0/bridge")).unwrap();
        let e = ensure_bridge_netfilter(&paths).unwrap_err();
        assert_eq!(e.bridges, vec!["br0".to_string()]);
        assert!(
            e.to_string().contains("bypasses the egress deny list"),
            "{e}"
        );
        // Sysctls at 0 are switched on and read back.
        fs::create_dir_all(d.join("bridge")).unwrap();
        for n in BRIDGE_SYSCTLS {
            fs::write(d.join("bridge").join(n), "0\n").unwrap();
        }
        assert_eq!(
            ensure_bridge_netfilter(&paths),
            Ok(BridgeNetfilter::On {
                bridges: vec!["br0".into()],
                switched_on: true
            })
        );
        assert_eq!(
            ensure_bridge_netfilter(&paths),
            Ok(BridgeNetfilter::On {
                bridges: vec!["br0".into()],
                switched_on: false
            })
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
