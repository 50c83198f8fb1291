//! Real parts for the NATS firewall tests, all inside one [`Sandbox`]'s network namespace: a
//! throwaway PKI (rcgen), `nats-server` processes with TLS `verify: true` and user/password
//! auth, a dnsmasq serving the director's name on 127.0.0.1:53, a director client, and
//! helpers to start the agent with a settings.json and to read the NATS sets.
//!
//! The director client runs in this test process, on a thread of its own that has entered
//! the sandbox's network namespace (`setns`, which moves only the calling thread): its
//! sockets live in the namespace but belong to the test process's cgroup, never to the
//! agent's. It dials the nats-server on an address the agent does not dial (127.0.0.3), so
//! the NATS firewall, which guards exactly the agent's (address, port) pairs, leaves it alone.
//!
//! Every process is a harness [`Proc`] (killed by pid on drop); every file lives in the
//! sandbox directory.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Agent, CgroupDir, Exec, Proc, READY_TIMEOUT, Sandbox, wait_for};
use futures_util::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// The CN upstream's rule accepts (`*.nats.bosh-internal`).
pub const NATS_CN: &str = "default.nats.bosh-internal";
pub const NATS_USER: &str = "nats";
pub const NATS_PASSWORD: &str = "s3cr3t-pw";
pub const AGENT_ID: &str = "a1";
/// The director's name, served by the test's dnsmasq.
pub const DIRECTOR_NAME: &str = "director.bosh";
/// Where the director client dials: a loopback address no agent URL names.
pub const DIRECTOR_SIDE: &str = "127.0.0.3:4222";

/// Fails (never skips) when a binary the test needs is missing.
pub fn require_binary(path: &str) {
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        Path::new(path).is_file(),
        "{path} is required by this test and does not exist (apt-get install {name}); \
         the test fails rather than skips"
    );
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s}: {e}"))
}

pub fn nats_url(host_port: &str) -> String {
    format!("nats://{NATS_USER}:{NATS_PASSWORD}@{host_port}")
}

// ---------------------------------------------------------------------------------------------
// PKI

/// A CA and the leaf certificates it signs, as PEM.
pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&key).expect("self-signed CA");
        Pki {
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate whose only name is its CN (as a DNS SAN, no IP SAN): dialling by
    /// address works only through upstream's CN rule.
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
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// nats-server

/// A route to other servers (`cluster { listen, routes }`), so that a director on one server
/// reaches an agent on another.
#[derive(Clone)]
pub struct Cluster {
    pub listen: String,
    pub routes: Vec<String>,
}

/// A nats-server in the sandbox's namespace (cgroup `nats`), TLS `verify: true`.
pub struct NatsServer {
    pub label: String,
    conf: PathBuf,
    cgroup: CgroupDir,
    netns: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl NatsServer {
    /// Starts a server listening on `listen` with a certificate for `cn` from `pki`, and
    /// waits until it says it is ready.
    pub fn start(
        sb: &Sandbox,
        pki: &Pki,
        cn: &str,
        label: &str,
        listen: &str,
        cluster: Option<Cluster>,
    ) -> Self {
        Self::start_with(sb, pki, cn, label, listen, cluster, "")
    }

    /// [`NatsServer::start`] with `extra` appended to the configuration (e.g.
    /// `max_payload: 4194304` for a request larger than the default 1 MiB).
    pub fn start_with(
        sb: &Sandbox,
        pki: &Pki,
        cn: &str,
        label: &str,
        listen: &str,
        cluster: Option<Cluster>,
        extra: &str,
    ) -> Self {
        require_binary(NATS_SERVER);
        let dir = sb.dir().join(format!("nats-{label}"));
        std::fs::create_dir_all(&dir).expect("nats dir");
        let leaf = pki.server(cn);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write nats file");
            p
        };
        let ca = write("ca.pem", &pki.ca_pem);
        let cert = write("server.pem", &leaf.cert_pem);
        let key = write("server.key", &leaf.key_pem);
        let mut conf = format!(
            "listen: \"{listen}\"\n\
             authorization {{ user: \"{NATS_USER}\", password: \"{NATS_PASSWORD}\" }}\n\
             tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
            cert.display(),
            key.display(),
            ca.display()
        );
        if let Some(c) = cluster {
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
        if !extra.is_empty() {
            conf.push_str(extra);
            conf.push('\n');
        }
        let conf = write("nats.conf", &conf);
        let mut s = NatsServer {
            label: label.to_string(),
            conf,
            cgroup: sb.cgroup("nats").expect("nats cgroup"),
            netns: sb.netns().file().to_path_buf(),
            dir,
            proc: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let log = self.dir.join(format!("nats-{n}.log"));
        let argv = [
            NATS_SERVER.to_string(),
            "-c".to_string(),
            self.conf.display().to_string(),
        ];
        let mut p = crate::Exec::new(argv)
            .netns(&self.netns)
            .cgroup(&self.cgroup)
            .log(&log)
            .spawn()
            .expect("spawn nats-server");
        let label = self.label.clone();
        wait_for(
            &format!("nats-server {label} ready"),
            Duration::from_secs(10),
            || {
                if let Some(st) = p.try_status()? {
                    return Err(crate::Error(format!(
                        "nats-server {label} exited ({st}): {}",
                        p.log_text()
                    )));
                }
                Ok(p.log_text().contains("Server is ready").then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.proc = Some(p);
    }

    /// Stops the server (SIGTERM; its clients see their connections close).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("stopping nats-server {}: {e}", self.label));
        }
    }

    /// Starts it again with the same configuration.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

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
    }
}

// ---------------------------------------------------------------------------------------------
// dnsmasq

/// dnsmasq on 127.0.0.1:53 inside the sandbox: no upstream, no /etc/hosts, no cache; names
/// come from a hosts directory it watches (inotify), so re-pointing a name is a file write.
pub struct Dns {
    hosts_dir: PathBuf,
    proc: Option<Proc>,
}

impl Dns {
    pub fn start(sb: &Sandbox, name: &str, ip: IpAddr) -> Self {
        require_binary(DNSMASQ);
        let dir = sb.dir().join("dns");
        let hosts_dir = dir.join("hosts.d");
        std::fs::create_dir_all(&hosts_dir).expect("dns dir");
        let dns = Dns {
            hosts_dir,
            proc: None,
        };
        dns.point(name, ip);
        let argv: Vec<String> = vec![
            DNSMASQ.into(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            "--port=53".into(),
            "--cache-size=0".into(),
            "--local-ttl=0".into(),
            "--user=root".into(),
            "--log-facility=-".into(),
            format!("--hostsdir={}", dns.hosts_dir.display()),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        ];
        let cg = sb.cgroup("dns").expect("dns cgroup");
        let proc = sb
            .exec(&argv)
            .cgroup(&cg)
            .log(&dir.join("dnsmasq.log"))
            .spawn()
            .expect("spawn dnsmasq");
        Dns {
            proc: Some(proc),
            ..dns
        }
    }

    /// Re-points `name` (written beside and renamed in, so dnsmasq never reads half a file).
    pub fn point(&self, name: &str, ip: IpAddr) {
        let tmp = self.hosts_dir.with_extension("tmp");
        std::fs::write(&tmp, format!("{ip} {name}\n")).expect("write hosts record");
        std::fs::rename(&tmp, self.hosts_dir.join("names")).expect("rename hosts record");
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10)).expect("stop dnsmasq");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A thread inside the sandbox's network namespace

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A thread that has entered the namespace and drives a current-thread tokio runtime; jobs
/// run one after the other on it, and everything spawned by them keeps running in between.
pub struct InNetns {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl InNetns {
    pub fn new(netns: &Path) -> Self {
        let file = std::fs::File::open(netns)
            .unwrap_or_else(|e| panic!("opening {}: {e}", netns.display()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"));
            let rt = entered.and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("tokio runtime: {e}"))
            });
            let rt = match rt {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                while let Some(job) = rx.recv().await {
                    job().await;
                }
            });
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("cannot enter the sandbox's network namespace: {e}"),
            Err(e) => panic!("the namespace thread did not start: {e}"),
        }
        InNetns {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs `f()` on the namespace thread, bounded by `limit`.
    pub fn run<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (rtx, rrx) = std_mpsc::channel();
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let r = tokio::time::timeout(limit, f()).await;
                let _ = rtx.send(r.map_err(|_| format!("timed out after {limit:?}")));
            })
        });
        self.tx
            .as_ref()
            .ok_or("namespace thread gone")?
            .send(job)
            .map_err(|_| "namespace thread gone".to_string())?;
        rrx.recv_timeout(limit + Duration::from_secs(10))
            .map_err(|e| format!("namespace thread: {e}"))?
    }

    /// The addresses dnsmasq (127.0.0.1:53) answers for `name`, asked with the agent's own
    /// fresh resolver; `Err` with the reason when it does not answer.
    pub fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let url = format!("nats://{name}:4222");
        self.run(Duration::from_secs(5), move || async move {
            let server = match mbus::parse_mbus_url(&url).map_err(|e| e.to_string())? {
                mbus::MbusUrl::Server(s) => s,
                other => return Err(format!("{other:?}")),
            };
            let mut r =
                mbus::FreshResolver::new(mbus::ResolverSource::NameServer(addr("127.0.0.1:53")));
            let got = r.resolve(std::slice::from_ref(&server)).await;
            if let Some(f) = got.failed.first() {
                return Err(f.reason.clone());
            }
            Ok(got.endpoints().iter().map(SocketAddr::ip).collect())
        })?
    }

    /// Waits until dnsmasq answers exactly `ip` for `name`.
    pub fn wait_answer(&self, name: &str, ip: IpAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.lookup(name);
            if got.as_deref() == Ok(&[ip][..]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "DNS never answered {name} -> {ip}; last answer {got:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The director

/// A director: its own mTLS NATS client (another client certificate from the same CA),
/// connected from outside the agent's cgroup to [`DIRECTOR_SIDE`] or another address.
pub struct Director {
    client: async_nats::Client,
    ns: InNetns,
}

impl Director {
    /// Connects (retrying for up to 10 s: a just-started cluster may still be forming).
    pub fn connect(sb: &Sandbox, pki: &Pki, to: &str) -> Self {
        let ns = InNetns::new(sb.netns().file());
        let leaf = pki.client("director");
        let cert = mbus::CertKeyPair {
            ca: pki.ca_pem.clone(),
            certificate: leaf.cert_pem,
            private_key: leaf.key_pem,
            origin: "director",
        };
        let url = format!("tls://{to}");
        let client = ns
            .run(Duration::from_secs(15), move || async move {
                let tls = mbus::tls::client_config(&cert).map_err(|e| e.to_string())?;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let res = async_nats::ConnectOptions::new()
                        .require_tls(true)
                        .tls_client_config(tls.clone())
                        .user_and_password(NATS_USER.into(), NATS_PASSWORD.into())
                        .ignore_discovered_servers()
                        .connection_timeout(Duration::from_secs(2))
                        .connect(url.clone())
                        .await;
                    match res {
                        Ok(c) => return Ok(c),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(format!("director cannot connect to {url}: {e}"));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{e}"));
        Director { client, ns }
    }

    /// The director's namespace thread (for DNS lookups from inside the sandbox).
    pub fn ns(&self) -> &InNetns {
        &self.ns
    }

    /// Sends `{"method": method, …}` to `agent.<AGENT_ID>` with a fresh `reply_to`, re-sending
    /// every `resend` (NATS is at most once; a request sent while the agent is between
    /// connections is lost), until a reply arrives or `limit` passes.
    pub fn request_every(
        &self,
        method: &str,
        limit: Duration,
        resend: Duration,
    ) -> Result<Value, String> {
        let client = self.client.clone();
        let method = method.to_string();
        self.ns
            .run(limit + Duration::from_secs(1), move || async move {
                let reply_to = format!(
                    "director.{}",
                    client.new_inbox().trim_start_matches("_INBOX.")
                );
                let mut replies = client
                    .subscribe(reply_to.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())?;
                let body =
                    json!({"method": method, "arguments": [], "reply_to": reply_to, "protocol": 3});
                let deadline = tokio::time::Instant::now() + limit;
                loop {
                    client
                        .publish(format!("agent.{AGENT_ID}"), body.to_string().into())
                        .await
                        .map_err(|e| e.to_string())?;
                    let window =
                        resend.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                    if let Ok(Some(msg)) = tokio::time::timeout(window, replies.next()).await {
                        return serde_json::from_slice::<Value>(&msg.payload).map_err(|e| {
                            format!(
                                "reply is not JSON ({e}): {:?}",
                                String::from_utf8_lossy(&msg.payload)
                            )
                        });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(format!("no reply to {method} within {limit:?}"));
                    }
                }
            })
            .and_then(|r| r)
    }

    /// [`Director::request_every`] re-sending every 100 ms.
    pub fn request(&self, method: &str, limit: Duration) -> Result<Value, String> {
        self.request_every(method, limit, Duration::from_millis(100))
    }

    /// Pings until `{"value":"pong"}` comes back; returns how long it took. Panics otherwise.
    pub fn wait_pong(&self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        match self.request("ping", limit) {
            Ok(v) if v == json!({"value": "pong"}) => t0.elapsed(),
            Ok(v) => panic!("ping answered with {v}"),
            Err(e) => panic!("the agent did not answer ping: {e}"),
        }
    }

    /// The director's NATS client, for work of a test's own on [`Director::ns`] (sockets made
    /// there live in the sandbox's namespace).
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// A fresh `director.<nuid>` subject for `reply_to`.
    pub fn reply_subject(&self) -> String {
        format!(
            "director.{}",
            self.client.new_inbox().trim_start_matches("_INBOX.")
        )
    }

    /// Subscribes to `subject` (wildcards allowed, e.g. `hm.agent.>`); every message is
    /// forwarded to the returned channel, stamped with the time it arrived. The subscription
    /// is in place (the server has processed it) when this returns, and lives until the receiver is
    /// dropped and one more message arrives, or until the director is dropped.
    pub fn subscribe(&self, subject: &str) -> std_mpsc::Receiver<Received> {
        let client = self.client.clone();
        let subject = subject.to_string();
        let (tx, rx) = std_mpsc::channel();
        self.ns
            .run(Duration::from_secs(10), move || async move {
                let mut sub = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| format!("subscribe {subject}: {e}"))?;
                // `flush` only proves the SUB left the socket; a message the agent publishes
                // on its own connection could still reach the server first. A message to
                // ourselves is ordered after the SUB on this connection: once it is back, the
                // subscription is in place.
                let inbox = client.new_inbox();
                let mut echo = client
                    .subscribe(inbox.clone())
                    .await
                    .map_err(|e| format!("subscribe {inbox}: {e}"))?;
                client
                    .publish(inbox, Vec::new().into())
                    .await
                    .map_err(|e| format!("round trip after subscribing to {subject}: {e}"))?;
                echo.next()
                    .await
                    .ok_or_else(|| format!("no round trip after subscribing to {subject}"))?;
                drop(echo);
                tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let got = Received {
                            subject: msg.subject.to_string(),
                            payload: msg.payload.to_vec(),
                            at: Instant::now(),
                        };
                        if tx.send(got).is_err() {
                            break;
                        }
                    }
                });
                Ok::<(), String>(())
            })
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{e}"));
        rx
    }

    /// Sends `{"method","arguments","reply_to","protocol"}` to `agent.<AGENT_ID>` once and
    /// returns the parsed reply, or an error when none arrives within `limit`.
    pub fn call(
        &self,
        method: &str,
        arguments: Value,
        protocol: i64,
        limit: Duration,
    ) -> Result<Value, String> {
        let reply_to = self.reply_subject();
        let body = json!({"method": method, "arguments": arguments, "reply_to": reply_to,
                          "protocol": protocol});
        let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        match self.publish_raw(bytes, &reply_to, limit)? {
            Some(reply) => serde_json::from_slice(&reply).map_err(|e| {
                format!(
                    "reply to {method} is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&reply)
                )
            }),
            None => Err(format!("no reply to {method} within {limit:?}")),
        }
    }

    /// An asynchronous action as the director runs it: the request, then `get_task` every
    /// 100 ms until the task is no longer running; returns the final reply. A synchronous
    /// answer (no `agent_task_id`) is returned as it is.
    pub fn task(&self, method: &str, arguments: Value, limit: Duration) -> Result<Value, String> {
        let first = self.call(method, arguments, 3, Duration::from_secs(10))?;
        let Some(id) = first["value"]["agent_task_id"].as_str().map(str::to_string) else {
            return Ok(first);
        };
        let deadline = Instant::now() + limit;
        loop {
            let r = self.call("get_task", json!([id]), 3, Duration::from_secs(10))?;
            if r["value"]["state"] != "running" || r["value"]["agent_task_id"] != id.as_str() {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(format!("{method} task {id} still running after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Publishes `body` verbatim (any bytes) to `agent.<AGENT_ID>` while listening on
    /// `reply_to`; returns the first message there within `wait`, or `None`.
    pub fn publish_raw(
        &self,
        body: Vec<u8>,
        reply_to: &str,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
        let client = self.client.clone();
        let reply_to = reply_to.to_string();
        self.ns
            .run(wait + Duration::from_secs(5), move || async move {
                let mut replies = client
                    .subscribe(reply_to)
                    .await
                    .map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())?;
                client
                    .publish(format!("agent.{AGENT_ID}"), body.into())
                    .await
                    .map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())?;
                Ok(tokio::time::timeout(wait, replies.next())
                    .await
                    .ok()
                    .flatten()
                    .map(|m| m.payload.to_vec()))
            })
            .and_then(|r| r)
    }

    /// One ping, sent once: whether `{"value":"pong"}` came back within `limit`.
    pub fn ping_once(&self, limit: Duration) -> bool {
        matches!(
            self.request_every("ping", limit, limit),
            Ok(v) if v == json!({"value": "pong"})
        )
    }
}

/// A message received by a [`Director::subscribe`] subscription.
#[derive(Debug, Clone)]
pub struct Received {
    pub subject: String,
    pub payload: Vec<u8>,
    /// When the director's thread took it from the connection.
    pub at: Instant,
}

impl Received {
    /// The payload as JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            format!(
                "{} payload is not JSON ({e}): {:?}",
                self.subject,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

/// settings.json in upstream's format, URLs in `env.bosh.mbus.urls`.
pub fn settings(urls: &[String], ca: &str, client: &Leaf) -> Value {
    json!({
        "agent_id": AGENT_ID,
        "mbus": urls.first().cloned().unwrap_or_default(),
        "env": {"bosh": {"mbus": {"urls": urls, "cert": {
            "ca": ca, "certificate": client.cert_pem, "private_key": client.key_pem}}}}
    })
}

/// Starts the agent in `cg` with `settings` and the NATS firewall on or off; it resolves
/// names through the sandbox's dnsmasq (`BOSH_AGENT_RESOLV_CONF`). Waits for the first
/// firewall apply only: the bus connects in the background.
pub fn start_agent(sb: &Sandbox, cg: &CgroupDir, settings: &Value, nats_firewall: bool) -> Agent {
    start_agent_with(sb, cg, settings, nats_firewall, &json!({}))
}

/// [`start_agent`] with more `Platform.Linux` keys of agent.json (`linux`, an object), e.g.
/// `{"HeartbeatIntervalSeconds": 1}`; they override the defaults of [`start_agent`].
pub fn start_agent_with(
    sb: &Sandbox,
    cg: &CgroupDir,
    settings: &Value,
    nats_firewall: bool,
    linux: &Value,
) -> Agent {
    let exec = agent_exec_with(sb, cg, settings, nats_firewall, linux);
    let mut agent = sb.spawn_agent(&exec).expect("spawn agent");
    agent
        .wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("agent not ready: {e}"));
    agent
}

/// The command [`start_agent_with`] runs (settings.json, resolv.conf and agent.json written),
/// for a test that adds to it (e.g. `BOSH_AGENT_NFT`) before spawning.
pub fn agent_exec_with(
    sb: &Sandbox,
    cg: &CgroupDir,
    settings: &Value,
    nats_firewall: bool,
    linux: &Value,
) -> Exec {
    let dir = sb.dir();
    let settings_path = dir.join("settings.json");
    std::fs::write(
        &settings_path,
        serde_json::to_vec_pretty(settings).expect("settings JSON"),
    )
    .expect("write settings.json");
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .expect("write resolv.conf");
    let mut config = json!({
        "Platform": {"Linux": {"EnableNATSFirewall": nats_firewall,
                               "Firewall": {"ReconcileIntervalSeconds": 1}}},
        "Infrastructure": {"Settings": {"Sources": [
            {"Type": "File", "SettingsPath": settings_path.display().to_string()}]}}
    });
    if let (Some(extra), Some(dst)) = (
        linux.as_object(),
        config["Platform"]["Linux"].as_object_mut(),
    ) {
        for (k, v) in extra {
            dst.insert(k.clone(), v.clone());
        }
    }
    sb.agent_exec(cg, &config.to_string())
        .expect("agent command")
        .env("BOSH_AGENT_RESOLV_CONF", &resolv)
}

// ---------------------------------------------------------------------------------------------
// nft

/// The elements of set `nats_v4` or `nats_v6` of `inet bosh_agent`, sorted; `None` when the
/// set does not exist.
pub fn nats_set(sb: &Sandbox, set: &str) -> Option<Vec<SocketAddr>> {
    let listing = sb
        .nft_json(&["set", "inet", "bosh_agent", set])
        .unwrap_or_else(|e| panic!("listing set {set}: {e}"))?;
    let mut out = Vec::new();
    for obj in listing["nftables"].as_array().into_iter().flatten() {
        let Some(s) = obj.get("set") else { continue };
        for e in s["elem"].as_array().into_iter().flatten() {
            // Plain `{"concat": [addr, port]}`, or wrapped as `{"elem": {"val": …}}`.
            let c = e
                .get("concat")
                .or_else(|| e.get("elem").and_then(|x| x.get("val")?.get("concat")))
                .unwrap_or_else(|| panic!("unexpected element {e} in {set}"));
            let ip: IpAddr = c[0]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad address in {e}"));
            let port = c[1]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("bad port in {e}"));
            out.push(SocketAddr::new(ip, port));
        }
    }
    out.sort();
    Some(out)
}

/// Both NATS sets together (empty when absent).
pub fn nats_endpoints(sb: &Sandbox) -> Vec<SocketAddr> {
    let mut v = nats_set(sb, "nats_v4").unwrap_or_default();
    v.extend(nats_set(sb, "nats_v6").unwrap_or_default());
    v.sort();
    v
}

/// Whether chain `chain` of `inet bosh_agent` exists.
pub fn chain_exists(sb: &Sandbox, chain: &str) -> bool {
    sb.nft_json(&["chain", "inet", "bosh_agent", chain])
        .unwrap_or_else(|e| panic!("listing chain {chain}: {e}"))
        .is_some()
}

/// Waits until the NATS sets hold exactly `want`.
pub fn wait_endpoints(sb: &Sandbox, want: &[SocketAddr], limit: Duration) {
    let mut want = want.to_vec();
    want.sort();
    let mut last = Vec::new();
    let res = wait_for("the NATS sets", limit, || {
        last = nats_endpoints(sb);
        Ok((last == want).then_some(()))
    });
    if let Err(e) = res {
        panic!("{e}: want {want:?}, have {last:?}");
    }
}

/// The status JSON once `pred` holds (the agent writes its bus counters every reconcile).
pub fn status_when(
    sb: &Sandbox,
    what: &str,
    limit: Duration,
    pred: impl Fn(i32, &Value) -> bool,
) -> (i32, Value) {
    let mut last = None;
    let res = wait_for(what, limit, || {
        let (code, v) = sb.status()?;
        let ok = pred(code, &v);
        last = Some((code, v.clone()));
        Ok(ok.then_some((code, v)))
    });
    res.unwrap_or_else(|e| panic!("{e}; last status: {last:#?}"))
}
