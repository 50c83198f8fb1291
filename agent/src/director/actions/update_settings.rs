//! The director's `update_settings`: merged into `<base>/bosh/update_settings.json` as
//! upstream merges it, validated before anything is written, with trusted certificates and
//! disk associations applied; and the mbus that last connected, kept beside the newest so a
//! certificate NATS does not (yet) accept can never lock the agent out.
//!
//! Merge rules (upstream's `MergeSettings`): `trusted_certs` and `disk_associations` are
//! always replaced; `mbus` only when the new one is non-empty and differs; `blobstores` only
//! when present (not null) and different.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use platform::disk::{DiskError, Disks, SettingsDisks};

use serde_json::{Map, Value, json};

use crate::director::Context;
use crate::director::checks::UpdateError;
use crate::director::mbus_fallback;
use crate::director::tasks::TaskResult;

/// `update_settings`: everything is validated before anything is written (a refused update
/// changes nothing); then disks are associated, trusted certificates installed, the merged
/// document persisted, and a changed mbus switched live, make-before-break (upstream restarts
/// the agent instead). The mbus that last connected stays recorded beside it, so an mbus that
/// never connects cannot lock the agent out after a restart.
pub async fn run(ctx: Arc<Context>, new: Value) -> TaskResult {
    let existing = load(&ctx.base_dir).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the persisted update_settings are unusable; merging into none");
        json!({})
    });
    let merged = merge(&existing, &new);
    let newest = if merged.mbus_changed {
        let c = mbus_fallback::candidate(
            ctx.settings.document(),
            Some(&merged.doc),
            "update_settings",
        )
        .map_err(|e| UpdateError::Mbus(e).to_string())?;
        for r in &c.cfg.rejected {
            tracing::error!(error = %r, "mbus URL rejected");
        }
        Some(c)
    } else {
        None
    };
    let assoc = new.get("disk_associations").cloned().unwrap_or(Value::Null);
    let worker = ctx.clone();
    // Resolving a device may wait for it (bounded), as mount_disk does.
    tokio::task::spawn_blocking(move || {
        associate_disks(
            &worker.vm.disks,
            &super::vm::disks_of(&worker.settings),
            &worker.base_dir,
            &assoc,
        )
    })
    .await
    .map_err(|e| format!("the action's worker failed: {e}"))?
    .map_err(|e| e.to_string())?;
    let certs = new
        .get("trusted_certs")
        .and_then(Value::as_str)
        .unwrap_or("");
    update_certificates(&CertTarget::from_env(), certs)
        .await
        .map_err(|e| e.to_string())?;
    save(&path(&ctx.base_dir), &merged.doc).map_err(|e| UpdateError::Save(e).to_string())?;
    if merged.blobstores_changed {
        tracing::info!("blobstores changed by update_settings; used from the next blob fetch");
    }
    let (Some(newest), Some(bus)) = (newest, &ctx.bus) else {
        return Ok(json!("ok"));
    };
    if let Some(c) = &ctx.mbus_candidates {
        c.prefer(newest.clone());
    }
    let changed = bus
        .reconfigure(&newest.cfg)
        .map_err(|e| format!("Updating mbus: {e}; the current mbus connection is kept"))?;
    if changed {
        tracing::info!(
            origin = newest.cfg.urls_origin,
            servers = newest.cfg.servers.len(),
            "mbus changed by update_settings: switching live"
        );
    }
    Ok(json!("ok"))
}

/// `<base>/bosh/update_settings.json`.
pub fn path(base: &Path) -> PathBuf {
    crate::settings::update_settings_path(base)
}

/// `<base>/bosh/mbus_last_connected.json`: `{"mbus": …}` of the update that last brought the
/// agent onto the bus (the same shape as `update_settings.json`, so it can stand in for it).
pub fn last_connected_path(base: &Path) -> PathBuf {
    base.join("bosh").join("mbus_last_connected.json")
}

/// A merged document and what the merge changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The document to persist.
    pub doc: Value,
    /// The new `mbus` replaced the old one.
    pub mbus_changed: bool,
    /// The new `blobstores` replaced the old ones.
    pub blobstores_changed: bool,
}

fn is_empty_value(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.values().all(|x| is_empty_value(Some(x))),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// Upstream's merge of `new` into `existing` (see the module documentation). Pure.
pub fn merge(existing: &Value, new: &Value) -> Merged {
    let mut doc: Map<String, Value> = existing.as_object().cloned().unwrap_or_default();
    let field = |k: &str| new.get(k).cloned().unwrap_or(Value::Null);
    // Go's zero values: an absent string is "", an absent list is null.
    let certs = match field("trusted_certs") {
        Value::Null => json!(""),
        v => v,
    };
    doc.insert("trusted_certs".into(), certs);
    doc.insert("disk_associations".into(), field("disk_associations"));
    let mut mbus_changed = false;
    let new_mbus = new.get("mbus");
    if !is_empty_value(new_mbus) && new_mbus != doc.get("mbus") {
        doc.insert("mbus".into(), field("mbus"));
        mbus_changed = true;
    }
    let mut blobstores_changed = false;
    let new_bs = new.get("blobstores");
    if !matches!(new_bs, None | Some(Value::Null)) && new_bs != doc.get("blobstores") {
        doc.insert("blobstores".into(), field("blobstores"));
        blobstores_changed = true;
    }
    Merged {
        doc: Value::Object(doc),
        mbus_changed,
        blobstores_changed,
    }
}

/// Reads the persisted document; a missing file is an empty object. A corrupt one is an
/// error (the caller decides: the update task refuses to merge into it blindly).
pub fn load(base: &Path) -> Result<Value, String> {
    let p = path(base);
    match fs::read(&p) {
        Ok(b) => match serde_json::from_slice::<Value>(&b) {
            Ok(v) if v.is_object() => Ok(v),
            Ok(_) => Err(format!("{}: not a JSON object", p.display())),
            Err(e) => Err(format!("{}: {e}", p.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(e) => Err(format!("reading {}: {e}", p.display())),
    }
}

/// Writes `doc` privately and durably.
pub fn save(path: &Path, doc: &Value) -> Result<(), String> {
    let body = serde_json::to_vec(doc).map_err(|e| e.to_string())?;
    platform::files::write_private(path, &body).map_err(|e| e.to_string())
}

/// Where trusted certificates go and how the system learns of them.
#[derive(Debug, Clone)]
pub struct CertTarget {
    /// `/usr/local/share/ca-certificates`; `BOSH_AGENT_CA_CERTS_DIR` moves it (tests).
    pub dir: PathBuf,
    /// `/usr/sbin/update-ca-certificates -f`; `BOSH_AGENT_UPDATE_CA_CERTIFICATES` replaces the
    /// program (tests point it at their own).
    pub command: Vec<String>,
    /// Per try; upstream tries three times.
    pub timeout: Duration,
}

impl CertTarget {
    /// The stemcell's locations, or the environment's overrides.
    pub fn from_env() -> Self {
        let dir = std::env::var_os("BOSH_AGENT_CA_CERTS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/local/share/ca-certificates"));
        let command = match std::env::var("BOSH_AGENT_UPDATE_CA_CERTIFICATES") {
            Ok(c) if !c.is_empty() => vec![c],
            _ => vec!["/usr/sbin/update-ca-certificates".into(), "-f".into()],
        };
        CertTarget {
            dir,
            command,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Splits a PEM bundle into its certificates, as upstream (each ends with its END line).
pub fn split_certs(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(i) = rest.find(END) {
        let piece = rest[..i + END.len()].trim();
        if !piece.is_empty() {
            out.push(format!("{piece}\n"));
        }
        rest = &rest[i + END.len()..];
    }
    out
}

/// Replaces the `bosh-trusted-cert-N.crt` files with the bundle's certificates and runs the
/// update command (bounded, three tries). An empty bundle only removes the old files.
pub async fn update_certificates(target: &CertTarget, bundle: &str) -> Result<(), UpdateError> {
    let err = |m: String| UpdateError::Certs(m);
    fs::create_dir_all(&target.dir)
        .map_err(|e| err(format!("creating {}: {e}", target.dir.display())))?;
    let entries =
        fs::read_dir(&target.dir).map_err(|e| err(format!("{}: {e}", target.dir.display())))?;
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with("bosh-trusted-cert-")
        {
            fs::remove_file(e.path()).map_err(|x| err(format!("{}: {x}", e.path().display())))?;
        }
    }
    for (i, cert) in split_certs(bundle).iter().enumerate() {
        let p = target.dir.join(format!("bosh-trusted-cert-{}.crt", i + 1));
        platform::files::write_durable(&p, cert.as_bytes(), 0o644)
            .map_err(|e| err(e.to_string()))?;
    }
    let Some((prog, args)) = target.command.split_first() else {
        return Ok(());
    };
    let mut last = String::new();
    for attempt in 1..=3 {
        let child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => return Err(err(format!("running {prog}: {e}"))),
        };
        match tokio::time::timeout(target.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) if out.status.success() => return Ok(()),
            Ok(Ok(out)) => {
                last = format!(
                    "{prog} exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(Err(e)) => last = format!("{prog}: {e}"),
            Err(_) => last = format!("{prog} did not finish within {:?}", target.timeout),
        }
        tracing::warn!(attempt, error = %last, "updating certificates failed");
    }
    Err(err(last))
}

/// Links `<base>/instance/disks/<name>` to each associated disk's device, which `disks`
/// resolves from the settings or the hints file that `add_persistent_disk` wrote. Every name is
/// checked and every disk resolved before the first link is made, so a bad entry anywhere
/// changes nothing; each link is replaced atomically.
pub fn associate_disks(
    disks: &Disks,
    settings: &SettingsDisks,
    base: &Path,
    assoc: &Value,
) -> Result<(), UpdateError> {
    let Some(list) = assoc.as_array() else {
        return Ok(());
    };
    let dir = base.join("instance").join("disks");
    let mut links = Vec::new();
    for a in list {
        let (Some(name), Some(cid)) = (
            a.get("name").and_then(Value::as_str),
            a.get("cid").and_then(Value::as_str),
        ) else {
            continue;
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(UpdateError::Disk(format!(
                "disk association name {name:?} is not a file name"
            )));
        }
        links.push((name, cid));
    }
    let mut targets = Vec::new();
    for (name, cid) in links {
        // Upstream's two messages: the disk is not known, or its device is not there.
        let dev = disks.device_path(cid, settings).map_err(|e| {
            UpdateError::Disk(match e {
                DiskError::UnknownDisk(_) => format!("Fetching disk settings: {e}"),
                e => format!("Associating disk with name {name}: {e}"),
            })
        })?;
        targets.push((name, dev));
    }
    if targets.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(&dir)
        .map_err(|e| UpdateError::Disk(format!("creating {}: {e}", dir.display())))?;
    for (name, dev) in targets {
        let link = dir.join(name);
        let tmp = dir.join(format!(".{name}.new"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&dev, &tmp)
            .and_then(|()| fs::rename(&tmp, &link))
            .map_err(|e| UpdateError::Disk(format!("linking {}: {e}", link.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::director::checks::check_update_settings as check;

    fn cert(n: u8) -> Value {
        json!({"ca": format!("ca{n}"), "certificate": format!("c{n}"), "private_key": format!("k{n}")})
    }

    #[test]
    fn an_update_without_mbus_keeps_the_permanent_certificate() {
        // The director's fresh-deploy order: the permanent cert, then an update without mbus.
        let first = merge(
            &json!({}),
            &json!({"trusted_certs": "T", "disk_associations": [], "mbus": {"cert": cert(1)}}),
        );
        assert!(first.mbus_changed);
        let second = merge(
            &first.doc,
            &json!({"trusted_certs": "T2", "disk_associations": []}),
        );
        assert!(!second.mbus_changed && !second.blobstores_changed);
        assert_eq!(second.doc["mbus"]["cert"], cert(1));
        assert_eq!(second.doc["trusted_certs"], "T2");
    }

    #[test]
    fn empty_or_equal_mbus_is_not_a_change() {
        let base = json!({"mbus": {"cert": cert(1)}});
        for new in [
            json!({"mbus": {}}),
            json!({"mbus": null}),
            json!({"mbus": {"cert": {"ca": "", "certificate": "", "private_key": ""}, "urls": []}}),
            json!({"mbus": {"cert": cert(1)}}),
        ] {
            let m = merge(&base, &new);
            assert!(!m.mbus_changed, "{new}");
            assert_eq!(m.doc["mbus"]["cert"], cert(1));
        }
        assert!(merge(&base, &json!({"mbus": {"cert": cert(2)}})).mbus_changed);
    }

    #[test]
    fn certs_and_associations_are_always_replaced_blobstores_only_when_present() {
        let base = json!({"trusted_certs": "old", "disk_associations": [{"name": "a", "cid": "c"}],
            "blobstores": [{"provider": "dav"}]});
        let m = merge(&base, &json!({}));
        assert_eq!(m.doc["trusted_certs"], "");
        assert_eq!(m.doc["disk_associations"], Value::Null);
        assert_eq!(m.doc["blobstores"], json!([{"provider": "dav"}]));
        assert!(!m.blobstores_changed);
        let m = merge(&base, &json!({"blobstores": [{"provider": "local"}]}));
        assert!(m.blobstores_changed);
        assert_eq!(m.doc["blobstores"], json!([{"provider": "local"}]));
        assert!(!merge(&base, &json!({"blobstores": [{"provider": "dav"}]})).blobstores_changed);
    }

    #[test]
    fn malformed_fields_are_refused() {
        assert!(check(&json!([])).is_err());
        assert!(check(&json!({"trusted_certs": 1})).is_err());
        assert!(check(&json!({"mbus": "nats://x"})).is_err());
        assert!(check(&json!({"blobstores": {}})).is_err());
        assert!(check(&json!({"disk_associations": [{"name": "x"}]})).is_err());
        check(
            &json!({"trusted_certs": "", "disk_associations": [{"name": "x", "cid": "c"}],
            "mbus": {"cert": cert(1)}, "blobstores": [{"provider": "dav"}]}),
        )
        .unwrap();
    }

    #[test]
    fn bundles_split_into_certificates() {
        let one = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----";
        let two = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----";
        assert_eq!(
            split_certs(&format!("{one}\n{two}\n")),
            vec![format!("{one}\n"), format!("{two}\n")]
        );
        assert!(split_certs("").is_empty());
        assert!(split_certs("garbage").is_empty());
    }

    #[tokio::test]
    async fn certificates_replace_the_old_files_and_run_the_command() {
        let d = std::env::temp_dir().join(format!("agent-certs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("bosh-trusted-cert-7.crt"), "old").unwrap();
        fs::write(d.join("other.crt"), "keep").unwrap();
        let marker = d.join("ran");
        let script = d.join("update.sh");
        fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut fs::metadata(&script).unwrap().permissions(),
            0o755,
        );
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let t = CertTarget {
            dir: d.clone(),
            command: vec![script.display().to_string()],
            timeout: Duration::from_secs(5),
        };
        let pem = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        update_certificates(&t, pem).await.unwrap();
        assert!(!d.join("bosh-trusted-cert-7.crt").exists());
        assert!(d.join("other.crt").exists());
        assert!(
            fs::read_to_string(d.join("bosh-trusted-cert-2.crt"))
                .unwrap()
                .contains("BBB")
        );
        assert!(marker.exists());
        // A failing command is an error naming it.
        let t = CertTarget {
            command: vec!["/bin/false".into()],
            ..t
        };
        let e = update_certificates(&t, pem).await.unwrap_err().to_string();
        assert!(e.contains("/bin/false"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn associations_are_checked_before_anything_is_linked() {
        let d = std::env::temp_dir().join(format!("agent-assoc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let disks = Disks::new(platform::disk::DiskConfig::new(&d));
        let none = SettingsDisks::default();
        let e = associate_disks(&disks, &none, &d, &json!([{"name": "x", "cid": "nope"}]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Persistent disk with volume id 'nope' could not be found"),
            "{e}"
        );
        // A bad name anywhere in the list refuses the whole list, before any disk is looked up.
        let e = associate_disks(
            &disks,
            &none,
            &d,
            &json!([{"name": "data", "cid": "nope"}, {"name": "../x", "cid": "nope"}]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not a file name"), "{e}");
        assert!(!d.join("instance/disks").exists(), "nothing was linked");
        // No associations: nothing to do, nothing made.
        associate_disks(&disks, &none, &d, &json!([])).unwrap();
        associate_disks(&disks, &none, &d, &Value::Null).unwrap();
        assert!(!d.join("instance").exists());
        let _ = fs::remove_dir_all(&d);
    }
}
