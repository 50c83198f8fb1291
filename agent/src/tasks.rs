//! Asynchronous actions as tasks: a request returns `{"agent_task_id","state":"running"}` at
//! once; `get_task` polls; `cancel_task` cancels. Tasks run one at a time in arrival order (as
//! upstream: an `apply` must not overlap a `stop`), but the queue never blocks the message
//! loop: `ping` and `get_task` are answered while a task runs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::protocol::Response;

/// What a task's body returns: its value, or the error message.
pub type TaskResult = Result<Value, String>;
/// A task's body. It receives a cancel signal that flips to `true` on `cancel_task`.
pub type TaskBody = Box<
    dyn FnOnce(watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = TaskResult> + Send>> + Send,
>;

#[derive(Debug, Clone)]
enum State {
    Queued,
    Running,
    Done(Value),
    Failed(String),
}

struct Entry {
    /// Arrival order: finished tasks are forgotten oldest first.
    seq: u64,
    state: State,
    cancel: watch::Sender<bool>,
    cancellable: bool,
}

/// The task table and its single worker.
#[derive(Clone)]
pub struct Tasks {
    table: Arc<Mutex<HashMap<String, Entry>>>,
    queue: mpsc::UnboundedSender<(String, TaskBody, watch::Receiver<bool>)>,
}

/// Finished tasks kept for `get_task` (upstream keeps all forever; a bound keeps memory flat
/// on a VM that lives for years).
const KEEP_FINISHED: usize = 1000;

impl Tasks {
    /// Starts the worker on the current tokio runtime.
    pub fn start() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, TaskBody, watch::Receiver<bool>)>();
        let table: Arc<Mutex<HashMap<String, Entry>>> = Arc::default();
        let t = table.clone();
        tokio::spawn(async move {
            while let Some((id, body, cancel)) = rx.recv().await {
                set_state(&t, &id, State::Running);
                let result = body(cancel).await;
                set_state(
                    &t,
                    &id,
                    match result {
                        Ok(v) => State::Done(v),
                        Err(e) => State::Failed(e),
                    },
                );
                prune(&t, &id);
            }
        });
        Tasks { table, queue: tx }
    }

    /// Queues a task and returns upstream's immediate answer
    /// `{"agent_task_id": id, "state": "running"}`.
    pub fn submit(&self, body: TaskBody, cancellable: bool) -> Value {
        let id = new_id();
        let (ctx, crx) = watch::channel(false);
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.table).insert(
            id.clone(),
            Entry {
                seq,
                state: State::Queued,
                cancel: ctx,
                cancellable,
            },
        );
        if self.queue.send((id.clone(), body, crx)).is_err() {
            set_state(
                &self.table,
                &id,
                State::Failed("the task worker has stopped".into()),
            );
        }
        json!({"agent_task_id": id, "state": "running"})
    }

    /// `get_task`: running → `{"agent_task_id","state":"running"}`; done → its value; failed →
    /// `Task <id> result: <err>` (the dispatcher adds `Action Failed get_task: `).
    pub fn get(&self, id: &str) -> Result<Value, String> {
        match lock(&self.table).get(id).map(|e| e.state.clone()) {
            None => Err(format!("Task with id {id} could not be found")),
            Some(State::Queued | State::Running) => {
                Ok(json!({"agent_task_id": id, "state": "running"}))
            }
            Some(State::Done(v)) => Ok(v),
            Some(State::Failed(e)) => Err(format!("Task {id} result: {e}")),
        }
    }

    /// `cancel_task`: signals the task; `"canceled"`, or an error when it cannot be cancelled.
    pub fn cancel(&self, id: &str) -> Result<Value, String> {
        let table = lock(&self.table);
        let e = table
            .get(id)
            .ok_or_else(|| format!("Task with id {id} could not be found"))?;
        if !e.cancellable {
            return Err("not supported".into());
        }
        let _ = e.cancel.send(true);
        Ok(json!("canceled"))
    }
}

fn lock(t: &Mutex<HashMap<String, Entry>>) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
    // A panic while holding the lock leaves consistent data (single assignments).
    t.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_state(t: &Mutex<HashMap<String, Entry>>, id: &str, state: State) {
    if let Some(e) = lock(t).get_mut(id) {
        e.state = state;
    }
}

/// Forgets the oldest finished tasks beyond [`KEEP_FINISHED`], never `just_finished` (the
/// director has not polled it yet).
fn prune(t: &Mutex<HashMap<String, Entry>>, just_finished: &str) {
    let mut table = lock(t);
    let mut finished: Vec<(u64, String)> = table
        .iter()
        .filter(|(k, e)| {
            matches!(e.state, State::Done(_) | State::Failed(_)) && k.as_str() != just_finished
        })
        .map(|(k, e)| (e.seq, k.clone()))
        .collect();
    if finished.len() >= KEEP_FINISHED {
        finished.sort_unstable();
        let excess = finished.len() + 1 - KEEP_FINISHED;
        for (_, k) in finished.into_iter().take(excess) {
            table.remove(&k);
        }
    }
}

/// A random UUID v4 (from the kernel's randomness; no crate needed for 16 bytes).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    if b == [0; 16] {
        // No /dev/urandom: time and a counter still make ids unique within this agent.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..].copy_from_slice(
            &N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_le_bytes(),
        );
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Convenience for the dispatcher: a response from a task-table answer.
pub fn to_response(method: &str, r: Result<Value, String>) -> Response {
    match r {
        Ok(v) => Response::Value(v),
        Err(e) => Response::Exception(format!("Action Failed {method}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn body(f: impl Future<Output = TaskResult> + Send + 'static) -> TaskBody {
        Box::new(move |_c| Box::pin(f))
    }

    #[tokio::test]
    async fn tasks_run_in_order_and_report_results() {
        let t = Tasks::start();
        let slow = t.submit(
            body(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(json!("first"))
            }),
            false,
        );
        let id1 = slow["agent_task_id"].as_str().unwrap().to_string();
        assert_eq!(slow["state"], "running");
        let fail = t.submit(body(async { Err("boom".into()) }), false);
        let id2 = fail["agent_task_id"].as_str().unwrap().to_string();
        // The second waits behind the first (serial), and both answer get_task meanwhile.
        assert_eq!(t.get(&id2).unwrap()["state"], "running");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(t.get(&id1).unwrap(), json!("first"));
        assert_eq!(t.get(&id2).unwrap_err(), format!("Task {id2} result: boom"));
        assert_eq!(
            t.get("nope").unwrap_err(),
            "Task with id nope could not be found"
        );
    }

    #[tokio::test]
    async fn cancel_signals_cancellable_tasks_only() {
        let t = Tasks::start();
        let b: TaskBody = Box::new(|mut c| {
            Box::pin(async move {
                let _ = c.wait_for(|v| *v).await;
                Err("canceled by director".into())
            })
        });
        let id = t.submit(b, true)["agent_task_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(t.cancel(&id).unwrap(), json!("canceled"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(t.get(&id).unwrap_err().contains("canceled by director"));
        let id2 = t.submit(body(async { Ok(json!(1)) }), false)["agent_task_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(t.cancel(&id2).unwrap_err(), "not supported");
    }

    #[tokio::test]
    async fn the_oldest_finished_tasks_are_forgotten_first() {
        let t = Tasks::start();
        let ids: Vec<String> = (0..KEEP_FINISHED + 50)
            .map(|i| {
                t.submit(body(async move { Ok(json!(i)) }), false)["agent_task_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let last = ids.last().unwrap().clone();
        for _ in 0..200 {
            if t.get(&last)
                .is_ok_and(|v| v != json!({"agent_task_id": last, "state": "running"}))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (i, id) in ids.iter().enumerate() {
            let got = t.get(id);
            if i < 50 {
                assert!(got.is_err(), "task {i} should be forgotten");
            } else {
                assert_eq!(got.unwrap(), json!(i), "task {i} must be kept");
            }
        }
    }

    #[test]
    fn ids_are_uuid_v4_shaped_and_distinct() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
