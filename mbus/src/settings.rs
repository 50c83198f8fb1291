//! The mbus part of settings.json (upstream's format, `settings/settings.go`).
//!
//! Precedence is upstream's: URLs come from the first non-empty of `update_settings.mbus.urls`,
//! `env.bosh.mbus.urls`, then `[mbus]`; the certificate pair from `update_settings.mbus.cert`
//! if its `ca` is non-empty, else `env.bosh.mbus.cert`. One source wins as a whole list.

use serde_json::Value;
use thiserror::Error;

use crate::tls::CertKeyPair;
use crate::urls::{HttpsUrl, MbusUrl, ServerUrl, UrlError, parse_https_url, parse_mbus_url};

/// What the mbus client needs from the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbusConfig {
    /// `agent_id`: the request subject is `agent.<agent_id>`.
    pub agent_id: String,
    /// NATS servers in settings order (the failover order).
    pub servers: Vec<ServerUrl>,
    /// `https://` URLs (create-env), redacted: reported, never dialled.
    pub skipped: Vec<String>,
    /// The agent's own HTTPS API (create-env), when the first URL is `https://`: upstream
    /// picks the message bus by the first URL's scheme, and then no NATS server is dialled.
    /// An `https://` URL that is not first is only skipped. A malformed one is in `rejected`.
    pub https: Option<HttpsUrl>,
    /// URLs that could not be parsed. They are left out so that one typo does not cut the VM
    /// off; the agent should log them. Empty `servers` with non-empty `rejected` is an error
    /// at [`crate::Bus::connect`].
    pub rejected: Vec<UrlError>,
    /// Which settings path the URLs came from (for logs and status).
    pub urls_origin: &'static str,
    /// Mutual-TLS material; validated by [`crate::tls::client_config`].
    pub cert: CertKeyPair,
}

/// Settings that cannot give an mbus configuration. Each variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SettingsError {
    /// A field has the wrong JSON type.
    #[error("settings field {field} must be {expected}")]
    WrongType {
        /// Dotted path, e.g. `env.bosh.mbus.urls[1]`.
        field: String,
        /// Expected JSON type.
        expected: &'static str,
    },
    /// `agent_id` is missing or empty.
    #[error("settings field agent_id is missing or empty")]
    MissingAgentId,
    /// `agent_id` cannot be used in a NATS subject.
    #[error("settings field agent_id {agent_id:?} cannot be used in a NATS subject: {reason}")]
    BadAgentId {
        /// The value found.
        agent_id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// `agent_id` is so long that the subjects built from it would exceed nats-server's
    /// control-line limit (the server would drop the connection).
    #[error(
        "settings field agent_id is {len} bytes long: at most {max} fit nats-server's control-line limit"
    )]
    AgentIdTooLong {
        /// Its length.
        len: usize,
        /// [`crate::client::MAX_AGENT_ID_LEN`].
        max: usize,
    },
    /// No source gives a URL.
    #[error("no mbus URL: update_settings.mbus.urls, env.bosh.mbus.urls and mbus are all empty")]
    NoMbusUrl,
}

/// Extracts the mbus configuration from parsed settings.json, with upstream's precedence.
/// `update_settings` is the persisted `update_settings` document (shape `{"mbus": {"urls":
/// [...], "cert": {...}}}`), if any. Never panics on odd input; errors name the field.
pub fn mbus_config(
    settings: &Value,
    update_settings: Option<&Value>,
) -> Result<MbusConfig, SettingsError> {
    let agent_id = string_at(settings, &["agent_id"])?.unwrap_or_default();
    validate_agent_id(agent_id)?;

    let update_urls = match update_settings {
        Some(u) => strings_at(u, &["mbus", "urls"], "update_settings.")?,
        None => Vec::new(),
    };
    let env_urls = strings_at(settings, &["env", "bosh", "mbus", "urls"], "")?;
    let mbus = string_at(settings, &["mbus"])?.unwrap_or_default();
    let (raw_urls, urls_origin) = if !update_urls.is_empty() {
        (update_urls, "update_settings.mbus.urls")
    } else if !env_urls.is_empty() {
        (env_urls, "env.bosh.mbus.urls")
    } else if !mbus.is_empty() {
        (vec![mbus.to_string()], "mbus")
    } else {
        return Err(SettingsError::NoMbusUrl);
    };

    let (mut servers, mut skipped, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    let mut https = None;
    for (i, raw) in raw_urls.iter().enumerate() {
        match parse_mbus_url(raw) {
            Ok(MbusUrl::Server(s)) => servers.push(s),
            Ok(MbusUrl::SkippedHttps(u)) => {
                if i == 0 {
                    match parse_https_url(raw) {
                        Ok(h) => https = Some(h),
                        Err(e) => rejected.push(e),
                    }
                }
                skipped.push(u);
            }
            Err(e) => rejected.push(e),
        }
    }

    let update_cert = match update_settings {
        Some(u) => cert_at(u, &["mbus", "cert"], "update_settings.mbus.cert")?,
        None => None,
    };
    let cert = match update_cert {
        Some(c) if !c.ca.is_empty() => c,
        _ => cert_at(
            settings,
            &["env", "bosh", "mbus", "cert"],
            "env.bosh.mbus.cert",
        )?
        .unwrap_or(CertKeyPair {
            origin: "env.bosh.mbus.cert",
            ..CertKeyPair::default()
        }),
    };

    Ok(MbusConfig {
        agent_id: agent_id.to_string(),
        servers,
        skipped,
        https,
        rejected,
        urls_origin,
        cert,
    })
}

/// Subjects are `agent.<id>` and `hm.agent.<topic>.<id>`: a wildcard or blank in the id would
/// subscribe to other agents' traffic or produce an invalid subject.
fn validate_agent_id(id: &str) -> Result<(), SettingsError> {
    let bad = |reason| {
        Err(SettingsError::BadAgentId {
            agent_id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return Err(SettingsError::MissingAgentId);
    }
    if id.len() > crate::client::MAX_AGENT_ID_LEN {
        return Err(SettingsError::AgentIdTooLong {
            len: id.len(),
            max: crate::client::MAX_AGENT_ID_LEN,
        });
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace or control characters");
    }
    if id.contains(['*', '>']) {
        return bad("contains a NATS wildcard (* or >)");
    }
    if id.split('.').any(str::is_empty) {
        return bad("has an empty subject token (leading, trailing or double dot)");
    }
    Ok(())
}

fn dotted(prefix: &str, path: &[&str]) -> String {
    format!("{prefix}{}", path.join("."))
}

/// Walks `path`; a missing key or `null` anywhere along it reads as absent (upstream's Go
/// structs decode both as zero values). A non-object in the middle is a type error.
fn value_at<'a>(
    root: &'a Value,
    path: &[&str],
    prefix: &str,
) -> Result<Option<&'a Value>, SettingsError> {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        match cur {
            Value::Null => return Ok(None),
            Value::Object(map) => match map.get(*key) {
                None => return Ok(None),
                Some(v) => cur = v,
            },
            _ => {
                return Err(SettingsError::WrongType {
                    field: dotted(prefix, &path[..i]),
                    expected: "an object",
                });
            }
        }
    }
    Ok(if cur.is_null() { None } else { Some(cur) })
}

fn string_at<'a>(root: &'a Value, path: &[&str]) -> Result<Option<&'a str>, SettingsError> {
    match value_at(root, path, "")? {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(SettingsError::WrongType {
            field: dotted("", path),
            expected: "a string",
        }),
    }
}

fn strings_at(root: &Value, path: &[&str], prefix: &str) -> Result<Vec<String>, SettingsError> {
    match value_at(root, path, prefix)? {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(SettingsError::WrongType {
                    field: format!("{}[{i}]", dotted(prefix, path)),
                    expected: "a string",
                }),
            })
            .collect(),
        Some(_) => Err(SettingsError::WrongType {
            field: dotted(prefix, path),
            expected: "an array of strings",
        }),
    }
}

fn cert_at(
    root: &Value,
    path: &[&str],
    origin: &'static str,
) -> Result<Option<CertKeyPair>, SettingsError> {
    let prefix = if origin.starts_with("update_settings.") {
        "update_settings."
    } else {
        ""
    };
    let Some(obj) = value_at(root, path, prefix)? else {
        return Ok(None);
    };
    let field = |name: &str| -> Result<String, SettingsError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(SettingsError::WrongType {
                field: format!("{origin}.{name}"),
                expected: "a string",
            }),
        }
    };
    if !obj.is_object() {
        return Err(SettingsError::WrongType {
            field: origin.to_string(),
            expected: "an object",
        });
    }
    Ok(Some(CertKeyPair {
        ca: field("ca")?,
        certificate: field("certificate")?,
        private_key: field("private_key")?,
        origin,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hosts(c: &MbusConfig) -> Vec<String> {
        c.servers.iter().map(|s| s.host.to_string()).collect()
    }

    #[test]
    fn env_urls_win_over_mbus() {
        let s = json!({"agent_id": "123-456", "mbus": "nats://nats:pw@10.0.0.6:4222",
            "env": {"bosh": {"mbus": {"urls": ["nats://10.0.0.6:4222", "nats://10.0.0.7"],
                "cert": {"ca": "CA", "certificate": "C", "private_key": "K"}}}}});
        let c = mbus_config(&s, None).unwrap();
        assert_eq!(c.agent_id, "123-456");
        assert_eq!(hosts(&c), ["10.0.0.6", "10.0.0.7"]);
        assert_eq!(c.servers[1].port, 4222);
        assert_eq!(c.urls_origin, "env.bosh.mbus.urls");
        assert_eq!(c.cert.ca, "CA");
        assert_eq!(c.cert.origin, "env.bosh.mbus.cert");
    }

    #[test]
    fn falls_back_to_mbus_when_urls_empty_or_null() {
        for env in [
            json!({"bosh": {"mbus": {"urls": []}}}),
            json!(null),
            json!({}),
        ] {
            let s = json!({"agent_id": "a", "mbus": "nats://u:p@h:1", "env": env});
            let c = mbus_config(&s, None).unwrap();
            assert_eq!(c.urls_origin, "mbus");
            assert_eq!(hosts(&c), ["h"]);
            assert!(c.servers[0].credentials.is_some());
            assert_eq!(c.cert.certificate, "");
        }
    }

    #[test]
    fn update_settings_override() {
        let s = json!({"agent_id": "a", "mbus": "nats://h0",
            "env": {"bosh": {"mbus": {"urls": ["nats://h1"], "cert": {"ca": "ENV"}}}}});
        let u = json!({"mbus": {"urls": ["nats://h2"], "cert": {"ca": "UPD", "certificate": "C"}}});
        let c = mbus_config(&s, Some(&u)).unwrap();
        assert_eq!(hosts(&c), ["h2"]);
        assert_eq!(c.urls_origin, "update_settings.mbus.urls");
        assert_eq!(
            (c.cert.ca.as_str(), c.cert.origin),
            ("UPD", "update_settings.mbus.cert")
        );
        // An update cert with empty CA does not win; empty update URLs do not either.
        let u = json!({"mbus": {"urls": [], "cert": {"ca": "", "certificate": "C"}}});
        let c = mbus_config(&s, Some(&u)).unwrap();
        assert_eq!(hosts(&c), ["h1"]);
        assert_eq!(c.cert.ca, "ENV");
    }

    #[test]
    fn a_first_https_url_is_the_agents_own_api_as_upstream_selects_it() {
        let s = json!({"agent_id": "a", "env": {"bosh": {"mbus": {"urls":
            ["https://mbus:secret@0.0.0.0:6868", "nats://ok"]}}}});
        let c = mbus_config(&s, None).unwrap();
        let h = c.https.as_ref().unwrap();
        assert_eq!(
            (h.authority(), h.user.as_str()),
            ("0.0.0.0:6868".into(), "mbus")
        );
        assert!(!format!("{c:?}").contains("secret"));
        // Only the first URL selects the API; a later one is merely skipped.
        let s = json!({"agent_id": "a", "mbus": "nats://ok",
            "env": {"bosh": {"mbus": {"urls": ["nats://ok", "https://m:p@0.0.0.0:6868"]}}}});
        assert!(mbus_config(&s, None).unwrap().https.is_none());
        // The old `mbus` key selects it too (create-env's settings carry both).
        let s = json!({"agent_id": "a", "mbus": "https://m:p@10.0.0.6:6868"});
        assert_eq!(mbus_config(&s, None).unwrap().https.unwrap().port, 6868);
        // A first https URL that cannot be served is rejected, naming it without the password.
        let s = json!({"agent_id": "a", "mbus": "https://mbus@0.0.0.0:6868"});
        let c = mbus_config(&s, None).unwrap();
        assert!(c.https.is_none());
        assert_eq!(c.rejected.len(), 1);
        assert!(c.rejected[0].to_string().contains("user:password@"));
    }

    #[test]
    fn https_skipped_bad_rejected() {
        let s = json!({"agent_id": "a", "env": {"bosh": {"mbus": {"urls":
            ["https://u:secret@10.0.0.6:6868", "nats://u:secret@h:99999", "nats://ok"]}}}});
        let c = mbus_config(&s, None).unwrap();
        assert_eq!(hosts(&c), ["ok"]);
        assert_eq!(c.skipped, ["https://***@10.0.0.6:6868"]);
        assert_eq!(c.rejected.len(), 1);
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"mbus": "nats://h"}), SettingsError::MissingAgentId),
            (json!({"agent_id": "a"}), SettingsError::NoMbusUrl),
            (
                json!({"agent_id": 7, "mbus": "nats://h"}),
                SettingsError::WrongType {
                    field: "agent_id".into(),
                    expected: "a string",
                },
            ),
            (
                json!({"agent_id": "a", "env": {"bosh": {"mbus": {"urls": ["nats://h", 3]}}}}),
                SettingsError::WrongType {
                    field: "env.bosh.mbus.urls[1]".into(),
                    expected: "a string",
                },
            ),
            (
                json!({"agent_id": "a", "env": {"bosh": "x"}}),
                SettingsError::WrongType {
                    field: "env.bosh".into(),
                    expected: "an object",
                },
            ),
            (
                json!({"agent_id": "a", "mbus": "nats://h",
                    "env": {"bosh": {"mbus": {"cert": {"ca": 1}}}}}),
                SettingsError::WrongType {
                    field: "env.bosh.mbus.cert.ca".into(),
                    expected: "a string",
                },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(mbus_config(&s, None).unwrap_err(), want, "{s}");
        }
        let long = "a".repeat(crate::client::MAX_AGENT_ID_LEN + 1);
        let s = json!({"agent_id": long, "mbus": "nats://h"});
        let e = mbus_config(&s, None).unwrap_err();
        assert!(matches!(e, SettingsError::AgentIdTooLong { .. }), "{e}");
        assert!(e.to_string().contains("agent_id"), "{e}");
        assert!(
            !e.to_string().contains(&long),
            "the id is not quoted whole: {e}"
        );
        let fits = "a".repeat(crate::client::MAX_AGENT_ID_LEN);
        assert!(mbus_config(&json!({"agent_id": fits, "mbus": "nats://h"}), None).is_ok());
        for id in ["a*", "a>", "a b", ".a", "a..b", "a.", "a\nb"] {
            let s = json!({"agent_id": id, "mbus": "nats://h"});
            assert!(
                matches!(mbus_config(&s, None), Err(SettingsError::BadAgentId { .. })),
                "{id:?}"
            );
        }
    }
}
