//! What the bus reports about itself: connection state and counters (for logs and
//! `firewall status`). Counters only grow; they are shared through an `Arc` so they can be read
//! without holding the bus.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ConnectionState {
    /// Between connections: backing off, resolving, running the hook or dialling.
    Connecting {
        /// The attempt in progress (1-based, as in [`crate::ConnectPlan::attempt`]).
        attempt: u64,
    },
    /// Connected, and the server has confirmed the `agent.<id>` subscription.
    Connected {
        /// The URL dialled (redacted).
        server: String,
        /// The resolved address dialled.
        endpoint: SocketAddr,
    },
    /// [`crate::Bus::shutdown`] was called or every handle was dropped.
    Stopped,
}

/// Live counters. Read them with the accessors or [`BusStats::snapshot`].
#[derive(Debug, Default)]
pub struct BusStats {
    pub(crate) attempts: AtomicU64,
    pub(crate) dials: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) hook_failures: AtomicU64,
    pub(crate) resolve_failures: AtomicU64,
    pub(crate) switches: AtomicU64,
    pub(crate) switch_failures: AtomicU64,
    pub(crate) returns_home: AtomicU64,
    pub(crate) return_home_failures: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) last_hook_error: Mutex<Option<String>>,
}

/// A copy of the counters at one instant, serialisable for status output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BusStatsSnapshot {
    /// Connection attempts (each = one fresh resolution + one hook call + up to N dials).
    pub attempts: u64,
    /// Individual dials (TCP + TLS + NATS handshake) to one endpoint.
    pub dials: u64,
    /// Successful connections (subscription confirmed).
    pub connects: u64,
    /// Failed dials, plus attempts that had no endpoint to dial.
    pub connect_failures: u64,
    /// Hook calls that returned an error or timed out.
    pub hook_failures: u64,
    /// URL hosts that failed to resolve (counted per URL per attempt).
    pub resolve_failures: u64,
    /// Reconfigurations that took effect (a new session replaced a live one).
    pub switches: u64,
    /// Attempts to reach reconfigured servers that failed while the old session kept serving.
    pub switch_failures: u64,
    /// Moves back to this agent's first endpoint ([`crate::ReturnHome`]).
    pub returns_home: u64,
    /// Tries to reach the first endpoint that failed while the current session kept serving.
    pub return_home_failures: u64,
    /// The most recent connection error (names the URL, redacted, and the endpoint).
    pub last_error: Option<String>,
    /// The most recent hook error.
    pub last_hook_error: Option<String>,
}

fn read(m: &Mutex<Option<String>>) -> Option<String> {
    // A poisoned lock only means a panic elsewhere mid-write of a String: still readable.
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

pub(crate) fn write(m: &Mutex<Option<String>>, value: String) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
}

impl BusStats {
    /// Connection attempts started.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }
    /// Successful connections.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
    /// Hook failures (errors and timeouts).
    pub fn hook_failures(&self) -> u64 {
        self.hook_failures.load(Ordering::Relaxed)
    }
    /// Reconfigurations that took effect while connected ([`crate::Bus::reconfigure`]).
    pub fn switches(&self) -> u64 {
        self.switches.load(Ordering::Relaxed)
    }
    /// Failed attempts to reach reconfigured servers while the old session kept serving.
    pub fn switch_failures(&self) -> u64 {
        self.switch_failures.load(Ordering::Relaxed)
    }
    /// Moves back to the first endpoint ([`crate::ReturnHome`]).
    pub fn returns_home(&self) -> u64 {
        self.returns_home.load(Ordering::Relaxed)
    }
    /// Failed tries to reach the first endpoint while away from it.
    pub fn return_home_failures(&self) -> u64 {
        self.return_home_failures.load(Ordering::Relaxed)
    }
    /// The most recent connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        read(&self.last_error)
    }
    /// The most recent hook error, if any.
    pub fn last_hook_error(&self) -> Option<String> {
        read(&self.last_hook_error)
    }
    /// All counters at once.
    pub fn snapshot(&self) -> BusStatsSnapshot {
        BusStatsSnapshot {
            attempts: self.attempts(),
            dials: self.dials.load(Ordering::Relaxed),
            connects: self.connects(),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            hook_failures: self.hook_failures(),
            resolve_failures: self.resolve_failures.load(Ordering::Relaxed),
            switches: self.switches(),
            switch_failures: self.switch_failures(),
            returns_home: self.returns_home(),
            return_home_failures: self.return_home_failures(),
            last_error: self.last_error(),
            last_hook_error: self.last_hook_error(),
        }
    }
}
