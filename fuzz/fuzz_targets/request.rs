//! A director request from the bus, as bytes: decoding and argument checking never panic, and
//! whatever is refused gets upstream's wording (`unknown message …` or `Action Failed …`).
#![no_main]

use agent::director::action::{Action, ActionError};
use agent::director::protocol::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = decode(data) else {
        return;
    };
    match Action::parse(&req) {
        Ok(action) => {
            // Modes are total: every parsed action has one.
            let _ = (action.is_async(), action.is_cancellable());
        }
        Err(e @ ActionError::UnknownMessage(_)) => {
            assert!(e.to_string().starts_with("unknown message "))
        }
        Err(e) => assert!(e.to_string().starts_with("Action Failed ")),
    }
});
