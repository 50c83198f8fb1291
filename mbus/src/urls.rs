//! mbus URLs: which servers to dial, with which credentials, and how to show them without
//! leaking the password.
//!
//! Accepted: `nats://[user[:password]@]host[:port]` and `tls://…` (same shape). `host` is a DNS
//! name, an IPv4 literal or a bracketed IPv6 literal; a missing port means 4222. `https://…`
//! URLs are the create-env case, which has no NATS connection: the NATS client reports them as
//! skipped and never dials them; [`parse_https_url`] reads one as the address and credentials
//! of the agent's own HTTPS API.

use std::fmt;
use std::net::IpAddr;

use percent_encoding::percent_decode_str;
use thiserror::Error;

/// Port used when a URL names none (the NATS default, as upstream).
pub const DEFAULT_PORT: u16 = 4222;

/// What replaces userinfo wherever a URL is shown.
const REDACTED: &str = "***";

/// URL scheme of a NATS server. Both are dialled with mutual TLS (upstream always sets a TLS
/// config); `tls` merely says so explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `nats://`
    Nats,
    /// `tls://`
    Tls,
}

impl Scheme {
    /// The scheme as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Nats => "nats",
            Scheme::Tls => "tls",
        }
    }
}

/// The host part of a server URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP literal: used as is, never resolved.
    Ip(IpAddr),
    /// A DNS name (validated: letters, digits, `-`, `_`, `.`): resolved before every attempt.
    Name(String),
}

impl fmt::Display for Host {
    /// The host as it appears in a URL authority (IPv6 in brackets).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Credentials from a URL's userinfo. async-nats does not apply URL userinfo by itself, so the
/// client passes these explicitly. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `user:password@` (percent-decoded).
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// `token@` (a user without password is a token, as nats.go treats it).
    Token(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::UserPassword { user, .. } => {
                write!(f, "UserPassword {{ user: {user:?}, password: {REDACTED} }}")
            }
            Credentials::Token(_) => write!(f, "Token({REDACTED})"),
        }
    }
}

/// One NATS server from the settings. `Display` and `Debug` show the redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `nats` or `tls`.
    pub scheme: Scheme,
    /// Name or IP literal.
    pub host: Host,
    /// Port (4222 when the URL names none).
    pub port: u16,
    /// Userinfo, if any.
    pub credentials: Option<Credentials>,
}

impl ServerUrl {
    /// The URL with userinfo replaced by `***`: safe for logs, errors and status output.
    pub fn redacted(&self) -> String {
        let userinfo = if self.credentials.is_some() {
            format!("{REDACTED}@")
        } else {
            String::new()
        };
        format!(
            "{}://{userinfo}{}:{}",
            self.scheme.as_str(),
            self.host,
            self.port
        )
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerUrl({})", self.redacted())
    }
}

/// Result of parsing one mbus URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MbusUrl {
    /// A NATS server to dial.
    Server(ServerUrl),
    /// An `https://` URL (create-env): not dialled. Holds the redacted URL for reporting.
    SkippedHttps(String),
}

/// An `https://user:password@host:port` mbus URL (create-env): where the agent serves its own
/// HTTPS API and the Basic credentials a client must present. `Display` and `Debug` never
/// show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// The address to listen on (usually `0.0.0.0`), or a name resolved when binding.
    pub host: Host,
    /// The port (443 when the URL names none; create-env uses 6868).
    pub port: u16,
    /// The Basic user (percent-decoded).
    pub user: String,
    /// The Basic password (percent-decoded).
    pub password: String,
}

impl HttpsUrl {
    /// `https://***@host:port`: safe for logs and errors.
    pub fn redacted(&self) -> String {
        format!("https://{REDACTED}@{}:{}", self.host, self.port)
    }

    /// `host:port` as a listener takes it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpsUrl({}, user {:?})", self.redacted(), self.user)
    }
}

/// A URL that cannot be used. The URL inside is always redacted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UrlError {
    /// Not a URL of the accepted shape.
    #[error("mbus URL {url:?} is malformed: {reason}")]
    Malformed {
        /// The URL, userinfo redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scheme other than nats, tls or https.
    #[error("mbus URL {url:?} has unsupported scheme {scheme:?} (expected nats, tls or https)")]
    UnsupportedScheme {
        /// The URL, userinfo redacted.
        url: String,
        /// The scheme found.
        scheme: String,
    },
}

/// Redacts the userinfo of a possibly malformed URL string: everything between `://` (or the
/// start) and the last `@` becomes `***`. Over-redacts rather than leaks: the last `@` is used
/// because a password may itself contain `@`, `/` or `:`.
pub fn redact(raw: &str) -> String {
    let Some(at) = raw.rfind('@') else {
        return raw.to_string();
    };
    // An `@` before any `://` means the scheme itself is garbled: redact from the start.
    let start = raw.find("://").map_or(0, |i| i + 3);
    let start = if start > at { 0 } else { start };
    format!("{}{REDACTED}{}", &raw[..start], &raw[at..])
}

/// The URL's host: an IP literal or a validated name; the reason otherwise.
fn host_of(url: &url::Url) -> Result<Host, String> {
    match url.host() {
        None => Err("no host".to_string()),
        Some(url::Host::Ipv4(ip)) => Ok(Host::Ip(IpAddr::V4(ip))),
        Some(url::Host::Ipv6(ip)) => Ok(Host::Ip(IpAddr::V6(ip))),
        // Non-special schemes (nats, tls) keep the host opaque, so IPv4 literals arrive here as
        // "domains".
        Some(url::Host::Domain(d)) => match d.parse::<IpAddr>() {
            Ok(ip) => Ok(Host::Ip(ip)),
            Err(_) => validate_name(d).map(Host::Name),
        },
    }
}

/// A user, password or token of a URL, percent-decoded; the reason if it is not UTF-8.
fn percent_decoded(s: &str, what: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 after percent-decoding"))
}

/// Parses one mbus URL. Leading/trailing whitespace and trailing `/` are ignored (nats.go
/// trims them too). Errors name the (redacted) URL and the reason; this never panics.
pub fn parse_mbus_url(raw: &str) -> Result<MbusUrl, UrlError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let malformed = |reason: &str| UrlError::Malformed {
        url: redact(raw.trim()),
        reason: reason.to_string(),
    };
    if trimmed.is_empty() {
        return Err(malformed("empty URL"));
    }
    if !trimmed.contains("://") {
        return Err(malformed("no scheme (expected nats://host:port)"));
    }
    let url = url::Url::parse(trimmed).map_err(|e| malformed(&e.to_string()))?;
    let scheme = match url.scheme() {
        "nats" => Scheme::Nats,
        "tls" => Scheme::Tls,
        "https" => return Ok(MbusUrl::SkippedHttps(redact(trimmed))),
        other => {
            return Err(UrlError::UnsupportedScheme {
                url: redact(trimmed),
                scheme: other.to_string(),
            });
        }
    };
    if !url.path().is_empty() || url.query().is_some() || url.fragment().is_some() {
        return Err(malformed(
            "unexpected path, query or fragment after host:port",
        ));
    }
    let host = host_of(&url).map_err(|r| malformed(&r))?;
    let port = match url.port() {
        None => DEFAULT_PORT,
        Some(0) => return Err(malformed("port 0")),
        Some(p) => p,
    };
    let decode = |s: &str, what: &str| percent_decoded(s, what).map_err(|r| malformed(&r));
    let credentials = match (url.username(), url.password()) {
        ("", None) => None,
        (user, Some(password)) => Some(Credentials::UserPassword {
            user: decode(user, "user")?,
            password: decode(password, "password")?,
        }),
        (token, None) => Some(Credentials::Token(decode(token, "token")?)),
    };
    Ok(MbusUrl::Server(ServerUrl {
        scheme,
        host,
        port,
        credentials,
    }))
}

/// Parses an `https://user:password@host[:port]` mbus URL: the address of the agent's HTTPS
/// API and its Basic credentials. A missing port means 443. Refused, naming the redacted URL:
/// another scheme, a path, query or fragment, port 0, and a URL without both a user and a
/// non-empty password (the API would otherwise accept anyone). Never panics.
pub fn parse_https_url(raw: &str) -> Result<HttpsUrl, UrlError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let malformed = |reason: &str| UrlError::Malformed {
        url: redact(raw.trim()),
        reason: reason.to_string(),
    };
    let url = url::Url::parse(trimmed).map_err(|e| malformed(&e.to_string()))?;
    if url.scheme() != "https" {
        return Err(UrlError::UnsupportedScheme {
            url: redact(trimmed),
            scheme: url.scheme().to_string(),
        });
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(malformed(
            "unexpected path, query or fragment after host:port",
        ));
    }
    let host = host_of(&url).map_err(|r| malformed(&r))?;
    let port = match url.port_or_known_default() {
        Some(0) => return Err(malformed("port 0")),
        Some(p) => p,
        None => return Err(malformed("no port")),
    };
    let decode = |s: &str, what: &str| percent_decoded(s, what).map_err(|r| malformed(&r));
    let user = decode(url.username(), "user")?;
    let password = decode(url.password().unwrap_or(""), "password")?;
    if user.is_empty() || password.is_empty() {
        return Err(malformed(
            "the agent API needs user:password@ (Basic credentials) in the URL",
        ));
    }
    Ok(HttpsUrl {
        host,
        port,
        user,
        password,
    })
}

/// Accepts DNS names made of letters, digits, `-`, `_` and dots, without empty labels (one
/// trailing dot allowed), at most 253 characters.
fn validate_name(name: &str) -> Result<String, String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() || bare.len() > 253 {
        return Err(format!("host name length {} is out of range", bare.len()));
    }
    if let Some(c) = bare
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("host name contains {c:?}"));
    }
    if bare
        .split('.')
        .any(|label| label.is_empty() || label.len() > 63)
    {
        return Err("host name has an empty or over-long label".to_string());
    }
    Ok(name.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn server(raw: &str) -> ServerUrl {
        match parse_mbus_url(raw).unwrap() {
            MbusUrl::Server(s) => s,
            other => panic!("expected a server for {raw}, got {other:?}"),
        }
    }

    #[test]
    fn name_with_credentials_and_port() {
        let s = server("nats://nats:s3cret@default.nats.bosh-internal:4223");
        assert_eq!(s.scheme, Scheme::Nats);
        assert_eq!(s.host, Host::Name("default.nats.bosh-internal".into()));
        assert_eq!(s.port, 4223);
        assert_eq!(
            s.credentials,
            Some(Credentials::UserPassword {
                user: "nats".into(),
                password: "s3cret".into()
            })
        );
        assert_eq!(s.to_string(), "nats://***@default.nats.bosh-internal:4223");
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn defaults_and_literals() {
        let s = server("nats://10.0.0.6");
        assert_eq!(s.host, Host::Ip("10.0.0.6".parse().unwrap()));
        assert_eq!(s.port, DEFAULT_PORT);
        assert_eq!(s.credentials, None);
        let s = server(" tls://[fd00::6]:4222/ ");
        assert_eq!(s.scheme, Scheme::Tls);
        assert_eq!(s.host, Host::Ip("fd00::6".parse().unwrap()));
        assert_eq!(s.to_string(), "tls://[fd00::6]:4222");
        let s = server("nats://[::1]");
        assert_eq!((s.host.to_string(), s.port), ("[::1]".into(), 4222));
    }

    #[test]
    fn percent_encoded_password_and_token() {
        let s = server("nats://u%40x:p%2Fw%3A@h:1");
        assert_eq!(
            s.credentials,
            Some(Credentials::UserPassword {
                user: "u@x".into(),
                password: "p/w:".into()
            })
        );
        let s = server("nats://tok@h");
        assert_eq!(s.credentials, Some(Credentials::Token("tok".into())));
        assert!(!format!("{:?}", s.credentials).contains("tok\""));
    }

    #[test]
    fn https_is_skipped_and_redacted() {
        assert_eq!(
            parse_mbus_url("https://mbus:pw@10.0.0.6:6868").unwrap(),
            MbusUrl::SkippedHttps("https://***@10.0.0.6:6868".into())
        );
    }

    #[test]
    fn https_urls_give_the_listen_address_and_credentials() {
        let u = parse_https_url("https://mbus:p%40ss%3Aw@0.0.0.0:6868").unwrap();
        assert_eq!(u.host, Host::Ip("0.0.0.0".parse().unwrap()));
        assert_eq!(u.port, 6868);
        assert_eq!((u.user.as_str(), u.password.as_str()), ("mbus", "p@ss:w"));
        assert_eq!(u.authority(), "0.0.0.0:6868");
        assert_eq!(u.to_string(), "https://***@0.0.0.0:6868");
        assert!(!format!("{u:?}").contains("p@ss"));
        let u = parse_https_url(" https://a:b@[fd00::6]:6868/ ").unwrap();
        assert_eq!(u.authority(), "[fd00::6]:6868");
        let u = parse_https_url("https://a:b@director.internal").unwrap();
        assert_eq!(
            (u.host, u.port),
            (Host::Name("director.internal".into()), 443)
        );
    }

    #[test]
    fn https_urls_that_cannot_be_served_are_refused_without_the_password() {
        for (raw, needle) in [
            ("https://0.0.0.0:6868", "user:password@"),
            ("https://mbus@0.0.0.0:6868", "user:password@"),
            ("https://mbus:@0.0.0.0:6868", "user:password@"),
            ("https://mbus:hunter2@0.0.0.0:6868/agent", "path"),
            ("https://mbus:hunter2@0.0.0.0:6868?x=1", "query"),
            ("https://mbus:hunter2@0.0.0.0:0", "port 0"),
            ("https://mbus:hunter2@0.0.0.0:99999", "0.0.0.0:99999"),
            ("https://mbus:hunter2@ho st:6868", "ho st"),
            ("https://mbus:hunter2@a..b:6868", "label"),
            ("nats://mbus:hunter2@h:4222", "nats"),
            ("", "relative URL"),
        ] {
            let err = parse_https_url(raw).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains(needle), "{raw}: {err}");
        }
    }

    #[test]
    fn errors_name_the_url_without_password() {
        for (raw, needle) in [
            ("nats://user:hunter2@host:99999", "host:99999"),
            ("nats://user:hunter2@ho st:4222", "ho st"),
            ("nats://user:hunter2@host:0", "port 0"),
            ("nats://user:hunter2@[::1:4222", "[::1"),
            ("nats://user:hunter2@host/path", "path"),
            ("nats://user:hunter2@", "nats://***@"),
            ("user:hunter2@host:4222", "no scheme"),
            ("nats://us/er:hun@ter2@host", "host"),
            ("", "empty"),
            ("nats://a..b", "empty or over-long label"),
            ("nats://a%41b", "contains '%'"),
        ] {
            let err = parse_mbus_url(raw).unwrap_err().to_string();
            assert!(!err.contains("hunter2") && !err.contains("ter2"), "{err}");
            assert!(err.contains(needle), "{raw}: {err}");
        }
        let err = parse_mbus_url("ftp://user:hunter2@h").unwrap_err();
        assert_eq!(
            err,
            UrlError::UnsupportedScheme {
                url: "ftp://***@h".into(),
                scheme: "ftp".into()
            }
        );
    }

    #[test]
    fn redact_cases() {
        assert_eq!(redact("nats://a:b@h:1"), "nats://***@h:1");
        assert_eq!(redact("nats://a:b@c@h"), "nats://***@h");
        assert_eq!(redact("nats://h:1"), "nats://h:1");
        assert_eq!(redact("a:b@h"), "***@h");
        assert_eq!(redact("x@y://h"), "***@y://h");
    }
}
