//! The director protocol's envelope (upstream's shapes): a request
//! `{"method","arguments","reply_to","protocol"}` gets `{"value":…}` or
//! `{"exception":{"message":…}}`, published to the body's `reply_to`.
//!
//! This issue answers `ping`; every other method gets upstream's `unknown message <m>`. The
//! runtime issue adds the actions.

use serde::Deserialize;
use serde_json::{Value, json};

/// A decoded request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Request {
    /// Matched case-insensitively by upstream's decoder; the director sends lower case.
    #[serde(alias = "Method", alias = "METHOD")]
    pub method: String,
    #[serde(default)]
    pub arguments: Vec<Value>,
    #[serde(default)]
    pub reply_to: String,
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
}

/// Decodes a request body.
pub fn decode(body: &[u8]) -> Result<Request, DecodeError> {
    let req: Request = serde_json::from_slice(body)?;
    if req.reply_to.is_empty() {
        return Err(DecodeError::NoReplyTo);
    }
    Ok(req)
}

/// The response to a request.
pub fn respond(req: &Request) -> Value {
    match req.method.as_str() {
        "ping" => json!({"value": "pong"}),
        other => json!({"exception": {"message": format!("unknown message {other}")}}),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ping_pongs_and_unknown_methods_get_upstreams_exception() {
        let r = decode(br#"{"method":"ping","arguments":[],"reply_to":"director.1","protocol":3}"#)
            .unwrap();
        assert_eq!(respond(&r), json!({"value": "pong"}));
        assert_eq!(r.reply_to, "director.1");
        let r = decode(br#"{"method":"frobnicate","reply_to":"d.2"}"#).unwrap();
        assert_eq!(
            respond(&r),
            json!({"exception": {"message": "unknown message frobnicate"}})
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
        assert!(decode(&[0xff, 0xfe]).is_err());
    }
}
