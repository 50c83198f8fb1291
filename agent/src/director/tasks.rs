//! Asynchronous actions as tasks: a request returns `{"agent_task_id","state":"running"}` at
//! once; `get_task` polls; `cancel_task` cancels. Tasks run one at a time in arrival order (as
//! upstream: an `apply` must not overlap a `stop`), on one [`Worker`] that the lifecycle owns,
//! and the queue never blocks the message loop: `ping` and `get_task` are answered while a
//! task runs. At shutdown the worker starts nothing new, the running task is cancelled when it
//! can be, and what never ran is failed and named in the log.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::action::Failure;

/// What a task's body returns: its value, or why it failed.
pub type TaskResult = Result<Value, Failure>;
/// A task's body. Its token is cancelled on `cancel_task` (cancellable tasks only) and when
/// the agent stops.
pub type TaskBody =
    Box<dyn FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = TaskResult> + Send>> + Send>;

/// A task body from an async closure.
pub fn task<F>(f: impl FnOnce(CancellationToken) -> F + Send + 'static) -> TaskBody
where
    F: Future<Output = TaskResult> + Send + 'static,
{
    Box::new(move |c| Box::pin(f(c)))
}

#[derive(Debug, Clone)]
enum State {
    Queued,
    Running,
    Done(Value),
    Failed(Failure),
}

struct Entry {
    /// Arrival order: finished tasks are forgotten oldest first.
    seq: u64,
    /// The director's method, for logs.
    method: String,
    state: State,
    cancel: CancellationToken,
    cancellable: bool,
}

struct Job {
    id: String,
    body: TaskBody,
    cancel: CancellationToken,
}

type Table = Arc<Mutex<HashMap<String, Entry>>>;

/// The task table: what the director's requests submit to and poll. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    table: Table,
    queue: mpsc::UnboundedSender<Job>,
}

/// Runs the queued tasks one at a time; see [`Worker::run`].
pub struct Worker {
    table: Table,
    queue: mpsc::UnboundedReceiver<Job>,
}

/// Finished tasks kept for `get_task` (upstream keeps all forever; a bound keeps memory flat
/// on a VM that lives for years).
const KEEP_FINISHED: usize = 1000;

impl Tasks {
    /// An empty table and the worker that runs what is submitted to it.
    pub fn new() -> (Tasks, Worker) {
        let (tx, rx) = mpsc::unbounded_channel();
        let table: Table = Arc::default();
        (
            Tasks {
                table: table.clone(),
                queue: tx,
            },
            Worker { table, queue: rx },
        )
    }

    /// Queues a task and returns upstream's immediate answer
    /// `{"agent_task_id": id, "state": "running"}`. Once the worker has stopped, the task
    /// fails at once (`get_task` says why).
    pub fn submit(&self, method: &str, body: TaskBody, cancellable: bool) -> Value {
        let id = new_id();
        let cancel = CancellationToken::new();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.table).insert(
            id.clone(),
            Entry {
                seq,
                method: method.to_string(),
                state: State::Queued,
                cancel: cancel.clone(),
                cancellable,
            },
        );
        let job = Job {
            id: id.clone(),
            body,
            cancel,
        };
        if self.queue.send(job).is_err() {
            set_state(
                &self.table,
                &id,
                State::Failed("the agent is stopping; the task was not started".into()),
            );
        }
        json!({"agent_task_id": id, "state": "running"})
    }

    /// `get_task`: running → `{"agent_task_id","state":"running"}`; done → its value; failed →
    /// `Task <id> result: <err>` (the dispatcher adds `Action Failed get_task: `).
    pub fn get(&self, id: &str) -> TaskResult {
        match lock(&self.table).get(id).map(|e| e.state.clone()) {
            None => Err(format!("Task with id {id} could not be found").into()),
            Some(State::Queued | State::Running) => {
                Ok(json!({"agent_task_id": id, "state": "running"}))
            }
            Some(State::Done(v)) => Ok(v),
            Some(State::Failed(e)) => Err(format!("Task {id} result: {e}").into()),
        }
    }

    /// `cancel_task`: signals the task; `"canceled"`, or an error when it cannot be cancelled.
    pub fn cancel(&self, id: &str) -> TaskResult {
        let table = lock(&self.table);
        let e = table
            .get(id)
            .ok_or_else(|| format!("Task with id {id} could not be found"))?;
        if !e.cancellable {
            return Err("not supported".into());
        }
        e.cancel.cancel();
        Ok(json!("canceled"))
    }

    /// At shutdown: cancels every running cancellable task and returns the unfinished ones,
    /// as `<method> <id>` with whether each was told to stop.
    pub fn stop_cancellable(&self) -> Vec<(String, bool)> {
        let table = lock(&self.table);
        let mut out: Vec<(u64, String, bool)> = table
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Queued | State::Running))
            .map(|(id, e)| {
                let cancelled = e.cancellable && matches!(e.state, State::Running);
                if cancelled {
                    e.cancel.cancel();
                }
                (e.seq, format!("{} {id}", e.method), cancelled)
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, n, c)| (n, c)).collect()
    }

    /// The tasks not finished, as `<method> <id>`, in arrival order.
    pub fn unfinished(&self) -> Vec<String> {
        let table = lock(&self.table);
        let mut out: Vec<(u64, String)> = table
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Queued | State::Running))
            .map(|(id, e)| (e.seq, format!("{} {id}", e.method)))
            .collect();
        out.sort();
        out.into_iter().map(|(_, n)| n).collect()
    }
}

impl Worker {
    /// Runs queued tasks in arrival order until `stop` is cancelled (the running task is let
    /// finish; cancelling it is [`Tasks::stop_cancellable`]'s job) or every [`Tasks`] handle is
    /// gone. Tasks still queued then are failed and logged by name: nothing is left pending.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let job = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                j = self.queue.recv() => match j {
                    Some(j) => j,
                    None => break,
                },
            };
            set_state(&self.table, &job.id, State::Running);
            let result = (job.body)(job.cancel).await;
            set_state(
                &self.table,
                &job.id,
                match result {
                    Ok(v) => State::Done(v),
                    Err(e) => State::Failed(e),
                },
            );
            prune(&self.table, &job.id);
        }
        self.queue.close();
        while let Ok(job) = self.queue.try_recv() {
            let method = lock(&self.table)
                .get(&job.id)
                .map(|e| e.method.clone())
                .unwrap_or_default();
            tracing::warn!(task = %job.id, %method, "the agent is stopping: queued task not started");
            set_state(
                &self.table,
                &job.id,
                State::Failed("the agent is stopping; the task was not started".into()),
            );
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn body(f: impl Future<Output = TaskResult> + Send + 'static) -> TaskBody {
        Box::new(move |_c| Box::pin(f))
    }

    fn start() -> Tasks {
        let (t, w) = Tasks::new();
        tokio::spawn(w.run(CancellationToken::new()));
        t
    }

    #[tokio::test]
    async fn tasks_run_in_order_and_report_results() {
        let t = start();
        let slow = t.submit(
            "m",
            body(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(json!("first"))
            }),
            false,
        );
        let id1 = slow["agent_task_id"].as_str().unwrap().to_string();
        assert_eq!(slow["state"], "running");
        let fail = t.submit("m", body(async { Err("boom".into()) }), false);
        let id2 = fail["agent_task_id"].as_str().unwrap().to_string();
        // The second waits behind the first (serial), and both answer get_task meanwhile.
        assert_eq!(t.get(&id2).unwrap()["state"], "running");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(t.get(&id1).unwrap(), json!("first"));
        assert_eq!(
            t.get(&id2).unwrap_err().to_string(),
            format!("Task {id2} result: boom")
        );
        assert_eq!(
            t.get("nope").unwrap_err().to_string(),
            "Task with id nope could not be found"
        );
    }

    #[tokio::test]
    async fn cancel_signals_cancellable_tasks_only() {
        let t = start();
        let b: TaskBody = Box::new(|c| {
            Box::pin(async move {
                c.cancelled().await;
                Err("canceled by director".into())
            })
        });
        let id = t.submit("m", b, true)["agent_task_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(t.cancel(&id).unwrap(), json!("canceled"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            t.get(&id)
                .unwrap_err()
                .to_string()
                .contains("canceled by director")
        );
        let id2 = t.submit("m", body(async { Ok(json!(1)) }), false)["agent_task_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(t.cancel(&id2).unwrap_err().to_string(), "not supported");
    }

    #[tokio::test]
    async fn the_oldest_finished_tasks_are_forgotten_first() {
        let t = start();
        let ids: Vec<String> = (0..KEEP_FINISHED + 50)
            .map(|i| {
                t.submit("m", body(async move { Ok(json!(i)) }), false)["agent_task_id"]
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
