//! The cluster's certificates and keys, made with the `openssl` command (P-256 keys):
//!
//! | file | what |
//! |---|---|
//! | `ca.{crt,key}` | the cluster CA: signs the API server's serving certificate; clients trust it |
//! | `apiserver.{crt,key}` | the API server's serving certificate (127.0.0.1, the veth address, `kubernetes.default.svc`) |
//! | `front-proxy-ca.{crt,key}`, `front-proxy-client.{crt,key}` | the aggregation layer: the API server proves itself to KEDA's metrics server with this client certificate |
//! | `sa.{key,pub}` | ServiceAccount token signing (API server and controller-manager) |
//! | `tokens.csv`, `admin.token` | the static token of user `admin` in group `system:masters` |

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// The files of a made PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The folder.
    pub dir: PathBuf,
    /// The admin user's bearer token.
    pub admin_token: String,
}

impl Pki {
    /// A file of the PKI.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    crate::process::run_checked(
        Command::new("openssl").current_dir(dir).args(args),
        &format!("openssl {}", args.join(" ")),
        "on Debian: apt-get install openssl",
    )
}

fn key(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ],
    )
}

fn ca(dir: &Path, name: &str, cn: &str) -> Result<()> {
    key(dir, &format!("{name}.key"))?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "3650",
            "-subj",
            &format!("/CN={cn}"),
        ],
    )
}

/// A certificate `name.crt` (key `name.key`) signed by CA `ca`, with the extensions in `ext`
/// (an openssl extension section's lines).
fn signed(dir: &Path, name: &str, subject: &str, ca: &str, ext: &str) -> Result<()> {
    key(dir, &format!("{name}.key"))?;
    let csr = format!("{name}.csr");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    )?;
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "3650",
            "-extfile",
            &ext_file,
        ],
    )?;
    let _ = std::fs::remove_file(dir.join(csr));
    let _ = std::fs::remove_file(dir.join(ext_file));
    Ok(())
}

/// A random hex token from the kernel's generator.
fn token() -> Result<String> {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?;
    let a = String::from_utf8_lossy(&bytes).trim().replace('-', "");
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid")?;
    let b = String::from_utf8_lossy(&bytes).trim().replace('-', "");
    Ok(format!("{a}{b}"))
}

/// Makes the PKI in `dir` (or reuses it when it is complete). `server_ips` are the API
/// server's addresses.
pub fn make(dir: &Path, server_ips: &[&str]) -> Result<Pki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let token_file = dir.join("admin.token");
    let done = [
        "ca.crt",
        "apiserver.crt",
        "front-proxy-client.crt",
        "sa.pub",
        "tokens.csv",
    ]
    .iter()
    .all(|f| dir.join(f).is_file())
        && token_file.is_file();
    if !done {
        ca(dir, "ca", "gpuscale-cluster-ca")?;
        let mut sans: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
        sans.extend(
            [
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            .iter()
            .map(|d| format!("DNS:{d}")),
        );
        signed(
            dir,
            "apiserver",
            "/CN=kube-apiserver",
            "ca",
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )?;
        ca(dir, "front-proxy-ca", "gpuscale-cluster-front-proxy-ca")?;
        signed(
            dir,
            "front-proxy-client",
            "/CN=front-proxy-client",
            "front-proxy-ca",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
        )?;
        key(dir, "sa.key")?;
        openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let t = token()?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{t},admin,gpuscale-cluster-admin,\"system:masters\"\n"),
        )?;
        std::fs::write(&token_file, &t)?;
    }
    let admin_token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    Ok(Pki {
        dir: dir.to_owned(),
        admin_token,
    })
}

/// A kubeconfig for `server` that trusts the cluster CA and authenticates with `token`.
pub fn kubeconfig(pki: &Pki, server: &str, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: gpuscale\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: gpuscale\n  context:\n    cluster: gpuscale\n    user: {user}\n\
         current-context: gpuscale\n",
        ca = pki.path("ca.crt").display(),
    )
}
