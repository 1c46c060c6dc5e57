//! One request through the three services is one trace: an in-process OTLP collector receives the
//! spans the gateway, the drafter and the verifier export, and they share the trace id of the
//! gateway's `Generate` call, with the stage spans of every process and the W3C parent links
//! across the gRPC hops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mulo_proto::v1 as pb;
use mulo_proto::v1::gateway_client::GatewayClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Every span received, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn collector() -> (Collector, String) {
    let c = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(c.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (c, format!("http://{addr}"))
}

/// Span names per service within one trace.
fn names_by_service(spans: &[(String, Span)], trace: &[u8]) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (svc, s) in spans.iter().filter(|(_, s)| s.trace_id == trace) {
        out.entry(svc.clone()).or_default().insert(s.name.clone());
    }
    out
}

#[tokio::test]
async fn one_request_is_one_trace_across_the_three_services() {
    let (collector, endpoint) = collector().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let (drafter, verifier, gateway, ch) = common::cluster_with(&[], &env).await;
    let mut client = GatewayClient::new(ch);
    let resp = client
        .generate(pb::GenerateRequest {
            request_id: "traced".into(),
            condition: Some(pb::Condition {
                kind: Some(pb::condition::Kind::Prompt("red apple".into())),
            }),
            // Two cycles, so that the second draft realigns the first block.
            method: "mulo:block_rows=2".into(),
            sampling: None,
            seed: 4,
            return_tokens: false,
            skip_png: true,
        })
        .await
        .unwrap()
        .into_inner();
    let stats = resp.stats.unwrap();
    assert!(stats.fallback.is_empty(), "{stats:?}");

    // The batch exporters flush every 200 ms; wait for all three services' stage spans.
    let want: [(&str, &[&str]); 3] = [
        (
            "mulo-gateway",
            &[
                "mulo.v1.Gateway/Generate",
                "generate",
                "prefill",
                "drafter_prefill",
                "draft",
                "verify",
            ],
        ),
        (
            "mulo-drafter",
            &[
                "mulo.v1.Drafter/Open",
                "mulo.v1.Drafter/Draft",
                "realign",
                "draft",
                "upsample",
            ],
        ),
        (
            "mulo-verifier",
            &["mulo.v1.Verifier/Open", "mulo.v1.Verifier/Verify", "verify"],
        ),
    ];
    let start = Instant::now();
    let (spans, trace) = loop {
        let spans = collector.0.lock().unwrap().clone();
        let root = spans
            .iter()
            .find(|(svc, s)| svc == "mulo-gateway" && s.name == "mulo.v1.Gateway/Generate")
            .map(|(_, s)| s.trace_id.clone());
        if let Some(trace) = root {
            let names = names_by_service(&spans, &trace);
            let complete = want.iter().all(|(svc, need)| {
                names
                    .get(*svc)
                    .is_some_and(|have| need.iter().all(|n| have.contains(*n)))
            });
            if complete {
                break (spans, trace);
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            let seen: Vec<(String, String)> = spans
                .iter()
                .map(|(svc, s)| (svc.clone(), s.name.clone()))
                .collect();
            panic!("the trace never completed; spans seen: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The client's call had no trace context: the gateway's call span is the root.
    let root = spans
        .iter()
        .find(|(_, s)| s.trace_id == trace && s.name == "mulo.v1.Gateway/Generate")
        .unwrap();
    assert!(root.1.parent_span_id.is_empty(), "root span has no parent");
    // Each role's call span is a child of one of the gateway's stage spans (context propagated
    // in the gRPC metadata), not a root of its own.
    let gateway_ids: BTreeSet<Vec<u8>> = spans
        .iter()
        .filter(|(svc, s)| svc == "mulo-gateway" && s.trace_id == trace)
        .map(|(_, s)| s.span_id.clone())
        .collect();
    for (svc, name) in [
        ("mulo-drafter", "mulo.v1.Drafter/Draft"),
        ("mulo-verifier", "mulo.v1.Verifier/Verify"),
    ] {
        let calls: Vec<&Span> = spans
            .iter()
            .filter(|(s, sp)| s == svc && sp.trace_id == trace && sp.name == name)
            .map(|(_, sp)| sp)
            .collect();
        assert!(!calls.is_empty(), "{svc} {name}");
        for c in calls {
            assert!(
                gateway_ids.contains(&c.parent_span_id),
                "{svc} {name} hangs under a gateway span"
            );
        }
    }
    // The roles' stage spans sit under their call spans (entered on the torch thread).
    let drafter_calls: BTreeSet<Vec<u8>> = spans
        .iter()
        .filter(|(s, sp)| s == "mulo-drafter" && sp.name == "mulo.v1.Drafter/Draft")
        .map(|(_, sp)| sp.span_id.clone())
        .collect();
    assert!(spans
        .iter()
        .filter(|(s, sp)| s == "mulo-drafter" && sp.name == "upsample")
        .all(|(_, sp)| drafter_calls.contains(&sp.parent_span_id)));
    drop((drafter, verifier, gateway));
}
