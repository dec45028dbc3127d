//! The cluster's components, built from their Go modules with the machine's Go (nothing of
//! theirs lives in this repository): etcd, the Kubernetes control plane, kwok and KEDA, and
//! toxiproxy for the network-fault tests (`tests/e2e/tests/netfault.rs`, which find it in this
//! cache by the same rule: `e2e::toxiproxy::binary`).
//!
//! Each build lands in `<cache>/bin/<component>-<version>/` (default cache
//! `~/.cache/gpuscale/cluster`, or `GPUSCALE_CLUSTER_CACHE`), so a second `cluster up` — and
//! every later clone on the same machine — reuses it; Go's own module and build caches make a
//! rebuild after a version change cheap. A build is written to a temporary folder and renamed
//! into place, so an interrupted build is never taken for a finished one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Kubernetes release: 1.35, the minor KEDA 2.20 is built and tested against (its go.mod pins
/// the k8s.io libraries to v0.35), the newest patch the Go module proxy serves here.
pub const KUBERNETES: &str = "v1.35.4";
/// etcd 3.6, the line Kubernetes 1.35 is tested with.
pub const ETCD: &str = "v3.6.16";
/// kwok, the newest release.
pub const KWOK: &str = "v0.8.0";
/// KEDA, the newest 2.20.x.
pub const KEDA: &str = "v2.20.2";
/// cert-manager's module, only for its CRDs (`deploy/crds`): the `deploy/overlays/cert-manager`
/// objects are checked against them on the real API server. Nothing of it is built.
pub const CERT_MANAGER_MODULE: &str = "github.com/cert-manager/cert-manager";
/// cert-manager, the newest release the Go module proxy serves.
pub const CERT_MANAGER: &str = "v1.21.2";
/// toxiproxy, the newest release the Go module proxy serves (`go list -m -versions` lists only
/// v2.3.0 and v2.5.0, but v2.12.0 downloads and builds with Go 1.26; v2.13.0 does not exist).
/// `tests/e2e/src/toxiproxy.rs` names the same version (a test there checks they agree).
pub const TOXIPROXY: &str = "v2.12.0";

/// How a component is built.
#[derive(Debug, Clone, Copy)]
enum Recipe {
    /// `go build` inside the module itself (its own go.mod, replace directives and go.sum).
    InPlace,
    /// A generated module that requires the component's module (for modules whose go.mod
    /// replaces its siblings with relative paths, which only work inside their own repository).
    /// With `staging`, every `=> ./staging/...` replace of k8s.io/kubernetes becomes a replace by
    /// the published module of the same release (`v0.<minor>.<patch>`).
    Wrapper { staging: bool },
}

/// One Go module and the binaries built from it.
#[derive(Debug, Clone, Copy)]
pub struct Component {
    /// Short name for messages and folders.
    pub name: &'static str,
    /// The Go module.
    pub module: &'static str,
    /// Its version.
    pub version: &'static str,
    /// (package, binary name) pairs.
    pub binaries: &'static [(&'static str, &'static str)],
    recipe: Recipe,
    /// What a first build takes on a 2-core machine, for the progress line.
    estimate: &'static str,
}

/// Every component, in build order.
pub const COMPONENTS: &[Component] = &[
    Component {
        name: "etcd",
        module: "go.etcd.io/etcd/server/v3",
        version: ETCD,
        binaries: &[("go.etcd.io/etcd/server/v3", "etcd")],
        recipe: Recipe::Wrapper { staging: false },
        estimate: "about 2 minutes",
    },
    Component {
        name: "kubernetes",
        module: "k8s.io/kubernetes",
        version: KUBERNETES,
        binaries: &[
            ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
            (
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-controller-manager",
            ),
            ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
        ],
        recipe: Recipe::Wrapper { staging: true },
        estimate: "about 10 minutes",
    },
    Component {
        name: "kwok",
        module: "sigs.k8s.io/kwok",
        version: KWOK,
        binaries: &[("./cmd/kwok", "kwok")],
        recipe: Recipe::InPlace,
        estimate: "about 2 minutes",
    },
    Component {
        name: "keda",
        module: "github.com/kedacore/keda/v2",
        version: KEDA,
        binaries: &[
            ("./cmd/operator", "keda-operator"),
            ("./cmd/adapter", "keda-adapter"),
        ],
        recipe: Recipe::InPlace,
        estimate: "about 8 minutes",
    },
    Component {
        name: "toxiproxy",
        module: "github.com/Shopify/toxiproxy/v2",
        version: TOXIPROXY,
        // The server only: the tests drive it through its HTTP API, not its CLI.
        binaries: &[("./cmd/server", "toxiproxy-server")],
        recipe: Recipe::InPlace,
        estimate: "about 30 seconds",
    },
];

/// Where builds are kept.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPUSCALE_CLUSTER_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("gpuscale/cluster")
}

impl Component {
    /// The folder its binaries are in once built.
    pub fn bin_dir(&self) -> PathBuf {
        cache_dir()
            .join("bin")
            .join(format!("{}-{}", self.name, self.version))
    }

    /// The path of one of its binaries.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }

    fn built(&self) -> bool {
        self.binaries.iter().all(|(_, b)| self.binary(b).is_file())
    }
}

/// The component named `name`.
pub fn component(name: &str) -> &'static Component {
    COMPONENTS
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no component {name}"))
}

/// The path of binary `binary`, wherever its component keeps it.
pub fn binary(binary: &str) -> PathBuf {
    COMPONENTS
        .iter()
        .find(|c| c.binaries.iter().any(|(_, b)| *b == binary))
        .map(|c| c.binary(binary))
        .unwrap_or_else(|| panic!("no component builds {binary}"))
}

/// Where the Go module cache keeps `module@version` (downloading it first).
pub fn module_dir(module: &str, version: &str) -> Result<PathBuf> {
    let out = go()
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .stderr(Stdio::inherit())
        .output()
        .context("running `go mod download` (is Go installed? `go version`)")?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`go mod download {module}@{version}` printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    if let Some(err) = info["Error"].as_str() {
        bail!(
            "the Go module proxy does not serve {module}@{version}: {err}; `go list -m -versions \
             {module}` shows what it serves (then change the version in \
             xtask/cluster/src/components.rs and say so in docs/CLUSTER.md)"
        );
    }
    let dir = info["Dir"]
        .as_str()
        .with_context(|| format!("`go mod download {module}@{version}` named no folder"))?;
    Ok(PathBuf::from(dir))
}

/// A `go` command with the settings every build uses: the machine's Go only (no toolchain
/// download), no VCS stamping (module sources have no repository).
fn go() -> Command {
    let mut c = Command::new("go");
    c.env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-buildvcs=false")
        .env("CGO_ENABLED", "0");
    c
}

/// Builds every component that is not built yet, saying what it does; a built one costs one
/// line. `force` rebuilds all of them.
pub fn ensure_all(force: bool) -> Result<()> {
    for c in COMPONENTS {
        if c.built() && !force {
            eprintln!("ok: {} {} ({})", c.name, c.version, c.bin_dir().display());
            continue;
        }
        build(c).with_context(|| format!("building {} {} from {}", c.name, c.version, c.module))?;
    }
    Ok(())
}

fn build(c: &Component) -> Result<()> {
    let names: Vec<&str> = c.binaries.iter().map(|(_, b)| *b).collect();
    eprintln!(
        "building {} from {}@{} with {} ({} the first time; later builds reuse Go's caches)",
        names.join(", "),
        c.module,
        c.version,
        go_version(),
        c.estimate,
    );
    let src = module_dir(c.module, c.version)?;
    let work = cache_dir()
        .join("build")
        .join(format!("{}-{}", c.name, c.version));
    let dir = match c.recipe {
        Recipe::InPlace => src.clone(),
        Recipe::Wrapper { staging } => {
            wrapper_module(c, &src, &work, staging)?;
            work.clone()
        }
    };
    let staging_bin = cache_dir()
        .join("bin")
        .join(format!(".{}-{}.partial", c.name, c.version));
    let _ = std::fs::remove_dir_all(&staging_bin);
    std::fs::create_dir_all(&staging_bin)
        .with_context(|| format!("creating {}", staging_bin.display()))?;
    for (pkg, bin) in c.binaries {
        let log = work.with_extension(format!("{bin}.log"));
        std::fs::create_dir_all(log.parent().expect("log has a parent"))?;
        let mut cmd = go();
        cmd.current_dir(&dir)
            .args(["build", "-ldflags=-s -w", "-o"])
            .arg(staging_bin.join(bin))
            .arg(pkg);
        run_logged(&mut cmd, &log, &format!("go build {pkg}"))?;
    }
    let bin_dir = c.bin_dir();
    let _ = std::fs::remove_dir_all(&bin_dir);
    std::fs::rename(&staging_bin, &bin_dir)
        .with_context(|| format!("moving the build to {}", bin_dir.display()))?;
    eprintln!("ok: {} {} ({})", c.name, c.version, bin_dir.display());
    Ok(())
}

/// Writes the generated module in `work` that requires `c.module@c.version`, then lets Go
/// resolve the rest (`go mod tidy`).
fn wrapper_module(c: &Component, src: &Path, work: &Path, staging: bool) -> Result<()> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let mut go_mod = format!(
        "// Generated by gpuscale's `cargo xtask cluster`: builds {m}@{v}.\nmodule \
         gpuscale.local/build/{n}\n\ngo 1.25\n\nrequire {m} {v}\n",
        m = c.module,
        v = c.version,
        n = c.name
    );
    if staging {
        let theirs = std::fs::read_to_string(src.join("go.mod"))
            .with_context(|| format!("reading {}/go.mod", src.display()))?;
        let published = staging_version(c.version)?;
        let mut n = 0;
        for module in staging_modules(&theirs) {
            go_mod.push_str(&format!("replace {module} => {module} {published}\n"));
            n += 1;
        }
        if n == 0 {
            bail!(
                "{}/go.mod has no `=> ./staging/...` replace directives; the wrapper recipe \
                 does not fit this release",
                src.display()
            );
        }
    }
    let imports: String = c
        .binaries
        .iter()
        .map(|(pkg, _)| format!("\t_ \"{pkg}\"\n"))
        .collect();
    std::fs::write(work.join("go.mod"), go_mod)?;
    std::fs::write(
        work.join("tools.go"),
        format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n"),
    )?;
    let log = work.with_extension("tidy.log");
    run_logged(
        go().current_dir(work).args(["mod", "tidy"]),
        &log,
        "go mod tidy",
    )
}

/// `v1.35.4` → `v0.35.4`: the version the staging modules (k8s.io/api, …) are published under.
fn staging_version(release: &str) -> Result<String> {
    match release.strip_prefix("v1.") {
        Some(rest) => Ok(format!("v0.{rest}")),
        None => bail!("{release} is not a Kubernetes release of the form v1.X.Y"),
    }
}

/// The modules k8s.io/kubernetes's go.mod replaces with its own `./staging/src/...` folders.
fn staging_modules(go_mod: &str) -> Vec<&str> {
    go_mod
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches("replace").trim();
            let (module, target) = l.split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim())
        })
        .collect()
}

fn go_version() -> String {
    go().arg("version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .unwrap_or("go")
                .to_owned()
        })
        .unwrap_or_else(|| "go".into())
}

/// Runs `cmd` with its output in `log`, printing a line every 30 s so a long build shows it is
/// alive; on failure the error carries the log's last lines.
fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {what} (is Go installed? `go version`)"))?;
    let start = Instant::now();
    let mut next = Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() >= next {
            eprintln!("  … {what}: {} s", start.elapsed().as_secs());
            let _ = std::io::stderr().flush();
            next += Duration::from_secs(30);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!(
            "{what} failed ({status}); last lines of {}:\n{}",
            log.display(),
            crate::process::tail(log, 30)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_modules_are_read_from_the_replace_block() {
        let go_mod = "module k8s.io/kubernetes\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
                      \tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n\
                      replace k8s.io/kms => ./staging/src/k8s.io/kms\n";
        assert_eq!(
            staging_modules(go_mod),
            ["k8s.io/api", "k8s.io/client-go", "k8s.io/kms"]
        );
    }

    #[test]
    fn staging_modules_are_published_as_v0_of_the_release() {
        assert_eq!(staging_version("v1.35.4").unwrap(), "v0.35.4");
        assert!(staging_version("v2.0.0").is_err());
    }
}
