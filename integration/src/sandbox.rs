//! One test's world: a temporary directory, a network namespace, a cgroup subtree and a
//! private agent run directory, and commands placed in them.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use testkit::{Place, io_ctx};

use crate::{Cgroup, CgroupDir, Exec, Netns, Result, TempDir, Tools, check_prerequisites};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A number no other call in this process got: unique file names in the sandbox directory.
pub(crate) fn next_seq() -> usize {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// One test's world: a temporary directory, a network namespace, a cgroup subtree, and a
/// private agent run directory shared by the agent and every one-shot command of the test.
/// Dropped in this order: cgroups, network namespace, directory.
#[derive(Debug)]
pub struct Sandbox {
    pub(crate) cgroup: Cgroup,
    pub(crate) netns: Netns,
    pub(crate) dir: TempDir,
    pub(crate) run_dir: PathBuf,
    pub(crate) tools: &'static Tools,
    pub(crate) name: String,
}

impl Sandbox {
    /// Creates a sandbox; fails with the reason when a prerequisite is missing.
    pub fn new(name: &str) -> Result<Self> {
        check_prerequisites()?;
        let tools = Tools::get()?;
        let dir = TempDir::new("bosh-agent-test")?;
        let netns = Netns::create(&dir.path().join("netns"))?;
        let cgroup = Cgroup::create()?;
        let run_dir = dir.path().join("run");
        fs::create_dir(&run_dir).map_err(io_ctx("creating the run dir"))?;
        Ok(Sandbox {
            cgroup,
            netns,
            dir,
            run_dir,
            tools,
            name: name.to_string(),
        })
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an executable script `name` into the sandbox directory and returns its path.
    pub fn script(&self, name: &str, body: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir().join(name);
        fs::write(&path, body).map_err(io_ctx(format!("writing {}", path.display())))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(io_ctx(format!("chmod {}", path.display())))?;
        Ok(path)
    }

    /// An `nft` (for `BOSH_AGENT_NFT`) that refuses the agent's self-test rules, as a kernel
    /// without `socket` support would, and passes everything else to the real nft: the agent
    /// then falls back to uid matching.
    pub fn nft_refusing_selftest(&self) -> Result<PathBuf> {
        self.script(
            "nft-without-selftest",
            "#!/bin/sh\n\
             if [ \"$1\" = -f ] && [ \"$2\" = - ]; then\n\
               s=$(cat)\n\
               case \"$s\" in *'comment \"level='*) echo 'Error: Could not process rule: No such file or directory (simulated)' >&2; exit 1;; esac\n\
               printf '%s\\n' \"$s\" | exec nft -f -\n\
             fi\n\
             exec nft \"$@\"\n",
        )
    }

    /// The agent run directory (`BOSH_AGENT_RUN_DIR` of everything started here).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The binaries.
    pub fn tools(&self) -> &Tools {
        self.tools
    }

    /// The sandbox's own cgroup (everything it creates is below it).
    pub fn top_cgroup(&self) -> &CgroupDir {
        self.cgroup.dir()
    }

    /// Creates (if needed) the cgroup `name` below the sandbox's cgroup.
    pub fn cgroup(&self, name: &str) -> Result<CgroupDir> {
        self.cgroup.child(name)
    }

    /// Where a helper's processes run: this sandbox's namespace and cgroup `name` (created).
    pub fn place(&self, name: &str) -> Result<Place> {
        Ok(Place {
            netns: Some(self.netns.file().to_path_buf()),
            mountns: None,
            cgroup: Some(self.cgroup(name)?.path().to_path_buf()),
        })
    }

    /// A fresh log file path in the sandbox directory.
    pub fn log_path(&self, label: &str) -> PathBuf {
        let n = next_seq();
        self.dir().join(format!("{label}-{n}.log"))
    }

    /// `argv` in this sandbox's network namespace, with its run directory.
    pub fn exec<I, S>(&self, argv: I) -> Exec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Exec::new(argv)
            .netns(self.netns.file())
            .env("BOSH_AGENT_RUN_DIR", &self.run_dir)
    }

    /// `bosh-agent <args>` in this sandbox.
    pub fn agent_cmd<I, S>(&self, args: I) -> Exec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv: Vec<OsString> = vec![self.tools.agent.clone().into_os_string()];
        argv.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self.exec(argv)
    }

    /// The sandbox's name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }
}
