//! A real `nats-server` as the director's bus: TLS with `verify: true` (mutual TLS: clients
//! need a certificate from the same CA), user/password auth, optionally one member of cluster
//! `bosh`. It runs wherever a [`Place`] says, logs to its directory, and is ready when it says
//! so in its log.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, io_ctx, require_binary};
use crate::pki::Pki;
use crate::process::{Exec, Place, Proc};
use crate::tempdir::TempDir;

/// Debian's nats-server (package `nats-server`).
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// The user of every test server.
pub const USER: &str = "nats";
/// Its password.
pub const PASSWORD: &str = "s3cr3t-pw";
/// How long a server may take to say it is ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `nats://<USER>:<PASSWORD>@<host_port>`.
pub fn url(host_port: &str) -> String {
    format!("nats://{USER}:{PASSWORD}@{host_port}")
}

/// A route to other servers (`cluster { listen, routes }`), so that a client on one server
/// reaches a client on another.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Where this server listens for routes (`host:port`).
    pub listen: String,
    /// The other members' route addresses (`host:port`).
    pub routes: Vec<String>,
}

/// What a server is started with.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Client listen address.
    pub listen: SocketAddr,
    /// The CN (and only DNS SAN) of the server's certificate.
    pub cn: String,
    /// Cluster membership, if any.
    pub cluster: Option<Cluster>,
    /// Appended verbatim to the configuration (e.g. `max_payload: 4194304`).
    pub extra: String,
}

impl NatsConfig {
    /// A lone server on `listen` with a certificate for `cn`.
    pub fn new(listen: SocketAddr, cn: &str) -> Self {
        NatsConfig {
            listen,
            cn: cn.to_string(),
            cluster: None,
            extra: String::new(),
        }
    }

    /// The configuration file's text, with the certificate files in `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let mut conf = format!(
            "listen: \"{}\"\n\
             authorization {{ user: \"{USER}\", password: \"{PASSWORD}\" }}\n\
             tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
            self.listen,
            dir.join("server.pem").display(),
            dir.join("server.key").display(),
            dir.join("ca.pem").display(),
        );
        if let Some(c) = &self.cluster {
            let routes: Vec<String> = c
                .routes
                .iter()
                .map(|r| format!("\"nats-route://{r}\""))
                .collect();
            conf.push_str(&format!(
                "cluster {{\n  name: \"bosh\"\n  listen: \"{}\"\n  no_advertise: true\n  routes: [{}]\n}}\n",
                c.listen,
                routes.join(", ")
            ));
        }
        if !self.extra.is_empty() {
            conf.push_str(&self.extra);
            conf.push('\n');
        }
        conf
    }
}

/// A running nats-server; stopped (SIGTERM, then SIGKILL by PID) on drop, its log tail printed
/// when a test panics.
#[derive(Debug)]
pub struct NatsServer {
    label: String,
    addr: SocketAddr,
    conf: PathBuf,
    dir: PathBuf,
    place: Place,
    proc: Option<Proc>,
    _tmp: Option<TempDir>,
}

impl NatsServer {
    /// Writes the certificates and configuration into `dir` (created), starts the server at
    /// `place` and waits until it is ready. `label` names it in messages.
    pub fn start(
        pki: &Pki,
        config: &NatsConfig,
        dir: &Path,
        label: &str,
        place: &Place,
    ) -> Result<Self> {
        Self::prepare(pki, config, dir, label, place)?.started()
    }

    /// [`NatsServer::start`] in a temporary directory of its own, in this process's network
    /// namespace and cgroup.
    pub fn start_temp(pki: &Pki, config: &NatsConfig) -> Result<Self> {
        let tmp = TempDir::new("testkit-nats")?;
        let label = config.listen.to_string();
        let mut s = Self::prepare(pki, config, tmp.path(), &label, &Place::default())?;
        s._tmp = Some(tmp);
        s.started()
    }

    fn started(mut self) -> Result<Self> {
        self.spawn()?;
        self.wait_ready(Duration::from_millis(20))?;
        Ok(self)
    }

    /// Writes the files as [`NatsServer::start`] does, without starting the server (for a
    /// benchmark that times [`NatsServer::spawn`] and [`NatsServer::wait_ready`]).
    pub fn prepare(
        pki: &Pki,
        config: &NatsConfig,
        dir: &Path,
        label: &str,
        place: &Place,
    ) -> Result<Self> {
        require_binary(Path::new(NATS_SERVER), "nats-server")?;
        fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
        let leaf = pki.server(&config.cn)?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            fs::write(&p, text).map_err(io_ctx(format!("writing {}", p.display())))?;
            Ok::<PathBuf, Error>(p)
        };
        write("ca.pem", &pki.ca_pem)?;
        write("server.pem", &leaf.cert_pem)?;
        write("server.key", &leaf.key_pem)?;
        let conf = write("nats.conf", &config.render(dir))?;
        Ok(NatsServer {
            label: label.to_string(),
            addr: config.listen,
            conf,
            dir: dir.to_path_buf(),
            place: place.clone(),
            proc: None,
            _tmp: None,
        })
    }

    /// Starts the server with a fresh log file, without waiting for it; an error when it is
    /// already running.
    pub fn spawn(&mut self) -> Result<()> {
        if self.proc.is_some() {
            return Err(Error(format!(
                "nats-server {} is already running",
                self.label
            )));
        }
        let n = fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let log = self.dir.join(format!("nats-{n}.log"));
        let p = Exec::new([
            Path::new(NATS_SERVER).as_os_str(),
            "-c".as_ref(),
            self.conf.as_os_str(),
        ])
        .place(&self.place)
        .log(&log)
        .spawn()?;
        self.proc = Some(p);
        Ok(())
    }

    /// Waits (checking every `poll`) until the running server's log says "Server is ready";
    /// returns the instant it saw that. An error when the server exits first, is not running,
    /// or is not ready within [`START_TIMEOUT`].
    pub fn wait_ready(&mut self, poll: Duration) -> Result<Instant> {
        let label = &self.label;
        let p = self
            .proc
            .as_mut()
            .ok_or_else(|| Error(format!("nats-server {label} is not running")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = p.log_text();
            if text.contains("Server is ready") {
                return Ok(Instant::now());
            }
            if let Some(st) = p.try_status()? {
                return Err(Error(format!("nats-server {label} exited ({st}): {text}")));
            }
            if Instant::now() >= deadline {
                return Err(Error(format!(
                    "nats-server {label} not ready within {START_TIMEOUT:?}: {text}"
                )));
            }
            std::thread::sleep(poll);
        }
    }

    /// Whether the server was started and not stopped.
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The client listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The label given at start.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Stops the server (SIGTERM; its clients see their connections close) and returns the
    /// instant it had exited (checked every millisecond, for benchmarks). Stopping a stopped
    /// server does nothing.
    pub fn stop(&mut self) -> Result<Instant> {
        let Some(mut p) = self.proc.take() else {
            return Ok(Instant::now());
        };
        p.signal(nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if p.try_status()?.is_some() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                // Dropping `p` kills it by pid.
                return Err(Error(format!(
                    "nats-server {} did not stop in 10 s",
                    self.label
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the server (SIGKILL by pid: no goodbye to its clients, as a crash or an OOM kill
    /// would end it) and waits for the exit. Killing a stopped server does nothing.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut p) = self.proc.take() else {
            return Ok(());
        };
        p.signal(nix::sys::signal::Signal::SIGKILL)?;
        p.wait_timeout(Duration::from_secs(10)).map(drop)
    }

    /// Starts it again with the same configuration (same address and certificate).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()?;
        self.wait_ready(Duration::from_millis(20)).map(drop)
    }

    /// What the running server has logged.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "---- nats-server {} log (tail) ----\n{}\n----",
                self.label,
                tail.join("\n")
            );
        }
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_mutual_tls_auth_and_the_cluster() {
        let mut c = NatsConfig::new(([127, 0, 0, 1], 4222).into(), "n.example");
        c.cluster = Some(Cluster {
            listen: "127.0.0.1:6222".into(),
            routes: vec!["127.0.0.2:6222".into()],
        });
        c.extra = "max_payload: 4194304".into();
        let text = c.render(Path::new("/d"));
        for want in [
            "listen: \"127.0.0.1:4222\"\n",
            "user: \"nats\", password: \"s3cr3t-pw\"",
            "cert_file: \"/d/server.pem\"",
            "key_file: \"/d/server.key\"",
            "ca_file: \"/d/ca.pem\"",
            "verify: true",
            "listen: \"127.0.0.1:6222\"",
            "routes: [\"nats-route://127.0.0.2:6222\"]",
            "max_payload: 4194304\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
