//! The director simulator replays the flows of an instance with a persistent disk, in the
//! director's order and with its argument shapes, against the real agent, a real nats-server
//! (mutual TLS), a real monit running the deployed job, Debian's nginx as the DAV blobstore,
//! and loop devices the test makes as the disks:
//!
//! - (b) a fresh deploy with a disk: the partial apply, `sync_dns`, prepare, the stopper,
//!   add_persistent_disk + mount_disk, converge (update_settings, apply, pre-start, start, the
//!   start watch, post-start), post-deploy; the job writes to `<base>/store`, on the disk;
//! - (c) an update that resizes the disk without native resize: list_disk, the new disk on the
//!   migration target, migrate_disk, the old disk's list_disk and remove_persistent_disk, and
//!   the job started again sees its data on the new disk;
//! - (d) `bosh ssh` setup and cleanup, (e) `bosh logs` (the job's logs as a tgz in the
//!   blobstore, downloaded and listed);
//! - a recreate: the stopper with `BOSH_VM_NEXT_STATE=delete`, list_disk + unmount_disk +
//!   remove_persistent_disk, the VM goes; a new VM (fresh base directory and agent state)
//!   gets the same disk, which is mounted without being formatted, data intact, and the DNS
//!   records;
//! - bad input along the way (a cid never attached, a migration naming the wrong disk, an
//!   unsafe ssh user, an unknown log type): the director's error shape, and nothing changed.
//!
//! Each VM is a private mount namespace of the test's own ([`integration::vm::Vm`]) that the
//! agent and monit share, with a copy of `/etc` bound over `/etc`: the disks the agent
//! mounts are seen by the job and never by the host, and `useradd` edits the copy (the host's
//! accounts are checked unchanged at the end). Run as root:
//! `cargo test -p integration --test deploy_disk`. A missing prerequisite fails with the
//! reason.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration::dav::DavServer;
use integration::monit::Monit;
use integration::nats::*;
use integration::sim::*;
use integration::vm::{Loop, Vm, require_tools};
use integration::{Agent, CgroupDir, Sandbox};
use serde_json::{Value, json};

const AGENT_SIDE: &str = "127.0.0.1:4222";
const CONNECT_LIMIT: Duration = Duration::from_secs(15);

/// What `ctl start` does before it starts the program: count this start on the store and log
/// what the job sees there (the device holding the store, and the count).
const ON_START: &str = "mkdir -p $B/store/web\n\
    echo start >> $B/store/web/starts\n\
    echo \"start $(wc -l < $B/store/web/starts) on $(findmnt -n -o SOURCE --target $B/store)\" \
    >> $B/sys/log/web/ctl.log";

/// Fields drop in order: monit (and the job), the agent, the VM's namespace, then the rest;
/// the loop devices after everything that could hold their mounts.
struct World {
    monit: Option<Monit>,
    agent: Option<Agent>,
    vm: Option<Vm>,
    director: Director,
    dav: DavServer,
    disks: Vec<Loop>,
    agent_cg: CgroupDir,
    settings: Value,
    _nats: NatsServer,
    sb: Sandbox,
}

fn world(name: &str) -> World {
    require_tools(&[
        "losetup",
        "unshare",
        "nsenter",
        "findmnt",
        "useradd",
        "sfdisk",
        "mkfs.ext4",
        "blkid",
        "tar",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let sb = Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").expect("agent cgroup");
    let nats = NatsServer::start_with(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None, "");
    let dav = DavServer::start_in(sb.netns().file()).unwrap_or_else(|e| panic!("nginx: {e}"));
    fs::write(
        sb.dir().join("ssh_host_rsa_key.pub"),
        "ssh-rsa AAAAHOSTKEY host\n",
    )
    .unwrap();
    fs::write(sb.dir().join("hosts"), "127.0.0.1 localhost\n").unwrap();
    let mut s = settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent"));
    s["env"]["bosh"]["blobstores"] = json!([dav.agent_blobstore()]);
    s["networks"] = json!({"default": {"type": "manual", "ip": "10.0.0.9",
        "netmask": "255.255.255.0", "default": ["dns", "gateway"]}});
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    World {
        monit: None,
        agent: None,
        vm: None,
        director,
        dav,
        disks: Vec::new(),
        agent_cg,
        settings: s,
        _nats: nats,
        sb,
    }
}

impl World {
    /// The CPI's create_vm: a fresh VM (mount namespace, empty base directory), its agent and
    /// monit; returns once the agent answers ping (`wait_until_ready`).
    fn create_vm(&mut self, name: &str) {
        let vm = Vm::boot(&self.sb, name).unwrap_or_else(|e| panic!("{e}"));
        let base = self.base();
        // The stemcell's monitrc includes the job files the agent writes on `start`.
        let mut monit = Monit::prepare_with(
            &self.sb,
            &format!("include {}/monit/job/*.monitrc\n", base.display()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        monit.set_mount_namespace(&vm.mount_namespace());
        let exec = agent_exec_with(&self.sb, &self.agent_cg, &self.settings, true, &json!({}))
            .env(
                "BOSH_AGENT_SSH_HOST_KEY",
                self.sb.dir().join("ssh_host_rsa_key.pub"),
            )
            .env("BOSH_AGENT_HOSTS_FILE", self.sb.dir().join("hosts"))
            .mountns(&vm.mount_namespace());
        let mut agent = self.sb.spawn_agent(&exec).expect("spawn agent");
        agent
            .wait_ready(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("agent not ready: {e}"));
        self.agent = Some(agent);
        self.vm = Some(vm);
        monit.start().unwrap_or_else(|e| panic!("{e}"));
        self.monit = Some(monit);
        self.director.wait_pong(CONNECT_LIMIT);
    }

    /// The CPI's delete_vm: the VM's processes and its namespace go (with whatever it still
    /// had mounted); its base directory is kept aside as `<sandbox>/<kept_as>`, so the next
    /// VM starts from an empty one at the same path.
    fn delete_vm(&mut self, kept_as: &str) {
        if let Some(mut m) = self.monit.take() {
            m.stop();
        }
        if let Some(mut a) = self.agent.take() {
            a.stop().unwrap();
        }
        drop(self.vm.take());
        fs::rename(self.base(), self.sb.dir().join(kept_as)).unwrap();
    }

    fn vm(&self) -> &Vm {
        self.vm.as_ref().expect("a VM is running")
    }

    /// What is mounted on `<base>/<dir>` in the VM.
    fn mounted_on(&self, dir: &str) -> Option<String> {
        self.vm()
            .mount_source(&self.base().join(dir))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A file under the base directory, read inside the VM (where the disk is mounted).
    fn read_in_vm(&self, rel: &str) -> String {
        self.vm()
            .read(&self.base().join(rel))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The lines `ctl start` wrote to the job's log.
    fn ctl_log(&self) -> Vec<String> {
        fs::read_to_string(self.base().join("data/sys/log/web/ctl.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// The director's `wait_until_ready` then `add_persistent_disk [cid, hint]` (the CPI's
    /// attach_disk gave the device path), `wait_until_ready`, `mount_disk [cid]`.
    fn attach_and_mount(&self, cid: &str, dev: &str) {
        assert_eq!(self.call("ping", json!([])), json!({"value": "pong"}));
        assert_eq!(self.ok("add_persistent_disk", json!([cid, dev])), json!({}));
        assert_eq!(self.call("ping", json!([])), json!({"value": "pong"}));
        assert_eq!(self.ok("mount_disk", json!([cid])), json!({}));
    }

    /// The job's program runs (pid alive) and the store is still `dev`'s partition.
    fn still_serving(&self, pid: u32, partition: &str, what: &str) {
        assert!(
            integration::monit::alive(pid),
            "after {what}: the job still runs\n{}",
            self.logs()
        );
        assert_eq!(self.job_state(), "running", "after {what}");
        assert_eq!(
            self.mounted_on("store").as_deref(),
            Some(partition),
            "after {what}: the store is still mounted"
        );
    }
}

impl DirectorSim for World {
    fn director(&self) -> &Director {
        &self.director
    }

    fn dav(&self) -> &DavServer {
        &self.dav
    }

    fn base(&self) -> PathBuf {
        self.sb.dir().join("base")
    }

    fn logs(&self) -> String {
        format!(
            "monit:\n{}\nagent log:\n{}",
            self.monit.as_ref().map(Monit::log).unwrap_or_default(),
            self.agent.as_ref().map(Agent::log).unwrap_or_default()
        )
    }
}

fn fs_uuid(partition: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID", partition])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn tar_listing(dir: &Path, blob: &[u8]) -> String {
    let path = dir.join("logs.tgz");
    fs::write(&path, blob).unwrap();
    let out = Command::new("tar").arg("-tzf").arg(&path).output().unwrap();
    assert!(out.status.success(), "tar -tzf: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn tar_member(dir: &Path, blob: &[u8], member: &str) -> String {
    let path = dir.join("logs.tgz");
    fs::write(&path, blob).unwrap();
    let out = Command::new("tar")
        .arg("-xzOf")
        .arg(&path)
        .arg(member)
        .output()
        .unwrap();
    assert!(out.status.success(), "tar -xzOf {member}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_director_deploys_with_a_disk_resizes_it_uses_ssh_and_logs_and_recreates_the_vm() {
    let host_passwd = fs::read("/etc/passwd").unwrap();
    let mut w = world("deploy-disk");
    let dir = w.sb.dir().to_path_buf();
    w.disks.push(Loop::new(&dir, "disk-1", 64).unwrap());
    w.disks.push(Loop::new(&dir, "disk-2", 128).unwrap());
    let (d1, d2) = (w.disks[0].dev().to_string(), w.disks[1].dev().to_string());
    let (p1, p2) = (w.disks[0].partition(), w.disks[1].partition());
    w.create_vm("vm-1");
    let base = w.base();

    // The release's package, compiled on the agent (flow (a)); the templates archive.
    update_settings(&w);
    bootstrap_vm(&w);
    let hello = compile(&w, "1.0", sha256);
    let templates = web_templates_with(&base, "./", ON_START);
    let archive = w.upload(&templates);
    let mut spec1 = apply_spec(&hello, (&archive, &sha1(&templates)), "cfg-1");
    spec1["persistent_disk"] = json!(64);

    // (b) A fresh deploy with a persistent disk. SetupStage: update_settings, the partial
    // apply, get_state, the local DNS records. Then prepare, the stopper (drain "shutdown":
    // the disk changes), the new disk, converge, post-deploy.
    update_settings(&w);
    bootstrap_vm(&w);
    sync_dns(&w, 1);
    assert!(
        fs::read_to_string(dir.join("hosts"))
            .unwrap()
            .contains("10.0.0.9 a1b2-web-0.web.default.dep.bosh"),
        "sync_dns wrote the hosts file"
    );
    assert_eq!(w.ok("prepare", json!([spec1])), json!("prepared"));
    stop_instance(&w, &spec1, "shutdown", Intent::KeepVm);
    w.attach_and_mount("disk-1", &d1);
    assert_eq!(w.mounted_on("store").as_deref(), Some(p1.as_str()));
    converge(&w, &spec1);
    w.ok("run_script", json!(["post-deploy", {}]));
    let pid = w.web_pid();
    assert_eq!(w.web_version(), "1.0");
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-1"]));
    assert_eq!(w.read_in_vm("store/web/starts"), "start\n");
    assert_eq!(
        w.ctl_log(),
        [format!("start 1 on {p1}")],
        "the job sees the disk"
    );
    assert!(
        !base.join("store/web").exists(),
        "the job's data is on the disk, not under the mount point"
    );
    assert_eq!(
        fs::read_to_string(base.join("bosh/managed_disk_settings.json")).unwrap(),
        "disk-1"
    );

    // A cid the director never attached: upstream's error, nothing changed.
    let e = w.fails("mount_disk", json!(["disk-unknown"]));
    assert!(
        e.contains("Persistent disk with volume id 'disk-unknown' could not be found"),
        "{e}"
    );
    w.still_serving(pid, &p1, "mount_disk of an unknown cid");
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-1"]));

    // (c) The disk grows (no native resize): assembly's get_state, prepare, the stopper,
    // sync_persistent_disk's list_disk, the new disk attached and mounted (on the migration
    // target: the store is taken), migrate_disk, then the old disk: list_disk (it is not
    // mounted any more, so no unmount_disk), remove_persistent_disk; converge.
    let mut spec2 = spec1.clone();
    spec2["persistent_disk"] = json!(128);
    spec2["configuration_hash"] = json!("cfg-2");
    assert_eq!(w.job_state(), "running");
    assert_eq!(w.ok("prepare", json!([spec2])), json!("prepared"));
    stop_instance(&w, &spec2, "shutdown", Intent::KeepVm);
    assert!(!integration::monit::alive(pid), "the job stopped");
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-1"]));
    w.attach_and_mount("disk-2", &d2);
    assert_eq!(
        w.mounted_on("store_migration_target").as_deref(),
        Some(p2.as_str())
    );
    let mut listed = w.ok("list_disk", json!([]));
    listed.as_array_mut().unwrap().sort_by_key(Value::to_string);
    assert_eq!(listed, json!(["disk-1", "disk-2"]));
    // A migration that names a disk that is not on the migration target: refused before
    // anything moves.
    for args in [json!(["disk-1", "disk-bogus"]), json!(["disk-2", "disk-1"])] {
        let e = w.fails("migrate_disk", args.clone());
        assert!(e.contains("Migrating persistent disk: "), "{args}: {e}");
        assert_eq!(
            w.mounted_on("store").as_deref(),
            Some(p1.as_str()),
            "{args}"
        );
        assert_eq!(
            w.mounted_on("store_migration_target").as_deref(),
            Some(p2.as_str()),
            "{args}"
        );
        let out = w
            .vm()
            .sh(&format!("touch {}/store/web/writable", base.display()))
            .unwrap();
        assert!(
            out.status.success(),
            "{args}: the store is still writable: {out:?}"
        );
    }
    assert_eq!(w.ok("migrate_disk", json!(["disk-1", "disk-2"])), json!({}));
    assert_eq!(w.mounted_on("store").as_deref(), Some(p2.as_str()));
    assert_eq!(w.mounted_on("store_migration_target"), None);
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-2"]));
    assert_eq!(w.ok("remove_persistent_disk", json!(["disk-1"])), json!({}));
    let hints: Value =
        serde_json::from_slice(&fs::read(base.join("bosh/persistent_disk_hints.json")).unwrap())
            .unwrap();
    assert!(
        hints.get("disk-1").is_none() && hints.get("disk-2").is_some(),
        "{hints}"
    );
    converge(&w, &spec2);
    w.ok("run_script", json!(["post-deploy", {}]));
    let pid = w.web_pid();
    assert_eq!(w.read_in_vm("store/web/starts"), "start\nstart\n");
    assert_eq!(
        w.ctl_log().last().cloned(),
        Some(format!("start 2 on {p2}")),
        "the job started again sees its data on the new disk"
    );
    assert_eq!(
        fs::read_to_string(base.join("bosh/managed_disk_settings.json")).unwrap(),
        "disk-2"
    );

    // (d) bosh ssh: setup (sync), an unsafe user name refused, cleanup.
    let user = "bosh_4f1c9e2ab07d3e55";
    let key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 operator@laptop";
    let r = w.call("ssh", json!(["setup", {"user": user, "public_key": key}]));
    assert_eq!(
        r["value"],
        json!({"command": "setup", "status": "success", "ip": "10.0.0.9",
               "host_public_key": "ssh-rsa AAAAHOSTKEY host\n"}),
        "{r}"
    );
    let passwd = || fs::read_to_string(w.vm().etc().join("passwd")).unwrap();
    assert!(passwd().lines().any(|l| l.starts_with(&format!("{user}:"))));
    assert_eq!(
        fs::read_to_string(base.join(format!("bosh_ssh/{user}/.ssh/authorized_keys")))
            .unwrap()
            .trim(),
        key
    );
    let before = passwd();
    let r = w.call(
        "ssh",
        json!(["setup", {"user": "bosh_x;reboot", "public_key": key}]),
    );
    assert!(
        r["exception"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bosh_x;reboot")),
        "{r}"
    );
    assert_eq!(passwd(), before, "no account made for an unsafe name");
    w.still_serving(pid, &p2, "ssh with an unsafe user name");
    let r = w.call("ssh", json!(["cleanup", {"user_regex": "^bosh_4f1c"}]));
    assert_eq!(
        r["value"],
        json!({"command": "cleanup", "status": "success"}),
        "{r}"
    );
    assert!(!passwd().contains(user), "cleanup removed the user");

    // (e) bosh logs: the job's logs as a gzipped tar in the blobstore under a UUID.
    let v = w.ok("fetch_logs", json!(["job", []]));
    let id = v["blobstore_id"].as_str().unwrap().to_string();
    assert!(is_uuid(&id), "{v}");
    let blob = fs::read(w.dav.object_path(&id)).expect("the logs are in the blobstore");
    assert_eq!(v["sha1"].as_str().unwrap(), sha1(&blob), "{v}");
    let listing = tar_listing(&dir, &blob);
    let member = listing
        .lines()
        .find(|l| l.ends_with("web/ctl.log"))
        .unwrap_or_else(|| panic!("no web/ctl.log in {listing}"))
        .to_string();
    assert!(tar_member(&dir, &blob, &member).contains(&format!("start 2 on {p2}")));
    let e = w.fails("fetch_logs", json!(["everything", []]));
    assert!(e.contains("everything"), "{e}");
    w.still_serving(pid, &p2, "fetch_logs of an unknown type");

    // A recreate (e.g. a new stemcell): the stopper with the VM's deletion as intent, the
    // disk unmounted (list_disk says it is mounted) and removed, the VM deleted.
    let uuid_before = fs_uuid(&p2);
    assert!(!uuid_before.is_empty(), "the disk has a file system");
    assert_eq!(w.job_state(), "running");
    assert_eq!(w.ok("prepare", json!([spec2])), json!("prepared"));
    stop_instance(&w, &spec2, "shutdown", Intent::DeleteVm);
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-2"]));
    let v = w.ok("unmount_disk", json!(["disk-2"]));
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Unmounted partition of")),
        "{v}"
    );
    assert_eq!(w.mounted_on("store"), None);
    assert_eq!(w.ok("remove_persistent_disk", json!(["disk-2"])), json!({}));
    w.delete_vm("base-vm-1");

    // The new VM: ping, the disk attached and mounted, update_settings, the partial apply,
    // get_state; then (b)'s converge and post-deploy.
    w.create_vm("vm-2");
    assert!(
        !base.join("bosh/managed_disk_settings.json").exists(),
        "a fresh agent state"
    );
    assert_eq!(w.ok("list_disk", json!([])), json!([]));
    w.attach_and_mount("disk-2", &d2);
    assert_eq!(w.mounted_on("store").as_deref(), Some(p2.as_str()));
    assert_eq!(
        fs_uuid(&p2),
        uuid_before,
        "the disk was not formatted again"
    );
    update_settings(&w);
    bootstrap_vm(&w);
    sync_dns(&w, 2);
    assert!(
        base.join("instance/dns/records.json").is_file(),
        "the new VM has the records"
    );
    converge(&w, &spec2);
    w.ok("run_script", json!(["post-deploy", {}]));
    let pid = w.web_pid();
    assert_eq!(w.web_version(), "1.0");
    assert_eq!(w.read_in_vm("store/web/starts"), "start\nstart\nstart\n");
    assert_eq!(
        w.ctl_log(),
        [format!("start 3 on {p2}")],
        "the data is intact"
    );
    w.still_serving(pid, &p2, "the recreate");
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-2"]));

    drop(w);
    assert_eq!(
        fs::read("/etc/passwd").unwrap(),
        host_passwd,
        "the host's accounts changed"
    );
}
