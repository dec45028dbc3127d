//! `cargo xtask …`: the project's own commands. One module per command.

use clap::{Parser, Subcommand};

mod demo;
mod scenario;
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
    /// Run the agent on simulated GPUs whose load follows a short story, with a live dump.
    Demo(demo::Options),
    /// Set up everything a fresh machine needs, then run every test.
    Test(test::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(o) => demo::run(o),
        Command::Test(o) => test::run(o),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
