//! The agent process of a run: its files, a start timed until the first pong, the
//! placement wrappers' own cost, a first boot.

use super::*;

/// settings.json and resolv.conf in the sandbox; agent.json per start.
pub(crate) struct AgentFiles {
    pub(crate) settings: PathBuf,
    pub(crate) resolv: PathBuf,
}

impl AgentFiles {
    pub(crate) fn write(sb: &Sandbox, settings: &Value) -> Res<Self> {
        let s = sb.dir().join("settings.json");
        let text = serde_json::to_vec_pretty(settings).map_err(|e| e.to_string())?;
        std::fs::write(&s, text).map_err(|e| format!("{}: {e}", s.display()))?;
        let r = sb.dir().join("resolv.conf");
        std::fs::write(&r, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            .map_err(|e| format!("{}: {e}", r.display()))?;
        Ok(AgentFiles {
            settings: s,
            resolv: r,
        })
    }

    /// The start command: agent.json with only the NATS firewall switch and the settings
    /// source (heartbeat and reconcile intervals at their defaults, 30 s).
    pub(crate) fn exec(&self, sb: &Sandbox, cg: &CgroupDir, nats_firewall: bool) -> Res<Exec> {
        let config = json!({
            "Platform": {"Linux": {"EnableNATSFirewall": nats_firewall}},
            "Infrastructure": {"Settings": {"Sources": [
                {"Type": "File", "SettingsPath": self.settings.display().to_string()}]}}
        });
        Ok(sb
            .agent_exec(cg, &config.to_string())
            .map_err(|e| e.to_string())?
            .env("BOSH_AGENT_RESOLV_CONF", &self.resolv))
    }
}

/// Starts the agent and returns it once it answers a ping, with the time from its exec. The
/// wrapper that places it in `cg` is held until the placement is done and only then released
/// into the agent: the clock starts at the release, as for the Go agent's figure (moving a
/// process between cgroups can take 20 ms while the kernel waits for an RCU grace period, and
/// a service manager does it before the exec, not the agent).
pub(crate) fn start_until_pong(
    sb: &Sandbox,
    director: &Client,
    exec: &Exec,
    cg: &CgroupDir,
) -> Res<(Agent, Duration)> {
    let mut agent = sb
        .spawn_agent(&exec.clone().held())
        .map_err(|e| e.to_string())?;
    let placed = agent
        .proc_mut()
        .wait_in_cgroup(cg, Duration::from_secs(5))
        .map_err(|e| e.to_string());
    let res = placed.and_then(|()| {
        director.pong_around(PONG_LIMIT, || {
            agent.proc_mut().release().map_err(|e| e.to_string())
        })
    });
    match res {
        Ok(((), t0, Some(t))) => Ok((agent, t.saturating_duration_since(t0))),
        Ok((_, _, None)) => {
            let _ = agent.stop();
            Err(format!(
                "the agent did not answer a ping within {PONG_LIMIT:?}; its log:\n{}",
                tail(&agent.log(), 25)
            ))
        }
        Err(e) => {
            let _ = agent.stop();
            Err(e)
        }
    }
}

/// Median of release → exit of `true` behind the same wrappers (nsenter, placement shell),
/// placement excluded as in [`start_until_pong`].
pub(crate) fn wrappers_median(sb: &Sandbox, cg: &CgroupDir, n: usize) -> Res<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut p = sb
            .exec(["true"])
            .cgroup(cg)
            .held()
            .spawn()
            .map_err(|e| e.to_string())?;
        p.wait_in_cgroup(cg, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        p.release().map_err(|e| e.to_string())?;
        p.wait().map_err(|e| e.to_string())?;
        v.push(ms(t.elapsed()));
    }
    Ok(pct(&sorted(&v), 0.5))
}

/// A first boot: no table (a reboot flushed it) and an empty run directory (tmpfs).
pub(crate) fn first_boot(sb: &Sandbox) -> Res<()> {
    let _ = sb.nft(["delete", "table", "inet", "bosh_agent"]);
    if let Ok(rd) = std::fs::read_dir(sb.run_dir()) {
        for e in rd.flatten() {
            let p = e.path();
            let res = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(())
}
