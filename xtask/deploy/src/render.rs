//! `deploy/` → the objects to apply: the subset of kustomize the manifests use, so that
//! `cargo xtask deploy` needs neither kubectl nor kustomize, and `kubectl apply -k` of the same
//! folder gives the same objects (a test compares the two where kubectl is installed).
//!
//! A `kustomization.yaml` may hold `resources` (YAML files, or folders with their own
//! `kustomization.yaml`), `namespace`, `images` (`name`, `newName`, `newTag`, `digest`) and
//! `patches` whose `patch` is a JSON 6902 list of operations with a `target`. Any other key, a
//! strategic-merge patch or an object of a kind outside [`crate::kinds::KINDS`] is refused with
//! a message naming the file; nothing is silently ignored.
//!
//! It must never contact a cluster or a registry: rendering is pure file reading.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::kinds;
use crate::{Error, Result};

/// What to change on top of the kustomization.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Put everything in this namespace instead of the kustomization's.
    pub namespace: Option<String>,
    /// Run this image reference (`registry/gpuscale@sha256:…`) instead of the kustomization's.
    pub image: Option<String>,
    /// KEDA runs in this namespace instead of `keda`: the only one the collector's
    /// NetworkPolicy lets in.
    pub keda_namespace: Option<String>,
}

const KUSTOMIZATION_KEYS: [&str; 6] = [
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "images",
    "patches",
];

fn manifest_err(path: &Path, why: impl Into<String>) -> Error {
    Error::Manifest {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// Renders the kustomization in `dir` (for example `deploy/base` or `deploy/overlays/cdi`),
/// then applies `options`. Objects come out in creation order ([`kinds::KINDS`]).
pub fn render(dir: &Path, options: &Options) -> Result<Vec<Value>> {
    let mut objects = kustomize(dir, 0)?;
    if let Some(ns) = &options.namespace {
        check_dns_label(ns)
            .map_err(|why| manifest_err(dir, format!("--namespace {ns:?}: {why}")))?;
        set_namespace(&mut objects, ns);
    }
    if let Some(image) = &options.image {
        set_image(&mut objects, crate::IMAGE_NAME, image);
    }
    if let Some(keda) = &options.keda_namespace {
        check_dns_label(keda)
            .map_err(|why| manifest_err(dir, format!("--keda-namespace {keda:?}: {why}")))?;
        set_keda_namespace(&mut objects, keda);
    }
    objects.sort_by_key(|o| kind_index(o).unwrap_or(usize::MAX));
    Ok(objects)
}

fn kind_index(o: &Value) -> Option<usize> {
    kinds::lookup(str_at(o, &["apiVersion"])?, str_at(o, &["kind"])?).map(|(i, _)| i)
}

/// The string at `path` inside `v`, if there is one.
pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_str()
}

fn kustomize(dir: &Path, depth: usize) -> Result<Vec<Value>> {
    if depth > 8 {
        return Err(manifest_err(
            dir,
            "kustomizations nest more than 8 deep (a cycle?)",
        ));
    }
    let file = ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            manifest_err(
                dir,
                "no kustomization.yaml here; pass a folder of deploy/ that has one (deploy/base or deploy/overlays/<name>)",
            )
        })?;
    let text = read(&file)?;
    let k: Value =
        serde_saphyr::from_str(&text).map_err(|e| manifest_err(&file, format!("not YAML: {e}")))?;
    let k = k
        .as_object()
        .ok_or_else(|| manifest_err(&file, "is not a mapping"))?;
    if let Some(key) = k
        .keys()
        .find(|key| !KUSTOMIZATION_KEYS.contains(&key.as_str()))
    {
        return Err(manifest_err(
            &file,
            format!(
                "{key:?} is a kustomize feature gpuscale-deploy does not render; use only {} \
                 (or extend xtask/deploy/src/render.rs)",
                KUSTOMIZATION_KEYS.join(", ")
            ),
        ));
    }

    let mut objects = Vec::new();
    for entry in list(k, "resources", &file)? {
        let rel = entry
            .as_str()
            .ok_or_else(|| manifest_err(&file, "resources: every entry must be a path"))?;
        let path = dir.join(rel);
        if path.is_dir() {
            objects.extend(kustomize(&path, depth + 1)?);
        } else {
            objects.extend(read_objects(&path)?);
        }
    }

    for (i, p) in list(k, "patches", &file)?.iter().enumerate() {
        apply_patch(&mut objects, p, &file, i)?;
    }
    if let Some(ns) = k.get("namespace") {
        let ns = ns
            .as_str()
            .ok_or_else(|| manifest_err(&file, "namespace must be a string"))?;
        check_dns_label(ns).map_err(|why| manifest_err(&file, format!("namespace: {why}")))?;
        set_namespace(&mut objects, ns);
    }
    for (i, img) in list(k, "images", &file)?.iter().enumerate() {
        let field = |f: &str| img.get(f).and_then(Value::as_str);
        let name = field("name")
            .ok_or_else(|| manifest_err(&file, format!("images[{i}]: name is required")))?;
        let new_name = field("newName").unwrap_or(name);
        let reference = if let Some(d) = field("digest") {
            format!("{new_name}@{d}")
        } else if let Some(t) = field("newTag") {
            format!("{new_name}:{t}")
        } else {
            new_name.to_owned()
        };
        // Keep the old tag when only newName is given, as kustomize does.
        let keep_tag = field("digest").is_none() && field("newTag").is_none();
        for obj in &mut objects {
            for c in containers_mut(obj) {
                let Some(old) = c.get("image").and_then(Value::as_str) else {
                    continue;
                };
                if image_name(old) != name {
                    continue;
                }
                let new = if keep_tag {
                    format!("{new_name}{}", &old[image_name(old).len()..])
                } else {
                    reference.clone()
                };
                c["image"] = Value::String(new);
            }
        }
    }
    Ok(objects)
}

fn list<'a>(k: &'a Map<String, Value>, key: &str, file: &Path) -> Result<&'a [Value]> {
    match k.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(manifest_err(file, format!("{key} must be a list"))),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| manifest_err(path, format!("cannot read it: {e}")))
}

/// Reads the objects of a (multi-document) YAML manifest, checking each is of a known kind
/// and has a name.
pub fn read_objects(path: &Path) -> Result<Vec<Value>> {
    parse_objects(&read(path)?, path)
}

/// The documents of a (multi-document) YAML text, empty ones left out; `path` names it in
/// errors.
pub fn parse_documents(text: &str, path: &Path) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| manifest_err(path, format!("not YAML: {e}")))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Parses the objects of a (multi-document) YAML text; `path` names it in errors.
pub fn parse_objects(text: &str, path: &Path) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, doc) in parse_documents(text, path)?.into_iter().enumerate() {
        let (Some(api), Some(kind)) = (str_at(&doc, &["apiVersion"]), str_at(&doc, &["kind"]))
        else {
            return Err(manifest_err(
                path,
                format!("document {} has no apiVersion or kind", i + 1),
            ));
        };
        if kinds::lookup(api, kind).is_none() {
            return Err(manifest_err(
                path,
                format!(
                    "document {}: {api} {kind} is not a kind the installer knows; use one of {} \
                     (or add it to KINDS in xtask/deploy/src/kinds.rs)",
                    i + 1,
                    kinds::accepted()
                ),
            ));
        }
        if str_at(&doc, &["metadata", "name"]).is_none() {
            return Err(manifest_err(
                path,
                format!("document {} ({kind}) has no metadata.name", i + 1),
            ));
        }
        out.push(doc);
    }
    Ok(out)
}

fn apply_patch(objects: &mut [Value], p: &Value, file: &Path, i: usize) -> Result<()> {
    let at = |why: String| manifest_err(file, format!("patches[{i}]: {why}"));
    if p.get("path").is_some() {
        return Err(at(
            "patches from files are not rendered; write the operations inline under `patch`".into(),
        ));
    }
    let target = p
        .get("target")
        .and_then(Value::as_object)
        .ok_or_else(|| at("needs a target (group, version, kind, name)".into()))?;
    let text = p
        .get("patch")
        .and_then(Value::as_str)
        .ok_or_else(|| at("needs an inline `patch`".into()))?;
    let ops: Value =
        serde_saphyr::from_str(text).map_err(|e| at(format!("patch is not YAML: {e}")))?;
    if !ops.is_array() {
        return Err(at(
            "only JSON 6902 patches (a list of op/path/value) are rendered, not strategic-merge ones"
                .into(),
        ));
    }
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| at(format!("not a JSON 6902 patch: {e}")))?;
    let want = |key: &str| target.get(key).and_then(Value::as_str);
    let mut matched = 0;
    for obj in objects.iter_mut() {
        let api = str_at(obj, &["apiVersion"]).unwrap_or_default();
        let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
        let ok = want("kind").is_none_or(|k| Some(k) == str_at(obj, &["kind"]))
            && want("name").is_none_or(|n| Some(n) == str_at(obj, &["metadata", "name"]))
            && want("namespace").is_none_or(|n| Some(n) == str_at(obj, &["metadata", "namespace"]))
            && want("group").is_none_or(|g| g == group)
            && want("version").is_none_or(|v| v == version);
        if ok {
            json_patch::patch(obj, &patch).map_err(|e| at(format!("does not apply: {e}")))?;
            matched += 1;
        }
    }
    if matched == 0 {
        return Err(at(format!(
            "its target {} matches no object",
            Value::Object(target.clone())
        )));
    }
    Ok(())
}

fn check_dns_label(s: &str) -> std::result::Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a namespace name: 1 to 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// Moves every namespaced object into `ns`, renames the Namespace object, and points
/// ServiceAccount subjects of (Cluster)RoleBindings at `ns`, as kustomize's `namespace` does.
/// Also, unlike kustomize, renames the namespace inside a cert-manager Certificate's DNS names
/// (`gpuscale-collector.<ns>.svc`), which must follow the Services' namespace.
pub fn set_namespace(objects: &mut [Value], ns: &str) {
    for obj in objects.iter_mut() {
        let Some((_, kind)) = kinds::lookup(
            str_at(obj, &["apiVersion"]).unwrap_or_default(),
            str_at(obj, &["kind"]).unwrap_or_default(),
        ) else {
            continue;
        };
        if kind.kind == "Certificate" {
            let old = str_at(obj, &["metadata", "namespace"]).map(str::to_owned);
            let names = obj
                .pointer_mut("/spec/dnsNames")
                .and_then(Value::as_array_mut);
            if let (Some(old), Some(names)) = (old, names) {
                for name in names {
                    if let Some(n) = name.as_str() {
                        let labels: Vec<&str> = n
                            .split('.')
                            .map(|l| if l == old { ns } else { l })
                            .collect();
                        *name = labels.join(".").into();
                    }
                }
            }
        }
        if kind.kind == "Namespace" {
            obj["metadata"]["name"] = ns.into();
        } else if kind.namespaced {
            obj["metadata"]["namespace"] = ns.into();
        }
        if kind.kind.ends_with("RoleBinding") {
            if let Some(subjects) = obj.get_mut("subjects").and_then(Value::as_array_mut) {
                for s in subjects {
                    if s.get("kind").and_then(Value::as_str) == Some("ServiceAccount") {
                        s["namespace"] = ns.into();
                    }
                }
            }
        }
    }
}

/// Lets pods of namespace `keda` instead of [`crate::certificates::DEFAULT_KEDA_NAMESPACE`] through
/// the NetworkPolicies (`namespaceSelector` on `kubernetes.io/metadata.name`).
pub fn set_keda_namespace(objects: &mut [Value], keda: &str) {
    const LABEL: &str = "kubernetes.io/metadata.name";
    for obj in objects.iter_mut().filter(|o| o["kind"] == "NetworkPolicy") {
        let rules = obj
            .pointer_mut("/spec/ingress")
            .and_then(Value::as_array_mut);
        for rule in rules.into_iter().flatten() {
            let peers = rule.get_mut("from").and_then(Value::as_array_mut);
            for peer in peers.into_iter().flatten() {
                let label = peer
                    .pointer_mut("/namespaceSelector/matchLabels")
                    .and_then(|l| l.get_mut(LABEL));
                if let Some(v) = label {
                    if v == crate::certificates::DEFAULT_KEDA_NAMESPACE {
                        *v = keda.into();
                    }
                }
            }
        }
    }
}

/// The name part of an image reference: without `:tag` and `@digest`
/// (`reg:5000/a/b:1@sha256:…` → `reg:5000/a/b`).
pub fn image_name(reference: &str) -> &str {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

/// Sets the image of every container whose image name is `name` to `reference`.
pub fn set_image(objects: &mut [Value], name: &str, reference: &str) {
    for obj in objects.iter_mut() {
        for c in containers_mut(obj) {
            if c.get("image").and_then(Value::as_str).map(image_name) == Some(name) {
                c["image"] = reference.into();
            }
        }
    }
}

/// The containers and init containers of an object's pod template.
pub fn containers(obj: &Value) -> Vec<&Value> {
    let spec = &obj["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(k).and_then(Value::as_array))
        .flatten()
        .collect()
}

fn containers_mut(obj: &mut Value) -> Vec<&mut Value> {
    let Some(spec) = obj
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    else {
        return Vec::new();
    };
    spec.iter_mut()
        .filter(|(k, _)| *k == "initContainers" || *k == "containers")
        .filter_map(|(_, v)| v.as_array_mut())
        .flatten()
        .collect()
}

/// The objects as one multi-document YAML text, as `kubectl apply -f -` reads it.
pub fn to_yaml(objects: &[Value]) -> Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        // Plain scalars only: no folded `>-` blocks for long image references.
        let mut options = serde_saphyr::SerializerOptions::default();
        options.prefer_block_scalars = false;
        let doc =
            serde_saphyr::to_string_with_options(o, options).map_err(|e| Error::Manifest {
                path: PathBuf::from("<rendered>"),
                why: format!("cannot write YAML: {e}"),
            })?;
        out.push_str(&doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// A one-line name for an object in messages: `DaemonSet gpuscale-system/gpuscale-agent`.
pub fn describe(obj: &Value) -> String {
    let kind = str_at(obj, &["kind"]).unwrap_or("?");
    let name = str_at(obj, &["metadata", "name"]).unwrap_or("?");
    match str_at(obj, &["metadata", "namespace"]) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_name_strips_tag_and_digest_but_not_a_registry_port() {
        assert_eq!(image_name("gpuscale"), "gpuscale");
        assert_eq!(image_name("gpuscale:0.1.0"), "gpuscale");
        assert_eq!(
            image_name("127.0.0.1:5000/gpuscale"),
            "127.0.0.1:5000/gpuscale"
        );
        assert_eq!(
            image_name("127.0.0.1:5000/team/gpuscale:1@sha256:ab"),
            "127.0.0.1:5000/team/gpuscale"
        );
    }

    #[test]
    fn yaml_round_trip_keeps_strings_that_look_like_numbers_or_booleans() {
        let objs = parse_objects(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {a: \"true\", b: \"1\", c: \"0.10\", d: \"\"}\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let back = parse_objects(&to_yaml(&objs).unwrap(), Path::new("out.yaml")).unwrap();
        assert_eq!(back, objs);
        assert_eq!(back[0]["data"]["a"], Value::String("true".into()));
        assert_eq!(back[0]["data"]["c"], Value::String("0.10".into()));
    }

    #[test]
    fn an_unknown_kind_is_refused_naming_the_file_and_the_table() {
        let e = parse_objects(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: a}\n",
            Path::new("x.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("x.yaml") && e.contains("Ingress") && e.contains("kinds.rs"),
            "{e}"
        );
    }

    #[test]
    fn set_namespace_moves_objects_and_binding_subjects_but_not_cluster_objects() {
        let mut objs = parse_objects(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: b}\n\
             roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: r}\n\
             subjects: [{kind: ServiceAccount, name: sa, namespace: a}, {kind: User, name: u}]\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        set_namespace(&mut objs, "b");
        assert_eq!(objs[0]["metadata"]["name"], "b");
        assert_eq!(objs[1]["metadata"]["namespace"], "b");
        assert!(objs[2]["metadata"].get("namespace").is_none());
        assert_eq!(objs[2]["subjects"][0]["namespace"], "b");
        assert!(objs[2]["subjects"][1].get("namespace").is_none());
    }

    #[test]
    fn a_bad_namespace_name_is_refused() {
        assert!(check_dns_label("Gpu_Scale").is_err());
        assert!(check_dns_label("-a").is_err());
        assert!(check_dns_label("gpuscale-system").is_ok());
    }
}
