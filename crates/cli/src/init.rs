//! `mulo init`: randomly initialised models in the project format, for demos and tests.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use mulo_core::{GridSize, SamplingParams};
use mulo_engine::TorchWorker;
use mulo_model::config::{ConditionConfig, PositionEmbedding};
use mulo_model::{DType, Gpt, GptConfig, Upsampler, UpsamplerConfig, VqConfig, VqModel};

use crate::common::parse_grid;

/// What to initialise.
#[derive(Debug, Subcommand)]
pub enum InitCommand {
    /// A random GPT.
    Gpt(InitGptArgs),
    /// A random VQ tokenizer.
    Vq(InitVqArgs),
    /// A random up-sampler over a VQ model's codebook.
    Upsampler(InitUpsamplerArgs),
}

/// Condition kind of a new GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CondKind {
    /// Class ids (c2i).
    Class,
    /// Caption features (t2i).
    Caption,
}

/// Arguments of `mulo init gpt`.
#[derive(Debug, Args)]
pub struct InitGptArgs {
    /// Output model directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Condition kind.
    #[arg(long, value_enum, default_value = "class")]
    pub condition: CondKind,
    /// Hidden width.
    #[arg(long, default_value_t = 64)]
    pub dim: i64,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    pub n_layer: i64,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub n_head: i64,
    /// Key/value heads (GQA; default: n_head).
    #[arg(long)]
    pub n_kv_head: Option<i64>,
    /// Vocabulary (codebook) size.
    #[arg(long, default_value_t = 256)]
    pub vocab: i64,
    /// Token grid as N or ROWSxCOLS.
    #[arg(long, default_value = "8", value_parser = parse_grid)]
    pub grid: GridSize,
    /// Classes of a class-conditional model.
    #[arg(long, default_value_t = 10)]
    pub num_classes: i64,
    /// Caption feature width of a caption-conditional model.
    #[arg(long, default_value_t = 32)]
    pub caption_dim: i64,
    /// Caption rows (condition tokens) of a caption-conditional model.
    #[arg(long, default_value_t = 8)]
    pub caption_len: i64,
    /// Use a learned absolute position embedding instead of 2D RoPE (Tar's variant).
    #[arg(long)]
    pub learned_positions: bool,
    /// Standard deviation of the random weights.
    #[arg(long, default_value_t = 0.02)]
    pub init_std: f64,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// VQ model directory to record, relative to --out.
    #[arg(long, value_name = "REL")]
    pub vq: Option<String>,
    /// Storage dtype.
    #[arg(long, default_value = "fp32")]
    pub dtype: DType,
}

/// Arguments of `mulo init vq`.
#[derive(Debug, Args)]
pub struct InitVqArgs {
    /// Output model directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of codes.
    #[arg(long, default_value_t = 256)]
    pub codebook_size: i64,
    /// Width of one code.
    #[arg(long, default_value_t = 8)]
    pub embed_dim: i64,
    /// Base channels (a multiple of 32).
    #[arg(long, default_value_t = 32)]
    pub ch: i64,
    /// Channel multipliers per level, comma-separated (levels − 1 = log2 of the down-sampling).
    #[arg(long, default_value = "1,1,2", value_delimiter = ',')]
    pub ch_mult: Vec<i64>,
    /// Latent channels (a multiple of 32).
    #[arg(long, default_value_t = 32)]
    pub z_channels: i64,
    /// Residual blocks per encoder level.
    #[arg(long, default_value_t = 1)]
    pub num_res_blocks: i64,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Storage dtype.
    #[arg(long, default_value = "fp32")]
    pub dtype: DType,
}

/// Arguments of `mulo init upsampler`.
#[derive(Debug, Args)]
pub struct InitUpsamplerArgs {
    /// Output model directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// VQ model directory whose codebook the up-sampler embeds (recorded relative to --out).
    #[arg(long, value_name = "DIR")]
    pub vq: PathBuf,
    /// Up-sampling factor (2 or 4).
    #[arg(long, default_value_t = 2)]
    pub scale: i64,
    /// Hidden channels.
    #[arg(long, default_value_t = 32)]
    pub channels: i64,
    /// Residual blocks at low resolution.
    #[arg(long, default_value_t = 1)]
    pub low_blocks: i64,
    /// Residual blocks at high resolution.
    #[arg(long, default_value_t = 1)]
    pub high_blocks: i64,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

fn init_upsampler(worker: &TorchWorker<()>, a: InitUpsamplerArgs) -> Result<()> {
    if a.out.join("config.json").exists() {
        bail!("{} already holds a model", a.out.display());
    }
    let vq_cfg = mulo_model::ModelConfig::load_vq(&a.vq)?;
    std::fs::create_dir_all(&a.out)?;
    let link = crate::common::relative_link(&a.out, &a.vq)?;
    let cfg = UpsamplerConfig {
        name: Some("random".into()),
        codebook_size: vq_cfg.codebook_size,
        codebook_embed_dim: vq_cfg.codebook_embed_dim,
        scale: a.scale,
        channels: a.channels,
        low_blocks: a.low_blocks,
        high_blocks: a.high_blocks,
        dtype: DType::Fp32,
        vq: Some(link),
    };
    let (out, vq) = (a.out.clone(), a.vq.clone());
    worker.run(move |_| -> Result<()> {
        let (vq, _) = VqModel::load(&vq, tch::Device::Cpu, Some(DType::Fp32))?;
        let mut m = Upsampler::random(cfg, tch::Device::Cpu, a.seed)?;
        m.set_codebook(&vq.codes())?;
        m.save(&out, DType::Fp32)?;
        Ok(())
    })??;
    println!(
        "wrote a random up-sampler (x{}) to {}",
        a.scale,
        a.out.display()
    );
    Ok(())
}

/// Runs `mulo init`.
pub fn run(cmd: InitCommand) -> Result<()> {
    let worker = TorchWorker::spawn("torch", || Ok::<_, anyhow::Error>(()))?;
    match cmd {
        InitCommand::Gpt(a) => {
            if a.out.join("config.json").exists() {
                bail!("{} already holds a model", a.out.display());
            }
            let (condition, cls) = match a.condition {
                CondKind::Class => (
                    ConditionConfig::Class {
                        num_classes: a.num_classes,
                    },
                    1,
                ),
                CondKind::Caption => (
                    ConditionConfig::Caption {
                        caption_dim: a.caption_dim,
                    },
                    a.caption_len,
                ),
            };
            let cfg = GptConfig {
                name: Some("random".into()),
                dim: a.dim,
                n_layer: a.n_layer,
                n_head: a.n_head,
                n_kv_head: a.n_kv_head,
                multiple_of: 32,
                ffn_dim_multiplier: None,
                ffn_hidden: None,
                norm_eps: 1e-5,
                rope_base: 10000.0,
                vocab_size: a.vocab,
                condition,
                cls_token_num: cls,
                grid: a.grid,
                position_embedding: if a.learned_positions {
                    PositionEmbedding::Learned
                } else {
                    PositionEmbedding::Rope2d
                },
                dtype: a.dtype,
                caption_vocab: None,
                sampling: Some(SamplingParams::default()),
                vq: a.vq.clone(),
            };
            let out = a.out.clone();
            worker.run(move |_| -> Result<()> {
                let m = Gpt::random(cfg, tch::Device::Cpu, DType::Fp32, a.seed, a.init_std)?;
                m.save(&out, a.dtype)?;
                Ok(())
            })??;
            println!("wrote a random GPT to {}", a.out.display());
        }
        InitCommand::Vq(a) => {
            if a.out.join("config.json").exists() {
                bail!("{} already holds a model", a.out.display());
            }
            let cfg = VqConfig {
                name: Some("random".into()),
                codebook_size: a.codebook_size,
                codebook_embed_dim: a.embed_dim,
                codebook_l2_norm: true,
                ch: a.ch,
                encoder_ch_mult: a.ch_mult.clone(),
                decoder_ch_mult: a.ch_mult.clone(),
                z_channels: a.z_channels,
                num_res_blocks: a.num_res_blocks,
                dtype: a.dtype,
            };
            let out = a.out.clone();
            worker.run(move |_| -> Result<()> {
                let m = VqModel::random(cfg, tch::Device::Cpu, DType::Fp32, a.seed)?;
                m.save(&out, a.dtype)?;
                Ok(())
            })??;
            println!("wrote a random VQ tokenizer to {}", a.out.display());
        }
        InitCommand::Upsampler(a) => init_upsampler(&worker, a)?,
    }
    Ok(())
}
