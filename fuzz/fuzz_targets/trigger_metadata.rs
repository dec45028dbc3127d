//! KEDA's trigger metadata as the collector's KEDA service takes it (`api::scaler`): the request's
//! sizes checked first (`api::limits::check`), then the metadata parsed (`Trigger::parse`, which
//! parses `podSelector` too), and the error turned into the message KEDA gets.
//!
//! Input: text, one entry per line. The first line is the ScaledObject as `namespace/name`; each
//! further line is a metadata entry `key=value` (split at the first `=`; a line without one is a
//! key with an empty value; a later line wins over an earlier one with the same key). Seeds are
//! in `fuzz/corpus/trigger_metadata/`, words in `fuzz/dict/trigger_metadata.dict`.
//!
//! Never panics, and a trigger that parses keeps the promises of `Trigger`'s fields: a finite
//! `targetValue` of at least `MIN_TARGET_VALUE`, a finite `activationThreshold` ≥ 0, a
//! `staleAfter` in (0, 10m], a metric that is a trigger metric, a metric name of `[a-z0-9-]`
//! only, and a `podSelector` that prints as it parses.
#![no_main]

use std::collections::HashMap;

use collector::api::limits;
use collector::model::selector::Selector;
use collector::model::trigger::{Trigger, MAX_STALE_AFTER, MIN_TARGET_VALUE};
use libfuzzer_sys::fuzz_target;
use proto::externalscaler::ScaledObjectRef;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let (namespace, name) = lines
        .next()
        .unwrap_or_default()
        .split_once('/')
        .unwrap_or(("", ""));
    let scaler_metadata: HashMap<String, String> = lines
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let r = ScaledObjectRef {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scaler_metadata,
    };

    // The order of `Scaler::compiled`: refuse what KEDA never sends before parsing it.
    let _ = limits::display(&r);
    if let Err(status) = limits::check(&r) {
        assert!(
            status.message().len() < 1024,
            "a refusal quotes a prefix, not the input: {} bytes",
            status.message().len()
        );
        return;
    }
    let t = match Trigger::parse(&r.scaler_metadata) {
        Ok(t) => t,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(
        t.target_value.is_finite() && t.target_value >= MIN_TARGET_VALUE,
        "targetValue {}",
        t.target_value
    );
    assert!(
        t.activation_threshold.is_finite() && t.activation_threshold >= 0.0,
        "activationThreshold {}",
        t.activation_threshold
    );
    assert!(
        !t.stale_after.is_zero() && t.stale_after <= MAX_STALE_AFTER,
        "staleAfter {:?}",
        t.stale_after
    );
    assert!(t.metric.is_trigger(), "metric {:?}", t.metric);
    let name = t.metric_name();
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "metric name {name:?}"
    );
    if let Some(s) = &t.pod_selector {
        let printed = s.to_string();
        let again = Selector::parse(&printed)
            .unwrap_or_else(|e| panic!("the printed selector {printed:?} does not parse: {e}"));
        assert_eq!(&again, s.as_ref(), "printed as {printed:?}");
    }
    let _ = t.require_selector();
});
