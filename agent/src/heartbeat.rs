//! Heartbeats on `hm.agent.heartbeat.<agent_id>`, with upstream's payload, and
//! `<base>/instance/health.json`.

use std::sync::Arc;
use std::time::Duration;

use mbus::{Bus, ConnectionState, Target, Topic};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::director::Context;
use crate::director::actions::state::vitals;
use crate::director::spec::read_spec;

/// Sends a heartbeat as soon as the bus is connected, then every `every`, until `stop`.
pub async fn send(ctx: Arc<Context>, bus: Bus, every: Duration, stop: CancellationToken) {
    let mut state = bus.watch_state();
    tokio::select! {
        () = stop.cancelled() => return,
        _ = state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })) => {}
    }
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let hb = collect(&ctx).await;
        let bytes = serde_json::to_vec(&hb).unwrap_or_default();
        if let Err(e) = bus
            .publish_to(Target::HealthMonitor, Topic::Heartbeat, bytes.into())
            .await
        {
            tracing::warn!(error = %e, "heartbeat not sent");
        }
    }
}

/// Without a bus (the HTTPS API of create-env), as upstream: a heartbeat is still gathered
/// every `every` — so `<base>/instance/health.json` follows the job state — and dropped.
pub async fn record(ctx: Arc<Context>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = collect(&ctx) => {}
        }
    }
}

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
    let health = ctx.firewall.borrow().clone();
    hb["firewall"] = serde_json::to_value(health).unwrap_or(Value::Null);
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
