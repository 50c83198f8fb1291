//! What the benchmark binaries share: small statistics ([`stats`]), `/proc` readers
//! ([`procfs`]), the cleanup that runs when `Drop` cannot ([`cleanup`]), knobs from the
//! environment and machine facts.

pub mod cleanup;
pub mod procfs;
pub mod stats;

use std::process::{Command, Stdio};

/// A benchmark step's result: the error says what failed, for the table's reader.
pub type Res<T> = Result<T, String>;

/// `key` from the environment as a number, `default` when unset; an error when it does not
/// parse.
pub fn env_num<T: std::str::FromStr>(key: &str, default: T) -> Res<T> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{key}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The first non-empty line `cmd args` prints (stdout, then stderr), or `unknown`.
pub fn first_line_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a benchmark needs before it starts: root (`why` says what for), each of `binaries`
/// (path, Debian package), the sandbox's prerequisites and the release binaries under test.
pub fn prerequisites(why: &str, binaries: &[(&str, &str)]) -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(format!("run as root: {why}"));
    }
    for (bin, pkg) in binaries {
        if !std::path::Path::new(bin).is_file() {
            return Err(format!("{bin} is missing (apt-get install {pkg})"));
        }
    }
    crate::check_prerequisites().map_err(|e| e.to_string())?;
    crate::Tools::get()
        .map_err(|e| format!("{e} (build with `cargo build --release -p cli -p integration`)"))?;
    Ok(())
}
