//! The director's actions, with upstream's shapes: `get_state`, `start`, and the argument
//! checks and bodies of the asynchronous ones (`stop`, `drain`, `run_script`,
//! `update_settings`; `apply`, `prepare`, `compile_package` and `upload_blob` run the deploy
//! code in [`crate::deploy`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jobs::{CancellationToken, DrainOptions, DrainParams, DrainSpec};
use platform::vitals::{CpuSampler, read_vitals};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::dispatch::{Context, string_arg, task};
use crate::protocol::Request;
use crate::tasks::TaskBody;

/// The monit-backed supervisor, shared by actions, heartbeats and the dispatcher.
pub type JobSupervisor = Arc<jobs::JobSupervisor>;

/// Publishes notifications to the health monitor (`hm.agent.<topic>.<id>`).
#[derive(Clone)]
pub struct Notifier {
    pub bus: mbus::Bus,
}

/// The CPU sampler is shared by heartbeats and `get_state "full"`.
pub static CPU: Mutex<Option<CpuSampler>> = Mutex::new(None);

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

fn drain_spec(spec: &Value) -> DrainSpec {
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

/// Vitals now (blocking procfs reads on the blocking pool).
pub async fn vitals(base: PathBuf) -> Result<Value, String> {
    tokio::task::spawn_blocking(move || {
        let mut cpu = CPU.lock().unwrap_or_else(|e| e.into_inner());
        let sampler = cpu.get_or_insert_with(CpuSampler::default);
        read_vitals(&base, sampler)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// `get_state [ "full" ]`.
pub async fn get_state(ctx: &Arc<Context>, args: &[Value]) -> Result<Value, String> {
    let full = args.first().and_then(Value::as_str) == Some("full");
    let spec = read_spec(&ctx.base_dir)?;
    let mut v: Map<String, Value> = spec.as_object().cloned().unwrap_or_default();
    for key in ["networks", "resource_pool", "packages"] {
        if v.get(key).is_none_or(Value::is_null) {
            v.insert(key.into(), json!({}));
        }
    }
    v.insert("agent_id".into(), json!(ctx.agent_id));
    v.insert(
        "job_state".into(),
        json!(ctx.jobs.job_state().await.as_str()),
    );
    let processes = ctx.jobs.processes().await.map_err(|e| e.to_string())?;
    if !processes.is_empty() {
        v.insert(
            "processes".into(),
            serde_json::to_value(processes).map_err(|e| e.to_string())?,
        );
    }
    if full {
        v.insert("vitals".into(), vitals(ctx.base_dir.clone()).await?);
    }
    let vm_name = ctx
        .settings
        .pointer("/vm/name")
        .cloned()
        .unwrap_or(json!(""));
    v.insert("vm".into(), json!({ "name": vm_name }));
    // Not in upstream's answer; directors ignore it. Says whether the firewall is degraded.
    v.insert(
        "firewall".into(),
        crate::firewall::report(&platform::firewall::nft::run_dir()),
    );
    Ok(Value::Object(v))
}

/// `start`.
pub async fn start(ctx: &Arc<Context>) -> Result<Value, String> {
    crate::deploy::configure_jobs(ctx).await?;
    ctx.jobs.start().await.map_err(|e| e.to_string())?;
    Ok(json!("started"))
}

/// Checks an asynchronous action's arguments and returns its body.
pub fn prepare_async(ctx: &Arc<Context>, req: &Request) -> Result<TaskBody, String> {
    let ctx = ctx.clone();
    match req.method.as_str() {
        "apply" | "prepare" => {
            let spec = req
                .arguments
                .first()
                .cloned()
                .ok_or_else(|| not_enough(1, req))?;
            if !spec.is_object() {
                return Err(format!(
                    "{} spec must be a JSON object, got {spec}",
                    req.method
                ));
            }
            // Checked before queueing: a spec that cannot be installed fails at once.
            if req.method == "prepare" || crate::deploy::has_configuration(&spec) {
                crate::deploy::parse_spec(&spec)?;
            }
            if req.method == "apply" {
                Ok(task(move |_| crate::deploy::apply(ctx, spec)))
            } else {
                Ok(task(move |_| crate::deploy::prepare(ctx, spec)))
            }
        }
        "compile_package" => {
            if req.arguments.len() < 5 {
                return Err(not_enough(5, req));
            }
            let args = req.arguments.clone();
            Ok(task(move |cancel| {
                crate::deploy::compile_package(ctx, args, cancel)
            }))
        }
        "upload_blob" => {
            let arg = req
                .arguments
                .first()
                .cloned()
                .ok_or_else(|| not_enough(1, req))?;
            Ok(task(move |_| crate::deploy::upload_blob(ctx, arg)))
        }
        "stop" => {
            let protocol = req.protocol;
            Ok(task(move |_| async move {
                let r = if protocol > 2 {
                    ctx.jobs.stop_and_wait().await
                } else {
                    ctx.jobs.stop().await
                };
                r.map_err(|e| format!("Stopping Monitored Services: {e}"))?;
                Ok(json!("stopped"))
            }))
        }
        "drain" => {
            let kind = string_arg(req, 0, 1)?;
            let new_spec = req.arguments.get(1).cloned();
            match kind.as_str() {
                "update" if new_spec.is_none() => {
                    return Err("Drain update requires new spec".into());
                }
                "update" | "shutdown" => {}
                "status" => return Err("Check status can only be called as part of drain".into()),
                other => return Err(format!("Invalid drain type {other:?}")),
            }
            Ok(task(move |cancel| drain(ctx, kind, new_spec, cancel)))
        }
        "run_script" => {
            let script = string_arg(req, 0, 2)?;
            let opts = req.arguments.get(1).cloned().unwrap_or(json!({}));
            let env: BTreeMap<String, String> = match opts.get("env") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(e) => {
                    serde_json::from_value(e.clone()).map_err(|e| format!("run_script env: {e}"))?
                }
            };
            Ok(task(move |_| async move {
                let spec = read_spec(&ctx.base_dir)?;
                jobs::run_script(&ctx.base_dir, &spec_jobs(&spec), &script, &env)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({}))
            }))
        }
        "update_settings" => {
            let new = req
                .arguments
                .first()
                .cloned()
                .ok_or_else(|| not_enough(1, req))?;
            crate::update_settings::check(&new).map_err(|e| e.to_string())?;
            Ok(task(move |_| async move {
                update_settings(&ctx, new).await?;
                Ok(json!("ok"))
            }))
        }
        other => Err(format!("unknown message {other}")),
    }
}

/// `update_settings`: everything is validated before anything is written (a refused update
/// changes nothing); then disks are associated, trusted certificates installed, the merged
/// document persisted, and a changed mbus switched live, make-before-break (upstream restarts
/// the agent instead). The mbus that last connected stays recorded beside it, so an mbus that
/// never connects cannot lock the agent out after a restart.
async fn update_settings(ctx: &Context, new: Value) -> Result<(), String> {
    use crate::update_settings as us;
    let existing = us::load(&ctx.base_dir).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the persisted update_settings are unusable; merging into none");
        json!({})
    });
    let merged = us::merge(&existing, &new);
    let newest = if merged.mbus_changed {
        let c =
            crate::mbus_fallback::candidate(&ctx.settings, Some(&merged.doc), "update_settings")
                .map_err(|e| us::UpdateError::Mbus(e).to_string())?;
        for r in &c.cfg.rejected {
            tracing::error!(error = %r, "mbus URL rejected");
        }
        Some(c)
    } else {
        None
    };
    us::associate_disks(
        &ctx.settings,
        &ctx.base_dir,
        new.get("disk_associations").unwrap_or(&Value::Null),
    )
    .map_err(|e| e.to_string())?;
    let certs = new
        .get("trusted_certs")
        .and_then(Value::as_str)
        .unwrap_or("");
    us::update_certificates(&us::CertTarget::from_env(), certs)
        .await
        .map_err(|e| e.to_string())?;
    us::save(&us::path(&ctx.base_dir), &merged.doc)
        .map_err(|e| us::UpdateError::Save(e).to_string())?;
    if merged.blobstores_changed {
        tracing::info!("blobstores changed by update_settings; used from the next blob fetch");
    }
    let (Some(newest), Some(notifier)) = (newest, &ctx.notifier) else {
        return Ok(());
    };
    if let Some(c) = &ctx.mbus_candidates {
        c.prefer(newest.clone());
    }
    let changed = notifier
        .bus
        .reconfigure(&newest.cfg)
        .map_err(|e| format!("Updating mbus: {e}; the current mbus connection is kept"))?;
    if changed {
        tracing::info!(
            origin = newest.cfg.urls_origin,
            servers = newest.cfg.servers.len(),
            "mbus changed by update_settings: switching live"
        );
    }
    Ok(())
}

fn not_enough(need: usize, req: &Request) -> String {
    format!(
        "Not enough arguments, expected {need}, got {}",
        req.arguments.len()
    )
}

async fn drain(
    ctx: Arc<Context>,
    kind: String,
    new_spec: Option<Value>,
    mut cancel: watch::Receiver<bool>,
) -> Result<Value, String> {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if cancel.wait_for(|c| *c).await.is_ok() {
            t.cancel();
        }
    });
    let current = read_spec(&ctx.base_dir)?;
    let old = drain_spec(&current);
    let params = if kind == "update" {
        DrainParams::update(&old, &drain_spec(new_spec.as_ref().unwrap_or(&Value::Null)))
    } else {
        if let Some(n) = &ctx.notifier {
            let _ = n
                .bus
                .publish_to(
                    mbus::Target::HealthMonitor,
                    mbus::Topic::Shutdown,
                    "null".into(),
                )
                .await;
        }
        DrainParams::shutdown(&old, new_spec.as_ref().map(drain_spec).as_ref())
    };
    ctx.jobs.unmonitor().await.map_err(|e| e.to_string())?;
    jobs::drain(
        &ctx.base_dir,
        &spec_jobs(&current),
        &params,
        &DrainOptions::default(),
        &token,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(json!(0))
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
