//! The director's side of the agent: a request on `agent.<id>` is decoded ([`protocol`]),
//! parsed once into a typed [`Action`] ([`action`]), run by its handler ([`actions`]) —
//! answered at once, or queued as a task ([`tasks`]) — and the reply encoded within upstream's
//! 1 MiB rule and published to the request's `reply_to`.

pub mod action;
pub mod actions;
pub mod checks;
pub mod https;
pub mod mbus_fallback;
pub mod protocol;
pub mod spec;
pub mod tasks;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use action::{Action, ActionError, Failure};
use protocol::{Request, Response};

use crate::firewall::Health;
use crate::settings::Settings;
use mbus_fallback::Candidates;

/// What actions need: paths, the settings, the task table, the job supervisor, the bus.
pub struct Context {
    /// `-b`, `/var/vcap` by default.
    pub base_dir: PathBuf,
    /// settings.json, parsed.
    pub settings: Arc<Settings>,
    /// The asynchronous actions.
    pub tasks: tasks::Tasks,
    /// The monit-backed job supervisor.
    pub jobs: Arc<jobs::JobSupervisor>,
    /// Publishes `hm.agent.shutdown` and switches the mbus; `None` without a bus.
    pub bus: Option<mbus::Bus>,
    /// The mbus configurations the bus may use (newest first); `None` without a bus.
    pub mbus_candidates: Option<Arc<Candidates>>,
    /// The firewall's health, as the firewall task publishes it.
    pub firewall: watch::Receiver<Health>,
    /// Disks, ssh users, log directories, DNS records, ARP, power.
    pub vm: actions::vm::VmParts,
}

/// Answers one request: the response to send to its `reply_to`.
pub async fn dispatch(ctx: &Arc<Context>, req: &Request) -> Response {
    let action = match Action::parse(req) {
        Ok(a) => a,
        Err(e) => return Response::Exception(e.to_string()),
    };
    if action.is_async() {
        let cancellable = action.is_cancellable();
        let persistent = is_persistent(&action);
        let c = ctx.clone();
        let body = tasks::task(move |cancel| actions::run(c, action, cancel));
        if persistent {
            let payload = tasks::payload(&req.method, &req.arguments, req.protocol);
            return match ctx
                .tasks
                .submit_persistent(&req.method, &payload, body, cancellable)
            {
                Ok(v) => Response::Value(v),
                Err(e) => {
                    tracing::error!(error = %e, method = %req.method, "cannot record the task");
                    Response::Exception(format!("Action Failed {}: {e}", req.method))
                }
            };
        }
        return Response::Value(ctx.tasks.submit(&req.method, body, cancellable));
    }
    // A synchronous action is not cancelled: it is short, and its reply is waited for.
    match actions::run(ctx.clone(), action, CancellationToken::new()).await {
        Ok(v) => Response::Value(v),
        Err(f) => Response::Exception(ActionError::failed(&req.method, f).to_string()),
    }
}

/// Upstream's persistent actions: recorded in `tasks.json` and run again after a restart.
fn is_persistent(action: &Action) -> bool {
    matches!(action, Action::UpdateSettings { .. })
}

/// At start, before requests are taken: runs again, under their ids, the persistent tasks an
/// earlier agent recorded and did not finish (see [`tasks::Store`]). A record that is not a
/// persistent action this agent knows is removed and logged (upstream: "Unknown action").
/// Returns how many were resumed.
pub fn resume_recorded(
    ctx: &Arc<Context>,
    records: Vec<tasks::Record>,
    store: &tasks::Store,
) -> usize {
    let mut resumed = 0;
    for r in records {
        let parsed = serde_json::from_slice::<Request>(&r.payload)
            .map_err(|e| format!("its payload is not a request: {e}"))
            .and_then(|req| Action::parse(&req).map_err(|e| e.to_string()));
        match parsed {
            Ok(action) if is_persistent(&action) => {
                let cancellable = action.is_cancellable();
                let c = ctx.clone();
                let body = tasks::task(move |cancel| actions::run(c, action, cancel));
                ctx.tasks.resume(&r, body, cancellable);
                resumed += 1;
            }
            Ok(_) => forget(store, &r, "not a persistent action"),
            Err(why) => forget(store, &r, &why),
        }
    }
    resumed
}

fn forget(store: &tasks::Store, r: &tasks::Record, why: &str) {
    tracing::error!(task = %r.task_id, method = %r.method, path = %store.path().display(),
        "a recorded task cannot be resumed ({why}); it is dropped");
    if let Err(e) = store.remove(&r.task_id) {
        tracing::warn!(error = %e, "cannot drop the record");
    }
}

/// Decodes a request body and answers it: the `reply_to` and the encoded reply, or `None`
/// (logged) when the body cannot be answered (not JSON, no `reply_to`, too large).
pub async fn answer(ctx: &Arc<Context>, body: &[u8]) -> Option<(Request, Vec<u8>)> {
    let req = match protocol::decode(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a request that cannot be answered");
            return None;
        }
    };
    let resp = dispatch(ctx, &req).await;
    let bytes = protocol::encode_limited(&resp, protocol::RESPONSE_MAX_LEN);
    Some((req, bytes))
}

/// Answers one request and publishes the reply.
pub async fn handle(ctx: Arc<Context>, bus: mbus::Bus, body: &[u8]) {
    let Some((req, bytes)) = answer(&ctx, body).await else {
        return;
    };
    if let Err(e) = bus.publish(req.reply_to.clone(), bytes.into()).await {
        tracing::warn!(error = %e, method = %req.method, "cannot reply");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::{Value, json};

    struct World {
        ctx: Arc<Context>,
        dir: PathBuf,
        stop: CancellationToken,
    }

    impl Drop for World {
        fn drop(&mut self) {
            self.stop.cancel();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn world(name: &str) -> World {
        let dir = std::env::temp_dir().join(format!("director-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (tasks, worker) = tasks::Tasks::new();
        let stop = CancellationToken::new();
        tokio::spawn(worker.run(stop.clone()));
        // Monit on a port nothing listens on: job state "unknown", as with monit down.
        let client = jobs::MonitClient::new(
            jobs::ClientOptions {
                endpoint: "127.0.0.1:9".parse().unwrap(),
                ..jobs::ClientOptions::default()
            },
            jobs::Credentials {
                user: "u".into(),
                password: "p".into(),
            },
        );
        let supervisor =
            jobs::JobSupervisor::new(client, dir.clone(), jobs::SupervisorOptions::default());
        let (_, health) = watch::channel(Health::default());
        let ctx = Arc::new(Context {
            base_dir: dir.clone(),
            settings: Arc::new(Settings::parse(&json!({"agent_id": "a1"})).unwrap()),
            tasks,
            jobs: Arc::new(supervisor),
            bus: None,
            mbus_candidates: None,
            firewall: health,
            vm: actions::vm::VmParts::new(&dir, &crate::config::LinuxOptions::default()).unwrap(),
        });
        World { ctx, dir, stop }
    }

    async fn call(w: &World, method: &str, args: Value) -> Value {
        let body = json!({"method": method, "arguments": args, "reply_to": "d.1"}).to_string();
        let (_, bytes) = answer(&w.ctx, body.as_bytes()).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_upstream_error_shape_without_a_bus() {
        let w = world("shapes");
        assert_eq!(call(&w, "ping", json!([])).await, json!({"value": "pong"}));
        assert_eq!(
            call(&w, "info", json!([])).await,
            json!({"value": {"api_version": 1}})
        );
        assert_eq!(
            call(&w, "run_errand", json!([])).await,
            json!({"exception": {"message": "unknown message run_errand"}})
        );
        assert_eq!(
            call(&w, "ssh", json!(["setup"])).await,
            json!({"exception": {"message": "Action Failed ssh: Not enough arguments, expected 2, got 1"}})
        );
        assert_eq!(
            call(&w, "get_task", json!(["nope"])).await,
            json!({"exception": {"message": "Action Failed get_task: Task with id nope could not be found"}})
        );
        assert_eq!(
            call(&w, "get_task", json!([])).await,
            json!({"exception": {"message": "Action Failed get_task: Not enough arguments, expected 1, got 0"}})
        );
        assert_eq!(
            call(&w, "run_script", json!([])).await,
            json!({"exception": {"message": "Action Failed run_script: Not enough arguments, expected 2, got 0"}})
        );
        assert_eq!(
            call(&w, "drain", json!(["update"])).await,
            json!({"exception": {"message": "Action Failed drain: Drain update requires new spec"}})
        );
    }

    #[tokio::test]
    async fn tasks_answer_at_once_and_fail_with_upstreams_wording() {
        let w = world("tasks");
        // A spec file that is not an object makes `run_script` fail inside its task.
        std::fs::create_dir_all(w.dir.join("bosh")).unwrap();
        std::fs::write(w.dir.join("bosh/spec.json"), "[1]").unwrap();
        let r = call(&w, "run_script", json!(["pre-start", {}])).await;
        let id = r["value"]["agent_task_id"].as_str().unwrap().to_string();
        assert_eq!(
            r,
            json!({"value": {"agent_task_id": id, "state": "running"}})
        );
        let mut last = Value::Null;
        for _ in 0..200 {
            last = call(&w, "get_task", json!([id])).await;
            if last["value"]["state"] != "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let msg = last["exception"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!(
                "Action Failed get_task: Task {id} result: Reading spec "
            )),
            "{msg}"
        );
        assert_eq!(
            call(&w, "cancel_task", json!([id])).await,
            json!({"exception": {"message": "Action Failed cancel_task: not supported"}})
        );
    }

    #[tokio::test]
    async fn an_oversized_exception_is_truncated_within_one_mebibyte() {
        let w = world("truncate");
        // The body fits the 1 MiB request limit; "unknown message <m>" in its wrapper does not.
        let m = "x".repeat(protocol::REQUEST_MAX_LEN - 40);
        let body = json!({"method": m, "reply_to": "d"}).to_string();
        assert!(body.len() <= protocol::REQUEST_MAX_LEN);
        let (_, bytes) = answer(&w.ctx, body.as_bytes()).await.unwrap();
        assert!(bytes.len() <= protocol::RESPONSE_MAX_LEN, "{}", bytes.len());
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let msg = v["exception"]["message"].as_str().unwrap();
        assert!(msg.starts_with("unknown message xxx"), "{}", &msg[..40]);
        assert!(msg.contains("\n...[truncated]...\n"));
        assert!(msg.ends_with("xxx"));
    }

    #[tokio::test]
    async fn bodies_that_cannot_be_answered_get_no_reply() {
        let w = world("drop");
        assert!(answer(&w.ctx, b"{not json").await.is_none());
        assert!(answer(&w.ctx, br#"{"method":"ping"}"#).await.is_none());
        let big = vec![b' '; protocol::REQUEST_MAX_LEN + 1];
        assert!(answer(&w.ctx, &big).await.is_none());
    }
}
