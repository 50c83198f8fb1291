//! `ssh`: the short-lived users `bosh ssh` logs in as, made and removed as upstream's agent
//! does (`agent/action/ssh.go`, `platform/linux_platform.go`), with the system's own tools
//! (`useradd`, `usermod`, `userdel`, `groupadd`), so `/etc/passwd`, `/etc/group`,
//! `/etc/shadow` and `/etc/gshadow` are edited the way the distribution edits them.
//!
//! `setup {user, public_key}`:
//! 1. read the host's public key (`/etc/ssh/ssh_host_rsa_key.pub`);
//! 2. `mkdir -p <base>/bosh_ssh` (0755), `useradd -m -b <base>/bosh_ssh -s /bin/bash <user>`,
//!    `chmod 700` the home;
//! 3. `usermod -G vcap,admin,bosh_sudoers,bosh_sshers <user>` (the stemcell's sudoers gives
//!    `%bosh_sudoers` password-less sudo; its sshd admits `bosh_sshers`);
//! 4. `<home>/.ssh` (0700) and `.ssh/authorized_keys` (0600) holding the key, owned by the user;
//! 5. value `{"command":"setup","status":"success","ip":<default IP>,"host_public_key":<key>}`.
//!
//! `cleanup {user_regex}`: `userdel -rf` for every user in `/etc/passwd` whose name starts
//! with `bosh_` and matches the regular expression (unanchored, as Go's `MatchString`); value
//! `{"command":"cleanup","status":"success"}`.
//!
//! Where this differs from upstream, and why:
//! - The user name must be a safe login name starting with `bosh_` (the CLI always sends
//!   `bosh_` + 16 hex digits), and the key one line of an OpenSSH public key: nothing else
//!   can become an account or a line of `authorized_keys`. A setup for a user that exists
//!   already, or whose home directory exists, is refused.
//! - The default IP is found before anything is changed (upstream finds it last and leaves the
//!   user behind when there is none), and a setup that fails after `useradd` removes the user
//!   again: a failed setup leaves no account.
//! - Groups of the list that do not exist are created (`groupadd --system`); on a stemcell
//!   they all exist and this does nothing. Upstream's `usermod` fails without them.
//! - cleanup removes a home only when it lies below `<base>/bosh_ssh` (`userdel -f` without
//!   `-r` otherwise), and tries every matching user, reporting all failures.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Prefix of every user `bosh ssh` makes, and of every user cleanup may remove.
pub const EPHEMERAL_USER_PREFIX: &str = "bosh_";
/// The groups a `bosh ssh` user joins (upstream's list, in its order).
pub const SSH_GROUPS: [&str; 4] = ["vcap", "admin", "bosh_sudoers", "bosh_sshers"];
/// The host key returned to the CLI.
pub const HOST_PUBLIC_KEY: &str = "/etc/ssh/ssh_host_rsa_key.pub";
/// Longest login name useradd accepts.
pub const MAX_USER_LEN: usize = 32;
/// Longest public key line accepted.
pub const MAX_KEY_LEN: usize = 16 * 1024;
/// Largest compiled `user_regex` (bytes of the regex engine's program).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Why an `ssh` request failed. Each variant names the value or the command.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// Neither `setup` nor `cleanup` (upstream's text).
    #[error("Unknown command for SSH method")]
    UnknownCommand(String),
    /// The parameters are not an object with the fields of the command.
    #[error("ssh parameters: {0}")]
    Params(String),
    /// A user name that is not a safe `bosh_` login name.
    #[error("user name '{name}' is refused: {reason}")]
    InvalidUser { name: String, reason: &'static str },
    /// A public key that is not one line of an OpenSSH public key.
    #[error("public key is refused: {0}")]
    InvalidKey(&'static str),
    /// A `user_regex` that does not compile.
    #[error("Compiling regexp '{regex}': {message}")]
    InvalidRegex { regex: String, message: String },
    /// The host key cannot be read (upstream's text, then why).
    #[error("Unable to read host public key file: {}: {source}", path.display())]
    HostKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No network has an IP (upstream's text).
    #[error("No default ip could be found")]
    NoDefaultIp,
    /// The user, or its home directory, exists already.
    #[error("user '{name}' exists already ({what})")]
    Exists { name: String, what: String },
    /// A system command failed.
    #[error("{command}: {detail}")]
    Command { command: String, detail: String },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Some matching users could not be removed (the others were).
    #[error("SSH Cleanup: Deleting Ephemeral Users: {}", failures.join("; "))]
    Cleanup {
        removed: Vec<String>,
        failures: Vec<String>,
    },
}

/// The action's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SshResult {
    pub command: String,
    pub status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host_public_key: String,
}

/// Where the users live and what they are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    /// `<base>/bosh_ssh`: the homes' parent.
    pub homes: PathBuf,
    /// The host public key file.
    pub host_public_key: PathBuf,
    /// The account database read by cleanup (`/etc/passwd`).
    pub passwd: PathBuf,
}

impl SshConfig {
    /// Upstream's layout for base directory `base` (`/var/vcap` on a VM).
    pub fn new(base: &Path) -> Self {
        SshConfig {
            homes: base.join("bosh_ssh"),
            host_public_key: PathBuf::from(HOST_PUBLIC_KEY),
            passwd: PathBuf::from("/etc/passwd"),
        }
    }
}

/// Checks a user name: `bosh_` then 1 to 27 of `a-z 0-9 _ -` (a login name every
/// distribution's useradd takes, that no option or path can hide in).
pub fn validate_user(name: &str) -> Result<(), UsersError> {
    let refuse = |reason| {
        Err(UsersError::InvalidUser {
            name: name.chars().take(64).collect(),
            reason,
        })
    };
    if !name.starts_with(EPHEMERAL_USER_PREFIX) {
        return refuse("it must start with 'bosh_'");
    }
    if name.len() == EPHEMERAL_USER_PREFIX.len() {
        return refuse("nothing follows 'bosh_'");
    }
    if name.len() > MAX_USER_LEN {
        return refuse("it is longer than 32 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return refuse("only a-z, 0-9, '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a public key and returns the line to write: one line (a final newline, as the CLI
/// sends it, is allowed), printable, with a key type (`ssh-…`, `ecdsa-sha2-…`, `sk-…`)
/// followed by base64 data.
pub fn validate_key(key: &str) -> Result<&str, UsersError> {
    let line = key
        .strip_suffix("\r\n")
        .or_else(|| key.strip_suffix('\n'))
        .unwrap_or(key);
    if line.trim().is_empty() {
        return Err(UsersError::InvalidKey("it is empty"));
    }
    if line.len() > MAX_KEY_LEN {
        return Err(UsersError::InvalidKey("it is longer than 16 KiB"));
    }
    if line.contains(['\n', '\r']) {
        return Err(UsersError::InvalidKey("it is more than one line"));
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(UsersError::InvalidKey("it holds control characters"));
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let typed = fields.windows(2).any(|w| {
        let (kind, data) = (w[0], w[1]);
        (kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-"))
            && data.len() >= 16
            && data
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    });
    if !typed {
        return Err(UsersError::InvalidKey(
            "it is not an OpenSSH public key (type, then base64 data)",
        ));
    }
    Ok(line)
}

/// Upstream's default IP: the IP of a network with a non-empty `default` list, else of any
/// network. Networks are taken in name order (upstream's map order is random).
pub fn default_ip(networks: &Value) -> Option<String> {
    let obj = networks.as_object()?;
    let mut names: Vec<&String> = obj.keys().collect();
    names.sort();
    let ip_of = |n: &Value| {
        n.get("ip")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let is_default = |n: &Value| {
        n.get("default")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    };
    let nets: Vec<&Value> = names.iter().filter_map(|k| obj.get(*k)).collect();
    nets.iter()
        .filter(|n| is_default(n))
        .find_map(|n| ip_of(n))
        .or_else(|| nets.iter().find_map(|n| ip_of(n)))
}

fn run(program: &str, args: &[&str]) -> Result<(), UsersError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| UsersError::Command {
            command: command.clone(),
            detail: format!("could not start: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(UsersError::Command {
        command,
        detail: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> UsersError + 'p {
    move |source| UsersError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `(name, uid, gid, home)` of each line of a passwd file.
fn passwd_entries(text: &str) -> Vec<(String, u32, u32, PathBuf)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            match f.as_slice() {
                [name, _, uid, gid, _, home, ..] => Some((
                    name.to_string(),
                    uid.parse().ok()?,
                    gid.parse().ok()?,
                    PathBuf::from(home),
                )),
                _ => None,
            }
        })
        .collect()
}

fn lookup(cfg: &SshConfig, name: &str) -> Result<Option<(u32, u32, PathBuf)>, UsersError> {
    let text = fs::read_to_string(&cfg.passwd).map_err(io_err("reading", &cfg.passwd))?;
    Ok(passwd_entries(&text)
        .into_iter()
        .find(|(n, ..)| n == name)
        .map(|(_, uid, gid, home)| (uid, gid, home)))
}

fn group_exists(name: &str) -> bool {
    nix::unistd::Group::from_name(name).ok().flatten().is_some()
}

/// `ssh setup`: see the module documentation. `networks` is the settings' `networks` object
/// (for the default IP). On error nothing is left behind: no user, no home.
pub fn setup(
    cfg: &SshConfig,
    user: &str,
    public_key: &str,
    networks: &Value,
) -> Result<SshResult, UsersError> {
    validate_user(user)?;
    let key_line = validate_key(public_key)?;
    let host_key =
        fs::read_to_string(&cfg.host_public_key).map_err(|source| UsersError::HostKey {
            path: cfg.host_public_key.clone(),
            source,
        })?;
    let ip = default_ip(networks).ok_or(UsersError::NoDefaultIp)?;
    if lookup(cfg, user)?.is_some() {
        return Err(UsersError::Exists {
            name: user.into(),
            what: format!("in {}", cfg.passwd.display()),
        });
    }
    let home = cfg.homes.join(user);
    if fs::symlink_metadata(&home).is_ok() {
        return Err(UsersError::Exists {
            name: user.into(),
            what: format!("{} exists", home.display()),
        });
    }
    if !cfg.homes.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&cfg.homes)
            .map_err(io_err("creating", &cfg.homes))?;
    }
    for g in SSH_GROUPS {
        if !group_exists(g) {
            run("groupadd", &["--system", g])?;
        }
    }
    let homes = cfg.homes.to_string_lossy();
    run("useradd", &["-m", "-b", &homes, "-s", "/bin/bash", user])?;
    let rest = finish_setup(cfg, user, key_line);
    if let Err(e) = rest {
        // Leave no half-made account behind.
        if let Err(undo) = run("userdel", &["-rf", user]) {
            tracing::warn!(user, error = %undo, "removing the user of a failed ssh setup");
        }
        return Err(e);
    }
    Ok(SshResult {
        command: "setup".into(),
        status: "success".into(),
        ip,
        host_public_key: host_key,
    })
}

fn finish_setup(cfg: &SshConfig, user: &str, key_line: &str) -> Result<(), UsersError> {
    let (uid, gid, home) = lookup(cfg, user)?.ok_or_else(|| UsersError::Command {
        command: format!("useradd {user}"),
        detail: format!("the user is not in {} afterwards", cfg.passwd.display()),
    })?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod 700", &home))?;
    run("usermod", &["-G", &SSH_GROUPS.join(","), user])?;
    let ssh = home.join(".ssh");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&ssh)
        .map_err(io_err("creating", &ssh))?;
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", &ssh))?;
    std::os::unix::fs::lchown(&ssh, Some(uid), Some(gid)).map_err(io_err("chown", &ssh))?;
    let keys = ssh.join("authorized_keys");
    crate::files::write_private(&keys, format!("{key_line}\n").as_bytes()).map_err(|e| {
        UsersError::Io {
            what: "writing",
            path: e.path,
            source: e.source,
        }
    })?;
    std::os::unix::fs::lchown(&keys, Some(uid), Some(gid)).map_err(io_err("chown", &keys))?;
    Ok(())
}

/// The users cleanup would remove: names in the passwd file starting with `bosh_` that match
/// `user_regex` (unanchored).
pub fn matching_users(cfg: &SshConfig, user_regex: &str) -> Result<Vec<String>, UsersError> {
    let re = regex::RegexBuilder::new(user_regex)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| UsersError::InvalidRegex {
            regex: user_regex.chars().take(200).collect(),
            message: e.to_string(),
        })?;
    let text = fs::read_to_string(&cfg.passwd).map_err(io_err("reading", &cfg.passwd))?;
    Ok(passwd_entries(&text)
        .into_iter()
        .map(|(n, ..)| n)
        .filter(|n| n.starts_with(EPHEMERAL_USER_PREFIX) && re.is_match(n))
        .collect())
}

/// `ssh cleanup`: removes every matching user (see [`matching_users`]); returns the value and
/// the names removed. Every match is tried; if some fail, the error lists them.
pub fn cleanup(cfg: &SshConfig, user_regex: &str) -> Result<(SshResult, Vec<String>), UsersError> {
    let users = matching_users(cfg, user_regex)?;
    let text = fs::read_to_string(&cfg.passwd).map_err(io_err("reading", &cfg.passwd))?;
    let entries = passwd_entries(&text);
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    for u in users {
        let home_is_ours = entries
            .iter()
            .find(|(n, ..)| *n == u)
            .is_some_and(|(_, _, _, home)| home.starts_with(&cfg.homes) && *home != cfg.homes);
        let flags = if home_is_ours { "-rf" } else { "-f" };
        match run("userdel", &[flags, &u]) {
            Ok(()) => removed.push(u),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(UsersError::Cleanup { removed, failures });
    }
    Ok((
        SshResult {
            command: "cleanup".into(),
            status: "success".into(),
            ip: String::new(),
            host_public_key: String::new(),
        },
        removed,
    ))
}

/// The field `key` of `params`, exactly or else ignoring case (Go's decoding).
fn param<'v>(params: &'v Value, key: &str) -> Option<&'v Value> {
    let obj = params.as_object()?;
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn string_param(params: &Value, key: &str) -> Result<String, UsersError> {
    match param(params, key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Ok(String::new()),
        Some(other) => Err(UsersError::Params(format!(
            "'{key}' must be a string, not {}",
            other.to_string().chars().take(100).collect::<String>()
        ))),
    }
}

/// The whole action, `ssh [cmd, params]`: `setup` with `user` and `public_key`, `cleanup`
/// with `user_regex`.
pub fn ssh(
    cfg: &SshConfig,
    cmd: &str,
    params: &Value,
    networks: &Value,
) -> Result<SshResult, UsersError> {
    if !params.is_object() {
        return Err(UsersError::Params(format!(
            "expected an object, not {}",
            params.to_string().chars().take(100).collect::<String>()
        )));
    }
    match cmd {
        "setup" => setup(
            cfg,
            &string_param(params, "user")?,
            &string_param(params, "public_key")?,
            networks,
        ),
        "cleanup" => {
            let regex = string_param(params, "user_regex")?;
            let (result, removed) = cleanup(cfg, &regex)?;
            tracing::info!(?removed, "ssh cleanup");
            Ok(result)
        }
        other => Err(UsersError::UnknownCommand(
            other.chars().take(100).collect(),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDfake+key/data== bosh@cli\n";

    #[test]
    fn user_names() {
        for ok in [
            "bosh_0123456789abcdef",
            "bosh_a",
            "bosh_x-y_z",
            &format!("bosh_{}", "a".repeat(27)),
        ] {
            validate_user(ok).unwrap();
        }
        for bad in [
            "",
            "bosh_",
            "root",
            "vcap",
            "Bosh_x",
            "bosh_X",
            "bosh_a b",
            "bosh_a\n",
            "bosh_../x",
            "bosh_a/b",
            "bosh_a:b",
            "bosh_a$",
            "-bosh_x",
            "bosh_é",
            &format!("bosh_{}", "a".repeat(28)),
        ] {
            assert!(
                matches!(validate_user(bad), Err(UsersError::InvalidUser { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn public_keys() {
        assert_eq!(validate_key(KEY).unwrap(), KEY.trim_end());
        assert_eq!(validate_key(KEY.trim_end()).unwrap(), KEY.trim_end());
        validate_key("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY=").unwrap();
        validate_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA").unwrap();
        validate_key("from=\"10.0.0.1\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA c").unwrap();
        for bad in [
            "",
            "\n",
            "ssh-rsa",
            "hello world",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB\n\n",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB\rx",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB \u{0}",
            "ssh-rsa AAAA;rm -rf /",
        ] {
            assert!(
                matches!(validate_key(bad), Err(UsersError::InvalidKey(_))),
                "{bad:?}"
            );
        }
        assert!(validate_key(&format!("ssh-rsa {}", "A".repeat(20_000))).is_err());
    }

    #[test]
    fn default_ip_as_upstream() {
        let nets = json!({
            "b": {"ip": "10.0.1.5", "default": ["dns", "gateway"]},
            "a": {"ip": "10.0.0.5"},
        });
        assert_eq!(default_ip(&nets).as_deref(), Some("10.0.1.5"));
        let nets = json!({"b": {"ip": "10.0.1.5"}, "a": {"ip": "10.0.0.5", "default": []}});
        assert_eq!(default_ip(&nets).as_deref(), Some("10.0.0.5"));
        assert_eq!(default_ip(&json!({"a": {"ip": ""}})), None);
        assert_eq!(default_ip(&json!({})), None);
        assert_eq!(default_ip(&json!(null)), None);
    }

    #[test]
    fn passwd_parsing() {
        let e = passwd_entries(
            "root:x:0:0:root:/root:/bin/bash\nbad line\nbosh_a:x:1001:1001::/var/vcap/bosh_ssh/bosh_a:/bin/bash\n",
        );
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[1],
            (
                "bosh_a".into(),
                1001,
                1001,
                PathBuf::from("/var/vcap/bosh_ssh/bosh_a")
            )
        );
    }

    #[test]
    fn results_serialize_as_upstream() {
        let r = SshResult {
            command: "cleanup".into(),
            status: "success".into(),
            ip: String::new(),
            host_public_key: String::new(),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"command": "cleanup", "status": "success"})
        );
    }

    #[test]
    fn bad_requests_fail_before_anything_runs() {
        let cfg = SshConfig {
            homes: PathBuf::from("/nonexistent/bosh_ssh"),
            host_public_key: PathBuf::from("/nonexistent/key.pub"),
            passwd: PathBuf::from("/nonexistent/passwd"),
        };
        let nets = json!({"n": {"ip": "10.0.0.5"}});
        let e = ssh(&cfg, "shell", &json!({}), &nets).unwrap_err();
        assert_eq!(e.to_string(), "Unknown command for SSH method");
        assert!(matches!(
            ssh(&cfg, "setup", &json!([]), &nets),
            Err(UsersError::Params(_))
        ));
        assert!(matches!(
            ssh(&cfg, "setup", &json!({"user": 5}), &nets),
            Err(UsersError::Params(_))
        ));
        assert!(matches!(
            ssh(
                &cfg,
                "setup",
                &json!({"user": "root", "public_key": KEY}),
                &nets
            ),
            Err(UsersError::InvalidUser { .. })
        ));
        let e = ssh(
            &cfg,
            "setup",
            &json!({"User": "bosh_abc", "public_key": KEY}),
            &nets,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Unable to read host public key file: /nonexistent/key.pub"),
            "{e}"
        );
        let e = ssh(&cfg, "cleanup", &json!({"user_regex": "(unclosed"}), &nets).unwrap_err();
        assert!(e.to_string().starts_with("Compiling regexp"), "{e}");
    }
}
