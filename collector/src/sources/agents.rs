//! Agent streams: one task per agent address holds `WatchSnapshots` open, writes each
//! snapshot into the [`Cluster`] view, and reconnects with exponential backoff (100 ms doubling
//! to 5 s) when the agent is unreachable or restarts. One agent's trouble never delays another.
//! The set of addresses is fixed (`--agents`) or follows discovery (`--agent-service`):
//! [`Fleet::set`] starts streams for new addresses and stops and retires the ones that left.
//!
//! With TLS (`--agent-ca`, and `--agent-client-cert`/`--agent-client-key` for mutual TLS) an
//! agent's certificate must chain to the agent CA, and it is the agent's identity: agents are
//! dialed by pod IP, so the certificate is not checked against the address but must name (as a
//! DNS name) the node every snapshot reports. A snapshot for another node is refused, so one
//! agent cannot take over another node's pods. The files are re-read for each new connection
//! when they changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuscale_health::tls::{self, ClientTls};
use proto::agent::agent_client::AgentClient;
use proto::agent::WatchRequest;
use rustls::pki_types::CertificateDer;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::sources::validate;
use crate::sources::view::Cluster;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An agent's endpoint, with keep-alives so a hung agent is noticed.
fn endpoint(address: &str) -> Result<Endpoint, String> {
    crate::endpoint(address)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
        })
        .map_err(|e| format!("agent address {e}"))
}

/// Checks every address before anything starts, so a typo fails at start.
pub fn validate(addresses: &[String]) -> Result<(), String> {
    addresses.iter().try_for_each(|a| endpoint(a).map(drop))
}

/// The oldest agent API revision this collector reads: revision 1 sent metric names and
/// attributions as strings in fields revision 2 reserved, so its metrics would all read as absent.
pub const MIN_AGENT_API: u32 = 2;

/// A channel to the agent at `ep`, over TLS when `tls` is given: then also the agent's
/// certificate.
async fn connect(
    ep: &Endpoint,
    tls: Option<&ClientTls>,
) -> Result<(Channel, Option<CertificateDer<'static>>), String> {
    let how = if tls.is_some() {
        "connect over TLS"
    } else {
        "connect"
    };
    tls::channel_to(ep, tls.map(|t| t.get()))
        .await
        .map_err(|e| format!("{how}: {e}"))
}

/// Whether the agent's certificate (if any) lets it report `node_name`; `Err` says why not.
fn check_identity(cert: Option<&CertificateDer<'_>>, node_name: &str) -> Result<(), String> {
    match cert {
        None => Ok(()),
        Some(cert) if tls::names_identity(cert, node_name) => Ok(()),
        Some(cert) => Err(format!(
            "the agent reported node {}, but its certificate names {} (a certificate must name \
             the node its agent runs on)",
            crate::quote(node_name),
            crate::quote(&tls::dns_names(cert))
        )),
    }
}

async fn stream_once(
    cluster: &Cluster,
    node: usize,
    ep: &Endpoint,
    tls: Option<&ClientTls>,
) -> Result<(), String> {
    let (channel, cert) = connect(ep, tls).await?;
    // The node name last found in the certificate, so it is checked once, not per snapshot.
    let mut allowed: Option<String> = None;
    let mut client = AgentClient::new(channel);
    let mut stream = client
        .watch_snapshots(WatchRequest { min_interval_ms: 0 })
        .await
        .map_err(|s| format!("WatchSnapshots: {}", s.message()))?
        .into_inner();
    cluster.write(|v| {
        let n = &mut v.nodes[node];
        n.connected = true;
        n.last_error.clear();
    });
    tracing::info!("streaming");
    loop {
        match stream.message().await {
            Ok(Some(snap)) if snap.api_version < MIN_AGENT_API => {
                return Err(format!(
                    "the agent speaks API revision {}, this collector reads {MIN_AGENT_API} and \
                     later: upgrade the agent to this collector's release",
                    snap.api_version
                ))
            }
            Ok(Some(snap)) => {
                let at = Instant::now();
                if allowed.as_deref() != Some(snap.node_name.as_str()) {
                    if let Err(why) = check_identity(cert.as_ref(), &snap.node_name) {
                        cluster.write(|v| v.refuse(node, why));
                        continue;
                    }
                    allowed = Some(snap.node_name.clone());
                }
                match validate::check(&snap) {
                    Ok(()) => cluster.write(|v| v.update(node, snap, at)),
                    Err(validate::Refused(why)) => cluster.write(|v| v.refuse(node, why)),
                }
            }
            Ok(None) => return Err("the agent closed the stream".into()),
            Err(s) => return Err(format!("stream: {}", s.message())),
        }
    }
}

/// Runs the stream of agent `node` forever (until the task is dropped).
pub async fn follow(
    cluster: Arc<Cluster>,
    node: usize,
    address: String,
    tls: Option<Arc<ClientTls>>,
) {
    let span = tracing::info_span!("agent", %address);
    async move {
        let ep = match endpoint(&address) {
            Ok(ep) => ep,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let mut backoff = BACKOFF_START;
        loop {
            let started = Instant::now();
            let err = stream_once(&cluster, node, &ep, tls.as_deref())
                .await
                .unwrap_err();
            // A stream that ran a while was healthy: start the backoff afresh.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_START;
            }
            tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "agent unavailable");
            cluster.write(|v| {
                let n = &mut v.nodes[node];
                n.connected = false;
                n.last_error = err;
                n.reconnects += 1;
            });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    .instrument(span)
    .await
}

/// The agents being followed, by address.
pub struct Fleet {
    cluster: Arc<Cluster>,
    tls: Option<Arc<ClientTls>>,
    streams: Mutex<HashMap<String, (usize, tokio::task::AbortHandle)>>,
}

impl Fleet {
    /// Follows no agent yet; will dial agents over TLS with `tls`.
    pub fn new(cluster: Arc<Cluster>, tls: Option<Arc<ClientTls>>) -> Fleet {
        Fleet {
            cluster,
            tls,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// Makes `addresses` the followed set: starts a stream for each new address, and stops
    /// the streams of addresses that left (their nodes leave the view at once). Must run on a
    /// tokio runtime. Invalid addresses are skipped with a warning.
    pub fn set(&self, addresses: &[String]) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = streams
            .keys()
            .filter(|a| !addresses.contains(a))
            .cloned()
            .collect();
        for address in gone {
            if let Some((node, task)) = streams.remove(&address) {
                task.abort();
                self.cluster.write(|v| v.retire_node(node));
                tracing::info!(%address, "agent left; stopped following it");
            }
        }
        for address in addresses {
            if streams.contains_key(address) {
                continue;
            }
            if let Err(e) = endpoint(address) {
                tracing::warn!("skipping agent: {e}");
                continue;
            }
            let mut node = 0;
            self.cluster.write(|v| node = v.add_node(address));
            let task = tokio::spawn(follow(
                self.cluster.clone(),
                node,
                address.clone(),
                self.tls.clone(),
            ));
            streams.insert(address.clone(), (node, task.abort_handle()));
            tracing::info!(%address, "following agent");
        }
    }

    /// How many agents are followed.
    pub fn len(&self) -> usize {
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no agent is followed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every stream.
    pub fn stop(&self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (_, task)) in streams.drain() {
            task.abort();
        }
    }
}
