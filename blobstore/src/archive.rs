//! A tar reader that never writes outside its target. See the crate documentation.

/// Which entries of an archive to unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// Every entry (packages, compile sources).
    All,
    /// Only entries under `<job>/` or `./<job>/` (a rendered templates archive holds every job
    /// of the instance), with that prefix stripped.
    Job(String),
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("placeholder")]
    Placeholder,
}
