//! `File`: a settings file on this box (warden's env file, Azure's CustomData, a bootstrap
//! file), read as the agent always has: JSON, and an object.

use std::path::Path;

use serde_json::Value;

use super::error::FetchError;
use super::options::FileOptions;
use super::user_data::settings_document;

/// The settings in `SettingsPath`.
pub fn settings(options: &FileOptions) -> Result<Value, FetchError> {
    let path = settings_path(options)?;
    let bytes = std::fs::read(path).map_err(|source| FetchError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    settings_document(&bytes, &path.display().to_string())
}

/// Upstream's answer for the public key: none, but an error when the settings file is
/// missing (so that the next source is asked).
pub fn public_ssh_key(options: &FileOptions) -> Result<Option<String>, FetchError> {
    let path = settings_path(options)?;
    match std::fs::metadata(path) {
        Ok(_) => Ok(None),
        Err(source) => Err(FetchError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn settings_path(options: &FileOptions) -> Result<&Path, FetchError> {
    if options.settings_path.is_empty() {
        return Err(FetchError::Config("SettingsPath is empty".into()));
    }
    Ok(Path::new(&options.settings_path))
}
