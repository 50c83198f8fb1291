//! The jobs' lifecycle: `start`, `stop`, `drain` and `run_script`.

use std::collections::BTreeMap;

use jobs::{DrainOptions, DrainParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::director::Context;
use crate::director::action::{DrainArgs, DrainKind};
use crate::director::spec::{drain_spec, read_spec, spec_jobs};
use crate::director::tasks::TaskResult;

/// `start`: the applied jobs' monit files installed, monit reloaded, the `vcap` group started.
pub async fn start(ctx: &Context) -> TaskResult {
    super::deploy::configure_jobs(ctx).await?;
    ctx.jobs.start().await.map_err(|e| e.to_string())?;
    Ok(json!("started"))
}

/// `stop`: protocol > 2 stops and waits, as upstream.
pub async fn stop(ctx: &Context, protocol: i64) -> TaskResult {
    let r = if protocol > 2 {
        ctx.jobs.stop_and_wait().await
    } else {
        ctx.jobs.stop().await
    };
    r.map_err(|e| format!("Stopping Monitored Services: {e}"))?;
    Ok(json!("stopped"))
}

/// `drain`: unmonitors the jobs and runs their drain scripts (the integer protocol).
/// `shutdown` tells the health monitor first. `cancel` terminates the scripts.
pub async fn drain(ctx: &Context, args: DrainArgs, cancel: CancellationToken) -> TaskResult {
    let current = read_spec(&ctx.base_dir)?;
    let old = drain_spec(&current);
    let params = match args.kind {
        DrainKind::Update => DrainParams::update(
            &old,
            &drain_spec(args.new_spec.as_ref().unwrap_or(&Value::Null)),
        ),
        DrainKind::Shutdown => {
            if let Some(bus) = &ctx.bus {
                let _ = bus
                    .publish_to(
                        mbus::Target::HealthMonitor,
                        mbus::Topic::Shutdown,
                        "null".into(),
                    )
                    .await;
            }
            DrainParams::shutdown(&old, args.new_spec.as_ref().map(drain_spec).as_ref())
        }
    };
    ctx.jobs.unmonitor().await.map_err(|e| e.to_string())?;
    jobs::drain(
        &ctx.base_dir,
        &spec_jobs(&current),
        &params,
        &DrainOptions::default(),
        &cancel,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(json!(0))
}

/// `run_script [name, {"env"}]`: the script of every applied job, in parallel.
pub async fn run_script(ctx: &Context, name: &str, env: &BTreeMap<String, String>) -> TaskResult {
    let spec = read_spec(&ctx.base_dir)?;
    jobs::run_script(&ctx.base_dir, &spec_jobs(&spec), name, env)
        .await
        .map_err(|e| e.to_string())?;
    Ok(json!({}))
}
