//! Connection attempts from a cgroup as a uid (`netprobe`), and listeners to attempt them on.

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use crate::{
    COMMAND_TIMEOUT, CgroupDir, PROBE_TIMEOUT, Proc, Result, Sandbox, describe, err, wait_for,
};

/// How a connection attempt ended (`netprobe connect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The handshake completed.
    Connected,
    /// Refused or reset.
    Refused,
    /// No answer within the timeout: the SYN was dropped.
    TimedOut,
    /// Anything else (with the output, to be shown in the assertion).
    Failed(String),
}

impl Sandbox {
    /// Starts `netprobe listen <addr>` (as root, in the sandbox's cgroup) and waits until it
    /// listens.
    pub fn listen(&self, addr: &str) -> Result<Proc> {
        let cg = self.cgroup("listener")?;
        let log = self.log_path("listener");
        let mut p = self
            .exec([
                self.tools.netprobe.as_os_str(),
                OsStr::new("listen"),
                OsStr::new(addr),
            ])
            .cgroup(&cg)
            .log(&log)
            .spawn()?;
        wait_for(
            &format!("a listener on {addr}"),
            Duration::from_secs(10),
            || {
                if let Some(s) = p.try_status()? {
                    return err(format!(
                        "netprobe listen {addr} exited ({s}): {}",
                        p.log_text()
                    ));
                }
                Ok(p.log_text().contains("listening").then_some(()))
            },
        )?;
        Ok(p)
    }

    /// `netprobe connect <addr>` from cgroup `cg` as `uid` (root when `None`), with
    /// [`PROBE_TIMEOUT`].
    pub fn probe(&self, cg: &CgroupDir, uid: Option<u32>, addr: &str) -> Result<Probe> {
        self.probe_timeout(cg, uid, addr, PROBE_TIMEOUT)
    }

    /// Like [`Sandbox::probe`] with an explicit timeout.
    pub fn probe_timeout(
        &self,
        cg: &CgroupDir,
        uid: Option<u32>,
        addr: &str,
        timeout: Duration,
    ) -> Result<Probe> {
        let ms = timeout.as_millis().to_string();
        let out = self
            .exec([
                self.tools.netprobe.as_os_str(),
                OsStr::new("connect"),
                OsStr::new(addr),
                OsStr::new("--timeout-ms"),
                OsStr::new(&ms),
            ])
            .cgroup(cg)
            .user(uid)
            .output(timeout + COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Only netprobe's own verdicts count: a wrapper failing (nsenter, setpriv) also exits 1.
        Ok(match out.status.code() {
            Some(0) => Probe::Connected,
            Some(1) if stderr.contains("netprobe: connect") => Probe::Refused,
            Some(2) if stderr.contains("netprobe: connect") => Probe::TimedOut,
            _ => Probe::Failed(describe(&out)),
        })
    }

    /// `netprobe chat`: one connection, `messages` echo round trips `interval` apart.
    pub fn chat(
        &self,
        cg: &CgroupDir,
        uid: Option<u32>,
        addr: &str,
        messages: u32,
        interval: Duration,
    ) -> Result<Output> {
        let (n, ms) = (messages.to_string(), interval.as_millis().to_string());
        let timeout = PROBE_TIMEOUT.as_millis().to_string();
        let argv = [
            self.tools.netprobe.as_os_str(),
            OsStr::new("chat"),
            OsStr::new(addr),
            OsStr::new("--messages"),
            OsStr::new(&n),
            OsStr::new("--interval-ms"),
            OsStr::new(&ms),
            OsStr::new("--timeout-ms"),
            OsStr::new(&timeout),
        ];
        self.exec(argv)
            .cgroup(cg)
            .user(uid)
            .output(interval * messages + COMMAND_TIMEOUT)
    }
}
