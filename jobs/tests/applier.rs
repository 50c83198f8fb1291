//! The applier and the compiler on real files: tiny archives made with the system `tar`,
//! served from `<base>/data/blobs/<id>` (the local source checked before any provider) and a
//! `local` provider for uploads. Ownership checks need root.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blobstore::{Blobs, Provider};
use common::TempDir;
use jobs::compiler::CompileError;
use jobs::spec::PackageRef;
use jobs::{
    Applier, ApplyError, ApplySpec, CompileLimits, CompileRequest, bundle_hash, compile_package,
};
use serde_json::{Value, json};

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests chown files to root:vcap and must run as root"
    );
}

/// The gid installs are owned by: vcap's if the group exists, else root's.
fn expected_gid() -> u32 {
    nix::unistd::Group::from_name("vcap")
        .ok()
        .flatten()
        .map_or(0, |g| g.gid.as_raw())
}

struct Vm {
    _dir: TempDir,
    root: PathBuf,
    base: PathBuf,
    store: PathBuf,
}

impl Vm {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag).unwrap();
        let root = dir.path().to_path_buf();
        let base = root.join("vcap");
        let store = root.join("store");
        std::fs::create_dir_all(base.join("data").join("blobs")).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        Self {
            _dir: dir,
            root,
            base,
            store,
        }
    }

    fn blobs(&self) -> Blobs {
        Blobs {
            provider: Provider::Local {
                dir: self.store.clone(),
            },
            data_dir: self.base.join("data"),
        }
    }

    fn applier(&self) -> Applier {
        Applier::new(self.blobs(), &self.base).with_parallel(2)
    }

    /// Writes `files` (relative path, content) under a fresh source dir, tars it (members
    /// named `./<path>` when `dot`, else `<path>`; gzipped when `gzip`), puts it at
    /// `<base>/data/blobs/<id>` and returns its sha1.
    fn blob(&self, id: &str, files: &[(&str, &str)], dot: bool, gzip: bool) -> String {
        let src = self.root.join(format!("src-{id}"));
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).unwrap();
        for (path, body) in files {
            let p = src.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
        }
        let out = self.base.join("data").join("blobs").join(id);
        let mut tar = Command::new("tar");
        tar.arg(if gzip { "-czf" } else { "-cf" })
            .arg(&out)
            .arg("-C")
            .arg(&src);
        if dot {
            tar.arg(".");
        } else {
            let mut tops: Vec<String> = files
                .iter()
                .map(|(p, _)| p.split('/').next().unwrap().to_string())
                .collect();
            tops.sort();
            tops.dedup();
            tar.args(tops);
        }
        assert!(tar.status().unwrap().success());
        sha1_of(&out)
    }
}

fn sha1_of(path: &Path) -> String {
    let out = Command::new("sha1sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn link(path: &Path) -> PathBuf {
    std::fs::read_link(path).unwrap_or_else(|e| panic!("reading link {}: {e}", path.display()))
}

const JOB_FILES: &[(&str, &str)] = &[
    ("nginx/monit", "check process nginx\n"),
    ("nginx/extra.monit", "check process nginx_extra\n"),
    ("nginx/bin/ctl", "#!/bin/sh\n"),
    ("nginx/config/nginx.conf", "conf"),
    ("app/monit", "check process app\n"),
];

/// A spec with jobs nginx and app (archive `rta`) and packages ruby and zlib.
fn spec(vm: &Vm, ruby_version: &str) -> (Value, String, String) {
    let rta = vm.blob("rta", JOB_FILES, true, true);
    let ruby = vm.blob(
        &format!("ruby-{ruby_version}"),
        &[("bin/ruby", ruby_version), ("lib/x.rb", "")],
        true,
        true,
    );
    let zlib = vm.blob("zlib", &[("lib/libz.so", "z")], true, true);
    let v = json!({
        "deployment": "d",
        "job": {"name": "web", "templates": [
            {"name": "nginx", "version": "n1", "sha1": "ignored", "blobstore_id": "ignored"},
            {"name": "app", "version": "a1"}
        ]},
        "packages": {
            "ruby": {"name": "ruby", "version": ruby_version, "sha1": ruby, "blobstore_id": format!("ruby-{ruby_version}")},
            "zlib": {"name": "zlib", "version": "z1", "sha1": zlib, "blobstore_id": "zlib"}
        },
        "rendered_templates_archive": {"blobstore_id": "rta", "sha1": rta},
        "configuration_hash": "h1"
    });
    (v, rta, ruby)
}

fn parse(v: &Value) -> ApplySpec {
    ApplySpec::from_json(v).unwrap()
}

#[test]
fn apply_installs_enables_and_links_with_upstreams_layout() {
    require_root();
    let vm = Vm::new("apply");
    let (v, rta, ruby) = spec(&vm, "r1");
    let stale = vm.base.join("monit/job/0000_old.monitrc");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "old").unwrap();

    assert!(vm.applier().apply(&parse(&v)).unwrap());

    let gid = expected_gid();
    // Packages.
    let ruby_dir = vm
        .base
        .join("data/packages/ruby")
        .join(bundle_hash("r1", &ruby));
    assert_eq!(
        ruby_dir.file_name().unwrap().to_str().unwrap().len(),
        40,
        "sha1 hex"
    );
    assert_eq!(mode(&ruby_dir), 0o755);
    let meta = std::fs::metadata(&ruby_dir).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, gid));
    assert_eq!(link(&vm.base.join("packages/ruby")), ruby_dir);
    assert_eq!(
        std::fs::read_to_string(vm.base.join("packages/ruby/bin/ruby")).unwrap(),
        "r1"
    );
    // Jobs.
    let nginx_dir = vm
        .base
        .join("data/jobs/nginx")
        .join(bundle_hash("n1", &rta));
    assert_eq!(link(&vm.base.join("jobs/nginx")), nginx_dir);
    assert_eq!(mode(&nginx_dir), 0o750);
    assert_eq!(mode(&nginx_dir.join("bin")), 0o750);
    assert_eq!(mode(&nginx_dir.join("bin/ctl")), 0o750);
    assert_eq!(mode(&nginx_dir.join("config")), 0o750);
    assert_eq!(mode(&nginx_dir.join("config/nginx.conf")), 0o640);
    assert_eq!(mode(&nginx_dir.join("monit")), 0o640);
    for p in [&nginx_dir, &nginx_dir.join("config/nginx.conf")] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, gid), "{}", p.display());
    }
    // Only this job's files: the archive's other job is not under nginx.
    assert!(!nginx_dir.join("app").exists());
    assert!(vm.base.join("jobs/app/monit").is_file());
    // Per-job package links: every package of the spec, to the install dirs.
    for job in ["nginx", "app"] {
        assert_eq!(
            link(&vm.base.join("jobs").join(job).join("packages/ruby")),
            ruby_dir
        );
        assert!(
            vm.base
                .join("jobs")
                .join(job)
                .join("packages/zlib/lib/libz.so")
                .is_file()
        );
    }
    // Job directories.
    for dir in [
        "data/sys/log/nginx",
        "data/sys/run/nginx",
        "data/nginx",
        "data/app",
    ] {
        assert_eq!(mode(&vm.base.join(dir)), 0o770, "{dir}");
    }
    // monit/job was reset.
    assert!(!stale.exists());

    // Idempotent: the same spec again changes nothing.
    assert!(vm.applier().apply(&parse(&v)).unwrap());
    assert_eq!(link(&vm.base.join("packages/ruby")), ruby_dir);

    // configure_monit: index counted from the last job.
    let written = vm.applier().configure_monit(&parse(&v)).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "0000_app.monitrc",
            "0001_nginx.monitrc",
            "0001_nginx_extra.monitrc"
        ]
    );
    assert!(
        written
            .iter()
            .all(|p| p.parent() == Some(&*vm.base.join("monit/job")))
    );
    assert_eq!(
        std::fs::read_to_string(&written[2]).unwrap(),
        "check process nginx_extra\n"
    );
}

#[test]
fn a_partial_spec_applies_nothing() {
    let vm = Vm::new("partial");
    let spec = parse(&json!({"deployment": "d", "job": {"name": "web"}, "index": 0}));
    assert!(!vm.applier().apply(&spec).unwrap());
    assert!(!vm.base.join("jobs").exists());
}

#[test]
fn keep_only_removes_old_versions_and_undesired_bundles() {
    require_root();
    let vm = Vm::new("keeponly");
    let (v1, _, ruby1) = spec(&vm, "r1");
    vm.applier().apply(&parse(&v1)).unwrap();
    let (mut v2, _, ruby2) = spec(&vm, "r2");
    // app and zlib are dropped.
    v2["job"]["templates"] = json!([{"name": "nginx", "version": "n1"}]);
    v2["packages"].as_object_mut().unwrap().remove("zlib");
    vm.applier().apply(&parse(&v2)).unwrap();

    let packages = vm.base.join("data/packages");
    assert!(
        !packages
            .join("ruby")
            .join(bundle_hash("r1", &ruby1))
            .exists()
    );
    let new = packages.join("ruby").join(bundle_hash("r2", &ruby2));
    assert_eq!(link(&vm.base.join("packages/ruby")), new);
    assert_eq!(std::fs::read_dir(packages.join("ruby")).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(packages.join("zlib")).unwrap().count(), 0);
    assert!(std::fs::symlink_metadata(vm.base.join("packages/zlib")).is_err());
    assert_eq!(
        std::fs::read_dir(vm.base.join("data/jobs/app"))
            .unwrap()
            .count(),
        0
    );
    assert!(std::fs::symlink_metadata(vm.base.join("jobs/app")).is_err());
    // The job's own links follow.
    assert_eq!(link(&vm.base.join("jobs/nginx/packages/ruby")), new);
    assert!(std::fs::symlink_metadata(vm.base.join("jobs/nginx/packages/zlib")).is_err());
}

/// What an apply killed mid-way leaves: a half-unpacked install at its hidden temporary
/// name, and new links at their hidden temporary names not yet renamed over the enabled
/// ones (pointing at the old and at the wanted version). The next apply enables only the
/// wanted versions and removes every one of them.
#[test]
fn the_leftovers_of_a_killed_apply_are_removed_by_the_next() {
    require_root();
    let vm = Vm::new("leftovers");
    let (v1, _, ruby1) = spec(&vm, "r1");
    vm.applier().apply(&parse(&v1)).unwrap();
    let (v2, rta, ruby2) = spec(&vm, "r2");
    vm.applier().prepare(&parse(&v2)).unwrap();
    let old = vm
        .base
        .join("data/packages/ruby")
        .join(bundle_hash("r1", &ruby1));
    let new = vm
        .base
        .join("data/packages/ruby")
        .join(bundle_hash("r2", &ruby2));
    let nginx = vm
        .base
        .join("data/jobs/nginx")
        .join(bundle_hash("n1", &rta));
    let partial = vm.base.join("data/packages/ruby/.x.installing-99999-0");
    std::fs::create_dir_all(partial.join("bin")).unwrap();
    let stale = [
        (vm.base.join("packages/.ruby.link-99999-1"), new.clone()),
        (vm.base.join("packages/.ruby.link-99999-2"), old.clone()),
        (vm.base.join("jobs/.nginx.link-99999-3"), nginx.clone()),
        (
            vm.base.join("jobs/nginx/packages/.ruby.link-99999-4"),
            new.clone(),
        ),
    ];
    for (l, target) in &stale {
        std::os::unix::fs::symlink(target, l).unwrap();
    }

    vm.applier().apply(&parse(&v2)).unwrap();

    assert_eq!(link(&vm.base.join("packages/ruby")), new);
    assert_eq!(link(&vm.base.join("jobs/nginx")), nginx);
    assert!(!partial.exists(), "the partial install is removed");
    assert!(!old.exists(), "the old version is removed");
    for (l, _) in &stale {
        assert!(
            std::fs::symlink_metadata(l).is_err(),
            "{} is removed",
            l.display()
        );
    }
}

#[test]
fn a_failed_install_leaves_the_previous_version_enabled() {
    require_root();
    let vm = Vm::new("failed");
    let (v1, _, ruby1) = spec(&vm, "r1");
    vm.applier().apply(&parse(&v1)).unwrap();
    let old = vm
        .base
        .join("data/packages/ruby")
        .join(bundle_hash("r1", &ruby1));
    let monitrc = vm.base.join("monit/job/0000_app.monitrc");
    vm.applier().configure_monit(&parse(&v1)).unwrap();

    let (mut v2, _, _) = spec(&vm, "r2");
    let wrong = "0000000000000000000000000000000000000000";
    v2["packages"]["ruby"]["sha1"] = json!(wrong);
    let err = vm.applier().apply(&parse(&v2)).unwrap_err();
    assert!(
        matches!(&err, ApplyError::Blob { what: "package", name, blob, .. } if name == "ruby" && blob == "ruby-r2"),
        "{err}"
    );
    assert!(err.to_string().contains("ruby-r2"), "{err}");
    // The old version is enabled and whole; no partial install, monit configs untouched.
    assert_eq!(link(&vm.base.join("packages/ruby")), old);
    assert_eq!(std::fs::read_to_string(old.join("bin/ruby")).unwrap(), "r1");
    let entries: Vec<_> = std::fs::read_dir(vm.base.join("data/packages/ruby"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries, std::slice::from_ref(&old));
    assert!(monitrc.is_file());

    // Fixed, the same apply goes through.
    let (v2, _, ruby2) = spec(&vm, "r2");
    vm.applier().apply(&parse(&v2)).unwrap();
    assert_eq!(
        link(&vm.base.join("packages/ruby")),
        vm.base
            .join("data/packages/ruby")
            .join(bundle_hash("r2", &ruby2))
    );
    assert!(!old.exists());
}

#[test]
fn prepare_installs_without_enabling() {
    require_root();
    let vm = Vm::new("prepare");
    let (v, rta, ruby) = spec(&vm, "r1");
    vm.applier().prepare(&parse(&v)).unwrap();
    assert!(
        vm.base
            .join("data/packages/ruby")
            .join(bundle_hash("r1", &ruby))
            .is_dir()
    );
    assert!(
        vm.base
            .join("data/jobs/nginx")
            .join(bundle_hash("n1", &rta))
            .is_dir()
    );
    assert!(!vm.base.join("packages").exists());
    assert!(!vm.base.join("jobs").exists());
    // Prepared bundles are reused by apply.
    vm.applier().apply(&parse(&v)).unwrap();
    assert!(vm.base.join("jobs/nginx/monit").is_file());
}

#[test]
fn job_archives_without_the_leading_dot_install_too() {
    require_root();
    let vm = Vm::new("nats");
    let (mut v, _, _) = spec(&vm, "r1");
    let rta = vm.blob("rta-nats", JOB_FILES, false, true);
    v["rendered_templates_archive"] = json!({"blobstore_id": "rta-nats", "sha1": rta});
    vm.applier().apply(&parse(&v)).unwrap();
    assert!(vm.base.join("jobs/nginx/bin/ctl").is_file());
    assert!(vm.base.join("jobs/app/monit").is_file());
}

#[test]
fn a_job_missing_from_the_archive_fails_without_installing() {
    require_root();
    let vm = Vm::new("missingjob");
    let (mut v, _, _) = spec(&vm, "r1");
    v["job"]["templates"] = json!([{"name": "ghost", "version": "g1"}]);
    let err = vm.applier().apply(&parse(&v)).unwrap_err();
    assert!(err.to_string().contains("ghost"), "{err}");
    let dir = vm.base.join("data/jobs/ghost");
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0);
}

#[test]
fn hostile_names_never_reach_the_file_system() {
    let vm = Vm::new("hostile");
    let (mut v, _, _) = spec(&vm, "r1");
    v["packages"]["ruby"]["name"] = json!("../../etc");
    let err = ApplySpec::from_json(&v).unwrap_err().to_string();
    assert!(err.contains("\"../../etc\""), "{err}");
    let req = CompileRequest {
        blob_id: "x".into(),
        digest: "abc".into(),
        name: "../x".into(),
        version: "1".into(),
        deps: BTreeMap::new(),
    };
    let err = compile_package(&vm.blobs(), &vm.base, &req, &CompileLimits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"../x\""), "{err}");
}

const PACKAGING: &str = r#"set -e
echo "compile=$BOSH_COMPILE_TARGET" > "$BOSH_INSTALL_TARGET/env.txt"
echo "install=$BOSH_INSTALL_TARGET" >> "$BOSH_INSTALL_TARGET/env.txt"
echo "name=$BOSH_PACKAGE_NAME" >> "$BOSH_INSTALL_TARGET/env.txt"
echo "version=$BOSH_PACKAGE_VERSION" >> "$BOSH_INSTALL_TARGET/env.txt"
echo "pwd=$(pwd)" >> "$BOSH_INSTALL_TARGET/env.txt"
cp /VCAP/packages/dep/lib/dep.txt "$BOSH_INSTALL_TARGET/"
cp src/hello.txt "$BOSH_INSTALL_TARGET/"
echo building
"#;

fn compile_request(vm: &Vm, packaging: &str, gzip: bool) -> CompileRequest {
    let script = packaging.replace("/VCAP", &vm.base.display().to_string());
    let src = vm.blob(
        "src",
        &[("packaging", &script), ("src/hello.txt", "hello")],
        true,
        gzip,
    );
    let dep = vm.blob("dep", &[("lib/dep.txt", "dep")], true, true);
    let mut deps = BTreeMap::new();
    deps.insert(
        "dep".to_string(),
        PackageRef {
            name: "dep".into(),
            version: "d1".into(),
            sha1: dep,
            blobstore_id: "dep".into(),
        },
    );
    CompileRequest {
        blob_id: "src".into(),
        digest: src,
        name: "hello".into(),
        version: "v1".into(),
        deps,
    }
}

#[test]
fn compile_package_runs_packaging_and_uploads_the_result() {
    require_root();
    let vm = Vm::new("compile");
    // A leftover package is removed first.
    let (v, _, _) = spec(&vm, "r1");
    vm.applier().apply(&parse(&v)).unwrap();
    let req = compile_request(&vm, PACKAGING, true);
    let up = compile_package(&vm.blobs(), &vm.base, &req, &CompileLimits::default()).unwrap();

    let blob = vm.store.join(&up.blobstore_id);
    assert_eq!(sha1_of(&blob), up.sha1);
    assert_eq!(up.blobstore_id.len(), 36, "a UUID: {}", up.blobstore_id);
    let head = std::fs::read(&blob).unwrap();
    assert_eq!(&head[..2], &[0x1f, 0x8b], "gzipped like its source");
    let out = vm.root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    assert!(
        Command::new("tar")
            .arg("-xzf")
            .arg(&blob)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap()
            .success()
    );
    let env = std::fs::read_to_string(out.join("env.txt")).unwrap();
    let compile = vm.base.join("data/compile/hello");
    assert_eq!(
        env,
        format!(
            "compile={c}\ninstall={i}\nname=hello\nversion=v1\npwd={c}\n",
            c = compile.display(),
            i = vm.base.join("packages/hello").display()
        )
    );
    assert_eq!(std::fs::read_to_string(out.join("dep.txt")).unwrap(), "dep");
    assert_eq!(
        std::fs::read_to_string(out.join("hello.txt")).unwrap(),
        "hello"
    );

    // Logs, with upstream's modes.
    let logs = vm.base.join("data/sys/log/compilation");
    assert_eq!(mode(&logs), 0o750);
    assert_eq!(mode(&logs.join("packaging.stdout.log")), 0o640);
    assert_eq!(
        std::fs::read_to_string(logs.join("packaging.stdout.log")).unwrap(),
        "building\n"
    );
    assert!(
        std::fs::read_to_string(logs.join("packaging.stderr.log"))
            .unwrap()
            .contains("+ echo building")
    );
    // Nothing left: no packages, no links, no compile dir.
    assert!(!compile.exists());
    assert!(
        !vm.base
            .join("data/compile/hello-bosh-agent-unpack")
            .exists()
    );
    for name in ["ruby", "zlib", "dep", "hello"] {
        let dir = vm.base.join("data/packages").join(name);
        assert!(
            !dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0,
            "{name}"
        );
        assert!(std::fs::symlink_metadata(vm.base.join("packages").join(name)).is_err());
    }
}

#[test]
fn a_plain_tar_source_gives_a_plain_tar() {
    require_root();
    let vm = Vm::new("plain");
    let req = compile_request(&vm, PACKAGING, false);
    let up = compile_package(&vm.blobs(), &vm.base, &req, &CompileLimits::default()).unwrap();
    let head = std::fs::read(vm.store.join(&up.blobstore_id)).unwrap();
    assert_ne!(&head[..2], &[0x1f, 0x8b]);
    assert_eq!(&head[257..262], b"ustar");
}

#[test]
fn a_failing_packaging_script_carries_its_output_tail() {
    require_root();
    let vm = Vm::new("compilefail");
    let script = "for i in $(seq 1 3000); do echo line-$i; done\necho oops >&2\nexit 3\n";
    let req = compile_request(&vm, script, true);
    let err = compile_package(&vm.blobs(), &vm.base, &req, &CompileLimits::default()).unwrap_err();
    let CompileError::Packaging {
        how,
        stdout,
        stdout_truncated,
        stderr,
        stderr_truncated,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(how, "Command exited with 3");
    assert!(*stdout_truncated);
    assert_eq!(stdout.len(), 10 * 1024);
    assert!(stdout.ends_with("line-3000\n"));
    // `bash -x` traces every echo to stderr, so it is long too.
    assert!(*stderr_truncated);
    assert!(stderr.ends_with("oops\n+ exit 3\n"), "{stderr:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("Running packaging script: Command exited with 3; Truncated stdout: "),
        "{msg}"
    );
    assert!(msg.contains(", Truncated stderr: "), "{msg}");
    // Cleaned up anyway.
    assert!(!vm.base.join("data/compile/hello").exists());
    assert!(std::fs::symlink_metadata(vm.base.join("packages/hello")).is_err());
    assert!(std::fs::symlink_metadata(vm.base.join("packages/dep")).is_err());
}

#[test]
fn a_packaging_script_is_killed_at_its_timeout() {
    require_root();
    let vm = Vm::new("compiletimeout");
    let pidfile = vm.root.join("child.pid");
    let script = format!("sleep 60 &\necho $! > {}\nwait\n", pidfile.display());
    let req = compile_request(&vm, &script, true);
    let limits = CompileLimits {
        timeout: Some(Duration::from_millis(500)),
        ..CompileLimits::default()
    };
    let started = Instant::now();
    let err = compile_package(&vm.blobs(), &vm.base, &req, &limits).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.to_string().contains("timed out"), "{err}");
    // The script's child went with it.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    common::wait_for_sync("sleep killed", Duration::from_secs(5), || {
        !common::alive(pid)
    });

    // Cancellation works the same way.
    let limits = CompileLimits::default();
    let token = limits.cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        token.cancel();
    });
    let err = compile_package(&vm.blobs(), &vm.base, &req, &limits).unwrap_err();
    canceller.join().unwrap();
    assert!(err.to_string().contains("cancelled"), "{err}");
}

#[test]
fn a_hostile_package_archive_installs_nothing() {
    require_root();
    let vm = Vm::new("hostilearchive");
    let (mut v, _, _) = spec(&vm, "r1");
    // A member named `../escaped.txt` (GNU tar keeps it with -P).
    let src = vm.root.join("hostile/inner");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(vm.root.join("hostile/escaped.txt"), "x").unwrap();
    let out = vm.base.join("data/blobs/hostile");
    assert!(
        Command::new("tar")
            .arg("-czPf")
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg("../escaped.txt")
            .status()
            .unwrap()
            .success()
    );
    v["packages"]["ruby"]["sha1"] = json!(sha1_of(&out));
    v["packages"]["ruby"]["blobstore_id"] = json!("hostile");
    let err = vm.applier().apply(&parse(&v)).unwrap_err();
    assert!(err.to_string().contains("hostile"), "{err}");
    let ruby = vm.base.join("data/packages/ruby");
    assert!(!ruby.exists() || std::fs::read_dir(&ruby).unwrap().count() == 0);
    assert!(!vm.base.join("data/packages/escaped.txt").exists());
    assert!(!vm.base.join("packages").exists());
}
