//! The firewall state machine: establish identity once, apply the desired state in one
//! transaction, keep the live table as desired (repair drift, prune stale job rules), and
//! record what it did (the runtime state file for the one-shot commands, the typed health for
//! heartbeats, `get_state` and alerts). It talks to the kernel only through [`KernelTable`],
//! so it runs over the in-memory [`platform::firewall::table::FakeTable`] in unit tests. Its
//! calls block (nft, the lock): the firewall task runs them off the async runtime.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use platform::cgroup::{self, CgroupPlacement, Layout};
use platform::firewall::nft::{FirewallLock, LockWait, Nft};
use platform::firewall::policy::{
    AlertListenerPolicy, EgressPolicy, IngressPolicy, Proto, RequiredInbound, WorkloadPolicy,
    check_lockout, sshd_ports,
};
use platform::firewall::render::{
    Leftovers, render_ruleset, render_ruleset_fresh, render_ruleset_removing,
};
use platform::firewall::state::{self, Mode, MonitState, NatsState, RuntimeState};
use platform::firewall::status::{self, BridgePaths};
use platform::firewall::table::KernelTable;
use platform::firewall::{
    DesiredState, FirewallError, Identity, MONIT_ENDPOINTS, MonitPolicy, NatsPolicy, TABLE, jobs,
    netlink, readback, selftest,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::health::Health;
use crate::config::LinuxOptions;

/// Owns the table `inet bosh_agent` for the agent's lifetime.
pub struct Firewall<T: KernelTable = Nft> {
    table: T,
    run_dir: PathBuf,
    lock_wait: LockWait,
    /// Where the health is published after every change of the state.
    health: watch::Sender<Health>,
    desired: DesiredState,
    /// The idempotent script of the state the live table was last brought to: equal state
    /// renders byte-identical scripts, so an equal script means there is nothing to do.
    last_script: Option<String>,
    /// Endpoints were added on the fast path and stale ones still need removing.
    pending_rebuild: bool,
    /// The live table has changed since the last read-back (taken off the start-up path).
    readback_due: bool,
    /// What was known at start, consumed by the first apply.
    at_start: Option<AtStart>,
    state: RuntimeState,
    /// The uid the documented uid fallback of job rules matches (the `vcap` user's), if any.
    vcap_uid: Option<u32>,
    /// The workload policies of agent.json were refused: the live ones are never removed.
    workload_refused: bool,
    /// Deletes `firewall-allow metadata` rules whose cgroup is gone (real nft only).
    prune_metadata: Option<PruneMetadata>,
    /// Where nft resolves `EgressAllowCgroups` paths (`"unified"` on a hybrid layout), for
    /// a reload to build the policies exactly as the start did.
    nft_prefix: String,
    /// The checks against the running system a reloaded policy passes before its commit, as
    /// at start (real nft only; see [`WorkloadCheck`]).
    workload_check: Option<WorkloadCheck>,
}

/// Checks a workload policy against the running system before its commit: `Err` refuses it
/// (with the value that failed), `Ok` carries the bridge netfilter problem, if any.
pub type WorkloadCheck = fn(&WorkloadPolicy) -> Result<Option<String>, String>;

#[path = "reload.rs"]
mod reload;
pub use reload::{ReloadError, Reloaded};

/// Deletes stale `firewall-allow metadata` rules under the lock in a run directory.
type PruneMetadata = fn(&Path) -> Result<usize, FirewallError>;

/// Why the alert listener's guard matches monit by uid 0: the firewall is installed before
/// monit starts, so monit's cgroup cannot be known then.
pub const MONIT_UNKNOWN: &str =
    "monit's cgroup cannot be known before monit starts; monit runs as root";

/// Where sshd's configuration is read for the ports the ingress allow-list must keep open.
pub const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";

/// Builds the workload policies of agent.json for an agent established as `est`: pure.
/// `EgressAllowCgroups` paths are as in `/proc/<pid>/cgroup` (relative to the cgroup2 root);
/// nft resolves them under `nft_prefix` (`"unified"` on a hybrid layout, where cgroup2 is
/// mounted below `/sys/fs/cgroup`), and their rule level is their depth in the cgroup2
/// hierarchy plus the agent's level offset, as for job rules. The
/// alert listener's guard matches monit by uid 0 ([`MONIT_UNKNOWN`]). The error names the
/// key and the value.
pub fn build_workload(
    opts: &LinuxOptions,
    est: &selftest::Established,
    nft_prefix: &str,
) -> Result<WorkloadPolicy, String> {
    let uid_mode = matches!(est.identity, Identity::Uid { .. });
    let offset = est.level_offset;
    let mut cgroup_identity = |path: &str| -> Result<Identity, String> {
        if uid_mode {
            return Err(
                "cgroup matching is unavailable here (the agent uses the uid fallback)".into(),
            );
        }
        let visible = cgroup::NftCgroupPath::new(path).map_err(|e| e.to_string())?;
        let depth = cgroup::depth(visible.as_str());
        let nft_path = if nft_prefix.is_empty() || depth == 0 {
            visible
        } else {
            cgroup::NftCgroupPath::new(&format!("{nft_prefix}/{visible}"))
                .map_err(|e| e.to_string())?
        };
        if depth == 0 {
            return Err("the root cgroup: allowing it would allow every process".into());
        }
        let level = u32::try_from(i64::from(depth) + offset)
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| format!("level offset {offset} does not fit its depth {depth}"))?;
        Ok(Identity::Cgroup {
            path: nft_path,
            level,
        })
    };
    opts.firewall
        .policies
        .build(
            &mut cgroup_identity,
            Identity::Uid {
                uid: 0,
                reason: MONIT_UNKNOWN.into(),
            },
        )
        .map_err(|e| e.to_string())
}

/// Checks a policy before its first commit, against the running system: the kernel has
/// what the rules need, and an ingress allow-list keeps every port sshd listens on (from
/// `sshd_config`, when it exists). An error refuses the policy.
pub fn check_workload(nft: &Nft, w: &WorkloadPolicy, sshd_config: &Path) -> Result<(), String> {
    if *w == WorkloadPolicy::default() {
        return Ok(());
    }
    status::check_kernel(nft)
        .map_err(|e| format!("the kernel lacks what the workload rules need: {e}"))?;
    check_allowed_cgroups(w, |p| p.fs_path().is_dir())?;
    if let IngressPolicy::Enabled(ing) = &w.ingress {
        let required: Vec<RequiredInbound> = match std::fs::read_to_string(sshd_config) {
            Ok(text) => sshd_ports(&text)
                .into_iter()
                .map(|port| RequiredInbound {
                    what: format!("sshd (from {})", sshd_config.display()),
                    proto: Proto::Tcp,
                    port,
                })
                .collect(),
            // No sshd configuration: no sshd to keep reachable.
            Err(_) => Vec::new(),
        };
        check_lockout(&ing.sets, &required)?;
    }
    Ok(())
}

/// Every `EgressAllowCgroups` cgroup must exist (`exists`) when the rules are committed: nft
/// resolves a `socket cgroupv2` path at load time and refuses the whole transaction, monit and
/// NATS rules included, when one is missing. Refusing the workload policies here instead
/// keeps those protections and names the path.
pub fn check_allowed_cgroups(
    w: &WorkloadPolicy,
    exists: impl Fn(&cgroup::NftCgroupPath) -> bool,
) -> Result<(), String> {
    let EgressPolicy::Enabled(e) = &w.egress else {
        return Ok(());
    };
    for id in &e.allowed {
        if let Identity::Cgroup { path, .. } = id
            && !exists(path)
        {
            return Err(format!(
                "EgressAllowCgroups: the cgroup '{path}' does not exist ({}); nft can match only a cgroup that exists when the rules are committed",
                path.fs_path().display()
            ));
        }
    }
    Ok(())
}

/// Makes bridged traffic meet the egress rules when there is a deny list; the error (bridges
/// whose switched traffic bypasses the list) is reported as a degraded firewall.
pub fn check_bridges(w: &WorkloadPolicy, paths: &BridgePaths) -> Option<String> {
    if !matches!(w.egress, EgressPolicy::Enabled(_)) {
        return None;
    }
    match status::ensure_bridge_netfilter(paths) {
        Ok(b) => {
            info!(bridge_netfilter = ?b, "bridged traffic meets the egress deny list");
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

/// What the workload policies came to before the first apply.
pub struct WorkloadPlan {
    /// The policies, or why they were refused.
    pub policy: Result<WorkloadPolicy, String>,
    /// Bridge netfilter could not be turned on.
    pub bridge_error: Option<String>,
}

/// The live table as listed at start (beside the self-test) and the previous run's state.
struct AtStart {
    live: Result<Option<String>, FirewallError>,
    previous: Option<RuntimeState>,
}

/// The outcome of a reconcile pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconciled {
    pub repaired: bool,
    pub pruned: usize,
}

impl Firewall<Nft> {
    /// Establishes the agent's identity (cgroup, proved by a self-test, or the uid fallback
    /// with its reason) and builds the desired state from agent.json. Lists the live table
    /// while the self-test runs, for the first [`Firewall::apply`]. Applies nothing.
    ///
    /// NATS endpoints that the previous run of this boot protected (its state file in the run
    /// directory, a tmpfs) stay desired until the first resolution replaces them: a restart
    /// never opens them, and an unchanged table needs no transaction at all.
    pub fn establish(opts: &LinuxOptions, nft: Nft, run_dir: PathBuf) -> Self {
        let placement = cgroup::placement_of(std::process::id());
        let (est, live) = std::thread::scope(|scope| {
            // A missing table (a first boot) needs no listing: netlink says so in microseconds.
            let lister = scope.spawn(|| match netlink::table_exists(TABLE) {
                Ok(false) => Ok(None),
                _ => nft.list_table_text(),
            });
            let est = selftest::establish(&nft, &placement);
            let live = lister.join().unwrap_or_else(|_| {
                Err(FirewallError::Parse {
                    context: "list at start".into(),
                    detail: "listing thread panicked".into(),
                })
            });
            (est, live)
        });
        let nft_prefix = placement
            .as_ref()
            .ok()
            .and_then(|p| p.layout.nft_prefix())
            .unwrap_or("");
        let policy = build_workload(opts, &est, nft_prefix)
            .and_then(|w| check_workload(&nft, &w, Path::new(SSHD_CONFIG)).map(|()| w));
        let bridge_error = policy
            .as_ref()
            .ok()
            .and_then(|w| check_bridges(w, &BridgePaths::system()));
        let plan = WorkloadPlan {
            policy,
            bridge_error,
        };
        let mut fw = Firewall::from_established(opts, nft, run_dir, &placement, est, live, plan);
        fw.prune_metadata = Some(|dir| jobs::prune_metadata_rules(&Nft::default(), dir));
        fw.nft_prefix = nft_prefix.to_string();
        fw.workload_check = Some(|w| {
            check_workload(&Nft::default(), w, Path::new(SSHD_CONFIG))?;
            Ok(check_bridges(w, &BridgePaths::system()))
        });
        fw
    }
}

impl<T: KernelTable> Firewall<T> {
    /// [`Firewall::establish`] with the identity already established and the live table
    /// listed from `table` (tests: over a [`platform::firewall::table::FakeTable`]).
    pub fn with_identity(
        opts: &LinuxOptions,
        table: T,
        run_dir: PathBuf,
        est: selftest::Established,
    ) -> Self {
        let live = match table.table_exists() {
            Ok(false) => Ok(None),
            _ => table.list_table_text(),
        };
        let placement = Err(cgroup::CgroupError::NoCgroup2(Layout::None));
        let plan = WorkloadPlan {
            policy: build_workload(opts, &est, ""),
            bridge_error: None,
        };
        Firewall::from_established(opts, table, run_dir, &placement, est, live, plan)
    }

    fn from_established(
        opts: &LinuxOptions,
        table: T,
        run_dir: PathBuf,
        placement: &Result<CgroupPlacement, cgroup::CgroupError>,
        est: selftest::Established,
        live: Result<Option<String>, FirewallError>,
        plan: WorkloadPlan,
    ) -> Self {
        match &est.identity {
            Identity::Cgroup { path, level } => {
                info!(%path, level, "cgroup matching proved by self-test")
            }
            Identity::Uid { reason, .. } => {
                warn!(%reason, "cgroup matching unavailable; falling back to uid 0 matching")
            }
        }
        let previous = match state::read(&run_dir) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "ignoring the previous run's firewall state");
                None
            }
        };
        let monit = if opts.use_monit_iptables_firewall {
            info!("UseMonitIptablesFirewall is set: the monit chain is skipped");
            MonitPolicy::Disabled
        } else {
            MonitPolicy::Enabled {
                allow_root: opts.firewall.monit_allow_root,
            }
        };
        let nats = if opts.enable_nats_firewall {
            NatsPolicy::Enabled {
                endpoints: previous
                    .as_ref()
                    .filter(|p| {
                        live.as_ref().is_ok_and(Option::is_some) && p.nats == NatsState::Enabled
                    })
                    .map(|p| {
                        p.nats_endpoints
                            .iter()
                            .filter_map(|e| e.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        } else {
            NatsPolicy::Disabled
        };
        let mut state = initial_state(placement, &est, monit, &nats);
        let (workload, workload_refused) = match plan.policy {
            Ok(w) => (w, None),
            Err(e) => {
                error!(error = %e, "the workload firewall policies are refused; the live ones stay as they are");
                (WorkloadPolicy::default(), Some(e))
            }
        };
        if let Some(e) = &plan.bridge_error {
            error!(error = %e, "bridged traffic bypasses the egress deny list");
        }
        state.workload = workload_summary(&workload);
        state.workload_notes = workload_notes(&est.identity, &workload);
        state.workload_refused.clone_from(&workload_refused);
        state.bridge_error = plan.bridge_error;
        let (health, _) = watch::channel(Health::of(&state));
        Firewall {
            table,
            run_dir,
            lock_wait: LockWait::default(),
            health,
            desired: DesiredState {
                workload,
                identity: est.identity,
                monit,
                nats,
            },
            last_script: None,
            pending_rebuild: false,
            readback_due: false,
            at_start: Some(AtStart { live, previous }),
            state,
            vcap_uid: vcap_uid(),
            workload_refused: workload_refused.is_some(),
            prune_metadata: None,
            nft_prefix: String::new(),
            workload_check: None,
        }
    }

    /// Replaces the checks a reloaded policy passes before its commit (tests: over the
    /// in-memory table, where the real ones cannot run).
    pub fn set_workload_check(&mut self, check: Option<WorkloadCheck>) {
        self.workload_check = check;
    }

    /// How long the firewall lock is waited for (and how often the wait is logged).
    pub fn set_lock_wait(&mut self, wait: LockWait) {
        self.lock_wait = wait;
    }

    /// The health, as it changes: published after every change of the state.
    pub fn watch_health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// What the state file says (and `firewall status` shows).
    pub fn state(&self) -> &RuntimeState {
        &self.state
    }

    /// The table the state machine drives.
    pub fn table(&self) -> &T {
        &self.table
    }

    fn lock(&self) -> Result<FirewallLock, FirewallError> {
        FirewallLock::acquire_within(&self.run_dir, self.lock_wait)
    }

    /// The desired state.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The fast path before a connection attempt: makes `endpoints` protected now by adding
    /// the missing ones in one transaction (no deletion, so no kernel wait), and records them
    /// as desired. Returns whether follow-up work is due ([`Firewall::after_dial`]): removing
    /// endpoints no longer resolved, or reading the table back. At no instant is a resolved
    /// endpoint unprotected.
    pub fn protect_nats_endpoints(
        &mut self,
        endpoints: BTreeSet<SocketAddr>,
    ) -> Result<bool, FirewallError> {
        let NatsPolicy::Enabled { endpoints: cur } = &mut self.desired.nats else {
            return Ok(false);
        };
        if *cur == endpoints && !self.pending_rebuild && self.last_script.is_some() {
            return Ok(false);
        }
        let added: Vec<SocketAddr> = endpoints.difference(cur).copied().collect();
        let removed = cur.difference(&endpoints).next().is_some();
        *cur = endpoints;
        if self.last_script.is_none() {
            // Nothing applied yet (or the last apply failed): the chains may not exist.
            self.apply()?;
            return Ok(self.readback_due);
        }
        if !added.is_empty() {
            let res = self
                .lock()
                .and_then(|_lock| self.table.add_endpoints(&added));
            if let Err(e) = res {
                warn!(error = %e, "adding NATS endpoints failed; rebuilding the whole table");
                self.last_script = None;
                self.apply()?;
                return Ok(self.readback_due);
            }
        }
        if removed || self.pending_rebuild {
            self.pending_rebuild = true;
        } else {
            // Only additions: the live table now is exactly the desired state.
            self.applied(render_ruleset(&self.desired), None);
            self.write_state();
        }
        Ok(true)
    }

    /// Whether endpoints no longer resolved are still in the sets (the exact rebuild is due).
    pub fn rebuild_pending(&self) -> bool {
        self.pending_rebuild
    }

    /// The work [`Firewall::protect_nats_endpoints`] left for after the dial: the exact
    /// rebuild (stale endpoints removed) or the read-back of the last change.
    pub fn after_dial(&mut self) -> Result<(), FirewallError> {
        if self.pending_rebuild {
            self.apply().map(|_| ())
        } else {
            self.read_back_if_due()
        }
    }

    /// Applies the desired state as one transaction unless the same script was already
    /// applied. Returns whether nft ran. On failure the live table is unchanged (the
    /// transaction is all or nothing) and the error is recorded for `firewall status`.
    ///
    /// The first apply uses what was listed at start: a missing table is created without any
    /// deletion, and a table that already is the desired state (an agent restarted with the
    /// same configuration) is left as it is. Both leave the read-back for
    /// [`Firewall::read_back_if_due`], off the start-up path.
    pub fn apply(&mut self) -> Result<bool, FirewallError> {
        let script = render_ruleset(&self.desired);
        if let Some(start) = self.at_start.take() {
            match start.live {
                Ok(None) => {
                    let fresh = render_ruleset_fresh(&self.desired);
                    let res = self.lock().and_then(|_lock| self.table.apply(&fresh));
                    match res {
                        Ok(()) => {
                            self.applied(script, None);
                            self.write_state();
                            return Ok(true);
                        }
                        // E.g. the table appeared since the listing: the idempotent script
                        // below works whatever exists.
                        Err(e) => {
                            info!(error = %e, "creating the table failed; applying the full script")
                        }
                    }
                }
                Ok(Some(live)) => {
                    if let Some(prev) = start.previous.filter(|p| {
                        p.script == script && !p.snapshot.is_null() && !p.readback_pending
                    }) && readback::snapshot(&live) == prev.snapshot
                    {
                        info!("the live table already is the desired state; nothing to apply");
                        self.applied(script, Some(prev.snapshot));
                        // Nothing was applied now: the live state dates from the previous run.
                        self.state.applied_at = prev.applied_at;
                        self.write_state();
                        return Ok(false);
                    }
                    // Policies switched off in agent.json still have objects live: this apply
                    // removes them (never while the policies were refused: those stay).
                    if !self.workload_refused {
                        let removing =
                            render_ruleset_removing(&self.desired, Leftovers::in_listing(&live));
                        if removing != script {
                            info!("removing workload policies no longer configured");
                            return self.apply_script(script, Some(removing)).map(|()| true);
                        }
                    }
                }
                Err(e) => info!(error = %e, "listing the table at start failed"),
            }
        }
        if self.last_script.as_deref() == Some(script.as_str()) {
            return Ok(false);
        }
        self.apply_script(script, None).map(|()| true)
    }

    /// Records that the live table was brought to `script`'s state, with its read-back
    /// (`snapshot`) or with the read-back still due (`None`).
    fn applied(&mut self, script: String, snapshot: Option<serde_json::Value>) {
        self.pending_rebuild = false;
        self.readback_due = snapshot.is_none();
        self.state.readback_pending = self.readback_due;
        if let Some(s) = snapshot {
            self.state.snapshot = s;
        }
        self.state.protected = protected(&self.desired);
        self.state.nats_endpoints = nats_endpoints(&self.desired);
        self.state.applied_at = now();
        self.state.last_error = None;
        self.state.script.clone_from(&script);
        self.last_script = Some(script);
    }

    /// Takes the read-back of the last change if it is still due.
    pub fn read_back_if_due(&mut self) -> Result<(), FirewallError> {
        if !self.readback_due {
            return Ok(());
        }
        let listing = {
            let _lock = self.lock()?;
            self.table.list_table_text()
        };
        let listing = self.note_listing(listing)?;
        self.readback_due = false;
        self.state.readback_pending = false;
        let snapshot = listing.map_or(serde_json::Value::Null, |l| readback::snapshot(&l));
        // Taken a while after the apply: only trusted as the drift reference if it is what
        // the apply made; a change in between is repaired, not adopted. (Not with refused
        // workload policies: their live objects are kept, so the listing cannot conform.)
        if let Err(why) = readback::conforms(&snapshot, &self.desired)
            && !self.workload_refused
        {
            warn!(%why, "the table changed before it was read back; repairing");
            // Counted before the apply, which publishes the state: readers never see the
            // repaired table without its repair.
            self.state.repairs += 1;
            self.last_script = None;
            // The apply writes the state, with its own read-back.
            return self.apply().map(|_| ());
        }
        self.state.snapshot = snapshot;
        self.write_state();
        Ok(())
    }

    /// Applies `text` (the idempotent `script` itself, or a script that also removes
    /// leftovers and brings the table to `script`'s state) and records `script`.
    fn apply_script(&mut self, script: String, text: Option<String>) -> Result<(), FirewallError> {
        let desired = &self.desired;
        let refused = self.workload_refused;
        let mut repaired = false;
        let res = (|| -> Result<serde_json::Value, FirewallError> {
            let _lock = self.lock()?;
            self.table.apply(text.as_deref().unwrap_or(&script))?;
            let snapshot =
                |l: Option<String>| l.map_or(serde_json::Value::Null, |l| readback::snapshot(&l));
            let first = snapshot(self.table.list_table_text()?);
            if refused {
                // The live workload objects the refused desired state does not render are
                // kept on purpose: the listing cannot conform, and is the reference as it is.
                return Ok(first);
            }
            // The reference for drift must be what this apply made: a change slipped in
            // between the apply and the listing is undone once (bounded: no loop), not adopted.
            match readback::conforms(&first, desired) {
                Ok(()) => Ok(first),
                Err(why) => {
                    warn!(%why, "the table changed right after the apply; applying again");
                    repaired = true;
                    self.table.apply(&script)?;
                    Ok(snapshot(self.table.list_table_text()?))
                }
            }
        })();
        if repaired {
            self.state.repairs += 1;
        }
        match res {
            Ok(snapshot) => {
                self.applied(script, Some(snapshot));
                self.write_state();
                Ok(())
            }
            Err(e) => {
                self.state.last_error = Some(e.to_string());
                self.last_script = None;
                self.write_state();
                Err(e)
            }
        }
    }

    /// Compares the live table with the last apply; re-applies on drift (including a deleted
    /// table) and prunes job rules whose cgroup is gone.
    pub fn reconcile(&mut self) -> Result<Reconciled, FirewallError> {
        let mut out = Reconciled::default();
        self.read_back_if_due()?;
        let listing = self.table.list_table_text();
        let live = self.note_listing(listing)?.map(|l| readback::snapshot(&l));
        if self.pending_rebuild {
            // The fast path added endpoints; the exact rebuild is due, not a repair.
            self.apply()?;
        } else if self.last_script.is_none() || live.as_ref() != Some(&self.state.snapshot) {
            warn!(
                table_present = live.is_some(),
                "live firewall differs from the desired state; repairing"
            );
            self.state.repairs += 1;
            self.last_script = None;
            self.apply()?;
            out.repaired = true;
        }
        if matches!(self.desired.monit, MonitPolicy::Enabled { .. }) {
            let had_foreign = !self.state.foreign_job_rules.is_empty();
            let jobs = jobs::reconcile_jobs_chain(
                &self.table,
                &self.run_dir,
                self.lock_wait,
                self.vcap_uid,
            )?;
            out.pruned = jobs.pruned;
            if out.pruned > 0 {
                info!(count = out.pruned, "pruned job rules whose cgroup is gone");
                self.state.pruned += out.pruned as u64;
            }
            if let Some(e) = jobs.failed {
                for f in &jobs.foreign {
                    error!(rule = %f, "monit_access_jobs holds a rule that is not a job rule; removing it failed");
                }
                self.state.foreign_job_rules = jobs.foreign;
                self.write_state();
                return Err(e);
            }
            if !jobs.foreign.is_empty() {
                for f in &jobs.foreign {
                    warn!(rule = %f, "removed a rule of monit_access_jobs that is not a job rule");
                }
                self.state.repairs += 1;
                self.state.foreign_removed += jobs.foreign.len() as u64;
                out.repaired = true;
            }
            self.state.foreign_job_rules.clear();
            if had_foreign {
                self.write_state();
            }
        }
        if let (Some(prune), EgressPolicy::Enabled(_)) =
            (self.prune_metadata, &self.desired.workload.egress)
        {
            let n = prune(&self.run_dir)?;
            if n > 0 {
                info!(count = n, "pruned metadata job rules whose cgroup is gone");
                self.state.pruned += n as u64;
                out.pruned += n;
            }
        }
        if out != Reconciled::default() {
            self.write_state();
        }
        Ok(out)
    }

    /// Records whether listing the live table worked (`readback_error`, published with the
    /// health when it changes), and passes the listing on.
    fn note_listing(
        &mut self,
        listing: Result<Option<String>, FirewallError>,
    ) -> Result<Option<String>, FirewallError> {
        let error = listing.as_ref().err().map(ToString::to_string);
        if self.state.readback_error != error {
            self.state.readback_error = error;
            self.write_state();
        }
        listing
    }

    /// Records the bus's counters (attempts, hook failures, last errors) for `firewall status`.
    pub fn set_bus_stats(&mut self, stats: Option<serde_json::Value>) {
        if self.state.nats_bus != stats {
            self.state.nats_bus = stats;
            self.write_state();
        }
    }

    /// Writes the state file and publishes the health.
    pub fn write_state(&self) {
        if let Err(e) = state::write(&self.run_dir, &self.state) {
            warn!(error = %e, "cannot write the firewall state file");
        }
        let health = Health::of(&self.state);
        self.health.send_if_modified(|h| {
            if *h == health {
                false
            } else {
                *h = health;
                true
            }
        });
    }
}

/// The `vcap` user's uid: the only uid a job rule may match (upstream's uid fallback).
pub fn vcap_uid() -> Option<u32> {
    nix::unistd::User::from_name("vcap")
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// The workload policies as `firewall status` shows them: their settings and sizes (a deny
/// list of 10,000 ranges is counted, not listed). Null when none is configured.
pub fn workload_summary(w: &WorkloadPolicy) -> Value {
    if *w == WorkloadPolicy::default() {
        return Value::Null;
    }
    let egress = match &w.egress {
        EgressPolicy::Disabled => json!({ "state": "disabled" }),
        EgressPolicy::Enabled(e) => json!({
            "state": "enabled",
            "action": e.action,
            "deny_ranges_v4": e.sets.deny[0].len(),
            "deny_ranges_v6": e.sets.deny[1].len(),
            "except_entries": e.sets.except[0].len() + e.sets.except[1].len(),
            "tracking": e.tracking,
            // /16 buckets of the prefilter per family; null where the list is too wide for one.
            "prefilter_buckets_v4": e.sets.prefilter[0].as_ref().map(Vec::len),
            "prefilter_buckets_v6": e.sets.prefilter[1].as_ref().map(Vec::len),
            "allowed": e.allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
    };
    let ingress = match &w.ingress {
        IngressPolicy::Disabled => json!({ "state": "disabled" }),
        IngressPolicy::Enabled(i) => json!({
            "state": "enabled",
            "any_source_ports": i.sets.any_source.iter().map(|(p, r)| format!("{p}/{r}")).collect::<Vec<_>>(),
            "by_source_entries": i.sets.by_source[0].len() + i.sets.by_source[1].len(),
            "allow_icmp": i.allow_icmp,
            "ct_invalid": i.ct_invalid,
        }),
    };
    let alerts = match &w.alert_listener {
        AlertListenerPolicy::Open => json!({ "state": "open" }),
        AlertListenerPolicy::Guarded { monit } => {
            json!({ "state": "guarded", "monit": monit.to_string() })
        }
    };
    json!({
        "egress": egress,
        "ingress": ingress,
        "localhost_guard": w.localhost_guard,
        "alert_listener": alerts,
    })
}

/// Where the policies match more than asked, one line each (shown by `firewall status` and
/// in the heartbeat's health).
pub fn workload_notes(agent: &Identity, w: &WorkloadPolicy) -> Vec<String> {
    let mut notes = Vec::new();
    let egress = matches!(w.egress, EgressPolicy::Enabled(_));
    let guarded = matches!(w.alert_listener, AlertListenerPolicy::Guarded { .. });
    if let Identity::Uid { uid, reason } = agent
        && (egress || guarded)
    {
        notes.push(format!(
            "the agent is matched by uid {uid} ({reason}): every process of that uid passes the egress deny list and reaches the alert listener"
        ));
    }
    if let AlertListenerPolicy::Guarded {
        monit: Identity::Uid { uid, reason },
    } = &w.alert_listener
    {
        notes.push(format!(
            "monit is matched by uid {uid} at the alert listener ({reason}): every process of that uid reaches it"
        ));
    }
    notes
}

fn protected(d: &DesiredState) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    if matches!(d.monit, MonitPolicy::Enabled { .. }) {
        v.extend(MONIT_ENDPOINTS.iter().map(ToString::to_string));
    }
    if let NatsPolicy::Enabled { endpoints } = &d.nats {
        v.extend(endpoints.iter().map(ToString::to_string));
    }
    v
}

fn nats_endpoints(d: &DesiredState) -> Vec<String> {
    match &d.nats {
        NatsPolicy::Enabled { endpoints } => endpoints.iter().map(ToString::to_string).collect(),
        NatsPolicy::Disabled => Vec::new(),
    }
}

fn initial_state(
    placement: &Result<CgroupPlacement, cgroup::CgroupError>,
    est: &selftest::Established,
    monit: MonitPolicy,
    nats: &NatsPolicy,
) -> RuntimeState {
    let (mode, reason, path, level) = match &est.identity {
        Identity::Cgroup { path, level } => {
            (Mode::Cgroup, None, Some(path.to_string()), Some(*level))
        }
        Identity::Uid { reason, .. } => (Mode::Uid, Some(reason.clone()), None, None),
    };
    let (layout, namespaced) = match placement {
        Ok(p) => (p.layout, p.namespaced),
        Err(_) => (cgroup::detect_layout(), false),
    };
    RuntimeState {
        mode,
        identity: est.identity.to_string(),
        fallback_reason: reason,
        cgroup_path: path,
        level,
        level_offset: est.level_offset,
        layout: layout_name(layout).into(),
        namespaced,
        monit: MonitState::of(monit),
        nats: match nats {
            NatsPolicy::Disabled => NatsState::Disabled,
            NatsPolicy::Enabled { .. } => NatsState::Enabled,
        },
        agent_pid: std::process::id(),
        ..RuntimeState::default()
    }
}

fn layout_name(l: Layout) -> &'static str {
    match l {
        Layout::Unified => "unified",
        Layout::Hybrid => "hybrid",
        Layout::V1Only => "v1",
        Layout::None => "none",
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
