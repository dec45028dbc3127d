//! `cargo xtask deploy`: builds and runs the installer, package `gpuscale-deploy`
//! (`xtask/deploy`), with the arguments given. The installer is its own package so that the
//! other xtask commands never compile kube or the registry client.
//!
//! `cargo xtask deploy --help` prints the installer's options.

use anyhow::{Context, Result};

use crate::util::cargo;

/// Options of `cargo xtask deploy`: everything is handed to `gpuscale-deploy`.
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Options {
    /// The installer's arguments: [--context C] [--namespace N] [--registry R | --image REF]
    /// [--dry-run] [--uninstall] [--overlay NAME] … (--help lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Builds `gpuscale-deploy` and runs it; its exit status becomes ours.
pub fn run(o: Options) -> Result<()> {
    eprintln!("building the installer (cargo build -p gpuscale-deploy; the first time compiles kube and the registry client)");
    let status = cargo()
        .args(["run", "--quiet", "--package", "gpuscale-deploy", "--"])
        .args(&o.args)
        .status()
        .context("could not start cargo run -p gpuscale-deploy")?;
    if !status.success() {
        // The installer has said what went wrong; only pass its status on.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
