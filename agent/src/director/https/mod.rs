//! The HTTPS agent API of `bosh create-env`: when the first mbus URL is
//! `https://user:password@host:port`, the agent has no NATS connection and serves the CLI
//! itself, as upstream's HTTPS handler does: `POST /agent` with the director's request JSON,
//! answered through the same dispatcher as NATS requests ([`super::dispatch`]) with the same
//! `{"value":…}` / `{"exception":…}` body; `GET`/`PUT /blobs/<prefix>/<id>` on the agent's local
//! blobstore ([`blobs`]). TLS with the settings' `env.bosh.mbus.cert` (certificate and key),
//! Basic authentication with the URL's credentials ([`auth`]): anything else is 401 with
//! `WWW-Authenticate`.
//!
//! Bounds, so that a client (authenticated or not) cannot hold the agent: at most
//! [`Limits::max_connections`] connections at once (more are closed at once), a TLS handshake
//! and a request head must each arrive within their timeout, a request body is at most
//! [`Limits::max_request_bytes`] (1 MiB, the protocol's limit; 413 beyond) and must arrive within
//! [`Limits::request_body`], and an upload is at most [`Limits::max_blob_bytes`] and may pause
//! for at most [`Limits::body_idle`]. Shutdown: at the lifecycle's stop no connection is
//! accepted, each open one finishes the request it is answering and closes; the connections
//! are tasks of the lifecycle's tracker, so the agent's grace period bounds them.

pub mod auth;
pub mod blobs;
pub mod route;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use platform::firewall::policy::{IngressPolicy, Proto, WorkloadPolicy};

use super::Context;
use super::protocol;
use crate::settings::Settings;
use auth::BasicAuth;
use route::Route;

/// What the API serves on: the URL (address and credentials) and the TLS configuration.
pub struct HttpsPlan {
    /// The first mbus URL.
    pub url: mbus::HttpsUrl,
    tls: Arc<ServerConfig>,
}

impl std::fmt::Debug for HttpsPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsPlan")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Whether the settings make this agent serve the HTTPS API (upstream: the first mbus URL,
/// with its precedence of `update_settings`, `env.bosh.mbus.urls`, `mbus`), and with what.
/// `Ok(None)`: the bus is NATS. `Err` says why the API cannot be served (a malformed first
/// URL, a missing or unusable certificate), naming the field and never a secret.
pub fn plan(
    settings: &Settings,
    update_settings: Option<&Value>,
) -> Result<Option<HttpsPlan>, String> {
    let cfg = match mbus::mbus_config(settings.document(), update_settings) {
        Ok(c) => c,
        // Not an https question: the NATS path reports it.
        Err(_) => return Ok(None),
    };
    let Some(url) = cfg.https else {
        let first_https_refused =
            cfg.servers.is_empty() && !cfg.skipped.is_empty() && !cfg.rejected.is_empty();
        return match (first_https_refused, cfg.rejected.first()) {
            (true, Some(e)) => Err(format!("the agent API cannot be served: {e}")),
            _ => Ok(None),
        };
    };
    let tls = mbus::server_config(&cfg.cert)
        .map_err(|e| format!("the agent API cannot be served on {url}: {e}"))?;
    Ok(Some(HttpsPlan {
        url,
        tls: Arc::new(tls),
    }))
}

/// Whether the firewall's ingress allow-list (when configured) leaves no entry that admits
/// tcp/`port`, from any source: then the operator's CLI could not reach the API. The agent adds
/// no rule of its own for the port (see README, "The HTTPS agent API"), so it says so loudly.
pub fn ingress_cuts_api(workload: &WorkloadPolicy, port: u16) -> bool {
    match &workload.ingress {
        IngressPolicy::Disabled => false,
        IngressPolicy::Enabled(i) => !i.sets.mentions(Proto::Tcp, port),
    }
}

/// Logs, as an error, what [`ingress_cuts_api`] finds, with the entry that would fix it.
/// Called at start and after every firewall reload.
pub fn report_ingress_cut(workload: &WorkloadPolicy, port: u16) {
    if ingress_cuts_api(workload, port) {
        tracing::error!(
            port,
            "the ingress allow-list (Platform.Linux.Firewall.IngressAllow) admits no tcp/{port}: bosh create-env cannot reach the agent API; add {{\"Protocol\": \"tcp\", \"Ports\": \"{port}\"}}"
        );
    }
}

/// The API's bounds (see the module documentation).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// From the TCP accept to the end of the TLS handshake.
    pub handshake: Duration,
    /// From the connection (or the previous response) to the end of a request's head.
    pub header_read: Duration,
    /// The largest `POST /agent` body.
    pub max_request_bytes: usize,
    /// The time a `POST /agent` body may take.
    pub request_body: Duration,
    /// The largest blob uploaded.
    pub max_blob_bytes: u64,
    /// The longest pause within an upload.
    pub body_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(30),
            max_request_bytes: protocol::REQUEST_MAX_LEN,
            request_body: Duration::from_secs(30),
            max_blob_bytes: 16 << 30,
            body_idle: Duration::from_secs(60),
        }
    }
}

/// The directory of the local blobstore the API serves: `<base>/data/blobs`.
pub fn blobs_dir(base_dir: &Path) -> PathBuf {
    base_dir.join("data").join("blobs")
}

/// What every connection shares.
struct Shared {
    ctx: Arc<Context>,
    auth: BasicAuth,
    blobs: PathBuf,
    limits: Limits,
}

/// Binds the plan's address (retried with backoff, logged, while the port is taken), then
/// serves until `stop`. Connections run as tasks of `tracker`.
pub async fn serve(
    plan: HttpsPlan,
    ctx: Arc<Context>,
    limits: Limits,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let Some(listener) = bind_with_retry(&plan.url, &stop).await else {
        return;
    };
    let blobs = blobs_dir(&ctx.base_dir);
    let stale = platform::files::remove_stale_temporaries(&blobs);
    if stale > 0 {
        info!(removed = stale, dir = %blobs.display(), "removed uploads a previous run left unfinished");
    }
    let local = listener
        .local_addr()
        .map_or_else(|_| plan.url.authority(), |a| a.to_string());
    info!(url = %plan.url, listening = %local, blobs = %blobs.display(), "serving the agent API (create-env): no NATS, heartbeats and alerts are not sent");
    let acceptor = TlsAcceptor::from(plan.tls);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let shared = Arc::new(Shared {
        ctx,
        auth: BasicAuth::new(&plan.url.user, &plan.url.password),
        blobs,
        limits,
    });
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, typically: wait a little rather than spin.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(%peer, max = shared.limits.max_connections, "too many connections to the agent API: closing this one");
            continue;
        };
        let (shared, acceptor, stop) = (shared.clone(), acceptor.clone(), stop.clone());
        tracker.spawn(
            async move {
                connection(tcp, acceptor, shared, stop).await;
                drop(permit);
            }
            .instrument(info_span!("https", %peer)),
        );
    }
    info!("the agent API stopped accepting connections");
}

async fn bind_with_retry(url: &mbus::HttpsUrl, stop: &CancellationToken) -> Option<TcpListener> {
    let mut wait = Duration::from_millis(250);
    loop {
        match TcpListener::bind(url.authority()).await {
            Ok(l) => return Some(l),
            Err(e) => {
                error!(error = %e, url = %url, retry_in = ?wait, "cannot listen for the agent API")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let tls = match tokio::time::timeout(shared.limits.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            info!(limit = ?shared.limits.handshake, "TLS handshake timed out");
            return;
        }
    };
    let header_read = shared.limits.header_read;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        debug!(error = %e, "connection ended with an error");
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn respond(status: StatusCode, body: Body, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut m = msg.into();
    if !m.is_empty() {
        m.push('\n');
    }
    respond(status, full(m), "text/plain; charset=utf-8")
}

/// One request: authenticate, route, answer.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let (method, path) = (&parts.method, parts.uri.path());
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if !shared.auth.allows(authorization) {
        warn!(%method, %path, "refused: wrong or missing credentials");
        let mut r = text(StatusCode::UNAUTHORIZED, "");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(auth::CHALLENGE),
        );
        return unread(body, r).await;
    }
    let length = content_length(&parts.headers);
    let resp = match route::route(method, path) {
        Route::Agent => agent(shared, body, length).await,
        Route::GetBlob(id) => unread(body, get_blob(shared, id).await).await,
        Route::PutBlob(id) => put_blob(shared, id, body, length).await,
        Route::BadBlob(e) => {
            info!(%method, %path, error = %e, "refused blob path");
            unread(body, text(StatusCode::BAD_REQUEST, e.to_string())).await
        }
        Route::NotFound => unread(body, text(StatusCode::NOT_FOUND, "")).await,
    };
    debug!(%method, %path, status = resp.status().as_u16(), "answered");
    resp
}

/// The most of a body the agent does not use that it reads (and drops) so that the
/// connection can serve the client's next request.
const UNREAD_MAX: usize = 64 * 1024;

/// `resp` for a request whose body is not used: a small body is read and dropped (within a
/// second) so that the connection stays usable; otherwise the connection is closed after the
/// answer, and the client's next request opens a new one.
async fn unread(body: Incoming, mut resp: Response<Body>) -> Response<Body> {
    let mut body = Limited::new(body, UNREAD_MAX);
    let drained = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match body.frame().await {
                None => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
            }
        }
    })
    .await;
    if drained != Ok(true) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The declared body length, when the client sent one.
fn content_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// 413 for a body over `limit`. What the client already sent (up to a few times the limit)
/// is read and dropped first, so that it reads the answer instead of a reset connection; the
/// connection is closed after it.
async fn too_large(body: Incoming, limit: u64, within: Duration) -> Response<Body> {
    let mut body = Limited::new(
        body,
        usize::try_from(limit.saturating_mul(4)).unwrap_or(usize::MAX),
    );
    let _ = tokio::time::timeout(within, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    let mut r = text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body exceeds {limit} bytes"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// `POST /agent`: the director's request, answered as on NATS. No `reply_to` is needed (the
/// answer is the HTTP response), and the answer is not cut to NATS's 1 MiB (upstream sends it
/// whole over HTTPS).
async fn agent(shared: &Shared, body: Incoming, length: Option<u64>) -> Response<Body> {
    let limit = shared.limits.max_request_bytes;
    if length.is_some_and(|n| n > limit as u64) {
        return too_large(body, limit as u64, shared.limits.request_body).await;
    }
    let body = Limited::new(body, limit);
    let bytes = match tokio::time::timeout(shared.limits.request_body, body.collect()).await {
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {:?}",
                    shared.limits.request_body
                ),
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let mut r = text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {limit} bytes"),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        Ok(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("reading the request: {e}")),
        Ok(Ok(c)) => c.to_bytes(),
    };
    let request: protocol::Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            info!(error = %e, "refused a request that is not the director's JSON");
            return text(
                StatusCode::BAD_REQUEST,
                format!("request is not valid JSON: {e}"),
            );
        }
    };
    let method = request.method.clone();
    let response = super::dispatch(&shared.ctx, &request)
        .instrument(info_span!("request", %method))
        .await;
    let encoded = protocol::encode_limited(&response, usize::MAX);
    respond(StatusCode::OK, full(encoded), "application/json")
}

/// `GET /blobs/…/<id>`: 200 with the blob, 404 when there is none.
async fn get_blob(shared: &Shared, id: &str) -> Response<Body> {
    match blobs::open(&shared.blobs, id).await {
        Ok(Some(file)) => {
            let len = file.len();
            let mut r = respond(StatusCode::OK, file.boxed(), "application/octet-stream");
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            info!(%id, bytes = len, "blob sent");
            r
        }
        Ok(None) => text(StatusCode::NOT_FOUND, format!("blob {id} not found")),
        Err(e) => {
            error!(%id, error = %e, "cannot read a blob");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading blob {id}: {e}"),
            )
        }
    }
}

/// `PUT /blobs/…/<id>`: 201 once the whole blob is stored (upstream's status).
async fn put_blob(
    shared: &Shared,
    id: &str,
    body: Incoming,
    length: Option<u64>,
) -> Response<Body> {
    let limit = shared.limits.max_blob_bytes;
    if length.is_some_and(|n| n > limit) {
        let mut r = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("blob {id} is larger than {limit} bytes"),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    match blobs::put(&shared.blobs, id, body, limit, shared.limits.body_idle).await {
        Ok(size) => {
            info!(%id, bytes = size, "blob stored");
            text(StatusCode::CREATED, "")
        }
        Err(e @ blobs::PutError::TooLarge { .. }) => {
            warn!(error = %e, "blob refused");
            let mut r = text(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        Err(e @ (blobs::PutError::Idle { .. } | blobs::PutError::Body { .. })) => {
            warn!(error = %e, "blob upload broke off; nothing stored");
            text(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e @ blobs::PutError::Write { .. }) => {
            error!(error = %e, "blob not stored");
            text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use platform::firewall::Identity;
    use platform::firewall::policy_config::PolicyConfig;

    fn workload(json: &str) -> WorkloadPolicy {
        let cfg: PolicyConfig = serde_json::from_str(json).unwrap();
        cfg.build(
            &mut |_| Err("no cgroups here".into()),
            Identity::Uid {
                uid: 0,
                reason: "test".into(),
            },
        )
        .unwrap()
    }

    #[test]
    fn an_allow_list_without_the_api_port_cuts_the_cli_off() {
        assert!(!ingress_cuts_api(&workload("{}"), 6868));
        assert!(ingress_cuts_api(&workload(r#"{"IngressAllow": []}"#), 6868));
        let ssh_only = r#"{"IngressAllow": [{"Protocol": "tcp", "Ports": "22"}]}"#;
        assert!(ingress_cuts_api(&workload(ssh_only), 6868));
        let udp = r#"{"IngressAllow": [{"Protocol": "udp", "Ports": "6868"}]}"#;
        assert!(ingress_cuts_api(&workload(udp), 6868));
        let range = r#"{"IngressAllow": [{"Protocol": "tcp", "Ports": "6000-7000"}]}"#;
        assert!(!ingress_cuts_api(&workload(range), 6868));
        let from =
            r#"{"IngressAllow": [{"Protocol": "tcp", "Ports": 6868, "Sources": ["10.0.0.0/8"]}]}"#;
        assert!(!ingress_cuts_api(&workload(from), 6868));
    }

    fn settings(doc: serde_json::Value) -> Settings {
        Settings::parse(&doc).unwrap()
    }

    #[test]
    fn the_plan_follows_the_first_mbus_url_and_names_what_is_missing() {
        assert!(
            plan(
                &settings(serde_json::json!({"agent_id": "a", "mbus": "nats://h:4222"})),
                None
            )
            .unwrap()
            .is_none()
        );
        // https first, no certificate: refused, naming the field, not the password.
        let e = plan(
            &settings(
                serde_json::json!({"agent_id": "a", "mbus": "https://m:hunter2@0.0.0.0:6868"}),
            ),
            None,
        )
        .unwrap_err();
        assert!(e.contains("env.bosh.mbus.cert.certificate is empty"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        // https first without credentials: refused.
        let e = plan(
            &settings(serde_json::json!({"agent_id": "a", "mbus": "https://0.0.0.0:6868"})),
            None,
        )
        .unwrap_err();
        assert!(e.contains("user:password@"), "{e}");
    }
}
