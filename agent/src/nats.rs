//! The director link: settings → mbus config → the bus, with the firewall as its
//! before-connect hook, and the requests it delivers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mbus::{BeforeConnect, ConnectPlan, HookFuture};
use tracing::{info, warn};

use crate::firewall::Firewall;

/// How long endpoints that are no longer resolved stay in the NATS sets after a dial.
const STALE_GRACE: Duration = Duration::from_secs(2);

/// Commits NATS rules for exactly the endpoints the bus is about to dial.
pub struct FirewallHook {
    fw: Arc<Mutex<Firewall>>,
}

impl FirewallHook {
    /// A hook that updates `fw`'s NATS endpoints.
    pub fn new(fw: Arc<Mutex<Firewall>>) -> Self {
        FirewallHook { fw }
    }
}

/// Why the hook did not commit rules.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no NATS endpoint has ever resolved; the previous rules are kept")]
    NothingResolved,
    #[error("committing NATS rules: {0}")]
    Firewall(#[from] platform::firewall::FirewallError),
    #[error("the firewall task failed: {0}")]
    Task(String),
}

impl BeforeConnect for FirewallHook {
    fn before_connect<'a>(&'a self, plan: &'a ConnectPlan) -> HookFuture<'a> {
        let fw = self.fw.clone();
        // `plan.endpoints` already carries the last good answer of a host whose lookup
        // failed, so committing exactly this set never drops rules for a host that failed.
        let endpoints: BTreeSet<SocketAddr> = plan.endpoints.iter().copied().collect();
        for f in &plan.failed {
            warn!(host = %f.host, reason = %f.reason, kept = f.carried_over.len(), "NATS host did not resolve; its previous endpoints are kept");
        }
        Box::pin(async move {
            if endpoints.is_empty() {
                return Err(HookError::NothingResolved.into());
            }
            let n = endpoints.len();
            let fw2 = fw.clone();
            let (follow_up, removing) = tokio::task::spawn_blocking(move || {
                let mut fw = fw2.lock().unwrap_or_else(|e| e.into_inner());
                fw.protect_nats_endpoints(endpoints)
                    .map(|f| (f, fw.rebuild_pending()))
            })
            .await
            .map_err(|e| HookError::Task(e.to_string()))?
            .map_err(HookError::from)?;
            if follow_up {
                info!(
                    endpoints = n,
                    "NATS endpoints protected; stale ones are removed and the table read back after the dial"
                );
                // Not awaited: the dial goes ahead while the exact set is committed (deletions
                // make nft wait 10–15 ms on the kernel) or the table read back. The reconcile
                // loop retries on failure.
                // Endpoints no longer resolved stay protected a little longer: a connection to
                // one may still be draining (an mbus switch), and its packets must keep their
                // mark. Protecting an address longer never opens anything.
                let grace = if removing {
                    STALE_GRACE
                } else {
                    Duration::ZERO
                };
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = tokio::task::spawn_blocking(move || {
                        let mut fw = fw.lock().unwrap_or_else(|e| e.into_inner());
                        if let Err(e) = fw.after_dial() {
                            warn!(error = %e, "finishing the NATS rules failed; the reconcile loop will retry");
                        }
                    })
                    .await;
                });
            }
            Ok(())
        })
    }
}
