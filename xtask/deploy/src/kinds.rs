//! The Kubernetes kinds `deploy/` may hold, with what the renderer and the installer need to
//! know about each: API group and version, plural (the URL path segment), scope, and the order
//! of creation (a Namespace before what lives in it, a ServiceAccount before the pods using it).
//!
//! A fixed table instead of API discovery: the installer's requests are then known before it
//! talks to a cluster, `--dry-run` needs no cluster, and a kind added to `deploy/` without
//! being added here fails the render, naming this table.

/// One kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Kind, as in `kind:`.
    pub kind: &'static str,
    /// Resource name in URLs.
    pub plural: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
}

impl Kind {
    /// `apiVersion` as written in manifests (`v1`, `apps/v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const fn k(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> Kind {
    Kind {
        group,
        version,
        kind,
        plural,
        namespaced,
    }
}

/// Every kind `deploy/` may hold, in the order they are created (and deleted in reverse).
pub const KINDS: &[Kind] = &[
    k("", "v1", "Namespace", "namespaces", false),
    k(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        false,
    ),
    k("", "v1", "ServiceAccount", "serviceaccounts", true),
    k(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    k(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    k("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
    k(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
    ),
    k("", "v1", "ConfigMap", "configmaps", true),
    k("", "v1", "Secret", "secrets", true),
    // cert-manager (deploy/overlays/cert-manager): the Issuers before the Certificates they sign.
    k("cert-manager.io", "v1", "Issuer", "issuers", true),
    k("cert-manager.io", "v1", "Certificate", "certificates", true),
    k("", "v1", "Service", "services", true),
    k(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    k("apps", "v1", "DaemonSet", "daemonsets", true),
    k("apps", "v1", "Deployment", "deployments", true),
    k(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
    ),
    // KEDA's, made by the installer where KEDA runs ([`crate::certificates`]).
    k(
        "keda.sh",
        "v1alpha1",
        "ClusterTriggerAuthentication",
        "clustertriggerauthentications",
        false,
    ),
];

/// Whether `kind` is defined by a CustomResourceDefinition (cert-manager's, KEDA's) rather than
/// by Kubernetes itself: Kubernetes' schemas do not know it, and a cluster may not have it.
pub fn is_custom(kind: &Kind) -> bool {
    matches!(kind.group, "cert-manager.io" | "keda.sh")
}

/// The kind of an object's `apiVersion` and `kind`, if it is in [`KINDS`].
pub fn lookup(api_version: &str, kind: &str) -> Option<(usize, &'static Kind)> {
    KINDS
        .iter()
        .enumerate()
        .find(|(_, k)| k.kind == kind && k.api_version() == api_version)
}

/// The list of accepted kinds, for error messages.
pub fn accepted() -> String {
    KINDS
        .iter()
        .map(|k| format!("{} {}", k.api_version(), k.kind))
        .collect::<Vec<_>>()
        .join(", ")
}
