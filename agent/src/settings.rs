//! settings.json: fetched from the sources of agent.json (`File` is the one this agent reads),
//! cached to `<base>/bosh/settings.json`, with upstream's fallback to the cache when the source
//! fails, and parsed once into [`Settings`]. The mbus part (`mbus`, `env.bosh.mbus`) is the
//! `mbus` crate's to read, from [`Settings::document`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{info, warn};

/// settings.json, parsed: the parts the agent reads. A part of the wrong shape is logged
/// (naming it) and read as empty, as the agent always has: one odd field does not cut the VM
/// off its director.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// `agent_id`: the subject `agent.<id>` (checked by the mbus configuration).
    #[serde(deserialize_with = "lenient")]
    pub agent_id: String,
    /// `blobstore`: the oldest place of the blobstore's settings (provider-specific options).
    #[serde(deserialize_with = "lenient")]
    pub blobstore: Option<serde_json::Map<String, Value>>,
    /// `networks`, by name.
    #[serde(deserialize_with = "lenient")]
    pub networks: BTreeMap<String, Network>,
    /// `disks`.
    #[serde(deserialize_with = "lenient")]
    pub disks: Disks,
    /// `env`.
    #[serde(deserialize_with = "lenient")]
    pub env: Env,
    /// `vm`.
    #[serde(deserialize_with = "lenient")]
    pub vm: Vm,
    /// The whole document, for the mbus configuration.
    #[serde(skip)]
    document: Value,
}

/// One network of `networks`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Network {
    /// `manual`, `dynamic` or `vip`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub ip: Option<String>,
    pub netmask: Option<String>,
    pub gateway: Option<String>,
}

/// `disks`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Disks {
    /// `persistent`: disk cid → its device path, or an object with `path`.
    pub persistent: BTreeMap<String, Value>,
}

/// `env`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Env {
    pub bosh: EnvBosh,
}

/// `env.bosh`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct EnvBosh {
    /// `env.bosh.blobstores`: the blobstore's settings, first one used.
    #[serde(deserialize_with = "lenient")]
    pub blobstores: Vec<Value>,
    /// `env.bosh.parallel`: blobs fetched at once.
    #[serde(deserialize_with = "lenient")]
    pub parallel: Option<u64>,
}

/// `vm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Vm {
    pub name: String,
}

/// A part of the wrong shape reads as its default (logged).
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let v = Value::deserialize(d)?;
    if v.is_null() {
        return Ok(T::default());
    }
    Ok(serde_json::from_value(v.clone()).unwrap_or_else(|e| {
        warn!(error = %e, value = %shorten(&v), "ignoring a settings field of the wrong shape");
        T::default()
    }))
}

fn shorten(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 64 {
        let mut cut = 64;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Settings {
    /// Parses a settings document (a JSON object).
    pub fn parse(doc: &Value) -> Result<Settings, String> {
        if !doc.is_object() {
            return Err("settings must be a JSON object".into());
        }
        let mut s: Settings = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
        s.document = doc.clone();
        Ok(s)
    }

    /// The document as read (for the mbus configuration).
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// The VM's addresses (`networks.*.ip`), for alerts.
    pub fn ips(&self) -> Vec<String> {
        self.networks
            .values()
            .filter_map(|n| n.ip.clone())
            .collect()
    }
}

use crate::config::AgentConfig;

/// Why no settings could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "agent config has no settings source (Infrastructure.Settings.Sources) and there is no cache"
    )]
    NoSource,
    #[error("settings cannot be used: {0}")]
    Unusable(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Where the cache lives: `<base>/bosh/settings.json`.
pub fn cache_path(base_dir: &Path) -> PathBuf {
    base_dir.join("bosh").join("settings.json")
}

/// Where the director's last `update_settings` argument is kept: `<base>/bosh/update_settings.json`.
pub fn update_settings_path(base_dir: &Path) -> PathBuf {
    base_dir.join("bosh").join("update_settings.json")
}

/// The persisted `update_settings` document, if any (upstream loads it at start). A missing
/// file is `None`; an unreadable or malformed one is logged and ignored, so that it cannot
/// keep the agent off the bus.
pub fn load_update_settings(base_dir: &Path) -> Option<Value> {
    let path = update_settings_path(base_dir);
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring malformed update_settings");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring unreadable update_settings");
            None
        }
    }
}

/// The agent's files that may hold a secret (mbus credentials, the mTLS key, blobstore
/// credentials, the password hash, job properties). All are written 0600 by
/// [`platform::files::write_private`].
pub fn secret_files(base_dir: &Path) -> Vec<PathBuf> {
    let bosh = base_dir.join("bosh");
    let mut v: Vec<PathBuf> = [
        "settings.json",
        "update_settings.json",
        "mbus_last_connected.json",
        "spec.json",
        "persistent_disk_hints.json",
    ]
    .iter()
    .map(|f| bosh.join(f))
    .collect();
    if let Ok(entries) = fs::read_dir(bosh.join("etc")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("blobstore-") && name.ends_with(".json") {
                v.push(e.path());
            }
        }
    }
    v
}

/// At boot: narrows the mode of secret files an earlier agent left readable, and removes the
/// temporary files an interrupted write left (including an older agent's `*.json.tmp`).
pub fn secure_files(base_dir: &Path) {
    for p in secret_files(base_dir) {
        match platform::files::restrict(&p) {
            Ok(platform::files::Restricted::Narrowed(old)) => {
                warn!(path = %p.display(), old_mode = format!("{old:o}"), "a file holding secrets was readable by others; now 0600")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot restrict a file holding secrets"),
        }
        let old_tmp = p.with_extension("json.tmp");
        if fs::remove_file(&old_tmp).is_ok() {
            info!(path = %old_tmp.display(), "removed a temporary file of an interrupted write");
        }
    }
    let n = platform::files::remove_stale_temporaries(&base_dir.join("bosh"));
    if n > 0 {
        info!(count = n, "removed temporary files of interrupted writes");
    }
}

/// Reads and parses a settings file; the error names the file, line and column.
pub fn read_settings(path: &Path) -> Result<Value, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !v.is_object() {
        return Err(format!(
            "{}: settings must be a JSON object",
            path.display()
        ));
    }
    Ok(v)
}

/// Loads settings from agent.json's sources in order (see `platform::settings_source`): the
/// first that gives a settings document wins and is cached; if none does, the cache is used
/// (as upstream does when the infrastructure is unreachable).
pub fn load(config: &AgentConfig, base_dir: &Path) -> Result<Settings, SettingsError> {
    let doc = load_document(config, base_dir)?;
    Settings::parse(&doc).map_err(SettingsError::Unusable)
}

/// [`load`]'s document, before parsing.
fn load_document(config: &AgentConfig, base_dir: &Path) -> Result<Value, SettingsError> {
    use platform::settings_source::{self as ss, LoadError, Origin};
    let ctx = ss::Context::new(base_dir);
    match ss::load(&config.infrastructure.settings.sources, &ctx) {
        Ok(loaded) => {
            match &loaded.origin {
                Origin::Source {
                    index,
                    kind,
                    earlier_failures,
                } => {
                    info!(source = index, kind, earlier_failures = %earlier_failures, "settings loaded")
                }
                Origin::Cache { path, failures } => {
                    warn!(cache = %path.display(), failures = %failures, "using cached settings")
                }
            }
            Ok(loaded.settings)
        }
        Err(LoadError::NoSources { .. }) => Err(SettingsError::NoSource),
        Err(e) => Err(SettingsError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::AgentConfig;
    use platform::settings_source::{FileOptions, SourceOptions};

    fn tmpdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("bosh-agent-settings-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn config(path: &Path) -> AgentConfig {
        let mut c = AgentConfig::default();
        c.infrastructure.settings.sources = vec![SourceOptions::File(FileOptions {
            settings_path: path.display().to_string(),
            ..FileOptions::default()
        })];
        c
    }

    #[test]
    fn source_is_read_and_cached_then_cache_is_the_fallback() {
        let d = tmpdir("cache");
        let src = d.join("settings.json");
        fs::write(&src, r#"{"agent_id":"a-1","mbus":"nats://10.0.0.6:4222"}"#).unwrap();
        let base = d.join("base");
        let v = load(&config(&src), &base).unwrap();
        assert_eq!(v.agent_id, "a-1");
        assert!(cache_path(&base).exists());
        fs::remove_file(&src).unwrap();
        let v = load(&config(&src), &base).unwrap();
        assert_eq!(v.agent_id, "a-1");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_source_without_cache_names_file_line_and_column() {
        let d = tmpdir("bad");
        let src = d.join("settings.json");
        fs::write(&src, "{\n \"agent_id\": ,\n}").unwrap();
        let e = load(&config(&src), &d.join("base"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("settings.json") && e.contains("line 2"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn boot_narrows_open_secret_files_and_removes_temporaries() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("secure");
        let bosh = d.join("bosh");
        fs::create_dir_all(bosh.join("etc")).unwrap();
        for f in ["update_settings.json", "spec.json", "etc/blobstore-s3.json"] {
            fs::write(bosh.join(f), "{}").unwrap();
            fs::set_permissions(bosh.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        fs::write(bosh.join("spec.json.tmp"), "{").unwrap();
        fs::write(bosh.join(".spec.json.1.ab.tmp"), "{").unwrap();
        secure_files(&d);
        for f in ["update_settings.json", "spec.json", "etc/blobstore-s3.json"] {
            let mode = fs::metadata(bosh.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert!(!bosh.join("spec.json.tmp").exists());
        assert!(!bosh.join(".spec.json.1.ab.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn parts_are_typed_and_a_part_of_the_wrong_shape_reads_as_empty() {
        let s = Settings::parse(&serde_json::json!({
            "agent_id": "a-1", "vm": {"name": "vm-1"},
            "networks": {"d": {"type": "manual", "ip": "10.0.0.9"}, "e": {"ip": "10.0.0.10"}},
            "disks": {"persistent": {"disk-1": "/dev/sdc"}},
            "env": {"bosh": {"parallel": 3, "blobstores": [{"provider": "dav"}]}},
            "blobstore": {"provider": "local"}}))
        .unwrap();
        assert_eq!(s.agent_id, "a-1");
        assert_eq!(s.vm.name, "vm-1");
        assert_eq!(s.ips(), vec!["10.0.0.9", "10.0.0.10"]);
        assert_eq!(s.networks["d"].kind.as_deref(), Some("manual"));
        assert_eq!(s.env.bosh.parallel, Some(3));
        assert_eq!(s.env.bosh.blobstores.len(), 1);
        assert_eq!(s.document()["agent_id"], "a-1");
        let odd = Settings::parse(&serde_json::json!({
            "agent_id": "a-1", "vm": [], "networks": 5, "env": {"bosh": {"parallel": "x"}}}))
        .unwrap();
        assert_eq!(odd.vm.name, "");
        assert!(odd.networks.is_empty());
        assert_eq!(odd.env.bosh.parallel, None);
        assert!(Settings::parse(&serde_json::json!([])).is_err());
    }

    #[test]
    fn no_source_is_an_error() {
        let d = tmpdir("none");
        assert!(matches!(
            load(&AgentConfig::default(), &d),
            Err(SettingsError::NoSource)
        ));
        fs::remove_dir_all(&d).unwrap();
    }
}
