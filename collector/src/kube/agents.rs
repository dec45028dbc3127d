//! Agent discovery (`--agent-service NAMESPACE/NAME`): a watch of the EndpointSlices of the
//! agents' headless Service keeps the [`Fleet`] on the agents they list.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gpuscale_health::ops::lock;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher;

use super::watch::{follow, Change, Contact};
use crate::sources::agents::{Agent, Fleet};
use crate::sources::pods::SourceHealth;

/// `NAMESPACE/NAME` of `--agent-service`.
pub fn parse_service(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!(
            "--agent-service {s:?}: write NAMESPACE/NAME of the agents' headless Service, such \
             as gpuscale-system/gpuscale-agent"
        )),
    }
}

/// The agents an EndpointSlice lists: ready endpoints on its port named `grpc` (or its only
/// port), each with the node it runs on (`nodeName`), which the agent must then report.
pub fn slice_agents(slice: &EndpointSlice) -> Vec<Agent> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .or(if ports.len() == 1 {
            ports.first()
        } else {
            None
        })
        .and_then(|p| p.port);
    let Some(port) = port else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter().map(move |a| (a, e.node_name.as_ref())))
        .map(|(a, node)| Agent {
            address: if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            },
            node: node.cloned(),
        })
        .collect()
}

/// Follows the EndpointSlices of Service `namespace/service` and keeps `fleet` on the agents
/// they list, until the task is dropped; `contact` says whether they were listed and the last
/// error.
pub async fn discover_agents(
    client: kube::Client,
    namespace: String,
    service: String,
    fleet: Arc<Fleet>,
    contact: Arc<AgentDiscovery>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let scope = format!("in namespace {namespace} (Service {service})");
    let mut slices: HashMap<String, Vec<Agent>> = HashMap::new();
    follow(
        api,
        config,
        "endpointslices.discovery.k8s.io",
        &scope,
        &contact.contact,
        |s: EndpointSlice| {
            Some((
                s.metadata.name.clone().unwrap_or_default(),
                slice_agents(&s),
            ))
        },
        |change| {
            match change {
                Change::Reset(all) => slices = all.into_iter().collect(),
                Change::Apply((name, agents)) => {
                    slices.insert(name, agents);
                }
                Change::Delete((name, _)) => {
                    slices.remove(&name);
                }
            }
            let mut agents: Vec<Agent> = slices.values().flatten().cloned().collect();
            agents.sort();
            agents.dedup();
            fleet.set(&agents);
        },
    )
    .await;
}

/// The health of agent discovery.
#[derive(Default)]
pub struct AgentDiscovery {
    contact: Mutex<Contact>,
}

impl AgentDiscovery {
    /// Whether the agents' EndpointSlices were listed, and the last error.
    pub fn health(&self) -> SourceHealth {
        lock(&self.contact).health("agent endpoints")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(ports: Vec<(&str, i32)>, endpoints: Vec<(&str, Option<bool>)>) -> EndpointSlice {
        let node = |a: &str| (a == "10.0.0.1").then(|| "gpu-node-1".to_owned());
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: endpoints
                .into_iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![a.to_owned()],
                    node_name: node(a),
                    conditions: Some(EndpointConditions {
                        ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.to_owned()),
                        port: Some(port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn endpoint_slices_give_ready_agents_on_the_grpc_port() {
        let s = slice(
            vec![("http", 7702), ("grpc", 7701)],
            vec![
                ("10.0.0.1", Some(true)),
                ("10.0.0.2", Some(false)),
                ("fd00::3", None),
            ],
        );
        assert_eq!(
            slice_agents(&s),
            [
                Agent {
                    address: "10.0.0.1:7701".into(),
                    node: Some("gpu-node-1".into())
                },
                Agent::at("[fd00::3]:7701")
            ]
        );
        // One unnamed port is the port; several without `grpc` give nothing rather than a guess.
        let one = slice(vec![("", 9000)], vec![("10.0.0.4", None)]);
        assert_eq!(slice_agents(&one), [Agent::at("10.0.0.4:9000")]);
        let ambiguous = slice(vec![("a", 1), ("b", 2)], vec![("10.0.0.5", None)]);
        assert!(slice_agents(&ambiguous).is_empty());
    }

    #[test]
    fn agent_service_is_namespace_slash_name() {
        assert_eq!(
            parse_service("gpuscale-system/gpuscale-agent").unwrap(),
            ("gpuscale-system".to_owned(), "gpuscale-agent".to_owned())
        );
        for bad in ["gpuscale-agent", "/x", "x/", "a/b/c"] {
            let e = parse_service(bad).unwrap_err();
            assert!(e.contains("NAMESPACE/NAME"), "{e}");
        }
    }
}
