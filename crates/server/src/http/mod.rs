//! The gateway's optional HTTP listener (`--http-listen`, docs/http.md): an OpenAI-style images
//! API, `/v1/models`, liveness and readiness, and a live page that watches MuLo-SD accept and
//! resample. Every call goes through the gRPC service's own handlers in-process, so tokens,
//! limits, validation and admission are the gRPC API's.

mod error;
mod images;
mod page;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mulo_proto::v1 as pb;
use pb::gateway_server::Gateway;
use serde_json::json;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

pub use error::{http_status, ApiError};
pub use images::stats_json;

use crate::gateway::GatewayService;
use crate::tls::ServerTls;

/// What the HTTP handlers share: the gateway service and the health the gRPC port reports.
pub struct HttpApi {
    gw: GatewayService,
    health: HealthService,
}

impl HttpApi {
    /// The API over `gw`, ready when `health` (the gRPC port's) says SERVING.
    pub fn new(gw: GatewayService, health: HealthService) -> Self {
        Self { gw, health }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(page::index))
            .route("/assets/app.js", get(page::script))
            .route("/assets/style.css", get(page::style))
            .route("/v1/models", get(models))
            .route("/v1/images/generations", post(generations))
            .route("/healthz", get(live))
            .route("/readyz", get(ready))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(
                mulo_core::limits::MAX_HTTP_BODY_BYTES,
            ))
            .with_state(Arc::new(self))
    }
}

type Api = State<Arc<HttpApi>>;

async fn generations(
    State(api): Api,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    use tracing::Instrument;
    let span = tracing::info_span!("http", route = "POST /v1/images/generations");
    match body {
        Ok(b) => {
            images::generations(api.gw.clone(), headers, &b)
                .instrument(span)
                .await
        }
        Err(r) => ApiError {
            status: r.status(),
            code: if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "RESOURCE_EXHAUSTED"
            } else {
                "INVALID_ARGUMENT"
            },
            message: r.body_text(),
            param: Some("body"),
        }
        .into_response(),
    }
}

/// The family and its methods (gRPC `ListModels`), shaped as OpenAI's model list.
async fn models(State(api): Api, headers: HeaderMap) -> Response {
    let mut req = tonic::Request::new(pb::ListModelsRequest {});
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok())
    {
        req.metadata_mut().insert("authorization", v);
    }
    match api.gw.list_models(req).await {
        Ok(r) => {
            let m = r.into_inner();
            let (w, h) = api.gw.family().image_size();
            Json(json!({
                "object": "list",
                "data": [{
                    "id": m.family,
                    "object": "model",
                    "owned_by": "mulo",
                    "size": format!("{w}x{h}"),
                    "grid": m.grid.map(|g| json!({"rows": g.rows, "cols": g.cols})),
                    "methods": m.methods,
                    "default_method": m.default_method,
                    "condition": m.condition,
                }],
            }))
            .into_response()
        }
        Err(s) => ApiError::from(s).into_response(),
    }
}

/// Liveness: the process answers.
async fn live() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Readiness: what `grpc.health.v1` reports on the gRPC port (NOT_SERVING while draining or
/// after the torch thread died).
async fn ready(State(api): Api) -> Response {
    let req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    match api.health.check(req).await {
        Ok(r) if r.get_ref().status == serving => {
            Json(json!({"status": "SERVING"})).into_response()
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "NOT_SERVING"})),
        )
            .into_response(),
    }
}

async fn not_found() -> Response {
    ApiError::not_found("no such route; see docs/http.md").into_response()
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until the gateway drains; the
/// requests in flight then finish before the returned task ends.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    router: Router,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let r = match tls {
            Some(tls) => {
                let addr = listener.local_addr();
                let l = TlsListener {
                    incoming: tls.incoming_http(listener),
                    addr,
                };
                axum::serve(l, router)
                    .with_graceful_shutdown(draining())
                    .await
            }
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(draining())
                    .await
            }
        };
        if let Err(e) = r {
            tracing::error!(%e, "the HTTP listener stopped");
        }
    })
}

/// Resolves once the gateway drains (SIGTERM / Ctrl-C, or the torch thread died).
async fn draining() {
    while !crate::DRAINING.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// TLS connections of [`ServerTls::incoming`] as an axum listener.
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    addr: std::io::Result<std::net::SocketAddr>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(s)) => {
                    let peer = s.get_ref().0.peer_addr();
                    if let Ok(peer) = peer {
                        return (s, peer);
                    }
                }
                Some(Err(e)) => tracing::info!(%e, "accepting an HTTPS connection"),
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.addr {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}
