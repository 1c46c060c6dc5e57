//! The drafter role's compute (DESIGN §2.2 steps 1, 2 and 7): the low-resolution GPT with a KV
//! cache per session, row-by-row (or ZipAR-style parallel-row) drafting, the up-sampler `U_r`, the
//! down-sampler `D_r` for realignment, and the VQ decoder for the final image.
//!
//! Everything here runs on the process's torch thread.

use std::time::Instant;

use mulo_core::{GridSize, ParamError, SamplingParams};
use mulo_model::sampling::{sample_from_probs, TokenRng};
use mulo_model::{Gpt, Upsampler, VqModel};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::EngineError;
use crate::session::{check_ref, condition_for, SessionRef, SessionSpec, SessionTable, Stream};
use mulo_core::caption::CaptionTokenizer;

/// Reply of a draft call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DraftReply {
    /// Low-res row index of the first drafted row (after every realigned and pending row).
    pub first_row: usize,
    /// Drafted low-res tokens of the block, raster order.
    pub low: Vec<i64>,
    /// High-res proposals of the block (`r·rows` target rows), raster order.
    pub high: Vec<i64>,
    /// Drafter forward passes (the realignment rides in the first).
    pub passes: usize,
    /// Low-res tokens the realignment changed.
    pub realigned: usize,
    /// Seconds drafting.
    pub draft_seconds: f64,
    /// Seconds up-sampling.
    pub upsample_seconds: f64,
    /// Seconds down-sampling the committed rows (realignment).
    pub realign_seconds: f64,
}

/// What the drafter can do, for the capability handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrafterInfo {
    /// Low-res grid.
    pub low: GridSize,
    /// High-res grid its up-sampler produces.
    pub high: GridSize,
    /// Scale `r`.
    pub scale: usize,
    /// Codebook size.
    pub vocab: usize,
}

struct Session {
    epoch: u64,
    params: SamplingParams,
    rng: TokenRng,
    stream: Stream,
    /// High-res tokens the caller has committed (realigned into `book`).
    committed_high: Vec<i64>,
}

/// The drafter's models and sessions (lives on the torch thread).
pub struct DrafterCore {
    drafter: Gpt,
    upsampler: Upsampler,
    vq: VqModel,
    scale: usize,
    sessions: SessionTable<Session>,
    tokenizer: Option<CaptionTokenizer>,
}

impl std::fmt::Debug for DrafterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrafterCore")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl DrafterCore {
    /// A drafter over the low-res GPT, the up-sampler and the VQ model, with room for
    /// `max_sessions`.
    pub fn new(
        drafter: Gpt,
        upsampler: Upsampler,
        vq: VqModel,
        max_sessions: usize,
    ) -> Result<Self, EngineError> {
        let scale = upsampler.config().scale as usize;
        let v = drafter.config().vocab_size;
        if upsampler.config().codebook_size != v || vq.config().codebook_size != v {
            return Err(EngineError::Family(format!(
                "codebook sizes differ: drafter {v}, up-sampler {}, VQ {}",
                upsampler.config().codebook_size,
                vq.config().codebook_size
            )));
        }
        Ok(Self {
            drafter,
            upsampler,
            vq,
            scale,
            sessions: SessionTable::new("drafter", max_sessions),
            tokenizer: None,
        })
    }

    /// Sets the drafter's caption tokenizer (text prompts).
    pub fn set_tokenizer(&mut self, tokenizer: Option<CaptionTokenizer>) {
        self.tokenizer = tokenizer;
    }

    /// Capabilities.
    pub fn info(&self) -> DrafterInfo {
        let low = self.drafter.config().grid;
        DrafterInfo {
            low,
            high: GridSize {
                rows: low.rows * self.scale,
                cols: low.cols * self.scale,
            },
            scale: self.scale,
            vocab: self.drafter.config().vocab_size as usize,
        }
    }

    /// The VQ model (final decode).
    pub fn vq(&self) -> &VqModel {
        &self.vq
    }

    /// The low-resolution GPT.
    pub fn gpt(&self) -> &Gpt {
        &self.drafter
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Opens (or re-opens) a session: prefills the condition on the low-res GPT. `committed`
    /// high-res tokens (whole rows; a migrated or resumed request) are down-sampled and
    /// re-fed by the next draft.
    pub fn open(
        &mut self,
        spec: &SessionSpec,
        committed: &[i64],
    ) -> Result<DrafterInfo, EngineError> {
        spec.sampling.validate()?;
        self.sessions.check_room(&spec.id)?;
        let info = self.info();
        let row = info.high.cols * self.scale;
        if !committed.len().is_multiple_of(row) || committed.len() > info.high.len() {
            return Err(ParamError::new(
                "committed",
                format!(
                    "whole blocks of {} high-res rows of {} tokens",
                    self.scale, info.high.cols
                ),
            )
            .into());
        }
        let cond = self.drafter.condition(
            &condition_for(&spec.condition, self.tokenizer.as_ref()),
            spec.sampling.uses_cfg(),
        )?;
        let mut stream = Stream::open(&self.drafter, &cond, &spec.sampling)?;
        if !committed.is_empty() {
            stream.book.tokens = self.downsample(committed, 0)?;
            stream.book.committed = stream.book.tokens.len();
        }
        let kv = stream.cache.bytes();
        self.sessions.insert(
            &spec.id,
            Session {
                epoch: spec.epoch,
                params: spec.sampling,
                rng: TokenRng::new(spec.seed ^ 0x9e37_79b9_7f4a_7c15),
                stream,
                committed_high: committed.to_vec(),
            },
            kv,
        );
        Ok(info)
    }

    /// Frees a session (idempotent).
    pub fn release(&mut self, id: &str) -> bool {
        self.sessions.release(id)
    }

    /// Frees sessions idle for longer than `ttl`; returns how many.
    pub fn expire(&mut self, ttl: std::time::Duration) -> usize {
        self.sessions.expire(ttl)
    }

    /// `D_r` of whole committed high-res rows starting at high-res row `first_row`: decodes them
    /// with up to `r` rows of context above (from `context`), area down-samples and encodes.
    fn downsample(&self, rows: &[i64], context_rows: usize) -> Result<Vec<i64>, EngineError> {
        let cols = self.info().high.cols;
        let r = self.scale as i64;
        let t = Tensor::from_slice(rows)
            .view([1, -1, cols as i64])
            .to_device(self.vq.var_store().device());
        let low = self.vq.downsample_tokens(&t, r)?;
        let skip = (context_rows / self.scale) as i64;
        let low = low.narrow(1, skip, low.size()[1] - skip);
        Ok(Vec::<i64>::try_from(
            low.reshape([-1]).to_device(Device::Cpu),
        )?)
    }

    /// Realigns the oldest pending low-res rows with the caller's committed high-res rows
    /// (`realign`: every pending row, or with pipelining every row but the block drafted last;
    /// empty when nothing is final yet), drafts `rows` low-res rows after all pending rows and
    /// up-samples them.
    /// `zipar_window` > 0 starts row `j+1` once row `j` has that many tokens and advances every
    /// open row by one token per pass.
    pub fn draft(
        &mut self,
        r: &SessionRef,
        realign: &[i64],
        rows: usize,
        zipar_window: usize,
    ) -> Result<DraftReply, EngineError> {
        let info = self.info();
        let (w, scale) = (info.low.cols, self.scale);
        // Realign: D_r of the committed rows (with one low-res row of context above).
        let t0 = Instant::now();
        let stage = tracing::info_span!("realign", tokens = realign.len()).entered();
        let (high_committed, pending) = {
            let s = self.sessions.peek(&r.id)?;
            check_ref(r, s.epoch, s.committed_high.len())?;
            (s.committed_high.len(), s.stream.book.pending())
        };
        // Checked before anything changes: a refused call leaves the session as it was.
        let low_after = high_committed / (scale * scale) + pending;
        if rows == 0 || low_after + rows * w > info.low.len() {
            return Err(ParamError::new(
                "rows",
                format!(
                    "{rows} low-res rows after {low_after} tokens overflow the {}-token grid",
                    info.low.len()
                ),
            )
            .into());
        }
        // The realigned rows are the oldest pending ones: all of them, or (pipelined drafting)
        // all but the block drafted last, which stays pending until the next call.
        let whole_rows = info.high.cols * scale;
        if realign.len() > pending * scale * scale || !realign.len().is_multiple_of(whole_rows) {
            return Err(EngineError::Precondition(format!(
                "realignment of {} high-res tokens, but {} low-res tokens ({} high-res) are pending \
                 (whole low-res rows of {whole_rows} high-res tokens expected)",
                realign.len(),
                pending,
                pending * scale * scale
            )));
        }
        let realigned_low = if realign.is_empty() {
            Vec::new()
        } else {
            let row = info.high.cols;
            let ctx = (high_committed / row).min(scale);
            let mut rows_in = Vec::with_capacity((ctx * row) + realign.len());
            let committed_high = self.committed_high(&r.id, ctx)?;
            rows_in.extend_from_slice(&committed_high);
            rows_in.extend_from_slice(realign);
            self.downsample(&rows_in, ctx)?
        };
        let realign_seconds = t0.elapsed().as_secs_f64();
        drop(stage);
        let Self {
            drafter,
            upsampler,
            sessions,
            ..
        } = self;
        let s = sessions.get_mut(&r.id)?;
        let before: Vec<i64> = s.stream.book.tokens[s.stream.book.committed..].to_vec();
        let realigned = before
            .iter()
            .zip(&realigned_low)
            .filter(|(a, b)| a != b)
            .count();
        s.stream.book.commit_first(&realigned_low)?;
        s.committed_high.extend_from_slice(realign);
        // A block still pending (pipelined) keeps its drafted values; its slots are re-fed with
        // the first pass where they went stale (the realignment changed a row above them).
        let mut previous: Vec<usize> = s.stream.book.stale_pending();
        let first = s.stream.book.tokens.len();
        // Draft.
        let t1 = Instant::now();
        let stage = tracing::info_span!("draft", rows).entered();
        s.stream.book.forget_from(first);
        let first_row = first / w;
        let mut next_col = vec![0usize; rows];
        let passes_before = s.stream.passes;
        let window = if zipar_window == 0 {
            usize::MAX
        } else {
            zipar_window
        };
        s.stream.book.tokens.resize(first + rows * w, -1);
        while next_col[rows - 1] < w {
            // Open rows: row j+1 opens once row j has `window` tokens (or is done).
            let mut queries = Vec::new();
            for j in 0..rows {
                if next_col[j] >= w {
                    continue;
                }
                if j > 0 && next_col[j - 1] < w && next_col[j - 1] < window {
                    break;
                }
                queries.push((first_row + j) * w + next_col[j]);
                if zipar_window == 0 {
                    break;
                }
            }
            let rows_of = (zipar_window > 0).then_some(w);
            let (p, _) = s
                .stream
                .query(drafter, &s.params, &previous, &queries, rows_of)?;
            let uniforms: Vec<f64> = queries.iter().map(|_| s.rng.next_uniform()).collect();
            let drawn =
                Vec::<i64>::try_from(sample_from_probs(&p, &uniforms).to_device(Device::Cpu))?;
            for (&q, &t) in queries.iter().zip(&drawn) {
                s.stream.book.tokens[q] = t;
                next_col[q / w - first_row] += 1;
            }
            previous = queries;
        }
        // The first token of the grid reads the prefill's logits: no pass of its own.
        let passes = s.stream.passes - passes_before;
        let draft_seconds = t1.elapsed().as_secs_f64();
        drop(stage);
        // Up-sample every low-res row so far; keep the block's high-res rows.
        let t2 = Instant::now();
        let _stage = tracing::info_span!("upsample").entered();
        let end_row = first_row + rows;
        let low_t = Tensor::from_slice(&s.stream.book.tokens[..end_row * w])
            .view([1, end_row as i64, w as i64])
            .to_device(upsampler.var_store().device());
        let high = upsampler.upsample(&low_t)?;
        let hc = info.high.cols as i64;
        let block = high
            .narrow(1, (first_row * scale) as i64, (rows * scale) as i64)
            .reshape([-1]);
        let high = Vec::<i64>::try_from(block.to_kind(Kind::Int64).to_device(Device::Cpu))?;
        debug_assert_eq!(high.len() as i64, (rows * scale) as i64 * hc);
        Ok(DraftReply {
            first_row,
            low: s.stream.book.tokens[first..].to_vec(),
            high,
            passes,
            realigned,
            draft_seconds,
            upsample_seconds: t2.elapsed().as_secs_f64(),
            realign_seconds,
        })
    }

    /// Up-samples one low-res row of code 0 and discards it (start-up warm-up).
    pub fn warm_up_upsampler(&self) -> Result<(), EngineError> {
        let w = self.info().low.cols as i64;
        let low = Tensor::zeros(
            [1, 1, w],
            (Kind::Int64, self.upsampler.var_store().device()),
        );
        let _ = tch::no_grad(|| self.upsampler.upsample(&low))?;
        Ok(())
    }

    /// The session's low-res KV cache (for checks against a fresh prefill).
    pub fn cache(&self, id: &str) -> Option<&mulo_model::KvCache> {
        self.sessions.peek(id).ok().map(|s| &s.stream.cache)
    }

    /// The session's low-res tokens: realigned (committed) rows, then pending drafted rows.
    pub fn low_tokens(&self, id: &str) -> Option<(&[i64], usize)> {
        self.sessions
            .peek(id)
            .ok()
            .map(|s| (s.stream.book.tokens.as_slice(), s.stream.book.committed))
    }

    fn committed_high(&self, id: &str, rows: usize) -> Result<Vec<i64>, EngineError> {
        let s = self.sessions.peek(id)?;
        let row = self.info().high.cols;
        let n = s.committed_high.len();
        Ok(s.committed_high[n - rows * row..].to_vec())
    }
}
