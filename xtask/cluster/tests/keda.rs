//! gpuscale against the real KEDA and the real Kubernetes control plane: one local cluster
//! (`gpuscale_cluster::up`) for every test of this file, brought up once, the tests run in turn
//! (each in a namespace of its own), then taken down. Needs root (a network namespace and pod
//! cgroups); without it the file says why it skips — and under CI (`CI` set) or with
//! `GPUSCALE_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test` as root) that is a failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use gpuscale_cluster::kube_util;
use gpuscale_cluster::state::ClusterInfo;
use gpuscale_cluster::up;

struct Ctx {
    info: ClusterInfo,
    client: Client,
}

type Test = fn(&Ctx) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + '_>>;

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |c| Box::pin($name(c)))),*]
    };
}

const TESTS: &[(&str, Test)] = tests![
    keda_builds_the_hpa_from_get_metric_spec_and_a_load_step_moves_replicas_as_sum_average_value_predicts,
    a_load_step_moves_replicas_as_avg_with_metric_type_value_predicts,
    an_idle_target_scales_to_zero_after_cooldown_and_external_push_wakes_it,
    the_collectors_cluster_role_is_enough_and_a_missing_rule_is_named,
    real_watches_follow_pods_scaled_objects_and_targets_and_relist_after_a_410_from_etcd_compaction,
    a_lost_agent_is_unavailable_and_keda_holds_the_fallback_replicas_never_scaling_down,
    a_custom_kinds_selector_comes_from_its_scale_subresource_once_rbac_grants_it,
    keda_reaches_the_collector_over_mutual_tls_with_the_installers_cluster_trigger_authentication,
    the_cert_manager_overlay_is_valid_against_cert_managers_own_crds,
    // It waits, before it ends, until the node controller's aftermath of the outage (nodes
    // unknown, pods not ready until kwok makes them ready again) is over.
    an_api_server_outage_serves_the_last_pod_list_then_goes_stale_and_recovers,
    // Last: it uninstalls gpuscale.
    cargo_xtask_deploy_installs_rolls_out_and_uninstalls_against_the_real_api_server,
];

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<&(&str, Test)> = TESTS
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return;
    }
    if selected.is_empty() {
        println!("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured");
        return;
    }
    if let Some(why) = up::unsupported() {
        let required = std::env::var("GPUSCALE_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
        if required || std::env::var_os("CI").is_some() {
            eprintln!(
                "error: the cluster tests cannot run: {why} (GPUSCALE_REQUIRE_PRIVILEGED=1 or CI \
                 forbids skipping them)"
            );
            std::process::exit(1);
        }
        for (name, _) in &selected {
            println!("skipped: {name}: {why}");
        }
        println!(
            "test result: ok. 0 passed; 0 failed; {} ignored; 0 measured",
            selected.len()
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = up::default_dir().with_file_name("cluster-test");
    let code = rt.block_on(async {
        let options = up::Options {
            dir: dir.clone(),
            nodes: 2,
            gpus_per_node: 4,
            exe: PathBuf::from(env!("CARGO_BIN_EXE_gpuscale-cluster")),
        };
        let info = match up::up(&options).await {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: cluster up failed: {e:#}");
                return 1;
            }
        };
        let client = match kube_util::client(&info.kubeconfig).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e:#}");
                return 1;
            }
        };
        let ctx = Ctx { info, client };
        let (mut passed, mut failed) = (0, Vec::new());
        for (name, test) in &selected {
            println!("test {name} ...");
            let start = Instant::now();
            let outcome = test(&ctx).await;
            // Each test's namespace goes, so its pods free their GPUs for the next test.
            let cleaned = delete_test_namespaces(&ctx).await;
            match outcome.and(cleaned) {
                Ok(()) => {
                    println!(
                        "test {name} ... ok ({:.0} s)",
                        start.elapsed().as_secs_f64()
                    );
                    passed += 1;
                }
                Err(e) => {
                    println!("test {name} ... FAILED\n{e:#}\n");
                    failed.push(*name);
                }
            }
        }
        if !failed.is_empty() {
            println!("\nfailures:\n    {}\n", failed.join("\n    "));
            println!(
                "cluster logs (kept until the next run): {}",
                ctx.info.logs.display()
            );
        }
        println!(
            "test result: {}. {passed} passed; {} failed; 0 ignored; 0 measured",
            if failed.is_empty() { "ok" } else { "FAILED" },
            failed.len()
        );
        i32::from(!failed.is_empty())
    });
    if let Err(e) = up::down(&dir) {
        eprintln!("warning: cluster down: {e:#}");
    }
    std::process::exit(code);
}

// ---- helpers ---------------------------------------------------------------------------------

/// Deletes every `t-…` namespace and waits until they and their pods are gone.
async fn delete_test_namespaces(ctx: &Ctx) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
    for ns in api.list(&ListParams::default()).await?.items {
        let name = ns.metadata.name.unwrap_or_default();
        if name.starts_with("t-") && ns.metadata.deletion_timestamp.is_none() {
            api.delete(&name, &Default::default()).await?;
        }
    }
    eventually(
        "the test namespaces deleted",
        Duration::from_secs(120),
        || async {
            let left: Vec<String> = api
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .filter(|n| n.starts_with("t-"))
                .collect();
            Ok((left.is_empty(), format!("still there: {left:?}")))
        },
    )
    .await
}

async fn apply(ctx: &Ctx, obj: Value) -> Result<()> {
    kube_util::apply(&ctx.client, &obj).await
}

async fn namespace(ctx: &Ctx, ns: &str) -> Result<()> {
    apply(
        ctx,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await
}

async fn annotate_node(ctx: &Ctx, node: &str, value: Option<&str>) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
    api.patch(
        node,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {gpuscale_cluster::sim::AGENT_ANNOTATION: value}}}),
        ),
    )
    .await?;
    Ok(())
}

/// A vLLM-like Deployment: `replicas` pods of one container asking for `gpus` GPUs each.
fn deployment(ns: &str, name: &str, replicas: i32, gpus: u32) -> Value {
    gpuscale_cluster::workload::deployment(ns, name, replicas, gpus, &[])
}

/// A ScaledObject on `sm_active` over a 10 s window, with the HPA's scale-down made immediate
/// (the tests watch scale-ups; nothing should scale down meanwhile).
fn scaled_object(ctx: &Ctx, ns: &str, name: &str, extra_meta: Value, spec: Value) -> Value {
    let mut meta = json!({
        "scalerAddress": ctx.info.collector,
        "metric": "sm_active",
        "targetValue": "80",
        "window": "10s",
        "staleAfter": "10s",
    });
    for (k, v) in extra_meta.as_object().into_iter().flatten() {
        meta[k] = v.clone();
    }
    let mut so = json!({
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "scaleTargetRef": {"name": name},
            "pollingInterval": 5,
            "minReplicaCount": 2,
            "maxReplicaCount": 8,
            "triggers": [{"type": "external", "metadata": meta}],
        }
    });
    for (k, v) in spec.as_object().into_iter().flatten() {
        so["spec"][k] = v.clone();
    }
    so
}

async fn running_pods(ctx: &Ctx, ns: &str, app: &str) -> Result<Vec<Pod>> {
    Ok(gpuscale_cluster::workload::running_pods(&ctx.client, ns, app).await?)
}

/// Sets the simulated load of every running pod of `app`, as `kubectl annotate` would.
async fn set_load(ctx: &Ctx, ns: &str, app: &str, load: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for p in running_pods(ctx, ns, app).await? {
        gpuscale_cluster::workload::set_load(&ctx.client, &p, load).await?;
        names.push(p.metadata.name.clone().unwrap_or_default());
    }
    Ok(names)
}

async fn replicas(ctx: &Ctx, ns: &str, name: &str) -> Result<i32> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get(name)
        .await?
        .spec
        .and_then(|s| s.replicas)
        .unwrap_or(1))
}

/// Polls `check` every 500 ms until it holds, up to `timeout`; the error says what was last seen.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(bool, String)>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok((true, _)) => return Ok(()),
            Ok((false, seen)) => seen,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{what}: not within {} s; last seen: {last}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies [`deployment`] `ns/app`, waits for its `replicas` pods to run, and sets their
/// simulated `load` (when given).
async fn run_deployment(
    ctx: &Ctx,
    ns: &str,
    app: &str,
    (replicas, gpus): (i32, u32),
    load: Option<&str>,
) -> Result<()> {
    apply(ctx, deployment(ns, app, replicas, gpus)).await?;
    wait_running(ctx, ns, app, replicas as usize).await?;
    if let Some(load) = load {
        set_load(ctx, ns, app, load).await?;
    }
    Ok(())
}

/// Waits for `app`'s Deployment to have `want` running pods.
async fn wait_running(ctx: &Ctx, ns: &str, app: &str, want: usize) -> Result<()> {
    eventually(
        &format!("{want} running pods of {ns}/{app}"),
        Duration::from_secs(90),
        || async move {
            let n = running_pods(ctx, ns, app).await?.len();
            Ok((n == want, format!("{n} running")))
        },
    )
    .await
}

/// The HPA KEDA made for ScaledObject `name`, once it has one.
async fn hpa(ctx: &Ctx, ns: &str, name: &str) -> Result<HorizontalPodAutoscaler> {
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    let hpa_name = format!("keda-hpa-{name}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(h) = api.get_opt(&hpa_name).await? {
            return Ok(h);
        }
        if Instant::now() > deadline {
            bail!("KEDA made no HPA {ns}/{hpa_name} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The HPA's one external metric: (name, target type, target value as f64).
fn external_metric(h: &HorizontalPodAutoscaler) -> Result<(String, String, f64)> {
    let m = h
        .spec
        .as_ref()
        .and_then(|s| s.metrics.as_ref())
        .and_then(|m| m.first())
        .and_then(|m| m.external.as_ref())
        .context("the HPA has no external metric")?;
    let target = &m.target;
    let value = target
        .average_value
        .as_ref()
        .or(target.value.as_ref())
        .map(|q| q.0.parse::<f64>())
        .transpose()?
        .context("the HPA's target has no value")?;
    Ok((m.metric.name.clone(), target.type_.clone(), value))
}

/// Holds `app` at `want` replicas, checking for `hold` that it does not move past it.
/// Waits until `ns/app`'s `spec.replicas` satisfies `ok`, up to `timeout`.
async fn replicas_reach(
    ctx: &Ctx,
    ns: &str,
    app: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(i32) -> bool,
) -> Result<()> {
    let ok = &ok;
    eventually(what, timeout, || async move {
        let r = replicas(ctx, ns, app).await?;
        Ok((ok(r), format!("spec.replicas {r}")))
    })
    .await
}

async fn settles_at(ctx: &Ctx, ns: &str, app: &str, want: i32, timeout: Duration) -> Result<()> {
    let what = format!("{ns}/{app} scaled to {want} replicas");
    replicas_reach(ctx, ns, app, &what, timeout, |r| r == want).await?;
    // Two more HPA syncs (15 s each): the count must not move on past the prediction.
    let until = Instant::now() + Duration::from_secs(35);
    while Instant::now() < until {
        let r = replicas(ctx, ns, app).await?;
        if r != want {
            bail!("{ns}/{app} reached {want} replicas, then moved on to {r}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

// ---- tests -----------------------------------------------------------------------------------

/// 2 tensor-parallel replicas on two GPUs each step to 90 % SM activity: each replica reads 90
/// (its GPUs averaged, `gpuAggregation`'s default), value = 2 × 90 = 180 (aggregation `sum`),
/// and with KEDA's default `AverageValue` the HPA wants ceil(180 / 80) = 3 replicas — not the
/// ceil(360 / 80) = 5 of counting every GPU. The third replica is idle, so the sum stays 180 and
/// the count stays 3.
async fn keda_builds_the_hpa_from_get_metric_spec_and_a_load_step_moves_replicas_as_sum_average_value_predicts(
    ctx: &Ctx,
) -> Result<()> {
    let (ns, app) = ("t-sum", "vllm");
    namespace(ctx, ns).await?;
    run_deployment(ctx, ns, app, (2, 2), None).await?;
    apply(ctx, scaled_object(ctx, ns, app, json!({}), json!({}))).await?;

    let h = hpa(ctx, ns, app).await?;
    let (metric, kind, target) = external_metric(&h)?;
    if !metric.ends_with("gpuscale-sm-active-avg-10s-sum")
        || kind != "AverageValue"
        || target != 80.0
    {
        bail!(
            "KEDA's HPA does not carry our GetMetricSpec: metric {metric:?}, target {kind} {target}"
        );
    }
    // Idle: nothing moves.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let r = replicas(ctx, ns, app).await?;
    if r != 2 {
        bail!("idle pods moved the Deployment to {r} replicas");
    }

    let stepped = set_load(ctx, ns, app, "sm_active=90,gpu_util=95,vram_used_pct=60").await?;
    if stepped.len() != 2 {
        bail!("expected 2 running pods to load, found {stepped:?}");
    }
    settles_at(ctx, ns, app, 3, Duration::from_secs(150)).await
}

/// The same step with `aggregation: avg` and `metricType: Value`: value = 90, the HPA wants
/// ceil(2 × 90 / 80) = 3; with the idle third replica the average is 60 and
/// ceil(3 × 60 / 80) = 3 holds it there.
async fn a_load_step_moves_replicas_as_avg_with_metric_type_value_predicts(
    ctx: &Ctx,
) -> Result<()> {
    let (ns, app) = ("t-avg", "vllm");
    namespace(ctx, ns).await?;
    run_deployment(ctx, ns, app, (2, 1), None).await?;
    let mut so = scaled_object(ctx, ns, app, json!({"aggregation": "avg"}), json!({}));
    so["spec"]["triggers"][0]["metricType"] = json!("Value");
    apply(ctx, so).await?;

    let h = hpa(ctx, ns, app).await?;
    let (metric, kind, target) = external_metric(&h)?;
    if !metric.ends_with("gpuscale-sm-active-avg-10s-avg") || kind != "Value" || target != 80.0 {
        bail!(
            "KEDA's HPA: metric {metric:?}, target {kind} {target}; wanted …-avg-10s-avg, Value 80"
        );
    }
    set_load(ctx, ns, app, "sm_active=90").await?;
    settles_at(ctx, ns, app, 3, Duration::from_secs(150)).await
}

/// Scale to zero and back. The trigger's `podSelector` (`part-of=chat`) matches the scaled
/// Deployment `chat-large` and an always-on `chat-small`: when every matched GPU is idle, KEDA
/// scales `chat-large` to 0 after `cooldownPeriod`; when `chat-small` gets busy, the collector
/// pushes `IsActive` on `StreamIsActive` (`external-push`) and KEDA wakes `chat-large`.
async fn an_idle_target_scales_to_zero_after_cooldown_and_external_push_wakes_it(
    ctx: &Ctx,
) -> Result<()> {
    let ns = "t-zero";
    namespace(ctx, ns).await?;
    for (name, replicas) in [("chat-large", 1), ("chat-small", 1)] {
        let mut d = deployment(ns, name, replicas, 1);
        d["spec"]["template"]["metadata"]["labels"]["part-of"] = json!("chat");
        apply(ctx, d).await?;
        wait_running(ctx, ns, name, replicas as usize).await?;
    }
    let mut so = scaled_object(
        ctx,
        ns,
        "chat-large",
        json!({"podSelector": "part-of=chat", "activationThreshold": "5"}),
        json!({"minReplicaCount": 0, "cooldownPeriod": 10}),
    );
    so["spec"]["triggers"][0]["type"] = json!("external-push");
    // Busy first, so KEDA has seen the trigger active and the cooldown applies.
    set_load(ctx, ns, "chat-small", "sm_active=40").await?;
    apply(ctx, so).await?;
    hpa(ctx, ns, "chat-large").await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let r = replicas(ctx, ns, "chat-large").await?;
    if r == 0 {
        bail!("chat-large went to 0 while a matched pod was busy");
    }
    set_load(ctx, ns, "chat-small", "sm_active=0").await?;
    let idle_since = Instant::now();
    settles_at_zero(ctx, ns).await?;
    // The 10 s window has to drain below activationThreshold, then cooldownPeriod (10 s) runs.
    if idle_since.elapsed() < Duration::from_secs(10) {
        bail!(
            "chat-large reached 0 {:.1} s after the load stopped, before cooldownPeriod could pass",
            idle_since.elapsed().as_secs_f64()
        );
    }

    // Wake: the small model gets busy; the large one must come back from zero.
    set_load(ctx, ns, "chat-small", "sm_active=70").await?;
    let woken = Instant::now();
    replicas_reach(
        ctx,
        ns,
        "chat-large",
        "chat-large woken from 0 by external-push",
        Duration::from_secs(60),
        |r| r >= 1,
    )
    .await?;
    println!(
        "  woken from 0 in {:.1} s after the load step (external-push)",
        woken.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn settles_at_zero(ctx: &Ctx, ns: &str) -> Result<()> {
    replicas_reach(
        ctx,
        ns,
        "chat-large",
        "chat-large scaled to 0 after cooldownPeriod (10 s)",
        Duration::from_secs(120),
        |r| r == 0,
    )
    .await
}

/// An agent goes down under two busy replicas: the collector answers `UNAVAILABLE` (never 0),
/// and after `fallback.failureThreshold` failed polls KEDA holds `fallback.replicas` (5); at no
/// point does the Deployment drop below the 2 it had.
async fn a_lost_agent_is_unavailable_and_keda_holds_the_fallback_replicas_never_scaling_down(
    ctx: &Ctx,
) -> Result<()> {
    let (ns, app) = ("t-fallback", "vllm");
    namespace(ctx, ns).await?;
    run_deployment(ctx, ns, app, (2, 1), Some("sm_active=75")).await?;
    apply(
        ctx,
        scaled_object(
            ctx,
            ns,
            app,
            json!({"staleAfter": "5s"}),
            json!({"minReplicaCount": 1, "fallback": {"failureThreshold": 3, "replicas": 5}}),
        ),
    )
    .await?;
    hpa(ctx, ns, app).await?;
    // 2 × 75 = 150 → ceil(150 / 80) = 2: steady.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let before = replicas(ctx, ns, app).await?;
    if before != 2 {
        bail!("before the agent went down the Deployment had {before} replicas, not 2");
    }
    let nodes: Vec<String> = running_pods(ctx, ns, app)
        .await?
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    for n in &nodes {
        annotate_node(ctx, n, Some("stopped")).await?;
    }
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let r = replicas(ctx, ns, app).await?;
            if r < 2 {
                bail!("the Deployment scaled down to {r} while its agent was down");
            }
            if r == 5 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("KEDA did not apply fallback.replicas 5 within 150 s (spec.replicas {r})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    .await;
    for n in &nodes {
        annotate_node(ctx, n, None).await?;
    }
    result
}

/// The ClusterRole of `deploy/base/rbac.yaml` is all the collector needs: its log holds no
/// refusal after the tests above (each of which read pods, EndpointSlices, ScaledObjects and
/// Deployments through it). With the `apps` rule removed, a collector started then answers a
/// trigger without `podSelector` with the documented message naming the verb and resource to
/// grant.
async fn the_collectors_cluster_role_is_enough_and_a_missing_rule_is_named(
    ctx: &Ctx,
) -> Result<()> {
    let log = std::fs::read_to_string(ctx.info.logs.join("collector.log"))?;
    if let Some(line) = log.lines().find(|l| l.to_lowercase().contains("forbidden")) {
        bail!("the collector was refused by RBAC under deploy/'s ClusterRole: {line}");
    }

    let ns = "t-rbac";
    namespace(ctx, ns).await?;
    apply(ctx, deployment(ns, "vllm", 0, 1)).await?;
    apply(
        ctx,
        scaled_object(ctx, ns, "vllm", json!({}), json!({"minReplicaCount": 0})),
    )
    .await?;

    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(ctx.client.clone());
    let original = roles.get("gpuscale-collector").await?;
    let rules = original.rules.clone().unwrap_or_default();
    let without: Vec<_> = rules
        .iter()
        .filter(|r| {
            !(r.api_groups.as_deref() == Some(&["apps".to_owned()][..])
                && r.resources
                    .as_ref()
                    .is_some_and(|res| res.iter().any(|x| x == "deployments")))
        })
        .cloned()
        .collect();
    if without.len() + 1 != rules.len() {
        bail!("deploy/base/rbac.yaml has no single rule for deployments.apps: {rules:?}");
    }
    let patch =
        |rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>| Patch::Merge(json!({"rules": rules}));
    roles
        .patch(
            "gpuscale-collector",
            &PatchParams::default(),
            &patch(without),
        )
        .await?;
    let result = async {
        let addr = format!(
            "127.0.0.1:{}",
            gpuscale_cluster::process::free_port("127.0.0.1")?
        );
        let log = ctx.info.logs.join("collector-rbac.log");
        let child = spawn_collector(ctx, &addr, &log, &up::agent_tls_flags(&ctx.info))?;
        let want = "forbidden by RBAC: the collector may not list deployments.apps cluster-wide; \
                    grant its ServiceAccount get, list and watch on deployments.apps";
        let seen = eventually(
            "the collector's answer naming the missing rule",
            Duration::from_secs(60),
            || {
                let addr = addr.clone();
                async move {
                    let out = std::process::Command::new(&ctx.info.collector_bin)
                        .args([
                            "query",
                            "--collector",
                            &addr,
                            "--namespace",
                            ns,
                            "--name",
                            "vllm",
                        ])
                        .args(["--meta", "metric=sm_active", "--meta", "targetValue=80"])
                        .output()?;
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    Ok((text.contains(want) && text.contains("Unavailable"), text))
                }
            },
        )
        .await;
        stop_collector(child, &log, seen)
    }
    .await;
    roles
        .patch("gpuscale-collector", &PatchParams::default(), &patch(rules))
        .await?;
    result
}

/// What a user gets from `cargo xtask deploy` with KEDA installed, through the real KEDA
/// operator: the installer made KEDA's client certificate in namespace `keda` and the
/// ClusterTriggerAuthentication `gpuscale`; a collector serving mutual TLS with the installer's
/// certificate (it names 127.0.0.1, this collector's address) gets KEDA's calls from a
/// ScaledObject with `enableTLS` and that `authenticationRef`, and a load step scales the
/// Deployment. A ScaledObject with `enableTLS` but no authentication cannot verify the collector:
/// the handshake fails (the collector logs it) and its Deployment is not scaled by the same load.
async fn keda_reaches_the_collector_over_mutual_tls_with_the_installers_cluster_trigger_authentication(
    ctx: &Ctx,
) -> Result<()> {
    let ns = "t-tls";
    namespace(ctx, ns).await?;
    let tls = ctx.info.tls_dir.join("collector");
    let file = |f: &str| tls.join(f).display().to_string();
    let addr = format!(
        "127.0.0.1:{}",
        gpuscale_cluster::process::free_port("127.0.0.1")?
    );
    let log = ctx.info.logs.join("collector-tls.log");
    let mut tls_flags = vec![
        "--tls-cert".to_owned(),
        file("tls.crt"),
        "--tls-key".to_owned(),
        file("tls.key"),
        "--tls-client-ca".to_owned(),
        file("ca.crt"),
    ];
    tls_flags.extend(up::agent_tls_flags(&ctx.info));
    let child = spawn_collector(ctx, &addr, &log, &tls_flags)?;
    let result = async {
        run_deployment(ctx, ns, "tls", (2, 1), None).await?;
        run_deployment(ctx, ns, "noauth", (1, 1), None).await?;
        let tls_trigger = |so: &mut Value, auth: bool| {
            let t = &mut so["spec"]["triggers"][0];
            t["metadata"]["scalerAddress"] = json!(addr);
            t["metadata"]["enableTLS"] = json!("true");
            if auth {
                t["authenticationRef"] = json!({
                    "name": gpuscale_deploy::certificates::TRIGGER_AUTHENTICATION,
                    "kind": "ClusterTriggerAuthentication",
                });
            }
        };
        let mut so = scaled_object(ctx, ns, "noauth", json!({}), json!({"minReplicaCount": 1}));
        tls_trigger(&mut so, false);
        apply(ctx, so).await?;
        let mut so = scaled_object(ctx, ns, "tls", json!({}), json!({}));
        tls_trigger(&mut so, true);
        apply(ctx, so).await?;

        // The HPA carries the metric KEDA asked for over TLS.
        let h = hpa(ctx, ns, "tls").await?;
        let (metric, _, target) = external_metric(&h)?;
        if !metric.ends_with("gpuscale-sm-active-avg-10s-sum") || target != 80.0 {
            bail!("the HPA of the TLS ScaledObject: metric {metric:?}, target {target}");
        }
        // Both loaded to 90: the authenticated one goes to ceil(2 × 90 / 80) = 3.
        set_load(ctx, ns, "tls", "sm_active=90").await?;
        set_load(ctx, ns, "noauth", "sm_active=90").await?;
        replicas_reach(
            ctx,
            ns,
            "tls",
            "t-tls/tls scaled to 3 over mutual TLS",
            Duration::from_secs(150),
            |r| r == 3,
        )
        .await?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("TLS handshake failed") {
            bail!("KEDA without the CA was never refused a handshake:\n{text}");
        }
        let r = replicas(ctx, ns, "noauth").await?;
        if r != 1 {
            bail!("the ScaledObject without authentication got values: noauth has {r} replicas");
        }
        Ok(())
    }
    .await;
    stop_collector(child, &log, result)
}

/// A second collector as the cluster's (`--kube`, its ServiceAccount, agents from their
/// EndpointSlices) on `addr`, with `extra` flags, logging to `log`.
fn spawn_collector(
    ctx: &Ctx,
    addr: &str,
    log: &std::path::Path,
    extra: &[String],
) -> Result<std::process::Child> {
    Ok(std::process::Command::new(&ctx.info.collector_bin)
        .args(["serve", "--kube", "--agent-service", up::AGENT_SERVICE])
        .args(["--listen", addr])
        .args(extra)
        .env("KUBECONFIG", &ctx.info.collector_kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

/// Stops a collector of [`spawn_collector`]; a failed `result` gets the collector's log.
fn stop_collector<T>(
    mut child: std::process::Child,
    log: &std::path::Path,
    result: Result<T>,
) -> Result<T> {
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|e| {
        e.context(format!(
            "collector log ({}):\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        ))
    })
}

/// Runs `cmd`; fails with its output unless it succeeds and prints `expect`.
fn run_expecting(mut cmd: std::process::Command, expect: &str) -> Result<()> {
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.contains(expect) {
        bail!(
            "{cmd:?} failed ({}), wanted {expect:?}:\n{text}",
            out.status
        );
    }
    Ok(())
}

/// `cargo xtask deploy` as a user runs it, against this cluster's API server: the image is built
/// from this checkout's binaries and pushed to a registry on loopback (Debian's
/// `docker-registry`), `deploy/` is applied with the image pinned to its digest, the rollout is
/// waited for (the DaemonSet's pods are replaced, and the simulator starts their agents), and
/// `--uninstall` removes it all, namespace included. Runs last: gpuscale is gone afterwards.
async fn cargo_xtask_deploy_installs_rolls_out_and_uninstalls_against_the_real_api_server(
    ctx: &Ctx,
) -> Result<()> {
    let dir = ctx.info.logs.with_file_name("registry");
    // A fresh registry: nothing left from an earlier run can answer for this push.
    let _ = std::fs::remove_dir_all(&dir);
    let port = gpuscale_cluster::process::free_port("127.0.0.1")?;
    let registry =
        gpuscale_deploy::registry::LocalRegistry::start(&dir, port).map_err(anyhow::Error::msg)?;
    let result = async {
        let bin_dir = ctx
            .info
            .collector_bin
            .parent()
            .context("collector binary path")?;
        let deploy = |args: &[&str]| {
            let mut cmd = std::process::Command::new(
                std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            );
            cmd.current_dir(up::workspace_root())
                .args(["xtask", "deploy"])
                .args(args)
                .env("KUBECONFIG", &ctx.info.kubeconfig);
            cmd
        };
        let registry_arg = format!("127.0.0.1:{port}");
        let bin_arg = bin_dir.display().to_string();
        run_expecting(
            deploy(&[
                "--registry",
                &registry_arg,
                "--binaries",
                &bin_arg,
                "--timeout",
                "180s",
            ]),
            "gpuscale is running in namespace gpuscale-system",
        )?;
        // The DaemonSet now runs the pushed image, pinned to its digest, and its agents serve.
        let ds: Api<k8s_openapi::api::apps::v1::DaemonSet> =
            Api::namespaced(ctx.client.clone(), "gpuscale-system");
        let image = ds
            .get("gpuscale-agent")
            .await?
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers.first().and_then(|c| c.image.clone()))
            .unwrap_or_default();
        if !image.starts_with(&format!("127.0.0.1:{port}/gpuscale@sha256:")) {
            bail!(
                "after deploy the agent DaemonSet runs {image:?}, not the pushed image by digest"
            );
        }
        // KEDA's authentication is there (the cluster's `up` made it; this deploy kept it).
        let gvk = kube::core::GroupVersionKind::gvk(
            "keda.sh",
            "v1alpha1",
            "ClusterTriggerAuthentication",
        );
        let auths: Api<kube::api::DynamicObject> = Api::all_with(
            ctx.client.clone(),
            &kube::core::ApiResource::from_gvk_with_plural(&gvk, "clustertriggerauthentications"),
        );
        let auth = gpuscale_deploy::certificates::TRIGGER_AUTHENTICATION;
        if auths.get_opt(auth).await?.is_none() {
            bail!("no ClusterTriggerAuthentication {auth} after deploy");
        }
        run_expecting(
            deploy(&["--uninstall", "--timeout", "180s"]),
            "gpuscale is uninstalled",
        )?;
        if auths.get_opt(auth).await?.is_some() {
            bail!("ClusterTriggerAuthentication {auth} is still there after --uninstall");
        }
        let keda_secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(ctx.client.clone(), "keda");
        let secret = gpuscale_deploy::certificates::KEDA_SECRET;
        if keda_secrets.get_opt(secret).await?.is_some() {
            bail!("Secret keda/{secret} is still there after --uninstall");
        }
        let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
        if nss.get_opt("gpuscale-system").await?.is_some() {
            bail!("namespace gpuscale-system is still there after --uninstall");
        }
        let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(ctx.client.clone());
        if roles.get_opt("gpuscale-collector").await?.is_some() {
            bail!("ClusterRole gpuscale-collector is still there after --uninstall");
        }
        Ok(())
    }
    .await;
    drop(registry);
    result
}

/// The cluster's folder (where its kubeconfig and `state.json` are).
fn cluster_dir(ctx: &Ctx) -> Result<PathBuf> {
    Ok(ctx
        .info
        .kubeconfig
        .parent()
        .context("the kubeconfig has no folder")?
        .to_owned())
}

/// Restarts kube-apiserver with its command line and waits for its `/readyz`.
async fn restart_apiserver(ctx: &Ctx, dir: &std::path::Path) -> Result<()> {
    gpuscale_cluster::ops::restart(dir, "kube-apiserver")?;
    apiserver_ready(ctx).await
}

async fn apiserver_ready(ctx: &Ctx) -> Result<()> {
    eventually(
        "kube-apiserver ready again",
        Duration::from_secs(90),
        || async { Ok((kube_util::ready(&ctx.client).await, String::new())) },
    )
    .await
}

/// What KEDA would be told for ScaledObject `ns/name` (no `podSelector`: the collector resolves
/// the target through its watches), as `gpuscale-collector query --json` prints it.
fn query(ctx: &Ctx, ns: &str, name: &str) -> Result<Value> {
    let out = std::process::Command::new(&ctx.info.collector_bin)
        .args([
            "query",
            "--collector",
            &ctx.info.collector,
            "--namespace",
            ns,
            "--name",
            name,
        ])
        .args([
            "--meta",
            "metric=sm_active",
            "--meta",
            "targetValue=80",
            "--meta",
            "window=10s",
        ])
        .args(["--meta", "timeAggregation=last", "--json"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| {
        format!(
            "query printed no JSON: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

async fn value_is(ctx: &Ctx, ns: &str, name: &str, want: f64, what: &str) -> Result<()> {
    eventually(what, Duration::from_secs(60), || async move {
        let v = query(ctx, ns, name)?;
        let got = v["value"].as_f64();
        Ok((got.is_some_and(|g| (g - want).abs() < 0.01), v.to_string()))
    })
    .await
}

/// The collector follows the cluster through real watches: a new pod of the target, and a
/// ScaledObject retargeted to another Deployment, change its answer. Then its watches are cut
/// off from history — the collector is frozen (SIGSTOP), the API server restarted (its watch
/// connections cut), the cluster changed, etcd compacted to its current revision and the API
/// server restarted again, so every watch resumes from a resourceVersion that no longer exists
/// — and the collector, thawed, gets `410 Gone`, re-lists, and answers from the cluster as it is
/// now, which it can have learnt from nowhere else.
async fn real_watches_follow_pods_scaled_objects_and_targets_and_relist_after_a_410_from_etcd_compaction(
    ctx: &Ctx,
) -> Result<()> {
    let ns = "t-watch";
    namespace(ctx, ns).await?;
    apply(ctx, deployment(ns, "vllm-a", 1, 1)).await?;
    apply(ctx, deployment(ns, "vllm-b", 1, 1)).await?;
    wait_running(ctx, ns, "vllm-a", 1).await?;
    wait_running(ctx, ns, "vllm-b", 1).await?;
    set_load(ctx, ns, "vllm-a", "sm_active=40").await?;
    set_load(ctx, ns, "vllm-b", "sm_active=15").await?;
    let mut so = scaled_object(ctx, ns, "watched", json!({}), json!({"minReplicaCount": 1}));
    so["spec"]["scaleTargetRef"]["name"] = json!("vllm-a");
    apply(ctx, so.clone()).await?;
    value_is(
        ctx,
        ns,
        "watched",
        40.0,
        "the ScaledObject's target vllm-a: 40",
    )
    .await?;

    // A second pod of the target (pod watch).
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let scale = |n: i32| Patch::Merge(json!({"spec": {"replicas": n}}));
    deployments
        .patch("vllm-a", &PatchParams::default(), &scale(2))
        .await?;
    wait_running(ctx, ns, "vllm-a", 2).await?;
    set_load(ctx, ns, "vllm-a", "sm_active=40").await?;
    value_is(ctx, ns, "watched", 80.0, "two pods of vllm-a: 80").await?;
    // Retargeted (ScaledObject watch, then the new target's selector).
    so["spec"]["scaleTargetRef"]["name"] = json!("vllm-b");
    apply(ctx, so.clone()).await?;
    value_is(ctx, ns, "watched", 15.0, "retargeted to vllm-b: 15").await?;

    // Cut the watches off from history.
    let dir = cluster_dir(ctx)?;
    let collector =
        gpuscale_cluster::state::read::<gpuscale_cluster::state::State>(&dir.join("state.json"))?
            .context("state.json")?
            .procs
            .into_iter()
            .find(|p| p.name == "collector")
            .context("no collector in state.json")?;
    collector.signal(libc::SIGSTOP);
    let changed = async {
        // First cut its connections (what they carried before is all it will get from them),
        // then change the cluster behind its back, then erase the history it would resume from.
        restart_apiserver(ctx, &dir).await?;
        so["spec"]["scaleTargetRef"]["name"] = json!("vllm-a");
        apply(ctx, so.clone()).await?;
        deployments
            .patch("vllm-a", &PatchParams::default(), &scale(3))
            .await?;
        wait_running(ctx, ns, "vllm-a", 3).await?;
        set_load(ctx, ns, "vllm-a", "sm_active=40").await?;
        let rev = gpuscale_cluster::ops::compact_etcd(&dir)?;
        println!("  etcd compacted at revision {rev}");
        restart_apiserver(ctx, &dir).await
    }
    .await;
    collector.signal(libc::SIGCONT);
    changed?;
    value_is(
        ctx,
        ns,
        "watched",
        120.0,
        "after the 410: back on vllm-a, three pods: 120",
    )
    .await?;
    let log = std::fs::read_to_string(ctx.info.logs.join("collector.log"))?;
    if !log.contains("(410)") {
        bail!(
            "the collector's log shows no 410 Gone from its watches; its last lines:\n{}",
            gpuscale_cluster::process::tail(&ctx.info.logs.join("collector.log"), 20)
        );
    }
    Ok(())
}

/// The error `query` printed for ScaledObject `ns/name` (of `GetMetricSpec` or else of
/// `GetMetrics`), once it contains `want`.
async fn value_error_contains(ctx: &Ctx, ns: &str, name: &str, want: &str) -> Result<String> {
    let seen = std::cell::RefCell::new(String::new());
    eventually(
        &format!("the answer for {ns}/{name} is an error containing {want:?}"),
        Duration::from_secs(60),
        || {
            let seen = &seen;
            async move {
                let v = query(ctx, ns, name)?;
                // `error`: GetMetricSpec failed already; `value_error`: GetMetrics did.
                let error = v["error"]
                    .as_str()
                    .or(v["value_error"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                let found = error.contains(want);
                *seen.borrow_mut() = error;
                Ok((found, v.to_string()))
            }
        },
    )
    .await?;
    Ok(seen.into_inner())
}

/// A custom workload kind, shaped like Argo Rollouts: a CRD with a `/scale` subresource whose
/// `labelSelectorPath` is `.status.selector`.
fn rollout_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "rollouts.argoproj.io"},
        "spec": {
            "group": "argoproj.io", "scope": "Namespaced",
            "names": {"plural": "rollouts", "singular": "rollout", "kind": "Rollout",
                      "listKind": "RolloutList"},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas",
                              "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"}
                }
            }]
        }
    })
}

/// A ScaledObject whose target is not a Deployment: the collector reads the target's pod
/// selector from its `/scale` subresource. `deploy/`'s ClusterRole grants `/scale` of the apps
/// kinds only, so the real API server refuses the read and the answer is `UNAVAILABLE` naming
/// the permission to grant; once a ClusterRole grants `get` on `rollouts/scale`, the collector
/// answers from the pods the Rollout's `status.selector` names, and the HPA scales the Rollout
/// through the same subresource: 2 pods at 90 % → ceil(180 / 80) = 3.
async fn a_custom_kinds_selector_comes_from_its_scale_subresource_once_rbac_grants_it(
    ctx: &Ctx,
) -> Result<()> {
    let ns = "t-rollout";
    apply(ctx, rollout_crd()).await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(ctx.client.clone());
    eventually(
        "the Rollout CRD established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get("rollouts.argoproj.io").await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok((established, String::new()))
        },
    )
    .await?;
    namespace(ctx, ns).await?;
    // The pods the Rollout manages (a Deployment stands in for its ReplicaSets).
    run_deployment(ctx, ns, "vllm-canary", (2, 1), Some("sm_active=90")).await?;
    apply(
        ctx,
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
            "metadata": {"namespace": ns, "name": "canary"},
            "spec": {"replicas": 2}}),
    )
    .await?;
    let rollout_resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Rollout"),
        "rollouts",
    );
    let rollouts: Api<kube::api::DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &rollout_resource);
    rollouts
        .patch_status(
            "canary",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2, "selector": "app=vllm-canary"}})),
        )
        .await?;
    let mut so = scaled_object(ctx, ns, "canary", json!({}), json!({"minReplicaCount": 1}));
    so["spec"]["scaleTargetRef"] =
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "canary"});
    apply(ctx, so).await?;

    let refused = value_error_contains(ctx, ns, "canary", "forbidden by RBAC").await?;
    if !refused.contains("Unavailable") || !refused.contains("get rollouts/scale") {
        bail!("the refusal is UNAVAILABLE and names the permission to grant: {refused}");
    }
    let (sa_ns, sa) = gpuscale_cluster::up::COLLECTOR_SA;
    apply(
        ctx,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "t-gpuscale-collector-rollouts"},
            "rules": [{"apiGroups": ["argoproj.io"], "resources": ["rollouts/scale"],
                       "verbs": ["get"]}]}),
    )
    .await?;
    apply(
        ctx,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "t-gpuscale-collector-rollouts"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "t-gpuscale-collector-rollouts"},
            "subjects": [{"kind": "ServiceAccount", "namespace": sa_ns, "name": sa}]}),
    )
    .await?;
    // The refusal is read again within the collector's /scale refresh (30 s).
    let granted = async {
        value_is(
            ctx,
            ns,
            "canary",
            180.0,
            "the Rollout's two pods at 90 %: 180",
        )
        .await?;
        eventually(
            "the HPA scales the Rollout to ceil(180 / 80) = 3",
            Duration::from_secs(90),
            || async {
                let r = rollouts.get("canary").await?;
                let n = r.data["spec"]["replicas"].as_i64();
                Ok((n == Some(3), format!("spec.replicas {n:?}")))
            },
        )
        .await
    }
    .await;
    // Cluster-scoped objects outlive the test namespace.
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(ctx.client.clone());
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
        Api::all(ctx.client.clone());
    let dp = Default::default();
    let cleanup = async {
        bindings
            .delete("t-gpuscale-collector-rollouts", &dp)
            .await?;
        roles.delete("t-gpuscale-collector-rollouts", &dp).await?;
        crds.delete("rollouts.argoproj.io", &dp).await?;
        anyhow::Ok(())
    }
    .await;
    granted.and(cleanup)
}

/// The API server goes away: the collector keeps answering from the pod list it has, until it
/// has been out of contact for longer than the trigger's `staleAfter` (10 s); then the answer
/// is `UNAVAILABLE`, never a guess. The API server back, the answer comes back.
async fn an_api_server_outage_serves_the_last_pod_list_then_goes_stale_and_recovers(
    ctx: &Ctx,
) -> Result<()> {
    let ns = "t-outage";
    namespace(ctx, ns).await?;
    run_deployment(ctx, ns, "vllm", (1, 1), Some("sm_active=50")).await?;
    apply(
        ctx,
        scaled_object(ctx, ns, "vllm", json!({}), json!({"minReplicaCount": 1})),
    )
    .await?;
    value_is(ctx, ns, "vllm", 50.0, "one pod at 50 %").await?;

    let dir = cluster_dir(ctx)?;
    let stopped = gpuscale_cluster::ops::stop(&dir, "kube-apiserver")?;
    let outage = async {
        let first = query(ctx, ns, "vllm")?;
        if first["value"].as_f64() != Some(50.0) {
            bail!(
                "right after the API server stopped, the last pod list still answers 50: {first}"
            );
        }
        let stale = value_error_contains(ctx, ns, "vllm", "pod metadata is stale").await?;
        if !stale.contains("Unavailable") {
            bail!("stale pod metadata is UNAVAILABLE: {stale}");
        }
        anyhow::Ok(())
    }
    .await;
    stopped.start()?;
    outage?;
    apiserver_ready(ctx).await?;
    value_is(ctx, ns, "vllm", 50.0, "the API server back: 50 again").await?;
    // The node controller may still mark the simulated nodes unknown, and their pods not ready,
    // once it sees the leases that went stale during the outage (it checks every 5 s); kwok then
    // makes them ready again. The tests after this one need every agent's endpoint, so wait out
    // that aftermath: ready now, and still ready after two of the controller's checks.
    nodes_and_agents_ready(ctx).await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    nodes_and_agents_ready(ctx).await
}

/// cert-manager's CRDs (from its Go module: the schema cert-manager itself serves) are
/// installed for the test's length, and every cert-manager object of
/// `deploy/overlays/cert-manager`, rendered into another namespace, passes a server-side dry run
/// with strict field validation: a misspelt or misplaced field would be refused naming it (the
/// test proves that with one). Nothing else of cert-manager runs; the CRDs are removed after, so
/// the installer's test that follows sees a cluster without cert-manager.
async fn the_cert_manager_overlay_is_valid_against_cert_managers_own_crds(ctx: &Ctx) -> Result<()> {
    use gpuscale_cluster::components;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let ns = "t-cert-manager";
    namespace(ctx, ns).await?;
    let src = components::module_dir(components::CERT_MANAGER_MODULE, components::CERT_MANAGER)?;
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let kinds = [
        (
            "cert-manager.io_certificates.yaml",
            "certificates.cert-manager.io",
        ),
        ("cert-manager.io_issuers.yaml", "issuers.cert-manager.io"),
    ];
    for (file, _) in kinds {
        let path = src.join("deploy/crds").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading cert-manager's CRD {}", path.display()))?;
        kube_util::apply_yaml(&ctx.client, &text, &path).await?;
    }
    let checked = async {
        for (_, name) in kinds {
            eventually(
                &format!("CRD {name} Established"),
                Duration::from_secs(30),
                || {
                    let crds = crds.clone();
                    async move {
                        let crd = crds.get(name).await?;
                        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
                        let ok = conditions
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        Ok((ok, format!("{conditions:?}")))
                    }
                },
            )
            .await?;
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let objects = gpuscale_deploy::render::render(
            &root.join("deploy/overlays/cert-manager"),
            &gpuscale_deploy::render::Options {
                namespace: Some(ns.into()),
                ..Default::default()
            },
        )?;
        let ours: Vec<&Value> = objects
            .iter()
            .filter(|o| {
                o["apiVersion"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("cert-manager.io/"))
            })
            .collect();
        let count = |kind: &str| ours.iter().filter(|o| o["kind"] == kind).count();
        if count("Certificate") < 3 || count("Issuer") < 2 {
            bail!(
                "the overlay should hold the CA, collector and agent Certificates and two                  Issuers; it holds {} objects of cert-manager",
                ours.len()
            );
        }
        for obj in &ours {
            kube_util::dry_run_strict(&ctx.client, obj)
                .await
                .with_context(|| {
                    format!(
                        "cert-manager {} refused {} {} of deploy/overlays/cert-manager",
                        components::CERT_MANAGER,
                        obj["kind"],
                        obj["metadata"]["name"]
                    )
                })?;
        }
        // The check can fail: the same Certificate with `dnsNames` misspelt is refused.
        let mut typo = (*ours.iter().find(|o| o["kind"] == "Certificate").unwrap()).clone();
        let names = typo["spec"]
            .as_object_mut()
            .and_then(|s| s.remove("dnsNames"))
            .unwrap_or(json!(["x"]));
        typo["spec"]["dnsName"] = names;
        match kube_util::dry_run_strict(&ctx.client, &typo).await {
            Err(e) if format!("{e:#}").contains("dnsName") => anyhow::Ok(()),
            Err(e) => bail!("a misspelt field was refused, but not by name: {e:#}"),
            Ok(()) => bail!("a Certificate with `spec.dnsName` passed strict validation"),
        }
    }
    .await;
    for (_, name) in kinds {
        let _ = crds.delete(name, &Default::default()).await;
    }
    eventually(
        "cert-manager's CRDs removed",
        Duration::from_secs(60),
        || {
            let crds = crds.clone();
            async move {
                let mut left = Vec::new();
                for (_, name) in kinds {
                    if crds.get_opt(name).await?.is_some() {
                        left.push(name);
                    }
                }
                Ok((left.is_empty(), format!("{left:?}")))
            }
        },
    )
    .await?;
    checked
}

/// Waits until every node is Ready and every running pod of gpuscale's namespace (the agents)
/// is Ready, so their endpoints are in the EndpointSlices the collector reads.
async fn nodes_and_agents_ready(ctx: &Ctx) -> Result<()> {
    fn ready<'a>(mut conditions: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
        conditions.any(|c| c == ("Ready", "True"))
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), gpuscale_deploy::DEFAULT_NAMESPACE);
    eventually(
        "every node and every gpuscale pod Ready after the outage",
        Duration::from_secs(120),
        || {
            let (nodes, pods) = (nodes.clone(), pods.clone());
            async move {
                let mut not_ready = Vec::new();
                for n in nodes.list(&ListParams::default()).await? {
                    let conditions = n.status.as_ref().and_then(|s| s.conditions.as_ref());
                    if !ready(
                        conditions
                            .into_iter()
                            .flatten()
                            .map(|c| (&*c.type_, &*c.status)),
                    ) {
                        not_ready.push(format!("node {}", n.metadata.name.unwrap_or_default()));
                    }
                }
                let running = ListParams::default().fields("status.phase=Running");
                for p in pods.list(&running).await? {
                    let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
                    if !ready(
                        conditions
                            .into_iter()
                            .flatten()
                            .map(|c| (&*c.type_, &*c.status)),
                    ) {
                        not_ready.push(format!("pod {}", p.metadata.name.unwrap_or_default()));
                    }
                }
                Ok((not_ready.is_empty(), format!("not ready: {not_ready:?}")))
            }
        },
    )
    .await
}
