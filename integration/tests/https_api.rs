//! The HTTPS agent API of `bosh create-env` against the real agent: settings whose first mbus
//! URL is `https://mbus:<password>@0.0.0.0:6868`, with the certificate and key in
//! `env.bosh.mbus.cert`, and a client that speaks as the CLI does (its agent client and its DAV
//! blobstore client): TLS verified against the test CA, Basic credentials, `POST /agent` with
//! the director's JSON, an asynchronous action polled with `get_task`, blobs `PUT` and `GET` as
//! `/blobs/<first byte of sha1(id) in hex>/<id>`. The agent runs in the sandbox's network
//! namespace (port 6868 there is the test's own); the client runs on a thread inside it.
//! Run as root: `cargo test -p integration --test https_api`. A missing prerequisite fails
//! with the reason. `HTTPS_TEST_AGENT_LOG=debug` sets the agent's `RUST_LOG` (its log is
//! printed when the test fails).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use integration::monit::Monit;
use integration::nats::{InNetns, Pki, agent_exec_with, in_netns};
use integration::sim::{sha1, tgz, uuid};
use integration::{Agent, Sandbox};
use serde_json::{Value, json};

const PASSWORD: &str = "s3cret-mbus-pw";
const API: &str = "https://127.0.0.1:6868";
const LIMIT: Duration = Duration::from_secs(60);

/// What a response was.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        assert_eq!(
            self.status,
            200,
            "status {} body {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// The CLI's HTTP client: TLS against the CA it was given, Basic credentials of the mbus URL.
#[derive(Clone)]
struct Cli {
    http: ureq::Agent,
    authorization: Option<String>,
}

fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

impl Cli {
    fn new(ca_pem: &str, authorization: Option<String>) -> Cli {
        let roots: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(ca_pem.as_bytes())
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        assert!(!roots.is_empty());
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let http = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Cli {
            http,
            authorization,
        }
    }

    fn with_auth(&self, authorization: Option<String>) -> Cli {
        Cli {
            http: self.http.clone(),
            authorization,
        }
    }

    /// One request; `Err` is a transport error (TLS refused, connection reset).
    fn request(&self, method: &str, path: &str, body: Option<Body>) -> Result<Reply, String> {
        let url = format!("{API}{path}");
        let mut b = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(a) = &self.authorization {
            b = b.header("Authorization", a);
        }
        let resp = match body {
            None => self.http.run(b.body(()).unwrap()),
            Some(Body::Bytes(bytes, ct)) => self
                .http
                .run(b.header("Content-Type", ct).body(bytes).unwrap()),
            Some(Body::Reader(r, len)) => {
                let b = b.header("Content-Length", len.to_string());
                self.http
                    .run(b.body(ureq::SendBody::from_owned_reader(r)).unwrap())
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// `POST /agent` as the CLI's agent client: `{method, arguments, reply_to}`, no protocol.
    fn agent(&self, method: &str, args: Value) -> Reply {
        let body = json!({"method": method, "arguments": args, "reply_to": "bosh-cli"});
        self.request(
            "POST",
            "/agent",
            Some(Body::Bytes(
                body.to_string().into_bytes(),
                "application/json",
            )),
        )
        .unwrap()
    }

    /// An asynchronous action as the CLI sends it: the task id, then `get_task` until its state
    /// is not `running`; the final reply.
    fn task(&self, method: &str, args: Value) -> Value {
        let v = self.agent(method, args).json();
        let id = v["value"]["agent_task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} is asynchronous: {v}"))
            .to_string();
        assert_eq!(v["value"]["state"], "running", "{v}");
        let started = Instant::now();
        loop {
            let r = self.agent("get_task", json!([id])).json();
            let running =
                r["value"]["agent_task_id"].is_string() && r["value"]["state"] == "running";
            if !running {
                return r;
            }
            assert!(
                started.elapsed() < LIMIT,
                "{method} still running after {LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn put_blob(&self, id: &str, bytes: Vec<u8>) -> Reply {
        self.request(
            "PUT",
            &blob_path(id),
            Some(Body::Bytes(bytes, "application/octet-stream")),
        )
        .unwrap()
    }

    fn get_blob(&self, id: &str) -> Reply {
        self.request("GET", &blob_path(id), None).unwrap()
    }
}

enum Body {
    Bytes(Vec<u8>, &'static str),
    Reader(Box<dyn Read + Send>, u64),
}

/// The DAV client's object path: `/blobs/<first byte of sha1(id), hex>/<id>`.
fn blob_path(id: &str) -> String {
    let sha1 = sha1(id.as_bytes());
    format!("/blobs/{}/{id}", &sha1[..2])
}

/// Bytes that are not text and do not compress to nothing: a hash chain.
fn payload(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A reader that gives `n` bytes, then fails: a client that breaks off mid-upload.
struct BreaksOff(usize);

impl Read for BreaksOff {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("the client broke off"));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(b'x');
        self.0 -= n;
        Ok(n)
    }
}

/// Fields drop in order: the client thread, the agent, then the sandbox.
struct World {
    ns: InNetns,
    agent: Agent,
    _monit: Monit,
    cli: Cli,
    base: PathBuf,
    sb: Sandbox,
}

impl World {
    /// Runs `f` with the CLI on the thread inside the sandbox's network namespace.
    fn with<T: Send + 'static>(&self, f: impl FnOnce(Cli) -> T + Send + 'static) -> T {
        let cli = self.cli.clone();
        self.ns.run(LIMIT, move || async move { f(cli) }).unwrap()
    }
}

fn world(name: &str) -> World {
    let sb = Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox: {e}"));
    let cg = sb.cgroup("agent").expect("agent cgroup");
    let pki = Pki::new("create-env ca");
    // The CLI dials the address of the mbus URL: the certificate names it (IP SAN).
    let server = pki.server("127.0.0.1");
    let url = format!("https://mbus:{PASSWORD}@0.0.0.0:6868");
    let settings = json!({
        "agent_id": "agent-create-env",
        "mbus": url,
        "blobstore": {"provider": "local",
                      "options": {"blobstore_path": "/var/vcap/micro_bosh/data/cache"}},
        "env": {"bosh": {"mbus": {"urls": [url], "cert": {
            "ca": pki.ca_pem, "certificate": server.cert_pem, "private_key": server.key_pem}}}}
    });
    // A real monit (with its sample job in the vcap group) for get_state's job state.
    let mut monit = Monit::prepare(&sb).unwrap_or_else(|e| panic!("{e}"));
    let exec = agent_exec_with(&sb, &cg, &settings, true, &json!({})).env(
        "RUST_LOG",
        std::env::var("HTTPS_TEST_AGENT_LOG").unwrap_or_default(),
    );
    let mut agent = sb.spawn_agent(&exec).expect("spawn agent");
    agent
        .wait_ready(integration::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("agent not ready: {e}"));
    monit.start().unwrap_or_else(|e| panic!("{e}"));
    let base = sb.dir().join("base");
    let ns = in_netns(&sb);
    let cli = Cli::new(&pki.ca_pem, Some(basic("mbus", PASSWORD)));
    let w = World {
        ns,
        agent,
        _monit: monit,
        cli,
        base,
        sb,
    };
    // The listener comes up after the firewall: wait for the first pong as the CLI does.
    let started = Instant::now();
    loop {
        let r = w.with(|cli| {
            cli.request(
                "POST",
                "/agent",
                Some(Body::Bytes(
                    br#"{"method":"ping","arguments":[],"reply_to":"bosh-cli"}"#.to_vec(),
                    "application/json",
                )),
            )
            .map(|r| r.status)
        });
        if r == Ok(200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agent API did not answer ping: {r:?}\nagent log:\n{}",
            w.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    w
}

#[test]
fn create_env_talks_to_the_agent_as_the_cli_does() {
    let mut w = world("https_api");
    let blobs = w.base.join("data/blobs");
    assert!(
        w.agent.log().contains("serving the agent API"),
        "{}",
        w.agent.log()
    );

    // The same dispatcher as NATS: upstream's shapes.
    assert_eq!(
        w.with(|c| c.agent("ping", json!([])).json()),
        json!({"value": "pong"})
    );
    let state = w.with(|c| c.agent("get_state", json!([])).json());
    assert_eq!(state["value"]["agent_id"], "agent-create-env", "{state}");
    // Monit answered through the agent: its sample job is the vcap group's process.
    assert!(
        ["starting", "running"].contains(&state["value"]["job_state"].as_str().unwrap_or("")),
        "{state}"
    );
    assert_eq!(state["value"]["processes"][0]["name"], "sample", "{state}");
    assert_eq!(
        w.with(|c| c.agent("run_errand", json!([])).json()),
        json!({"exception": {"message": "unknown message run_errand"}})
    );

    // Credentials: wrong, missing, another scheme → 401 with the challenge, nothing run.
    for auth in [
        Some(basic("mbus", "wrong")),
        Some(basic("other", PASSWORD)),
        None,
        Some(format!("Bearer {PASSWORD}")),
    ] {
        let r = w.with(move |c| c.with_auth(auth).agent("ping", json!([])));
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"\""));
        let put = w.with(|c| {
            c.with_auth(Some(basic("mbus", "nope")))
                .put_blob("intruder", b"x".to_vec())
        });
        assert_eq!(put.status, 401);
    }
    assert!(!blobs.join("intruder").exists());

    // TLS: a client that trusts another CA refuses the agent's certificate.
    let other = Pki::new("another ca").ca_pem.clone();
    let refused = w.with(move |_| {
        Cli::new(&other, Some(basic("mbus", PASSWORD))).request("POST", "/agent", None)
    });
    assert!(refused.is_err(), "a client of another CA must not connect");

    // Blobs: PUT then GET as the DAV client does; stored 0640 under data/blobs, whole.
    let id = uuid();
    let data = payload(3 << 20);
    let (i, d) = (id.clone(), data.clone());
    let put = w.with(move |c| c.put_blob(&i, d));
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    let stored = blobs.join(&id);
    assert_eq!(fs::read(&stored).unwrap(), data);
    assert_eq!(
        fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let i = id.clone();
    let got = w.with(move |c| c.get_blob(&i));
    assert_eq!(got.status, 200);
    assert_eq!(got.body, data);
    // A second PUT replaces the blob whole.
    let (i, d2) = (id.clone(), payload(1000));
    assert_eq!(w.with(move |c| c.put_blob(&i, d2)).status, 201);
    assert_eq!(fs::read(&stored).unwrap(), payload(1000));
    let missing = w.with(|c| c.get_blob("4d2a7a0e-0000-4000-8000-000000000000"));
    assert_eq!(missing.status, 404);

    // Bad blob paths are refused before the file system is touched.
    fs::write(w.base.join("data/victim"), "keep").unwrap();
    let before = listing(&blobs);
    for (method, path) in [
        ("GET", "/blobs/ab/..%2Fvictim"),
        ("PUT", "/blobs/ab/..%2Fvictim"),
        ("GET", "/blobs/ab/.hidden"),
        ("PUT", "/blobs/ab/.hidden"),
        ("PUT", "/blobs/ab/cd/victim"),
        ("GET", "/blobs/zz/victim"),
        ("PUT", "/blobs/"),
    ] {
        let r = w.with(move |c| {
            let body = (method == "PUT").then(|| Body::Bytes(b"evil".to_vec(), "text/plain"));
            c.request(method, path, body).unwrap()
        });
        assert_eq!(
            r.status,
            400,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(listing(&blobs), before);
    assert_eq!(
        fs::read_to_string(w.base.join("data/victim")).unwrap(),
        "keep"
    );
    for (method, path) in [
        ("GET", "/agent"),
        ("DELETE", "/blobs/ab/x"),
        ("GET", "/other"),
    ] {
        let r = w.with(move |c| c.request(method, path, None).unwrap());
        assert_eq!(r.status, 404, "{method} {path}");
    }

    // Bodies over the protocol's 1 MiB are refused, and the agent goes on serving.
    let big = vec![b' '; (1 << 20) + 1];
    let r = w.with(move |c| {
        c.request("POST", "/agent", Some(Body::Bytes(big, "application/json")))
            .unwrap()
    });
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let r = w.with(|c| {
        c.request(
            "POST",
            "/agent",
            Some(Body::Bytes(b"{not json".to_vec(), "application/json")),
        )
        .unwrap()
    });
    assert_eq!(r.status, 400);
    assert_eq!(
        w.with(|c| c.agent("ping", json!([])).json()),
        json!({"value": "pong"})
    );

    // An upload that breaks off leaves nothing: no blob, no temporary file.
    let cut = uuid();
    let i = cut.clone();
    let _ = w.with(move |c| {
        c.request(
            "PUT",
            &blob_path(&i),
            Some(Body::Reader(Box::new(BreaksOff(200_000)), 1 << 20)),
        )
    });
    let started = Instant::now();
    while listing(&blobs).iter().any(|n| n.ends_with(".tmp")) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            listing(&blobs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!blobs.join(&cut).exists());

    // create-env's remote compilation: the source uploaded to the agent's blobstore,
    // compile_package polled with get_task, the compiled package downloaded and verified.
    let src = tgz(
        &[(
            "packaging",
            "set -e\nmkdir -p \"$BOSH_INSTALL_TARGET/bin\"\necho \"hello $BOSH_PACKAGE_VERSION\" > \"$BOSH_INSTALL_TARGET/bin/hello\"\n",
            0o644,
        )],
        "./",
    );
    let src_id = uuid();
    let (i, s) = (src_id.clone(), src.clone());
    assert_eq!(w.with(move |c| c.put_blob(&i, s)).status, 201);
    let sha = sha1(&src);
    let (i, s2) = (src_id.clone(), sha.clone());
    let done = w.with(move |c| c.task("compile_package", json!([i, s2, "hello", "1.0", {}])));
    let result = &done["value"]["result"];
    let compiled_id = result["blobstore_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{done}"))
        .to_string();
    let compiled_sha = result["sha1"].as_str().unwrap().to_string();
    let i = compiled_id.clone();
    let compiled = w.with(move |c| c.get_blob(&i));
    assert_eq!(compiled.status, 200);
    assert_eq!(sha1(&compiled.body), compiled_sha);
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    fs::write(dir.path().join("p.tgz"), &compiled.body).unwrap();
    let list = Command::new("tar")
        .arg("-xzOf")
        .arg(dir.path().join("p.tgz"))
        .arg("./bin/hello")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout), "hello 1.0\n");

    // A reloaded allow-list without tcp/6868 is reported as at start (the CLI here still
    // reaches the API: it comes over loopback, which the list always admits).
    const CUT: &str = "admits no tcp/6868: bosh create-env cannot reach the agent API";
    assert!(!w.agent.log().contains(CUT), "{}", w.agent.log());
    let conf = fs::read_dir(w.sb.dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
        })
        .expect("the sandbox's agent.json");
    let mut doc: Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
    // tcp/22 stays open: the lock-out check keeps sshd's port whatever sshd_config says.
    doc["Platform"]["Linux"]["Firewall"]["IngressAllow"] =
        json!([{"Protocol": "tcp", "Ports": "22"}]);
    fs::write(&conf, doc.to_string()).unwrap();
    let out =
        w.sb.agent_cmd(["firewall", "reload", "--timeout-seconds", "30"])
            .output(integration::COMMAND_TIMEOUT)
            .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        integration::describe(&out),
        w.agent.log()
    );
    assert!(w.agent.log().contains(CUT), "{}", w.agent.log());
    assert_eq!(
        w.with(|c| c.agent("ping", json!([])).json()),
        json!({"value": "pong"})
    );

    // No NATS anywhere: nothing was dialled, and the firewall is healthy.
    assert!(
        !w.agent.log().contains("connecting to the director"),
        "{}",
        w.agent.log()
    );

    // Shutdown: with a kept-alive connection of the client open, the agent still stops at
    // once (idle connections are closed), exit code 0.
    assert_eq!(
        w.with(|c| c.agent("ping", json!([])).json()),
        json!({"value": "pong"})
    );
    let t = Instant::now();
    let status = w.agent.stop().unwrap();
    assert!(status.success(), "{status}\n{}", w.agent.log());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "stopping took {:?}",
        t.elapsed()
    );
    assert!(
        w.agent
            .log()
            .contains("the agent API stopped accepting connections"),
        "{}",
        w.agent.log()
    );
}
