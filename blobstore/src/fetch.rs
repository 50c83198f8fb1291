//! [`Blobs`]: local sources, then the provider. See the crate documentation.
//!
//! A blob is read once: the bytes go through the digest's hasher and, for
//! [`Blobs::unpack`], the tar reader at the same time; after the archive's end the rest of the
//! stream is read too, so the digest covers every byte. Memory use does not depend on the
//! blob's size. Nothing is left behind on failure: an unpack goes to a temporary sibling of
//! its destination and is renamed into place only after the digest matched.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::archive::{self, ArchiveError, Select};
use crate::digest::{DigestError, HashingReader, MultiDigest};
use crate::provider::{self, BlobReader, Provider, ProviderError};

/// A blob the agent created in the blobstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// A fresh UUID (the director checks it is one).
    pub blobstore_id: String,
    /// Plain sha1 hex, as upstream returns it.
    pub sha1: String,
}

/// Why a blob could not be fetched, verified, unpacked or uploaded. Every variant names the
/// blob id (for an upload, the file) it is about.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The provider refused or failed (bad id, HTTP status, transport, command line).
    #[error("blob '{id}': {source}")]
    Provider {
        id: String,
        #[source]
        source: ProviderError,
    },
    /// The bytes do not match the expected digest (the error names both digests).
    #[error("blob '{id}': {source}")]
    Digest {
        id: String,
        #[source]
        source: DigestError,
    },
    /// The archive is unreadable or hostile, or writing it out failed.
    #[error("blob '{id}': {source}")]
    Archive {
        id: String,
        #[source]
        source: ArchiveError,
    },
    /// A local file operation failed.
    #[error("blob '{id}': {what} {}: {source}", path.display())]
    Io {
        id: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The destination already exists.
    #[error("blob '{id}': destination {} already exists", path.display())]
    Exists { id: String, path: PathBuf },
}

impl BlobError {
    /// Whether the error is a digest mismatch.
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            BlobError::Digest {
                source: DigestError::Mismatch { .. },
                ..
            }
        )
    }
}

/// Where a blob's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `<data>/sensitive_blobs/<id>`.
    Sensitive,
    /// `<data>/blobs/<id>`.
    Local,
    /// The configured provider.
    Provider,
}

/// Maps an I/O error of step `what` on `path` for blob `id`.
fn io_error(
    id: &str,
    what: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> BlobError + use<> {
    let (id, path) = (id.to_string(), path.to_path_buf());
    move |source| BlobError::Io {
        id,
        what,
        path,
        source,
    }
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
    /// Blobs from `provider`, with the local sources and temporary files under `data_dir`.
    pub fn new(provider: Provider, data_dir: impl Into<PathBuf>) -> Self {
        Blobs {
            provider,
            data_dir: data_dir.into(),
        }
    }

    /// Opens blob `id` from the first source that has it (a local source is used when its
    /// file exists; the provider otherwise).
    pub fn open(&self, id: &str) -> Result<(BlobReader, Source), BlobError> {
        let perr = |source| BlobError::Provider {
            id: id.to_string(),
            source,
        };
        provider::validate_id(id).map_err(perr)?;
        for (sub, source) in [
            ("sensitive_blobs", Source::Sensitive),
            ("blobs", Source::Local),
        ] {
            let path = self.data_dir.join(sub).join(id);
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let dir = Provider::Local {
                dir: self.data_dir.join(sub),
            };
            return dir
                .open(id, &self.tmp_dir())
                .map(|r| (r, source))
                .map_err(perr);
        }
        self.provider
            .open(id, &self.tmp_dir())
            .map(|r| (r, Source::Provider))
            .map_err(perr)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }

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
        if fs::symlink_metadata(dest).is_ok() {
            return Err(BlobError::Exists {
                id: id.to_string(),
                path: dest.to_path_buf(),
            });
        }
        let (parent, name) = match (dest.parent(), dest.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => {
                return Err(BlobError::Io {
                    id: id.to_string(),
                    what: "unpacking into",
                    path: dest.to_path_buf(),
                    source: io::Error::other("not a path with a parent and a name"),
                });
            }
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let (reader, source) = self.open(id)?;
        fs::create_dir_all(parent).map_err(io_error(id, "creating", parent))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let tmp = parent.join(tmp_name);
        fs::create_dir(&tmp).map_err(io_error(id, "creating", &tmp))?;
        let result = (|| {
            let mut hashing = HashingReader::new(reader, digest.algorithm());
            let stats = archive::unpack(&mut hashing, &tmp, select).map_err(|source| {
                BlobError::Archive {
                    id: id.to_string(),
                    source,
                }
            })?;
            let (actual, size) = hashing.finish().map_err(|e| BlobError::Archive {
                id: id.to_string(),
                source: ArchiveError::Read(e),
            })?;
            digest.verify(&actual).map_err(|source| BlobError::Digest {
                id: id.to_string(),
                source,
            })?;
            fs::rename(&tmp, dest).map_err(io_error(id, "renaming into place", dest))?;
            tracing::debug!(id, ?source, size, entries = stats.entries, dest = %dest.display(), "blob unpacked");
            Ok(())
        })();
        if result.is_err()
            && let Err(e) = fs::remove_dir_all(&tmp)
        {
            tracing::warn!(path = %tmp.display(), error = %e, "removing a failed unpack");
        }
        result
    }

    /// Fetches blob `id` into the file `dest` (created), verified; on error `dest` is absent.
    pub fn download(&self, id: &str, digest: &MultiDigest, dest: &Path) -> Result<(), BlobError> {
        let (reader, _) = self.open(id)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(dest)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    BlobError::Exists {
                        id: id.to_string(),
                        path: dest.to_path_buf(),
                    }
                } else {
                    BlobError::Io {
                        id: id.to_string(),
                        what: "creating",
                        path: dest.to_path_buf(),
                        source,
                    }
                }
            })?;
        let result = (|| {
            let mut hashing = HashingReader::new(reader, digest.algorithm());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match hashing.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_error(id, "reading", Path::new(id))(e)),
                };
                out.write_all(buf.get(..n).unwrap_or_default())
                    .map_err(io_error(id, "writing", dest))?;
            }
            out.sync_all().map_err(io_error(id, "writing", dest))?;
            let (actual, _) = hashing
                .finish()
                .map_err(io_error(id, "reading", Path::new(id)))?;
            digest.verify(&actual).map_err(|source| BlobError::Digest {
                id: id.to_string(),
                source,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(dest);
        }
        result
    }

    /// Uploads `file` under a new UUID; returns the id and the file's sha1.
    pub fn upload(&self, file: &Path) -> Result<Uploaded, BlobError> {
        let id = uuid::Uuid::new_v4().to_string();
        // The file must exist before any provider is asked (a clearer error than theirs).
        File::open(file).map_err(|source| BlobError::Io {
            id: id.clone(),
            what: "opening upload",
            path: file.to_path_buf(),
            source,
        })?;
        let digest = self
            .provider
            .put(file, &id)
            .map_err(|source| BlobError::Provider {
                id: id.clone(),
                source,
            })?;
        Ok(Uploaded {
            blobstore_id: id,
            sha1: digest.hex,
        })
    }
}

impl Blobs {
    /// Fetches blob `id` into memory, verified against `digest` (e.g. the `sync_dns` records
    /// blob). A blob longer than `limit` bytes is refused without reading it all.
    pub fn read_verified(
        &self,
        id: &str,
        digest: &MultiDigest,
        limit: u64,
    ) -> Result<Vec<u8>, BlobError> {
        let (reader, _) = self.open(id)?;
        let mut hashing = HashingReader::new(reader, digest.algorithm());
        let mut bytes = Vec::new();
        (&mut hashing)
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_error(id, "reading", Path::new(id)))?;
        if bytes.len() as u64 > limit {
            return Err(BlobError::Io {
                id: id.to_string(),
                what: "reading",
                path: PathBuf::from(id),
                source: io::Error::other(format!("the blob is larger than {limit} bytes")),
            });
        }
        let (actual, _) = hashing
            .finish()
            .map_err(io_error(id, "reading", Path::new(id)))?;
        digest.verify(&actual).map_err(|source| BlobError::Digest {
            id: id.to_string(),
            source,
        })?;
        Ok(bytes)
    }

    /// Uploads the bytes `open`'s stream yields under a new UUID; returns the id and the sha1
    /// of the bytes stored. `open` is called once per try (see [`Provider::put_stream`]: with
    /// `dav` nothing touches local disk; a command-line provider spools to `<data>/tmp`).
    pub fn upload_stream<R: Read>(
        &self,
        open: impl FnMut() -> io::Result<R>,
    ) -> Result<Uploaded, BlobError> {
        let id = uuid::Uuid::new_v4().to_string();
        let digest = self
            .provider
            .put_stream(&id, &self.tmp_dir(), open)
            .map_err(|source| BlobError::Provider {
                id: id.clone(),
                source,
            })?;
        Ok(Uploaded {
            blobstore_id: id,
            sha1: digest.hex,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::digest::{Algorithm, Digest};
    use testkit::TempDir;

    /// A tgz of `dir` holding `files`.
    fn tgz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let src = TempDir::new("blobstore-test").unwrap();
        for (name, data) in files {
            let p = src.path().join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        }
        let out = TempDir::new("blobstore-test").unwrap();
        let path = out.path().join("a.tgz");
        archive::pack_dir(src.path(), &path, true).unwrap();
        fs::read(path).unwrap()
    }

    struct Fixture {
        tmp: TempDir,
        blobs: Blobs,
    }

    fn fixture() -> Fixture {
        let tmp = TempDir::new("blobstore-test").unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        let blobs = Blobs::new(Provider::Local { dir: store }, tmp.path().join("data"));
        Fixture { tmp, blobs }
    }

    impl Fixture {
        fn store(&self, id: &str, bytes: &[u8]) {
            fs::write(self.tmp.path().join("store").join(id), bytes).unwrap();
        }
        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(self.tmp.path().join("out"))
                .map(|d| {
                    d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        }
    }

    #[test]
    fn unpack_verifies_and_renames() {
        let f = fixture();
        let bytes = tgz(&[("bin/run", b"run"), ("a", b"a")]);
        f.store("id1", &bytes);
        let digest = MultiDigest::single(Digest::of(Algorithm::Sha256, &bytes));
        let dest = f.tmp.path().join("out/pkg");
        f.blobs.unpack("id1", &digest, &dest, &Select::All).unwrap();
        assert_eq!(fs::read(dest.join("bin/run")).unwrap(), b"run");
        assert_eq!(f.entries(), vec!["pkg"]);
        // dest exists now: a second unpack is refused.
        let e = f
            .blobs
            .unpack("id1", &digest, &dest, &Select::All)
            .unwrap_err();
        assert!(matches!(e, BlobError::Exists { .. }));
    }

    #[test]
    fn mismatch_leaves_nothing() {
        let f = fixture();
        let bytes = tgz(&[("a", b"a")]);
        f.store("id1", &bytes);
        let wrong = MultiDigest::single(Digest::of(Algorithm::Sha1, b"other"));
        let dest = f.tmp.path().join("out/pkg");
        let e = f
            .blobs
            .unpack("id1", &wrong, &dest, &Select::All)
            .unwrap_err();
        assert!(e.is_mismatch(), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("id1"), "{msg}");
        assert!(msg.contains(&wrong.to_string()), "{msg}");
        assert!(
            msg.contains(&Digest::of(Algorithm::Sha1, &bytes).to_string()),
            "{msg}"
        );
        assert!(f.entries().is_empty(), "{:?}", f.entries());
    }

    #[test]
    fn trailing_bytes_after_the_archive_are_hashed() {
        let f = fixture();
        let mut bytes = tgz(&[("a", b"a")]);
        let clean = Digest::of(Algorithm::Sha1, &bytes);
        bytes.extend_from_slice(b"trailing garbage the tar reader never asks for");
        f.store("id1", &bytes);
        let dest = f.tmp.path().join("out/pkg");
        let e = f
            .blobs
            .unpack("id1", &MultiDigest::single(clean), &dest, &Select::All)
            .unwrap_err();
        assert!(e.is_mismatch(), "{e:?}");
        let full = MultiDigest::single(Digest::of(Algorithm::Sha1, &bytes));
        f.blobs.unpack("id1", &full, &dest, &Select::All).unwrap();
    }

    #[test]
    fn hostile_archive_leaves_nothing() {
        let f = fixture();
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..8].copy_from_slice(b"../pwned");
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut bytes = vec![];
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[0; 1024]);
        f.store("id1", &bytes);
        let d = MultiDigest::single(Digest::of(Algorithm::Sha1, &bytes));
        let e = f
            .blobs
            .unpack("id1", &d, &f.tmp.path().join("out/pkg"), &Select::All)
            .unwrap_err();
        assert!(matches!(e, BlobError::Archive { .. }), "{e:?}");
        assert!(f.entries().is_empty());
        assert!(!f.tmp.path().join("out/pwned").exists());
    }

    #[test]
    fn local_sources_win_in_order() {
        let f = fixture();
        let from_store = tgz(&[("which", b"store")]);
        let from_blobs = tgz(&[("which", b"blobs")]);
        let from_sensitive = tgz(&[("which", b"sensitive")]);
        f.store("id1", &from_store);
        let any = |b: &[u8]| MultiDigest::single(Digest::of(Algorithm::Sha1, b));
        let out = |n: &str| f.tmp.path().join("out").join(n);
        f.blobs
            .unpack("id1", &any(&from_store), &out("1"), &Select::All)
            .unwrap();
        fs::create_dir_all(f.tmp.path().join("data/blobs")).unwrap();
        fs::write(f.tmp.path().join("data/blobs/id1"), &from_blobs).unwrap();
        f.blobs
            .unpack("id1", &any(&from_blobs), &out("2"), &Select::All)
            .unwrap();
        fs::create_dir_all(f.tmp.path().join("data/sensitive_blobs")).unwrap();
        fs::write(
            f.tmp.path().join("data/sensitive_blobs/id1"),
            &from_sensitive,
        )
        .unwrap();
        f.blobs
            .unpack("id1", &any(&from_sensitive), &out("3"), &Select::All)
            .unwrap();
        for (n, want) in [("1", "store"), ("2", "blobs"), ("3", "sensitive")] {
            assert_eq!(fs::read_to_string(out(n).join("which")).unwrap(), want);
        }
        assert_eq!(f.blobs.open("id1").unwrap().1, Source::Sensitive);
    }

    #[test]
    fn download_verifies_and_removes_on_mismatch() {
        let f = fixture();
        f.store("id1", b"hello\n");
        let dest = f.tmp.path().join("file");
        let good = MultiDigest::single(Digest::of(Algorithm::Sha512, b"hello\n"));
        f.blobs.download("id1", &good, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello\n");
        let e = f.blobs.download("id1", &good, &dest).unwrap_err();
        assert!(matches!(e, BlobError::Exists { .. }));
        fs::remove_file(&dest).unwrap();
        let bad = MultiDigest::single(Digest::of(Algorithm::Sha512, b"x"));
        let e = f.blobs.download("id1", &bad, &dest).unwrap_err();
        assert!(e.is_mismatch());
        assert!(!dest.exists());
    }

    #[test]
    fn missing_and_hostile_ids() {
        let f = fixture();
        let d = MultiDigest::single(Digest::of(Algorithm::Sha1, b""));
        let dest = f.tmp.path().join("out/pkg");
        let e = f.blobs.unpack("nope", &d, &dest, &Select::All).unwrap_err();
        assert!(
            matches!(&e, BlobError::Provider { source, .. } if source.is_not_found()),
            "{e:?}"
        );
        assert!(e.to_string().contains("nope"));
        for bad in ["../store/x", "/etc/passwd", "", ".."] {
            let e = f.blobs.unpack(bad, &d, &dest, &Select::All).unwrap_err();
            assert!(
                matches!(
                    &e,
                    BlobError::Provider {
                        source: ProviderError::InvalidId { .. },
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
        }
        assert!(f.entries().is_empty());
    }

    #[test]
    fn read_verified_checks_the_digest_and_the_limit() {
        let f = fixture();
        f.store("id1", b"records");
        let good = MultiDigest::single(Digest::of(Algorithm::Sha256, b"records"));
        assert_eq!(f.blobs.read_verified("id1", &good, 7).unwrap(), b"records");
        let e = f.blobs.read_verified("id1", &good, 6).unwrap_err();
        assert!(e.to_string().contains("larger than 6 bytes"), "{e}");
        let bad = MultiDigest::single(Digest::of(Algorithm::Sha256, b"other"));
        assert!(
            f.blobs
                .read_verified("id1", &bad, 100)
                .unwrap_err()
                .is_mismatch()
        );
        assert!(f.blobs.read_verified("../x", &good, 100).is_err());
    }

    #[test]
    fn upload_makes_a_uuid_and_the_sha1() {
        let f = fixture();
        let file = f.tmp.path().join("up");
        fs::write(&file, b"hello\n").unwrap();
        let up = f.blobs.upload(&file).unwrap();
        assert_eq!(up.sha1, Digest::of(Algorithm::Sha1, b"hello\n").hex);
        uuid::Uuid::parse_str(&up.blobstore_id).unwrap();
        assert_eq!(
            fs::read(f.tmp.path().join("store").join(&up.blobstore_id)).unwrap(),
            b"hello\n"
        );
        let e = f.blobs.upload(&f.tmp.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
