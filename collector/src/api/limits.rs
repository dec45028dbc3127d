//! The sizes a KEDA request may have. KEDA sends a ScaledObject's name and namespace (bounded by
//! Kubernetes: 253 and 63 bytes) and its trigger metadata (a handful of short keys); anything
//! larger is not KEDA, and is refused with `INVALID_ARGUMENT` before it is parsed, cached,
//! logged or recorded, quoting at most a short prefix. Together with the bounded trigger cache
//! (`model::compiled`) and series map (`api::metrics`), this bounds what any caller can make the
//! collector hold.

use proto::externalscaler::ScaledObjectRef;
use tonic::Status;

use crate::quote;

/// Longest ScaledObject name: a Kubernetes object name (DNS subdomain).
pub const MAX_NAME: usize = 253;
/// Longest namespace: a DNS label.
pub const MAX_NAMESPACE: usize = 63;
/// Most trigger metadata entries (gpuscale reads 14 keys, KEDA adds a few of its own).
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key.
pub const MAX_METADATA_KEY: usize = 128;
/// Most bytes of metadata, keys and values together.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Longest `metricName` of a `GetMetrics` request (KEDA's `s<N>-` prefix and gpuscale's name).
pub const MAX_METRIC_NAME: usize = 253;

fn too_long(what: &str, value: &str, max: usize) -> Status {
    Status::invalid_argument(format!(
        "{what} {} is longer than {max} bytes; KEDA never sends that",
        quote(value)
    ))
}

/// `r` within the limits, else `INVALID_ARGUMENT` naming the field.
pub fn check(r: &ScaledObjectRef) -> Result<(), Status> {
    if r.name.len() > MAX_NAME {
        return Err(too_long("ScaledObject name", &r.name, MAX_NAME));
    }
    if r.namespace.len() > MAX_NAMESPACE {
        return Err(too_long("namespace", &r.namespace, MAX_NAMESPACE));
    }
    let m = &r.scaler_metadata;
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "trigger metadata has {} keys, more than {MAX_METADATA_ENTRIES}",
            m.len()
        )));
    }
    if let Some(k) = m.keys().find(|k| k.len() > MAX_METADATA_KEY) {
        return Err(too_long("trigger metadata key", k, MAX_METADATA_KEY));
    }
    let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_METADATA_BYTES {
        let (k, v) = m
            .iter()
            .max_by_key(|(_, v)| v.len())
            .expect("metadata over the limit is not empty");
        return Err(Status::invalid_argument(format!(
            "trigger metadata is {bytes} bytes, more than {MAX_METADATA_BYTES} (its longest \
             value, {k:?}, starts {})",
            quote(v)
        )));
    }
    Ok(())
}

/// `metric_name` of a `GetMetrics` request within its limit.
pub fn check_metric_name(name: &str) -> Result<(), Status> {
    if name.len() > MAX_METRIC_NAME {
        return Err(too_long("metricName", name, MAX_METRIC_NAME));
    }
    Ok(())
}

/// `namespace/name` for logs and spans, each cut to a prefix when over its limit (a span is made
/// before the request is checked).
pub fn display(r: &ScaledObjectRef) -> String {
    let cut = |s: &str, max: usize| {
        if s.len() <= max {
            s.to_owned()
        } else {
            quote(s)
        }
    };
    format!(
        "{}/{}",
        cut(&r.namespace, MAX_NAMESPACE),
        cut(&r.name, MAX_NAME)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tonic::Code;

    fn so(name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: name.into(),
            namespace: "ml".into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        }
    }

    fn refused(r: &ScaledObjectRef) -> String {
        let s = check(r).expect_err("refused");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().len() < 300,
            "quotes a prefix only: {}",
            s.message()
        );
        s.message().to_owned()
    }

    #[test]
    fn what_keda_sends_passes_and_what_it_never_sends_is_refused_quoting_a_prefix() {
        assert!(check(&so(
            "vllm",
            &[("metric", "sm_active"), ("targetValue", "80")]
        ))
        .is_ok());
        assert!(check(&so(&"n".repeat(MAX_NAME), &[])).is_ok());
        let m = refused(&so(&"n".repeat(3 << 20), &[]));
        assert!(
            m.starts_with("ScaledObject name \"nnnn") && m.contains("3145728 bytes"),
            "{m}"
        );
        let mut r = so("vllm", &[]);
        r.namespace = "x".repeat(64);
        assert!(refused(&r).starts_with("namespace"));
        let value = "a".repeat(3 << 20);
        let m = refused(&so("vllm", &[("podSelector", &value)]));
        assert!(
            m.contains("\"podSelector\"") && m.contains("more than 16384"),
            "{m}"
        );
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(refused(&so("vllm", &many)).contains("65 keys"));
        let key = "k".repeat(200);
        assert!(refused(&so("vllm", &[(&key, "v")])).starts_with("trigger metadata key"));
        assert!(check_metric_name(&"m".repeat(254)).is_err());
        assert!(check_metric_name("s0-gpuscale-sm-active-avg-30s-sum").is_ok());
        assert_eq!(display(&so("vllm", &[])), "ml/vllm");
        assert!(display(&so(&"n".repeat(1 << 20), &[])).len() < 100);
    }
}
