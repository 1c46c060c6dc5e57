//! LlamaGen's GPT (c2i and t2i) with a preallocated KV cache and masked forwards at arbitrary
//! absolute positions.
//!
//! Numerics follow LlamaGen's `autoregressive/models/gpt.py`: pre-RMSNorm computed in fp32 and cast
//! back before the weight multiply, fused `wqkv` split `q|k|v` (GQA by `repeat_interleave`), SwiGLU,
//! 2D RoPE with interleaved pairs and zeroed condition positions, scaled-dot-product attention with
//! a boolean mask, logits in fp32.

use std::path::Path;

use mulo_core::Condition;
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

use crate::batch::{BatchInput, BatchPlan};
use crate::checkpoint;
use crate::config::{ConditionConfig, DType, GptConfig, ModelConfig, PositionEmbedding};
use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::rope::RopeTable;

#[derive(Debug)]
struct Block {
    wqkv: Tensor,
    wo: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    attention_norm: Tensor,
    ffn_norm: Tensor,
}

#[derive(Debug)]
enum CondEmbed {
    Class {
        table: Tensor,
        num_classes: i64,
    },
    Caption {
        fc1: Tensor,
        fc2: Tensor,
        uncond: Tensor,
        words: Option<Tensor>,
    },
}

/// The condition of one session turned into embeddings: `[batch, cls_token_num, dim]` (batch 2 =
/// `[cond; uncond]` with CFG) and the caption mask, if any.
#[derive(Debug)]
pub struct Conditioning {
    /// Condition embeddings.
    pub embeddings: Tensor,
    /// `[cls_token_num]` bool: false hides that caption row from every other position.
    pub mask: Option<Tensor>,
}

impl Conditioning {
    /// Sequences in the batch (2 with CFG).
    pub fn batch(&self) -> i64 {
        self.embeddings.size()[0]
    }
}

/// A LlamaGen-style autoregressive image-token model.
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    vs: VarStore,
    tok_embeddings: Tensor,
    cond: CondEmbed,
    layers: Vec<Block>,
    norm: Tensor,
    output: Tensor,
    abs_pe: Option<Tensor>,
    rope: Option<RopeTable>,
    device: Device,
    /// Training-only dropout on the residual branches (0 at inference).
    dropout: f64,
    /// Kind the weight multiplies and attention run in when it differs from the weights' own kind
    /// (mixed precision: fp32 weights, bf16 matmuls); `None` = the weights' kind.
    compute: Option<Kind>,
    /// `model` label of its forward passes in the metrics (`target`, `drafter`, `draft_small`).
    metrics_label: &'static str,
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let inv = (&xf * &xf)
        .mean_dim(-1, true, Kind::Float)
        .g_add_scalar(eps)
        .rsqrt();
    (xf * inv).to_kind(x.kind()) * weight
}

fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    x.linear::<Tensor>(w, None)
}

impl Gpt {
    fn build(cfg: GptConfig, device: Device, init_std: Option<f64>) -> Result<Self> {
        cfg.validate()?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let lin = |std: Option<f64>| match std {
            Some(s) => Init::Randn {
                mean: 0.0,
                stdev: s,
            },
            None => Init::Const(0.0),
        };
        let ones = Init::Const(1.0);
        let d = cfg.dim;
        let hd = cfg.head_dim();
        let kv = cfg.kv_heads();
        let hidden = cfg.ffn_hidden();
        let cond = match cfg.condition {
            ConditionConfig::Class { num_classes } => CondEmbed::Class {
                table: (&root / "cls_embedding" / "embedding_table").var(
                    "weight",
                    &[num_classes + 1, d],
                    lin(init_std),
                ),
                num_classes,
            },
            ConditionConfig::Caption { caption_dim } => {
                let p = &root / "cls_embedding";
                CondEmbed::Caption {
                    fc1: (&p / "cap_proj" / "fc1").var("weight", &[d, caption_dim], lin(init_std)),
                    fc2: (&p / "cap_proj" / "fc2").var("weight", &[d, d], lin(init_std)),
                    uncond: p.var(
                        "uncond_embedding",
                        &[cfg.cls_token_num, caption_dim],
                        lin(init_std.map(|_| 1.0 / (caption_dim as f64).sqrt())),
                    ),
                    words: cfg.caption_vocab.map(|v| {
                        (&p / "word_embeddings").var(
                            "weight",
                            &[v, caption_dim],
                            lin(init_std.map(|_| 1.0 / (caption_dim as f64).sqrt())),
                        )
                    }),
                }
            }
        };
        let tok_embeddings =
            (&root / "tok_embeddings").var("weight", &[cfg.vocab_size, d], lin(init_std));
        let mut layers = Vec::with_capacity(cfg.n_layer as usize);
        for i in 0..cfg.n_layer {
            let p = &root / "layers" / i;
            let a = &p / "attention";
            let f = &p / "feed_forward";
            layers.push(Block {
                wqkv: (&a / "wqkv").var("weight", &[(cfg.n_head + 2 * kv) * hd, d], lin(init_std)),
                wo: (&a / "wo").var("weight", &[d, d], lin(init_std)),
                w1: (&f / "w1").var("weight", &[hidden, d], lin(init_std)),
                w2: (&f / "w2").var("weight", &[d, hidden], lin(init_std)),
                w3: (&f / "w3").var("weight", &[hidden, d], lin(init_std)),
                attention_norm: (&p / "attention_norm").var("weight", &[d], ones),
                ffn_norm: (&p / "ffn_norm").var("weight", &[d], ones),
            });
        }
        let norm = (&root / "norm").var("weight", &[d], ones);
        let output = (&root / "output").var("weight", &[cfg.vocab_size, d], lin(init_std));
        let (abs_pe, rope) = match cfg.position_embedding {
            PositionEmbedding::Learned => (
                Some(root.var("abs_pe", &[cfg.max_positions(), d], lin(init_std))),
                None,
            ),
            PositionEmbedding::Rope2d | PositionEmbedding::Rope2dKeepCondition => (
                None,
                Some(RopeTable::new(
                    cfg.grid,
                    hd,
                    cfg.rope_base,
                    cfg.cls_token_num,
                    cfg.position_embedding == PositionEmbedding::Rope2d,
                    device,
                )),
            ),
        };
        Ok(Self {
            cfg,
            vs,
            tok_embeddings,
            cond,
            layers,
            norm,
            output,
            abs_pe,
            rope,
            device,
            dropout: 0.0,
            compute: None,
            metrics_label: "gpt",
        })
    }

    /// Lays the weights of the linear layers (projections, feed-forward, output head) out
    /// input-major in memory (`[in, out]`, read as the same `[out, in]` tensors): on a CPU, MKL
    /// then multiplies a few tokens by them without repacking the weight on every call (measured
    /// 1.4x faster at 16 tokens on this project's CPU machine; no gain on large batches or GPUs).
    /// Values, checkpoints and training are unchanged. Serving on a CPU calls it after loading.
    pub fn use_input_major_weights(&mut self) {
        let relayout = |w: &mut Tensor| {
            if w.is_contiguous() {
                let t = w.detach().tr().contiguous().tr();
                w.set_data(&t);
            }
        };
        tch::no_grad(|| {
            for b in &mut self.layers {
                for w in [&mut b.wqkv, &mut b.wo, &mut b.w1, &mut b.w2, &mut b.w3] {
                    relayout(w);
                }
            }
            relayout(&mut self.output);
        });
    }

    /// Runs the weight multiplies and attention in `kind` (e.g. bf16) while the weights, the
    /// residual stream, the norms and the logits keep their own kind: mixed-precision training on
    /// CPUs with fast bf16 matmuls. `None` restores plain computation in the weights' kind.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        self.compute = kind.filter(|k| *k != self.kind());
    }

    /// `x · wᵀ`, in the compute kind when one is set.
    fn lin(&self, x: &Tensor, w: &Tensor) -> Tensor {
        match self.compute {
            Some(k) => x.to_kind(k).linear::<Tensor>(&w.to_kind(k), None),
            None => linear(x, w),
        }
    }

    /// Names the model in the forward-pass metric (`mulo_forward_passes_total{model=…}`).
    pub fn set_metrics_label(&mut self, label: &'static str) {
        self.metrics_label = label;
    }

    /// The model's label in the metrics.
    pub fn metrics_label(&self) -> &'static str {
        self.metrics_label
    }

    fn count_pass(&self) {
        metrics::counter!(mulo_core::metrics::FORWARD_PASSES, "model" => self.metrics_label)
            .increment(1);
    }

    /// Sets the dropout probability of the input embeddings and of the attention and feed-forward
    /// outputs (LlamaGen's `token_dropout_p`, `resid_dropout_p`, `ffn_dropout_p`). Training only: a model that generates keeps 0.
    pub fn set_train_dropout(&mut self, p: f64) {
        self.dropout = p.clamp(0.0, 0.99);
    }

    fn drop(&self, x: Tensor) -> Tensor {
        if self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x
        }
    }

    /// A randomly initialised model (weights `N(0, init_std)`, norms 1) in `dtype`; the global torch
    /// seed is set to `seed` first.
    pub fn random(
        cfg: GptConfig,
        device: Device,
        dtype: DType,
        seed: i64,
        init_std: f64,
    ) -> Result<Self> {
        let mut m =
            crate::seed::with_global_seed(seed, || Self::build(cfg, device, Some(init_std)))?;
        m.vs.set_kind(dtype.kind());
        m.cfg.dtype = dtype;
        Ok(m)
    }

    /// Loads a model directory (`config.json` + `model.safetensors`); `dtype` overrides the
    /// config's. Returns the model and the names of file tensors it did not use.
    pub fn load(dir: &Path, device: Device, dtype: Option<DType>) -> Result<(Self, Vec<String>)> {
        let cfg = ModelConfig::load_gpt(dir)?;
        let dtype = dtype.unwrap_or(cfg.dtype);
        let mut m = crate::seed::without_seed(|| Self::build(cfg, device, None))?;
        m.cfg.dtype = dtype;
        let unused = checkpoint::load_dir_weights(&mut m.vs, dir, dtype)?;
        Ok((m, unused))
    }

    /// Writes the model directory, weights stored in `dtype`.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.dtype = dtype;
        checkpoint::save_dir(ModelConfig::Gpt(cfg), &self.vs, dir, dtype)
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The variables (for training and inspection).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The activation kind.
    pub fn kind(&self) -> Kind {
        self.tok_embeddings.kind()
    }

    /// A zeroed KV cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        KvCache::new(
            self.cfg.n_layer,
            batch,
            self.cfg.kv_heads(),
            capacity,
            self.cfg.head_dim(),
            self.kind(),
            self.device,
        )
    }

    /// Embeddings `[batch, S, dim]` of image tokens (the same tokens in every sequence).
    pub fn embed_tokens(&self, tokens: &[i64], batch: i64) -> Result<Tensor> {
        if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t >= self.cfg.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {t} is outside the vocabulary [0, {})",
                self.cfg.vocab_size
            )));
        }
        let ids = Tensor::from_slice(tokens).to_device(self.device);
        let e = self.tok_embeddings.index_select(0, &ids);
        Ok(e.unsqueeze(0)
            .expand([batch, tokens.len() as i64, self.cfg.dim], false))
    }

    /// Embeddings `[B, S, dim]` of a batch of token rows `[B, S]` (int64, on the model's device).
    pub fn embed_token_tensor(&self, tokens: &Tensor) -> Tensor {
        let s = tokens.size();
        self.tok_embeddings
            .index_select(0, &tokens.reshape([-1]))
            .view([s[0], s[1], self.cfg.dim])
    }

    /// Turns a condition into embeddings, with the unconditional half appended when `cfg` is true
    /// (null class for c2i, the learned null caption for t2i).
    pub fn condition(&self, cond: &Condition, cfg: bool) -> Result<Conditioning> {
        cond.validate()
            .map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        match (&self.cond, cond) {
            (CondEmbed::Class { table, num_classes }, Condition::Class(c)) => {
                let c = i64::from(*c);
                if c >= *num_classes {
                    return Err(ModelError::InvalidInput(format!(
                        "class {c} is outside [0, {num_classes})"
                    )));
                }
                let ids: Vec<i64> = if cfg { vec![c, *num_classes] } else { vec![c] };
                let ids = Tensor::from_slice(&ids).to_device(self.device);
                Ok(Conditioning {
                    embeddings: table.index_select(0, &ids).unsqueeze(1),
                    mask: None,
                })
            }
            (
                CondEmbed::Caption { uncond, .. },
                Condition::CaptionFeatures {
                    features,
                    len,
                    dim,
                    mask,
                },
            ) => {
                let want_dim = uncond.size()[1];
                if *len as i64 != self.cfg.cls_token_num || *dim as i64 != want_dim {
                    return Err(ModelError::InvalidInput(format!(
                        "caption features must be [{}, {want_dim}], got [{len}, {dim}]",
                        self.cfg.cls_token_num
                    )));
                }
                let x = Tensor::from_slice(features)
                    .view([1, *len as i64, *dim as i64])
                    .to_device(self.device)
                    .to_kind(self.kind());
                Ok(self.caption_conditioning(x, mask.as_deref(), cfg))
            }
            (CondEmbed::Caption { words, .. }, Condition::CaptionTokens { ids, mask }) => {
                let Some(words) = words else {
                    return Err(ModelError::InvalidInput(
                        "this model has no word embeddings: give precomputed caption features"
                            .into(),
                    ));
                };
                let v = words.size()[0];
                if ids.len() as i64 != self.cfg.cls_token_num {
                    return Err(ModelError::InvalidInput(format!(
                        "caption must have {} word ids, got {}",
                        self.cfg.cls_token_num,
                        ids.len()
                    )));
                }
                if let Some(bad) = ids.iter().find(|&&i| i64::from(i) >= v) {
                    return Err(ModelError::InvalidInput(format!(
                        "caption word id {bad} is outside the word vocabulary [0, {v})"
                    )));
                }
                let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                let x = words
                    .index_select(0, &Tensor::from_slice(&ids).to_device(self.device))
                    .unsqueeze(0);
                Ok(self.caption_conditioning(x, Some(mask), cfg))
            }
            (CondEmbed::Class { .. }, _) => Err(ModelError::InvalidInput(
                "this model is class-conditional: give a class id".into(),
            )),
            (CondEmbed::Caption { .. }, Condition::Prompt(_)) => Err(ModelError::InvalidInput(
                "this model has no caption tokenizer and no text encoder came with it: give caption features (--caption-features), or add a T5 text encoder to its family (docs/byom.md)".into(),
            )),
            (CondEmbed::Caption { .. }, Condition::Class(_)) => Err(ModelError::InvalidInput(
                "this model is text-conditional: give caption features, not a class id".into(),
            )),
        }
    }

    /// The null condition (what classifier-free guidance contrasts with), batch 1.
    pub fn null_conditioning(&self) -> Conditioning {
        let embeddings = match &self.cond {
            CondEmbed::Class { table, num_classes } => table
                .index_select(
                    0,
                    &Tensor::from_slice(&[*num_classes]).to_device(self.device),
                )
                .unsqueeze(1),
            CondEmbed::Caption { uncond, .. } => self.project_caption(&uncond.unsqueeze(0)),
        };
        Conditioning {
            embeddings,
            mask: None,
        }
    }

    /// One prefill and one token step on the null condition, discarded: the first request after
    /// start-up does not pay for the allocator's and the kernels' first use.
    pub fn warm_up(&self) -> Result<()> {
        tch::no_grad(|| {
            let cls = self.cfg.cls_token_num;
            let mut cache = self.new_cache(1, cls + 1)?;
            let _ = self.prefill_uncounted(&self.null_conditioning(), &mut cache)?;
            let x = self.embed_tokens(&[0], 1)?;
            let h = self.forward_uncounted(&x, &[cls], None, &mut cache)?;
            let _ = self.head(&h);
            Ok(())
        })
    }

    /// Projects caption features `[1, T, caption_dim]` (plus the null caption when `cfg`).
    fn caption_conditioning(&self, x: Tensor, mask: Option<&[bool]>, cfg: bool) -> Conditioning {
        let x = match (&self.cond, cfg) {
            (CondEmbed::Caption { uncond, .. }, true) => Tensor::cat(&[x, uncond.unsqueeze(0)], 0),
            _ => x,
        };
        Conditioning {
            embeddings: self.project_caption(&x),
            mask: mask.map(|m| Tensor::from_slice(m).to_device(self.device)),
        }
    }

    fn project_caption(&self, x: &Tensor) -> Tensor {
        match &self.cond {
            CondEmbed::Caption { fc1, fc2, .. } => self.lin(&self.lin(x, fc1).gelu("tanh"), fc2),
            CondEmbed::Class { .. } => x.shallow_clone(),
        }
    }

    /// Training condition embeddings `[B, cls_token_num, dim]`: class ids `[B]` (c2i) or caption word
    /// ids `[B, T]` (t2i with word embeddings); rows where `drop` `[B]` is true get the null
    /// condition (classifier-free guidance training).
    pub fn condition_train(&self, ids: &Tensor, drop: &Tensor) -> Result<Tensor> {
        match &self.cond {
            CondEmbed::Class { table, num_classes } => {
                let ids = ids.where_self(&drop.logical_not(), &ids.full_like(*num_classes));
                Ok(table.index_select(0, &ids).unsqueeze(1))
            }
            CondEmbed::Caption {
                words: Some(words),
                uncond,
                ..
            } => {
                let s = ids.size();
                let feats = words
                    .index_select(0, &ids.reshape([-1]))
                    .view([s[0], s[1], -1]);
                let null = uncond.unsqueeze(0).expand_as(&feats);
                let feats = null.where_self(&drop.view([-1, 1, 1]), &feats);
                Ok(self.project_caption(&feats))
            }
            CondEmbed::Caption { words: None, .. } => Err(ModelError::InvalidInput(
                "training needs a caption model with word embeddings (caption_vocab)".into(),
            )),
        }
    }

    /// The variables, mutably (to unfreeze or load a checkpoint for training).
    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// Writes the condition into `cache` at positions `0..cls_token_num` and returns the fp32 logits
    /// `[batch, vocab]` that predict the first image token.
    pub fn prefill(&self, cond: &Conditioning, cache: &mut KvCache) -> Result<Tensor> {
        let logits = self.prefill_uncounted(cond, cache)?;
        self.count_pass();
        Ok(logits)
    }

    fn prefill_uncounted(&self, cond: &Conditioning, cache: &mut KvCache) -> Result<Tensor> {
        if cond.batch() != cache.batch() {
            return Err(ModelError::InvalidInput(format!(
                "condition batch {} does not match the cache batch {}",
                cond.batch(),
                cache.batch()
            )));
        }
        let input = self.condition_input(cond, (0..cache.batch()).collect(), cache)?;
        let h = self.forward_batch_uncounted(&[input], cache)?.remove(0);
        Ok(self.head(&h.select(1, self.cfg.cls_token_num - 1)))
    }

    /// The prefill of `cond` into cache `rows` as one group of a batched forward (its last
    /// input's logits predict the first image token); sets the rows' caption visibility now.
    pub fn condition_input(
        &self,
        cond: &Conditioning,
        rows: Vec<i64>,
        cache: &mut KvCache,
    ) -> Result<BatchInput> {
        if rows.len() as i64 != cond.batch() {
            return Err(ModelError::InvalidInput(format!(
                "condition batch {} needs as many cache rows, got {}",
                cond.batch(),
                rows.len()
            )));
        }
        cache.check_rows(&rows)?;
        cache.set_visible(&rows, cond.mask.as_ref());
        Ok(BatchInput {
            x: cond.embeddings.shallow_clone(),
            rows,
            positions: (0..self.cfg.cls_token_num).collect(),
            mask: None,
        })
    }

    /// Runs inputs `x` `[batch, S, dim]` at absolute `positions` (`S` of them) against `cache`, writing
    /// their keys and values there, and returns the final-norm hidden states `[batch, S, dim]`.
    ///
    /// `mask` `[S, W]` (bool, `W <= capacity`, `W > max(positions)`) says which cache slots each input
    /// attends to; `None` means causal by position (slot `j` visible to an input at `p` iff `j <= p`).
    /// Every input always sees its own slot, and caption rows hidden by the condition mask are never
    /// seen by another position.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[i64],
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.forward_uncounted(x, positions, mask, cache)?;
        self.count_pass();
        Ok(h)
    }

    fn forward_uncounted(
        &self,
        x: &Tensor,
        positions: &[i64],
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let xs = x.size();
        if xs.len() != 3 || xs[0] != cache.batch() {
            return Err(ModelError::InvalidInput(format!(
                "forward input has shape {xs:?}, expected [{}, {}, {}]",
                cache.batch(),
                positions.len(),
                self.cfg.dim
            )));
        }
        let input = BatchInput {
            x: x.shallow_clone(),
            rows: (0..cache.batch()).collect(),
            positions: positions.to_vec(),
            mask: mask.map(Tensor::shallow_clone),
        };
        Ok(self.forward_batch_uncounted(&[input], cache)?.remove(0))
    }

    /// Runs several sequence groups in one forward against the shared `cache` (each group in its
    /// own rows, at its own positions, with its own mask; see [`BatchInput`]) and returns each
    /// group's final-norm hidden states `[rows, S_i, dim]`: what [`Gpt::forward`] of that group
    /// alone returns, up to float rounding.
    pub fn forward_batch(&self, groups: &[BatchInput], cache: &mut KvCache) -> Result<Vec<Tensor>> {
        let h = self.forward_batch_uncounted(groups, cache)?;
        self.count_pass();
        Ok(h)
    }

    fn forward_batch_uncounted(
        &self,
        groups: &[BatchInput],
        cache: &mut KvCache,
    ) -> Result<Vec<Tensor>> {
        let plan = BatchPlan::new(groups, self.cfg.dim, cache)?;
        for g in groups {
            self.check_rope_range(&g.positions)?;
        }
        let h = tch::no_grad(|| {
            self.run_layers(&plan.x, &plan.positions, Attend::Cached(&mut *cache, &plan))
        });
        cache.mark_written(&[plan.max_position]);
        Ok(plan.split(&h))
    }

    /// One full causal forward of `x` `[B, S, dim]` at positions `0..S`, without a cache (the reference
    /// the cached paths are tested against, and the training forward). `cond_mask` `[cls_token_num]`
    /// or per sequence `[B, cls_token_num]` hides caption rows as in [`Gpt::forward`].
    pub fn forward_full(&self, x: &Tensor, cond_mask: Option<&Tensor>) -> Result<Tensor> {
        let s = x.size()[1];
        let positions: Vec<i64> = (0..s).collect();
        self.check_rope_range(&positions)?;
        let pos_t = Tensor::from_slice(&positions).to_device(self.device);
        let visible = cond_mask.map(|m| {
            let m = if m.dim() == 1 {
                m.unsqueeze(0)
            } else {
                m.shallow_clone()
            };
            let (b, n) = (m.size()[0], m.size()[1]);
            let rest = Tensor::ones([b, (s - n).max(0)], (Kind::Bool, self.device));
            Tensor::cat(&[m.to_kind(Kind::Bool), rest], 1).narrow(1, 0, s)
        });
        let attn_mask = build_mask(&pos_t, &pos_t, None, visible.as_ref());
        Ok(self.run_layers(x, &pos_t, Attend::Full(&attn_mask)))
    }

    /// fp32 logits of final-norm hidden states.
    pub fn head(&self, h: &Tensor) -> Tensor {
        self.lin(h, &self.output).to_kind(Kind::Float)
    }

    fn check_rope_range(&self, positions: &[i64]) -> Result<()> {
        let limit = self.cfg.max_positions();
        match positions.iter().find(|&&p| p < 0 || p >= limit) {
            Some(p) => Err(ModelError::InvalidInput(format!(
                "position {p} is outside the model's {limit} positions"
            ))),
            None => Ok(()),
        }
    }

    // `h += a` on tensors adds in place, into storage shared with the caller's input: keep `h = h + a`.
    #[allow(clippy::assign_op_pattern)]
    fn run_layers(&self, x: &Tensor, pos_t: &Tensor, mut attend: Attend<'_>) -> Tensor {
        let mut h = self.drop(match &self.abs_pe {
            Some(pe) => {
                let sz = x.size();
                let pb = if pos_t.dim() == 2 { sz[0] } else { 1 };
                x + pe
                    .index_select(0, &pos_t.reshape([-1]))
                    .view([pb, sz[1], sz[2]])
            }
            None => x.shallow_clone(),
        });
        for (i, blk) in self.layers.iter().enumerate() {
            let a = self.attention(
                blk,
                &rms_norm(&h, &blk.attention_norm, self.cfg.norm_eps),
                pos_t,
                &mut attend,
                i,
            );
            h = h + self.drop(a);
            let f = rms_norm(&h, &blk.ffn_norm, self.cfg.norm_eps);
            let f = self.lin(
                &(self.lin(&f, &blk.w1).silu() * self.lin(&f, &blk.w3)),
                &blk.w2,
            );
            h = h + self.drop(f);
        }
        rms_norm(&h, &self.norm, self.cfg.norm_eps)
    }

    /// Attention of `x` `[B, S, dim]` (packed `[1, T, dim]` with a cache) at `pos_t`.
    fn attention(
        &self,
        blk: &Block,
        x: &Tensor,
        pos_t: &Tensor,
        attend: &mut Attend<'_>,
        layer: usize,
    ) -> Tensor {
        let sz = x.size();
        let (b, s) = (sz[0], sz[1]);
        let (nh, nkv, hd, d) = (
            self.cfg.n_head,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
            self.cfg.dim,
        );
        let qkv = self.lin(x, &blk.wqkv);
        let mut q = qkv.narrow(-1, 0, d).view([b, s, nh, hd]);
        let mut k = qkv.narrow(-1, d, nkv * hd).view([b, s, nkv, hd]);
        let v = qkv.narrow(-1, d + nkv * hd, nkv * hd).view([b, s, nkv, hd]);
        if let Some(rope) = &self.rope {
            q = rope.apply(&q, pos_t);
            k = rope.apply(&k, pos_t);
        }
        let out = match attend {
            Attend::Full(mask) => {
                let q = q.transpose(1, 2);
                let o = self.sdpa(&q, &k.transpose(1, 2), &v.transpose(1, 2), mask);
                o.transpose(1, 2).contiguous().view([b, s, d])
            }
            Attend::Cached(c, plan) => {
                plan.write(&mut c.keys[layer], &k);
                plan.write(&mut c.values[layer], &v);
                // Each bucket of equal input length at once, against its rows; the tokens stay
                // packed.
                let outs: Vec<Tensor> = plan
                    .buckets
                    .iter()
                    .map(|g| {
                        let q = q
                            .narrow(1, g.start, g.rows * g.s)
                            .view([g.rows, g.s, nh, hd]);
                        let keys = g.read(&c.keys[layer]);
                        let values = g.read(&c.values[layer]);
                        let o = self.sdpa(&q.transpose(1, 2), &keys, &values, &g.mask);
                        o.transpose(1, 2).contiguous().view([1, g.rows * g.s, d])
                    })
                    .collect();
                Tensor::cat(&outs, 1)
            }
        };
        self.lin(&out, &blk.wo)
    }

    /// Scaled-dot-product attention of `q` `[n, heads, S, hd]` over `keys` and `values`
    /// `[n, kv_heads, W, hd]` (grouped-query heads repeated) with a boolean `mask`.
    fn sdpa(&self, q: &Tensor, keys: &Tensor, values: &Tensor, mask: &Tensor) -> Tensor {
        let rep = self.cfg.n_head / self.cfg.kv_heads();
        let (keys, values) = if rep != 1 {
            (
                keys.repeat_interleave_self_int(rep, 1, None),
                values.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (keys.shallow_clone(), values.shallow_clone())
        };
        Tensor::scaled_dot_product_attention(
            &q.to_kind(keys.kind()),
            &keys,
            &values,
            Some(mask),
            0.0,
            false,
            None,
            false,
        )
    }
}

/// How the layers attend: one full causal forward with its mask, or packed groups against a
/// cache.
enum Attend<'a> {
    Full(&'a Tensor),
    Cached(&'a mut KvCache, &'a BatchPlan),
}

/// Boolean attention mask `[1, 1, S, W]`: `explicit` `[S, W]` or causal by position, AND the caption
/// visibility of each key slot, OR each query's own slot.
fn build_mask(
    pos_t: &Tensor,
    key_slots: &Tensor,
    explicit: Option<&Tensor>,
    visible: Option<&Tensor>,
) -> Tensor {
    let s = pos_t.size()[0];
    let w = key_slots.size()[0];
    let j = key_slots.unsqueeze(0);
    let p = pos_t.unsqueeze(1);
    let mut m = match explicit {
        Some(m) => m.to_device(pos_t.device()).to_kind(Kind::Bool),
        None => j.le_tensor(&p),
    }
    .unsqueeze(0);
    if let Some(v) = visible {
        // [W] for every sequence, or [B, W] per sequence.
        let v = if v.dim() == 1 {
            v.unsqueeze(0)
        } else {
            v.shallow_clone()
        };
        m = m.logical_and(&v.unsqueeze(1));
    }
    let b = m.size()[0];
    m.logical_or(&j.eq_tensor(&p).unsqueeze(0))
        .view([b, 1, s, w])
}
