//! A director deploys a release onto the real agent: a director simulator replays the
//! director's message sequences — compile a package, deploy an instance without a persistent
//! disk, update it, delete it — with the director's argument shapes, against real parts: the
//! agent over a real nats-server with mutual TLS, a real monit that runs the deployed job, and
//! Debian's nginx configured as the director's DAV blobstore (TLS with the test CA, Basic
//! auth, the two-hex-digit layout), all inside the sandbox's network namespace.
//!
//! The release is made by the test: a source package whose `packaging` script writes a tiny
//! program (stamped with `BOSH_PACKAGE_VERSION`) into `BOSH_INSTALL_TARGET`, and a job `web`
//! with a `monit` file and a `bin/ctl` that starts that program. Sources are uploaded under
//! UUIDs with plain sha1 and `sha256:` digests. Run as root:
//! `cargo test -p integration --test deploy`. A missing prerequisite fails with the reason.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::dav::DavServer;
use integration::monit::Monit;
use integration::nats::*;
use integration::{Agent, Sandbox};
use serde_json::{Value, json};

const AGENT_SIDE: &str = "127.0.0.1:4222";
const DIRECTOR_SIDE: &str = "127.0.0.3:4222";
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
const TASK_LIMIT: Duration = Duration::from_secs(60);
const RUN_LIMIT: Duration = Duration::from_secs(30);

struct World {
    director: Director,
    monit: Monit,
    dav: DavServer,
    agent: Agent,
    _nats: NatsServer,
    sb: Sandbox,
}

fn world(name: &str) -> World {
    let sb = Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").expect("agent cgroup");
    let nats = NatsServer::start_with(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None, "");
    let dav = DavServer::start_in(sb.netns().file()).unwrap_or_else(|e| panic!("nginx: {e}"));
    // The stemcell's monitrc includes the job files the agent writes on `start`.
    let base = sb.dir().join("base");
    let monit = Monit::prepare_with(
        &sb,
        &format!("include {}/monit/job/*.monitrc\n", base.display()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut s = settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent"));
    s["env"]["bosh"]["blobstores"] = json!([dav.agent_blobstore()]);
    s["networks"] = json!({"default": {"type": "manual", "ip": "10.0.0.9",
        "netmask": "255.255.255.0", "default": ["dns", "gateway"]}});
    let agent = start_agent(&sb, &agent_cg, &s, true);
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    let mut w = World {
        director,
        monit,
        dav,
        agent,
        _nats: nats,
        sb,
    };
    w.monit.start().unwrap_or_else(|e| panic!("{e}"));
    w
}

impl World {
    fn base(&self) -> PathBuf {
        self.monit.base().to_path_buf()
    }

    fn call(&self, method: &str, args: Value) -> Value {
        self.director
            .call(method, args, 3, Duration::from_secs(50))
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()))
    }

    fn task(&self, method: &str, args: Value) -> Value {
        self.director
            .task(method, args, TASK_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()))
    }

    fn ok(&self, method: &str, args: Value) -> Value {
        let r = self.task(method, args);
        assert!(
            r.get("value").is_some(),
            "{method} failed: {r}\nagent log:\n{}",
            self.agent.log()
        );
        r["value"].clone()
    }

    fn job_state(&self) -> String {
        let r = self.call("get_state", json!([]));
        r["value"]["job_state"]
            .as_str()
            .unwrap_or("<none>")
            .to_string()
    }

    /// Polls get_state (as the director's start watch does) until `job_state == want`.
    fn wait_job_state(&self, want: &str) {
        let deadline = Instant::now() + RUN_LIMIT;
        let mut seen = Vec::new();
        loop {
            let s = self.job_state();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            if s == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job_state never became {want}; seen {seen:?}\nmonit log:\n{}\nagent log:\n{}",
                self.monit.log(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pid of the deployed program, from the job's pidfile, once it runs.
    fn web_pid(&self) -> u32 {
        let pidfile = self.base().join("data/sys/run/web/web.pid");
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            if let Some(pid) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|p| integration::monit::alive(*p))
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "the job's program never ran ({})\nmonit log:\n{}",
                pidfile.display(),
                self.monit.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the running program says its version is (it writes it at start).
    fn web_version(&self) -> String {
        fs::read_to_string(self.base().join("data/web/version"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Stores `bytes` in the DAV blobstore under a new UUID, as the director's uploads do.
    fn upload(&self, bytes: &[u8]) -> String {
        let id = uuid();
        self.dav.put_blob(&id, bytes).unwrap();
        id
    }
}

fn uuid() -> String {
    let b = fs::read("/proc/sys/kernel/random/uuid").unwrap();
    String::from_utf8(b).unwrap().trim().to_string()
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

fn hash(cmd: &str, bytes: &[u8]) -> String {
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    let f = dir.path().join("blob");
    fs::write(&f, bytes).unwrap();
    let out = Command::new(cmd).arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sha1(bytes: &[u8]) -> String {
    hash("sha1sum", bytes)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hash("sha256sum", bytes))
}

/// A `.tgz` of `files` (path, contents, mode), made with the system's tar; `prefix` is put
/// before every path (`./` for the director's blobstore archives).
fn tgz(files: &[(&str, String, u32)], prefix: &str) -> Vec<u8> {
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    let root = dir.path().join("root");
    for (path, body, mode) in files {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    let out = dir.path().join("out.tgz");
    let mut c = Command::new("tar");
    c.arg("-czf").arg(&out).arg("-C").arg(&root);
    if prefix == "./" {
        c.arg(".");
    } else {
        for (path, _, _) in files {
            c.arg(path.split('/').next().unwrap());
        }
    }
    assert!(c.status().unwrap().success());
    fs::read(out).unwrap()
}

/// A templates archive of job `web` with an entry that climbs out of its target
/// (`web/../../../../evil`), made by GNU tar's name transform.
fn hostile_templates() -> Vec<u8> {
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("web")).unwrap();
    fs::write(root.join("web/monit"), "check process x\n").unwrap();
    fs::write(root.join("web/evil"), "x").unwrap();
    let out = dir.path().join("evil.tgz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&root)
        .args(["--transform", "s,^web/evil$,web/../../../../evil,", "web"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let list = Command::new("tar").arg("-tzf").arg(&out).output().unwrap();
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("web/../../../../evil"),
        "the archive holds the hostile entry"
    );
    fs::read(out).unwrap()
}

/// A `.tgz` holding one file `name` with `body` (binary).
fn tgz_bytes(name: &str, body: &[u8]) -> Vec<u8> {
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    fs::create_dir_all(dir.path().join("root")).unwrap();
    fs::write(dir.path().join("root").join(name), body).unwrap();
    let out = dir.path().join("out.tgz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(dir.path().join("root"))
        .arg(name)
        .status()
        .unwrap();
    assert!(st.success());
    fs::read(out).unwrap()
}

/// The source package `hello`: `packaging` stamps the version into the program it installs.
fn hello_source() -> Vec<u8> {
    let program = "#!/bin/sh\n\
        # the deployed program: records its version, then runs until stopped\n\
        mkdir -p \"$1\"\n\
        echo @VERSION@ > \"$1/version\"\n\
        exec sleep 100000\n";
    let packaging = "set -e\n\
        mkdir -p \"$BOSH_INSTALL_TARGET/bin\"\n\
        sed \"s/@VERSION@/$BOSH_PACKAGE_VERSION/\" hello.sh > \"$BOSH_INSTALL_TARGET/bin/hello\"\n\
        chmod 0755 \"$BOSH_INSTALL_TARGET/bin/hello\"\n\
        echo \"compiled $BOSH_PACKAGE_NAME $BOSH_PACKAGE_VERSION in $BOSH_COMPILE_TARGET\"\n";
    tgz(
        &[
            ("packaging", packaging.to_string(), 0o644),
            ("hello.sh", program.to_string(), 0o644),
        ],
        "./",
    )
}

/// The rendered templates archive of job `web` (a `monit` file and `bin/ctl`), as the
/// director builds it.
fn web_templates(base: &Path, prefix: &str) -> Vec<u8> {
    let b = base.display();
    let monit = format!(
        "check process web\n  with pidfile {b}/data/sys/run/web/web.pid\n  \
         start program \"{b}/jobs/web/bin/ctl start\" with timeout 10 seconds\n  \
         stop program \"{b}/jobs/web/bin/ctl stop\"\n  group vcap\n"
    );
    // As job releases write them: a start while running does nothing, stop waits for the end.
    let ctl = format!(
        "#!/bin/sh\n\
         pidfile={b}/data/sys/run/web/web.pid\n\
         running() {{ [ -f $pidfile ] && kill -0 $(cat $pidfile) 2>/dev/null; }}\n\
         case \"$1\" in\n\
         start) running && exit 0\n\
                {b}/jobs/web/packages/hello/bin/hello {b}/data/web </dev/null >/dev/null 2>&1 &\n\
                echo $! > $pidfile ;;\n\
         stop) if running; then pid=$(cat $pidfile); kill $pid\n\
                  while kill -0 $pid 2>/dev/null; do sleep 0.1; done; fi\n\
               rm -f $pidfile ;;\n\
         esac\n"
    );
    tgz(
        &[("web/monit", monit, 0o644), ("web/bin/ctl", ctl, 0o755)],
        prefix,
    )
}

/// `compile_package` of `hello` at `version`, source digest built by `digest`; returns the
/// compiled package's `{name, version, sha1, blobstore_id}`.
fn compile(w: &World, version: &str, digest: fn(&[u8]) -> String) -> Value {
    let src = hello_source();
    let id = w.upload(&src);
    let v = w.ok(
        "compile_package",
        json!([id, digest(&src), "hello", version, {}]),
    );
    let id = v["result"]["blobstore_id"].as_str().unwrap().to_string();
    let sha = v["result"]["sha1"].as_str().unwrap().to_string();
    assert!(is_uuid(&id), "compiled blob id {id} is a UUID");
    let stored = fs::read(w.dav.object_path(&id)).expect("the compiled blob is in the blobstore");
    assert_eq!(
        sha1(&stored),
        sha,
        "the returned sha1 verifies the uploaded blob"
    );
    json!({"name": "hello", "version": version, "sha1": sha, "blobstore_id": id})
}

/// The director's apply spec for instance web/0 with `package` and a templates archive.
fn apply_spec(package: &Value, archive: (&str, &str), config_hash: &str) -> Value {
    json!({
        "deployment": "dep", "name": "web", "index": 0, "id": "a1b2-web-0", "az": "z1",
        "job": {"name": "web", "template": "web", "version": "1",
                "templates": [{"name": "web", "version": "w1",
                               "sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
                               "blobstore_id": "job-web-blob"}]},
        "packages": {"hello": package},
        "networks": {"default": {"type": "manual", "ip": "10.0.0.9", "netmask": "255.255.255.0",
                                 "default": ["dns", "gateway"]}},
        "configuration_hash": config_hash,
        "persistent_disk": 0,
        "dns_domain_name": "bosh",
        "rendered_templates_archive": {"blobstore_id": archive.0, "sha1": archive.1}
    })
}

fn partial_spec() -> Value {
    json!({"deployment": "dep", "job": {"name": "web"}, "index": 0, "id": "a1b2-web-0",
           "networks": {"default": {"type": "manual", "ip": "10.0.0.9"}}})
}

/// The director's steps from the templates' persistence to a running instance: prepare,
/// pre-stop, drain, stop, post-stop, update_settings, apply, pre-start, start, the watch.
fn update_instance(w: &World, spec: &Value, drain: &str) {
    assert_eq!(w.ok("prepare", json!([spec])), json!("prepared"));
    let keep = json!({"env": {"BOSH_VM_NEXT_STATE": "keep", "BOSH_INSTANCE_NEXT_STATE": "keep",
        "BOSH_DEPLOYMENT_NEXT_STATE": "keep"}});
    w.ok("run_script", json!(["pre-stop", keep]));
    assert_eq!(w.ok("drain", json!([drain, spec])), json!(0));
    assert_eq!(w.ok("stop", json!([])), json!("stopped"));
    w.ok("run_script", json!(["post-stop", {}]));
    assert_eq!(
        w.ok(
            "update_settings",
            json!([{"trusted_certs": "", "disk_associations": []}])
        ),
        json!("ok")
    );
    assert_eq!(w.ok("apply", json!([spec])), json!("applied"));
    w.ok("run_script", json!(["pre-start", {}]));
    assert_eq!(w.call("start", json!([])), json!({"value": "started"}));
    w.wait_job_state("running");
    w.ok("run_script", json!(["post-start", {}]));
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_director_compiles_deploys_updates_and_deletes_a_release() {
    let w = world("deploy-flows");
    let base = w.base();

    // (a) A compilation VM: ping, update_settings, the partial apply, get_state, compile.
    assert_eq!(w.call("ping", json!([])), json!({"value": "pong"}));
    assert_eq!(
        w.ok(
            "update_settings",
            json!([{"trusted_certs": "", "disk_associations": []}])
        ),
        json!("ok")
    );
    assert_eq!(w.ok("apply", json!([partial_spec()])), json!("applied"));
    assert_eq!(
        w.call("get_state", json!([]))["value"]["job"]["name"],
        "web"
    );
    let hello1 = compile(&w, "1.0", sha1);
    let log =
        fs::read_to_string(base.join("data/sys/log/compilation/packaging.stdout.log")).unwrap();
    assert!(
        log.contains("compiled hello 1.0 in"),
        "packaging ran: {log}"
    );
    assert!(
        entries(&base.join("data/compile")).is_empty(),
        "the compile dir is cleaned"
    );

    // (b) A fresh instance without a disk. Templates from the blobstore (leading `./`).
    let templates = web_templates(&base, "./");
    let archive_id = w.upload(&templates);
    let spec1 = apply_spec(&hello1, (&archive_id, &sha1(&templates)), "cfg-1");
    update_instance(&w, &spec1, "shutdown");
    let pid1 = w.web_pid();
    assert_eq!(w.web_version(), "1.0", "the compiled package runs");
    let st = w.call("get_state", json!([]))["value"].clone();
    assert_eq!(st["job_state"], "running");
    assert!(
        st["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "web" && p["state"] == "running"),
        "monit runs the deployed job: {st:#}"
    );
    // Upstream's layout.
    let job_link = fs::read_link(base.join("jobs/web")).unwrap();
    assert!(
        job_link.starts_with(base.join("data/jobs/web")),
        "{job_link:?}"
    );
    let pkg_link = fs::read_link(base.join("packages/hello")).unwrap();
    assert!(
        pkg_link.starts_with(base.join("data/packages/hello")),
        "{pkg_link:?}"
    );
    assert!(base.join("jobs/web/packages/hello/bin/hello").is_file());
    assert!(base.join("monit/job/0000_web.monitrc").is_file());
    for d in ["data/sys/log/web", "data/sys/run/web", "data/web"] {
        assert!(base.join(d).is_dir(), "{d}");
    }
    assert_eq!(
        fs::read_to_string(base.join("instance/id")).unwrap(),
        "a1b2-web-0"
    );
    assert_eq!(
        fs::read_to_string(base.join("instance/name")).unwrap(),
        "web"
    );
    assert_eq!(fs::read_to_string(base.join("instance/az")).unwrap(), "z1");
    assert_eq!(
        fs::read_to_string(base.join("instance/deployment")).unwrap(),
        "dep"
    );
    let spec_mode = fs::metadata(base.join("bosh/spec.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(spec_mode & 0o077, 0, "spec.json is root's only");

    // (c) An update: a new package version (sha256 source digest), templates over NATS.
    let hello2 = compile(&w, "2.0", sha256);
    let templates2 = web_templates(&base, "");
    let nats_archive = uuid();
    let payload = base64(&templates2);
    assert_eq!(
        w.ok(
            "upload_blob",
            json!([{"blob_id": nats_archive, "checksum": sha1(&templates2), "payload": payload}])
        ),
        json!(nats_archive)
    );
    let blob_mode = fs::metadata(base.join("data/sensitive_blobs").join(&nats_archive))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(blob_mode & 0o777, 0o640);
    let spec2 = apply_spec(&hello2, (&nats_archive, &sha1(&templates2)), "cfg-2");
    update_instance(&w, &spec2, "update");
    let pid2 = w.web_pid();
    assert_ne!(pid1, pid2);
    assert!(!integration::monit::alive(pid1), "the old version stopped");
    assert_eq!(w.web_version(), "2.0", "the new version runs");
    assert_eq!(
        entries(&base.join("data/packages/hello")).len(),
        1,
        "the old package version is removed"
    );
    assert_eq!(entries(&base.join("data/jobs/web")).len(), 1);

    // Bad inputs: each fails as described, and version 2 keeps running.
    let still_running = |what: &str| {
        assert!(
            integration::monit::alive(pid2),
            "after {what}: v2 still runs"
        );
        assert_eq!(w.web_version(), "2.0", "after {what}");
        assert!(base.join("jobs/web/packages/hello/bin/hello").is_file());
    };
    // A package whose digest does not match.
    let src = hello_source();
    let bad_id = w.upload(&src);
    let wrong = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let mut bad = spec2.clone();
    bad["packages"]["hello"] =
        json!({"name": "hello", "version": "3.0", "sha1": wrong, "blobstore_id": bad_id});
    bad["configuration_hash"] = json!("cfg-3");
    for method in ["prepare", "apply"] {
        let r = w.task(method, json!([bad]));
        let msg = r["exception"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&bad_id) && msg.contains(wrong) && msg.contains(&sha256(&src)[7..]),
            "{method}: the error names the blob and both digests: {r}"
        );
        still_running(&format!("{method} with a wrong digest"));
    }
    assert_eq!(entries(&base.join("data/packages/hello")).len(), 1);
    // A blob the blobstore does not have: the URL, without the password.
    let mut missing = spec2.clone();
    missing["packages"]["hello"]["blobstore_id"] = json!(uuid());
    missing["packages"]["hello"]["version"] = json!("4.0");
    let r = w.task("prepare", json!([missing]));
    let msg = r["exception"]["message"].as_str().unwrap_or_default();
    let (_, password) = w.dav.write_user();
    assert!(
        msg.contains("404") && msg.contains("https://127.0.0.1:25250/"),
        "{r}"
    );
    assert!(!msg.contains(password), "no password in {msg}");
    still_running("a missing blob");
    // A templates archive with an entry outside its target.
    let evil = hostile_templates();
    let evil_id = w.upload(&evil);
    let mut hostile = spec2.clone();
    hostile["rendered_templates_archive"] = json!({"blobstore_id": evil_id, "sha1": sha1(&evil)});
    hostile["configuration_hash"] = json!("cfg-evil");
    let r = w.task("apply", json!([hostile]));
    assert!(r.get("exception").is_some(), "{r}");
    still_running("a hostile archive");
    assert!(!w.sb.dir().join("evil").exists() && !base.join("evil").exists());
    // A job name that is not a path component: refused before any task.
    let mut unsafe_name = spec2.clone();
    unsafe_name["job"]["templates"][0]["name"] = json!("../web");
    let r = w.call("apply", json!([unsafe_name]));
    assert!(
        r["exception"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("../web"),
        "{r}"
    );
    still_running("an unsafe job name");
    // A full disk: a new package whose install directory is a 256 KiB tmpfs (made by the
    // test under its own sandbox) gets a 1 MiB incompressible blob.
    let big_dir = base.join("data/packages/big");
    fs::create_dir_all(&big_dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&big_dir)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mount a small tmpfs on {}",
        big_dir.display()
    );
    // Unmounted however the test ends, so the sandbox can be removed.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Unmount(big_dir.clone());
    let mut random = vec![0u8; 1 << 20];
    use std::io::Read as _;
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    let big = tgz_bytes("blob.bin", &random);
    let big_id = w.upload(&big);
    let mut full = spec2.clone();
    full["packages"]["big"] =
        json!({"name": "big", "version": "1", "sha1": sha1(&big), "blobstore_id": big_id});
    full["configuration_hash"] = json!("cfg-full");
    let r = w.task("apply", json!([full]));
    // Looked at while the small filesystem is still mounted: that is where the partial
    // install was written.
    let left = entries(&big_dir);
    drop(guard);
    let msg = r["exception"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&big_id) && msg.to_lowercase().contains("no space"),
        "a full disk fails the task naming the blob: {r}"
    );
    assert!(left.is_empty(), "the partial install is removed: {left:?}");
    assert!(!base.join("packages/big").exists(), "nothing is enabled");
    still_running("a full disk");
    let st = w.call("get_state", json!([]))["value"].clone();
    assert_eq!(
        st["configuration_hash"], "cfg-2",
        "the applied spec is unchanged"
    );

    // (f) delete-deployment: pre-stop, drain shutdown with an empty spec, stop, post-stop.
    let delete = json!({"env": {"BOSH_VM_NEXT_STATE": "delete",
        "BOSH_INSTANCE_NEXT_STATE": "delete", "BOSH_DEPLOYMENT_NEXT_STATE": "delete"}});
    w.ok("run_script", json!(["pre-stop", delete]));
    assert_eq!(w.ok("drain", json!(["shutdown", {}])), json!(0));
    assert_eq!(w.ok("stop", json!([])), json!("stopped"));
    w.ok("run_script", json!(["post-stop", {}]));
    let deadline = Instant::now() + RUN_LIMIT;
    while integration::monit::alive(pid2) {
        assert!(Instant::now() < deadline, "the job never stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.job_state(), "stopped");
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_deployed_job_that_monit_cannot_start_is_not_reported_running() {
    let w = world("deploy-no-services");
    // A release whose job's start program fails: after start, job_state must not say
    // running. (The rule for a spec with jobs and no vcap service at all is tested against
    // real monit in the jobs crate.)
    let hello = compile(&w, "1.0", sha1);
    let base = w.base();
    let broken = tgz(
        &[
            (
                "web/monit",
                format!(
                    "check process web\n  with pidfile {}/data/sys/run/web/web.pid\n  \
                     start program \"/bin/false\"\n  stop program \"/bin/true\"\n  group vcap\n",
                    base.display()
                ),
                0o644,
            ),
            ("web/bin/ctl", "#!/bin/sh\nexit 1\n".into(), 0o755),
        ],
        "./",
    );
    let id = w.upload(&broken);
    let spec = apply_spec(&hello, (&id, &sha1(&broken)), "cfg-broken");
    assert_eq!(w.ok("prepare", json!([spec])), json!("prepared"));
    assert_eq!(w.ok("apply", json!([spec])), json!("applied"));
    assert_eq!(w.call("start", json!([])), json!({"value": "started"}));
    std::thread::sleep(Duration::from_secs(3));
    let st = w.job_state();
    assert_ne!(st, "running", "a job that does not run is not running");
}
