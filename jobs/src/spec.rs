//! The director's apply spec, typed: the jobs (from `job.templates` and the rendered templates
//! archive) and packages the applier installs, and the keys it branches on.
//!
//! Parsing validates everything the applier later turns into paths: every job and package name
//! must be a safe path component ([`check_name`]), every version non-empty, every digest string
//! well formed. A spec that passes [`ApplySpec::from_json`] can be installed without any path
//! leaving `<base>`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// Upstream's default `properties.logging.max_log_file_size`.
pub const DEFAULT_MAX_LOG_FILE_SIZE: &str = "50M";

/// Where a blob is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSource {
    /// The blobstore id (also the name under `<data>/blobs` and `<data>/sensitive_blobs`).
    pub blobstore_id: String,
    /// The digest string in upstream's canonical form (see [`canonical_digest`]); it is part
    /// of the bundle directory name.
    pub digest: String,
}

/// One compiled package of the spec (`packages.<key>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    /// A safe path component.
    pub name: String,
    /// Non-empty.
    pub version: String,
    /// The compiled package's blob.
    pub source: BlobSource,
}

/// One entry of `job.templates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTemplate {
    /// A safe path component.
    pub name: String,
    /// Non-empty.
    pub version: String,
}

/// A job to install: a template of `job.templates` whose files come from the rendered
/// templates archive (entries under `<name>/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// A safe path component.
    pub name: String,
    /// Non-empty.
    pub version: String,
    /// The rendered templates archive (shared by every job of the instance).
    pub source: BlobSource,
}

/// The parts of the apply spec the applier uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplySpec {
    /// `job.name` (the instance group), if any.
    pub job_name: Option<String>,
    /// `job.templates`, in the director's order.
    pub templates: Vec<JobTemplate>,
    /// `packages`, by key.
    pub packages: BTreeMap<String, PackageSpec>,
    /// `rendered_templates_archive`; `None` when absent, null, or both fields empty (as
    /// upstream).
    pub rendered_templates_archive: Option<BlobSource>,
    /// `configuration_hash`; empty when absent. The full applier runs only when it is set.
    pub configuration_hash: String,
    /// `properties.logging.max_log_file_size`, or [`DEFAULT_MAX_LOG_FILE_SIZE`].
    pub max_log_file_size: String,
}

/// Why an apply spec (or a compile request) was refused. Each variant names the offending
/// field or value.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The JSON does not have the expected shape.
    #[error("Parsing apply spec: field `{field}`: {reason}")]
    Shape {
        /// The path of the field, e.g. `packages.ruby.version`.
        field: String,
        /// What serde said.
        reason: String,
    },
    /// A job or package name that is not a safe path component.
    #[error("Invalid {what} name {value:?}: {reason}")]
    UnsafeName {
        /// `job` or `package`.
        what: &'static str,
        /// The name as given.
        value: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A job or package without a version (upstream panics on it).
    #[error("Missing version of {what} {name:?}")]
    MissingVersion {
        /// `job` or `package`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A blob reference with an empty id or digest.
    #[error("Missing {part} of {what} {name:?}")]
    MissingBlob {
        /// `job`, `package` or `rendered_templates_archive`.
        what: &'static str,
        /// Its name (empty for the archive).
        name: String,
        /// `blobstore_id` or `sha1`.
        part: &'static str,
    },
    /// A digest string upstream would not parse.
    #[error("Invalid digest {value:?} of {what} {name:?}: {reason}")]
    Digest {
        /// `package`, `rendered_templates_archive` or `compile source`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The digest string.
        value: String,
        /// Why.
        reason: &'static str,
    },
}

#[derive(Deserialize)]
struct RawSpec {
    #[serde(default)]
    job: Option<RawJob>,
    #[serde(default)]
    packages: Option<BTreeMap<String, PackageRef>>,
    #[serde(default)]
    rendered_templates_archive: Option<RawArchive>,
    #[serde(default)]
    configuration_hash: Option<String>,
}

#[derive(Deserialize)]
struct RawJob {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    templates: Option<Vec<RawTemplate>>,
}

#[derive(Deserialize)]
struct RawTemplate {
    name: String,
    #[serde(default)]
    version: String,
}

/// A package reference as the director sends it (`packages.<key>` of the apply spec, and each
/// dependency of `compile_package`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PackageRef {
    /// The package name.
    pub name: String,
    /// The package version (fingerprint).
    #[serde(default)]
    pub version: String,
    /// The digest string of the compiled package.
    #[serde(default)]
    pub sha1: String,
    /// The blob id.
    #[serde(default)]
    pub blobstore_id: String,
}

#[derive(Deserialize)]
struct RawArchive {
    #[serde(default)]
    blobstore_id: String,
    #[serde(default)]
    sha1: String,
}

impl ApplySpec {
    /// Parses and validates the director's apply spec. A partial spec (no packages, no
    /// templates, no configuration hash, as sent before the templates are rendered) is valid.
    pub fn from_json(value: &Value) -> Result<Self, SpecError> {
        let raw: RawSpec =
            serde_path_to_error::deserialize(value).map_err(|e| SpecError::Shape {
                field: e.path().to_string(),
                reason: e.inner().to_string(),
            })?;
        let mut templates = Vec::new();
        let mut job_name = None;
        if let Some(job) = raw.job {
            job_name = job.name;
            for t in job.templates.unwrap_or_default() {
                check_name("job", &t.name)?;
                if t.version.is_empty() {
                    return Err(SpecError::MissingVersion {
                        what: "job",
                        name: t.name,
                    });
                }
                templates.push(JobTemplate {
                    name: t.name,
                    version: t.version,
                });
            }
        }
        let mut packages = BTreeMap::new();
        for (key, p) in raw.packages.unwrap_or_default() {
            packages.insert(key, PackageSpec::from_raw(p)?);
        }
        let rendered_templates_archive = match raw.rendered_templates_archive {
            Some(a) if !(a.blobstore_id.is_empty() && a.sha1.is_empty()) => {
                let missing = |part| SpecError::MissingBlob {
                    what: "rendered_templates_archive",
                    name: String::new(),
                    part,
                };
                if a.blobstore_id.is_empty() {
                    return Err(missing("blobstore_id"));
                }
                if a.sha1.is_empty() {
                    return Err(missing("sha1"));
                }
                Some(BlobSource {
                    digest: canonical_digest(&a.sha1).map_err(|reason| SpecError::Digest {
                        what: "rendered_templates_archive",
                        name: String::new(),
                        value: a.sha1.clone(),
                        reason,
                    })?,
                    blobstore_id: a.blobstore_id,
                })
            }
            _ => None,
        };
        let max_log_file_size = value
            .pointer("/properties/logging/max_log_file_size")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_MAX_LOG_FILE_SIZE)
            .to_string();
        Ok(Self {
            job_name,
            templates,
            packages,
            rendered_templates_archive,
            configuration_hash: raw.configuration_hash.unwrap_or_default(),
            max_log_file_size,
        })
    }

    /// The jobs to install, in `job.templates` order: none unless the rendered templates
    /// archive is present (as upstream: the templates alone carry no files).
    pub fn jobs(&self) -> Vec<Job> {
        let Some(source) = &self.rendered_templates_archive else {
            return Vec::new();
        };
        self.templates
            .iter()
            .map(|t| Job {
                name: t.name.clone(),
                version: t.version.clone(),
                source: source.clone(),
            })
            .collect()
    }

    /// The packages, ordered by key (upstream iterates a Go map, in no order).
    pub fn packages(&self) -> Vec<PackageSpec> {
        self.packages.values().cloned().collect()
    }

    /// Whether the full applier runs (`configuration_hash` non-empty).
    pub fn has_configuration(&self) -> bool {
        !self.configuration_hash.is_empty()
    }
}

impl PackageSpec {
    /// Validates a package reference: safe name, non-empty version, blob id and digest.
    pub fn from_raw(p: PackageRef) -> Result<Self, SpecError> {
        check_name("package", &p.name)?;
        if p.version.is_empty() {
            return Err(SpecError::MissingVersion {
                what: "package",
                name: p.name,
            });
        }
        let missing = |part| SpecError::MissingBlob {
            what: "package",
            name: p.name.clone(),
            part,
        };
        if p.blobstore_id.is_empty() {
            return Err(missing("blobstore_id"));
        }
        if p.sha1.is_empty() {
            return Err(missing("sha1"));
        }
        let digest = canonical_digest(&p.sha1).map_err(|reason| SpecError::Digest {
            what: "package",
            name: p.name.clone(),
            value: p.sha1.clone(),
            reason,
        })?;
        Ok(Self {
            name: p.name,
            version: p.version,
            source: BlobSource {
                blobstore_id: p.blobstore_id,
                digest,
            },
        })
    }
}

/// Checks that `value` is usable as one path component: non-empty, at most 255 bytes, not `.`
/// or `..`, no `/`, no NUL, no control characters. `what` (`job`, `package`) names it in the
/// error.
pub fn check_name(what: &'static str, value: &str) -> Result<(), SpecError> {
    let reason = if value.is_empty() {
        Some("empty")
    } else if value.len() > 255 {
        Some("longer than 255 bytes")
    } else if value == "." || value == ".." {
        Some("a relative directory")
    } else if value.contains('/') {
        Some("contains '/'")
    } else if value.contains('\0') {
        Some("contains NUL")
    } else if value.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SpecError::UnsafeName {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Upstream's `MultipleDigest.String()` of a digest string: `;`-separated pieces, empty pieces
/// dropped, sha1 without its `sha1:` prefix, other algorithms as `algo:hex`. Both parts of a
/// piece must be ASCII alphanumeric (upstream's parse rule). Bundle directory names are
/// hashed from this form, so it must match upstream byte for byte.
pub fn canonical_digest(raw: &str) -> Result<String, &'static str> {
    let mut out = Vec::new();
    for piece in raw.split(';').filter(|p| !p.is_empty()) {
        let parts: Vec<&str> = piece.splitn(2, ':').collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err("digest and algorithm can only contain alphanumeric characters");
        }
        match parts.as_slice() {
            [hex] | ["sha1", hex] => out.push((*hex).to_string()),
            [algo, hex] => out.push(format!("{algo}:{hex}")),
            _ => return Err("empty digest piece"),
        }
    }
    if out.is_empty() {
        return Err("no digest found");
    }
    Ok(out.join(";"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn full() -> Value {
        json!({
            "deployment": "d",
            "job": {"name": "web", "templates": [
                {"name": "nginx", "version": "v1", "sha1": "aa", "blobstore_id": "b1"},
                {"name": "app", "version": "v2"}
            ]},
            "packages": {
                "ruby": {"name": "ruby", "version": "r1", "sha1": "sha1:abc;sha256:def", "blobstore_id": "p1"}
            },
            "rendered_templates_archive": {"blobstore_id": "rta", "sha1": "f00"},
            "configuration_hash": "h",
            "properties": {"logging": {"max_log_file_size": "10M"}}
        })
    }

    #[test]
    fn parses_the_full_spec() {
        let spec = ApplySpec::from_json(&full()).unwrap();
        assert_eq!(spec.job_name.as_deref(), Some("web"));
        assert!(spec.has_configuration());
        assert_eq!(spec.max_log_file_size, "10M");
        let jobs = spec.jobs();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].name, "nginx");
        assert_eq!(jobs[1].version, "v2");
        assert_eq!(jobs[0].source.blobstore_id, "rta");
        assert_eq!(jobs[0].source.digest, "f00");
        let pkgs = spec.packages();
        assert_eq!(pkgs[0].source.digest, "abc;sha256:def");
    }

    #[test]
    fn jobs_need_the_rendered_templates_archive() {
        let mut v = full();
        v["rendered_templates_archive"] = json!({"blobstore_id": "", "sha1": ""});
        assert!(ApplySpec::from_json(&v).unwrap().jobs().is_empty());
        v["rendered_templates_archive"] = Value::Null;
        assert!(ApplySpec::from_json(&v).unwrap().jobs().is_empty());
        v["rendered_templates_archive"] = json!({"blobstore_id": "x"});
        let e = ApplySpec::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("sha1"), "{e}");
    }

    #[test]
    fn a_partial_spec_is_valid() {
        let spec = ApplySpec::from_json(&json!({"deployment":"d","job":{"name":"c"},"index":0,
            "networks":{},"packages":null}))
        .unwrap();
        assert!(!spec.has_configuration());
        assert!(spec.jobs().is_empty() && spec.packages().is_empty());
        assert_eq!(spec.max_log_file_size, "50M");
        assert!(ApplySpec::from_json(&json!({})).is_ok());
    }

    #[test]
    fn hostile_names_are_rejected_naming_the_value() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            &"x".repeat(256),
        ] {
            let mut v = full();
            v["job"]["templates"][0]["name"] = json!(bad);
            let e = ApplySpec::from_json(&v).unwrap_err();
            assert!(
                matches!(e, SpecError::UnsafeName { what: "job", .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
            let mut v = full();
            v["packages"]["ruby"]["name"] = json!(bad);
            let e = ApplySpec::from_json(&v).unwrap_err();
            assert!(
                matches!(
                    e,
                    SpecError::UnsafeName {
                        what: "package",
                        ..
                    }
                ),
                "{e}"
            );
        }
        check_name("job", &"x".repeat(255)).unwrap();
        check_name("job", "with space-and.dots").unwrap();
    }

    #[test]
    fn shape_errors_name_the_field() {
        let mut v = full();
        v["packages"]["ruby"]["version"] = json!(3);
        let e = ApplySpec::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("packages.ruby.version"), "{e}");
        let mut v = full();
        v["packages"]["ruby"]["version"] = json!("");
        let e = ApplySpec::from_json(&v).unwrap_err().to_string();
        assert_eq!(e, "Missing version of package \"ruby\"");
        let mut v = full();
        v["packages"]["ruby"]["sha1"] = json!("sha1:a/b");
        assert!(matches!(
            ApplySpec::from_json(&v).unwrap_err(),
            SpecError::Digest { .. }
        ));
    }

    #[test]
    fn digests_are_canonicalized_like_upstream() {
        assert_eq!(canonical_digest("abc").unwrap(), "abc");
        assert_eq!(canonical_digest("sha1:abc").unwrap(), "abc");
        assert_eq!(
            canonical_digest("sha256:ab;;sha1:cd").unwrap(),
            "sha256:ab;cd"
        );
        assert!(canonical_digest("").is_err());
        assert!(canonical_digest(";").is_err());
        assert!(canonical_digest("sha1:").is_err());
        assert!(canonical_digest("a b").is_err());
    }
}
