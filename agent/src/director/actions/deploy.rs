//! The director's deploy actions: `prepare`, `apply`, `start`'s monit job files,
//! `compile_package` and `upload_blob`, wired to the blob layer (`blobstore`) and the applier
//! and compiler (`jobs`).
//!
//! The blobstore is chosen per action from the settings in force, with upstream's precedence:
//! `update_settings.blobstores[0]`, else `env.bosh.blobstores[0]`, else `blobstore`. So a
//! blobstore changed by `update_settings` is used from the next action on, without a restart.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use blobstore::provider::ProviderEnv;
use blobstore::{Blobs, Digest, MultiDigest, Provider};
use jobs::{Applier, CompileLimits, CompileRequest};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::director::Context;
use crate::director::action::CompileArgs;
use crate::director::checks::{has_configuration, parse_spec};
use crate::director::spec::{read_spec, spec_path, write_json};
use crate::director::tasks::TaskResult;
use crate::settings::Settings;

/// The blobstore object the settings in force name (see the module documentation).
pub fn blobstore_settings(settings: &Settings, update_settings: &Value) -> Option<Value> {
    let first =
        |v: Option<&Vec<Value>>| v.and_then(|a| a.first()).filter(|b| b.is_object()).cloned();
    first(update_settings.get("blobstores").and_then(Value::as_array))
        .or_else(|| first(Some(&settings.env.bosh.blobstores)))
        .or_else(|| settings.blobstore.clone().map(Value::Object))
}

/// `env.bosh.parallel`: how many blobs one `prepare`/`apply` fetches at once (default 5).
pub fn parallel(settings: &Settings) -> usize {
    settings
        .env
        .bosh
        .parallel
        .filter(|n| (1..=64).contains(n))
        .map_or(jobs::DEFAULT_PARALLEL, |n| n as usize)
}

/// The blob layer for the settings in force (`update_settings.json` re-read, so that a
/// changed blobstore is used without a restart).
pub fn blobs(ctx: &Context) -> Result<Blobs, String> {
    let update = super::update_settings::load(&ctx.base_dir).unwrap_or_else(|_| json!({}));
    let cfg = blobstore_settings(&ctx.settings, &update)
        .ok_or("no blobstore in the settings (update_settings.blobstores, env.bosh.blobstores or blobstore)")?;
    let provider = Provider::from_settings(&cfg, &ProviderEnv::new(&ctx.base_dir))
        .map_err(|e| format!("Configuring the blobstore: {e}"))?;
    Ok(Blobs::new(provider, ctx.base_dir.join("data")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("worker failed: {e}"))?
}

/// `prepare [spec]`: installs, without enabling, every job and package not installed yet.
pub async fn prepare(ctx: Arc<Context>, spec: Value) -> TaskResult {
    let typed = parse_spec(&spec)?;
    let blobs = blobs(&ctx)?;
    let base = ctx.base_dir.clone();
    let n = parallel(&ctx.settings);
    blocking(move || {
        Applier::new(blobs, base)
            .with_parallel(n)
            .prepare(&typed)
            .map_err(|e| e.to_string())
    })
    .await?;
    Ok(json!("prepared"))
}

/// Fills `ip`, `netmask` and `gateway` of the spec's dynamic networks from the settings'
/// networks of the same name (upstream's `PopulateDHCPNetworks`).
pub fn fill_dynamic_networks(spec: &mut Value, settings: &Settings) {
    let Some(nets) = spec.get_mut("networks").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, net) in nets.iter_mut() {
        if net.get("type").and_then(Value::as_str) != Some("dynamic") {
            continue;
        }
        let Some(from) = settings.networks.get(name) else {
            continue;
        };
        let Some(obj) = net.as_object_mut() else {
            continue;
        };
        for (key, v) in [
            ("ip", &from.ip),
            ("netmask", &from.netmask),
            ("gateway", &from.gateway),
        ] {
            if let Some(v) = v {
                obj.insert(key.into(), Value::String(v.clone()));
            }
        }
    }
}

/// `<base>/instance/{id,az,name,deployment}` (0644, the directory 0755), as upstream.
fn write_instance_files(base: &Path, spec: &Value) -> Result<(), String> {
    let dir = base.join("instance");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    let text = |k: &str| match spec.get(k) {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let name = spec
        .pointer("/job/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    for (file, value) in [
        ("id", text("id")),
        ("az", text("az")),
        ("name", name),
        ("deployment", text("deployment")),
    ] {
        platform::files::write_durable(&dir.join(file), value.as_bytes(), 0o644)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `apply [spec]`: with a `configuration_hash`, the full applier (install, enable, keep only
/// the spec's jobs and packages, monit job files reset) and a confirmed monit reload; always,
/// dynamic networks filled, the spec persisted and the instance files written. Nothing is
/// persisted when installing fails: the previous version stays enabled and recorded.
pub async fn apply(ctx: Arc<Context>, mut spec: Value) -> TaskResult {
    fill_dynamic_networks(&mut spec, &ctx.settings);
    if has_configuration(&spec) {
        let typed = parse_spec(&spec)?;
        let blobs = blobs(&ctx)?;
        let base = ctx.base_dir.clone();
        let n = parallel(&ctx.settings);
        let t = typed.clone();
        let applied = blocking(move || {
            Applier::new(blobs, base)
                .with_parallel(n)
                .apply(&t)
                .map_err(|e| e.to_string())
        })
        .await?;
        if applied {
            ctx.jobs.set_expected_jobs(typed.jobs().len());
            ctx.jobs
                .reload()
                .await
                .map_err(|e| format!("Reloading monit: {e}"))?;
        }
    }
    write_json(&spec_path(&ctx.base_dir), &spec)?;
    write_instance_files(&ctx.base_dir, &spec)?;
    Ok(json!("applied"))
}

/// `start`'s first half (upstream's `ConfigureJobs`): the applied spec's monit files copied to
/// `<base>/monit/job`, then monit reloaded and the reload confirmed. A spec without jobs
/// changes nothing.
pub async fn configure_jobs(ctx: &Context) -> Result<(), String> {
    let spec = read_spec(&ctx.base_dir)?;
    if !has_configuration(&spec) {
        return Ok(());
    }
    let typed = parse_spec(&spec)?;
    if typed.jobs().is_empty() {
        return Ok(());
    }
    ctx.jobs.set_expected_jobs(typed.jobs().len());
    let layout = jobs::Layout::new(ctx.base_dir.clone());
    blocking(move || {
        layout
            .configure_monit(&typed)
            .map(|_| ())
            .map_err(|e| format!("Configuring jobs: {e}"))
    })
    .await?;
    ctx.jobs
        .reload()
        .await
        .map_err(|e| format!("Reloading monit: {e}"))
}

/// `compile_package [blob_id, digest, name, version, deps]`; `cancel` kills the packaging
/// script's process group.
pub async fn compile_package(
    ctx: Arc<Context>,
    args: CompileArgs,
    cancel: CancellationToken,
) -> TaskResult {
    let request = CompileRequest {
        blob_id: args.blob_id,
        digest: args.digest,
        name: args.name,
        version: args.version,
        deps: args.deps,
    };
    let blobs = blobs(&ctx)?;
    let base = ctx.base_dir.clone();
    let limits = CompileLimits {
        cancel,
        ..CompileLimits::default()
    };
    let up = blocking(move || {
        jobs::compile_package(&blobs, &base, &request, &limits).map_err(|e| e.to_string())
    })
    .await?;
    Ok(json!({"result": {"blobstore_id": up.blobstore_id, "sha1": up.sha1}}))
}

/// `upload_blob [{blob_id, checksum, payload}]`: the base64 payload verified against the
/// checksum and written to `<base>/data/sensitive_blobs/<blob_id>` (0640). Value: the id.
pub async fn upload_blob(ctx: Arc<Context>, arg: Value) -> TaskResult {
    let obj: Map<String, Value> = arg
        .as_object()
        .cloned()
        .ok_or_else(|| format!("upload_blob argument must be an object, got {arg}"))?;
    let field = |k: &str| -> Result<String, String> {
        obj.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("upload_blob field {k} must be a string"))
    };
    let id = field("blob_id")?;
    let checksum = field("checksum")?;
    let payload = field("payload")?;
    blobstore::provider::validate_id(&id).map_err(|e| e.to_string())?;
    let digest = MultiDigest::parse(&checksum).map_err(|e| e.to_string())?;
    let base = ctx.base_dir.clone();
    blocking(move || {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.as_bytes())
            .map_err(|e| format!("Decoding payload of blob {id}: {e}"))?;
        let actual = Digest::of(digest.algorithm(), &bytes);
        digest.verify(&actual).map_err(|e| {
            format!("Payload corrupted. Checksum mismatch. Expected '{digest}': {e}")
        })?;
        let path = base.join("data").join("sensitive_blobs").join(&id);
        platform::files::write_durable(&path, &bytes, 0o640).map_err(|e| e.to_string())?;
        Ok(json!(id))
    })
    .await
    .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blobstore_precedence_is_upstreams() {
        let settings = |v: Value| Settings::parse(&v).unwrap();
        let s = settings(json!({"blobstore": {"provider": "local"},
            "env": {"bosh": {"blobstores": [{"provider": "dav"}]}}}));
        assert_eq!(
            blobstore_settings(&s, &json!({"blobstores": [{"provider": "s3"}]})).unwrap()["provider"],
            "s3"
        );
        assert_eq!(
            blobstore_settings(&s, &json!({})).unwrap()["provider"],
            "dav"
        );
        assert_eq!(
            blobstore_settings(
                &settings(json!({"blobstore": {"provider": "local"}})),
                &json!({})
            )
            .unwrap()["provider"],
            "local"
        );
        assert_eq!(
            blobstore_settings(&settings(json!({})), &json!({"blobstores": []})),
            None
        );
    }

    #[test]
    fn parallel_defaults_to_five_and_is_bounded() {
        let p = |v: Value| parallel(&Settings::parse(&v).unwrap());
        assert_eq!(p(json!({})), 5);
        assert_eq!(p(json!({"env": {"bosh": {"parallel": 2}}})), 2);
        assert_eq!(p(json!({"env": {"bosh": {"parallel": 0}}})), 5);
        assert_eq!(p(json!({"env": {"bosh": {"parallel": 100000}}})), 5);
    }

    #[test]
    fn dynamic_networks_are_filled_from_settings() {
        let mut spec = json!({"networks": {
            "dyn": {"type": "dynamic", "default": ["dns"]},
            "man": {"type": "manual", "ip": "10.0.0.5"}}});
        let settings = json!({"networks": {
            "dyn": {"type": "dynamic", "ip": "10.1.0.7", "netmask": "255.255.0.0", "gateway": "10.1.0.1"},
            "man": {"ip": "10.9.9.9"}}});
        fill_dynamic_networks(&mut spec, &Settings::parse(&settings).unwrap());
        assert_eq!(spec["networks"]["dyn"]["ip"], "10.1.0.7");
        assert_eq!(spec["networks"]["dyn"]["gateway"], "10.1.0.1");
        assert_eq!(spec["networks"]["dyn"]["default"], json!(["dns"]));
        assert_eq!(spec["networks"]["man"]["ip"], "10.0.0.5");
    }
}
