//! A small certificate authority for gpuscale's ports, with rcgen (ECDSA P-256): what
//! `cargo xtask deploy` generates into Secrets when cert-manager is not used, and what the tests
//! serve and rotate.
//!
//! Certificates it issues carry both the server and the client usage, so one agent certificate
//! can serve `--listen` and the collector's client certificate is made the same way. The CA is
//! rebuilt from its PEM certificate and key ([`Ca::from_pem`]) so a later deploy issues
//! certificates for new nodes under the CA it stored before.
//!
//! It must never write files itself: the caller decides where keys go.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Errors of certificate generation: rcgen's reason with what was being made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make {what}: {error}")]
pub struct PkiError {
    what: String,
    error: rcgen::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |error| PkiError { what, error }
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// Its private key, PKCS#8 (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

/// A CA that signs gpuscale's certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: Issued,
}

fn ca_params(common_name: &str, days: i64) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("a CA"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    Ok(params)
}

/// From an hour ago (clocks differ a little) to `days` from now.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

impl Ca {
    /// A new CA named `common_name`, valid for `days`.
    pub fn new(common_name: &str, days: i64) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(err("a CA key"))?;
        let params = ca_params(common_name, days)?;
        let cert = params
            .self_signed(&key)
            .map_err(err(format!("the CA {common_name}")))?;
        let pem = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA `common_name` whose certificate and key were stored as PEM (by [`Ca::new`] with the
    /// same name): it signs as that CA, so what it issues chains to the stored certificate.
    pub fn from_pem(common_name: &str, stored: &Issued) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&stored.key_pem).map_err(err("the stored CA key"))?;
        // The issuer's name and key identifier are all a signature needs from the parameters.
        let params = ca_params(common_name, 1)?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem: stored.clone(),
        })
    }

    /// The CA's certificate and key.
    pub fn pem(&self) -> &Issued {
        &self.pem
    }

    /// A certificate for `names` (DNS names or IP addresses; the first is also its common name),
    /// usable to serve and as a client, valid for `days`, with a new key.
    pub fn issue(&self, names: &[&str], days: i64) -> Result<Issued, PkiError> {
        let what = format!("a certificate for {}", names.join(", "));
        let key = KeyPair::generate().map_err(err(what.clone()))?;
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<Vec<String>>(),
        )
        .map_err(err(what.clone()))?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let cert = params.signed_by(&key, &self.issuer).map_err(err(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{names_identity, PemFile};

    fn leaf(issued: &Issued) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_ca_rebuilt_from_its_stored_pem_issues_certificates_that_chain_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("gpuscale test CA", 30).unwrap();
        let again = Ca::from_pem("gpuscale test CA", ca.pem()).unwrap();
        let issued = again.issue(&["node-a", "10.0.0.1"], 30).unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca.pem().cert_pem).unwrap();
        let roots = PemFile::new("--agent-ca", dir.path().join("ca.crt"))
            .roots()
            .unwrap();
        let cert = leaf(&issued);
        let parsed = rustls::server::ParsedCertificate::try_from(&cert).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .expect("a certificate of the rebuilt CA chains to the stored CA certificate");
        assert!(names_identity(&cert, "node-a"));
        assert!(!names_identity(&cert, "node-b"));
        assert_eq!(crate::tls::dns_names(&cert), "node-a");
    }
}
