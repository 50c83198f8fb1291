//! The one error type of the disk module: every variant names the disk, file, device or
//! command it is about, so that the director's task shows what failed and where.

use std::path::PathBuf;

/// A disk operation that failed. The `Display` texts of [`DiskError::UnknownDisk`] and
/// [`DiskError::DeviceTimeout`] are upstream's, so operators' searches and the director's
/// logs read the same as with the Go agent.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Neither the settings nor the hints file know this cid.
    #[error("Persistent disk with volume id '{0}' could not be found")]
    UnknownDisk(String),
    /// A hint (from the director or from the hints file) has a field of the wrong shape.
    #[error("disk '{cid}': bad hint: {detail}")]
    BadHint {
        /// The disk the hint is for.
        cid: String,
        /// Which field, and what is wrong with it.
        detail: String,
    },
    /// A settings value is not one this agent can act on (file system, partitioner).
    #[error("{0}")]
    Unsupported(String),
    /// A device path names something that is not a block device under `/dev` (or, for bind
    /// mounts, not an absolute directory).
    #[error("disk '{cid}': refusing device path {path}: {detail}")]
    BadDevicePath {
        /// The disk the path is for.
        cid: String,
        /// The path as given.
        path: String,
        /// Why it is refused.
        detail: String,
    },
    /// The device (or its partition) did not appear within the wait.
    #[error("Timed out getting real device path for {0}")]
    DeviceTimeout(String),
    /// More than one `/dev/disk/by-id` link matched the disk id.
    #[error(
        "More than one disk matched glob {pattern:?} while getting real device path for {cid:?}"
    )]
    AmbiguousDevice {
        /// The pattern that matched too much.
        pattern: String,
        /// The disk id.
        cid: String,
    },
    /// A file of the agent's (hints, managed disk settings) could not be read or parsed.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A needed program is not installed.
    #[error(
        "the program '{0}' is not installed (searched /usr/sbin, /usr/bin, /sbin, /bin and PATH)"
    )]
    MissingTool(&'static str),
    /// A program ran and failed; its stderr is kept.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command line, as run.
        command: String,
        /// The exit status, or how it ended.
        status: String,
        /// What it wrote on stderr (trimmed).
        stderr: String,
    },
    /// The disk's layout is not one the agent changes without losing data (several
    /// partitions, a foreign partition type, a file system on the whole device).
    #[error("disk {device}: {detail}")]
    Layout {
        /// The device.
        device: String,
        /// What was found and why nothing was changed.
        detail: String,
    },
    /// A mount-table or mount-point check failed.
    #[error("{0}")]
    Mount(String),
    /// An I/O error on a path the operation was about.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}
