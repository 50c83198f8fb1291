//! dnsmasq as a DNS server the test owns: no upstream, no /etc/hosts, no cache, TTL 0; names
//! come from a hosts directory it watches (inotify), so re-pointing a name is a file write.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Result, io_ctx, require_binary};
use crate::process::{Exec, Place, Proc};
use crate::tempdir::TempDir;

/// Debian's dnsmasq (package `dnsmasq-base`).
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A running dnsmasq; stopped by PID on drop.
#[derive(Debug)]
pub struct Dns {
    addr: SocketAddr,
    hosts_dir: PathBuf,
    proc: Option<Proc>,
    _tmp: Option<TempDir>,
}

impl Dns {
    /// Starts dnsmasq on `listen` (UDP and TCP) at `place`, with its files in `dir` (created),
    /// answering `name` with `ip`.
    pub fn start(
        dir: &Path,
        listen: SocketAddr,
        place: &Place,
        name: &str,
        ip: IpAddr,
    ) -> Result<Self> {
        Self::start_owning(dir, listen, place, name, ip, None)
    }

    /// [`Dns::start`] in a temporary directory of its own, in this process's namespace.
    pub fn start_temp(listen: SocketAddr, name: &str, ip: IpAddr) -> Result<Self> {
        let tmp = TempDir::new("testkit-dns")?;
        let dir = tmp.path().to_path_buf();
        Self::start_owning(&dir, listen, &Place::default(), name, ip, Some(tmp))
    }

    fn start_owning(
        dir: &Path,
        listen: SocketAddr,
        place: &Place,
        name: &str,
        ip: IpAddr,
        tmp: Option<TempDir>,
    ) -> Result<Self> {
        require_binary(Path::new(DNSMASQ), "dnsmasq-base")?;
        let hosts_dir = dir.join("hosts.d");
        fs::create_dir_all(&hosts_dir)
            .map_err(io_ctx(format!("creating {}", hosts_dir.display())))?;
        let mut dns = Dns {
            addr: listen,
            hosts_dir,
            proc: None,
            _tmp: tmp,
        };
        dns.point(name, ip)?;
        let argv: Vec<String> = vec![
            DNSMASQ.into(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            format!("--listen-address={}", listen.ip()),
            "--bind-interfaces".into(),
            format!("--port={}", listen.port()),
            "--cache-size=0".into(),
            "--local-ttl=0".into(),
            "--user=root".into(),
            "--log-facility=-".into(),
            format!("--hostsdir={}", dns.hosts_dir.display()),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        ];
        dns.proc = Some(
            Exec::new(argv)
                .place(place)
                .log(&dir.join("dnsmasq.log"))
                .spawn()?,
        );
        Ok(dns)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Re-points `name` to `ip` (written beside and renamed in, so dnsmasq never reads half a
    /// file). dnsmasq sees it through inotify: poll before relying on it.
    pub fn point(&self, name: &str, ip: IpAddr) -> Result<()> {
        self.point_all(name, &[ip])
    }

    /// Re-points `name` to every address of `ips` (one record each, all in one answer), as
    /// [`Dns::point`] does for one.
    pub fn point_all(&self, name: &str, ips: &[IpAddr]) -> Result<()> {
        let tmp = self.hosts_dir.with_extension("tmp");
        let text: String = ips.iter().map(|ip| format!("{ip} {name}\n")).collect();
        fs::write(&tmp, text).map_err(io_ctx(format!("writing {}", tmp.display())))?;
        let dst = self.hosts_dir.join("names");
        fs::rename(&tmp, &dst).map_err(io_ctx(format!("renaming to {}", dst.display())))
    }

    /// Stops dnsmasq (SIGTERM, then SIGKILL by PID on drop if it lingers).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
