//! The drafter role's compute (DESIGN §2.2 steps 1, 2 and 7): the low-resolution GPT with a KV
//! pool whose rows each session leases, row-by-row (or ZipAR-style parallel-row) drafting, the up-sampler `U_r`, the
//! down-sampler `D_r` for realignment, and the VQ decoder for the final image.
//!
//! Everything here runs on the process's torch thread. Each call is an op (see
//! [`crate::batching`]): the drafting forwards of several sessions are batched by
//! [`DrafterCore::round`]; the synchronous methods run one op to its end.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use mulo_core::{GridSize, ParamError, SamplingParams};
use mulo_model::sampling::{sample_from_probs, TokenRng};
use mulo_model::{Gpt, Upsampler, VqModel};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use tracing::Instrument;

use crate::batching::{
    block_on, hold, reply_slot, run_round, BatchLimits, BatchStats, Forwards, LocalOp, Reply,
    RowPool,
};
use crate::error::EngineError;
use crate::session::{check_ref, condition_for, Fw, SessionRef, SessionSpec, SessionTable, Stream};
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

/// A drafter call's result, as an op.
pub type Op<R> = LocalOp<Result<R, EngineError>>;

/// The models a draft call uses besides the GPT: the realignment's VQ and the up-sampler run in
/// the round, for every session waiting on them at once.
struct Models {
    upsampler: Upsampler,
    vq: VqModel,
    scale: usize,
    info: DrafterInfo,
    /// Low-res rows waiting for the up-sampler: `(tokens, rows, reply)`.
    upsamples: RefCell<Vec<(Vec<i64>, usize, Reply)>>,
    /// Committed high-res rows waiting for `D_r`: `(tokens, rows, reply)`.
    realigns: RefCell<Vec<(Vec<i64>, usize, Reply)>>,
    /// Up-sampler passes and the sessions they served.
    upsample_stats: Cell<BatchStats>,
}

/// The drafter's models and sessions (lives on the torch thread).
pub struct DrafterCore {
    drafter: Rc<Gpt>,
    models: Rc<Models>,
    sessions: Rc<RefCell<SessionTable<Session>>>,
    tokenizer: Option<CaptionTokenizer>,
    forwards: Rc<Forwards>,
    kv: RowPool,
    limits: BatchLimits,
    stats: BatchStats,
}

impl std::fmt::Debug for DrafterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrafterCore")
            .field("sessions", &self.sessions.borrow().len())
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
        let low = drafter.config().grid;
        let info = DrafterInfo {
            low,
            high: GridSize {
                rows: low.rows * scale,
                cols: low.cols * scale,
            },
            scale,
            vocab: v as usize,
        };
        let capacity = drafter.config().cls_token_num + low.len() as i64;
        Ok(Self {
            kv: RowPool::new(&drafter, 2, 2 * (max_sessions.max(1) as i64 + 1), capacity)?,
            drafter: Rc::new(drafter),
            models: Rc::new(Models {
                upsampler,
                vq,
                scale,
                info,
                upsamples: RefCell::default(),
                realigns: RefCell::default(),
                upsample_stats: Cell::default(),
            }),
            sessions: Rc::new(RefCell::new(SessionTable::new("drafter", max_sessions))),
            tokenizer: None,
            forwards: Rc::default(),
            limits: BatchLimits::default(),
            stats: BatchStats::default(),
        })
    }

    /// Sets the drafter's caption tokenizer (text prompts).
    pub fn set_tokenizer(&mut self, tokenizer: Option<CaptionTokenizer>) {
        self.tokenizer = tokenizer;
    }

    /// Sets how much one batched forward may hold.
    pub fn set_batch_limits(&mut self, limits: BatchLimits) {
        self.limits = limits;
    }

    /// Capabilities.
    pub fn info(&self) -> DrafterInfo {
        self.models.info.clone()
    }

    /// The VQ model (final decode).
    pub fn vq(&self) -> &VqModel {
        &self.models.vq
    }

    /// The low-resolution GPT.
    pub fn gpt(&self) -> &Gpt {
        &self.drafter
    }

    /// Rows of the KV pool: one per sequence, two per session with CFG.
    pub fn kv_rows(&self) -> i64 {
        self.kv.cache.batch()
    }

    /// Sessions it holds at most.
    pub fn session_limit(&self) -> usize {
        self.sessions.borrow().limit()
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Batched forwards run so far and the sessions they served.
    pub fn batch_stats(&self) -> BatchStats {
        self.stats
    }

    /// Up-sampler passes so far and the sessions they served.
    pub fn upsample_stats(&self) -> BatchStats {
        self.models.upsample_stats.get()
    }

    /// Forward requests waiting for a round.
    pub fn waiting(&self) -> usize {
        self.forwards.len()
    }

    /// Runs one scheduler round: the waiting drafting forwards as one batched forward.
    pub fn round(&mut self) {
        let round = run_round(
            &self.forwards,
            &mut [(&self.drafter, &mut self.kv)],
            self.limits,
        );
        self.stats = self.stats.plus(round);
        self.models.realign_waiting();
        self.models.upsample_waiting();
    }

    /// Grows the KV pool to hold `sessions` sessions with CFG (two rows each); returns its rows.
    pub fn reserve_sessions(&mut self, sessions: usize) -> Result<i64, EngineError> {
        self.kv.reserve(2 * sessions as i64)?;
        Ok(self.kv.cache.batch())
    }

    fn block<R>(&mut self, op: Op<R>) -> Result<R, EngineError> {
        block_on(op, || self.round())
    }

    /// Opens (or re-opens) a session: prefills the condition on the low-res GPT. `committed`
    /// high-res tokens (whole rows; a migrated or resumed request) are down-sampled and
    /// re-fed by the next draft.
    pub fn open(
        &mut self,
        spec: &SessionSpec,
        committed: &[i64],
    ) -> Result<DrafterInfo, EngineError> {
        let op = self.open_op(spec.clone(), committed.to_vec())?;
        self.block(op)
    }

    /// [`Self::open`] as an op.
    pub fn open_op(
        &mut self,
        spec: SessionSpec,
        committed: Vec<i64>,
    ) -> Result<Op<DrafterInfo>, EngineError> {
        spec.sampling.validate()?;
        self.sessions.borrow().check_room(&spec.id)?;
        let info = self.info();
        let scale = self.models.scale;
        let row = info.high.cols * scale;
        if !committed.len().is_multiple_of(row) || committed.len() > info.high.len() {
            return Err(ParamError::new(
                "committed",
                format!(
                    "whole blocks of {scale} high-res rows of {} tokens",
                    info.high.cols
                ),
            )
            .into());
        }
        let cond = self.drafter.condition(
            &condition_for(&spec.condition, self.tokenizer.as_ref()),
            spec.sampling.uses_cfg(),
        )?;
        let low = if committed.is_empty() {
            Vec::new()
        } else {
            self.models.downsample(&committed, 0)?
        };
        let rows = self.kv.lease(cond.batch() as usize)?;
        let kv = self.kv.bytes() / self.kv.cache.batch().max(1) * cond.batch();
        let fw = Fw {
            model: self.drafter.clone(),
            index: 0,
            queue: self.forwards.clone(),
        };
        let sessions = self.sessions.clone();
        let work = async move {
            let alive = Rc::new(Cell::new(true));
            let mut stream = Stream::open(fw, rows, alive.clone(), cond, &spec.sampling).await?;
            stream.book.committed = low.len();
            stream.book.tokens = low;
            let session = Session {
                epoch: spec.epoch,
                params: spec.sampling,
                rng: TokenRng::new(spec.seed ^ 0x9e37_79b9_7f4a_7c15),
                stream,
                committed_high: committed,
            };
            sessions.borrow_mut().insert(&spec.id, session, alive, kv)?;
            Ok(info)
        };
        Ok(Box::pin(work.in_current_span()))
    }

    /// Frees a session (idempotent).
    pub fn release(&mut self, id: &str) -> bool {
        self.sessions.borrow_mut().release(id)
    }

    /// Frees sessions idle for longer than `ttl`; returns how many.
    pub fn expire(&mut self, ttl: std::time::Duration) -> usize {
        self.sessions.borrow_mut().expire(ttl)
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
        let op = self.draft_op(r.clone(), realign.to_vec(), rows, zipar_window)?;
        self.block(op)
    }

    /// [`Self::draft`] as an op: its drafting forwards batch with other sessions'.
    pub fn draft_op(
        &mut self,
        r: SessionRef,
        realign: Vec<i64>,
        rows: usize,
        zipar_window: usize,
    ) -> Result<Op<DraftReply>, EngineError> {
        let entry = self.sessions.borrow_mut().get(&r.id)?;
        let models = self.models.clone();
        let work = async move {
            let mut held = hold(entry).await;
            let s = &mut *held;
            check_ref(&r, s.epoch, s.committed_high.len())?;
            let t0 = Instant::now();
            let realigned = models
                .realign(s, &realign, rows)
                .instrument(tracing::info_span!("realign", tokens = realign.len()))
                .await?;
            let realign_seconds = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let (first, passes) = draft_rows(s, models.info.low.cols, rows, zipar_window)
                .instrument(tracing::info_span!("draft", rows))
                .await?;
            let draft_seconds = t1.elapsed().as_secs_f64();
            let t2 = Instant::now();
            let high = models
                .upsample(&s.stream.book.tokens, first, rows)
                .instrument(tracing::info_span!("upsample"))
                .await?;
            Ok(DraftReply {
                first_row: first / models.info.low.cols,
                low: s.stream.book.tokens[first..].to_vec(),
                high,
                passes,
                realigned,
                draft_seconds,
                upsample_seconds: t2.elapsed().as_secs_f64(),
                realign_seconds,
            })
        };
        Ok(Box::pin(work.in_current_span()))
    }

    /// Up-samples one low-res row of code 0 and discards it (start-up warm-up).
    pub fn warm_up_upsampler(&self) -> Result<(), EngineError> {
        let w = self.info().low.cols as i64;
        let up = &self.models.upsampler;
        let low = Tensor::zeros([1, 1, w], (Kind::Int64, up.var_store().device()));
        let _ = tch::no_grad(|| up.upsample(&low))?;
        Ok(())
    }

    /// The session's low-res KV cache rows, copied (for checks against a fresh prefill); `None`
    /// while a call holds the session.
    pub fn cache(&self, id: &str) -> Option<mulo_model::KvCache> {
        let s = self.sessions.borrow().peek(id).ok()?;
        let rows = s.peek(|s| s.stream.lease.rows.clone())?;
        Some(self.kv.cache.extract_rows(&rows))
    }

    /// The session's low-res tokens: realigned (committed) rows, then pending drafted rows; and
    /// how many are committed.
    pub fn low_tokens(&self, id: &str) -> Option<(Vec<i64>, usize)> {
        let s = self.sessions.borrow().peek(id).ok()?;
        s.peek(|s| (s.stream.book.tokens.clone(), s.stream.book.committed))
    }
}

impl Models {
    /// `D_r` of `rows` high-res token rows (with `context_rows` of them context) in the next
    /// round, together with every other session's of the same size.
    async fn downsample_in_round(
        &self,
        rows: Vec<i64>,
        context_rows: usize,
    ) -> Result<Vec<i64>, EngineError> {
        let n = rows.len() / self.info.high.cols.max(1);
        let (reply, future) = reply_slot();
        self.realigns.borrow_mut().push((rows, n, reply));
        let low = future.await?;
        let skip = (context_rows / self.scale) as i64;
        let low = low.narrow(0, skip, low.size()[0] - skip);
        Ok(Vec::<i64>::try_from(
            low.reshape([-1]).to_device(Device::Cpu),
        )?)
    }

    /// Runs `D_r` once per size for the realignments waiting: sessions with the same number of
    /// rows are stacked (the VQ is not causal, so only equal sizes share a pass).
    fn realign_waiting(&self) {
        let mut waiting = std::mem::take(&mut *self.realigns.borrow_mut());
        waiting.sort_by_key(|(_, rows, _)| *rows);
        let cols = self.info.high.cols as i64;
        for same in waiting.chunk_by(|a, b| a.1 == b.1) {
            let rows = same[0].1 as i64;
            let flat: Vec<i64> = same
                .iter()
                .flat_map(|(t, _, _)| t.iter().copied())
                .collect();
            let t = Tensor::from_slice(&flat)
                .view([same.len() as i64, rows, cols])
                .to_device(self.vq.var_store().device());
            match self.vq.downsample_tokens(&t, self.scale as i64) {
                Ok(low) => {
                    for (i, (_, _, reply)) in same.iter().enumerate() {
                        *reply.borrow_mut() = Some(Ok(low.get(i as i64)));
                    }
                }
                Err(e) => {
                    for (_, _, reply) in same {
                        *reply.borrow_mut() = Some(Err(EngineError::Internal(e.to_string())));
                    }
                }
            }
        }
    }

    /// Up-samples every waiting session's rows in one pass: their low-res grids padded with
    /// code 0 to the longest (the up-sampler is row-causal, so rows after a session's own do not
    /// change its output); each gets its own `[r·rows, r·w]`.
    fn upsample_waiting(&self) {
        let waiting = std::mem::take(&mut *self.upsamples.borrow_mut());
        if waiting.is_empty() {
            return;
        }
        self.upsample_stats
            .set(self.upsample_stats.get().plus(BatchStats {
                forwards: 1,
                sessions: waiting.len() as u64,
            }));
        let w = self.info.low.cols;
        let longest = waiting.iter().map(|(_, rows, _)| *rows).max().unwrap_or(1);
        let mut grid = vec![0i64; waiting.len() * longest * w];
        for (i, (low, _, _)) in waiting.iter().enumerate() {
            grid[i * longest * w..i * longest * w + low.len()].copy_from_slice(low);
        }
        let low = Tensor::from_slice(&grid)
            .view([waiting.len() as i64, longest as i64, w as i64])
            .to_device(self.upsampler.var_store().device());
        match self.upsampler.upsample(&low) {
            Ok(high) => {
                for (i, (_, rows, reply)) in waiting.into_iter().enumerate() {
                    let mine = high.get(i as i64).narrow(0, 0, (rows * self.scale) as i64);
                    *reply.borrow_mut() = Some(Ok(mine));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, _, reply) in waiting {
                    *reply.borrow_mut() = Some(Err(EngineError::Internal(msg.clone())));
                }
            }
        }
    }

    /// `D_r` of whole committed high-res rows: decodes them with `context_rows` rows of context
    /// above, area down-samples and encodes; the context's low-res rows are dropped.
    fn downsample(&self, rows: &[i64], context_rows: usize) -> Result<Vec<i64>, EngineError> {
        let cols = self.info.high.cols;
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

    /// Checks a draft call and realigns the oldest pending low-res rows with `realign` (D_r of
    /// the committed rows with one low-res row of context above); returns the low-res tokens the
    /// realignment changed. A refused call leaves the session as it was.
    async fn realign(
        &self,
        s: &mut Session,
        realign: &[i64],
        rows: usize,
    ) -> Result<usize, EngineError> {
        let (w, scale) = (self.info.low.cols, self.scale);
        let high_committed = s.committed_high.len();
        let pending = s.stream.book.pending();
        let low_after = high_committed / (scale * scale) + pending;
        if rows == 0 || low_after + rows * w > self.info.low.len() {
            return Err(ParamError::new(
                "rows",
                format!(
                    "{rows} low-res rows after {low_after} tokens overflow the {}-token grid",
                    self.info.low.len()
                ),
            )
            .into());
        }
        // The realigned rows are the oldest pending ones: all of them, or (pipelined drafting)
        // all but the block drafted last, which stays pending until the next call.
        let whole_rows = self.info.high.cols * scale;
        if realign.len() > pending * scale * scale || !realign.len().is_multiple_of(whole_rows) {
            return Err(EngineError::Precondition(format!(
                "realignment of {} high-res tokens, but {} low-res tokens ({} high-res) are pending \
                 (whole low-res rows of {whole_rows} high-res tokens expected)",
                realign.len(),
                pending,
                pending * scale * scale
            )));
        }
        let low = if realign.is_empty() {
            Vec::new()
        } else {
            let row = self.info.high.cols;
            let ctx = (high_committed / row).min(scale);
            let mut rows_in = s.committed_high[high_committed - ctx * row..].to_vec();
            rows_in.extend_from_slice(realign);
            self.downsample_in_round(rows_in, ctx).await?
        };
        let book = &mut s.stream.book;
        let changed = book.tokens[book.committed..]
            .iter()
            .zip(&low)
            .filter(|(a, b)| a != b)
            .count();
        book.commit_first(&low)?;
        s.committed_high.extend_from_slice(realign);
        Ok(changed)
    }

    /// `U_r` of every low-res row up to the block's end (in the next round, with the other
    /// sessions waiting on the up-sampler); the block's high-res rows, raster order.
    async fn upsample(
        &self,
        low: &[i64],
        first: usize,
        rows: usize,
    ) -> Result<Vec<i64>, EngineError> {
        let w = self.info.low.cols;
        let first_row = first / w;
        let end_row = first_row + rows;
        let (reply, future) = reply_slot();
        self.upsamples
            .borrow_mut()
            .push((low[..end_row * w].to_vec(), end_row, reply));
        let high = future.await?;
        let block = high
            .narrow(
                0,
                (first_row * self.scale) as i64,
                (rows * self.scale) as i64,
            )
            .reshape([-1]);
        Ok(Vec::<i64>::try_from(
            block.to_kind(Kind::Int64).to_device(Device::Cpu),
        )?)
    }
}

/// Drafts `rows` low-res rows of width `w` after every pending row, one token per open row per
/// forward (ZipAR with `zipar_window` > 0: row `j+1` opens once row `j` has that many tokens);
/// a block still pending (pipelined) keeps its drafted values, and its slots are re-fed with the
/// first pass where they went stale. Returns the first drafted position and the passes spent.
async fn draft_rows(
    s: &mut Session,
    w: usize,
    rows: usize,
    zipar_window: usize,
) -> Result<(usize, usize), EngineError> {
    let Session {
        stream,
        params,
        rng,
        ..
    } = s;
    let mut previous: Vec<usize> = stream.book.stale_pending();
    let first = stream.book.tokens.len();
    stream.book.forget_from(first);
    let first_row = first / w;
    let mut next_col = vec![0usize; rows];
    let passes_before = stream.passes;
    let window = if zipar_window == 0 {
        usize::MAX
    } else {
        zipar_window
    };
    stream.book.tokens.resize(first + rows * w, -1);
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
        let (p, _) = stream.query(params, &previous, &queries, rows_of).await?;
        let uniforms: Vec<f64> = queries.iter().map(|_| rng.next_uniform()).collect();
        let drawn = Vec::<i64>::try_from(sample_from_probs(&p, &uniforms).to_device(Device::Cpu))?;
        for (&q, &t) in queries.iter().zip(&drawn) {
            stream.book.tokens[q] = t;
            next_col[q / w - first_row] += 1;
        }
        previous = queries;
    }
    // The first token of the grid reads the prefill's logits: no pass of its own.
    Ok((first, stream.passes - passes_before))
}
