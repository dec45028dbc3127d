//! `cargo xtask fuzz`: builds the `cargo fuzz` targets of `fuzz/` and runs each for a bounded
//! time, then says what each did (runs, speed, coverage, corpus) and, for a crash, a hang or a
//! blow-up, which input and how to reproduce it; any such finding makes it exit non-zero.
//!
//! Set-up, each part skipped where present: the pinned nightly of `agent-ebpf/NIGHTLY` (one
//! nightly serves eBPF, Miri and fuzzing), `cargo-fuzz` at [`CARGO_FUZZ_VERSION`], and a C++
//! compiler (libfuzzer-sys compiles libFuzzer). The targets build with AddressSanitizer, debug
//! assertions and overflow checks, into `fuzz/target`; the agent is built without its eBPF
//! object there (`AYA_BUILD_SKIP=1`: no target reads it, and aya-build's nested cargo must not
//! inherit the sanitizer flags).
//!
//! Each run reads the committed seeds (`fuzz/corpus/<target>`) but writes what it finds to a
//! scratch corpus (`fuzz/target/corpus/<target>`, kept between runs so coverage accumulates),
//! so fuzzing never changes a tracked file. A finding lands in `fuzz/artifacts/<target>/`
//! (git-ignored); the full libFuzzer output of a run in `fuzz/target/logs/<target>.log`.
//!
//! `cargo xtask test` runs this for 30 seconds per target after the Miri step.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::setup::{nightly_cargo, NIGHTLY};
use crate::util::{root, run as run_cmd, step};

/// cargo-fuzz, pinned (`cargo install --locked`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One fuzz target of `fuzz/` (its `[[bin]]` name), with the libFuzzer options it needs.
struct Target {
    name: &'static str,
    /// What it fuzzes, for the progress lines.
    what: &'static str,
    /// `-max_len`: the longest input libFuzzer makes (the ring file is ~28 KiB at its smallest;
    /// trigger metadata passes the 16 KiB request limit only above it).
    max_len: usize,
    /// Whether `fuzz/dict/<name>.dict` holds words for it.
    dict: bool,
}

/// Every target, in the order they run.
const TARGETS: [Target; 5] = [
    Target {
        name: "trigger_metadata",
        what: "KEDA trigger metadata: request limits, then Trigger::parse",
        max_len: 20 * 1024,
        dict: true,
    },
    Target {
        name: "label_selector",
        what: "label selectors: Selector::parse, print, parse again, match",
        max_len: 4 * 1024,
        dict: true,
    },
    Target {
        name: "pods_file",
        what: "the --pods-file PodList JSON: parse_pod_list",
        max_len: 16 * 1024,
        dict: true,
    },
    Target {
        name: "node_snapshot",
        what: "an agent's NodeSnapshot protobuf: decode, validate::check",
        max_len: 16 * 1024,
        dict: false,
    },
    Target {
        name: "ring_file",
        what: "the ring file: ShmReader::open, then all that dump and watch read",
        max_len: 64 * 1024,
        dict: false,
    },
];

/// The names `--target` accepts.
const TARGET_NAMES: [&str; 5] = [
    TARGETS[0].name,
    TARGETS[1].name,
    TARGETS[2].name,
    TARGETS[3].name,
    TARGETS[4].name,
];

/// Per-input limits that turn a hang or a blow-up into a finding: seconds per input, and
/// megabytes of memory (RSS, and any one allocation).
const TIMEOUT_S: u32 = 10;
const RSS_LIMIT_MB: u32 = 2048;

/// Options of `cargo xtask fuzz`.
#[derive(clap::Args)]
pub struct Options {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Fuzz only this target (repeat for several); every target when absent.
    #[arg(long = "target", value_name = "NAME", value_parser = TARGET_NAMES)]
    pub targets: Vec<String>,
}

/// What one run of one target did, read from libFuzzer's output.
#[derive(Default)]
struct Outcome {
    runs: Option<u64>,
    exec_per_s: Option<u64>,
    /// Coverage (edges) after the seeds were read, and at the end.
    cov_start: Option<u64>,
    cov_end: Option<u64>,
    /// Inputs in the corpus after the seeds were read, and at the end.
    corpus_start: Option<u64>,
    corpus_end: Option<u64>,
    peak_rss_mb: Option<u64>,
    /// The input libFuzzer wrote for a finding.
    artifact: Option<PathBuf>,
    /// What went wrong (a panic message, a sanitizer report, a timeout), when it did.
    finding: Option<String>,
    log: PathBuf,
}

/// Runs `cargo xtask fuzz`.
pub fn run(o: Options) -> Result<()> {
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| o.targets.is_empty() || o.targets.iter().any(|n| n == t.name))
        .collect();
    set_up()?;
    build(&targets)?;
    let mut outcomes = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        step(&format!(
            "fuzzing {} for {} s ({}/{}): {}",
            t.name,
            o.seconds,
            i + 1,
            targets.len(),
            t.what
        ));
        let outcome = fuzz_one(t, o.seconds)?;
        report(t, &outcome);
        outcomes.push((t, outcome));
    }
    summary(&outcomes);
    let found: Vec<&str> = outcomes
        .iter()
        .filter(|(_, r)| r.finding.is_some())
        .map(|(t, _)| t.name)
        .collect();
    if !found.is_empty() {
        bail!(
            "fuzzing found a problem in {} (each is shown above with its input and the command \
             that reproduces it)",
            found.join(", ")
        );
    }
    Ok(())
}

/// The pinned nightly, cargo-fuzz and a C++ compiler, each skipped where present.
fn set_up() -> Result<()> {
    let nightly = NIGHTLY.trim();
    step(&format!(
        "fuzzing toolchain: {nightly}, cargo-fuzz {CARGO_FUZZ_VERSION}, a C++ compiler \
         (skipped where present)"
    ));
    // rust-src as for the eBPF build of the same nightly, so set-up installs one toolchain shape.
    crate::setup::pinned_nightly(&["rust-src"])?;
    let installed = Command::new("cargo")
        .args(["install", "--list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if installed.contains(&format!("cargo-fuzz v{CARGO_FUZZ_VERSION}:")) {
        eprintln!("ok: cargo-fuzz {CARGO_FUZZ_VERSION}");
    } else {
        eprintln!(
            "installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install cargo-fuzz --version \
             ={CARGO_FUZZ_VERSION} --locked), about a minute"
        );
        run_cmd(
            Command::new("cargo").args([
                "install",
                "cargo-fuzz",
                "--version",
                &format!("={CARGO_FUZZ_VERSION}"),
                "--locked",
            ]),
            "cargo install cargo-fuzz",
        )?;
    }
    let has_cxx = Command::new("c++")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_cxx {
        eprintln!("ok: a C++ compiler (c++)");
    } else {
        eprintln!("installing a C++ compiler for libFuzzer (apt-get install g++)");
        crate::setup::apt_install("g++").context(
            "libfuzzer-sys compiles libFuzzer with the C++ compiler `c++`: install one (on \
             Debian, `apt-get install g++` as root), then rerun",
        )?;
    }
    Ok(())
}

/// `cargo fuzz` of the pinned nightly in the workspace root, building as [`build`] says.
fn cargo_fuzz() -> Command {
    let mut c = nightly_cargo();
    c.arg("fuzz")
        // No eBPF object in fuzz builds (see the module doc).
        .env("AYA_BUILD_SKIP", "1")
        // Fuzz builds stay in fuzz/target, whatever the workspace's builds use.
        .env_remove("CARGO_TARGET_DIR");
    c
}

/// Builds the targets (all at once when all are wanted).
fn build(targets: &[&Target]) -> Result<()> {
    step(&format!(
        "building {} fuzz target(s) (cargo fuzz build: {}, AddressSanitizer, debug assertions; \
         from clean about 6 minutes on 2 cores)",
        targets.len(),
        NIGHTLY.trim()
    ));
    let started = Instant::now();
    if targets.len() == TARGETS.len() {
        run_cmd(cargo_fuzz().arg("build"), "cargo fuzz build")?;
    } else {
        for t in targets {
            run_cmd(
                cargo_fuzz().args(["build", t.name]),
                &format!("cargo fuzz build {}", t.name),
            )?;
        }
    }
    eprintln!("built in {:.0} s", started.elapsed().as_secs_f64().max(1.0));
    Ok(())
}

/// Runs target `t` for `seconds` and reads what it did.
fn fuzz_one(t: &Target, seconds: u64) -> Result<Outcome> {
    let root = root();
    let fuzz = root.join("fuzz");
    let seeds = fuzz.join("corpus").join(t.name);
    if !seeds.is_dir() {
        bail!(
            "the seed corpus {} is missing: it is committed with the targets; restore it (git \
             checkout fuzz/corpus)",
            seeds.display()
        );
    }
    let scratch = fuzz.join("target/corpus").join(t.name);
    let logs = fuzz.join("target/logs");
    for dir in [&scratch, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{}.log", t.name));
    let mut log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    let mut cmd = cargo_fuzz();
    // libFuzzer adds new inputs to the first corpus directory only: the scratch one.
    cmd.args(["run", t.name])
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-max_len={}", t.max_len))
        .arg("-print_final_stats=1");
    if t.dict {
        cmd.arg(format!(
            "-dict={}",
            fuzz.join("dict").join(format!("{}.dict", t.name)).display()
        ));
    }
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start cargo fuzz run {}", t.name))?;
    let stderr = child
        .stderr
        .take()
        .context("cargo fuzz run has no stderr pipe")?;

    let mut outcome = Outcome {
        log: log_path.clone(),
        ..Outcome::default()
    };
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.with_context(|| format!("reading the output of {}", t.name))?;
        writeln!(log, "{line}").with_context(|| format!("writing {}", log_path.display()))?;
        // A few lines show progress: the seeds read, the doubling "pulse", the end.
        if line.contains("INITED") || line.contains("pulse") || line.contains("DONE") {
            eprintln!("  {line}");
        }
        read_line(&line, &mut outcome);
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for cargo fuzz run {}", t.name))?;
    if !status.success() && outcome.finding.is_none() {
        outcome.finding = Some(format!(
            "cargo fuzz run exited with {status}; the end of its output:\n{}",
            tail.join("\n")
        ));
    }
    if let Some(a) = &outcome.artifact {
        outcome.artifact = Some(a.strip_prefix(&root).unwrap_or(a).to_owned());
    }
    Ok(outcome)
}

/// Takes what `line` of libFuzzer's output says into `o`.
fn read_line(line: &str, o: &mut Outcome) {
    // `#1234  INITED cov: 812 ft: 1500 corp: 12/3456b exec/s: 0 rss: 40Mb`
    let field = |name: &str| -> Option<u64> {
        let rest = &line[line.find(name)? + name.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    if line.contains("INITED") {
        o.cov_start = field("cov:");
        o.corpus_start = field("corp:");
    }
    if line.starts_with('#') && line.contains("cov:") {
        o.cov_end = field("cov:").or(o.cov_end);
        o.corpus_end = field("corp:").or(o.corpus_end);
    }
    for (stat, slot) in [
        ("stat::number_of_executed_units:", &mut o.runs),
        ("stat::average_exec_per_sec:", &mut o.exec_per_s),
        ("stat::peak_rss_mb:", &mut o.peak_rss_mb),
    ] {
        if line.starts_with(stat) {
            *slot = field(stat);
        }
    }
    // "Test unit written to ./fuzz/artifacts/T/crash-…"
    if let Some(path) = line.split("Test unit written to ").nth(1) {
        o.artifact = Some(PathBuf::from(path.trim()));
    }
    let first_finding = [
        "panicked at",
        "ERROR: AddressSanitizer",
        "ERROR: libFuzzer: timeout",
        "ERROR: libFuzzer: out-of-memory",
        "ERROR: libFuzzer: deadly signal",
        "ERROR: LeakSanitizer",
        "ERROR: libFuzzer: fuzz target exited",
    ];
    if o.finding.is_none() && first_finding.iter().any(|f| line.contains(f)) {
        o.finding = Some(line.trim().to_owned());
    } else if let Some(f) = o.finding.as_mut().filter(|f| f.ends_with(':')) {
        // A panic's message is on the line after "panicked at …:".
        f.push(' ');
        f.push_str(line.trim());
    }
}

/// Prints one target's result; for a finding, the input and how to reproduce it.
fn report(t: &Target, o: &Outcome) {
    let n = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    eprintln!(
        "{}: {} runs, {} exec/s, coverage {} -> {} edges, corpus {} -> {} inputs, peak RSS {} MB",
        t.name,
        n(o.runs),
        n(o.exec_per_s),
        n(o.cov_start),
        n(o.cov_end),
        n(o.corpus_start),
        n(o.corpus_end),
        n(o.peak_rss_mb)
    );
    let Some(finding) = &o.finding else {
        return;
    };
    eprintln!("FINDING in {}: {finding}", t.name);
    match &o.artifact {
        Some(a) => {
            eprintln!("  input:     {}", a.display());
            eprintln!(
                "  reproduce: AYA_BUILD_SKIP=1 cargo +{} fuzz run {} {}",
                NIGHTLY.trim(),
                t.name,
                a.display()
            );
            eprintln!(
                "  minimize:  AYA_BUILD_SKIP=1 cargo +{} fuzz tmin {} {}",
                NIGHTLY.trim(),
                t.name,
                a.display()
            );
        }
        None => eprintln!("  (libFuzzer wrote no input: see the log)"),
    }
    eprintln!("  log:       {}", display(&o.log));
}

/// The table of every target's result.
fn summary(outcomes: &[(&Target, Outcome)]) {
    step("fuzzing summary");
    eprintln!(
        "{:<18} {:>10} {:>8} {:>14} {:>14}  result",
        "target", "runs", "exec/s", "coverage", "corpus"
    );
    let n = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    for (t, o) in outcomes {
        eprintln!(
            "{:<18} {:>10} {:>8} {:>14} {:>14}  {}",
            t.name,
            n(o.runs),
            n(o.exec_per_s),
            format!("{} -> {}", n(o.cov_start), n(o.cov_end)),
            format!("{} -> {}", n(o.corpus_start), n(o.corpus_end)),
            if o.finding.is_some() { "FINDING" } else { "ok" }
        );
    }
}

/// `path` relative to the workspace root where it is inside it.
fn display(path: &Path) -> String {
    let root = root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_gives_runs_speed_coverage_and_the_finding() {
        let mut o = Outcome::default();
        for line in [
            "#2\tINITED cov: 812 ft: 1500 corp: 12/3456b exec/s: 0 rss: 40Mb",
            "#4096\tpulse  cov: 830 ft: 1600 corp: 20/4000b lim: 4096 exec/s: 2048 rss: 41Mb",
            "thread '<unnamed>' panicked at fuzz_targets/x.rs:3:5:",
            "index out of bounds",
            "==1== ERROR: libFuzzer: deadly signal",
            "Test unit written to ./fuzz/artifacts/x/crash-abc",
            "stat::number_of_executed_units: 123456",
            "stat::average_exec_per_sec:     4115",
            "stat::peak_rss_mb:              45",
        ] {
            read_line(line, &mut o);
        }
        assert_eq!(
            (o.cov_start, o.cov_end, o.corpus_start, o.corpus_end),
            (Some(812), Some(830), Some(12), Some(20))
        );
        assert_eq!((o.runs, o.exec_per_s), (Some(123456), Some(4115)));
        assert_eq!(o.peak_rss_mb, Some(45));
        assert_eq!(
            o.finding.as_deref(),
            Some("thread '<unnamed>' panicked at fuzz_targets/x.rs:3:5: index out of bounds")
        );
        assert_eq!(
            o.artifact.as_deref(),
            Some(Path::new("./fuzz/artifacts/x/crash-abc"))
        );
    }

    #[test]
    fn every_target_has_its_seed_corpus_and_the_dictionary_it_names() {
        let fuzz = root().join("fuzz");
        for t in &TARGETS {
            let seeds = std::fs::read_dir(fuzz.join("corpus").join(t.name))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "fuzz/corpus/{} has no seeds", t.name);
            assert_eq!(
                fuzz.join("dict").join(format!("{}.dict", t.name)).is_file(),
                t.dict,
                "{}",
                t.name
            );
            let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap_or_default();
            assert!(
                manifest.contains(&format!("name = \"{}\"", t.name)),
                "fuzz/Cargo.toml has no [[bin]] {}",
                t.name
            );
        }
    }
}
