//! `gpuscale-agent watch`: streams every new sample of a running agent's ring, one line each,
//! as it is written: for measuring reaction times (`cargo xtask gpu-check`) and for watching a
//! GPU live without gRPC.
//!
//! Owns only reading: it maps the ring file read-only (like `dump`), polls each GPU's head and
//! prints the records it has not printed yet, oldest first. It never writes to the file and never
//! touches NVML. When the agent replaces the file (a restart with another layout), it follows
//! the new file from its newest record on.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::ring::Read;
use crate::sample::{Metric, Sample};
use crate::shm::ShmReader;
use crate::{Error, Result};

/// Flags of `gpuscale-agent watch`.
#[derive(clap::Args)]
pub struct Args {
    /// Ring file of the agent to follow.
    #[arg(long, env = "GPUSCALE_SHM", default_value = super::DEFAULT_SHM)]
    pub shm: PathBuf,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only this GPU (its NVML index); default: every GPU.
    #[arg(long)]
    pub gpu: Option<u32>,
    /// Stop after printing this many samples; default: run until stopped (SIGTERM, Ctrl-C, or
    /// the reader of stdout going away).
    #[arg(long)]
    pub count: Option<u64>,
    /// How often to look for new samples, 100us to 1s.
    #[arg(long, default_value = "2ms", value_parser = parse_poll)]
    pub poll: Duration,
}

fn parse_poll(s: &str) -> std::result::Result<Duration, String> {
    let d = vocab::duration::parse(s)?;
    if d < Duration::from_micros(100) || d > Duration::from_secs(1) {
        return Err(format!("{s} is outside the accepted range 100us to 1s"));
    }
    Ok(d)
}

/// How often the file is checked for having been replaced by a restarted agent.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// One sample as a JSON line: `gpu`, `seq` (its position in the GPU's ring), `ts_ns` (when the
/// agent sampled, Unix ns), `seen_ns` (when `watch` read it), `state`, `processes` and every
/// metric by name (`null` when not measured, never 0).
pub fn sample_json(gpu: u32, seq: u64, s: &Sample, vram_total: u64, seen_ns: u64) -> Value {
    let metrics: Map<String, Value> = Metric::ALL
        .into_iter()
        .map(|m| (m.name().to_owned(), json!(s.get(m, vram_total))))
        .collect();
    json!({
        "gpu": gpu,
        "seq": seq,
        "ts_ns": s.ts_ns,
        "seen_ns": seen_ns,
        "state": s.state().name(),
        "processes": s.process_count,
        "metrics": metrics,
    })
}

/// One sample as a line of text.
pub fn sample_text(gpu: u32, seq: u64, s: &Sample, vram_total: u64) -> String {
    use std::fmt::Write as _;
    let mut line = format!(
        "gpu {gpu} #{seq} {}.{:03} {}",
        s.ts_ns / 1_000_000_000,
        (s.ts_ns / 1_000_000) % 1000,
        s.state().name()
    );
    for m in Metric::ALL {
        let v = match (m, s.get(m, vram_total)) {
            (_, None) => "-".to_owned(),
            (Metric::VramUsedBytes, Some(b)) => format!("{:.0}MiB", b / 1_048_576.0),
            (_, Some(v)) => format!("{v:.1}"),
        };
        let _ = write!(line, " {} {v}", m.name());
    }
    line
}

/// The file's identity, to notice a restarted agent renaming a new file over it.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Follows `path` per `args`, writing lines to `out`. Returns when `count` lines were written
/// or `out` fails (its reader went away).
pub fn follow(args: &Args, out: &mut impl Write) -> Result<()> {
    let mut printed = 0u64;
    'reopen: loop {
        let id = identity(&args.shm);
        let reader = ShmReader::open(&args.shm)?;
        let gpus: Vec<_> = reader.gpus().to_vec();
        if let Some(want) = args.gpu {
            if !gpus.iter().any(|g| g.index == want) {
                let have: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
                return Err(Error::NoSuchGpu {
                    path: args.shm.clone(),
                    gpu: want,
                    have: if have.is_empty() {
                        "none".to_owned()
                    } else {
                        have.join(", ")
                    },
                });
            }
        }
        let regions = reader.regions();
        // Start at each GPU's current head: only samples written from now on are printed.
        let mut next: Vec<u64> = regions.iter().map(|r| r.ring().head()).collect();
        let mut checked = Instant::now();
        loop {
            let mut any = false;
            for ((region, info), pos) in regions.iter().zip(&gpus).zip(next.iter_mut()) {
                if args.gpu.is_some_and(|g| g != info.index) {
                    continue;
                }
                let ring = region.ring();
                let head = ring.head();
                // Records older than the ring's capacity are gone; skip to the oldest kept one.
                *pos = (*pos).max(head.saturating_sub(ring.capacity()));
                while *pos < head {
                    match ring.read(*pos) {
                        Read::Record(s) => {
                            let line = if args.json {
                                sample_json(
                                    info.index,
                                    *pos,
                                    &s,
                                    info.memory_total_bytes,
                                    crate::unix_now_ns(),
                                )
                                .to_string()
                            } else {
                                sample_text(info.index, *pos, &s, info.memory_total_bytes)
                            };
                            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                                // Whoever read stdout is gone: nothing left to do.
                                return Ok(());
                            }
                            printed += 1;
                            any = true;
                            if args.count.is_some_and(|c| printed >= c) {
                                return Ok(());
                            }
                        }
                        Read::Overwritten => {}
                        Read::NotWritten => break,
                    }
                    *pos += 1;
                }
            }
            if reader.truncated() {
                // What was read since may be zeros: open the file again (an agent writing it
                // stops and its restart writes a new one; a file still truncated is an error).
                continue 'reopen;
            }
            if checked.elapsed() >= REOPEN_CHECK {
                checked = Instant::now();
                if identity(&args.shm) != id && identity(&args.shm).is_some() {
                    continue 'reopen;
                }
            }
            if !any {
                std::thread::sleep(args.poll);
            }
        }
    }
}

/// Runs `gpuscale-agent watch`, printing to stdout.
pub fn run(args: &Args) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    follow(args, &mut out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{GpuState, Slot};

    #[test]
    fn a_sample_line_carries_time_state_and_every_metric_with_absent_ones_null() {
        let mut s = Sample::empty(1_700_000_000_123_000_000, GpuState::Ok);
        s.set(Slot::GpuUtil, 37.0);
        s.set_vram_used(2 << 30);
        s.process_count = 2;
        let v = sample_json(3, 17, &s, 8 << 30, 42);
        assert_eq!(v["gpu"], 3);
        assert_eq!(v["seq"], 17);
        assert_eq!(v["ts_ns"], 1_700_000_000_123_000_000u64);
        assert_eq!(v["seen_ns"], 42);
        assert_eq!(v["state"], "ok");
        assert_eq!(v["processes"], 2);
        assert_eq!(v["metrics"]["gpu_util"], 37.0);
        assert_eq!(v["metrics"]["vram_used_bytes"], (2u64 << 30) as f64);
        assert_eq!(v["metrics"]["vram_used_pct"], 25.0);
        assert!(v["metrics"]["sm_active"].is_null(), "absent is null, not 0");
        assert_eq!(v["metrics"].as_object().unwrap().len(), Metric::COUNT);
        let t = sample_text(3, 17, &s, 8 << 30);
        assert!(t.starts_with("gpu 3 #17 1700000000.123 ok"), "{t}");
        assert!(
            t.contains("gpu_util 37.0") && t.contains("sm_active -"),
            "{t}"
        );
        assert!(t.contains("vram_used_bytes 2048MiB"), "{t}");
    }

    #[test]
    fn poll_outside_its_range_is_refused_with_the_range() {
        assert_eq!(parse_poll("2ms"), Ok(Duration::from_millis(2)));
        assert!(parse_poll("10us").unwrap_err().contains("100us to 1s"));
        assert!(parse_poll("2s").unwrap_err().contains("100us to 1s"));
    }
}
