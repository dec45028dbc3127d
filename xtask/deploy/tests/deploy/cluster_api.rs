//! The installer's API calls, against a fake API server that answers with recorded objects
//! (`tests/recorded/`): server-side apply of every rendered object to the right URL, in order;
//! the rollout wait following a DaemonSet from rolling to ready, or failing with the stuck
//! pod's reason; and the uninstall deleting in reverse order and waiting for the namespace.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_deploy::{cluster, kinds, render};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

fn recorded(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/recorded")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One request as the fake server saw it: method, path and query, content type.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A fake API server: `answer` maps (method, path) to (status, JSON body); every request is
/// recorded in `seen`.
fn fake_api(
    answer: impl Fn(&str, &str) -> (StatusCode, Value) + Send + Sync + 'static,
) -> (kube::Client, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let answer = Arc::new(answer);
    let svc = tower::service_fn(move |req: Request<Body>| {
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let ctype = req
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        log.lock()
            .unwrap()
            .push((method.clone(), uri.clone(), ctype));
        let path = uri.split('?').next().unwrap_or_default().to_owned();
        let (status, body) = answer(&method, &path);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            )
        }
    });
    (kube::Client::new(svc, "default"), seen)
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found",
               "reason": "NotFound", "code": 404}),
    )
}

/// The URL path of an object, as the API server names it.
fn url_of(obj: &Value) -> String {
    let (_, k) = kinds::lookup(
        obj["apiVersion"].as_str().unwrap(),
        obj["kind"].as_str().unwrap(),
    )
    .unwrap();
    let base = if k.group.is_empty() {
        format!("/api/{}", k.version)
    } else {
        format!("/apis/{}/{}", k.group, k.version)
    };
    let name = obj["metadata"]["name"].as_str().unwrap();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{base}/namespaces/{ns}/{}/{name}", k.plural),
        None => format!("{base}/{}/{name}", k.plural),
    }
}

fn objects() -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base");
    render::render(&root, &render::Options::default()).unwrap()
}

#[tokio::test]
async fn apply_sends_every_object_by_server_side_apply_in_creation_order() {
    let (client, seen) = fake_api(|_, path| {
        let name = path.rsplit('/').next().unwrap_or_default();
        (StatusCode::OK, json!({"metadata": {"name": name}}))
    });
    let objs = objects();
    let mut lines = Vec::new();
    cluster::apply(&client, &objs, &mut |l| lines.push(l))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), objs.len());
    for ((method, uri, ctype), obj) in seen.iter().zip(&objs) {
        assert_eq!(method, "PATCH");
        assert_eq!(uri.split('?').next().unwrap(), url_of(obj));
        assert!(
            uri.contains("fieldManager=gpuscale-deploy") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(ctype, "application/apply-patch+yaml");
    }
    assert_eq!(
        seen[0].1.split('?').next().unwrap(),
        "/api/v1/namespaces/gpuscale-system"
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("applied DaemonSet gpuscale-system/gpuscale-agent")));
}

#[tokio::test]
async fn the_rollout_wait_follows_the_daemonset_until_it_is_ready() {
    let states = Arc::new(Mutex::new(VecDeque::from([
        recorded("daemonset-rolling.json"),
        recorded("daemonset-ready.json"),
    ])));
    let (client, _) = fake_api(move |_, path| {
        if path.ends_with("/daemonsets/gpuscale-agent") {
            let mut s = states.lock().unwrap();
            let v = if s.len() > 1 {
                s.pop_front().unwrap()
            } else {
                s[0].clone()
            };
            (StatusCode::OK, v)
        } else if path.ends_with("/deployments/gpuscale-collector") {
            (StatusCode::OK, recorded("deployment-ready.json"))
        } else {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}),
            )
        }
    });
    let mut lines = Vec::new();
    let warnings = cluster::wait_rollout(
        &client,
        "gpuscale-system",
        "gpuscale-agent",
        "gpuscale-collector",
        Duration::from_secs(60),
        &mut |l| lines.push(l),
    )
    .await
    .unwrap();
    assert!(warnings.is_empty());
    assert!(lines[0].contains("1/3 updated"), "{lines:?}");
    assert!(lines.last().unwrap().contains("3/3 available"), "{lines:?}");
}

#[tokio::test]
async fn a_stuck_rollout_fails_with_the_failing_pods_reason() {
    let (client, _) = fake_api(|_, path| {
        if path.ends_with("/daemonsets/gpuscale-agent") {
            (StatusCode::OK, recorded("daemonset-rolling.json"))
        } else if path.ends_with("/deployments/gpuscale-collector") {
            (StatusCode::OK, recorded("deployment-ready.json"))
        } else if path.ends_with("/pods") {
            let items = [recorded("pod-ready.json"), recorded("pod-crashloop.json")];
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}),
            )
        } else {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}),
            )
        }
    });
    let e = cluster::wait_rollout(
        &client,
        "gpuscale-system",
        "gpuscale-agent",
        "gpuscale-collector",
        Duration::ZERO,
        &mut |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("did not finish"), "{e}");
    assert!(
        e.contains("gpuscale-agent-x7k2p") && e.contains("CrashLoopBackOff"),
        "{e}"
    );
    assert!(
        e.contains("libnvidia-ml.so.1") && e.contains("kubectl -n gpuscale-system logs"),
        "{e}"
    );
}

#[tokio::test]
async fn a_daemonset_refused_its_pods_is_explained_by_its_warning_event() {
    let (client, _) = fake_api(|_, path| {
        if path.ends_with("/daemonsets/gpuscale-agent") {
            (StatusCode::OK, recorded("daemonset-rolling.json"))
        } else if path.ends_with("/deployments/gpuscale-collector") {
            (StatusCode::OK, recorded("deployment-ready.json"))
        } else if path.ends_with("/events") {
            (StatusCode::OK, recorded("events-runtimeclass.json"))
        } else {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}),
            )
        }
    });
    let e = cluster::wait_rollout(
        &client,
        "gpuscale-system",
        "gpuscale-agent",
        "gpuscale-collector",
        Duration::ZERO,
        &mut |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("RuntimeClass \"nvidia\" not found"), "{e}");
}

#[tokio::test]
async fn uninstall_deletes_in_reverse_order_tolerates_missing_objects_and_waits_for_the_namespace()
{
    let (client, seen) = fake_api(|method, path| match method {
        "DELETE" if path.contains("priorityclasses") => not_found(),
        "DELETE" => (
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        ),
        _ => not_found(),
    });
    let objs = objects();
    let mut lines = Vec::new();
    cluster::delete(&client, &objs, Duration::from_secs(10), &mut |l| {
        lines.push(l)
    })
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    let deletes: Vec<String> = seen
        .iter()
        .filter(|(m, _, _)| m == "DELETE")
        .map(|(_, u, _)| u.split('?').next().unwrap().to_owned())
        .collect();
    let want: Vec<String> = objs.iter().rev().map(url_of).collect();
    assert_eq!(deletes, want);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("PriorityClass gpuscale-agent was not there")),
        "{lines:?}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .contains("namespace gpuscale-system is gone"),
        "{lines:?}"
    );
}
