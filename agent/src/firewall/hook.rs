//! The mbus before-connect hook: commits NATS rules for exactly the endpoints the bus is about
//! to dial, through the firewall task.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mbus::{BeforeConnect, ConnectPlan, HookFuture};
use tracing::{info, warn};

use super::{FirewallHandle, TaskError};

/// How long endpoints that are no longer resolved stay in the NATS sets after a dial.
const STALE_GRACE: Duration = Duration::from_secs(2);

/// Commits NATS rules for exactly the endpoints the bus is about to dial.
pub struct FirewallHook {
    fw: FirewallHandle,
}

impl FirewallHook {
    /// A hook that updates the NATS endpoints of the firewall behind `fw`.
    pub fn new(fw: FirewallHandle) -> Self {
        FirewallHook { fw }
    }
}

/// Why the hook did not commit rules.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no NATS endpoint has ever resolved; the previous rules are kept")]
    NothingResolved,
    #[error("committing NATS rules: {0}")]
    Firewall(#[from] TaskError),
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
            let done = fw
                .protect_nats_endpoints(endpoints)
                .await
                .map_err(HookError::from)?;
            if done.follow_up {
                info!(
                    endpoints = n,
                    "NATS endpoints protected; stale ones are removed and the table read back after the dial"
                );
                // The dial goes ahead while the firewall task commits the exact set (deletions
                // make nft wait 10–15 ms on the kernel) or reads the table back. Endpoints no
                // longer resolved stay protected a little longer: a connection to one may still
                // be draining (an mbus switch), and its packets must keep their mark.
                // Protecting an address longer never opens anything.
                let grace = if done.removing {
                    STALE_GRACE
                } else {
                    Duration::ZERO
                };
                if let Err(e) = fw.after_dial(grace).await {
                    warn!(error = %e, "the NATS rules cannot be finished after the dial");
                }
            }
            Ok(())
        })
    }
}
