//! Blobs from the director's blobstore, as upstream's agent reads and writes them.
//!
//! - [`digest`]: upstream's multi-digest strings (`;`-separated pieces, `algo:hex` or bare hex
//!   meaning sha1; sha1, sha256, sha512), verified with the strongest piece.
//! - [`provider`]: where blobs live: `local` (a directory), `dav` (HTTPS, Basic auth, the
//!   two-hex-digit prefix layout) natively, and every other provider through the stemcell's
//!   `bosh-blobstore-<provider>` command line.
//! - [`archive`]: a tar reader (gzip or plain) that never writes outside its target.
//! - [`fetch`]: [`Blobs`], the local sources first (`data/sensitive_blobs`, `data/blobs`), then
//!   the provider; download, hash and unpack in one pass; nothing is left behind on failure.
//!
//! Everything here is blocking I/O (`std::io`): callers run it on a blocking thread.
#![forbid(unsafe_code)]

pub mod archive;
pub mod digest;
pub mod fetch;
pub mod provider;

pub use archive::{ArchiveError, Select, Unpacked, pack_dir};
pub use digest::{Algorithm, Digest, DigestError, Hasher, HashingReader, MultiDigest};
pub use fetch::{BlobError, Blobs, Source, Uploaded};
pub use provider::{BlobReader, Dav, External, Provider, ProviderEnv, ProviderError};
