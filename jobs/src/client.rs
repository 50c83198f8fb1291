//! The monit HTTP API client: Basic auth from `<base>/monit/monit.user`, upstream's retry policy,
//! status, and `POST /<service>` actions.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::http::{self, HttpError, Request, Response};
use crate::status::{MonitStatus, StatusParseError, parse_status};

/// Where monit's HTTP API listens on a BOSH VM (upstream's `monitHost`).
pub const DEFAULT_ENDPOINT: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2822));

/// The user name upstream writes into `monit.user`.
pub const MONIT_USER: &str = "vcap";

/// Monit 5.2x+ rejects a `POST` unless a `securitytoken` form field equals the `securitytoken`
/// cookie (a double-submit CSRF check; it keeps no server-side state). We send both; monit
/// versions without the check ignore them.
const CSRF_TOKEN: &str = "bosh-agent";

/// Go's `http.Client` gives up after this many redirects.
const MAX_REDIRECTS: usize = 10;

/// `<base>/monit/monit.user`.
pub fn monit_user_path(base_dir: &Path) -> PathBuf {
    base_dir.join("monit").join("monit.user")
}

/// How often a request is tried, as upstream's retry strategies do.
///
/// Each failed attempt (transport error or non-2xx response) counts as *unavailable* while it is
/// a 503 or a timeout ("request canceled") and fewer than `max_unavailable_attempts` of those
/// were seen; any other failure, and every failure after it, counts as *other*. Attempts stop at
/// the first 2xx, or when both budgets are spent. `delay` separates attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Budget for 503/timeout answers before the first other failure.
    pub max_unavailable_attempts: u32,
    /// Budget for other failures.
    pub max_other_attempts: u32,
    /// Pause between attempts.
    pub delay: Duration,
}

impl RetryPolicy {
    /// Upstream's short client (status, start): 20 attempts, 1 s apart.
    pub const fn short() -> Self {
        Self {
            max_unavailable_attempts: 0,
            max_other_attempts: 20,
            delay: Duration::from_secs(1),
        }
    }

    /// Upstream's long client (stop, unmonitor): up to 300 attempts while monit answers 503 or
    /// times out, then 20 for other errors, 1 s apart.
    pub const fn long() -> Self {
        Self {
            max_unavailable_attempts: 300,
            max_other_attempts: 20,
            delay: Duration::from_secs(1),
        }
    }

    /// A single attempt, no retry.
    pub const fn once() -> Self {
        Self {
            max_unavailable_attempts: 0,
            max_other_attempts: 1,
            delay: Duration::ZERO,
        }
    }
}

/// Everything about how [`MonitClient`] reaches monit, except the credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Monit's HTTP address; [`DEFAULT_ENDPOINT`] in production.
    pub endpoint: SocketAddr,
    /// Policy for status and start.
    pub short_retry: RetryPolicy,
    /// Policy for stop and unmonitor.
    pub long_retry: RetryPolicy,
    /// Limit for one attempt (connect, send, read the whole response).
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT,
            short_retry: RetryPolicy::short(),
            long_retry: RetryPolicy::long(),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// A monit user and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why talking to monit (or preparing to) failed. Messages follow upstream's wording.
#[derive(Debug, thiserror::Error)]
pub enum MonitError {
    /// The user file could not be read.
    #[error("Getting monit credentials: reading {path}: {source}")]
    UserFileRead {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The user file is not `user:password`.
    #[error("Malformated monit user file {path}, expecting username and password separated by ':'")]
    MalformedUserFile {
        /// The file.
        path: PathBuf,
    },
    /// The user file could not be written.
    #[error("Setting up monit user: writing {path}: {source}")]
    UserFileWrite {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// No response at all (after retries).
    #[error("{context}: {source}")]
    Transport {
        /// What was being done (`Sending stop request for service 'nats'`).
        context: String,
        /// The last attempt's failure.
        source: HttpError,
    },
    /// Monit answered, but not `200` (after retries).
    #[error("{context}: Request failed with {status}: {body}")]
    RequestFailed {
        /// What was being done (`Starting Monit service nats`).
        context: String,
        /// The numeric status.
        code: u16,
        /// Status code and reason phrase.
        status: String,
        /// The response body.
        body: String,
    },
    /// The status document could not be read.
    #[error("Getting monit status: {0}")]
    Status(#[from] StatusParseError),
}

/// Reads `user:password` from the monit user file, split on the first `:`.
pub async fn read_monit_user(base_dir: &Path) -> Result<Credentials, MonitError> {
    let path = monit_user_path(base_dir);
    let text =
        tokio::fs::read_to_string(&path)
            .await
            .map_err(|source| MonitError::UserFileRead {
                path: path.clone(),
                source,
            })?;
    parse_monit_user(&path, &text)
}

/// Parses the content of a monit user file (`path` only names it in the error): the first line,
/// split on the first `:` into user and password. An empty user or a missing `:` is malformed.
pub fn parse_monit_user(path: &Path, text: &str) -> Result<Credentials, MonitError> {
    let line = text.lines().next().unwrap_or_default();
    match line.split_once(':') {
        Some((user, password)) if !user.is_empty() => Ok(Credentials {
            user: user.to_string(),
            password: password.to_string(),
        }),
        _ => Err(MonitError::MalformedUserFile {
            path: path.to_path_buf(),
        }),
    }
}

/// Makes sure `<base>/monit/monit.user` holds `vcap:<password>` with mode 0600 and returns it.
///
/// Upstream writes the literal `vcap:random-password`; we write 32 random hex digits instead.
/// A well-formed existing file is kept (and its mode fixed), because a running monit only reads
/// the file when it starts or reloads: rotating it on every agent restart would lock the agent
/// out of a monit that outlived it.
pub async fn setup_monit_user(base_dir: &Path) -> Result<Credentials, MonitError> {
    let path = monit_user_path(base_dir);
    let write_err = |source| MonitError::UserFileWrite {
        path: path.clone(),
        source,
    };
    if let Ok(text) = tokio::fs::read_to_string(&path).await
        && let Ok(credentials) = parse_monit_user(&path, &text)
        && !credentials.password.is_empty()
    {
        tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .await
            .map_err(write_err)?;
        return Ok(credentials);
    }
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(write_err)?;
    }
    let credentials = Credentials {
        user: MONIT_USER.to_string(),
        password: crate::random::hex_token(16).map_err(write_err)?,
    };
    let tmp = path.with_extension("user.tmp");
    let _ = tokio::fs::remove_file(&tmp).await;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .map_err(write_err)?;
    file.write_all(format!("{}:{}", credentials.user, credentials.password).as_bytes())
        .await
        .map_err(write_err)?;
    file.sync_all().await.map_err(write_err)?;
    drop(file);
    tokio::fs::rename(&tmp, &path).await.map_err(write_err)?;
    Ok(credentials)
}

/// A client for monit's HTTP API. Cheap to clone; holds no connection (every request opens one).
/// Its `Debug` output never shows the password.
#[derive(Clone)]
pub struct MonitClient {
    options: ClientOptions,
    credentials: Credentials,
    authorization: String,
}

impl std::fmt::Debug for MonitClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitClient")
            .field("options", &self.options)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

enum Attempt {
    Ok(Response),
    Failed(Response),
    Error(HttpError),
}

impl MonitClient {
    /// A client with these credentials.
    pub fn new(options: ClientOptions, credentials: Credentials) -> Self {
        let authorization = format!(
            "Basic {}",
            http::base64(format!("{}:{}", credentials.user, credentials.password).as_bytes())
        );
        Self {
            options,
            credentials,
            authorization,
        }
    }

    /// A client whose credentials come from `<base>/monit/monit.user`.
    pub async fn from_base_dir(
        base_dir: &Path,
        options: ClientOptions,
    ) -> Result<Self, MonitError> {
        Ok(Self::new(options, read_monit_user(base_dir).await?))
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The user name in use (the password is not exposed).
    pub fn user(&self) -> &str {
        &self.credentials.user
    }

    /// `GET /_status2?format=xml`, parsed. Short retry policy; only `200` is success.
    pub async fn status(&self) -> Result<MonitStatus, MonitError> {
        let response = self
            .request(
                self.options.short_retry,
                "GET",
                "/_status2?format=xml",
                "",
                "Sending status request to monit",
                "Getting monit status",
            )
            .await?;
        Ok(parse_status(&response.body)?)
    }

    /// The names of the services in `group` (empty when the group does not exist).
    pub async fn services_in_group(&self, group: &str) -> Result<Vec<String>, MonitError> {
        Ok(self.status().await?.group_members(group))
    }

    /// `POST /<service>` with `action=start`. Short retry policy.
    pub async fn start_service(&self, service: &str) -> Result<(), MonitError> {
        self.action(
            self.options.short_retry,
            service,
            "start",
            "Sending start request to monit".to_string(),
            format!("Starting Monit service {service}"),
        )
        .await
    }

    /// `POST /<service>` with `action=stop`. Long retry policy.
    pub async fn stop_service(&self, service: &str) -> Result<(), MonitError> {
        self.action(
            self.options.long_retry,
            service,
            "stop",
            format!("Sending stop request for service '{service}'"),
            format!("Stopping Monit service '{service}'"),
        )
        .await
    }

    /// `POST /<service>` with `action=unmonitor`. Long retry policy.
    pub async fn unmonitor_service(&self, service: &str) -> Result<(), MonitError> {
        self.action(
            self.options.long_retry,
            service,
            "unmonitor",
            "Sending unmonitor request to monit".to_string(),
            format!("Unmonitoring Monit service {service}"),
        )
        .await
    }

    async fn action(
        &self,
        policy: RetryPolicy,
        service: &str,
        action: &str,
        send_context: String,
        fail_context: String,
    ) -> Result<(), MonitError> {
        let target = format!("/{}", encode_path(service));
        let body = format!("action={action}&securitytoken={CSRF_TOKEN}");
        self.request(policy, "POST", &target, &body, &send_context, &fail_context)
            .await
            .map(drop)
    }

    /// Tries a request under `policy`; success is a final `200`.
    async fn request(
        &self,
        policy: RetryPolicy,
        method: &str,
        target: &str,
        body: &str,
        send_context: &str,
        fail_context: &str,
    ) -> Result<Response, MonitError> {
        let mut unavailable = 0u32;
        let mut other = 0u32;
        loop {
            let attempt = self.follow_redirects(method, target, body).await;
            let retry_as_unavailable = match &attempt {
                Attempt::Ok(_) => false,
                Attempt::Failed(r) => r.status == 503,
                Attempt::Error(e) => matches!(e, HttpError::Timeout { .. }),
            };
            let last = match attempt {
                Attempt::Ok(response) if response.status == 200 => return Ok(response),
                // Upstream stops retrying at any 2xx, then accepts only 200.
                Attempt::Ok(response) => return Err(failed(fail_context, response)),
                other_outcome => other_outcome,
            };
            if retry_as_unavailable && unavailable < policy.max_unavailable_attempts {
                unavailable += 1;
            } else {
                unavailable = policy.max_unavailable_attempts.saturating_add(1);
                other += 1;
            }
            let more =
                unavailable < policy.max_unavailable_attempts || other < policy.max_other_attempts;
            if !more {
                return Err(match last {
                    Attempt::Failed(response) | Attempt::Ok(response) => {
                        failed(fail_context, response)
                    }
                    Attempt::Error(source) => MonitError::Transport {
                        context: send_context.to_string(),
                        source,
                    },
                });
            }
            tracing::debug!(
                target: "jobs::monit",
                method,
                target_path = target,
                attempt = unavailable.min(policy.max_unavailable_attempts) + other,
                "monit request failed; retrying"
            );
            tokio::time::sleep(policy.delay).await;
        }
    }

    /// One attempt, following same-host redirects as Go's client does (monit ≥ 5.2x answers a
    /// successful action with `302` to the service page).
    async fn follow_redirects(&self, method: &str, target: &str, body: &str) -> Attempt {
        let mut method = method.to_string();
        let mut target = target.to_string();
        let mut body = body.to_string();
        let cookie = format!("securitytoken={CSRF_TOKEN}");
        for _ in 0..=MAX_REDIRECTS {
            let headers = [
                ("Authorization", self.authorization.as_str()),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Cookie", cookie.as_str()),
            ];
            let request = Request {
                method: &method,
                target: &target,
                headers: &headers,
                body: body.as_bytes(),
            };
            let response = match http::send(
                self.options.endpoint,
                &request,
                self.options.request_timeout,
            )
            .await
            {
                Ok(response) => response,
                Err(e) => return Attempt::Error(e),
            };
            let next = match response.status {
                301..=303 | 307 | 308 => response
                    .header("location")
                    .and_then(|l| resolve_location(self.options.endpoint, &target, l)),
                _ => None,
            };
            let Some(next) = next else {
                return if (200..300).contains(&response.status) {
                    Attempt::Ok(response)
                } else {
                    Attempt::Failed(response)
                };
            };
            if matches!(response.status, 301..=303) {
                method = "GET".to_string();
                body.clear();
            }
            target = next;
        }
        Attempt::Error(HttpError::Malformed {
            endpoint: self.options.endpoint,
            reason: format!("stopped after {MAX_REDIRECTS} redirects"),
        })
    }
}

fn failed(context: &str, response: Response) -> MonitError {
    MonitError::RequestFailed {
        context: context.to_string(),
        code: response.status,
        status: response.status_text.clone(),
        body: response.body_text(),
    }
}

/// The path to request next for a `Location` header, if it stays on `endpoint`.
fn resolve_location(endpoint: SocketAddr, current: &str, location: &str) -> Option<String> {
    let location = location.trim();
    if let Some(rest) = location.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let same = authority == endpoint.to_string()
            || (endpoint.ip().is_loopback()
                && authority == format!("localhost:{}", endpoint.port()));
        return same.then(|| path.to_string());
    }
    if location.contains("://") || location.starts_with("//") || location.is_empty() {
        return None;
    }
    if location.starts_with('/') {
        return Some(location.to_string());
    }
    let path = current.split('?').next().unwrap_or("/");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!(
        "{}{}",
        if dir.is_empty() { "/" } else { dir },
        location
    ))
}

/// Percent-encodes a service name for the request path, keeping RFC 3986 unreserved bytes.
fn encode_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn user_file_is_split_on_the_first_colon() {
        let p = Path::new("/x/monit.user");
        let c = parse_monit_user(p, "vcap:random-password").unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_str()),
            ("vcap", "random-password")
        );
        let c = parse_monit_user(p, "vcap:pa:ss\n").unwrap();
        assert_eq!(c.password, "pa:ss");
        let c = parse_monit_user(p, "vcap:\r\n").unwrap();
        assert_eq!(c.password, "");
        let c = parse_monit_user(p, "vcap:first\nother:second\n").unwrap();
        assert_eq!(c.password, "first");
        for bad in ["", "vcap", ":password", "\n", "vcap\n:x", "\nvcap:x"] {
            let err = parse_monit_user(p, bad).unwrap_err().to_string();
            assert!(
                err.starts_with("Malformated monit user file /x/monit.user"),
                "{bad:?}: {err}"
            );
        }
        let secret = parse_monit_user(p, "vcap:pa:ss").unwrap();
        assert!(!format!("{secret:?}").contains("pa:ss"));
        let client = MonitClient::new(ClientOptions::default(), secret);
        let shown = format!("{client:?}");
        assert!(!shown.contains("pa:ss") && !shown.contains(&http::base64(b"vcap:pa:ss")));
    }

    #[test]
    fn locations_stay_on_the_endpoint() {
        let ep: SocketAddr = "127.0.0.1:2822".parse().unwrap();
        assert_eq!(
            resolve_location(ep, "/nats", "/nats").as_deref(),
            Some("/nats")
        );
        assert_eq!(
            resolve_location(ep, "/nats", "nats").as_deref(),
            Some("/nats")
        );
        assert_eq!(resolve_location(ep, "/a/b?x", "c").as_deref(), Some("/a/c"));
        assert_eq!(
            resolve_location(ep, "/nats", "http://127.0.0.1:2822/nats").as_deref(),
            Some("/nats")
        );
        assert_eq!(
            resolve_location(ep, "/nats", "http://localhost:2822").as_deref(),
            Some("/")
        );
        assert_eq!(resolve_location(ep, "/nats", "http://evil:2822/nats"), None);
        assert_eq!(
            resolve_location(ep, "/nats", "https://127.0.0.1:2822/"),
            None
        );
        assert_eq!(resolve_location(ep, "/nats", "//evil/x"), None);
        assert_eq!(resolve_location(ep, "/nats", ""), None);
    }

    #[test]
    fn service_names_are_percent_encoded() {
        assert_eq!(encode_path("nats_stream-1.x"), "nats_stream-1.x");
        assert_eq!(encode_path("a b/../c"), "a%20b%2F..%2Fc");
    }

    #[tokio::test]
    async fn setup_writes_once_then_keeps_the_file() {
        let dir = testkit::TempDir::new("jobs-unit-setup-user").unwrap();
        let first = setup_monit_user(dir.path()).await.unwrap();
        assert_eq!(first.user, "vcap");
        assert_eq!(first.password.len(), 32);
        let path = monit_user_path(dir.path());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("vcap:{}", first.password)
        );
        let again = setup_monit_user(dir.path()).await.unwrap();
        assert_eq!(again, first);
        assert_eq!(read_monit_user(dir.path()).await.unwrap(), first);

        std::fs::write(&path, "garbage").unwrap();
        let err = read_monit_user(dir.path()).await.unwrap_err();
        assert!(
            err.to_string().contains("Malformated monit user file"),
            "{err}"
        );
        let replaced = setup_monit_user(dir.path()).await.unwrap();
        assert_ne!(replaced, first);

        let missing = read_monit_user(&dir.path().join("nope")).await.unwrap_err();
        assert!(
            missing.to_string().contains("nope/monit/monit.user"),
            "{missing}"
        );
    }
}
