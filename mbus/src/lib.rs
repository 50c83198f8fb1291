//! NATS message bus for the agent: settings, mutual TLS with upstream's CN rule, fresh name
//! resolution and the before-connect (firewall) hook before every attempt, reconnects and
//! failover.
//!
//! Wiring, in the agent:
//! ```no_run
//! # async fn demo(settings: serde_json::Value) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let config = mbus::mbus_config(&settings, None)?;
//! let (bus, mut requests) = mbus::Bus::connect(&config, Arc::new(mbus::NoHook), mbus::BusOptions::default())?;
//! while let Some(request) = requests.next().await {
//!     // decode request.payload, act, then reply to its `reply_to`:
//!     bus.publish("director.abc", bytes::Bytes::from_static(b"{\"value\":\"ok\"}")).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Guarantees: the agent only dials addresses it has just handed to the hook
//! ([`ConnectPlan::endpoints`]); no second resolution happens anywhere. Credentials never
//! appear in errors, logs or `Debug` output.
#![forbid(unsafe_code)]

mod backoff;
mod client;
mod hook;
mod order;
mod resolve;
mod session;
mod settings;
mod status;
pub mod tls;
mod urls;

pub use backoff::{BackoffPolicy, ReturnHome};
pub use client::{
    Bus, BusOptions, ConnectError, MAX_AGENT_ID_LEN, MAX_CONTROL_LINE, MAX_SUBJECT_LEN,
    PublishError, Requests, Target, Topic, check_subject_len, subject_for,
};
pub use hook::{BeforeConnect, ConnectPlan, HookError, HookFuture, NoHook};
pub use order::dial_order;
pub use resolve::{Candidate, FailedHost, FreshResolver, Resolution, ResolverSource, hosts_lookup};
pub use session::IncomingMessage;
pub use settings::{MbusConfig, SettingsError, mbus_config};
pub use status::{BusStats, BusStatsSnapshot, ConnectionState};
pub use tls::{CN_PATTERN, CertKeyPair, TlsError, cn_matches, server_config};
pub use urls::{
    Credentials, DEFAULT_PORT, Host, HttpsUrl, MbusUrl, Scheme, ServerUrl, UrlError,
    parse_https_url, parse_mbus_url, redact,
};
