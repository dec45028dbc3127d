//! The `--pods-file` (a Kubernetes `PodList` JSON) as the collector loads it:
//! `sources::pods::parse_pod_list`, then indexed as `PodsFile::load` does.
//!
//! Input: the file's text (UTF-8; anything else is skipped, as reading it to a string would
//! fail before parsing). Seeds are in `fuzz/corpus/pods_file/`, words in
//! `fuzz/dict/pods_file.dict`.
//!
//! Never panics; every pod it returns has a namespace, a name and a UID, and no UID twice (two
//! pods with one UID would both take that UID's GPU values); an error names the file.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use collector::sources::pods::{parse_pod_list, PodIndex};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/etc/gpuscale/pods.json";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pods = match parse_pod_list(Path::new(PATH), text) {
        Ok(pods) => pods,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(PATH),
                "the error names the file: {message}"
            );
            return;
        }
    };
    let mut uids = HashSet::new();
    for p in &pods {
        assert!(
            !p.namespace.is_empty() && !p.name.is_empty() && !p.uid.is_empty(),
            "{p:?}"
        );
        assert!(uids.insert(p.uid.as_str()), "UID {:?} twice", p.uid);
    }
    let distinct = uids.len();
    let index = PodIndex::new(1, pods);
    assert_eq!(index.by_uid.len(), distinct);
});
