//! The benchmark's nats-servers: testkit's, with the instants a failover is timed from
//! (ready and exited, checked every millisecond).

use super::*;

use integration::nats::Cluster;
use testkit::nats::{NatsConfig, NatsServer};

/// A nats-server in the sandbox (cgroup `nats`), configured but not started by [`Server::new`].
pub(crate) struct Server {
    server: NatsServer,
    /// When it was last spawned.
    pub(crate) started: Option<Instant>,
}

impl Server {
    /// Writes the configuration (TLS `verify: true`, user/password, optional cluster: route
    /// listen address and routes) for a server on `listen`; does not start it.
    pub(crate) fn new(
        sb: &Sandbox,
        pki: &Pki,
        label: &str,
        listen: &str,
        cluster: Option<(String, Vec<String>)>,
    ) -> Res<Self> {
        let config = NatsConfig {
            listen: listen
                .parse()
                .map_err(|e| format!("listen address {listen}: {e}"))?,
            cn: NATS_CN.to_string(),
            cluster: cluster.map(|(listen, routes)| Cluster { listen, routes }),
            extra: String::new(),
        };
        let place = sb.place("nats")?;
        let dir = sb.dir().join(format!("nats-{label}"));
        Ok(Server {
            server: NatsServer::prepare(pki, &config, &dir, label, &place)?,
            started: None,
        })
    }

    pub(crate) fn running(&self) -> bool {
        self.server.running()
    }

    /// Spawns the server with a fresh log, without waiting.
    pub(crate) fn spawn(&mut self) -> Res<()> {
        self.server.spawn()?;
        self.started = Some(Instant::now());
        Ok(())
    }

    /// The instant its log says "Server is ready" (checked every millisecond).
    pub(crate) fn wait_ready(&mut self) -> Res<Instant> {
        Ok(self.server.wait_ready(Duration::from_millis(1))?)
    }

    pub(crate) fn start(&mut self) -> Res<()> {
        self.spawn()?;
        self.wait_ready().map(drop)
    }

    /// SIGTERM, then waits for the exit (checked every millisecond); returns when it exited.
    pub(crate) fn stop(&mut self) -> Res<Instant> {
        Ok(self.server.stop()?)
    }
}
