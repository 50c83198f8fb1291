//! A throwaway PKI made by the test (rcgen): a CA, server certificates whose only name is
//! their CN, and client certificates, as PEM.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// A CA and the leaf certificates it signs.
pub struct Pki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error(format!("{what}: {e}"))
}

impl Pki {
    /// A fresh CA whose subject CN is `name`.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(rcgen_err("generating the CA key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err("CA parameters"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params
            .self_signed(&key)
            .map_err(rcgen_err("self-signing the CA"))?;
        Ok(Pki {
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate whose only name is its CN, as a DNS SAN (no IP SAN): dialling by
    /// address then works only through upstream's CN rule, which is what tests must show.
    pub fn server(&self, cn: &str) -> Result<Leaf> {
        self.leaf(
            cn,
            vec![cn.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with subject CN `cn` and no SAN.
    pub fn client(&self, cn: &str) -> Result<Leaf> {
        self.leaf(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose) -> Result<Leaf> {
        let what = format!("certificate for {cn}");
        let key = KeyPair::generate().map_err(rcgen_err(&what))?;
        let mut params = CertificateParams::new(sans).map_err(rcgen_err(&what))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![eku];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(&what))?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_pem_and_signed_by_a_ca() -> Result<()> {
        let pki = Pki::new("test CA")?;
        assert!(pki.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let server = pki.server("default.nats.bosh-internal")?;
        let client = pki.client("agent")?;
        for leaf in [&server, &client] {
            assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        }
        assert_ne!(server.cert_pem, client.cert_pem);
        Ok(())
    }
}
