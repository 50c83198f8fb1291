//! The `update_settings` argument on its way through the agent, as JSON: the input is the new
//! settings, or `[existing, new, settings.json]` (the persisted document the update merges
//! into, and the settings the mbus candidate is built against). Checked, without I/O:
//! - a request carrying it decodes and `Action::parse` accepts it exactly when
//!   `check_update_settings` does (a refusal is `Action Failed …`), and hands on the same
//!   value;
//! - upstream's merge of an accepted update: `trusted_certs` (or "") and `disk_associations`
//!   (or null) always replaced; `mbus` replaced exactly when the new one is non-empty and
//!   differs, `blobstores` exactly when present and different; every other key of the
//!   persisted document kept; merging the same update again changes nothing;
//! - the mbus candidate built from the merged document never panics, and one it accepts has a
//!   server;
//! - the trusted-certificate bundle splits into pieces that each end with the END line and
//!   that are, in order, pieces of the bundle.
#![no_main]

use agent::director::action::{Action, ActionError};
use agent::director::actions::update_settings::{merge, split_certs};
use agent::director::checks::check_update_settings;
use agent::director::mbus_fallback;
use agent::director::protocol::decode;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let (existing, new, settings) = match &doc {
        Value::Array(a) if (2..=3).contains(&a.len()) => (
            a[0].clone(),
            a[1].clone(),
            a.get(2)
                .cloned()
                .unwrap_or_else(|| json!({"agent_id": "a"})),
        ),
        _ => (json!({}), doc.clone(), json!({"agent_id": "a"})),
    };
    let checked = check_update_settings(&new);
    let req =
        json!({"method": "update_settings", "arguments": [new], "reply_to": "r", "protocol": 3});
    let bytes = serde_json::to_vec(&req).unwrap_or_else(|e| panic!("{e}"));
    // A request too large for the bus is refused before any check; that is decode's job.
    let Ok(req) = decode(&bytes) else {
        return;
    };
    match (Action::parse(&req), &checked) {
        (Ok(Action::UpdateSettings { new: parsed }), Ok(())) => assert_eq!(parsed, new),
        (Ok(other), _) => panic!("update_settings parsed as {other:?} (check said {checked:?})"),
        (Err(e @ ActionError::UnknownMessage(_)), _) => panic!("update_settings unknown: {e}"),
        (Err(e), Err(_)) => assert!(e.to_string().starts_with("Action Failed "), "{e}"),
        (Err(e), Ok(())) => panic!("check accepts {new} but the parser refuses it: {e}"),
    }
    if checked.is_err() {
        return;
    }
    let m = merge(&existing, &new);
    let obj = m
        .doc
        .as_object()
        .unwrap_or_else(|| panic!("merged is not an object: {}", m.doc));
    let certs = match new.get("trusted_certs") {
        None | Some(Value::Null) => json!(""),
        Some(v) => v.clone(),
    };
    assert_eq!(obj.get("trusted_certs"), Some(&certs));
    assert_eq!(
        obj.get("disk_associations"),
        Some(new.get("disk_associations").unwrap_or(&Value::Null))
    );
    let old = existing.as_object().cloned().unwrap_or_default();
    let new_mbus = new.get("mbus");
    let empty = |v: Option<&Value>| -> bool { is_empty(v) };
    let mbus_should = !empty(new_mbus) && new_mbus != old.get("mbus");
    assert_eq!(
        m.mbus_changed, mbus_should,
        "mbus_changed for {new} into {existing}"
    );
    assert_eq!(
        obj.get("mbus"),
        if mbus_should {
            new_mbus
        } else {
            old.get("mbus")
        }
    );
    let new_bs = new.get("blobstores").filter(|v| !v.is_null());
    let bs_should = new_bs.is_some() && new_bs != old.get("blobstores");
    assert_eq!(m.blobstores_changed, bs_should);
    assert_eq!(
        obj.get("blobstores"),
        if bs_should {
            new_bs
        } else {
            old.get("blobstores")
        }
    );
    for (k, v) in &old {
        if !["trusted_certs", "disk_associations", "mbus", "blobstores"].contains(&k.as_str()) {
            assert_eq!(
                obj.get(k),
                Some(v),
                "key {k} of the persisted document lost"
            );
        }
    }
    let again = merge(&m.doc, &new);
    assert_eq!(again.doc, m.doc, "merging twice changes the document");
    assert!(!again.mbus_changed && !again.blobstores_changed);
    if let Ok(c) = mbus_fallback::candidate(&settings, Some(&m.doc), "update_settings") {
        assert!(
            !c.cfg.servers.is_empty(),
            "a usable candidate without a server"
        );
    }
    let bundle = certs.as_str().unwrap_or("");
    let mut rest = bundle;
    for piece in split_certs(bundle) {
        assert!(piece.ends_with("-----END CERTIFICATE-----\n"), "{piece:?}");
        let body = piece.trim_end_matches('\n');
        let at = rest
            .find(body)
            .unwrap_or_else(|| panic!("{body:?} is not in order in {bundle:?}"));
        rest = &rest[at + body.len()..];
    }
});

/// Upstream's notion of an empty mbus (Go zero values all the way down), written again here
/// so that the merge is checked against the rule and not against itself.
fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.values().all(|x| is_empty(Some(x))),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Bool(_) | Value::Number(_)) => false,
    }
}
