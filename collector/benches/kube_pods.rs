//! Pod metadata at scale in `--kube` mode (issue 15): what the real `gpuscale-collector serve
//! --kube` costs in memory once it has listed N pods, against its own idle size (0 pods) measured
//! in the same run. Issue 15's target: 100,000 pods cost at most 300 MiB.
//!
//! Each collector is a separate process pointed (through a kubeconfig) at a small API server
//! inside this bench. That server pages a list of pods as a real API server does: `limit` and
//! `continue` (the collector's watcher asks for pages of 500), `resourceVersion` and
//! `remainingItemCount`, then a watch that stays open and quiet. It holds no pods: pod `i` is
//! written out when a page asks for it, as a real API server returns one (about 7 KB of JSON:
//! managed fields, labels and annotations, an owner reference, a spec with two containers and
//! their resources, a status with conditions and containerd container IDs); a tenth of them
//! request `nvidia.com/gpu`. (`e2e::kubeapi::FakeApi`, made for the small clusters of the
//! end-to-end tests, keeps every object twice as a `serde_json::Value` and returns a list whole:
//! gigabytes in the bench itself at 100,000 pods.) Deployments, StatefulSets and ScaledObjects
//! list empty.
//!
//! For each size the bench starts a collector, waits until `/readyz` says the pods are listed
//! (it then waits only for an agent, which this bench has none of), scrapes `/metrics` once
//! (which builds the pod index, as KEDA's first call would), and reads the collector's resident
//! set (`VmRSS`) and its peak (`VmHWM`) from `/proc/<pid>/status`.
//!
//! `GPUSCALE_BENCH_OLD_COLLECTOR=PATH` measures a second binary the same way (a build of older
//! code, kept aside), for a before/after table; only the binary of this checkout is held to the
//! target.
//!
//! Run: `cargo bench -p collector --bench kube_pods` (0, 10,000 and 100,000 pods, the release
//! binary); it fails when 100,000 pods cost more than 300 MiB above idle, resident or at peak.
//! Under `cargo test` it runs 0, 10,000 and 40,000 pods with the debug binary and fails when
//! 100,000 pods would, extrapolated: what 10,000 pods cost (the fixed cost of listing at all
//! included) plus the cost per pod between 10,000 and 40,000 for each pod more. (Fewer pods
//! leave the cost per pod to the allocator's whims.) `GPUSCALE_BENCH_PODS=0,N,M` picks other
//! counts.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};

/// Issue 15's bound on what 100,000 pods may cost.
const TARGET_MIB: f64 = 300.0;
/// The pod count the target is stated for.
const TARGET_PODS: usize = 100_000;
/// The API server's resource version for every list and watch.
const RESOURCE_VERSION: u64 = 7_000_000;
/// How long a collector may take to list its pods before the bench gives up on it.
const LIST_TIMEOUT: Duration = Duration::from_secs(600);

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Pod `i` of the fake cluster as the API server returns it in a list: about 7 KB of JSON.
/// Every tenth pod is a GPU pod (`nvidia.com/gpu` requested and limited, on a GPU node).
fn pod_json(i: usize) -> String {
    let gpu = i.is_multiple_of(10);
    // 20 replicas per Deployment, 200 namespaces.
    let deploy = i / 20;
    let app = if gpu {
        format!("llm-{deploy}")
    } else {
        format!("web-{deploy}")
    };
    let ns = format!("team-{:03}", deploy % 200);
    let hash = format!(
        "{:010x}",
        (deploy as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
    )[..10]
        .to_owned();
    let suffix: String = {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = i;
        (0..5)
            .map(|_| {
                let c = ALPHABET[n % ALPHABET.len()] as char;
                n /= ALPHABET.len();
                c
            })
            .collect()
    };
    let name = format!("{app}-{hash}-{suffix}");
    let uid = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        i,
        i % 0xffff,
        i % 0xfff,
        (i / 7) % 0xfff,
        (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) & 0xffff_ffff_ffff
    );
    let rs_uid = format!("{deploy:08x}-aaaa-4bbb-8ccc-{:012x}", deploy * 31);
    let node = if gpu {
        format!("gpu-node-{:04}", i / 160)
    } else {
        format!("cpu-node-{:04}", i % 2_000)
    };
    let cid = |k: u64| {
        let x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k;
        format!(
            "{x:016x}{:016x}{:016x}{:016x}",
            x.rotate_left(13),
            x.rotate_left(29),
            !x
        )
    };
    let (main_cid, sidecar_cid, sandbox) = (cid(1), cid(2), cid(3));
    let ip = format!(
        "10.{}.{}.{}",
        64 + (i >> 16) % 64,
        (i >> 8) & 0xff,
        i & 0xff
    );
    let host_ip = format!("172.16.{}.{}", (i / 160) / 250, (i / 160) % 250 + 1);
    let version = format!("v1.{}.{}", deploy % 9, i % 4);
    let (image, resources, args) = if gpu {
        (
            format!("registry.example.com/ml/vllm-openai:{version}"),
            r#"{"limits":{"cpu":"16","memory":"96Gi","nvidia.com/gpu":"1"},"requests":{"cpu":"8","memory":"64Gi","nvidia.com/gpu":"1"}}"#,
            format!(
                r#"["--model","/models/{app}","--tensor-parallel-size","1","--gpu-memory-utilization","0.90","--max-model-len","8192","--port","8000"]"#
            ),
        )
    } else {
        (
            format!("registry.example.com/web/{app}:{version}"),
            r#"{"limits":{"cpu":"2","memory":"2Gi"},"requests":{"cpu":"500m","memory":"1Gi"}}"#,
            r#"["--config","/etc/app/config.yaml","--listen",":8000","--log-format","json"]"#
                .to_owned(),
        )
    };
    let tolerations = if gpu {
        r#"{"effect":"NoSchedule","key":"nvidia.com/gpu","operator":"Exists"},"#
    } else {
        ""
    };
    let time = |s: usize| {
        format!(
            "2025-11-{:02}T{:02}:{:02}:{:02}Z",
            1 + (i / 86_400) % 28,
            (i / 3_600) % 24,
            (i / 60 + s / 60) % 60,
            (i + s) % 60
        )
    };
    let (created, scheduled, started, ready) = (time(0), time(1), time(9), time(41));
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","generateName":"{app}-{hash}-","namespace":"{ns}","uid":"{uid}","resourceVersion":"{rv}","creationTimestamp":"{created}","labels":{{"app":"{app}","app.kubernetes.io/instance":"{app}","app.kubernetes.io/name":"{app}","app.kubernetes.io/part-of":"team-{team}","app.kubernetes.io/version":"{version}","pod-template-hash":"{hash}"}},"annotations":{{"kubectl.kubernetes.io/restartedAt":"2025-10-30T08:12:55Z","prometheus.io/path":"/metrics","prometheus.io/port":"8000","prometheus.io/scrape":"true","cni.projectcalico.org/containerID":"{sandbox}","cni.projectcalico.org/podIP":"{ip}/32","cni.projectcalico.org/podIPs":"{ip}/32"}},"ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"{app}-{hash}","uid":"{rs_uid}","controller":true,"blockOwnerDeletion":true}}],"managedFields":[{{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1","time":"{created}","fieldsType":"FieldsV1","fieldsV1":{{"f:metadata":{{"f:annotations":{{".":{{}},"f:kubectl.kubernetes.io/restartedAt":{{}},"f:prometheus.io/path":{{}},"f:prometheus.io/port":{{}},"f:prometheus.io/scrape":{{}}}},"f:generateName":{{}},"f:labels":{{".":{{}},"f:app":{{}},"f:app.kubernetes.io/instance":{{}},"f:app.kubernetes.io/name":{{}},"f:app.kubernetes.io/part-of":{{}},"f:app.kubernetes.io/version":{{}},"f:pod-template-hash":{{}}}},"f:ownerReferences":{{".":{{}},"k:{{\"uid\":\"{rs_uid}\"}}":{{}}}}}},"f:spec":{{"f:containers":{{"k:{{\"name\":\"server\"}}":{{".":{{}},"f:args":{{}},"f:image":{{}},"f:imagePullPolicy":{{}},"f:name":{{}},"f:ports":{{".":{{}},"k:{{\"containerPort\":8000,\"protocol\":\"TCP\"}}":{{".":{{}},"f:containerPort":{{}},"f:name":{{}},"f:protocol":{{}}}}}},"f:readinessProbe":{{".":{{}},"f:failureThreshold":{{}},"f:httpGet":{{".":{{}},"f:path":{{}},"f:port":{{}},"f:scheme":{{}}}},"f:periodSeconds":{{}},"f:successThreshold":{{}},"f:timeoutSeconds":{{}}}},"f:resources":{{".":{{}},"f:limits":{{}},"f:requests":{{}}}},"f:terminationMessagePath":{{}},"f:terminationMessagePolicy":{{}},"f:volumeMounts":{{}}}},"k:{{\"name\":\"log-shipper\"}}":{{".":{{}},"f:image":{{}},"f:imagePullPolicy":{{}},"f:name":{{}},"f:resources":{{}},"f:terminationMessagePath":{{}},"f:terminationMessagePolicy":{{}}}}}},"f:dnsPolicy":{{}},"f:enableServiceLinks":{{}},"f:restartPolicy":{{}},"f:schedulerName":{{}},"f:securityContext":{{}},"f:terminationGracePeriodSeconds":{{}},"f:tolerations":{{}},"f:volumes":{{}}}}}}}},{{"manager":"kubelet","operation":"Update","apiVersion":"v1","time":"{ready}","fieldsType":"FieldsV1","fieldsV1":{{"f:status":{{"f:conditions":{{"k:{{\"type\":\"ContainersReady\"}}":{{".":{{}},"f:lastProbeTime":{{}},"f:lastTransitionTime":{{}},"f:status":{{}},"f:type":{{}}}},"k:{{\"type\":\"Initialized\"}}":{{".":{{}},"f:lastProbeTime":{{}},"f:lastTransitionTime":{{}},"f:status":{{}},"f:type":{{}}}},"k:{{\"type\":\"PodReadyToStartContainers\"}}":{{".":{{}},"f:lastProbeTime":{{}},"f:lastTransitionTime":{{}},"f:status":{{}},"f:type":{{}}}},"k:{{\"type\":\"Ready\"}}":{{".":{{}},"f:lastProbeTime":{{}},"f:lastTransitionTime":{{}},"f:status":{{}},"f:type":{{}}}}}},"f:containerStatuses":{{}},"f:hostIP":{{}},"f:hostIPs":{{}},"f:phase":{{}},"f:podIP":{{}},"f:podIPs":{{".":{{}},"k:{{\"ip\":\"{ip}\"}}":{{".":{{}},"f:ip":{{}}}}}},"f:startTime":{{}}}}}},"subresource":"status"}}]}},"spec":{{"volumes":[{{"name":"config","configMap":{{"name":"{app}-config","defaultMode":420}}}},{{"name":"kube-api-access-{suffix}","projected":{{"sources":[{{"serviceAccountToken":{{"expirationSeconds":3607,"path":"token"}}}},{{"configMap":{{"name":"kube-root-ca.crt","items":[{{"key":"ca.crt","path":"ca.crt"}}]}}}},{{"downwardAPI":{{"items":[{{"path":"namespace","fieldRef":{{"apiVersion":"v1","fieldPath":"metadata.namespace"}}}}]}}}}],"defaultMode":420}}}}],"containers":[{{"name":"server","image":"{image}","args":{args},"ports":[{{"name":"http","containerPort":8000,"protocol":"TCP"}}],"env":[{{"name":"POD_NAME","valueFrom":{{"fieldRef":{{"apiVersion":"v1","fieldPath":"metadata.name"}}}}}},{{"name":"LOG_LEVEL","value":"info"}}],"resources":{resources},"volumeMounts":[{{"name":"config","mountPath":"/etc/app"}},{{"name":"kube-api-access-{suffix}","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}],"readinessProbe":{{"httpGet":{{"path":"/health","port":8000,"scheme":"HTTP"}},"timeoutSeconds":1,"periodSeconds":10,"successThreshold":1,"failureThreshold":3}},"terminationMessagePath":"/dev/termination-log","terminationMessagePolicy":"File","imagePullPolicy":"IfNotPresent"}},{{"name":"log-shipper","image":"registry.example.com/infra/fluent-bit:3.2.4","resources":{{"limits":{{"memory":"128Mi"}},"requests":{{"cpu":"50m","memory":"64Mi"}}}},"volumeMounts":[{{"name":"kube-api-access-{suffix}","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}],"terminationMessagePath":"/dev/termination-log","terminationMessagePolicy":"File","imagePullPolicy":"IfNotPresent"}}],"restartPolicy":"Always","terminationGracePeriodSeconds":30,"dnsPolicy":"ClusterFirst","serviceAccountName":"default","serviceAccount":"default","nodeName":"{node}","securityContext":{{}},"schedulerName":"default-scheduler","tolerations":[{tolerations}{{"key":"node.kubernetes.io/not-ready","operator":"Exists","effect":"NoExecute","tolerationSeconds":300}},{{"key":"node.kubernetes.io/unreachable","operator":"Exists","effect":"NoExecute","tolerationSeconds":300}}],"priority":0,"enableServiceLinks":true,"preemptionPolicy":"PreemptLowerPriority"}},"status":{{"phase":"Running","conditions":[{{"type":"PodReadyToStartContainers","status":"True","lastProbeTime":null,"lastTransitionTime":"{started}"}},{{"type":"Initialized","status":"True","lastProbeTime":null,"lastTransitionTime":"{scheduled}"}},{{"type":"Ready","status":"True","lastProbeTime":null,"lastTransitionTime":"{ready}"}},{{"type":"ContainersReady","status":"True","lastProbeTime":null,"lastTransitionTime":"{ready}"}},{{"type":"PodScheduled","status":"True","lastProbeTime":null,"lastTransitionTime":"{scheduled}"}}],"hostIP":"{host_ip}","hostIPs":[{{"ip":"{host_ip}"}}],"podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"startTime":"{scheduled}","containerStatuses":[{{"name":"log-shipper","state":{{"running":{{"startedAt":"{started}"}}}},"lastState":{{}},"ready":true,"restartCount":0,"image":"registry.example.com/infra/fluent-bit:3.2.4","imageID":"registry.example.com/infra/fluent-bit@sha256:{sidecar_cid}","containerID":"containerd://{sidecar_cid}","started":true}},{{"name":"server","state":{{"running":{{"startedAt":"{started}"}}}},"lastState":{{}},"ready":true,"restartCount":0,"image":"{image}","imageID":"{image}@sha256:{sandbox}","containerID":"containerd://{main_cid}","started":true}}],"qosClass":"Burstable"}}}}"#,
        rv = RESOURCE_VERSION - 1 - (i as u64 % 1_000_000),
        team = deploy % 17,
    )
}

/// The API server's answer to one request, from the number of pods it serves.
fn answer(pods: usize, req: &Request<Body>) -> Response<Body> {
    let query: Vec<(&str, &str)> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let param = |name: &str| query.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let json = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("a valid response")
    };
    let path = req.uri().path();
    let pods = match path {
        "/api/v1/pods" => pods,
        "/apis/apps/v1/deployments"
        | "/apis/apps/v1/statefulsets"
        | "/apis/keda.sh/v1alpha1/scaledobjects" => 0,
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                format!(
                    r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"the bench's API server serves no {path}","reason":"NotFound","code":404}}"#
                ),
            )
        }
    };
    if param("watch").is_some_and(|w| w == "true" || w == "1") {
        // Nothing changes in this cluster: the watch stays open and quiet.
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(tokio_stream::pending::<
                Result<Bytes, Infallible>,
            >()))
            .expect("a valid response");
    }
    let from: usize = param("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = param("limit").and_then(|l| l.parse().ok()).unwrap_or(pods);
    let to = pods.min(from.saturating_add(limit.max(1)));
    let mut body = String::with_capacity((to - from) * 8_000 + 256);
    let more = if to < pods {
        format!(r#","continue":"{to}","remainingItemCount":{}"#, pods - to)
    } else {
        String::new()
    };
    let kind = if path == "/api/v1/pods" {
        "PodList"
    } else {
        "List"
    };
    body.push_str(&format!(
        r#"{{"kind":"{kind}","apiVersion":"v1","metadata":{{"resourceVersion":"{RESOURCE_VERSION}"{more}}},"items":["#
    ));
    for i in from..to {
        if i > from {
            body.push(',');
        }
        body.push_str(&pod_json(i));
    }
    body.push_str("]}");
    json(StatusCode::OK, body)
}

/// The bench's API server: serves `pods` pods (changed between collectors), on loopback.
struct ApiServer {
    addr: SocketAddr,
    pods: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl ApiServer {
    fn start() -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the bench's API server");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the API server");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the API server's address");
        let pods = Arc::new(AtomicUsize::new(0));
        let serving = pods.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let app = axum::Router::new().fallback(move |req: Request<Body>| {
                // Relaxed: set before the collector that asks is started.
                let pods = serving.load(Ordering::Relaxed);
                async move { answer(pods, &req) }
            });
            let _ = axum::serve(listener, app).await;
        });
        ApiServer {
            addr,
            pods,
            _runtime: runtime,
        }
    }

    fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: \
             http://{}\nusers:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  \
             context:\n    cluster: bench\n    user: bench\ncurrent-context: bench\n",
            self.addr
        );
        std::fs::write(path, text).expect("writing the kubeconfig");
    }
}

/// A loopback port free now (the collector binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A minimal HTTP/1.1 GET: (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// `VmRSS` and `VmHWM` of process `pid`, in bytes.
fn memory(pid: u32) -> (i64, i64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One collector, measured with N pods listed.
struct Reading {
    pods: usize,
    rss: i64,
    hwm: i64,
    listed_in: Duration,
}

/// A collector process, killed when dropped.
struct Collector(Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `binary` against `api` serving `pods` pods; reads its memory once it has listed them.
fn measure(binary: &Path, api: &ApiServer, dir: &Path, pods: usize) -> Reading {
    // Relaxed: read by the server's handlers, which start after the collector below.
    api.pods.store(pods, Ordering::Relaxed);
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let http = format!("127.0.0.1:{}", free_port());
    let log_path = dir.join(format!("collector-{pods}.log"));
    let log = std::fs::File::create(&log_path).expect("creating the collector's log");
    let started = Instant::now();
    let mut collector = Collector(
        Command::new(binary)
            .args(["serve", "--kube", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--http-listen", &http])
            // Nothing listens there: /readyz then says it waits for an agent, after the pods.
            .args(["--agents", &format!("127.0.0.1:{}", free_port())])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display())),
    );
    let pid = collector.0.id();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = collector.0.try_wait() {
            panic!(
                "the collector exited ({status}) before listing; its log:\n{}",
                log()
            );
        }
        // Ready but for an agent: the pod source is synced.
        if let Ok((_, body)) = http_get(&http, "/readyz") {
            if body.starts_with("no agent connected yet") {
                break;
            }
        }
        assert!(
            started.elapsed() < LIST_TIMEOUT,
            "the collector did not list {pods} pods within {LIST_TIMEOUT:?}; its log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed_in = started.elapsed();
    // The first scrape builds the pod index, as KEDA's first call would.
    let (status, _) = http_get(&http, "/metrics").expect("scraping /metrics");
    assert_eq!(status, 200, "/metrics answered {status}; log:\n{}", log());
    std::thread::sleep(Duration::from_millis(300));
    let (rss, hwm) = memory(pid);
    let listed = format!("objects={pods}");
    assert!(
        log()
            .lines()
            .any(|l| l.contains(r#"resource="pods""#) && l.split_whitespace().any(|w| w == listed)),
        "the collector's log does not say it listed {pods} pods:\n{}",
        log()
    );
    Reading {
        pods,
        rss,
        hwm,
        listed_in,
    }
}

/// What 100,000 pods would cost above `idle`, extrapolated from readings at two pod counts:
/// what the smaller one cost (the fixed cost of listing at all, such as the page being read,
/// included), plus the cost per pod between the two for every pod more. At 100,000 pods it is
/// the reading itself.
fn projected(idle: i64, (a, pods_a): (i64, usize), (b, pods_b): (i64, usize)) -> f64 {
    let per_pod = mib(b - a) / (pods_b - pods_a) as f64;
    mib(a - idle) + per_pod * TARGET_PODS.saturating_sub(pods_a) as f64
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = match std::env::var("GPUSCALE_BENCH_PODS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("GPUSCALE_BENCH_PODS: counts, comma-separated")
            })
            .collect(),
        Err(_) if bench => vec![0, 10_000, TARGET_PODS],
        Err(_) => vec![0, 10_000, 40_000],
    };
    assert!(
        sizes.len() >= 3 && sizes[0] == 0 && sizes.windows(2).all(|w| w[0] < w[1]),
        "pod counts {sizes:?}: give 0 (the idle baseline) and at least two more, increasing, \
         such as GPUSCALE_BENCH_PODS=0,10000,40000"
    );
    let this = PathBuf::from(env!("CARGO_BIN_EXE_gpuscale-collector"));
    let old = std::env::var_os("GPUSCALE_BENCH_OLD_COLLECTOR").map(PathBuf::from);
    let sample: usize = (0..100).map(|i| pod_json(i).len()).sum::<usize>() / 100;
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("a scratch directory");
    eprintln!(
        "pods of {sample} bytes of JSON on average, a tenth of them GPU pods; sizes {sizes:?}"
    );

    let mut runs: Vec<(&str, PathBuf, Vec<Reading>)> = Vec::new();
    for (what, binary) in [("old", old), ("this checkout", Some(this))] {
        let Some(binary) = binary else { continue };
        let readings: Vec<Reading> = sizes
            .iter()
            .map(|&n| {
                let r = measure(&binary, &api, dir.path(), n);
                eprintln!(
                    "{what}: {n} pods listed in {:.1} s, resident {:.1} MiB, peak {:.1} MiB",
                    r.listed_in.as_secs_f64(),
                    mib(r.rss),
                    mib(r.hwm)
                );
                r
            })
            .collect();
        runs.push((what, binary, readings));
    }

    println!("| collector | pods | resident (VmRSS) | above idle | peak (VmHWM) | above idle |");
    println!("|---|---|---|---|---|---|");
    for (what, _, readings) in &runs {
        let idle = &readings[0];
        for r in readings {
            println!(
                "| {what} | {} | {:.1} MiB | {:+.1} MiB | {:.1} MiB | {:+.1} MiB |",
                r.pods,
                mib(r.rss),
                mib(r.rss - idle.rss),
                mib(r.hwm),
                mib(r.hwm - idle.hwm)
            );
        }
    }
    if let [(_, _, old), (_, _, new)] = &runs[..] {
        for (o, n) in old.iter().zip(new).skip(1) {
            let ratio =
                |f: fn(&Reading) -> i64| (f(o) - f(&old[0])) as f64 / (f(n) - f(&new[0])) as f64;
            println!(
                "{} pods, above idle: old / this checkout = {:.1}x resident, {:.1}x at peak",
                n.pods,
                ratio(|r| r.rss),
                ratio(|r| r.hwm)
            );
        }
    }
    let (_, binary, readings) = runs.last().expect("this checkout was measured");
    let (idle, a, b) = (
        &readings[0],
        &readings[readings.len() - 2],
        &readings[readings.len() - 1],
    );
    let rss = projected(idle.rss, (a.rss, a.pods), (b.rss, b.pods));
    let hwm = projected(idle.hwm, (a.hwm, a.pods), (b.hwm, b.pods));
    println!(
        "{}: {:.0} bytes per pod resident, {:.0} at peak (between {} and {} pods); {TARGET_PODS} \
         pods: {rss:.1} MiB resident, {hwm:.1} MiB at peak above idle{} = {:.2}x of the \
         {TARGET_MIB} MiB target",
        binary.display(),
        (b.rss - a.rss) as f64 / (b.pods - a.pods) as f64,
        (b.hwm - a.hwm) as f64 / (b.pods - a.pods) as f64,
        a.pods,
        b.pods,
        if b.pods == TARGET_PODS {
            " (measured)"
        } else {
            " (extrapolated)"
        },
        rss.max(hwm) / TARGET_MIB
    );
    assert!(
        rss <= TARGET_MIB && hwm <= TARGET_MIB,
        "{TARGET_PODS} pods cost (or, extrapolated, would cost) {rss:.1} MiB resident and \
         {hwm:.1} MiB at peak above idle, over the {TARGET_MIB} MiB target"
    );
}
