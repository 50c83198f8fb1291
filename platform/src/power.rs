//! `shutdown`: power the VM off as upstream's agent does, `shutdown -P 0`; the command is
//! configurable so that tests never power off the machine they run on. The action's value is
//! `""`.

use std::ffi::OsString;
use std::process::Command;

/// The power-off command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to shutdown: {command}: {detail}")]
pub struct ShutdownError {
    /// The command line run.
    pub command: String,
    /// How it failed.
    pub detail: String,
}

/// The power-off command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerOff {
    /// Program then arguments.
    pub argv: Vec<OsString>,
}

impl Default for PowerOff {
    /// Upstream's `shutdown -P 0`.
    fn default() -> Self {
        PowerOff {
            argv: vec!["shutdown".into(), "-P".into(), "0".into()],
        }
    }
}

impl PowerOff {
    /// Runs the command and waits for it; an error when it cannot start or exits non-zero.
    pub fn run(&self) -> Result<(), ShutdownError> {
        let command = self
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let Some((program, args)) = self.argv.split_first() else {
            return Err(ShutdownError {
                command,
                detail: "no command configured".into(),
            });
        };
        let out = Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| ShutdownError {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(ShutdownError {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_command_and_configured_ones() {
        assert_eq!(PowerOff::default().argv, vec!["shutdown", "-P", "0"]);
        let dir = std::env::temp_dir().join(format!("platform-power-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("powered-off");
        let ok = PowerOff {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("echo \"$0 $1\" > {}", marker.display()).into(),
                "-P".into(),
                "0".into(),
            ],
        };
        ok.run().unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "-P 0\n");
        let failing = PowerOff {
            argv: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
        };
        let e = failing.run().unwrap_err();
        assert!(e.to_string().starts_with("Failed to shutdown"), "{e}");
        assert!(e.detail.contains("nope") && e.detail.contains('3'), "{e}");
        let missing = PowerOff {
            argv: vec!["/nonexistent/shutdown".into()],
        };
        assert!(
            missing
                .run()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/shutdown")
        );
        assert!(PowerOff { argv: vec![] }.run().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
