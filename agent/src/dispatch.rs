//! The action dispatcher: method → synchronous action (answered at once) or asynchronous
//! action (a task), with upstream's argument rules and error shapes:
//! `unknown message <m>`, `Action Failed <m>: <err>`, `Not enough arguments, expected N, got M`.
//! Each request is handled on its own tokio task, so a slow action never delays `ping`.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::actions;
use crate::protocol::{Request, Response};
use crate::tasks::{TaskBody, Tasks, to_response};

/// What actions need: paths, identity, the task table, the job supervisor.
pub struct Context {
    /// `-b`, `/var/vcap` by default.
    pub base_dir: PathBuf,
    /// `agent_id` from settings.
    pub agent_id: String,
    /// The raw settings (for `vm.name` and `update_settings`).
    pub settings: Value,
    /// The asynchronous actions.
    pub tasks: Tasks,
    /// The monit-backed job supervisor.
    pub jobs: actions::JobSupervisor,
    /// Publishes `hm.agent.shutdown` etc.; `None` in tests without a bus.
    pub notifier: Option<actions::Notifier>,
    /// The mbus configurations the bus may use (newest first); `None` without a bus.
    pub mbus_candidates: Option<Arc<crate::mbus_fallback::Candidates>>,
}

/// Methods answered synchronously.
const SYNC: &[&str] = &[
    "ping",
    "info",
    "get_task",
    "cancel_task",
    "get_state",
    "start",
];
/// Methods run as tasks, and whether `cancel_task` may stop them.
const ASYNC: &[(&str, bool)] = &[
    ("apply", false),
    ("prepare", false),
    ("compile_package", true),
    ("upload_blob", false),
    ("stop", false),
    ("drain", true),
    ("run_script", false),
    ("update_settings", false),
];

/// Handles one request.
pub async fn dispatch(ctx: &Arc<Context>, req: &Request) -> Response {
    let m = req.method.as_str();
    if SYNC.contains(&m) {
        return to_response(m, sync_action(ctx, req).await);
    }
    if let Some((_, cancellable)) = ASYNC.iter().find(|(n, _)| *n == m) {
        // Arguments are checked before queueing so that a malformed call fails at once.
        return match actions::prepare_async(ctx, req) {
            Ok(body) => Response::Value(ctx.tasks.submit(body, *cancellable)),
            Err(e) => Response::Exception(format!("Action Failed {m}: {e}")),
        };
    }
    Response::Exception(format!("unknown message {m}"))
}

async fn sync_action(ctx: &Arc<Context>, req: &Request) -> Result<Value, String> {
    match req.method.as_str() {
        "ping" => Ok(json!("pong")),
        "info" => Ok(json!({"api_version": 1})),
        "get_task" => ctx.tasks.get(&string_arg(req, 0, 1)?),
        "cancel_task" => ctx.tasks.cancel(&string_arg(req, 0, 1)?),
        "get_state" => actions::get_state(ctx, &req.arguments).await,
        "start" => actions::start(ctx).await,
        other => Err(format!("unknown message {other}")),
    }
}

/// Argument `i` of `req` as a string; `need` is how many the action takes (for upstream's
/// "Not enough arguments" message).
pub fn string_arg(req: &Request, i: usize, need: usize) -> Result<String, String> {
    match req.arguments.get(i) {
        None => Err(format!(
            "Not enough arguments, expected {need}, got {}",
            req.arguments.len()
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("argument {} must be a string, got {other}", i + 1)),
    }
}

/// A task body from a future.
pub fn task<F>(f: impl FnOnce(tokio::sync::watch::Receiver<bool>) -> F + Send + 'static) -> TaskBody
where
    F: std::future::Future<Output = Result<Value, String>> + Send + 'static,
{
    Box::new(move |c| Box::pin(f(c)))
}
