//! `cargo xtask test`: every set-up step a fresh machine needs, then every test.
//!
//! Steps (each idempotent, each announced):
//! 1. the eBPF toolchain ([`crate::setup::ebpf_toolchain`]), so the agent embeds its eBPF object,
//!    and the Python venv the gpu-check bundle tests use ([`crate::setup::gpu_check_python`]);
//!    and what the deploy tests use: kubernetes-validate ([`crate::setup::kubernetes_validate`])
//!    and a local registry ([`crate::setup::docker_registry`]); and the local cluster's
//!    components, built from their Go modules ([`crate::setup::cluster_components`]);
//! 2. build the workspace (the agent binary and the fake NVML library the end-to-end tests run);
//! 3. `cargo test --workspace` (unit, end-to-end, and benchmarks in their quick test mode);
//! 4. the loom models of the shared-memory ring (`gpuscale-ring` with `--cfg loom`, its own
//!    target dir);
//! 5. the ring's tests under Miri (the pinned nightly with `miri`, [`crate::setup::miri`]);
//! 6. every `cargo fuzz` target for a bounded time, 30 s each by default ([`crate::fuzz`]: the
//!    same nightly, cargo-fuzz; a crash, hang or blow-up fails the run).

use anyhow::Result;

use crate::util::{cargo, run as run_cmd, step, target_dir};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Options {
    /// Skip the loom model check (it builds loom once, in target/loom).
    #[arg(long)]
    no_loom: bool,
    /// Skip the Miri run of the ring's tests (it installs the nightly's miri component once).
    #[arg(long)]
    no_miri: bool,
    /// Skip the fuzz targets (they build once with the nightly, into fuzz/target).
    #[arg(long)]
    no_fuzz: bool,
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    fuzz_seconds: u64,
}

/// Runs the set-up and every test.
pub fn run(o: Options) -> Result<()> {
    crate::setup::ebpf_toolchain()?;
    crate::setup::tracefs()?;
    crate::setup::gpu_check_python()?;
    crate::setup::kubernetes_validate()?;
    crate::setup::docker_registry()?;
    crate::setup::cluster_components()?;
    step("building the workspace (agent, fake NVML, end-to-end harness)");
    run_cmd(cargo().args(["build", "--workspace"]), "cargo build")?;

    step("running every test: cargo test --workspace --all-targets");
    let mut test = cargo();
    test.args(["test", "--workspace", "--all-targets"]);
    if running_as_root() {
        // As root (as CI runs) every privileged test can run, so none may skip: a CI that lost
        // root, cgroup v2 or the eBPF object must go red, not green.
        eprintln!("as root: {REQUIRE_PRIVILEGED}=1, so a privileged test that cannot run fails");
        test.env(REQUIRE_PRIVILEGED, "1");
    }
    run_cmd(&mut test, "cargo test")?;

    if o.no_loom {
        eprintln!("skipped: loom model check (--no-loom)");
    } else {
        step("checking the ring under loom: seqlock, push racing read (every interleaving, bounded preemption)");
        run_cmd(
            cargo()
                .args([
                    "test",
                    "-p",
                    "gpuscale-ring",
                    "--lib",
                    "--release",
                    "loom_model",
                ])
                .env("RUSTFLAGS", "--cfg loom")
                .env("CARGO_TARGET_DIR", target_dir().join("loom")),
            "loom model check",
        )?;
    }
    if o.no_miri {
        eprintln!("skipped: Miri run of the ring's tests (--no-miri)");
    } else {
        crate::setup::miri()?;
        step("running the ring's tests under Miri (undefined behaviour, data races, weak memory)");
        run_cmd(
            crate::setup::nightly_cargo().args(["miri", "test", "-p", "gpuscale-ring"]),
            "cargo miri test",
        )?;
    }
    if o.no_fuzz {
        eprintln!("skipped: fuzzing (--no-fuzz)");
    } else {
        crate::fuzz::run(crate::fuzz::Options {
            seconds: o.fuzz_seconds,
            targets: Vec::new(),
        })?;
    }
    eprintln!("\nall tests passed");
    Ok(())
}

/// The variable that turns a privileged test's skip into a failure (read by the test harnesses).
const REQUIRE_PRIVILEGED: &str = "GPUSCALE_REQUIRE_PRIVILEGED";

/// Whether this process runs as root: `/proc/self` belongs to the process's effective user.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
