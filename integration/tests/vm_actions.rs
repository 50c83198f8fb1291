//! The director's VM actions against the real agent and real parts: an instance with a
//! persistent disk (two loop devices the test makes: add, mount, write, re-mount at an agent
//! restart, migrate to the bigger disk with the data intact, unmount, remove), `bosh ssh`
//! (setup and cleanup of a user), `bosh logs` (a gzipped tar streamed to Debian's nginx as the
//! DAV blobstore), `sync_dns` (a records blob fetched from the blobstore and written to the
//! hosts file), `delete_arp_entries` and `shutdown`.
//!
//! The agent runs in the sandbox's network namespace and in a private mount namespace with a
//! copy of `/etc` bound over `/etc`: its mounts die with it and the host's accounts are never
//! touched (checked at the end). The hosts file, the ssh host key and the power-off command
//! are the sandbox's (test overrides the agent documents). Run as root:
//! `cargo test -p integration --test vm_actions`. A missing prerequisite fails with the reason.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use integration::dav::DavServer;
use integration::nats::*;
use integration::sim::DirectorSim;
use integration::vm::Loop;
use integration::{Agent, CgroupDir, Sandbox};
use serde_json::{Value, json};

const AGENT_SIDE: &str = "127.0.0.1:4222";
const DIRECTOR_SIDE: &str = "127.0.0.3:4222";
const CONNECT_LIMIT: Duration = Duration::from_secs(15);

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fields drop in order: the agent (and with it its mounts) before the loop devices.
struct World {
    agent: Option<Agent>,
    director: Director,
    dav: DavServer,
    disks: Vec<Loop>,
    agent_cg: CgroupDir,
    settings: Value,
    etc: PathBuf,
    _nats: NatsServer,
    sb: Sandbox,
}

fn world(name: &str) -> World {
    integration::vm::require_tools(&[
        "losetup",
        "unshare",
        "useradd",
        "sfdisk",
        "mkfs.ext4",
        "tar",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let sb = Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").expect("agent cgroup");
    let nats = NatsServer::start_with(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None, "");
    let dav = DavServer::start_in(sb.netns().file()).unwrap_or_else(|e| panic!("nginx: {e}"));
    let etc = sb.dir().join("etc");
    let out = run(Command::new("cp").args(["-a", "/etc"]).arg(&etc));
    assert!(out.status.success(), "copying /etc: {}", describe(&out));
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
    let mut w = World {
        agent: None,
        director,
        dav,
        disks: Vec::new(),
        agent_cg,
        settings: s,
        etc,
        _nats: nats,
        sb,
    };
    w.start_agent();
    w
}

impl World {
    fn start_agent(&mut self) {
        let d = self.sb.dir();
        let exec = agent_exec_with(&self.sb, &self.agent_cg, &self.settings, true, &json!({}))
            .env("BOSH_AGENT_HOSTS_FILE", d.join("hosts"))
            .env("BOSH_AGENT_SSH_HOST_KEY", d.join("ssh_host_rsa_key.pub"))
            .env(
                "BOSH_AGENT_POWER_OFF",
                format!("touch {}", d.join("powered-off").display()),
            )
            .private_mounts(&[(self.etc.clone(), PathBuf::from("/etc"))]);
        let mut agent = self.sb.spawn_agent(&exec).expect("spawn agent");
        agent
            .wait_ready(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("agent not ready: {e}\n{}", agent.log()));
        self.agent = Some(agent);
        self.director.wait_pong(CONNECT_LIMIT);
    }

    fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop().unwrap();
        }
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    /// A shell command in the agent's mount namespace (where its disks are mounted).
    fn in_agent(&self, script: &str) -> Output {
        let pid = self.agent.as_ref().expect("agent running").pid();
        run(Command::new("nsenter")
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .args(["--", "sh", "-c", script]))
    }

    fn store_source(&self, dir: &str) -> String {
        let out = self.in_agent(&format!(
            "findmnt -n -o SOURCE --mountpoint {}",
            self.base().join(dir).display()
        ));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
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
        format!("agent log:\n{}", self.log())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_agent();
    }
}

#[test]
fn a_director_gives_an_instance_a_persistent_disk_migrates_it_and_uses_ssh_logs_and_dns() {
    let host_passwd = fs::read("/etc/passwd").unwrap();
    let mut w = world("vm-actions");
    let dir = w.sb.dir().to_path_buf();
    w.disks.push(Loop::new(&dir, "disk-1", 64).unwrap());
    w.disks.push(Loop::new(&dir, "disk-2", 128).unwrap());
    let (d1, d2) = (w.disks[0].dev().to_string(), w.disks[1].dev().to_string());

    // (b) A fresh instance: the CPI attached the disk; the hint is its device path.
    assert_eq!(
        w.ok("add_persistent_disk", json!(["disk-1", d1])),
        json!({})
    );
    assert_eq!(w.ok("list_disk", json!([])), json!([]));
    assert_eq!(w.ok("mount_disk", json!(["disk-1"])), json!({}));
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-1"]));
    assert_eq!(
        w.store_source("store"),
        format!("{d1}p1"),
        "the store is the disk's partition"
    );
    let out = w.in_agent(&format!(
        "echo kept > {0}/store/data && chown 1000:1000 {0}/store/data",
        w.base().display()
    ));
    assert!(out.status.success(), "{}", describe(&out));
    let hints: Value = serde_json::from_slice(
        &fs::read(w.base().join("bosh/persistent_disk_hints.json")).unwrap(),
    )
    .unwrap();
    assert!(hints.get("disk-1").is_some(), "hints: {hints}");
    assert_eq!(
        fs::read_to_string(w.base().join("bosh/managed_disk_settings.json")).unwrap(),
        "disk-1"
    );

    // A named disk (the director's `disk_associations`): the disk is known from the hints
    // file only, and its link is the device the hint resolves to.
    let assoc =
        json!({"trusted_certs": "", "disk_associations": [{"name": "data", "cid": "disk-1"}]});
    assert_eq!(
        w.ok("update_settings", json!([assoc])),
        json!("ok"),
        "{}",
        w.log()
    );
    assert_eq!(
        fs::read_link(w.base().join("instance/disks/data")).unwrap(),
        PathBuf::from(&d1)
    );
    let r = w.task(
        "update_settings",
        json!([{"trusted_certs": "", "disk_associations": [{"name": "more", "cid": "disk-9"}]}]),
    );
    let e = r["exception"]["message"].as_str().unwrap_or_default();
    assert!(
        e.contains("Persistent disk with volume id 'disk-9' could not be found"),
        "{r}"
    );
    assert!(!w.base().join("instance/disks/more").exists());

    // A cid the director never attached: upstream's error shape, nothing changed.
    let r = w.task("mount_disk", json!(["disk-unknown"]));
    let e = r["exception"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        e.starts_with("Action Failed get_task: Task ")
            && e.contains("Persistent disk with volume id 'disk-unknown' could not be found"),
        "{r}"
    );

    // The agent restarts (e.g. a VM reboot's agent part): the disk is mounted again, data kept.
    w.stop_agent();
    w.start_agent();
    assert_eq!(
        w.ok("list_disk", json!([])),
        json!(["disk-1"]),
        "{}",
        w.log()
    );
    let out = w.in_agent(&format!("cat {}/store/data", w.base().display()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kept",
        "{}",
        describe(&out)
    );

    // (c) A disk resize: the new disk goes to the migration target, the data moves to it.
    assert_eq!(
        w.ok("add_persistent_disk", json!(["disk-2", d2])),
        json!({})
    );
    assert_eq!(w.ok("mount_disk", json!(["disk-2"])), json!({}));
    assert_eq!(w.store_source("store_migration_target"), format!("{d2}p1"));
    assert_eq!(w.ok("migrate_disk", json!(["disk-1", "disk-2"])), json!({}));
    assert_eq!(
        w.store_source("store"),
        format!("{d2}p1"),
        "the new disk is the store"
    );
    let out = w.in_agent(&format!(
        "stat -c '%u:%g %n' {0}/store/data && cat {0}/store/data",
        w.base().display()
    ));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("1000:1000") && text.contains("kept"),
        "{}",
        describe(&out)
    );
    assert_eq!(w.ok("list_disk", json!([])), json!(["disk-2"]));
    let v = w.ok("unmount_disk", json!(["disk-1"]));
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is not mounted"),
        "{v}"
    );
    assert_eq!(w.ok("remove_persistent_disk", json!(["disk-1"])), json!({}));

    // (d) bosh ssh.
    let user = "bosh_4f1c9e2ab07d3e55";
    let key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 operator@laptop";
    let r = w.call("ssh", json!(["setup", {"user": user, "public_key": key}]));
    assert_eq!(
        r["value"],
        json!({"command": "setup", "status": "success", "ip": "10.0.0.9",
               "host_public_key": "ssh-rsa AAAAHOSTKEY host\n"}),
        "{r}\n{}",
        w.log()
    );
    let passwd = fs::read_to_string(w.etc.join("passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with(&format!("{user}:"))),
        "{passwd}"
    );
    let keys = w
        .base()
        .join(format!("bosh_ssh/{user}/.ssh/authorized_keys"));
    assert_eq!(fs::read_to_string(&keys).unwrap().trim(), key);
    assert_eq!(
        fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let r = w.call(
        "ssh",
        json!(["setup", {"user": "root;reboot", "public_key": key}]),
    );
    assert!(r["exception"]["message"].as_str().is_some(), "{r}");
    let r = w.call("ssh", json!(["cleanup", {"user_regex": "^bosh_4f1c"}]));
    assert_eq!(r["value"]["status"], "success", "{r}");
    let passwd = fs::read_to_string(w.etc.join("passwd")).unwrap();
    assert!(!passwd.contains(user), "cleanup left the user: {passwd}");

    // (e) bosh logs: the job logs as a gzipped tar in the blobstore.
    let logs = w.base().join("sys/log/web");
    fs::create_dir_all(&logs).unwrap();
    fs::write(logs.join("web.stdout.log"), "hello from web\n").unwrap();
    let v = w.ok("fetch_logs", json!(["job", []]));
    let id = v["blobstore_id"].as_str().unwrap().to_string();
    let blob = fs::read(w.dav.object_path(&id)).unwrap();
    let sha1 = {
        let out = run(Command::new("sha1sum").arg(w.dav.object_path(&id)));
        String::from_utf8_lossy(&out.stdout)
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(v["sha1"].as_str().unwrap(), sha1, "{v}");
    let listing = {
        let path = dir.join("logs.tgz");
        fs::write(&path, &blob).unwrap();
        let out = run(Command::new("tar").arg("tzf").arg(&path));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(listing.contains("web/web.stdout.log"), "{listing}");
    let r = w.task("fetch_logs", json!(["everything", []]));
    assert!(
        r["exception"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("everything"),
        "{r}"
    );

    // sync_dns: the records blob from the blobstore, its sha256, then the hosts file.
    let records = json!({"version": 3, "records": [["10.0.0.9", "web-0.web.default.dep.bosh"]],
                         "record_keys": ["id"], "record_infos": [["x"]]});
    let bytes = serde_json::to_vec(&records).unwrap();
    let blob_id = "8d3f1f2e-1111-4222-8333-944445555666";
    w.dav.put_blob(blob_id, &bytes).unwrap();
    let digest = {
        let p = dir.join("records.json");
        fs::write(&p, &bytes).unwrap();
        let out = run(Command::new("sha256sum").arg(&p));
        String::from_utf8_lossy(&out.stdout)
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let r = w.call("sync_dns", json!([blob_id, format!("sha256:{digest}"), 3]));
    assert_eq!(r["value"], "synced", "{r}\n{}", w.log());
    let hosts = fs::read_to_string(dir.join("hosts")).unwrap();
    assert!(
        hosts.contains("10.0.0.9 web-0.web.default.dep.bosh"),
        "{hosts}"
    );
    let rec = w.base().join("instance/dns/records.json");
    assert_eq!(
        fs::metadata(&rec).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // An older version is answered at once, without a fetch (the blob does not even exist).
    let r = w.call(
        "sync_dns",
        json!(["no-such-blob", format!("sha256:{digest}"), 2]),
    );
    assert_eq!(r["value"], "synced", "{r}");
    // A digest that does not match: refused, the hosts file unchanged.
    let r = w.call(
        "sync_dns",
        json!([blob_id, format!("sha256:{}", "0".repeat(64)), 4]),
    );
    assert!(r["exception"]["message"].as_str().is_some(), "{r}");
    assert_eq!(fs::read_to_string(dir.join("hosts")).unwrap(), hosts);

    let r = w.call("delete_arp_entries", json!([{"ips": ["10.0.0.77"]}]));
    assert_eq!(r["value"], json!({}), "{r}");
    let r = w.call("delete_arp_entries", json!([{"ips": ["0/0"]}]));
    assert!(r["exception"]["message"].as_str().is_some(), "{r}");

    let r = w.call("shutdown", json!([]));
    assert_eq!(r["value"], json!(""), "{r}");
    assert!(
        dir.join("powered-off").exists(),
        "the power-off command did not run"
    );

    drop(w);
    assert_eq!(
        fs::read("/etc/passwd").unwrap(),
        host_passwd,
        "the host's accounts changed"
    );
}
