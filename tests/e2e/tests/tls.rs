//! End-to-end: TLS and mutual TLS on every port of the real binaries. One CA (made with the
//! project's `pki`) signs the agent's certificate (naming its node), the collector's serving
//! certificate (naming 127.0.0.1, the host of the `scalerAddress` KEDA would dial), and the client
//! certificates of the collector and of KEDA. The fake NVML's process gets its pod through a
//! procfs tree (`--proc-root`), so this runs without root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::keda::{is_code, scaled_object, Keda};
use e2e::{collector_bin, free_port, Agent, Collector, Scratch};
use gpuscale_health::pki::{Ca, Issued};
use serde_json::{json, Value};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const UID: &str = "7e150000-1111-4222-8333-444444444444";

/// Writes `issued` as `<name>.crt` and `<name>.key`.
fn write_pair(dir: &Scratch, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let (c, k) = (
        dir.path(&format!("{name}.crt")),
        dir.path(&format!("{name}.key")),
    );
    std::fs::write(&c, &issued.cert_pem).unwrap();
    std::fs::write(&k, &issued.key_pem).unwrap();
    (c, k)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An agent on one fake GPU whose process belongs to pod ml/llm-0, serving TLS with
/// `cert`/`key` and mutual TLS against `client_ca`.
fn start_agent(dir: &Scratch, cert: &Path, key: &Path, client_ca: &Path) -> (Agent, String) {
    Agent::one_gpu_pod(
        dir,
        UID,
        &[
            "--tls-cert",
            s(cert),
            "--tls-key",
            s(key),
            "--tls-client-ca",
            s(client_ca),
        ],
    )
}

fn pods_file(dir: &Scratch) -> PathBuf {
    let pods = dir.path("pods.json");
    e2e::write_pods(
        &pods,
        &[e2e::pod_item("ml", "llm-0", UID, json!({"app": "llm"}))],
    );
    pods
}

fn trigger() -> proto::externalscaler::ScaledObjectRef {
    scaled_object(
        "llm",
        &[
            ("metric", "gpu_util"),
            ("podSelector", "app=llm"),
            ("targetValue", "80"),
            ("timeAggregation", "last"),
            ("enableTLS", "true"),
        ],
    )
}

/// The collector's flags for dialing agents over mutual TLS.
fn agent_tls_flags<'a>(ca: &'a Path, cert: &'a Path, key: &'a Path) -> [&'a str; 6] {
    [
        "--agent-ca",
        s(ca),
        "--agent-client-cert",
        s(cert),
        "--agent-client-key",
        s(key),
    ]
}

/// `gpuscale-collector dump --json` with extra flags (TLS ones).
fn dump(addr: &str, extra: &[&str]) -> Result<Value, String> {
    let out = Command::new(collector_bin())
        .args(["dump", "--json", "--collector", addr])
        .args(extra)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// What both tests start from: a CA (its certificate in `ca.crt`), the collector's client
/// certificate, and an agent whose certificate names `agent_names`, serving mutual TLS, with its
/// pod seen.
struct Setup {
    ca: Ca,
    ca_file: PathBuf,
    client: (PathBuf, PathBuf),
    agent: Agent,
    agent_addr: String,
    pods: PathBuf,
}

fn setup(dir: &Scratch, agent_names: &[&str]) -> Setup {
    let ca = Ca::new("gpuscale e2e CA", 1).unwrap();
    let ca_file = dir.path("ca.crt");
    std::fs::write(&ca_file, &ca.pem().cert_pem).unwrap();
    let (agent_crt, agent_key) = write_pair(dir, "agent", &ca.issue(agent_names, 1).unwrap());
    let client = write_pair(
        dir,
        "collector-client",
        &ca.issue(&["gpuscale-collector"], 1).unwrap(),
    );
    let (mut agent, agent_addr) = start_agent(dir, &agent_crt, &agent_key, &ca_file);
    agent
        .wait_dump(WAIT, |d| d["gpus"][0]["processes"][0]["pod_uid"] == UID)
        .unwrap();
    let pods = pods_file(dir);
    Setup {
        ca,
        ca_file,
        client,
        agent,
        agent_addr,
        pods,
    }
}

#[test]
fn with_mutual_tls_everywhere_keda_reads_the_value_and_clients_without_a_certificate_are_refused() {
    let dir = Scratch::new("tls");
    let Setup {
        ca,
        ca_file,
        client: (cli_crt, cli_key),
        mut agent,
        agent_addr,
        pods,
    } = setup(&dir, &["e2e-node", "gpuscale-agent"]);
    let other = Ca::new("someone else's CA", 1).unwrap();
    let other_file = dir.path("other-ca.crt");
    std::fs::write(&other_file, &other.pem().cert_pem).unwrap();
    let (srv_crt, srv_key) = write_pair(
        &dir,
        "collector",
        &ca.issue(&["gpuscale-collector.gpuscale-system.svc", "127.0.0.1"], 1)
            .unwrap(),
    );
    let (keda_crt, keda_key) = write_pair(&dir, "keda", &ca.issue(&["keda-operator"], 1).unwrap());
    let (stranger_crt, stranger_key) = write_pair(
        &dir,
        "stranger",
        &other.issue(&["keda-operator"], 1).unwrap(),
    );
    let http = format!("127.0.0.1:{}", free_port());
    let mut collector = Collector::spawn(
        &dir,
        &[
            "--agents",
            &agent_addr,
            "--pods-file",
            s(&pods),
            "--http-listen",
            &http,
            "--tls-cert",
            s(&srv_crt),
            "--tls-key",
            s(&srv_key),
            "--tls-client-ca",
            s(&ca_file),
        ]
        .into_iter()
        .chain(agent_tls_flags(&ca_file, &cli_crt, &cli_key))
        .collect::<Vec<_>>(),
        &[],
    );

    // KEDA with caCert, tlsClientCert and tlsClientKey: the value, through two TLS hops.
    let mut keda = Keda::connect_tls(&collector.addr, &ca_file, Some((&keda_crt, &keda_key)))
        .unwrap_or_else(|e| panic!("{e}\n{}", collector.daemon.log()));
    reads_the_value(&mut keda, &|| {
        format!(
            "collector log:\n{}\nagent log:\n{}",
            collector.daemon.log(),
            agent.log()
        )
    });
    let so = trigger();

    // dump with the same kind of client certificate sees the node connected over TLS.
    let view = dump(
        &collector.addr,
        &[
            "--ca",
            s(&ca_file),
            "--client-cert",
            s(&keda_crt),
            "--client-key",
            s(&keda_key),
        ],
    )
    .unwrap();
    assert_eq!(view["nodes"][0]["node"], "e2e-node", "{view}");
    assert_eq!(view["nodes"][0]["connected"], true, "{view}");

    // Clients the collector must refuse: plain text, TLS without a client certificate, a
    // certificate of another CA; and a client that does not trust the collector's CA refuses it.
    let plain = dump(&collector.addr, &[]);
    assert!(plain.is_err(), "a plain-text client got {plain:?}");
    let mut no_cert = Keda::connect_tls(&collector.addr, &ca_file, None).unwrap();
    assert!(
        no_cert.metric_spec(&so).is_err(),
        "no client certificate was answered"
    );
    let mut stranger = Keda::connect_tls(
        &collector.addr,
        &ca_file,
        Some((&stranger_crt, &stranger_key)),
    )
    .unwrap();
    assert!(
        stranger.metric_spec(&so).is_err(),
        "another CA's client was answered"
    );
    let distrust = Keda::connect_tls(&collector.addr, &other_file, Some((&keda_crt, &keda_key)));
    assert!(
        distrust.is_err(),
        "the client accepted a server of a CA it does not trust"
    );
    let named = dump(&collector.addr, &["--ca", s(&ca_file)]).unwrap_err();
    assert!(
        named.contains(&collector.addr),
        "the error names the address: {named}"
    );

    // The agent's port refuses a client without the collector's certificate, too.
    let mut snapshot = tonic_plain_snapshot(&agent_addr);
    assert!(
        snapshot.is_err(),
        "the agent answered plain text: {snapshot:?}"
    );
    snapshot = tls_snapshot(&agent_addr, &ca_file, None);
    assert!(
        snapshot.is_err(),
        "the agent answered without a client certificate: {snapshot:?}"
    );
    snapshot = tls_snapshot(&agent_addr, &ca_file, Some((&cli_crt, &cli_key)));
    assert_eq!(snapshot, Ok("e2e-node".to_owned()));

    // The HTTP port serves TLS with the same certificate, without asking for a client one (the
    // kubelet's probes have none).
    let (status, body) = https_get(&http, &ca_file, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.lines()
            .any(|l| l.starts_with("gpuscale_collector_agent_connected{") && l.ends_with(" 1")),
        "{body}"
    );
    collector.daemon.check_alive().unwrap();
    assert!(agent.terminate().success());
}

#[test]
fn an_agent_whose_certificate_names_another_node_cannot_report_this_one() {
    let dir = Scratch::new("tls-node");
    // The agent runs as e2e-node, but its certificate was made for gpu-node-7.
    let Setup {
        ca_file,
        client: (cli_crt, cli_key),
        mut agent,
        agent_addr,
        pods,
        ..
    } = setup(&dir, &["gpu-node-7"]);
    let mut collector = Collector::spawn(
        &dir,
        &["--agents", &agent_addr, "--pods-file", s(&pods)]
            .into_iter()
            .chain(agent_tls_flags(&ca_file, &cli_crt, &cli_key))
            .collect::<Vec<_>>(),
        &[],
    );
    let why = refused(&mut collector, "certificate names");
    assert!(
        why.contains("reported node \"e2e-node\"") && why.contains("\"gpu-node-7\""),
        "the refusal names the node reported and the node of the certificate: {why}"
    );
    assert!(agent.terminate().success());
}

/// Waits until KEDA reads the fake GPU's 37 % through `keda`; fails showing `logs()` otherwise.
fn reads_the_value(keda: &mut Keda, logs: &dyn Fn() -> String) {
    let so = trigger();
    let (name, _, _) = keda.metric_spec(&so).unwrap();
    let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 37.0));
    assert_eq!(
        got.map(|v| v.0).map_err(|e| e.to_string()),
        Ok(37.0),
        "{}",
        logs()
    );
}

/// Waits until `dump` shows the collector's one agent refused with an error containing
/// `marker`, checks that KEDA then reads `UNAVAILABLE` for that node's pods (never the data of
/// the refused agent), and returns the error.
fn refused(collector: &mut Collector, marker: &str) -> String {
    let view = collector
        .wait_dump(WAIT, |v| {
            v["nodes"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(marker))
        })
        .unwrap();
    let mut keda = Keda::connect(&collector.addr);
    let so = trigger();
    let (name, _, _) = keda.metric_spec(&so).unwrap();
    let got = keda.metrics(&so, &name);
    assert!(is_code(&got, Code::Unavailable), "{got:?}");
    view["nodes"][0]["last_error"].as_str().unwrap().to_owned()
}

#[test]
fn with_one_certificate_for_every_agent_the_collector_checks_the_shared_name_instead_of_the_node() {
    let dir = Scratch::new("tls-shared");
    // The certificate `cargo xtask deploy` gives every agent: the Service's name, no node.
    let shared = "gpuscale-agent.gpuscale-system.svc";
    let Setup {
        ca_file,
        client: (cli_crt, cli_key),
        mut agent,
        agent_addr,
        pods,
        ..
    } = setup(&dir, &[shared]);
    let collector_with = |name: &str| {
        Collector::spawn(
            &dir,
            &["--agents", &agent_addr, "--pods-file", s(&pods)]
                .into_iter()
                .chain(agent_tls_flags(&ca_file, &cli_crt, &cli_key))
                .chain(["--agent-tls-server-name", name])
                .collect::<Vec<_>>(),
            &[],
        )
    };

    // The shared name: the agent's snapshots are read, though its certificate names no node.
    let collector = collector_with(shared);
    reads_the_value(&mut Keda::connect(&collector.addr), &|| {
        format!("collector log:\n{}", collector.daemon.log())
    });
    drop(collector);

    // Another name: a certificate of the same CA issued for something else is not an agent's.
    let mut collector = collector_with("gpuscale-agent.other-namespace.svc");
    let why = refused(&mut collector, "--agent-tls-server-name");
    assert!(
        why.contains(shared) && why.contains("gpuscale-agent.other-namespace.svc"),
        "the refusal names what the certificate carries and the name wanted: {why}"
    );

    // Not a DNS name: refused at start, naming the flag's value.
    let out = Command::new(collector_bin())
        .args(["serve", "--agents", &agent_addr, "--pods-file", s(&pods)])
        .args(agent_tls_flags(&ca_file, &cli_crt, &cli_key))
        .args(["--agent-tls-server-name", "not a name"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"not a name\" is not a DNS name"),
        "{err}"
    );
    assert!(agent.terminate().success());
}

/// `GetSnapshot` from the agent at `addr` in plain text: the node name, or the error.
fn tonic_plain_snapshot(addr: &str) -> Result<String, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = proto::agent::agent_client::AgentClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| e.to_string())?;
        client
            .get_snapshot(proto::agent::SnapshotRequest {})
            .await
            .map(|r| r.into_inner().node_name)
            .map_err(|e| e.to_string())
    })
}

/// `GetSnapshot` from the agent at `addr` over TLS (its certificate is checked for the chain
/// only, as the collector does).
fn tls_snapshot(addr: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<String, String> {
    use gpuscale_health::tls::{ClientFiles, PemFile, ServerNames};
    let files = ClientFiles {
        ca: PemFile::new("--agent-ca", ca),
        identity: identity.map(|(c, k)| (PemFile::new("c", c), PemFile::new("k", k))),
    };
    let config = std::sync::Arc::new(files.config(ServerNames::CheckedByCaller).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let (channel, _) = gpuscale_health::tls::channel(&ep, config).await?;
        proto::agent::agent_client::AgentClient::new(channel)
            .get_snapshot(proto::agent::SnapshotRequest {})
            .await
            .map(|r| r.into_inner().node_name)
            .map_err(|e| e.to_string())
    })
}

/// An HTTPS GET trusting `ca`: (status line, body).
fn https_get(addr: &str, ca: &Path, path: &str) -> (String, String) {
    use gpuscale_health::tls::{ClientFiles, PemFile, ServerNames};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files = ClientFiles {
        ca: PemFile::new("ca", ca),
        identity: None,
    };
    let mut config = files.config(ServerNames::Checked).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let name = gpuscale_health::tls::server_name_of(addr).unwrap();
        let (mut s, _) = gpuscale_health::tls::connect(addr, name, std::sync::Arc::new(config))
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    })
}
