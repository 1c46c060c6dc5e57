//! The drafter's gRPC service (`mulo.v1.Drafter`) over the in-process role on the torch thread.

use std::pin::Pin;
use std::time::Instant;

use mulo_core::GridSize;
use mulo_engine::drafter::DrafterInfo;
use mulo_engine::{DrafterRole, Engine, EngineError, Local};
use mulo_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert::{count_in, list_in, param, ref_in, spec_in, status, tokens_out};
use mulo_core::limits::{at_most, MAX_BLOCK_ROWS, MAX_ZIPAR_WINDOW};

/// `mulo.v1.Drafter` served from this process's torch thread.
#[derive(Debug, Clone)]
pub struct DrafterService {
    base: crate::role_base::RoleBase,
}

fn grid(g: GridSize) -> pb::Grid {
    pb::Grid {
        rows: g.rows as u32,
        cols: g.cols as u32,
    }
}

impl DrafterService {
    /// The service over `local` (whose engine holds a drafter).
    pub async fn new(local: Local, max_sessions: usize) -> Result<Self, EngineError> {
        Ok(Self {
            base: crate::role_base::RoleBase::new(local, max_sessions).await?,
        })
    }

    /// Arms the test-only fault hook (`--test-panic-after-calls`): the `n`th draft call panics
    /// the torch thread.
    pub fn panic_after(mut self, n: Option<u64>) -> Self {
        self.base.panic_after(n);
        self
    }

    fn info_out(&self, i: &DrafterInfo) -> pb::DrafterInfoResponse {
        pb::DrafterInfoResponse {
            low: Some(grid(i.low)),
            high: Some(grid(i.high)),
            scale: i.scale as u32,
            vocab: i.vocab as u32,
            codebook_hash: self.base.codebook_hash.clone(),
            max_sessions: self.base.max_sessions as u32,
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DraftChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::drafter_server::Drafter for DrafterService {
    async fn info(
        &self,
        _req: Request<pb::DrafterInfoRequest>,
    ) -> Result<Response<pb::DrafterInfoResponse>, Status> {
        let info = self
            .base
            .local
            .worker()
            .call(|e: &mut Engine| e.drafter.as_ref().map(|d| d.info()))
            .await
            .map_err(|e| status(&e))?
            .ok_or_else(|| Status::unimplemented("this process runs no drafter"))?;
        Ok(Response::new(self.info_out(&info)))
    }

    async fn open(
        &self,
        req: Request<pb::DrafterOpenRequest>,
    ) -> Result<Response<pb::DrafterOpenResponse>, Status> {
        let r = req.into_inner();
        let spec = spec_in(r.spec)?;
        let t = Instant::now();
        let info = DrafterRole::open(&self.base.local, spec, list_in("committed", &r.committed)?)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DrafterOpenResponse {
            info: Some(self.info_out(&info)),
            seconds: t.elapsed().as_secs_f64(),
        }))
    }

    type DraftStream = ChunkStream;

    async fn draft(
        &self,
        req: Request<pb::DraftRequest>,
    ) -> Result<Response<Self::DraftStream>, Status> {
        let r = req.into_inner();
        let session = ref_in(r.session)?;
        let rows = count_in("rows", r.rows, MAX_BLOCK_ROWS)?;
        self.base.fault_hook();
        at_most("zipar_window", r.zipar_window as usize, MAX_ZIPAR_WINDOW).map_err(param)?;
        let reply = self
            .base
            .local
            .draft(
                session,
                list_in("realign", &r.realign)?,
                rows,
                r.zipar_window as usize,
            )
            .await
            .map_err(|e| status(&e))?;
        // One message per drafted low-res row, then the stats. (The rows of a block are sent when
        // the block is drafted: the gateway verifies whole blocks.)
        let (low_w, high_w) = (reply.low.len() / rows, reply.high.len() / rows);
        let first_low_row = reply.first_row as u32;
        let mut chunks = Vec::with_capacity(rows + 1);
        for i in 0..rows {
            chunks.push(Ok(pb::DraftChunk {
                kind: Some(pb::draft_chunk::Kind::Row(pb::DraftRow {
                    low_row: first_low_row + i as u32,
                    low: tokens_out(&reply.low[i * low_w..(i + 1) * low_w])?,
                    high: tokens_out(&reply.high[i * high_w..(i + 1) * high_w])?,
                })),
            }));
        }
        chunks.push(Ok(pb::DraftChunk {
            kind: Some(pb::draft_chunk::Kind::Stats(pb::DraftStats {
                passes: reply.passes as u32,
                realigned: reply.realigned as u32,
                draft_seconds: reply.draft_seconds,
                upsample_seconds: reply.upsample_seconds,
                realign_seconds: reply.realign_seconds,
            })),
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn decode_image(
        &self,
        req: Request<pb::DecodeImageRequest>,
    ) -> Result<Response<pb::DecodeImageResponse>, Status> {
        let tokens = list_in("tokens", &req.into_inner().tokens)?;
        let t = Instant::now();
        let png = self
            .base
            .local
            .worker()
            .call(move |e: &mut Engine| -> Result<Vec<u8>, EngineError> {
                let vocab = e
                    .drafter
                    .as_ref()
                    .map(|d| d.info())
                    .ok_or_else(|| EngineError::Unsupported("no drafter".into()))?;
                if tokens.len() != vocab.high.len() {
                    return Err(mulo_core::ParamError::new(
                        "tokens",
                        format!("{} tokens, the grid has {}", tokens.len(), vocab.high.len()),
                    )
                    .into());
                }
                if let Some(bad) = tokens.iter().find(|&&t| t >= vocab.vocab as i64) {
                    return Err(mulo_core::ParamError::new(
                        "tokens",
                        format!("id {bad} is outside the codebook of {}", vocab.vocab),
                    )
                    .into());
                }
                let image = e.decode_tensor(&tokens)?;
                Ok(mulo_model::image_io::png_bytes(&image.squeeze_dim(0))?)
            })
            .await
            .map_err(|e| status(&e))?
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DecodeImageResponse {
            png,
            seconds: t.elapsed().as_secs_f64(),
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        crate::role_base::release_session(&self.base.local, req.into_inner().session_id, true).await
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        crate::role_base::role_status(&self.base.local, self.base.max_sessions, true).await
    }
}
