//! The verifier role's compute (DESIGN §2.2 steps 3, 5, 6 and §2.4): the target model with a KV
//! pool whose rows each session leases; verifying a block of proposals (processed `p` and pooled scores), executing
//! a resample plan with parallel islands, committing with the KV refresh merged into the next
//! forward, plain AR decoding, and the SD / LANTERN baselines with the small draft model.
//!
//! Everything here runs on the process's torch thread. Each call is an op (see
//! [`crate::batching`]): its forwards are batched with the other sessions' by [`VerifierCore::round`];
//! the synchronous methods run one op to its end.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use mulo_core::limits::MAX_LANTERN_K;
use mulo_core::spec::{lantern_accept, nearest_codes, proximity_set, sd_accept, sd_residual};
use mulo_core::{ParamError, SamplingParams};
use mulo_model::sampling::{sample_from_probs, TokenRng};
use mulo_model::{Gpt, KvCache};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tracing::Instrument;

use crate::batching::{
    block_on, hold, run_round, BatchLimits, BatchStats, Forwards, Held, Home, LocalOp, RowPool,
};
use crate::error::EngineError;
use crate::pool_tables::NearestCodes;
use crate::prompt::encode_prompt;
use crate::resample::{draw, IslandPlan, JacobiFault};
use crate::session::{check_ref, condition_for, Fw, SessionRef, SessionSpec, SessionTable, Stream};
use mulo_core::caption::CaptionTokenizer;

/// Reply of a verify call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReply {
    /// Pooled mass `Σ_{v ∈ B_k(x̃_i)} p_i(v)` of every proposal.
    pub mass: Vec<f32>,
    /// Committed tokens re-fed in the same forward (the merged KV refresh).
    pub refreshed: usize,
    /// Seconds of compute.
    pub seconds: f64,
}

/// Reply of a resample call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResampleReply {
    /// The pending block's values after resampling, in raster order.
    pub tokens: Vec<i64>,
    /// Target forward passes spent.
    pub passes: usize,
    /// Seconds of compute.
    pub seconds: f64,
}

/// Reply of an AR decode call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeReply {
    /// The new tokens (now committed).
    pub tokens: Vec<i64>,
    /// Target forward passes spent.
    pub passes: usize,
    /// Seconds of compute.
    pub seconds: f64,
}

/// Relaxed acceptance of the LANTERN baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Relaxation {
    /// Neighbours considered per draft token.
    pub k: usize,
    /// Latent distance bound of the proximity set.
    pub delta: f64,
}

/// Reply of one SD / LANTERN cycle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeculateReply {
    /// Tokens committed by this cycle (accepted drafts, then a correction or a bonus token).
    pub tokens: Vec<i64>,
    /// Draft tokens proposed.
    pub proposed: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
    /// Target forward passes (1).
    pub target_passes: usize,
    /// Draft-model forward passes.
    pub draft_passes: usize,
    /// Seconds in the draft model.
    pub draft_seconds: f64,
    /// Seconds in the target.
    pub verify_seconds: f64,
}

/// What the verifier can do, for the capability handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifierInfo {
    /// Target grid rows.
    pub rows: usize,
    /// Target grid columns.
    pub cols: usize,
    /// Codebook size.
    pub vocab: usize,
    /// Whether a small draft model is loaded (SD and LANTERN).
    pub draft_model: bool,
    /// The caption features a text prompt became (families with a T5 text encoder): the
    /// coordinator opens the drafter with them, so the prompt is encoded once per request.
    #[serde(skip)]
    pub condition: Option<mulo_core::Condition>,
}

struct Session {
    epoch: u64,
    params: SamplingParams,
    rng: TokenRng,
    target: Stream,
    draft: Option<Stream>,
    /// What the last verify read: the pending block's values and the target's processed `p` at
    /// each of its positions (`[block, V]`: 2 MiB for 256 positions of 2048 codes, until the next
    /// verify, the resample or the session's end; not kept past [`MAX_VERIFIED_BYTES`]). A
    /// resample of that very block starts from it (its first pass).
    verified: Option<Verified>,
}

/// The largest verify reading a session keeps: 16 MiB, e.g. 256 positions of a 16384-code
/// LlamaGen vocabulary; a block over it resamples with a first pass of its own.
const MAX_VERIFIED_BYTES: usize = 16 << 20;

/// A verify pass's reading of a pending block (see [`Session::verified`]).
struct Verified {
    committed: usize,
    tokens: Vec<i64>,
    p: Tensor,
}

impl Session {
    /// The last verify's `p` rows (host, `[pending, V]` flat) if the pending block still holds
    /// the values it read.
    fn take_verified(&mut self) -> Result<Option<Vec<f32>>, EngineError> {
        let book = &self.target.book;
        match self.verified.take() {
            Some(v)
                if v.committed == book.committed && v.tokens == book.tokens[book.committed..] =>
            {
                Ok(Some(crate::session::host_rows(&v.p)?))
            }
            _ => Ok(None),
        }
    }
}

/// A verifier call's result, as an op.
pub type Op<R> = LocalOp<Result<R, EngineError>>;

/// Indices of the verifier's models in its batching.
const TARGET: usize = 0;
const DRAFT: usize = 1;

/// The session of call `r` once no other call holds it, checked against the call's epoch and
/// committed length.
async fn checked(entry: Rc<Home<Session>>, r: &SessionRef) -> Result<Held<Session>, EngineError> {
    let held = hold(entry).await;
    check_ref(r, held.epoch, held.target.book.committed)?;
    Ok(held)
}

/// The verifier's models and sessions (lives on the torch thread).
pub struct VerifierCore {
    target: Rc<Gpt>,
    draft: Option<Rc<Gpt>>,
    /// L2-normalised codebook `[V, d]` on the host (pooling tables and LANTERN distances).
    codes: Vec<f32>,
    code_dim: usize,
    /// The `[V, W]` nearest-code table every pool size is a view of (built once, at warm-up).
    nearest: Option<NearestCodes>,
    sessions: Rc<RefCell<SessionTable<Session>>>,
    target_tokenizer: Option<CaptionTokenizer>,
    draft_tokenizer: Option<CaptionTokenizer>,
    text: Option<crate::prompt::PromptEncoder>,
    wrong_residual: bool,
    jacobi_fault: JacobiFault,
    /// Largest verify reading (bytes of `p`) a session keeps for its resample.
    verified_limit: usize,
    forwards: Rc<Forwards>,
    /// KV pools of the target and the draft model.
    kv: Vec<RowPool>,
    limits: BatchLimits,
    stats: BatchStats,
}

impl std::fmt::Debug for VerifierCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierCore")
            .field("sessions", &self.sessions.borrow().len())
            .finish_non_exhaustive()
    }
}

fn probs_row(p: &Tensor, i: i64) -> Result<Vec<f32>, EngineError> {
    Ok(Vec::<f32>::try_from(
        p.get(i).to_kind(Kind::Float).to_device(Device::Cpu),
    )?)
}

impl VerifierCore {
    /// A verifier over `target` (and `draft`, the small high-res model of the SD baselines) with
    /// the VQ codebook `codes` `[V, d]` (L2-normalised here) and room for `max_sessions`.
    pub fn new(
        target: Gpt,
        draft: Option<Gpt>,
        codes: &Tensor,
        max_sessions: usize,
    ) -> Result<Self, EngineError> {
        let v = target.config().vocab_size;
        let s = codes.size();
        if s.len() != 2 || s[0] != v {
            return Err(EngineError::Family(format!(
                "the codebook has shape {s:?}, the target's vocabulary is {v}"
            )));
        }
        if let Some(d) = &draft {
            if d.config().vocab_size != v || d.config().grid != target.config().grid {
                return Err(EngineError::Family(
                    "the draft model's vocabulary or grid differs from the target's".into(),
                ));
            }
        }
        let normed =
            mulo_model::vq::l2_normalize(&codes.to_kind(Kind::Float).to_device(Device::Cpu));
        let capacity = |m: &Gpt| m.config().cls_token_num + m.config().grid.len() as i64;
        // Two rows per session with CFG, and one reopened session's beside its old ones.
        let max_rows = 2 * (max_sessions.max(1) as i64 + 1);
        let mut kv = vec![RowPool::new(&target, 2, max_rows, capacity(&target))?];
        if let Some(d) = &draft {
            kv.push(RowPool::new(d, 2, max_rows, capacity(d))?);
        }
        Ok(Self {
            codes: Vec::<f32>::try_from(normed.reshape([-1]))?,
            code_dim: s[1] as usize,
            target: Rc::new(target),
            draft: draft.map(Rc::new),
            forwards: Rc::default(),
            kv,
            limits: BatchLimits::default(),
            stats: BatchStats::default(),
            nearest: None,
            sessions: Rc::new(RefCell::new(SessionTable::new("verifier", max_sessions))),
            target_tokenizer: None,
            draft_tokenizer: None,
            text: None,
            wrong_residual: false,
            jacobi_fault: JacobiFault::None,
            verified_limit: MAX_VERIFIED_BYTES,
        })
    }

    /// Sets the caption tokenizers of the target and the draft model (text prompts).
    pub fn set_tokenizers(
        &mut self,
        target: Option<CaptionTokenizer>,
        draft: Option<CaptionTokenizer>,
    ) {
        self.target_tokenizer = target;
        self.draft_tokenizer = draft;
    }

    /// Breaks SD on purpose: the correction after a rejection is drawn from `p` instead of the
    /// residual `norm(max(0, p − q))`. Only for the test that shows the losslessness test can
    /// fail; never set in a server.
    #[doc(hidden)]
    pub fn set_wrong_residual_for_tests(&mut self, on: bool) {
        self.wrong_residual = on;
    }

    /// Test hook: the largest verify reading a session keeps (bytes; default 16 MiB). A larger
    /// one is dropped and the resample runs its first pass itself.
    #[doc(hidden)]
    pub fn set_verified_limit_for_tests(&mut self, bytes: usize) {
        self.verified_limit = bytes;
    }

    /// Test hook: a fault in the Jacobi resampler's acceptance rule (its statistical test must
    /// catch it).
    #[doc(hidden)]
    pub fn set_jacobi_fault_for_tests(&mut self, fault: JacobiFault) {
        self.jacobi_fault = fault;
    }

    /// Capabilities.
    pub fn info(&self) -> VerifierInfo {
        let g = self.target.config().grid;
        VerifierInfo {
            rows: g.rows,
            cols: g.cols,
            vocab: self.target.config().vocab_size as usize,
            draft_model: self.draft.is_some(),
            condition: None,
        }
    }

    /// The target model.
    pub fn target(&self) -> &Gpt {
        &self.target
    }

    /// The small draft model of SD / LANTERN, when loaded.
    pub fn draft_model(&self) -> Option<&Gpt> {
        self.draft.as_deref()
    }

    /// Sets how much one batched forward may hold.
    pub fn set_batch_limits(&mut self, limits: BatchLimits) {
        self.limits = limits;
    }

    /// Batched forwards run so far and the sessions they served.
    pub fn batch_stats(&self) -> BatchStats {
        self.stats
    }

    /// Forward requests waiting for a round.
    pub fn waiting(&self) -> usize {
        self.forwards.len()
    }

    /// Runs one scheduler round: the waiting forward requests of the target and of the draft
    /// model, each model's as one batched forward.
    pub fn round(&mut self) {
        let mut models: Vec<(&Gpt, &mut RowPool)> = Vec::with_capacity(2);
        let mut pools = self.kv.iter_mut();
        if let Some(p) = pools.next() {
            models.push((&self.target, p));
        }
        if let (Some(d), Some(p)) = (&self.draft, pools.next()) {
            models.push((d, p));
        }
        let round = run_round(&self.forwards, &mut models, self.limits);
        self.stats = self.stats.plus(round);
    }

    /// Grows the KV pools to hold `sessions` sessions with CFG (two rows each) and returns the
    /// rows of the target's pool.
    pub fn reserve_sessions(&mut self, sessions: usize) -> Result<i64, EngineError> {
        for pool in &mut self.kv {
            pool.reserve(2 * sessions as i64)?;
        }
        Ok(self.kv[TARGET].cache.batch())
    }

    /// Runs `op` to its end, running this role's rounds while it waits. Only for a role no other
    /// op runs on (tests, tools): an op of the engine's holding the same session would never be
    /// polled here.
    fn block<R>(&mut self, op: Op<R>) -> Result<R, EngineError> {
        block_on(op, || self.round())
    }

    fn fw(&self, index: usize) -> Result<Fw, EngineError> {
        let model = match index {
            TARGET => self.target.clone(),
            _ => self
                .draft
                .clone()
                .ok_or_else(|| EngineError::Unsupported("no small draft model loaded".into()))?,
        };
        Ok(Fw {
            model,
            index,
            queue: self.forwards.clone(),
        })
    }

    /// Rows of the (target's) KV pool: one per sequence, two per session with CFG.
    pub fn kv_rows(&self) -> i64 {
        self.kv[TARGET].cache.batch()
    }

    /// Sessions it holds at most.
    pub fn session_limit(&self) -> usize {
        self.sessions.borrow().limit()
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Builds the nearest-code table now, so that no request pays for it (warm-up).
    pub fn warm_up_nearest_codes(&mut self) -> Result<(), EngineError> {
        self.nearest_codes().map(|_| ())
    }

    /// Nearest-code tables held: 1 once built (every pool size is a view of it), else 0.
    pub fn pool_tables(&self) -> usize {
        usize::from(self.nearest.is_some())
    }

    /// The nearest-code table, built on first use.
    fn nearest_codes(&mut self) -> Result<NearestCodes, EngineError> {
        if let Some(t) = &self.nearest {
            return Ok(t.clone());
        }
        let v = self.target.config().vocab_size as usize;
        let width = crate::pool_tables::WIDTH.min(v);
        let host = nearest_codes(&self.codes, self.code_dim, width);
        let t = NearestCodes::new(host, width, self.target.device());
        metrics::gauge!(mulo_core::metrics::POOL_TABLES).set(1.0);
        metrics::gauge!(mulo_core::metrics::POOL_TABLE_BYTES).set(t.bytes() as f64);
        self.nearest = Some(t.clone());
        Ok(t)
    }

    /// The `[V, k]` nearest-code table of pool size `k` (checked against its bound as `field`;
    /// `k` larger than the codebook means the whole codebook: the pooled mass is 1).
    fn pool(&mut self, field: &'static str, k: usize) -> Result<Tensor, EngineError> {
        let t = self.nearest_codes()?;
        let k = t.columns(field, k)?;
        Ok(t.device(k))
    }

    /// The target's [`TargetNll`] of a finished grid (a text prompt goes through the target's
    /// tokenizer, as for a session), with the pools of `pool_k` nearest codes.
    pub fn score_target(
        &mut self,
        cond: &mulo_core::Condition,
        tokens: &[i64],
        params: &SamplingParams,
        pool_k: usize,
    ) -> Result<crate::score::TargetNll, EngineError> {
        let pools = self.pool("pool_k", pool_k)?;
        let cfg = self.target.config();
        let grid = mulo_core::TokenGrid::new(cfg.grid, tokens.to_vec(), cfg.vocab_size as usize)?;
        let cond = encode_prompt(cond, self.text.as_mut())?.0;
        let cond = condition_for(&cond, self.target_tokenizer.as_ref());
        crate::score::target_nll(&self.target, &cond, &grid, params, &pools)
    }

    /// Opens (or re-opens at a new epoch) a session: prefills the condition on the target and,
    /// when `with_draft`, on the draft model. `committed` tokens (a migrated session) are
    /// committed and re-fed by the next call.
    pub fn open(
        &mut self,
        spec: &SessionSpec,
        with_draft: bool,
        committed: &[i64],
    ) -> Result<VerifierInfo, EngineError> {
        let op = self.open_op(spec.clone(), with_draft, committed.to_vec())?;
        self.block(op)
    }

    /// [`Self::open`] as an op.
    pub fn open_op(
        &mut self,
        spec: SessionSpec,
        with_draft: bool,
        committed: Vec<i64>,
    ) -> Result<Op<VerifierInfo>, EngineError> {
        spec.sampling.validate()?;
        self.sessions.borrow().check_room(&spec.id)?;
        if with_draft && self.draft.is_none() {
            return Err(EngineError::Unsupported(
                "this verifier has no small draft model (SD and LANTERN need one)".into(),
            ));
        }
        let n = self.target.config().grid.len();
        let v = self.target.config().vocab_size;
        if committed.len() > n || committed.iter().any(|&t| t < 0 || t >= v) {
            return Err(
                ParamError::new("committed", format!("at most {n} token ids in [0, {v})")).into(),
            );
        }
        let cfg = spec.sampling.uses_cfg();
        let (condition, encoded) = encode_prompt(&spec.condition, self.text.as_mut())?;
        let cond = self.target.condition(
            &condition_for(&condition, self.target_tokenizer.as_ref()),
            cfg,
        )?;
        let target_rows = self.kv[TARGET].lease(cond.batch() as usize)?;
        let draft = match (&self.draft, with_draft) {
            (Some(d), true) => {
                let c = d.condition(
                    &condition_for(&condition, self.draft_tokenizer.as_ref()),
                    cfg,
                )?;
                let rows = self.kv[DRAFT].lease(c.batch() as usize)?;
                Some((self.fw(DRAFT)?, rows, c))
            }
            _ => None,
        };
        let row_bytes = |p: &RowPool| p.bytes() / p.cache.batch().max(1);
        let kv = row_bytes(&self.kv[TARGET]) * cond.batch()
            + draft
                .as_ref()
                .map_or(0, |(_, _, c)| row_bytes(&self.kv[DRAFT]) * c.batch());
        let target_fw = self.fw(TARGET)?;
        let info = VerifierInfo {
            condition: encoded,
            ..self.info()
        };
        let sessions = self.sessions.clone();
        let alive = Rc::new(Cell::new(true));
        let params = spec.sampling;
        let work = async move {
            let mut target =
                Stream::open(target_fw, target_rows, alive.clone(), cond, &params).await?;
            target.book.tokens = committed.clone();
            target.book.committed = committed.len();
            let draft = match draft {
                Some((fw, rows, c)) => {
                    let mut s = Stream::open(fw, rows, alive.clone(), c, &params).await?;
                    s.book.tokens = committed.clone();
                    s.book.committed = committed.len();
                    Some(s)
                }
                None => None,
            };
            let session = Session {
                epoch: spec.epoch,
                params,
                rng: TokenRng::new(spec.seed),
                target,
                draft,
                verified: None,
            };
            sessions.borrow_mut().insert(&spec.id, session, alive, kv)?;
            Ok(info)
        };
        Ok(Box::pin(work.in_current_span()))
    }

    /// Gives the verifier a family's text encoder: text prompts then become caption features here.
    pub fn set_text_encoder(&mut self, encoder: Option<crate::prompt::PromptEncoder>) {
        self.text = encoder;
    }

    /// The text encoder, if the family has one.
    pub fn text_encoder(&self) -> Option<&crate::prompt::PromptEncoder> {
        self.text.as_ref()
    }

    /// Frees a session (unknown ids are fine: release is idempotent). A call of it still
    /// waiting for a forward is answered `UnknownSession` at the next round.
    pub fn release(&mut self, id: &str) -> bool {
        self.sessions.borrow_mut().release(id)
    }

    /// Frees sessions idle for longer than `ttl`; returns how many.
    pub fn expire(&mut self, ttl: std::time::Duration) -> usize {
        self.sessions.borrow_mut().expire(ttl)
    }

    fn session(&self, id: &str) -> Result<Rc<Home<Session>>, EngineError> {
        self.sessions.borrow_mut().get(id)
    }

    /// Commits the pending block (`commit`: its final values, empty when nothing is pending) and
    /// scores `proposals` for the next positions in one target forward (the refresh of stale
    /// committed slots rides along). `pool_k` picks the nearest-code table.
    pub fn verify(
        &mut self,
        r: &SessionRef,
        commit: &[i64],
        proposals: &[i64],
        pool_k: usize,
    ) -> Result<VerifyReply, EngineError> {
        let op = self.verify_op(r.clone(), commit.to_vec(), proposals.to_vec(), pool_k)?;
        self.block(op)
    }

    /// [`Self::verify`] as an op.
    pub fn verify_op(
        &mut self,
        r: SessionRef,
        commit: Vec<i64>,
        proposals: Vec<i64>,
        pool_k: usize,
    ) -> Result<Op<VerifyReply>, EngineError> {
        let v = self.target.config().vocab_size;
        let n = self.target.config().grid.len();
        let pool = self.pool("pool_k", pool_k)?;
        let entry = self.session(&r.id)?;
        let limit = self.verified_limit;
        let work = async move {
            let start = Instant::now();
            let mut held = checked(entry, &r).await?;
            let s = &mut *held;
            let book = &mut s.target.book;
            if !commit.is_empty() || book.pending() > 0 {
                book.commit(&commit)?;
            }
            let first = book.committed;
            if proposals.is_empty() || first + proposals.len() > n {
                return Err(ParamError::new(
                    "proposals",
                    format!(
                        "{} proposals after {first} committed tokens do not fit the {n}-token grid",
                        proposals.len()
                    ),
                )
                .into());
            }
            if proposals.iter().any(|&t| t < 0 || t >= v) {
                return Err(
                    ParamError::new("proposals", format!("token ids must be in [0, {v})")).into(),
                );
            }
            book.tokens.extend_from_slice(&proposals);
            book.forget_from(first);
            let queries: Vec<usize> = (first..first + proposals.len()).collect();
            let extra: Vec<usize> = (first..first + proposals.len() - 1).collect();
            let (p, refreshed) = s.target.query(&s.params, &extra, &queries, None).await?;
            let idx =
                pool.index_select(0, &Tensor::from_slice(&proposals).to_device(pool.device()));
            let mass = p
                .gather(1, &idx, false)
                .sum_dim_intlist(1, false, Kind::Float);
            let bytes = p.numel() * std::mem::size_of::<f32>();
            s.verified = (bytes <= limit).then(|| Verified {
                committed: first,
                tokens: proposals,
                p,
            });
            Ok(VerifyReply {
                mass: Vec::<f32>::try_from(mass.to_device(Device::Cpu))?,
                refreshed,
                seconds: start.elapsed().as_secs_f64(),
            })
        };
        Ok(Box::pin(work.instrument(tracing::info_span!("verify"))))
    }

    /// Executes a resample plan on the pending block: its islands, resampled sequentially (one
    /// position per island per pass, drawn from processed `p`) or in parallel Jacobi passes (see
    /// [`crate::resample`]).
    pub fn resample(
        &mut self,
        r: &SessionRef,
        plan: &IslandPlan,
    ) -> Result<ResampleReply, EngineError> {
        let op = self.resample_op(r.clone(), plan.clone())?;
        self.block(op)
    }

    /// [`Self::resample`] as an op: one pass per round.
    pub fn resample_op(
        &mut self,
        r: SessionRef,
        plan: IslandPlan,
    ) -> Result<Op<ResampleReply>, EngineError> {
        let entry = self.session(&r.id)?;
        let vocab = self.target.config().vocab_size as usize;
        let cols = self.target.config().grid.cols;
        let fault = self.jacobi_fault;
        let work = async move {
            let start = Instant::now();
            let mut held = checked(entry, &r).await?;
            let s = &mut *held;
            let (lo, hi) = (s.target.book.committed, s.target.book.tokens.len());
            let plan = plan.checked(lo, hi)?;
            let first_pass = s.take_verified()?;
            let before = s.target.passes;
            let pass = crate::resample::Pass {
                params: &s.params,
                vocab,
                cols,
                fault,
                verified: first_pass.as_deref(),
            };
            crate::resample::run(&mut s.target, &mut s.rng, &plan, pass).await?;
            Ok(ResampleReply {
                tokens: s.target.book.tokens[lo..].to_vec(),
                // Resampling grid position 0 reads the prefill's logits: no pass of its own.
                passes: s.target.passes - before,
                seconds: start.elapsed().as_secs_f64(),
            })
        };
        Ok(Box::pin(work.instrument(tracing::info_span!("resample"))))
    }

    /// Commits the pending block without scoring anything new and re-feeds every stale slot of
    /// the committed prefix, the last token included: the cache then equals a fresh prefill of
    /// the committed tokens. (A generation's last block needs no commit; this is for migration
    /// and checks.) Returns the slots re-fed.
    pub fn commit(&mut self, r: &SessionRef, values: &[i64]) -> Result<usize, EngineError> {
        let op = self.commit_op(r.clone(), values.to_vec())?;
        self.block(op)
    }

    /// [`Self::commit`] as an op.
    pub fn commit_op(&mut self, r: SessionRef, values: Vec<i64>) -> Result<Op<usize>, EngineError> {
        let entry = self.session(&r.id)?;
        let work = async move {
            let mut held = checked(entry, &r).await?;
            let s = &mut *held;
            s.target.book.commit(&values)?;
            let from = s.target.book.refresh_start();
            let all: Vec<usize> = (from..s.target.book.committed).collect();
            if let Some(&last) = all.last() {
                let _ = s.target.feed(&s.params, &all, &[last], None).await?;
                s.target.book.refreshed();
            }
            Ok(all.len())
        };
        Ok(Box::pin(work.instrument(tracing::info_span!("commit"))))
    }

    /// Decodes `count` tokens autoregressively after the committed prefix (AR method and the
    /// fallback when no drafter answers); they are committed. `progress` hears the committed
    /// length after every token.
    pub fn decode(
        &mut self,
        r: &SessionRef,
        count: usize,
        progress: Box<dyn FnMut(usize)>,
    ) -> Result<DecodeReply, EngineError> {
        let op = self.decode_op(r.clone(), count, progress)?;
        self.block(op)
    }

    /// [`Self::decode`] as an op: one token per round, so that it batches with every other
    /// session's work and a release stops it within one step.
    pub fn decode_op(
        &mut self,
        r: SessionRef,
        count: usize,
        mut progress: Box<dyn FnMut(usize)>,
    ) -> Result<Op<DecodeReply>, EngineError> {
        let n = self.target.config().grid.len();
        let entry = self.session(&r.id)?;
        let work = async move {
            let start = Instant::now();
            let mut held = checked(entry, &r).await?;
            let s = &mut *held;
            if s.target.book.pending() > 0 {
                return Err(EngineError::Precondition(
                    "a block is pending: commit it before decoding".into(),
                ));
            }
            let first = s.target.book.committed;
            if first + count > n {
                return Err(ParamError::new(
                    "count",
                    format!("{count} tokens after {first} overflow the {n}-token grid"),
                )
                .into());
            }
            let mut out = Vec::with_capacity(count);
            let before = s.target.passes;
            for i in 0..count {
                let q = first + i;
                let (p, _) = s.target.query(&s.params, &[], &[q], None).await?;
                let t = i64::try_from(sample_from_probs(&p, &[s.rng.next_uniform()]).get(0))?;
                s.target.book.tokens.push(t);
                s.target.book.committed += 1;
                out.push(t);
                progress(q + 1);
            }
            Ok(DecodeReply {
                tokens: out,
                // Position 0 reads the prefill's logits: no forward of its own.
                passes: s.target.passes - before,
                seconds: start.elapsed().as_secs_f64(),
            })
        };
        Ok(Box::pin(work.instrument(tracing::info_span!("decode"))))
    }

    /// One SD cycle (LANTERN with `relax`): the draft model proposes up to `gamma` tokens, one
    /// target forward scores them, acceptance `min(1, p/q)` (relaxed: `p` of the proximity set),
    /// a correction from the residual at the first rejection, or a bonus token when all pass.
    pub fn speculate(
        &mut self,
        r: &SessionRef,
        gamma: usize,
        relax: Option<Relaxation>,
    ) -> Result<SpeculateReply, EngineError> {
        let op = self.speculate_op(r.clone(), gamma, relax)?;
        self.block(op)
    }

    /// [`Self::speculate`] as an op.
    pub fn speculate_op(
        &mut self,
        r: SessionRef,
        gamma: usize,
        relax: Option<Relaxation>,
    ) -> Result<Op<SpeculateReply>, EngineError> {
        mulo_core::limits::in_range("gamma", gamma, mulo_core::limits::MAX_GAMMA)?;
        if let Some(x) = relax {
            mulo_core::limits::in_range("k", x.k, MAX_LANTERN_K)?;
        }
        if self.draft.is_none() {
            return Err(EngineError::Unsupported(
                "no small draft model loaded".into(),
            ));
        }
        // LANTERN's k counts candidates; a codebook smaller than k offers all of its codes.
        let v = self.target.config().vocab_size as usize;
        let table = match relax {
            Some(_) => Some(self.nearest_codes()?),
            None => None,
        };
        let relax = relax.map(|x| Relaxation { k: x.k.min(v), ..x });
        let n = self.target.config().grid.len();
        let wrong_residual = self.wrong_residual;
        let entry = self.session(&r.id)?;
        let work = async move {
            let mut held = checked(entry, &r).await?;
            let s = &mut *held;
            let Session {
                params,
                rng,
                target,
                draft,
                ..
            } = s;
            let ds = draft.as_mut().ok_or_else(|| {
                EngineError::Precondition("the session was opened without the draft model".into())
            })?;
            let first = target.book.committed;
            if first >= n {
                return Err(EngineError::Precondition("the grid is complete".into()));
            }
            let g = gamma.min(n - first);
            let (target_before, draft_before) = (target.passes, ds.passes);
            // Draft g tokens with the small model.
            let t0 = Instant::now();
            let (drafts, qs) = draft_tokens(ds, params, rng, first, g).await?;
            let draft_seconds = t0.elapsed().as_secs_f64();
            // Score them (and the bonus position) in one target pass.
            let t1 = Instant::now();
            let book = &mut target.book;
            book.tokens.extend_from_slice(&drafts);
            book.forget_from(first);
            let bonus = first + g < n;
            let queries: Vec<usize> = (first..first + g + usize::from(bonus)).collect();
            let extra: Vec<usize> = (first..first + g - usize::from(!bonus)).collect();
            let (p, _) = target.query(params, &extra, &queries, None).await?;
            let p_host = Vec::<f32>::try_from(p.to_device(Device::Cpu).reshape([-1]))?;
            let accept = Acceptance {
                p: &p_host,
                v,
                qs: &qs,
                relax: relax.zip(table.as_ref()),
                wrong_residual,
            };
            let (out, accepted) = accept.run(&drafts, bonus, rng);
            // Commit on both models; their slots past the first changed value are stale.
            for book in [&mut target.book, &mut ds.book] {
                book.tokens.truncate(first);
                book.tokens.extend_from_slice(&out);
                book.committed = book.tokens.len();
                book.forget_from(book.committed);
            }
            Ok(SpeculateReply {
                proposed: g,
                accepted,
                tokens: out,
                target_passes: target.passes - target_before,
                draft_passes: ds.passes - draft_before,
                draft_seconds,
                verify_seconds: t1.elapsed().as_secs_f64(),
            })
        };
        Ok(Box::pin(work.instrument(tracing::info_span!("speculate"))))
    }

    /// The session's target KV cache rows, copied (for checks against a fresh prefill); `None`
    /// while a call holds the session.
    pub fn cache(&self, id: &str) -> Option<KvCache> {
        let s = self.sessions.borrow().peek(id).ok()?;
        let rows = s.peek(|s| s.target.lease.rows.clone())?;
        Some(self.kv[TARGET].cache.extract_rows(&rows))
    }

    /// The session's committed tokens.
    pub fn committed(&self, id: &str) -> Option<Vec<i64>> {
        let s = self.sessions.borrow().peek(id).ok()?;
        s.peek(|s| s.target.book.tokens[..s.target.book.committed].to_vec())
    }
}

/// Drafts `g` tokens after `first` with the small model, one per forward; returns them and their
/// processed draft probabilities `q` (host rows).
async fn draft_tokens(
    ds: &mut Stream,
    params: &SamplingParams,
    rng: &mut TokenRng,
    first: usize,
    g: usize,
) -> Result<(Vec<i64>, Vec<Vec<f32>>), EngineError> {
    let mut qs: Vec<Vec<f32>> = Vec::with_capacity(g);
    let mut drafts = Vec::with_capacity(g);
    for i in 0..g {
        let (q, _) = ds.query(params, &[], &[first + i], None).await?;
        let t = i64::try_from(sample_from_probs(&q, &[rng.next_uniform()]).get(0))?;
        qs.push(probs_row(&q, 0)?);
        ds.book.tokens.push(t);
        ds.book.committed += 1;
        drafts.push(t);
    }
    Ok((drafts, qs))
}

/// SD / LANTERN acceptance of one cycle's drafts against the target's `p` (host, `[g(+1), V]`).
struct Acceptance<'a> {
    p: &'a [f32],
    v: usize,
    qs: &'a [Vec<f32>],
    /// LANTERN's relaxation with the nearest-code table.
    relax: Option<(Relaxation, &'a NearestCodes)>,
    wrong_residual: bool,
}

impl Acceptance<'_> {
    fn row(&self, i: usize) -> &[f32] {
        &self.p[i * self.v..(i + 1) * self.v]
    }

    /// The committed tokens (accepted drafts, then a correction from the residual at the first
    /// rejection, or a bonus token when all pass) and how many drafts were accepted.
    fn run(&self, drafts: &[i64], bonus: bool, rng: &mut TokenRng) -> (Vec<i64>, usize) {
        let g = drafts.len();
        let mut out = Vec::with_capacity(g + 1);
        for (i, &d) in drafts.iter().enumerate() {
            let x = d as usize;
            let u = rng.next_uniform().min(1.0 - f64::EPSILON);
            let (ok, set) = match &self.relax {
                Some((rx, table)) => {
                    let near = table.row(x, rx.k);
                    let set = proximity_set(near, self.row(i), rx.delta);
                    (lantern_accept(self.row(i), &self.qs[i], x, &set, u), set)
                }
                None => (sd_accept(self.row(i), &self.qs[i], x, u), Vec::new()),
            };
            if ok {
                out.push(d);
                continue;
            }
            // Correction from the residual; LANTERN zeroes q on the proximity set first.
            let mut q = self.qs[i].clone();
            for &a in &set {
                if let Some(e) = q.get_mut(a as usize) {
                    *e = 0.0;
                }
            }
            let residual = if self.wrong_residual {
                self.row(i).to_vec()
            } else {
                sd_residual(self.row(i), &q)
            };
            out.push(draw(&residual, rng.next_uniform()));
            return (out, i);
        }
        if bonus {
            out.push(draw(self.row(g), rng.next_uniform()));
        }
        (out, g)
    }
}
