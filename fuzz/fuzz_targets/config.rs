//! agent.json, settings.json and monit's alert mails as hostile text: every parser refuses or
//! accepts, never panics.
#![no_main]

use std::path::Path;

use agent::alerts::{parse_mail, parse_rfc1123z};
use agent::config::AgentConfig;
use agent::settings::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = AgentConfig::parse(Path::new("agent.json"), &text);
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = Settings::parse(&doc);
    }
    let _ = parse_mail(&text);
    let _ = parse_rfc1123z(&text);
});
