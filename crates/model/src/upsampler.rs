//! The learned up-sampler `U_r` (DESIGN §2.2 step 2): low-res token ids `[B, h, w]` → high-res
//! token logits `[B, V, r·h, r·w]`.
//!
//! Tokens enter as their VQ code vectors (a frozen copy of the VQ's L2-normalised codebook, stored
//! with the up-sampler), pass residual blocks of row-causal convolutions at low resolution, a pixel
//! shuffle ×r, residual blocks of row-causal convolutions at high resolution and a classification
//! head over the codebook. Every convolution has a 2×3 kernel over rows `(a−1, a)`: output row `a`
//! never reads an input row below it, so high-res rows `r·a .. r·a+r−1` depend only on low-res rows
//! `≤ a`. Normalisation is per position (layer norm over channels), which keeps that property.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::config::{DType, ModelConfig};
use crate::error::{ModelError, Result};
use crate::{checkpoint, vq::l2_normalize};

/// Architecture of an up-sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpsamplerConfig {
    /// Free-form model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Codebook size `V` of the VQ model whose tokens it maps.
    pub codebook_size: i64,
    /// Width of one VQ code.
    pub codebook_embed_dim: i64,
    /// Up-sampling factor `r` (2 or 4).
    pub scale: i64,
    /// Hidden channels.
    pub channels: i64,
    /// Residual blocks at low resolution.
    pub low_blocks: i64,
    /// Residual blocks at high resolution.
    pub high_blocks: i64,
    /// Stored dtype of the weights.
    #[serde(default)]
    pub dtype: DType,
    /// Relative path of the VQ model directory whose codebook this up-sampler uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vq: Option<String>,
}

impl UpsamplerConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ModelError::Config(format!("up-sampler: {m}")));
        if self.codebook_size <= 1 || self.codebook_embed_dim <= 0 {
            return bad("codebook_size must be > 1 and codebook_embed_dim > 0");
        }
        if !matches!(self.scale, 2 | 4) {
            return bad("scale must be 2 or 4");
        }
        if self.channels <= 0 || self.low_blocks < 0 || self.high_blocks < 0 {
            return bad("channels must be positive and block counts non-negative");
        }
        Ok(())
    }
}

/// A convolution whose output row `a` reads input rows `a−1` and `a` (3 columns wide).
#[derive(Debug)]
struct RowCausalConv {
    conv: nn::Conv2D,
}

impl RowCausalConv {
    fn new(p: nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            conv: nn::conv(
                p,
                cin,
                cout,
                [2, 3],
                nn::ConvConfigND::<[i64; 2]>::default(),
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // Pad one column left and right and one row on top only.
        self.conv.forward(&x.constant_pad_nd([1, 1, 1, 0]))
    }
}

/// Layer norm over the channel dimension of `[B, C, H, W]`, per position.
fn channel_norm(norm: &nn::LayerNorm, x: &Tensor) -> Tensor {
    norm.forward(&x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
}

#[derive(Debug)]
struct Block {
    norm: nn::LayerNorm,
    conv1: RowCausalConv,
    conv2: RowCausalConv,
}

impl Block {
    fn new(p: nn::Path, c: i64) -> Self {
        Self {
            norm: nn::layer_norm(&p / "norm", vec![c], Default::default()),
            conv1: RowCausalConv::new(&p / "conv1", c, c),
            conv2: RowCausalConv::new(&p / "conv2", c, c),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&channel_norm(&self.norm, x)).silu();
        x + self.conv2.forward(&h)
    }
}

/// The up-sampler.
#[derive(Debug)]
pub struct Upsampler {
    cfg: UpsamplerConfig,
    vs: VarStore,
    codebook: Tensor,
    proj_in: nn::Conv2D,
    low: Vec<Block>,
    shuffle: nn::Conv2D,
    high: Vec<Block>,
    norm_out: nn::LayerNorm,
    head: nn::Conv2D,
}

impl Upsampler {
    /// A randomly initialised up-sampler with a zero codebook (set it with [`Self::set_codebook`]);
    /// global seed `seed`.
    pub fn random(cfg: UpsamplerConfig, device: Device, seed: i64) -> Result<Self> {
        cfg.validate()?;
        crate::seed::with_global_seed(seed, || Self::initialise(cfg, device))
    }

    /// The layers, initialised from the global generator.
    fn initialise(cfg: UpsamplerConfig, device: Device) -> Result<Self> {
        let vs = VarStore::new(device);
        let root = vs.root();
        let c = cfg.channels;
        let r = cfg.scale;
        let codebook =
            root.zeros_no_train("codebook", &[cfg.codebook_size, cfg.codebook_embed_dim]);
        let proj_in = nn::conv2d(
            &root / "proj_in",
            cfg.codebook_embed_dim,
            c,
            1,
            Default::default(),
        );
        let low = (0..cfg.low_blocks)
            .map(|i| Block::new(&root / "low" / i, c))
            .collect();
        let shuffle = nn::conv2d(&root / "shuffle", c, c * r * r, 1, Default::default());
        let high = (0..cfg.high_blocks)
            .map(|i| Block::new(&root / "high" / i, c))
            .collect();
        let norm_out = nn::layer_norm(&root / "norm_out", vec![c], Default::default());
        let head = nn::conv2d(&root / "head", c, cfg.codebook_size, 1, Default::default());
        Ok(Self {
            cfg,
            vs,
            codebook,
            proj_in,
            low,
            shuffle,
            high,
            norm_out,
            head,
        })
    }

    /// Loads `<dir>/config.json` (model_type `upsampler`) and `<dir>/model.safetensors`, in fp32.
    pub fn load(dir: &std::path::Path, device: Device) -> Result<Self> {
        let cfg = ModelConfig::load_upsampler(dir)?;
        let mut m = Self::random(cfg, device, 0)?;
        let unused = checkpoint::load_dir_weights(&mut m.vs, dir, DType::Fp32)?;
        if let Some(name) = unused.first() {
            return Err(ModelError::Config(format!(
                "{}: unexpected tensor '{name}' in an up-sampler",
                dir.display()
            )));
        }
        Ok(m)
    }

    /// Writes `<dir>/config.json` and `<dir>/model.safetensors` in `dtype`.
    pub fn save(&self, dir: &std::path::Path, dtype: DType) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.dtype = dtype;
        checkpoint::save_dir(ModelConfig::Upsampler(cfg), &self.vs, dir, dtype)
    }

    /// The configuration.
    pub fn config(&self) -> &UpsamplerConfig {
        &self.cfg
    }

    /// Sets the VQ link recorded in the written config.
    pub fn set_vq_link(&mut self, link: Option<String>) {
        self.cfg.vq = link;
    }

    /// The variables.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The variables, mutably (to load a checkpoint for training).
    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// Copies the VQ's code vectors `[V, E]` (as the quantiser uses them) into the frozen codebook.
    pub fn set_codebook(&mut self, codes: &Tensor) -> Result<()> {
        let want = [self.cfg.codebook_size, self.cfg.codebook_embed_dim];
        if codes.size() != want {
            return Err(ModelError::InvalidInput(format!(
                "codebook must be {want:?}, got {:?}",
                codes.size()
            )));
        }
        tch::no_grad(|| {
            self.codebook
                .copy_(&l2_normalize(&codes.to_kind(Kind::Float)))
        });
        Ok(())
    }

    fn check_tokens(&self, low: &Tensor) -> Result<()> {
        let s = low.size();
        if s.len() != 3 || s[1] == 0 || s[2] == 0 {
            return Err(ModelError::InvalidInput(format!(
                "low-res tokens must be [B, h, w] with h, w > 0, got {s:?}"
            )));
        }
        if low.kind() != Kind::Int64 {
            return Err(ModelError::InvalidInput(format!(
                "low-res tokens must be int64, got {:?}",
                low.kind()
            )));
        }
        let n = self.cfg.codebook_size;
        let (lo, hi) = (i64::try_from(low.min())?, i64::try_from(low.max())?);
        if lo < 0 || hi >= n {
            return Err(ModelError::InvalidInput(format!(
                "token ids must be in [0, {n}), found {}",
                if lo < 0 { lo } else { hi }
            )));
        }
        Ok(())
    }

    /// Logits `[B, V, r·h, r·w]` of the high-res tokens (with gradients, for training). `low` must
    /// hold valid ids (see [`Self::upsample`] for the checked path).
    pub fn logits(&self, low: &Tensor) -> Tensor {
        let s = low.size();
        let x = self
            .codebook
            .index_select(0, &low.reshape([-1]))
            .view([s[0], s[1], s[2], self.cfg.codebook_embed_dim])
            .permute([0, 3, 1, 2]);
        let mut h = self.proj_in.forward(&x);
        for b in &self.low {
            h = b.forward(&h);
        }
        h = self.shuffle.forward(&h).pixel_shuffle(self.cfg.scale);
        for b in &self.high {
            h = b.forward(&h);
        }
        self.head.forward(&channel_norm(&self.norm_out, &h).silu())
    }

    /// High-res token ids `[B, r·h, r·w]` (the most likely code per position) of low-res ids
    /// `[B, h, w]`. Rows `r·a ..` of the output depend only on input rows `≤ a`, so a prefix of
    /// drafted rows can be up-sampled before the rest exists.
    pub fn upsample(&self, low: &Tensor) -> Result<Tensor> {
        self.check_tokens(low)?;
        Ok(tch::no_grad(|| self.logits(low).argmax(1, false)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tiny() -> Upsampler {
        let cfg = UpsamplerConfig {
            name: None,
            codebook_size: 32,
            codebook_embed_dim: 4,
            scale: 2,
            channels: 16,
            low_blocks: 2,
            high_blocks: 1,
            dtype: DType::Fp32,
            vq: None,
        };
        let mut u = Upsampler::random(cfg, Device::Cpu, 3).unwrap();
        let codes =
            crate::seed::with_global_seed(4, || Tensor::randn([32, 4], (Kind::Float, Device::Cpu)));
        u.set_codebook(&codes).unwrap();
        u
    }

    #[test]
    fn output_rows_depend_only_on_input_rows_up_to_them() {
        let u = tiny();
        let low = crate::seed::with_global_seed(5, || {
            Tensor::randint(32, [2, 6, 5], (Kind::Int64, Device::Cpu))
        });
        let base = tch::no_grad(|| u.logits(&low));
        assert_eq!(base.size(), [2, 32, 12, 10]);
        for row in 0..6 {
            let changed = low.copy();
            changed
                .narrow(1, row, 1)
                .copy_(&((low.narrow(1, row, 1) + 7).remainder(32)));
            let out = tch::no_grad(|| u.logits(&changed));
            let diff = (&out - &base).abs().amax([0, 1, 3].as_slice(), false);
            let diff: Vec<f32> = Vec::try_from(diff).unwrap();
            for (hr, d) in diff.iter().enumerate() {
                if hr < 2 * row as usize {
                    assert_eq!(*d, 0.0, "changing low row {row} moved high row {hr}");
                }
            }
            // The rows it covers do change.
            assert!(diff[2 * row as usize] > 0.0 || diff[2 * row as usize + 1] > 0.0);
        }
    }

    #[test]
    fn prefix_upsampling_equals_full_upsampling() {
        let u = tiny();
        let low = crate::seed::with_global_seed(6, || {
            Tensor::randint(32, [1, 6, 5], (Kind::Int64, Device::Cpu))
        });
        let full = u.upsample(&low).unwrap();
        for rows in 1..6 {
            let part = u.upsample(&low.narrow(1, 0, rows)).unwrap();
            assert!(part.equal(&full.narrow(1, 0, 2 * rows)));
        }
    }

    #[test]
    fn bad_tokens_are_refused() {
        let u = tiny();
        let low = Tensor::from_slice(&[0i64, 40]).view([1, 1, 2]);
        let e = u.upsample(&low).unwrap_err().to_string();
        assert!(e.contains("[0, 32)") && e.contains("40"), "{e}");
        assert!(u
            .upsample(&Tensor::zeros([2, 2], (Kind::Int64, Device::Cpu)))
            .is_err());
    }

    #[test]
    fn save_and_load_round_trip() {
        let u = tiny();
        let dir = tempfile::tempdir().unwrap();
        u.save(dir.path(), DType::Fp32).unwrap();
        let v = Upsampler::load(dir.path(), Device::Cpu).unwrap();
        let low = crate::seed::with_global_seed(7, || {
            Tensor::randint(32, [1, 3, 3], (Kind::Int64, Device::Cpu))
        });
        assert!(u.upsample(&low).unwrap().equal(&v.upsample(&low).unwrap()));
    }
}
