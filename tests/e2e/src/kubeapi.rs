//! A fake Kubernetes API server on loopback, for the collector's in-cluster mode: list, get and
//! watch (newline-delimited JSON events, as the real API server streams them) over any
//! resource, with resource versions, namespaced and cluster-wide paths, equality label
//! selectors, and the failures a real cluster produces: `410 Gone` on a watch whose resource
//! version was compacted (the client must re-list), `403 Forbidden` for a resource RBAC does not
//! grant. (What a real API server can show — CRDs with a `/scale` subresource, an API server that
//! goes away — is tested against the real one: `xtask/cluster/tests/keda.rs`.)
//!
//! Resources are named by their collection path without a namespace: `api/v1/pods`,
//! `apis/apps/v1/deployments`, `apis/discovery.k8s.io/v1/endpointslices`,
//! `apis/keda.sh/v1alpha1/scaledobjects`. The collector reaches it through a kubeconfig
//! ([`FakeApi::write_kubeconfig`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use serde_json::{json, Value};

/// A stored change, replayed to watches that start from an older resource version.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    /// `ADDED`, `MODIFIED`, `DELETED`, or `GONE` (the resource's watches are expired).
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    /// Watches of a resource starting before this resource version get `410 Gone`.
    expired_before: HashMap<String, u64>,
    forbidden: HashSet<String>,
    /// Request lines seen (`GET /api/v1/pods?…`).
    requests: Vec<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    changes: tokio::sync::broadcast::Sender<Change>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running fake API server. Stops when dropped.
pub struct FakeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn namespace_of(object: &Value) -> String {
    object["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

impl FakeApi {
    /// Starts the server on a free loopback port.
    pub fn start() -> FakeApi {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 100,
                ..Inner::default()
            }),
            changes: tokio::sync::broadcast::channel(4096).0,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the fake API");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(move |req: Request<Body>| {
                    let s = s.clone();
                    async move { handle(&s, req) }
                });
                // Stopping drops the server; open connections (watch streams) end with the
                // runtime below, as when an API server goes away.
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_background();
        });
        FakeApi {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Writes a kubeconfig whose current context is this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
             http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(path, text).expect("writing the kubeconfig");
    }

    fn record(&self, inner: &mut Inner, resource: &str, kind: &'static str, object: Value) {
        let change = Change {
            rv: inner.rv,
            resource: resource.to_owned(),
            kind,
            object,
        };
        inner.history.push(change.clone());
        let _ = self.shared.changes.send(change);
    }

    /// Creates or replaces an object (`ADDED` or `MODIFIED` to watchers).
    pub fn apply(&self, resource: &str, mut object: Value) {
        let mut inner = self.shared.lock();
        inner.rv += 1;
        object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let key = (resource.to_owned(), namespace_of(&object), name_of(&object));
        let kind = if inner.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.objects.insert(key, object.clone());
        self.record(&mut inner, resource, kind, object);
    }

    /// Deletes an object (`DELETED` to watchers).
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut inner = self.shared.lock();
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        if let Some(mut object) = inner.objects.remove(&key) {
            inner.rv += 1;
            object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
            self.record(&mut inner, resource, "DELETED", object);
        }
    }

    /// Deletes an object without telling watchers: what a client misses while its watch was
    /// broken. Only a re-list shows it.
    pub fn delete_silently(&self, resource: &str, namespace: &str, name: &str) {
        let mut inner = self.shared.lock();
        inner.rv += 1;
        inner
            .objects
            .remove(&(resource.to_owned(), namespace.to_owned(), name.to_owned()));
    }

    /// Compacts `resource`'s history: open watches get `410 Gone` and end, and a watch from an
    /// older resource version gets it at once.
    pub fn expire(&self, resource: &str) {
        let mut inner = self.shared.lock();
        inner.rv += 1;
        let rv = inner.rv;
        inner.expired_before.insert(resource.to_owned(), rv);
        let _ = self.shared.changes.send(Change {
            rv,
            resource: resource.to_owned(),
            kind: "GONE",
            object: Value::Null,
        });
    }

    /// Makes every request on `resource` fail with `403 Forbidden`, as RBAC would.
    pub fn forbid(&self, resource: &str) {
        self.shared.lock().forbidden.insert(resource.to_owned());
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn json_response(value: &Value) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(value.to_string()))
        .unwrap()
}

/// A parsed request path: the resource, the namespace (empty: all) and an object name.
struct Target {
    resource: String,
    namespace: String,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let prefix = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    if segs.len() <= prefix {
        return None;
    }
    let base = segs[..prefix].join("/");
    let rest = &segs[prefix..];
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => ((*ns).to_owned(), more),
        _ => (String::new(), rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some((*name).to_owned())),
        _ => return None,
    };
    Some(Target {
        resource: format!("{base}/{plural}"),
        namespace,
        name,
    })
}

fn query_params(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label selectors (`a=b,c=d`), which is what the collector sends.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|req| match req.split_once('=') {
        Some((k, v)) => object["metadata"]["labels"][k.trim()] == v.trim(),
        None => false,
    })
}

fn handle(shared: &Arc<Shared>, req: Request<Body>) -> Response<Body> {
    let uri = req.uri().clone();
    let mut inner = shared.lock();
    inner.requests.push(format!("{} {}", req.method(), uri));
    let target = match parse_path(uri.path()) {
        Some(target) => target,
        None => {
            return status(
                404,
                "NotFound",
                format!("the fake API serves no {}", uri.path()),
            )
        }
    };
    if inner.forbidden.contains(&target.resource) {
        let plural = target.resource.rsplit('/').next().unwrap_or_default();
        return status(
            403,
            "Forbidden",
            format!(
                "{plural} is forbidden: User \"system:serviceaccount:gpuscale-system:\
                 gpuscale-collector\" cannot list resource \"{plural}\" at the cluster scope"
            ),
        );
    }
    let params = query_params(uri.query());
    let in_scope = |resource: &str, object: &Value| {
        resource == target.resource
            && (target.namespace.is_empty() || namespace_of(object) == target.namespace)
            && selected(object, params.get("labelSelector"))
    };
    if let Some(name) = &target.name {
        let key = (
            target.resource.clone(),
            target.namespace.clone(),
            name.clone(),
        );
        return match inner.objects.get(&key) {
            Some(object) => json_response(object),
            None => status(
                404,
                "NotFound",
                format!("{} {name} not found", target.resource),
            ),
        };
    }
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let items: Vec<Value> = inner
            .objects
            .iter()
            .filter(|((r, _, _), o)| in_scope(r, o))
            .map(|(_, o)| o.clone())
            .collect();
        return json_response(&json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": inner.rv.to_string()},
            "items": items,
        }));
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let gone = json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}});
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let line = |v: &Value| Ok(Bytes::from(format!("{v}\n")));
    if inner
        .expired_before
        .get(&target.resource)
        .is_some_and(|&before| from < before)
    {
        let _ = tx.try_send(line(&gone));
        drop(tx);
    } else {
        for c in inner.history.iter().filter(|c| c.rv > from) {
            if in_scope(&c.resource, &c.object) {
                let _ = tx.try_send(line(&json!({"type": c.kind, "object": c.object})));
            }
        }
        let mut changes = shared.changes.subscribe();
        let resource = target.resource.clone();
        let namespace = target.namespace.clone();
        let selector = params.get("labelSelector").cloned();
        tokio::spawn(async move {
            while let Ok(c) = changes.recv().await {
                if c.resource != resource {
                    continue;
                }
                if c.kind == "GONE" {
                    let _ = tx.send(line(&gone)).await;
                    return;
                }
                if (namespace.is_empty() || namespace_of(&c.object) == namespace)
                    && selected(&c.object, selector.as_ref())
                    && tx
                        .send(line(&json!({"type": c.kind, "object": c.object})))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
    }
    drop(inner);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}
