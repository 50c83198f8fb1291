//! Which mbus configuration the bus should use, and falling back when it does not connect.
//!
//! The director may send a new certificate (or new URLs) before NATS accepts it, and an
//! unreachable mbus in `update_settings` must not lock the agent out after a restart. So the
//! agent keeps two things: the newest `update_settings` (what the director wants) and the mbus
//! that last brought it onto the bus (`mbus_last_connected.json`). At start it tries the
//! newest; when the bus is not connected within [`fallback_after`], it switches to the next
//! candidate, and keeps rotating through them for as long as none connects. Whenever the bus
//! connects on a configuration from an update, that update's mbus is recorded as the last one
//! that connected.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbus::{Bus, ConnectionState, MbusConfig};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::director::actions::update_settings::{last_connected_path, save};

/// One configuration the bus may use: the document it came from (`{"mbus": …}`, or `None`
/// for the settings alone) and the configuration built from it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Where it came from, for logs.
    pub origin: &'static str,
    /// The `update_settings`-shaped document, if any.
    pub doc: Option<Value>,
    /// The configuration [`Bus::connect`] / [`Bus::reconfigure`] takes.
    pub cfg: MbusConfig,
}

/// How long the bus may stay unconnected on one candidate before the next is tried: 20 s,
/// or `BOSH_AGENT_MBUS_FALLBACK_SECONDS` (1–3600).
pub fn fallback_after() -> Duration {
    let secs = std::env::var("BOSH_AGENT_MBUS_FALLBACK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// The candidates, the one in use, and what was last recorded. Shared by the start-up code,
/// the supervisor and the `update_settings` action.
#[derive(Debug)]
pub struct Candidates {
    inner: Mutex<State>,
    last_connected: PathBuf,
    settings: Value,
    /// Wakes [`supervise`] when [`Candidates::prefer`] changes the list.
    changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct State {
    list: Vec<Candidate>,
    active: usize,
    recorded: Option<Value>,
}

impl Candidates {
    /// `list[0]` is the one the bus starts with. `list` must not be empty.
    pub fn new(base: &Path, settings: &Value, list: Vec<Candidate>) -> Arc<Self> {
        let recorded = std::fs::read(last_connected_path(base))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        Arc::new(Candidates {
            inner: Mutex::new(State {
                list,
                active: 0,
                recorded,
            }),
            last_connected: last_connected_path(base),
            settings: settings.clone(),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The director's newest configuration becomes the one in use; the one that last
    /// connected stays behind it as the fallback.
    pub fn prefer(&self, newest: Candidate) {
        let mut s = self.lock();
        let mut list = vec![newest];
        let fallback = match &s.recorded {
            Some(doc) => candidate(&self.settings, Some(doc), "mbus_last_connected.json"),
            // Without a recorded update, the settings alone stay a fallback.
            None => candidate(&self.settings, None, "settings"),
        };
        match fallback {
            Ok(c) if c.cfg != list[0].cfg => list.push(c),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "no fallback mbus configuration"),
        }
        s.list = list;
        s.active = 0;
        drop(s);
        self.changed.notify_one();
    }

    /// Whether the candidate in use is recorded already (or has nothing to record).
    fn settled(&self) -> bool {
        let s = self.lock();
        match s.list.get(s.active).and_then(|c| c.doc.as_ref()) {
            Some(doc) => s.recorded.as_ref() == Some(doc),
            None => true,
        }
    }

    /// Records the active candidate as the last that connected (when it came from an update
    /// and differs from what is recorded).
    fn record_active(&self) {
        let mut s = self.lock();
        let Some(doc) = s.list.get(s.active).and_then(|c| c.doc.clone()) else {
            return;
        };
        if s.recorded.as_ref() == Some(&doc) {
            return;
        }
        match save(&self.last_connected, &doc) {
            Ok(()) => {
                info!(path = %self.last_connected.display(), "recorded the mbus that connected");
                s.recorded = Some(doc);
            }
            Err(e) => warn!(error = %e, "cannot record the mbus that connected"),
        }
    }

    /// Moves to the next candidate; `None` when there is only one.
    fn rotate(&self) -> Option<Candidate> {
        let mut s = self.lock();
        if s.list.len() < 2 {
            return None;
        }
        s.active = (s.active + 1) % s.list.len();
        s.list.get(s.active).cloned()
    }
}

/// Builds the candidate from an `update_settings`-shaped document.
pub fn candidate(
    settings: &Value,
    doc: Option<&Value>,
    origin: &'static str,
) -> Result<Candidate, String> {
    let cfg = usable(mbus::mbus_config(settings, doc))?;
    Ok(Candidate {
        origin,
        doc: doc.map(|d| json!({ "mbus": d.get("mbus").cloned().unwrap_or(Value::Null) })),
        cfg,
    })
}

/// Watches the bus: records the configuration that connects, and rotates to the next
/// candidate when the bus stays unconnected for `after`. Runs until the bus stops (the
/// lifecycle stops the bus last).
pub async fn supervise(bus: Bus, candidates: Arc<Candidates>, after: Duration) {
    let stats = bus.stats();
    let mut state_rx = bus.watch_state();
    let mut switches = stats.switches();
    let mut was_connected = false;
    let mut since = Instant::now();
    loop {
        let state = bus.state();
        if state == ConnectionState::Stopped {
            return;
        }
        let connected = matches!(state, ConnectionState::Connected { .. });
        let sw = stats.switches();
        // A fresh connection uses the configuration in force; a completed switch too.
        if connected && (!was_connected || sw != switches) {
            candidates.record_active();
        }
        switches = sw;
        was_connected = connected;
        if connected {
            since = Instant::now();
            if candidates.settled() {
                // Connected on a recorded configuration: nothing to watch until the state
                // or the candidates change, so an idle agent spends no wake-ups here.
                tokio::select! {
                    r = state_rx.changed() => if r.is_err() { return },
                    () = candidates.changed.notified() => {}
                }
                continue;
            }
        } else if since.elapsed() >= after {
            since = Instant::now();
            if let Some(next) = candidates.rotate() {
                warn!(
                    origin = next.origin,
                    after_secs = after.as_secs(),
                    "the bus did not connect; trying the other mbus configuration"
                );
                if let Err(e) = bus.reconfigure(&next.cfg) {
                    warn!(error = %e, "cannot switch to the fallback mbus");
                }
            }
        }
        // Not connected, or a switch to an unrecorded configuration in progress (a switch
        // to the same server with a new certificate changes no state): look again shortly.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The checks `Bus::connect` makes (a dialable URL, usable certificate material), applied to
/// a configuration before it is preferred.
pub fn usable(cfg: Result<MbusConfig, mbus::SettingsError>) -> Result<MbusConfig, String> {
    let cfg = cfg.map_err(|e| e.to_string())?;
    if cfg.servers.is_empty() {
        let rejected: Vec<String> = cfg.rejected.iter().map(ToString::to_string).collect();
        return Err(if rejected.is_empty() {
            "no dialable mbus URL".into()
        } else {
            format!("no dialable mbus URL (rejected: {})", rejected.join("; "))
        });
    }
    mbus::tls::client_config(&cfg.cert).map_err(|e| e.to_string())?;
    Ok(cfg)
}
