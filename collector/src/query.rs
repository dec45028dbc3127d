//! `gpuscale-collector query`: asks a collector what KEDA would be told for one trigger, over
//! KEDA's own external-scaler gRPC API (`GetMetricSpec`, `GetMetrics`, `IsActive`), and shows the
//! replica count the HPA would want and, from the collector's debug API (`Evaluate`, asked right
//! after), the replicas and per-GPU values the value combined. For debugging a ScaledObject before applying it; with
//! `--watch DUR` it asks again every `DUR` over one connection and prints every answer with the
//! time it arrived (how `cargo xtask gpu-check` times a load step reaching KEDA).

use std::collections::HashMap;
use std::time::Duration;

use proto::collector::collector_client::CollectorClient;
use proto::collector::EvaluateRequest;
use proto::externalscaler::external_scaler_client::ExternalScalerClient;
use proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use serde_json::{json, Value};

use crate::trigger::{desired_replicas, MetricType};
use crate::Result;

/// What to ask.
#[derive(Clone, Debug)]
pub struct Query {
    /// The collector's address.
    pub collector: String,
    /// The ScaledObject's namespace.
    pub namespace: String,
    /// The ScaledObject's name.
    pub name: String,
    /// The trigger's metadata.
    pub metadata: HashMap<String, String>,
    /// The trigger's `metricType`.
    pub metric_type: MetricType,
    /// Replicas running now (matters for `metricType: Value`).
    pub current_replicas: u32,
}

/// Calls the three RPCs as KEDA does and returns what happened as JSON: `metric_name`,
/// `target`, `value` or `error`, `active` or `error`, the HPA's `desired_replicas`, and
/// `replicas`: each replica's value and the per-GPU values it came from.
pub async fn run(q: &Query) -> Result<Value> {
    let channel = connect(q).await?;
    Ok(ask(&channel, q).await)
}

/// Asks as [`run`] does every `every` (the next round starts `every` after the previous one
/// started, or at once when a round took longer), over one connection, and hands each answer to
/// `each` with `ts_ns`: when the `GetMetrics` answer arrived, nanoseconds since the Unix epoch.
/// Stops after `count` answers, or when `each` returns `false`. A failed call is an answer (with
/// its error), not the end: the collector may be restarting.
pub async fn watch(
    q: &Query,
    every: Duration,
    count: Option<u64>,
    mut each: impl FnMut(&Value) -> bool,
) -> Result<()> {
    if every.is_zero() {
        return Err(crate::Error::Config(
            "--watch 0: give the time between queries, e.g. --watch 50ms".into(),
        ));
    }
    let channel = connect(q).await?;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answered = 0u64;
    while count.is_none_or(|c| answered < c) {
        ticks.tick().await;
        let v = ask(&channel, q).await;
        answered += 1;
        if !each(&v) {
            break;
        }
    }
    Ok(())
}

async fn connect(q: &Query) -> Result<tonic::transport::Channel> {
    // No channel-wide deadline: GetMetrics carries KEDA's own 3 s one below.
    crate::connect_collector(&q.collector, None).await
}

use gpuscale_health::ops::unix_now_ns;

/// One round of the three RPCs, then `Evaluate`; every outcome is an answer.
async fn ask(channel: &tonic::transport::Channel, q: &Query) -> Value {
    let mut client = ExternalScalerClient::new(channel.clone());
    let so = ScaledObjectRef {
        name: q.name.clone(),
        namespace: q.namespace.clone(),
        scaler_metadata: q.metadata.clone(),
    };
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let spec = match client.get_metric_spec(so.clone()).await {
        Ok(r) => r.into_inner().metric_specs.into_iter().next(),
        Err(s) => return json!({"error": status(s), "ts_ns": unix_now_ns()}),
    };
    let Some(spec) = spec else {
        return json!({"error": "GetMetricSpec returned no metric", "ts_ns": unix_now_ns()});
    };
    let mut req = tonic::Request::new(GetMetricsRequest {
        scaled_object_ref: Some(so.clone()),
        metric_name: spec.metric_name.clone(),
    });
    // The deadline KEDA's metrics server gives each call.
    req.set_timeout(Duration::from_secs(3));
    let value = client
        .get_metrics(req)
        .await
        .map(|r| {
            r.into_inner()
                .metric_values
                .first()
                .map(|v| v.metric_value_float)
        })
        .map_err(status);
    let ts_ns = unix_now_ns();
    let active = client
        .is_active(so)
        .await
        .map(|r| r.into_inner().result)
        .map_err(status);
    let mut out = json!({
        "scaled_object": format!("{}/{}", q.namespace, q.name),
        "metric_name": spec.metric_name,
        "target": spec.target_size_float,
        "metric_type": match q.metric_type { MetricType::AverageValue => "AverageValue", MetricType::Value => "Value" },
        "ts_ns": ts_ns,
    });
    match value {
        Ok(Some(v)) => {
            out["value"] = json!(v);
            out["desired_replicas"] = json!(desired_replicas(
                v,
                spec.target_size_float,
                q.metric_type,
                q.current_replicas
            ));
        }
        Ok(None) => out["value_error"] = json!("GetMetrics returned no value"),
        Err(e) => out["value_error"] = json!(e),
    }
    match active {
        Ok(a) => out["active"] = json!(a),
        Err(e) => out["active_error"] = json!(e),
    }
    let evaluated = CollectorClient::new(channel.clone())
        .evaluate(EvaluateRequest {
            namespace: q.namespace.clone(),
            name: q.name.clone(),
            scaler_metadata: q.metadata.clone(),
        })
        .await;
    match evaluated {
        Ok(r) => {
            let r = r.into_inner();
            if r.value.is_some() {
                out["aggregation"] = json!(r.aggregation);
                out["gpu_aggregation"] = json!(r.gpu_aggregation);
                out["replica_label"] = json!(r.replica_label);
                out["replicas"] = r.replicas.iter().map(replica_json).collect();
            }
        }
        // A collector of an older release has no Evaluate: the KEDA answers stand alone.
        Err(s) if s.code() == tonic::Code::Unimplemented => {}
        Err(s) => out["replicas_error"] = json!(status(s)),
    }
    out
}

fn replica_json(r: &proto::collector::ReplicaValue) -> Value {
    json!({
        "replica": r.replica,
        "pods": r.pods,
        "value": r.value,
        "gpus": r.gpus.iter().map(|g| json!({
            "pod": g.pod, "node": g.node, "gpu": g.gpu_uuid, "value": g.value,
            "shared": g.shared, "fell_back": g.fell_back,
        })).collect::<Vec<_>>(),
    })
}

/// The replica lines of [`render`]: one per replica, with the GPU values it combined.
fn render_replicas(v: &Value) -> String {
    let Some(replicas) = v["replicas"].as_array() else {
        return String::new();
    };
    let label = v["replica_label"].as_str().filter(|l| !l.is_empty());
    let mut out = format!(
        "  {} replica(s){}: each its GPUs' {}, then their {}\n",
        replicas.len(),
        label.map_or(String::new(), |l| format!(" by label {l}")),
        v["gpu_aggregation"].as_str().unwrap_or("?"),
        v["aggregation"].as_str().unwrap_or("?"),
    );
    for r in replicas {
        let gpus: Vec<String> = r["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                let mut s = format!(
                    "{} {:.1}",
                    g["gpu"].as_str().unwrap_or("?"),
                    g["value"].as_f64().unwrap_or(f64::NAN)
                );
                if g["shared"] == true {
                    s.push_str(" (shared)");
                }
                if g["fell_back"] == true {
                    s.push_str(" (gpu_util)");
                }
                if r["pods"].as_array().is_some_and(|p| p.len() > 1) {
                    s.push_str(&format!(" [{}]", g["pod"].as_str().unwrap_or("?")));
                }
                s
            })
            .collect();
        out.push_str(&format!(
            "    {} {:.1}: {}\n",
            r["replica"].as_str().unwrap_or("?"),
            r["value"].as_f64().unwrap_or(f64::NAN),
            if gpus.is_empty() {
                "no GPU".to_owned()
            } else {
                gpus.join(", ")
            }
        ));
    }
    out
}

/// Parses `--watch`: a duration (`50ms`, `1s`, `1m30s`), 1 ms to 1 h.
pub fn parse_every(s: &str) -> std::result::Result<Duration, String> {
    let d = vocab::duration::parse(s)
        .map_err(|why| format!("{why}; write the time between queries like 50ms or 1s"))?;
    if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&d) {
        return Err(format!("{s:?} is outside the accepted range 1ms to 1h"));
    }
    Ok(d)
}

/// One line for a terminal.
pub fn render(v: &Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("KEDA would get an error: {e}\n");
    }
    let head = format!(
        "{} · {} · target {}",
        v["scaled_object"].as_str().unwrap_or("?"),
        v["metric_name"].as_str().unwrap_or("?"),
        v["target"]
    );
    let value = match (&v["value"], v["value_error"].as_str()) {
        (Value::Number(n), _) => format!(
            "GetMetrics {:.1} → the HPA ({}) wants {} replica(s)",
            n.as_f64().unwrap_or(f64::NAN),
            v["metric_type"].as_str().unwrap_or("?"),
            v["desired_replicas"]
        ),
        (_, Some(e)) => format!("GetMetrics fails ({e}): KEDA applies its fallback"),
        _ => "GetMetrics: no value".into(),
    };
    let active = match (&v["active"], v["active_error"].as_str()) {
        (Value::Bool(a), _) => format!("IsActive {a}"),
        (_, Some(e)) => format!("IsActive fails ({e})"),
        _ => "IsActive ?".into(),
    };
    format!("{head}\n  {value}\n  {active}\n{}", render_replicas(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_interval_takes_ms_and_s_and_refuses_the_rest_with_the_fix() {
        assert_eq!(parse_every("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_every("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_every("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_every("50").unwrap_err().contains("like 50ms or 1s"));
        assert!(parse_every("fast").unwrap_err().contains("like 50ms or 1s"));
        assert!(parse_every("0ms").unwrap_err().contains("1ms to 1h"));
        assert!(parse_every("2h").unwrap_err().contains("1ms to 1h"));
        assert_eq!(parse_every("1m30s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn render_shows_each_replica_with_the_gpu_values_it_combined() {
        let v = json!({
            "scaled_object": "ml/vllm", "metric_name": "gpuscale-sm-active-last-30s-sum",
            "target": 80.0, "metric_type": "AverageValue", "value": 160.0,
            "desired_replicas": 2, "active": true,
            "aggregation": "sum", "gpu_aggregation": "avg", "replica_label": "group",
            "replicas": [
                {"replica": "group=a", "pods": ["ml/a-0", "ml/a-1"], "value": 70.0, "gpus": [
                    {"pod": "ml/a-0", "node": "n", "gpu": "GPU-0", "value": 60.0,
                     "shared": true, "fell_back": false},
                    {"pod": "ml/a-1", "node": "n", "gpu": "MIG-1", "value": 80.0,
                     "shared": false, "fell_back": true}]},
                {"replica": "ml/b", "pods": ["ml/b"], "value": 90.0, "gpus": []}]
        });
        let text = render(&v);
        assert!(text.contains("wants 2 replica(s)"), "{text}");
        assert!(
            text.contains("2 replica(s) by label group: each its GPUs' avg, then their sum"),
            "{text}"
        );
        assert!(
            text.contains(
                "group=a 70.0: GPU-0 60.0 (shared) [ml/a-0], MIG-1 80.0 (gpu_util) [ml/a-1]"
            ),
            "{text}"
        );
        assert!(text.contains("ml/b 90.0: no GPU"), "{text}");
    }
}
