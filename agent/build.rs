//! Builds the eBPF object (`agent-ebpf/program`) with aya-build when the eBPF toolchain is here,
//! and tells the agent so with `--cfg gpuscale_ebpf`; `src/ebpf.rs` embeds the object only then.
//!
//! The eBPF toolchain is: `rustup` with the nightly named in `agent-ebpf/NIGHTLY` (pinned: its
//! LLVM must be the one bpf-linker is built against, LLVM 22) with `rust-src` (aya-build runs
//! `rustup run <that nightly> cargo build -Z build-std=core --target bpfel-unknown-none`), and
//! `bpf-linker` on PATH. Without it the agent still builds, with a
//! `cargo:warning` and no eBPF: it then attributes processes through procfs only.
//! `AYA_BUILD_SKIP=1` skips the eBPF build on purpose.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

const PROGRAM_CRATE: &str = "agent-ebpf";

/// The pinned nightly (`agent-ebpf/NIGHTLY`, which `cargo xtask test` installs too).
fn nightly() -> &'static str {
    include_str!("../agent-ebpf/NIGHTLY").trim()
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-changed=../agent-ebpf/NIGHTLY");

    if matches!(
        env::var("AYA_BUILD_SKIP").as_deref(),
        Ok("1" | "true" | "TRUE" | "True")
    ) {
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: gpuscale-agent is built without eBPF and \
             attributes GPU processes through procfs only"
        );
        return Ok(());
    }

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("agent/ has no parent directory")?
        .join("agent-ebpf");

    match find_toolchain() {
        Err(why) => {
            println!(
                "cargo:warning=gpuscale-agent is built without eBPF ({why:#}); it will attribute \
                 GPU processes through procfs only. `cargo xtask test` installs the eBPF \
                 toolchain ({} with rust-src, and bpf-linker for its LLVM)",
                nightly()
            );
            Ok(())
        }
        Ok(toolchain) => {
            for watched in &toolchain.watch {
                println!("cargo:rerun-if-changed={}", watched.display());
            }
            println!(
                "cargo:rerun-if-changed={}",
                ebpf_dir.join("common").join("src").display()
            );
            println!(
                "cargo:rerun-if-changed={}",
                ebpf_dir.join("common").join("Cargo.toml").display()
            );
            let program_dir = ebpf_dir.join("program");
            let program_dir = program_dir
                .to_str()
                .context("the path of agent-ebpf/program is not UTF-8")?;
            // aya-build turns the nested cargo's stderr into warnings; keep only real messages.
            env::set_var("CARGO_TERM_QUIET", "true");
            aya_build::build_ebpf(
                [aya_build::Package {
                    name: PROGRAM_CRATE,
                    root_dir: program_dir,
                    ..Default::default()
                }],
                aya_build::Toolchain::Custom(nightly()),
            )
            .context(
                "building the eBPF object failed (set AYA_BUILD_SKIP=1 to build the agent \
                 without eBPF)",
            )?;
            println!("cargo:rustc-cfg=gpuscale_ebpf");
            Ok(())
        }
    }
}

/// What was found, and the paths whose change should re-run this script.
struct Toolchain {
    watch: Vec<PathBuf>,
}

/// Finds bpf-linker and the pinned nightly with rust-src. Whatever the answer, prints `rerun-if-changed`
/// lines for the places where installing or removing a piece shows, so the script runs again
/// then (and only then).
fn find_toolchain() -> anyhow::Result<Toolchain> {
    let mut watch = Vec::new();
    // `cargo install bpf-linker` puts it here; watching the (flat) directory notices it.
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    if let Some(bin) = cargo_bin.as_ref().filter(|b| b.is_dir()) {
        println!("cargo:rerun-if-changed={}", bin.display());
    }

    // `rustup toolchain install` writes a file here; watching it notices a new nightly.
    let rustup_home = env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")));
    if let Some(hashes) = rustup_home
        .map(|home| home.join("update-hashes"))
        .filter(|d| d.is_dir())
    {
        println!("cargo:rerun-if-changed={}", hashes.display());
    }

    let Some(linker) = on_path("bpf-linker") else {
        bail!("bpf-linker is not on PATH");
    };
    if let Some(dir) = linker.parent() {
        if cargo_bin.as_deref() != Some(dir) {
            println!("cargo:rerun-if-changed={}", dir.display());
        }
    }
    watch.push(linker);

    if on_path("rustup").is_none() {
        bail!(
            "rustup is not on PATH (aya-build runs `rustup run {} cargo`)",
            nightly()
        );
    }
    let out = Command::new("rustup")
        .args(["run", nightly(), "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .with_context(|| format!("running `rustup run {} rustc --print sysroot`", nightly()))?;
    if !out.status.success() {
        bail!(
            "no {0} toolchain (`rustup toolchain install {0} --component rust-src`)",
            nightly()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    // rustup rewrites this file when a component is added or removed.
    let components = sysroot.join("lib/rustlib/components");
    if components.is_file() {
        println!("cargo:rerun-if-changed={}", components.display());
    }
    let core = sysroot.join("lib/rustlib/src/rust/library/core/src/lib.rs");
    if !core.is_file() {
        bail!(
            "{0} has no rust-src (`rustup component add rust-src --toolchain {0}`)",
            nightly()
        );
    }
    Ok(Toolchain { watch })
}

/// The first executable named `name` in PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
