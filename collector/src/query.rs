//! `gpuscale-collector query`: asks a collector what KEDA would be told for one trigger, over
//! KEDA's own external-scaler gRPC API (`GetMetricSpec`, `GetMetrics`, `IsActive`), and shows the
//! replica count the HPA would want. For debugging a ScaledObject before applying it.

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
    // No channel-wide deadline: GetMetrics carries KEDA's own 3 s one below.
    let channel = crate::connect_collector(&q.collector, None).await?;
    let mut client = ExternalScalerClient::new(channel);
    let so = ScaledObjectRef {
        name: q.name.clone(),
        namespace: q.namespace.clone(),
        scaler_metadata: q.metadata.clone(),
    };
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let spec = match client.get_metric_spec(so.clone()).await {
        Ok(r) => r.into_inner().metric_specs.into_iter().next(),
        Err(s) => return Ok(json!({"error": status(s)})),
    };
    let Some(spec) = spec else {
        return Ok(json!({"error": "GetMetricSpec returned no metric"}));
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
    Ok(out)
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
