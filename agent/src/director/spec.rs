//! The applied spec, `<base>/bosh/spec.json`: read, written privately, and the parts the
//! actions and heartbeats use (its jobs, the drain protocol's view of it).

use std::path::{Path, PathBuf};

use jobs::DrainSpec;
use serde_json::{Value, json};

/// `<base>/bosh/spec.json`.
pub fn spec_path(base: &Path) -> PathBuf {
    base.join("bosh").join("spec.json")
}

/// Reads the applied spec; a missing file is the empty spec, as upstream.
pub fn read_spec(base: &Path) -> Result<Value, String> {
    let path = spec_path(base);
    match std::fs::read(&path) {
        Ok(b) => {
            let v: Value = serde_json::from_slice(&b)
                .map_err(|e| format!("Reading spec {}: {e}", path.display()))?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(format!(
                    "Reading spec {}: not a JSON object",
                    path.display()
                ))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(e) => Err(format!("Reading spec {}: {e}", path.display())),
    }
}

/// Writes a JSON file privately (0600, root only) and durably: the applied spec and the
/// agent's other records may hold credentials.
pub fn write_json(path: &Path, v: &Value) -> Result<(), String> {
    let body = serde_json::to_vec(v).map_err(|e| e.to_string())?;
    platform::files::write_private(path, &body).map_err(|e| e.to_string())
}

/// The jobs of a spec, as upstream's `spec.Jobs()`: the job's templates, only once a rendered
/// templates archive was applied.
pub fn spec_jobs(spec: &Value) -> Vec<String> {
    let has_archive = spec
        .get("rendered_templates_archive")
        .is_some_and(|a| a.is_object());
    if !has_archive {
        return Vec::new();
    }
    spec.pointer("/job/templates")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|j| j.get("name")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What the drain protocol compares of a spec.
pub fn drain_spec(spec: &Value) -> DrainSpec {
    DrainSpec {
        has_jobs: !spec_jobs(spec).is_empty(),
        configuration_hash: spec
            .get("configuration_hash")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        packages: spec
            .get("packages")
            .and_then(Value::as_object)
            .map(|p| {
                p.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.get("sha1")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        persistent_disk: spec
            .get("persistent_disk")
            .and_then(Value::as_i64)
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn jobs_come_from_templates_once_an_archive_is_applied() {
        let spec =
            json!({"job": {"name": "web", "templates": [{"name": "nginx"}, {"name": "app"}]}});
        assert!(spec_jobs(&spec).is_empty());
        let mut with = spec.clone();
        with["rendered_templates_archive"] = json!({"sha1": "x", "blobstore_id": "y"});
        assert_eq!(spec_jobs(&with), vec!["nginx", "app"]);
    }

    #[test]
    fn drain_spec_reads_hash_packages_and_disk() {
        let d = drain_spec(&json!({"configuration_hash": "h", "persistent_disk": 1024,
            "packages": {"ruby": {"sha1": "s1"}}}));
        assert_eq!(d.configuration_hash, "h");
        assert_eq!(d.persistent_disk, 1024);
        assert_eq!(d.packages.get("ruby").map(String::as_str), Some("s1"));
        assert!(!d.has_jobs);
    }

    #[test]
    fn missing_spec_is_empty_and_a_bad_one_is_an_error() {
        let d = std::env::temp_dir().join(format!("bosh-agent-spec-{}", std::process::id()));
        assert_eq!(read_spec(&d).unwrap(), json!({}));
        write_json(&spec_path(&d), &json!({"a": 1})).unwrap();
        assert_eq!(read_spec(&d).unwrap(), json!({"a": 1}));
        std::fs::write(spec_path(&d), "[1]").unwrap();
        assert!(read_spec(&d).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
