//! `cargo xtask deploy` and `cargo xtask cluster`: build and run the installer (package
//! `gpuscale-deploy`, `xtask/deploy`) or the local cluster (package `gpuscale-cluster`,
//! `xtask/cluster`) with the arguments given. They are packages of their own so that the other
//! xtask commands never compile kube or the registry client.
//!
//! `cargo xtask deploy --help` and `cargo xtask cluster --help` print their options.

use anyhow::{Context, Result};

use crate::util::cargo;

/// Options of a forwarded command: everything is handed to the package's binary.
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Options {
    /// The command's arguments (--help lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

impl Options {
    /// The arguments, as given.
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

/// Builds `package` and runs its binary with the arguments; its exit status becomes ours.
pub fn run(package: &str, what: &str, o: Options) -> Result<()> {
    eprintln!(
        "building {what} (cargo build -p {package}; the first time compiles kube and its \
         dependencies)"
    );
    let status = cargo()
        .args(["run", "--quiet", "--package", package, "--"])
        .args(&o.args)
        .status()
        .with_context(|| format!("could not start cargo run -p {package}"))?;
    if !status.success() {
        // The command has said what went wrong; only pass its status on.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
