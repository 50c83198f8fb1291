//! Reloading the firewall policies of agent.json while the agent runs (SIGHUP, `bosh-agent
//! firewall reload`): the workload policies and `MonitAllowRoot` are built and checked as at
//! start, then committed in one transaction that also removes the objects of policies no
//! longer configured. A reload that is refused or fails changes nothing: neither the live
//! table nor the desired state. Every outcome is recorded in the state file (`reloads`,
//! `reload_error`) after it is final, which is what `firewall reload` waits for.

use platform::firewall::render::{Leftovers, render_ruleset, render_ruleset_removing};
use platform::firewall::state::MonitState;
use platform::firewall::table::KernelTable;
use platform::firewall::{FirewallError, MonitPolicy, selftest};
use tracing::{error, info};

use super::{Firewall, build_workload, workload_notes, workload_summary};
use crate::config::LinuxOptions;

/// What a successful reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The new policies were committed (one transaction).
    Applied,
    /// The policies are those already in force: nothing was committed.
    Unchanged,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// agent.json could not be read or parsed (the message names the file and the place).
    #[error("{0}")]
    Config(String),
    /// A value of the policies is invalid or unsafe here (the message names key and value).
    #[error("the firewall policies are refused: {0}")]
    Refused(String),
    /// nft did not commit them; the transaction changed nothing.
    #[error("applying the reloaded firewall policies failed: {0}")]
    Apply(FirewallError),
}

impl<T: KernelTable> Firewall<T> {
    /// Replaces the workload policies and `MonitAllowRoot` with those of `opts` (the other
    /// keys of `opts` are not looked at: they take effect at the next start). Valid policies
    /// pass the same checks as at start and are committed in one transaction that also
    /// removes the objects of policies switched off; an error leaves the live table and the
    /// desired state as they were. The outcome is recorded (`reloads`, `reload_error`).
    pub fn reload(&mut self, opts: &LinuxOptions) -> Result<Reloaded, ReloadError> {
        let res = self.reload_policies(opts);
        match &res {
            Ok(Reloaded::Applied) => info!("the reloaded firewall policies are applied"),
            Ok(Reloaded::Unchanged) => {
                info!("the reloaded firewall policies are those in force: nothing to apply")
            }
            Err(e) => {
                error!(error = %e, "the firewall reload changed nothing; the live rules stay as they are")
            }
        }
        self.record_reload(res.as_ref().err().map(ToString::to_string));
        res
    }

    /// Records a reload that could not even start (agent.json unreadable or invalid): the
    /// error is the outcome of this reload, and nothing else changes.
    pub fn reload_failed(&mut self, why: String) -> ReloadError {
        error!(error = %why, "the firewall reload changed nothing; the live rules stay as they are");
        self.record_reload(Some(why.clone()));
        ReloadError::Config(why)
    }

    fn record_reload(&mut self, error: Option<String>) {
        self.state.reload_error = error;
        self.state.reloads += 1;
        self.write_state();
    }

    fn reload_policies(&mut self, opts: &LinuxOptions) -> Result<Reloaded, ReloadError> {
        let est = selftest::Established {
            identity: self.desired.identity.clone(),
            level_offset: self.state.level_offset,
        };
        let workload =
            build_workload(opts, &est, &self.nft_prefix).map_err(ReloadError::Refused)?;
        let bridge_error = match self.workload_check {
            Some(check) => check(&workload).map_err(ReloadError::Refused)?,
            None => None,
        };
        let monit = match self.desired.monit {
            MonitPolicy::Disabled => MonitPolicy::Disabled,
            MonitPolicy::Enabled { .. } => MonitPolicy::Enabled {
                allow_root: opts.firewall.monit_allow_root,
            },
        };
        if let Some(e) = &bridge_error {
            error!(error = %e, "bridged traffic bypasses the egress deny list");
        }
        if workload == self.desired.workload
            && monit == self.desired.monit
            && !self.workload_refused
            && self.last_script.is_some()
        {
            if self.state.bridge_error != bridge_error {
                self.state.bridge_error = bridge_error;
                self.write_state();
            }
            return Ok(Reloaded::Unchanged);
        }
        let saved = Saved {
            workload: std::mem::replace(&mut self.desired.workload, workload),
            monit: std::mem::replace(&mut self.desired.monit, monit),
            refused: std::mem::replace(&mut self.workload_refused, false),
            last_script: self.last_script.clone(),
            state: self.state.clone(),
        };
        self.state.workload = workload_summary(&self.desired.workload);
        self.state.workload_notes = workload_notes(&self.desired.identity, &self.desired.workload);
        self.state.workload_refused = None;
        self.state.bridge_error = bridge_error;
        self.state.monit = MonitState::of(monit);
        // The start's listing is of no use any more: this apply lists the table itself.
        self.at_start = None;
        match self.apply_removing_leftovers() {
            Ok(_) => Ok(Reloaded::Applied),
            Err(e) => {
                // The transaction changed nothing (or, if only the read-back after it failed,
                // the next reconcile sees the difference and brings back the saved state).
                self.desired.workload = saved.workload;
                self.desired.monit = saved.monit;
                self.workload_refused = saved.refused;
                self.last_script = saved.last_script;
                let counters = (self.state.repairs, self.state.readback_error.take());
                self.state = saved.state;
                self.state.repairs = counters.0;
                self.state.readback_error = counters.1;
                self.write_state();
                Err(ReloadError::Apply(e))
            }
        }
    }

    /// Applies the desired state, removing in the same transaction the objects of policies
    /// that are switched off but still in the live table. Returns whether nft ran.
    fn apply_removing_leftovers(&mut self) -> Result<bool, FirewallError> {
        let listing = {
            let _lock = self.lock()?;
            self.table.list_table_text()
        };
        let listing = self.note_listing(listing)?;
        let script = render_ruleset(&self.desired);
        let text = listing
            .as_deref()
            .map(|l| render_ruleset_removing(&self.desired, Leftovers::in_listing(l)))
            .filter(|t| *t != script);
        if text.is_none() && self.last_script.as_deref() == Some(script.as_str()) {
            return Ok(false);
        }
        self.apply_script(script, text).map(|()| true)
    }
}

/// What a failed reload puts back.
struct Saved {
    workload: platform::firewall::policy::WorkloadPolicy,
    monit: MonitPolicy,
    refused: bool,
    last_script: Option<String>,
    state: platform::firewall::state::RuntimeState,
}
