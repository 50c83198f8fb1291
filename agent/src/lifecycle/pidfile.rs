//! `<run dir>/bosh-agent.pid`: how one-shot commands (`bosh-agent firewall reload`) find the
//! running agent. Written durably once the agent handles SIGHUP (before that, SIGHUP would
//! end it), removed when it stops. A pid file left by a killed agent names a process that is
//! gone, or one that is not `bosh-agent`: [`running_agent`] refuses both, so a stale file
//! never makes a command signal a stranger.

use std::path::{Path, PathBuf};

use platform::files::{WriteError, write_durable};
use tracing::warn;

/// The file's name in the run directory.
pub const PID_FILE: &str = "bosh-agent.pid";

/// The process name (`/proc/<pid>/comm`) of the agent.
const AGENT_COMM: &str = "bosh-agent";

/// The pid file of the run directory `run_dir`.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(PID_FILE)
}

/// The pid file of this process; removed on drop if it still names this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's pid to `<run_dir>/bosh-agent.pid` (mode 0644, atomically and
    /// durably: a reader sees the old file or the whole new one).
    pub fn write(run_dir: &Path) -> Result<PidFile, WriteError> {
        let path = path(run_dir);
        write_durable(&path, format!("{}\n", std::process::id()).as_bytes(), 0o644)?;
        Ok(PidFile { path })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Another agent may have started since (and written its own): leave its file.
        if parse(&std::fs::read_to_string(&self.path).unwrap_or_default()) == Ok(std::process::id())
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            warn!(error = %e, path = %self.path.display(), "cannot remove the pid file");
        }
    }
}

/// Why no running agent was found.
#[derive(Debug, thiserror::Error)]
pub enum PidError {
    #[error("no running agent: {path} does not exist")]
    Absent { path: PathBuf },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("no running agent: {path} names pid {pid}, which is not running (a stale file)")]
    Gone { path: PathBuf, pid: u32 },
    #[error(
        "no running agent: {path} names pid {pid}, which is {comm:?}, not bosh-agent (a stale file)"
    )]
    NotTheAgent {
        path: PathBuf,
        pid: u32,
        comm: String,
    },
}

/// The pid in the text of a pid file (one decimal number, then a newline or nothing). Pure.
pub fn parse(text: &str) -> Result<u32, String> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    match t.parse::<u32>() {
        Ok(0) => Err("pid 0 is not a process".into()),
        Ok(pid) if t.bytes().all(|b| b.is_ascii_digit()) => Ok(pid),
        _ => Err(format!("{t:?} is not a pid")),
    }
}

/// The pid of the agent running for `run_dir`: its pid file names a live process whose name
/// is `bosh-agent`.
pub fn running_agent(run_dir: &Path) -> Result<u32, PidError> {
    let path = path(run_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PidError::Absent { path });
        }
        Err(source) => return Err(PidError::Read { path, source }),
    };
    let pid = parse(&text).map_err(|why| PidError::Invalid {
        path: path.clone(),
        why,
    })?;
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Err(_) => Err(PidError::Gone { path, pid }),
        Ok(comm) if comm.trim_end() == AGENT_COMM => Ok(pid),
        Ok(comm) => Err(PidError::NotTheAgent {
            path,
            pid,
            comm: comm.trim_end().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pid_file_holds_one_decimal_pid() {
        assert_eq!(parse("123\n"), Ok(123));
        assert_eq!(parse("123"), Ok(123));
        for bad in [
            "",
            "\n",
            "0\n",
            "-1\n",
            "+5\n",
            " 5\n",
            "5 \n",
            "5\n\n",
            "x",
            "99999999999",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_stale_or_foreign_pid_is_refused_and_the_file_is_removed_only_by_its_writer() {
        let dir = std::env::temp_dir().join(format!("pidfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let e = running_agent(&dir).unwrap_err();
        assert!(matches!(e, PidError::Absent { .. }), "{e}");
        {
            let _f = PidFile::write(&dir).unwrap();
            assert_eq!(
                std::fs::read_to_string(path(&dir)).unwrap(),
                format!("{}\n", std::process::id())
            );
            // This test binary is not named bosh-agent.
            let e = running_agent(&dir).unwrap_err();
            assert!(matches!(e, PidError::NotTheAgent { .. }), "{e}");
            assert!(e.to_string().contains("not bosh-agent"), "{e}");
        }
        assert!(!path(&dir).exists(), "removed by its writer on drop");
        // A pid that no process has (above the kernel's pid_max limit).
        std::fs::write(path(&dir), "4194305\n").unwrap();
        let e = running_agent(&dir).unwrap_err();
        assert!(matches!(e, PidError::Gone { pid: 4_194_305, .. }), "{e}");
        {
            let f = PidFile::write(&dir).unwrap();
            // Replaced by another agent's: the first one's drop leaves it.
            std::fs::write(path(&dir), "4194305\n").unwrap();
            drop(f);
            assert!(path(&dir).exists());
        }
        std::fs::write(path(&dir), "abc\n").unwrap();
        let e = running_agent(&dir).unwrap_err();
        assert!(e.to_string().contains("\"abc\" is not a pid"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
