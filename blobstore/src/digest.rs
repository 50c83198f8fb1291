//! Upstream's digests. See the crate documentation.

/// A hash algorithm upstream knows, weakest first (the order `Ord` gives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

/// One digest: an algorithm and its lowercase hex value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub algorithm: Algorithm,
    pub hex: String,
}

/// A parsed digest string (one or more pieces, at most one per algorithm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiDigest {
    pub pieces: Vec<Digest>,
}

/// Why a digest string cannot be used, or a blob does not match it. Each variant names the
/// digest string it is about.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("placeholder")]
    Placeholder,
}

impl MultiDigest {
    /// Parses upstream's digest string.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let _ = s;
        todo!("helper fills in")
    }
    /// The piece verification uses (sha512 > sha256 > sha1).
    pub fn strongest(&self) -> &Digest {
        todo!("helper fills in")
    }
}
