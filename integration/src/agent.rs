//! The agent process of a sandbox: its start command (agent.json, base directory, logs), its
//! readiness (the first firewall apply, read back), its state file and its one-shot commands.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::Duration;

use serde_json::Value;
use testkit::io_ctx;

use crate::sandbox::next_seq;
use crate::{
    COMMAND_TIMEOUT, CgroupDir, Error, Exec, Proc, READY_TIMEOUT, Result, Sandbox, describe, err,
    wait_for,
};

/// A running `bosh-agent` (its stderr log is printed if a test panics while it is alive).
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    run_dir: PathBuf,
}

impl Agent {
    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The agent's log (stderr).
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// The state file `firewall.json`, if present and readable.
    pub fn state(&self) -> Option<Value> {
        read_state(&self.run_dir)
    }

    /// Waits until this agent (by pid) has written its state file after a successful first
    /// apply; fails at once if the agent exits. Returns the state.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Value> {
        let pid = u64::from(self.pid());
        let run_dir = self.run_dir.clone();
        let proc = &mut self.proc;
        wait_for(
            "the agent's first firewall apply, read back (firewall.json)",
            timeout,
            || {
                if let Some(status) = proc.try_status()? {
                    return err(format!(
                        "the agent exited ({status}) before it was ready; log:\n{}",
                        proc.log_text()
                    ));
                }
                Ok(read_state(&run_dir).filter(|s| {
                    s["agent_pid"].as_u64() == Some(pid)
                        && s["applied_at"].as_u64().unwrap_or(0) > 0
                        && s["last_error"].is_null()
                        && s["readback_pending"] != true
                }))
            },
        )
        .map_err(|e| Error(format!("{e}\nagent log:\n{}", self.log())))
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc.terminate(Duration::from_secs(10))
    }

    /// Waits for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- agent {} log ----\n{}---- end of agent log ----",
                self.pid(),
                self.log()
            );
        }
    }
}

fn read_state(run_dir: &Path) -> Option<Value> {
    let bytes = fs::read(run_dir.join("firewall.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Sandbox {
    /// Writes `config` as a fresh agent.json in the sandbox directory and returns its path.
    pub fn write_agent_config(&self, config: &str) -> Result<PathBuf> {
        let n = next_seq();
        let conf = self.dir().join(format!("agent-{n}.json"));
        fs::write(&conf, config).map_err(io_ctx(format!("writing {}", conf.display())))?;
        Ok(conf)
    }

    /// The agent's start command (`bosh-agent -P ubuntu -C <conf> -b <dir>/base`) placed in
    /// `cg`, logging to `<conf>.log`; adjust it (e.g. [`Exec::cgroupns`]) before
    /// [`Sandbox::spawn_agent`].
    pub fn agent_exec_with(&self, cg: &CgroupDir, conf: &Path) -> Result<Exec> {
        let base = self.dir().join("base");
        fs::create_dir_all(&base).map_err(io_ctx("creating the base dir"))?;
        let args = [
            OsStr::new("-P"),
            OsStr::new("ubuntu"),
            OsStr::new("-C"),
            conf.as_os_str(),
            OsStr::new("-b"),
            base.as_os_str(),
        ];
        // Trusted certificates from update_settings go to the sandbox, and the system's
        // certificate store is never rebuilt by a test.
        let ca_dir = self.dir().join("ca-certificates");
        Ok(self
            .agent_cmd(args)
            .cgroup(cg)
            .log(&conf.with_extension("log"))
            .env("BOSH_AGENT_CA_CERTS_DIR", &ca_dir)
            .env("BOSH_AGENT_UPDATE_CA_CERTIFICATES", "/bin/true"))
    }

    /// [`Sandbox::write_agent_config`] then [`Sandbox::agent_exec_with`].
    pub fn agent_exec(&self, cg: &CgroupDir, config: &str) -> Result<Exec> {
        let conf = self.write_agent_config(config)?;
        self.agent_exec_with(cg, &conf)
    }

    /// Starts an agent from a prepared command without waiting for it.
    pub fn spawn_agent(&self, exec: &Exec) -> Result<Agent> {
        Ok(Agent {
            proc: exec.spawn()?,
            run_dir: self.run_dir.clone(),
        })
    }

    /// Starts the agent in `cg` with `config` as agent.json and waits until its firewall is
    /// installed.
    pub fn start_agent(&self, cg: &CgroupDir, config: &str) -> Result<Agent> {
        let mut a = self.spawn_agent(&self.agent_exec(cg, config)?)?;
        a.wait_ready(READY_TIMEOUT)?;
        Ok(a)
    }

    /// `bosh-agent firewall-allow monit`, run as root from cgroup `cg`.
    pub fn firewall_allow(&self, cg: &CgroupDir) -> Result<Output> {
        self.agent_cmd(["firewall-allow", "monit"])
            .cgroup(cg)
            .output(COMMAND_TIMEOUT)
    }

    /// `bosh-agent firewall status --json`: the exit code and the parsed JSON.
    pub fn status(&self) -> Result<(i32, Value)> {
        let out = self
            .agent_cmd(["firewall", "status", "--json"])
            .output(COMMAND_TIMEOUT)?;
        let v = serde_json::from_slice(&out.stdout).map_err(|e| {
            Error(format!(
                "firewall status --json printed no JSON ({e}): {}",
                describe(&out)
            ))
        })?;
        Ok((out.status.code().unwrap_or(-1), v))
    }
}
