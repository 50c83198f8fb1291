//! What the crash and atomicity tests share: the agent's table as a comparable snapshot
//! (kernel handles and counters left out), the pids of a cgroup subtree, and a small seeded
//! random source (printed, so a failing run can be replayed).

use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::{CgroupDir, Result, Sandbox, wait_for};

/// `table inet bosh_agent` as a value two listings of the same rules compare equal on: the
/// JSON listing without `handle`s and with every counter zeroed. `None` when there is no
/// table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSnapshot {
    /// Everything but the rules of `monit_access_jobs`.
    pub rest: Value,
    /// The comments of the rules of `monit_access_jobs`, sorted.
    pub jobs: Vec<String>,
}

impl Sandbox {
    /// The agent's table now, as a [`TableSnapshot`] (`None`: no table).
    pub fn table_snapshot(&self) -> Result<Option<TableSnapshot>> {
        let Some(listing) = self.nft_json(&["table", "inet", "bosh_agent"])? else {
            return Ok(None);
        };
        let mut rest = Vec::new();
        let mut jobs = Vec::new();
        for mut obj in listing["nftables"].as_array().cloned().unwrap_or_default() {
            if obj.get("metainfo").is_some() {
                continue;
            }
            if let Some(r) = obj.get("rule")
                && r["chain"] == "monit_access_jobs"
            {
                jobs.push(r["comment"].as_str().unwrap_or_default().to_string());
                continue;
            }
            scrub(&mut obj);
            rest.push(obj);
        }
        jobs.sort();
        Ok(Some(TableSnapshot {
            rest: Value::Array(rest),
            jobs,
        }))
    }
}

fn scrub(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("handle");
            for (k, x) in m.iter_mut() {
                if k == "counter" && x.is_object() {
                    *x = serde_json::json!({"packets": 0, "bytes": 0});
                } else {
                    scrub(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// Every pid in `cg` and the cgroups below it.
pub fn subtree_pids(cg: &CgroupDir) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![cg.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(t) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(t.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// Waits until no process is left in `cg`'s subtree (an nft a killed agent had started
/// finishes on its own: the table is read only after it).
pub fn wait_subtree_empty(cg: &CgroupDir, limit: Duration) -> Result<()> {
    wait_for(
        &format!("{} to be empty", cg.path().display()),
        limit,
        || Ok(subtree_pids(cg).is_empty().then_some(())),
    )
}

/// A xorshift generator: reproducible kill points from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From `seed` (0 is replaced: xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// From the environment variable `var` if set, else from the clock; the seed is printed.
    pub fn from_env(var: &str) -> Self {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("random seed {seed} (replay with {var}={seed})");
        Rng::new(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A duration in `[0, max]`, microsecond steps.
    pub fn below(&mut self, max: Duration) -> Duration {
        let us = max.as_micros().max(1) as u64;
        Duration::from_micros(self.next_u64() % (us + 1))
    }
}

/// A knob: the environment variable `var` as a number, or `default`.
pub fn knob(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
