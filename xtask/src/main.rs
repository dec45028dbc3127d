//! `cargo xtask …`: the project's own commands. One module per command.

use clap::{Parser, Subcommand};

mod bench;
mod bench_scale;
mod demo;
mod forward;
mod fuzz;
mod gpu_check;
mod scenario;
mod setup;
mod test;
mod util;

/// gpuscale development tasks.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the agent's CPU and memory overhead on simulated GPUs and print the numbers for docs/BENCHMARKS.md.
    Bench(bench::Options),
    /// One real collector following many simulated GPU nodes (the real agent API, from one
    /// process) under a KEDA-like load: its CPU and memory, GetMetrics latency, freshness and
    /// activation time: `--nodes N --gpus-per-node G --duration D [--json]` (--help lists all).
    BenchScale(forward::Options),
    /// A local Kubernetes cluster of real processes on simulated GPU nodes, with the real KEDA
    /// and gpuscale: `up [--dir DIR] [--nodes N] [--gpus-per-node G]`, `down [--dir DIR]`.
    Cluster(forward::Options),
    /// Run the agent on simulated GPUs whose load follows a short story, with a live dump.
    Demo(demo::Options),
    /// Install gpuscale into a cluster: build the image without Docker, push it, apply deploy/
    /// and wait for the rollout (--dry-run prints the manifests; --uninstall removes it).
    Deploy(forward::Options),
    /// Fuzz every parser of outside input (trigger metadata, label selectors, the pods file,
    /// agent snapshots, the ring file) with cargo fuzz, each for a bounded time
    /// (`--seconds N`, default 60; `--target NAME` to pick).
    Fuzz(fuzz::Options),
    /// Check the agent and collector on this machine's NVIDIA GPU against NVML's own numbers
    /// (skips without a GPU), or write the bundle that does it elsewhere (--bundle DIR).
    GpuCheck(gpu_check::Options),
    /// Set up everything a fresh machine needs, then run every test.
    Test(test::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(o) => bench::run(o),
        Command::BenchScale(o) => bench_scale::run_bench(o),
        Command::Demo(o) => demo::run(o),
        Command::Cluster(o) => forward::run("gpuscale-cluster", "the local cluster", o),
        Command::Deploy(o) => forward::run("gpuscale-deploy", "the installer", o),
        Command::Fuzz(o) => fuzz::run(o),
        Command::GpuCheck(o) => gpu_check::run(o),
        Command::Test(o) => test::run(o),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
