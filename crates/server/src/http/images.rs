//! `POST /v1/images/generations`: the OpenAI Images API's request and response around the
//! gateway's own `Generate` / `GenerateStream` (one code path: the same validation, tokens,
//! limits and admission as gRPC).

use std::convert::Infallible;
use std::time::Instant;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use mulo_core::limits::MAX_HTTP_IMAGES;
use mulo_proto::v1 as pb;
use pb::gateway_server::Gateway;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use crate::convert::unpack_bits;
use crate::gateway::GatewayService;

/// The request body: OpenAI's fields (`prompt`, `model`, `n`, `size`, `response_format`,
/// `stream`, `user`) and mulo's (`method`, `seed`, sampling, `class_id`, `return_tokens`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    prompt: Option<String>,
    model: Option<String>,
    n: Option<usize>,
    size: Option<String>,
    response_format: Option<String>,
    #[serde(default)]
    stream: bool,
    /// Accepted and ignored (OpenAI clients send it).
    #[allow(dead_code)]
    user: Option<String>,
    method: Option<String>,
    seed: Option<u64>,
    class_id: Option<u32>,
    cfg_scale: Option<f64>,
    temperature: Option<f64>,
    top_k: Option<u32>,
    top_p: Option<f64>,
    #[serde(default)]
    return_tokens: bool,
}

/// A checked request: the gRPC message of its first image and how many images.
struct Plan {
    first: pb::GenerateRequest,
    n: usize,
    stream: bool,
}

/// Parses and checks a body against the family the gateway serves; the gRPC service checks the
/// rest (method, sampling, prompt length) as it does for gRPC callers.
fn plan(gw: &GatewayService, body: &[u8]) -> Result<Plan, ApiError> {
    let r: ImagesRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("invalid JSON request: {e}")))?;
    let fam = gw.family();
    if let Some(m) = r.model.as_deref() {
        if m != fam.name && m != "mulo" {
            return Err(ApiError::not_found(format!(
                "model {m:?} is not served here; this gateway serves {:?}",
                fam.name
            )));
        }
    }
    let n = r.n.unwrap_or(1);
    if !(1..=MAX_HTTP_IMAGES).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be 1 to {MAX_HTTP_IMAGES}, got {n}"),
        ));
    }
    if r.stream && n != 1 {
        return Err(ApiError::invalid(
            "n",
            "a streamed request draws one image (n = 1)",
        ));
    }
    let (w, h) = fam.image_size();
    if let Some(size) = r.size.as_deref() {
        if size != "auto" && size != format!("{w}x{h}") {
            return Err(ApiError::invalid(
                "size",
                format!("this family draws {w}x{h} images, not {size:?} (or send \"auto\")"),
            ));
        }
    }
    match r.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some(f) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("only \"b64_json\" is served (the gateway keeps no images), not {f:?}"),
            ))
        }
    }
    let kind = match (r.class_id, r.prompt) {
        (Some(c), _) => pb::condition::Kind::ClassId(c),
        (None, Some(p)) => pb::condition::Kind::Prompt(p),
        (None, None) => return Err(ApiError::invalid("prompt", "prompt is required")),
    };
    let first = pb::GenerateRequest {
        request_id: String::new(),
        condition: Some(pb::Condition { kind: Some(kind) }),
        method: r.method.unwrap_or_default(),
        sampling: Some(pb::Sampling {
            cfg_scale: r.cfg_scale,
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
        }),
        // 53 bits: the seed reported back survives a JSON parser that reads numbers as doubles.
        seed: r.seed.unwrap_or_else(|| rand::random::<u64>() >> 11),
        return_tokens: r.return_tokens,
        skip_png: false,
    };
    Ok(Plan {
        first,
        n,
        stream: r.stream,
    })
}

/// The gRPC request of an HTTP one: the message, and the caller's `Authorization` header as the
/// `authorization` metadata the gateway checks tokens in.
fn grpc(headers: &HeaderMap, msg: pb::GenerateRequest) -> tonic::Request<pb::GenerateRequest> {
    let mut req = tonic::Request::new(msg);
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok());
    if let Some(v) = auth {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Handles a generation request (JSON or, with `"stream": true`, Server-Sent Events).
pub async fn generations(gw: GatewayService, headers: HeaderMap, body: &[u8]) -> Response {
    // JSON only: a cross-site form or text/plain POST (no preflight) cannot start a generation.
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !json {
        return ApiError {
            status: axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "INVALID_ARGUMENT",
            message: "send the body as JSON (Content-Type: application/json)".into(),
            param: Some("Content-Type"),
        }
        .into_response();
    }
    let plan = match plan(&gw, body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if plan.stream {
        return match stream(gw, grpc(&headers, plan.first)).await {
            Ok(sse) => sse.into_response(),
            Err(e) => e.into_response(),
        };
    }
    match all(gw, &headers, plan).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Generates the `n` images concurrently (seeds `seed`, `seed + 1`, ...); the first failure
/// fails the request and drops the others (which frees their sessions).
async fn all(gw: GatewayService, headers: &HeaderMap, plan: Plan) -> Result<Value, ApiError> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..plan.n {
        let msg = pb::GenerateRequest {
            seed: plan.first.seed.wrapping_add(i as u64),
            ..plan.first.clone()
        };
        let (gw, req) = (gw.clone(), grpc(headers, msg));
        set.spawn(async move { (i, gw.generate(req).await) });
    }
    let mut data = vec![Value::Null; plan.n];
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined.map_err(|e| ApiError::from(tonic::Status::internal(e.to_string())))?;
        let seed = plan.first.seed.wrapping_add(i as u64);
        data[i] = image_json(&r?.into_inner(), seed);
    }
    Ok(json!({
        "created": unix_now(),
        "model": gw.family().name,
        "data": data,
    }))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One image of the response: the PNG as base64 and what it cost.
fn image_json(r: &pb::GenerateResponse, seed: u64) -> Value {
    let mut v = json!({
        "b64_json": base64::engine::general_purpose::STANDARD.encode(&r.png),
        "seed": seed,
        "request_id": r.request_id,
        "stats": r.stats.as_ref().map(stats_json),
    });
    if !r.tokens.is_empty() {
        v["tokens"] = json!(r.tokens);
    }
    v
}

/// A generation's statistics as JSON (the fields of `mulo.v1.GenerateStats`).
pub fn stats_json(s: &pb::GenerateStats) -> Value {
    json!({
        "method": s.method,
        "tokens": s.tokens,
        "target_passes": s.target_passes,
        "drafter_passes": s.drafter_passes,
        "proposed": s.proposed,
        "accepted": s.accepted,
        "resampled": s.resampled,
        "cycles": s.cycles,
        "largest_island": s.largest_island,
        "fallback": s.fallback,
        "migrations": s.migrations,
        "seconds": s.seconds,
        "stages": s.stages,
        "wire_bytes": s.wire_bytes,
    })
}

type Events = Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>;

/// Streams one generation as Server-Sent Events: `mulo.block` per committed block,
/// `image_generation.partial_image` (the grid decoded so far; skipped while one is decoding),
/// then `image_generation.completed` or `error`. A refusal before the first event (token,
/// validation, admission) is an ordinary JSON error.
async fn stream(
    gw: GatewayService,
    req: tonic::Request<pb::GenerateRequest>,
) -> Result<Events, ApiError> {
    let seed = req.get_ref().seed;
    let events = gw.generate_stream(req).await?.into_inner().into_inner();
    // Small: the generation's own channel buffers its events while a partial image decodes.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(relay(gw, events, tx, seed));
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()))
}

type Upstream = mpsc::Receiver<Result<pb::GenerateEvent, tonic::Status>>;

/// Forwards the generation's events as SSE until it ends or the client leaves (dropping
/// `events` then cancels the generation and frees its sessions).
async fn relay(
    gw: GatewayService,
    mut events: Upstream,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    seed: u64,
) {
    let total = gw.family().rows * gw.family().cols;
    let mut grid = vec![0i64; total];
    let (start, mut partials) = (Instant::now(), 0usize);
    loop {
        // The client leaving ends the relay at once (dropping `events` cancels the generation).
        let first = tokio::select! {
            biased;
            () = tx.closed() => return,
            e = events.recv() => e,
        };
        let Some(first) = first else { return };
        // Every event that arrived meanwhile, then one decode of the grid so far.
        let mut batch = vec![first];
        while let Ok(e) = events.try_recv() {
            batch.push(e);
        }
        let mut committed = None;
        for e in batch {
            let (ev, end) = sse_of(e, &mut grid, &start, seed);
            if let Some(c) = ev.committed {
                committed = Some(c);
            }
            if tx.send(Ok(ev.event)).await.is_err() || end {
                return;
            }
        }
        if let Some(c) = committed.filter(|&c| c < total) {
            let png = tokio::select! {
                biased;
                () = tx.closed() => return,
                p = gw.png(&grid) => p,
            };
            if let Ok(png) = png {
                let ev = partial(&png, partials, c);
                partials += 1;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// An SSE event and, for a block, the tokens committed with it.
struct Sent {
    event: Event,
    committed: Option<usize>,
}

/// The SSE event of one upstream event (writing a block's tokens into `grid`), and whether it
/// is the last.
fn sse_of(
    e: Result<pb::GenerateEvent, tonic::Status>,
    grid: &mut [i64],
    start: &Instant,
    seed: u64,
) -> (Sent, bool) {
    let sent = |event, committed| Sent { event, committed };
    match e.map(|e| e.kind) {
        Ok(Some(pb::generate_event::Kind::Block(b))) => {
            for (i, &t) in b.tokens.iter().enumerate() {
                if let Some(g) = grid.get_mut(b.start as usize + i) {
                    *g = i64::from(t);
                }
            }
            let n = b.tokens.len();
            let data = json!({
                "type": "mulo.block",
                "start": b.start,
                "committed": b.committed,
                "total": b.total,
                "tokens": b.tokens,
                "accepted": unpack_bits(&b.accepted, if b.accepted.is_empty() { 0 } else { n }),
                "resampled": unpack_bits(&b.resampled, if b.resampled.is_empty() { 0 } else { n }),
                "target_passes": b.target_passes,
                "elapsed_s": start.elapsed().as_secs_f64(),
            });
            (
                sent(event("mulo.block", &data), Some(b.committed as usize)),
                false,
            )
        }
        Ok(Some(pb::generate_event::Kind::Done(r))) => {
            let mut data = image_json(&r, seed);
            data["type"] = json!("image_generation.completed");
            data["created"] = json!(unix_now());
            data["elapsed_s"] = json!(start.elapsed().as_secs_f64());
            (sent(event("image_generation.completed", &data), None), true)
        }
        Ok(None) => (sent(Event::default().comment("empty event"), None), false),
        Err(s) => (sent(event("error", &ApiError::from(s).body()), None), true),
    }
}

fn partial(png: &[u8], index: usize, committed: usize) -> Event {
    let data = json!({
        "type": "image_generation.partial_image",
        "partial_image_index": index,
        "committed": committed,
        "b64_json": base64::engine::general_purpose::STANDARD.encode(png),
    });
    event("image_generation.partial_image", &data)
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}
