//! The T5 encoder (T5 v1.1 / flan-t5, and the original T5's ReLU variant) that turns a prompt into
//! the caption features of LlamaGen's text-to-image GPTs. Weights keep Hugging Face's names
//! (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...), so a converted
//! checkpoint is the Hugging Face file minus the decoder.
//!
//! What makes T5 differ from a textbook encoder, all reproduced here: RMS-style layer norm without
//! mean or bias (`T5LayerNorm`, variance in fp32), unscaled dot-product attention, a learned bias
//! per head over bucketed relative positions shared by every layer (computed from block 0's table),
//! and a gated-GELU (tanh approximation) feed-forward in v1.1.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::{DType, ModelConfig};
use crate::error::{ModelError, Result};

/// The activation inside the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum T5Activation {
    /// GELU, tanh approximation (`gelu_new`; T5 v1.1's `gated-gelu`).
    GeluTanh,
    /// GELU, exact (erf).
    Gelu,
    /// ReLU (the original T5).
    Relu,
    /// SiLU.
    Silu,
}

/// Architecture of a T5 encoder (`config.json`, `model_type: "t5_encoder"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Config {
    /// Model name (informational).
    #[serde(default)]
    pub name: String,
    /// Rows of the token embedding.
    pub vocab_size: i64,
    /// Width of the residual stream (2048 for flan-t5-xl).
    pub d_model: i64,
    /// Width of one attention head.
    pub d_kv: i64,
    /// Hidden width of the feed-forward block.
    pub d_ff: i64,
    /// Encoder blocks.
    pub num_layers: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Buckets of the relative position bias (both directions together).
    pub relative_attention_num_buckets: i64,
    /// Distance from which all relative positions share a bucket.
    pub relative_attention_max_distance: i64,
    /// Epsilon of the layer norms.
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation.
    pub activation: T5Activation,
    /// Whether the feed-forward is gated (`wi_0`, `wi_1`) rather than one `wi`.
    pub gated: bool,
    /// Caption rows the features have: prompts are truncated or padded to this many tokens
    /// (LlamaGen: 120).
    pub max_len: i64,
    /// dtype the weights are stored in and run in on CUDA by default.
    #[serde(default)]
    pub dtype: DType,
}

impl T5Config {
    /// Checks that the architecture is consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ModelError::Config(m.to_string()));
        if [
            self.vocab_size,
            self.d_model,
            self.d_kv,
            self.d_ff,
            self.num_layers,
            self.num_heads,
            self.max_len,
        ]
        .iter()
        .any(|&v| v <= 0)
        {
            return bad("vocab_size, d_model, d_kv, d_ff, num_layers, num_heads and max_len must be positive");
        }
        if self.relative_attention_num_buckets < 4 || self.relative_attention_num_buckets % 2 != 0 {
            return bad("relative_attention_num_buckets must be even and at least 4");
        }
        if self.relative_attention_max_distance * 4 <= self.relative_attention_num_buckets {
            return bad("relative_attention_max_distance must exceed a quarter of the buckets");
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return bad("layer_norm_epsilon must be positive");
        }
        Ok(())
    }
}

/// `T5LayerNorm`: `w * x / sqrt(mean(x²) + eps)`, the mean in fp32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let var = x
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float);
        let h = x.to_kind(Kind::Float) * (var + self.eps).rsqrt();
        h.to_kind(self.weight.kind()) * &self.weight
    }
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    ffn_norm: RmsNorm,
    wi: Vec<nn::Linear>,
    wo: nn::Linear,
}

fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

impl Block {
    fn new(p: &nn::Path, c: &T5Config) -> Self {
        let a = p / "layer" / 0;
        let f = p / "layer" / 1;
        let inner = c.num_heads * c.d_kv;
        let sa = &a / "SelfAttention";
        let ff = &f / "DenseReluDense";
        let wi = if c.gated {
            vec![
                linear(&ff / "wi_0", c.d_model, c.d_ff),
                linear(&ff / "wi_1", c.d_model, c.d_ff),
            ]
        } else {
            vec![linear(&ff / "wi", c.d_model, c.d_ff)]
        };
        Self {
            attn_norm: RmsNorm::new(&a / "layer_norm", c.d_model, c.layer_norm_epsilon),
            q: linear(&sa / "q", c.d_model, inner),
            k: linear(&sa / "k", c.d_model, inner),
            v: linear(&sa / "v", c.d_model, inner),
            o: linear(&sa / "o", inner, c.d_model),
            ffn_norm: RmsNorm::new(&f / "layer_norm", c.d_model, c.layer_norm_epsilon),
            wi,
            wo: linear(&ff / "wo", c.d_ff, c.d_model),
        }
    }

    /// One block over `x` `[B, L, D]` with `bias` `[B|1, H, L, L]` (position bias plus the mask).
    fn forward(&self, x: &Tensor, bias: &Tensor, c: &T5Config, act: T5Activation) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor| t.view([b, l, c.num_heads, c.d_kv]).transpose(1, 2);
        let h = self.attn_norm.forward(x);
        let (q, k, v) = (
            heads(self.q.forward(&h)),
            heads(self.k.forward(&h)),
            heads(self.v.forward(&h)),
        );
        let scores = q.matmul(&k.transpose(2, 3)) + bias.to_kind(q.kind());
        let w = scores
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float)
            .to_kind(q.kind());
        let a = w
            .matmul(&v)
            .transpose(1, 2)
            .contiguous()
            .view([b, l, c.num_heads * c.d_kv]);
        let x = x + self.o.forward(&a);
        let h = self.ffn_norm.forward(&x);
        let mut g = activate(&self.wi[0].forward(&h), act);
        if let Some(lin) = self.wi.get(1) {
            g *= lin.forward(&h);
        }
        &x + self.wo.forward(&g)
    }
}

fn activate(x: &Tensor, act: T5Activation) -> Tensor {
    match act {
        T5Activation::GeluTanh => x.gelu("tanh"),
        T5Activation::Gelu => x.gelu("none"),
        T5Activation::Relu => x.relu(),
        T5Activation::Silu => x.silu(),
    }
}

/// Bucket of each relative position `key − query` of a length-`len` sequence, `[len, len]`, as
/// Hugging Face's bidirectional `_relative_position_bucket` computes it (the same float32 ops, so
/// the bucket edges match it exactly).
pub fn relative_buckets(len: i64, num_buckets: i64, max_distance: i64) -> Tensor {
    let pos = Tensor::arange(len, (Kind::Int64, Device::Cpu));
    let rel = pos.unsqueeze(0) - pos.unsqueeze(1);
    let half = num_buckets / 2;
    let side = rel.gt(0).to_kind(Kind::Int64) * half;
    let n = rel.abs();
    let max_exact = half / 2;
    let scale = (max_distance as f64 / max_exact as f64).ln();
    let large = ((n.to_kind(Kind::Float) / max_exact as f64).log() / scale
        * (half - max_exact) as f64)
        .to_kind(Kind::Int64)
        + max_exact;
    let large = large.clamp_max(half - 1);
    side + n.where_self(&n.lt(max_exact), &large)
}

/// A T5 encoder.
#[derive(Debug)]
pub struct T5Encoder {
    cfg: T5Config,
    vs: nn::VarStore,
    shared: nn::Embedding,
    rel_bias: nn::Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}

impl T5Encoder {
    fn build(cfg: T5Config, device: Device) -> Result<Self> {
        cfg.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let shared = nn::embedding(
            &root / "shared",
            cfg.vocab_size,
            cfg.d_model,
            Default::default(),
        );
        let enc = &root / "encoder";
        let b0 = &enc / "block" / 0 / "layer" / 0 / "SelfAttention";
        let rel_bias = nn::embedding(
            &b0 / "relative_attention_bias",
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            Default::default(),
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(&(&enc / "block" / i), &cfg))
            .collect();
        let final_norm = RmsNorm::new(
            &enc / "final_layer_norm",
            cfg.d_model,
            cfg.layer_norm_epsilon,
        );
        Ok(Self {
            cfg,
            vs,
            shared,
            rel_bias,
            blocks,
            final_norm,
        })
    }

    /// A randomly initialised encoder (weights `N(0, 1)` from the seed), for tests.
    pub fn random(cfg: T5Config, device: Device, seed: i64) -> Result<Self> {
        crate::seed::with_global_seed(seed, || {
            let m = Self::build(cfg, device)?;
            tch::no_grad(|| {
                // By name: the store's map has no fixed order.
                let mut vars: Vec<_> = m.vs.variables().into_iter().collect();
                vars.sort_by(|a, b| a.0.cmp(&b.0));
                for (_, mut v) in vars {
                    let r = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.5;
                    v.copy_(&r.to_device(device));
                }
            });
            Ok(m)
        })
    }

    /// Loads a model directory (`config.json` + `model.safetensors`); `dtype` overrides the
    /// config's. Returns the model and the names of file tensors it did not use.
    pub fn load(dir: &Path, device: Device, dtype: Option<DType>) -> Result<(Self, Vec<String>)> {
        let cfg = ModelConfig::load_t5(dir)?;
        let dtype = dtype.unwrap_or(cfg.dtype);
        let mut m = crate::seed::without_seed(|| Self::build(cfg, device))?;
        m.cfg.dtype = dtype;
        let unused = checkpoint::load_dir_weights(&mut m.vs, dir, dtype)?;
        Ok((m, unused))
    }

    /// Writes the model directory, weights stored in `dtype`.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.dtype = dtype;
        checkpoint::save_dir(ModelConfig::T5Encoder(cfg), &self.vs, dir, dtype)
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Encoder output `[B, L, d_model]` (fp32) of token ids `[B, L]` with validity `mask` `[B, L]`
    /// (nonzero = a token; padding keys are hidden from every query, as with Hugging Face's
    /// `attention_mask`).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let size = ids.size();
        let [b, l] = size[..] else {
            return Err(ModelError::InvalidInput(format!(
                "token ids must be [batch, len], got {size:?}"
            )));
        };
        if mask.size() != size {
            return Err(ModelError::InvalidInput(format!(
                "mask {:?} does not match ids {size:?}",
                mask.size()
            )));
        }
        let dev = self.device();
        let kind = self.shared.ws.kind();
        let out = tch::no_grad(|| {
            let buckets = relative_buckets(
                l,
                self.cfg.relative_attention_num_buckets,
                self.cfg.relative_attention_max_distance,
            )
            .to_device(dev);
            let pos = self
                .rel_bias
                .forward(&buckets)
                .permute([2, 0, 1])
                .unsqueeze(0);
            let hidden = mask.to_device(dev).eq(0).view([b, 1, 1, l]).to_kind(kind);
            let bias = pos + hidden * min_value(kind);
            let mut x = self.shared.forward(&ids.to_device(dev));
            for block in &self.blocks {
                x = block.forward(&x, &bias, &self.cfg, self.cfg.activation);
            }
            self.final_norm.forward(&x).to_kind(Kind::Float)
        });
        Ok(out)
    }
}

/// The most negative finite value of a float kind (Hugging Face's `torch.finfo(dtype).min`).
fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    pub(crate) fn tiny() -> T5Config {
        T5Config {
            name: "tiny".into(),
            vocab_size: 50,
            d_model: 16,
            d_kv: 4,
            d_ff: 24,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            activation: T5Activation::GeluTanh,
            gated: true,
            max_len: 12,
            dtype: DType::Fp32,
        }
    }

    #[test]
    fn buckets_are_exact_near_and_logarithmic_far() {
        let b = relative_buckets(300, 32, 128);
        let at = |q: i64, k: i64| b.int64_value(&[q, k]);
        // Keys before the query use buckets 0..16, after it 16..32; |d| < 8 is exact.
        assert_eq!(at(10, 10), 0);
        assert_eq!(at(10, 3), 7);
        assert_eq!(at(10, 17), 16 + 7);
        assert_eq!(at(0, 8), 16 + 8);
        // Every distance from max_distance on shares the last bucket of its side.
        assert_eq!(at(0, 128), 31);
        assert_eq!(at(0, 299), 31);
        assert_eq!(at(299, 0), 15);
        // Monotone in distance.
        let row: Vec<i64> = (0..300).map(|k| at(0, k)).collect();
        assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    }

    #[test]
    fn padding_does_not_change_the_valid_rows() {
        let m = T5Encoder::random(tiny(), Device::Cpu, 3).unwrap();
        let ids = Tensor::from_slice(&[5i64, 9, 1, 0, 0, 0]).view([1, 6]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 0]).view([1, 6]);
        let long = m.forward(&ids, &mask).unwrap();
        let short = m
            .forward(&ids.narrow(1, 0, 3), &mask.narrow(1, 0, 3))
            .unwrap();
        let diff = (long.narrow(1, 0, 3) - short).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = T5Encoder::random(tiny(), Device::Cpu, 4).unwrap();
        m.save(dir.path(), DType::Fp32).unwrap();
        let (back, unused) = T5Encoder::load(dir.path(), Device::Cpu, None).unwrap();
        assert!(unused.is_empty(), "{unused:?}");
        let ids = Tensor::from_slice(&[3i64, 4, 1]).view([1, 3]);
        let mask = Tensor::ones([1, 3], (Kind::Int64, Device::Cpu));
        let d = (m.forward(&ids, &mask).unwrap() - back.forward(&ids, &mask).unwrap())
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(d, 0.0);
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let mut c = tiny();
        c.relative_attention_num_buckets = 7;
        assert!(T5Encoder::random(c, Device::Cpu, 0).is_err());
        let m = T5Encoder::random(tiny(), Device::Cpu, 0).unwrap();
        let ids = Tensor::from_slice(&[3i64, 4, 1]);
        let e = m.forward(&ids, &ids).unwrap_err().to_string();
        assert!(e.contains("[batch, len]"), "{e}");
    }
}
