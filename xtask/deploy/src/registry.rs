//! Pushing the image to a registry, and pulling an image back, through the OCI distribution
//! API (`oci-client`, rustls with the ring provider).
//!
//! The manifest is pushed as the exact bytes [`crate::image`] built, so the digest the manifests
//! are pinned to is known before the push and checked after it. A registry on loopback
//! (`127.0.0.1:5000`, `localhost:5000`, `[::1]:5000`) is spoken to over plain HTTP, like
//! Docker's own default for such registries; any other over HTTPS unless `plain_http` is set.
//!
//! Credentials: `GPUSCALE_REGISTRY_USERNAME` / `GPUSCALE_REGISTRY_PASSWORD`, else the registry's
//! entry in `~/.docker/config.json` (`auths.<registry>.auth`, as `docker login` writes it; a
//! credential helper is not consulted), else anonymous.

use std::path::PathBuf;
use std::str::FromStr;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use crate::image::{Image, MANIFEST_MEDIA_TYPE};
use crate::{Error, Result};

/// The repository name the image is pushed as, under `--registry`.
pub const REPOSITORY: &str = "gpuscale";

/// A client for one registry.
pub struct Registry {
    client: oci_client::Client,
    auth: RegistryAuth,
    /// host[:port], as the user wrote it.
    host: String,
}

/// The host[:port] part of a registry or image reference (`reg:5000/team/x:1` → `reg:5000`).
pub fn host_of(reference: &str) -> &str {
    reference.split('/').next().unwrap_or(reference)
}

/// Whether `host` (host[:port]) is a loopback address.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn install_crypto_provider() {
    // Err means a provider is installed already (kube's, the same ring one): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Registry {
    /// A client for the registry of `reference` (or a bare host[:port]).
    pub fn new(reference: &str, plain_http: bool) -> Result<Registry> {
        install_crypto_provider();
        let host = host_of(reference).to_owned();
        let protocol = if plain_http || is_loopback(&host) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(config).map_err(|e| Error::Registry {
            registry: host.clone(),
            why: format!("cannot set up the HTTP client: {}", chain(&e)),
        })?;
        let auth = credentials(&host)?;
        Ok(Registry { client, auth, host })
    }

    fn reference(&self, s: &str) -> Result<Reference> {
        Reference::from_str(s).map_err(|e| Error::Registry {
            registry: self.host.clone(),
            why: format!("{s:?} is not an image reference ({e}); write host[:port]/path"),
        })
    }

    fn fail(&self, doing: &str, e: OciDistributionError) -> Error {
        let fix = match &e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => format!(
                "log in first (`docker login {0}` writes ~/.docker/config.json) or set \
                 GPUSCALE_REGISTRY_USERNAME and GPUSCALE_REGISTRY_PASSWORD",
                self.host
            ),
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => format!(
                "is a registry listening at {0}? (for a registry without TLS that is not on \
                 loopback pass --plain-http)",
                self.host
            ),
            OciDistributionError::ImageManifestNotFoundError(_) => {
                "the image is not there: push it first, or let the installer build and push one \
                 with --registry"
                    .into()
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                    )
                }) =>
            {
                "the image is not there: push it first, or let the installer build and push one \
                 with --registry"
                    .into()
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(e.code, OciErrorCode::Denied | OciErrorCode::Unauthorized)
                }) =>
            {
                format!(
                    "the registry refused: log in (`docker login {}`) with an account that may \
                     push there, or set GPUSCALE_REGISTRY_USERNAME and GPUSCALE_REGISTRY_PASSWORD",
                    self.host
                )
            }
            _ => "check the registry's address and that it accepts pushes".into(),
        };
        Error::Registry {
            registry: self.host.clone(),
            why: format!("{doing}: {}; {fix}", chain(&e)),
        }
    }

    /// Pushes `image` as `repository:tag` (a full reference such as `127.0.0.1:5000/gpuscale:0.1.0`)
    /// and returns the pinned reference `…/gpuscale@sha256:…`. Blobs the registry already holds
    /// are not sent again.
    pub async fn push(
        &self,
        tagged: &str,
        image: &Image,
        progress: &mut dyn FnMut(String),
    ) -> Result<String> {
        let reference = self.reference(tagged)?;
        self.client
            .auth(&reference, &self.auth, RegistryOperation::Push)
            .await
            .map_err(|e| self.fail("signing in to push", e))?;
        let blobs = image.layers.iter().chain(std::iter::once(&image.config));
        for blob in blobs {
            let short = &blob.digest[..19.min(blob.digest.len())];
            let exists = self
                .client
                .blob_exists(&reference, &blob.digest)
                .await
                .map_err(|e| self.fail("checking for a blob", e))?;
            if exists {
                progress(format!("  {short}… already in the registry"));
                continue;
            }
            progress(format!(
                "  pushing {short}… ({})",
                crate::image::mib(blob.data.len())
            ));
            self.client
                .push_blob(&reference, blob.data.clone(), &blob.digest)
                .await
                .map_err(|e| self.fail(&format!("pushing blob {}", blob.digest), e))?;
        }
        self.client
            .push_manifest_raw(
                &reference,
                image.manifest.clone(),
                http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .map_err(|e| self.fail("pushing the manifest", e))?;
        // Read it back by tag: the registry must hold exactly our bytes.
        let (_, digest) = self
            .client
            .pull_manifest_raw(&reference, &self.auth, &[MANIFEST_MEDIA_TYPE])
            .await
            .map_err(|e| self.fail("reading the pushed manifest back", e))?;
        if digest != image.digest {
            return Err(Error::Registry {
                registry: self.host.clone(),
                why: format!(
                    "the pushed manifest reads back as {digest}, not {}: the registry rewrote it; \
                     use a registry that stores OCI manifests as pushed",
                    image.digest
                ),
            });
        }
        Ok(format!(
            "{}@{}",
            crate::render::image_name(tagged),
            image.digest
        ))
    }

    /// The pinned form (`name@sha256:…`) of an image reference: as given when it already has a
    /// digest, else the digest the registry reports for its tag.
    pub async fn resolve(&self, reference: &str) -> Result<String> {
        if reference.contains("@sha256:") {
            return Ok(reference.to_owned());
        }
        let r = self.reference(reference)?;
        let digest = self
            .client
            .fetch_manifest_digest(&r, &self.auth)
            .await
            .map_err(|e| self.fail(&format!("looking up {reference}"), e))?;
        Ok(format!("{}@{digest}", crate::render::image_name(reference)))
    }

    /// Pulls a pinned image (`name@sha256:…`): the manifest, checked against its digest, and its
    /// layers, each checked against theirs. Returns (manifest bytes, layers bottom first).
    pub async fn pull(&self, pinned: &str) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
        let r = self.reference(pinned)?;
        let want = r
            .digest()
            .map(str::to_owned)
            .ok_or_else(|| Error::Registry {
                registry: self.host.clone(),
                why: format!("{pinned:?} has no @sha256: digest"),
            })?;
        let (manifest, digest) = self
            .client
            .pull_manifest_raw(&r, &self.auth, &[MANIFEST_MEDIA_TYPE])
            .await
            .map_err(|e| self.fail(&format!("pulling {pinned}"), e))?;
        if digest != want || crate::image::sha256_digest(&manifest) != want {
            return Err(Error::Registry {
                registry: self.host.clone(),
                why: format!("{pinned}: the manifest it served has digest {digest}"),
            });
        }
        let m: serde_json::Value =
            serde_json::from_slice(&manifest).map_err(|e| Error::Registry {
                registry: self.host.clone(),
                why: format!("{pinned}: the manifest is not JSON: {e}"),
            })?;
        let mut layers = Vec::new();
        for l in m["layers"].as_array().into_iter().flatten() {
            let d = l["digest"].as_str().unwrap_or_default();
            let mut data = Vec::new();
            self.client
                .pull_blob(&r, d, &mut data)
                .await
                .map_err(|e| self.fail(&format!("pulling layer {d}"), e))?;
            if crate::image::sha256_digest(&data) != d {
                return Err(Error::Registry {
                    registry: self.host.clone(),
                    why: format!("layer {d} arrived with other content"),
                });
            }
            layers.push(data);
        }
        Ok((manifest.to_vec(), layers))
    }
}

/// An error and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn credentials(host: &str) -> Result<RegistryAuth> {
    if let (Ok(u), Ok(p)) = (
        std::env::var("GPUSCALE_REGISTRY_USERNAME"),
        std::env::var("GPUSCALE_REGISTRY_PASSWORD"),
    ) {
        return Ok(RegistryAuth::Basic(u, p));
    }
    let path = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .map(|d| d.join("config.json"));
    let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    docker_config_auth(&text, host).map_err(|why| Error::Registry {
        registry: host.to_owned(),
        why: format!(
            "{}: {why}; fix the file or set GPUSCALE_REGISTRY_USERNAME and GPUSCALE_REGISTRY_PASSWORD",
            path.unwrap_or_default().display()
        ),
    })
}

/// The Basic credentials for `host` in a Docker `config.json`, or anonymous when it has none.
pub fn docker_config_auth(text: &str, host: &str) -> std::result::Result<RegistryAuth, String> {
    let config: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(auths) = config["auths"].as_object() else {
        return Ok(RegistryAuth::Anonymous);
    };
    let entry = auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next() == Some(host)
    });
    let Some(encoded) = entry.and_then(|(_, v)| v["auth"].as_str()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("auths.{host}.auth is not base64: {e}"))?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| format!("auths.{host}.auth is not UTF-8"))?;
    let (user, pass) = decoded
        .split_once(':')
        .ok_or_else(|| format!("auths.{host}.auth is not user:password"))?;
    Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()))
}

/// A registry of its own on `127.0.0.1:port` (Debian's `docker-registry`, which `cargo xtask
/// test`'s set-up installs), storing into a folder; stopped when dropped. For the tests that
/// push the image, and for trying `cargo xtask deploy --registry` without a registry.
pub struct LocalRegistry {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl LocalRegistry {
    /// What is wrong when [`LocalRegistry::installed`] is false, and the fix.
    pub const MISSING: &'static str = "docker-registry is not installed (`cargo xtask test`'s \
                                       set-up installs it: apt-get install docker-registry)";

    /// Whether `docker-registry` is on PATH.
    pub fn installed() -> bool {
        std::process::Command::new("sh")
            .args(["-c", "command -v docker-registry"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Starts one with its configuration, storage and logs in `dir`, and waits (up to 20 s) until
    /// it listens. Fails with the reason (not installed, did not listen, with its log).
    pub fn start(dir: &std::path::Path, port: u16) -> Result<LocalRegistry, String> {
        if !LocalRegistry::installed() {
            return Err(LocalRegistry::MISSING.into());
        }
        let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| io("creating the registry's folder", e))?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )
        .map_err(|e| io("writing config.yml", e))?;
        let log = |name: &str| {
            std::fs::File::create(dir.join(name)).map_err(|e| io(&format!("creating {name}"), e))
        };
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log("registry.log")?)
            .stderr(log("registry.err")?)
            .spawn()
            .map_err(|e| io("starting docker-registry", e))?;
        let registry = LocalRegistry {
            child,
            dir: dir.to_owned(),
            port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "docker-registry did not listen on 127.0.0.1:{port} within 20 s: {}",
                    registry.logs()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// `host:port`, as `--registry` takes it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What it logged so far (stdout and stderr).
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("registry.log"), read("registry.err"))
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised_with_and_without_ports() {
        for h in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.3.2.1",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["registry.example.com:5000", "10.0.0.1:5000", "ghcr.io"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn docker_config_credentials_are_found_by_host() {
        let cfg = r#"{"auths": {"https://reg.example.com": {"auth": "dXNlcjpwYXNz"}}}"#;
        assert_eq!(
            docker_config_auth(cfg, "reg.example.com").unwrap(),
            RegistryAuth::Basic("user".into(), "pass".into())
        );
        assert_eq!(
            docker_config_auth(cfg, "other.example.com").unwrap(),
            RegistryAuth::Anonymous
        );
        assert!(
            docker_config_auth(r#"{"auths": {"r": {"auth": "!!"}}}"#, "r")
                .unwrap_err()
                .contains("base64")
        );
    }
}
