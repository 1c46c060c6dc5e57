//! The drafter and verifier roles as traits (DESIGN §5.1): the coordinator drives a generation
//! through them and never knows whether a role lives in this process ([`Local`], over the torch
//! thread) or behind gRPC (the services' clients implement the same traits).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use mulo_model::{DType, Gpt, TextEncoder, Upsampler, VqModel};
use tch::Device;

use crate::batching::{BatchLimits, LocalOp, Ops};
use crate::drafter::{DraftReply, DrafterCore, DrafterInfo};
use crate::error::EngineError;
use crate::family::{Family, Member};
use crate::prompt::{load_tokenizer, PromptEncoder, TEXT_CACHE_DEFAULT};
use crate::resample::IslandPlan;
use crate::session::{SessionRef, SessionSpec};
use crate::verifier::{
    DecodeReply, Relaxation, ResampleReply, SpeculateReply, VerifierCore, VerifierInfo, VerifyReply,
};
use crate::worker::{Rounds, TorchWorker};

/// The low-resolution side: drafting, up-sampling, realignment.
#[async_trait]
pub trait DrafterRole: Send + Sync {
    /// Opens a session (prefill); `committed` high-res tokens (whole blocks) when resuming.
    async fn open(
        &self,
        spec: SessionSpec,
        committed: Vec<i64>,
    ) -> Result<DrafterInfo, EngineError>;
    /// Realigns the oldest pending rows with `realign` (their committed high-res tokens; with
    /// pipelining the block drafted last stays pending), drafts `rows` low-res rows after every
    /// pending row and up-samples them.
    async fn draft(
        &self,
        session: SessionRef,
        realign: Vec<i64>,
        rows: usize,
        zipar_window: usize,
    ) -> Result<DraftReply, EngineError>;
    /// Frees a session.
    async fn release(&self, id: String) -> Result<(), EngineError>;
}

/// The high-resolution side: the target model's verification, resampling and decoding.
#[async_trait]
pub trait VerifierRole: Send + Sync {
    /// Opens a session (prefill; with the small draft model for SD / LANTERN).
    async fn open(
        &self,
        spec: SessionSpec,
        with_draft: bool,
        committed: Vec<i64>,
    ) -> Result<VerifierInfo, EngineError>;
    /// Commits the pending block as `commit` and scores `proposals` in one forward.
    async fn verify(
        &self,
        session: SessionRef,
        commit: Vec<i64>,
        proposals: Vec<i64>,
        pool_k: usize,
    ) -> Result<VerifyReply, EngineError>;
    /// Runs a resample plan (islands of grid positions, and how) on the pending block.
    async fn resample(
        &self,
        session: SessionRef,
        plan: IslandPlan,
    ) -> Result<ResampleReply, EngineError>;
    /// Commits the pending block and refreshes the cache without scoring anything.
    async fn commit(&self, session: SessionRef, values: Vec<i64>) -> Result<usize, EngineError>;
    /// Decodes `count` tokens autoregressively (committed).
    async fn decode(&self, session: SessionRef, count: usize) -> Result<DecodeReply, EngineError>;
    /// One SD / LANTERN cycle.
    async fn speculate(
        &self,
        session: SessionRef,
        gamma: usize,
        relax: Option<Relaxation>,
    ) -> Result<SpeculateReply, EngineError>;
    /// Frees a session.
    async fn release(&self, id: String) -> Result<(), EngineError>;
}

/// Everything a process holds on its torch thread: the roles it serves and the VQ decoder.
#[derive(Debug, Default)]
pub struct Engine {
    /// The drafter role, when this process drafts.
    pub drafter: Option<DrafterCore>,
    /// The verifier role, when this process verifies.
    pub verifier: Option<VerifierCore>,
    /// The VQ model (final decode, `D_r`).
    pub vq: Option<VqModel>,
    /// Role calls running on the torch thread.
    pub ops: Ops,
    /// Batch limits and the bound of the call queue.
    pub batching: Batching,
}

/// How a process batches role calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// What one batched forward may hold.
    pub limits: BatchLimits,
    /// Role calls running or waiting at most; more are refused (`RESOURCE_EXHAUSTED`).
    pub max_queue: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            limits: BatchLimits::default(),
            max_queue: 256,
        }
    }
}

impl Rounds for Engine {
    fn busy(&self) -> bool {
        !self.ops.is_empty()
    }

    fn round(&mut self) {
        // Ops run on between the roles' passes: a session answered by the verifier can queue its
        // drafter work for this same round (embedded mode), and the other way round next time.
        self.ops.poll_all();
        if let Some(v) = &mut self.verifier {
            v.round();
            self.ops.poll_all();
        }
        if let Some(d) = &mut self.drafter {
            d.round();
        }
        metrics::gauge!(mulo_core::metrics::QUEUE_DEPTH, "role" => self.role_label())
            .set(self.ops.len() as f64);
    }
}

/// A model a process holds, for the capability handshake.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoadedModel {
    /// The config's name, else the role it plays.
    pub id: String,
    /// "gpt" or "vq".
    pub model_type: String,
    /// Token grid (GPT) or 0.
    pub rows: usize,
    /// Token grid (GPT) or 0.
    pub cols: usize,
    /// Vocabulary or codebook size.
    pub vocab: usize,
    /// Activation dtype it runs in: "fp32", "bf16" or "fp16".
    pub dtype: String,
    /// "cpu" or "cuda:N".
    pub device: String,
}

fn kind_name(k: tch::Kind) -> String {
    match k {
        tch::Kind::BFloat16 => "bf16".into(),
        tch::Kind::Half => "fp16".into(),
        tch::Kind::Float => "fp32".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn gpt_info(g: &Gpt, role: &str) -> LoadedModel {
    let c = g.config();
    LoadedModel {
        id: c.name.clone().unwrap_or_else(|| role.to_string()),
        model_type: "gpt".into(),
        rows: c.grid.rows,
        cols: c.grid.cols,
        vocab: c.vocab_size as usize,
        dtype: kind_name(g.kind()),
        device: device_name(g.device()),
    }
}

/// Which roles a process loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleSet {
    /// Load the drafter (low-res GPT, up-sampler, VQ).
    pub drafter: bool,
    /// Load the verifier (target; with `draft_small`, the small draft model too).
    pub verifier: bool,
    /// Load the small high-res draft model of the SD / LANTERN baselines.
    pub draft_small: bool,
}

impl RoleSet {
    /// Every role (embedded mode).
    pub const ALL: RoleSet = RoleSet {
        drafter: true,
        verifier: true,
        draft_small: true,
    };
}

fn load_gpt(dir: &Path, device: Device, dtype: Option<DType>) -> Result<Gpt, EngineError> {
    let mut gpt = Gpt::load(dir, device, dtype)?.0;
    if device == Device::Cpu {
        gpt.use_input_major_weights();
    }
    Ok(gpt)
}

/// Where the verifier runs a family's T5 text encoder, and how many prompts it caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextOptions {
    /// Device of the encoder; `None`: the verifier's.
    pub device: Option<Device>,
    /// Prompts whose features are kept (least recently used out first).
    pub cache: usize,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            device: None,
            cache: TEXT_CACHE_DEFAULT,
        }
    }
}

/// The family's T5 text encoder with its prompt cache, if it has one: on the options' device
/// (else `device`), in the run's dtype as `TextEncoder::load` adjusts it (fp32 on the CPU and
/// instead of fp16).
fn load_text_encoder(
    family: &Family,
    device: Device,
    dtype: Option<DType>,
    text: TextOptions,
) -> Result<Option<PromptEncoder>, EngineError> {
    if !family.has(Member::TextEncoder) {
        return Ok(None);
    }
    let device = text.device.unwrap_or(device);
    let (enc, _) = TextEncoder::load(&family.path(Member::TextEncoder)?, device, dtype)?;
    Ok(Some(PromptEncoder::new(enc, text.cache)))
}

impl Engine {
    /// Loads the members of `family` that `roles` need (call on the torch thread). `sessions` is
    /// each role's session limit.
    pub fn load(
        family: &Family,
        roles: RoleSet,
        device: Device,
        dtype: Option<DType>,
        sessions: usize,
    ) -> Result<Self, EngineError> {
        Self::load_with_text(
            family,
            roles,
            device,
            dtype,
            sessions,
            TextOptions::default(),
        )
    }

    /// [`Self::load`] with the text encoder's device and cache size chosen.
    pub fn load_with_text(
        family: &Family,
        roles: RoleSet,
        device: Device,
        dtype: Option<DType>,
        sessions: usize,
        text: TextOptions,
    ) -> Result<Self, EngineError> {
        let (vq, _) = VqModel::load(&family.path(Member::Vq)?, device, dtype)?;
        let verifier = if roles.verifier {
            let tdir = family.path(Member::Target)?;
            let mut target = load_gpt(&tdir, device, dtype)?;
            target.set_metrics_label("target");
            let (draft, dtok) = if roles.draft_small && family.has(Member::DraftSmall) {
                let ddir = family.path(Member::DraftSmall)?;
                let mut draft = load_gpt(&ddir, device, dtype)?;
                draft.set_metrics_label("draft_small");
                (Some(draft), load_tokenizer(&ddir)?)
            } else {
                (None, None)
            };
            let mut v = VerifierCore::new(target, draft, &vq.codes(), sessions)?;
            v.set_tokenizers(load_tokenizer(&tdir)?, dtok);
            v.set_text_encoder(load_text_encoder(family, device, dtype, text)?);
            Some(v)
        } else {
            None
        };
        let drafter = if roles.drafter {
            let ddir = family.path(Member::Drafter)?;
            let mut gpt = load_gpt(&ddir, device, dtype)?;
            gpt.set_metrics_label("drafter");
            let up = Upsampler::load(&family.path(Member::Upsampler)?, device)?;
            let (vq2, _) = VqModel::load(&family.path(Member::Vq)?, device, dtype)?;
            let mut d = DrafterCore::new(gpt, up, vq2, sessions)?;
            d.set_tokenizer(load_tokenizer(&ddir)?);
            Some(d)
        } else {
            None
        };
        Ok(Self {
            drafter,
            verifier,
            vq: Some(vq),
            ops: Ops::default(),
            batching: Batching::default(),
        })
    }

    /// Sets the batch limits of both roles and the bound of the call queue.
    pub fn set_batching(&mut self, batching: Batching) {
        if let Some(v) = &mut self.verifier {
            v.set_batch_limits(batching.limits);
        }
        if let Some(d) = &mut self.drafter {
            d.set_batch_limits(batching.limits);
        }
        self.batching = batching;
    }

    fn role_label(&self) -> &'static str {
        match (&self.verifier, &self.drafter) {
            (Some(_), Some(_)) => "embedded",
            (Some(_), None) => "verifier",
            (None, Some(_)) => "drafter",
            (None, None) => "none",
        }
    }

    /// Batched forwards run so far by both roles and the sessions they served.
    pub fn batch_stats(&self) -> crate::batching::BatchStats {
        let v = self.verifier.as_ref().map(VerifierCore::batch_stats);
        let d = self.drafter.as_ref().map(DrafterCore::batch_stats);
        v.unwrap_or_default().plus(d.unwrap_or_default())
    }

    /// Admits a role call as an op (it runs in the next rounds and sends its result to `reply`),
    /// or refuses it when the queue is full.
    pub fn submit<R: Send + 'static>(
        &mut self,
        op: LocalOp<Result<R, EngineError>>,
        reply: tokio::sync::oneshot::Sender<Result<R, EngineError>>,
    ) -> Result<(), EngineError> {
        if self.ops.len() >= self.batching.max_queue.max(1) {
            return Err(EngineError::Capacity(format!(
                "{} role calls are queued on the torch thread, its limit (--max-queue)",
                self.ops.len()
            )));
        }
        self.ops.spawn(Box::pin(async move {
            let _ = reply.send(op.await);
        }));
        Ok(())
    }

    fn drafter(&mut self) -> Result<&mut DrafterCore, EngineError> {
        self.drafter
            .as_mut()
            .ok_or_else(|| EngineError::Unsupported("this process runs no drafter".into()))
    }

    fn verifier(&mut self) -> Result<&mut VerifierCore, EngineError> {
        self.verifier
            .as_mut()
            .ok_or_else(|| EngineError::Unsupported("this process runs no verifier".into()))
    }

    /// A stable hash (FNV-1a 64, hex) of the VQ codebook, so that services can check in the
    /// capability handshake that they share one codebook.
    pub fn codebook_hash(&self) -> Result<String, EngineError> {
        let vq = self
            .vq
            .as_ref()
            .ok_or_else(|| EngineError::Unsupported("this process holds no VQ model".into()))?;
        let codes = Vec::<f32>::try_from(
            vq.codes()
                .to_kind(tch::Kind::Float)
                .to_device(Device::Cpu)
                .reshape([-1]),
        )?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in codes.iter().flat_map(|x| x.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(format!("{h:016x}"))
    }

    /// The models this process holds (target, small draft model, drafter, VQ).
    pub fn models(&self) -> Vec<LoadedModel> {
        let mut out = Vec::new();
        if let Some(v) = &self.verifier {
            out.push(gpt_info(v.target(), "target"));
            if let Some(d) = v.draft_model() {
                out.push(gpt_info(d, "draft-small"));
            }
        }
        if let Some(d) = &self.drafter {
            out.push(gpt_info(d.gpt(), "drafter"));
        }
        if let Some(vq) = &self.vq {
            let c = vq.config();
            out.push(LoadedModel {
                id: c.name.clone().unwrap_or_else(|| "vq".into()),
                model_type: "vq".into(),
                rows: 0,
                cols: 0,
                vocab: c.codebook_size as usize,
                dtype: kind_name(
                    vq.var_store()
                        .variables()
                        .values()
                        .next()
                        .map_or(tch::Kind::Float, tch::Tensor::kind),
                ),
                device: device_name(vq.var_store().device()),
            });
        }
        out
    }

    /// Runs every model this process holds once on throw-away inputs (a GPT prefill and token
    /// step, the up-sampler on one low-res row, a VQ decode of a 1×1 grid), so that a service
    /// reports healthy only when its first request will not pay for warming up.
    pub fn warm_up(&mut self) -> Result<(), EngineError> {
        // KV rows for one full batch of sessions with CFG.
        let batch = self.batching.limits.max_sessions;
        if let Some(v) = &mut self.verifier {
            v.reserve_sessions(batch.min(v.session_limit()))?;
        }
        if let Some(d) = &mut self.drafter {
            d.reserve_sessions(batch.min(d.session_limit()))?;
        }
        if let Some(v) = &mut self.verifier {
            // The nearest-code table every MuLo-SD pool and LANTERN neighbourhood is a view of.
            v.warm_up_nearest_codes()?;
            v.target().warm_up()?;
            if let Some(d) = v.draft_model() {
                d.warm_up()?;
            }
        }
        if let Some(d) = &self.drafter {
            d.gpt().warm_up()?;
            d.warm_up_upsampler()?;
        }
        if let Some(vq) = &self.vq {
            tch::no_grad(|| {
                let t = tch::Tensor::zeros([1, 2, 2], (tch::Kind::Int64, vq.var_store().device()));
                vq.decode(&t).map(|_| ())
            })?;
        }
        Ok(())
    }

    /// Live sessions of the drafter and the verifier (0 for a role this process does not run).
    pub fn live_sessions(&self) -> (usize, usize) {
        (
            self.drafter.as_ref().map_or(0, DrafterCore::sessions),
            self.verifier.as_ref().map_or(0, VerifierCore::sessions),
        )
    }

    /// Decodes a square token grid to pixels `[1, 3, H, W]` in [-1, 1].
    pub fn decode_tensor(&self, tokens: &[i64]) -> Result<tch::Tensor, EngineError> {
        let vq = self
            .vq
            .as_ref()
            .ok_or_else(|| EngineError::Unsupported("this process holds no VQ decoder".into()))?;
        let side = (tokens.len() as f64).sqrt().round() as i64;
        if side * side != tokens.len() as i64 {
            return Err(mulo_core::ParamError::new(
                "tokens",
                format!("{} tokens do not form a square grid", tokens.len()),
            )
            .into());
        }
        let t = tch::Tensor::from_slice(tokens)
            .view([1, side, side])
            .to_device(vq.var_store().device());
        Ok(vq.decode(&t)?.clamp(-1.0, 1.0))
    }
}

/// Both roles in this process, over one torch thread.
#[derive(Debug, Clone)]
pub struct Local {
    worker: Arc<TorchWorker<Engine>>,
}

impl Local {
    /// Roles served by `worker`.
    pub fn new(worker: Arc<TorchWorker<Engine>>) -> Self {
        Self { worker }
    }

    /// The torch thread.
    pub fn worker(&self) -> &Arc<TorchWorker<Engine>> {
        &self.worker
    }

    async fn call<R, F>(&self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Engine) -> Result<R, EngineError> + Send + 'static,
    {
        self.worker.call(f).await?
    }

    /// Runs a role call as an op on the torch thread (batched with the other calls there); a full
    /// queue refuses it at once.
    async fn op<R, F>(&self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Engine) -> Result<LocalOp<Result<R, EngineError>>, EngineError>
            + Send
            + 'static,
    {
        if !self.worker.runs_rounds() {
            // A thread without rounds runs each call to its end inside its job.
            return self
                .call(move |e| {
                    let op = f(e)?;
                    crate::batching::block_on(op, || e.round())
                })
                .await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.call(move |e| {
            let op = f(e)?;
            e.submit(op, tx)
        })
        .await?;
        rx.await.map_err(|_| EngineError::WorkerGone)?
    }
}

#[async_trait]
impl DrafterRole for Local {
    async fn open(
        &self,
        spec: SessionSpec,
        committed: Vec<i64>,
    ) -> Result<DrafterInfo, EngineError> {
        self.op(move |e| e.drafter()?.open_op(spec, committed))
            .await
    }

    async fn draft(
        &self,
        session: SessionRef,
        realign: Vec<i64>,
        rows: usize,
        zipar_window: usize,
    ) -> Result<DraftReply, EngineError> {
        self.op(move |e| e.drafter()?.draft_op(session, realign, rows, zipar_window))
            .await
    }

    async fn release(&self, id: String) -> Result<(), EngineError> {
        self.call(move |e| {
            e.drafter()?.release(&id);
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl VerifierRole for Local {
    async fn open(
        &self,
        spec: SessionSpec,
        with_draft: bool,
        committed: Vec<i64>,
    ) -> Result<VerifierInfo, EngineError> {
        self.op(move |e| e.verifier()?.open_op(spec, with_draft, committed))
            .await
    }

    async fn verify(
        &self,
        session: SessionRef,
        commit: Vec<i64>,
        proposals: Vec<i64>,
        pool_k: usize,
    ) -> Result<VerifyReply, EngineError> {
        self.op(move |e| e.verifier()?.verify_op(session, commit, proposals, pool_k))
            .await
    }

    async fn resample(
        &self,
        session: SessionRef,
        plan: IslandPlan,
    ) -> Result<ResampleReply, EngineError> {
        self.op(move |e| e.verifier()?.resample_op(session, plan))
            .await
    }

    async fn commit(&self, session: SessionRef, values: Vec<i64>) -> Result<usize, EngineError> {
        self.op(move |e| e.verifier()?.commit_op(session, values))
            .await
    }

    async fn decode(&self, session: SessionRef, count: usize) -> Result<DecodeReply, EngineError> {
        self.op(move |e| e.verifier()?.decode_op(session, count, Box::new(|_| {})))
            .await
    }

    async fn speculate(
        &self,
        session: SessionRef,
        gamma: usize,
        relax: Option<Relaxation>,
    ) -> Result<SpeculateReply, EngineError> {
        self.op(move |e| e.verifier()?.speculate_op(session, gamma, relax))
            .await
    }

    async fn release(&self, id: String) -> Result<(), EngineError> {
        self.call(move |e| {
            e.verifier()?.release(&id);
            Ok(())
        })
        .await
    }
}
