//! What the sources hold, parsed: a settings document (a JSON object), and the metadata
//! service's user data, which is the settings themselves (upstream's user data type embeds
//! them; its `registry`, `server` and `dns` keys are left in place and unused), either as JSON
//! or base64-encoded JSON (quotes around it removed, as upstream).

use base64::Engine;
use serde_json::Value;

use super::error::{FetchError, json_error};

/// `bytes` as a settings document: JSON, and an object. `what` names the origin in errors.
pub(crate) fn settings_document(bytes: &[u8], what: &str) -> Result<Value, FetchError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| json_error(what, &e))?;
    check_object(v, what)
}

fn check_object(v: Value, what: &str) -> Result<Value, FetchError> {
    let found = match v {
        Value::Object(_) => return Ok(v),
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    };
    Err(FetchError::NotAnObject {
        what: what.to_string(),
        found,
    })
}

/// The settings in the metadata service's user data: a JSON object, or base64 of one; it
/// must name an `agent_id` (upstream: "Metadata does not provide settings").
pub(crate) fn settings_from_user_data(bytes: &[u8], what: &str) -> Result<Value, FetchError> {
    let direct = serde_json::from_slice::<Value>(bytes);
    let settings = match direct {
        Ok(v @ Value::Object(_)) => v,
        other => {
            let json_problem = match other {
                Err(e) => match json_error(what, &e) {
                    FetchError::Json {
                        message,
                        line,
                        column,
                        ..
                    } => format!("as JSON: {message} (line {line}, column {column})"),
                    e => e.to_string(),
                },
                Ok(_) => "as JSON: not an object".to_string(),
            };
            let decoded = decode_base64(bytes).ok_or_else(|| FetchError::UserData {
                what: what.to_string(),
                detail: format!("{json_problem}; as base64: not base64"),
            })?;
            match serde_json::from_slice::<Value>(&decoded) {
                Ok(v @ Value::Object(_)) => v,
                Ok(_) => {
                    return Err(FetchError::UserData {
                        what: what.to_string(),
                        detail: format!("{json_problem}; decoded from base64: not a JSON object"),
                    });
                }
                Err(e) => {
                    return Err(FetchError::UserData {
                        what: what.to_string(),
                        detail: format!(
                            "{json_problem}; decoded from base64: {}",
                            e.to_string().split(" at line ").next().unwrap_or_default()
                        ),
                    });
                }
            }
        }
    };
    match settings.get("agent_id") {
        Some(Value::String(id)) if !id.is_empty() => Ok(settings),
        _ => Err(FetchError::NoAgentId {
            what: what.to_string(),
        }),
    }
}

/// Base64 as CPIs send it: upstream decodes the URL-safe alphabet without padding; padding
/// and the standard alphabet are accepted too (no CPI mixes them up on purpose).
fn decode_base64(bytes: &[u8]) -> Option<Vec<u8>> {
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| *b != b'"' && !b.is_ascii_whitespace())
        .collect();
    let trimmed: &[u8] = {
        let mut end = text.len();
        while end > 0 && text[end - 1] == b'=' {
            end -= 1;
        }
        &text[..end]
    };
    if trimmed.is_empty() {
        return None;
    }
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let std = base64::engine::general_purpose::STANDARD_NO_PAD;
    url.decode(trimmed).or_else(|_| std.decode(trimmed)).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: &str =
        r#"{"agent_id":"a-1","mbus":"nats://u:pw@10.0.0.6:4222","registry":{"endpoint":""}}"#;

    #[test]
    fn json_user_data_is_the_settings() {
        let v = settings_from_user_data(S.as_bytes(), "u").unwrap();
        assert_eq!(v["agent_id"], "a-1");
        assert_eq!(v["mbus"], "nats://u:pw@10.0.0.6:4222");
    }

    #[test]
    fn base64_user_data_in_every_spelling_is_decoded() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        // `?>` makes the two alphabets differ.
        let doc = r#"{"agent_id":"a-1","env":{"x":"??>>"}}"#;
        for text in [
            URL_SAFE_NO_PAD.encode(doc),
            STANDARD.encode(doc),
            format!("\"{}\"\n", URL_SAFE_NO_PAD.encode(doc)),
        ] {
            let v = settings_from_user_data(text.as_bytes(), "u").unwrap();
            assert_eq!(v["env"]["x"], "??>>", "{text}");
        }
    }

    #[test]
    fn user_data_without_an_agent_id_is_refused() {
        for doc in [
            r#"{"registry":{"endpoint":"http://r"},"server":{"name":"vm-1"},"dns":{"nameserver":["8.8.8.8"]}}"#,
            r#"{"agent_id":""}"#,
            r#"{"agent_id":7}"#,
        ] {
            let e = settings_from_user_data(doc.as_bytes(), "http://h/u").unwrap_err();
            assert!(matches!(e, FetchError::NoAgentId { .. }), "{doc}: {e}");
            assert!(e.to_string().contains("does not provide settings"), "{e}");
        }
    }

    #[test]
    fn malformed_user_data_says_both_ways_failed_without_showing_it() {
        let e =
            settings_from_user_data(b"{\"agent_id\":\"a\", pw-s3cret", "http://h/u").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("http://h/u") && m.contains("line 1") && m.contains("base64"),
            "{m}"
        );
        assert!(!m.contains("s3cret"), "{m}");
        // Valid base64 of something that is not JSON.
        let e = settings_from_user_data(b"c2VjcmV0", "u")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("decoded from base64") && !e.contains("secret"),
            "{e}"
        );
        // JSON that is not an object, and empty data.
        assert!(settings_from_user_data(b"[1]", "u").is_err());
        assert!(settings_from_user_data(b"", "u").is_err());
        assert!(settings_from_user_data(b"\"\"", "u").is_err());
    }

    #[test]
    fn documents_must_be_objects() {
        assert!(settings_document(b"{}", "f").is_ok());
        for (doc, found) in [
            ("null", "null"),
            ("true", "a boolean"),
            ("1", "a number"),
            ("\"s\"", "a string"),
            ("[]", "an array"),
        ] {
            let e = settings_document(doc.as_bytes(), "f")
                .unwrap_err()
                .to_string();
            assert!(e.contains(found), "{doc}: {e}");
        }
        let e = settings_document(b"{\"a\":", "/x/settings.json")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/x/settings.json: invalid JSON: EOF while parsing a value (line 1, column 5)"
        );
    }
}
