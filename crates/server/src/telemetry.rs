//! Logs and traces of a service: `tracing` to stderr, and with an OTLP endpoint (`--otlp-endpoint`
//! or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) every span
//! exported over OTLP/gRPC too. The W3C trace context travels in gRPC metadata (`traceparent`):
//! clients inject the current span's context into each call, servers start each call's span as a
//! child of what arrived, so one request is one trace across gateway, drafter and verifier.

use anyhow::{Context as _, Result};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// What is exported: mulo's spans at info (every call and stage), nothing of the transport and
/// exporter crates underneath.
const SPAN_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tower=off,tonic=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes the spans still buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (call before the process exits).
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            // The batch processor's task runs on this runtime: flush from a blocking thread.
            let _ = tokio::task::spawn_blocking(move || {
                let _ = p.force_flush();
                let _ = p.shutdown();
            })
            .await;
        }
    }
}

/// The OTLP endpoint to export to: the flag (which clap also fills from
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
fn endpoint(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_string)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

/// Sets up logging with `filter` (tracing `EnvFilter` syntax) and, with an endpoint, the OTLP
/// exporter naming the process `service` (unless `OTEL_SERVICE_NAME` says otherwise). Call inside
/// the tokio runtime.
pub fn init(service: &'static str, filter: &str, otlp: Option<&str>) -> Result<Telemetry> {
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter '{filter}'"))?;
    // The log filter applies to the logs only: the exported spans keep their own level, so that
    // a quiet log (`--log warn`) still exports every stage span.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(env_filter);
    let Some(endpoint) = endpoint(otlp) else {
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(Telemetry::default());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .with_context(|| format!("OTLP exporter for {endpoint}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer(service);
    let spans = tracing_subscriber::EnvFilter::new(SPAN_FILTER);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans),
        )
        .try_init();
    tracing::info!(%endpoint, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes the current span's W3C trace context (`traceparent`, `tracestate`) into `metadata`.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// The span of one incoming gRPC call, a child of the W3C trace context in its headers (a root
/// when there is none). `tonic::transport::Server::trace_fn` calls it.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    // Probes and tooling would flood the traces.
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return tracing::Span::none();
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    let _ = span.set_parent(parent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_flag_wins_and_blank_means_off() {
        assert_eq!(
            endpoint(Some("http://c:4317")).as_deref(),
            Some("http://c:4317")
        );
        assert_eq!(endpoint(Some("  ")), None);
    }

    #[test]
    fn a_traceparent_header_becomes_the_parent_of_the_call_span() {
        let _ = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(SdkTracerProvider::builder().build().tracer("t")),
            )
            .try_init();
        let req = http::Request::builder()
            .uri("/mulo.v1.Drafter/Draft")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .unwrap_or_default();
        let span = server_span(&req);
        let mut md = tonic::metadata::MetadataMap::new();
        span.in_scope(|| inject(&mut md));
        let sent = md
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "same trace id: {sent}"
        );
        assert!(!sent.contains("00f067aa0ba902b7"), "a new span id: {sent}");
    }
}
