//! The alert a degraded firewall raises on `hm.agent.alert.<id>`: once connected, then
//! whenever its problems change. A firewall failure never goes unnoticed.

use std::time::Duration;

use mbus::{Bus, ConnectionState, Target, Topic};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::health::{Health, Problem};

/// Sends the alert of every distinct set of problems `health` shows, until `stop`; a send
/// that fails is retried every `retry`.
pub async fn send_alerts(
    bus: Bus,
    mut health: watch::Receiver<Health>,
    retry: Duration,
    stop: CancellationToken,
) {
    let mut state = bus.watch_state();
    tokio::select! {
        () = stop.cancelled() => return,
        _ = state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })) => {}
    }
    let mut sent: Option<Vec<Problem>> = None;
    loop {
        let h = health.borrow_and_update().clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut failed = false;
        match h.alert(now) {
            Some(alert) if sent.as_ref() != Some(&h.problems) => {
                let bytes = serde_json::to_vec(&alert).unwrap_or_default();
                match bus
                    .publish_to(Target::HealthMonitor, Topic::Alert, bytes.into())
                    .await
                {
                    Ok(()) => {
                        warn!(summary = %alert["summary"], "firewall degraded; alert sent");
                        sent = Some(h.problems);
                    }
                    Err(e) => {
                        warn!(error = %e, "firewall alert not sent; will retry");
                        failed = true;
                    }
                }
            }
            Some(_) => {}
            None => sent = None,
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry), if failed => {}
            r = health.changed(), if !failed => if r.is_err() { return },
        }
    }
}
