//! The harness's error, bounded waits and tool checks.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

/// What went wrong in the harness, with enough context to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

/// Harness result.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// An I/O error mapped to an [`Error`] that starts with `what` (e.g. `writing /x/y`).
pub fn io_ctx(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error(format!("{what}: {e}"))
}

/// Polls `f` every 20 ms until it yields a value or `timeout` passes. `f` returning an error
/// stops the wait at once (e.g. the process being waited for died).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Ok` when `path` is a file; otherwise an error naming the Debian package to install.
pub fn require_binary(path: &Path, package: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    err(format!(
        "{} is required by this test and does not exist (apt-get install {package}); the test \
         fails rather than skips",
        path.display()
    ))
}

impl From<Error> for String {
    fn from(e: Error) -> Self {
        e.0
    }
}
