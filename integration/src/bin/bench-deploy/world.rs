//! The world of the benchmark: sandbox, nats-server, nginx, monit, the agent, the director.

use super::*;

pub(crate) struct World {
    pub(crate) director: Director,
    pub(crate) agent: Agent,
    pub(crate) monit: Monit,
    pub(crate) dav: DavServer,
    pub(crate) nats: NatsServer,
    pub(crate) sb: Sandbox,
    pub(crate) ca_file: PathBuf,
}

impl World {
    pub(crate) fn new() -> Res<World> {
        let sb = Sandbox::new("bench-deploy").map_err(|e| format!("sandbox: {e}"))?;
        register(&sb);
        let pki = Pki::new("bench ca");
        let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
        let nats = NatsServer::start_with(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None, "");
        let dav = DavServer::start_in(sb.netns().file()).map_err(|e| format!("nginx: {e}"))?;
        // nginx's directory: <dir>/store/<prefix>/<id>.
        if let Some(d) = dav
            .object_path("x")
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            register_dir(d.to_path_buf());
        }
        let base = sb.dir().join("base");
        let monit = Monit::prepare_with(
            &sb,
            &format!("include {}/monit/job/*.monitrc\n", base.display()),
        )
        .map_err(|e| e.to_string())?;
        let mut s = settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent"));
        s["env"]["bosh"]["blobstores"] = json!([dav.agent_blobstore()]);
        s["networks"] = json!({"default": {"type": "manual", "ip": "10.0.0.9",
            "netmask": "255.255.255.0", "default": ["dns", "gateway"]}});
        let exec = agent_exec_with(&sb, &agent_cg, &s, true, &json!({}));
        let mut agent = sb.spawn_agent(&exec).map_err(|e| e.to_string())?;
        agent.wait_ready(READY_TIMEOUT).map_err(|e| e.to_string())?;
        let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
        director.wait_pong(Duration::from_secs(15));
        let mut monit = monit;
        monit.start().map_err(|e| e.to_string())?;
        let ca_file = sb.dir().join("dav-ca.pem");
        fs::write(&ca_file, dav.ca_pem()).map_err(|e| format!("writing the CA: {e}"))?;
        Ok(World {
            director,
            agent,
            monit,
            dav,
            nats,
            sb,
            ca_file,
        })
    }

    pub(crate) fn base(&self) -> PathBuf {
        self.sb.dir().join("base")
    }

    /// The director's way with an asynchronous action, polling every [`TASK_POLL`]; returns
    /// the final `value` or the error.
    pub(crate) fn task(&self, method: &str, args: Value) -> Res<Value> {
        let first = self
            .director
            .call(method, args, 3, Duration::from_secs(10))?;
        let Some(id) = first["value"]["agent_task_id"].as_str().map(str::to_string) else {
            return first
                .get("value")
                .cloned()
                .ok_or_else(|| format!("{method}: {first}"));
        };
        let deadline = Instant::now() + TASK_LIMIT;
        loop {
            std::thread::sleep(TASK_POLL);
            let r = self
                .director
                .call("get_task", json!([id]), 3, Duration::from_secs(10))?;
            if r["value"]["state"] != "running" || r["value"]["agent_task_id"] != id.as_str() {
                return r.get("value").cloned().ok_or_else(|| {
                    format!(
                        "{method} failed: {r}\nagent log (tail):\n{}",
                        tail(&self.agent.log(), 15)
                    )
                });
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{method} task {id} still running after {TASK_LIMIT:?}"
                ));
            }
        }
    }

    pub(crate) fn url(&self, id: &str) -> String {
        format!(
            "{}/{}/{id}",
            self.dav.url(),
            &Digest::of(Algorithm::Sha1, id.as_bytes()).hex[..2]
        )
    }

    pub(crate) fn upload(&self, bytes: &[u8]) -> Res<String> {
        let id = uuid()?;
        self.dav.put_blob(&id, bytes).map_err(|e| e.to_string())?;
        Ok(id)
    }

    pub(crate) fn netns_arg(&self) -> String {
        format!("--net={}", self.sb.netns().file().display())
    }

    /// `sh -c script` in the sandbox's network namespace; returns the wall time.
    pub(crate) fn shell(&self, script: &str) -> Res<Duration> {
        let t0 = Instant::now();
        let out = Command::new("nsenter")
            .arg(self.netns_arg())
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("nsenter: {e}"))?;
        let took = t0.elapsed();
        if !out.status.success() {
            return Err(format!(
                "pipeline failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(took)
    }

    pub(crate) fn curl_auth(&self) -> String {
        let (user, password) = self.dav.write_user();
        format!(
            "--cacert '{}' -u '{user}:{password}'",
            self.ca_file.display()
        )
    }
}
