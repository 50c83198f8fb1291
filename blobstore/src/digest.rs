//! Upstream's digests. See the crate documentation.
//!
//! A digest string is `;`-separated pieces, each `algo:hex` or bare hex (which means sha1, the
//! only kind old directors sent). Empty pieces are skipped, as upstream skips them, so a
//! trailing `;` is harmless. Unlike upstream, which accepts any alphanumeric piece and fails
//! only when it verifies, every piece is checked here when it is parsed: the algorithm must be
//! one of sha1, sha256, sha512 (lowercase, as upstream spells them) and the hex must have that
//! algorithm's length. A bad digest is therefore refused before any byte is downloaded.

use std::fmt;

use sha1::Digest as _;

/// A hash algorithm upstream knows, weakest first (the order `Ord` gives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Every algorithm, weakest first.
    pub const ALL: [Algorithm; 3] = [Algorithm::Sha1, Algorithm::Sha256, Algorithm::Sha512];

    /// Upstream's name: `sha1`, `sha256` or `sha512`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// The algorithm with upstream's (lowercase) name, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Length of the hex form of a digest of this algorithm.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// A fresh streaming hasher.
    pub fn hasher(self) -> Hasher {
        Hasher::new(self)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One digest: an algorithm and its lowercase hex value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub algorithm: Algorithm,
    pub hex: String,
}

impl Digest {
    /// A digest from an algorithm and its hex value; the hex must have the algorithm's length
    /// and only hex digits (either case; it is stored lowercase).
    pub fn new(algorithm: Algorithm, hex: &str) -> Result<Self, DigestError> {
        if hex.len() != algorithm.hex_len() {
            return Err(DigestError::Malformed {
                digest: hex.to_string(),
                reason: format!(
                    "a {algorithm} digest has {} hex digits, not {}",
                    algorithm.hex_len(),
                    hex.len()
                ),
            });
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestError::Malformed {
                digest: hex.to_string(),
                reason: "a digest has only hex digits".to_string(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// The digest of `bytes` (for small in-memory values; blobs go through [`Hasher`]).
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Self {
        let mut h = algorithm.hasher();
        h.update(bytes);
        h.finish()
    }
}

/// Upstream's `String()`: sha1 bare, the others `algo:hex`.
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.algorithm {
            Algorithm::Sha1 => f.write_str(&self.hex),
            a => write!(f, "{a}:{}", self.hex),
        }
    }
}

/// A parsed digest string (one or more pieces, at most one per algorithm). Only
/// [`MultiDigest::parse`] and [`MultiDigest::single`] make one, so it is never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiDigest {
    pieces: Vec<Digest>,
}

/// Why a digest string cannot be used, or a blob does not match it. Each variant names the
/// digest string it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string has no piece at all.
    #[error("digest '{digest}' is empty: expected sha1 hex or sha1:, sha256: or sha512: pieces")]
    Empty { digest: String },
    /// A piece's algorithm is not sha1, sha256 or sha512.
    #[error("digest '{digest}': unknown algorithm '{algorithm}' (supported: sha1, sha256, sha512)")]
    UnknownAlgorithm { digest: String, algorithm: String },
    /// Two pieces have the same algorithm.
    #[error("digest '{digest}' has more than one {algorithm} piece")]
    Duplicate {
        digest: String,
        algorithm: Algorithm,
    },
    /// A piece's hex value is not a digest of its algorithm.
    #[error("digest '{digest}' is malformed: {reason}")]
    Malformed { digest: String, reason: String },
    /// The bytes hashed to another value than expected.
    #[error("expected digest '{expected}' but the blob's is '{actual}'")]
    Mismatch { expected: Digest, actual: Digest },
}

impl MultiDigest {
    /// Parses upstream's digest string. On success there is at least one piece, at most one
    /// per algorithm, every one of a known algorithm with a well-formed hex value.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let mut pieces: Vec<Digest> = Vec::new();
        for piece in s.split(';').filter(|p| !p.is_empty()) {
            let (algorithm, hex) = match piece.split_once(':') {
                None => (Algorithm::Sha1, piece),
                Some((name, hex)) => match Algorithm::from_name(name) {
                    Some(a) => (a, hex),
                    None => {
                        return Err(DigestError::UnknownAlgorithm {
                            digest: s.to_string(),
                            algorithm: name.to_string(),
                        });
                    }
                },
            };
            let digest = Digest::new(algorithm, hex).map_err(|e| match e {
                DigestError::Malformed { reason, .. } => DigestError::Malformed {
                    digest: s.to_string(),
                    reason: format!("piece '{piece}': {reason}"),
                },
                other => other,
            })?;
            if pieces.iter().any(|p| p.algorithm == algorithm) {
                return Err(DigestError::Duplicate {
                    digest: s.to_string(),
                    algorithm,
                });
            }
            pieces.push(digest);
        }
        if pieces.is_empty() {
            return Err(DigestError::Empty {
                digest: s.to_string(),
            });
        }
        Ok(MultiDigest { pieces })
    }

    /// A digest string of one piece.
    pub fn single(digest: Digest) -> Self {
        MultiDigest {
            pieces: vec![digest],
        }
    }

    /// The pieces, in the order the string gave them.
    pub fn pieces(&self) -> &[Digest] {
        &self.pieces
    }

    /// The piece verification uses (sha512 > sha256 > sha1). Never panics: the constructors
    /// refuse an empty digest, and the field is private.
    #[allow(clippy::expect_used)]
    pub fn strongest(&self) -> &Digest {
        self.pieces
            .iter()
            .max_by_key(|d| d.algorithm)
            .expect("a MultiDigest has at least one piece")
    }

    /// The algorithm of the strongest piece: what a reader must hash with.
    pub fn algorithm(&self) -> Algorithm {
        self.strongest().algorithm
    }

    /// Checks `actual` (a digest of the strongest piece's algorithm) against the strongest
    /// piece. A digest of another algorithm never matches.
    pub fn verify(&self, actual: &Digest) -> Result<(), DigestError> {
        let expected = self.strongest();
        if expected == actual {
            Ok(())
        } else {
            Err(DigestError::Mismatch {
                expected: expected.clone(),
                actual: actual.clone(),
            })
        }
    }
}

/// Upstream's `String()`: the pieces' forms joined with `;`, in their original order.
impl fmt::Display for MultiDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.pieces.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for MultiDigest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MultiDigest::parse(s)
    }
}

/// A streaming hasher for one [`Algorithm`]: feed it bytes in any chunks, then
/// [`Hasher::finish`]. Also an [`std::io::Write`] sink, so `io::copy` can feed it.
#[derive(Clone)]
pub struct Hasher {
    state: State,
}

#[derive(Clone)]
enum State {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher")
            .field("algorithm", &self.algorithm())
            .finish()
    }
}

impl Hasher {
    /// A hasher with nothing fed yet.
    pub fn new(algorithm: Algorithm) -> Self {
        let state = match algorithm {
            Algorithm::Sha1 => State::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => State::Sha512(sha2::Sha512::new()),
        };
        Hasher { state }
    }

    /// The algorithm it computes.
    pub fn algorithm(&self) -> Algorithm {
        match self.state {
            State::Sha1(_) => Algorithm::Sha1,
            State::Sha256(_) => Algorithm::Sha256,
            State::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Sha1(h) => h.update(bytes),
            State::Sha256(h) => h.update(bytes),
            State::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of every byte fed.
    pub fn finish(self) -> Digest {
        let (algorithm, raw): (Algorithm, Vec<u8>) = match self.state {
            State::Sha1(h) => (Algorithm::Sha1, h.finalize().to_vec()),
            State::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            State::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        Digest {
            algorithm,
            hex: to_hex(&raw),
        }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// A reader that hashes every byte read through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: std::io::Read> HashingReader<R> {
    /// Wraps `inner`, hashing with `algorithm`.
    pub fn new(inner: R, algorithm: Algorithm) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(algorithm),
            count: 0,
        }
    }

    /// Reads the rest of the stream to EOF (so the digest covers every byte, also what a
    /// consumer left unread), then returns the digest and the number of bytes read in all.
    pub fn finish(mut self) -> std::io::Result<(Digest, u64)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((self.hasher.finish(), self.count))
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.hasher.update(read);
        self.count += read.len() as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    // Digests of "hello\n", from coreutils' sha1sum/sha256sum/sha512sum.
    const SHA1: &str = "f572d396fae9206628714fb2ce00f72e94f2258f";
    const SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    const SHA512: &str = "e7c22b994c59d9cf2b48e549b1e24666636045930d3da7c1acb299d1c3b7f931f94aae41edda2c2b207a36e10f8bcb8d45223e54878f5b316e7ce3b6bc019629";

    #[test]
    fn hashes_match_coreutils() {
        assert_eq!(Digest::of(Algorithm::Sha1, b"hello\n").hex, SHA1);
        assert_eq!(Digest::of(Algorithm::Sha256, b"hello\n").hex, SHA256);
        assert_eq!(Digest::of(Algorithm::Sha512, b"hello\n").hex, SHA512);
    }

    #[test]
    fn chunked_feeding_equals_one_shot() {
        for a in Algorithm::ALL {
            let mut h = Hasher::new(a);
            for chunk in b"hello\n".chunks(1) {
                h.update(chunk);
            }
            assert_eq!(h.finish(), Digest::of(a, b"hello\n"));
            let mut w = a.hasher();
            w.write_all(b"hel").unwrap();
            w.write_all(b"lo\n").unwrap();
            assert_eq!(w.algorithm(), a);
            assert_eq!(w.finish(), Digest::of(a, b"hello\n"));
        }
    }

    #[test]
    fn bare_hex_is_sha1() {
        let d = MultiDigest::parse(SHA1).unwrap();
        assert_eq!(d.pieces.len(), 1);
        assert_eq!(d.strongest().algorithm, Algorithm::Sha1);
        assert_eq!(d.strongest().hex, SHA1);
        assert_eq!(d.to_string(), SHA1);
    }

    #[test]
    fn prefixed_pieces() {
        for (a, hex) in [
            (Algorithm::Sha1, SHA1),
            (Algorithm::Sha256, SHA256),
            (Algorithm::Sha512, SHA512),
        ] {
            let s = format!("{a}:{hex}");
            let d = MultiDigest::parse(&s).unwrap();
            assert_eq!(d.strongest(), &Digest::new(a, hex).unwrap());
            let shown = if a == Algorithm::Sha1 {
                hex.to_string()
            } else {
                s.clone()
            };
            assert_eq!(
                d.to_string(),
                shown,
                "sha1 prints bare, the others prefixed"
            );
        }
    }

    #[test]
    fn strongest_wins_in_any_order() {
        let cases = [
            format!("{SHA1};sha256:{SHA256}"),
            format!("sha256:{SHA256};{SHA1}"),
            format!("sha512:{SHA512};sha1:{SHA1};sha256:{SHA256}"),
            format!("sha256:{SHA256};sha512:{SHA512}"),
        ];
        let want = [
            Algorithm::Sha256,
            Algorithm::Sha256,
            Algorithm::Sha512,
            Algorithm::Sha512,
        ];
        for (s, w) in cases.iter().zip(want) {
            let d = MultiDigest::parse(s).unwrap();
            assert_eq!(d.strongest().algorithm, w, "{s}");
            assert_eq!(d.algorithm(), w);
        }
    }

    #[test]
    fn display_round_trips_in_order() {
        let s = format!("sha512:{SHA512};{SHA1};sha256:{SHA256}");
        let d = MultiDigest::parse(&s).unwrap();
        assert_eq!(d.to_string(), s);
        assert_eq!(MultiDigest::parse(&d.to_string()).unwrap(), d);
        let via_sha1_prefix = MultiDigest::parse(&format!("sha1:{SHA1}")).unwrap();
        assert_eq!(via_sha1_prefix.to_string(), SHA1);
    }

    #[test]
    fn empty_pieces_are_skipped() {
        let d = MultiDigest::parse(&format!(";{SHA1};;sha256:{SHA256};")).unwrap();
        assert_eq!(d.pieces.len(), 2);
    }

    #[test]
    fn uppercase_hex_is_accepted_and_lowered() {
        let d = MultiDigest::parse(&SHA1.to_uppercase()).unwrap();
        assert_eq!(d.strongest().hex, SHA1);
    }

    #[test]
    fn empty_strings_are_refused() {
        for s in ["", ";", ";;;"] {
            let e = MultiDigest::parse(s).unwrap_err();
            assert_eq!(
                e,
                DigestError::Empty {
                    digest: s.to_string()
                }
            );
            assert!(e.to_string().contains(&format!("'{s}'")), "{e}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let cases = [
            format!("{SHA1};{SHA1}"),
            format!("{SHA1};sha1:{SHA1}"),
            format!("sha256:{SHA256};sha256:{SHA256}"),
            format!("sha512:{SHA512};{SHA1};sha512:{SHA512}"),
        ];
        for s in &cases {
            let e = MultiDigest::parse(s).unwrap_err();
            assert!(matches!(e, DigestError::Duplicate { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains(s.as_str()), "{e}");
        }
    }

    #[test]
    fn unknown_algorithms_are_refused() {
        for (s, algo) in [
            (format!("md5:{SHA1}"), "md5"),
            (format!("SHA1:{SHA1}"), "SHA1"),
            (format!("sha384:{SHA256}"), "sha384"),
            (format!(":{SHA1}"), ""),
            (format!("{SHA1};sha3:{SHA256}"), "sha3"),
        ] {
            let e = MultiDigest::parse(&s).unwrap_err();
            assert_eq!(
                e,
                DigestError::UnknownAlgorithm {
                    digest: s.clone(),
                    algorithm: algo.to_string()
                }
            );
            assert!(e.to_string().contains(&s), "{e}");
        }
    }

    #[test]
    fn malformed_hex_is_refused() {
        let cases = [
            SHA1[..39].to_string(),              // too short
            format!("{SHA1}0"),                  // too long
            format!("sha256:{SHA1}"),            // sha1 length under sha256
            format!("sha1:{SHA256}"),            // sha256 length under sha1
            format!("sha512:{SHA256}"),          // wrong length
            format!("g{}", &SHA1[1..]),          // non-hex digit
            format!("{} ", &SHA1[..39]),         // space
            format!("sha256:{SHA256}:00"),       // extra colon
            "sha256:".to_string(),               // no value
            format!("{}é", &SHA1[..38]),         // non-ASCII, 40 bytes
            format!(" {SHA1}"),                  // leading space
            format!("sha256:{SHA256};{}", "ab"), // one bad piece among good ones
        ];
        for s in &cases {
            let e = MultiDigest::parse(s).unwrap_err();
            assert!(matches!(e, DigestError::Malformed { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains(s.as_str()), "{e}");
        }
    }

    #[test]
    fn verify_uses_strongest() {
        let good = MultiDigest::parse(&format!("{SHA1};sha256:{SHA256}")).unwrap();
        good.verify(&Digest::of(Algorithm::Sha256, b"hello\n"))
            .unwrap();
        // The sha1 piece is right but verification uses sha256 only.
        let e = good
            .verify(&Digest::of(Algorithm::Sha1, b"hello\n"))
            .unwrap_err();
        assert!(matches!(e, DigestError::Mismatch { .. }));
        // A wrong weaker piece does not matter: upstream never checks it.
        let wrong_sha1 =
            MultiDigest::parse(&format!("{};sha512:{SHA512}", "0".repeat(40))).unwrap();
        wrong_sha1
            .verify(&Digest::of(Algorithm::Sha512, b"hello\n"))
            .unwrap();
    }

    #[test]
    fn mismatch_names_both_digests() {
        let d = MultiDigest::parse(&format!("sha256:{SHA256}")).unwrap();
        let actual = Digest::of(Algorithm::Sha256, b"other");
        let e = d.verify(&actual).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("sha256:{SHA256}")), "{msg}");
        assert!(msg.contains(&actual.to_string()), "{msg}");
    }

    #[test]
    fn hashing_reader_hashes_what_is_read_and_the_rest() {
        let data = vec![7u8; 100_000];
        let mut r = HashingReader::new(&data[..], Algorithm::Sha256);
        let mut head = [0u8; 10];
        r.read_exact(&mut head).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!(n, 100_000);
        assert_eq!(d, Digest::of(Algorithm::Sha256, &data));
    }

    #[test]
    fn from_str_and_hex() {
        let d: MultiDigest = SHA1.parse().unwrap();
        assert_eq!(
            d,
            MultiDigest::single(Digest::new(Algorithm::Sha1, SHA1).unwrap())
        );
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(Algorithm::from_name("sha256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::from_name("SHA256"), None);
        assert!(Algorithm::Sha1 < Algorithm::Sha256 && Algorithm::Sha256 < Algorithm::Sha512);
    }
}
