//! Settings from the IaaS: the sources of agent.json's `Infrastructure.Settings.Sources`, tried
//! in order, the first that gives settings wins and is cached in `<base>/bosh/settings.json`
//! (0600, atomically); when every source fails the cache is used, as upstream's agent does.
//!
//! | `Type` | where the settings are | file |
//! |---|---|---|
//! | `HTTP` | metadata service user data (IMDSv2 token when `TokenPath` is set) | `http.rs` |
//! | `InstanceMetadata` | one metadata value (`Metadata-Flavor` headers) | `instance_metadata.rs` |
//! | `ConfigDrive` | a labelled drive mounted read-only, or a directory | `config_drive.rs` |
//! | `CDROM` | vSphere's `env` file on the CD-ROM, ejected after | `cdrom.rs` |
//! | `File` | a file on this box | `file.rs` |
//! | `VsphereGuestInfo` | not read (fails, so the next source is tried) | |
//!
//! Every request to a metadata service is retried with exponential backoff and jitter
//! ([`RetryPolicy`]); the settings are kept as raw JSON (each part of the agent reads its
//! keys). No error or log line carries a token, a header value or any byte of the settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub mod cdrom;
pub mod config_drive;
mod error;
pub mod file;
pub mod http;
mod http_client;
pub mod instance_metadata;
mod mount;
mod options;
mod retry;
mod user_data;

pub use error::{Failures, FetchError, KeyError, LoadError, SourceError};
pub use mount::{MOUNT_OPTIONS, remove_stale_mounts};
pub use options::{
    CdromOptions, ConfigDriveOptions, FileOptions, HttpOptions, InstanceMetadataOptions,
    SourceOptions, VsphereGuestInfoOptions,
};
pub use retry::RetryPolicy;

/// How the sources are read on this box: where the cache is, where drives are mounted,
/// patience with the metadata service. [`Context::new`] gives the agent's values.
#[derive(Debug, Clone)]
pub struct Context {
    /// The cached settings (`<base>/bosh/settings.json`).
    pub cache: PathBuf,
    /// Where a drive's private mount directory is made (`<base>/bosh`).
    pub scratch_dir: PathBuf,
    /// Retries of each metadata request.
    pub http_retry: RetryPolicy,
    /// Bound of one TCP connect.
    pub http_connect_timeout: Duration,
    /// Bound of one whole request, body included (so a source takes at most
    /// `http_retry.max_elapsed` plus this).
    pub http_timeout: Duration,
    /// The CD-ROM of the `CDROM` source (`/dev/sr0`, as upstream).
    pub cdrom_device: PathBuf,
    /// Patience with a CD-ROM that has no medium yet.
    pub cdrom_wait: RetryPolicy,
    /// Whether the disc is ejected after reading (upstream does).
    pub cdrom_eject: bool,
}

impl Context {
    /// The agent's values for base directory `base_dir` (`/var/vcap`).
    pub fn new(base_dir: &Path) -> Context {
        Context {
            cache: cache_path(base_dir),
            scratch_dir: base_dir.join("bosh"),
            http_retry: RetryPolicy::METADATA,
            http_connect_timeout: Duration::from_secs(5),
            http_timeout: Duration::from_secs(15),
            cdrom_device: PathBuf::from("/dev/sr0"),
            cdrom_wait: RetryPolicy::DEVICE,
            cdrom_eject: true,
        }
    }
}

/// Where the settings are cached: `<base>/bosh/settings.json`.
pub fn cache_path(base_dir: &Path) -> PathBuf {
    base_dir.join("bosh").join("settings.json")
}

/// Where loaded settings came from.
#[derive(Debug)]
pub enum Origin {
    /// Source `index` of agent.json, of type `kind`; the sources before it failed.
    Source {
        index: usize,
        kind: &'static str,
        earlier_failures: Failures,
    },
    /// The cache, because every source failed.
    Cache { path: PathBuf, failures: Failures },
}

/// Settings and where they came from.
#[derive(Debug)]
pub struct Loaded {
    /// The settings document: always a JSON object.
    pub settings: Value,
    /// Which source gave them, or the cache.
    pub origin: Origin,
}

/// The settings from one source (no cache involved).
pub fn fetch(source: &SourceOptions, ctx: &Context) -> Result<Value, FetchError> {
    match source {
        SourceOptions::Http(o) => http::HttpSource::new(o, ctx)?.settings(),
        SourceOptions::ConfigDrive(o) => config_drive::settings(o, ctx),
        SourceOptions::File(o) => file::settings(o),
        SourceOptions::Cdrom(o) => cdrom::settings(o, ctx),
        SourceOptions::InstanceMetadata(o) => instance_metadata::settings(o, ctx),
        SourceOptions::VsphereGuestInfo(_) => Err(FetchError::Unsupported("VsphereGuestInfo")),
    }
}

/// Upstream's `LoadSettings`: the first source that gives settings wins and is written to
/// [`Context::cache`] (a failed write is logged; the settings are still returned); when all
/// fail, the cache is read. Errors list every source's failure and the cache's. Mounts an
/// earlier agent left in [`Context::scratch_dir`] are removed first.
pub fn load(sources: &[SourceOptions], ctx: &Context) -> Result<Loaded, LoadError> {
    remove_stale_mounts(&ctx.scratch_dir);
    let mut failures = Vec::new();
    for (index, source) in sources.iter().enumerate() {
        let kind = source.kind();
        match fetch(source, ctx) {
            Ok(settings) => {
                tracing::info!(index, kind, "settings loaded");
                write_cache(&ctx.cache, &settings);
                return Ok(Loaded {
                    settings,
                    origin: Origin::Source {
                        index,
                        kind,
                        earlier_failures: Failures(failures),
                    },
                });
            }
            Err(error) => {
                let e = SourceError { index, kind, error };
                tracing::warn!(error = %e, "settings source failed");
                failures.push(e);
            }
        }
    }
    if sources.is_empty() && !ctx.cache.exists() {
        return Err(LoadError::NoSources {
            cache: ctx.cache.clone(),
        });
    }
    match read_cache(&ctx.cache) {
        Ok(settings) => {
            tracing::warn!(cache = %ctx.cache.display(), "every settings source failed: using the cached settings");
            Ok(Loaded {
                settings,
                origin: Origin::Cache {
                    path: ctx.cache.clone(),
                    failures: Failures(failures),
                },
            })
        }
        Err(cache_error) => Err(LoadError::Unavailable {
            failures: Failures(failures),
            cache: ctx.cache.clone(),
            cache_error,
        }),
    }
}

/// Upstream's `PublicSSHKeyForUsername` (for vcap, before the settings are loaded): the first
/// source that answers decides; `None` when it has no key.
pub fn public_ssh_key(
    sources: &[SourceOptions],
    ctx: &Context,
) -> Result<Option<String>, KeyError> {
    let mut failures = Vec::new();
    for (index, source) in sources.iter().enumerate() {
        let kind = source.kind();
        let answer = match source {
            SourceOptions::Http(o) => {
                http::HttpSource::new(o, ctx).and_then(|s| s.public_ssh_key())
            }
            SourceOptions::ConfigDrive(o) => config_drive::public_ssh_key(o, ctx),
            SourceOptions::File(o) => file::public_ssh_key(o),
            SourceOptions::Cdrom(_)
            | SourceOptions::InstanceMetadata(_)
            | SourceOptions::VsphereGuestInfo(_) => Ok(None),
        };
        match answer {
            Ok(key) => return Ok(key),
            Err(error) => {
                let e = SourceError { index, kind, error };
                tracing::warn!(error = %e, "public key source failed");
                failures.push(e);
            }
        }
    }
    Err(KeyError(Failures(failures)))
}

/// Reads the cached settings (a JSON object).
pub fn read_cache(path: &Path) -> Result<Value, FetchError> {
    let bytes = std::fs::read(path).map_err(|source| FetchError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    user_data::settings_document(&bytes, &path.display().to_string())
}

fn write_cache(path: &Path, settings: &Value) {
    let result = serde_json::to_vec(settings)
        .map_err(|e| e.to_string())
        .and_then(|body| crate::files::write_private(path, &body).map_err(|e| e.to_string()));
    if let Err(e) = result {
        tracing::warn!(cache = %path.display(), error = %e, "cannot cache the settings");
    }
}

/// A per-call number for private temporary names.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("settings-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn file(path: &Path) -> SourceOptions {
        SourceOptions::File(FileOptions {
            settings_path: path.display().to_string(),
            ..FileOptions::default()
        })
    }

    #[test]
    fn first_good_source_wins_and_is_cached_private_then_the_cache_is_the_fallback() {
        let d = tmp("order");
        let good = d.join("good.json");
        std::fs::write(&good, r#"{"agent_id":"a-1"}"#).unwrap();
        let bad = d.join("bad.json");
        std::fs::write(&bad, "{oops").unwrap();
        let ctx = Context::new(&d.join("base"));
        let sources = vec![
            file(&d.join("missing.json")),
            file(&bad),
            SourceOptions::VsphereGuestInfo(VsphereGuestInfoOptions::default()),
            file(&good),
        ];
        let l = load(&sources, &ctx).unwrap();
        assert_eq!(l.settings["agent_id"], "a-1");
        let Origin::Source {
            index,
            kind,
            earlier_failures,
        } = &l.origin
        else {
            panic!("{:?}", l.origin)
        };
        assert_eq!((*index, *kind), (3, "File"));
        let m = earlier_failures.to_string();
        assert!(
            m.contains("missing.json") && m.contains("bad.json: invalid JSON"),
            "{m}"
        );
        assert!(m.contains("VsphereGuestInfo is not supported"), "{m}");
        let cached = std::fs::metadata(&ctx.cache).unwrap();
        assert_eq!(cached.permissions().mode() & 0o777, 0o600);
        assert_eq!(read_cache(&ctx.cache).unwrap(), l.settings);

        // The source goes away: the cache answers, and says why.
        std::fs::remove_file(&good).unwrap();
        let l = load(&sources, &ctx).unwrap();
        assert_eq!(l.settings["agent_id"], "a-1");
        assert!(matches!(l.origin, Origin::Cache { ref failures, .. } if failures.0.len() == 4));

        // A broken cache: every failure is in the error.
        std::fs::write(&ctx.cache, "[]").unwrap();
        let e = load(&sources, &ctx).unwrap_err().to_string();
        assert!(e.contains("settings source 3 (File)"), "{e}");
        assert!(
            e.contains("settings must be a JSON object, not an array"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn no_sources_uses_the_cache_or_says_so() {
        let d = tmp("none");
        let ctx = Context::new(&d);
        let e = load(&[], &ctx).unwrap_err();
        assert!(matches!(e, LoadError::NoSources { .. }), "{e}");
        crate::files::write_private(&ctx.cache, br#"{"agent_id":"c"}"#).unwrap();
        assert_eq!(load(&[], &ctx).unwrap().settings["agent_id"], "c");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn public_key_comes_from_the_first_source_that_answers() {
        let d = tmp("key");
        let ctx = Context::new(&d);
        let present = d.join("s.json");
        std::fs::write(&present, "{}").unwrap();
        // A missing File fails (upstream), the next answers "no key".
        let k = public_ssh_key(&[file(&d.join("nope")), file(&present)], &ctx).unwrap();
        assert_eq!(k, None);
        let e = public_ssh_key(&[file(&d.join("nope"))], &ctx).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let cd = SourceOptions::Cdrom(CdromOptions::default());
        assert_eq!(public_ssh_key(&[cd], &ctx).unwrap(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn misconfigured_sources_fail_before_any_io() {
        let ctx = Context::new(Path::new("/nonexistent-base"));
        let cases = [
            (SourceOptions::Http(HttpOptions::default()), "URI is empty"),
            (
                SourceOptions::Http(HttpOptions {
                    uri: "http://169.254.169.254".into(),
                    ..HttpOptions::default()
                }),
                "UserDataPath is empty",
            ),
            (
                SourceOptions::InstanceMetadata(InstanceMetadataOptions {
                    uri: "https://api.service.softlayer.com".into(),
                    settings_path: "/x".into(),
                    ..InstanceMetadataOptions::default()
                }),
                "https is not supported",
            ),
            (
                SourceOptions::ConfigDrive(ConfigDriveOptions::default()),
                "DiskPaths is empty",
            ),
            (
                SourceOptions::ConfigDrive(ConfigDriveOptions {
                    disk_paths: vec!["/dev/null".into()],
                    user_data_path: "../../etc/shadow".into(),
                    ..ConfigDriveOptions::default()
                }),
                "leaves the drive",
            ),
            (
                SourceOptions::Cdrom(CdromOptions::default()),
                "FileName is empty",
            ),
            (
                SourceOptions::File(FileOptions::default()),
                "SettingsPath is empty",
            ),
        ];
        for (source, want) in cases {
            let e = fetch(&source, &ctx).unwrap_err().to_string();
            assert!(e.contains(want), "{source:?}: {e}");
        }
    }
}
