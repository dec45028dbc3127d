//! `gpuscale-cluster` (run by `cargo xtask cluster`): a local Kubernetes cluster with simulated
//! GPU nodes, KEDA and gpuscale. Flags are parsed here; the work is in the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use gpuscale_cluster::{bench, components, demo, ops, sim, up};

/// A local cluster of real Kubernetes, KEDA and gpuscale processes on simulated GPU nodes.
#[derive(Parser)]
#[command(
    name = "cargo xtask cluster",
    bin_name = "cargo xtask cluster",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cluster (or find it up); writes DIR/cluster.json.
    Up {
        /// The cluster folder: state, logs, kubeconfig.
        #[arg(long, default_value_os_t = up::default_dir())]
        dir: PathBuf,
        /// Simulated GPU nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Fake GPUs per node (its nvidia.com/gpu capacity).
        #[arg(long, default_value_t = 4)]
        gpus_per_node: u32,
    },
    /// Stop every process the cluster started and remove its cgroups and pod network.
    Down {
        /// The cluster folder.
        #[arg(long, default_value_os_t = up::default_dir())]
        dir: PathBuf,
    },
    /// The demo's story on the cluster (brings it up first): `cargo xtask demo --cluster`.
    Demo {
        /// The cluster folder.
        #[arg(long, default_value_os_t = up::default_dir())]
        dir: PathBuf,
        /// Stop after this long (`90s`, `3m`); default: run until Ctrl-C.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<std::time::Duration>,
        /// Print each refresh below the previous one instead of redrawing the screen.
        #[arg(long)]
        no_clear: bool,
    },
    /// A GPU load step → replicas, through gpuscale and through Prometheus + KEDA's prometheus
    /// trigger, side by side (brings the cluster up first): `cargo xtask bench --cluster`.
    Bench {
        /// The cluster folder.
        #[arg(long, default_value_os_t = up::default_dir())]
        dir: PathBuf,
        /// Load steps per chain (0: none).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Wakes from zero per trigger kind, external-push and polling (0: none).
        #[arg(long, default_value_t = 10)]
        wakes: usize,
    },
    /// Every process of the cluster, whether it runs, and its resident memory.
    Status {
        /// The cluster folder.
        #[arg(long, default_value_os_t = up::default_dir())]
        dir: PathBuf,
    },
    /// Build the components (etcd, Kubernetes, kwok, KEDA, and toxiproxy for the network-fault
    /// tests) from their Go modules, if not built.
    Build {
        /// Rebuild even what is built.
        #[arg(long)]
        force: bool,
    },
    /// The node simulator (started by `up`).
    #[command(hide = true)]
    Sim {
        /// The simulator's configuration (DIR/sim.json).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build { force } => components::ensure_all(force),
        Cmd::Bench { dir, steps, wakes } => runtime(false).and_then(|rt| {
            rt.block_on(async {
                let info = up::up(&options(dir.clone(), 2, 4)?).await?;
                bench::run(&info, &dir, steps, wakes).await
            })
        }),
        Cmd::Status { dir } => ops::status(&dir).map(|s| print!("{s}")),
        Cmd::Down { dir } => {
            eprintln!("==> taking down the cluster in {}", dir.display());
            up::down(&dir).map(|()| eprintln!("the cluster is down"))
        }
        Cmd::Up {
            dir,
            nodes,
            gpus_per_node,
        } => runtime(false).and_then(|rt| {
            rt.block_on(async { up::up(&options(dir, nodes, gpus_per_node)?).await })
                .map(|_| ())
        }),
        Cmd::Demo {
            dir,
            duration,
            no_clear,
        } => runtime(false).and_then(|rt| {
            rt.block_on(async {
                let info = up::up(&options(dir, 2, 4)?).await?;
                demo::run(&info, duration, no_clear).await
            })
        }),
        // One thread: the children's PR_SET_PDEATHSIG fires when the thread that forked them
        // exits, so they must all be forked by a thread that lives as long as the simulator.
        Cmd::Sim { config } => runtime(true).and_then(|rt| rt.block_on(sim::run(&config))),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// What `up` makes, with this executable as the node simulator.
fn options(dir: PathBuf, nodes: u32, gpus_per_node: u32) -> anyhow::Result<up::Options> {
    Ok(up::Options {
        dir,
        nodes,
        gpus_per_node,
        exe: std::env::current_exe()?,
    })
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    vocab::duration::parse(s).map_err(|why| format!("{why}; write e.g. 90s or 3m"))
}

fn runtime(current_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    Ok(b.enable_all().build()?)
}
