//! The rules a security reviewer applies to gpuscale's manifests, as code: the installer
//! refuses to apply a render that breaks one, and the tests run them on every overlay.
//!
//! Also the shape of the example ScaledObjects (`deploy/examples/`), whose gpuscale trigger
//! metadata the tests then hand to the collector's own parser.
//!
//! Pure functions over rendered objects: no I/O.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::render::{containers, describe, str_at};

/// Capabilities a container may add: the agent's eBPF needs (and `SYS_RESOURCE` for kernels
/// 5.8–5.10, in the `old-kernel` overlay).
pub const ALLOWED_CAPABILITIES: [&str; 3] = ["BPF", "PERFMON", "SYS_RESOURCE"];

/// Verbs a ClusterRole or Role may grant: read-only.
pub const ALLOWED_VERBS: [&str; 3] = ["get", "list", "watch"];

/// Host paths a pod may mount, and whether the mount may be writable.
pub const ALLOWED_HOST_PATHS: [(&str, bool); 4] = [
    ("/var/run/gpuscale", true),
    ("/sys/fs/cgroup", false),
    ("/sys/fs/cgroup/unified", false),
    ("/sys/kernel/tracing", false),
];

/// Every rule broken by `objects`, one line each naming the object and the container; empty
/// when all pass.
pub fn violations(objects: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let bound_accounts = bound_service_accounts(objects);
    for obj in objects {
        let what = describe(obj);
        match str_at(obj, &["kind"]).unwrap_or_default() {
            "ClusterRole" | "Role" => rbac_rules(obj, &what, &mut out),
            "Deployment" => {
                let replicas = obj["spec"]["replicas"].as_u64().unwrap_or(1);
                if replicas < 2 {
                    out.push(format!(
                        "{what}: replicas {replicas} < 2 (one collector down would leave KEDA without answers)"
                    ));
                }
                if !has_pdb(objects, obj) {
                    out.push(format!("{what}: no PodDisruptionBudget selects its pods"));
                }
            }
            _ => {}
        }
        if obj["spec"].get("template").is_some() {
            pod_rules(obj, &what, &bound_accounts, &mut out);
        }
    }
    out
}

/// [`violations`] as a result.
pub fn check(objects: &[Value]) -> crate::Result<()> {
    let v = violations(objects);
    if v.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::Checks(v))
    }
}

fn rbac_rules(obj: &Value, what: &str, out: &mut Vec<String>) {
    let rules = obj["rules"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for (i, rule) in rules.iter().enumerate() {
        for field in [
            "apiGroups",
            "resources",
            "verbs",
            "resourceNames",
            "nonResourceURLs",
        ] {
            let values = rule[field].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if values
                .iter()
                .any(|v| v.as_str().is_some_and(|s| s.contains('*')))
            {
                out.push(format!("{what}: rules[{i}].{field} has a wildcard"));
            }
        }
        for verb in rule["verbs"].as_array().into_iter().flatten() {
            let verb = verb.as_str().unwrap_or_default();
            if !ALLOWED_VERBS.contains(&verb) {
                out.push(format!(
                    "{what}: rules[{i}] grants {verb:?}; only {} are allowed",
                    ALLOWED_VERBS.join(", ")
                ));
            }
        }
        let resources = rule["resources"].as_array().into_iter().flatten();
        if resources.filter_map(Value::as_str).any(|r| r == "secrets") {
            out.push(format!("{what}: rules[{i}] reads secrets"));
        }
    }
}

fn bound_service_accounts(objects: &[Value]) -> Vec<(String, String)> {
    objects
        .iter()
        .filter(|o| str_at(o, &["kind"]).is_some_and(|k| k.ends_with("RoleBinding")))
        .flat_map(|o| o["subjects"].as_array().into_iter().flatten())
        .filter(|s| s["kind"] == "ServiceAccount")
        .map(|s| {
            let field = |f: &str| s[f].as_str().unwrap_or_default().to_owned();
            (field("namespace"), field("name"))
        })
        .collect()
}

fn has_pdb(objects: &[Value], workload: &Value) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    objects.iter().any(|o| {
        o["kind"] == "PodDisruptionBudget"
            && o["metadata"]["namespace"] == workload["metadata"]["namespace"]
            && o["spec"]["selector"]["matchLabels"]
                .as_object()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[k] == v))
    })
}

fn pod_rules(obj: &Value, what: &str, bound: &[(String, String)], out: &mut Vec<String>) {
    let pod = &obj["spec"]["template"]["spec"];
    for field in ["hostNetwork", "hostIPC"] {
        if pod[field] == true {
            out.push(format!("{what}: {field} is on"));
        }
    }
    if pod["hostPID"] == true && obj["kind"] != "DaemonSet" {
        out.push(format!("{what}: hostPID outside the node agent DaemonSet"));
    }
    let ns = str_at(obj, &["metadata", "namespace"]).unwrap_or_default();
    let sa = str_at(pod, &["serviceAccountName"]).unwrap_or("default");
    let has_api_access = bound.iter().any(|(n, s)| n == ns && s == sa);
    if !has_api_access && pod["automountServiceAccountToken"] != false {
        out.push(format!(
            "{what}: service account {sa:?} has no RBAC binding, so its token should not be \
             mounted (automountServiceAccountToken: false)"
        ));
    }
    let pod_seccomp = str_at(pod, &["securityContext", "seccompProfile", "type"]);

    let mut host_volumes = BTreeMap::new();
    for v in pod["volumes"].as_array().into_iter().flatten() {
        if let (Some(name), Some(path)) = (str_at(v, &["name"]), str_at(v, &["hostPath", "path"])) {
            match ALLOWED_HOST_PATHS.iter().find(|(p, _)| *p == path) {
                None => out.push(format!("{what}: hostPath {path} is not one gpuscale needs")),
                Some((_, writable)) => {
                    host_volumes.insert(name.to_owned(), (path.to_owned(), *writable));
                }
            }
        }
    }

    for c in containers(obj) {
        let name = str_at(c, &["name"]).unwrap_or("?");
        let at = format!("{what} container {name}");
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            out.push(format!("{at}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!("{at}: allowPrivilegeEscalation is not false"));
        }
        if sc["readOnlyRootFilesystem"] != true {
            out.push(format!("{at}: readOnlyRootFilesystem is not true"));
        }
        let drops = sc["capabilities"]["drop"].as_array();
        if !drops.is_some_and(|d| d.iter().any(|c| c == "ALL")) {
            out.push(format!("{at}: capabilities.drop does not hold ALL"));
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            let cap = cap.as_str().unwrap_or_default();
            if !ALLOWED_CAPABILITIES.contains(&cap) {
                out.push(format!(
                    "{at}: adds capability {cap}; only {} are needed",
                    ALLOWED_CAPABILITIES.join(", ")
                ));
            }
        }
        let seccomp = str_at(sc, &["seccompProfile", "type"]).or(pod_seccomp);
        if seccomp != Some("RuntimeDefault") {
            out.push(format!("{at}: seccompProfile is not RuntimeDefault"));
        }
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                if c["resources"][kind][res].is_null() {
                    out.push(format!("{at}: no {kind}.{res}"));
                }
            }
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            if c[probe].is_null() {
                out.push(format!("{at}: no {probe}"));
            }
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vol = str_at(m, &["name"]).unwrap_or_default();
            if let Some((path, writable)) = host_volumes.get(vol) {
                if !writable && m["readOnly"] != true {
                    out.push(format!("{at}: host path {path} is mounted writable"));
                }
            }
        }
    }
}

/// KEDA's `ScaledObject.spec` fields (keda.sh/v1alpha1), to catch a misspelt key in the
/// examples.
const SCALED_OBJECT_SPEC_KEYS: [&str; 10] = [
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
];

/// KEDA's trigger fields.
const TRIGGER_KEYS: [&str; 6] = [
    "type",
    "metadata",
    "name",
    "metricType",
    "authenticationRef",
    "useCachedMetrics",
];

/// Checks the shape of a KEDA `ScaledObject` and returns the metadata of its gpuscale
/// triggers (`external` or `external-push` pointing at the collector), each as KEDA hands it
/// over in `scalerMetadata`: every value a string.
pub fn gpuscale_triggers(obj: &Value) -> Result<Vec<BTreeMap<String, String>>, String> {
    let what = describe(obj);
    if obj["apiVersion"] != "keda.sh/v1alpha1" || obj["kind"] != "ScaledObject" {
        return Err(format!("{what}: not a keda.sh/v1alpha1 ScaledObject"));
    }
    let spec = obj["spec"]
        .as_object()
        .ok_or_else(|| format!("{what}: no spec"))?;
    if let Some(k) = spec
        .keys()
        .find(|k| !SCALED_OBJECT_SPEC_KEYS.contains(&k.as_str()))
    {
        return Err(format!("{what}: spec.{k} is not a ScaledObject field"));
    }
    if str_at(obj, &["spec", "scaleTargetRef", "name"]).is_none() {
        return Err(format!("{what}: spec.scaleTargetRef.name is required"));
    }
    let triggers = spec["triggers"]
        .as_array()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{what}: spec.triggers is empty"))?;
    if spec.contains_key("fallback")
        && triggers.iter().any(|t| {
            t["metricType"]
                .as_str()
                .is_some_and(|m| m != "AverageValue")
        })
    {
        return Err(format!(
            "{what}: KEDA's fallback works only with metricType AverageValue"
        ));
    }
    let mut out = Vec::new();
    for (i, t) in triggers.iter().enumerate() {
        let t = t
            .as_object()
            .ok_or_else(|| format!("{what}: triggers[{i}] is not a mapping"))?;
        if let Some(k) = t.keys().find(|k| !TRIGGER_KEYS.contains(&k.as_str())) {
            return Err(format!("{what}: triggers[{i}].{k} is not a trigger field"));
        }
        let meta = t
            .get("metadata")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{what}: triggers[{i}] has no metadata"))?;
        let mut strings = BTreeMap::new();
        for (k, v) in meta {
            let s = v.as_str().ok_or_else(|| {
                format!("{what}: triggers[{i}].metadata.{k} must be a string (quote it: \"{v}\")")
            })?;
            strings.insert(k.clone(), s.to_owned());
        }
        let ty = t.get("type").and_then(Value::as_str).unwrap_or_default();
        if ty != "external" && ty != "external-push" {
            continue;
        }
        let addr = strings
            .get("scalerAddress")
            .ok_or_else(|| format!("{what}: triggers[{i}] ({ty}) has no scalerAddress"))?;
        if !addr.starts_with("gpuscale-collector.") || !addr.ends_with(":7700") {
            return Err(format!(
                "{what}: triggers[{i}].metadata.scalerAddress {addr:?} is not the collector's \
                 Service (gpuscale-collector.<namespace>.svc.cluster.local:7700)"
            ));
        }
        out.push(strings);
    }
    if out.is_empty() {
        return Err(format!(
            "{what}: no gpuscale (external/external-push) trigger"
        ));
    }
    Ok(out)
}
