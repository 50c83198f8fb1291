//! [`Blobs`]: local sources, then the provider. See the crate documentation.

use std::path::{Path, PathBuf};

use crate::archive::Select;
use crate::digest::MultiDigest;
use crate::provider::Provider;

/// A blob the agent created in the blobstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// A fresh UUID (the director checks it is one).
    pub blobstore_id: String,
    /// Plain sha1 hex, as upstream returns it.
    pub sha1: String,
}

/// Why a blob could not be fetched, verified, unpacked or uploaded.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("placeholder")]
    Placeholder,
}

/// The agent's view of blobs: `<data>/sensitive_blobs/<id>`, then `<data>/blobs/<id>`, then
/// the provider.
#[derive(Debug, Clone)]
pub struct Blobs {
    pub provider: Provider,
    /// `<base>/data`.
    pub data_dir: PathBuf,
}

impl Blobs {
    /// Fetches blob `id`, verifies it against `digest` and unpacks the `select`ed entries into
    /// `dest`, in one pass. `dest` must not exist; on success it exists and holds exactly the
    /// archive's entries; on any error it does not exist.
    pub fn unpack(
        &self,
        id: &str,
        digest: &MultiDigest,
        dest: &Path,
        select: &Select,
    ) -> Result<(), BlobError> {
        let _ = (id, digest, dest, select);
        todo!("helper fills in")
    }

    /// Fetches blob `id` into the file `dest` (created), verified; on error `dest` is absent.
    pub fn download(&self, id: &str, digest: &MultiDigest, dest: &Path) -> Result<(), BlobError> {
        let _ = (id, digest, dest);
        todo!("helper fills in")
    }

    /// Uploads `file` under a new UUID; returns the id and the file's sha1.
    pub fn upload(&self, file: &Path) -> Result<Uploaded, BlobError> {
        let _ = file;
        todo!("helper fills in")
    }
}
