//! The role traits over gRPC: what the gateway hands the coordinator, so the cycle code is the
//! engine's own whether the roles live in this process or behind the network.

use std::sync::Arc;

use async_trait::async_trait;
use mulo_core::limits::MAX_MESSAGE_BYTES;
use mulo_core::method::Resampler;
use mulo_core::GridSize;
use mulo_engine::drafter::{DraftReply, DrafterInfo};
use mulo_engine::resample::IslandPlan;
use mulo_engine::verifier::{
    DecodeReply, Relaxation, ResampleReply, SpeculateReply, VerifierInfo, VerifyReply,
};
use mulo_engine::{DrafterRole, EngineError, SessionRef, SessionSpec, VerifierRole};
use mulo_proto::v1 as pb;
use mulo_proto::v1::drafter_client::DrafterClient;
use mulo_proto::v1::verifier_client::VerifierClient;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

tokio::task_local! {
    /// Payload bytes of the messages exchanged with the roles by the current request (set by the
    /// gateway around each generation).
    pub static WIRE_BYTES: std::sync::Arc<std::sync::atomic::AtomicU64>;
}

/// Adds a message sent to (`sent`) or received from `peer` to the current request's count
/// (no-op outside a request) and to the peer's byte counters.
pub fn count_bytes<M: Message>(peer: &str, sent: bool, m: &M) {
    let n = m.encoded_len() as u64;
    let _ = WIRE_BYTES.try_with(|c| c.fetch_add(n, std::sync::atomic::Ordering::Relaxed));
    let name = if sent {
        mulo_core::metrics::SENT_BYTES
    } else {
        mulo_core::metrics::RECEIVED_BYTES
    };
    metrics::counter!(name, "peer" => peer.to_string()).increment(n);
}

use crate::convert::{condition_in, engine_error, ref_out, spec_out, tokens_in};

fn ids(v: &[i64]) -> Result<Vec<u32>, EngineError> {
    v.iter()
        .map(|&t| {
            u32::try_from(t)
                .map_err(|_| EngineError::Precondition(format!("token id {t} cannot be sent")))
        })
        .collect()
}

fn spec_pb(spec: &SessionSpec) -> Result<pb::SessionSpec, EngineError> {
    spec_out(spec).map_err(|s| EngineError::Unsupported(s.message().to_string()))
}

/// A lazily connected plaintext channel to `addr` (`host:port` or `http://host:port`).
pub fn channel(addr: &str) -> Result<Channel, EngineError> {
    Ok(endpoint(addr)?.connect_lazy())
}

fn endpoint(addr: &str) -> Result<Endpoint, EngineError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(uri).map_err(|e| EngineError::Peer {
        peer: addr.to_string(),
        code: "invalid address".into(),
        message: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true))
}

/// TLS of this process's channels to the roles (the gateway's `--roles-ca` ...), set once at
/// start-up; unset: plaintext.
static ROLE_TLS: std::sync::OnceLock<Arc<crate::tls::ClientTls>> = std::sync::OnceLock::new();

/// Makes every channel to a role made from now on use `tls` (its files re-read on change).
pub fn use_role_tls(tls: crate::tls::ClientTls) -> Result<(), EngineError> {
    ROLE_TLS
        .set(Arc::new(tls))
        .map_err(|_| EngineError::Precondition("role TLS is set once".into()))
}

/// A lazily connected channel to the role at `addr`: over TLS when [`use_role_tls`] was called
/// (every new connection with the TLS files as they are then).
pub fn role_channel(addr: &str) -> Result<Channel, EngineError> {
    let Some(tls) = ROLE_TLS.get().cloned() else {
        return channel(addr);
    };
    let connect = move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(443);
            tls.connect(&host, port).await
        }
    };
    Ok(endpoint(addr)?.connect_with_connector_lazy(tower::service_fn(connect)))
}

/// A client of a gateway at `addr`, with the message size limits of every mulo server.
pub fn gateway_client(
    addr: &str,
) -> Result<pb::gateway_client::GatewayClient<Channel>, EngineError> {
    gateway_client_tls(addr, None)
}

/// [`gateway_client`] over TLS when `ca` (PEM, the CA of the gateway's certificate) is given.
pub fn gateway_client_tls(
    addr: &str,
    ca: Option<&std::path::Path>,
) -> Result<pb::gateway_client::GatewayClient<Channel>, EngineError> {
    let channel = match ca {
        None => channel(addr)?,
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| {
                EngineError::Precondition(format!("reading CA {}: {e}", ca.display()))
            })?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            let host = addr.rsplit_once("://").map_or(addr, |(_, h)| h);
            endpoint(&format!("https://{host}"))?
                .tls_config(tls)
                .map_err(|e| EngineError::Precondition(format!("TLS to {addr}: {e}")))?
                .connect_lazy()
        }
    };
    Ok(pb::gateway_client::GatewayClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A request to the gateway carrying `token` as `authorization: Bearer` metadata.
pub fn with_token<T>(msg: T, token: Option<&str>) -> Result<tonic::Request<T>, EngineError> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| EngineError::Precondition("the token must be printable ASCII".into()))?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

/// Attempts of an idempotent call (open, release, info, status, image decoding) when the peer is
/// unreachable; the waits between them grow and are jittered so that gateways do not retry in step.
pub const ATTEMPTS: u32 = 3;

/// Runs an idempotent call, again after a jittered back-off (20 ms, then 60 ms, times 0.5–1.5)
/// while the peer answers UNAVAILABLE (not reachable, reset, draining). Other errors, and the last
/// failure, are returned as they are.
pub async fn retry<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut wait = std::time::Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable && attempt < ATTEMPTS => {
                let jitter = 0.5 + rand::random::<f64>();
                tokio::time::sleep(wait.mul_f64(jitter)).await;
                wait *= 3;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// One unary call to a role: counts the request and the answer on the wire, and maps a refusal
/// or a lost peer to the engine's error; `idempotent` calls are retried (see [`retry`]).
async fn unary<C, Req, Resp, F, Fut>(
    addr: &str,
    client: &C,
    req: Req,
    idempotent: bool,
    call: F,
) -> Result<Resp, EngineError>
where
    C: Clone,
    Req: Message + Clone,
    Resp: Message,
    F: Fn(C, tonic::Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    count_bytes(addr, true, &req);
    let r = if idempotent {
        retry(|| call(client.clone(), traced(req.clone()))).await
    } else {
        call(client.clone(), traced(req)).await
    }
    .map_err(|s| engine_error(addr, &s))?
    .into_inner();
    count_bytes(addr, false, &r);
    Ok(r)
}

/// The replica list for `addrs` (a re-resolution): clients of `current` still listed are kept
/// with their channels, new addresses get one from `make`. `None` when nothing changed; an error
/// from `make` leaves the caller's list as it was.
pub(crate) fn relist<T: Clone>(
    current: &[T],
    addrs: &[String],
    addr: impl Fn(&T) -> &str,
    make: impl Fn(&str) -> Result<T, EngineError>,
) -> Result<Option<Vec<T>>, EngineError> {
    if current
        .iter()
        .map(&addr)
        .eq(addrs.iter().map(String::as_str))
    {
        return Ok(None);
    }
    addrs
        .iter()
        .map(|a| match current.iter().find(|c| addr(c) == a) {
            Some(c) => Ok(c.clone()),
            None => make(a),
        })
        .collect::<Result<Vec<T>, _>>()
        .map(Some)
}

/// A request carrying the current span's trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    crate::telemetry::inject(r.metadata_mut());
    r
}

fn grid_in(g: Option<pb::Grid>) -> GridSize {
    let g = g.unwrap_or_default();
    GridSize {
        rows: g.rows as usize,
        cols: g.cols as usize,
    }
}

/// A drafter behind gRPC.
#[derive(Debug, Clone)]
pub struct RemoteDrafter {
    addr: String,
    client: DrafterClient<Channel>,
}

impl RemoteDrafter {
    /// A client of the drafter at `addr` (connects on first use).
    pub fn new(addr: &str) -> Result<Self, EngineError> {
        Ok(Self {
            addr: addr.to_string(),
            client: DrafterClient::new(role_channel(addr)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// The drafter's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The raw client (info, status, image decoding).
    pub fn client(&self) -> DrafterClient<Channel> {
        self.client.clone()
    }
}

fn drafter_info(i: Option<pb::DrafterInfoResponse>) -> DrafterInfo {
    let i = i.unwrap_or_default();
    DrafterInfo {
        low: grid_in(i.low),
        high: grid_in(i.high),
        scale: i.scale as usize,
        vocab: i.vocab as usize,
    }
}

#[async_trait]
impl DrafterRole for RemoteDrafter {
    async fn open(
        &self,
        spec: SessionSpec,
        committed: Vec<i64>,
    ) -> Result<DrafterInfo, EngineError> {
        let req = pb::DrafterOpenRequest {
            spec: Some(spec_pb(&spec)?),
            committed: ids(&committed)?,
        };
        let r = unary(&self.addr, &self.client, req, true, |mut c, r| async move {
            c.open(r).await
        })
        .await?;
        Ok(drafter_info(r.info))
    }

    async fn draft(
        &self,
        session: SessionRef,
        realign: Vec<i64>,
        rows: usize,
        zipar_window: usize,
    ) -> Result<DraftReply, EngineError> {
        let req = pb::DraftRequest {
            session: Some(ref_out(&session)),
            realign: ids(&realign)?,
            rows: rows as u32,
            zipar_window: zipar_window as u32,
        };
        count_bytes(&self.addr, true, &req);
        let peer = |s: tonic::Status| engine_error(&self.addr, &s);
        let mut stream = self
            .client
            .clone()
            .draft(traced(req))
            .await
            .map_err(peer)?
            .into_inner();
        let mut reply = DraftReply::default();
        let mut done = false;
        while let Some(chunk) = stream.message().await.map_err(peer)? {
            count_bytes(&self.addr, false, &chunk);
            match chunk.kind {
                Some(pb::draft_chunk::Kind::Row(r)) => {
                    if reply.low.is_empty() {
                        reply.first_row = r.low_row as usize;
                    }
                    reply.low.extend(tokens_in(&r.low));
                    reply.high.extend(tokens_in(&r.high));
                }
                Some(pb::draft_chunk::Kind::Stats(s)) => {
                    reply.passes = s.passes as usize;
                    reply.realigned = s.realigned as usize;
                    reply.draft_seconds = s.draft_seconds;
                    reply.upsample_seconds = s.upsample_seconds;
                    reply.realign_seconds = s.realign_seconds;
                    done = true;
                }
                None => {}
            }
        }
        if !done {
            return Err(EngineError::Peer {
                peer: self.addr.clone(),
                code: "incomplete".into(),
                message: "the draft stream ended before its stats".into(),
            });
        }
        Ok(reply)
    }

    async fn release(&self, id: String) -> Result<(), EngineError> {
        let req = pb::ReleaseRequest { session_id: id };
        unary(&self.addr, &self.client, req, true, |mut c, r| async move {
            c.release(r).await
        })
        .await?;
        Ok(())
    }
}

/// A verifier behind gRPC.
#[derive(Debug, Clone)]
pub struct RemoteVerifier {
    addr: String,
    client: VerifierClient<Channel>,
}

impl RemoteVerifier {
    /// A client of the verifier at `addr` (connects on first use).
    pub fn new(addr: &str) -> Result<Self, EngineError> {
        Ok(Self {
            addr: addr.to_string(),
            client: VerifierClient::new(role_channel(addr)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// The verifier's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The raw client (info, status).
    pub fn client(&self) -> VerifierClient<Channel> {
        self.client.clone()
    }
}

#[async_trait]
impl VerifierRole for RemoteVerifier {
    async fn open(
        &self,
        spec: SessionSpec,
        with_draft: bool,
        committed: Vec<i64>,
    ) -> Result<VerifierInfo, EngineError> {
        let req = pb::VerifierOpenRequest {
            spec: Some(spec_pb(&spec)?),
            with_draft,
            committed: ids(&committed)?,
        };
        let r = unary(&self.addr, &self.client, req, true, |mut c, r| async move {
            c.open(r).await
        })
        .await?;
        let condition = match r.condition {
            Some(c) => {
                Some(condition_in("condition", Some(c)).map_err(|s| engine_error(&self.addr, &s))?)
            }
            None => None,
        };
        let i = r.info.unwrap_or_default();
        let g = grid_in(i.grid);
        Ok(VerifierInfo {
            rows: g.rows,
            cols: g.cols,
            vocab: i.vocab as usize,
            draft_model: i.draft_model,
            condition,
        })
    }

    async fn verify(
        &self,
        session: SessionRef,
        commit: Vec<i64>,
        proposals: Vec<i64>,
        pool_k: usize,
    ) -> Result<VerifyReply, EngineError> {
        let req = pb::VerifyRequest {
            session: Some(ref_out(&session)),
            commit: ids(&commit)?,
            proposals: ids(&proposals)?,
            pool_k: u32::try_from(pool_k).unwrap_or(u32::MAX),
        };
        let r = unary(
            &self.addr,
            &self.client,
            req,
            false,
            |mut c, r| async move { c.verify(r).await },
        )
        .await?;
        Ok(VerifyReply {
            mass: r.mass,
            refreshed: r.refreshed as usize,
            seconds: r.seconds,
        })
    }

    async fn resample(
        &self,
        session: SessionRef,
        plan: IslandPlan,
    ) -> Result<ResampleReply, EngineError> {
        let req = pb::ResampleRequest {
            session: Some(ref_out(&session)),
            islands: plan
                .islands
                .into_iter()
                .map(|p| pb::ResampleIsland {
                    positions: p.into_iter().map(|x| x as u32).collect(),
                })
                .collect(),
            resampler: match plan.resampler {
                Resampler::Sequential => pb::Resampler::Sequential,
                Resampler::Jacobi => pb::Resampler::Jacobi,
            } as i32,
            window: plan.window as u32,
            wavefront: plan.wavefront as u32,
        };
        let r = unary(
            &self.addr,
            &self.client,
            req,
            false,
            |mut c, r| async move { c.resample(r).await },
        )
        .await?;
        Ok(ResampleReply {
            tokens: tokens_in(&r.tokens),
            passes: r.passes as usize,
            seconds: r.seconds,
        })
    }

    async fn commit(&self, session: SessionRef, values: Vec<i64>) -> Result<usize, EngineError> {
        let req = pb::CommitRequest {
            session: Some(ref_out(&session)),
            values: ids(&values)?,
        };
        let r = unary(
            &self.addr,
            &self.client,
            req,
            false,
            |mut c, r| async move { c.commit(r).await },
        )
        .await?;
        Ok(r.refreshed as usize)
    }

    async fn decode(&self, session: SessionRef, count: usize) -> Result<DecodeReply, EngineError> {
        let req = pb::DecodeRequest {
            session: Some(ref_out(&session)),
            count: count as u32,
        };
        let r = unary(
            &self.addr,
            &self.client,
            req,
            false,
            |mut c, r| async move { c.decode(r).await },
        )
        .await?;
        Ok(DecodeReply {
            tokens: tokens_in(&r.tokens),
            passes: r.passes as usize,
            seconds: r.seconds,
        })
    }

    async fn speculate(
        &self,
        session: SessionRef,
        gamma: usize,
        relax: Option<Relaxation>,
    ) -> Result<SpeculateReply, EngineError> {
        let req = pb::SpeculateRequest {
            session: Some(ref_out(&session)),
            gamma: gamma as u32,
            relaxation: relax.map(|r| pb::Relaxation {
                k: u32::try_from(r.k).unwrap_or(u32::MAX),
                delta: r.delta,
            }),
        };
        let r = unary(
            &self.addr,
            &self.client,
            req,
            false,
            |mut c, r| async move { c.speculate(r).await },
        )
        .await?;
        Ok(SpeculateReply {
            tokens: tokens_in(&r.tokens),
            proposed: r.proposed as usize,
            accepted: r.accepted as usize,
            target_passes: r.target_passes as usize,
            draft_passes: r.draft_passes as usize,
            draft_seconds: r.draft_seconds,
            verify_seconds: r.verify_seconds,
        })
    }

    async fn release(&self, id: String) -> Result<(), EngineError> {
        let req = pb::ReleaseRequest { session_id: id };
        unary(&self.addr, &self.client, req, true, |mut c, r| async move {
            c.release(r).await
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn unavailable_is_retried_and_other_errors_are_not() {
        let calls = AtomicU32::new(0);
        let r = retry(|| async {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            if n < 2 {
                Err(tonic::Status::unavailable("down"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // Gives up after ATTEMPTS.
        calls.store(0, Ordering::Relaxed);
        let r: Result<(), _> = retry(|| async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(tonic::Status::unavailable("down"))
        })
        .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(calls.load(Ordering::Relaxed), ATTEMPTS);
        // A refusal is final.
        calls.store(0, Ordering::Relaxed);
        let r: Result<(), _> = retry(|| async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(tonic::Status::invalid_argument("tau"))
        })
        .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
