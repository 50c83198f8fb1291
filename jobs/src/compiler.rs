//! `compile_package`, as upstream's compiler: install the dependencies, unpack the source,
//! run its `packaging` script against an empty bundle, pack and upload the result.
//!
//! Paths (base `/var/vcap`): the source is unpacked to
//! `<base>/data/compile/<name>-bosh-agent-unpack`, then renamed to `<base>/data/compile/<name>`;
//! the bundle is `<base>/data/packages/<name>/<sha1hex(version)>`, enabled as
//! `<base>/packages/<name>`; the script's output goes to
//! `<base>/data/sys/log/compilation/packaging.{stdout,stderr}.log` (`<base>/sys` is a link to
//! `<base>/data/sys` on stemcells, so this is upstream's `/var/vcap/sys/log/compilation`).
//!
//! The packaging script runs in its own process group. [`CompileLimits`] bounds it: when its
//! cancellation token fires or its timeout passes, the whole group is killed (SIGKILL) and the
//! compilation fails; nothing is left installed either way.
//!
//! Blocking, like the applier; callers run it on a blocking thread.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blobstore::{BlobError, Blobs, MultiDigest, Select, Uploaded};
use tokio_util::sync::CancellationToken;

use crate::applier::{
    Applier, ApplyError, Layout, create_dir_owned, disable, enable, io_err, parent_of, remove_all,
    set_mode_owner, sha1_hex, temp_sibling, vcap_gid,
};
use crate::spec::{PackageRef, PackageSpec, SpecError, canonical_digest, check_name};

/// How much of each output stream a packaging failure carries (upstream: 10 KiB).
pub const OUTPUT_TAIL: u64 = 10 * 1024;

/// `PATH` for the packaging script when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The arguments of `compile_package`: `[blob_id, digest, name, version, deps]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileRequest {
    /// The source package's blob.
    pub blob_id: String,
    /// Its digest string.
    pub digest: String,
    /// The package name (a safe path component).
    pub name: String,
    /// The package version (fingerprint).
    pub version: String,
    /// The compiled packages it depends on, by key.
    pub deps: BTreeMap<String, PackageRef>,
}

/// What bounds the packaging script.
#[derive(Debug, Clone, Default)]
pub struct CompileLimits {
    /// Cancelling it kills the script's process group.
    pub cancel: CancellationToken,
    /// The script's process group is killed after this long (`None`: no limit, as upstream).
    pub timeout: Option<Duration>,
}

/// Why a compilation failed. Messages follow upstream's wording where it has one.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The request's name, version or a dependency is invalid.
    #[error(transparent)]
    Request(#[from] SpecError),
    /// The source has no blob id.
    #[error("No blobstore reference for package '{0}'")]
    NoBlob(String),
    /// The source digest cannot be used.
    #[error("Fetching package {name}: invalid digest {digest:?}: {reason}")]
    Digest {
        /// The package.
        name: String,
        /// The digest string.
        digest: String,
        /// Why.
        reason: String,
    },
    /// Installing a dependency failed.
    #[error("Installing dependent package: '{name}': {source}")]
    Dependency {
        /// The dependency.
        name: String,
        /// Why.
        source: ApplyError,
    },
    /// Fetching, verifying or unpacking the source failed.
    #[error("Fetching package {name} from blob {blob}: {source}")]
    Source {
        /// The package.
        name: String,
        /// The blob id.
        blob: String,
        /// Why (boxed: blob errors are large).
        source: Box<BlobError>,
    },
    /// The source archive was refused (hostile or corrupt).
    #[error("Uncompressing package {name} from blob {blob}: {source}")]
    Unpack {
        /// The package.
        name: String,
        /// The blob id.
        blob: String,
        /// Why (boxed, like blob errors).
        source: Box<blobstore::ArchiveError>,
    },
    /// A file-system step failed (removing packages, the bundle, the compile dir, the logs).
    #[error(transparent)]
    Fs(#[from] ApplyError),
    /// The packaging script could not be started.
    #[error("Running packaging script: starting bash in {dir}: {source}")]
    Spawn {
        /// The compile dir.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The packaging script failed, was cancelled or timed out.
    #[error(
        "Running packaging script: {how}; {}: {stdout}, {}: {stderr}",
        if *stdout_truncated { "Truncated stdout" } else { "Stdout" },
        if *stderr_truncated { "Truncated stderr" } else { "Stderr" }
    )]
    Packaging {
        /// `Command exited with <code>`, or that it was cancelled or timed out.
        how: String,
        /// The last [`OUTPUT_TAIL`] bytes of stdout.
        stdout: String,
        /// Whether stdout was longer.
        stdout_truncated: bool,
        /// The last [`OUTPUT_TAIL`] bytes of stderr.
        stderr: String,
        /// Whether stderr was longer.
        stderr_truncated: bool,
    },
    /// `tar` of the install dir failed.
    #[error("Compressing compiled package {dir}: {reason}")]
    Pack {
        /// The install dir.
        dir: PathBuf,
        /// Exit status and stderr, or why it could not run.
        reason: String,
    },
    /// Uploading the compiled package failed.
    #[error("Uploading compiled package: {0}")]
    Upload(#[source] Box<BlobError>),
}

/// Compiles the package of `request` on the VM rooted at `base` and uploads it; returns the
/// new blob (a fresh UUID and the sha1 of the archive).
///
/// As upstream: every installed package is removed first; each dependency is installed and
/// enabled as `<base>/packages/<dep>`; the source is fetched, verified and unpacked; the
/// bundle is created empty and enabled; `bash -x packaging` runs (if the source has one) in
/// the compile dir with `BOSH_COMPILE_TARGET`, `BOSH_INSTALL_TARGET=<base>/packages/<name>`,
/// `BOSH_PACKAGE_NAME` and `BOSH_PACKAGE_VERSION` added to the agent's environment (and
/// [`DEFAULT_PATH`] if it has no `PATH`); the bundle is packed (`tar -C <bundle> -cf - .`,
/// gzipped unless the source was a plain tar) and uploaded. Whatever the outcome, the bundle,
/// the dependencies and the compile dir are removed afterwards.
pub fn compile_package(
    blobs: &Blobs,
    base: &Path,
    request: &CompileRequest,
    limits: &CompileLimits,
) -> Result<Uploaded, CompileError> {
    check_name("package", &request.name)?;
    if request.version.is_empty() {
        return Err(SpecError::MissingVersion {
            what: "package",
            name: request.name.clone(),
        }
        .into());
    }
    if request.blob_id.is_empty() {
        return Err(CompileError::NoBlob(request.name.clone()));
    }
    check_name("blob", &request.blob_id)?;
    let digest_err = |reason: String| CompileError::Digest {
        name: request.name.clone(),
        digest: request.digest.clone(),
        reason,
    };
    let canonical = canonical_digest(&request.digest).map_err(|r| digest_err(r.to_string()))?;
    let digest = MultiDigest::parse(&canonical).map_err(|e| digest_err(e.to_string()))?;
    let deps = request
        .deps
        .values()
        .cloned()
        .map(PackageSpec::from_raw)
        .collect::<Result<Vec<_>, _>>()?;

    let applier = Applier::new(blobs.clone(), base);
    let layout = applier.layout().clone();
    applier.keep_only_packages(&[])?;
    let result = compile_with_deps(&applier, &layout, request, &digest, &deps, limits);
    // Upstream keeps no packages after a compilation; on failure neither.
    let cleanup = applier.keep_only_packages(&[]);
    let uploaded = result?;
    cleanup?;
    Ok(uploaded)
}

fn compile_with_deps(
    applier: &Applier,
    layout: &Layout,
    request: &CompileRequest,
    digest: &MultiDigest,
    deps: &[PackageSpec],
    limits: &CompileLimits,
) -> Result<Uploaded, CompileError> {
    for dep in deps {
        applier
            .apply_package(dep)
            .map_err(|source| CompileError::Dependency {
                name: dep.name.clone(),
                source,
            })?;
    }
    let compile_path = layout.compile_dir().join(&request.name);
    let result = compile_in(applier, layout, request, digest, &compile_path, limits);
    let cleanup = remove_all(&compile_path);
    let uploaded = result?;
    cleanup?;
    Ok(uploaded)
}

fn compile_in(
    applier: &Applier,
    layout: &Layout,
    request: &CompileRequest,
    digest: &MultiDigest,
    compile_path: &Path,
    limits: &CompileLimits,
) -> Result<Uploaded, CompileError> {
    let gzip = unpack_source(applier.blobs(), request, digest, compile_path)?;

    let install = layout
        .data()
        .join("packages")
        .join(&request.name)
        .join(sha1_hex(request.version.as_bytes()));
    let enable_path = layout.package_enable(&request.name);
    let gid = vcap_gid();
    remove_all(&install)?;
    create_dir_owned(parent_of(&install)?, 0o755, gid)?;
    std::fs::create_dir(&install).map_err(io_err("Creating package bundle", &install))?;
    set_mode_owner(&install, 0o755, gid)?;

    let result = (|| {
        enable(&install, &enable_path, 0o755, gid)?;
        if compile_path.join("packaging").exists() {
            run_packaging(layout, compile_path, &enable_path, request, limits)?;
        }
        let tarball = temp_sibling(compile_path, "compiled.tgz");
        let packed = pack(&install, &tarball, gzip).and_then(|()| {
            applier
                .blobs()
                .upload(&tarball)
                .map_err(|e| CompileError::Upload(Box::new(e)))
        });
        let _ = std::fs::remove_file(&tarball);
        packed
    })();
    let unlinked = disable(&enable_path, &install);
    let removed = remove_all(&install);
    let uploaded = result?;
    unlinked?;
    removed?;
    Ok(uploaded)
}

/// Fetches and verifies the source, then unpacks it to `<compile>-bosh-agent-unpack` and
/// renames that to `compile_path`. Returns whether the source was gzipped.
fn unpack_source(
    blobs: &Blobs,
    request: &CompileRequest,
    digest: &MultiDigest,
    compile_path: &Path,
) -> Result<bool, CompileError> {
    let compile_dir = parent_of(compile_path)?;
    std::fs::create_dir_all(compile_dir).map_err(io_err("Creating", compile_dir))?;
    let unpack_path = PathBuf::from(format!("{}-bosh-agent-unpack", compile_path.display()));
    remove_all(compile_path)?;
    remove_all(&unpack_path)?;

    // Downloaded (and verified) once, sniffed for gzip (the compiled package is packed the
    // same way), then unpacked from the local copy by the blobstore's safe tar reader.
    let scratch = temp_sibling(compile_path, "source");
    let result = (|| {
        std::fs::create_dir_all(&scratch).map_err(io_err("Creating", &scratch))?;
        let file = scratch.join("blob");
        blobs
            .download(&request.blob_id, digest, &file)
            .map_err(|source| CompileError::Source {
                name: request.name.clone(),
                blob: request.blob_id.clone(),
                source: Box::new(source),
            })?;
        let gzip = is_gzip(&file).map_err(io_err("Reading", &file))?;
        std::fs::create_dir(&unpack_path).map_err(io_err("Creating", &unpack_path))?;
        let reader = std::fs::File::open(&file).map_err(io_err("Opening", &file))?;
        blobstore::archive::unpack(std::io::BufReader::new(reader), &unpack_path, &Select::All)
            .map_err(|source| CompileError::Unpack {
                name: request.name.clone(),
                blob: request.blob_id.clone(),
                source: Box::new(source),
            })?;
        std::fs::rename(&unpack_path, compile_path).map_err(io_err(
            "Moving temporary compile directory to",
            compile_path,
        ))?;
        Ok(gzip)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&unpack_path);
    }
    result
}

fn is_gzip(file: &Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 2];
    let mut f = std::fs::File::open(file)?;
    let n = f.read(&mut magic)?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

fn run_packaging(
    layout: &Layout,
    compile_path: &Path,
    enable_path: &Path,
    request: &CompileRequest,
    limits: &CompileLimits,
) -> Result<(), CompileError> {
    let logs = layout.data().join("sys").join("log").join("compilation");
    remove_all(&logs)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&logs)
        .map_err(io_err("Creating log dir", &logs))?;
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o750))
        .map_err(io_err("Setting mode of", &logs))?;
    let open = |name: &str| {
        let path = logs.join(name);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&path)
            .map_err(io_err("Opening", &path))
    };
    let mut stdout = open("packaging.stdout.log")?;
    let mut stderr = open("packaging.stderr.log")?;

    let mut command = Command::new("bash");
    command
        .args(["-x", "packaging"])
        .current_dir(compile_path)
        .env("BOSH_COMPILE_TARGET", compile_path)
        .env("BOSH_INSTALL_TARGET", enable_path)
        .env("BOSH_PACKAGE_NAME", &request.name)
        .env("BOSH_PACKAGE_VERSION", &request.version)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().map_err(io_err("Opening", &logs))?)
        .stderr(stderr.try_clone().map_err(io_err("Opening", &logs))?)
        // Its own group, so that cancelling kills what the script started too.
        .process_group(0);
    if std::env::var_os("PATH").is_none_or(|p| p.is_empty()) {
        command.env("PATH", DEFAULT_PATH);
    }
    let mut child = command.spawn().map_err(|source| CompileError::Spawn {
        dir: compile_path.to_path_buf(),
        source,
    })?;
    let started = Instant::now();
    let how = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                break format!("Command exited with {}", status.code().unwrap_or(-1));
            }
            Ok(None) => {}
            Err(e) => break format!("waiting for the script: {e}"),
        }
        let stop = if limits.cancel.is_cancelled() {
            Some("Command cancelled".to_string())
        } else {
            limits
                .timeout
                .filter(|t| started.elapsed() >= *t)
                .map(|t| format!("Command timed out after {t:?}"))
        };
        if let Some(how) = stop {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break how;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stdout_truncated) = tail(&mut stdout);
    let (stderr, stderr_truncated) = tail(&mut stderr);
    Err(CompileError::Packaging {
        how,
        stdout,
        stdout_truncated,
        stderr,
        stderr_truncated,
    })
}

/// The last [`OUTPUT_TAIL`] bytes of `file` (lossy UTF-8) and whether it was longer.
fn tail(file: &mut std::fs::File) -> (String, bool) {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let offset = len.saturating_sub(OUTPUT_TAIL);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_ok() {
        let _ = file.take(OUTPUT_TAIL).read_to_end(&mut buf);
    }
    (String::from_utf8_lossy(&buf).into_owned(), offset > 0)
}

/// `tar -cf <out> -C <dir> [-z] .`, as upstream packs a compiled package.
fn pack(dir: &Path, out: &Path, gzip: bool) -> Result<(), CompileError> {
    let mut command = Command::new("tar");
    command.arg("-cf").arg(out).arg("-C").arg(dir);
    if gzip {
        command.arg("-z");
    }
    command.arg(".").stdin(Stdio::null());
    let fail = |reason: String| CompileError::Pack {
        dir: dir.to_path_buf(),
        reason,
    };
    let output = command
        .output()
        .map_err(|e| fail(format!("running tar: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "tar {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}
