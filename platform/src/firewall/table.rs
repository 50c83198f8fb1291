//! The seam between the agent's firewall state machine and the kernel: a small trait over the
//! table `inet bosh_agent` — apply a script as one transaction, list the table, add NATS set
//! elements, list the jobs chain — with the real implementation ([`Nft`]: `nft -f -`,
//! listings, and netlink where it is faster) and an in-memory one ([`FakeTable`]) for unit
//! tests of the state machine.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::nft::Nft;
use super::render::render_nats_additions;
use super::shape::TableShape;
use super::{FirewallError, MONIT_JOBS_CHAIN, NATS_SET_V4, NATS_SET_V6, TABLE, netlink};

/// What the firewall state machine asks of the kernel's table. Every method touches only the
/// agent's own table.
pub trait KernelTable: Send + 'static {
    /// Applies `script` as one transaction: all of it takes effect or none.
    fn apply(&self, script: &str) -> Result<(), FirewallError>;
    /// The table as `nft list table` prints it, or `None` when it does not exist.
    fn list_table_text(&self) -> Result<Option<String>, FirewallError>;
    /// Whether the table exists. May be answered faster than a listing.
    fn table_exists(&self) -> Result<bool, FirewallError> {
        Ok(self.list_table_text()?.is_some())
    }
    /// Adds `endpoints` to the NATS sets in one transaction, deleting nothing.
    fn add_endpoints(&self, endpoints: &[SocketAddr]) -> Result<(), FirewallError> {
        self.apply(&render_nats_additions(endpoints))
    }
    /// nft's JSON listing of one chain of the table (`None` when absent).
    fn list_chain(&self, chain: &str) -> Result<Option<Value>, FirewallError>;
}

impl KernelTable for Nft {
    fn apply(&self, script: &str) -> Result<(), FirewallError> {
        Nft::apply(self, script)
    }

    fn list_table_text(&self) -> Result<Option<String>, FirewallError> {
        Nft::list_table_text(self)
    }

    /// Over netlink (microseconds); nft's listing where netlink cannot answer.
    fn table_exists(&self) -> Result<bool, FirewallError> {
        match netlink::table_exists(TABLE) {
            Ok(b) => Ok(b),
            Err(_) => Ok(Nft::list_table_text(self)?.is_some()),
        }
    }

    /// In-process netlink: one transaction, flat in the number of endpoints; `nft` (~10 µs of
    /// parsing per element plus its start-up) where netlink cannot.
    fn add_endpoints(&self, endpoints: &[SocketAddr]) -> Result<(), FirewallError> {
        netlink::add_endpoints(TABLE, NATS_SET_V4, NATS_SET_V6, endpoints).or_else(|e| {
            tracing::info!(error = %e, "adding NATS endpoints over netlink failed; using nft");
            Nft::apply(self, &render_nats_additions(endpoints))
        })
    }

    fn list_chain(&self, chain: &str) -> Result<Option<Value>, FirewallError> {
        Nft::list_chain(self, chain)
    }
}

/// An in-memory table for tests: scripts are interpreted by [`TableShape`] (the renderer's
/// subset of nft), the listing is printed from it, and failures can be injected. Clones share
/// the same table, so a test keeps one to inspect and change what the state machine sees.
#[derive(Debug, Clone, Default)]
pub struct FakeTable {
    inner: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    table: TableShape,
    applied: Vec<String>,
    fail_apply: Option<String>,
    fail_list: Option<String>,
    listings: usize,
}

impl FakeTable {
    /// An absent table.
    pub fn new() -> Self {
        FakeTable::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every script applied successfully so far, in order.
    pub fn applied(&self) -> Vec<String> {
        self.lock().applied.clone()
    }

    /// How many times the table was listed.
    pub fn listings(&self) -> usize {
        self.lock().listings
    }

    /// The table now.
    pub fn shape(&self) -> TableShape {
        self.lock().table.clone()
    }

    /// Changes the table behind the state machine's back (drift).
    pub fn tamper(&self, f: impl FnOnce(&mut TableShape)) {
        f(&mut self.lock().table);
    }

    /// Makes every apply fail with nft's `stderr` (`None`: succeed again).
    pub fn fail_applies(&self, stderr: Option<&str>) {
        self.lock().fail_apply = stderr.map(str::to_string);
    }

    /// Makes every listing of the table fail with nft's `stderr` (`None`: succeed again).
    pub fn fail_listings(&self, stderr: Option<&str>) {
        self.lock().fail_list = stderr.map(str::to_string);
    }
}

impl KernelTable for FakeTable {
    fn apply(&self, script: &str) -> Result<(), FirewallError> {
        let mut s = self.lock();
        if let Some(stderr) = &s.fail_apply {
            return Err(FirewallError::Nft {
                action: "apply".into(),
                code: Some(1),
                stderr: stderr.clone(),
            });
        }
        s.table.apply(script).map_err(|e| FirewallError::Nft {
            action: "apply".into(),
            code: Some(1),
            stderr: e.to_string(),
        })?;
        s.applied.push(script.to_string());
        Ok(())
    }

    fn list_table_text(&self) -> Result<Option<String>, FirewallError> {
        let mut s = self.lock();
        if let Some(stderr) = &s.fail_list {
            return Err(FirewallError::Nft {
                action: "list table".into(),
                code: Some(1),
                stderr: stderr.clone(),
            });
        }
        s.listings += 1;
        Ok(s.table.listing())
    }

    fn list_chain(&self, chain: &str) -> Result<Option<Value>, FirewallError> {
        let s = self.lock();
        let Some(c) = s.table.chains.get(chain).filter(|_| s.table.present) else {
            return Ok(None);
        };
        // Only the jobs chain is ever asked for; its rules are listed with handles and
        // comments, which is what the jobs-chain reconcile reads.
        let mut objects = vec![json!({"chain": {"family": "inet", "table": TABLE, "name": chain}})];
        if chain == MONIT_JOBS_CHAIN {
            for (handle, rule) in &c.rules {
                let comment = rule
                    .rsplit_once("comment \"")
                    .and_then(|(_, c)| c.strip_suffix('"'));
                objects.push(
                    json!({"rule": {"family": "inet", "table": TABLE, "chain": chain,
                    "handle": handle, "comment": comment, "expr": []}}),
                );
            }
        }
        Ok(Some(json!({ "nftables": objects })))
    }
}
