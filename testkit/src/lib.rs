//! Test support with real parts, one copy for every crate's tests: temporary directories,
//! processes placed in a network namespace and cgroup (and stopped only by their PID), a
//! throwaway PKI, `nats-server` with mutual TLS, dnsmasq as the DNS server, a director's NATS
//! client, monit, and Debian's nginx as the director's DAV blobstore.
//!
//! Everything returns [`Result`] with an error that says what was being done and with which
//! value; a missing tool is an error that names the package to install (a test fails, never
//! skips). Everything a helper starts or creates is removed by `Drop`, also when a test fails.
#![forbid(unsafe_code)]

pub mod dav;
pub mod director;
pub mod dns;
mod error;
pub mod monit;
pub mod nats;
pub mod net;
pub mod pki;
pub mod process;
mod tempdir;

pub use error::{Error, Result, io_ctx, require_binary, wait_for};
pub use process::{Exec, Pending, Place, Proc, alive, describe, run_with_timeout, signal_pid};
pub use tempdir::{TempDir, unique_dir};
