//! Monit HTTP API client and job scripts (pre-start, drain, run_script).
//!
//! Not built yet: the runtime issue (#4) fills this crate. It exists now so that the workspace has
//! its final shape and dependency arrows.
#![forbid(unsafe_code)]
