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
//!
//! One test SIGKILLs the agent during the `prepare` and `apply` of a new release version
//! (knobs `CRASH_APPLY_KILLS`, default 10, and `CRASH_SEED`, which replays a printed seed).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::dav::DavServer;
use integration::monit::Monit;
use integration::nats::*;
use integration::sim::*;
use integration::{Agent, Sandbox};
use serde_json::json;

const AGENT_SIDE: &str = "127.0.0.1:4222";
const DIRECTOR_SIDE: &str = "127.0.0.3:4222";
const CONNECT_LIMIT: Duration = Duration::from_secs(15);

struct World {
    director: Director,
    monit: Monit,
    dav: DavServer,
    agent: Agent,
    /// How the agent was started: a test that kills it starts it again with this.
    agent_exec: integration::Exec,
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
    let agent_exec = agent_exec_with(&sb, &agent_cg, &s, true, &json!({}));
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    let mut w = World {
        director,
        monit,
        dav,
        agent,
        agent_exec,
        _nats: nats,
        sb,
    };
    w.monit.start().unwrap_or_else(|e| panic!("{e}"));
    w
}

impl DirectorSim for World {
    fn director(&self) -> &Director {
        &self.director
    }

    fn dav(&self) -> &DavServer {
        &self.dav
    }

    fn base(&self) -> PathBuf {
        self.monit.base().to_path_buf()
    }

    fn logs(&self) -> String {
        format!(
            "monit log:\n{}\nagent log:\n{}",
            self.monit.log(),
            self.agent.log()
        )
    }
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

#[test]
fn a_director_compiles_deploys_updates_and_deletes_a_release() {
    let w = world("deploy-flows");
    let base = w.base();

    // (a) A compilation VM: ping, update_settings, the partial apply, get_state, compile.
    assert_eq!(w.call("ping", json!([])), json!({"value": "pong"}));
    update_settings(&w);
    bootstrap_vm(&w);
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
    // The two updates' wall times are printed (not asserted): each includes two confirmed
    // monit reloads (apply's and start's), back to back.
    let t = Instant::now();
    update_instance(&w, &spec1, "shutdown");
    eprintln!(
        "DEPLOY: first update (prepare, stop, converge) took {:?}",
        t.elapsed()
    );
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
    let t = Instant::now();
    update_instance(&w, &spec2, "update");
    eprintln!(
        "DEPLOY: second update (prepare, stop, converge) took {:?}",
        t.elapsed()
    );
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
    let big = tgz_bytes("blob.bin", &random_bytes(1 << 20));
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
    stop_instance(&w, &json!({}), "shutdown", Intent::DeleteDeployment);
    let deadline = Instant::now() + RUN_LIMIT;
    while integration::monit::alive(pid2) {
        assert!(Instant::now() < deadline, "the job never stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.job_state(), "stopped");
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

/// The release version whose complete install `dir` is: its files are all there and stamped
/// with that version. Fails when `dir` is a temporary name or matches no version whole.
fn complete_version(
    what: &str,
    dir: &std::path::Path,
    versions: &[&str],
    complete: fn(&std::path::Path, &str) -> bool,
) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        !name.starts_with('.'),
        "{what} enables a temporary directory: {}",
        dir.display()
    );
    match versions.iter().find(|v| complete(dir, v)) {
        Some(v) => v.to_string(),
        None => panic!(
            "{what} enables {}, a partial install (files: {:?})",
            dir.display(),
            entries(dir)
        ),
    }
}

fn package_complete(dir: &std::path::Path, v: &str) -> bool {
    fs::read_to_string(dir.join("bin/hello")).is_ok_and(|t| t.contains(&format!("echo {v} >")))
}

fn job_complete(dir: &std::path::Path, v: &str) -> bool {
    dir.join("monit").is_file()
        && fs::read_to_string(dir.join("bin/ctl"))
            .is_ok_and(|t| t.contains(&format!(": release {v}\n")))
}

/// The versions `<base>/jobs/web` and `<base>/packages/hello` enable, each checked whole
/// (and the job's own link to the package, when it has one).
fn enabled_versions(base: &std::path::Path, versions: &[&str]) -> (String, String) {
    let job = fs::read_link(base.join("jobs/web")).expect("jobs/web is a link");
    let pkg = fs::read_link(base.join("packages/hello")).expect("packages/hello is a link");
    let job_v = complete_version("jobs/web", &job, versions, job_complete);
    let pkg_v = complete_version("packages/hello", &pkg, versions, package_complete);
    if let Ok(own) = fs::read_link(base.join("jobs/web/packages/hello")) {
        complete_version("jobs/web/packages/hello", &own, versions, package_complete);
    }
    (job_v, pkg_v)
}

/// Hidden (temporary) names where the applier installs and enables.
fn temporaries(base: &std::path::Path) -> Vec<String> {
    [
        "jobs",
        "packages",
        "jobs/web/packages",
        "data/jobs/web",
        "data/packages/hello",
    ]
    .iter()
    .flat_map(|d| {
        entries(&base.join(d))
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .map(move |n| format!("{d}/{n}"))
    })
    .collect()
}

/// `method [spec]` and its task polled, with short limits, so a SIGKILLed agent ends it
/// quickly: whether the task finished with a value.
fn run_until_killed(d: &Director, method: &str, spec: &serde_json::Value) -> bool {
    let Ok(first) = d.call(method, json!([spec]), 3, Duration::from_secs(2)) else {
        return false;
    };
    let Some(id) = first["value"]["agent_task_id"].as_str().map(str::to_string) else {
        return first.get("value").is_some();
    };
    loop {
        let Ok(r) = d.call("get_task", json!([id]), 3, Duration::from_secs(1)) else {
            return false;
        };
        if r["value"]["state"] != "running" {
            return r.get("value").is_some() && r.get("exception").is_none();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL during the `prepare` + `apply` of a new release version: after each kill the
/// enabled job and package links point at the complete previous version or the complete new
/// one (never a partial or temporary directory); the restarted agent, given the director's
/// update again, converges and runs the new version, with no temporary left behind.
/// Knobs: `CRASH_APPLY_KILLS` (default 10), `CRASH_SEED`.
#[test]
fn sigkill_during_the_apply_of_a_release_leaves_the_old_or_the_new_version_enabled() {
    use integration::crash::{Rng, knob};
    use nix::sys::signal::Signal;

    let kills = knob("CRASH_APPLY_KILLS", 10);
    let mut rng = Rng::from_env("CRASH_SEED");
    let mut w = world("deploy-crash-apply");
    let base = w.base();
    update_settings(&w);
    bootstrap_vm(&w);
    let versions = ["1.0", "2.0", "3.0"];
    let specs: Vec<serde_json::Value> = versions
        .iter()
        .map(|v| {
            let pkg = compile(&w, v, sha1);
            let t = web_templates_with(&base, "./", &format!(": release {v}"));
            let id = w.upload(&t);
            apply_spec(&pkg, (&id, &sha1(&t)), &format!("cfg-{v}"))
        })
        .collect();

    // Version 1 enabled; its prepare (the install) timed. The kill points fall within twice
    // that of sending prepare, so about half land in the install and half in the apply.
    let t = Instant::now();
    assert!(run_until_killed(&w.director, "prepare", &specs[0]));
    let window = t.elapsed() * 2;
    assert_eq!(w.ok("apply", json!([specs[0]])), json!("applied"));
    assert_eq!(
        enabled_versions(&base, &versions),
        ("1.0".into(), "1.0".into())
    );

    let (mut before, mut between, mut after, mut finished) = (0u64, 0u64, 0u64, 0u64);
    let mut old = 0usize;
    for i in 0..kills {
        let new = 1 + (i as usize % 2);
        let delay = rng.below(window);
        let pid = w.agent.pid();
        let (director, spec) = (&w.director, &specs[new]);
        let applied = std::thread::scope(|s| {
            let h = s.spawn(move || {
                run_until_killed(director, "prepare", spec)
                    && run_until_killed(director, "apply", spec)
            });
            std::thread::sleep(delay);
            w.agent.proc_mut().signal(Signal::SIGKILL).expect("SIGKILL");
            h.join().expect("director thread")
        });
        w.agent
            .wait_exit(Duration::from_secs(30))
            .expect("killed agent exits");
        finished += u64::from(applied);
        let (job_v, pkg_v) = enabled_versions(&base, &versions);
        let (o, n) = (versions[old], versions[new]);
        for (what, v) in [("jobs/web", &job_v), ("packages/hello", &pkg_v)] {
            assert!(
                v == o || v == n,
                "kill {i} (pid {pid}, after {delay:?}): {what} enables {v}, neither {o} nor {n}"
            );
        }
        match (job_v == o, pkg_v == o) {
            (true, true) => before += 1,
            (false, false) => after += 1,
            _ => between += 1,
        }

        // Restarted, the director's prepare and apply again: the new version is enabled,
        // the old one is gone, and no temporary is left.
        w.agent = w.sb.spawn_agent(&w.agent_exec).expect("spawn agent");
        w.agent
            .wait_ready(integration::READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("agent not ready after kill {i}: {e}"));
        w.director.wait_pong(CONNECT_LIMIT);
        assert_eq!(w.ok("prepare", json!([specs[new]])), json!("prepared"));
        assert_eq!(w.ok("apply", json!([specs[new]])), json!("applied"));
        assert_eq!(
            enabled_versions(&base, &versions),
            (n.to_string(), n.to_string()),
            "kill {i}"
        );
        assert_eq!(temporaries(&base), Vec::<String>::new(), "kill {i}");
        assert_eq!(entries(&base.join("data/packages/hello")).len(), 1);
        assert_eq!(entries(&base.join("data/jobs/web")).len(), 1);
        old = new;
    }

    // The rest of the update: the job runs the version the last apply enabled.
    converge(&w, &specs[old]);
    w.web_pid();
    // The program writes its version just after it starts.
    let deadline = Instant::now() + RUN_LIMIT;
    while w.web_version() != versions[old] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.web_version(), versions[old], "{}", w.logs());
    eprintln!(
        "{kills} kills within {window:?} of sending prepare, then apply: {before} left the old version enabled, {between} one link switched and not the other, {after} the new version ({finished} after the apply had answered)"
    );
}
