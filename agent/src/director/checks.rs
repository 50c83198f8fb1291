//! The checks a request's arguments get before anything runs, shared by the parsing of an
//! [`super::Action`] and the handlers that rely on them.

use jobs::ApplySpec;
use serde_json::Value;

/// Parses the director's apply spec for the applier; the error names the field.
pub fn parse_spec(spec: &Value) -> Result<ApplySpec, String> {
    ApplySpec::from_json(spec).map_err(|e| e.to_string())
}

/// Whether `spec` asks for the full applier (a non-empty `configuration_hash`). A partial
/// spec (the director's first apply, before templates are rendered) is only persisted, and
/// is not checked further than being an object, as upstream.
pub fn has_configuration(spec: &Value) -> bool {
    spec.get("configuration_hash")
        .and_then(Value::as_str)
        .is_some_and(|h| !h.is_empty())
}

/// Why an `update_settings` argument is refused. Nothing has been written when one is
/// returned.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("update_settings argument must be a JSON object, got {0}")]
    NotAnObject(String),
    #[error("update_settings field {field} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("Updating mbus: {0}; nothing was changed")]
    Mbus(String),
    #[error("Fetching disk settings: {0}")]
    Disk(String),
    #[error("Updating trusted certificates: {0}")]
    Certs(String),
    #[error("Saving update settings: {0}")]
    Save(String),
}

/// Checks the fields' types, so that a malformed update fails before anything is written.
pub fn check_update_settings(new: &Value) -> Result<(), UpdateError> {
    let Some(obj) = new.as_object() else {
        let mut shown = new.to_string();
        if shown.len() > 64 {
            let mut cut = 64;
            while !shown.is_char_boundary(cut) {
                cut -= 1;
            }
            shown.truncate(cut);
            shown.push('…');
        }
        return Err(UpdateError::NotAnObject(shown));
    };
    let wrong = |field, expected| Err(UpdateError::WrongType { field, expected });
    match obj.get("trusted_certs") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return wrong("trusted_certs", "a string"),
    }
    match obj.get("mbus") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return wrong("mbus", "an object"),
    }
    match obj.get("blobstores") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_object) => {}
        Some(_) => return wrong("blobstores", "an array of objects"),
    }
    match obj.get("disk_associations") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a))
            if a.iter().all(|d| {
                d.get("name").and_then(Value::as_str).is_some()
                    && d.get("cid").and_then(Value::as_str).is_some()
            }) => {}
        Some(_) => return wrong("disk_associations", "an array of {name, cid}"),
    }
    Ok(())
}
