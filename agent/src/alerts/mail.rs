//! Monit's mail → upstream's alert: the fields monit writes into a mail (read line by line,
//! never buffered whole) and the alert built from them.

use serde::{Deserialize, Serialize};

use super::date::parse_rfc1123z;
use super::severity::{Severity, severity_for_event};

/// The fields of one monit mail (upstream's `MonitAlert`); empty when the mail lacks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonitMail {
    pub id: String,
    pub service: String,
    pub event: String,
    pub action: String,
    pub date: String,
    pub description: String,
}

/// Builds a [`MonitMail`] one line at a time, so a mail never has to be held whole.
#[derive(Debug, Clone, Default)]
pub struct MailParser {
    mail: MonitMail,
}

impl MailParser {
    /// A parser that has seen no line.
    pub fn new() -> MailParser {
        MailParser::default()
    }

    /// Takes one line of the mail (headers and body alike, without its line ending).
    ///
    /// As upstream's `alertEnvelope.Write`: the line is trimmed, then `Message-id: <x>` sets
    /// the id (the whole trimmed line must be that, `x` non-empty without `>`; the header
    /// name is matched case-insensitively, which upstream does not), and `Service: `,
    /// `Event: `, `Action: `, `Date: `, `Description: ` set their field. A later line
    /// overrides an earlier one (monit's `Date:` header and the body's `Date:` agree anyway).
    pub fn feed_line(&mut self, line: &str) {
        let line = line.trim();
        if let Some(id) = message_id(line) {
            self.mail.id = id.to_string();
            return;
        }
        let fields: [(&str, &mut String); 5] = [
            ("Service: ", &mut self.mail.service),
            ("Event: ", &mut self.mail.event),
            ("Action: ", &mut self.mail.action),
            ("Date: ", &mut self.mail.date),
            ("Description: ", &mut self.mail.description),
        ];
        for (prefix, field) in fields {
            if let Some(value) = line.strip_prefix(prefix) {
                *field = value.to_string();
                return;
            }
        }
    }

    /// The mail, or `None` when no line set any field (upstream skips such mails).
    pub fn finish(self) -> Option<MonitMail> {
        (self.mail != MonitMail::default()).then_some(self.mail)
    }
}

/// `x` of a trimmed `Message-id: <x>` line (upstream's `^Message-id: <([^>]+)>$`).
fn message_id(line: &str) -> Option<&str> {
    const NAME: &str = "Message-id: <";
    let head = line.get(..NAME.len())?;
    if !head.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let id = line.get(NAME.len()..)?.strip_suffix('>')?;
    (!id.is_empty() && !id.contains('>')).then_some(id)
}

/// Parses a whole mail (lines separated by LF or CRLF, already dot-unstuffed).
///
/// Returns `None` when the mail has none of the fields; see [`MailParser::feed_line`].
pub fn parse_mail(text: &str) -> Option<MonitMail> {
    let mut parser = MailParser::new();
    for line in text.lines() {
        parser.feed_line(line);
    }
    parser.finish()
}

/// Upstream's alert, as published on `hm.agent.alert.<agent_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// The mail's `Message-id`, without the angle brackets.
    pub id: String,
    /// [`Severity::code`]: 1 alert, 2 critical, 3 error, 4 warning.
    pub severity: i32,
    /// `<service> (<ips>) - <event> - <action>`.
    pub title: String,
    /// The mail's `Description`.
    pub summary: String,
    /// Unix seconds: the mail's `Date`, or the time it was received.
    pub created_at: i64,
}

/// Builds upstream's alert from a mail, or `None` when the event's severity is "ignored".
///
/// Guarantees, as upstream's `monitAdapter`: `title` is `<service> (<ips>) - <event> -
/// <action>` with `ips` sorted as strings and joined with `", "` (and no parentheses when
/// there is no IP); `summary` is the description; `created_at` is `Date` parsed as RFC 1123
/// with a numeric zone, or `now_unix` when it does not parse.
pub fn to_alert(mail: &MonitMail, ips: &[String], now_unix: i64) -> Option<Alert> {
    let (severity, _) = severity_for_event(&mail.event);
    if severity == Severity::Ignored {
        return None;
    }
    let mut sorted = ips.to_vec();
    sorted.sort();
    let service = if sorted.is_empty() {
        mail.service.clone()
    } else {
        format!("{} ({})", mail.service, sorted.join(", "))
    };
    Some(Alert {
        id: mail.id.clone(),
        severity: severity.code(),
        title: format!("{service} - {} - {}", mail.event, mail.action),
        summary: mail.description.clone(),
        created_at: parse_rfc1123z(&mail.date).unwrap_or(now_unix),
    })
}

/// A mail as monit sends it with the agent's `mail-format` (CRLF lines, a `Message-id` header).
#[cfg(test)]
pub(super) const MAIL: &str = "From: monit@localhost\r\n\
    To: agent@local\r\n\
    Subject: Monit Alert\r\n\
    Date: Sun, 22 Nov 2026 03:00:00 +0000\r\n\
    X-Mailer: Monit 5.2.5\r\n\
    Message-id: <1304319946.0@localhost>\r\n\
    \r\n\
    Service: nats\r\n\
    Event: does not exist\r\n\
    Action: restart\r\n\
    Date: Sun, 22 Nov 2026 03:00:00 +0000\r\n\
    Description: process is not running\r\n";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mail_fields_are_parsed_like_upstream() {
        let mail = parse_mail(MAIL).unwrap();
        assert_eq!(
            mail,
            MonitMail {
                id: "1304319946.0@localhost".into(),
                service: "nats".into(),
                event: "does not exist".into(),
                action: "restart".into(),
                date: "Sun, 22 Nov 2026 03:00:00 +0000".into(),
                description: "process is not running".into(),
            }
        );
        // Trimmed, last one wins, case-insensitive Message-ID, malformed ids ignored.
        let mail = parse_mail(
            "  Service: a  \nService: b\nMESSAGE-ID: <x@y>\nMessage-id: <>\n\
             Message-id: <a>b>\nMessage-id: c\nservice: lower\nEvent:nospace\n",
        )
        .unwrap();
        assert_eq!(mail.service, "b");
        assert_eq!(mail.id, "x@y");
        assert_eq!(mail.event, "");
        assert_eq!(parse_mail(""), None);
        assert_eq!(parse_mail("Subject: hi\n\nhello\n"), None);
        assert_eq!(
            parse_mail("Description: only this").unwrap().description,
            "only this"
        );
        // Non-ASCII and odd bytes do not panic.
        assert!(parse_mail("Message-id: <é>\nService: ü\u{0}\n").is_some());
        assert_eq!(message_id("Message-id: <"), None);
        assert_eq!(message_id("Messäge-id: <x>"), None);
    }

    #[test]
    fn alert_has_upstreams_shape() {
        let mail = parse_mail(MAIL).unwrap();
        let ips = vec![
            "10.0.0.2".to_string(),
            "10.0.0.10".to_string(),
            "192.168.1.1".to_string(),
        ];
        let alert = to_alert(&mail, &ips, 42).unwrap();
        assert_eq!(
            serde_json::to_string(&alert).unwrap(),
            r#"{"id":"1304319946.0@localhost","severity":1,"title":"nats (10.0.0.10, 10.0.0.2, 192.168.1.1) - does not exist - restart","summary":"process is not running","created_at":1795316400}"#
        );
        let no_ips = to_alert(&mail, &[], 42).unwrap();
        assert_eq!(no_ips.title, "nats - does not exist - restart");

        let unparsable = MonitMail {
            date: "yesterday".into(),
            event: "unknown thing".into(),
            ..mail.clone()
        };
        let alert = to_alert(&unparsable, &[], 42).unwrap();
        assert_eq!((alert.created_at, alert.severity), (42, 2));

        let ignored = MonitMail {
            event: "Exists".into(),
            ..mail
        };
        assert_eq!(to_alert(&ignored, &ips, 42), None);
    }
}
