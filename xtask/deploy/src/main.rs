//! `gpuscale-deploy` (run by `cargo xtask deploy`): install gpuscale into a cluster. Flags are
//! parsed here; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use gpuscale_deploy::certificates::{self, DEFAULT_KEDA_NAMESPACE};
use gpuscale_deploy::{checks, cluster, render, snippet, DEFAULT_NAMESPACE};

/// Build the gpuscale image (no Docker daemon needed), push it, apply the manifests in deploy/
/// and wait for the agent DaemonSet and the collector Deployment to be ready.
#[derive(Parser)]
#[command(name = "cargo xtask deploy", bin_name = "cargo xtask deploy", version)]
struct Cli {
    /// kubeconfig context to install into (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Namespace for gpuscale's objects.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// The namespace KEDA runs in: its client certificate and the ClusterTriggerAuthentication
    /// `gpuscale` are made there, and only its pods may reach the collector.
    #[arg(long, default_value = DEFAULT_KEDA_NAMESPACE)]
    keda_namespace: String,
    /// Registry the cluster pulls from (host[:port][/path]): the image is built from release
    /// binaries, pushed there as gpuscale:<version>, and the manifests pinned to its digest.
    /// Loopback registries are spoken to over plain HTTP.
    #[arg(long, conflicts_with = "image")]
    registry: Option<String>,
    /// Use this image instead of building one (pinned to its digest, looked up in its registry).
    #[arg(long)]
    image: Option<String>,
    /// Print the rendered manifests to stdout; contacts no cluster and pushes nothing (with
    /// --registry the image is still built, to pin its digest).
    #[arg(long)]
    dry_run: bool,
    /// Delete everything the install created.
    #[arg(long, conflicts_with_all = ["registry", "image", "dry_run"])]
    uninstall: bool,
    /// A variant from deploy/overlays/ (old-kernel: CAP_SYS_RESOURCE for kernels 5.8–5.10;
    /// cdi: GPU nodes without the NVIDIA container runtime; cert-manager: cert-manager issues
    /// and renews the certificates instead of the installer).
    #[arg(long)]
    overlay: Option<String>,
    /// Speak plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    plain_http: bool,
    /// How long to wait for the rollout (or the namespace's deletion), e.g. 300s or 10m.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
    /// The deploy/ folder.
    #[arg(long, default_value_os_t = workspace_root().join("deploy"))]
    manifests: PathBuf,
    /// Use the gpuscale-agent and gpuscale-collector in this folder instead of building release
    /// binaries.
    #[arg(long)]
    binaries: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    vocab::duration::parse(s).map_err(|why| format!("{why}; write e.g. 300s or 10m"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn step(s: &str) {
    eprintln!("\n==> {s}");
}

fn say(s: String) {
    eprintln!("{s}");
}

/// The kustomization folder for `--overlay`.
fn kustomization_dir(manifests: &Path, overlay: Option<&str>) -> anyhow::Result<PathBuf> {
    let Some(name) = overlay else {
        return Ok(manifests.join("base"));
    };
    let dir = manifests.join("overlays").join(name);
    if !dir.is_dir() {
        let known: Vec<String> = std::fs::read_dir(manifests.join("overlays"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        bail!(
            "--overlay {name}: no folder {}; the overlays are: {}",
            dir.display(),
            known.join(", ")
        );
    }
    Ok(dir)
}

/// Builds the release binaries (or takes them from --binaries).
fn binaries(cli: &Cli) -> anyhow::Result<Vec<PathBuf>> {
    let dir = match &cli.binaries {
        Some(d) => d.clone(),
        None => {
            step("building release binaries: cargo build --release -p agent -p collector");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(workspace_root())
                .args(["build", "--release", "-p", "agent", "-p", "collector"])
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("cargo build --release failed ({status}); fix the build, then rerun");
            }
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"))
                .join("release")
        }
    };
    let bins: Vec<PathBuf> = ["gpuscale-agent", "gpuscale-collector"]
        .iter()
        .map(|b| dir.join(b))
        .collect();
    for b in &bins {
        if !b.is_file() {
            bail!(
                "{} is missing; build it or point --binaries at the folder that has it",
                b.display()
            );
        }
    }
    Ok(bins)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = kustomization_dir(&cli.manifests, cli.overlay.as_deref())?;
    let mut objects = render::render(
        &dir,
        &render::Options {
            namespace: Some(cli.namespace.clone()),
            image: None,
            keda_namespace: Some(cli.keda_namespace.clone()),
        },
    )?;
    checks::check(&objects)?;

    if cli.uninstall {
        step(&format!(
            "removing gpuscale from the cluster ({} objects)",
            objects.len()
        ));
        let (client, name) = cluster::connect(cli.context.as_deref()).await?;
        say(format!("cluster: {name}"));
        cluster::delete(&client, &objects, cli.timeout, &mut say).await?;
        certificates::remove(&client, &cli.keda_namespace, &mut say).await?;
        eprintln!(
            "\ngpuscale is uninstalled (ScaledObjects that point at it now fail; delete them too)"
        );
        return Ok(());
    }

    let image = match (&cli.registry, &cli.image) {
        (Some(registry), _) => {
            let bins = binaries(&cli)?;
            if cli.dry_run {
                step("building the image (not pushed: --dry-run)");
                let image =
                    gpuscale_deploy::image::build(&bins, env!("CARGO_PKG_VERSION"), &mut say)?;
                Some(format!(
                    "{}/{}@{}",
                    registry.trim_end_matches('/'),
                    gpuscale_deploy::registry::REPOSITORY,
                    image.digest
                ))
            } else {
                step("building and pushing the image");
                let (_, pinned) =
                    gpuscale_deploy::build_and_push(&bins, registry, cli.plain_http, &mut say)
                        .await?;
                say(format!("pushed {pinned}"));
                Some(pinned)
            }
        }
        (None, Some(reference)) if cli.dry_run => Some(reference.clone()),
        (None, Some(reference)) => {
            step(&format!("looking up the digest of {reference}"));
            let reg = gpuscale_deploy::registry::Registry::new(reference, cli.plain_http)?;
            let pinned = reg.resolve(reference).await?;
            say(format!("pinned: {pinned}"));
            Some(pinned)
        }
        (None, None) if cli.dry_run => {
            eprintln!(
                "note: no --registry or --image: the manifests name the unpinned image \
                 `gpuscale:{}`",
                env!("CARGO_PKG_VERSION")
            );
            None
        }
        (None, None) => bail!(
            "say where the image comes from: --registry HOST[:PORT] (a registry your cluster \
             pulls from; the image is built and pushed there) or --image REF (an image you pushed)"
        ),
    };
    if let Some(image) = &image {
        render::set_image(&mut objects, gpuscale_deploy::IMAGE_NAME, image);
    }

    if cli.dry_run {
        print!("{}", render::to_yaml(&objects)?);
        if certificates::Issuance::of(&objects) == certificates::Issuance::Installer {
            eprintln!(
                "note: the TLS Secrets ({}, {}, {}) are not printed: a deploy makes them (or \
                 use --overlay cert-manager)",
                certificates::CA_SECRET,
                certificates::COLLECTOR_SECRET,
                certificates::AGENT_SECRET
            );
        }
        return Ok(());
    }

    step("connecting to the cluster");
    let (client, name) = cluster::connect(cli.context.as_deref()).await?;
    say(format!("cluster: {name}"));
    for note in cluster::preflight(&client, &objects).await {
        eprintln!("warning: {note}");
    }
    step(&format!(
        "applying {} objects and the TLS certificates (server-side apply, field manager {})",
        objects.len(),
        cluster::FIELD_MANAGER
    ));
    let mut warnings = gpuscale_deploy::install(
        &client,
        &objects,
        &cli.namespace,
        &cli.keda_namespace,
        cli.timeout,
        &mut say,
    )
    .await?;
    step("waiting for the rollout");
    warnings.extend(
        cluster::wait_rollout(
            &client,
            &cli.namespace,
            "gpuscale-agent",
            "gpuscale-collector",
            cli.timeout,
            &mut say,
        )
        .await?,
    );
    for w in warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "\ngpuscale is running in namespace {ns}. Check it with\n  kubectl -n {ns} exec deploy/gpuscale-collector -- gpuscale-collector dump\n\
         and scale a workload with a ScaledObject such as (more in deploy/examples/):\n",
        ns = cli.namespace
    );
    print!("{}", snippet::scaled_object(&cli.namespace));
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
