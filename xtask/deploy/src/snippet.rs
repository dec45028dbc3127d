//! The ScaledObject `cargo xtask deploy` prints when it is done: a vLLM Deployment scaled on
//! `sm_active` through the collector just installed.

/// The address KEDA dials: the collector's headless Service in `namespace`.
pub fn scaler_address(namespace: &str) -> String {
    format!("gpuscale-collector.{namespace}.svc.cluster.local:7700")
}

/// A ScaledObject for a Deployment `vllm` in namespace `ml`, using the collector in
/// `namespace`. See `deploy/examples/` for more.
pub fn scaled_object(namespace: &str) -> String {
    format!(
        r#"apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: vllm
  namespace: ml                  # your workload's namespace
spec:
  scaleTargetRef:
    name: vllm                   # your Deployment; its pod selector picks the pods measured
  minReplicaCount: 1
  maxReplicaCount: 8
  fallback:
    failureThreshold: 3
    replicas: 2
  triggers:
    - type: external-push
      authenticationRef:         # KEDA's client certificate and the CA, made by the install
        name: {auth}
        kind: ClusterTriggerAuthentication
      metadata:
        scalerAddress: {address}
        enableTLS: "true"
        metric: sm_active        # or gpu_util, vram_used_pct, … (docs/TRIGGERS.md)
        targetValue: "70"        # % SM activity per replica
        window: 30s
        activeAfterOpen: 2m
"#,
        address = scaler_address(namespace),
        auth = crate::certificates::TRIGGER_AUTHENTICATION,
    )
}
