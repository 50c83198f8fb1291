//! The seam between the mbus client and the firewall: awaited before every connection attempt.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use crate::resolve::FailedHost;

/// Error a hook returns; the client logs it with its reason and counts it, then dials anyway.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future a hook returns (boxed so that `Arc<dyn BeforeConnect>` works).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>>;

/// What the client is about to do on one attempt, handed to the hook before any dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPlan {
    /// 1 for the first attempt, counting every attempt (reconnects included) since connect.
    pub attempt: u64,
    /// Every endpoint the client may dial on this attempt, and no other: fresh answers, plus
    /// the last good endpoints of hosts that failed now. Empty only if no host has ever
    /// resolved; a firewall must then keep its previous rules rather than flush to nothing.
    pub endpoints: Vec<SocketAddr>,
    /// URLs whose host failed to resolve on this attempt (their carried-over endpoints are
    /// already in `endpoints`).
    pub failed: Vec<FailedHost>,
}

/// Called before every connection attempt (the first and each reconnect), after fresh
/// resolution and before dialling. The client dials only addresses from
/// [`ConnectPlan::endpoints`], so a hook that commits rules for exactly those endpoints
/// covers every connection the agent makes.
///
/// An error does not stop the attempt: a VM the director cannot reach is worse than one with
/// a degraded firewall. The client bounds the call with a timeout (see
/// [`crate::BusOptions::hook_timeout`]).
pub trait BeforeConnect: Send + Sync + 'static {
    /// Commit whatever must be in place before dialling `plan.endpoints`.
    fn before_connect<'a>(&'a self, plan: &'a ConnectPlan) -> HookFuture<'a>;
}

/// A hook that does nothing (NATS firewall disabled).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl BeforeConnect for NoHook {
    fn before_connect<'a>(&'a self, _plan: &'a ConnectPlan) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}
