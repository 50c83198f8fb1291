//! The agent.json keys of the workload policies (`Platform.Linux.Firewall.*`), as serde types
//! the agent embeds (`#[serde(flatten)]`), and their validation into the model. Every value
//! is checked before anything is built: one bad value refuses the whole change, and the error
//! names the key and the value.

use serde::Deserialize;

use super::Identity;
use super::policy::{
    AlertListenerPolicy, Cidr, CtInvalid, Egress, EgressAction, EgressEntry, EgressPolicy,
    EgressSets, EgressTracking, Ingress, IngressEntry, IngressPolicy, IngressSets, PortRange,
    Proto, WorkloadPolicy, cloud_metadata_entries,
};

/// `Platform.Linux.Firewall` keys of the workload policies. Absent keys mean no rules.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct PolicyConfig {
    /// Ranges workloads may not reach.
    pub egress_deny: Vec<EgressDenyConfig>,
    /// `drop` (default) or `reject`.
    pub egress_action: Option<String>,
    /// `conntrack` (default) or `stateless`: how the egress guard tells replies from new
    /// traffic.
    pub egress_tracking: Option<String>,
    /// Adds the cloud credential endpoints to the deny list.
    pub deny_cloud_metadata: bool,
    /// Cgroup paths (as in `/proc/<pid>/cgroup`, relative to the cgroup2 root) allowed through.
    pub egress_allow_cgroups: Vec<String>,
    /// When present, inbound traffic is accepted only by the prologue and these entries.
    pub ingress_allow: Option<Vec<IngressAllowConfig>>,
    /// Accept ICMP echo-request, destination-unreachable and time-exceeded (default true).
    #[serde(rename = "IngressAllowICMP")]
    pub ingress_allow_icmp: bool,
    /// `drop` (default) or `allow-list`: what happens to `ct state invalid` inbound.
    pub ingress_ct_invalid: Option<String>,
    /// Drop packets to 127.0.0.0/8 and ::1 that did not arrive on loopback (default false).
    pub guard_localhost: bool,
    /// Let only monit and the agent reach the alert listener on 127.0.0.1:2825 (default false).
    pub guard_alert_listener: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            egress_deny: Vec::new(),
            egress_action: None,
            egress_tracking: None,
            deny_cloud_metadata: false,
            egress_allow_cgroups: Vec::new(),
            ingress_allow: None,
            ingress_allow_icmp: true,
            ingress_ct_invalid: None,
            guard_localhost: false,
            guard_alert_listener: false,
        }
    }
}

/// One `EgressDeny` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct EgressDenyConfig {
    pub destination: String,
    pub except: Vec<PortsConfig>,
}

/// `{"Protocol": "udp", "Ports": "53"}` (`Ports` may also be a JSON number).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct PortsConfig {
    pub protocol: String,
    pub ports: PortsValue,
}

/// A port or range, written as a string (`"53"`, `"1000-2000"`) or a number (`53`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortsValue {
    Number(u64),
    Text(String),
}

impl Default for PortsValue {
    fn default() -> Self {
        PortsValue::Text(String::new())
    }
}

impl PortsValue {
    fn text(&self) -> String {
        match self {
            PortsValue::Number(n) => n.to_string(),
            PortsValue::Text(s) => s.clone(),
        }
    }
}

/// One `IngressAllow` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct IngressAllowConfig {
    pub protocol: String,
    pub ports: PortsValue,
    pub sources: Vec<String>,
}

/// A value of the workload policy keys that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Platform.Linux.Firewall.{key}: {value:?} is not valid: {reason}")]
pub struct PolicyError {
    /// The key path below `Platform.Linux.Firewall` (`EgressDeny[2].Destination`).
    pub key: String,
    pub value: String,
    pub reason: String,
}

fn bad(key: String, value: &str, reason: String) -> PolicyError {
    PolicyError {
        key,
        value: value.to_string(),
        reason,
    }
}

fn ports(key: &str, p: &PortsConfig) -> Result<(Proto, PortRange), PolicyError> {
    let proto =
        Proto::parse(&p.protocol).map_err(|r| bad(format!("{key}.Protocol"), &p.protocol, r))?;
    let text = p.ports.text();
    let range = PortRange::parse(&text).map_err(|r| bad(format!("{key}.Ports"), &text, r))?;
    Ok((proto, range))
}

impl PolicyConfig {
    /// Validates every value and builds the policies. `agent_identity` is the agent's own
    /// (the alert listener's guard lets it through); `cgroup_identity` turns an
    /// `EgressAllowCgroups` path into an identity (or says why it cannot: a path nft cannot
    /// express, a cgroup that does not exist); `monit` is monit's identity for the alert
    /// listener's guard.
    pub fn build(
        &self,
        cgroup_identity: &mut dyn FnMut(&str) -> Result<Identity, String>,
        monit: Identity,
    ) -> Result<WorkloadPolicy, PolicyError> {
        let mut entries = Vec::new();
        for (i, e) in self.egress_deny.iter().enumerate() {
            let key = format!("EgressDeny[{i}]");
            let destination = Cidr::parse(&e.destination)
                .map_err(|r| bad(format!("{key}.Destination"), &e.destination, r))?;
            let except = e
                .except
                .iter()
                .enumerate()
                .map(|(j, p)| ports(&format!("{key}.Except[{j}]"), p))
                .collect::<Result<Vec<_>, _>>()?;
            entries.push(EgressEntry {
                destination,
                except,
            });
        }
        if self.deny_cloud_metadata {
            entries.extend(cloud_metadata_entries());
        }
        let action = match self.egress_action.as_deref() {
            None | Some("drop") => EgressAction::Drop,
            Some("reject") => EgressAction::Reject,
            Some(other) => {
                return Err(bad(
                    "EgressAction".into(),
                    other,
                    "expected drop or reject".into(),
                ));
            }
        };
        let tracking = match self.egress_tracking.as_deref() {
            None | Some("conntrack") => EgressTracking::Conntrack,
            Some("stateless") => EgressTracking::Stateless,
            Some(other) => {
                return Err(bad(
                    "EgressTracking".into(),
                    other,
                    "expected conntrack or stateless".into(),
                ));
            }
        };
        let mut allowed = Vec::new();
        for (i, path) in self.egress_allow_cgroups.iter().enumerate() {
            allowed.push(
                cgroup_identity(path)
                    .map_err(|r| bad(format!("EgressAllowCgroups[{i}]"), path, r))?,
            );
        }
        let egress = if entries.is_empty() {
            EgressPolicy::Disabled
        } else {
            EgressPolicy::Enabled(Egress {
                sets: EgressSets::compile(&entries),
                action,
                tracking,
                allowed,
            })
        };
        let ct_invalid = match self.ingress_ct_invalid.as_deref() {
            None | Some("drop") => CtInvalid::Drop,
            Some("allow-list") => CtInvalid::AllowList,
            Some(other) => {
                return Err(bad(
                    "IngressCtInvalid".into(),
                    other,
                    "expected drop or allow-list".into(),
                ));
            }
        };
        let ingress = match &self.ingress_allow {
            None => IngressPolicy::Disabled,
            Some(list) => {
                let mut entries = Vec::new();
                for (i, e) in list.iter().enumerate() {
                    let key = format!("IngressAllow[{i}]");
                    let (proto, range) = ports(
                        &key,
                        &PortsConfig {
                            protocol: e.protocol.clone(),
                            ports: e.ports.clone(),
                        },
                    )?;
                    let sources = e
                        .sources
                        .iter()
                        .enumerate()
                        .map(|(j, s)| {
                            Cidr::parse(s).map_err(|r| bad(format!("{key}.Sources[{j}]"), s, r))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    entries.push(IngressEntry {
                        proto,
                        ports: range,
                        sources,
                    });
                }
                IngressPolicy::Enabled(Ingress {
                    sets: IngressSets::compile(&entries),
                    allow_icmp: self.ingress_allow_icmp,
                    ct_invalid,
                })
            }
        };
        Ok(WorkloadPolicy {
            egress,
            ingress,
            localhost_guard: self.guard_localhost,
            alert_listener: if self.guard_alert_listener {
                AlertListenerPolicy::Guarded { monit }
            } else {
                AlertListenerPolicy::Open
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cgroup::NftCgroupPath;

    fn id(path: &str) -> Result<Identity, String> {
        Ok(Identity::Cgroup {
            path: NftCgroupPath::new(path).map_err(|e| e.to_string())?,
            level: crate::cgroup::depth(path),
        })
    }

    fn build(json: &str) -> Result<WorkloadPolicy, PolicyError> {
        let c: PolicyConfig = serde_json::from_str(json).unwrap();
        c.build(
            &mut |p| id(p),
            Identity::Uid {
                uid: 0,
                reason: "monit's cgroup unknown".into(),
            },
        )
    }

    #[test]
    fn absent_keys_mean_no_policies() {
        assert_eq!(build("{}").unwrap(), WorkloadPolicy::default());
        // Unrelated keys of the same object are ignored (the agent flattens this in).
        assert_eq!(
            build(r#"{"MonitAllowRoot": false}"#).unwrap(),
            WorkloadPolicy::default()
        );
    }

    #[test]
    fn a_full_configuration_builds() {
        let w = build(
            r#"{"EgressDeny":[{"Destination":"10.0.0.0/8","Except":[{"Protocol":"tcp","Ports":"1000-2000"},{"Protocol":"UDP","Ports":53}]}],
                "EgressAction":"reject","DenyCloudMetadata":true,"EgressAllowCgroups":["system.slice/cpi.service"],
                "IngressAllow":[{"Protocol":"tcp","Ports":"22"},{"Protocol":"udp","Ports":"53","Sources":["10.0.0.0/8"]}],
                "IngressAllowICMP":false,"IngressCtInvalid":"allow-list","GuardLocalhost":true,"GuardAlertListener":true}"#,
        )
        .unwrap();
        let EgressPolicy::Enabled(eg) = &w.egress else {
            panic!("egress off")
        };
        assert_eq!(eg.action, EgressAction::Reject);
        assert_eq!(eg.tracking, EgressTracking::Conntrack);
        assert_eq!(eg.sets.deny[0].len(), 4);
        assert_eq!(eg.allowed.len(), 1);
        let IngressPolicy::Enabled(ing) = &w.ingress else {
            panic!("ingress off")
        };
        assert!(!ing.allow_icmp);
        assert_eq!(ing.ct_invalid, CtInvalid::AllowList);
        assert!(ing.sets.allows(Proto::Tcp, 22, None));
        assert!(w.localhost_guard);
        assert!(matches!(
            w.alert_listener,
            AlertListenerPolicy::Guarded { .. }
        ));
        // An empty allow-list is a list: only the prologue lets traffic in.
        let w = build(r#"{"IngressAllow":[]}"#).unwrap();
        assert!(matches!(w.ingress, IngressPolicy::Enabled(_)));
        // Only the cloud endpoints.
        let w = build(r#"{"DenyCloudMetadata":true}"#).unwrap();
        assert!(matches!(w.egress, EgressPolicy::Enabled(_)));
        for (value, want) in [
            ("conntrack", EgressTracking::Conntrack),
            ("stateless", EgressTracking::Stateless),
        ] {
            let w = build(&format!(
                r#"{{"DenyCloudMetadata":true,"EgressTracking":"{value}"}}"#
            ))
            .unwrap();
            let EgressPolicy::Enabled(eg) = &w.egress else {
                panic!("egress off")
            };
            assert_eq!(eg.tracking, want);
        }
    }

    #[test]
    fn an_invalid_value_is_named_with_its_key() {
        for (json, key, value) in [
            (
                r#"{"EgressDeny":[{"Destination":"10.0.0.0/8"},{"Destination":"10.0.0.300/32"}]}"#,
                "EgressDeny[1].Destination",
                "10.0.0.300/32",
            ),
            (
                r#"{"EgressDeny":[{"Destination":"10.1.0.0/8"}]}"#,
                "EgressDeny[0].Destination",
                "10.1.0.0/8",
            ),
            (
                r#"{"EgressDeny":[{"Destination":"1.2.3.4","Except":[{"Protocol":"icmp","Ports":"1"}]}]}"#,
                "EgressDeny[0].Except[0].Protocol",
                "icmp",
            ),
            (
                r#"{"EgressDeny":[{"Destination":"1.2.3.4","Except":[{"Protocol":"tcp","Ports":"70000"}]}]}"#,
                "EgressDeny[0].Except[0].Ports",
                "70000",
            ),
            (r#"{"EgressAction":"tarpit"}"#, "EgressAction", "tarpit"),
            (
                r#"{"DenyCloudMetadata":true,"EgressTracking":"none"}"#,
                "EgressTracking",
                "none",
            ),
            (
                r#"{"EgressTracking":"Stateless"}"#,
                "EgressTracking",
                "Stateless",
            ),
            (
                r#"{"IngressAllow":[{"Protocol":"tcp","Ports":"9-1"}]}"#,
                "IngressAllow[0].Ports",
                "9-1",
            ),
            (
                r#"{"IngressAllow":[{"Protocol":"tcp","Ports":"22","Sources":["nowhere"]}]}"#,
                "IngressAllow[0].Sources[0]",
                "nowhere",
            ),
            (
                r#"{"IngressAllow":[],"IngressCtInvalid":"accept"}"#,
                "IngressCtInvalid",
                "accept",
            ),
            (
                r#"{"EgressDeny":[{"Destination":"1.2.3.4"}],"EgressAllowCgroups":["a/../b"]}"#,
                "EgressAllowCgroups[0]",
                "a/../b",
            ),
        ] {
            let e = build(json).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_str()), (key, value), "{json}");
            let text = e.to_string();
            assert!(text.contains(key) && text.contains(value), "{text}");
        }
    }
}
