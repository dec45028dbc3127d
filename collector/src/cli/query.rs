//! `gpuscale-collector query`: asks a collector what KEDA would be told for one trigger, over
//! KEDA's own external-scaler gRPC API (`GetMetricSpec`, `GetMetrics`, `IsActive`), and shows the
//! replica count the HPA would want and, from the collector's debug API (`Evaluate`, asked right
//! after), the replicas and per-GPU values the value combined. For debugging a ScaledObject before applying it; with
//! `--watch DUR` it asks again every `DUR` over one connection and prints every answer with the
//! time it arrived (how `cargo xtask gpu-check` times a load step reaching KEDA).

use std::collections::HashMap;
use std::time::Duration;

use proto::collector::collector_client::CollectorClient;
use proto::collector::{EvaluateRequest, EvaluateResponse};
use proto::externalscaler::external_scaler_client::ExternalScalerClient;
use proto::externalscaler::{GetMetricsRequest, MetricSpec, ScaledObjectRef};
use serde::{Deserialize, Serialize};

use crate::model::hpa::{desired_replicas, MetricType};
use crate::model::Named;
use crate::Result;

/// What to ask.
#[derive(Clone, Debug)]
pub struct Query {
    /// The collector's address.
    pub collector: String,
    /// TLS to the collector, if it serves TLS.
    pub tls: Option<gpuscale_health::tls::ClientFiles>,
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

/// One round's answer, as `--json` prints it: [`Answered`], or [`Failed`] when
/// `GetMetricSpec` already failed (KEDA would go no further).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// `GetMetricSpec` answered; the other calls' outcomes are in it.
    Answered(Box<Answered>),
    /// `GetMetricSpec` failed.
    Failed(Failed),
}

// Fields are declared in alphabetical order: the output has always listed keys sorted, and
// scripts and tests (tests/e2e, xtask/cluster) read it. A key is present only for the outcome
// it describes (`value` on success, `value_error` on failure, and so on).

/// What KEDA would be told, and what the HPA would do with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answered {
    /// `IsActive`'s answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Why `IsActive` failed (`Unavailable: …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_error: Option<String>,
    /// The trigger's `aggregation`, from `Evaluate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<String>,
    /// The replicas the HPA would want, with a value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<u32>,
    /// The trigger's `gpuAggregation`, from `Evaluate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_aggregation: Option<String>,
    /// `GetMetricSpec`'s metric name.
    pub metric_name: String,
    /// `AverageValue` or `Value` (`--metric-type`).
    pub metric_type: String,
    /// The trigger's `replicaLabel` (empty when none), from `Evaluate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_label: Option<String>,
    /// Each replica's value and the per-GPU values it came from, from `Evaluate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<ReplicaJson>>,
    /// Why `Evaluate` failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas_error: Option<String>,
    /// `namespace/name`.
    pub scaled_object: String,
    /// `GetMetricSpec`'s target.
    pub target: f64,
    /// When the `GetMetrics` answer arrived, nanoseconds since the Unix epoch.
    #[serde(default)]
    pub ts_ns: u64,
    /// `GetMetrics`'s value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Why `GetMetrics` gave no value (KEDA applies its fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_error: Option<String>,
}

/// `GetMetricSpec` failed: KEDA would get this error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// The error (`InvalidArgument: …`).
    pub error: String,
    /// When it arrived, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
}

/// One replica of [`Answered::replicas`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaJson {
    /// Its pods' values per GPU.
    pub gpus: Vec<GpuValueJson>,
    /// Its pods, `namespace/name`.
    pub pods: Vec<String>,
    /// `<replicaLabel>=<value>` or `<namespace>/<pod>`.
    pub replica: String,
    /// Its value.
    pub value: f64,
}

/// One pod's value on one GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuValueJson {
    /// `sm_active` fell back to `gpu_util`.
    pub fell_back: bool,
    /// The GPU or MIG instance UUID.
    pub gpu: String,
    /// The node.
    pub node: String,
    /// The pod, `namespace/name`.
    pub pod: String,
    /// Others use the GPU too.
    pub shared: bool,
    /// The pod's value on it.
    pub value: f64,
}

impl From<&proto::collector::ReplicaValue> for ReplicaJson {
    fn from(r: &proto::collector::ReplicaValue) -> ReplicaJson {
        ReplicaJson {
            gpus: r
                .gpus
                .iter()
                .map(|g| GpuValueJson {
                    fell_back: g.fell_back,
                    gpu: g.gpu_uuid.clone(),
                    node: g.node.clone(),
                    pod: g.pod.clone(),
                    shared: g.shared,
                    value: g.value,
                })
                .collect(),
            pods: r.pods.clone(),
            replica: r.replica.clone(),
            value: r.value,
        }
    }
}

/// Calls the three RPCs as KEDA does and returns what happened: `metric_name`, `target`,
/// `value` or `value_error`, `active` or `active_error`, the HPA's `desired_replicas`, and
/// `replicas`: each replica's value and the per-GPU values it came from.
pub async fn run(q: &Query) -> Result<Answer> {
    let channel = connect(q).await?;
    Ok(ask(&channel, q).await)
}

/// Asks as [`run`] does every `every` (the next round starts `every` after the previous one
/// started, or at once when a round took longer), over one connection, and hands each answer to
/// `each` with `ts_ns`: when the `GetMetrics` answer arrived, nanoseconds since the Unix epoch.
/// Stops after `count` answers, or when `each` returns `false`. A failed call is an answer (with
/// its error), not the end: the collector may be restarting. While it watches, it holds a
/// `StreamIsActive` stream of the trigger open, as KEDA does for an `external-push` trigger, so
/// the agents send the trigger's series at every sample (see `sources::demand`): a watch shows
/// each sample, not one per pace.
pub async fn watch(
    q: &Query,
    every: Duration,
    count: Option<u64>,
    mut each: impl FnMut(&Answer) -> bool,
) -> Result<()> {
    if every.is_zero() {
        return Err(crate::Error::Config(
            "--watch 0: give the time between queries, e.g. --watch 50ms".into(),
        ));
    }
    let channel = connect(q).await?;
    let held = tokio::spawn(hold_active(channel.clone(), scaled_object(q)));
    let _held = AbortOnDrop(held);
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

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Holds `so`'s `StreamIsActive` stream open, opening it again 100 ms after it ends, until
/// aborted.
async fn hold_active(channel: tonic::transport::Channel, so: ScaledObjectRef) {
    let mut client = ExternalScalerClient::new(channel);
    loop {
        if let Ok(stream) = client.stream_is_active(so.clone()).await {
            let mut stream = stream.into_inner();
            while let Ok(Some(_)) = stream.message().await {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How [`print()`] prints.
#[derive(Clone, Copy, Debug, Default)]
pub struct Print {
    /// JSON instead of text (with `watch`: one object per line).
    pub json: bool,
    /// Ask again this often, printing every answer, until stopped or `count` answers.
    pub watch: Option<Duration>,
    /// With `watch`: stop after this many answers.
    pub count: Option<u64>,
}

/// `gpuscale-collector query`: asks ([`run`] or, with `watch`, [`watch`]) and prints to stdout.
pub async fn print(q: &Query, how: Print) -> Result<()> {
    if let Some(every) = how.watch {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        return watch(q, every, how.count, |v| {
            let line = if how.json {
                json_text(v) + "\n"
            } else {
                render(v)
            };
            // Whoever reads stdout went away: stop quietly.
            out.write_all(line.as_bytes())
                .and_then(|()| out.flush())
                .is_ok()
        })
        .await;
    }
    let v = run(q).await?;
    if how.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
    }
    Ok(())
}

/// Parses one `--meta key=value`.
pub fn parse_meta(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value (e.g. metric=sm_active)"))
}

async fn connect(q: &Query) -> Result<tonic::transport::Channel> {
    // No channel-wide deadline: GetMetrics carries KEDA's own 3 s one below.
    crate::connect_collector(&q.collector, q.tls.as_ref(), None).await
}

use gpuscale_health::ops::unix_now_ns;

/// The ScaledObject `q` asks about, as KEDA names it.
fn scaled_object(q: &Query) -> ScaledObjectRef {
    ScaledObjectRef {
        name: q.name.clone(),
        namespace: q.namespace.clone(),
        scaler_metadata: q.metadata.clone(),
    }
}

/// One round of the three RPCs, then `Evaluate`; every outcome is an answer.
async fn ask(channel: &tonic::transport::Channel, q: &Query) -> Answer {
    let mut client = ExternalScalerClient::new(channel.clone());
    let so = scaled_object(q);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let failed = |error| {
        Answer::Failed(Failed {
            error,
            ts_ns: unix_now_ns(),
        })
    };
    let spec = match client.get_metric_spec(so.clone()).await {
        Ok(r) => r.into_inner().metric_specs.into_iter().next(),
        Err(s) => return failed(status(s)),
    };
    let Some(spec) = spec else {
        return failed("GetMetricSpec returned no metric".into());
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
    let evaluated = CollectorClient::new(channel.clone())
        .evaluate(EvaluateRequest {
            namespace: q.namespace.clone(),
            name: q.name.clone(),
            scaler_metadata: q.metadata.clone(),
        })
        .await;
    let evaluated = match evaluated {
        Ok(r) => Some(Ok(r.into_inner())),
        // A collector of an older release has no Evaluate: the KEDA answers stand alone.
        Err(s) if s.code() == tonic::Code::Unimplemented => None,
        Err(s) => Some(Err(status(s))),
    };
    answer(q, &spec, value, ts_ns, active, evaluated)
}

/// The answer of one round from what each call returned (`evaluated`: `None` when the
/// collector has no `Evaluate`).
fn answer(
    q: &Query,
    spec: &MetricSpec,
    value: std::result::Result<Option<f64>, String>,
    ts_ns: u64,
    active: std::result::Result<bool, String>,
    evaluated: Option<std::result::Result<EvaluateResponse, String>>,
) -> Answer {
    let mut out = Answered {
        active: None,
        active_error: None,
        aggregation: None,
        desired_replicas: None,
        gpu_aggregation: None,
        metric_name: spec.metric_name.clone(),
        metric_type: q.metric_type.name().to_owned(),
        replica_label: None,
        replicas: None,
        replicas_error: None,
        scaled_object: format!("{}/{}", q.namespace, q.name),
        target: spec.target_size_float,
        ts_ns,
        value: None,
        value_error: None,
    };
    match value {
        Ok(Some(v)) => {
            out.value = Some(v);
            out.desired_replicas = Some(desired_replicas(
                v,
                spec.target_size_float,
                q.metric_type,
                q.current_replicas,
            ));
        }
        Ok(None) => out.value_error = Some("GetMetrics returned no value".into()),
        Err(e) => out.value_error = Some(e),
    }
    match active {
        Ok(a) => out.active = Some(a),
        Err(e) => out.active_error = Some(e),
    }
    match evaluated {
        Some(Ok(r)) if r.value.is_some() => {
            out.aggregation = Some(r.aggregation);
            out.gpu_aggregation = Some(r.gpu_aggregation);
            out.replica_label = Some(r.replica_label);
            out.replicas = Some(r.replicas.iter().map(ReplicaJson::from).collect());
        }
        // No value: the evaluation failed, and the KEDA answers say why.
        Some(Ok(_)) | None => {}
        Some(Err(e)) => out.replicas_error = Some(e),
    }
    Answer::Answered(Box::new(out))
}

/// The replica lines of [`render`]: one per replica, with the GPU values it combined.
fn render_replicas(a: &Answered) -> String {
    let Some(replicas) = &a.replicas else {
        return String::new();
    };
    let label = a.replica_label.as_deref().filter(|l| !l.is_empty());
    let mut out = format!(
        "  {} replica(s){}: each its GPUs' {}, then their {}\n",
        replicas.len(),
        label.map_or(String::new(), |l| format!(" by label {l}")),
        a.gpu_aggregation.as_deref().unwrap_or("?"),
        a.aggregation.as_deref().unwrap_or("?"),
    );
    for r in replicas {
        let gpus: Vec<String> = r
            .gpus
            .iter()
            .map(|g| {
                let mut s = format!("{} {:.1}", g.gpu, g.value);
                if g.shared {
                    s.push_str(" (shared)");
                }
                if g.fell_back {
                    s.push_str(" (gpu_util)");
                }
                if r.pods.len() > 1 {
                    s.push_str(&format!(" [{}]", g.pod));
                }
                s
            })
            .collect();
        out.push_str(&format!(
            "    {} {:.1}: {}\n",
            r.replica,
            r.value,
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

/// A number as JSON writes it (`80.0`, `2`, `null`), as the text output always showed them.
fn json_text(v: &impl Serialize) -> String {
    // Plain data: serializing cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// One line for a terminal.
pub fn render(answer: &Answer) -> String {
    let a = match answer {
        Answer::Failed(f) => return format!("KEDA would get an error: {}\n", f.error),
        Answer::Answered(a) => a,
    };
    let head = format!(
        "{} · {} · target {}",
        a.scaled_object,
        a.metric_name,
        json_text(&a.target)
    );
    // JSON has no NaN or infinity: such a value printed as `null`, which reads as no value.
    let value = match (a.value.filter(|v| v.is_finite()), &a.value_error) {
        (Some(v), _) => format!(
            "GetMetrics {v:.1} → the HPA ({}) wants {} replica(s)",
            a.metric_type,
            json_text(&a.desired_replicas)
        ),
        (_, Some(e)) => format!("GetMetrics fails ({e}): KEDA applies its fallback"),
        _ => "GetMetrics: no value".into(),
    };
    let active = match (a.active, &a.active_error) {
        (Some(active), _) => format!("IsActive {active}"),
        (_, Some(e)) => format!("IsActive fails ({e})"),
        _ => "IsActive ?".into(),
    };
    format!("{head}\n  {value}\n  {active}\n{}", render_replicas(a))
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
        let v: Answer = serde_json::from_value(serde_json::json!({
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
        }))
        .unwrap();
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

    /// Query, spec, and the outcomes of GetMetrics, IsActive and Evaluate.
    type Case = (
        Query,
        MetricSpec,
        std::result::Result<Option<f64>, String>,
        std::result::Result<bool, String>,
        Option<std::result::Result<EvaluateResponse, String>>,
    );

    fn cases() -> Vec<Case> {
        use proto::collector::{GpuValue, ReplicaValue};
        let q = |metric_type| Query {
            collector: "127.0.0.1:7700".into(),
            tls: None,
            namespace: "ml".into(),
            name: "vllm".into(),
            metadata: HashMap::new(),
            metric_type,
            current_replicas: 3,
        };
        let spec = MetricSpec {
            metric_name: "gpuscale-sm-active-avg-30s-sum".into(),
            target_size: 80,
            target_size_float: 80.0,
        };
        let evaluated = EvaluateResponse {
            value: Some(160.0),
            error: String::new(),
            aggregation: "sum".into(),
            gpu_aggregation: "avg".into(),
            replica_label: "group".into(),
            running_pods: 3,
            replicas: vec![
                ReplicaValue {
                    replica: "group=a".into(),
                    pods: vec!["ml/a-0".into(), "ml/a-1".into()],
                    value: 70.0,
                    gpus: vec![GpuValue {
                        pod: "ml/a-0".into(),
                        node: "n".into(),
                        gpu_uuid: "GPU-0".into(),
                        value: 60.5,
                        shared: true,
                        fell_back: false,
                    }],
                },
                ReplicaValue {
                    replica: "ml/b".into(),
                    pods: vec!["ml/b".into()],
                    value: 90.0,
                    gpus: vec![],
                },
            ],
        };
        vec![
            (
                q(MetricType::AverageValue),
                spec.clone(),
                Ok(Some(160.0)),
                Ok(true),
                Some(Ok(evaluated)),
            ),
            (
                q(MetricType::Value),
                spec.clone(),
                Err("Unavailable: stale".into()),
                Err("Unavailable: stale too".into()),
                Some(Err("Internal: boom".into())),
            ),
            (
                q(MetricType::Value),
                spec.clone(),
                Ok(None),
                Ok(false),
                None,
            ),
            (
                q(MetricType::AverageValue),
                spec,
                Ok(Some(f64::NAN)),
                Ok(false),
                Some(Ok(EvaluateResponse {
                    error: "x".into(),
                    ..Default::default()
                })),
            ),
        ]
    }

    #[test]
    fn query_json_and_text_print_every_outcome_exactly_as_before() {
        // testdata/query.txt is what the `json!`-assembled answers printed for these outcomes
        // (pretty, one line as --watch prints, text): keys, order, omissions and numbers must
        // not change (tests/e2e and xtask/cluster read them).
        let mut text = String::new();
        for (q, spec, value, active, evaluated) in cases() {
            let v = answer(&q, &spec, value, 17, active, evaluated);
            text.push_str(&serde_json::to_string_pretty(&v).unwrap());
            text.push('\n');
            text.push_str(&format!("{}\n", json_text(&v)));
            text.push_str(&render(&v));
            let back: Answer = serde_json::from_str(&json_text(&v)).unwrap();
            assert_eq!(
                render(&back),
                render(&v),
                "the JSON reads back as the same answer"
            );
        }
        let failed = Answer::Failed(Failed {
            error: "InvalidArgument: trigger metadata \"metric\": is required".into(),
            ts_ns: 5,
        });
        assert_eq!(
            json_text(&failed),
            r#"{"error":"InvalidArgument: trigger metadata \"metric\": is required","ts_ns":5}"#
        );
        assert_eq!(
            render(&failed),
            "KEDA would get an error: InvalidArgument: trigger metadata \"metric\": is required\n"
        );
        assert_eq!(text, include_str!("testdata/query.txt"));
    }
}
