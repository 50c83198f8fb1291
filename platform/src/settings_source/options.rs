//! `Infrastructure.Settings.Sources` of agent.json: one object per source, told apart by `Type`,
//! with upstream's keys (Go field names). Missing keys are empty, unknown keys are ignored, an
//! unknown or missing `Type` is an error at config load, as upstream's.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One settings source, in the order agent.json lists them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "Type")]
pub enum SourceOptions {
    /// The metadata service (AWS, OpenStack, Alibaba): user data holding the settings.
    #[serde(rename = "HTTP")]
    Http(HttpOptions),
    /// A labelled drive (or a directory) holding the user data (OpenStack, Azure).
    ConfigDrive(ConfigDriveOptions),
    /// A settings file on this box (warden, Azure's CustomData, bootstrap files).
    File(FileOptions),
    /// vSphere's `env` file on the CD-ROM the CPI attaches.
    #[serde(rename = "CDROM")]
    Cdrom(CdromOptions),
    /// One metadata value holding the settings (GCP, Alibaba).
    InstanceMetadata(InstanceMetadataOptions),
    /// vSphere's guestinfo through VMware tools: accepted so that vSphere's agent.json loads,
    /// never read by this agent (the `CDROM` source that follows it on stemcells is).
    VsphereGuestInfo(VsphereGuestInfoOptions),
}

impl SourceOptions {
    /// The `Type` as agent.json spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceOptions::Http(_) => "HTTP",
            SourceOptions::ConfigDrive(_) => "ConfigDrive",
            SourceOptions::File(_) => "File",
            SourceOptions::Cdrom(_) => "CDROM",
            SourceOptions::InstanceMetadata(_) => "InstanceMetadata",
            SourceOptions::VsphereGuestInfo(_) => "VsphereGuestInfo",
        }
    }
}

/// `Type: HTTP`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct HttpOptions {
    /// `http://169.254.169.254`; every path below is appended to it as is.
    #[serde(rename = "URI")]
    pub uri: String,
    /// Sent with every GET (never with the token request, as upstream).
    pub headers: BTreeMap<String, String>,
    /// `/latest/user-data`: the settings (JSON, or base64 of it).
    pub user_data_path: String,
    /// `/latest/meta-data/instance-id`.
    #[serde(rename = "InstanceIDPath")]
    pub instance_id_path: String,
    /// `/latest/meta-data/public-keys/0/openssh-key`: vcap's key from the IaaS.
    #[serde(rename = "SSHKeysPath")]
    pub ssh_keys_path: String,
    /// `/latest/api/token`: IMDSv2 (a PUT with a TTL gives the token sent on every GET).
    pub token_path: String,
}

/// `Type: ConfigDrive`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct ConfigDriveOptions {
    /// Block devices (`/dev/disk/by-label/CONFIG-2`, `…/config-2`) or directories, tried in
    /// order.
    pub disk_paths: Vec<String>,
    /// `ec2/latest/meta-data.json` inside the drive: the public key.
    pub meta_data_path: String,
    /// `ec2/latest/user-data` inside the drive: the settings.
    pub user_data_path: String,
    /// Accepted and unused, as upstream (the settings are at `UserDataPath`).
    pub settings_path: String,
}

/// `Type: File`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct FileOptions {
    /// The settings file.
    pub settings_path: String,
    /// Accepted and unused, as upstream.
    pub meta_data_path: String,
    /// Accepted and unused, as upstream.
    pub user_data_path: String,
}

/// `Type: CDROM`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct CdromOptions {
    /// The file on the disc: `env` on vSphere.
    pub file_name: String,
}

/// `Type: InstanceMetadata`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct InstanceMetadataOptions {
    /// `http://169.254.169.254`.
    #[serde(rename = "URI")]
    pub uri: String,
    /// `Metadata-Flavor: Google` on GCP; sent with the GET.
    pub headers: BTreeMap<String, String>,
    /// `/computeMetadata/v1/instance/attributes/bosh_settings`: the settings JSON.
    pub settings_path: String,
}

/// `Type: VsphereGuestInfo`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "PascalCase")]
pub struct VsphereGuestInfoOptions {
    /// Accepted and unused.
    pub rpc_tool_path: String,
    /// Accepted and unused.
    pub vm_toolsd_path: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(t: &str) -> Result<Vec<SourceOptions>, serde_json::Error> {
        serde_json::from_str(t)
    }

    #[test]
    fn stemcell_sources_parse_with_upstream_keys() {
        // The agent.json sources of the AWS, OpenStack, GCP, vSphere, Azure and warden stemcells.
        let v = parse(
            r#"[{"Type":"HTTP","URI":"http://169.254.169.254","UserDataPath":"/latest/user-data",
                 "InstanceIDPath":"/latest/meta-data/instance-id",
                 "SSHKeysPath":"/latest/meta-data/public-keys/0/openssh-key","TokenPath":"/latest/api/token"},
                {"Type":"ConfigDrive","DiskPaths":["/dev/disk/by-label/CONFIG-2","/dev/disk/by-label/config-2"],
                 "MetaDataPath":"ec2/latest/meta-data.json","UserDataPath":"ec2/latest/user-data"},
                {"Type":"InstanceMetadata","URI":"http://169.254.169.254",
                 "SettingsPath":"/computeMetadata/v1/instance/attributes/bosh_settings",
                 "Headers":{"Metadata-Flavor":"Google"}},
                {"Type":"VsphereGuestInfo"},{"Type":"CDROM","FileName":"env"},
                {"Type":"File","MetaDataPath":"","UserDataPath":"/var/vcap/data/waagent/CustomData",
                 "SettingsPath":"/var/vcap/data/waagent/CustomData","Unknown":1}]"#,
        )
        .unwrap();
        let kinds: Vec<_> = v.iter().map(SourceOptions::kind).collect();
        assert_eq!(
            kinds,
            [
                "HTTP",
                "ConfigDrive",
                "InstanceMetadata",
                "VsphereGuestInfo",
                "CDROM",
                "File"
            ]
        );
        let SourceOptions::Http(h) = &v[0] else {
            panic!("{:?}", v[0])
        };
        assert_eq!(h.uri, "http://169.254.169.254");
        assert_eq!(h.token_path, "/latest/api/token");
        assert_eq!(h.instance_id_path, "/latest/meta-data/instance-id");
        assert_eq!(
            h.ssh_keys_path,
            "/latest/meta-data/public-keys/0/openssh-key"
        );
        assert!(h.headers.is_empty());
        let SourceOptions::ConfigDrive(c) = &v[1] else {
            panic!()
        };
        assert_eq!(c.disk_paths.len(), 2);
        assert_eq!(c.user_data_path, "ec2/latest/user-data");
        let SourceOptions::InstanceMetadata(m) = &v[2] else {
            panic!()
        };
        assert_eq!(m.headers["Metadata-Flavor"], "Google");
        let SourceOptions::Cdrom(c) = &v[4] else {
            panic!()
        };
        assert_eq!(c.file_name, "env");
        let SourceOptions::File(f) = &v[5] else {
            panic!()
        };
        assert_eq!(f.settings_path, "/var/vcap/data/waagent/CustomData");
    }

    #[test]
    fn missing_or_unknown_type_and_wrong_value_types_are_errors() {
        let e = parse(r#"[{"SettingsPath":"/x"}]"#).unwrap_err();
        assert!(e.to_string().contains("missing field `Type`"), "{e}");
        let e = parse(r#"[{"Type":"Registry"}]"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `Registry`"), "{e}");
        let e = parse(r#"[{"Type":"ConfigDrive","DiskPaths":"/dev/sr0"}]"#).unwrap_err();
        assert!(e.to_string().contains("expected a sequence"), "{e}");
        let e = parse(r#"[{"Type":"HTTP","Headers":{"A":1}}]"#).unwrap_err();
        assert!(e.to_string().contains("expected a string"), "{e}");
    }

    #[test]
    fn empty_objects_take_empty_values() {
        let v = parse(r#"[{"Type":"File"},{"Type":"HTTP"}]"#).unwrap();
        assert_eq!(v[0], SourceOptions::File(FileOptions::default()));
        assert_eq!(v[1], SourceOptions::Http(HttpOptions::default()));
    }
}
