//! The verifier's gRPC service (`mulo.v1.Verifier`) over the in-process role on the torch thread.

use std::time::Instant;

use mulo_core::method::Resampler;
use mulo_engine::resample::IslandPlan;
use mulo_engine::verifier::{Relaxation, VerifierInfo};
use mulo_engine::{Engine, EngineError, Local, VerifierRole};
use mulo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::convert::{
    condition_out, count_in, invalid, list_in, param, ref_in, spec_in, status, tokens_out,
};
use mulo_core::limits::{
    at_most, MAX_GAMMA, MAX_JACOBI_WINDOW, MAX_LANTERN_K, MAX_POOL_K, MAX_TOKENS, MAX_WAVEFRONT,
};

/// `mulo.v1.Verifier` served from this process's torch thread.
#[derive(Debug, Clone)]
pub struct VerifierService {
    base: crate::role_base::RoleBase,
}

impl VerifierService {
    /// The service over `local` (whose engine holds a verifier).
    pub async fn new(local: Local, max_sessions: usize) -> Result<Self, EngineError> {
        Ok(Self {
            base: crate::role_base::RoleBase::new(local, max_sessions).await?,
        })
    }

    /// Arms the test-only fault hook (`--test-panic-after-calls`): the `n`th verify call panics
    /// the torch thread.
    pub fn panic_after(mut self, n: Option<u64>) -> Self {
        self.base.panic_after(n);
        self
    }

    fn info_out(&self, i: &VerifierInfo) -> pb::VerifierInfoResponse {
        pb::VerifierInfoResponse {
            grid: Some(pb::Grid {
                rows: i.rows as u32,
                cols: i.cols as u32,
            }),
            vocab: i.vocab as u32,
            draft_model: i.draft_model,
            codebook_hash: self.base.codebook_hash.clone(),
            max_sessions: self.base.max_sessions as u32,
        }
    }
}

#[tonic::async_trait]
impl pb::verifier_server::Verifier for VerifierService {
    async fn info(
        &self,
        _req: Request<pb::VerifierInfoRequest>,
    ) -> Result<Response<pb::VerifierInfoResponse>, Status> {
        let info = self
            .base
            .local
            .worker()
            .call(|e: &mut Engine| e.verifier.as_ref().map(|v| v.info()))
            .await
            .map_err(|e| status(&e))?
            .ok_or_else(|| Status::unimplemented("this process runs no verifier"))?;
        Ok(Response::new(self.info_out(&info)))
    }

    async fn open(
        &self,
        req: Request<pb::VerifierOpenRequest>,
    ) -> Result<Response<pb::VerifierOpenResponse>, Status> {
        let r = req.into_inner();
        let spec = spec_in(r.spec)?;
        let t = Instant::now();
        let info = VerifierRole::open(
            &self.base.local,
            spec,
            r.with_draft,
            list_in("committed", &r.committed)?,
        )
        .await
        .map_err(|e| status(&e))?;
        let condition = info.condition.as_ref().map(condition_out).transpose()?;
        Ok(Response::new(pb::VerifierOpenResponse {
            info: Some(self.info_out(&info)),
            seconds: t.elapsed().as_secs_f64(),
            condition,
        }))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = req.into_inner();
        let session = ref_in(r.session)?;
        if r.proposals.is_empty() {
            return Err(invalid("proposals", "at least one proposal"));
        }
        let pool_k = count_in("pool_k", r.pool_k, MAX_POOL_K)?;
        self.base.fault_hook();
        let reply = self
            .base
            .local
            .verify(
                session,
                list_in("commit", &r.commit)?,
                list_in("proposals", &r.proposals)?,
                pool_k,
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::VerifyResponse {
            mass: reply.mass,
            refreshed: reply.refreshed as u32,
            seconds: reply.seconds,
        }))
    }

    async fn resample(
        &self,
        req: Request<pb::ResampleRequest>,
    ) -> Result<Response<pb::ResampleResponse>, Status> {
        let r = req.into_inner();
        let session = ref_in(r.session)?;
        let positions: usize = r.islands.iter().map(|p| p.positions.len()).sum();
        at_most("islands", r.islands.len(), MAX_TOKENS).map_err(param)?;
        at_most("positions", positions, MAX_TOKENS).map_err(param)?;
        at_most("window", r.window as usize, MAX_JACOBI_WINDOW).map_err(param)?;
        at_most("wavefront", r.wavefront as usize, MAX_WAVEFRONT).map_err(param)?;
        if positions == 0 {
            return Err(Status::invalid_argument(
                "islands: the plan resamples no position (a gateway older than the verifier?)",
            ));
        }
        let resampler = match pb::Resampler::try_from(r.resampler) {
            Ok(pb::Resampler::Sequential) => Resampler::Sequential,
            Ok(pb::Resampler::Jacobi) => Resampler::Jacobi,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "resampler: unknown value {}",
                    r.resampler
                )))
            }
        };
        let islands: Vec<Vec<usize>> = r
            .islands
            .into_iter()
            .map(|p| p.positions.into_iter().map(|x| x as usize).collect())
            .collect();
        let plan = IslandPlan {
            islands,
            resampler,
            window: r.window as usize,
            wavefront: r.wavefront as usize,
        };
        let reply = self
            .base
            .local
            .resample(session, plan)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ResampleResponse {
            tokens: tokens_out(&reply.tokens)?,
            passes: reply.passes as u32,
            seconds: reply.seconds,
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let r = req.into_inner();
        let session = ref_in(r.session)?;
        let t = Instant::now();
        let refreshed = self
            .base
            .local
            .commit(session, list_in("values", &r.values)?)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::CommitResponse {
            refreshed: refreshed as u32,
            seconds: t.elapsed().as_secs_f64(),
        }))
    }

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let r = req.into_inner();
        let session = ref_in(r.session)?;
        let count = count_in("count", r.count, MAX_TOKENS)?;
        let reply = self
            .base
            .local
            .decode(session, count)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DecodeResponse {
            tokens: tokens_out(&reply.tokens)?,
            passes: reply.passes as u32,
            seconds: reply.seconds,
        }))
    }

    async fn speculate(
        &self,
        req: Request<pb::SpeculateRequest>,
    ) -> Result<Response<pb::SpeculateResponse>, Status> {
        let r = req.into_inner();
        let session = ref_in(r.session)?;
        let gamma = count_in("gamma", r.gamma, MAX_GAMMA)?;
        let relax = match r.relaxation {
            Some(x) => {
                let k = count_in("relaxation.k", x.k, MAX_LANTERN_K)?;
                if !(0.0..=1.0).contains(&x.delta) {
                    return Err(invalid("relaxation.delta", "must be in [0, 1]"));
                }
                Some(Relaxation { k, delta: x.delta })
            }
            None => None,
        };
        let reply = self
            .base
            .local
            .speculate(session, gamma, relax)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SpeculateResponse {
            tokens: tokens_out(&reply.tokens)?,
            proposed: reply.proposed as u32,
            accepted: reply.accepted as u32,
            target_passes: reply.target_passes as u32,
            draft_passes: reply.draft_passes as u32,
            draft_seconds: reply.draft_seconds,
            verify_seconds: reply.verify_seconds,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        crate::role_base::release_session(&self.base.local, req.into_inner().session_id, false)
            .await
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        crate::role_base::role_status(&self.base.local, self.base.max_sessions, false).await
    }
}
