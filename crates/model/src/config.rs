//! The project's model format: a directory with `config.json` and `model.safetensors`.

use std::path::{Path, PathBuf};

use mulo_core::{GridSize, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// File name of a model directory's configuration.
pub const CONFIG_FILE: &str = "config.json";
/// File name of a model directory's weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Weight and activation dtype. Norms, RoPE, sampling and logits always run in fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    #[default]
    Fp32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    Fp16,
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" | "f32" | "float32" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp16" | "f16" | "float16" | "half" => Ok(Self::Fp16),
            _ => Err(format!("'{s}' is not a dtype; use fp32, bf16 or fp16")),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::Fp32 => "fp32",
            DType::Bf16 => "bf16",
            DType::Fp16 => "fp16",
        })
    }
}

/// What a GPT is conditioned on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConditionConfig {
    /// c2i: `cls_embedding.embedding_table.weight` `[num_classes + 1, dim]`, null class = `num_classes`.
    Class {
        /// Number of real classes.
        num_classes: i64,
    },
    /// t2i: `cls_embedding.cap_proj.fc1/fc2` and the null caption `cls_embedding.uncond_embedding`
    /// `[cls_token_num, caption_dim]`.
    Caption {
        /// Width of one caption feature row (2048 for flan-t5-xl).
        caption_dim: i64,
    },
}

/// How positions enter the GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbedding {
    /// LlamaGen's 2D RoPE (interleaved pairs, condition positions zeroed).
    #[default]
    Rope2d,
    /// A learned absolute embedding `abs_pe` `[cls_token_num + grid, dim]` added to the inputs (Tar's
    /// AR de-tokenizer); no RoPE.
    Learned,
    /// The same 2D RoPE on the image grid, but the condition positions are left unrotated instead
    /// of zeroed, so attention to caption rows depends on their content (LlamaGen's zeroing gives
    /// every caption row the same score). The project's own caption models; not LlamaGen's.
    Rope2dKeepCondition,
}

impl PositionEmbedding {
    /// True for both 2D RoPE kinds.
    pub fn is_rope(self) -> bool {
        matches!(self, Self::Rope2d | Self::Rope2dKeepCondition)
    }
}

fn default_multiple_of() -> i64 {
    256
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_rope_base() -> f64 {
    10000.0
}

/// Architecture and metadata of a LlamaGen-style GPT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Free-form model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hidden width.
    pub dim: i64,
    /// Number of transformer blocks.
    pub n_layer: i64,
    /// Number of query heads.
    pub n_head: i64,
    /// Number of key/value heads (GQA); `None` = `n_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<i64>,
    /// SwiGLU hidden size is rounded up to a multiple of this.
    #[serde(default = "default_multiple_of")]
    pub multiple_of: i64,
    /// Optional factor on the SwiGLU hidden size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_dim_multiplier: Option<f64>,
    /// Explicit SwiGLU hidden size, overriding `multiple_of` and `ffn_dim_multiplier` (set by the
    /// converter when a checkpoint does not follow LlamaGen's formula).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_hidden: Option<i64>,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
    /// Number of image token ids (the VQ codebook size).
    pub vocab_size: i64,
    /// Condition kind.
    pub condition: ConditionConfig,
    /// Number of condition positions before the image tokens (1 for c2i, 120 for LlamaGen t2i).
    pub cls_token_num: i64,
    /// Token grid of one image.
    pub grid: GridSize,
    /// Position embedding kind.
    #[serde(default)]
    pub position_embedding: PositionEmbedding,
    /// dtype the weights are stored and run in by default.
    #[serde(default)]
    pub dtype: DType,
    /// Size of the word vocabulary of a caption model that embeds its own caption words
    /// (`cls_embedding.word_embeddings.weight` `[caption_vocab, caption_dim]`; the emoji family).
    /// `None` for LlamaGen models, whose caption features come from T5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_vocab: Option<i64>,
    /// Sampling defaults for this model (LlamaGen's c2i defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingParams>,
    /// VQ model directory that decodes this model's tokens, relative to this model's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vq: Option<String>,
}

impl GptConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.dim / self.n_head
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// Bytes of the KV cache one session allocates: keys and values of every layer for the
    /// condition and the whole grid, `batch` sequences (2 with classifier-free guidance),
    /// `elem_bytes` per value (2 for bf16 / fp16, 4 for fp32).
    pub fn kv_cache_bytes(&self, batch: i64, elem_bytes: i64) -> i64 {
        let positions = self.cls_token_num + self.grid.len() as i64;
        2 * self.n_layer * batch * self.kv_heads() * positions * self.head_dim() * elem_bytes
    }

    /// SwiGLU hidden width, computed as LlamaGen does.
    pub fn ffn_hidden(&self) -> i64 {
        if let Some(h) = self.ffn_hidden {
            return h;
        }
        let mut hidden = (2 * 4 * self.dim) / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as i64;
        }
        let k = self.multiple_of;
        if hidden % k == 0 {
            hidden
        } else {
            hidden + k - hidden % k
        }
    }

    /// Positions of one full sequence: condition positions plus every grid token.
    pub fn max_positions(&self) -> i64 {
        self.cls_token_num + self.grid.len() as i64
    }

    /// Sampling defaults of this model.
    pub fn default_sampling(&self) -> SamplingParams {
        self.sampling.unwrap_or_default()
    }

    /// Checks that the architecture is consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.dim <= 0 || self.n_layer <= 0 || self.n_head <= 0 || self.vocab_size <= 0 {
            return bad("dim, n_layer, n_head and vocab_size must be positive".into());
        }
        if self.dim % self.n_head != 0 {
            return bad(format!(
                "dim {} is not divisible by n_head {}",
                self.dim, self.n_head
            ));
        }
        let kv = self.kv_heads();
        if kv <= 0 || self.n_head % kv != 0 {
            return bad(format!(
                "n_kv_head {kv} must be positive and divide n_head {}",
                self.n_head
            ));
        }
        if self.position_embedding.is_rope() && self.head_dim() % 4 != 0 {
            return bad(format!(
                "2D RoPE needs a head dim divisible by 4, got {}",
                self.head_dim()
            ));
        }
        if self.multiple_of <= 0 {
            return bad("multiple_of must be positive".into());
        }
        if self.grid.is_empty() {
            return bad("grid must have at least one token".into());
        }
        if self.cls_token_num <= 0 {
            return bad("cls_token_num must be at least 1".into());
        }
        match self.condition {
            ConditionConfig::Class { num_classes } => {
                if num_classes <= 0 {
                    return bad("condition.num_classes must be positive".into());
                }
                if self.cls_token_num != 1 {
                    return bad(format!(
                        "a class-conditional model has one condition token, cls_token_num is {}",
                        self.cls_token_num
                    ));
                }
            }
            ConditionConfig::Caption { caption_dim } => {
                if caption_dim <= 0 {
                    return bad("condition.caption_dim must be positive".into());
                }
            }
        }
        if let Some(s) = &self.sampling {
            s.validate()
                .map_err(|e| ModelError::Config(format!("sampling: {e}")))?;
        }
        Ok(())
    }
}

/// Architecture of a LlamaGen VQ tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    /// Free-form model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Number of codes.
    pub codebook_size: i64,
    /// Width of one code.
    pub codebook_embed_dim: i64,
    /// Whether codes and latents are L2-normalised before the nearest-code search.
    #[serde(default = "yes")]
    pub codebook_l2_norm: bool,
    /// Base channel count.
    pub ch: i64,
    /// Channel multipliers per encoder level.
    pub encoder_ch_mult: Vec<i64>,
    /// Channel multipliers per decoder level.
    pub decoder_ch_mult: Vec<i64>,
    /// Latent channels before `quant_conv`.
    pub z_channels: i64,
    /// Residual blocks per encoder level (the decoder has one more).
    #[serde(default = "two")]
    pub num_res_blocks: i64,
    /// dtype the weights are stored and run in by default.
    #[serde(default)]
    pub dtype: DType,
}

fn yes() -> bool {
    true
}
fn two() -> i64 {
    2
}

impl VqConfig {
    /// Pixels per token along each side (2^(levels − 1)).
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.encoder_ch_mult.len().saturating_sub(1))
    }

    /// Checks that the architecture is consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ModelError::Config(m.to_string()));
        if self.codebook_size <= 0 || self.codebook_embed_dim <= 0 {
            return bad("codebook_size and codebook_embed_dim must be positive");
        }
        if self.ch <= 0 || self.ch % 32 != 0 || self.z_channels <= 0 || self.z_channels % 32 != 0 {
            return bad(
                "ch and z_channels must be positive multiples of 32 (GroupNorm with 32 groups)",
            );
        }
        if self.encoder_ch_mult.is_empty() || self.decoder_ch_mult.is_empty() {
            return bad("encoder_ch_mult and decoder_ch_mult must not be empty");
        }
        if self.encoder_ch_mult.len() != self.decoder_ch_mult.len() {
            return bad("encoder_ch_mult and decoder_ch_mult must have the same length");
        }
        if self
            .encoder_ch_mult
            .iter()
            .chain(&self.decoder_ch_mult)
            .any(|&m| m <= 0)
        {
            return bad("channel multipliers must be positive");
        }
        if self.num_res_blocks <= 0 {
            return bad("num_res_blocks must be positive");
        }
        Ok(())
    }
}

/// The `config.json` of a model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type", rename_all = "snake_case")]
pub enum ModelConfig {
    /// An autoregressive token generator.
    Gpt(GptConfig),
    /// A VQ image tokenizer.
    Vq(VqConfig),
    /// A learned up-sampler of token grids (`U_r`).
    Upsampler(crate::upsampler::UpsamplerConfig),
    /// The evaluator CNN of the emoji family.
    Evaluator(crate::evaluator::EvaluatorConfig),
    /// A T5 text encoder (caption features of t2i GPTs).
    T5Encoder(crate::t5::T5Config),
}

impl ModelConfig {
    /// Reads and validates `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        match &cfg {
            ModelConfig::Gpt(c) => c.validate(),
            ModelConfig::Vq(c) => c.validate(),
            ModelConfig::Upsampler(c) => c.validate(),
            ModelConfig::Evaluator(c) => c.validate(),
            ModelConfig::T5Encoder(c) => c.validate(),
        }
        .map_err(|e| ModelError::Json {
            path,
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// What this config describes, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => "a GPT",
            ModelConfig::Vq(_) => "a VQ model",
            ModelConfig::Upsampler(_) => "an up-sampler",
            ModelConfig::Evaluator(_) => "an evaluator",
            ModelConfig::T5Encoder(_) => "a T5 text encoder",
        }
    }

    fn wrong_kind(dir: &Path, found: &ModelConfig, want: &str) -> ModelError {
        ModelError::Config(format!(
            "{} is {}, not {want}",
            dir.display(),
            found.kind_name()
        ))
    }

    /// Reads `<dir>/config.json`, which must describe a GPT.
    pub fn load_gpt(dir: &Path) -> Result<GptConfig> {
        match Self::load(dir)? {
            ModelConfig::Gpt(c) => Ok(c),
            other => Err(Self::wrong_kind(dir, &other, "a GPT")),
        }
    }

    /// Reads `<dir>/config.json`, which must describe a VQ model.
    pub fn load_vq(dir: &Path) -> Result<VqConfig> {
        match Self::load(dir)? {
            ModelConfig::Vq(c) => Ok(c),
            other => Err(Self::wrong_kind(dir, &other, "a VQ model")),
        }
    }

    /// Reads `<dir>/config.json`, which must describe an up-sampler.
    pub fn load_upsampler(dir: &Path) -> Result<crate::upsampler::UpsamplerConfig> {
        match Self::load(dir)? {
            ModelConfig::Upsampler(c) => Ok(c),
            other => Err(Self::wrong_kind(dir, &other, "an up-sampler")),
        }
    }

    /// Reads `<dir>/config.json`, which must describe an evaluator.
    pub fn load_evaluator(dir: &Path) -> Result<crate::evaluator::EvaluatorConfig> {
        match Self::load(dir)? {
            ModelConfig::Evaluator(c) => Ok(c),
            other => Err(Self::wrong_kind(dir, &other, "an evaluator")),
        }
    }

    /// Reads `<dir>/config.json`, which must describe a T5 text encoder.
    pub fn load_t5(dir: &Path) -> Result<crate::t5::T5Config> {
        match Self::load(dir)? {
            ModelConfig::T5Encoder(c) => Ok(c),
            other => Err(Self::wrong_kind(dir, &other, "a T5 text encoder")),
        }
    }

    /// Writes `<dir>/config.json`, creating the directory.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| ModelError::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
    }
}

/// Path of the weights file of a model directory.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS_FILE)
}
