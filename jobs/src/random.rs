//! Random tokens from the kernel's generator, as lowercase hex (safe in monit's config lexer, in
//! HTTP headers and in form bodies without escaping).

use std::io::Read;

/// Reads `bytes` random bytes from `/dev/urandom` and returns them as `2 * bytes` hex digits.
pub fn hex_token(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn tokens_are_hex_and_differ() {
        let a = super::hex_token(16).unwrap();
        let b = super::hex_token(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }
}
