//! `ConfigDrive` (OpenStack, Azure): the first of `DiskPaths` that gives the file wins. A path
//! is a block device (mounted read-only on a private directory while the file is read) or a
//! directory (read in place). The settings are the JSON at `UserDataPath` (upstream reads no
//! other file for them), vcap's key is `public-keys."0"."openssh-key"` of `MetaDataPath`.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde_json::Value;

use super::Context;
use super::error::{FetchError, json_error};
use super::mount::{ReadOnlyMount, inside};
use super::options::ConfigDriveOptions;
use super::user_data::settings_document;

/// The settings at `UserDataPath` on the first drive that has it.
pub fn settings(options: &ConfigDriveOptions, ctx: &Context) -> Result<Value, FetchError> {
    let (bytes, what) = read_file(options, &options.user_data_path, ctx)?;
    settings_document(&bytes, &what)
}

/// vcap's key from `MetaDataPath`: `None` when the metadata lists none.
pub fn public_ssh_key(
    options: &ConfigDriveOptions,
    ctx: &Context,
) -> Result<Option<String>, FetchError> {
    let (bytes, what) = read_file(options, &options.meta_data_path, ctx)?;
    let meta: Value = serde_json::from_slice(&bytes).map_err(|e| json_error(&what, &e))?;
    Ok(meta
        .get("public-keys")
        .and_then(|k| k.get("0"))
        .and_then(|k| k.get("openssh-key"))
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// The bytes of `relative` and a name for it (`<disk path>:<relative>`).
fn read_file(
    options: &ConfigDriveOptions,
    relative: &str,
    ctx: &Context,
) -> Result<(Vec<u8>, String), FetchError> {
    if options.disk_paths.is_empty() {
        return Err(FetchError::Config("DiskPaths is empty".into()));
    }
    // Checked once, before any drive is touched.
    inside(Path::new("/"), relative)?;
    let mut tried = Vec::new();
    for disk in &options.disk_paths {
        match read_from(Path::new(disk), relative, ctx) {
            Ok(bytes) => {
                tracing::debug!(disk = %disk, file = relative, "read from the config drive");
                return Ok((bytes, format!("{disk}:{relative}")));
            }
            Err(e) => {
                tracing::warn!(disk = %disk, error = %e, "config drive path failed");
                tried.push(format!("{disk}: {e}"));
            }
        }
    }
    Err(FetchError::NoDrive {
        file: relative.to_string(),
        tried: tried.join("; "),
    })
}

fn read_from(disk: &Path, relative: &str, ctx: &Context) -> Result<Vec<u8>, FetchError> {
    let meta = fs::metadata(disk).map_err(|source| FetchError::Read {
        path: disk.to_path_buf(),
        source,
    })?;
    let read = |root: &Path| -> Result<Vec<u8>, FetchError> {
        let path = inside(root, relative)?;
        fs::read(&path).map_err(|source| FetchError::Read { path, source })
    };
    if meta.is_dir() {
        return read(disk);
    }
    if !meta.file_type().is_block_device() {
        return Err(FetchError::Config(format!(
            "{} is neither a block device nor a directory",
            disk.display()
        )));
    }
    let mount = ReadOnlyMount::new(disk, &ctx.scratch_dir)?;
    let result = read(mount.dir());
    // Unmounted whether or not the file was there.
    let unmounted = mount.unmount();
    let bytes = result?;
    unmounted?;
    Ok(bytes)
}
