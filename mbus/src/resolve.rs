//! Fresh name resolution before every connection attempt.
//!
//! A new hickory resolver is built for every attempt from the configured source, with the
//! answer cache disabled, so edits to /etc/resolv.conf, /etc/hosts or the DNS records are seen
//! on the next attempt. IP literals are used as they are. The hosts file is consulted first
//! (like glibc's `hosts: files dns`); we read it ourselves so that its path is injectable.
//!
//! A host that fails to resolve keeps the endpoints it had at its last success ("carried
//! over"): the firewall keeps their rules and the client may still dial them, because a VM the
//! director cannot reach is worse than one dialling a slightly stale address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::urls::{Host, ServerUrl};

/// Upper bound on one host's lookup, all name servers included. A lookup against a dead
/// server was measured at about twice [`QUERY_TIMEOUT`] (hickory 0.26.3).
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(1250);
/// Per-query timeout handed to hickory (resolv.conf may ask for more; we cap it). Short on
/// purpose: a failed lookup only means "dial the last good endpoints", and it is retried on
/// the next attempt anyway, whereas a long one delays every reconnect while DNS is down
/// (hickory waits for the timeout even when the server's port answers ICMP unreachable).
/// 500 ms keeps a reconnect with DNS down under the 2 s target (a lookup against a dead server
/// takes about two timeouts) while staying far above a healthy VM resolver's answer time.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// Where names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolverSource {
    /// `/etc/resolv.conf` and `/etc/hosts`, both re-read on every attempt.
    System,
    /// The same, from other paths (tests, chroots). `hosts: None` skips the hosts file.
    Files {
        /// resolv.conf to parse.
        resolv_conf: PathBuf,
        /// hosts file to consult first.
        hosts: Option<PathBuf>,
    },
    /// One DNS server over UDP and TCP, no hosts file, no search domains (tests).
    NameServer(SocketAddr),
}

/// A URL whose host did not resolve on this attempt (one entry per URL: URLs sharing a host
/// may differ in port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedHost {
    /// The name as written in the URL.
    pub host: String,
    /// Why (resolver message, or "timed out").
    pub reason: String,
    /// Endpoints this host had at its last successful resolution (empty if never resolved).
    /// They stay dialable, and the hook should keep their rules.
    pub carried_over: Vec<SocketAddr>,
}

/// One endpoint that may be dialled on this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Index into the configured server list (credentials come from that URL).
    pub server: usize,
    /// Address and port to dial.
    pub addr: SocketAddr,
    /// False when carried over from an earlier attempt because the host failed now.
    pub fresh: bool,
}

/// The outcome of one resolution pass over all server URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Dialable endpoints in settings order (URL order, then answer order).
    pub candidates: Vec<Candidate>,
    /// Hosts that failed on this pass.
    pub failed: Vec<FailedHost>,
}

impl Resolution {
    /// Every distinct endpoint that may be dialled (fresh and carried over), in order.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::with_capacity(self.candidates.len());
        for c in &self.candidates {
            if !out.contains(&c.addr) {
                out.push(c.addr);
            }
        }
        out
    }
}

/// Resolves server URLs afresh on each call, remembering each host's last good answer.
#[derive(Debug)]
pub struct FreshResolver {
    source: ResolverSource,
    last_good: HashMap<String, Vec<IpAddr>>,
}

impl FreshResolver {
    /// A resolver reading from `source`.
    pub fn new(source: ResolverSource) -> Self {
        Self {
            source,
            last_good: HashMap::new(),
        }
    }

    /// Resolves every URL's host now (names concurrently), with no cache. Never fails as a
    /// whole: failures are reported per host in [`Resolution::failed`].
    pub async fn resolve(&mut self, servers: &[ServerUrl]) -> Resolution {
        let mut names: Vec<&str> = Vec::new();
        for s in servers {
            if let Host::Name(n) = &s.host
                && !names.contains(&n.as_str())
            {
                names.push(n);
            }
        }
        let answers: HashMap<&str, Result<Vec<IpAddr>, String>> = if names.is_empty() {
            HashMap::new()
        } else {
            let hosts_file = self.hosts_file();
            match self.build() {
                Ok(resolver) => {
                    let lookups = names.iter().map(|n| lookup(&resolver, &hosts_file, n));
                    let results = futures_util::future::join_all(lookups).await;
                    names.iter().copied().zip(results).collect()
                }
                Err(e) => names.iter().map(|n| (*n, Err(e.clone()))).collect(),
            }
        };

        let mut out = Resolution::default();
        for (index, server) in servers.iter().enumerate() {
            let (ips, fresh) = match &server.host {
                Host::Ip(ip) => (vec![*ip], true),
                Host::Name(name) => match answers.get(name.as_str()) {
                    Some(Ok(ips)) => {
                        self.last_good.insert(name.clone(), ips.clone());
                        (ips.clone(), true)
                    }
                    Some(Err(reason)) => {
                        let old = self.last_good.get(name).cloned().unwrap_or_default();
                        // Several URLs may share a host: report it once.
                        if !out.failed.iter().any(|f| &f.host == name) {
                            tracing::warn!(host = %name, %reason, carried_over = old.len(),
                                "mbus host did not resolve");
                        }
                        out.failed.push(FailedHost {
                            host: name.clone(),
                            reason: reason.clone(),
                            carried_over: old
                                .iter()
                                .map(|ip| SocketAddr::new(*ip, server.port))
                                .collect(),
                        });
                        (old, false)
                    }
                    None => (Vec::new(), false),
                },
            };
            for ip in ips {
                out.candidates.push(Candidate {
                    server: index,
                    addr: SocketAddr::new(ip, server.port),
                    fresh,
                });
            }
        }
        out
    }

    fn hosts_file(&self) -> Option<String> {
        let path = match &self.source {
            ResolverSource::System => PathBuf::from("/etc/hosts"),
            ResolverSource::Files { hosts: Some(p), .. } => p.clone(),
            ResolverSource::Files { hosts: None, .. } | ResolverSource::NameServer(_) => {
                return None;
            }
        };
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "hosts file not read");
                None
            }
        }
    }

    /// A brand-new resolver: config files are read now, so every attempt sees current ones.
    fn build(&self) -> Result<TokioResolver, String> {
        let (config, mut opts) = match &self.source {
            ResolverSource::System => read_resolv_conf(&PathBuf::from("/etc/resolv.conf"))?,
            ResolverSource::Files { resolv_conf, .. } => read_resolv_conf(resolv_conf)?,
            ResolverSource::NameServer(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                (
                    ResolverConfig::from_name_servers(vec![ns]),
                    ResolverOpts::default(),
                )
            }
        };
        // No answer cache at any level: a moved director must be seen on the next attempt.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        // We consult the hosts file ourselves (injectable path); hickory would read /etc/hosts.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = opts.timeout.min(QUERY_TIMEOUT);
        // One try per attempt: the next attempt is the retry.
        opts.attempts = 1;
        Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("cannot build DNS resolver: {e}"))
    }
}

fn read_resolv_conf(path: &PathBuf) -> Result<(ResolverConfig, ResolverOpts), String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    hickory_resolver::system_conf::parse_resolv_conf(data)
        .map_err(|e| format!("cannot use {}: {e}", path.display()))
}

async fn lookup(
    resolver: &TokioResolver,
    hosts_file: &Option<String>,
    name: &str,
) -> Result<Vec<IpAddr>, String> {
    if let Some(content) = hosts_file {
        let ips = hosts_lookup(content, name);
        if !ips.is_empty() {
            return Ok(ips);
        }
    }
    match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(name)).await {
        Err(_) => Err(format!("timed out after {LOOKUP_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(answer)) => {
            let mut ips: Vec<IpAddr> = Vec::new();
            for ip in answer.iter() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            if ips.is_empty() {
                Err("no A or AAAA records".to_string())
            } else {
                Ok(ips)
            }
        }
    }
}

/// Addresses for `name` in hosts-file `content` (`addr name alias…`, `#` comments), in file
/// order, names compared case-insensitively and without a trailing dot. Zone-scoped IPv6
/// entries (`fe80::1%eth0`) are skipped: a socket address for them needs an interface index.
pub fn hosts_lookup(content: &str, name: &str) -> Vec<IpAddr> {
    let want = name.trim_end_matches('.');
    let mut out = Vec::new();
    for line in content.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(want)) && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::urls::{MbusUrl, parse_mbus_url};

    fn servers(urls: &[&str]) -> Vec<ServerUrl> {
        urls.iter()
            .map(|u| match parse_mbus_url(u).unwrap() {
                MbusUrl::Server(s) => s,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn hosts_file_parsing() {
        let hosts = "# comment\n127.0.0.1 localhost\n10.0.0.6 Default.NATS.bosh-internal. x\n\
                     fd00::6 default.nats.bosh-internal # v6\nbad line\nfe80::1%eth0 default.nats.bosh-internal\n\
                     10.0.0.6 default.nats.bosh-internal\n";
        assert_eq!(
            hosts_lookup(hosts, "default.nats.bosh-internal."),
            vec![
                "10.0.0.6".parse::<IpAddr>().unwrap(),
                "fd00::6".parse().unwrap()
            ]
        );
        assert!(hosts_lookup(hosts, "nats.bosh-internal").is_empty());
        assert!(hosts_lookup(hosts, "comment").is_empty());
    }

    #[tokio::test]
    async fn literals_need_no_dns_and_files_are_reread() {
        let dir = std::env::temp_dir().join(format!("mbus-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (resolv, hosts) = (dir.join("resolv.conf"), dir.join("hosts"));
        // A name server nobody listens on: names not in the hosts file must fail, fast.
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        std::fs::write(&hosts, "127.0.0.2 director.example\n").unwrap();
        let mut r = FreshResolver::new(ResolverSource::Files {
            resolv_conf: resolv.clone(),
            hosts: Some(hosts.clone()),
        });
        let s = servers(&[
            "nats://[::1]:4222",
            "nats://director.example:4223",
            "nats://10.1.1.1",
        ]);
        let got = r.resolve(&s).await;
        assert!(got.failed.is_empty(), "{got:?}");
        let eps: Vec<String> = got.endpoints().iter().map(|a| a.to_string()).collect();
        assert_eq!(eps, ["[::1]:4222", "127.0.0.2:4223", "10.1.1.1:4222"]);

        // Re-pointed in the hosts file: seen on the very next call.
        std::fs::write(&hosts, "127.0.0.3 director.example\n").unwrap();
        let got = r.resolve(&s).await;
        assert_eq!(got.candidates[1].addr.to_string(), "127.0.0.3:4223");

        // Gone from the hosts file, DNS dead: failure reported, last good carried over.
        std::fs::write(&hosts, "").unwrap();
        let got = r.resolve(&s).await;
        assert_eq!(got.failed.len(), 1, "{got:?}");
        assert_eq!(got.failed[0].host, "director.example");
        assert_eq!(got.failed[0].carried_over[0].to_string(), "127.0.0.3:4223");
        assert!(!got.candidates[1].fresh);
        assert_eq!(got.endpoints().len(), 3);

        // Unreadable resolv.conf is a per-host failure too, not a panic.
        std::fs::remove_file(&resolv).unwrap();
        let got = r.resolve(&s).await;
        assert!(got.failed[0].reason.contains("resolv.conf"), "{got:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
