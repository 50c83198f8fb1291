//! `get_state`, and the vitals it and heartbeats report.

use std::path::PathBuf;
use std::sync::Mutex;

use platform::vitals::{CpuSampler, read_vitals};
use serde_json::{Map, Value, json};

use crate::director::Context;
use crate::director::spec::read_spec;
use crate::director::tasks::TaskResult;

/// The CPU sampler is shared by heartbeats and `get_state "full"`.
pub static CPU: Mutex<Option<CpuSampler>> = Mutex::new(None);

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
pub async fn get_state(ctx: &Context, full: bool) -> TaskResult {
    let spec = read_spec(&ctx.base_dir)?;
    let mut v: Map<String, Value> = spec.as_object().cloned().unwrap_or_default();
    for key in ["networks", "resource_pool", "packages"] {
        if v.get(key).is_none_or(Value::is_null) {
            v.insert(key.into(), json!({}));
        }
    }
    v.insert("agent_id".into(), json!(ctx.settings.agent_id));
    // Processes first, as upstream: when monit cannot be reached the answer is its error,
    // after one round of monit retries rather than a second one for the job state.
    let processes = ctx.jobs.processes().await.map_err(|e| e.to_string())?;
    v.insert(
        "job_state".into(),
        json!(ctx.jobs.job_state().await.as_str()),
    );
    if !processes.is_empty() {
        v.insert(
            "processes".into(),
            serde_json::to_value(processes).map_err(|e| e.to_string())?,
        );
    }
    if full {
        v.insert("vitals".into(), vitals(ctx.base_dir.clone()).await?);
    }
    v.insert("vm".into(), json!({ "name": ctx.settings.vm.name }));
    // Not in upstream's answer; directors ignore it. Says whether the firewall is degraded.
    let health = ctx.firewall.borrow().clone();
    v.insert(
        "firewall".into(),
        serde_json::to_value(health).map_err(|e| e.to_string())?,
    );
    Ok(Value::Object(v))
}
