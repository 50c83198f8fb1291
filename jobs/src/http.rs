//! A minimal HTTP/1.1 client for monit's API: one request per connection (`Connection: close`),
//! bodies framed by `Content-Length`, `Transfer-Encoding: chunked` or the end of the stream.
//!
//! Monit's API is a handful of requests to 127.0.0.1; a general HTTP stack would cost more to
//! build than the whole crate. This client only speaks plain HTTP and never follows anything on
//! its own: redirects are the caller's decision.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response body this client accepts. Monit's status for hundreds of services is a
/// few hundred kilobytes; anything far larger is not monit.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The largest response head (status line and headers) this client accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why one HTTP exchange failed before a complete response was read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TCP connection could not be opened.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// The address dialled.
        endpoint: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("talking to {endpoint}: {source}")]
    Io {
        /// The address of the peer.
        endpoint: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The whole exchange took longer than allowed (Go's client calls this "request canceled").
    #[error("request canceled: no complete response from {endpoint} within {after:?}")]
    Timeout {
        /// The address of the peer.
        endpoint: SocketAddr,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The peer sent something that is not an HTTP/1.x response this client understands.
    #[error("malformed HTTP response from {endpoint}: {reason}")]
    Malformed {
        /// The address of the peer.
        endpoint: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

/// One request. The client always adds `Host`, `Content-Length` and `Connection: close`.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// Path and query, starting with `/`.
    pub target: &'a str,
    /// Extra headers, sent in order.
    pub headers: &'a [(&'a str, &'a str)],
    /// Body bytes (empty for `GET`).
    pub body: &'a [u8],
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Numeric status code.
    pub status: u16,
    /// The status as Go prints it: code, space, reason phrase (`503 Service Unavailable`).
    pub status_text: String,
    /// Headers in the order received; names as sent.
    pub headers: Vec<(String, String)>,
    /// The decoded body (chunked framing removed).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text; invalid UTF-8 is replaced, never rejected.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request to `endpoint` and reads the whole response, all within `timeout`.
///
/// Guarantees: one TCP connection, closed on return; the body is at most [`MAX_BODY_BYTES`];
/// never panics on whatever the peer sends.
pub async fn send(
    endpoint: SocketAddr,
    request: &Request<'_>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    match tokio::time::timeout(timeout, exchange(endpoint, request)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout {
            endpoint,
            after: timeout,
        }),
    }
}

async fn exchange(endpoint: SocketAddr, request: &Request<'_>) -> Result<Response, HttpError> {
    let mut stream = TcpStream::connect(endpoint)
        .await
        .map_err(|source| HttpError::Connect { endpoint, source })?;
    let io = |source| HttpError::Io { endpoint, source };

    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        request.method,
        request.target,
        endpoint,
        request.body.len()
    );
    for (name, value) in request.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(request.body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;

    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if raw.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES + 1024 {
            return Err(HttpError::Malformed {
                endpoint,
                reason: format!("response larger than {MAX_BODY_BYTES} bytes"),
            });
        }
        // Stop early once a Content-Length framed body is complete, so that a peer that keeps
        // the connection open despite `Connection: close` does not make us wait for the timeout.
        if let Some(done) = complete_length(&raw)
            && done
        {
            break;
        }
    }
    parse_response(&raw).map_err(|reason| HttpError::Malformed { endpoint, reason })
}

/// `Some(true)` when `raw` holds a full head plus a complete `Content-Length` body.
fn complete_length(raw: &[u8]) -> Option<bool> {
    let end = find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut length = None;
    for line in head.split("\r\n").skip(1) {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = value.trim().parse::<usize>().ok();
        }
    }
    Some(raw.len() - (end + 4) >= length?)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a complete HTTP/1.x response read until the end of the stream.
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        format!(
            "no end of headers in {} bytes{}",
            raw.len(),
            if raw.is_empty() { " (empty reply)" } else { "" }
        )
    })?;
    if end > MAX_HEAD_BYTES {
        return Err(format!("headers longer than {MAX_HEAD_BYTES} bytes"));
    }
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?} is not HTTP/1.x"));
    }
    let code_text = parts.next().unwrap_or_default();
    let status: u16 = code_text
        .parse()
        .ok()
        .filter(|c| (100..=999).contains(c))
        .ok_or_else(|| format!("status code {code_text:?} is not a number"))?;
    let reason = parts.next().unwrap_or_default().trim();
    let status_text = if reason.is_empty() {
        status.to_string()
    } else {
        format!("{status} {reason}")
    };

    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?} has no ':'"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let rest = &raw[end + 4..];
    let header = |n: &str| {
        headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };

    let body = if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        decode_chunked(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("Content-Length {length:?} is not a number"))?;
        if length > MAX_BODY_BYTES {
            return Err(format!("Content-Length {length} exceeds {MAX_BODY_BYTES}"));
        }
        if rest.len() < length {
            return Err(format!("body ended after {} of {length} bytes", rest.len()));
        }
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_BODY_BYTES {
        return Err(format!("body exceeds {MAX_BODY_BYTES} bytes"));
    }
    Ok(Response {
        status,
        status_text,
        headers,
        body,
    })
}

/// Removes chunked transfer framing; trailers are ignored.
fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("chunk size line without CRLF")?;
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?} is not hexadecimal"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if size > MAX_BODY_BYTES || body.len() + size > MAX_BODY_BYTES {
            return Err(format!("chunked body exceeds {MAX_BODY_BYTES} bytes"));
        }
        if rest.len() < size + 2 {
            return Err(format!("chunk of {size} bytes is truncated"));
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".to_string());
        }
        rest = &rest[size + 2..];
    }
}

/// Standard base64 (with padding), enough for a Basic `Authorization` header.
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if group.len() > 1 { sextet(6) } else { '=' });
        out.push(if group.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("vcap:random-password", "dmNhcDpyYW5kb20tcGFzc3dvcmQ="),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn parses_content_length_response() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhelloEXTRA")
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.status_text, "200 OK");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("x"), Some("y"));
    }

    #[test]
    fn parses_chunked_response() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.body, b"Wikipedia");
    }

    #[test]
    fn reads_until_eof_without_framing() {
        let r = parse_response(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy").unwrap();
        assert_eq!(r.status_text, "503 Service Unavailable");
        assert_eq!(r.body_text(), "busy");
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for raw in [
            &b""[..],
            b"garbage",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        ] {
            assert!(
                parse_response(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
