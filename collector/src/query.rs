//! `gpuscale-collector query`: asks a collector what KEDA would be told for one trigger, over
//! KEDA's own external-scaler gRPC API (`GetMetricSpec`, `GetMetrics`, `IsActive`), and shows the
//! replica count the HPA would want. For debugging a ScaledObject before applying it; with
//! `--watch DUR` it asks again every `DUR` over one connection and prints every answer with the
//! time it arrived (how `cargo xtask gpu-check` times a load step reaching KEDA).

use std::collections::HashMap;
use std::time::Duration;

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
/// `target`, `value` or `error`, `active` or `error`, and the HPA's `desired_replicas`.
pub async fn run(q: &Query) -> Result<Value> {
    let mut client = connect(q).await?;
    Ok(ask(&mut client, q).await)
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
    let mut client = connect(q).await?;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answered = 0u64;
    while count.is_none_or(|c| answered < c) {
        ticks.tick().await;
        let v = ask(&mut client, q).await;
        answered += 1;
        if !each(&v) {
            break;
        }
    }
    Ok(())
}

async fn connect(q: &Query) -> Result<ExternalScalerClient<tonic::transport::Channel>> {
    // No channel-wide deadline: GetMetrics carries KEDA's own 3 s one below.
    let channel = crate::connect_collector(&q.collector, None).await?;
    Ok(ExternalScalerClient::new(channel))
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One round of the three RPCs; every outcome is an answer.
async fn ask(client: &mut ExternalScalerClient<tonic::transport::Channel>, q: &Query) -> Value {
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
    out
}

/// Parses `--watch`: a duration of milliseconds or seconds (`50ms`, `1s`, `0.5s`), 1 ms to 1 h.
pub fn parse_every(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("{s:?}: write the time between queries like 50ms or 1s");
    let t = s.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let secs = number.parse::<f64>().map_err(|_| bad())? * scale;
    if !(1e-3..=3600.0).contains(&secs) {
        return Err(format!("{s:?} is outside the accepted range 1ms to 1h"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
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
    format!("{head}\n  {value}\n  {active}\n")
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
        assert!(parse_every("2h").unwrap_err().contains("like 50ms"));
    }
}
