//! Test fixtures with real parts, from testkit: a throwaway PKI, real `nats-server` processes
//! with `verify: true`, a real DNS server (dnsmasq) we own; and, this crate's own, a recording
//! hook, a TCP relay we can cut, and DNS answers checked with mbus's resolver. Every process
//! is our own child, stopped by PID on drop; every file lives in a temp dir removed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbus::{BeforeConnect, CertKeyPair, ConnectPlan, HookFuture};
pub use testkit::dns::Dns;
use testkit::nats::{Cluster, NatsConfig};
pub use testkit::nats::{NatsServer, PASSWORD, USER};
pub use testkit::pki::Pki;

pub const NATS_NAME: &str = "default.nats.bosh-internal";

/// A port free on every given loopback address at the time of asking.
pub fn free_port(ips: &[IpAddr]) -> u16 {
    testkit::net::free_port(ips).unwrap()
}

/// A fresh CA for one test.
pub fn pki() -> Pki {
    Pki::new("mbus test CA").unwrap()
}

/// The agent's certificate from `pki`, as the settings give it.
pub fn agent_cert(pki: &Pki) -> CertKeyPair {
    let leaf = pki.client("agent").unwrap();
    CertKeyPair {
        ca: pki.ca_pem.clone(),
        certificate: leaf.cert_pem,
        private_key: leaf.key_pem,
        origin: "env.bosh.mbus.cert",
    }
}

/// A nats-server on `addr` whose certificate names only `server_cn`.
pub fn nats(pki: &Pki, server_cn: &str, addr: SocketAddr) -> NatsServer {
    NatsServer::start_temp(pki, &NatsConfig::new(addr, server_cn)).unwrap()
}

/// Like [`nats`], one member of cluster "bosh": routes listen on `route`, and `peers` are the
/// other members' route addresses.
pub fn nats_clustered(
    pki: &Pki,
    server_cn: &str,
    addr: SocketAddr,
    route: SocketAddr,
    peers: &[SocketAddr],
) -> NatsServer {
    let mut config = NatsConfig::new(addr, server_cn);
    config.cluster = Some(Cluster {
        listen: route.to_string(),
        routes: peers.iter().map(SocketAddr::to_string).collect(),
    });
    NatsServer::start_temp(pki, &config).unwrap()
}

/// dnsmasq on 127.0.0.1:<free port>, answering `name` with `ip`.
pub fn dns(name: &str, ip: IpAddr) -> Dns {
    let lo = IpAddr::from([127, 0, 0, 1]);
    let port = testkit::net::free_udp_port(lo).unwrap();
    Dns::start_temp(SocketAddr::new(lo, port), name, ip).unwrap()
}

/// Polls (with our own fresh resolver) until `dns` answers `name` with exactly `ip`.
pub async fn wait_answer(dns: &Dns, name: &str, ip: IpAddr) {
    let server = match mbus::parse_mbus_url(&format!("nats://{name}:1")).unwrap() {
        mbus::MbusUrl::Server(s) => s,
        other => panic!("{other:?}"),
    };
    let mut resolver = mbus::FreshResolver::new(mbus::ResolverSource::NameServer(dns.addr()));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let got = resolver.resolve(std::slice::from_ref(&server)).await;
        if got.failed.is_empty() && got.endpoints() == [SocketAddr::new(ip, 1)] {
            return;
        }
        assert!(
            Instant::now() < end,
            "DNS never answered {name} -> {ip}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records every plan it is given; can be told to fail.
#[derive(Default)]
pub struct RecordingHook {
    pub plans: Mutex<Vec<ConnectPlan>>,
    pub fail: AtomicBool,
}

impl RecordingHook {
    pub fn plans(&self) -> Vec<ConnectPlan> {
        self.plans.lock().unwrap().clone()
    }
}

impl BeforeConnect for RecordingHook {
    fn before_connect<'a>(&'a self, plan: &'a ConnectPlan) -> HookFuture<'a> {
        Box::pin(async move {
            self.plans.lock().unwrap().push(plan.clone());
            if self.fail.load(Ordering::SeqCst) {
                Err("nft: simulated failure".into())
            } else {
                Ok(())
            }
        })
    }
}

/// A TCP relay we can cut: counts the connections it accepts, and `cut()` shuts every relayed
/// connection down while the server behind it stays up. std threads only, so it adds no task
/// to the test's runtime.
pub struct CutProxy {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CutProxy {
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, c, s) = (accepts.clone(), conns.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        down.set_nonblocking(false).unwrap();
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        for (mut from, mut to) in [
                            (down.try_clone().unwrap(), up.try_clone().unwrap()),
                            (up.try_clone().unwrap(), down.try_clone().unwrap()),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                        c.lock().unwrap().extend([down, up]);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        CutProxy {
            addr: listen,
            accepts,
            conns,
            stop,
            thread: Some(thread),
        }
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    pub fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
