//! The evaluator CNN of the emoji family: a small classifier of category and subcategory whose
//! penultimate features serve FID-emoji (DESIGN §6). Input: `[B, 3, 64, 64]` in [-1, 1]; other
//! sizes are resized to 64 px (bilinear) first.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::{DType, ModelConfig};
use crate::error::{ModelError, Result};

/// Architecture of the evaluator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorConfig {
    /// Channels of the four stages (64, 32, 16, 8 px).
    pub channels: Vec<i64>,
    /// Number of categories.
    pub categories: i64,
    /// Number of subcategories.
    pub subcategories: i64,
    /// Category labels, by id.
    pub category_names: Vec<String>,
    /// Subcategory labels, by id.
    pub subcategory_names: Vec<String>,
    /// Stored dtype.
    #[serde(default)]
    pub dtype: DType,
}

/// Class scores and features of a batch.
#[derive(Debug)]
pub struct EvaluatorOutput {
    /// Penultimate features `[B, channels.last]` (for FID-emoji).
    pub features: Tensor,
    /// Category logits `[B, categories]`.
    pub category: Tensor,
    /// Subcategory logits `[B, subcategories]`.
    pub subcategory: Tensor,
}

#[derive(Debug)]
struct Stage {
    conv1: nn::Conv2D,
    norm1: nn::GroupNorm,
    conv2: nn::Conv2D,
    norm2: nn::GroupNorm,
}

/// The evaluator CNN.
#[derive(Debug)]
pub struct Evaluator {
    cfg: EvaluatorConfig,
    vs: VarStore,
    stages: Vec<Stage>,
    category: nn::Linear,
    subcategory: nn::Linear,
}

impl EvaluatorConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.channels.is_empty() || self.channels.iter().any(|&c| c <= 0 || c % 8 != 0) {
            return Err(ModelError::Config(
                "evaluator channels must be positive multiples of 8".into(),
            ));
        }
        if self.categories as usize != self.category_names.len()
            || self.subcategories as usize != self.subcategory_names.len()
        {
            return Err(ModelError::Config(
                "evaluator class counts do not match the label lists".into(),
            ));
        }
        Ok(())
    }
}

impl Evaluator {
    /// A randomly initialised evaluator; global seed `seed`.
    pub fn random(cfg: EvaluatorConfig, device: Device, seed: i64) -> Result<Self> {
        cfg.validate()?;
        crate::seed::with_global_seed(seed, || Self::initialise(cfg, device))
    }

    /// The layers, initialised from the global generator.
    fn initialise(cfg: EvaluatorConfig, device: Device) -> Result<Self> {
        let vs = VarStore::new(device);
        let root = vs.root();
        let mut stages = Vec::new();
        let mut cin = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            let p = &root / "stages" / i;
            let conv = |name: &str, cin: i64, stride: i64| {
                nn::conv2d(
                    &p / name,
                    cin,
                    c,
                    3,
                    nn::ConvConfig {
                        stride,
                        padding: 1,
                        ..Default::default()
                    },
                )
            };
            let gn = |name: &str| nn::group_norm(&p / name, 8, c, Default::default());
            stages.push(Stage {
                conv1: conv("conv1", cin, if i == 0 { 1 } else { 2 }),
                norm1: gn("norm1"),
                conv2: conv("conv2", c, 1),
                norm2: gn("norm2"),
            });
            cin = c;
        }
        let category = nn::linear(&root / "category", cin, cfg.categories, Default::default());
        let subcategory = nn::linear(
            &root / "subcategory",
            cin,
            cfg.subcategories,
            Default::default(),
        );
        Ok(Self {
            cfg,
            vs,
            stages,
            category,
            subcategory,
        })
    }

    /// Loads `<dir>/config.json` (model_type `evaluator`) and `<dir>/model.safetensors`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg = ModelConfig::load_evaluator(dir)?;
        let mut m = Self::random(cfg, device, 0)?;
        let unused = checkpoint::load_dir_weights(&mut m.vs, dir, DType::Fp32)?;
        if let Some(name) = unused.first() {
            return Err(ModelError::Config(format!(
                "{}: unexpected tensor '{name}' in an evaluator",
                dir.display()
            )));
        }
        Ok(m)
    }

    /// Writes `<dir>/config.json` and `<dir>/model.safetensors` in `dtype`.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.dtype = dtype;
        checkpoint::save_dir(ModelConfig::Evaluator(cfg), &self.vs, dir, dtype)
    }

    /// The configuration.
    pub fn config(&self) -> &EvaluatorConfig {
        &self.cfg
    }

    /// The variables.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The variables, mutably (to unfreeze or load a checkpoint for training).
    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// Features and class logits of images `[B, 3, H, W]` in [-1, 1] (resized to 64 px).
    pub fn forward(&self, images: &Tensor) -> EvaluatorOutput {
        let s = images.size();
        let mut h = images.to_kind(Kind::Float);
        if s[2] != 64 || s[3] != 64 {
            h = h.upsample_bilinear2d([64, 64], false, None, None);
        }
        for st in &self.stages {
            h = st.norm1.forward(&st.conv1.forward(&h)).silu();
            h = st.norm2.forward(&st.conv2.forward(&h)).silu();
        }
        let features = h.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        EvaluatorOutput {
            category: self.category.forward(&features),
            subcategory: self.subcategory.forward(&features),
            features,
        }
    }
}
