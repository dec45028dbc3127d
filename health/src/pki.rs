//! A small certificate authority for gpuscale's ports, with rcgen (ECDSA P-256): what
//! `cargo xtask deploy` generates into Secrets when cert-manager is not used, and what the tests
//! serve and rotate.
//!
//! Certificates it issues carry both the server and the client usage, so one agent certificate
//! can serve `--listen` and the collector's client certificate is made the same way. The CA is
//! rebuilt from its PEM certificate and key ([`Ca::from_pem`]), whoever made it (this module or
//! cert-manager), so a later deploy issues certificates under the CA it stored before; [`inspect`]
//! and [`chains_to`] say whether a stored certificate is still the one to keep.
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

    /// The CA whose certificate and key were stored as PEM (by [`Ca::new`], or a cert-manager
    /// CA `Certificate`'s Secret): it signs as that CA (its subject and key identifier read from
    /// the certificate), so what it issues chains to the stored certificate.
    pub fn from_pem(stored: &Issued) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&stored.key_pem).map_err(err("the stored CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&stored.cert_pem, key)
            .map_err(err("the CA from its stored certificate"))?;
        Ok(Ca {
            issuer,
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

/// What [`inspect`] reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Its DNS names and IP addresses (subject alternative names), in order.
    pub names: Vec<String>,
    /// The end of its validity.
    pub not_after: std::time::SystemTime,
}

/// The names and expiry of the first certificate in `cert_pem`.
pub fn inspect(cert_pem: &str) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => <[u8; 4]>::try_from(*b)
                        .ok()
                        .map(|a| std::net::IpAddr::from(a).to_string()),
                    16 => <[u8; 16]>::try_from(*b)
                        .ok()
                        .map(|a| std::net::IpAddr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("unreadable subject alternative names: {e}")),
    };
    let secs = cert.validity().not_after.timestamp();
    let not_after =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok(CertInfo { names, not_after })
}

/// Whether the first certificate in `cert_pem` is signed by the CA certificate `ca_pem`, valid
/// now, and usable to serve a TLS connection.
pub fn chains_to(cert_pem: &str, ca_pem: &str) -> bool {
    use rustls::pki_types::{pem::PemObject, CertificateDer, UnixTime};
    let (Ok(leaf), Ok(ca)) = (
        CertificateDer::from_pem_slice(cert_pem.as_bytes()),
        CertificateDer::from_pem_slice(ca_pem.as_bytes()),
    ) else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca).is_err() {
        return false;
    }
    crate::tls::verify_chain(
        &leaf,
        &roots,
        &[],
        UnixTime::now(),
        &rustls::crypto::ring::default_provider(),
    )
    .is_ok()
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
        let again = Ca::from_pem(ca.pem()).unwrap();
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
        assert!(chains_to(&issued.cert_pem, &ca.pem().cert_pem));
        let other = Ca::new("gpuscale test CA", 30).unwrap();
        assert!(
            !chains_to(&issued.cert_pem, &other.pem().cert_pem),
            "a CA of the same name but another key did not sign it"
        );
        assert!(!chains_to("not PEM", &ca.pem().cert_pem));
    }

    #[test]
    fn inspect_reads_the_names_and_the_expiry() {
        let ca = Ca::new("gpuscale test CA", 30).unwrap();
        let issued = ca.issue(&["node-a", "10.0.0.1", "fd00::1"], 10).unwrap();
        let info = inspect(&issued.cert_pem).unwrap();
        assert_eq!(info.names, ["node-a", "10.0.0.1", "fd00::1"]);
        let left = info
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        let day = std::time::Duration::from_secs(86_400);
        assert!(left > 9 * day && left <= 10 * day, "{left:?}");
        assert!(inspect("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());
    }
}
