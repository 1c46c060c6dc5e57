//! The gateway's gRPC service (`mulo.v1.Gateway`): owns each request, runs the engine's one
//! coordinator over gRPC clients of the drafter and verifier replicas, and answers with the image.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mulo_core::metrics as names;
use mulo_core::{Method, SamplingParams};
use mulo_engine::{generate, BlockEvent, Engine, EngineError, GenerateRequest, Outcome};
use mulo_engine::{DrafterRole, TorchWorker, VerifierRole};
use mulo_proto::v1 as pb;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::client::{RemoteDrafter, RemoteVerifier, WIRE_BYTES};
use crate::convert::{
    condition_in, invalid, pack_bits, sampling_in, stats_out, status, tokens_out,
};
use crate::failover::Failover;

/// What the gateway serves: the family's name, grid and sampling defaults.
#[derive(Debug, Clone)]
pub struct FamilyInfo {
    /// Family name.
    pub name: String,
    /// Target grid rows.
    pub rows: usize,
    /// Target grid columns.
    pub cols: usize,
    /// The target's sampling defaults.
    pub sampling: SamplingParams,
    /// "caption" or "class".
    pub condition: String,
    /// Image pixels per token along each side (the VQ's down-sampling factor).
    pub pixels_per_token: usize,
}

impl FamilyInfo {
    /// The image's size in pixels, `(width, height)`.
    pub fn image_size(&self) -> (usize, usize) {
        (
            self.cols * self.pixels_per_token,
            self.rows * self.pixels_per_token,
        )
    }
}

/// How the gateway admits and bounds requests.
#[derive(Debug, Clone)]
pub struct GatewayLimits {
    /// Requests generated at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Times one request may move to another verifier replica.
    pub max_migrations: u32,
    /// A request's deadline when the client sets none or a longer one (DEADLINE_EXCEEDED past it).
    pub request_timeout: std::time::Duration,
    /// Bearer tokens and their limits; `None` admits every caller.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_migrations: 2,
            request_timeout: std::time::Duration::from_secs(600),
            auth: None,
        }
    }
}

/// `mulo.v1.Gateway` (cheap to clone: the state is shared).
#[derive(Debug, Clone)]
pub struct GatewayService(Arc<GatewayState>);

impl std::ops::Deref for GatewayService {
    type Target = GatewayState;
    fn deref(&self) -> &GatewayState {
        &self.0
    }
}

/// The gateway's replicas, admission and family.
pub struct GatewayState {
    family: FamilyInfo,
    drafters: std::sync::RwLock<Vec<RemoteDrafter>>,
    verifiers: Arc<Failover>,
    next: AtomicUsize,
    ids: AtomicU64,
    admission: Arc<Semaphore>,
    max_in_flight: usize,
    request_timeout: std::time::Duration,
    auth: Option<Arc<crate::auth::Auth>>,
    /// A VQ decoder of its own, for the PNG when no drafter answers.
    vq: Option<Arc<TorchWorker<Engine>>>,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState")
            .field("drafters", &self.drafters().len())
            .field("verifiers", &self.verifiers.replicas().len())
            .finish_non_exhaustive()
    }
}

/// A finished generation: its outcome, verifier migrations and bytes exchanged with the roles.
struct Run {
    outcome: Outcome,
    migrations: u32,
    wire: Arc<AtomicU64>,
}

/// A validated request and what the caller wants back.
struct Job {
    /// The client's request id (or the gateway's `gw-N`), echoed in the response.
    request_id: String,
    /// The engine's request; its id (the roles' session id) is the request id plus a random
    /// suffix, so that no caller can name, replace or release another request's sessions.
    req: GenerateRequest,
    /// Time it may take (the client's deadline, at most the gateway's request timeout).
    deadline: std::time::Duration,
    return_tokens: bool,
    skip_png: bool,
}

impl GatewayService {
    /// The shared state (the endpoint re-resolution updates its replica lists).
    pub fn state(&self) -> Arc<GatewayState> {
        Arc::clone(&self.0)
    }

    /// A gateway over the given replicas, admitting and bounding requests by `limits`.
    pub fn new(
        family: FamilyInfo,
        drafters: Vec<RemoteDrafter>,
        verifiers: Vec<RemoteVerifier>,
        limits: GatewayLimits,
        vq: Option<Arc<TorchWorker<Engine>>>,
    ) -> Self {
        let GatewayLimits {
            max_in_flight,
            max_migrations,
            request_timeout,
            auth,
        } = limits;
        metrics::gauge!(names::REQUESTS_IN_FLIGHT_LIMIT).set(max_in_flight.max(1) as f64);
        metrics::gauge!(names::REQUESTS_IN_FLIGHT).set(0.0);
        // The series alerts divide by or rate(), at 0 from the start: the first failure of a kind
        // is then an increase, not a new series.
        for reason in names::FALLBACK_REASONS {
            metrics::counter!(names::FALLBACKS, "reason" => *reason).increment(0);
        }
        for reason in names::MIGRATION_REASONS {
            metrics::counter!(names::MIGRATIONS, "reason" => *reason).increment(0);
        }
        for method in ["ar", "sd", "lantern", "mulo"] {
            for outcome in ["ok", "unavailable", "internal", "resource_exhausted"] {
                metrics::counter!(names::REQUESTS, "method" => method, "outcome" => outcome)
                    .increment(0);
            }
        }
        Self(Arc::new(GatewayState {
            family,
            drafters: std::sync::RwLock::new(drafters),
            verifiers: Arc::new(Failover::new(verifiers, max_migrations)),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            admission: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_in_flight: max_in_flight.max(1),
            request_timeout,
            auth,
            vq,
        }))
    }
}

impl GatewayState {
    /// The drafter replicas now.
    fn drafters(&self) -> Vec<RemoteDrafter> {
        self.drafters.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Replaces the drafter and verifier lists with freshly resolved addresses (channels of the
    /// replicas still listed are kept; requests in flight finish where they are).
    pub fn set_endpoints(
        &self,
        drafters: &[String],
        verifiers: &[String],
    ) -> Result<bool, EngineError> {
        // Both new lists are built before either is swapped in: a refusal changes nothing.
        let mut list = self
            .drafters
            .write()
            .map_err(|_| EngineError::Precondition("drafter list poisoned".into()))?;
        let next = crate::client::relist(&list, drafters, RemoteDrafter::addr, RemoteDrafter::new)?;
        let mut changed = self.verifiers.set_replicas(verifiers)?;
        if let Some(next) = next {
            *list = next;
            changed = true;
        }
        Ok(changed)
    }

    /// Addresses of the drafter and verifier replicas now.
    pub fn endpoints(&self) -> (Vec<String>, Vec<String>) {
        (
            self.drafters()
                .iter()
                .map(|d| d.addr().to_string())
                .collect(),
            self.verifiers
                .replicas()
                .iter()
                .map(|v| v.addr().to_string())
                .collect(),
        )
    }

    fn job(&self, req: Request<pb::GenerateRequest>) -> Result<Job, Status> {
        let deadline = crate::convert::deadline_in(req.metadata(), self.request_timeout)?;
        let r = req.into_inner();
        let id = if r.request_id.is_empty() {
            format!("gw-{}", self.ids.fetch_add(1, Ordering::Relaxed))
        } else {
            if r.request_id.len() > 128
                || !r
                    .request_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(invalid(
                    "request_id",
                    "at most 128 characters of [A-Za-z0-9._-]",
                ));
            }
            r.request_id
        };
        let method = if r.method.trim().is_empty() {
            Method::parse("mulo")
        } else {
            Method::parse(r.method.trim())
        }
        .map_err(|e| invalid("method", e))?;
        let sampling = sampling_in("sampling", r.sampling, self.family.sampling)?;
        let condition = condition_in("condition", r.condition)?;
        Ok(Job {
            req: GenerateRequest {
                id: format!("{id}.{:016x}", rand::random::<u64>()),
                condition,
                sampling,
                seed: r.seed,
                method,
            },
            request_id: id,
            deadline,
            return_tokens: r.return_tokens,
            skip_png: r.skip_png,
        })
    }

    /// Runs one request on a verifier replica (moving it when one is lost) and a drafter
    /// (round-robin); returns the outcome and the verifier migrations.
    async fn run(
        &self,
        req: &GenerateRequest,
        on_event: &mut (dyn FnMut(&BlockEvent) + Send),
    ) -> Result<Run, Status> {
        if self.verifiers.replicas().is_empty() {
            return Err(Status::unavailable("the gateway has no verifier"));
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let drafters = self.drafters();
        let drafter = (!drafters.is_empty()).then(|| drafters[turn % drafters.len()].clone());
        // Dropped before the generation ends (client cancel, deadline): free both sessions now
        // rather than at the roles' idle TTL.
        let mut guard = ReleaseOnDrop {
            id: req.id.clone(),
            drafter: drafter.clone(),
            verifier: self.verifiers.clone(),
            armed: true,
        };
        let d: Option<&dyn DrafterRole> = drafter.as_ref().map(|d| d as &dyn DrafterRole);
        let wire = Arc::new(AtomicU64::new(0));
        let out = WIRE_BYTES
            .scope(
                wire.clone(),
                generate(d, self.verifiers.as_ref(), req, on_event),
            )
            .await;
        guard.armed = false;
        let migrations = self.verifiers.take_migrations(&req.id);
        out.map(|outcome| Run {
            outcome,
            migrations,
            wire,
        })
        .map_err(|e| status(&e))
    }

    /// Generates a job and its response (the PNG included) within the job's deadline.
    async fn serve_job(
        &self,
        job: &Job,
        on_event: &mut (dyn FnMut(&BlockEvent) + Send),
    ) -> Result<pb::GenerateResponse, Status> {
        let work = async {
            let out = self.run(&job.req, on_event).await?;
            self.response(job, out).await
        };
        tokio::time::timeout(job.deadline, work)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the request ran past its deadline of {:.3} s",
                    job.deadline.as_secs_f64()
                ))
            })?
    }

    /// The family the gateway serves.
    pub fn family(&self) -> &FamilyInfo {
        &self.family
    }

    /// PNG bytes of a grid: a drafter decodes it, else the gateway's own VQ.
    pub(crate) async fn png(&self, tokens: &[i64]) -> Result<Vec<u8>, Status> {
        let ids = tokens_out(tokens)?;
        let mut last = None;
        for d in &self.drafters() {
            let req = pb::DecodeImageRequest {
                tokens: ids.clone(),
            };
            crate::client::count_bytes(d.addr(), true, &req);
            match crate::client::retry(|| {
                let (mut c, req) = (d.client(), req.clone());
                async move { c.decode_image(crate::client::traced(req)).await }
            })
            .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    crate::client::count_bytes(d.addr(), false, &r);
                    return Ok(r.png);
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(vq) = &self.vq {
            let tokens = tokens.to_vec();
            return vq
                .call(move |e: &mut Engine| -> Result<Vec<u8>, EngineError> {
                    let image = e.decode_tensor(&tokens)?;
                    Ok(mulo_model::image_io::png_bytes(&image.squeeze_dim(0))?)
                })
                .await
                .map_err(|e| status(&e))?
                .map_err(|e| status(&e));
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no drafter to decode the image")))
    }

    async fn response(&self, job: &Job, run: Run) -> Result<pb::GenerateResponse, Status> {
        let Run {
            outcome: out,
            migrations,
            wire,
        } = run;
        let png = if job.skip_png {
            Vec::new()
        } else {
            WIRE_BYTES
                .scope(wire.clone(), self.png(&out.tokens))
                .await?
        };
        let s = out.stats;
        Ok(pb::GenerateResponse {
            request_id: job.request_id.clone(),
            png,
            tokens: if job.return_tokens {
                tokens_out(&out.tokens)?
            } else {
                Vec::new()
            },
            grid: Some(pb::Grid {
                rows: self.family.rows as u32,
                cols: self.family.cols as u32,
            }),
            stats: Some(stats_out(s, migrations, wire.load(Ordering::Relaxed))),
        })
    }

    /// Checks a request as `Generate` does before admitting it (the fuzz target): the engine's
    /// request, or the status it is refused with.
    pub fn validate(&self, req: Request<pb::GenerateRequest>) -> Result<GenerateRequest, Status> {
        self.caller(req.metadata(), false)?;
        self.job(req).map(|j| j.req)
    }

    /// Authenticates, validates and admits a request; a refusal is counted with its code.
    fn accept(&self, req: Request<pb::GenerateRequest>) -> Result<(Job, Admitted), Status> {
        let method = method_label(&req.get_ref().method);
        self.caller(req.metadata(), true)
            .and_then(|caller| {
                let job = self.job(req)?;
                let admitted = self.admit(method, caller)?;
                Ok((job, admitted))
            })
            .inspect_err(|e| count_request(method, outcome(Some(e))))
    }

    /// The caller of a call when the gateway checks tokens (UNAUTHENTICATED, RESOURCE_EXHAUSTED
    /// past its token's limits); `generate` calls also take one of its in-flight slots.
    fn caller(
        &self,
        meta: &tonic::metadata::MetadataMap,
        generate: bool,
    ) -> Result<Option<crate::auth::Caller>, Status> {
        self.auth
            .as_ref()
            .map(|a| a.admit(meta, generate))
            .transpose()
    }

    fn admit(
        &self,
        method: &'static str,
        caller: Option<crate::auth::Caller>,
    ) -> Result<Admitted, Status> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the gateway is running {} requests, its limit",
                self.max_in_flight
            ))
        })?;
        metrics::gauge!(names::REQUESTS_IN_FLIGHT).increment(1.0);
        Ok(Admitted {
            _permit: permit,
            caller,
            since: Instant::now(),
            method,
            outcome: "cancelled",
        })
    }
}

/// An admitted request: holds its admission permit and the in-flight gauge until dropped, and
/// then counts the request with its outcome (`cancelled` when it was dropped before one was set:
/// the client went away) and its duration.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The token's name and in-flight slot, when the gateway checks tokens.
    caller: Option<crate::auth::Caller>,
    since: Instant,
    method: &'static str,
    outcome: &'static str,
}

impl Admitted {
    fn caller_name(&self) -> &str {
        self.caller.as_ref().map_or("-", |c| c.name.as_str())
    }

    /// Sets the outcome of a finished job and logs it with its caller.
    fn finish<T>(&mut self, job: &Job, r: &Result<T, Status>) {
        self.outcome = outcome(r.as_ref().err());
        tracing::info!(
            id = %job.request_id,
            caller = self.caller_name(),
            seconds = self.since.elapsed().as_secs_f64(),
            outcome = self.outcome,
            "generated"
        );
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        metrics::gauge!(names::REQUESTS_IN_FLIGHT).decrement(1.0);
        count_request(self.method, self.outcome);
        metrics::histogram!(names::REQUEST_DURATION, "method" => self.method)
            .record(self.since.elapsed());
    }
}

/// The `method` label of a request: the decoding method's name, `unknown` when it does not parse.
fn method_label(method: &str) -> &'static str {
    let m = method.trim();
    if m.is_empty() {
        return "mulo";
    }
    Method::parse(m).map_or("unknown", |m| m.name())
}

/// The `outcome` label of a request's result.
fn outcome(err: Option<&Status>) -> &'static str {
    err.map_or("ok", |s| names::outcome(s.code() as i32))
}

/// Counts a request (a refused one directly, an admitted one when it is dropped).
fn count_request(method: &'static str, outcome: &'static str) {
    metrics::counter!(names::REQUESTS, "method" => method, "outcome" => outcome).increment(1);
}

/// Releases a request's sessions when its generation is dropped half-way.
struct ReleaseOnDrop {
    id: String,
    drafter: Option<RemoteDrafter>,
    verifier: Arc<Failover>,
    armed: bool,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (id, drafter, verifier) = (self.id.clone(), self.drafter.take(), self.verifier.clone());
        verifier.take_migrations(&id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            tracing::info!(%id, "request ended early: releasing its sessions");
            rt.spawn(async move {
                let _ = verifier.release(id.clone()).await;
                if let Some(d) = drafter {
                    let _ = d.release(id).await;
                }
            });
        }
    }
}

fn block_out(e: &BlockEvent) -> Result<pb::BlockEvent, Status> {
    Ok(pb::BlockEvent {
        start: e.start as u32,
        committed: e.committed as u32,
        total: e.total as u32,
        tokens: tokens_out(&e.tokens)?,
        accepted: pack_bits(&e.accepted),
        resampled: pack_bits(&e.resampled),
        target_passes: e.target_passes as u32,
    })
}

type EventStream = ReceiverStream<Result<pb::GenerateEvent, Status>>;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (job, mut admitted) = self.accept(req)?;
        let out = self.serve_job(&job, &mut |_| {}).await;
        admitted.finish(&job, &out);
        out.map(Response::new)
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (job, mut admitted) = self.accept(req)?;
        // Bounded: one event per block of the grid, plus the result.
        let (tx, rx) = mpsc::channel(self.family.rows * self.family.cols + 2);
        let me = Arc::clone(&self.0);
        tokio::spawn(
            async move {
                let events = tx.clone();
                let mut on_event = move |e: &BlockEvent| {
                    let ev = block_out(e).map(|b| pb::GenerateEvent {
                        kind: Some(pb::generate_event::Kind::Block(b)),
                    });
                    let _ = events.try_send(ev);
                };
                let gone = tx.clone();
                let result = tokio::select! {
                    r = me.serve_job(&job, &mut on_event) => r,
                    // The client cancelled: dropping the generation releases its sessions.
                    () = gone.closed() => return,
                };
                admitted.finish(&job, &result);
                let result = result.map(|r| pb::GenerateEvent {
                    kind: Some(pb::generate_event::Kind::Done(r)),
                });
                let _ = tx.send(result).await;
                drop(admitted);
            }
            .in_current_span(),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.caller(req.metadata(), false)?;
        let default = Method::parse("mulo").map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListModelsResponse {
            family: self.family.name.clone(),
            grid: Some(pb::Grid {
                rows: self.family.rows as u32,
                cols: self.family.cols as u32,
            }),
            methods: ["ar", "sd", "lantern", "mulo"].map(String::from).to_vec(),
            default_method: default.to_string(),
            condition: self.family.condition.clone(),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.caller(req.metadata(), false)?;
        let in_flight = self.max_in_flight - self.admission.available_permits();
        Ok(Response::new(pb::StatusResponse {
            live_sessions: in_flight as u32,
            max_sessions: self.max_in_flight as u32,
            in_flight: in_flight as u32,
            draining: crate::DRAINING.load(Ordering::Relaxed),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family() -> FamilyInfo {
        FamilyInfo {
            name: "t".into(),
            rows: 2,
            cols: 2,
            sampling: SamplingParams::default(),
            condition: "class".into(),
            pixels_per_token: 4,
        }
    }

    #[tokio::test]
    async fn re_resolved_endpoints_replace_the_replica_lists() {
        let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let gw = GatewayService::new(
            family(),
            vec![RemoteDrafter::new("127.0.0.1:1").unwrap()],
            vec![
                RemoteVerifier::new("127.0.0.1:2").unwrap(),
                RemoteVerifier::new("127.0.0.1:3").unwrap(),
            ],
            GatewayLimits {
                max_in_flight: 4,
                ..Default::default()
            },
            None,
        );
        let st = gw.state();
        assert!(!st
            .set_endpoints(&a(&["127.0.0.1:1"]), &a(&["127.0.0.1:2", "127.0.0.1:3"]))
            .unwrap());
        assert!(st
            .set_endpoints(
                &a(&["127.0.0.1:1", "127.0.0.1:4"]),
                &a(&["127.0.0.1:3", "127.0.0.1:5"])
            )
            .unwrap());
        let now = (
            a(&["127.0.0.1:1", "127.0.0.1:4"]),
            a(&["127.0.0.1:3", "127.0.0.1:5"]),
        );
        assert_eq!(st.endpoints(), now);
        // An address no channel can be made for: refused, and neither list changes.
        assert!(st
            .set_endpoints(&a(&["not an address"]), &a(&["127.0.0.1:6"]))
            .is_err());
        assert_eq!(st.endpoints(), now);
    }
}
