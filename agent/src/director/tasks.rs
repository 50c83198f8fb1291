//! Asynchronous actions as tasks: a request returns `{"agent_task_id","state":"running"}` at
//! once; `get_task` polls; `cancel_task` cancels. Tasks run one at a time in arrival order (as
//! upstream: an `apply` must not overlap a `stop`), on one [`Worker`] that the lifecycle owns,
//! and the queue never blocks the message loop: `ping` and `get_task` are answered while a
//! task runs. At shutdown the worker starts nothing new, the running task is cancelled when it
//! can be, and what never ran is failed and named in the log.
//!
//! Persistent tasks (upstream: `update_settings`) are also recorded in `<base>/bosh/tasks.json`
//! before the director is answered, and removed from it when they end: an agent killed while
//! one runs finds it there at its next start and runs it again under the same id, so the
//! director's `get_task` polls go on as if nothing had happened ([`Store`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
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
    /// Recorded in the [`Store`]: removed from it when the task ends.
    persisted: bool,
}

type Table = Arc<Mutex<HashMap<String, Entry>>>;

/// The task table: what the director's requests submit to and poll. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    table: Table,
    queue: mpsc::UnboundedSender<Job>,
    store: Option<Arc<Store>>,
}

/// Runs the queued tasks one at a time; see [`Worker::run`].
pub struct Worker {
    table: Table,
    queue: mpsc::UnboundedReceiver<Job>,
    store: Option<Arc<Store>>,
}

/// Finished tasks kept for `get_task` (upstream keeps all forever; a bound keeps memory flat
/// on a VM that lives for years).
const KEEP_FINISHED: usize = 1000;

impl Tasks {
    /// An empty table and the worker that runs what is submitted to it.
    pub fn new() -> (Tasks, Worker) {
        Self::with_store(None)
    }

    /// An empty table whose persistent tasks are recorded in `store`; see
    /// [`Tasks::submit_persistent`] and [`Tasks::resume`].
    pub fn with_store(store: Option<Arc<Store>>) -> (Tasks, Worker) {
        let (tx, rx) = mpsc::unbounded_channel();
        let table: Table = Arc::default();
        (
            Tasks {
                table: table.clone(),
                queue: tx,
                store: store.clone(),
            },
            Worker {
                table,
                queue: rx,
                store,
            },
        )
    }

    /// Queues a task and returns upstream's immediate answer
    /// `{"agent_task_id": id, "state": "running"}`. Once the worker has stopped, the task
    /// fails at once (`get_task` says why).
    pub fn submit(&self, method: &str, body: TaskBody, cancellable: bool) -> Value {
        self.enqueue(new_id(), method, body, cancellable, false)
    }

    /// A persistent task: recorded in the store (`method` and the request's `payload`) before
    /// it is queued, so an agent killed before it ends runs it again at its next start
    /// ([`Tasks::resume`]); removed from the store when it ends. Without a store this is
    /// [`Tasks::submit`]. When the record cannot be written the task is not started and the
    /// error names the file (upstream answers the director with that error too).
    pub fn submit_persistent(
        &self,
        method: &str,
        payload: &[u8],
        body: TaskBody,
        cancellable: bool,
    ) -> Result<Value, StoreError> {
        let Some(store) = &self.store else {
            return Ok(self.submit(method, body, cancellable));
        };
        let id = new_id();
        store.add(Record {
            task_id: id.clone(),
            method: method.to_string(),
            payload: payload.to_vec(),
            resumed: 0,
        })?;
        Ok(self.enqueue(id, method, body, cancellable, true))
    }

    /// Queues a task found in the store at start under its recorded id (the director may be
    /// polling it), first counting the resumption in the store. A task already resumed
    /// [`MAX_RESUMES`] times is not run again (it may be what kills the agent): it fails, is
    /// removed from the store, and `get_task` says why.
    pub fn resume(&self, record: &Record, body: TaskBody, cancellable: bool) -> Value {
        let id = record.task_id.clone();
        let Some(store) = &self.store else {
            return self.enqueue(id, &record.method, body, cancellable, false);
        };
        if record.resumed >= MAX_RESUMES {
            let why = format!(
                "{} was interrupted by {} agent restarts; it is not run again",
                record.method,
                record.resumed + 1
            );
            tracing::error!(task = %id, method = %record.method, "{why}");
            self.insert(&id, &record.method, cancellable, State::Failed(why.into()));
            store.remove_logged(&id);
            return json!({"agent_task_id": id, "state": "failed"});
        }
        let again = Record {
            resumed: record.resumed + 1,
            ..record.clone()
        };
        if let Err(e) = store.add(again) {
            // Not counted: a later restart may resume it once more than the bound says.
            tracing::warn!(task = %id, error = %e, "cannot count the resumption");
        }
        tracing::info!(task = %id, method = %record.method, resumed = record.resumed + 1,
            "resuming a task recorded before the last restart");
        self.enqueue(id, &record.method, body, cancellable, true)
    }

    fn insert(&self, id: &str, method: &str, cancellable: bool, state: State) -> CancellationToken {
        let cancel = CancellationToken::new();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.table).insert(
            id.to_string(),
            Entry {
                seq,
                method: method.to_string(),
                state,
                cancel: cancel.clone(),
                cancellable,
            },
        );
        cancel
    }

    fn enqueue(
        &self,
        id: String,
        method: &str,
        body: TaskBody,
        cancellable: bool,
        persisted: bool,
    ) -> Value {
        let cancel = self.insert(&id, method, cancellable, State::Queued);
        let job = Job {
            id: id.clone(),
            body,
            cancel,
            persisted,
        };
        if self.queue.send(job).is_err() {
            // Left in the store: the next start runs it.
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
            if job.persisted
                && let Some(store) = &self.store
            {
                // Upstream too: a task whose record outlives it runs again at the next start,
                // so persistent tasks are idempotent.
                store.remove_logged(&job.id);
            }
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

/// How many times a recorded task is run again after restarts before it is failed instead.
pub const MAX_RESUMES: u32 = 3;

/// `<base>/bosh/tasks.json`, upstream's file of persistent tasks.
pub fn store_path(base: &Path) -> PathBuf {
    base.join("bosh").join("tasks.json")
}

/// One persistent task as upstream records it: `{"TaskID","Method","Payload"}`, the payload
/// being the request's JSON bytes (base64, as Go writes a byte slice). `Resumed` is ours (Go's
/// decoder ignores it): how many restarts have already run the task again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The id the director polls.
    #[serde(rename = "TaskID")]
    pub task_id: String,
    /// The director's method (`update_settings`).
    #[serde(rename = "Method")]
    pub method: String,
    /// The request: `{"method","arguments","protocol"}` as JSON bytes.
    #[serde(rename = "Payload", with = "go_bytes")]
    pub payload: Vec<u8>,
    /// Restarts that ran it again so far.
    #[serde(rename = "Resumed", default)]
    pub resumed: u32,
}

/// Go's JSON for `[]byte`: a base64 string, or `null` for none.
mod go_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(Vec::new()),
            Some(t) => base64::engine::general_purpose::STANDARD
                .decode(t.as_bytes())
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Why the store could not be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading failed (not "missing": a missing file is an empty store).
    #[error("Reading tasks json {path}: {source}")]
    Read {
        /// tasks.json.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not upstream's map of records (truncated, corrupt).
    #[error("Unmarshaling tasks json {path}: {detail}")]
    Corrupt {
        /// tasks.json.
        path: PathBuf,
        /// The decoder's message.
        detail: String,
    },
    /// Writing failed; the previous file is intact.
    #[error("Writing tasks json: {0}")]
    Write(#[from] platform::files::WriteError),
}

/// The persistent-task file: every change rewrites it whole, durably and privately (a
/// payload can hold the mbus's private key), so after a crash or a power loss it holds
/// either the previous set of records or the new one.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    records: Mutex<BTreeMap<String, Record>>,
}

impl Store {
    /// Opens the store at `path` and returns it with the records found there. A missing file
    /// is an empty store. An unreadable or corrupt one is returned as the error beside an
    /// empty store (upstream's fallback: nothing is resumed, the director's polls of those
    /// tasks get "could not be found", and the next persistent task rewrites the file).
    pub fn open(path: PathBuf) -> (Store, Result<Vec<Record>, StoreError>) {
        let found = read_records(&path);
        let records = found.as_ref().map(|m| m.clone()).unwrap_or_default();
        let store = Store {
            path,
            records: Mutex::new(records),
        };
        (store, found.map(|m| m.into_values().collect()))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds (or replaces) a record and rewrites the file; on failure nothing changes.
    pub fn add(&self, r: Record) -> Result<(), StoreError> {
        let mut records = self.lock();
        let mut next = records.clone();
        next.insert(r.task_id.clone(), r);
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    /// Removes a record and rewrites the file; on failure nothing changes.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let mut records = self.lock();
        if !records.contains_key(id) {
            return Ok(());
        }
        let mut next = records.clone();
        next.remove(id);
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    fn remove_logged(&self, id: &str) {
        if let Err(e) = self.remove(id) {
            tracing::error!(task = %id, error = %e,
                "cannot remove a finished task from the store; it runs again at the next start");
        }
    }

    /// The records now held.
    pub fn records(&self) -> Vec<Record> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, records: &BTreeMap<String, Record>) -> Result<(), StoreError> {
        // A map of plain strings and integers always serialises.
        let body = serde_json::to_vec(records).unwrap_or_else(|_| b"{}".to_vec());
        platform::files::write_private(&self.path, &body)?;
        Ok(())
    }
}

fn read_records(path: &Path) -> Result<BTreeMap<String, Record>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    // Go writes `null` for a nil map.
    let map: Option<BTreeMap<String, Record>> =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let map = map.unwrap_or_default();
    for (k, r) in &map {
        if *k != r.task_id {
            return Err(corrupt(format!(
                "record {k:?} holds task id {:?}",
                r.task_id
            )));
        }
    }
    Ok(map)
}

/// The request bytes a persistent task is recorded with (upstream records the raw request;
/// what matters to a resume is the method, the arguments and the protocol).
pub fn payload(method: &str, arguments: &[Value], protocol: i64) -> Vec<u8> {
    json!({"method": method, "arguments": arguments, "protocol": protocol})
        .to_string()
        .into_bytes()
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
    use base64::Engine as _;
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

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("tasks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("bosh")).unwrap();
        Dir(d)
    }

    fn with_store(path: &Path) -> (Tasks, Arc<Store>, Vec<Record>) {
        let (store, found) = Store::open(path.to_path_buf());
        let store = Arc::new(store);
        let (t, w) = Tasks::with_store(Some(store.clone()));
        tokio::spawn(w.run(CancellationToken::new()));
        (t, store, found.unwrap())
    }

    async fn settled(t: &Tasks, id: &str) -> TaskResult {
        for _ in 0..200 {
            let r = t.get(id);
            if !matches!(&r, Ok(v) if v["state"] == "running") {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("task {id} still running");
    }

    #[test]
    fn the_store_reads_upstreams_file_and_writes_the_same_shape() {
        let d = dir("shape");
        let path = store_path(&d.0);
        assert_eq!(path, d.0.join("bosh/tasks.json"));
        // As Go's agent writes it: a map by id, the payload's bytes in base64.
        let req = br#"{"method":"update_settings","arguments":[{}],"reply_to":"d"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(req);
        std::fs::write(
            &path,
            format!(r#"{{"t-1":{{"TaskID":"t-1","Method":"update_settings","Payload":"{b64}"}}}}"#),
        )
        .unwrap();
        let (store, found) = Store::open(path.clone());
        let found = found.unwrap();
        assert_eq!(
            found,
            vec![Record {
                task_id: "t-1".into(),
                method: "update_settings".into(),
                payload: req.to_vec(),
                resumed: 0,
            }]
        );
        store.remove("t-1").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
        store
            .add(Record {
                task_id: "t-2".into(),
                method: "m".into(),
                payload: b"{}".to_vec(),
                resumed: 2,
            })
            .unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"t-2": {"TaskID": "t-2", "Method": "m", "Payload": "e30=", "Resumed": 2}})
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a payload may hold the mbus's private key");
        // Go's nil map, and a nil payload.
        std::fs::write(&path, "null").unwrap();
        assert!(Store::open(path.clone()).1.unwrap().is_empty());
        std::fs::write(&path, r#"{"x":{"TaskID":"x","Method":"m","Payload":null}}"#).unwrap();
        assert_eq!(Store::open(path.clone()).1.unwrap()[0].payload, b"");
        // Missing: empty, no error.
        std::fs::remove_file(&path).unwrap();
        assert!(Store::open(path).1.unwrap().is_empty());
    }

    #[test]
    fn a_truncated_or_corrupt_store_is_an_error_naming_the_file_and_an_empty_store() {
        let d = dir("corrupt");
        let path = store_path(&d.0);
        let whole = r#"{"t-1":{"TaskID":"t-1","Method":"update_settings","Payload":"e30="}}"#;
        let mut cases: Vec<String> = (0..whole.len()).map(|n| whole[..n].to_string()).collect();
        cases.retain(|c| !c.is_empty());
        cases.extend([
            "[1]".to_string(),
            r#"{"t-1":{"TaskID":"t-1","Method":"m","Payload":"not base64!"}}"#.into(),
            r#"{"t-1":{"TaskID":"other","Method":"m","Payload":""}}"#.into(),
            "\u{0}\u{0}\u{0}".into(),
        ]);
        for c in &cases {
            std::fs::write(&path, c).unwrap();
            let (store, found) = Store::open(path.clone());
            let e = found.unwrap_err().to_string();
            assert!(
                e.starts_with("Unmarshaling tasks json ")
                    && e.contains(&path.display().to_string()),
                "{c:?}: {e}"
            );
            assert!(store.records().is_empty(), "{c:?}");
            // The next persistent task replaces the file with a good one.
            store
                .add(Record {
                    task_id: "n".into(),
                    method: "m".into(),
                    payload: vec![],
                    resumed: 0,
                })
                .unwrap();
            assert_eq!(Store::open(path.clone()).1.unwrap().len(), 1);
        }
    }

    #[test]
    fn a_store_that_cannot_be_written_refuses_the_task_and_keeps_the_file() {
        let d = dir("unwritable");
        // The file's "directory" is a regular file: nothing can be created in it.
        std::fs::write(d.0.join("bosh/notadir"), "x").unwrap();
        let (store, _) = Store::open(d.0.join("bosh/notadir/tasks.json"));
        let e = store
            .add(Record {
                task_id: "a".into(),
                method: "m".into(),
                payload: vec![],
                resumed: 0,
            })
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Writing tasks json: "), "{e}");
        assert!(e.contains("notadir"), "{e}");
        assert!(store.records().is_empty(), "a failed write changes nothing");
    }

    #[tokio::test]
    async fn a_persistent_task_is_recorded_until_it_ends() {
        let d = dir("persist");
        let path = store_path(&d.0);
        let (t, store, _) = with_store(&path);
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let r = t
            .submit_persistent(
                "update_settings",
                &payload("update_settings", &[json!({})], 3),
                body(async move {
                    let _ = go_rx.await;
                    Ok(json!("ok"))
                }),
                false,
            )
            .unwrap();
        let id = r["agent_task_id"].as_str().unwrap().to_string();
        assert_eq!(r["state"], "running");
        // Recorded on disk before the answer: a restarted agent finds it.
        let (_, on_disk) = Store::open(path.clone());
        let on_disk = on_disk.unwrap();
        assert_eq!(on_disk.len(), 1);
        assert_eq!(on_disk[0].task_id, id);
        assert_eq!(on_disk[0].method, "update_settings");
        let req: Value = serde_json::from_slice(&on_disk[0].payload).unwrap();
        assert_eq!(
            req,
            json!({"method": "update_settings", "arguments": [{}], "protocol": 3})
        );
        go_tx.send(()).unwrap();
        assert_eq!(settled(&t, &id).await.unwrap(), json!("ok"));
        assert!(store.records().is_empty());
        assert!(Store::open(path.clone()).1.unwrap().is_empty());
        // A failed one is removed too (it ended).
        let id = t
            .submit_persistent("m", b"{}", body(async { Err("no".into()) }), false)
            .unwrap()["agent_task_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(settled(&t, &id).await.is_err());
        assert!(Store::open(path).1.unwrap().is_empty());
        // Ordinary tasks never touch the store.
        let id = t.submit("m", body(async { Ok(json!(1)) }), false)["agent_task_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(settled(&t, &id).await.unwrap(), json!(1));
        assert!(store.records().is_empty());
    }

    #[tokio::test]
    async fn a_resumed_task_keeps_its_id_counts_restarts_and_stops_after_the_bound() {
        let d = dir("resume");
        let path = store_path(&d.0);
        let rec = Record {
            task_id: "keep-me".into(),
            method: "update_settings".into(),
            payload: b"{}".to_vec(),
            resumed: 0,
        };
        // Restart after restart, each killed while the task runs (its body never ends).
        for n in 0..MAX_RESUMES {
            let (s, _) = Store::open(path.clone());
            if n == 0 {
                s.add(rec.clone()).unwrap();
            }
            let (t, _, found) = with_store(&path);
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].resumed, n);
            let r = t.resume(&found[0], body(std::future::pending()), false);
            assert_eq!(r, json!({"agent_task_id": "keep-me", "state": "running"}));
            assert_eq!(
                t.get("keep-me").unwrap(),
                json!({"agent_task_id": "keep-me", "state": "running"})
            );
            assert_eq!(Store::open(path.clone()).1.unwrap()[0].resumed, n + 1);
        }
        let (t, _, found) = with_store(&path);
        assert_eq!(found[0].resumed, MAX_RESUMES);
        let r = t.resume(
            &found[0],
            body(async { panic!("a task past the bound must not run") }),
            false,
        );
        assert_eq!(r["state"], "failed");
        let e = t.get("keep-me").unwrap_err().to_string();
        assert!(
            e.contains("update_settings was interrupted by 4 agent restarts"),
            "{e}"
        );
        assert!(Store::open(path.clone()).1.unwrap().is_empty());

        // A resumed task that finishes answers its value under the old id and leaves the store.
        let (s, _) = Store::open(path.clone());
        s.add(rec.clone()).unwrap();
        let (t, _, found) = with_store(&path);
        t.resume(&found[0], body(async { Ok(json!("ok")) }), false);
        assert_eq!(settled(&t, "keep-me").await.unwrap(), json!("ok"));
        assert!(Store::open(path).1.unwrap().is_empty());
    }

    #[test]
    fn ids_are_uuid_v4_shaped_and_distinct() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
