//! A fleet of real agents on a three-node nats-server cluster, for `bench-fleet` and the
//! fleet test.
//!
//! Layout, all made here and removed on drop:
//! - the director's network namespace (the [`Sandbox`]'s): a bridge `br0` with 10.77.0.1/16,
//!   the three nodes' client addresses 10.77.0.11–13 (port 4222, mutual TLS, user/password),
//!   their route addresses (port 6222, one cluster) and monitoring ports (8222, for
//!   `/connz`), and the director's client;
//! - one network namespace per agent, joined to the bridge by one veth (`eth0`,
//!   10.77.x.y/16, default route via 10.77.0.1), with the agent in a cgroup of its own (so
//!   its NATS firewall matches it alone), its own base, run and certificate directories, and
//!   an audit table [`AUDIT_TABLE`] that records every (address, port) a TCP SYN leaves the
//!   namespace for, and a real monit of its own (the job state of its heartbeats).
//!
//! Why a bridge and one veth per agent: an agent needs a namespace of its own (its firewall
//! and its table are per namespace), and a bridge keeps the director's side to one subnet and
//! one interface that the nodes listen on, with no route per agent; a veth costs the kernel a
//! few kilobytes and no process, so 200 of them are cheap on 2 cores.
//!
//! Each node advertises (`client_advertise`, sent to clients in INFO `connect_urls`) an
//! address of its own in 10.78.0.0/24, reachable through the default route but named in no
//! agent's settings: an agent that followed `connect_urls` would dial an address its table
//! has no rule for, and the audit would show it.
//!
//! Processes are stopped by pid; fields drop in order: director, agents (each agent's
//! process before its namespace), nodes, sandbox.

pub mod director;
pub mod observe;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use testkit::io_ctx;
use testkit::nats::{NatsConfig, NatsServer};

use crate::nats::{NATS_CN, Pki, director_options, nats_url};
use crate::{CgroupDir, Error, Exec, Netns, Proc, Result, Sandbox, describe, err};

pub use director::{FleetDirector, LoadResult, PingLoad, PingRound};
pub use observe::{AgentConn, DialAudit};

/// The nodes of the cluster.
pub const NODES: usize = 3;
/// The audit table in every agent's namespace.
pub const AUDIT_TABLE: &str = "fleet_audit";
/// The most agents one fleet can hold (addresses 10.77.1.1 … 10.77.100.250).
pub const MAX_AGENTS: usize = 25_000;
/// nats-server's `tls { timeout }` on the fleet's nodes,
/// unless [`FleetOptions::tls_timeout`] says otherwise. The director's own nats job uses
/// nats-server's default of 2 s; on a 2-core machine running a few hundred agents, their
/// monits, three nodes and the director, a handshake that lands in a burst of others waits
/// for CPU longer than that, the server drops it, the agent retries, and the retries keep
/// the CPU busy: a collapse, not a measurement. 10 s lets a burst of 200 handshakes finish.
pub const DEFAULT_TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// Each agent id with the index of the node it is subscribed on and that connection.
pub type Placements = HashMap<String, (usize, AgentConn)>;

/// What a fleet is made of.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How many agents.
    pub agents: usize,
    /// Their `Platform.Linux.HeartbeatIntervalSeconds`.
    pub heartbeat_seconds: u64,
    /// The sandbox's name (for messages).
    pub name: String,
    /// nats-server's TLS handshake timeout on every node (its authorization timeout follows:
    /// see [`tls_override`]); [`DEFAULT_TLS_TIMEOUT`] is the usual value. At least 1 ms.
    pub tls_timeout: Duration,
    /// The agents' `BOSH_AGENT_MBUS_RETURN_HOME_MS` (`MIN-MAX` or `off`); `None` leaves the
    /// agent's default (60–300 s), longer than a test runs.
    pub return_home: Option<String>,
}

impl FleetOptions {
    /// `agents` agents named `name`, heartbeats every 2 s, the default TLS timeout.
    pub fn new(agents: usize, name: &str) -> Self {
        FleetOptions {
            agents,
            heartbeat_seconds: 2,
            name: name.to_string(),
            tls_timeout: DEFAULT_TLS_TIMEOUT,
            return_home: None,
        }
    }
}

/// One node of the cluster.
pub struct Node {
    /// Where clients dial it (in the agents' settings).
    pub client: SocketAddr,
    /// What it advertises in `connect_urls` (in no agent's settings).
    pub advertised: SocketAddr,
    /// Its monitoring endpoint (`/connz`).
    pub monitor: SocketAddr,
    server: NatsServer,
    dir: PathBuf,
}

impl Node {
    /// Whether it is running.
    pub fn running(&self) -> bool {
        self.server.running()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Everything it logged, over every start (its log files in start order).
    pub fn logs(&self) -> String {
        let mut files: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name
                    .strip_prefix("nats-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, p)| fs::read_to_string(p).ok())
            .collect()
    }
}

/// One agent of the fleet.
pub struct FleetAgent {
    /// Its `agent_id`.
    pub id: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    proc: Option<Proc>,
    exec: Exec,
    monit: Option<Proc>,
    monit_exec: Exec,
    netns: Netns,
    cgroup: CgroupDir,
}

impl FleetAgent {
    /// The agent's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The agent's cgroup.
    pub fn cgroup(&self) -> &CgroupDir {
        &self.cgroup
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Its monit's process id while it runs.
    pub fn monit_pid(&self) -> Option<u32> {
        self.monit.as_ref().map(Proc::pid)
    }

    /// Its log so far (empty before it was started).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

/// The whole world (see the module documentation).
pub struct Fleet {
    director: Option<FleetDirector>,
    agents: Vec<FleetAgent>,
    nodes: Vec<Node>,
    _pki: Pki,
    sb: Sandbox,
}

/// The bridge's address, fixed (a bridge with an address set keeps it as ports join), so the
/// agents' neighbour entries for it can be written before any packet flows.
const BRIDGE_MAC: &str = "02:77:00:00:00:01";

/// The MAC address of agent `i`'s `eth0` (unique up to 65,536 agents).
fn agent_mac(i: usize) -> String {
    format!("02:77:01:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff)
}

fn node_ip(i: usize, net: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 0, 11 + i as u8)
}

/// The address of agent `i` (0-based): 10.77.(1 + i/250).(1 + i%250).
pub fn agent_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (1 + i / 250) as u8, (1 + i % 250) as u8)
}

/// The agent id of agent `i`.
pub fn agent_id(i: usize) -> String {
    format!("fleet-{i:03}")
}

/// Runs `cmd`, an error with its output when it fails.
fn run(cmd: std::process::Command, what: &str) -> Result<()> {
    let out = crate::run_with_timeout(cmd, crate::COMMAND_TIMEOUT, what)?;
    if !out.status.success() {
        return err(format!("{what}: {}", describe(&out)));
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(io_ctx(format!("writing {}", path.display())))
}

/// The audit table: every SYN that leaves the namespace (not on `lo`) adds its destination.
fn audit_script() -> String {
    format!(
        "table inet {AUDIT_TABLE} {{\n\
         \tset dials4 {{ type ipv4_addr . inet_service; flags dynamic; size 65535; }}\n\
         \tset dials6 {{ type ipv6_addr . inet_service; flags dynamic; size 65535; }}\n\
         \tchain out {{\n\
         \t\ttype filter hook output priority -300; policy accept;\n\
         \t\toifname \"lo\" accept\n\
         \t\tmeta nfproto ipv4 tcp flags & (syn | ack) == syn add @dials4 {{ ip daddr . tcp dport }}\n\
         \t\tmeta nfproto ipv6 tcp flags & (syn | ack) == syn add @dials6 {{ ip6 daddr . tcp dport }}\n\
         \t}}\n\
         }}\n"
    )
}

impl Fleet {
    /// Builds the network, starts the three nodes and the director, and prepares (does not
    /// start) `opts.agents` agents; see [`Fleet::spawn_agents`].
    pub fn build(opts: &FleetOptions) -> Result<Fleet> {
        if opts.agents == 0 || opts.agents > MAX_AGENTS {
            return err(format!(
                "a fleet holds 1 to {MAX_AGENTS} agents, not {}",
                opts.agents
            ));
        }
        let sb = Sandbox::new(&opts.name)?;
        let pki = Pki::new("fleet ca");
        // The director's side of the bridge and the nodes' addresses.
        let mut batch = format!("link add br0 address {BRIDGE_MAC} type bridge\nlink set br0 up\n");
        batch.push_str("addr add 10.77.0.1/16 dev br0\n");
        for i in 0..NODES {
            let _ = writeln!(batch, "addr add {}/16 dev br0", node_ip(i, 77));
            let _ = writeln!(batch, "addr add {}/32 dev br0", node_ip(i, 78));
        }
        let path = sb.dir().join("director.ip");
        write(&path, &batch)?;
        run(
            sb.netns()
                .command([PathBuf::from("ip"), "-b".into(), path.clone()]),
            "setting up the director's bridge",
        )?;
        if opts.tls_timeout < Duration::from_millis(1) {
            return err(format!(
                "a TLS timeout of {:?} is below nats-server's resolution (1 ms)",
                opts.tls_timeout
            ));
        }
        let nodes = (0..NODES)
            .map(|i| start_node(&sb, &pki, i, opts.tls_timeout))
            .collect::<Result<Vec<_>>>()?;
        let client = pki.client("agent");
        let agents = (0..opts.agents)
            .map(|i| prepare_agent(&sb, &pki, &client, i, opts, &nodes))
            .collect::<Result<Vec<_>>>()?;
        link_agents(&sb, &agents)?;
        // The director dials the last node.
        let mut dopts = director_options(&pki, "director", &nodes[NODES - 1].client.to_string());
        dopts.connect_for = Duration::from_secs(20);
        let director = FleetDirector::connect(sb.netns().file(), dopts)?;
        Ok(Fleet {
            director: Some(director),
            agents,
            nodes,
            _pki: pki,
            sb,
        })
    }

    /// The sandbox (the director's namespace, the cgroups, the directory).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sb
    }

    /// The agents.
    pub fn agents(&self) -> &[FleetAgent] {
        &self.agents
    }

    /// The ids of every agent.
    pub fn ids(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.id.clone()).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The director.
    pub fn director(&self) -> &FleetDirector {
        // Only `Drop` takes it.
        self.director
            .as_ref()
            .unwrap_or_else(|| unreachable!("the director lives as long as the fleet"))
    }

    /// Starts every agent that is not running (see [`Fleet::spawn_range`]).
    pub fn spawn_agents(&mut self) -> Result<Instant> {
        self.spawn_range(0..self.agents.len())
    }

    /// Starts the monit, then the agent, of each agent in `range` that is not running, one
    /// after the other; returns when the first agent was spawned.
    pub fn spawn_range(&mut self, range: std::ops::Range<usize>) -> Result<Instant> {
        let end = range.end.min(self.agents.len());
        let start = range.start.min(end);
        for a in &mut self.agents[start..end] {
            if a.monit.is_none() {
                a.monit = Some(a.monit_exec.spawn()?);
            }
        }
        let t0 = Instant::now();
        for a in &mut self.agents[start..end] {
            if a.proc.is_none() {
                a.proc = Some(a.exec.spawn()?);
            }
        }
        Ok(t0)
    }

    /// Agents whose process has exited, with their exit status and log tail.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for a in &mut self.agents {
            if let Some(p) = a.proc.as_mut()
                && let Ok(Some(st)) = p.try_status()
            {
                out.push(format!(
                    "{} exited ({st}); log tail:\n{}",
                    a.id,
                    crate::bench::tail(&p.log_text(), 15)
                ));
            }
        }
        out
    }

    /// Stops node `i` (SIGTERM; its clients see their connections close); returns when it
    /// had exited.
    pub fn stop_node(&mut self, i: usize) -> Result<Instant> {
        self.node_mut(i)?.server.stop()
    }

    /// Kills node `i` (SIGKILL: no goodbye; the kernel closes its sockets, so its clients
    /// see their connections end at once); returns when it had exited.
    pub fn kill_node(&mut self, i: usize) -> Result<Instant> {
        self.node_mut(i)?.server.kill()?;
        Ok(Instant::now())
    }

    /// Starts node `i` again (same addresses and certificate); returns when it said it is
    /// ready.
    pub fn start_node(&mut self, i: usize) -> Result<Instant> {
        let n = self.node_mut(i)?;
        n.server.spawn()?;
        n.server.wait_ready(Duration::from_millis(5))
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node> {
        self.nodes
            .get_mut(i)
            .ok_or_else(|| Error(format!("no node {i} (the cluster has {NODES})")))
    }

    /// The agents' connections on every running node: `(node index, connection)`.
    pub fn connz(&self) -> Result<Vec<(usize, AgentConn)>> {
        let bodies = self.monitor_get("/connz?subs=1&limit=100000")?;
        let mut out = Vec::new();
        for (i, v) in bodies {
            for c in observe::agent_conns(&v).map_err(Error)? {
                out.push((i, c));
            }
        }
        Ok(out)
    }

    /// `/varz` of every running node: `(node index, body)`.
    pub fn varz(&self) -> Result<Vec<(usize, Value)>> {
        self.monitor_get("/varz")
    }

    /// One monitoring-endpoint `path` of every running node, asked from the director's
    /// namespace: `(node index, body)`.
    fn monitor_get(&self, path: &'static str) -> Result<Vec<(usize, Value)>> {
        let monitors: Vec<(usize, SocketAddr)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.running())
            .map(|(i, n)| (i, n.monitor))
            .collect();
        self.director()
            .ns()
            .try_run(Duration::from_secs(20), move || async move {
                let mut out = Vec::new();
                for (i, m) in monitors {
                    out.push((i, http_get_json(m, path).await?));
                }
                Ok::<_, Error>(out)
            })
    }

    /// Which node each subscribed agent is on (by agent id).
    pub fn placement(&self) -> Result<HashMap<String, usize>> {
        Ok(self
            .connz()?
            .into_iter()
            .map(|(i, c)| (c.agent_id, i))
            .collect())
    }

    /// Each agent's first node: the first of its own dial order over the nodes' client
    /// addresses as its settings list them ([`mbus::dial_order`]), where it connects when all
    /// nodes are up and whither it returns.
    pub fn homes(&self) -> HashMap<String, usize> {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.client).collect();
        self.agents
            .iter()
            .map(|a| {
                let order = mbus::dial_order(
                    &a.id,
                    &addrs,
                    mbus::BusOptions::default().max_dials_per_attempt,
                );
                (a.id.clone(), order.first().copied().unwrap_or(0))
            })
            .collect()
    }

    /// Polls `/connz` every `poll` until every agent is subscribed exactly once, on its home
    /// node ([`Fleet::homes`]); returns when that was seen, with each agent's connection. An
    /// error after `limit` names the agents still elsewhere (or on two nodes).
    pub fn wait_home(&mut self, limit: Duration, poll: Duration) -> Result<(Instant, Placements)> {
        let homes = self.homes();
        let deadline = Instant::now() + limit;
        loop {
            let mut seen: HashMap<String, Vec<(usize, AgentConn)>> = HashMap::new();
            for (i, c) in self.connz()? {
                seen.entry(c.agent_id.clone()).or_default().push((i, c));
            }
            let away: Vec<String> = homes
                .iter()
                .filter(|(id, home)| {
                    !matches!(seen.get(*id).map(Vec::as_slice), Some([(n, _)]) if n == *home)
                })
                .map(|(id, _)| id.clone())
                .collect();
            if away.is_empty() {
                let placed = seen
                    .into_iter()
                    .filter_map(|(id, mut v)| v.pop().map(|c| (id, c)))
                    .collect();
                return Ok((Instant::now(), placed));
            }
            let exited = self.exited();
            if !exited.is_empty() {
                return err(format!("agents exited:\n{}", exited.join("\n")));
            }
            if Instant::now() >= deadline {
                let mut away = away;
                away.sort();
                return err(format!(
                    "{} of {} agents not back on their first node within {limit:?}: {away:?}",
                    away.len(),
                    homes.len()
                ));
            }
            std::thread::sleep(poll);
        }
    }

    /// Polls `/connz` every `poll` until every agent of `ids` is subscribed on a running node
    /// with a connection accepted at or after `since` (any connection when `None`); returns
    /// when that was seen and the connections. An error after `limit` names the agents still
    /// missing.
    pub fn wait_subscribed(
        &mut self,
        ids: &[String],
        since: Option<SystemTime>,
        limit: Duration,
        poll: Duration,
    ) -> Result<(Instant, Placements)> {
        let deadline = Instant::now() + limit;
        loop {
            let mut now: Placements = HashMap::new();
            for (i, c) in self.connz()? {
                if since.is_none_or(|s| c.start >= s) {
                    now.insert(c.agent_id.clone(), (i, c));
                }
            }
            let missing: Vec<&String> = ids.iter().filter(|id| !now.contains_key(*id)).collect();
            if missing.is_empty() {
                return Ok((Instant::now(), now));
            }
            let exited = self.exited();
            if !exited.is_empty() {
                return err(format!("agents exited:\n{}", exited.join("\n")));
            }
            if Instant::now() >= deadline {
                let first = missing.first().map(|s| s.as_str()).unwrap_or("");
                let log = self
                    .agents
                    .iter()
                    .find(|a| a.id == first)
                    .map(|a| crate::bench::tail(&a.log(), 15))
                    .unwrap_or_default();
                return err(format!(
                    "{} of {} agents not subscribed within {limit:?}: {missing:?}; log of {first}:\n{log}",
                    missing.len(),
                    ids.len()
                ));
            }
            std::thread::sleep(poll);
        }
    }

    /// Every agent's audit: where it dialled and what its table guards, in fleet order.
    pub fn audit(&self) -> Result<Vec<DialAudit>> {
        let mut out = Vec::with_capacity(self.agents.len());
        // A few at a time: 200 nft processes at once would only queue on 2 cores.
        for chunk in self.agents.chunks(8) {
            let mut pending = Vec::new();
            for a in chunk {
                let p = Exec::new(["nft", "-j", "list", "ruleset"])
                    .netns(a.netns.file())
                    .start()?;
                pending.push((a, p));
            }
            for (a, p) in pending {
                out.push(audit_one(a, p)?);
            }
        }
        Ok(out)
    }

    /// SIGTERM to every agent, then waits for each (SIGKILL after `grace`).
    pub fn stop_agents(&mut self, grace: Duration) {
        for a in &mut self.agents {
            if let Some(p) = a.proc.as_mut() {
                let _ = p.signal(nix::sys::signal::Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for a in &mut self.agents {
            if let Some(mut p) = a.proc.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                // Dropping `p` kills it by pid if it is still running.
                let _ = p.wait_timeout(left.max(Duration::from_millis(1)));
            }
            // Killed by pid on drop.
            a.monit.take();
        }
    }
}

fn audit_one(a: &FleetAgent, p: testkit::Pending) -> Result<DialAudit> {
    let out = p.wait(crate::COMMAND_TIMEOUT)?;
    if !out.status.success() {
        return err(format!(
            "nft list ruleset in {}'s namespace: {}",
            a.id,
            describe(&out)
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error(format!("nft -j list ruleset of {}: {e}", a.id)))?;
    DialAudit::from_ruleset(&a.id, &v).map_err(Error)
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.director.take();
        self.stop_agents(Duration::from_secs(5));
    }
}

fn start_node(sb: &Sandbox, pki: &Pki, i: usize, tls_timeout: Duration) -> Result<Node> {
    let client = SocketAddr::from((node_ip(i, 77), 4222));
    let advertised = SocketAddr::from((node_ip(i, 78), 4222));
    let monitor = SocketAddr::from((node_ip(i, 77), 8222));
    let routes: Vec<String> = (0..NODES)
        .filter(|j| *j != i)
        .map(|j| format!("\"nats-route://{}:6222\"", node_ip(j, 77)))
        .collect();
    let label = format!("node{i}");
    let dir = sb.dir().join(&label);
    // testkit's cluster block sets `no_advertise`; this one advertises (the point here).
    let mut extra = format!(
        "client_advertise: \"{advertised}\"\n\
         http: \"{monitor}\"\n\
         cluster {{\n  name: \"bosh\"\n  listen: \"{}:6222\"\n  routes: [{}]\n}}\n",
        node_ip(i, 77),
        routes.join(", ")
    );
    extra.push_str(&tls_override(&dir, tls_timeout));
    let config = NatsConfig {
        listen: client,
        cn: NATS_CN.to_string(),
        cluster: None,
        extra,
    };
    let place = sb.place("nats")?;
    let mut server = NatsServer::prepare(pki, &config, &dir, &label, &place)?;
    server.spawn()?;
    server.wait_ready(Duration::from_millis(5))?;
    Ok(Node {
        client,
        advertised,
        monitor,
        server,
        dir,
    })
}

/// The `tls` block again, with `timeout` (seconds). testkit renders it with nats-server's
/// default of 2 s; nats-server keeps the last value of a key, so this one, appended after,
/// replaces it whole (hence the certificate files once more: the same as testkit's, in the
/// node's directory). The authorization timeout is left unset: nats-server then makes it the
/// TLS timeout plus 1 s (it counts from the accept, so it must cover the handshake); the
/// fleet test reads both back from `/varz`.
pub fn tls_override(dir: &Path, timeout: Duration) -> String {
    format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: {}\n}}\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display(),
        dir.join("ca.pem").display(),
        timeout.as_secs_f64(),
    )
}

fn prepare_agent(
    sb: &Sandbox,
    pki: &Pki,
    client: &testkit::pki::Leaf,
    i: usize,
    opts: &FleetOptions,
    nodes: &[Node],
) -> Result<FleetAgent> {
    let id = agent_id(i);
    let dir = sb.dir().join(&id);
    for sub in ["base", "run", "ca-certificates"] {
        fs::create_dir_all(dir.join(sub)).map_err(io_ctx(format!("creating {id}/{sub}")))?;
    }
    let netns = Netns::create(&dir.join("netns"))?;
    let cgroup = sb.cgroup(&id)?;
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| nats_url(&n.client.to_string()))
        .collect();
    let settings = json!({
        "agent_id": id,
        "mbus": urls.first().cloned().unwrap_or_default(),
        "env": {"bosh": {"mbus": {"urls": urls, "cert": {
            "ca": pki.ca_pem, "certificate": client.cert_pem, "private_key": client.key_pem}}}}
    });
    let settings_path = dir.join("settings.json");
    write(&settings_path, &settings.to_string())?;
    let config = json!({
        "Platform": {"Linux": {"EnableNATSFirewall": true,
                               "HeartbeatIntervalSeconds": opts.heartbeat_seconds}},
        "Infrastructure": {"Settings": {"Sources": [
            {"Type": "File", "SettingsPath": settings_path.display().to_string()}]}}
    });
    let conf = dir.join("agent.json");
    write(&conf, &config.to_string())?;
    // No name to resolve (the URLs are addresses), so the host's resolver is never asked.
    let resolv = dir.join("resolv.conf");
    write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )?;
    let base = dir.join("base");
    let monit = monit_exec(sb, &dir, &netns, &id)?;
    let exec = Exec::new([
        sb.tools().agent.as_os_str(),
        "-P".as_ref(),
        "ubuntu".as_ref(),
        "-C".as_ref(),
        conf.as_os_str(),
        "-b".as_ref(),
        base.as_os_str(),
    ])
    .netns(netns.file())
    .cgroup(cgroup.path())
    .log(&dir.join("agent.log"))
    .env("BOSH_AGENT_RUN_DIR", dir.join("run"))
    .env("BOSH_AGENT_RESOLV_CONF", &resolv)
    .env("BOSH_AGENT_CA_CERTS_DIR", dir.join("ca-certificates"))
    .env("BOSH_AGENT_UPDATE_CA_CERTIFICATES", "/bin/true");
    let exec = match &opts.return_home {
        Some(window) => exec.env("BOSH_AGENT_MBUS_RETURN_HOME_MS", window),
        None => exec,
    };
    Ok(FleetAgent {
        id,
        ip: agent_ip(i),
        proc: None,
        exec,
        monit: None,
        monit_exec: monit,
        netns,
        cgroup,
    })
}

/// A real monit for the agent (Debian's, HTTP API on 127.0.0.1:2822 of the agent's namespace,
/// no checks, in a cgroup of its own): the agent asks it for the job state of every heartbeat,
/// and without one each heartbeat would wait out upstream's retries (20 × 1 s, twice).
fn monit_exec(sb: &Sandbox, dir: &Path, netns: &Netns, id: &str) -> Result<Exec> {
    let binary = testkit::monit::monit_binary()?;
    let user_file = dir.join("base").join("monit").join("monit.user");
    if let Some(d) = user_file.parent() {
        fs::create_dir_all(d).map_err(io_ctx(format!("creating {}", d.display())))?;
    }
    // The agent keeps a valid monit.user; monit reads it when it starts.
    let secret: String = format!("{:016x}", rand_u64());
    write(&user_file, &format!("vcap:{secret}"))?;
    let run_dir = dir.join("monit-run");
    fs::create_dir_all(&run_dir).map_err(io_ctx(format!("creating {}", run_dir.display())))?;
    let control = run_dir.join("monitrc");
    testkit::monit::ControlFile {
        port: 2822,
        user_file,
        run_dir: run_dir.clone(),
        // monit keeps the last `set daemon`: this replaces testkit's 1 s cycle. Each cycle
        // walks every process of the host in /proc (monit's process tree), and there are no
        // checks here to cycle for: 200 monits each walking a thousand processes a second
        // kept both cores busy in the kernel (load average 600) and starved the agents'
        // TLS handshakes. The HTTP API (what the agent asks) answers between cycles.
        body: "set daemon 600\n".to_string(),
    }
    .write(&control)?;
    let cg = sb.cgroup(&format!("{id}-monit"))?;
    Ok(Exec::new([
        binary.as_os_str(),
        "-I".as_ref(),
        "-c".as_ref(),
        control.as_os_str(),
    ])
    .netns(netns.file())
    .cgroup(cg.path())
    .log(&run_dir.join("monit.out")))
}

/// A password for a throw-away monit.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// One veth per agent: created in the director's namespace with its peer (`eth0`) straight in
/// the agent's, on the bridge; then the agent's side is addressed, routed and audited.
///
/// Neighbour entries are static on both sides (each agent knows the bridge's MAC for the
/// gateway and the nodes, the director's side knows every agent's): the kernel's neighbour
/// table is one for the whole host, every namespace's entries count against its
/// `gc_thresh3` (1,024 by default), and 200 agents that each learn three nodes, plus the
/// director's side learning 200 agents, come close to it (past `gc_thresh2`, 512, the kernel
/// evicts entries every 5 s and ARP starts again mid-storm). Permanent entries do not count.
fn link_agents(sb: &Sandbox, agents: &[FleetAgent]) -> Result<()> {
    let mut batch = String::new();
    for (i, a) in agents.iter().enumerate() {
        let _ = writeln!(
            batch,
            "link add fv{i} type veth peer name eth0 address {} netns {}",
            agent_mac(i),
            a.netns.file().display()
        );
        let _ = writeln!(batch, "link set fv{i} master br0");
        let _ = writeln!(batch, "link set fv{i} up");
        let _ = writeln!(
            batch,
            "neigh replace {} lladdr {} dev br0 nud permanent",
            a.ip,
            agent_mac(i)
        );
    }
    let path = sb.dir().join("veths.ip");
    write(&path, &batch)?;
    run(
        sb.netns()
            .command([PathBuf::from("ip"), "-b".into(), path.clone()]),
        "creating the agents' veths",
    )?;
    let audit = sb.dir().join("audit.nft");
    write(&audit, &audit_script())?;
    let mut neighbours =
        format!("neigh replace 10.77.0.1 lladdr {BRIDGE_MAC} dev eth0 nud permanent\n");
    for n in 0..NODES {
        let _ = writeln!(
            neighbours,
            "neigh replace {} lladdr {BRIDGE_MAC} dev eth0 nud permanent",
            node_ip(n, 77)
        );
    }
    for a in agents {
        let path = a.netns.file().with_file_name("eth0.ip");
        write(
            &path,
            &format!(
                "link set eth0 up\naddr add {}/16 dev eth0\nroute add default via 10.77.0.1\n{neighbours}",
                a.ip
            ),
        )?;
        let mut cmd = a.netns.command([
            PathBuf::from("sh"),
            "-c".into(),
            "ip -b \"$1\" && nft -f \"$2\"".into(),
            "sh".into(),
            path.clone(),
            audit.clone(),
        ]);
        cmd.stdin(std::process::Stdio::null());
        run(cmd, &format!("addressing {}'s eth0", a.id))?;
    }
    Ok(())
}

/// `GET <path>` over plain HTTP/1.0 from the current namespace; the body as JSON.
async fn http_get_json(to: SocketAddr, path: &str) -> Result<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let what = format!("GET http://{to}{path}");
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| Error(format!("{what}: connect timed out")))?
        .map_err(io_ctx(what.clone()))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())
        .await
        .map_err(io_ctx(what.clone()))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| Error(format!("{what}: read timed out")))?
        .map_err(io_ctx(what.clone()))?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error(format!("{what}: no end of headers")))?;
    serde_json::from_slice(&buf[split + 4..])
        .map_err(|e| Error(format!("{what}: body is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_agent_has_its_own_address_and_mac() {
        let macs: HashSet<String> = (0..MAX_AGENTS).map(agent_mac).collect();
        assert_eq!(macs.len(), MAX_AGENTS);
        assert!(!macs.contains(BRIDGE_MAC));
        let ips: HashSet<Ipv4Addr> = (0..MAX_AGENTS).map(agent_ip).collect();
        assert_eq!(ips.len(), MAX_AGENTS);
        for n in 0..NODES {
            assert!(!ips.contains(&node_ip(n, 77)));
        }
        assert_eq!(agent_mac(0), "02:77:01:00:00:00");
        assert_eq!(agent_mac(0x1234), "02:77:01:00:12:34");
    }

    #[test]
    fn the_tls_override_names_the_node_files_and_the_timeout() {
        let t = tls_override(Path::new("/x/node0"), Duration::from_millis(7500));
        assert!(t.starts_with("tls {\n"), "{t}");
        assert!(t.contains("cert_file: \"/x/node0/server.pem\""), "{t}");
        assert!(t.contains("key_file: \"/x/node0/server.key\""), "{t}");
        assert!(t.contains("ca_file: \"/x/node0/ca.pem\""), "{t}");
        assert!(t.contains("verify: true"), "{t}");
        assert!(t.contains("timeout: 7.5\n"), "{t}");
        assert!(t.ends_with("}\n"), "{t}");
    }
}
