//! A KEDA-shaped client: calls the collector's external scaler over gRPC with the project's own
//! `externalscaler.proto`, the way KEDA's operator and metrics server do (metadata in
//! `scalerMetadata`, a deadline of 3 s on `GetMetrics`).

use std::path::Path;
use std::time::Duration;

use proto::externalscaler::external_scaler_client::ExternalScalerClient;
use proto::externalscaler::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// A connection to the collector plus a tokio runtime to drive it from plain tests.
pub struct Keda {
    rt: tokio::runtime::Runtime,
    client: ExternalScalerClient<Channel>,
}

/// What KEDA puts in `scalerAddress` for the tests' ScaledObjects.
pub const SCALER_ADDRESS: &str = "gpuscale-collector.gpuscale-system:7700";

/// A ScaledObject reference in namespace `ml` with `metadata` as its trigger metadata (plus the
/// `scalerAddress` KEDA itself puts there).
pub fn scaled_object(name: &str, metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef::as_keda_sends("ml", name, metadata, SCALER_ADDRESS)
}

impl Keda {
    /// Connects to the collector at `addr` (`host:port`), retrying while it starts.
    pub fn connect(addr: &str) -> Keda {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let url = format!("http://{addr}");
        let client = rt.block_on(async {
            for _ in 0..200 {
                if let Ok(c) = ExternalScalerClient::connect(url.clone()).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("collector at {addr} never accepted a connection");
        });
        Keda { rt, client }
    }

    /// Connects over TLS as KEDA's `external_scaler.go` does with `enableTLS: "true"`: a
    /// `tls.Config` with the trigger authentication's `caCert` as the roots and, for mutual TLS,
    /// `tlsClientCert`/`tlsClientKey` as the certificate; grpc-go checks the certificate against
    /// the host of `scalerAddress` and needs ALPN `h2`. `Err` when the handshake fails.
    pub fn connect_tls(
        addr: &str,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Keda, String> {
        use gpuscale_health::tls::{ClientFiles, PemFile, ServerNames};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let files = ClientFiles {
            ca: PemFile::new("caCert", ca),
            identity: identity.map(|(c, k)| {
                (
                    PemFile::new("tlsClientCert", c),
                    PemFile::new("tlsClientKey", k),
                )
            }),
        };
        let config = std::sync::Arc::new(
            files
                .config(ServerNames::Checked)
                .map_err(|e| e.to_string())?,
        );
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?;
        let channel = rt.block_on(async {
            let mut last = String::new();
            for _ in 0..100 {
                match gpuscale_health::tls::channel(&ep, config.clone()).await {
                    Ok((c, _)) => return Ok(c),
                    // Not listening yet: the collector is starting.
                    Err(e) if e.contains("onnection refused") => last = e,
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(last)
        })?;
        Ok(Keda {
            rt,
            client: ExternalScalerClient::new(channel),
        })
    }

    /// `GetMetricSpec`: (metric name, target).
    pub fn metric_spec(&mut self, r: &ScaledObjectRef) -> Result<(String, f64, i64), Status> {
        let spec = self
            .rt
            .block_on(self.client.get_metric_spec(r.clone()))?
            .into_inner();
        let s = &spec.metric_specs[0];
        Ok((s.metric_name.clone(), s.target_size_float, s.target_size))
    }

    /// `GetMetrics` with KEDA's 3 s deadline: (float value, int value).
    pub fn metrics(
        &mut self,
        r: &ScaledObjectRef,
        metric_name: &str,
    ) -> Result<(f64, i64), Status> {
        let mut req = tonic::Request::new(GetMetricsRequest {
            scaled_object_ref: Some(r.clone()),
            metric_name: metric_name.into(),
        });
        req.set_timeout(Duration::from_secs(3));
        let resp = self.rt.block_on(self.client.get_metrics(req))?.into_inner();
        let v = &resp.metric_values[0];
        assert_eq!(
            v.metric_name, metric_name,
            "GetMetrics must echo the metric name"
        );
        Ok((v.metric_value_float, v.metric_value))
    }

    /// `IsActive`.
    pub fn is_active(&mut self, r: &ScaledObjectRef) -> Result<bool, Status> {
        Ok(self
            .rt
            .block_on(self.client.is_active(r.clone()))?
            .into_inner()
            .result)
    }

    /// Opens `StreamIsActive`.
    pub fn stream_is_active(
        &mut self,
        r: &ScaledObjectRef,
    ) -> Result<Streaming<IsActiveResponse>, Status> {
        Ok(self
            .rt
            .block_on(self.client.stream_is_active(r.clone()))?
            .into_inner())
    }

    /// The next message of a `StreamIsActive` stream, waiting at most `timeout`.
    pub fn next_active(
        &mut self,
        stream: &mut Streaming<IsActiveResponse>,
        timeout: Duration,
    ) -> Option<bool> {
        self.rt
            .block_on(async { tokio::time::timeout(timeout, stream.message()).await })
            .ok()
            .and_then(|r| r.ok().flatten())
            .map(|m| m.result)
    }

    /// Polls `GetMetrics` until `pred` holds on its answer, up to `timeout`.
    pub fn wait_metrics(
        &mut self,
        r: &ScaledObjectRef,
        metric_name: &str,
        timeout: Duration,
        pred: impl Fn(&Result<(f64, i64), Status>) -> bool,
    ) -> Result<(f64, i64), Status> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.metrics(r, metric_name);
            if pred(&got) || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether `r` failed with `code`.
pub fn is_code<T>(r: &Result<T, Status>, code: Code) -> bool {
    matches!(r, Err(s) if s.code() == code)
}
