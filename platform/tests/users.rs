//! `ssh setup` / `ssh cleanup` with the real useradd, usermod, userdel and groupadd, never on
//! the host's accounts: each test runs again as a child process under
//! `unshare -m --propagation private`, which bind-mounts a copy of `/etc` over `/etc` in its
//! own mount namespace before the test body runs. (The whole directory, not the four account
//! files one by one: the shadow tools replace `/etc/passwd` by renaming `/etc/passwd+` over
//! it, which a bind-mounted file refuses with EBUSY.) The parent checks afterwards that the
//! host's `/etc/passwd`, `/etc/group`, `/etc/shadow` and `/etc/gshadow` are byte for byte
//! unchanged.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use platform::users::{SSH_GROUPS, SshConfig, UsersError, cleanup, matching_users, setup, ssh};
use serde_json::json;

/// Set in the child: the test's private directory.
const CHILD_ENV: &str = "PLATFORM_USERS_TEST_DIR";
const ACCOUNT_FILES: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];
const KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7testkeydata+/= bosh@cli\n";
const HOST_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQhostkey root@vm\n";

/// In the parent: runs test `name` in a child with a private `/etc` and checks the host's
/// account files are unchanged; returns `None`. In the child: sets up the private `/etc` and
/// returns the test's directory.
fn isolated(name: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let dir = PathBuf::from(dir);
        let etc = dir.join("etc");
        let st = Command::new("cp")
            .arg("-a")
            .arg("/etc")
            .arg(&etc)
            .status()
            .unwrap();
        assert!(st.success(), "copying /etc");
        let st = Command::new("mount")
            .arg("--bind")
            .arg(&etc)
            .arg("/etc")
            .status()
            .unwrap();
        assert!(st.success(), "bind-mounting the copy of /etc (needs root)");
        return Some(dir);
    }
    let before: Vec<Vec<u8>> = ACCOUNT_FILES
        .iter()
        .map(|f| fs::read(f).unwrap_or_default())
        .collect();
    let dir = std::env::temp_dir().join(format!("platform-users-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("running unshare (util-linux) for a private mount namespace: {e}")
        });
    let after: Vec<Vec<u8>> = ACCOUNT_FILES
        .iter()
        .map(|f| fs::read(f).unwrap_or_default())
        .collect();
    let _ = fs::remove_dir_all(&dir);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the isolated test failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
    assert_eq!(before, after, "the host's account files are unchanged");
    assert!(
        !String::from_utf8_lossy(&after[0]).contains("bosh_"),
        "no bosh_ user on the host"
    );
    None
}

fn config(dir: &Path) -> SshConfig {
    let key = dir.join("ssh_host_rsa_key.pub");
    fs::write(&key, HOST_KEY).unwrap();
    let mut cfg = SshConfig::new(&dir.join("base"));
    cfg.host_public_key = key;
    cfg
}

fn nets() -> serde_json::Value {
    json!({"default": {"ip": "10.0.0.5", "default": ["dns", "gateway"]}, "other": {"ip": "10.1.0.5"}})
}

fn passwd_line(user: &str) -> Option<String> {
    fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .map(str::to_string)
}

fn groups_of(user: &str) -> Vec<String> {
    let out = Command::new("id").args(["-nG", user]).output().unwrap();
    assert!(out.status.success(), "id -nG {user}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn setup_makes_upstreams_user_and_cleanup_removes_it() {
    let Some(dir) = isolated("setup_makes_upstreams_user_and_cleanup_removes_it") else {
        return;
    };
    let cfg = config(&dir);
    let user = "bosh_0123456789abcdef";
    let r = ssh(
        &cfg,
        "setup",
        &json!({"user": user, "public_key": KEY}),
        &nets(),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        json!({"command": "setup", "status": "success", "ip": "10.0.0.5", "host_public_key": HOST_KEY})
    );
    let home = cfg.homes.join(user);
    let line = passwd_line(user).unwrap();
    assert!(
        line.ends_with(&format!(":{}:/bin/bash", home.display())),
        "{line}"
    );
    let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(mode(&cfg.homes), 0o755);
    assert_eq!(mode(&home), 0o700);
    let ssh_dir = home.join(".ssh");
    let keys = ssh_dir.join("authorized_keys");
    assert_eq!(mode(&ssh_dir), 0o700);
    assert_eq!(mode(&keys), 0o600);
    for p in [&home, &ssh_dir, &keys] {
        assert_eq!(
            fs::symlink_metadata(p).unwrap().uid(),
            uid,
            "{}",
            p.display()
        );
    }
    assert_eq!(fs::read_to_string(&keys).unwrap(), KEY);
    let groups = groups_of(user);
    for g in SSH_GROUPS {
        assert!(groups.iter().any(|x| x == g), "{g} in {groups:?}");
    }

    // The same user again is refused, and changes nothing.
    let e = setup(&cfg, user, KEY, &nets()).unwrap_err();
    assert!(matches!(e, UsersError::Exists { .. }), "{e}");
    assert_eq!(fs::read_to_string(&keys).unwrap(), KEY);

    // A second bosh_ user and an ordinary one.
    setup(&cfg, "bosh_fedcba9876543210", KEY, &nets()).unwrap();
    let st = Command::new("useradd").arg("keepme").status().unwrap();
    assert!(st.success());
    assert_eq!(
        matching_users(&cfg, "^bosh_0123").unwrap(),
        vec![user.to_string()]
    );

    let r = ssh(
        &cfg,
        "cleanup",
        &json!({"user_regex": "^bosh_0123"}),
        &nets(),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        json!({"command": "cleanup", "status": "success"})
    );
    assert!(passwd_line(user).is_none());
    assert!(!home.exists(), "the home went with the user");
    assert!(
        passwd_line("bosh_fedcba9876543210").is_some(),
        "only the match is removed"
    );

    // A regex that matches everything still only removes bosh_ users.
    let (_, removed) = cleanup(&cfg, ".*|root|keepme").unwrap();
    assert_eq!(removed, vec!["bosh_fedcba9876543210".to_string()]);
    assert!(passwd_line("keepme").is_some());
    assert!(passwd_line("root").is_some());
    let (_, removed) = cleanup(&cfg, ".*").unwrap();
    assert!(removed.is_empty());
}

#[test]
fn hostile_or_failing_setups_leave_no_account() {
    let Some(dir) = isolated("hostile_or_failing_setups_leave_no_account") else {
        return;
    };
    let cfg = config(&dir);
    let passwd_before = fs::read("/etc/passwd").unwrap();
    for (params, what) in [
        (
            json!({"user": "root", "public_key": KEY}),
            "must start with 'bosh_'",
        ),
        (
            json!({"user": "bosh_x;touch /tmp/pwned", "public_key": KEY}),
            "only a-z",
        ),
        (json!({"user": "bosh_-o", "public_key": KEY}), ""),
        (
            json!({"user": "bosh_../../etc", "public_key": KEY}),
            "only a-z",
        ),
        (
            json!({"user": "bosh_ok", "public_key": format!("{KEY}ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB evil\n")}),
            "more than one line",
        ),
        (
            json!({"user": "bosh_ok", "public_key": "command=\"sh\"\n"}),
            "not an OpenSSH public key",
        ),
        (json!({"user": "bosh_ok", "public_key": ""}), "empty"),
    ] {
        match ssh(&cfg, "setup", &params, &nets()) {
            Err(e) => assert!(e.to_string().contains(what), "{params}: {e}"),
            // "bosh_-o" is a fine name: it must then really be that user, not an option.
            Ok(_) => {
                assert_eq!(params["user"], "bosh_-o");
                assert!(passwd_line("bosh_-o").is_some());
                cleanup(&cfg, "^bosh_-o$").unwrap();
            }
        }
    }
    assert!(!Path::new("/tmp/pwned").exists());
    // No default IP: refused before anything is made.
    let e = setup(&cfg, "bosh_noip", KEY, &json!({"n": {"ip": ""}})).unwrap_err();
    assert_eq!(e.to_string(), "No default ip could be found");
    assert!(passwd_line("bosh_noip").is_none());
    // A step after useradd fails (the skeleton already has a .ssh): the user is removed again.
    fs::create_dir_all("/etc/skel/.ssh").unwrap();
    let e = setup(&cfg, "bosh_rollback", KEY, &nets()).unwrap_err();
    assert!(e.to_string().contains(".ssh"), "{e}");
    assert!(passwd_line("bosh_rollback").is_none(), "rolled back");
    assert!(!cfg.homes.join("bosh_rollback").exists());
    fs::remove_dir("/etc/skel/.ssh").unwrap();
    // A bad regex changes nothing.
    let e = cleanup(&cfg, "(unclosed").unwrap_err();
    assert!(
        e.to_string().starts_with("Compiling regexp '(unclosed'"),
        "{e}"
    );
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd_before);
}
