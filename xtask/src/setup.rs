//! Installs what building the eBPF object needs, idempotently, saying what it does: nightly's
//! `rust-src` (for `-Z build-std=core`), LLVM 22 (bpf-linker must match nightly's LLVM), and
//! `bpf-linker` built against it. A step that is already done is skipped with one line.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{run as run_cmd, step};

/// bpf-linker version known to work with nightly 1.97 (LLVM 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where Debian's llvm-22-dev puts LLVM.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// As root, mounts tracefs where it is missing: the eBPF tracepoints (and their privileged
/// tests) need `/sys/kernel/tracing`.
pub fn tracefs() -> Result<()> {
    let events = Path::new("/sys/kernel/tracing/events/syscalls");
    if events.exists() {
        return Ok(());
    }
    if output(Command::new("id").arg("-u")).trim() != "0" {
        eprintln!("note: tracefs is not mounted and this is not root: the eBPF tests will skip");
        return Ok(());
    }
    step("mounting tracefs (mount -t tracefs nodev /sys/kernel/tracing)");
    run_cmd(
        Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]),
        "mount tracefs",
    )
}

/// Makes sure the eBPF toolchain is there.
pub fn ebpf_toolchain() -> Result<()> {
    step("eBPF toolchain: nightly rust-src, LLVM 22, bpf-linker (skipped where already present)");
    if !output(Command::new("rustup").args(["toolchain", "list"])).contains("nightly") {
        eprintln!("installing the nightly toolchain (rustup toolchain install nightly)");
        run_cmd(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "rustup toolchain install nightly",
        )?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("ok: nightly rust-src");
    } else {
        eprintln!(
            "installing nightly rust-src (rustup component add rust-src --toolchain nightly)"
        );
        run_cmd(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    }
    let installed = output(Command::new("cargo").args(["install", "--list"]));
    if installed.contains(&format!("bpf-linker v{BPF_LINKER_VERSION}")) {
        eprintln!("ok: bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    let llvm_config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
    if llvm_config.exists() {
        eprintln!("ok: LLVM 22 at {LLVM_PREFIX}");
    } else {
        if !quiet_ok(Command::new("apt-get").arg("--version")) {
            bail!(
                "LLVM 22 is missing and apt-get is not available: install LLVM 22's development \
                 files so that {} exists, then rerun",
                llvm_config.display()
            );
        }
        eprintln!("installing LLVM 22 (apt-get install llvm-22-dev), about a minute");
        run_cmd(
            Command::new("apt-get").args(["update", "-qq"]),
            "apt-get update",
        )?;
        run_cmd(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "llvm-22-dev",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install llvm-22-dev",
        )
        .context("installing llvm-22-dev (needs root)")?;
    }
    eprintln!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (cargo install), about two minutes"
    );
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
        "cargo install bpf-linker",
    )
}
