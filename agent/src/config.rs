//! agent.json: upstream's keys (Go field names, PascalCase) plus ours under
//! `Platform.Linux.Firewall`. Unknown keys are ignored, as upstream does; invalid JSON stops the
//! start with the file, line and column, a value of the wrong type with the key path too, and a
//! document that is not an object is refused.

use std::path::{Path, PathBuf};

use platform::firewall::policy_config::PolicyConfig;
use serde::Deserialize;

/// The parts of agent.json the agent uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct AgentConfig {
    pub platform: PlatformOptions,
    pub infrastructure: InfrastructureOptions,
}

/// `Platform`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct PlatformOptions {
    pub linux: LinuxOptions,
}

/// `Platform.Linux`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct LinuxOptions {
    /// Upstream key: the stemcell guards monit with its own iptables rules; skip our monit chain.
    pub use_monit_iptables_firewall: bool,
    /// Upstream key (PR #394): guard the director's NATS endpoints.
    #[serde(rename = "EnableNATSFirewall")]
    pub enable_nats_firewall: bool,
    /// Upstream key: `systemd`, or anything else for runit.
    pub service_manager: String,
    /// Ours.
    pub firewall: FirewallOptions,
    /// Ours: seconds between heartbeats (upstream's fixed 30).
    pub heartbeat_interval_seconds: Option<u64>,
    /// Ours: at SIGTERM, how long requests and tasks in flight may take to finish before the
    /// agent exits anyway (default 30).
    #[serde(rename = "ShutdownGraceSeconds")]
    pub shutdown_grace_seconds: Option<u64>,
    /// Upstream key: how persistent disks are found (`""` the hint's path, `virtio`; others
    /// are accepted and make `mount_disk` fail saying so).
    pub device_path_resolution_type: String,
    /// Upstream key (warden): a disk is a directory bind-mounted on the store.
    pub bind_mount_persistent_disk: bool,
    /// Upstream key (warden): the disk is mounted as it is, never partitioned or formatted.
    pub use_preformatted_persistent_disk: bool,
    /// Upstream keys: a regular expression and its replacement turning a disk id into the
    /// by-id name the virtio resolver looks for.
    #[serde(rename = "DiskIDTransformPattern")]
    pub disk_id_transform_pattern: String,
    #[serde(rename = "DiskIDTransformReplacement")]
    pub disk_id_transform_replacement: String,
}

/// `Platform.Linux.Firewall` (keys of this agent, not upstream's).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct FirewallOptions {
    /// Whether any root process may reach monit (so operators' `monit summary` works).
    pub monit_allow_root: bool,
    /// Seconds between drift checks of the live table.
    pub reconcile_interval_seconds: u64,
    /// The workload policies (`EgressDeny`, `EgressAction`, `EgressTracking`,
    /// `DenyCloudMetadata`, `EgressAllowCgroups`, `IngressAllow`, `IngressAllowICMP`, `IngressCtInvalid`,
    /// `GuardLocalhost`, `GuardAlertListener`), keys of this same object. Parsed here, and
    /// validated by the firewall (an invalid value refuses the policies, not the start).
    #[serde(flatten)]
    pub policies: PolicyConfig,
}

impl Default for FirewallOptions {
    fn default() -> Self {
        FirewallOptions {
            monit_allow_root: true,
            reconcile_interval_seconds: 30,
            policies: PolicyConfig::default(),
        }
    }
}

/// `Infrastructure`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct InfrastructureOptions {
    pub settings: SettingsOptions,
}

/// `Infrastructure.Settings`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct SettingsOptions {
    /// Upstream's sources, tried in order (File, HTTP, ConfigDrive, CDROM, InstanceMetadata).
    pub sources: Vec<platform::settings_source::SourceOptions>,
}

/// Why agent.json could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading agent config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent config {path}: {key}: {message} (line {line}, column {column})")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
        line: usize,
        column: usize,
    },
    #[error("agent config {path}: {message} (line {line}, column {column})")]
    Syntax {
        path: PathBuf,
        message: String,
        line: usize,
        column: usize,
    },
    #[error("agent config {path}: the document is {found}, not a JSON object")]
    NotAnObject { path: PathBuf, found: &'static str },
    #[error("agent config {path}: {key}: {value} is out of range: allowed {min}..={max} seconds")]
    OutOfRange {
        path: PathBuf,
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

/// The range every duration key of agent.json must lie in, in seconds. At least one second
/// (a zero period would spin), at most a day: far beyond any useful period, and far enough
/// from `u64::MAX` that adding it to an instant can never overflow.
pub const DURATION_KEY_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;

impl AgentConfig {
    /// Loads agent.json from `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Loads agent.json from `path`, and returns its document too (what a reload compares
    /// with, see [`ignored_changes`]).
    pub fn load_with_document(path: &Path) -> Result<(Self, serde_json::Value), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(path, &text)?;
        // `parse` read the same text as JSON already; this cannot fail, and Null would only
        // make the reload name every key as changed.
        let doc = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok((config, doc))
    }

    /// Checks the values serde cannot: every duration key lies in [`DURATION_KEY_RANGE`].
    fn validate(self, path: &Path) -> Result<Self, ConfigError> {
        let linux = &self.platform.linux;
        let durations = [
            (
                "Platform.Linux.Firewall.ReconcileIntervalSeconds",
                Some(linux.firewall.reconcile_interval_seconds),
            ),
            (
                "Platform.Linux.HeartbeatIntervalSeconds",
                linux.heartbeat_interval_seconds,
            ),
            (
                "Platform.Linux.ShutdownGraceSeconds",
                linux.shutdown_grace_seconds,
            ),
        ];
        for (key, value) in durations {
            if let Some(value) = value.filter(|v| !DURATION_KEY_RANGE.contains(v)) {
                return Err(ConfigError::OutOfRange {
                    path: path.to_path_buf(),
                    key,
                    value,
                    min: *DURATION_KEY_RANGE.start(),
                    max: *DURATION_KEY_RANGE.end(),
                });
            }
        }
        Ok(self)
    }

    /// Parses agent.json text; `path` only names the file in errors. Every duration key is
    /// within [`DURATION_KEY_RANGE`] in a config this returns.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        // Syntax first, on its own: a syntax error has no key (serde_path_to_error would name
        // it `?`), and serde's derive would take an array for a struct (`[]` as an empty
        // config), so the document's type is checked before its keys.
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Syntax {
                path: path.to_path_buf(),
                message: strip_position(&e.to_string()),
                line: e.line(),
                column: e.column(),
            })?;
        let found = match doc {
            serde_json::Value::Object(_) => None,
            serde_json::Value::Null => Some("null"),
            serde_json::Value::Bool(_) => Some("a boolean"),
            serde_json::Value::Number(_) => Some("a number"),
            serde_json::Value::String(_) => Some("a string"),
            serde_json::Value::Array(_) => Some("an array"),
        };
        if let Some(found) = found {
            return Err(ConfigError::NotAnObject {
                path: path.to_path_buf(),
                found,
            });
        }
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = strip_position(&inner.to_string());
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key: if key == "." { "(document)".into() } else { key },
                message,
                line: inner.line(),
                column: inner.column(),
            }
        })?;
        config.validate(path)
    }
}

/// The keys a reload applies: everything under `Platform.Linux.Firewall` (the workload
/// policies and `MonitAllowRoot`) except these, which take effect at the next start.
const FIREWALL_KEYS_FIXED_AT_START: [&str; 1] = ["ReconcileIntervalSeconds"];

/// The keys of agent.json whose value differs between `running` (the document the agent
/// started with) and `reloaded`, other than those a reload applies: a reload ignores them (they
/// take effect at the next start). Dotted paths, sorted; `Platform.Linux.Firewall.X` for the
/// keys of the firewall that are fixed at start. Pure.
pub fn ignored_changes(running: &serde_json::Value, reloaded: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_keys("", running, reloaded, &mut out);
    out.retain(|path| match path.strip_prefix("Platform.Linux.Firewall") {
        None => true,
        // The object replaced by a value of another type.
        Some("") => true,
        Some(rest) => {
            let key = rest.trim_start_matches('.');
            let key = key.split('.').next().unwrap_or(key);
            FIREWALL_KEYS_FIXED_AT_START.contains(&key)
        }
    });
    out
}

/// Appends the paths below `path` where `a` and `b` differ (leaves).
fn diff_keys(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                // A key on one side only is compared with nothing: an object's leaves are
                // named, so a removed `Firewall` object names its keys one by one.
                let none = Value::Object(serde_json::Map::new());
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff_keys(&sub, va, vb, out),
                    (Some(v @ Value::Object(_)), None) => diff_keys(&sub, v, &none, out),
                    (None, Some(v @ Value::Object(_))) => diff_keys(&sub, &none, v, out),
                    _ => out.push(sub),
                }
            }
        }
        _ if a != b => out.push(if path.is_empty() {
            "(document)".into()
        } else {
            path.to_string()
        }),
        _ => {}
    }
}

/// serde_json appends " at line L column C"; the error's fields carry it already.
fn strip_position(message: &str) -> String {
    message
        .split(" at line ")
        .next()
        .unwrap_or(message)
        .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("/x/agent.json"), t)
    }

    #[test]
    fn upstream_example_loads_with_defaults_for_our_keys() {
        let c = parse(
            r#"{"Platform":{"Linux":{"UseDefaultTmpDir":true,"UsePreformattedPersistentDisk":true,
               "DevicePathResolutionType":"virtio","ServiceManager":"systemd","UseMonitIptablesFirewall":false}},
             "Infrastructure":{"Settings":{"Sources":[{"Type":"File","SettingsPath":"/var/vcap/settings.json"}]}}}"#,
        )
        .unwrap();
        assert_eq!(c.platform.linux.service_manager, "systemd");
        assert!(!c.platform.linux.enable_nats_firewall);
        assert!(c.platform.linux.firewall.monit_allow_root);
        assert_eq!(c.platform.linux.firewall.reconcile_interval_seconds, 30);
        assert!(matches!(
            &c.infrastructure.settings.sources[0],
            platform::settings_source::SourceOptions::File(f) if f.settings_path == "/var/vcap/settings.json"
        ));
    }

    #[test]
    fn our_keys_and_nats_flag_are_read() {
        let c = parse(
            r#"{"Platform":{"Linux":{"EnableNATSFirewall":true,"UseMonitIptablesFirewall":true,
               "Firewall":{"MonitAllowRoot":false,"ReconcileIntervalSeconds":2}}}}"#,
        )
        .unwrap();
        assert!(c.platform.linux.enable_nats_firewall);
        assert!(c.platform.linux.use_monit_iptables_firewall);
        assert!(!c.platform.linux.firewall.monit_allow_root);
        assert_eq!(c.platform.linux.firewall.reconcile_interval_seconds, 2);
    }

    #[test]
    fn duration_keys_at_the_extremes_are_refused_with_key_and_range() {
        for key in [
            r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":N}}}}"#,
            r#"{"Platform":{"Linux":{"HeartbeatIntervalSeconds":N}}}"#,
            r#"{"Platform":{"Linux":{"ShutdownGraceSeconds":N}}}"#,
        ] {
            for n in [0, u64::MAX] {
                let e = parse(&key.replace('N', &n.to_string()))
                    .unwrap_err()
                    .to_string();
                let name = if key.contains("Reconcile") {
                    "Platform.Linux.Firewall.ReconcileIntervalSeconds"
                } else if key.contains("Shutdown") {
                    "Platform.Linux.ShutdownGraceSeconds"
                } else {
                    "Platform.Linux.HeartbeatIntervalSeconds"
                };
                assert!(e.contains(name), "{e}");
                assert!(e.contains("1..=86400"), "{e}");
                assert!(e.contains(&n.to_string()), "{e}");
            }
        }
        let c = parse(
            r#"{"Platform":{"Linux":{"HeartbeatIntervalSeconds":86400,
               "Firewall":{"ReconcileIntervalSeconds":1}}}}"#,
        )
        .unwrap();
        assert_eq!(c.platform.linux.heartbeat_interval_seconds, Some(86_400));
    }

    fn doc(t: &str) -> serde_json::Value {
        serde_json::from_str(t).unwrap()
    }

    #[test]
    fn a_reload_ignores_every_change_but_the_firewall_policies_and_names_it() {
        let running = doc(
            r#"{"Platform":{"Linux":{"EnableNATSFirewall":true,"HeartbeatIntervalSeconds":5,
               "Firewall":{"ReconcileIntervalSeconds":2,"MonitAllowRoot":true,"EgressDeny":[{"Destination":"10.0.0.0/8"}]}}},
             "Infrastructure":{"Settings":{"Sources":[{"Type":"File","SettingsPath":"/a"}]}}}"#,
        );
        assert!(ignored_changes(&running, &running).is_empty());
        // Only policies changed (a new key, a removed key, a changed value): nothing ignored.
        let policies = doc(
            r#"{"Platform":{"Linux":{"EnableNATSFirewall":true,"HeartbeatIntervalSeconds":5,
               "Firewall":{"ReconcileIntervalSeconds":2,"IngressAllow":[],"GuardLocalhost":true}}},
             "Infrastructure":{"Settings":{"Sources":[{"Type":"File","SettingsPath":"/a"}]}}}"#,
        );
        assert!(
            ignored_changes(&running, &policies).is_empty(),
            "{:?}",
            ignored_changes(&running, &policies)
        );
        let others = doc(r#"{"Platform":{"Linux":{"HeartbeatIntervalSeconds":6,
               "Firewall":{"ReconcileIntervalSeconds":3,"MonitAllowRoot":true,"EgressDeny":[{"Destination":"10.0.0.0/8"}]}}},
             "Infrastructure":{"Settings":{"Sources":[{"Type":"File","SettingsPath":"/b"}]}},"Extra":1}"#);
        assert_eq!(
            ignored_changes(&running, &others),
            vec![
                "Extra",
                "Infrastructure.Settings.Sources",
                "Platform.Linux.EnableNATSFirewall",
                "Platform.Linux.Firewall.ReconcileIntervalSeconds",
                "Platform.Linux.HeartbeatIntervalSeconds",
            ]
        );
        // The firewall object gone, or the document replaced by another type.
        let gone = doc(
            r#"{"Platform":{"Linux":{"EnableNATSFirewall":true,"HeartbeatIntervalSeconds":5}},
             "Infrastructure":{"Settings":{"Sources":[{"Type":"File","SettingsPath":"/a"}]}}}"#,
        );
        assert_eq!(
            ignored_changes(&running, &gone),
            vec!["Platform.Linux.Firewall.ReconcileIntervalSeconds"]
        );
        assert_eq!(
            ignored_changes(&gone, &running),
            vec!["Platform.Linux.Firewall.ReconcileIntervalSeconds"]
        );
        assert_eq!(
            ignored_changes(&running, &serde_json::Value::Null),
            vec!["(document)"]
        );
    }

    #[test]
    fn empty_object_is_all_defaults() {
        assert_eq!(parse("{}").unwrap(), AgentConfig::default());
    }

    #[test]
    fn invalid_json_names_file_line_and_column() {
        let e = parse("{\n  \"Platform\": {\n    \"Linux\": {,}\n}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/agent.json") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_document_that_is_not_an_object_is_refused() {
        for (text, found) in [
            ("[]", "an array"),
            ("[{}]", "an array"),
            ("null", "null"),
            ("3", "a number"),
            ("\"x\"", "a string"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("/x/agent.json"), "{e}");
            assert!(e.contains(&format!("is {found}, not a JSON object")), "{e}");
        }
    }

    #[test]
    fn a_syntax_error_gives_line_and_column_and_no_key() {
        let e = parse("{\n  \"Platform\": {\n    \"Linux\": {,}\n}")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "agent config /x/agent.json: key must be a string (line 3, column 15)"
        );
        let e = parse("{\"Platform\":").unwrap_err().to_string();
        assert!(!e.contains('?') && e.contains("line 1, column 12"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = parse(r#"{"Platform":{"Linux":{"Firewall":{"MonitAllowRoot":"yes"}}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Platform.Linux.Firewall.MonitAllowRoot"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn the_workload_policy_keys_are_read_beside_ours() {
        let c = parse(
            r#"{"Platform":{"Linux":{"Firewall":{"MonitAllowRoot":false,
               "EgressDeny":[{"Destination":"10.0.0.0/8","Except":[{"Protocol":"udp","Ports":53}]}],
               "EgressAction":"reject","EgressTracking":"stateless","DenyCloudMetadata":true,"EgressAllowCgroups":["system.slice/cpi.service"],
               "IngressAllow":[{"Protocol":"tcp","Ports":"22","Sources":["10.0.0.0/8"]}],
               "IngressAllowICMP":false,"IngressCtInvalid":"allow-list",
               "GuardLocalhost":true,"GuardAlertListener":true}}}}"#,
        )
        .unwrap();
        let fw = &c.platform.linux.firewall;
        assert!(!fw.monit_allow_root);
        let p = &fw.policies;
        assert_eq!(p.egress_deny.len(), 1);
        assert_eq!(p.egress_deny[0].destination, "10.0.0.0/8");
        assert_eq!(p.egress_action.as_deref(), Some("reject"));
        assert_eq!(p.egress_tracking.as_deref(), Some("stateless"));
        assert!(p.deny_cloud_metadata && p.guard_localhost && p.guard_alert_listener);
        assert!(!p.ingress_allow_icmp);
        assert_eq!(p.egress_allow_cgroups, vec!["system.slice/cpi.service"]);
        assert_eq!(p.ingress_allow.as_ref().map(Vec::len), Some(1));
        assert_eq!(p.ingress_ct_invalid.as_deref(), Some("allow-list"));
    }

    #[test]
    fn absent_workload_keys_are_the_defaults() {
        let c = parse(r#"{"Platform":{"Linux":{"Firewall":{"MonitAllowRoot":false}}}}"#).unwrap();
        assert_eq!(c.platform.linux.firewall.policies, PolicyConfig::default());
        assert_eq!(
            parse("{}").unwrap().platform.linux.firewall.policies,
            PolicyConfig::default()
        );
    }

    #[test]
    fn a_workload_key_of_the_wrong_type_names_the_file() {
        let e = parse(r#"{"Platform":{"Linux":{"Firewall":{"EgressDeny":"10.0.0.0/8"}}}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/agent.json") && e.contains("Platform.Linux.Firewall"),
            "{e}"
        );
    }
}
