//! `mulo train`: train the models of the emoji family.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mulo_engine::train::evaluator::{train_evaluator, EvaluatorTrainOptions};
use mulo_engine::train::gpt::{train_gpt, GptTrainOptions};
use mulo_engine::train::upsampler::{train_upsampler, UpsamplerTrainOptions};
use mulo_engine::train::vq::{train_vq, VqTrainOptions};
use mulo_engine::{EngineError, TorchWorker};
use mulo_model::{DType, VqConfig};
use serde::Serialize;

use crate::common::RuntimeArgs;

/// What to train.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// The VQ tokenizer (4x down-sampling: 64 px -> 16x16 tokens, 32 px -> 8x8).
    Vq(TrainVqArgs),
    /// The target GPT: 64 px, 16x16 tokens, caption-conditioned.
    Target(TrainGptArgs),
    /// The drafter GPT: 32 px, 8x8 tokens (r = 2), the target's architecture.
    Drafter(TrainGptArgs),
    /// The small high-resolution draft model for the SD and LANTERN baselines (64 px, 1 layer).
    DraftSmall(TrainGptArgs),
    /// The up-sampler U_2: 8x8 drafter tokens -> 16x16 target token proposals (row-causal).
    Upsampler(TrainUpsamplerArgs),
    /// The evaluator CNN (category and subcategory classifier; its features serve FID-emoji).
    Evaluator(TrainEvaluatorArgs),
}

/// Arguments of `mulo train upsampler`.
#[derive(Debug, Args)]
pub struct TrainUpsamplerArgs {
    /// Data directory from `mulo data emoji` (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The trained VQ model directory.
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub vq: PathBuf,
    /// Model directory to write.
    #[arg(long, default_value = "models/emoji/upsampler", value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoints and loss log (default ~/.cache/mulo/train/upsampler).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Hidden channels.
    #[arg(long, default_value_t = 128)]
    pub channels: i64,
    /// Residual blocks at low resolution (8x8).
    #[arg(long, default_value_t = 4)]
    pub low_blocks: i64,
    /// Residual blocks at high resolution (16x16).
    #[arg(long, default_value_t = 2)]
    pub high_blocks: i64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Image pairs per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the last checkpoint in --work.
    #[arg(long)]
    pub resume: bool,
    /// Storage dtype of the written model.
    #[arg(long, default_value = "fp16")]
    pub store_dtype: DType,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Arguments of `mulo train evaluator`.
#[derive(Debug, Args)]
pub struct TrainEvaluatorArgs {
    /// Data directory from `mulo data emoji` (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Model directory to write.
    #[arg(long, default_value = "models/emoji/evaluator", value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoints and loss log (default ~/.cache/mulo/train/evaluator).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2500)]
    pub steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Share of steps that show the images at 32 px (resized back to 64).
    #[arg(long, default_value_t = 0.3)]
    pub low_res_share: f64,
    /// Channels of the four stages.
    #[arg(long, default_value = "32,64,128,256", value_delimiter = ',')]
    pub channels: Vec<i64>,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the last checkpoint in --work.
    #[arg(long)]
    pub resume: bool,
    /// Storage dtype of the written model.
    #[arg(long, default_value = "fp16")]
    pub store_dtype: DType,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Arguments of `mulo train target|drafter|draft-small` (unset architecture flags take the role's
/// defaults).
#[derive(Debug, Args)]
pub struct TrainGptArgs {
    /// Data directory from `mulo data emoji` (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The trained VQ model directory.
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub vq: PathBuf,
    /// Model directory to write (default models/emoji/<role>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Checkpoints and loss log (default ~/.cache/mulo/train/<role>).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Hidden width.
    #[arg(long, default_value_t = 256)]
    pub dim: i64,
    /// Transformer blocks (default 6; 1 for draft-small).
    #[arg(long)]
    pub n_layer: Option<i64>,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    pub n_head: i64,
    /// Caption word positions.
    #[arg(long, default_value_t = 16)]
    pub caption_len: usize,
    /// Width of the caption word embeddings.
    #[arg(long, default_value_t = 64)]
    pub caption_dim: i64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Probability of the null caption per training sequence (CFG).
    #[arg(long, default_value_t = 0.1)]
    pub cond_drop: f64,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the last checkpoint in --work.
    #[arg(long)]
    pub resume: bool,
    /// Storage dtype of the written model.
    #[arg(long, default_value = "fp16")]
    pub store_dtype: DType,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn home_cache(rel: &str) -> PathBuf {
    crate::common::cache_root().join(rel)
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
    /// Optimizer steps.
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Share of the steps that train on 32 px images (spread evenly; the others use 64 px).
    #[arg(long, default_value_t = 0.5)]
    pub low_res_share: f64,
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
    match cmd {
        TrainCommand::Vq(a) => run_vq(a),
        TrainCommand::Target(a) => run_gpt("target", 64, 6, a),
        TrainCommand::Drafter(a) => run_gpt("drafter", 32, 6, a),
        TrainCommand::DraftSmall(a) => run_gpt("draft-small", 64, 1, a),
        TrainCommand::Upsampler(a) => run_upsampler(a),
        TrainCommand::Evaluator(a) => run_evaluator(a),
    }
}

fn run_upsampler(a: TrainUpsamplerArgs) -> Result<()> {
    let opts = UpsamplerTrainOptions {
        data: a.data.clone().unwrap_or_else(|| home_cache("data/emoji")),
        vq: a.vq.clone(),
        out: a.out.clone(),
        work: a
            .work
            .clone()
            .unwrap_or_else(|| home_cache("train/upsampler")),
        channels: a.channels,
        low_blocks: a.low_blocks,
        high_blocks: a.high_blocks,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        seed: a.seed,
        resume: a.resume,
        dtype: a.store_dtype,
        vq_link: Some("../vq".into()),
    };
    let r = run_training(&opts, opts.steps, &opts.out, &a.runtime, train_upsampler)?;
    println!(
        "trained the up-sampler in {:.0} s ({} steps, {:.2} M parameters, final loss {:.4}): held-out token accuracy {:.1}% (repeating each low-res token: {:.1}%), NLL {:.4} nats; D_2(U_2(y)) = y for {:.1}% of low-res tokens (D_2 of the real 64 px tokens: {:.1}%) ({} held-out images); wrote {}",
        r.seconds,
        r.steps,
        r.parameters as f64 / 1e6,
        r.final_loss,
        r.heldout_token_accuracy * 100.0,
        r.repeat_token_accuracy * 100.0,
        r.heldout_nll,
        r.roundtrip_agreement * 100.0,
        r.downsample_agreement * 100.0,
        r.heldout_images,
        opts.out.display()
    );
    Ok(())
}

fn run_evaluator(a: TrainEvaluatorArgs) -> Result<()> {
    let opts = EvaluatorTrainOptions {
        data: a.data.clone().unwrap_or_else(|| home_cache("data/emoji")),
        out: a.out.clone(),
        work: a
            .work
            .clone()
            .unwrap_or_else(|| home_cache("train/evaluator")),
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        low_res_share: a.low_res_share,
        channels: a.channels.clone(),
        seed: a.seed,
        resume: a.resume,
        dtype: a.store_dtype,
    };
    let r = run_training(&opts, opts.steps, &opts.out, &a.runtime, train_evaluator)?;
    println!(
        "trained the evaluator in {:.0} s ({} steps, final loss {:.4}): held-out accuracy at 64 px: category {:.1}%, subcategory {:.1}%; at 32 px: category {:.1}%, subcategory {:.1}% ({} held-out images); wrote {}",
        r.seconds,
        r.steps,
        r.final_loss,
        r.category_accuracy * 100.0,
        r.subcategory_accuracy * 100.0,
        r.category_accuracy_32 * 100.0,
        r.subcategory_accuracy_32 * 100.0,
        r.heldout_images,
        opts.out.display()
    );
    Ok(())
}

/// Runs `train` on a torch worker with a progress bar, then writes `<out>/train_report.json`
/// with the options and the report.
fn run_training<O, R, F>(
    opts: &O,
    steps: usize,
    out: &Path,
    runtime: &RuntimeArgs,
    train: F,
) -> Result<R>
where
    O: Serialize + Clone + Send + 'static,
    R: Serialize + Send + 'static,
    F: FnOnce(&O, tch::Device, &mut dyn FnMut(usize, usize, f64)) -> Result<R, EngineError>
        + Send
        + 'static,
{
    let runtime = runtime.clone();
    let worker = TorchWorker::spawn("torch", move || -> Result<tch::Device> { runtime.setup() })?;
    let bar = progress_bar(steps);
    let pb = bar.clone();
    let o = opts.clone();
    let report = worker.run(move |device: &mut tch::Device| {
        let mut progress = |step: usize, _total: usize, loss: f64| {
            pb.set_position(step as u64);
            pb.set_message(format!("{loss:.4}"));
        };
        train(&o, *device, &mut progress)
    })??;
    bar.finish_and_clear();
    let path = out.join("train_report.json");
    let text =
        serde_json::to_string_pretty(&serde_json::json!({"options": opts, "report": &report}))?;
    std::fs::write(&path, text + "\n").with_context(|| format!("{}", path.display()))?;
    Ok(report)
}

fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps  loss {msg}  {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn run_gpt(role: &str, image_size: usize, layers: i64, a: TrainGptArgs) -> Result<()> {
    let opts = GptTrainOptions {
        data: a.data.clone().unwrap_or_else(|| home_cache("data/emoji")),
        vq: a.vq.clone(),
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("models/emoji/{role}"))),
        work: a
            .work
            .clone()
            .unwrap_or_else(|| home_cache(&format!("train/{role}"))),
        image_size,
        dim: a.dim,
        n_layer: a.n_layer.unwrap_or(layers),
        n_head: a.n_head,
        caption_len: a.caption_len,
        caption_dim: a.caption_dim,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        cond_drop: a.cond_drop,
        seed: a.seed,
        resume: a.resume,
        dtype: a.store_dtype,
        vq_link: Some("../vq".into()),
    };
    let report = run_training(&opts, opts.steps, &opts.out, &a.runtime, train_gpt)?;
    println!(
        "trained the {role} GPT in {:.0} s ({} steps, {:.2} M parameters, final loss {:.4}): held-out token NLL {:.4} nats; wrote {}",
        report.seconds,
        report.steps,
        report.parameters as f64 / 1e6,
        report.final_loss,
        report.heldout_nll,
        opts.out.display()
    );
    Ok(())
}

fn run_vq(a: TrainVqArgs) -> Result<()> {
    let opts = VqTrainOptions {
        data: a.data.clone().unwrap_or_else(|| home_cache("data/emoji")),
        out: a.out.clone(),
        work: a.work.clone().unwrap_or_else(|| home_cache("train/vq")),
        steps: a.steps,
        low_res_share: a.low_res_share,
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
    let report = run_training(&opts, opts.steps, &opts.out, &a.runtime, train_vq)?;
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
