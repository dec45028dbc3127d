//! Label selectors in their string form (`Selector::parse`), as `podSelector` and a target's
//! selector arrive.
//!
//! Input: the selector as UTF-8 text (anything else is skipped: a selector is a Kubernetes
//! string). Seeds are in `fuzz/corpus/label_selector/`, words in `fuzz/dict/label_selector.dict`.
//!
//! Never panics; an error points at a character boundary inside the input (or its end); a
//! selector that parses prints in a form that parses to the same selector (the promise of its
//! `Display`), and is matched against a few label sets without panicking.
#![no_main]

use std::collections::BTreeMap;

use collector::model::selector::Selector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let s = match Selector::parse(text) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                e.position <= text.len() && text.is_char_boundary(e.position),
                "error at byte {} of {} bytes",
                e.position,
                text.len()
            );
            let _ = e.to_string();
            return;
        }
    };
    let printed = s.to_string();
    let again = Selector::parse(&printed)
        .unwrap_or_else(|e| panic!("the printed selector {printed:?} does not parse: {e}"));
    assert_eq!(again, s, "{text:?} printed as {printed:?}");

    // Labels with each key at its first value, at each value, and none at all.
    let mut first = BTreeMap::new();
    for r in s.requirements() {
        let v = r.values().first().cloned().unwrap_or_default();
        first.insert(r.key().to_owned(), v);
    }
    let _ = s.matches(&BTreeMap::new());
    let _ = s.matches(&first);
    for r in s.requirements() {
        for v in r.values() {
            let labels = BTreeMap::from([(r.key().to_owned(), v.clone())]);
            let _ = r.matches(&labels);
        }
    }
    assert_eq!(s.is_empty(), s.requirements().is_empty());
    if s.is_empty() {
        assert!(s.matches(&first), "the empty selector matches every pod");
    }
});
