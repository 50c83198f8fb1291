//! `delete_arp_entries`: forget the neighbour (ARP / NDP) entries of addresses the director is
//! giving to new VMs, as upstream's agent does: `ip neigh flush to <ip>` for each address,
//! a failure of one not stopping the others (the director sends this fire-and-forget).
//!
//! Stricter than upstream: every address is checked to be a single IP address before any
//! command runs (`ip neigh flush to` also takes prefixes such as `0/0`, which would flush the
//! whole table); one bad entry refuses the whole request and nothing is flushed.

use std::ffi::OsString;
use std::net::IpAddr;
use std::process::Command;

use serde_json::Value;

/// Why a request was refused (before anything ran).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    /// The arguments are not `{"ips": [<string>, …]}`.
    #[error("delete_arp_entries: expected {{\"ips\": [addresses]}}, not {0}")]
    Arguments(String),
    /// An entry that is not one IP address.
    #[error("delete_arp_entries: '{value}' (entry {index}) is not an IP address")]
    InvalidIp { index: usize, value: String },
}

/// What [`Neighbours::delete`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Addresses whose entries were flushed (or had none).
    pub flushed: Vec<IpAddr>,
    /// Addresses whose flush failed, with the command's message.
    pub failed: Vec<(IpAddr, String)>,
}

/// Parses the action's argument, `{"ips": ["10.0.0.5", …]}`, checking every address.
pub fn parse_args(args: &Value) -> Result<Vec<IpAddr>, ArpError> {
    let shown = || {
        let s = args.to_string();
        s.chars().take(200).collect::<String>()
    };
    let list = args
        .as_object()
        .and_then(|o| {
            o.get("ips").or_else(|| {
                o.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("ips"))
                    .map(|(_, v)| v)
            })
        })
        .ok_or_else(|| ArpError::Arguments(shown()))?;
    let list = match list {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        _ => return Err(ArpError::Arguments(shown())),
    };
    list.iter()
        .enumerate()
        .map(|(index, v)| {
            let invalid = || ArpError::InvalidIp {
                index,
                value: v
                    .as_str()
                    .map_or_else(|| v.to_string(), str::to_string)
                    .chars()
                    .take(100)
                    .collect(),
            };
            v.as_str()
                .ok_or_else(invalid)?
                .parse::<IpAddr>()
                .map_err(|_| invalid())
        })
        .collect()
}

/// The neighbour table, through the `ip` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbours {
    /// The `ip` command (upstream: `ip` on `$PATH`).
    pub ip_command: OsString,
}

impl Default for Neighbours {
    fn default() -> Self {
        Neighbours {
            ip_command: "ip".into(),
        }
    }
}

impl Neighbours {
    /// `ip neigh flush to <ip>` for each address; every address is tried.
    pub fn delete(&self, ips: &[IpAddr]) -> Deleted {
        let mut done = Deleted::default();
        for ip in ips {
            let out = Command::new(&self.ip_command)
                .args(["neigh", "flush", "to"])
                .arg(ip.to_string())
                .stdin(std::process::Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => done.flushed.push(*ip),
                Ok(o) => {
                    let msg = String::from_utf8_lossy(&o.stderr).trim().to_string();
                    tracing::warn!(%ip, status = %o.status, error = %msg, "deleting arp entry");
                    done.failed.push((*ip, format!("{}: {msg}", o.status)));
                }
                Err(e) => {
                    tracing::warn!(%ip, error = %e, "deleting arp entry");
                    done.failed.push((*ip, e.to_string()));
                }
            }
        }
        done
    }

    /// The whole action: checks the argument, then deletes. The director expects `{}`.
    pub fn delete_arp_entries(&self, args: &Value) -> Result<Deleted, ArpError> {
        let ips = parse_args(args)?;
        Ok(self.delete(&ips))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments() {
        assert_eq!(
            parse_args(&json!({"ips": ["10.0.0.5", "fd00::1"]})).unwrap(),
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert!(parse_args(&json!({"ips": []})).unwrap().is_empty());
        assert!(parse_args(&json!({"ips": null})).unwrap().is_empty());
        assert_eq!(parse_args(&json!({"Ips": ["10.0.0.1"]})).unwrap().len(), 1);
        for bad in [
            json!([]),
            json!("10.0.0.1"),
            json!({}),
            json!({"ips": "10.0.0.1"}),
        ] {
            assert!(
                matches!(parse_args(&bad), Err(ArpError::Arguments(_))),
                "{bad}"
            );
        }
        for (bad, index) in [
            (json!({"ips": ["10.0.0.1", "0/0"]}), 1),
            (json!({"ips": ["all"]}), 0),
            (json!({"ips": ["10.0.0.0/8"]}), 0),
            (json!({"ips": ["-rf"]}), 0),
            (json!({"ips": ["10.0.0.1 dev eth0"]}), 0),
            (json!({"ips": [5]}), 0),
            (json!({"ips": ["999.1.1.1"]}), 0),
        ] {
            let e = parse_args(&bad).unwrap_err();
            assert!(
                matches!(&e, ArpError::InvalidIp { index: i, .. } if *i == index),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("is not an IP address"), "{e}");
        }
    }
}
