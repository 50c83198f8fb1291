//! Why a source gave no settings. Every message names the source and the URL, device or file;
//! none carries a token, a header value, a password of a URL or a byte of the settings.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// One way one source failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source's options cannot work (an empty path, an https URI, a bad header name).
    #[error("misconfigured: {0}")]
    Config(String),
    /// A source type this agent does not read.
    #[error("source type {0} is not supported by this agent")]
    Unsupported(&'static str),
    /// No answer: refused, reset, timed out.
    #[error("{method} {url}: {message}")]
    Transport {
        method: &'static str,
        url: String,
        message: String,
    },
    /// An answer that is not a success.
    #[error("{method} {url}: HTTP status {status}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
    },
    /// The last error of a request given up on after retries.
    #[error("{last} (gave up after {attempts} attempts)")]
    GaveUp {
        attempts: u32,
        last: Box<FetchError>,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The settings are not JSON (serde's message has no content of the document).
    #[error("{what}: invalid JSON: {message} (line {line}, column {column})")]
    Json {
        what: String,
        message: String,
        line: usize,
        column: usize,
    },
    /// JSON, but not an object.
    #[error("{what}: settings must be a JSON object, not {found}")]
    NotAnObject { what: String, found: &'static str },
    /// User data that is neither JSON nor base64-encoded JSON.
    #[error("{what}: user data is neither JSON nor base64-encoded JSON: {detail}")]
    UserData { what: String, detail: String },
    /// User data without an `agent_id`: upstream's "Metadata does not provide settings".
    #[error(
        "{what}: metadata does not provide settings (no agent_id; registry-style user data is not supported)"
    )]
    NoAgentId { what: String },
    /// None of a config drive's paths gave the file.
    #[error("no config drive gave {file}: {tried}")]
    NoDrive { file: String, tried: String },
    /// mount(8) refused the device.
    #[error("mounting {device} read-only on {dir}: {detail}")]
    Mount {
        device: PathBuf,
        dir: PathBuf,
        detail: String,
    },
    /// The drive could not be unmounted after reading.
    #[error("unmounting {dir}: {detail}")]
    Unmount { dir: PathBuf, detail: String },
    /// The CD-ROM was not readable, or would not eject.
    #[error("CD-ROM {device}: {detail}")]
    Cdrom { device: PathBuf, detail: String },
}

/// A failing source, with its place in agent.json.
#[derive(Debug, thiserror::Error)]
#[error("settings source {index} ({kind}): {error}")]
pub struct SourceError {
    /// Position in `Infrastructure.Settings.Sources` (0-based).
    pub index: usize,
    /// Its `Type`.
    pub kind: &'static str,
    /// What went wrong.
    #[source]
    pub error: FetchError,
}

/// The failures of every source, in order.
#[derive(Debug, Default)]
pub struct Failures(pub Vec<SourceError>);

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no source configured");
        }
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Why no settings could be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// agent.json lists no source and there is no cache.
    #[error(
        "no settings source configured (Infrastructure.Settings.Sources) and no cached settings at {cache}"
    )]
    NoSources { cache: PathBuf },
    /// Every source failed, and so did the cache.
    #[error(
        "every settings source failed ({failures}), and the cached settings too: {cache_error}"
    )]
    Unavailable {
        failures: Failures,
        cache: PathBuf,
        cache_error: FetchError,
    },
}

/// Why vcap's public key from the IaaS could not be read.
#[derive(Debug, thiserror::Error)]
#[error("getting the IaaS's public key: {0}")]
pub struct KeyError(pub Failures);

/// `url` without the user and password of its authority, if it has any.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `what` as a JSON error of the settings.
pub(crate) fn json_error(what: &str, e: &serde_json::Error) -> FetchError {
    let message = e.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_string();
    FetchError::Json {
        what: what.to_string(),
        message,
        line: e.line(),
        column: e.column(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_only() {
        assert_eq!(
            redact_url("http://u:secret@169.254.169.254/latest"),
            "http://169.254.169.254/latest"
        );
        assert_eq!(
            redact_url("http://169.254.169.254/a@b"),
            "http://169.254.169.254/a@b"
        );
        assert_eq!(redact_url("no-scheme@x"), "no-scheme@x");
        assert_eq!(redact_url("http://h"), "http://h");
    }

    #[test]
    fn failures_list_every_source() {
        let f = Failures(vec![
            SourceError {
                index: 0,
                kind: "File",
                error: FetchError::Unsupported("X"),
            },
            SourceError {
                index: 1,
                kind: "HTTP",
                error: FetchError::GaveUp {
                    attempts: 3,
                    last: Box::new(FetchError::Status {
                        method: "GET",
                        url: "http://h/u".into(),
                        status: 500,
                    }),
                },
            },
        ]);
        assert_eq!(
            f.to_string(),
            "settings source 0 (File): source type X is not supported by this agent; \
             settings source 1 (HTTP): GET http://h/u: HTTP status 500 (gave up after 3 attempts)"
        );
        assert_eq!(Failures::default().to_string(), "no source configured");
    }
}
