//! The director simulator's shared parts: the release the tests deploy (a source package and
//! a job's rendered templates, made with the system's tar), the director's argument shapes
//! (apply specs, pre-stop environments) and its message sequences (compile, prepare, the
//! stopper, converge), replayed over the bus against the real agent.
//!
//! A test's world implements [`DirectorSim`] (where the director, the blobstore and the logs
//! are); the sequences are functions over it. They panic with the agent's log when a step
//! fails: they are the tests' convenience.
//!
//! The release: package `hello`, whose `packaging` script writes a program stamped with
//! `BOSH_PACKAGE_VERSION` into `BOSH_INSTALL_TARGET`; job `web`, a `monit` file and a
//! `bin/ctl` that starts that program (pidfile `<base>/data/sys/run/web/web.pid`) after the
//! test's own start lines ([`web_templates_with`]).

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::dav::DavServer;
use crate::nats::Director;

/// How long an async task may run before the simulator gives up.
pub const TASK_LIMIT: Duration = Duration::from_secs(60);
/// How long the start watch polls `get_state` (and a pidfile is waited for).
pub const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Where a test's director, blobstore and logs are.
pub trait DirectorSim {
    /// The director's client.
    fn director(&self) -> &Director;
    /// The director's blobstore.
    fn dav(&self) -> &DavServer;
    /// The agent's base directory as the host sees it.
    fn base(&self) -> PathBuf;
    /// What a failure message shows (the agent's log, monit's).
    fn logs(&self) -> String;

    /// One request, answered synchronously (no get_task polling).
    fn call(&self, method: &str, args: Value) -> Value {
        self.director()
            .call(method, args, 3, Duration::from_secs(50))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// An async action as the director runs it (polled with get_task): the final reply.
    fn task(&self, method: &str, args: Value) -> Value {
        self.director()
            .task(method, args, TASK_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// [`DirectorSim::task`] that must succeed: its value.
    fn ok(&self, method: &str, args: Value) -> Value {
        let r = self.task(method, args.clone());
        assert!(
            r.get("value").is_some(),
            "{method} {args} failed: {r}\n{}",
            self.logs()
        );
        r["value"].clone()
    }

    /// [`DirectorSim::task`] that must fail: the exception's message.
    fn fails(&self, method: &str, args: Value) -> String {
        let r = self.task(method, args.clone());
        match r["exception"]["message"].as_str() {
            Some(m) => m.to_string(),
            None => panic!("{method} {args} should have failed: {r}"),
        }
    }

    /// `get_state`'s `job_state`.
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
                "job_state never became {want}; seen {seen:?}\n{}",
                self.logs()
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
                .filter(|p| crate::monit::alive(*p))
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "the job's program never ran ({})\n{}",
                pidfile.display(),
                self.logs()
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
        self.dav()
            .put_blob(&id, bytes)
            .unwrap_or_else(|e| panic!("uploading blob {id}: {e}"));
        id
    }
}

/// A fresh random UUID (the kernel's).
pub fn uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("reading /proc/sys/kernel/random/uuid")
        .trim()
        .to_string()
}

/// Whether `s` has a UUID's shape (what the director checks of blob ids).
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

fn hash(cmd: &str, bytes: &[u8]) -> String {
    let dir = crate::TempDir::new("bosh-agent-test").expect("temp dir");
    let f = dir.path().join("blob");
    fs::write(&f, bytes).expect("writing the blob to hash");
    let out = Command::new(cmd)
        .arg(&f)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{cmd} printed nothing"))
        .to_string()
}

/// Plain sha1 hex of `bytes` (the system's `sha1sum`).
pub fn sha1(bytes: &[u8]) -> String {
    hash("sha1sum", bytes)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hash("sha256sum", bytes))
}

/// Standard base64 with padding (the `upload_blob` payload).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let b = |i: usize| u32::from(c.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The sorted names in `dir` (empty when it cannot be read).
pub fn entries(dir: &Path) -> Vec<String> {
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

/// `n` bytes from `/dev/urandom`.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf
}

/// A `.tgz` of `files` (path, contents, mode), made with the system's tar; `prefix` is put
/// before every path (`./` for the director's blobstore archives).
pub fn tgz<B: AsRef<[u8]>>(files: &[(&str, B, u32)], prefix: &str) -> Vec<u8> {
    let dir = crate::TempDir::new("bosh-agent-test").expect("temp dir");
    let root = dir.path().join("root");
    for (path, body, mode) in files {
        let p = root.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir in the archive tree");
        }
        fs::write(&p, body.as_ref()).expect("writing an archive member");
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    let out = dir.path().join("out.tgz");
    let mut c = Command::new("tar");
    c.arg("-czf").arg(&out).arg("-C").arg(&root);
    if prefix == "./" {
        c.arg(".");
    } else {
        let mut tops: Vec<&str> = files
            .iter()
            .filter_map(|(p, _, _)| p.split('/').next())
            .collect();
        tops.dedup();
        c.args(tops);
    }
    assert!(c.status().expect("tar").success(), "tar -czf failed");
    fs::read(out).expect("reading the archive")
}

/// The source package `hello`: `packaging` stamps the version into the program it installs.
pub fn hello_source() -> Vec<u8> {
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
pub fn web_templates(base: &Path, prefix: &str) -> Vec<u8> {
    web_templates_with(base, prefix, "")
}

/// [`web_templates`] whose `ctl start` runs the shell lines `on_start` (with `$B` the base
/// directory) before it starts the program, when the program is not running yet.
pub fn web_templates_with(base: &Path, prefix: &str, on_start: &str) -> Vec<u8> {
    let b = base.display();
    let monit = format!(
        "check process web\n  with pidfile {b}/data/sys/run/web/web.pid\n  \
         start program \"{b}/jobs/web/bin/ctl start\" with timeout 10 seconds\n  \
         stop program \"{b}/jobs/web/bin/ctl stop\"\n  group vcap\n"
    );
    // As job releases write them: a start while running does nothing, stop waits for the end.
    let ctl = format!(
        "#!/bin/sh\n\
         B={b}\n\
         pidfile=$B/data/sys/run/web/web.pid\n\
         running() {{ [ -f $pidfile ] && kill -0 $(cat $pidfile) 2>/dev/null; }}\n\
         case \"$1\" in\n\
         start) running && exit 0\n\
                {on_start}\n\
                $B/jobs/web/packages/hello/bin/hello $B/data/web </dev/null >/dev/null 2>&1 &\n\
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

/// `compile_package` of `hello` at `version`, source digest built by `digest`; checks the
/// compiled blob in the blobstore and returns the package's `{name, version, sha1,
/// blobstore_id}`.
pub fn compile(w: &impl DirectorSim, version: &str, digest: fn(&[u8]) -> String) -> Value {
    let src = hello_source();
    let id = w.upload(&src);
    let v = w.ok(
        "compile_package",
        json!([id, digest(&src), "hello", version, {}]),
    );
    let id = v["result"]["blobstore_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let sha = v["result"]["sha1"].as_str().unwrap_or_default().to_string();
    assert!(is_uuid(&id), "compiled blob id {id:?} is a UUID: {v}");
    let stored = fs::read(w.dav().object_path(&id)).expect("the compiled blob is in the blobstore");
    assert_eq!(
        sha1(&stored),
        sha,
        "the returned sha1 verifies the uploaded blob"
    );
    json!({"name": "hello", "version": version, "sha1": sha, "blobstore_id": id})
}

/// The director's apply spec for instance web/0 with `package` and a templates archive.
pub fn apply_spec(package: &Value, archive: (&str, &str), config_hash: &str) -> Value {
    apply_spec_with(json!({ "hello": package }), archive, config_hash)
}

/// [`apply_spec`] with `packages` (an object: name → `{name, version, sha1, blobstore_id}`).
pub fn apply_spec_with(packages: Value, archive: (&str, &str), config_hash: &str) -> Value {
    json!({
        "deployment": "dep", "name": "web", "index": 0, "id": "a1b2-web-0", "az": "z1",
        "job": {"name": "web", "template": "web", "version": "1",
                "templates": [{"name": "web", "version": "w1",
                               "sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
                               "blobstore_id": "job-web-blob"}]},
        "packages": packages,
        "networks": {"default": {"type": "manual", "ip": "10.0.0.9", "netmask": "255.255.255.0",
                                 "default": ["dns", "gateway"]}},
        "configuration_hash": config_hash,
        "persistent_disk": 0,
        "dns_domain_name": "bosh",
        "rendered_templates_archive": {"blobstore_id": archive.0, "sha1": archive.1}
    })
}

/// The partial spec of a VM the director has just created (`apply_vm_spec_step`).
pub fn partial_spec() -> Value {
    json!({"deployment": "dep", "job": {"name": "web"}, "index": 0, "id": "a1b2-web-0",
           "networks": {"default": {"type": "manual", "ip": "10.0.0.9"}}})
}

/// What the stopper tells pre-stop is next (`BOSH_*_NEXT_STATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// An update in place.
    KeepVm,
    /// A recreate: the VM goes, the instance and deployment stay.
    DeleteVm,
    /// `bosh delete-deployment`.
    DeleteDeployment,
}

/// The `run_script pre-stop` options for `intent` (the director's `pre_stop_env`).
pub fn pre_stop_options(intent: Intent) -> Value {
    let (vm, instance, deployment) = match intent {
        Intent::KeepVm => ("keep", "keep", "keep"),
        Intent::DeleteVm => ("delete", "keep", "keep"),
        Intent::DeleteDeployment => ("delete", "delete", "delete"),
    };
    json!({"env": {"BOSH_VM_NEXT_STATE": vm, "BOSH_INSTANCE_NEXT_STATE": instance,
                   "BOSH_DEPLOYMENT_NEXT_STATE": deployment}})
}

/// The director's first steps on a VM it created: the partial apply and get_state.
pub fn bootstrap_vm(w: &impl DirectorSim) {
    assert_eq!(w.ok("apply", json!([partial_spec()])), json!("applied"));
    assert_eq!(
        w.call("get_state", json!([]))["value"]["job"]["name"],
        "web"
    );
}

/// The stopper: pre-stop with `intent`'s environment, `drain [drain, spec]`, stop, post-stop.
pub fn stop_instance(w: &impl DirectorSim, spec: &Value, drain: &str, intent: Intent) {
    w.ok("run_script", json!(["pre-stop", pre_stop_options(intent)]));
    assert_eq!(w.ok("drain", json!([drain, spec])), json!(0));
    assert_eq!(w.ok("stop", json!([])), json!("stopped"));
    w.ok("run_script", json!(["post-stop", {}]));
}

/// `update_settings` without mbus, as `converge_vm` sends it.
pub fn update_settings(w: &impl DirectorSim) {
    assert_eq!(
        w.ok(
            "update_settings",
            json!([{"trusted_certs": "", "disk_associations": []}])
        ),
        json!("ok")
    );
}

/// From the settings to a running instance: update_settings, apply, pre-start, start, the
/// start watch (get_state until running), post-start.
pub fn converge(w: &impl DirectorSim, spec: &Value) {
    update_settings(w);
    assert_eq!(w.ok("apply", json!([spec])), json!("applied"));
    w.ok("run_script", json!(["pre-start", {}]));
    assert_eq!(w.call("start", json!([])), json!({"value": "started"}));
    w.wait_job_state("running");
    w.ok("run_script", json!(["post-start", {}]));
}

/// The director's local DNS publisher: a records blob of `version` naming instance web/0 at
/// 10.0.0.9, uploaded, then `sync_dns [blob_id, "sha256:…", version]` (synchronous), which
/// must answer `"synced"`.
pub fn sync_dns(w: &impl DirectorSim, version: u64) {
    let records = json!({"version": version,
        "records": [["10.0.0.9", "a1b2-web-0.web.default.dep.bosh"]],
        "record_keys": ["id", "instance_group", "az", "network", "deployment", "ip", "domain"],
        "record_infos": [["a1b2-web-0", "web", "z1", "default", "dep", "10.0.0.9", "bosh."]]});
    let bytes = serde_json::to_vec(&records).expect("records JSON");
    let id = w.upload(&bytes);
    let r = w.call("sync_dns", json!([id, sha256(&bytes), version]));
    assert_eq!(r, json!({"value": "synced"}), "{}", w.logs());
}

/// An update in place without disk changes: prepare, the stopper (`drain` type), converge.
pub fn update_instance(w: &impl DirectorSim, spec: &Value, drain: &str) {
    assert_eq!(w.ok("prepare", json!([spec])), json!("prepared"));
    stop_instance(w, spec, drain, Intent::KeepVm);
    converge(w, spec);
}
