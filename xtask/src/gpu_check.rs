//! `cargo xtask gpu-check`: checks the agent and collector on this machine's NVIDIA GPU against
//! NVML's own numbers, or (`--bundle DIR`) writes a self-contained folder that does the same on a
//! GPU machine without Rust.
//!
//! The checks themselves live in the bundle (`xtask/gpu-check/`: `run.sh`, `check.py`,
//! `load.py`), so `cargo xtask gpu-check` and a carried-over bundle run exactly the same code:
//! this command builds the bundle into `target/gpu-check/bundle` and runs its `run.sh`. On a
//! machine without an NVIDIA GPU it says so (`skipped: no NVIDIA GPU (<why>)`) and succeeds
//! without building anything. docs/GPU-CHECK.md describes the checks and the report.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::util::{cargo, root, run as run_cmd, step, target_dir};

/// Options of `cargo xtask gpu-check`.
#[derive(clap::Args)]
pub struct Options {
    /// Write the self-contained bundle (binaries, run.sh, checker, load generator, README) to
    /// this folder instead of running the checks; carry it to a GPU machine and run its run.sh.
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Build profile of the bundled binaries: release (what ships) or dev (quicker to build;
    /// what the tests use).
    #[arg(long, value_enum, default_value = "release")]
    profile: Profile,
    /// Run the checks on the fake NVML instead of a GPU (run.sh --simulate): shows what the
    /// check does on a machine without one.
    #[arg(long, conflicts_with = "bundle")]
    simulate: bool,
    /// More run.sh options after `--`, e.g. `-- --gpu 1`.
    #[arg(last = true)]
    run_args: Vec<String>,
}

/// Build profile of the bundled binaries.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    /// `cargo build --release`.
    Release,
    /// `cargo build` (debug).
    Dev,
}

/// The bundle may not be larger than this.
const MAX_BUNDLE_BYTES: u64 = 64 << 20;

/// The files of `xtask/gpu-check/` copied into the bundle, with whether they are executable.
const SCRIPTS: [(&str, bool); 4] = [
    ("run.sh", true),
    ("check.py", true),
    ("load.py", true),
    ("README.md", false),
];

/// Places the driver's NVML may be, after `$GPUSCALE_NVML_LIB` and `ldconfig -p` (the same list
/// `run.sh` searches).
const NVML_DIRS: [&str; 11] = [
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/lib/aarch64-linux-gnu",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu",
    "/run/nvidia/driver/usr/lib64",
    "/run/nvidia/driver/usr/lib/aarch64-linux-gnu",
    "/home/kubernetes/bin/nvidia/lib64",
    "/usr/lib/wsl/lib",
];

/// Every existing `libnvidia-ml.so.1` this machine has, in the order `run.sh` tries them.
fn nvml_libraries() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("GPUSCALE_NVML_LIB") {
        found.push(PathBuf::from(p));
    }
    for ldconfig in ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"] {
        if let Ok(out) = Command::new(ldconfig).arg("-p").output() {
            let text = String::from_utf8_lossy(&out.stdout);
            found.extend(
                text.lines()
                    .filter(|l| l.trim_start().starts_with("libnvidia-ml.so.1 "))
                    .filter_map(|l| l.rsplit("=> ").next())
                    .map(|p| PathBuf::from(p.trim())),
            );
            break;
        }
    }
    found.extend(
        NVML_DIRS
            .iter()
            .map(|d| Path::new(d).join("libnvidia-ml.so.1")),
    );
    found.retain(|p| p.exists());
    found.dedup();
    found
}

/// Why this machine has no NVIDIA GPU to check, or `None` when it may have one (`run.sh` then
/// asks NVML itself and may still skip).
fn no_gpu_reason() -> Option<String> {
    let libs = nvml_libraries();
    let Some(lib) = libs.first() else {
        return Some(
            "libnvidia-ml.so.1 not found in $GPUSCALE_NVML_LIB, ldconfig -p, /usr/local/nvidia/lib64, \
             /usr/lib/x86_64-linux-gnu, /run/nvidia/driver/… or /home/kubernetes/bin/nvidia/lib64"
                .into(),
        );
    };
    let proc_gpus = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count())
        .unwrap_or(0);
    if !Path::new("/dev/nvidiactl").exists() && proc_gpus == 0 {
        return Some(format!(
            "{} is there, but no NVIDIA device: no /dev/nvidiactl and nothing in \
             /proc/driver/nvidia/gpus",
            lib.display()
        ));
    }
    None
}

/// Copies `from` to `to`, stripped of symbols where `strip` is available.
fn copy_stripped(from: &Path, to: &Path) -> Result<()> {
    if !from.is_file() {
        bail!("{} is missing after the build", from.display());
    }
    let stripped = Command::new("strip")
        .args(["--strip-unneeded", "-o"])
        .arg(to)
        .arg(from)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        eprintln!(
            "note: `strip` is not available: {} is copied with its symbols",
            from.display()
        );
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn git_commit() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match out(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) if out(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()) => {
            format!("{c}-dirty")
        }
        Some(c) => c,
        None => "unknown".into(),
    }
}

/// Puts the bundle's files into `dir` (a new folder): binaries from `bin`, the scripts, and
/// `bundle.json` (version, commit, profile).
fn fill_bundle(dir: &Path, bin: &Path, profile: &str) -> Result<()> {
    std::fs::create_dir_all(dir.join("sim"))
        .with_context(|| format!("creating {}", dir.display()))?;
    for name in ["gpuscale-agent", "gpuscale-collector"] {
        copy_stripped(&bin.join(name), &dir.join(name))?;
        set_mode(&dir.join(name), 0o755)?;
    }
    copy_stripped(
        &bin.join("libfake_nvml.so"),
        &dir.join("sim/libfake_nvml.so"),
    )?;
    let src = root().join("xtask/gpu-check");
    for (name, exec) in SCRIPTS {
        std::fs::copy(src.join(name), dir.join(name))
            .with_context(|| format!("copying {}", src.join(name).display()))?;
        set_mode(&dir.join(name), if exec { 0o755 } else { 0o644 })?;
    }
    let info = json!({
        "gpuscale": env!("CARGO_PKG_VERSION"),
        "commit": git_commit(),
        "profile": profile,
    });
    std::fs::write(
        dir.join("bundle.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )
    .with_context(|| format!("writing {}", dir.join("bundle.json").display()))
}

/// Builds the binaries and writes the bundle to `dir`; returns its size in bytes.
fn write_bundle(dir: &Path, profile: Profile) -> Result<u64> {
    let (flag, sub): (&[&str], &str) = match profile {
        Profile::Release => (&["--release"], "release"),
        Profile::Dev => (&[], "debug"),
    };
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty && !dir.join("bundle.json").is_file() {
            bail!(
                "{} is not empty and holds no gpu-check bundle (bundle.json); give a new or \
                 empty folder to --bundle",
                dir.display()
            );
        }
    }
    step(&format!(
        "building gpuscale-agent, gpuscale-collector and the fake NVML ({sub}): cargo build {}-p \
         agent -p collector -p fake-nvml",
        flag.iter().map(|f| format!("{f} ")).collect::<String>()
    ));
    run_cmd(
        cargo()
            .arg("build")
            .args(flag)
            .args(["-p", "agent", "-p", "collector", "-p", "fake-nvml"]),
        "cargo build",
    )?;
    let bin = target_dir().join(sub);

    // Written beside the target and renamed over it at the end, so a failed build never leaves
    // half a bundle.
    let name = dir
        .file_name()
        .with_context(|| format!("--bundle {}: give a folder name", dir.display()))?;
    let partial = dir.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&partial);
    step(&format!("writing the bundle to {}", dir.display()));
    let written = fill_bundle(&partial, &bin, sub);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the previous bundle in {}", dir.display()))?;
    }
    std::fs::rename(&partial, dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;

    let size = dir_size(dir)?;
    let mib = size as f64 / (1 << 20) as f64;
    if size > MAX_BUNDLE_BYTES {
        let msg = format!(
            "the bundle in {} is {mib:.1} MiB, over the {} MiB limit",
            dir.display(),
            MAX_BUNDLE_BYTES >> 20
        );
        if profile == Profile::Release {
            bail!("{msg}: look at what grew (ls -l {})", dir.display());
        }
        eprintln!("note: {msg} (a dev build; the release bundle is what ships)");
    }
    eprintln!("bundle: {} ({mib:.1} MiB, {sub} binaries)", dir.display());
    Ok(size)
}

/// Runs `cargo xtask gpu-check`.
pub fn run(o: Options) -> Result<()> {
    if let Some(dir) = &o.bundle {
        write_bundle(dir, o.profile)?;
        println!(
            "bundle written to {}: copy it to a GPU machine and run ./run.sh there as root",
            dir.display()
        );
        return Ok(());
    }
    if !o.simulate {
        if let Some(why) = no_gpu_reason() {
            println!("skipped: no NVIDIA GPU ({why})");
            return Ok(());
        }
    }
    let base = target_dir().join("gpu-check");
    let dir = base.join("bundle");
    write_bundle(&dir, o.profile)?;
    let mut cmd = Command::new(dir.join("run.sh"));
    if o.simulate {
        cmd.arg("--simulate");
    }
    cmd.args(&o.run_args);
    if std::env::var_os("OUT").is_none() {
        cmd.env("OUT", &base);
    }
    // A simulated run needs only pynvml, which the test set-up's venv has (it has no PyTorch,
    // so a real run keeps the system's python3).
    let venv_python = crate::setup::gpu_check_venv().join("bin/python3");
    if o.simulate && std::env::var_os("PYTHON").is_none() && venv_python.exists() {
        cmd.env("PYTHON", venv_python);
    }
    step(&format!(
        "running the checks{} ({})",
        if o.simulate { " on the fake NVML" } else { "" },
        dir.join("run.sh").display()
    ));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", dir.join("run.sh").display()))?;
    if !status.success() {
        bail!(
            "gpu-check: a check failed or could not run ({status}); the table above and the \
             JSON report say which and why"
        );
    }
    Ok(())
}
