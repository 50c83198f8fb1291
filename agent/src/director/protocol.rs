//! The director protocol's codec, exactly upstream's shapes: a request
//! `{"method","arguments","reply_to","protocol"}` gets `{"value":…}` or
//! `{"exception":{"message":…}}`; a response over the limit (1 MiB on NATS) is truncated by
//! upstream's rule. Pure: no I/O.

use serde::Deserialize;
use serde_json::{Value, json};

/// Upstream's limit for a NATS response (`responseMaxLength`).
pub const RESPONSE_MAX_LEN: usize = 1024 * 1024;

/// The largest request body the agent decodes: the protocol's 1 MiB (upstream's
/// `responseMaxLength`, and nats-server's default `max_payload`). A bigger body is refused
/// before any of it is parsed, so that what a request may allocate is bounded by it whatever
/// the server lets through.
pub const REQUEST_MAX_LEN: usize = 1024 * 1024;

/// A decoded request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Request {
    /// Upstream's decoder matches the key case-insensitively; the director sends lower case.
    #[serde(alias = "Method", alias = "METHOD")]
    pub method: String,
    #[serde(default)]
    pub arguments: Vec<Value>,
    #[serde(default)]
    pub reply_to: String,
    /// A missing `protocol` means 0, as upstream.
    #[serde(default)]
    pub protocol: i64,
}

/// Why a message gets no reply: upstream logs and drops a body it cannot decode, because
/// there is no `reply_to` to answer.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("request has no reply_to")]
    NoReplyTo,
    #[error(
        "request's reply_to is {len} bytes long (starting {start:?}): a reply to it would exceed nats-server's control-line limit ({max} bytes at most)"
    )]
    ReplyToTooLong {
        start: String,
        len: usize,
        max: usize,
    },
    #[error("request body of {len} bytes exceeds the protocol's limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Decodes a request body. A body over [`REQUEST_MAX_LEN`] is refused unread.
pub fn decode(body: &[u8]) -> Result<Request, DecodeError> {
    if body.len() > REQUEST_MAX_LEN {
        return Err(DecodeError::TooLarge {
            len: body.len(),
            max: REQUEST_MAX_LEN,
        });
    }
    let req: Request = serde_json::from_slice(body)?;
    if req.reply_to.is_empty() {
        return Err(DecodeError::NoReplyTo);
    }
    // Publishing to it would make nats-server close the agent's connection, losing every
    // other reply in flight: refuse the one request instead.
    if mbus::check_subject_len(&req.reply_to).is_err() {
        return Err(DecodeError::ReplyToTooLong {
            start: req.reply_to.chars().take(32).collect(),
            len: req.reply_to.len(),
            max: mbus::MAX_SUBJECT_LEN,
        });
    }
    Ok(req)
}

/// A response.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Value(Value),
    Exception(String),
}

impl Response {
    /// `{"value": v}` or `{"exception": {"message": m}}`.
    pub fn to_json(&self) -> Value {
        match self {
            Response::Value(v) => json!({ "value": v }),
            Response::Exception(m) => json!({ "exception": { "message": m } }),
        }
    }
}

const TRUNCATED: &str = "\n...[truncated]...\n";
const TOO_LONG: &str = "Response exceeded maximum allowed length";

/// Serialises `resp` within `max` bytes by upstream's rule: a value that does not fit is
/// replaced by the exception "Response exceeded maximum allowed length"; an exception's message
/// is cut to head + "\n...[truncated]...\n" + tail (the tail gets the odd byte, cuts respect
/// UTF-8), repeatedly, until the JSON fits.
pub fn encode_limited(resp: &Response, max: usize) -> Vec<u8> {
    let full = serde_json::to_vec(&resp.to_json()).unwrap_or_default();
    if full.len() <= max {
        return full;
    }
    if let Response::Exception(msg) = resp {
        let wrapper = serde_json::to_vec(&Response::Exception(String::new()).to_json())
            .map_or(0, |v| v.len());
        let mut budget = max.saturating_sub(wrapper).min(msg.len());
        while let Some(cut) = truncate_middle(msg, budget) {
            let out = serde_json::to_vec(&Response::Exception(cut).to_json()).unwrap_or_default();
            if out.len() <= max {
                return out;
            }
            // JSON escaping made it longer than its byte count: shrink by the excess.
            budget = budget.saturating_sub((out.len() - max).max(1));
        }
    }
    serde_json::to_vec(&Response::Exception(TOO_LONG.into()).to_json()).unwrap_or_default()
}

/// `msg` shortened to at most `budget` bytes as head + marker + tail, or `None` when the budget
/// leaves no room for the marker.
fn truncate_middle(msg: &str, budget: usize) -> Option<String> {
    let room = budget.checked_sub(TRUNCATED.len())?;
    if room == 0 {
        return None;
    }
    let head_len = floor_boundary(msg, room / 2);
    let tail_start = ceil_boundary(msg, msg.len() - (room - room / 2));
    Some(format!(
        "{}{TRUNCATED}{}",
        &msg[..head_len],
        &msg[tail_start..]
    ))
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_decode_with_upstreams_defaults() {
        let r = decode(br#"{"method":"ping","arguments":[],"reply_to":"director.1","protocol":3}"#)
            .unwrap();
        assert_eq!(
            (r.method.as_str(), r.protocol, r.reply_to.as_str()),
            ("ping", 3, "director.1")
        );
        let r = decode(br#"{"Method":"ping","reply_to":"d"}"#).unwrap();
        assert_eq!(
            (r.method.as_str(), r.protocol, r.arguments.len()),
            ("ping", 0, 0)
        );
    }

    #[test]
    fn undecodable_requests_are_errors_not_panics() {
        assert!(matches!(decode(b"{not json"), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode(br#"{"method":"ping"}"#),
            Err(DecodeError::NoReplyTo)
        ));
        assert!(matches!(
            decode(br#"{"method":5,"reply_to":"x"}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(br#"{"method":"a","arguments":{},"reply_to":"x"}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(decode(&[0xff, 0xfe]).is_err());
        assert!(decode(b"").is_err());
    }

    #[test]
    fn a_body_over_the_limit_is_refused_before_decoding() {
        // Valid JSON, so only the size can refuse it.
        let pad = REQUEST_MAX_LEN - br#"{"method":"ping","reply_to":"d","x":""}"#.len();
        let fits = format!(
            r#"{{"method":"ping","reply_to":"d","x":"{}"}}"#,
            "a".repeat(pad)
        );
        assert_eq!(fits.len(), REQUEST_MAX_LEN);
        assert_eq!(decode(fits.as_bytes()).unwrap().method, "ping");
        let over = format!(
            r#"{{"method":"ping","reply_to":"d","x":"{}"}}"#,
            "a".repeat(pad + 1)
        );
        match decode(over.as_bytes()) {
            Err(DecodeError::TooLarge { len, max }) => {
                assert_eq!((len, max), (REQUEST_MAX_LEN + 1, REQUEST_MAX_LEN));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_reply_to_over_the_control_line_limit_is_refused() {
        let body = |n: usize| format!(r#"{{"method":"ping","reply_to":"{}"}}"#, "r".repeat(n));
        assert!(decode(body(mbus::MAX_SUBJECT_LEN).as_bytes()).is_ok());
        for n in [
            mbus::MAX_SUBJECT_LEN + 1,
            mbus::MAX_CONTROL_LINE + 1,
            100_000,
        ] {
            match decode(body(n).as_bytes()) {
                Err(e @ DecodeError::ReplyToTooLong { .. }) => {
                    assert!(e.to_string().len() < 400, "the subject is not quoted whole");
                }
                other => panic!("{n}: expected ReplyToTooLong, got {other:?}"),
            }
        }
    }

    #[test]
    fn shapes_are_upstreams() {
        assert_eq!(
            Response::Value(json!("pong")).to_json(),
            json!({"value":"pong"})
        );
        assert_eq!(
            Response::Exception("x".into()).to_json(),
            json!({"exception":{"message":"x"}})
        );
    }

    #[test]
    fn small_responses_are_untouched() {
        let r = Response::Value(json!({"a": 1}));
        assert_eq!(encode_limited(&r, 100), br#"{"value":{"a":1}}"#.to_vec());
    }

    #[test]
    fn an_oversized_value_becomes_the_length_exception() {
        let r = Response::Value(json!("x".repeat(200)));
        let out: Value = serde_json::from_slice(&encode_limited(&r, 100)).unwrap();
        assert_eq!(out, json!({"exception":{"message":TOO_LONG}}));
    }

    #[test]
    fn an_oversized_exception_keeps_head_and_tail_within_the_limit() {
        for max in [90usize, 91, 100, 257, 1000] {
            let msg = format!("HEAD{}TAIL", "é\"x".repeat(300));
            let out = encode_limited(&Response::Exception(msg.clone()), max);
            assert!(out.len() <= max, "max {max}: {}", out.len());
            let v: Value = serde_json::from_slice(&out).unwrap();
            let m = v["exception"]["message"].as_str().unwrap();
            assert!(m.contains("...[truncated]..."), "{m}");
            assert!(
                m.starts_with("HEAD") && m.ends_with("TAIL"),
                "max {max}: {m}"
            );
        }
    }

    #[test]
    fn the_tail_gets_the_odd_byte() {
        let cut = truncate_middle("abcdefghij", TRUNCATED.len() + 5).unwrap();
        assert_eq!(cut, format!("ab{TRUNCATED}hij"));
    }

    #[test]
    fn a_tiny_limit_falls_back_to_the_length_exception() {
        let out = encode_limited(&Response::Exception("y".repeat(500)), 30);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["exception"]["message"], TOO_LONG);
    }
}
