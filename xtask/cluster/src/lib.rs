//! A local Kubernetes cluster with simulated GPU nodes, the real KEDA and gpuscale, for
//! `cargo xtask cluster up|down`, `cargo xtask demo --cluster` and the tests that need the real
//! control plane. Every component is a local process; see docs/CLUSTER.md.
//!
//! Modules: [`components`] (building etcd, Kubernetes, kwok, KEDA and toxiproxy from their Go
//! modules),
//! [`pki`] (certificates and tokens), [`net`] (the pod network namespace), [`process`]
//! (detached processes recorded by PID and start time), [`up`] (bringing it all up and down),
//! [`sim`] (the node simulator: agents and GPU pods' processes), [`demo`] (`demo --cluster`), [`bench`] (`bench --cluster`: gpuscale against the Prometheus chain), [`load`] (the simulated-load
//! annotation), [`state`] (`cluster.json`), [`workload`] (the GPU Deployments of the demo and the tests), [`ops`] (what tests do to a running cluster: restart the API server, compact etcd), [`kube_util`].
#![deny(missing_docs)]

pub mod bench;
pub mod components;
pub mod demo;
pub mod kube_util;
pub mod load;
pub mod net;
pub mod ops;
pub mod pki;
pub mod process;
pub mod sim;
pub mod state;
pub mod up;
pub mod workload;
