//! TLS for every gpuscale port, with rustls (ring), and certificate files that are re-read when
//! they change.
//!
//! Servers (`gpuscale-collector serve`'s gRPC port, `gpuscale-agent run --listen`, both
//! `--http-listen`): [`ServerTls`] holds the serving certificate and key (`--tls-cert`,
//! `--tls-key`) and, for mutual TLS, the CA a client certificate must chain to
//! (`--tls-client-ca`). [`incoming`] accepts TCP connections and completes each TLS handshake on
//! a task of its own, bounded in time ([`HANDSHAKE_TIMEOUT`]) and in number
//! ([`MAX_PENDING_HANDSHAKES`]), so a client that connects and says nothing holds neither the
//! accept loop nor memory; plain TCP (no TLS configured) goes through the same loop. Either way
//! a connection that has not sent its first [`FIRST_BYTES`] (an HTTP/2 preface) within
//! [`HANDSHAKE_TIMEOUT`] is closed ([`Conn`]).
//!
//! Clients (the collector dialing its agents): [`ClientTls`] holds the CA the server's
//! certificate must chain to and, for mutual TLS, the client certificate and key.
//!
//! Rotation: cert-manager (or a person) replaces the files in place, a mounted Secret by swapping
//! a symlink. Every use asks [`Reloading::get`], which looks at the files' identity (device,
//! inode, size, modification time) at most once per [`CHECK_EVERY`] and rebuilds the
//! configuration when one changed. A rebuild that fails (a key written before its certificate,
//! say) keeps the previous configuration, logs once per state of the files and is retried on the
//! next change, so a half-written rotation never takes a port down. Connections already open keep
//! the certificate they were made with.
//!
//! This module owns reading PEM files and building rustls configurations; it must never accept a
//! configuration that does not verify (a client CA that does not parse fails the start, it is not
//! skipped), nor log key material.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::ops::lock;

/// How long a client has to complete the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per port; a connection past this is closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// How often, at most, the certificate files are looked at for a change.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The ALPN protocols a gRPC port offers: HTTP/2 only (gRPC clients such as KEDA's grpc-go
/// refuse a TLS server that does not select `h2`).
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// The ALPN protocols an HTTP port (`--http-listen`) offers.
pub const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];

/// Errors reading certificate files or building a TLS configuration. Each names the flag and the
/// file, and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {path}: cannot read it: {error}; give a readable PEM file")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// A file holds no PEM certificate.
    #[error(
        "{flag} {path}: no certificate in it ({why}); give a PEM file with \
         -----BEGIN CERTIFICATE----- blocks"
    )]
    NoCertificate {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        why: String,
    },
    /// A file holds no PEM private key.
    #[error(
        "{flag} {path}: no private key in it ({why}); give a PEM file with a PKCS#8, PKCS#1 or \
         SEC1 key (-----BEGIN PRIVATE KEY-----)"
    )]
    NoKey {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        why: String,
    },
    /// A flag needs another one.
    #[error("{given} needs {missing} too")]
    Incomplete {
        /// The flag given.
        given: &'static str,
        /// The flag missing.
        missing: &'static str,
    },
    /// rustls refused the certificates or key (a key that does not match the certificate, a CA
    /// certificate it cannot use).
    #[error("{what}: {error}")]
    Rustls {
        /// What was being built, naming the files.
        what: String,
        /// rustls's reason.
        error: String,
    },
}

/// Result with [`TlsError`].
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// A PEM file and the flag that named it (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    /// The flag, e.g. `--tls-cert`.
    pub flag: &'static str,
    /// The file.
    pub path: PathBuf,
}

impl PemFile {
    /// `path` as given to `flag`.
    pub fn new(flag: &'static str, path: impl Into<PathBuf>) -> PemFile {
        PemFile {
            flag,
            path: path.into(),
        }
    }

    fn read(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.path).map_err(|error| TlsError::Read {
            flag: self.flag,
            path: self.path.clone(),
            error,
        })
    }

    /// Every certificate in the file, in order (at least one).
    pub fn certificates(&self) -> Result<Vec<CertificateDer<'static>>> {
        let bytes = self.read()?;
        let no = |why: String| TlsError::NoCertificate {
            flag: self.flag,
            path: self.path.clone(),
            why,
        };
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| no(e.to_string()))?;
        if certs.is_empty() {
            return Err(no("the file has no CERTIFICATE block".into()));
        }
        Ok(certs)
    }

    /// The private key in the file.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>> {
        let bytes = self.read()?;
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::NoKey {
            flag: self.flag,
            path: self.path.clone(),
            why: e.to_string(),
        })
    }

    /// The certificates of the file as trust anchors.
    pub fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in self.certificates()? {
            roots.add(cert).map_err(|e| TlsError::Rustls {
                what: format!("{} {}", self.flag, self.path.display()),
                error: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(roots)
    }
}

/// A file's identity and content version as the file system tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, u64, Option<std::time::SystemTime>)>);

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    // metadata follows symlinks: a Secret volume's swapped `..data` link changes the target.
    Stamp(
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok())),
    )
}

struct Loaded<T> {
    current: Arc<T>,
    stamps: Vec<Stamp>,
    checked: Instant,
    /// The stamps of files a rebuild failed on (so the failure is logged once).
    failed: Option<Vec<Stamp>>,
}

/// A configuration built from files and rebuilt when they change (see the module doc).
pub struct Reloading<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T> + Send + Sync>,
    state: Mutex<Loaded<T>>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl<T> Reloading<T> {
    /// Builds the configuration now (an error fails the caller's start) and keeps `build` for
    /// changes of `files`; `what` names it in logs.
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Reloading<T>> {
        let stamps = files.iter().map(|p| stamp(p)).collect();
        let current = Arc::new(build()?);
        Ok(Reloading {
            what,
            files,
            build: Box::new(build),
            state: Mutex::new(Loaded {
                current,
                stamps,
                checked: Instant::now(),
                failed: None,
            }),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// The configuration now, rebuilt first if a file changed since the last look (looked at no
    /// more than once per [`CHECK_EVERY`]).
    pub fn get(&self) -> Arc<T> {
        let mut s = lock(&self.state);
        if s.checked.elapsed() >= CHECK_EVERY {
            s.checked = Instant::now();
            let now: Vec<Stamp> = self.files.iter().map(|p| stamp(p)).collect();
            if now != s.stamps && s.failed.as_ref() != Some(&now) {
                match (self.build)() {
                    Ok(t) => {
                        s.current = Arc::new(t);
                        s.stamps = now;
                        s.failed = None;
                        // Relaxed: a statistic.
                        self.reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(what = self.what, "certificate files changed: reloaded");
                    }
                    Err(e) => {
                        // Relaxed: a statistic.
                        self.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            what = self.what,
                            error = %e,
                            "certificate files changed but do not load; keeping the previous ones \
                             until they do"
                        );
                        s.failed = Some(now);
                    }
                }
            }
        }
        s.current.clone()
    }

    /// Successful reloads since the start.
    pub fn reloads(&self) -> u64 {
        // Relaxed: a statistic.
        self.reloads.load(Ordering::Relaxed)
    }

    /// Changes of the files that did not load.
    pub fn reload_failures(&self) -> u64 {
        // Relaxed: a statistic.
        self.failures.load(Ordering::Relaxed)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_err(what: impl Into<String>) -> impl FnOnce(rustls::Error) -> TlsError {
    let what = what.into();
    move |e| TlsError::Rustls {
        what,
        error: e.to_string(),
    }
}

/// The files of a server's TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The serving certificate chain, leaf first.
    pub cert: PemFile,
    /// Its private key.
    pub key: PemFile,
    /// Mutual TLS: a client must present a certificate that chains to one of these.
    pub client_ca: Option<PemFile>,
}

impl ServerFiles {
    /// The files from the three flags' values: none given is plain TCP (`None`); a key without a
    /// certificate, or a client CA without both, is an error naming what is missing.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<ServerFiles>> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => Ok(Some(ServerFiles {
                cert: PemFile::new("--tls-cert", cert),
                key: PemFile::new("--tls-key", key),
                client_ca: client_ca.map(|p| PemFile::new("--tls-client-ca", p)),
            })),
            (None, _, Some(_)) | (_, None, Some(_)) => Err(TlsError::Incomplete {
                given: "--tls-client-ca",
                missing: "--tls-cert and --tls-key",
            }),
            (Some(_), None, None) => Err(TlsError::Incomplete {
                given: "--tls-cert",
                missing: "--tls-key",
            }),
            (None, Some(_), None) => Err(TlsError::Incomplete {
                given: "--tls-key",
                missing: "--tls-cert",
            }),
        }
    }

    /// The same files without the client CA (for a port whose clients cannot present one).
    pub fn without_client_ca(&self) -> ServerFiles {
        ServerFiles {
            client_ca: None,
            ..self.clone()
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.cert.path.clone(), self.key.path.clone()];
        p.extend(self.client_ca.iter().map(|c| c.path.clone()));
        p
    }

    /// A server configuration from the files as they are now, offering `alpn`.
    pub fn config(&self, alpn: &[&[u8]]) -> Result<ServerConfig> {
        let provider = provider();
        let what = format!(
            "{} {} with {} {}",
            self.cert.flag,
            self.cert.path.display(),
            self.key.flag,
            self.key.path.display()
        );
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err(what.clone()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(ca.roots()?),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::Rustls {
                    what: format!("{} {}", ca.flag, ca.path.display()),
                    error: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(self.cert.certificates()?, self.key.key()?)
            .map_err(|e| TlsError::Rustls {
                what: what.clone(),
                error: format!("{e} (is the key the certificate's?)"),
            })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// A server's TLS: the configuration, re-read when the files change.
pub type ServerTls = Reloading<ServerConfig>;

impl ServerTls {
    /// Loads `files` now (an error here fails the start) for a port offering `alpn`.
    pub fn load(files: &ServerFiles, alpn: &'static [&'static [u8]]) -> Result<Arc<ServerTls>> {
        let f = files.clone();
        Ok(Arc::new(Reloading::new(
            "serving certificate",
            files.paths(),
            move || f.config(alpn),
        )?))
    }
}

/// The files of a client's TLS: the CA the server must chain to, and for mutual TLS a client
/// certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// Trust anchors for the server's certificate.
    pub ca: PemFile,
    /// The client certificate and its key, for mutual TLS.
    pub identity: Option<(PemFile, PemFile)>,
}

impl ClientFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.ca.path.clone()];
        if let Some((c, k)) = &self.identity {
            p.extend([c.path.clone(), k.path.clone()]);
        }
        p
    }

    /// A client configuration from the files as they are now; `names` says how the server's name
    /// is checked.
    pub fn config(&self, names: ServerNames) -> Result<ClientConfig> {
        let provider = provider();
        let roots = Arc::new(self.ca.roots()?);
        let what = format!("{} {}", self.ca.flag, self.ca.path.display());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err(what.clone()))?;
        let builder = match names {
            ServerNames::Checked => builder.with_root_certificates(roots),
            ServerNames::CheckedByCaller => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { roots, provider })),
        };
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(cert.certificates()?, key.key()?)
                .map_err(|e| TlsError::Rustls {
                    what: format!(
                        "{} {} with {} {}",
                        cert.flag,
                        cert.path.display(),
                        key.flag,
                        key.path.display()
                    ),
                    error: format!("{e} (is the key the certificate's?)"),
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The client configuration, re-read when the files change.
    pub fn load(&self, names: ServerNames) -> Result<Arc<ClientTls>> {
        let f = self.clone();
        Ok(Arc::new(Reloading::new(
            "client certificate and CA",
            self.paths(),
            move || f.config(names),
        )?))
    }
}

/// How a client checks the name in the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerNames {
    /// It must name the host dialed (as every HTTPS client does).
    Checked,
    /// Only the chain is verified during the handshake; the caller checks the names it needs
    /// afterwards ([`names_identity`]). For peers dialed by address whose certificate names
    /// something else, as the collector dials agents by pod IP and checks the node name.
    CheckedByCaller,
}

/// A client's TLS: the configuration, re-read when the files change.
pub type ClientTls = Reloading<ClientConfig>;

/// Verifies the chain of the server's certificate, and its handshake signatures, but not its
/// name (see [`ServerNames::CheckedByCaller`]).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        verify_chain(end_entity, &self.roots, intermediates, now, &self.provider)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether `leaf` (with `intermediates`) chains to one of `roots`, is valid at `now` and may
/// serve TLS: the check [`ServerNames::CheckedByCaller`] makes, without the server name.
pub(crate) fn verify_chain(
    leaf: &CertificateDer<'_>,
    roots: &RootCertStore,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    provider: &rustls::crypto::CryptoProvider,
) -> std::result::Result<(), rustls::Error> {
    let cert = rustls::server::ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &cert,
        roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
}

/// Whether the certificate `leaf` (verified already) names `name` (a DNS name, as a node name
/// is), with the same matching rules as a server name check.
pub fn names_identity(leaf: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    rustls::server::ParsedCertificate::try_from(leaf)
        .and_then(|cert| rustls::client::verify_server_name(&cert, &server_name))
        .is_ok()
}

/// The DNS names a certificate lists (for messages), comma separated; `?` when it cannot be read.
pub fn dns_names(leaf: &CertificateDer<'_>) -> String {
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(cert) => {
            let names: Vec<&str> = cert.valid_dns_names().collect();
            if names.is_empty() {
                "no DNS name".into()
            } else {
                names.join(", ")
            }
        }
        Err(_) => "?".into(),
    }
}

/// A TLS connection to `addr` (`host:port`) with `config`; `server_name` is checked or not as the
/// configuration says. Returns the stream and the server's leaf certificate.
pub async fn connect(
    addr: &str,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
) -> io::Result<(
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake took over {HANDSHAKE_TIMEOUT:?}"),
        )
    })??;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| io::Error::other("the server presented no certificate"))?;
    Ok((stream, leaf))
}

/// A gRPC channel to `ep` over TLS with `config`, as grpc-go's `credentials.NewTLS` dials (the
/// server name is the host of the endpoint's address), and the server's leaf certificate.
pub async fn channel(
    ep: &tonic::transport::Endpoint,
    config: Arc<ClientConfig>,
) -> Result<(tonic::transport::Channel, CertificateDer<'static>), String> {
    let leaf = Arc::new(Mutex::new(None));
    let slot = leaf.clone();
    let connector = tower::service_fn(move |uri: tonic::transport::Uri| {
        let (config, slot) = (config.clone(), slot.clone());
        async move {
            let authority = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| io::Error::other(format!("{uri} has no host:port")))?;
            let name = server_name_of(&authority).map_err(io::Error::other)?;
            let (stream, cert) = connect(&authority, name, config).await?;
            *lock(&slot) = Some(cert);
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = ep
        .connect_with_connector(connector)
        .await
        .map_err(|e| crate::ops::error_chain(&e))?;
    let cert = lock(&leaf)
        .take()
        .ok_or_else(|| "the server presented no certificate".to_owned())?;
    Ok((channel, cert))
}

/// A gRPC channel to `ep`: plain text without `config`, else over TLS ([`channel`]), then also
/// the server's leaf certificate.
pub async fn channel_to(
    ep: &tonic::transport::Endpoint,
    config: Option<Arc<ClientConfig>>,
) -> Result<(tonic::transport::Channel, Option<CertificateDer<'static>>), String> {
    match config {
        None => ep
            .connect()
            .await
            .map(|c| (c, None))
            .map_err(|e| e.to_string()),
        Some(config) => channel(ep, config).await.map(|(c, cert)| (c, Some(cert))),
    }
}

/// The server name to send and check for `addr` (`host:port`): the host, an IP or a DNS name.
pub fn server_name_of(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((host, _)) => host,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} is not a host name: {e}"))
}

/// How many bytes a client must send within [`HANDSHAKE_TIMEOUT`] of its connection being
/// accepted (after the TLS handshake, where there is one): the HTTP/2 client preface
/// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) is exactly this long, and an HTTP/1 request line
/// with its first header is longer.
pub const FIRST_BYTES: usize = 24;

/// One accepted connection: plain TCP or TLS over TCP. Until [`FIRST_BYTES`] have been read from
/// it, a read fails with `TimedOut` once [`HANDSHAKE_TIMEOUT`] has passed, so a client that
/// connects and never starts HTTP/2 (or HTTP/1) is closed instead of held for ever: hyper's own
/// keep-alive pings only start after the preface.
pub struct Conn {
    io: ConnIo,
    local: Option<SocketAddr>,
    peer: SocketAddr,
    first: Option<FirstBytes>,
}

/// The deadline for a connection's first bytes.
struct FirstBytes {
    /// Bytes still owed.
    left: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Where a missed deadline is counted.
    stats: Arc<AcceptStats>,
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    fn new(
        io: ConnIo,
        local: Option<SocketAddr>,
        peer: SocketAddr,
        stats: Arc<AcceptStats>,
    ) -> Conn {
        let first = FirstBytes {
            left: FIRST_BYTES,
            deadline: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
            stats,
        };
        Conn {
            io,
            local,
            peer,
            first: Some(first),
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's certificate chain, leaf first (mutual TLS only).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match &self.io {
            ConnIo::Plain(_) => None,
            ConnIo::Tls(s) => s.get_ref().1.peer_certificates(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            ConnIo::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ConnIo::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(first) = &mut this.first {
            if first.deadline.as_mut().poll(cx).is_ready() {
                // Relaxed: a statistic.
                first
                    .stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no request within {HANDSHAKE_TIMEOUT:?} of connecting"),
                )));
            }
        }
        let before = buf.filled().len();
        let read = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        };
        if let (Poll::Ready(Ok(())), Some(first)) = (&read, &mut this.first) {
            let n = buf.filled().len() - before;
            if n >= first.left {
                this.first = None;
            } else {
                first.left -= n;
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

/// What a port's accept loop counts.
#[derive(Debug, Default)]
pub struct AcceptStats {
    /// TLS handshakes that failed (a client without a certificate the CA signed, a plain-text
    /// client, a scanner) or timed out, and connections closed for sending fewer than
    /// [`FIRST_BYTES`] within [`HANDSHAKE_TIMEOUT`].
    pub handshake_failures: AtomicU64,
    /// Connections closed at once because [`MAX_PENDING_HANDSHAKES`] were in progress.
    pub refused_busy: AtomicU64,
}

/// The connections a listener accepts, TLS handshakes done: a stream for tonic and a listener for
/// axum. Dropping it closes the listening socket.
pub struct Incoming {
    rx: tokio::sync::mpsc::Receiver<Conn>,
    local: SocketAddr,
    /// What the accept loop counted.
    pub stats: Arc<AcceptStats>,
}

/// Accepts on `listener` (on the current tokio runtime), with TLS when `tls` is given. `what`
/// names the port in logs.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    what: &'static str,
) -> io::Result<Incoming> {
    let local = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    let stats = Arc::new(AcceptStats::default());
    tokio::spawn(accept_loop(listener, tls, tx, stats.clone(), what));
    Ok(Incoming { rx, local, stats })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    tx: tokio::sync::mpsc::Sender<Conn>,
    stats: Arc<AcceptStats>,
    what: &'static str,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let warned = Arc::new(Mutex::new(None::<Instant>));
    let local = listener.local_addr().ok();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait, rather than spin.
                    tracing::warn!(port = what, error = %e, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &tls else {
            let conn = Conn::new(ConnIo::Plain(tcp), local, peer, stats.clone());
            if tx.send(conn).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            // Relaxed: a statistic.
            stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.get());
        let (tx, stats, warned) = (tx.clone(), stats.clone(), warned.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => {
                    let conn = Conn::new(ConnIo::Tls(Box::new(s)), local, peer, stats);
                    let _ = tx.send(conn).await;
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            };
            // Relaxed: a statistic.
            let n = stats.handshake_failures.fetch_add(1, Ordering::Relaxed) + 1;
            // One line per 10 s at most: a scanner must not flood the log.
            let mut w = lock(&warned);
            if w.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *w = Some(Instant::now());
                tracing::warn!(port = what, %peer, failures = n, "TLS handshake failed: {why}");
            }
        });
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => {
                let peer = c.peer;
                (c, peer)
            }
            // The accept loop ended (it only does once this is dropped): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Issued};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        // Write then rename, as a Secret volume's update is atomic.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    fn files(dir: &Path, leaf: &Issued, client_ca: Option<&Ca>) -> ServerFiles {
        let ca = client_ca.map(|ca| write(dir, "client-ca.crt", &ca.pem().cert_pem));
        ServerFiles::from_flags(
            Some(write(dir, "tls.crt", &leaf.cert_pem)),
            Some(write(dir, "tls.key", &leaf.key_pem)),
            ca,
        )
        .unwrap()
        .unwrap()
    }

    fn client(dir: &Path, ca: &Ca, identity: Option<&Issued>) -> Arc<ClientConfig> {
        let n = std::fs::read_dir(dir).unwrap().count();
        let ca_path = write(dir, &format!("client{n}-ca.crt"), &ca.pem().cert_pem);
        let identity = identity.map(|i| {
            (
                PemFile::new("--cert", write(dir, &format!("client{n}.crt"), &i.cert_pem)),
                PemFile::new("--key", write(dir, &format!("client{n}.key"), &i.key_pem)),
            )
        });
        let files = ClientFiles {
            ca: PemFile::new("--ca", ca_path),
            identity,
        };
        let mut config = files.config(ServerNames::Checked).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Serves the health endpoints over TLS on a free loopback port.
    async fn serve(tls: Arc<ServerTls>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoints = crate::Endpoints::new(
            || Ok(()),
            || Ok(()),
            prometheus_client::registry::Registry::default(),
        );
        tokio::spawn(crate::serve(
            listener,
            Some(tls),
            endpoints,
            std::future::pending(),
        ));
        addr
    }

    /// GET /healthz over TLS: the status line and the certificate the server presented.
    async fn get(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> io::Result<(String, CertificateDer<'static>)> {
        let (mut s, leaf) = connect(
            &addr.to_string(),
            ServerName::try_from("localhost").unwrap(),
            config,
        )
        .await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        Ok((raw.lines().next().unwrap_or_default().to_owned(), leaf))
    }

    #[tokio::test]
    async fn mutual_tls_answers_a_client_of_its_ca_and_refuses_one_without_a_certificate_or_of_another_ca(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other) = (Ca::new("ca", 1).unwrap(), Ca::new("other", 1).unwrap());
        let server = ca.issue(&["localhost"], 1).unwrap();
        let tls = ServerTls::load(&files(dir.path(), &server, Some(&ca)), ALPN_HTTP).unwrap();
        let addr = serve(tls).await;

        let good = ca.issue(&["collector"], 1).unwrap();
        let (status, _) = get(addr, client(dir.path(), &ca, Some(&good)))
            .await
            .unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");

        let none = get(addr, client(dir.path(), &ca, None)).await;
        assert!(none.is_err(), "no client certificate: {none:?}");
        let foreign = other.issue(&["collector"], 1).unwrap();
        let wrong = get(addr, client(dir.path(), &ca, Some(&foreign))).await;
        assert!(
            wrong.is_err(),
            "a client certificate of another CA: {wrong:?}"
        );
        // And the client refuses a server its CA did not sign.
        let distrust = get(addr, client(dir.path(), &other, Some(&good))).await;
        assert!(distrust.is_err(), "a server of another CA: {distrust:?}");
    }

    #[tokio::test]
    async fn rotated_files_are_served_to_new_connections_without_a_restart_and_no_request_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca", 1).unwrap();
        let first = ca.issue(&["localhost"], 1).unwrap();
        let tls = ServerTls::load(&files(dir.path(), &first, None), ALPN_HTTP).unwrap();
        let addr = serve(tls.clone()).await;
        let config = client(dir.path(), &ca, None);
        let first_der = get(addr, config.clone()).await.unwrap().1;

        // Load: one request after another on new connections, while the files rotate.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let load = tokio::spawn({
            let config = config.clone();
            async move {
                let (mut ok, mut failed, mut seen) = (0u32, Vec::new(), Vec::new());
                while !*stop_rx.borrow() {
                    match get(addr, config.clone()).await {
                        Ok((status, leaf)) if status == "HTTP/1.1 200 OK" => {
                            ok += 1;
                            if seen.last() != Some(&leaf) {
                                seen.push(leaf);
                            }
                        }
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed, seen)
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = ca.issue(&["localhost"], 1).unwrap();
        files(dir.path(), &second, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tls.reloads() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_tx.send(true).unwrap();
        let (ok, failed, seen) = load.await.unwrap();
        assert_eq!(tls.reloads(), 1, "the rotation was noticed once");
        assert!(
            failed.is_empty(),
            "requests failed during the rotation: {failed:?}"
        );
        assert!(ok > 2, "only {ok} requests ran");
        use rustls::pki_types::pem::PemObject;
        let second_der = CertificateDer::from_pem_slice(second.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            seen,
            vec![first_der, second_der],
            "the first certificate, then the rotated one, never back"
        );
    }

    #[tokio::test]
    async fn a_half_written_rotation_keeps_the_previous_certificate_until_the_key_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca", 1).unwrap();
        let first = ca.issue(&["localhost"], 1).unwrap();
        let tls = ServerTls::load(&files(dir.path(), &first, None), ALPN_HTTP).unwrap();
        let before = tls.get();
        let second = ca.issue(&["localhost"], 1).unwrap();
        // The certificate arrives first; its key a moment later.
        write(dir.path(), "tls.crt", &second.cert_pem);
        tokio::time::sleep(CHECK_EVERY + Duration::from_millis(50)).await;
        assert!(
            Arc::ptr_eq(&before, &tls.get()),
            "kept while the key does not match"
        );
        assert_eq!((tls.reloads(), tls.reload_failures()), (0, 1));
        write(dir.path(), "tls.key", &second.key_pem);
        tokio::time::sleep(CHECK_EVERY + Duration::from_millis(50)).await;
        assert!(
            !Arc::ptr_eq(&before, &tls.get()),
            "loaded once the key matches"
        );
        assert_eq!((tls.reloads(), tls.reload_failures()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_sends_a_handshake_is_closed_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca", 1).unwrap();
        let leaf = ca.issue(&["localhost"], 1).unwrap();
        let tls = ServerTls::load(&files(dir.path(), &leaf, None), ALPN_HTTP).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = incoming(listener, Some(tls), "test").unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = silent.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the server closed the connection");
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
        assert_eq!(incoming.stats.handshake_failures.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_client_that_never_sends_a_preface_is_closed_and_one_that_does_is_kept() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = incoming(listener, None, "test").unwrap();
        // Read as hyper would: until the connection ends or fails.
        let serve = |mut conn: Conn| async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => return Ok(got),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err((e, got)),
                }
            }
        };

        let _silent = TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        let (e, got) = tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, serve(conn))
            .await
            .expect("closed by the deadline, not held open")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(got.is_empty());
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
        assert_eq!(incoming.stats.handshake_failures.load(Ordering::Relaxed), 1);

        // The preface in two pieces, the second just before the deadline; then silence well
        // past it: the connection stays open until the client closes it.
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(preface.len(), FIRST_BYTES);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        let server = tokio::spawn(serve(conn));
        client.write_all(&preface[..10]).await.unwrap();
        tokio::time::sleep(HANDSHAKE_TIMEOUT - Duration::from_millis(100)).await;
        client.write_all(&preface[10..]).await.unwrap();
        tokio::time::sleep(HANDSHAKE_TIMEOUT * 3).await;
        client.write_all(b"later").await.unwrap();
        drop(client);
        let got = server
            .await
            .unwrap()
            .expect("kept open once the preface came");
        assert_eq!(got, [&preface[..], b"later"].concat());
        assert_eq!(incoming.stats.handshake_failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn incomplete_flags_name_what_is_missing_and_unreadable_files_name_the_flag_and_the_file() {
        let e = ServerFiles::from_flags(Some("c".into()), None, None).unwrap_err();
        assert_eq!(e.to_string(), "--tls-cert needs --tls-key too");
        let e = ServerFiles::from_flags(None, None, Some("ca".into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--tls-client-ca needs --tls-cert and --tls-key too"
        );
        assert_eq!(ServerFiles::from_flags(None, None, None).unwrap(), None);

        let dir = tempfile::tempdir().unwrap();
        let missing = ServerFiles::from_flags(
            Some(dir.path().join("nope.crt")),
            Some(dir.path().join("nope.key")),
            None,
        )
        .unwrap()
        .unwrap();
        let e = missing.config(ALPN_GRPC).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-cert ") && e.contains("nope.crt: cannot read it"),
            "{e}"
        );

        let ca = Ca::new("ca", 1).unwrap();
        let (a, b) = (ca.issue(&["a"], 1).unwrap(), ca.issue(&["b"], 1).unwrap());
        let swapped = ServerFiles::from_flags(
            Some(write(dir.path(), "a.crt", &a.cert_pem)),
            Some(write(dir.path(), "b.key", &b.key_pem)),
            None,
        )
        .unwrap()
        .unwrap();
        let e = swapped.config(ALPN_GRPC).unwrap_err().to_string();
        assert!(
            e.contains("a.crt")
                && e.contains("b.key")
                && e.contains("is the key the certificate's?"),
            "{e}"
        );
        let not_pem = PemFile::new("--tls-key", write(dir.path(), "x.key", "hello"));
        let e = not_pem.key().unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-key ") && e.contains("no private key"),
            "{e}"
        );
    }
}
