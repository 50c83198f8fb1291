//! One HTTP exchange with a metadata service: plain http, no proxy (a link-local service is
//! reachable only from this VM), no redirect, bounded in time and size.

use std::time::Duration;

use super::error::{FetchError, redact_url};
use super::retry::Verdict;

/// The largest answer read: user data is at most 16 KiB on AWS and 256 KiB on GCP.
pub(crate) const MAX_BODY: u64 = 4 * 1024 * 1024;

/// A blocking client for one source.
pub(crate) struct MetadataClient {
    agent: ureq::Agent,
}

/// A complete answer.
pub(crate) struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl MetadataClient {
    /// `connect` bounds the TCP set-up, `total` the whole exchange including the body.
    pub(crate) fn new(connect: Duration, total: Duration) -> MetadataClient {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_connect(Some(connect))
            .timeout_global(Some(total))
            .build()
            .into();
        MetadataClient { agent }
    }

    /// Sends one request; `headers` are added in order. A transport fault is retryable; a
    /// request that cannot be built or an oversized answer is final.
    pub(crate) fn send(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, Verdict> {
        let result = match method {
            "PUT" => {
                let mut req = self.agent.put(url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.send_empty()
            }
            _ => {
                let mut req = self.agent.get(url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.call()
            }
        };
        let transport = |e: &ureq::Error| FetchError::Transport {
            method,
            url: redact_url(url),
            message: describe(e),
        };
        let mut resp = result.map_err(|e| match e {
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => Verdict::Final(transport(&e)),
            _ => Verdict::Retry(transport(&e)),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => Verdict::Final(transport(&e)),
                _ => Verdict::Retry(transport(&e)),
            })?;
        Ok(Reply { status, body })
    }
}

/// ureq's message, which names neither headers nor bodies.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t:?})"),
        ureq::Error::BodyExceedsLimit(n) => format!("answer larger than {n} bytes"),
        ureq::Error::Http(_) => {
            "the request could not be built (a header name or value is invalid)".into()
        }
        other => other.to_string(),
    }
}

/// Whether a status is worth another try: the service is busy or restarting.
pub(crate) fn retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..=599).contains(&status)
}

/// The [`Verdict`] of a non-success status.
pub(crate) fn status_verdict(method: &'static str, url: &str, status: u16) -> Verdict {
    let e = FetchError::Status {
        method,
        url: redact_url(url),
        status,
    };
    if retryable_status(status) {
        Verdict::Retry(e)
    } else {
        Verdict::Final(e)
    }
}

/// Checks a source's URI and headers before any request: plain http only, header names that
/// are HTTP tokens and values without control characters. Errors name the header, never its
/// value.
pub(crate) fn check_endpoint<'a>(
    uri: &str,
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), FetchError> {
    if uri.is_empty() {
        return Err(FetchError::Config("URI is empty".into()));
    }
    if !uri.starts_with("http://") {
        return Err(FetchError::Config(format!(
            "URI {} is not an http:// URL (metadata services are plain http; https is not supported)",
            redact_url(uri)
        )));
    }
    for (name, value) in headers {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            return Err(FetchError::Config(format!(
                "header name {name:?} is not a valid HTTP header name"
            )));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(FetchError::Config(format!(
                "the value of header {name} holds control characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn statuses_are_classified() {
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [200, 301, 400, 401, 403, 404, 405, 600] {
            assert!(!retryable_status(s), "{s}");
        }
        assert!(matches!(
            status_verdict("GET", "http://u:p@h/x", 404),
            Verdict::Final(FetchError::Status { ref url, status: 404, .. }) if url == "http://h/x"
        ));
    }

    #[test]
    fn endpoints_are_checked_without_showing_header_values() {
        let none: BTreeMap<String, String> = BTreeMap::new();
        check_endpoint("http://169.254.169.254", &none).unwrap();
        let e = check_endpoint("https://api.example", &none).unwrap_err();
        assert!(e.to_string().contains("https is not supported"), "{e}");
        assert!(check_endpoint("", &none).is_err());
        let bad: BTreeMap<String, String> =
            [("X-Token".to_string(), "s3cret\r\nInjected: 1".to_string())].into();
        let e = check_endpoint("http://h", &bad).unwrap_err().to_string();
        assert!(e.contains("X-Token") && !e.contains("s3cret"), "{e}");
        let bad: BTreeMap<String, String> = [("Bad Name".to_string(), "v".to_string())].into();
        assert!(check_endpoint("http://h", &bad).is_err());
        let good: BTreeMap<String, String> =
            [("Metadata-Flavor".to_string(), "Google".to_string())].into();
        check_endpoint("http://h", &good).unwrap();
    }
}
