//! settings.json: fetched from the sources of agent.json (`File` is the one this agent reads),
//! cached to `<base>/bosh/settings.json`, with upstream's fallback to the cache when the source
//! fails. Kept as raw JSON here: each subsystem reads its part (mbus reads `mbus`/`env.bosh.mbus`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tracing::{info, warn};

use crate::config::AgentConfig;

/// Why no settings could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("agent config has no settings source of type File (Infrastructure.Settings.Sources)")]
    NoSource,
    #[error(
        "settings from {source_path} failed ({source_error}) and the cache {cache} failed too ({cache_error})"
    )]
    Unavailable {
        source_path: String,
        source_error: String,
        cache: PathBuf,
        cache_error: String,
    },
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

/// Loads settings: the first `File` source that parses wins and is cached; if none does, the
/// cache is used (as upstream does when the infrastructure is unreachable).
pub fn load(config: &AgentConfig, base_dir: &Path) -> Result<Value, SettingsError> {
    let sources: Vec<&str> = config
        .infrastructure
        .settings
        .sources
        .iter()
        .filter(|s| s.kind == "File" && !s.settings_path.is_empty())
        .map(|s| s.settings_path.as_str())
        .collect();
    let cache = cache_path(base_dir);
    let mut last = (String::new(), String::from("no File source"));
    for src in &sources {
        match read_settings(Path::new(src)) {
            Ok(v) => {
                if let Err(e) = write_cache(&cache, &v) {
                    warn!(cache = %cache.display(), error = %e, "cannot cache settings");
                }
                info!(source = %src, "settings loaded");
                return Ok(v);
            }
            Err(e) => {
                warn!(error = %e, "settings source failed");
                last = (src.to_string(), e);
            }
        }
    }
    if sources.is_empty() && !cache.exists() {
        return Err(SettingsError::NoSource);
    }
    match read_settings(&cache) {
        Ok(v) => {
            warn!(cache = %cache.display(), "using cached settings");
            Ok(v)
        }
        Err(cache_error) => Err(SettingsError::Unavailable {
            source_path: last.0,
            source_error: last.1,
            cache,
            cache_error,
        }),
    }
}

fn write_cache(path: &Path, v: &Value) -> Result<(), String> {
    // Settings carry credentials: readable by root only.
    let body = serde_json::to_vec(v).map_err(|e| e.to_string())?;
    platform::files::write_private(path, &body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{AgentConfig, SettingsSource};

    fn tmpdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("bosh-agent-settings-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn config(path: &Path) -> AgentConfig {
        let mut c = AgentConfig::default();
        c.infrastructure.settings.sources = vec![SettingsSource {
            kind: "File".into(),
            settings_path: path.display().to_string(),
        }];
        c
    }

    #[test]
    fn source_is_read_and_cached_then_cache_is_the_fallback() {
        let d = tmpdir("cache");
        let src = d.join("settings.json");
        fs::write(&src, r#"{"agent_id":"a-1","mbus":"nats://10.0.0.6:4222"}"#).unwrap();
        let base = d.join("base");
        let v = load(&config(&src), &base).unwrap();
        assert_eq!(v["agent_id"], "a-1");
        assert!(cache_path(&base).exists());
        fs::remove_file(&src).unwrap();
        let v = load(&config(&src), &base).unwrap();
        assert_eq!(v["agent_id"], "a-1");
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
    fn no_source_is_an_error() {
        let d = tmpdir("none");
        assert!(matches!(
            load(&AgentConfig::default(), &d),
            Err(SettingsError::NoSource)
        ));
        fs::remove_dir_all(&d).unwrap();
    }
}
