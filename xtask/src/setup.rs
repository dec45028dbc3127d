//! Installs what building the eBPF object needs, idempotently, saying what it does: the pinned
//! nightly of `agent-ebpf/NIGHTLY` with `rust-src` (for `-Z build-std=core`), LLVM 22
//! (bpf-linker must match that nightly's LLVM), and `bpf-linker` built against it. A step that is already done is skipped with one line.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{run as run_cmd, step};

/// The nightly the eBPF object is built with: pinned, because bpf-linker must be built against
/// the LLVM of that nightly (LLVM 22) and a later nightly moves to a later LLVM. `agent/build.rs`
/// reads the same file.
pub const NIGHTLY: &str = include_str!("../../agent-ebpf/NIGHTLY");

/// bpf-linker version known to work with that nightly (1.97, LLVM 22).
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
    let nightly = NIGHTLY.trim();
    step(&format!(
        "eBPF toolchain: {nightly} with rust-src, LLVM 22, bpf-linker (skipped where already present)"
    ));
    pinned_nightly(&["rust-src"])?;
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
        apt_install("llvm-22-dev")?;
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

/// nvidia-ml-py (the `pynvml` module) version the gpu-check tests install.
const NVIDIA_ML_PY_VERSION: &str = "13.615.71";

/// Where the gpu-check tests' Python environment lives (a venv with nvidia-ml-py).
pub fn gpu_check_venv() -> std::path::PathBuf {
    crate::util::target_dir().join("gpu-check-venv")
}

/// Makes the Python environment the gpu-check tests run the bundle's checker with: a venv in
/// `target/gpu-check-venv` holding nvidia-ml-py, whose `pynvml` then loads the fake NVML in the
/// simulated runs. Skipped when it is already there; without `python3` the tests say they skip.
pub fn gpu_check_python() -> Result<()> {
    let venv = gpu_check_venv();
    let ready = quiet_ok(Command::new(venv.join("bin/python3")).args(["-c", "import pynvml"]));
    python_venv(
        "gpu-check tests",
        &venv,
        "nvidia-ml-py",
        NVIDIA_ML_PY_VERSION,
        ready,
    )
}

/// Makes (or reuses, when `ready`) a venv at `venv` holding `package==version`, for the tests
/// described by `what`. Without `python3` it says those tests will skip.
fn python_venv(
    what: &str,
    venv: &std::path::Path,
    package: &str,
    version: &str,
    ready: bool,
) -> Result<()> {
    step(&format!(
        "{what}: a Python venv with {package} {version} (skipped where present)"
    ));
    if ready {
        eprintln!("ok: {package} {version} in {}", venv.display());
        return Ok(());
    }
    if !quiet_ok(Command::new("python3").arg("--version")) {
        eprintln!("note: python3 is missing: the {what} will skip");
        return Ok(());
    }
    let python = venv.join("bin/python3");
    if !python.exists() {
        eprintln!("creating {} (python3 -m venv)", venv.display());
        run_cmd(
            Command::new("python3").arg("-m").arg("venv").arg(venv),
            "python3 -m venv",
        )
        .context("creating the venv (on Debian, apt-get install python3-venv first)")?;
    }
    eprintln!("installing {package} {version} into it (pip install)");
    run_cmd(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("{package}=={version}"),
        ]),
        &format!("pip install {package}"),
    )
}

/// kubernetes-validate version the manifest tests check `deploy/` with (it bundles the
/// Kubernetes JSON schemas, 1.25 to 1.37, so it validates offline).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Where the manifest tests find kubernetes-validate: a venv in `target/kubernetes-validate-venv`.
/// (`xtask/deploy/tests/deploy/manifests.rs` looks in the same place.)
pub fn kubernetes_validate_venv() -> std::path::PathBuf {
    crate::util::target_dir().join("kubernetes-validate-venv")
}

/// Installs kubernetes-validate (PyPI) into its venv for the manifest tests. Skipped when that
/// version is already there; without `python3` the tests say they skip (and fail under CI).
pub fn kubernetes_validate() -> Result<()> {
    let venv = kubernetes_validate_venv();
    let exe = venv.join("bin/kubernetes-validate");
    let ready = output(Command::new(&exe).arg("--version")).contains(KUBERNETES_VALIDATE_VERSION);
    python_venv(
        "manifest schema tests",
        &venv,
        "kubernetes-validate",
        KUBERNETES_VALIDATE_VERSION,
        ready,
    )
}

/// Installs Debian's `docker-registry` (the CNCF distribution registry) for the image test,
/// which starts one on loopback to push the image to and pull it back. Skipped when
/// `docker-registry` is on the PATH; without root or apt-get the test says it skips.
pub fn docker_registry() -> Result<()> {
    step("image test: a local OCI registry, Debian's docker-registry (skipped where present)");
    if quiet_ok(Command::new("sh").args(["-c", "command -v docker-registry"])) {
        eprintln!("ok: docker-registry");
        return Ok(());
    }
    if output(Command::new("id").arg("-u")).trim() != "0"
        || !quiet_ok(Command::new("apt-get").arg("--version"))
    {
        eprintln!("note: docker-registry is missing and this is not root with apt-get: the image test will skip");
        return Ok(());
    }
    eprintln!("installing docker-registry (apt-get install docker-registry); the test runs its own, not the service");
    apt_install("docker-registry")
}

/// The local cluster's tools (`cargo xtask cluster`, the cluster tests): `ip` and `openssl`
/// from Debian where missing, then etcd, Kubernetes, kwok and KEDA (and toxiproxy, for the
/// network-fault tests) built from their Go modules
/// by `gpuscale-cluster build` (each skipped where built; the first build takes about 20
/// minutes on 2 cores, later ones reuse Go's caches).
pub fn cluster_components() -> Result<()> {
    step("local cluster: ip, openssl, and etcd, Kubernetes, kwok, KEDA, toxiproxy from their Go modules (skipped where built)");
    let is_root = output(Command::new("id").arg("-u")).trim() == "0";
    for (tool, package) in [("ip", "iproute2"), ("openssl", "openssl")] {
        let found = quiet_ok(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
        if found {
            eprintln!("ok: {tool}");
        } else if is_root && quiet_ok(Command::new("apt-get").arg("--version")) {
            eprintln!("installing {package} (apt-get install {package})");
            apt_install(package)?;
        } else {
            eprintln!("note: {tool} is missing and this is not root with apt-get: the cluster tests will skip (and fail under CI)");
        }
    }
    if !quiet_ok(Command::new("go").arg("version")) {
        eprintln!("note: Go is not installed: the cluster tests will skip, and fail under CI (they build Kubernetes and KEDA with it)");
        return Ok(());
    }
    run_cmd(
        crate::util::cargo().args([
            "run",
            "--quiet",
            "--package",
            "gpuscale-cluster",
            "--",
            "build",
        ]),
        "gpuscale-cluster build",
    )
}

/// `apt-get update`, then `apt-get install` of `package` without recommends, non-interactive.
pub fn apt_install(package: &str) -> Result<()> {
    run_cmd(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {package}"),
    )
}

/// Makes sure the pinned nightly ([`NIGHTLY`], the eBPF one, so one nightly serves both) has
/// `miri` and `rust-src`, and that Miri's sysroot is built, for the Miri run of the ring's tests
/// (`cargo miri test -p gpuscale-ring`). Each part is skipped where present; from nothing it
/// takes about a minute on 2 cores (the toolchain ~15 s, the sysroot ~35 s).
pub fn miri() -> Result<()> {
    let nightly = NIGHTLY.trim();
    step(&format!(
        "Miri: {nightly} with miri and rust-src, and Miri's sysroot (skipped where present)"
    ));
    pinned_nightly(&["miri", "rust-src"])?;
    // Idempotent: it says so and returns at once when the sysroot is already built.
    eprintln!("Miri's sysroot (cargo miri setup; about 35 seconds the first time)");
    run_cmd(nightly_cargo().args(["miri", "setup"]), "cargo miri setup")
}

/// Installs the pinned nightly ([`NIGHTLY`]) with `components` where it or they are missing;
/// says "ok" for each part already there.
pub fn pinned_nightly(components: &[&str]) -> Result<()> {
    let nightly = NIGHTLY.trim();
    let has_nightly = quiet_ok(
        Command::new("rustup")
            .args(["run", nightly, "rustc", "--version"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    );
    if !has_nightly {
        let list = components.join(",");
        eprintln!(
            "installing {nightly} (rustup toolchain install {nightly} --profile minimal \
             --component {list}), up to a minute"
        );
        run_cmd(
            Command::new("rustup").args([
                "toolchain",
                "install",
                nightly,
                "--profile",
                "minimal",
                "--component",
                &list,
            ]),
            &format!("rustup toolchain install {nightly}"),
        )?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        nightly,
    ]));
    for component in components {
        if installed.lines().any(|l| l.starts_with(component)) {
            eprintln!("ok: {nightly} with {component}");
        } else {
            eprintln!(
                "installing {component} (rustup component add {component} --toolchain {nightly})"
            );
            run_cmd(
                Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    nightly,
                ]),
                &format!("rustup component add {component}"),
            )?;
        }
    }
    Ok(())
}

/// `cargo` of the pinned nightly, in the workspace root, without the variables through which
/// the stable cargo running xtask would leak its own toolchain into it.
pub fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY.trim(), "cargo"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .current_dir(crate::util::root());
    c
}
