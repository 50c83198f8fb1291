//! Heartbeats on `hm.agent.heartbeat.<agent_id>`, with upstream's payload, and
//! `<base>/instance/health.json`.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::actions::{read_spec, vitals};
use crate::dispatch::Context;

/// Builds the heartbeat payload from the spec, the job state and the vitals. Pure.
pub fn payload(
    spec: &Value,
    job_state: &str,
    vitals: Option<Value>,
    processes: Option<usize>,
) -> Value {
    json!({
        "deployment": spec.get("deployment").and_then(Value::as_str).unwrap_or(""),
        "job": spec.pointer("/job/name").cloned().unwrap_or(Value::Null),
        "index": spec.get("index").cloned().unwrap_or(Value::Null),
        "job_state": job_state,
        "vitals": vitals.unwrap_or_else(|| json!({})),
        "node_id": spec.get("id").and_then(Value::as_str).unwrap_or(""),
        "number_of_processes": processes,
    })
}

/// Gathers one heartbeat and records the job state in `<base>/instance/health.json`.
pub async fn collect(ctx: &Arc<Context>) -> Value {
    let spec = read_spec(&ctx.base_dir).unwrap_or_else(|_| json!({}));
    let state = ctx.jobs.job_state().await;
    let processes = ctx.jobs.processes().await.ok().map(|p| p.len());
    let v = vitals(ctx.base_dir.clone()).await.ok();
    let health = ctx.base_dir.join("instance").join("health.json");
    // Jobs and bosh-dns read it: not a secret, readable by all, written durably all the same.
    let body = json!({"state": state.as_str()}).to_string();
    if let Err(e) = platform::files::write_durable(&health, body.as_bytes(), 0o644) {
        tracing::warn!(error = %e, "cannot write health.json");
    }
    let mut hb = payload(&spec, state.as_str(), v, processes);
    // A key upstream's health monitor ignores: the firewall's health, so a degraded firewall
    // is visible in every heartbeat.
    hb["firewall"] = crate::firewall::report(&platform::firewall::nft::run_dir());
    hb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_upstreams_keys_and_nulls() {
        let p = payload(&json!({}), "unknown", None, None);
        assert_eq!(p["job"], Value::Null);
        assert_eq!(p["index"], Value::Null);
        assert_eq!(p["number_of_processes"], Value::Null);
        assert_eq!(p["job_state"], "unknown");
        let spec = json!({"deployment": "d", "job": {"name": "web"}, "index": 0, "id": "uuid-1"});
        let p = payload(&spec, "running", Some(json!({"load": ["0.1"]})), Some(3));
        assert_eq!(
            p,
            json!({"deployment":"d","job":"web","index":0,"job_state":"running","vitals":{"load":["0.1"]},
                   "node_id":"uuid-1","number_of_processes":3})
        );
    }
}
