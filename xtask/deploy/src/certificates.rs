//! TLS for an install: the CA and the certificates the manifests mount, and KEDA's client
//! certificate with the `ClusterTriggerAuthentication` that hands it to KEDA.
//!
//! Two ways, chosen by what the render holds:
//! - without cert-manager (the base), the installer is the CA: Secret [`CA_SECRET`] holds a CA
//!   made with [`gpuscale_health::pki`] (10 years), and it issues [`COLLECTOR_SECRET`] and
//!   [`AGENT_SECRET`] (1 year). A later deploy keeps what is there and issues again only a
//!   certificate that is missing, signed by another CA, unreadable, without a name it needs, or
//!   within [`RENEW_BEFORE`] of its end ([`renew_reason`], which says which);
//! - with `deploy/overlays/cert-manager`, cert-manager makes the CA and those two Secrets; the
//!   installer waits for the CA's Secret.
//!
//! Either way the installer issues KEDA's client certificate ([`KEDA_SECRET`], in KEDA's
//! namespace, where a `ClusterTriggerAuthentication` reads its Secrets) from that CA and applies
//! the `ClusterTriggerAuthentication` [`TRIGGER_AUTHENTICATION`] that gives KEDA `caCert`,
//! `tlsClientCert` and `tlsClientKey`. Where KEDA is not installed yet, that step is skipped with
//! a warning saying how to finish it.
//!
//! Every Secret is `kubernetes.io/tls` with `tls.crt`, `tls.key` and `ca.crt`, as cert-manager
//! writes them, so the manifests mount either kind alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use gpuscale_health::pki::{self, Ca, Issued};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};

use crate::{Error, Result};

/// The CA's Secret (its certificate and key), in gpuscale's namespace.
pub const CA_SECRET: &str = "gpuscale-ca";
/// The collector's serving (and agent-client) certificate.
pub const COLLECTOR_SECRET: &str = "gpuscale-collector-tls";
/// The certificate every agent serves.
pub const AGENT_SECRET: &str = "gpuscale-agent-tls";
/// KEDA's client certificate, in KEDA's namespace.
pub const KEDA_SECRET: &str = "gpuscale-keda-tls";
/// The `ClusterTriggerAuthentication` a ScaledObject names in `authenticationRef`.
pub const TRIGGER_AUTHENTICATION: &str = "gpuscale";
/// Where KEDA runs unless `--keda-namespace` says otherwise (KEDA's Helm chart's default).
pub const DEFAULT_KEDA_NAMESPACE: &str = "keda";
/// The name on KEDA's client certificate (the collector checks only that its CA signed it).
pub const KEDA_CLIENT_NAME: &str = "keda-operator";
/// How long the CA the installer makes is valid.
pub const CA_DAYS: i64 = 3650;
/// How long a certificate the installer issues is valid.
pub const LEAF_DAYS: i64 = 365;
/// A deploy issues a certificate again when it ends within this time.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// The field manager of the Secrets and the `ClusterTriggerAuthentication`.
const FIELD_MANAGER: &str = crate::cluster::FIELD_MANAGER;

/// The names the collector's certificate carries: those KEDA may dial (the headless Service, in
/// every form a `scalerAddress` can take) and 127.0.0.1, where `gpuscale-collector dump` and
/// `query` reach it inside its pod.
pub fn collector_names(namespace: &str) -> Vec<String> {
    let svc = "gpuscale-collector";
    vec![
        svc.to_owned(),
        format!("{svc}.{namespace}"),
        format!("{svc}.{namespace}.svc"),
        format!("{svc}.{namespace}.svc.cluster.local"),
        "127.0.0.1".to_owned(),
    ]
}

/// The name every agent's certificate carries (the collector's `--agent-tls-server-name`).
pub fn agent_name(namespace: &str) -> String {
    format!("gpuscale-agent.{namespace}.svc")
}

/// How the certificates of an install are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuance {
    /// By the installer (`deploy/base` and the overlays without cert-manager).
    Installer,
    /// By cert-manager (`deploy/overlays/cert-manager`); the installer only issues KEDA's.
    CertManager,
}

impl Issuance {
    /// cert-manager when the render holds a cert-manager `Certificate`, else the installer.
    pub fn of(objects: &[Value]) -> Issuance {
        let cert_manager = objects.iter().any(|o| {
            o["kind"] == "Certificate"
                && o["apiVersion"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("cert-manager.io/"))
        });
        if cert_manager {
            Issuance::CertManager
        } else {
            Issuance::Installer
        }
    }
}

/// Why the certificate `current` (with the CA certificate `ca_pem`) must be issued again, or
/// `None` to keep it: it is missing, unreadable, signed by another CA (or expired), lacks one of
/// `names`, or ends within [`RENEW_BEFORE`] of `now`.
pub fn renew_reason(
    current: Option<&Issued>,
    ca_pem: &str,
    names: &[String],
    now: SystemTime,
) -> Option<String> {
    let Some(current) = current else {
        return Some("there was none".into());
    };
    let info = match pki::inspect(&current.cert_pem) {
        Ok(info) => info,
        Err(why) => return Some(format!("the stored certificate is unreadable: {why}")),
    };
    if !pki::chains_to(&current.cert_pem, ca_pem) {
        return Some("the stored certificate is expired or not signed by the current CA".into());
    }
    let missing: Vec<&str> = names
        .iter()
        .filter(|n| !info.names.contains(n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "the stored certificate does not name {}",
            missing.join(", ")
        ));
    }
    match info.not_after.duration_since(now) {
        Ok(left) if left > RENEW_BEFORE => None,
        Ok(left) => Some(format!(
            "the stored certificate ends in {} days",
            left.as_secs() / 86_400
        )),
        Err(_) => Some("the stored certificate has ended".into()),
    }
}

/// A `kubernetes.io/tls` Secret `namespace/name` holding `issued` and the CA certificate.
pub fn tls_secret(name: &str, namespace: &str, issued: &Issued, ca_pem: &str) -> Secret {
    let data = [
        ("tls.crt", &issued.cert_pem),
        ("tls.key", &issued.key_pem),
        ("ca.crt", &ca_pem.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect::<BTreeMap<_, _>>();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "gpuscale".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The certificate and key (`tls.crt`, `tls.key`) a Secret holds, if both are text.
pub fn issued_of(secret: &Secret) -> Option<Issued> {
    let field = |k: &str| {
        let bytes = secret.data.as_ref()?.get(k)?;
        String::from_utf8(bytes.0.clone()).ok()
    };
    Some(Issued {
        cert_pem: field("tls.crt")?,
        key_pem: field("tls.key")?,
    })
}

/// The `ClusterTriggerAuthentication` giving KEDA the CA and its client certificate from
/// Secret [`KEDA_SECRET`] (a cluster-scoped authentication reads Secrets of KEDA's namespace).
pub fn trigger_authentication() -> Value {
    let from = |parameter: &str, key: &str| json!({"parameter": parameter, "name": KEDA_SECRET, "key": key});
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ClusterTriggerAuthentication",
        "metadata": {
            "name": TRIGGER_AUTHENTICATION,
            "labels": {"app.kubernetes.io/part-of": "gpuscale"},
        },
        "spec": {
            "secretTargetRef": [
                from("caCert", "ca.crt"),
                from("tlsClientCert", "tls.crt"),
                from("tlsClientKey", "tls.key"),
            ],
        },
    })
}

fn kube_err(doing: &str) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |e| Error::Kube(format!("{doing}: {e}"))
}

fn pki_err(e: impl std::fmt::Display) -> Error {
    Error::Kube(format!("making certificates: {e}"))
}

/// Whether the CustomResourceDefinition `name` is installed.
async fn has_crd(client: &Client, name: &str) -> Result<bool> {
    let gvk = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "customresourcedefinitions"),
    );
    crds.get_opt(name)
        .await
        .map(|c| c.is_some())
        .map_err(kube_err("looking up CustomResourceDefinitions"))
}

/// Before anything is applied: with cert-manager issuing, its CRDs must be there.
pub async fn preflight(client: &Client, issuance: Issuance) -> Result<()> {
    if issuance == Issuance::CertManager && !has_crd(client, "certificates.cert-manager.io").await?
    {
        return Err(Error::Kube(
            "--overlay cert-manager needs cert-manager, and this cluster has no \
             certificates.cert-manager.io CRD: install cert-manager \
             (https://cert-manager.io/docs/installation/), or deploy without the overlay and \
             the installer makes the certificates itself"
                .into(),
        ));
    }
    Ok(())
}

/// Writes `secret` (server-side apply as the installer).
async fn put(api: &Api<Secret>, secret: &Secret) -> Result<()> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(secret),
    )
    .await
    .map(drop)
    .map_err(kube_err(&format!("writing Secret {name}")))
}

/// The CA: the stored one, a new one (installer), or cert-manager's once it has made it.
async fn ca(
    secrets: &Api<Secret>,
    namespace: &str,
    issuance: Issuance,
    timeout: Duration,
    progress: &mut dyn FnMut(String),
) -> Result<Ca> {
    let start = Instant::now();
    loop {
        let stored = secrets
            .get_opt(CA_SECRET)
            .await
            .map_err(kube_err(&format!("reading Secret {namespace}/{CA_SECRET}")))?;
        match (stored.as_ref().map(issued_of), issuance) {
            (Some(Some(stored)), _) => {
                let ca = Ca::from_pem(&stored).map_err(|e| {
                    Error::Kube(format!(
                        "Secret {namespace}/{CA_SECRET} does not hold a usable CA ({e}); delete \
                         it to have a new CA made (every certificate is then issued again)"
                    ))
                })?;
                progress(format!("  CA: Secret {namespace}/{CA_SECRET} (kept)"));
                return Ok(ca);
            }
            (Some(None), Issuance::Installer) => {
                return Err(Error::Kube(format!(
                    "Secret {namespace}/{CA_SECRET} has no tls.crt and tls.key; delete it to \
                     have a new CA made"
                )))
            }
            (None, Issuance::Installer) => {
                let ca = Ca::new("gpuscale CA", CA_DAYS).map_err(pki_err)?;
                let secret = tls_secret(CA_SECRET, namespace, ca.pem(), &ca.pem().cert_pem);
                put(secrets, &secret).await?;
                progress(format!(
                    "  CA: made one, valid {} years (Secret {namespace}/{CA_SECRET})",
                    CA_DAYS / 365
                ));
                return Ok(ca);
            }
            (_, Issuance::CertManager) if start.elapsed() < timeout => {
                if start.elapsed().as_secs() % 10 < 2 {
                    progress(format!(
                        "  waiting for cert-manager to make the CA (Secret {namespace}/{CA_SECRET})"
                    ));
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            (_, Issuance::CertManager) => {
                return Err(Error::Kube(format!(
                    "cert-manager did not make Secret {namespace}/{CA_SECRET} in {}s; see why \
                     with `kubectl -n {namespace} describe certificate {CA_SECRET}` and check \
                     cert-manager runs (`kubectl -n cert-manager get pods`)",
                    timeout.as_secs()
                )))
            }
        }
    }
}

/// Issues the certificate of Secret `namespace/name` for `names` unless the stored one is good.
async fn leaf(
    client: &Client,
    ca: &Ca,
    namespace: &str,
    name: &str,
    names: &[String],
    progress: &mut dyn FnMut(String),
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let current = api
        .get_opt(name)
        .await
        .map_err(kube_err(&format!("reading Secret {namespace}/{name}")))?
        .as_ref()
        .and_then(issued_of);
    let ca_pem = &ca.pem().cert_pem;
    match renew_reason(current.as_ref(), ca_pem, names, SystemTime::now()) {
        None => progress(format!("  certificate {namespace}/{name}: kept")),
        Some(why) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let issued = ca.issue(&refs, LEAF_DAYS).map_err(pki_err)?;
            put(&api, &tls_secret(name, namespace, &issued, ca_pem)).await?;
            progress(format!(
                "  certificate {namespace}/{name}: issued for {} ({why})",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// Makes sure the Secrets the manifests mount exist and are current (see the module doc), and
/// that KEDA in `keda_namespace` can authenticate to the collector. Returns warnings to print
/// (KEDA not found).
pub async fn ensure(
    client: &Client,
    namespace: &str,
    keda_namespace: &str,
    issuance: Issuance,
    timeout: Duration,
    progress: &mut dyn FnMut(String),
) -> Result<Vec<String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = ca(&secrets, namespace, issuance, timeout, progress).await?;
    if issuance == Issuance::Installer {
        leaf(
            client,
            &ca,
            namespace,
            COLLECTOR_SECRET,
            &collector_names(namespace),
            progress,
        )
        .await?;
        leaf(
            client,
            &ca,
            namespace,
            AGENT_SECRET,
            &[agent_name(namespace)],
            progress,
        )
        .await?;
    }

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let keda_there = namespaces
        .get_opt(keda_namespace)
        .await
        .map_err(kube_err("looking up KEDA's namespace"))?
        .is_some();
    let crd = "clustertriggerauthentications.keda.sh";
    if !keda_there || !has_crd(client, crd).await? {
        let missing = if keda_there {
            format!("no {crd} CRD")
        } else {
            format!("no namespace {keda_namespace}")
        };
        return Ok(vec![format!(
            "KEDA's client certificate was not made ({missing}): install KEDA, or pass \
             --keda-namespace with the namespace it runs in, and deploy again; until then \
             ScaledObjects cannot authenticate to the collector"
        )]);
    }
    leaf(
        client,
        &ca,
        keda_namespace,
        KEDA_SECRET,
        &[KEDA_CLIENT_NAME.to_owned()],
        progress,
    )
    .await?;
    crate::cluster::apply(client, &[trigger_authentication()], progress).await?;
    Ok(Vec::new())
}

/// Removes what [`ensure`] made outside gpuscale's namespace (that namespace's deletion takes
/// the rest): KEDA's Secret and the `ClusterTriggerAuthentication`. Missing ones are fine.
pub async fn remove(
    client: &Client,
    keda_namespace: &str,
    progress: &mut dyn FnMut(String),
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), keda_namespace);
    let gvk = GroupVersionKind::gvk("keda.sh", "v1alpha1", "ClusterTriggerAuthentication");
    let auths: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "clustertriggerauthentications"),
    );
    let what = [
        format!("ClusterTriggerAuthentication {TRIGGER_AUTHENTICATION}"),
        format!("Secret {keda_namespace}/{KEDA_SECRET}"),
    ];
    let results = [
        auths
            .delete(TRIGGER_AUTHENTICATION, &DeleteParams::background())
            .await
            .map(drop),
        secrets
            .delete(KEDA_SECRET, &DeleteParams::background())
            .await
            .map(drop),
    ];
    for (what, result) in what.iter().zip(results) {
        match result {
            Ok(()) => progress(format!("  deleted {what}")),
            // 404: not there, or (for the kind) KEDA's CRD is not installed.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                progress(format!("  {what} was not there"))
            }
            Err(e) => return Err(Error::Kube(format!("deleting {what}: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_certificate_is_kept_only_while_it_is_whole_current_and_names_what_it_must() {
        let ca = Ca::new("gpuscale CA", 3650).unwrap();
        let ca_pem = &ca.pem().cert_pem;
        let names = collector_names("gpu-ops");
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let good = ca.issue(&refs, LEAF_DAYS).unwrap();
        let now = SystemTime::now();
        assert_eq!(renew_reason(Some(&good), ca_pem, &names, now), None);

        let why = |issued: Option<&Issued>, names: &[String], now| {
            renew_reason(issued, ca_pem, names, now).expect("must be issued again")
        };
        assert_eq!(why(None, &names, now), "there was none");
        // Within 30 days of its end, and after it.
        let late = now + Duration::from_secs(340 * 86_400);
        assert!(
            why(Some(&good), &names, late).contains("ends in"),
            "{}",
            why(Some(&good), &names, late)
        );
        let short = ca.issue(&refs, 10).unwrap();
        assert!(why(Some(&short), &names, now).contains("ends in 9 days"));
        // Another namespace's names: the namespace moved.
        let moved = collector_names("gpuscale-system");
        assert!(why(Some(&good), &moved, now).contains("gpuscale-collector.gpuscale-system"));
        // Another CA's certificate (the CA Secret was deleted and made again).
        let other = Ca::new("gpuscale CA", 3650).unwrap();
        let foreign = other.issue(&refs, LEAF_DAYS).unwrap();
        assert!(why(Some(&foreign), &names, now).contains("not signed by the current CA"));
        // Garbage in tls.crt.
        let garbage = Issued {
            cert_pem: "not a certificate".into(),
            key_pem: good.key_pem.clone(),
        };
        assert!(why(Some(&garbage), &names, now).contains("unreadable"));
        assert!(DAY < RENEW_BEFORE);
    }

    #[test]
    fn a_tls_secret_round_trips_and_the_authentication_names_its_keys() {
        let ca = Ca::new("gpuscale CA", 30).unwrap();
        let issued = ca.issue(&["keda-operator"], 30).unwrap();
        let s = tls_secret(KEDA_SECRET, "keda", &issued, &ca.pem().cert_pem);
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(issued_of(&s), Some(issued));
        let data = s.data.as_ref().unwrap();
        assert_eq!(data["ca.crt"].0, ca.pem().cert_pem.as_bytes());

        let auth = trigger_authentication();
        let refs = auth["spec"]["secretTargetRef"].as_array().unwrap();
        for (param, key) in [
            ("caCert", "ca.crt"),
            ("tlsClientCert", "tls.crt"),
            ("tlsClientKey", "tls.key"),
        ] {
            assert!(
                refs.iter().any(|r| r["parameter"] == param
                    && r["key"] == key
                    && r["name"] == KEDA_SECRET
                    && data.contains_key(key)),
                "{param} ← {key}: {auth}"
            );
        }
    }

    #[test]
    fn cert_manager_issues_when_the_render_has_its_certificates() {
        let base = vec![json!({"apiVersion": "v1", "kind": "Service"})];
        assert_eq!(Issuance::of(&base), Issuance::Installer);
        let mut with = base.clone();
        with.push(json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate"}));
        assert_eq!(Issuance::of(&with), Issuance::CertManager);
    }
}
