//! What every sandbox needs (root, nft, the util-linux tools, a cgroup2 hierarchy) and the
//! binaries under test, found beside the running executable and built when stale.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use testkit::io_ctx;

use crate::{NFT_CGROUP_ROOT, Result, err, run_with_timeout};

/// Checks what every sandbox needs and says what is missing: root, `nft`, the util-linux
/// tools, and a cgroup2 hierarchy. Tests call this through [`Sandbox::new`] and fail (never
/// skip) with the reason.
pub fn check_prerequisites() -> Result<()> {
    static CHECK: OnceLock<Result<()>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            let euid = nix::unistd::geteuid();
            if !euid.is_root() {
                return err(format!(
                    "the integration tests need root (network namespaces, cgroups, nft); running as euid {euid}"
                ));
            }
            for tool in ["nft", "unshare", "nsenter", "setpriv", "ip", "sh"] {
                if find_in_path(tool).is_none() {
                    let hint = if tool == "nft" { " (apt-get install nftables)" } else { "" };
                    return err(format!("{tool} is not on PATH{hint}"));
                }
            }
            cgroup2_mount().map(|_| ())
        })
        .clone()
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The cgroup2 mount, from the kernel's own answer (statfs magic): `/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    for p in [NFT_CGROUP_ROOT, "/sys/fs/cgroup/unified"] {
        if statfs(p)
            .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
        {
            return Ok(PathBuf::from(p));
        }
    }
    err("no cgroup2 hierarchy: neither /sys/fs/cgroup nor /sys/fs/cgroup/unified is cgroup2")
}

/// The binaries under test.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `bosh-agent` (override: `BOSH_AGENT_BIN`).
    pub agent: PathBuf,
    /// `netprobe` of this crate (override: `NETPROBE_BIN`).
    pub netprobe: PathBuf,
}

impl Tools {
    /// Finds the binaries next to the running executable (`target/<profile>/`). Under cargo
    /// (`CARGO` is set), first runs `cargo build -p cli` for the same profile and target
    /// directory once per process, so the tests never run a stale agent: `cargo test -p
    /// integration` alone does not build another package's binary.
    pub fn get() -> Result<&'static Tools> {
        static TOOLS: OnceLock<Result<Tools>> = OnceLock::new();
        TOOLS
            .get_or_init(Tools::locate)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn locate() -> Result<Tools> {
        let exe = std::env::current_exe().map_err(io_ctx("current executable"))?;
        let mut bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if bin_dir.file_name() == Some(OsStr::new("deps")) {
            bin_dir.pop();
        }
        let agent = match std::env::var_os("BOSH_AGENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                if let Some(cargo) = std::env::var_os("CARGO") {
                    build_agent(&cargo, &bin_dir)?;
                }
                bin_dir.join("bosh-agent")
            }
        };
        let netprobe = std::env::var_os("NETPROBE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_dir.join("netprobe"));
        for (p, how) in [
            (&agent, "cargo build -p cli"),
            (&netprobe, "cargo build -p integration"),
        ] {
            if !p.is_file() {
                return err(format!("{} does not exist: run `{how}` first", p.display()));
            }
        }
        Ok(Tools { agent, netprobe })
    }
}

fn build_agent(cargo: &OsStr, bin_dir: &Path) -> Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "cli", "--manifest-path"])
        .arg(&manifest);
    match bin_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target) = bin_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    // The variables cargo sets for this test binary describe the integration package, not
    // the build: a build script that tracks one (ring's tracks CARGO_MANIFEST_DIR) would see
    // it change between this build and a plain `cargo build`, and every test run would
    // rebuild the TLS stack and the agent.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k == "CARGO_MANIFEST_DIR"
            || k == "CARGO_MANIFEST_PATH"
            || k == "CARGO_PRIMARY_PACKAGE"
            || k == "CARGO_TARGET_TMPDIR"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_CRATE_")
            || k.starts_with("CARGO_BIN_")
        {
            cmd.env_remove(&key);
        }
    }
    let out = run_with_timeout(cmd, Duration::from_secs(600), "cargo build -p cli")?;
    if !out.status.success() {
        return err(format!(
            "cargo build -p cli failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
