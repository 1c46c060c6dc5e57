//! Prometheus metrics of a service (DESIGN §5.4): the exporter on `--metrics-listen`, and the
//! tower layer that counts and times every gRPC call. The names and help texts are
//! [`mulo_core::metrics`]; the coordinator, the roles and the models record through the
//! `metrics` facade.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::{Context as _, Result};
use metrics_exporter_prometheus::PrometheusBuilder;
use mulo_core::metrics::{self as names, Kind};

/// Bucket bounds (seconds) of every duration histogram: 0.5 ms to 2 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Bucket bounds of the sessions-per-batch histogram.
pub const SESSION_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Serves Prometheus text on `http://listen/metrics` (any path but `/health` answers) and
/// describes the metrics `service` exports. Call inside the tokio runtime.
pub fn install(service: &str, listen: SocketAddr) -> Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(SECONDS_BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::BATCH_SESSIONS.into()),
            SESSION_BUCKETS,
        )
        .context("batch histogram buckets")?
        .add_global_label("service", service)
        .install()
        .with_context(|| format!("serving metrics on {listen}"))?;
    let role = service.trim_start_matches("mulo-");
    for m in names::ALL.iter().filter(|m| m.services.contains(&role)) {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram if m.name == names::BATCH_SESSIONS => {
                metrics::describe_histogram!(m.name, metrics::Unit::Count, m.help);
            }
            Kind::Histogram => {
                metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help);
            }
        }
    }
    tracing::info!(%listen, "serving Prometheus metrics on /metrics");
    Ok(())
}

/// The `rpc` label of a request path `/package.Service/Method`: `package.Service/Method` for
/// mulo's, health and reflection services, `other` for anything else (so that stray paths do not
/// grow the series).
fn rpc_label(path: &str) -> String {
    let p = path.trim_start_matches('/');
    let known = [
        "mulo.v1.",
        "grpc.health.v1.",
        "grpc.reflection.v1.",
        "grpc.reflection.v1alpha.",
    ];
    let ok = known.iter().any(|k| p.starts_with(k))
        && p.split('/').count() == 2
        && p.len() <= 96
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '/' || c == '_');
    if ok {
        p.to_string()
    } else {
        "other".to_string()
    }
}

/// Tower layer counting ([`names::RPCS`]) and timing ([`names::RPC_DURATION`]) each gRPC call.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] wraps.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut call = CountedCall {
            rpc: rpc_label(req.uri().path()),
            since: Instant::now(),
            outcome: "cancelled",
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            // Errors of unary calls (and refusals of streams) come trailers-only, the code in
            // the headers; no code there means the call answered.
            call.finish(match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("ok", names::outcome),
                Err(_) => "transport_error",
            });
            r
        })
    }
}

/// One gRPC call being served: counted and timed when it ends, or when it is dropped unfinished
/// (the client cancelled or its deadline passed: `cancelled`).
struct CountedCall {
    rpc: String,
    since: Instant,
    outcome: &'static str,
}

impl CountedCall {
    fn finish(&mut self, outcome: &'static str) {
        self.outcome = outcome;
        // A path no service knows: one `other` series, whatever the caller sent.
        if outcome == "unimplemented" {
            self.rpc = "other".to_string();
        }
    }
}

impl Drop for CountedCall {
    fn drop(&mut self) {
        let rpc = std::mem::take(&mut self.rpc);
        metrics::counter!(names::RPCS, "rpc" => rpc.clone(), "outcome" => self.outcome)
            .increment(1);
        metrics::histogram!(names::RPC_DURATION, "rpc" => rpc).record(self.since.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_keep_known_paths_only() {
        assert_eq!(
            rpc_label("/mulo.v1.Verifier/Verify"),
            "mulo.v1.Verifier/Verify"
        );
        assert_eq!(
            rpc_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(rpc_label("/evil.Service/X"), "other");
        assert_eq!(rpc_label("/mulo.v1.Verifier/Verify/extra"), "other");
        assert_eq!(rpc_label("/mulo.v1.Verifier/Ver ify"), "other");
        assert_eq!(
            rpc_label(&format!("/mulo.v1.{}/X", "a".repeat(200))),
            "other"
        );
    }
}
