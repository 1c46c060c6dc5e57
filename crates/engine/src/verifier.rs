//! The verifier role's compute (DESIGN §2.2 steps 3, 5, 6 and §2.4): the target model with a KV
//! cache per session; verifying a block of proposals (processed `p` and pooled scores), executing
//! a resample plan with parallel islands, committing with the KV refresh merged into the next
//! forward, plain AR decoding, and the SD / LANTERN baselines with the small draft model.
//!
//! Everything here runs on the process's torch thread.

use std::collections::HashMap;
use std::time::Instant;

use mulo_core::spec::{lantern_accept, nearest_codes, proximity_set, sd_accept, sd_residual};
use mulo_core::{ParamError, SamplingParams};
use mulo_model::sampling::{sample_from_probs, TokenRng};
use mulo_model::{Gpt, KvCache};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::EngineError;
use crate::prompt::encode_prompt;
use crate::session::{check_ref, condition_for, SessionRef, SessionSpec, SessionTable, Stream};
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
}

/// The session `r` names, checked against its epoch and committed length, marked as used.
fn session<'a>(
    sessions: &'a mut SessionTable<Session>,
    r: &SessionRef,
) -> Result<&'a mut Session, EngineError> {
    let s = sessions.get_mut(&r.id)?;
    check_ref(r, s.epoch, s.target.book.committed)?;
    Ok(s)
}

/// The verifier's models and sessions (lives on the torch thread).
pub struct VerifierCore {
    target: Gpt,
    draft: Option<Gpt>,
    /// L2-normalised codebook `[V, d]` on the host (pooling tables and LANTERN distances).
    codes: Vec<f32>,
    code_dim: usize,
    /// `[V, k]` nearest-code tables by `k`, int64 on the device.
    pools: HashMap<usize, (Vec<u32>, Tensor)>,
    sessions: SessionTable<Session>,
    target_tokenizer: Option<CaptionTokenizer>,
    draft_tokenizer: Option<CaptionTokenizer>,
    text: Option<crate::prompt::PromptEncoder>,
    wrong_residual: bool,
}

impl std::fmt::Debug for VerifierCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierCore")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

fn probs_row(p: &Tensor, i: i64) -> Result<Vec<f32>, EngineError> {
    Ok(Vec::<f32>::try_from(
        p.get(i).to_kind(Kind::Float).to_device(Device::Cpu),
    )?)
}

/// Draws from a host probability vector by inverting its CDF at `u` in (0, 1].
fn draw(probs: &[f32], u: f64) -> i64 {
    let total: f64 = probs.iter().map(|&x| f64::from(x)).sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &x) in probs.iter().enumerate() {
        if x > 0.0 {
            last = i;
            acc += f64::from(x);
            if acc >= target {
                return i as i64;
            }
        }
    }
    last as i64
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
        Ok(Self {
            codes: Vec::<f32>::try_from(normed.reshape([-1]))?,
            code_dim: s[1] as usize,
            target,
            draft,
            pools: HashMap::new(),
            sessions: SessionTable::new("verifier", max_sessions),
            target_tokenizer: None,
            draft_tokenizer: None,
            text: None,
            wrong_residual: false,
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
        self.draft.as_ref()
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The `[V, k]` nearest-code table; `k` larger than the codebook means the whole codebook
    /// (every code is within the pool: the pooled mass is 1), so it is clamped to `V`.
    /// Builds the nearest-code tables of each `k` now, so that the first request using it does
    /// not pay for it (warm-up).
    pub fn warm_up_pools(&mut self, ks: &[usize]) -> Result<(), EngineError> {
        for &k in ks {
            self.pool(k)?;
        }
        Ok(())
    }

    /// Nearest-code tables built so far (each `k`, capped at the vocabulary, counts once).
    pub fn pool_tables(&self) -> usize {
        self.pools.len()
    }

    fn pool(&mut self, k: usize) -> Result<&(Vec<u32>, Tensor), EngineError> {
        let v = self.target.config().vocab_size as usize;
        if k == 0 {
            return Err(ParamError::new("pool_k", format!("must be at least 1, got {k}")).into());
        }
        let k = k.min(v);
        if !self.pools.contains_key(&k) {
            let table = nearest_codes(&self.codes, self.code_dim, k);
            let t: Vec<i64> = table.iter().map(|&x| i64::from(x)).collect();
            let dev = Tensor::from_slice(&t)
                .view([v as i64, k as i64])
                .to_device(self.target.device());
            self.pools.insert(k, (table, dev));
        }
        self.pools
            .get(&k)
            .ok_or_else(|| EngineError::Precondition("pool table".into()))
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
        let pools = self.pool(pool_k)?.1.shallow_clone();
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
        spec.sampling.validate()?;
        self.sessions.check_room(&spec.id)?;
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
        let mut target = Stream::open(&self.target, &cond, &spec.sampling)?;
        target.book.tokens = committed.to_vec();
        target.book.committed = committed.len();
        let draft = match (&self.draft, with_draft) {
            (Some(d), true) => {
                let cond = d.condition(
                    &condition_for(&condition, self.draft_tokenizer.as_ref()),
                    cfg,
                )?;
                let mut s = Stream::open(d, &cond, &spec.sampling)?;
                s.book.tokens = committed.to_vec();
                s.book.committed = committed.len();
                Some(s)
            }
            _ => None,
        };
        let kv = target.cache.bytes() + draft.as_ref().map_or(0, |d| d.cache.bytes());
        self.sessions.insert(
            &spec.id,
            Session {
                epoch: spec.epoch,
                params: spec.sampling,
                rng: TokenRng::new(spec.seed),
                target,
                draft,
            },
            kv,
        );
        Ok(VerifierInfo {
            condition: encoded,
            ..self.info()
        })
    }

    /// Gives the verifier a family's text encoder: text prompts then become caption features here.
    pub fn set_text_encoder(&mut self, encoder: Option<crate::prompt::PromptEncoder>) {
        self.text = encoder;
    }

    /// The text encoder, if the family has one.
    pub fn text_encoder(&self) -> Option<&crate::prompt::PromptEncoder> {
        self.text.as_ref()
    }

    /// Frees a session (unknown ids are fine: release is idempotent).
    pub fn release(&mut self, id: &str) -> bool {
        self.sessions.release(id)
    }

    /// Frees sessions idle for longer than `ttl`; returns how many.
    pub fn expire(&mut self, ttl: std::time::Duration) -> usize {
        self.sessions.expire(ttl)
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
        let _stage = tracing::info_span!("verify").entered();
        let start = Instant::now();
        let v = self.target.config().vocab_size;
        let pool = self.pool(pool_k)?.1.shallow_clone();
        let n = self.target.config().grid.len();
        let Self {
            target, sessions, ..
        } = self;
        let s = session(sessions, r)?;
        let book = &mut s.target.book;
        if !commit.is_empty() || book.pending() > 0 {
            book.commit(commit)?;
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
        book.tokens.extend_from_slice(proposals);
        book.forget_from(first);
        let queries: Vec<usize> = (first..first + proposals.len()).collect();
        let extra: Vec<usize> = (first..first + proposals.len() - 1).collect();
        let (p, refreshed) = s.target.query(target, &s.params, &extra, &queries, None)?;
        let idx = pool.index_select(0, &Tensor::from_slice(proposals).to_device(pool.device()));
        let mass = p
            .gather(1, &idx, false)
            .sum_dim_intlist(1, false, Kind::Float);
        Ok(VerifyReply {
            mass: Vec::<f32>::try_from(mass.to_device(Device::Cpu))?,
            refreshed,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Executes a resample plan on the pending block: `passes[t]` lists the grid positions pass
    /// `t` samples (one per unfinished island). Each pass feeds every query's predecessor and the
    /// positions sampled in the pass before, so every query sees the current values of the
    /// positions before it; tokens come from processed `p`.
    pub fn resample(
        &mut self,
        r: &SessionRef,
        passes: &[Vec<usize>],
    ) -> Result<ResampleReply, EngineError> {
        let _stage = tracing::info_span!("resample").entered();
        let start = Instant::now();
        let Self {
            target, sessions, ..
        } = self;
        let s = session(sessions, r)?;
        let (lo, hi) = (s.target.book.committed, s.target.book.tokens.len());
        let mut seen = std::collections::HashSet::new();
        for p in passes.iter().flatten() {
            if *p < lo || *p >= hi || !seen.insert(*p) {
                return Err(ParamError::new(
                    "plan",
                    format!("positions must be distinct and pending (in {lo}..{hi}), got {p}"),
                )
                .into());
            }
        }
        let mut previous: Vec<usize> = Vec::new();
        let before = s.target.passes;
        for pass in passes {
            let mut queries = pass.clone();
            queries.sort_unstable();
            if queries.is_empty() {
                continue;
            }
            let (p, _) = s
                .target
                .query(target, &s.params, &previous, &queries, None)?;
            let uniforms: Vec<f64> = queries.iter().map(|_| s.rng.next_uniform()).collect();
            let drawn =
                Vec::<i64>::try_from(sample_from_probs(&p, &uniforms).to_device(Device::Cpu))?;
            for (&q, &t) in queries.iter().zip(&drawn) {
                s.target.book.set(q, t);
            }
            previous = queries;
        }
        Ok(ResampleReply {
            tokens: s.target.book.tokens[lo..].to_vec(),
            // Resampling grid position 0 reads the prefill's logits: no pass of its own.
            passes: s.target.passes - before,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Commits the pending block without scoring anything new and re-feeds every stale slot of
    /// the committed prefix, the last token included: the cache then equals a fresh prefill of
    /// the committed tokens. (A generation's last block needs no commit; this is for migration
    /// and checks.) Returns the slots re-fed.
    pub fn commit(&mut self, r: &SessionRef, values: &[i64]) -> Result<usize, EngineError> {
        let _stage = tracing::info_span!("commit").entered();
        let Self {
            target, sessions, ..
        } = self;
        let s = session(sessions, r)?;
        s.target.book.commit(values)?;
        let from = s.target.book.refresh_start();
        let all: Vec<usize> = (from..s.target.book.committed).collect();
        if !all.is_empty() {
            let last = *all.last().unwrap_or(&0);
            let _ = s.target.feed(target, &s.params, &all, &[last], None)?;
            s.target.book.refreshed();
        }
        Ok(all.len())
    }

    /// Decodes `count` tokens autoregressively after the committed prefix (AR method and the
    /// fallback when no drafter answers); they are committed.
    pub fn decode(
        &mut self,
        r: &SessionRef,
        count: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<DecodeReply, EngineError> {
        let _stage = tracing::info_span!("decode").entered();
        let start = Instant::now();
        let n = self.target.config().grid.len();
        let Self {
            target, sessions, ..
        } = self;
        let s = session(sessions, r)?;
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
            let (p, _) = s.target.query(target, &s.params, &[], &[q], None)?;
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
        let _stage = tracing::info_span!("speculate").entered();
        if gamma == 0 {
            return Err(ParamError::new("gamma", "must be at least 1").into());
        }
        // LANTERN's k counts candidates; a codebook smaller than k offers all of its codes.
        let vocab = self.target.config().vocab_size as usize;
        let relax = relax.map(|x| Relaxation {
            k: x.k.min(vocab),
            ..x
        });
        let pool = match relax {
            Some(x) => Some(self.pool(x.k)?.0.clone()),
            None => None,
        };
        let n = self.target.config().grid.len();
        let Self {
            target,
            draft,
            sessions,
            wrong_residual,
            ..
        } = self;
        let draft_model = draft
            .as_ref()
            .ok_or_else(|| EngineError::Unsupported("no small draft model loaded".into()))?;
        let s = session(sessions, r)?;
        let ds = s.draft.as_mut().ok_or_else(|| {
            EngineError::Precondition("the session was opened without the draft model".into())
        })?;
        let first = s.target.book.committed;
        if first >= n {
            return Err(EngineError::Precondition("the grid is complete".into()));
        }
        let g = gamma.min(n - first);
        // Draft g tokens with the small model.
        let t0 = Instant::now();
        let mut qs: Vec<Vec<f32>> = Vec::with_capacity(g);
        let mut drafts = Vec::with_capacity(g);
        let (target_before, draft_before) = (s.target.passes, ds.passes);
        for i in 0..g {
            let (q, _) = ds.query(draft_model, &s.params, &[], &[first + i], None)?;
            let t = i64::try_from(sample_from_probs(&q, &[s.rng.next_uniform()]).get(0))?;
            qs.push(probs_row(&q, 0)?);
            ds.book.tokens.push(t);
            ds.book.committed += 1;
            drafts.push(t);
        }
        let draft_seconds = t0.elapsed().as_secs_f64();
        // Score them (and the bonus position) in one target pass.
        let t1 = Instant::now();
        let book = &mut s.target.book;
        book.tokens.extend_from_slice(&drafts);
        book.forget_from(first);
        let bonus = first + g < n;
        let queries: Vec<usize> = (first..first + g + usize::from(bonus)).collect();
        let extra: Vec<usize> = (first..first + g).collect();
        let extra = if bonus {
            extra
        } else {
            extra[..g - 1].to_vec()
        };
        let (p, _) = s.target.query(target, &s.params, &extra, &queries, None)?;
        let p_host = Vec::<f32>::try_from(p.to_device(Device::Cpu).reshape([-1]))?;
        let v = target.config().vocab_size as usize;
        let row = |i: usize| &p_host[i * v..(i + 1) * v];
        let mut out = Vec::with_capacity(g + 1);
        let mut accepted = 0;
        for i in 0..g {
            let x = drafts[i] as usize;
            let u = s.rng.next_uniform().min(1.0 - f64::EPSILON);
            let (ok, set) = match (&relax, &pool) {
                (Some(rx), Some(table)) => {
                    let k = rx.k;
                    let near = &table[x * k..(x + 1) * k];
                    let set = proximity_set(near, row(i), rx.delta);
                    (lantern_accept(row(i), &qs[i], x, &set, u), set)
                }
                _ => (sd_accept(row(i), &qs[i], x, u), Vec::new()),
            };
            if ok {
                out.push(drafts[i]);
                accepted += 1;
                continue;
            }
            // Correction from the residual; LANTERN zeroes q on the proximity set first.
            let mut q = qs[i].clone();
            for &a in &set {
                if let Some(e) = q.get_mut(a as usize) {
                    *e = 0.0;
                }
            }
            let residual = if *wrong_residual {
                row(i).to_vec()
            } else {
                sd_residual(row(i), &q)
            };
            out.push(draw(&residual, s.rng.next_uniform()));
            break;
        }
        if accepted == g && bonus {
            out.push(draw(row(g), s.rng.next_uniform()));
        }
        // Commit on both models; their slots past the first changed value are stale.
        let book = &mut s.target.book;
        book.tokens.truncate(first);
        book.tokens.extend_from_slice(&out);
        book.committed = book.tokens.len();
        book.forget_from(book.committed);
        let dbook = &mut ds.book;
        dbook.tokens.truncate(first);
        dbook.tokens.extend_from_slice(&out);
        dbook.committed = dbook.tokens.len();
        dbook.forget_from(dbook.committed);
        Ok(SpeculateReply {
            proposed: g,
            accepted,
            tokens: out,
            target_passes: s.target.passes - target_before,
            draft_passes: ds.passes - draft_before,
            draft_seconds,
            verify_seconds: t1.elapsed().as_secs_f64(),
        })
    }

    /// The session's target KV cache (for checks against a fresh prefill).
    pub fn cache(&self, id: &str) -> Option<&KvCache> {
        self.sessions.peek(id).ok().map(|s| &s.target.cache)
    }

    /// The session's committed tokens.
    pub fn committed(&self, id: &str) -> Option<&[i64]> {
        self.sessions
            .peek(id)
            .ok()
            .map(|s| &s.target.book.tokens[..s.target.book.committed])
    }
}
