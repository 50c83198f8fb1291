//! Mutual TLS for the mbus connection, with upstream's server check.
//!
//! Upstream (`mbus/nats_handler.go`) accepts the server iff its chain verifies against the
//! roots and the leaf's Subject CommonName matches `^[a-zA-Z0-9*\-]*.nats.bosh-internal$`.
//! We keep exactly that regex (its dots are unescaped, so they match any character) but do not
//! check the dialled host name against the certificate: the agent dials resolved IP addresses,
//! so the name check would always fail, and the CN rule is what identifies a director.

use std::fmt;
use std::sync::{Arc, LazyLock};

use async_nats::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use async_nats::rustls::crypto::{CryptoProvider, ring};
use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use async_nats::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use thiserror::Error;

/// Upstream's CommonName rule, verbatim (unescaped dots included).
pub const CN_PATTERN: &str = r"^[a-zA-Z0-9*\-]*.nats.bosh-internal$";

static CN_REGEX: LazyLock<Result<regex::Regex, regex::Error>> =
    LazyLock::new(|| regex::Regex::new(CN_PATTERN));

/// True iff `cn` matches upstream's [`CN_PATTERN`] with Go regexp semantics (`.` matches any
/// character but `\n`; `$` only at the very end). The regex crate agrees with Go on both.
pub fn cn_matches(cn: &str) -> bool {
    match &*CN_REGEX {
        Ok(re) => re.is_match(cn),
        // The pattern is a constant that a unit test compiles; fail closed all the same.
        Err(_) => false,
    }
}

/// The `cert` object of `env.bosh.mbus` (or of `update_settings.mbus`): PEM strings.
/// `Debug` never shows the private key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CertKeyPair {
    /// CA bundle for the server's chain; empty means the system roots.
    pub ca: String,
    /// Client certificate chain (leaf first). Mandatory.
    pub certificate: String,
    /// Client private key (PKCS#1, PKCS#8 or SEC1). Mandatory.
    pub private_key: String,
    /// Settings path this came from, e.g. `env.bosh.mbus.cert`: errors name `<origin>.<field>`.
    pub origin: &'static str,
}

impl fmt::Debug for CertKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKeyPair")
            .field("origin", &self.origin)
            .field("ca_bytes", &self.ca.len())
            .field("certificate_bytes", &self.certificate.len())
            .field("private_key", &"***")
            .finish()
    }
}

/// Why a TLS client configuration could not be built. Each variant names the settings field.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A mandatory field is empty.
    #[error("{field} is empty: the agent needs a client certificate and key for mutual TLS")]
    Missing {
        /// e.g. `env.bosh.mbus.cert.private_key`.
        field: String,
    },
    /// The field is not valid PEM of the expected kind.
    #[error("{field} is not a valid PEM {kind}: {reason}")]
    BadPem {
        /// Offending field.
        field: String,
        /// "certificate" or "private key".
        kind: &'static str,
        /// Parser message.
        reason: String,
    },
    /// The CA field holds PEM but no certificate rustls accepts as a trust anchor.
    #[error("{field} contains no usable CA certificate ({rejected} rejected)")]
    NoUsableCa {
        /// Offending field.
        field: String,
        /// How many certificates were rejected.
        rejected: usize,
    },
    /// The client certificate is not X.509 v3; rustls (webpki) accepts only v3 end-entity
    /// certificates, and says so only as `UnsupportedCertVersion`.
    #[error("{field}: X.509 v{version} certificates are not supported: reissue as v3")]
    UnsupportedVersion {
        /// Offending field.
        field: String,
        /// The certificate's version as people write it (1 for X.509 v1).
        version: u32,
    },
    /// rustls rejected the certificate/key pair (e.g. key does not match the certificate).
    #[error("{origin}.certificate and {origin}.private_key are not a usable pair: {reason}")]
    KeyPair {
        /// Settings path of the pair.
        origin: &'static str,
        /// rustls' message.
        reason: String,
    },
}

/// Builds the rustls client configuration: TLS 1.2 or 1.3 only, ring provider, client
/// certificate + key (mandatory), and [`CnVerifier`] against `ca` (or the system roots when
/// `ca` is empty — read with rustls-native-certs, which async-nats already depends on and
/// reads on every attempt anyway, so it costs nothing extra).
pub fn client_config(cert: &CertKeyPair) -> Result<ClientConfig, TlsError> {
    let origin = cert.origin;
    let field = |name: &str| format!("{origin}.{name}");
    if cert.certificate.trim().is_empty() {
        return Err(TlsError::Missing {
            field: field("certificate"),
        });
    }
    if cert.private_key.trim().is_empty() {
        return Err(TlsError::Missing {
            field: field("private_key"),
        });
    }
    let chain = parse_certs(&cert.certificate, &field("certificate"))?;
    if let Some(version) = chain.first().and_then(|leaf| older_than_v3(leaf)) {
        return Err(TlsError::UnsupportedVersion {
            field: field("certificate"),
            version,
        });
    }
    let key = PrivateKeyDer::from_pem_slice(cert.private_key.as_bytes()).map_err(|e| {
        TlsError::BadPem {
            field: field("private_key"),
            kind: "private key",
            reason: e.to_string(),
        }
    })?;
    let roots = if cert.ca.trim().is_empty() {
        system_roots()
    } else {
        let mut roots = RootCertStore::empty();
        let (added, rejected) =
            roots.add_parsable_certificates(parse_certs(&cert.ca, &field("ca"))?);
        if added == 0 {
            return Err(TlsError::NoUsableCa {
                field: field("ca"),
                rejected,
            });
        }
        roots
    };
    let provider = Arc::new(ring::default_provider());
    let verifier = Arc::new(CnVerifier {
        roots: Arc::new(roots),
        provider: provider.clone(),
    });
    let keypair_error = |e: rustls::Error| TlsError::KeyPair {
        origin,
        reason: e.to_string(),
    };
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(keypair_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(keypair_error)
}

/// Builds the rustls server configuration of the agent's HTTPS API (create-env) from the
/// settings' certificate and key: TLS 1.2 or 1.3, ring provider, ALPN `http/1.1` only (as
/// upstream's server), no client certificate asked (clients authenticate with Basic
/// credentials). The certificate and key are mandatory and must be a pair; errors name the
/// settings field. `ca` is not used: it is what the client (the CLI) verifies against.
pub fn server_config(cert: &CertKeyPair) -> Result<ServerConfig, TlsError> {
    let origin = cert.origin;
    let field = |name: &str| format!("{origin}.{name}");
    for (name, value) in [
        ("certificate", &cert.certificate),
        ("private_key", &cert.private_key),
    ] {
        if value.trim().is_empty() {
            return Err(TlsError::Missing { field: field(name) });
        }
    }
    let chain = parse_certs(&cert.certificate, &field("certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(cert.private_key.as_bytes()).map_err(|e| {
        TlsError::BadPem {
            field: field("private_key"),
            kind: "private key",
            reason: e.to_string(),
        }
    })?;
    let keypair_error = |e: rustls::Error| TlsError::KeyPair {
        origin,
        reason: e.to_string(),
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(keypair_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(keypair_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn parse_certs(pem: &str, field: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            field: field.to_string(),
            kind: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            field: field.to_string(),
            kind: "certificate",
            reason: "no CERTIFICATE block found".to_string(),
        });
    }
    Ok(certs)
}

fn system_roots() -> RootCertStore {
    let loaded = rustls_native_certs::load_native_certs();
    for error in &loaded.errors {
        tracing::warn!(%error, "could not load some system CA certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, rejected) = roots.add_parsable_certificates(loaded.certs);
    tracing::debug!(added, rejected, "mbus CA is empty: using the system roots");
    roots
}

/// The server's leaf CN does not match upstream's rule. `Debug` prints the same text as
/// `Display` because rustls formats the error it wraps with `Debug`.
#[derive(Error)]
#[error("server certificate CommonName {cn:?} does not match {CN_PATTERN}")]
pub struct CnMismatch {
    /// The CN seen (last CN attribute, as Go's `Subject.CommonName`; empty if none).
    pub cn: String,
}

impl fmt::Debug for CnMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Server verification: chain to our roots (validity dates and serverAuth usage checked by
/// webpki), then upstream's CN rule instead of a host-name check.
#[derive(Debug)]
pub struct CnVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CnVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let cn = leaf_common_name(end_entity.as_ref())?;
        if cn_matches(&cn) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(CnMismatch { cn })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The version (1 or 2) of a certificate older than X.509 v3, or `None` for v3 and for DER
/// x509-parser cannot read (rustls then gives its own reason).
fn older_than_v3(der: &[u8]) -> Option<u32> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.version().0;
    (v < x509_parser::x509::X509Version::V3.0).then_some(v + 1)
}

/// Go's `Subject.CommonName` is the last CN attribute; a CN that is not a string reads as "".
fn leaf_common_name(der: &[u8]) -> Result<String, rustls::Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok(cert
        .subject()
        .iter_common_name()
        .last()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pattern_compiles() {
        assert!(CN_REGEX.is_ok());
    }

    #[test]
    fn cn_rule_matches_like_upstream() {
        for cn in [
            "default.nats.bosh-internal",
            "*.nats.bosh-internal",
            "a-b-C9.nats.bosh-internal",
            ".nats.bosh-internal",
            // The unescaped dots match any character.
            "defaultXnatsYbosh-internal",
            "default-nats-bosh-internal",
            "Xnats.bosh-internal",
        ] {
            assert!(cn_matches(cn), "{cn} should match");
        }
        // `.` also matches a multi-byte character.
        assert!(cn_matches("abcénats.bosh-internal"));
        assert!(cn_matches("abc.natsébosh-internal"));
    }

    #[test]
    fn cn_rule_rejects() {
        for cn in [
            "",
            "nats.bosh-internal",
            "evil.example.com",
            "a.b.nats.bosh-internal",
            "default.nats.bosh-internal.evil.com",
            "default.nats.bosh-internal\n",
            "default\nnats.bosh-internal",
            "déf.nats.bosh-internal",
            "a_b.nats.bosh-internal",
            "default.nats.bosh-internals",
            "default.nats.BOSH-internal",
            " default.nats.bosh-internal",
        ] {
            assert!(!cn_matches(cn), "{cn:?} should not match");
        }
    }

    fn pair() -> CertKeyPair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        CertKeyPair {
            ca: cert.pem(),
            certificate: cert.pem(),
            private_key: key.serialize_pem(),
            origin: "env.bosh.mbus.cert",
        }
    }

    #[test]
    fn good_pair_builds_and_debug_hides_key() {
        let p = pair();
        client_config(&p).unwrap();
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
        // Empty CA means system roots: still builds.
        client_config(&CertKeyPair {
            ca: String::new(),
            ..p
        })
        .unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let p = pair();
        let cases = [
            (
                CertKeyPair {
                    certificate: " ".into(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.certificate is empty",
            ),
            (
                CertKeyPair {
                    private_key: String::new(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.private_key is empty",
            ),
            (
                CertKeyPair {
                    certificate: "not pem".into(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.certificate is not a valid PEM certificate",
            ),
            (
                CertKeyPair {
                    private_key: p.certificate.clone(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.private_key is not a valid PEM private key",
            ),
            (
                CertKeyPair {
                    ca: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.ca",
            ),
            (
                CertKeyPair {
                    private_key: pair().private_key,
                    ..p.clone()
                },
                "are not a usable pair",
            ),
        ];
        for (bad, needle) in cases {
            let err = client_config(&bad).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
            assert!(!err.contains("PRIVATE KEY"), "{err}");
        }
    }

    #[test]
    fn the_https_api_server_config_needs_a_matching_pair_and_speaks_http1() {
        let p = pair();
        let c = server_config(&p).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // The CA is the client's business: an empty one is fine.
        server_config(&CertKeyPair {
            ca: String::new(),
            ..p.clone()
        })
        .unwrap();
        for (bad, needle) in [
            (
                CertKeyPair {
                    certificate: String::new(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.certificate is empty",
            ),
            (
                CertKeyPair {
                    private_key: "\n".into(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.private_key is empty",
            ),
            (
                CertKeyPair {
                    certificate: "garbage".into(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.certificate is not a valid PEM certificate",
            ),
            (
                CertKeyPair {
                    private_key: p.certificate.clone(),
                    ..p.clone()
                },
                "env.bosh.mbus.cert.private_key is not a valid PEM private key",
            ),
            (
                CertKeyPair {
                    private_key: pair().private_key,
                    ..p.clone()
                },
                "are not a usable pair",
            ),
        ] {
            let err = server_config(&bad).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
            assert!(!err.contains("PRIVATE KEY"), "{err}");
        }
    }

    /// A self-signed X.509 v1 certificate (no extensions) and its key, made with
    /// `openssl req -new` then `openssl x509 -req -signkey` without `-extfile`.
    fn v1_pair() -> CertKeyPair {
        CertKeyPair {
            ca: String::new(),
            certificate: include_str!("../tests/fixtures/x509-v1-cert.pem").into(),
            private_key: include_str!("../tests/fixtures/x509-v1-key.pem").into(),
            origin: "env.bosh.mbus.cert",
        }
    }

    #[test]
    fn a_v1_client_certificate_is_refused_in_plain_words() {
        let err = client_config(&v1_pair()).unwrap_err().to_string();
        assert!(
            err.contains("X.509 v1 certificates are not supported: reissue as v3"),
            "{err}"
        );
        assert!(err.contains("env.bosh.mbus.cert.certificate"), "{err}");
        assert!(!err.contains("UnsupportedCertVersion"), "{err}");
    }

    #[test]
    fn cn_mismatch_message_names_the_cn() {
        let e = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            CnMismatch {
                cn: "evil.example.com".into(),
            },
        ))));
        let msg = e.to_string();
        assert!(
            msg.contains("CommonName \"evil.example.com\" does not match"),
            "{msg}"
        );
    }
}
