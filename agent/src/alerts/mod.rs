//! Monit alerts: monit mails them to an SMTP server the agent runs on `127.0.0.1:2825`; each
//! mail becomes upstream's alert (`agent/alert/monit_adapter.go`) for `hm.agent.alert.<id>`.
//!
//! The SMTP side is a minimal receiver (HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, plus
//! VRFY/HELP answered politely). It is reachable by every local process, so every resource a
//! client can make it hold is bounded: command lines ([`MAX_COMMAND_LINE`]), message size
//! ([`MAX_MESSAGE_BYTES`]; a mail is parsed line by line and never buffered whole), concurrent
//! sessions ([`MAX_SESSIONS`]), idle time ([`IDLE_TIMEOUT`]), session lifetime
//! ([`MAX_SESSION_TIME`]) and errors per session ([`MAX_ERRORS`]).
//!
//! TCP on loopback tells the server nothing about who connected (no peer uid), so sessions
//! cannot be bounded per user; they are bounded by count and time instead, and a connection
//! beyond the count evicts the session that has waited longest for its next command (else the
//! oldest session). Holding sessions open therefore cannot lock monit out: monit's session
//! sends its commands back to back, so it is never the one idle longest unless a flooder opens
//! [`MAX_SESSIONS`] connections within one of monit's round trips, and each flooding
//! connection mostly evicts the flooder's own earlier ones.
//!
//! The mail and alert logic is pure ([`parse_mail`], [`to_alert`], [`parse_rfc1123z`]).

mod date;
mod mail;
mod severity;
mod smtp;

pub use date::parse_rfc1123z;
pub use mail::{Alert, MailParser, MonitMail, parse_mail, to_alert};
pub use severity::{SEVERITY_DEFAULT, Severity, severity_for_event};
pub use smtp::{
    AlertsError, BIND_RETRY_INITIAL, BIND_RETRY_MAX, IDLE_TIMEOUT, LISTEN_ADDR, MAX_COMMAND_LINE,
    MAX_ERRORS, MAX_MESSAGE_BYTES, MAX_SESSION_TIME, MAX_SESSIONS, bind_with_retry, serve,
};
