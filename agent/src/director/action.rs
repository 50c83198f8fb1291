//! The director's actions as one typed value, parsed once from a request with every argument
//! check upstream makes, and the errors an action answers with, in upstream's words.
//!
//! Adding an action: one variant of [`Action`] (its arguments typed), one arm in
//! [`Action::parse`] (the method name — the only place it is written — and the checks), its
//! mode in [`Action::is_async`] / [`Action::is_cancellable`], and one handler arm in
//! [`super::actions::run`]. The compiler points at every match that misses the variant.

use std::collections::BTreeMap;

use serde_json::Value;

use super::protocol::Request;

/// One request of the director, its arguments checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `ping` → `"pong"`.
    Ping,
    /// `info` → `{"api_version":1}`.
    Info,
    /// `get_task [id]`.
    GetTask { id: String },
    /// `cancel_task [id]`.
    CancelTask { id: String },
    /// `get_state ["full"]`: with vitals when `full`.
    GetState { full: bool },
    /// `start`: monit job files, reload, start the `vcap` group.
    Start,
    /// `apply [spec]`; the spec is an object, and one with a `configuration_hash` is a valid
    /// apply spec.
    Apply { spec: Value },
    /// `prepare [spec]`; the spec is a valid apply spec.
    Prepare { spec: Value },
    /// `compile_package [blob_id, digest, name, version, deps]`.
    CompilePackage(CompileArgs),
    /// `upload_blob [{blob_id, checksum, payload}]`.
    UploadBlob { arg: Value },
    /// `stop`; the protocol decides whether it waits for the jobs to stop.
    Stop { protocol: i64 },
    /// `drain ["update", spec]` or `drain ["shutdown"(, spec)]`.
    Drain(DrainArgs),
    /// `run_script [name, {"env": {…}}]`.
    RunScript {
        name: String,
        env: BTreeMap<String, String>,
    },
    /// `update_settings [settings]`; the fields' types are checked.
    UpdateSettings { new: Value },
    /// `add_persistent_disk [cid, hint]`.
    AddPersistentDisk { cid: String, hint: Value },
    /// `remove_persistent_disk [cid]`.
    RemovePersistentDisk { cid: String },
    /// `list_disk`: asynchronous from protocol 3, as upstream.
    ListDisk { protocol: i64 },
    /// `mount_disk [cid]`.
    MountDisk { cid: String },
    /// `unmount_disk [cid]`.
    UnmountDisk { cid: String },
    /// `migrate_disk [old, new]`: the cids of the disk on the store and of the one on the
    /// migration target (checked before anything moves; upstream ignores them).
    MigrateDisk {
        /// The disk on `<base>/store`.
        old: String,
        /// The disk on `<base>/store_migration_target`.
        new: String,
    },
    /// `ssh [setup|cleanup, params]`.
    Ssh { cmd: String, params: Value },
    /// `fetch_logs [types, filters]`.
    FetchLogs { types: String, filters: Vec<String> },
    /// `sync_dns [blob_id, digest, version]`.
    SyncDns {
        blob_id: String,
        digest: String,
        version: u64,
    },
    /// `delete_arp_entries [{"ips": […]}]`.
    DeleteArpEntries { arg: Value },
    /// `shutdown`: powers the VM off.
    Shutdown,
}

/// `compile_package`'s arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileArgs {
    pub blob_id: String,
    pub digest: String,
    pub name: String,
    pub version: String,
    pub deps: BTreeMap<String, jobs::spec::PackageRef>,
}

/// `drain`'s arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainArgs {
    /// `update` (a new spec follows) or `shutdown`.
    pub kind: DrainKind,
    /// The new spec (mandatory for `update`).
    pub new_spec: Option<Value>,
}

/// Why the jobs are drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainKind {
    Update,
    Shutdown,
}

/// Why an action failed, as the part after `Action Failed <method>: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Upstream's argument-count message.
    #[error("Not enough arguments, expected {expected}, got {got}")]
    NotEnoughArguments { expected: usize, got: usize },
    /// An argument of the wrong JSON type (1-based index).
    #[error("argument {index} must be a string, got {got}")]
    NotAString { index: usize, got: String },
    /// Anything else, already worded (upstream's message where it has one).
    #[error("{0}")]
    Message(String),
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::Message(m)
    }
}

impl From<&str> for Failure {
    fn from(m: &str) -> Self {
        Failure::Message(m.to_string())
    }
}

/// What the director is answered when a request fails, with upstream's wording as `Display`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// A method the agent does not know.
    #[error("unknown message {0}")]
    UnknownMessage(String),
    /// A known method whose arguments were refused or which failed.
    #[error("Action Failed {method}: {failure}")]
    Failed { method: String, failure: Failure },
}

impl ActionError {
    /// `failure` of `method`.
    pub fn failed(method: &str, failure: impl Into<Failure>) -> Self {
        ActionError::Failed {
            method: method.to_string(),
            failure: failure.into(),
        }
    }
}

impl Action {
    /// Parses a request: the method (unknown ones are [`ActionError::UnknownMessage`]) and
    /// its arguments, with upstream's checks. Pure.
    pub fn parse(req: &Request) -> Result<Action, ActionError> {
        let m = req.method.as_str();
        let args = Args(&req.arguments);
        let failed = |f: Failure| ActionError::failed(m, f);
        let action = match m {
            "ping" => Action::Ping,
            "info" => Action::Info,
            "get_task" => Action::GetTask {
                id: args.string(0, 1).map_err(failed)?,
            },
            "cancel_task" => Action::CancelTask {
                id: args.string(0, 1).map_err(failed)?,
            },
            "get_state" => Action::GetState {
                full: args.0.first().and_then(Value::as_str) == Some("full"),
            },
            "start" => Action::Start,
            "apply" | "prepare" => {
                let spec = args.first(1).map_err(failed)?;
                if !spec.is_object() {
                    return Err(failed(
                        format!("{m} spec must be a JSON object, got {spec}").into(),
                    ));
                }
                // A spec that cannot be installed fails at once, not in its task.
                if m == "prepare" || super::checks::has_configuration(&spec) {
                    super::checks::parse_spec(&spec).map_err(|e| failed(e.into()))?;
                }
                if m == "apply" {
                    Action::Apply { spec }
                } else {
                    Action::Prepare { spec }
                }
            }
            "compile_package" => {
                if args.0.len() < 5 {
                    return Err(failed(args.not_enough(5)));
                }
                let deps = match args.0.get(4) {
                    None | Some(Value::Null) => BTreeMap::new(),
                    Some(v) => serde_json::from_value(v.clone())
                        .map_err(|e| failed(format!("compile_package dependencies: {e}").into()))?,
                };
                Action::CompilePackage(CompileArgs {
                    blob_id: args.string(0, 5).map_err(failed)?,
                    digest: args.string(1, 5).map_err(failed)?,
                    name: args.string(2, 5).map_err(failed)?,
                    version: args.string(3, 5).map_err(failed)?,
                    deps,
                })
            }
            "upload_blob" => Action::UploadBlob {
                arg: args.first(1).map_err(failed)?,
            },
            "stop" => Action::Stop {
                protocol: req.protocol,
            },
            "drain" => {
                let kind = args.string(0, 1).map_err(failed)?;
                let new_spec = args.0.get(1).cloned();
                let kind = match kind.as_str() {
                    "update" if new_spec.is_none() => {
                        return Err(failed("Drain update requires new spec".into()));
                    }
                    "update" => DrainKind::Update,
                    "shutdown" => DrainKind::Shutdown,
                    "status" => {
                        return Err(failed(
                            "Check status can only be called as part of drain".into(),
                        ));
                    }
                    other => return Err(failed(format!("Invalid drain type {other:?}").into())),
                };
                Action::Drain(DrainArgs { kind, new_spec })
            }
            "run_script" => {
                let name = args.string(0, 2).map_err(failed)?;
                let env = match args.0.get(1).and_then(|o| o.get("env")) {
                    None | Some(Value::Null) => BTreeMap::new(),
                    Some(e) => serde_json::from_value(e.clone())
                        .map_err(|e| failed(format!("run_script env: {e}").into()))?,
                };
                Action::RunScript { name, env }
            }
            "update_settings" => {
                let new = args.first(1).map_err(failed)?;
                super::checks::check_update_settings(&new)
                    .map_err(|e| failed(e.to_string().into()))?;
                Action::UpdateSettings { new }
            }
            "add_persistent_disk" => {
                if args.0.len() < 2 {
                    return Err(failed(args.not_enough(2)));
                }
                Action::AddPersistentDisk {
                    cid: args.string(0, 2).map_err(failed)?,
                    hint: args.0.get(1).cloned().unwrap_or(Value::Null),
                }
            }
            "remove_persistent_disk" => Action::RemovePersistentDisk {
                cid: args.string(0, 1).map_err(failed)?,
            },
            "list_disk" => Action::ListDisk {
                protocol: req.protocol,
            },
            "mount_disk" => Action::MountDisk {
                cid: args.string(0, 1).map_err(failed)?,
            },
            "unmount_disk" => Action::UnmountDisk {
                cid: args.string(0, 1).map_err(failed)?,
            },
            "migrate_disk" => Action::MigrateDisk {
                old: args.string(0, 2).map_err(failed)?,
                new: args.string(1, 2).map_err(failed)?,
            },
            "ssh" => {
                if args.0.len() < 2 {
                    return Err(failed(args.not_enough(2)));
                }
                Action::Ssh {
                    cmd: args.string(0, 2).map_err(failed)?,
                    params: args.0.get(1).cloned().unwrap_or(Value::Null),
                }
            }
            "fetch_logs" => {
                let types = args.string(0, 2).map_err(failed)?;
                let filters = match args.0.get(1) {
                    None | Some(Value::Null) => Vec::new(),
                    Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                        failed(
                            format!("fetch_logs filters must be a list of strings, got {v}").into(),
                        )
                    })?,
                };
                Action::FetchLogs { types, filters }
            }
            "sync_dns" => {
                if args.0.len() < 3 {
                    return Err(failed(args.not_enough(3)));
                }
                let version = args.0.get(2).and_then(Value::as_u64).ok_or_else(|| {
                    failed(
                        format!(
                            "sync_dns version must be a non-negative integer, got {}",
                            args.0[2]
                        )
                        .into(),
                    )
                })?;
                Action::SyncDns {
                    blob_id: args.string(0, 3).map_err(failed)?,
                    digest: args.string(1, 3).map_err(failed)?,
                    version,
                }
            }
            "delete_arp_entries" => Action::DeleteArpEntries {
                arg: args.first(1).map_err(failed)?,
            },
            "shutdown" => Action::Shutdown,
            other => return Err(ActionError::UnknownMessage(other.to_string())),
        };
        Ok(action)
    }

    /// Whether the action runs as a task (answered with its id at once) rather than
    /// answered directly.
    pub fn is_async(&self) -> bool {
        match self {
            Action::Ping
            | Action::Info
            | Action::GetTask { .. }
            | Action::CancelTask { .. }
            | Action::GetState { .. }
            | Action::Start
            | Action::Ssh { .. }
            | Action::SyncDns { .. }
            | Action::DeleteArpEntries { .. }
            | Action::Shutdown => false,
            Action::ListDisk { protocol } => *protocol >= 3,
            Action::Apply { .. }
            | Action::Prepare { .. }
            | Action::CompilePackage(_)
            | Action::UploadBlob { .. }
            | Action::Stop { .. }
            | Action::Drain(_)
            | Action::RunScript { .. }
            | Action::UpdateSettings { .. }
            | Action::AddPersistentDisk { .. }
            | Action::RemovePersistentDisk { .. }
            | Action::MountDisk { .. }
            | Action::UnmountDisk { .. }
            | Action::MigrateDisk { .. }
            | Action::FetchLogs { .. } => true,
        }
    }

    /// Whether `cancel_task` (and the agent's shutdown) may stop its task.
    pub fn is_cancellable(&self) -> bool {
        matches!(self, Action::CompilePackage(_) | Action::Drain(_))
    }
}

/// A request's arguments, read with upstream's messages.
struct Args<'a>(&'a [Value]);

impl Args<'_> {
    fn not_enough(&self, expected: usize) -> Failure {
        Failure::NotEnoughArguments {
            expected,
            got: self.0.len(),
        }
    }

    /// Argument `i` as a string; `need` is how many the action takes.
    fn string(&self, i: usize, need: usize) -> Result<String, Failure> {
        match self.0.get(i) {
            None => Err(self.not_enough(need)),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Failure::NotAString {
                index: i + 1,
                got: other.to_string(),
            }),
        }
    }

    /// The first argument, of any type.
    fn first(&self, need: usize) -> Result<Value, Failure> {
        self.0.first().cloned().ok_or_else(|| self.not_enough(need))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn req(method: &str, arguments: Value) -> Request {
        Request {
            method: method.into(),
            arguments: serde_json::from_value(arguments).unwrap(),
            reply_to: "r".into(),
            protocol: 3,
        }
    }

    fn err(method: &str, arguments: Value) -> String {
        Action::parse(&req(method, arguments))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_unknown_method_is_upstreams_unknown_message() {
        assert_eq!(err("bogus", json!([])), "unknown message bogus");
        assert_eq!(err("", json!([])), "unknown message ");
    }

    #[test]
    fn missing_arguments_get_upstreams_count_message() {
        for (m, need) in [
            ("get_task", 1),
            ("cancel_task", 1),
            ("apply", 1),
            ("prepare", 1),
            ("upload_blob", 1),
            ("drain", 1),
            ("run_script", 2),
            ("update_settings", 1),
            ("compile_package", 5),
        ] {
            assert_eq!(
                err(m, json!([])),
                format!("Action Failed {m}: Not enough arguments, expected {need}, got 0")
            );
        }
        assert_eq!(
            err("compile_package", json!(["a", "b"])),
            "Action Failed compile_package: Not enough arguments, expected 5, got 2"
        );
    }

    #[test]
    fn argument_checks_are_upstreams() {
        assert_eq!(
            err("get_task", json!([5])),
            "Action Failed get_task: argument 1 must be a string, got 5"
        );
        assert_eq!(
            err("drain", json!(["update"])),
            "Action Failed drain: Drain update requires new spec"
        );
        assert_eq!(
            err("drain", json!(["status"])),
            "Action Failed drain: Check status can only be called as part of drain"
        );
        assert_eq!(
            err("drain", json!(["later"])),
            "Action Failed drain: Invalid drain type \"later\""
        );
        assert_eq!(
            err("apply", json!([[1]])),
            "Action Failed apply: apply spec must be a JSON object, got [1]"
        );
        assert!(
            err("run_script", json!(["pre-start", {"env": {"A": 1}}]))
                .starts_with("Action Failed run_script: run_script env: ")
        );
        assert!(err("update_settings", json!([[]])).starts_with(
            "Action Failed update_settings: update_settings argument must be a JSON object"
        ));
        assert!(
            err("compile_package", json!(["a", "b", "c", "d", 5]))
                .starts_with("Action Failed compile_package: compile_package dependencies: ")
        );
        assert_eq!(
            err("compile_package", json!(["a", 2, "c", "d", null])),
            "Action Failed compile_package: argument 2 must be a string, got 2"
        );
    }

    #[test]
    fn vm_actions_are_parsed_with_upstreams_counts_and_modes() {
        let parse = |m: &str, a: Value| Action::parse(&req(m, a));
        for (m, need) in [
            ("add_persistent_disk", 2),
            ("remove_persistent_disk", 1),
            ("mount_disk", 1),
            ("unmount_disk", 1),
            ("migrate_disk", 2),
            ("ssh", 2),
            ("fetch_logs", 2),
            ("sync_dns", 3),
            ("delete_arp_entries", 1),
        ] {
            assert_eq!(
                err(m, json!([])),
                format!("Action Failed {m}: Not enough arguments, expected {need}, got 0")
            );
        }
        assert_eq!(
            parse("add_persistent_disk", json!(["d-1", {"path": "/dev/sdc"}])).unwrap(),
            Action::AddPersistentDisk {
                cid: "d-1".into(),
                hint: json!({"path": "/dev/sdc"})
            }
        );
        assert_eq!(
            parse("migrate_disk", json!(["old", "new"])).unwrap(),
            Action::MigrateDisk {
                old: "old".into(),
                new: "new".into()
            }
        );
        assert_eq!(
            err("migrate_disk", json!(["old"])),
            "Action Failed migrate_disk: Not enough arguments, expected 2, got 1"
        );
        assert_eq!(
            err("migrate_disk", json!(["old", 7])),
            "Action Failed migrate_disk: argument 2 must be a string, got 7"
        );
        assert_eq!(
            parse("sync_dns", json!(["b", "sha256:00", 7])).unwrap(),
            Action::SyncDns {
                blob_id: "b".into(),
                digest: "sha256:00".into(),
                version: 7
            }
        );
        assert!(
            err("sync_dns", json!(["b", "d", -1]))
                .starts_with("Action Failed sync_dns: sync_dns version must be a non-negative")
        );
        assert_eq!(
            parse("fetch_logs", json!(["job", null])).unwrap(),
            Action::FetchLogs {
                types: "job".into(),
                filters: vec![]
            }
        );
        assert!(
            err("fetch_logs", json!(["job", [1]]))
                .starts_with("Action Failed fetch_logs: fetch_logs filters must be a list")
        );
        assert_eq!(
            err("mount_disk", json!([3])),
            "Action Failed mount_disk: argument 1 must be a string, got 3"
        );
        // list_disk is asynchronous from protocol 3, as upstream.
        let mut r = req("list_disk", json!([]));
        r.protocol = 2;
        assert!(!Action::parse(&r).unwrap().is_async());
        r.protocol = 3;
        assert!(Action::parse(&r).unwrap().is_async());
        for a in [
            parse("ssh", json!(["setup", {}])).unwrap(),
            parse("sync_dns", json!(["b", "d", 1])).unwrap(),
            parse("delete_arp_entries", json!([{"ips": []}])).unwrap(),
            parse("shutdown", json!([])).unwrap(),
        ] {
            assert!(!a.is_async(), "{a:?}");
        }
        for a in [
            parse("add_persistent_disk", json!(["d", "/dev/sdc"])).unwrap(),
            parse("remove_persistent_disk", json!(["d"])).unwrap(),
            parse("mount_disk", json!(["d"])).unwrap(),
            parse("unmount_disk", json!(["d"])).unwrap(),
            parse("migrate_disk", json!(["a", "b"])).unwrap(),
            parse("fetch_logs", json!(["job", []])).unwrap(),
        ] {
            assert!(a.is_async() && !a.is_cancellable(), "{a:?}");
        }
    }

    #[test]
    fn modes_are_upstreams() {
        let parse = |m: &str, a: Value| Action::parse(&req(m, a)).unwrap();
        for a in [
            parse("ping", json!([])),
            parse("info", json!([])),
            parse("get_task", json!(["x"])),
            parse("cancel_task", json!(["x"])),
            parse("get_state", json!(["full"])),
            parse("start", json!([])),
        ] {
            assert!(!a.is_async() && !a.is_cancellable(), "{a:?}");
        }
        assert_eq!(
            parse("get_state", json!(["full"])),
            Action::GetState { full: true }
        );
        assert_eq!(
            parse("get_state", json!([])),
            Action::GetState { full: false }
        );
        for a in [
            parse("apply", json!([{}])),
            parse("upload_blob", json!([{}])),
            parse("stop", json!([])),
            parse("run_script", json!(["pre-start"])),
            parse("update_settings", json!([{}])),
        ] {
            assert!(a.is_async() && !a.is_cancellable(), "{a:?}");
        }
        for a in [
            parse("drain", json!(["shutdown"])),
            parse("compile_package", json!(["a", "b", "c", "d", null])),
        ] {
            assert!(a.is_async() && a.is_cancellable(), "{a:?}");
        }
    }
}
