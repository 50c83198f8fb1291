//! Upstream's severity table: how bad each monit event is, and which are not sent at all.

/// Upstream's `SeverityLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Alert,
    Critical,
    Error,
    Warning,
    /// Not sent at all.
    Ignored,
}

impl Severity {
    /// The number upstream puts in the alert's `severity`.
    pub fn code(self) -> i32 {
        match self {
            Severity::Alert => 1,
            Severity::Critical => 2,
            Severity::Error => 3,
            Severity::Warning => 4,
            Severity::Ignored => -1,
        }
    }
}

/// Upstream's `SeverityDefault`, for events missing from the table.
pub const SEVERITY_DEFAULT: Severity = Severity::Critical;

/// Severity of a monit event, and whether the event is in upstream's table.
///
/// The table is upstream's `monitAdapter.Severity()` verbatim; the event is lowercased first,
/// as upstream does. An unknown event gets [`SEVERITY_DEFAULT`] and `false`.
pub fn severity_for_event(event: &str) -> (Severity, bool) {
    use Severity::{Alert, Critical, Error, Ignored, Warning};
    let severity = match event.to_lowercase().as_str() {
        "action done" => Ignored,
        "checksum failed" => Critical,
        "checksum changed" => Warning,
        "checksum succeeded" => Ignored,
        "checksum not changed" => Ignored,
        "connection failed" => Alert,
        "connection succeeded" => Ignored,
        "connection changed" => Error,
        "connection not changed" => Ignored,
        "content failed" => Error,
        "content succeeded" => Ignored,
        "content match" => Ignored,
        "content doesn't match" => Error,
        "data access error" => Error,
        "data access succeeded" => Ignored,
        "data access changed" => Warning,
        "data access not changed" => Ignored,
        "execution failed" => Alert,
        "execution succeeded" => Ignored,
        "execution changed" => Warning,
        "execution not changed" => Ignored,
        "filesystem flags failed" => Error,
        "filesystem flags succeeded" => Ignored,
        "filesystem flags changed" => Warning,
        "filesystem flags not changed" => Ignored,
        "gid failed" => Error,
        "gid succeeded" => Ignored,
        "gid changed" => Warning,
        "gid not changed" => Ignored,
        "heartbeat failed" => Error,
        "heartbeat succeeded" => Ignored,
        "heartbeat changed" => Warning,
        "heartbeat not changed" => Ignored,
        "icmp failed" => Critical,
        "icmp succeeded" => Ignored,
        "icmp changed" => Warning,
        "icmp not changed" => Ignored,
        "monit instance failed" => Alert,
        "monit instance succeeded" => Ignored,
        "monit instance changed" => Ignored,
        "monit instance not changed" => Ignored,
        "invalid type" => Error,
        "type succeeded" => Ignored,
        "type changed" => Warning,
        "type not changed" => Ignored,
        "does not exist" => Alert,
        "exists" => Ignored,
        "existence changed" => Warning,
        "existence not changed" => Ignored,
        "permission failed" => Error,
        "permission succeeded" => Ignored,
        "permission changed" => Warning,
        "permission not changed" => Ignored,
        "pid failed" => Critical,
        "pid succeeded" => Ignored,
        "pid changed" => Warning,
        "pid not changed" => Ignored,
        "ppid failed" => Critical,
        "ppid succeeded" => Ignored,
        "ppid changed" => Warning,
        "ppid not changed" => Ignored,
        "resource limit matched" => Error,
        "resource limit succeeded" => Ignored,
        "resource limit changed" => Warning,
        "resource limit not changed" => Ignored,
        "size failed" => Error,
        "size succeeded" => Ignored,
        "size changed" => Error,
        "size not changed" => Ignored,
        "timeout" => Critical,
        "timeout recovery" => Ignored,
        "timeout changed" => Warning,
        "timeout not changed" => Ignored,
        "timestamp failed" => Error,
        "timestamp succeeded" => Ignored,
        "timestamp changed" => Warning,
        "timestamp not changed" => Ignored,
        "uid failed" => Critical,
        "uid succeeded" => Ignored,
        "uid changed" => Warning,
        "uid not changed" => Ignored,
        _ => return (SEVERITY_DEFAULT, false),
    };
    (severity, true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn severity_table_is_upstreams() {
        assert_eq!(
            severity_for_event("does not exist"),
            (Severity::Alert, true)
        );
        assert_eq!(
            severity_for_event("Does Not Exist"),
            (Severity::Alert, true)
        );
        assert_eq!(severity_for_event("pid failed"), (Severity::Critical, true));
        assert_eq!(severity_for_event("size changed"), (Severity::Error, true));
        assert_eq!(
            severity_for_event("checksum changed"),
            (Severity::Warning, true)
        );
        assert_eq!(severity_for_event("action done"), (Severity::Ignored, true));
        assert_eq!(
            severity_for_event("monit instance changed"),
            (Severity::Ignored, true)
        );
        assert_eq!(
            severity_for_event("content doesn't match"),
            (Severity::Error, true)
        );
        assert_eq!(severity_for_event("timeout"), (Severity::Critical, true));
        assert_eq!(
            severity_for_event("no such event"),
            (Severity::Critical, false)
        );
        assert_eq!(severity_for_event(""), (Severity::Critical, false));
        let codes: Vec<i32> = [
            Severity::Alert,
            Severity::Critical,
            Severity::Error,
            Severity::Warning,
            Severity::Ignored,
        ]
        .iter()
        .map(|s| s.code())
        .collect();
        assert_eq!(codes, [1, 2, 3, 4, -1]);
    }
}
