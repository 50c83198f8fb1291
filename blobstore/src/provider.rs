//! Blobstore providers. See the crate documentation.
//!
//! Built from the agent's blobstore settings, `{"provider": "...", "options": {...}}`:
//!
//! - `local`: a directory (`options.blobstore_path`);
//! - `dav`: the director's nginx, spoken to natively: `<endpoint>/<2 hex of sha1(id)>/<id>`,
//!   Basic auth, TLS with `options.tls.cert.ca` (the system roots when absent);
//! - anything else: the stemcell's `bosh-blobstore-<provider>` command line, with the options
//!   written verbatim to `<base>/bosh/etc/blobstore-<provider>.json` (mode 0600).
//!
//! Option keys are matched as Go's JSON decoding matches them: exactly first, else ignoring
//! case. Blob ids are checked before any use (see [`validate_id`]), so no id from a message
//! can become a path outside a blob directory or change a URL's meaning.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::digest::{Algorithm, Digest, HashingReader};

/// Where the create-env (micro BOSH) settings put the local blobstore; upstream rewrites it.
const MICRO_BOSH_CACHE: &str = "/var/vcap/micro_bosh/data/cache";
/// Tries of one DAV request when no `retry_attempts` is configured (upstream's default).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
/// First pause between two DAV tries; doubled after each.
const RETRY_DELAY: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// No byte for this long on an open connection fails the request (not the whole transfer:
/// blobs can take minutes).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest blob id accepted (a UUID has 36 characters).
const MAX_ID_LEN: usize = 255;

/// The timeout `BOSH_AGENT_BLOBSTORE_TIMEOUT_SECONDS` asks for: a whole number of seconds,
/// 1 to 3600; `None` for anything else (the defaults then apply).
fn timeout_override(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    (1..=3600)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

/// A configured blobstore.
#[derive(Debug, Clone)]
pub enum Provider {
    /// Blobs are files `<dir>/<id>`.
    Local { dir: PathBuf },
    /// The director's WebDAV blobstore.
    Dav(Dav),
    /// A `bosh-blobstore-<name>` command line.
    External(External),
}

/// Why a provider cannot be configured or reached. Every variant names what failed: the
/// setting, the id, the URL (without credentials), the command or the file.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The settings do not describe a usable provider.
    #[error("blobstore settings: {0}")]
    Settings(String),
    /// A provider name that cannot be part of a command name.
    #[error("blobstore provider name '{name}' is refused: only a-z, 0-9 and '-' are allowed")]
    InvalidProviderName { name: String },
    /// A blob id that could name a path outside the store or change a URL.
    #[error("blob id '{id}' is refused: {reason}")]
    InvalidId { id: String, reason: &'static str },
    /// `options.tls.cert.ca` has no usable certificate.
    #[error("blobstore option tls.cert.ca: {0}")]
    Ca(String),
    /// `bosh-blobstore-<name>` is not on the search path.
    #[error("blobstore command '{command}' not found on PATH '{path}'")]
    CommandNotFound { command: String, path: String },
    /// A local file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The server answered with an unexpected status.
    #[error("{method} {url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        /// The start of the answer's body, for the operator.
        body: String,
    },
    /// No answer: connection refused, TLS failure, timeout.
    #[error("{method} {url}: {message}")]
    Transport {
        method: &'static str,
        url: String,
        message: String,
    },
    /// The stream being uploaded failed (its producer's error, not the blobstore's).
    #[error("reading the upload stream for blob '{id}': {source}")]
    Stream {
        id: String,
        #[source]
        source: io::Error,
    },
    /// The command line failed.
    #[error("{command} {}: {status}: {output}", args.join(" "))]
    Command {
        command: String,
        args: Vec<String>,
        status: String,
        output: String,
    },
}

impl ProviderError {
    /// The HTTP status of a [`ProviderError::Status`], e.g. to tell "not found" apart.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the blob does not exist (HTTP 404, or no such local file).
    pub fn is_not_found(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 404,
            ProviderError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// Where a provider's files live and how its command is found.
#[derive(Debug, Clone)]
pub struct ProviderEnv {
    /// `/var/vcap` on a VM.
    pub base_dir: PathBuf,
    /// Where `bosh-blobstore-<name>` is looked for; `None`: `$PATH`. `<base>/bosh/bin`, where
    /// the stemcell installs the CLIs, is always searched last.
    pub search_path: Option<OsString>,
}

impl ProviderEnv {
    /// Files under `base_dir`, commands on `$PATH` then `<base>/bosh/bin`.
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        ProviderEnv {
            base_dir: base_dir.into(),
            search_path: None,
        }
    }
}

/// A blob being read: the provider's stream, and for a command-line provider the temporary
/// file it wrote, removed when this is dropped.
pub struct BlobReader {
    inner: Box<dyn Read + Send>,
    temp: Option<PathBuf>,
}

impl fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobReader")
            .field("temp", &self.temp)
            .finish()
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        if let Some(p) = &self.temp {
            let _ = fs::remove_file(p);
        }
    }
}

/// Checks a blob id: 1 to 255 characters from `A-Z a-z 0-9 - . _ ~` (which never need
/// escaping in a URL and hold no path separator), and not `.` or `..`. The director's ids are
/// UUIDs.
pub fn validate_id(id: &str) -> Result<(), ProviderError> {
    let refuse = |reason| {
        Err(ProviderError::InvalidId {
            id: id.chars().take(MAX_ID_LEN).collect(),
            reason,
        })
    };
    if id.is_empty() {
        return refuse("it is empty");
    }
    if id.len() > MAX_ID_LEN {
        return refuse("it is longer than 255 characters");
    }
    if id == "." || id == ".." {
        return refuse("it names a directory");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        return refuse("only A-Z, a-z, 0-9, '-', '.', '_' and '~' are allowed");
    }
    Ok(())
}

fn validate_provider_name(name: &str) -> Result<(), ProviderError> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidProviderName {
            name: name.to_string(),
        })
    }
}

/// `obj[key]`, exactly or else ignoring ASCII case (Go's `encoding/json` rule).
fn get_ci<'v>(obj: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ProviderError> {
    match get_ci(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ProviderError::Settings(format!(
            "option '{key}' must be a string, not {other}"
        ))),
    }
}

impl Provider {
    /// The provider the settings' blobstore object describes. For a command-line provider this
    /// writes its configuration file and finds its command; for `dav` it loads the CA.
    pub fn from_settings(settings: &Value, env: &ProviderEnv) -> Result<Provider, ProviderError> {
        let obj = settings.as_object().ok_or_else(|| {
            ProviderError::Settings(format!("expected an object, not {settings}"))
        })?;
        let name = match get_ci(obj, "provider") {
            Some(Value::String(s)) => s.clone(),
            other => {
                return Err(ProviderError::Settings(format!(
                    "'provider' must be a string, not {}",
                    other.map_or_else(|| "nothing".to_string(), Value::to_string)
                )));
            }
        };
        let empty = Map::new();
        let options_value = get_ci(obj, "options").cloned().unwrap_or(Value::Null);
        let options = match &options_value {
            Value::Object(m) => m,
            Value::Null => &empty,
            other => {
                return Err(ProviderError::Settings(format!(
                    "'options' must be an object, not {other}"
                )));
            }
        };
        match name.as_str() {
            "local" => {
                let path = opt_string(options, "blobstore_path")?.ok_or_else(|| {
                    ProviderError::Settings("local provider needs options.blobstore_path".into())
                })?;
                let dir = if path == MICRO_BOSH_CACHE {
                    env.base_dir.join("data/blobs")
                } else {
                    PathBuf::from(path)
                };
                Ok(Provider::Local { dir })
            }
            "dav" => Dav::from_options(options).map(Provider::Dav),
            _ => External::configure(&name, &options_value, env).map(Provider::External),
        }
    }

    /// Upstream's name of the provider (`local`, `dav`, or the command-line provider's name).
    pub fn name(&self) -> &str {
        match self {
            Provider::Local { .. } => "local",
            Provider::Dav(_) => "dav",
            Provider::External(e) => &e.name,
        }
    }

    /// Opens blob `id` for reading. `local` and `dav` stream it; a command-line provider first
    /// writes it to a new file in `tmp_dir`, which the returned reader removes when dropped.
    pub fn open(&self, id: &str, tmp_dir: &Path) -> Result<BlobReader, ProviderError> {
        validate_id(id)?;
        match self {
            Provider::Local { dir } => {
                let path = dir.join(id);
                let file = File::open(&path).map_err(|source| ProviderError::Io {
                    what: "opening blob",
                    path,
                    source,
                })?;
                Ok(BlobReader {
                    inner: Box::new(file),
                    temp: None,
                })
            }
            Provider::Dav(dav) => Ok(BlobReader {
                inner: Box::new(dav.get(id)?),
                temp: None,
            }),
            Provider::External(ext) => ext.get(id, tmp_dir),
        }
    }

    /// Stores the file `file` as blob `id`; returns the sha1 of the bytes stored (hashed while
    /// they are sent or copied; for a command line, in a pass over the file).
    pub fn put(&self, file: &Path, id: &str) -> Result<Digest, ProviderError> {
        validate_id(id)?;
        match self {
            Provider::Local { dir } => put_local(dir, file, id),
            Provider::Dav(dav) => dav.put(file, id),
            Provider::External(ext) => ext.put(file, id),
        }
    }
}

impl Provider {
    /// Stores the bytes a stream yields as blob `id`; returns the sha1 of the bytes stored,
    /// computed while they pass. `open` makes the stream; it is called once per try.
    ///
    /// - `dav`: the body is sent chunked (no `Content-Length`), straight from the stream:
    ///   nothing is written to local disk. A try that fails with a transport error or a 5xx
    ///   is repeated with a fresh stream from `open` (a stream is never resent).
    /// - `local`: written straight into the store directory (temporary + rename).
    /// - a command line: the CLI takes a file, so the stream is written to a temporary file
    ///   in `tmp_dir` first, removed afterwards.
    ///
    /// An error the stream itself returns fails the upload at once as
    /// [`ProviderError::Stream`] (not retried): a blob is never stored cut short.
    pub fn put_stream<R: Read>(
        &self,
        id: &str,
        tmp_dir: &Path,
        mut open: impl FnMut() -> io::Result<R>,
    ) -> Result<Digest, ProviderError> {
        validate_id(id)?;
        let stream_err = |source| ProviderError::Stream {
            id: id.to_string(),
            source,
        };
        match self {
            Provider::Dav(dav) => dav.put_stream(id, open),
            Provider::Local { dir } => {
                let reader = open().map_err(stream_err)?;
                put_local_stream(dir, reader, id)
            }
            Provider::External(ext) => {
                let reader = open().map_err(stream_err)?;
                fs::create_dir_all(tmp_dir).map_err(|source| ProviderError::Io {
                    what: "creating",
                    path: tmp_dir.to_path_buf(),
                    source,
                })?;
                let tmp = tmp_dir.join(format!("upload-{}", uuid::Uuid::new_v4().simple()));
                let result = spool(reader, &tmp, id).and_then(|_| ext.put(&tmp, id));
                let _ = fs::remove_file(&tmp);
                result
            }
        }
    }
}

/// A stream read through a hasher that remembers whether the stream itself failed (so such a
/// failure is told apart from the transport's).
struct TrackedBody<R> {
    inner: HashingReader<R>,
    failed: Option<io::Error>,
}

impl<R: Read> Read for TrackedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failed = Some(e);
                Err(copy)
            }
        }
    }
}

/// Copies `reader` to the new file `to` (mode 0600), hashing; the caller removes `to`.
fn spool(reader: impl Read, to: &Path, id: &str) -> Result<Digest, ProviderError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|source| ProviderError::Io {
            what: "creating upload file",
            path: to.to_path_buf(),
            source,
        })?;
    let mut body = TrackedBody {
        inner: HashingReader::new(reader, Algorithm::Sha1),
        failed: None,
    };
    let copied = copy_checked(&mut body, &mut out, Path::new(id), to);
    if let Some(source) = body.failed.take() {
        return Err(ProviderError::Stream {
            id: id.to_string(),
            source,
        });
    }
    copied?;
    out.sync_all().map_err(|source| ProviderError::Io {
        what: "writing",
        path: to.to_path_buf(),
        source,
    })?;
    let (digest, _) = body
        .inner
        .finish()
        .map_err(|source| ProviderError::Stream {
            id: id.to_string(),
            source,
        })?;
    Ok(digest)
}

fn put_local_stream(dir: &Path, reader: impl Read, id: &str) -> Result<Digest, ProviderError> {
    fs::create_dir_all(dir).map_err(|source| ProviderError::Io {
        what: "creating blob directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let final_path = dir.join(id);
    let tmp = dir.join(format!(".{id}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = spool(reader, &tmp, id).and_then(|digest| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(|source| {
            ProviderError::Io {
                what: "storing blob",
                path: tmp.clone(),
                source,
            }
        })?;
        fs::rename(&tmp, &final_path).map_err(|source| ProviderError::Io {
            what: "storing blob",
            path: final_path.clone(),
            source,
        })?;
        Ok(digest)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn put_local(dir: &Path, file: &Path, id: &str) -> Result<Digest, ProviderError> {
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ProviderError::Io { what, path, source }
    };
    fs::create_dir_all(dir).map_err(io_err("creating blob directory", dir))?;
    let src = File::open(file).map_err(io_err("opening upload", file))?;
    let final_path = dir.join(id);
    let tmp = dir.join(format!(".{id}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io_err("creating blob", &tmp))?;
        let mut reader = HashingReader::new(src, Algorithm::Sha1);
        copy_checked(&mut reader, &mut out, file, &tmp)?;
        out.sync_all().map_err(io_err("writing blob", &tmp))?;
        let (digest, _) = reader.finish().map_err(io_err("reading upload", file))?;
        fs::rename(&tmp, &final_path).map_err(io_err("storing blob", &final_path))?;
        Ok(digest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `io::copy` that tells a failed read of `from` from a failed write of `to`.
fn copy_checked(
    r: &mut impl Read,
    w: &mut impl Write,
    from: &Path,
    to: &Path,
) -> Result<u64, ProviderError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ProviderError::Io {
                    what: "reading",
                    path: from.to_path_buf(),
                    source,
                });
            }
        };
        w.write_all(buf.get(..n).unwrap_or_default())
            .map_err(|source| ProviderError::Io {
                what: "writing",
                path: to.to_path_buf(),
                source,
            })?;
        total += n as u64;
    }
}

/// `url` with any `user:password@` removed, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The director's WebDAV blobstore.
#[derive(Clone)]
pub struct Dav {
    /// The endpoint without a trailing `/` and without credentials.
    endpoint: String,
    /// `Basic …` when a user is configured.
    authorization: Option<String>,
    retry_attempts: u32,
    agent: ureq::Agent,
}

impl fmt::Debug for Dav {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        f.debug_struct("Dav")
            .field("endpoint", &self.endpoint)
            .field("auth", &self.authorization.is_some())
            .field("retry_attempts", &self.retry_attempts)
            .finish()
    }
}

impl Dav {
    /// A client from the `dav` options: `endpoint` (required), `user`, `password`,
    /// `tls.cert.ca` (PEM), `retry_attempts` (default 3). The timeouts are 30 s to connect and
    /// 60 s for any wait for a byte; a positive whole number of seconds in the environment
    /// variable `BOSH_AGENT_BLOBSTORE_TIMEOUT_SECONDS` replaces both (a test's hanging
    /// blobstore then fails a task within seconds). Any other value there is ignored.
    pub fn from_options(options: &Map<String, Value>) -> Result<Dav, ProviderError> {
        let (connect, io) = match timeout_override(
            std::env::var("BOSH_AGENT_BLOBSTORE_TIMEOUT_SECONDS")
                .ok()
                .as_deref(),
        ) {
            Some(t) => (t, t),
            None => (CONNECT_TIMEOUT, IO_TIMEOUT),
        };
        Self::from_options_with_timeouts(options, connect, io)
    }

    /// [`Dav::from_options`] with other timeouts: `connect` for the TCP and TLS set-up, `io`
    /// for any wait for the next byte (the agent uses 30 s and 60 s).
    pub fn from_options_with_timeouts(
        options: &Map<String, Value>,
        connect: Duration,
        io: Duration,
    ) -> Result<Dav, ProviderError> {
        let endpoint = opt_string(options, "endpoint")?
            .filter(|e| !e.is_empty())
            .ok_or_else(|| ProviderError::Settings("dav provider needs options.endpoint".into()))?;
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(ProviderError::Settings(format!(
                "dav endpoint '{}' is not an http(s) URL",
                redact_url(&endpoint)
            )));
        }
        let user = opt_string(options, "user")?;
        let password = opt_string(options, "password")?.unwrap_or_default();
        let retry_attempts = match get_ci(options, "retry_attempts") {
            None | Some(Value::Null) => DEFAULT_RETRY_ATTEMPTS,
            Some(v) => match v.as_u64() {
                Some(0) => DEFAULT_RETRY_ATTEMPTS,
                Some(n) => u32::try_from(n).unwrap_or(u32::MAX).min(100),
                None => {
                    return Err(ProviderError::Settings(format!(
                        "option 'retry_attempts' must be a non-negative integer, not {v}"
                    )));
                }
            },
        };
        let ca = get_ci(options, "tls")
            .and_then(Value::as_object)
            .and_then(|t| get_ci(t, "cert"))
            .and_then(Value::as_object)
            .map(|c| opt_string(c, "ca"))
            .transpose()?
            .flatten()
            .filter(|s| !s.trim().is_empty());
        let roots = match ca {
            Some(pem) => ca_roots(&pem)?,
            None => system_roots(),
        };
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            // A redirect would carry the credentials elsewhere; the director never sends one.
            .max_redirects(0)
            .timeout_connect(Some(connect))
            .timeout_per_read(Some(io))
            .timeout_per_write(Some(io))
            .timeout_recv_response(Some(io))
            .build()
            .into();
        let authorization = user.map(|u| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{password}"));
            format!("Basic {token}")
        });
        Ok(Dav {
            endpoint: redact_url(endpoint.trim_end_matches('/')),
            authorization,
            retry_attempts,
            agent,
        })
    }

    /// `<endpoint>/<first two hex digits of sha1(id)>/<id>` (no credentials in it).
    pub fn object_url(&self, id: &str) -> String {
        let prefix = &Digest::of(Algorithm::Sha1, id.as_bytes()).hex[..2];
        format!("{}/{prefix}/{id}", self.endpoint)
    }

    /// Tries `send` up to `retry_attempts` times, again only after a transport error or a 5xx.
    fn with_retries<T>(
        &self,
        mut send: impl FnMut() -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let mut delay = RETRY_DELAY;
        let mut attempt = 1;
        loop {
            match send() {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let retryable = match &e {
                        ProviderError::Transport { .. } => true,
                        ProviderError::Status { status, .. } => *status >= 500,
                        _ => false,
                    };
                    if !retryable || attempt >= self.retry_attempts {
                        return Err(e);
                    }
                    tracing::warn!(attempt, error = %e, "dav request failed, retrying");
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// GET of blob `id`: the body as a stream, after a 200.
    pub fn get(&self, id: &str) -> Result<impl Read + Send + use<>, ProviderError> {
        validate_id(id)?;
        let url = self.object_url(id);
        self.with_retries(|| {
            let mut req = self.agent.get(&url);
            if let Some(a) = &self.authorization {
                req = req.header("Authorization", a);
            }
            let resp = req.call().map_err(|e| transport("GET", &url, &e))?;
            let status = resp.status().as_u16();
            if status != 200 {
                return Err(status_error("GET", &url, resp));
            }
            Ok(resp.into_body().into_reader())
        })
    }

    /// PUT of the file `file` as blob `id`, with its length; 201 or 204 expected. Returns the
    /// sha1 of the bytes sent by the try that succeeded.
    pub fn put(&self, file: &Path, id: &str) -> Result<Digest, ProviderError> {
        validate_id(id)?;
        let url = self.object_url(id);
        self.with_retries(|| {
            let f = File::open(file).map_err(|source| ProviderError::Io {
                what: "opening upload",
                path: file.to_path_buf(),
                source,
            })?;
            let len = f
                .metadata()
                .map_err(|source| ProviderError::Io {
                    what: "reading upload",
                    path: file.to_path_buf(),
                    source,
                })?
                .len();
            let mut reader = HashingReader::new(f, Algorithm::Sha1);
            let mut req = self
                .agent
                .put(&url)
                .header("Content-Length", len.to_string());
            if let Some(a) = &self.authorization {
                req = req.header("Authorization", a);
            }
            let resp = req
                .send(ureq::SendBody::from_reader(&mut reader))
                .map_err(|e| transport("PUT", &url, &e))?;
            let status = resp.status().as_u16();
            if status != 201 && status != 204 {
                return Err(status_error("PUT", &url, resp));
            }
            let (digest, sent) = reader.finish().map_err(|source| ProviderError::Io {
                what: "reading upload",
                path: file.to_path_buf(),
                source,
            })?;
            if sent != len {
                return Err(ProviderError::Io {
                    what: "uploading",
                    path: file.to_path_buf(),
                    source: io::Error::other(format!(
                        "the file changed size while it was sent ({len} then {sent} bytes)"
                    )),
                });
            }
            Ok(digest)
        })
    }
}

impl Dav {
    /// PUT of a stream as blob `id`, chunked; 201 or 204 expected. See
    /// [`Provider::put_stream`] for the tries and the errors. Returns the sha1 of the bytes
    /// sent by the try that succeeded.
    pub fn put_stream<R: Read>(
        &self,
        id: &str,
        mut open: impl FnMut() -> io::Result<R>,
    ) -> Result<Digest, ProviderError> {
        validate_id(id)?;
        let url = self.object_url(id);
        self.with_retries(|| {
            let reader = open().map_err(|source| ProviderError::Stream {
                id: id.to_string(),
                source,
            })?;
            let mut body = TrackedBody {
                inner: HashingReader::new(reader, Algorithm::Sha1),
                failed: None,
            };
            let mut req = self.agent.put(&url);
            if let Some(a) = &self.authorization {
                req = req.header("Authorization", a);
            }
            let sent = req.send(ureq::SendBody::from_reader(&mut body));
            if let Some(source) = body.failed.take() {
                return Err(ProviderError::Stream {
                    id: id.to_string(),
                    source,
                });
            }
            let resp = sent.map_err(|e| transport("PUT", &url, &e))?;
            let status = resp.status().as_u16();
            if status != 201 && status != 204 {
                return Err(status_error("PUT", &url, resp));
            }
            let (digest, _) = body
                .inner
                .finish()
                .map_err(|source| ProviderError::Stream {
                    id: id.to_string(),
                    source,
                })?;
            Ok(digest)
        })
    }
}

fn transport(method: &'static str, url: &str, e: &ureq::Error) -> ProviderError {
    ProviderError::Transport {
        method,
        url: redact_url(url),
        message: e.to_string(),
    }
}

fn status_error(
    method: &'static str,
    url: &str,
    resp: ureq::http::Response<ureq::Body>,
) -> ProviderError {
    let status = resp.status().as_u16();
    let mut body = String::new();
    // Only a little of the answer, for the message; it is never needed in full.
    let _ = resp
        .into_body()
        .into_reader()
        .take(512)
        .read_to_string(&mut body);
    let body: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    ProviderError::Status {
        method,
        url: redact_url(url),
        status,
        body: body.chars().take(200).collect(),
    }
}

fn ca_roots(pem: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, ProviderError> {
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem.as_bytes()) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(ProviderError::Ca(format!("not PEM: {e}"))),
        }
    }
    if certs.is_empty() {
        return Err(ProviderError::Ca("no CERTIFICATE block in it".into()));
    }
    Ok(certs)
}

fn system_roots() -> Vec<ureq::tls::Certificate<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "loading a system root certificate");
    }
    found
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect()
}

/// A `bosh-blobstore-<name>` command line and its configuration file.
#[derive(Debug, Clone)]
pub struct External {
    name: String,
    command: PathBuf,
    config: PathBuf,
}

impl External {
    /// Writes `options` verbatim as JSON to `<base>/bosh/etc/blobstore-<name>.json` (mode
    /// 0600, replaced atomically) and finds `bosh-blobstore-<name>`.
    pub fn configure(
        name: &str,
        options: &Value,
        env: &ProviderEnv,
    ) -> Result<External, ProviderError> {
        validate_provider_name(name)?;
        let command_name = format!("bosh-blobstore-{name}");
        let mut dirs: Vec<PathBuf> = match &env.search_path {
            Some(p) => std::env::split_paths(p).collect(),
            None => std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        };
        dirs.push(env.base_dir.join("bosh/bin"));
        let command = dirs
            .iter()
            .filter(|d| d.is_absolute())
            .map(|d| d.join(&command_name))
            .find(|p| is_executable(p))
            .ok_or_else(|| ProviderError::CommandNotFound {
                command: command_name.clone(),
                path: std::env::join_paths(&dirs)
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            })?;
        let etc = env.base_dir.join("bosh/etc");
        let io_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ProviderError::Io { what, path, source }
        };
        fs::create_dir_all(&etc).map_err(io_err("creating", &etc))?;
        let config = etc.join(format!("blobstore-{name}.json"));
        let options = if options.is_null() {
            Value::Object(Map::new())
        } else {
            options.clone()
        };
        let text = serde_json::to_vec(&options)
            .map_err(|e| ProviderError::Settings(format!("options of provider '{name}': {e}")))?;
        let tmp = etc.join(format!(
            ".blobstore-{name}.json.tmp-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode given at creation is subject to the umask; 0600 exactly is wanted.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, &config)
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(ProviderError::Io {
                what: "writing blobstore configuration",
                path: config,
                source,
            });
        }
        Ok(External {
            name: name.to_string(),
            command,
            config,
        })
    }

    /// The command found.
    pub fn command(&self) -> &Path {
        &self.command
    }

    /// The configuration file written.
    pub fn config(&self) -> &Path {
        &self.config
    }

    fn run(&self, args: &[&OsStr]) -> Result<(), ProviderError> {
        let mut argv: Vec<&OsStr> = vec![OsStr::new("-c"), self.config.as_os_str()];
        argv.extend_from_slice(args);
        let shown: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let out = Command::new(&self.command)
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| ProviderError::Command {
                command: self.command.display().to_string(),
                args: shown.clone(),
                status: "could not start".into(),
                output: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if text.is_empty() {
            text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(ProviderError::Command {
            command: self.command.display().to_string(),
            args: shown,
            status: out.status.to_string(),
            output: text.chars().take(1000).collect(),
        })
    }

    /// `<cmd> -c <cfg> get <id> <tmp file>`, then the file opened; the reader removes it.
    pub fn get(&self, id: &str, tmp_dir: &Path) -> Result<BlobReader, ProviderError> {
        validate_id(id)?;
        fs::create_dir_all(tmp_dir).map_err(|source| ProviderError::Io {
            what: "creating",
            path: tmp_dir.to_path_buf(),
            source,
        })?;
        let path = tmp_dir.join(format!("blob-{}", uuid::Uuid::new_v4().simple()));
        // The reader owns the file from here on, so every error path removes it.
        let mut reader = BlobReader {
            inner: Box::new(io::empty()),
            temp: Some(path.clone()),
        };
        self.run(&[OsStr::new("get"), OsStr::new(id), path.as_os_str()])?;
        let file = File::open(&path).map_err(|source| ProviderError::Io {
            what: "opening downloaded blob",
            path: path.clone(),
            source,
        })?;
        reader.inner = Box::new(file);
        Ok(reader)
    }

    /// `<cmd> -c <cfg> put <absolute file> <id>`; returns the file's sha1.
    pub fn put(&self, file: &Path, id: &str) -> Result<Digest, ProviderError> {
        validate_id(id)?;
        let abs = std::path::absolute(file).map_err(|source| ProviderError::Io {
            what: "resolving",
            path: file.to_path_buf(),
            source,
        })?;
        let f = File::open(&abs).map_err(|source| ProviderError::Io {
            what: "opening upload",
            path: abs.clone(),
            source,
        })?;
        let (digest, _) = HashingReader::new(f, Algorithm::Sha1)
            .finish()
            .map_err(|source| ProviderError::Io {
                what: "reading upload",
                path: abs.clone(),
                source,
            })?;
        self.run(&[OsStr::new("put"), abs.as_os_str(), OsStr::new(id)])?;
        Ok(digest)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::MetadataExt;
    use testkit::TempDir;

    #[test]
    fn timeout_override_takes_whole_seconds_in_range_only() {
        assert_eq!(timeout_override(None), None);
        assert_eq!(timeout_override(Some("2")), Some(Duration::from_secs(2)));
        assert_eq!(
            timeout_override(Some(" 3600 ")),
            Some(Duration::from_secs(3600))
        );
        for bad in ["", "0", "3601", "-1", "1.5", "2s", "x"] {
            assert_eq!(timeout_override(Some(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn ids() {
        for ok in [
            "a",
            "0f1e2d3c-aaaa-bbbb-cccc-0123456789ab",
            "a.b_c~d-e",
            "...",
        ] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "", ".", "..", "a/b", "/abs", "../x", "a b", "a\nb", "a%2fb", "a?b", "a#b", "é",
            "a\\b", "a@b", "a:b",
        ] {
            let e = validate_id(bad).unwrap_err();
            assert!(matches!(e, ProviderError::InvalidId { .. }), "{bad:?}");
        }
        validate_id(&"a".repeat(255)).unwrap();
        assert!(validate_id(&"a".repeat(256)).is_err());
    }

    #[test]
    fn provider_names() {
        for ok in ["s3", "gcs", "azure-storage", "dav2"] {
            validate_provider_name(ok).unwrap();
        }
        for bad in ["", "S3", "a/b", "../x", "-x", "a b", "a.b", "a_b"] {
            assert!(validate_provider_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("https://u:p@h:1/x"), "https://h:1/x");
        assert_eq!(redact_url("https://u:p@h"), "https://h");
        assert_eq!(redact_url("https://h/a@b"), "https://h/a@b");
        assert_eq!(redact_url("https://u:p@@x@h/a@b"), "https://h/a@b");
        assert_eq!(redact_url("no-scheme@x"), "no-scheme@x");
    }

    #[test]
    fn local_and_the_micro_bosh_rewrite() {
        let env = ProviderEnv::new("/base");
        let p = Provider::from_settings(
            &json!({"provider": "local", "options": {"blobstore_path": "/some/dir"}}),
            &env,
        )
        .unwrap();
        assert!(matches!(&p, Provider::Local { dir } if dir == Path::new("/some/dir")));
        assert_eq!(p.name(), "local");
        let p = Provider::from_settings(
            &json!({"Provider": "local", "Options": {"Blobstore_Path": MICRO_BOSH_CACHE}}),
            &env,
        )
        .unwrap();
        assert!(matches!(&p, Provider::Local { dir } if dir == Path::new("/base/data/blobs")));
        let e = Provider::from_settings(&json!({"provider": "local"}), &env).unwrap_err();
        assert!(e.to_string().contains("blobstore_path"), "{e}");
    }

    #[test]
    fn local_put_and_open() {
        let tmp = TempDir::new("blobstore-test").unwrap();
        let store = tmp.path().join("store");
        let p = Provider::Local { dir: store.clone() };
        let src = tmp.path().join("src");
        fs::write(&src, b"hello\n").unwrap();
        let d = p.put(&src, "blob-1").unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha1, b"hello\n"));
        let mut got = Vec::new();
        p.open("blob-1", tmp.path())
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b"hello\n");
        assert_eq!(
            fs::read_dir(&store).unwrap().count(),
            1,
            "no temporary left"
        );
        let e = p.open("missing", tmp.path()).unwrap_err();
        assert!(e.is_not_found());
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(matches!(
            p.open("../src", tmp.path()),
            Err(ProviderError::InvalidId { .. })
        ));
        assert!(matches!(
            p.put(&src, "../x"),
            Err(ProviderError::InvalidId { .. })
        ));
    }

    #[test]
    fn dav_options() {
        let env = ProviderEnv::new("/base");
        let p = Provider::from_settings(
            &json!({"provider": "dav", "options": {
                "endpoint": "https://agent:secret@10.0.0.6:25250/",
                "user": "agent", "password": "secret", "retry_attempts": 5}}),
            &env,
        )
        .unwrap();
        let Provider::Dav(dav) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(dav.retry_attempts, 5);
        let shown = format!("{p:?}");
        assert!(!shown.contains("secret"), "{shown}");
        // sha1("abc") = a9993e36...
        assert_eq!(dav.object_url("abc"), "https://10.0.0.6:25250/a9/abc");
        assert_eq!(dav.authorization.as_deref(), Some("Basic YWdlbnQ6c2VjcmV0"));
        let p = Provider::from_settings(
            &json!({"provider": "dav", "options": {"Endpoint": "http://h"}}),
            &env,
        )
        .unwrap();
        let Provider::Dav(dav) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(dav.retry_attempts, DEFAULT_RETRY_ATTEMPTS);
        assert!(dav.authorization.is_none());
        for bad in [
            json!({"provider": "dav", "options": {}}),
            json!({"provider": "dav", "options": {"endpoint": "ftp://h"}}),
            json!({"provider": "dav", "options": {"endpoint": "http://h", "retry_attempts": "x"}}),
            json!({"provider": "dav", "options": {"endpoint": "http://h", "tls": {"cert": {"ca": "junk"}}}}),
            json!({"provider": 3}),
            json!("dav"),
        ] {
            assert!(Provider::from_settings(&bad, &env).is_err(), "{bad}");
        }
    }

    /// A plain HTTP/1.1 server on loopback answering each connection with the next of
    /// `answers` (status, body), then closing; returns its endpoint and the requests it read.
    fn http_server(
        answers: Vec<(u16, &'static str)>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut r = io::BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                // The body is read before answering: closing with unread bytes would make the
                // kernel reset the connection under the client's upload.
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                let mut body_in = vec![0u8; length];
                r.read_exact(&mut body_in).unwrap();
                seen.push(head);
                let mut w = stream;
                write!(
                    w,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (endpoint, handle)
    }

    fn dav_at(endpoint: &str, attempts: u32) -> Dav {
        let mut o = Map::new();
        o.insert("endpoint".into(), json!(endpoint));
        o.insert("user".into(), json!("agent"));
        o.insert("password".into(), json!("pw"));
        o.insert("retry_attempts".into(), json!(attempts));
        Dav::from_options(&o).unwrap()
    }

    #[test]
    fn dav_retries_5xx_but_not_4xx() {
        let (endpoint, server) = http_server(vec![(503, "busy"), (500, ""), (200, "blob")]);
        let dav = dav_at(&endpoint, 3);
        let mut got = String::new();
        dav.get("abc").unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, "blob");
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].starts_with("GET /a9/abc HTTP/1.1"), "{}", seen[0]);
        assert!(
            seen[0]
                .to_lowercase()
                .contains("authorization: basic ywdlbnq6chc="),
            "{}",
            seen[0]
        );

        let (endpoint, server) = http_server(vec![(403, "no")]);
        let e = dav_at(&endpoint, 3).get("abc").err().unwrap();
        assert_eq!(e.status(), Some(403));
        assert!(e.to_string().contains(&format!("{endpoint}/a9/abc")), "{e}");
        assert_eq!(server.join().unwrap().len(), 1, "a 403 is not retried");

        // Retries used up: the last status is reported.
        let (endpoint, server) = http_server(vec![(502, "a"), (502, "b")]);
        let e = dav_at(&endpoint, 2).get("abc").err().unwrap();
        assert_eq!(e.status(), Some(502));
        assert!(e.to_string().contains(": b"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn dav_connection_refused_is_a_transport_error_naming_the_url() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = format!("http://agent:pw@127.0.0.1:{port}");
        let e = dav_at(&endpoint, 2).get("abc").err().unwrap();
        let ProviderError::Transport { url, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(url, &format!("http://127.0.0.1:{port}/a9/abc"));
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn a_blobstore_that_never_answers_times_out_naming_the_url() {
        // Accepts the connection, reads the request, says nothing.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..2 {
                if let Ok((s, _)) = listener.accept() {
                    held.push(s);
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        });
        let mut o = Map::new();
        o.insert("endpoint".into(), json!(format!("http://agent:pw@{addr}")));
        o.insert("retry_attempts".into(), json!(2));
        let dav =
            Dav::from_options_with_timeouts(&o, Duration::from_secs(1), Duration::from_millis(300))
                .unwrap();
        let e = dav.get("abc").err().unwrap();
        let ProviderError::Transport { url, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(url, &format!("http://{addr}/a9/abc"));
        let text = e.to_string().to_lowercase();
        assert!(text.contains("time"), "the error says it timed out: {text}");
        assert!(!text.contains("pw"), "{text}");
        server.join().unwrap();
    }

    #[test]
    fn dav_put_sends_the_length() {
        let (endpoint, server) = http_server(vec![(201, "")]);
        let tmp = TempDir::new("blobstore-test").unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"hello\n").unwrap();
        let d = dav_at(&endpoint, 1).put(&f, "abc").unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha1, b"hello\n"));
        let seen = server.join().unwrap();
        assert!(seen[0].starts_with("PUT /a9/abc HTTP/1.1"), "{}", seen[0]);
        assert!(
            seen[0].to_lowercase().contains("content-length: 6"),
            "{}",
            seen[0]
        );
        let (endpoint, server) = http_server(vec![(200, "")]);
        let e = dav_at(&endpoint, 1).put(&f, "abc").unwrap_err();
        assert_eq!(e.status(), Some(200), "only 201 and 204 are success");
        server.join().unwrap();
    }

    /// Reads one HTTP/1.1 request with a chunked body from `r`; `None` when the client went
    /// away before the body's end. Returns the head and the body.
    fn read_chunked(r: &mut impl io::BufRead) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                return Some((head, body));
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }

    /// What [`chunked_server`] read per connection (`None`: the client gave up mid-body).
    type Seen = Vec<Option<(String, Vec<u8>)>>;

    /// A server reading chunked PUTs and answering each with the next status.
    fn chunked_server(answers: Vec<u16>) -> (String, std::thread::JoinHandle<Seen>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for status in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut r = io::BufReader::new(stream.try_clone().unwrap());
                let got = read_chunked(&mut r);
                let done = got.is_some();
                seen.push(got);
                if done {
                    let mut w = stream;
                    let _ = write!(
                        w,
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                }
            }
            seen
        });
        (endpoint, handle)
    }

    #[test]
    fn dav_put_stream_is_chunked_and_reopens_the_stream_per_try() {
        let (endpoint, server) = chunked_server(vec![503, 201]);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut opened = 0;
        let d = dav_at(&endpoint, 3)
            .put_stream("abc", || {
                opened += 1;
                Ok(io::Cursor::new(data.clone()))
            })
            .unwrap();
        assert_eq!(opened, 2, "a fresh stream for the second try");
        assert_eq!(d, Digest::of(Algorithm::Sha1, &data));
        let seen = server.join().unwrap();
        let (head, body) = seen[1].clone().unwrap();
        assert!(head.starts_with("PUT /a9/abc HTTP/1.1"), "{head}");
        let lower = head.to_lowercase();
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        assert!(!lower.contains("content-length"), "{head}");
        assert_eq!(body, data);
    }

    /// Yields some bytes, then fails.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("log file vanished"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(b'x');
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_failing_stream_fails_the_upload_once_with_its_own_error() {
        let (endpoint, server) = chunked_server(vec![201]);
        let mut opened = 0;
        let e = dav_at(&endpoint, 3)
            .put_stream("abc", || {
                opened += 1;
                Ok(Failing(100_000))
            })
            .unwrap_err();
        assert!(matches!(e, ProviderError::Stream { .. }), "{e:?}");
        assert!(e.to_string().contains("log file vanished"), "{e}");
        assert_eq!(opened, 1, "a stream error is not retried");
        let seen = server.join().unwrap();
        assert!(seen[0].is_none(), "the server never saw a complete body");

        // Local: nothing is left in the store.
        let tmp = TempDir::new("blobstore-test").unwrap();
        let store = tmp.path().join("store");
        let p = Provider::Local { dir: store.clone() };
        let e = p
            .put_stream("blob", tmp.path(), || Ok(Failing(10)))
            .unwrap_err();
        assert!(matches!(e, ProviderError::Stream { .. }), "{e:?}");
        assert_eq!(fs::read_dir(&store).unwrap().count(), 0);
    }

    #[test]
    fn local_and_external_put_stream() {
        let tmp = TempDir::new("blobstore-test").unwrap();
        let store = tmp.path().join("store");
        let p = Provider::Local { dir: store.clone() };
        let d = p
            .put_stream("blob-1", tmp.path(), || Ok(&b"streamed\n"[..]))
            .unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha1, b"streamed\n"));
        assert_eq!(fs::read(store.join("blob-1")).unwrap(), b"streamed\n");
        assert_eq!(
            fs::metadata(store.join("blob-1")).unwrap().mode() & 0o777,
            0o644
        );
        assert_eq!(fs::read_dir(&store).unwrap().count(), 1);

        // A command line gets a file, removed afterwards.
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let cmd = bin.join("bosh-blobstore-fake");
        let dest = tmp.path().join("ext-store");
        fs::create_dir(&dest).unwrap();
        fs::write(
            &cmd,
            format!(
                "#!/bin/sh\n[ \"$3\" = put ] && cp \"$4\" {}/\"$5\"\n",
                dest.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&cmd, fs::Permissions::from_mode(0o755)).unwrap();
        let env = ProviderEnv {
            base_dir: tmp.path().join("base"),
            search_path: Some(bin.into_os_string()),
        };
        let p = Provider::from_settings(&json!({"provider": "fake"}), &env).unwrap();
        let spool = tmp.path().join("spool");
        let d = p
            .put_stream("blob-2", &spool, || Ok(&b"via cli"[..]))
            .unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha1, b"via cli"));
        assert_eq!(fs::read(dest.join("blob-2")).unwrap(), b"via cli");
        assert_eq!(
            fs::read_dir(&spool).unwrap().count(),
            0,
            "the spool file is removed"
        );
    }

    #[test]
    fn external_config_and_lookup() {
        let tmp = TempDir::new("blobstore-test").unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let cmd = bin.join("bosh-blobstore-s3");
        fs::write(&cmd, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&cmd, fs::Permissions::from_mode(0o755)).unwrap();
        let env = ProviderEnv {
            base_dir: tmp.path().join("base"),
            search_path: Some(bin.clone().into_os_string()),
        };
        let options = json!({"bucket_name": "b", "Credentials_Source": "static", "n": 1});
        let p =
            Provider::from_settings(&json!({"provider": "s3", "options": options}), &env).unwrap();
        let Provider::External(ext) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(ext.command(), cmd);
        let cfg = tmp.path().join("base/bosh/etc/blobstore-s3.json");
        assert_eq!(ext.config(), cfg);
        let written: Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
        assert_eq!(written, options);
        assert_eq!(fs::metadata(&cfg).unwrap().mode() & 0o777, 0o600);
        // Not found: the error names the command and the path searched.
        let e = Provider::from_settings(&json!({"provider": "gcs"}), &env).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("bosh-blobstore-gcs") && msg.contains(bin.to_str().unwrap()),
            "{msg}"
        );
        // Hostile names never reach the file system.
        for bad in ["../../bin/sh", "S3", "a/b"] {
            let e = Provider::from_settings(&json!({"provider": bad}), &env).unwrap_err();
            assert!(
                matches!(e, ProviderError::InvalidProviderName { .. }),
                "{bad}"
            );
        }
        // The stemcell's directory is searched last.
        fs::create_dir_all(tmp.path().join("base/bosh/bin")).unwrap();
        let stem = tmp.path().join("base/bosh/bin/bosh-blobstore-gcs");
        fs::copy(&cmd, &stem).unwrap();
        let p = Provider::from_settings(&json!({"provider": "gcs"}), &env).unwrap();
        let Provider::External(ext) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(ext.command(), stem);
        assert_eq!(fs::read_to_string(ext.config()).unwrap(), "{}");
    }
}
