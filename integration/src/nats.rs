//! Real parts for the NATS firewall tests, all inside one [`Sandbox`]'s network namespace:
//! testkit's PKI, `nats-server` (TLS `verify: true`, user/password auth) in cgroup `nats`, a
//! dnsmasq serving the director's name on 127.0.0.1:53 in cgroup `dns`, a director client,
//! and helpers to start the agent with a settings.json and to read the NATS sets.
//!
//! The director client runs in this test process, on a thread of its own that has entered
//! the sandbox's network namespace (testkit's [`InNetns`]): its sockets live in the namespace
//! but belong to the test process's cgroup, never to the agent's. It dials the nats-server on
//! an address the agent does not dial (127.0.0.3), so the NATS firewall, which guards exactly
//! the agent's (address, port) pairs, leaves it alone.
//!
//! The types here are testkit's, placed in the sandbox; their constructors and the waits a
//! test cannot go on without panic with testkit's error (the tests' convenience), the rest
//! return it.

use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use crate::{Agent, CgroupDir, Exec, READY_TIMEOUT, Sandbox, wait_for};
use serde_json::{Value, json};
pub use testkit::director::{InNetns, Received};
pub use testkit::dns::DNSMASQ;
pub use testkit::nats::{Cluster, NATS_SERVER, PASSWORD as NATS_PASSWORD, USER as NATS_USER};
pub use testkit::pki::Leaf;

/// The CN upstream's rule accepts (`*.nats.bosh-internal`).
pub const NATS_CN: &str = "default.nats.bosh-internal";
pub const AGENT_ID: &str = "a1";
/// The director's name, served by the test's dnsmasq.
pub const DIRECTOR_NAME: &str = "director.bosh";
/// Where the director client dials: a loopback address no agent URL names.
pub const DIRECTOR_SIDE: &str = "127.0.0.3:4222";

pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s}: {e}"))
}

pub fn nats_url(host_port: &str) -> String {
    testkit::nats::url(host_port)
}

// ---------------------------------------------------------------------------------------------
// PKI

/// testkit's [`testkit::pki::Pki`], panicking on failure.
pub struct Pki(testkit::pki::Pki);

impl Pki {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Self {
        Pki(testkit::pki::Pki::new(name).unwrap_or_else(|e| panic!("test CA {name}: {e}")))
    }

    /// See [`testkit::pki::Pki::server`].
    pub fn server(&self, cn: &str) -> Leaf {
        self.0.server(cn).unwrap_or_else(|e| panic!("{e}"))
    }

    /// See [`testkit::pki::Pki::client`].
    pub fn client(&self, cn: &str) -> Leaf {
        self.0.client(cn).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Deref for Pki {
    type Target = testkit::pki::Pki;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

// ---------------------------------------------------------------------------------------------
// nats-server

/// A nats-server in the sandbox's namespace (cgroup `nats`, files in `<sandbox>/nats-<label>`).
pub struct NatsServer(testkit::nats::NatsServer);

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
        let config = testkit::nats::NatsConfig {
            listen: addr(listen),
            cn: cn.to_string(),
            cluster,
            extra: extra.to_string(),
        };
        let place = sb.place("nats").expect("nats cgroup");
        let dir = sb.dir().join(format!("nats-{label}"));
        NatsServer(
            testkit::nats::NatsServer::start(pki, &config, &dir, label, &place)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// Stops the server (SIGTERM; its clients see their connections close).
    pub fn stop(&mut self) {
        self.0.stop().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts it again with the same configuration.
    pub fn restart(&mut self) {
        self.0.restart().unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Deref for NatsServer {
    type Target = testkit::nats::NatsServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for NatsServer {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

// ---------------------------------------------------------------------------------------------
// dnsmasq

/// dnsmasq on 127.0.0.1:53 inside the sandbox (cgroup `dns`), see [`testkit::dns::Dns`].
pub struct Dns(testkit::dns::Dns);

impl Dns {
    pub fn start(sb: &Sandbox, name: &str, ip: IpAddr) -> Self {
        let place = sb.place("dns").expect("dns cgroup");
        let dns = testkit::dns::Dns::start(
            &sb.dir().join("dns"),
            addr("127.0.0.1:53"),
            &place,
            name,
            ip,
        );
        Dns(dns.unwrap_or_else(|e| panic!("{e}")))
    }

    /// Re-points `name`.
    pub fn point(&self, name: &str, ip: IpAddr) {
        self.0.point(name, ip).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Re-points `name` to all of `ips` at once.
    pub fn point_all(&self, name: &str, ips: &[IpAddr]) {
        self.0
            .point_all(name, ips)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn stop(&mut self) {
        self.0.stop().expect("stop dnsmasq");
    }
}

// ---------------------------------------------------------------------------------------------
// DNS answers from inside the sandbox

/// Asking the sandbox's dnsmasq (127.0.0.1:53) from an [`InNetns`] thread, with the agent's
/// own fresh resolver.
pub trait SandboxDns {
    /// The addresses answered for `name`; `Err` with the reason when there is no answer.
    fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String>;
    /// Waits until dnsmasq answers exactly `ip` for `name`; panics after 10 s.
    fn wait_answer(&self, name: &str, ip: IpAddr);
}

impl SandboxDns for InNetns {
    fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let url = format!("nats://{name}:4222");
        self.try_run(Duration::from_secs(5), move || async move {
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
        })
        .map_err(String::from)
    }

    fn wait_answer(&self, name: &str, ip: IpAddr) {
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

/// A thread inside the sandbox's network namespace; panics when it cannot start.
pub fn in_netns(sb: &Sandbox) -> InNetns {
    InNetns::new(sb.netns().file()).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// The director

/// The options of a director that dials `to` in the sandbox as `name`: a client certificate
/// from `pki`, the server checked with the agent's own TLS rules (upstream's CN rule).
pub fn director_options(pki: &Pki, name: &str, to: &str) -> testkit::director::DirectorOptions {
    let leaf = pki.client(name);
    let cert = mbus::CertKeyPair {
        ca: pki.ca_pem.clone(),
        certificate: leaf.cert_pem,
        private_key: leaf.key_pem,
        origin: "director",
    };
    testkit::director::DirectorOptions {
        url: format!("tls://{to}"),
        tls: mbus::tls::client_config(&cert).unwrap_or_else(|e| panic!("director TLS: {e}")),
        user: NATS_USER.into(),
        password: NATS_PASSWORD.into(),
        agent_id: AGENT_ID.into(),
        connect_for: Duration::from_secs(10),
    }
}

/// testkit's director, connected from outside the agent's cgroup to [`DIRECTOR_SIDE`] or
/// another address of the sandbox.
pub struct Director(testkit::director::Director);

impl Director {
    /// Connects (retrying for up to 10 s: a just-started cluster may still be forming).
    pub fn connect(sb: &Sandbox, pki: &Pki, to: &str) -> Self {
        let opts = director_options(pki, "director", to);
        Director(
            testkit::director::Director::connect(Some(sb.netns().file()), opts)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// Pings until `{"value":"pong"}` comes back; returns how long it took. Panics otherwise.
    pub fn wait_pong(&self, limit: Duration) -> Duration {
        self.0.wait_pong(limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// See [`testkit::director::Director::subscribe`]; panics when it cannot subscribe.
    pub fn subscribe(&self, subject: &str) -> std_mpsc::Receiver<Received> {
        self.0.subscribe(subject).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Deref for Director {
    type Target = testkit::director::Director;
    fn deref(&self) -> &Self::Target {
        &self.0
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
