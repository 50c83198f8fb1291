//! Reading the agent's table in a sandbox: `nft` in the namespace, JSON listings, the job
//! rules of `monit_access_jobs` and rule counters.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::process::Output;

use serde_json::Value;
use testkit::io_ctx;

use crate::{COMMAND_TIMEOUT, CgroupDir, Error, Result, Sandbox, describe, err};

/// A rule of `monit_access_jobs`, as listed by nft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRule {
    /// Kernel handle.
    pub handle: u64,
    /// The comment (`bosh-monit-access:<key> cgid=<inode>`).
    pub comment: String,
    /// `<key>` of the comment: the cgroup path relative to /sys/fs/cgroup for plain cgroups.
    pub key: Option<String>,
    /// The cgroup inode recorded in the comment.
    pub cgid: Option<u64>,
}

impl Sandbox {
    /// Runs `nft <args>` in the namespace.
    pub fn nft<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv: Vec<OsString> = vec!["nft".into()];
        argv.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self.exec(argv).output(COMMAND_TIMEOUT)
    }

    /// Applies an nft script (one transaction) in the namespace; fails with nft's message.
    pub fn nft_script(&self, script: &str) -> Result<()> {
        let path = self.log_path("script").with_extension("nft");
        fs::write(&path, script).map_err(io_ctx(format!("writing {}", path.display())))?;
        let out = self.nft([OsStr::new("-f"), path.as_os_str()])?;
        if !out.status.success() {
            return err(format!(
                "nft -f failed: {}\nscript:\n{script}",
                describe(&out)
            ));
        }
        Ok(())
    }

    /// `nft -j list <what>`, or `None` when the object does not exist.
    pub fn nft_json(&self, what: &[&str]) -> Result<Option<Value>> {
        let mut args = vec!["-j", "list"];
        args.extend_from_slice(what);
        let out = self.nft(&args)?;
        if !out.status.success() {
            if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
                return Ok(None);
            }
            return err(format!("nft {}: {}", args.join(" "), describe(&out)));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| Error(format!("nft {} printed invalid JSON: {e}", args.join(" "))))
    }

    /// Whether `table inet bosh_agent` exists in the namespace.
    pub fn agent_table_present(&self) -> Result<bool> {
        Ok(self.nft_json(&["table", "inet", "bosh_agent"])?.is_some())
    }

    /// The rules of `monit_access_jobs`, in chain order (empty if the chain is absent).
    pub fn job_rules(&self) -> Result<Vec<JobRule>> {
        let Some(listing) = self.nft_json(&["chain", "inet", "bosh_agent", "monit_access_jobs"])?
        else {
            return Ok(Vec::new());
        };
        Ok(rules_of(&listing)
            .filter(|r| r["chain"] == "monit_access_jobs")
            .map(|r| {
                let comment = r["comment"].as_str().unwrap_or_default().to_string();
                let (key, cgid) = match comment.strip_prefix("bosh-monit-access:") {
                    Some(rest) => match rest.rsplit_once(" cgid=") {
                        Some((k, id)) => (Some(k.to_string()), id.parse().ok()),
                        None => (Some(rest.to_string()), None),
                    },
                    None => (None, None),
                };
                JobRule {
                    handle: r["handle"].as_u64().unwrap_or_default(),
                    comment,
                    key,
                    cgid,
                }
            })
            .collect())
    }

    /// The job rules whose key is `cg`'s path.
    pub fn job_rules_for(&self, cg: &CgroupDir) -> Result<Vec<JobRule>> {
        let key = cg.nft_path();
        Ok(self
            .job_rules()?
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .collect())
    }

    /// Packet counters of a chain's rules, keyed by rule comment (rules without a comment or
    /// a counter are left out).
    pub fn counters(&self, family: &str, table: &str, chain: &str) -> Result<Vec<(String, u64)>> {
        let listing = self
            .nft_json(&["chain", family, table, chain])?
            .ok_or_else(|| Error(format!("chain {family} {table} {chain} does not exist")))?;
        Ok(rules_of(&listing)
            .filter_map(|r| {
                let comment = r["comment"].as_str()?.to_string();
                let packets = r["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|e| e.get("counter")?.get("packets")?.as_u64())?;
                Some((comment, packets))
            })
            .collect())
    }
}

fn rules_of(listing: &Value) -> impl Iterator<Item = &Value> {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
}
