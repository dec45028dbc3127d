//! The manifests in `deploy/`, rendered as `cargo xtask deploy` renders them: Kubernetes'
//! own schemas (strict, 1.29 and 1.33, through kubernetes-validate), the least-privilege rules,
//! agreement with `kubectl kustomize`, the overlays, and the example ScaledObjects read by the
//! collector's own trigger parser. Also the installer's behaviour without a cluster.
//!
//! kubernetes-validate comes from `cargo xtask test`'s set-up (a venv in
//! `target/kubernetes-validate-venv`); without it the schema test prints why it skips, and fails
//! when `CI` is set (CI runs the set-up, so a missing tool there is a bug).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gpuscale_deploy::{certificates, checks, kinds, render, snippet};
use serde_json::Value;

const PINNED: &str =
    "127.0.0.1:5000/gpuscale@sha256:4626c14cf2bc304e9e7fe72a0ca62b91559f6fc41be7bcfa641bd0b0cb9eea05";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A fresh directory, removed when the test is done with it.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("gpuscale-manifests-{name}-"))
        .tempdir()
        .unwrap()
}

/// Skips (printing why) or, under CI, fails.
fn skip_or_fail(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; CI runs `cargo xtask test`, whose set-up should provide it");
    }
    eprintln!("skipped: {test}: {why}");
}

/// Every kustomization under deploy/: the base and each overlay.
fn kustomizations() -> Vec<(String, PathBuf)> {
    let mut out = vec![("base".to_owned(), root().join("deploy/base"))];
    let mut overlays: Vec<_> = std::fs::read_dir(root().join("deploy/overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    overlays.sort();
    for o in overlays {
        out.push((o.file_name().unwrap().to_string_lossy().into_owned(), o));
    }
    assert!(
        out.len() >= 4,
        "expected the base and the old-kernel, cdi and cert-manager overlays"
    );
    out
}

fn rendered(dir: &Path, namespace: Option<&str>) -> Vec<Value> {
    render::render(
        dir,
        &render::Options {
            namespace: namespace.map(str::to_owned),
            image: Some(PINNED.to_owned()),
            keda_namespace: None,
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn kubernetes_validate() -> Option<PathBuf> {
    let venv = target_dir().join("kubernetes-validate-venv/bin/kubernetes-validate");
    if venv.is_file() {
        return Some(venv);
    }
    Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("kubernetes-validate"))
}

/// Runs kubernetes-validate strictly for `version` on `file`; returns (success, output).
fn validate(exe: &Path, version: &str, file: &Path) -> (bool, String) {
    let out = Command::new(exe)
        .args(["--strict", "-k", version])
        .arg(file)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_overlay_passes_the_kubernetes_schemas_strictly_for_1_29_and_1_33() {
    let test = "every_overlay_passes_the_kubernetes_schemas_strictly_for_1_29_and_1_33";
    let Some(exe) = kubernetes_validate() else {
        skip_or_fail(
            test,
            "kubernetes-validate is not installed (cargo xtask test installs it into target/kubernetes-validate-venv)",
        );
        return;
    };
    let tmp = scratch("schemas");
    let dir = tmp.path();
    for (name, path) in kustomizations() {
        for ns in [None, Some("gpu-ops")] {
            // cert-manager's kinds have no Kubernetes schema; everything else must pass.
            let (objects, custom): (Vec<Value>, Vec<Value>) =
                rendered(&path, ns).into_iter().partition(|o| {
                    let (_, kind) = kinds::lookup(
                        o["apiVersion"].as_str().unwrap(),
                        o["kind"].as_str().unwrap(),
                    )
                    .unwrap();
                    !kinds::is_custom(kind)
                });
            assert!(
                custom.is_empty() || name == "cert-manager",
                "{name}: custom kinds outside the cert-manager overlay: {custom:?}"
            );
            let file = dir.join(format!("{name}-{}.yaml", ns.unwrap_or("default")));
            std::fs::write(&file, render::to_yaml(&objects).unwrap()).unwrap();
            for version in ["1.29.0", "1.33.0"] {
                let (ok, text) = validate(&exe, version, &file);
                assert!(
                    ok,
                    "{name} (namespace {ns:?}) fails Kubernetes {version}:\n{text}"
                );
                let short = &version[..4];
                let passed = text
                    .lines()
                    .filter(|l| l.contains("passed for resource") && l.contains(short))
                    .count();
                assert_eq!(
                    passed,
                    objects.len(),
                    "every object must be checked against a schema (none unknown):\n{text}"
                );
            }
        }
    }

    // The validator is strict: a misspelt field in the DaemonSet fails it.
    let mut objects = rendered(&root().join("deploy/base"), None);
    let ds = objects
        .iter_mut()
        .find(|o| o["kind"] == "DaemonSet")
        .unwrap();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContex"] = serde_json::json!({});
    let file = dir.join("broken.yaml");
    std::fs::write(&file, render::to_yaml(&objects).unwrap()).unwrap();
    let (ok, text) = validate(&exe, "1.33.0", &file);
    assert!(
        !ok && text.contains("securityContex"),
        "a bad field must fail:\n{text}"
    );
}

#[test]
fn every_overlay_passes_the_least_privilege_rules() {
    for (name, path) in kustomizations() {
        for ns in [None, Some("gpu-ops")] {
            let v = checks::violations(&rendered(&path, ns));
            assert!(v.is_empty(), "{name}: {v:#?}");
        }
    }
}

#[test]
fn the_rules_catch_what_a_security_reviewer_would_reject() {
    let base = rendered(&root().join("deploy/base"), None);
    let broken = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut o = base.clone();
        f(&mut o);
        checks::violations(&o).join("\n")
    };
    let agent =
        |o: &mut Vec<Value>| -> usize { o.iter().position(|x| x["kind"] == "DaemonSet").unwrap() };
    type Breakage = Box<dyn Fn(&mut Vec<Value>)>;
    let cases: Vec<(&str, Breakage)> = vec![
        (
            "privileged",
            Box::new(move |o| {
                let i = agent(o);
                o[i]["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                    ["privileged"] = true.into();
            }),
        ),
        (
            "wildcard",
            Box::new(|o| {
                let r = o.iter_mut().find(|x| x["kind"] == "ClusterRole").unwrap();
                r["rules"][0]["verbs"] = serde_json::json!(["*"]);
            }),
        ),
        (
            "\"create\"",
            Box::new(|o| {
                let r = o.iter_mut().find(|x| x["kind"] == "ClusterRole").unwrap();
                r["rules"][0]["verbs"] = serde_json::json!(["get", "create"]);
            }),
        ),
        (
            "no limits.memory",
            Box::new(|o| {
                let d = o.iter_mut().find(|x| x["kind"] == "Deployment").unwrap();
                d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                    .as_object_mut()
                    .unwrap()
                    .remove("memory");
            }),
        ),
        (
            "no readinessProbe",
            Box::new(move |o| {
                let i = agent(o);
                o[i]["spec"]["template"]["spec"]["containers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("readinessProbe");
            }),
        ),
        (
            "replicas 1",
            Box::new(|o| {
                let d = o.iter_mut().find(|x| x["kind"] == "Deployment").unwrap();
                d["spec"]["replicas"] = 1.into();
            }),
        ),
        (
            "SYS_ADMIN",
            Box::new(move |o| {
                let i = agent(o);
                o[i]["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                    ["capabilities"]["add"] = serde_json::json!(["BPF", "SYS_ADMIN"]);
            }),
        ),
        (
            "mounted writable",
            Box::new(move |o| {
                let i = agent(o);
                for m in o[i]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                    .as_array_mut()
                    .unwrap()
                {
                    m.as_object_mut().unwrap().remove("readOnly");
                }
            }),
        ),
        (
            "automountServiceAccountToken",
            Box::new(move |o| {
                let i = agent(o);
                o[i]["spec"]["template"]["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("automountServiceAccountToken");
            }),
        ),
        (
            "no PodDisruptionBudget",
            Box::new(|o| o.retain(|x| x["kind"] != "PodDisruptionBudget")),
        ),
    ];
    for (expect, f) in cases {
        let v = broken(&*f);
        assert!(
            v.contains(expect),
            "breaking {expect:?} must be caught; got:\n{v}"
        );
    }
}

#[test]
fn the_collector_has_two_replicas_and_read_only_rbac_and_the_agent_no_api_access() {
    let o = rendered(&root().join("deploy/base"), None);
    let dep = find(&o, "Deployment", "gpuscale-collector");
    assert!(dep["spec"]["replicas"].as_u64().unwrap() >= 2);
    let role = find(&o, "ClusterRole", "gpuscale-collector");
    let mut granted: Vec<String> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    granted.push(format!(
                        "{}/{}:{}",
                        g.as_str().unwrap(),
                        res.as_str().unwrap(),
                        v.as_str().unwrap()
                    ));
                }
            }
        }
    }
    granted.sort();
    let mut want: Vec<String> = Vec::new();
    for (g, res, verbs) in [
        ("", "pods", &["get", "list", "watch"][..]),
        (
            "discovery.k8s.io",
            "endpointslices",
            &["get", "list", "watch"],
        ),
        ("keda.sh", "scaledobjects", &["get", "list", "watch"]),
        ("apps", "deployments", &["get", "list", "watch"]),
        ("apps", "statefulsets", &["get", "list", "watch"]),
        ("apps", "replicasets", &["get", "list", "watch"]),
        ("apps", "deployments/scale", &["get"]),
        ("apps", "statefulsets/scale", &["get"]),
        ("apps", "replicasets/scale", &["get"]),
    ] {
        for v in verbs {
            want.push(format!("{g}/{res}:{v}"));
        }
    }
    want.sort();
    assert_eq!(
        granted, want,
        "the collector's RBAC is exactly the documented minimum"
    );

    let ds = find(&o, "DaemonSet", "gpuscale-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["runtimeClassName"], "nvidia");
    let caps = &pod["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(caps["add"], serde_json::json!(["BPF", "PERFMON"]));
    // Pinned to the digest, in both workloads.
    for w in [ds, dep] {
        assert_eq!(
            w["spec"]["template"]["spec"]["containers"][0]["image"],
            PINNED
        );
    }
}

#[test]
fn the_overlays_change_only_what_they_are_for() {
    let base = rendered(&root().join("deploy/base"), None);
    let old = rendered(&root().join("deploy/overlays/old-kernel"), None);
    let cdi = rendered(&root().join("deploy/overlays/cdi"), None);
    let ds = |o: &[Value]| find(o, "DaemonSet", "gpuscale-agent").clone();
    let caps = |o: &[Value]| {
        ds(o)["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .clone()
    };
    assert_eq!(
        caps(&old),
        serde_json::json!(["BPF", "PERFMON", "SYS_RESOURCE"])
    );
    assert!(ds(&cdi)["spec"]["template"]["spec"]
        .get("runtimeClassName")
        .is_none());
    assert_eq!(
        ds(&cdi)["spec"]["template"]["metadata"]["annotations"]["cdi.k8s.io/gpuscale-agent"],
        "nvidia.com/gpu=all"
    );
    for overlay in [&old, &cdi] {
        let others = |o: &[Value]| -> Vec<Value> {
            o.iter()
                .filter(|x| x["kind"] != "DaemonSet")
                .cloned()
                .collect()
        };
        assert_eq!(others(overlay), others(&base));
    }
    // cert-manager: only its own objects are added; the workloads mount the same Secrets.
    let cm = rendered(&root().join("deploy/overlays/cert-manager"), None);
    let not_cert_manager = |o: &[Value]| -> Vec<Value> {
        o.iter()
            .filter(|x| {
                !x["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("cert-manager.io/")
            })
            .cloned()
            .collect()
    };
    assert_eq!(not_cert_manager(&cm), base);
    assert_eq!(cm.len() - base.len(), 5, "2 Issuers and 3 Certificates");
}

/// The args of the first container of `kind` `name`.
fn args_of(o: &[Value], kind: &str, name: &str) -> Vec<String> {
    find(o, kind, name)["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
}

/// The Secret mounted at the folder of `path` in the first container of `workload`.
fn secret_at(workload: &Value, path: &str) -> String {
    let spec = &workload["spec"]["template"]["spec"];
    let folder = Path::new(path).parent().unwrap().to_str().unwrap();
    let mount = spec["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == folder)
        .unwrap_or_else(|| panic!("nothing is mounted at {folder} for {path}"));
    assert_eq!(mount["readOnly"], true, "{mount}");
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    // Keys readable by the owner (and the group), by nobody else, writable by nobody. (A YAML
    // `0400` is octal to kubectl's YAML 1.1 but decimal 400 = 0o620 to a YAML 1.2 reader.)
    let mode = volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644);
    assert_eq!(
        mode & 0o227,
        0,
        "{folder}: defaultMode {mode:#o} in {volume}"
    );
    volume["secret"]["secretName"]
        .as_str()
        .unwrap_or_else(|| panic!("{folder} is not a Secret volume: {volume}"))
        .to_owned()
}

#[test]
fn every_port_is_tls_with_files_from_the_secrets_the_installer_or_cert_manager_makes() {
    for (name, path) in kustomizations() {
        for ns in ["gpuscale-system", "gpu-ops"] {
            let o = rendered(&path, Some(ns));
            let what = format!("{name} in {ns}");
            let collector = find(&o, "Deployment", "gpuscale-collector");
            let agent = find(&o, "DaemonSet", "gpuscale-agent");
            let c = args_of(&o, "Deployment", "gpuscale-collector");
            let a = args_of(&o, "DaemonSet", "gpuscale-agent");
            for (workload, args, secret, flags) in [
                (
                    collector,
                    &c,
                    certificates::COLLECTOR_SECRET,
                    &[
                        "--tls-cert",
                        "--tls-key",
                        "--tls-client-ca",
                        "--agent-ca",
                        "--agent-client-cert",
                        "--agent-client-key",
                    ][..],
                ),
                (
                    agent,
                    &a,
                    certificates::AGENT_SECRET,
                    &["--tls-cert", "--tls-key", "--tls-client-ca"][..],
                ),
            ] {
                for f in flags {
                    let file = flag(args, f).unwrap_or_else(|| panic!("{what}: no {f}: {args:?}"));
                    assert_eq!(secret_at(workload, file), secret, "{what}: {f}={file}");
                    let key = Path::new(file).file_name().unwrap().to_str().unwrap();
                    assert!(
                        ["tls.crt", "tls.key", "ca.crt"].contains(&key),
                        "{what}: {f} reads {key}, which a kubernetes.io/tls Secret does not hold"
                    );
                }
                // The kubelet's probes speak TLS to the TLS port.
                let container = &workload["spec"]["template"]["spec"]["containers"][0];
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert_eq!(
                        container[probe]["httpGet"]["scheme"], "HTTPS",
                        "{what}: {probe}"
                    );
                }
            }
            // The agents' shared name, as the collector expands it, is the name issued.
            let wanted = flag(&c, "--agent-tls-server-name")
                .unwrap()
                .replace("$(POD_NAMESPACE)", ns);
            assert_eq!(wanted, certificates::agent_name(ns), "{what}");
            // The collector (uid 65532) can read its 0440 Secret files.
            let pod = &collector["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"],
                "{what}"
            );
            // `kubectl exec … dump` in the collector's container finds its certificates.
            let env = pod["containers"][0]["env"].as_array().unwrap();
            for var in [
                "GPUSCALE_COLLECTOR_CA",
                "GPUSCALE_COLLECTOR_CLIENT_CERT",
                "GPUSCALE_COLLECTOR_CLIENT_KEY",
            ] {
                let value = env
                    .iter()
                    .find(|e| e["name"] == var)
                    .and_then(|e| e["value"].as_str())
                    .unwrap_or_else(|| panic!("{what}: no {var}"));
                assert_eq!(secret_at(collector, value), certificates::COLLECTOR_SECRET);
            }

            // cert-manager issues exactly the names the installer would, in this namespace.
            if name == "cert-manager" {
                for (cert, secret, names) in [
                    (
                        "gpuscale-collector",
                        certificates::COLLECTOR_SECRET,
                        certificates::collector_names(ns),
                    ),
                    (
                        "gpuscale-agent",
                        certificates::AGENT_SECRET,
                        vec![certificates::agent_name(ns)],
                    ),
                ] {
                    let spec = &find(&o, "Certificate", cert)["spec"];
                    assert_eq!(spec["secretName"], secret, "{what}");
                    let mut got: Vec<String> = ["dnsNames", "ipAddresses"]
                        .iter()
                        .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default())
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect();
                    let mut want = names.clone();
                    got.sort();
                    want.sort();
                    assert_eq!(got, want, "{what}: Certificate {cert}");
                    let usages = spec["usages"].as_array().unwrap();
                    for u in ["server auth", "client auth"] {
                        assert!(usages.iter().any(|x| x == u), "{what}: {cert} lacks {u}");
                    }
                }
                assert_eq!(
                    find(&o, "Certificate", "gpuscale-ca")["spec"]["secretName"],
                    certificates::CA_SECRET
                );
            }
        }
    }
}

#[test]
fn network_policies_let_only_the_collector_reach_agents_and_only_keda_reach_the_collector() {
    let o = rendered(&root().join("deploy/base"), None);
    let labels = |kind: &str, name: &str| {
        find(&o, kind, name)["spec"]["template"]["metadata"]["labels"].clone()
    };
    let only_rule = |name: &str| {
        let p = find(&o, "NetworkPolicy", name);
        assert_eq!(p["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        let rules = p["spec"]["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 1, "{name}: one rule");
        (
            p["spec"]["podSelector"]["matchLabels"].clone(),
            rules[0].clone(),
        )
    };
    let subset = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };

    let (selects, rule) = only_rule("gpuscale-agent");
    assert!(subset(&selects, &labels("DaemonSet", "gpuscale-agent")));
    let from = rule["from"].as_array().unwrap();
    assert_eq!(from.len(), 1);
    assert!(
        from[0].get("namespaceSelector").is_none(),
        "same namespace only"
    );
    assert!(subset(
        &from[0]["podSelector"]["matchLabels"],
        &labels("Deployment", "gpuscale-collector")
    ));
    assert!(!subset(
        &from[0]["podSelector"]["matchLabels"],
        &labels("DaemonSet", "gpuscale-agent")
    ));
    assert_eq!(
        rule["ports"],
        serde_json::json!([{"port": "grpc", "protocol": "TCP"}])
    );

    let (selects, rule) = only_rule("gpuscale-collector");
    assert!(subset(
        &selects,
        &labels("Deployment", "gpuscale-collector")
    ));
    let keda_only = |objects: &[Value]| {
        find(objects, "NetworkPolicy", "gpuscale-collector")["spec"]["ingress"][0]["from"].clone()
    };
    assert_eq!(
        keda_only(&o),
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}])
    );
    assert_eq!(
        rule["ports"],
        serde_json::json!([{"port": "grpc", "protocol": "TCP"}])
    );
    // Both named ports exist on the containers the policies select.
    for (kind, name) in [
        ("DaemonSet", "gpuscale-agent"),
        ("Deployment", "gpuscale-collector"),
    ] {
        let ports = &find(&o, kind, name)["spec"]["template"]["spec"]["containers"][0]["ports"];
        assert!(ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "grpc"));
    }

    // --keda-namespace moves the one namespace let in.
    let moved = render::render(
        &root().join("deploy/base"),
        &render::Options {
            keda_namespace: Some("autoscaling".into()),
            ..render::Options::default()
        },
    )
    .unwrap();
    assert_eq!(
        keda_only(&moved)[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "autoscaling"
    );
    let bad = render::render(
        &root().join("deploy/base"),
        &render::Options {
            keda_namespace: Some("Not_A_Namespace".into()),
            ..render::Options::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("--keda-namespace") && bad.contains("Not_A_Namespace"),
        "{bad}"
    );
}

#[test]
fn a_namespace_override_leaves_no_trace_of_the_default_namespace() {
    for (name, path) in kustomizations() {
        let yaml = render::to_yaml(&rendered(&path, Some("gpu-ops"))).unwrap();
        assert!(!yaml.contains("gpuscale-system"), "{name}:\n{yaml}");
    }
    let o = rendered(&root().join("deploy/base"), Some("gpu-ops"));
    assert_eq!(find(&o, "Namespace", "gpu-ops")["kind"], "Namespace");
    let crb = find(&o, "ClusterRoleBinding", "gpuscale-collector");
    assert_eq!(crb["subjects"][0]["namespace"], "gpu-ops");
    // The collector finds the agents through its own namespace, whatever it is.
    let args = &find(&o, "Deployment", "gpuscale-collector")["spec"]["template"]["spec"]
        ["containers"][0]["args"];
    assert!(args
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--agent-service=$(POD_NAMESPACE)/gpuscale-agent"));
}

fn kustomize_with_kubectl(dir: &Path) -> Option<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(render::parse_objects(&String::from_utf8_lossy(&out.stdout), dir).unwrap())
}

#[test]
fn the_renderer_agrees_with_kubectl_kustomize() {
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    for (name, path) in kustomizations() {
        let Some(mut theirs) = kustomize_with_kubectl(&path) else {
            eprintln!(
                "skipped: the_renderer_agrees_with_kubectl_kustomize: kubectl is not installed"
            );
            return;
        };
        let mut ours = render::render(&path, &render::Options::default()).unwrap();
        theirs.sort_by_key(key);
        ours.sort_by_key(key);
        assert_eq!(
            ours, theirs,
            "{name}: gpuscale-deploy and kubectl kustomize disagree"
        );
    }
}

/// The gpuscale triggers of a ScaledObject, parsed by the collector as KEDA would hand them over.
fn parse_with_the_collector(obj: &Value) -> Vec<collector::model::trigger::Trigger> {
    checks::gpuscale_triggers(obj)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|meta| {
            let map: HashMap<String, String> = meta.into_iter().collect();
            collector::model::trigger::Trigger::parse(&map)
                .unwrap_or_else(|e| panic!("{}: {e}", render::describe(obj)))
        })
        .collect()
}

#[test]
fn the_examples_parse_and_every_gpuscale_trigger_names_a_real_metric() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "vLLM, VRAM and wake-from-zero examples: {files:?}"
    );
    let mut metrics = Vec::new();
    let mut push = false;
    let mut fallback = false;
    let mut other_trigger = false;
    for f in &files {
        let docs = render::parse_documents(&std::fs::read_to_string(f).unwrap(), f).unwrap();
        assert!(!docs.is_empty(), "{}", f.display());
        for obj in docs {
            for t in parse_with_the_collector(&obj) {
                assert!(collector::model::trigger::Metric::ALL.contains(&t.metric));
                metrics.push(t.metric.name());
            }
            let triggers = obj["spec"]["triggers"].as_array().unwrap();
            // Each speaks mutual TLS to the collector, as the default install requires.
            for t in triggers
                .iter()
                .filter(|t| t["metadata"]["scalerAddress"].is_string())
            {
                assert_eq!(t["metadata"]["enableTLS"], "true", "{}", f.display());
                assert_eq!(
                    t["authenticationRef"],
                    serde_json::json!({"name": certificates::TRIGGER_AUTHENTICATION, "kind": "ClusterTriggerAuthentication"}),
                    "{}",
                    f.display()
                );
            }
            push |= triggers.iter().any(|t| t["type"] == "external-push");
            other_trigger |= triggers
                .iter()
                .any(|t| t["type"] != "external" && t["type"] != "external-push");
            fallback |= obj["spec"].get("fallback").is_some();
        }
    }
    assert!(metrics.contains(&"sm_active"), "{metrics:?}");
    assert!(
        metrics.iter().any(|m| m.starts_with("vram_")),
        "{metrics:?}"
    );
    assert!(
        push && fallback && other_trigger,
        "external-push, fallback and a request-rate trigger are shown"
    );
}

#[test]
fn an_example_with_a_misspelt_key_or_unknown_metric_is_caught() {
    let text = std::fs::read_to_string(root().join("deploy/examples/vllm-sm-active.yaml")).unwrap();
    let bad_metric = text.replace("metric: sm_active", "metric: sm_activity");
    let obj = &render::parse_documents(&bad_metric, Path::new("x")).unwrap()[0];
    let meta: HashMap<String, String> = checks::gpuscale_triggers(obj).unwrap()[0]
        .clone()
        .into_iter()
        .collect();
    let e = collector::model::trigger::Trigger::parse(&meta)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sm_activity"), "{e}");
    let bad_key = text.replace("minReplicaCount", "minReplicas");
    let obj = &render::parse_documents(&bad_key, Path::new("x")).unwrap()[0];
    assert!(checks::gpuscale_triggers(obj)
        .unwrap_err()
        .contains("minReplicas"));
    let unquoted = text.replace("targetValue: \"70\"", "targetValue: 70");
    let obj = &render::parse_documents(&unquoted, Path::new("x")).unwrap()[0];
    assert!(checks::gpuscale_triggers(obj)
        .unwrap_err()
        .contains("must be a string"));
}

#[test]
fn the_snippet_printed_after_deploy_parses_and_points_at_the_installed_collector() {
    for ns in ["gpuscale-system", "gpu-ops"] {
        let text = snippet::scaled_object(ns);
        let obj = &render::parse_documents(&text, Path::new("snippet")).unwrap()[0];
        let t = parse_with_the_collector(obj);
        assert_eq!(t[0].metric.name(), "sm_active");
        let meta = &checks::gpuscale_triggers(obj).unwrap()[0];
        let addr = &meta["scalerAddress"];
        assert_eq!(
            addr,
            &format!("gpuscale-collector.{ns}.svc.cluster.local:7700")
        );
        // Over mutual TLS: KEDA checks the host against the collector's certificate, and takes
        // its own certificate from the ClusterTriggerAuthentication the install makes.
        assert_eq!(meta["enableTLS"], "true");
        let host = addr.rsplit_once(':').unwrap().0;
        assert!(certificates::collector_names(ns).iter().any(|n| n == host));
        let auth = &obj["spec"]["triggers"][0]["authenticationRef"];
        assert_eq!(auth["kind"], "ClusterTriggerAuthentication");
        assert_eq!(auth["name"], certificates::TRIGGER_AUTHENTICATION);
    }
    // The same address the collector's headless Service answers on.
    let o = rendered(&root().join("deploy/base"), None);
    let svc = find(&o, "Service", "gpuscale-collector");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], 7700);
}

fn installer(args: &[&str], home: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpuscale-deploy"))
        .args(args)
        .env("HOME", home)
        .env("KUBECONFIG", home.join("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap()
}

#[test]
fn dry_run_prints_pinned_manifests_without_a_cluster_or_a_registry() {
    let tmp = scratch("dry-run");
    let home = tmp.path();
    let out = installer(
        &["--dry-run", "--image", PINNED, "--namespace", "gpu-ops"],
        home,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects =
        render::parse_objects(&String::from_utf8_lossy(&out.stdout), Path::new("stdout")).unwrap();
    assert_eq!(
        objects,
        rendered(&root().join("deploy/base"), Some("gpu-ops"))
    );
}

#[test]
fn without_a_kube_context_the_installer_says_so_and_what_to_do() {
    let tmp = scratch("no-context");
    let home = tmp.path();
    let out = installer(&["--image", PINNED], home);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no Kubernetes context")
            && err.contains("KUBECONFIG")
            && err.contains("--context"),
        "{err}"
    );
    let out = installer(&["--image", PINNED, "--context", "prod"], home);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"prod\"") && err.contains("get-contexts"),
        "{err}"
    );
}

#[test]
fn a_registry_that_is_not_there_is_named_with_what_to_do() {
    let tmp = scratch("no-registry");
    let home = tmp.path();
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let image = format!("127.0.0.1:{port}/gpuscale:0.1.0");
    let out = installer(&["--image", &image], home);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("registry 127.0.0.1:{port}")) && err.contains("listening"),
        "{err}"
    );
}

#[test]
fn an_unknown_overlay_lists_the_ones_there_are() {
    let tmp = scratch("overlay");
    let home = tmp.path();
    let out = installer(&["--dry-run", "--overlay", "gke"], home);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cdi") && err.contains("old-kernel"), "{err}");
}
