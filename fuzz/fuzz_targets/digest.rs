//! Upstream's digest strings (`sha1hex`, `sha256:hex;sha512:hex`, …): any input is either
//! refused or parsed into a digest whose strongest piece verifies against itself and whose
//! text form parses back to the same value.
#![no_main]

use blobstore::digest::MultiDigest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = MultiDigest::parse(text) else {
        return;
    };
    assert!(!parsed.pieces().is_empty());
    let strongest = parsed.strongest().clone();
    assert!(parsed.verify(&strongest).is_ok());
    let again = MultiDigest::parse(&parsed.to_string()).expect("a parsed digest prints parseable text");
    assert_eq!(again.pieces(), parsed.pieces());
});
