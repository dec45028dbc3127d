//! The ring file as `gpuscale-agent dump` and `watch` read it: `shm::ShmReader::open` maps and
//! validates it, then everything `dump` reads (`cli::dump::collect`: every GPU's ring rebuilt
//! into windows, its state and process snapshot, the agent status), printed both ways, and every
//! slot `watch` would print.
//!
//! Input: the whole file, written to a temporary file and opened by path as the reader opens
//! `--shm` (no writer lock beside it: "no agent running"). A file that is not a ring file of this build
//! is refused by `open`; the seeds in `fuzz/corpus/ring_file/` were written by the agent's own
//! `ShmWriter` (one GPU, one slot, a few samples, a process snapshot and an agent status), so
//! mutations reach the records, not only the header check.
//!
//! Never panics, whatever the header, the seqlock stamps, the ring's head or the records say.
#![no_main]

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::OnceLock;

use agent::cli::dump::{collect, render_table};
use agent::cli::watch::{sample_json, sample_text};
use agent::ring::Read;
use agent::shm::ShmReader;
use libfuzzer_sys::fuzz_target;

/// A fixed "now" (2027-01-15), so that an input always reads the same.
const NOW_NS: u64 = 1_800_000_000_000_000_000;

/// The file every input is written to: one without a name (`O_TMPFILE`, or unlinked at once), so
/// that a run leaves nothing behind however it ends, opened by its `/proc/self/fd` path. It is in
/// `/dev/shm`, where the agent keeps its ring, when there is one (a tmpfs: writing every input to
/// a busy disk made the target wait on writeback most of its time).
fn file() -> &'static (File, PathBuf) {
    static FILE: OnceLock<(File, PathBuf)> = OnceLock::new();
    FILE.get_or_init(|| {
        let file = tempfile::tempfile_in("/dev/shm")
            .or_else(|_| tempfile::tempfile())
            .expect("a temporary file for the ring file");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    })
}

fuzz_target!(|data: &[u8]| {
    let (file, path) = file();
    // The previous input's mapping is gone (its reader was dropped), so this truncation is not
    // one under a reader.
    file.set_len(0).expect("emptying the ring file");
    file.write_all_at(data, 0).expect("writing the ring file");
    let Ok(reader) = ShmReader::open(path) else {
        return;
    };
    let report = collect(&reader, NOW_NS);
    let _ = serde_json::to_string_pretty(&report).expect("a report serializes");
    let _ = render_table(&report);
    for (region, info) in reader.regions().iter().zip(reader.gpus()) {
        let ring = region.ring();
        let head = ring.head();
        for pos in head.saturating_sub(ring.capacity())..head {
            match ring.read(pos) {
                Read::Record(s) => {
                    let _ = sample_json(info.index, pos, &s, info.memory_total_bytes, NOW_NS);
                    let _ = sample_text(info.index, pos, &s, info.memory_total_bytes);
                }
                Read::Overwritten => {}
                Read::NotWritten => break,
            }
        }
    }
    assert!(!reader.truncated(), "nothing truncates the file here");
});
