//! `mulo train`: train the models of the emoji family.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mulo_engine::train::vq::{train_vq, VqTrainOptions};
use mulo_engine::TorchWorker;
use mulo_model::{DType, VqConfig};

use crate::common::RuntimeArgs;

/// What to train.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// The VQ tokenizer (4x down-sampling: 64 px -> 16x16 tokens, 32 px -> 8x8).
    Vq(TrainVqArgs),
}

fn home_cache(rel: &str) -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/mulo")
        .join(rel)
}

/// Arguments of `mulo train vq`.
#[derive(Debug, Args)]
pub struct TrainVqArgs {
    /// Data directory from `mulo data emoji` (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Model directory to write.
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoints and loss log (default ~/.cache/mulo/train/vq).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Optimizer steps (even steps 64 px, odd steps 32 px).
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Images per 64 px step (32 px steps use twice as many).
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the last checkpoint in --work.
    #[arg(long)]
    pub resume: bool,
    /// Number of codes.
    #[arg(long, default_value_t = 1024)]
    pub codebook_size: i64,
    /// Width of one code.
    #[arg(long, default_value_t = 8)]
    pub embed_dim: i64,
    /// Base channels.
    #[arg(long, default_value_t = 32)]
    pub ch: i64,
    /// Channel multipliers per level (3 levels = 4x down-sampling).
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub ch_mult: Vec<i64>,
    /// Latent channels.
    #[arg(long, default_value_t = 64)]
    pub z_channels: i64,
    /// Residual blocks per encoder level (the decoder has one more).
    #[arg(long, default_value_t = 1)]
    pub num_res_blocks: i64,
    /// Storage dtype of the written model.
    #[arg(long, default_value = "fp16")]
    pub store_dtype: DType,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Runs `mulo train`.
pub fn run(cmd: TrainCommand) -> Result<()> {
    let TrainCommand::Vq(a) = cmd;
    let opts = VqTrainOptions {
        data: a.data.clone().unwrap_or_else(|| home_cache("data/emoji")),
        out: a.out.clone(),
        work: a.work.clone().unwrap_or_else(|| home_cache("train/vq")),
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        resume: a.resume,
        config: VqConfig {
            name: Some("emoji-vq".into()),
            codebook_size: a.codebook_size,
            codebook_embed_dim: a.embed_dim,
            codebook_l2_norm: true,
            ch: a.ch,
            encoder_ch_mult: a.ch_mult.clone(),
            decoder_ch_mult: a.ch_mult.clone(),
            z_channels: a.z_channels,
            num_res_blocks: a.num_res_blocks,
            dtype: a.store_dtype,
        },
        dtype: a.store_dtype,
    };
    opts.config.validate()?;
    let runtime = a.runtime.clone();
    let worker = TorchWorker::spawn("torch", move || -> Result<tch::Device> { runtime.setup() })?;
    let bar = ProgressBar::new(opts.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps  loss {msg}  {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let pb = bar.clone();
    let o = opts.clone();
    let report = worker.run(move |device: &mut tch::Device| {
        let mut progress = |step: usize, _total: usize, loss: f64| {
            pb.set_position(step as u64);
            pb.set_message(format!("{loss:.4}"));
        };
        train_vq(&o, *device, &mut progress)
    })??;
    bar.finish_and_clear();
    let path = opts.out.join("train_report.json");
    let text =
        serde_json::to_string_pretty(&serde_json::json!({"options": opts, "report": report}))?;
    std::fs::write(&path, text + "\n").with_context(|| format!("{}", path.display()))?;
    println!(
        "trained the VQ in {:.0} s ({} steps, final loss {:.4}): held-out PSNR {:.2} dB at 64 px, {:.2} dB at 32 px, codebook usage {:.1}% ({} held-out images); wrote {}",
        report.seconds,
        report.steps,
        report.final_loss,
        report.psnr64,
        report.psnr32,
        report.codebook_usage * 100.0,
        report.heldout_images,
        opts.out.display()
    );
    Ok(())
}
