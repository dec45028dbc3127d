//! `cargo xtask bench-scale`: builds the collector and the scale simulator (package
//! `gpuscale-scale`, `xtask/scale`) in release and runs the simulator against that collector
//! with the arguments given (`cargo xtask bench-scale --help` lists them). A package of its own
//! so that the other xtask commands never compile tonic.

use anyhow::{Context, Result};

use crate::forward::Options;
use crate::util::{cargo, run, step, target_dir};

/// Builds both in release, then runs `gpuscale-scale --collector <release collector> ARGS…`.
pub fn run_bench(o: Options) -> Result<()> {
    step("building the collector and the scale simulator in release (cargo build --release -p collector -p gpuscale-scale)");
    run(
        cargo().args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "collector",
            "-p",
            "gpuscale-scale",
        ]),
        "cargo build --release",
    )?;
    let release = target_dir().join("release");
    let status = std::process::Command::new(release.join("gpuscale-scale"))
        .arg("--collector")
        .arg(release.join("gpuscale-collector"))
        .args(o.args())
        .status()
        .context("could not start gpuscale-scale")?;
    if !status.success() {
        // It has said what went wrong; only pass its status on.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
