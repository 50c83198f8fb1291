//! A persistent disk's settings: what the director's hint (from `add_persistent_disk` or
//! `disks.persistent` in the settings) says about where the disk is, plus the file system,
//! mount options and partitioner from `env.persistent_disk_*`.
//!
//! The serialized form is upstream's `DiskSettings` (Go field names, no JSON tags), so a hints
//! file written by the Go agent is read unchanged and the other way round.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::DiskError;

/// iSCSI details a hint may carry (the password is a secret: never shown in messages).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IscsiSettings {
    /// `initiator_name` in the hint.
    #[serde(rename = "InitiatorName")]
    pub initiator_name: String,
    /// `username` in the hint.
    #[serde(rename = "Username")]
    pub username: String,
    /// `target` in the hint.
    #[serde(rename = "Target")]
    pub target: String,
    /// `password` in the hint.
    #[serde(rename = "Password")]
    pub password: String,
}

/// One disk's settings, as stored in `persistent_disk_hints.json` (upstream's field names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskSettings {
    /// The disk cid.
    #[serde(rename = "ID")]
    pub id: String,
    /// The hint's `id`.
    #[serde(rename = "DeviceID")]
    pub device_id: String,
    /// The hint's `volume_id` (or the string hint).
    #[serde(rename = "VolumeID")]
    pub volume_id: String,
    /// The hint's `lun`.
    #[serde(rename = "Lun")]
    pub lun: String,
    /// The hint's `host_device_id`.
    #[serde(rename = "HostDeviceID")]
    pub host_device_id: String,
    /// The hint's `path` (or the string hint).
    #[serde(rename = "Path")]
    pub path: String,
    /// The hint's `iscsi_settings`.
    #[serde(rename = "ISCSISettings")]
    pub iscsi: IscsiSettings,
    /// `env.persistent_disk_fs` ("" = ext4).
    #[serde(rename = "FileSystemType")]
    pub filesystem: String,
    /// `env.persistent_disk_mount_options`; Go writes `null` for none.
    #[serde(rename = "MountOptions", deserialize_with = "null_as_empty")]
    pub mount_options: Vec<String>,
    /// `env.persistent_disk_partitioner` ("", "sfdisk" or "parted").
    #[serde(rename = "Partitioner")]
    pub partitioner: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// The `env.persistent_disk_*` settings, parsed by the agent from its settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskEnv {
    /// `env.persistent_disk_fs`: "", "ext4" or "xfs".
    pub filesystem: String,
    /// `env.persistent_disk_mount_options`.
    pub mount_options: Vec<String>,
    /// `env.persistent_disk_partitioner`: "", "sfdisk" or "parted".
    pub partitioner: String,
}

fn string_field(
    cid: &str,
    map: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<String, DiskError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        // CPIs send luns as numbers at times; a number is unambiguous, so it is taken.
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(DiskError::BadHint {
            cid: cid.to_string(),
            detail: format!("{key:?} must be a string, got {other}"),
        }),
    }
}

impl DiskSettings {
    /// Builds a disk's settings from the director's hint (upstream's shapes: a string, which is
    /// both the path and the volume id, or a map with `path`, `volume_id`, `id`, `lun`,
    /// `host_device_id`, `iscsi_settings`) and the `env.persistent_disk_*` settings. Unknown
    /// keys are ignored as upstream does; a known key of the wrong type is an error naming it
    /// (upstream panics there).
    pub fn from_hint(cid: &str, hint: &Value, env: &DiskEnv) -> Result<DiskSettings, DiskError> {
        if cid.is_empty() {
            return Err(DiskError::BadHint {
                cid: String::new(),
                detail: "the disk cid is empty".into(),
            });
        }
        let mut s = DiskSettings {
            id: cid.to_string(),
            ..DiskSettings::default()
        };
        match hint {
            Value::String(p) => {
                s.path = p.clone();
                s.volume_id = p.clone();
            }
            Value::Object(map) => {
                s.path = string_field(cid, map, "path")?;
                s.volume_id = string_field(cid, map, "volume_id")?;
                s.device_id = string_field(cid, map, "id")?;
                s.lun = string_field(cid, map, "lun")?;
                s.host_device_id = string_field(cid, map, "host_device_id")?;
                match map.get("iscsi_settings") {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(i)) => {
                        s.iscsi = IscsiSettings {
                            initiator_name: string_field(cid, i, "initiator_name")?,
                            username: string_field(cid, i, "username")?,
                            target: string_field(cid, i, "target")?,
                            password: string_field(cid, i, "password")?,
                        }
                    }
                    Some(other) => {
                        return Err(DiskError::BadHint {
                            cid: cid.to_string(),
                            detail: format!("\"iscsi_settings\" must be a map, got {other}"),
                        });
                    }
                }
            }
            // Upstream keeps the cid only; the device then cannot be resolved, which mount
            // reports. Null is what a director sends for "no hint".
            Value::Null => {}
            other => {
                return Err(DiskError::BadHint {
                    cid: cid.to_string(),
                    detail: format!("a hint is a string or a map, got {other}"),
                });
            }
        }
        s.filesystem = env.filesystem.clone();
        s.mount_options = env.mount_options.clone();
        s.partitioner = env.partitioner.clone();
        Ok(s)
    }

    /// Upstream's `%+v` rendering of the settings (the text of unmount_disk's message), with
    /// the iSCSI password replaced by `<redacted>` when set: the message goes to the
    /// director's task log.
    pub fn describe(&self) -> String {
        let password = if self.iscsi.password.is_empty() {
            ""
        } else {
            "<redacted>"
        };
        format!(
            "{{ID:{} DeviceID:{} VolumeID:{} Lun:{} HostDeviceID:{} Path:{} ISCSISettings:{{InitiatorName:{} Username:{} Target:{} Password:{}}} FileSystemType:{} MountOptions:[{}] Partitioner:{}}}",
            self.id,
            self.device_id,
            self.volume_id,
            self.lun,
            self.host_device_id,
            self.path,
            self.iscsi.initiator_name,
            self.iscsi.username,
            self.iscsi.target,
            password,
            self.filesystem,
            self.mount_options.join(" "),
            self.partitioner,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn env() -> DiskEnv {
        DiskEnv {
            filesystem: "xfs".into(),
            mount_options: vec!["noatime".into()],
            partitioner: "parted".into(),
        }
    }

    #[test]
    fn a_string_hint_is_path_and_volume_id() {
        let s = DiskSettings::from_hint("vol-1", &json!("/dev/sdf"), &env()).unwrap();
        assert_eq!(s.id, "vol-1");
        assert_eq!(s.path, "/dev/sdf");
        assert_eq!(s.volume_id, "/dev/sdf");
        assert_eq!(s.filesystem, "xfs");
        assert_eq!(s.mount_options, vec!["noatime"]);
        assert_eq!(s.partitioner, "parted");
    }

    #[test]
    fn a_map_hint_fills_every_field() {
        let hint = json!({"path":"/dev/sdc","volume_id":"3","id":"dev-id","lun":0,
            "host_device_id":"{hd}","unknown":[1],
            "iscsi_settings":{"initiator_name":"iqn.x","username":"u","target":"10.0.0.1","password":"pw"}});
        let s = DiskSettings::from_hint("disk-1", &hint, &DiskEnv::default()).unwrap();
        assert_eq!(
            (
                s.path.as_str(),
                s.volume_id.as_str(),
                s.device_id.as_str(),
                s.lun.as_str()
            ),
            ("/dev/sdc", "3", "dev-id", "0")
        );
        assert_eq!(s.host_device_id, "{hd}");
        assert_eq!(s.iscsi.initiator_name, "iqn.x");
        assert_eq!(s.iscsi.password, "pw");
        let text = s.describe();
        assert!(!text.contains("pw"), "{text}");
        assert!(text.contains("Password:<redacted>"), "{text}");
        assert!(
            text.starts_with("{ID:disk-1 DeviceID:dev-id VolumeID:3 Lun:0 "),
            "{text}"
        );
    }

    #[test]
    fn hostile_hints_are_errors_naming_the_field() {
        for (hint, word) in [
            (json!({"path": 5.5e300}), ""),
            (json!({"path": ["a"]}), "\"path\""),
            (json!({"volume_id": {}}), "\"volume_id\""),
            (json!({"iscsi_settings": "x"}), "iscsi_settings"),
            (
                json!({"iscsi_settings": {"password": true}}),
                "\"password\"",
            ),
            (json!(12), "a hint is a string or a map"),
            (json!([1, 2]), "a hint is a string or a map"),
        ] {
            match DiskSettings::from_hint("c", &hint, &DiskEnv::default()) {
                // A float is a number: taken as text, not refused.
                Ok(s) if word.is_empty() => assert!(!s.path.is_empty()),
                Ok(s) => panic!("{hint} accepted as {s:?}"),
                Err(e) => {
                    let t = e.to_string();
                    assert!(t.contains(word) && t.contains("disk 'c'"), "{t}");
                }
            }
        }
        assert!(DiskSettings::from_hint("", &json!("/dev/sdb"), &DiskEnv::default()).is_err());
        // Null: the cid only.
        let s = DiskSettings::from_hint("c", &Value::Null, &DiskEnv::default()).unwrap();
        assert_eq!(s.path, "");
    }

    #[test]
    fn the_serialized_form_is_upstreams() {
        let s = DiskSettings::from_hint("vol-1", &json!("/dev/sdf"), &DiskEnv::default()).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"ID":"vol-1","DeviceID":"","VolumeID":"/dev/sdf","Lun":"","HostDeviceID":"","Path":"/dev/sdf","ISCSISettings":{"InitiatorName":"","Username":"","Target":"","Password":""},"FileSystemType":"","MountOptions":[],"Partitioner":""}"#
        );
        // What the Go agent writes (MountOptions null, fields missing) reads back.
        let go: DiskSettings =
            serde_json::from_str(r#"{"ID":"vol-1","Path":"/dev/sdf","MountOptions":null}"#)
                .unwrap();
        assert_eq!(go.path, "/dev/sdf");
        assert!(go.mount_options.is_empty());
    }
}
