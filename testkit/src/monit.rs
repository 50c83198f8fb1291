//! A real monit (Debian's `/usr/bin/monit`): its control file (HTTP API on 127.0.0.1 with
//! `allow cleartext <user file>`, its own pid, state, id and log files) and the daemon in the
//! foreground (`monit -I`), ready once its CLI gets an answer from it.
//!
//! What the checks in the control file start is the caller's to clean up (a sandbox kills
//! what is left in monit's cgroup, a unit test what its pid files name); this module stops
//! monit itself, by its PID.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::error::{Error, Result, io_ctx, require_binary, wait_for};
use crate::process::{Exec, Place, Proc, describe};

/// Debian's monit (package `monit`).
pub const MONIT_BIN: &str = "/usr/bin/monit";
/// How long monit may take to answer its CLI after being started.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one `monit` CLI command.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The monit binary: `$TESTKIT_MONIT` when set, else [`MONIT_BIN`]; an error when it is not
/// there.
pub fn monit_binary() -> Result<PathBuf> {
    let path = std::env::var_os("TESTKIT_MONIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MONIT_BIN));
    require_binary(&path, "monit")?;
    Ok(path)
}

/// A monit control file.
#[derive(Debug, Clone)]
pub struct ControlFile {
    /// The HTTP API's port on 127.0.0.1.
    pub port: u16,
    /// `user:password`, as `allow cleartext` reads it (the agent's `monit.user`).
    pub user_file: PathBuf,
    /// Where monit's pid, state, id and log files go.
    pub run_dir: PathBuf,
    /// The rest: mail settings, checks.
    pub body: String,
}

impl ControlFile {
    /// The file's text.
    pub fn render(&self) -> String {
        let rd = self.run_dir.display();
        format!(
            "set daemon 1\n\
             set httpd port {} and use address 127.0.0.1\n  allow cleartext {}\n\
             set pidfile {rd}/monit.pid\n\
             set statefile {rd}/monit.state\n\
             set idfile {rd}/monit.id\n\
             set logfile {rd}/monit.log\n{}",
            self.port,
            self.user_file.display(),
            self.body
        )
    }

    /// Writes it to `path` with mode 0600 (monit refuses a control file others can read),
    /// creating the parent directory.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_ctx(format!("mkdir {}", dir.display())))?;
        }
        fs::write(path, self.render()).map_err(io_ctx(format!("writing {}", path.display())))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(io_ctx(format!("chmod {}", path.display())))
    }
}

/// `monit -c <control file> <args>` at `place`, with [`CLI_TIMEOUT`].
pub fn cli(binary: &Path, control_file: &Path, place: &Place, args: &[&str]) -> Result<Output> {
    let mut argv: Vec<&std::ffi::OsStr> =
        vec![binary.as_os_str(), "-c".as_ref(), control_file.as_os_str()];
    argv.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    Exec::new(argv).place(place).output(CLI_TIMEOUT)
}

/// A running `monit -I -c <control file>`; killed by PID on drop.
#[derive(Debug)]
pub struct MonitDaemon {
    binary: PathBuf,
    control_file: PathBuf,
    proc: Proc,
}

impl MonitDaemon {
    /// Starts monit at `place` (stdout and stderr to `log`) and waits until `monit summary`,
    /// run at `cli_place`, succeeds.
    pub fn start(
        binary: &Path,
        control_file: &Path,
        place: &Place,
        cli_place: &Place,
        log: &Path,
    ) -> Result<Self> {
        let proc = Exec::new([
            binary.as_os_str(),
            "-I".as_ref(),
            "-c".as_ref(),
            control_file.as_os_str(),
        ])
        .place(place)
        .log(log)
        .spawn()?;
        let mut daemon = MonitDaemon {
            binary: binary.to_path_buf(),
            control_file: control_file.to_path_buf(),
            proc,
        };
        let mut last = String::new();
        let res = wait_for("monit's CLI to reach the daemon", START_TIMEOUT, || {
            if let Some(st) = daemon.proc.try_status()? {
                return Err(Error(format!(
                    "monit exited ({st}): {}",
                    daemon.proc.log_text()
                )));
            }
            let out = cli(
                &daemon.binary,
                &daemon.control_file,
                cli_place,
                &["summary"],
            )?;
            last = describe(&out);
            Ok(out.status.success().then_some(()))
        });
        res.map_err(|e| Error(format!("{e}; last `monit summary`: {last}")))?;
        Ok(daemon)
    }

    /// Monit's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What monit wrote to stdout and stderr.
    pub fn output_text(&self) -> String {
        self.proc.log_text()
    }

    /// SIGTERM, then waits up to `timeout` (drop kills it by PID if it lingers).
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        self.proc.terminate(timeout).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_file_has_the_api_and_the_files() {
        let c = ControlFile {
            port: 2822,
            user_file: "/b/monit/monit.user".into(),
            run_dir: "/r".into(),
            body: "check process x with pidfile /x.pid\n".into(),
        };
        assert_eq!(
            c.render(),
            "set daemon 1\n\
             set httpd port 2822 and use address 127.0.0.1\n  allow cleartext /b/monit/monit.user\n\
             set pidfile /r/monit.pid\nset statefile /r/monit.state\nset idfile /r/monit.id\n\
             set logfile /r/monit.log\ncheck process x with pidfile /x.pid\n"
        );
    }
}
