//! Test fixtures with real parts: a throwaway PKI (rcgen), real `nats-server` processes with
//! `verify: true`, a real DNS server (dnsmasq) we own, a recording hook. Every process is our
//! own child, killed by PID on drop; every file lives in a temp dir removed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbus::{BeforeConnect, CertKeyPair, ConnectPlan, HookFuture};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
pub const NATS_NAME: &str = "default.nats.bosh-internal";
pub const USER: &str = "nats";
pub const PASSWORD: &str = "s3cr3t-pw";

/// A directory under the system temp dir, removed (with contents) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("mbus-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (by its PID, via `Child::kill`) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn require_binary(path: &str, what: &str) {
    assert!(
        Path::new(path).exists(),
        "{what} is required for this test but {path} does not exist: install the Debian package \
         (apt-get install {}); this test fails rather than skips",
        Path::new(path).file_name().unwrap().to_string_lossy()
    );
}

/// A port free on every given loopback address at the time of asking.
pub fn free_port(ips: &[IpAddr]) -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind(SocketAddr::new(ips[0], 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|ip| TcpListener::bind(SocketAddr::new(*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no common free port on {ips:?}");
}

pub fn free_udp_port(ip: IpAddr) -> u16 {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_tcp(addr: SocketAddr, within: Duration) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {addr} after {within:?}");
}

/// CA, server certificates with any CN, and client certificates, as PEM.
pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "mbus test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate whose only name is its CN, as a DNS SAN (no IP SAN): dialling by
    /// IP only works through the CN rule, which is what the tests must show.
    pub fn server(&self, cn: &str) -> Leaf {
        self.leaf(
            cn,
            vec![cn.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn agent_cert(&self) -> CertKeyPair {
        let leaf = self.client("agent");
        CertKeyPair {
            ca: self.ca_pem.clone(),
            certificate: leaf.cert_pem,
            private_key: leaf.key_pem,
            origin: "env.bosh.mbus.cert",
        }
    }
}

/// A real nats-server with TLS `verify: true` and user/password auth.
pub struct NatsServer {
    pub addr: SocketAddr,
    pub proc: Proc,
    pub dir: TempDir,
}

impl NatsServer {
    pub fn start(pki: &Pki, server_cn: &str, addr: SocketAddr) -> Self {
        Self::start_with(pki, server_cn, addr, "")
    }

    /// Like [`NatsServer::start`], one member of cluster "bosh": routes listen on `route`,
    /// and `peers` are the other members' route addresses.
    pub fn start_clustered(
        pki: &Pki,
        server_cn: &str,
        addr: SocketAddr,
        route: SocketAddr,
        peers: &[SocketAddr],
    ) -> Self {
        let routes: Vec<String> = peers
            .iter()
            .map(|p| format!("\"nats-route://{p}\""))
            .collect();
        let extra = format!(
            "cluster {{\n name: \"bosh\"\n listen: \"{route}\"\n no_advertise: true\n routes: [{}]\n}}\n",
            routes.join(", ")
        );
        Self::start_with(pki, server_cn, addr, &extra)
    }

    fn start_with(pki: &Pki, server_cn: &str, addr: SocketAddr, extra: &str) -> Self {
        require_binary(NATS_SERVER, "nats-server");
        let dir = TempDir::new("nats");
        let leaf = pki.server(server_cn);
        std::fs::write(dir.path("ca.pem"), &pki.ca_pem).unwrap();
        std::fs::write(dir.path("server.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path("server.key"), &leaf.key_pem).unwrap();
        let conf = format!(
            "listen: \"{addr}\"\nauthorization {{ user: \"{USER}\", password: \"{PASSWORD}\" }}\n\
             tls {{\n cert_file: \"{}\"\n key_file: \"{}\"\n ca_file: \"{}\"\n verify: true\n timeout: 2\n}}\n",
            dir.path("server.pem").display(),
            dir.path("server.key").display(),
            dir.path("ca.pem").display(),
        ) + extra;
        std::fs::write(dir.path("nats.conf"), conf).unwrap();
        let proc = Self::spawn(&dir, addr);
        NatsServer { addr, proc, dir }
    }

    fn spawn(dir: &TempDir, addr: SocketAddr) -> Proc {
        let child = Command::new(NATS_SERVER)
            .arg("-c")
            .arg(dir.path("nats.conf"))
            .arg("-l")
            .arg(dir.path("nats.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {NATS_SERVER}: {e}"));
        let proc = Proc {
            child,
            name: format!("nats-server {addr}"),
        };
        wait_tcp(addr, Duration::from_secs(10));
        proc
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts it again with the same configuration (same address and certificate).
    pub fn restart(&mut self) {
        self.proc.stop();
        self.proc = Self::spawn(&self.dir, self.addr);
    }
}

/// dnsmasq as our own child on 127.0.0.1:<port>: no upstream, no /etc/hosts, no cache; names
/// come from a hosts directory that dnsmasq watches with inotify.
pub struct Dns {
    pub addr: SocketAddr,
    pub proc: Proc,
    dir: TempDir,
}

impl Dns {
    pub fn start(name: &str, ip: IpAddr) -> Self {
        require_binary(DNSMASQ, "dnsmasq");
        let dir = TempDir::new("dns");
        std::fs::create_dir_all(dir.path("hosts.d")).unwrap();
        let port = free_udp_port("127.0.0.1".parse().unwrap());
        let addr = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
        write_record(&dir, name, ip);
        let proc = spawn_dnsmasq(&dir, addr);
        Dns { addr, proc, dir }
    }

    /// Re-points `name` (dnsmasq sees it through inotify; poll before relying on it).
    pub fn write_record(&self, name: &str, ip: IpAddr) {
        write_record(&self.dir, name, ip);
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Polls (with our own fresh resolver) until `name` resolves to exactly `ip`.
    pub async fn wait_answer(&self, name: &str, ip: IpAddr) {
        let server = match mbus::parse_mbus_url(&format!("nats://{name}:1")).unwrap() {
            mbus::MbusUrl::Server(s) => s,
            other => panic!("{other:?}"),
        };
        let mut resolver = mbus::FreshResolver::new(mbus::ResolverSource::NameServer(self.addr));
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
}

/// Written beside and renamed in, so dnsmasq never reads a half-written file.
fn write_record(dir: &TempDir, name: &str, ip: IpAddr) {
    let tmp = dir.path("hosts.tmp");
    std::fs::write(&tmp, format!("{ip} {name}\n")).unwrap();
    std::fs::rename(&tmp, dir.path("hosts.d/names")).unwrap();
}

fn spawn_dnsmasq(dir: &TempDir, addr: SocketAddr) -> Proc {
    let child = Command::new(DNSMASQ)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--cache-size=0",
            "--local-ttl=0",
            "--user=root",
            "--log-facility=-",
        ])
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--hostsdir={}", dir.path("hosts.d").display()))
        .arg(format!("--pid-file={}", dir.path("dnsmasq.pid").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {DNSMASQ}: {e}"));
    Proc {
        child,
        name: format!("dnsmasq {addr}"),
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
