//! Basic authentication of the HTTPS agent API: the credentials of the `https://user:password@`
//! mbus URL, compared in constant time with what the client sent. Pure: no I/O.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use subtle::ConstantTimeEq;

/// The value of `WWW-Authenticate` on a 401, as upstream sends it.
pub const CHALLENGE: &str = "Basic realm=\"\"";

/// The credentials a request must carry. `Debug` never shows them.
pub struct BasicAuth {
    /// `user:password`, as the client's header decodes to.
    expected: Vec<u8>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasicAuth(***)")
    }
}

impl BasicAuth {
    /// The credentials `user` / `password` (from the mbus URL).
    pub fn new(user: &str, password: &str) -> BasicAuth {
        BasicAuth {
            expected: format!("{user}:{password}").into_bytes(),
        }
    }

    /// Whether an `Authorization` header value grants access: scheme `Basic` (any case, as
    /// RFC 7617 allows), then standard base64 of exactly `user:password`. The comparison of
    /// the decoded credentials takes the same time wherever they differ. A missing, malformed
    /// or non-Basic header is refused.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = header.and_then(basic_token) else {
            return false;
        };
        let Ok(decoded) = STANDARD.decode(token) else {
            return false;
        };
        bool::from(decoded.as_slice().ct_eq(&self.expected))
    }
}

/// The token of a `Basic <token>` header value, surrounding blanks trimmed; `None` for another
/// scheme or no token.
pub fn basic_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(5)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    // At least one blank between the scheme and the token.
    if !rest.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(user_pass: &str) -> Vec<u8> {
        format!("Basic {}", STANDARD.encode(user_pass)).into_bytes()
    }

    #[test]
    fn the_urls_credentials_are_allowed_as_go_clients_send_them() {
        let a = BasicAuth::new("mbus", "p@ss:word");
        assert!(a.allows(Some(&header("mbus:p@ss:word"))));
        // Go's SetBasicAuth: "Basic " + StdEncoding("user:password").
        assert!(a.allows(Some(b"Basic bWJ1czpwQHNzOndvcmQ=")));
        assert!(a.allows(Some(b"basic bWJ1czpwQHNzOndvcmQ=")));
        assert!(a.allows(Some(b"BASIC  bWJ1czpwQHNzOndvcmQ= ")));
    }

    #[test]
    fn anything_else_is_refused() {
        let a = BasicAuth::new("mbus", "secret");
        for bad in [
            header("mbus:wrong"),
            header("mbus:secre"),
            header("mbus:secrett"),
            header("mbuss:secret"),
            header("mbus"),
            header(":"),
            header(""),
            b"Bearer bWJ1czpzZWNyZXQ=".to_vec(),
            b"BasicbWJ1czpzZWNyZXQ=".to_vec(),
            b"Basic".to_vec(),
            b"Basic ".to_vec(),
            b"Basic bWJ1czpzZWNyZXQ".to_vec(),
            b"Basic !!!!".to_vec(),
            b"".to_vec(),
            vec![0xff, 0xfe, 0x00],
            b"Basic bWJ1czpzZWNyZXQ= bWJ1czpzZWNyZXQ=".to_vec(),
        ] {
            assert!(!a.allows(Some(&bad)), "{:?}", String::from_utf8_lossy(&bad));
        }
        assert!(!a.allows(None));
        assert_eq!(format!("{a:?}"), "BasicAuth(***)");
    }

    #[test]
    fn the_token_is_what_follows_the_scheme() {
        assert_eq!(basic_token(b"Basic abc"), Some(&b"abc"[..]));
        assert_eq!(basic_token(b"  bAsIc\tabc  "), Some(&b"abc"[..]));
        assert_eq!(basic_token(b"Basic"), None);
        assert_eq!(basic_token(b"Basicabc"), None);
        assert_eq!(basic_token(b"Digest abc"), None);
        assert_eq!(basic_token(b"Bas"), None);
    }
}
