//! `mulo train`: train the models of the emoji family.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mulo_engine::TorchWorker;
use mulo_model::{DType, VqConfig};
use mulo_train::trainers::evaluator::{train_evaluator, EvaluatorTrainOptions};
use mulo_train::trainers::gpt::{train_gpt, GptTrainOptions};
use mulo_train::trainers::upsampler::{train_upsampler, UpsamplerTrainOptions};
use mulo_train::trainers::vq::{train_vq, train_vq_decoder, VqDecoderOptions, VqTrainOptions};
use mulo_train::trainers::Stop;
use mulo_train::TrainError;
use serde::Serialize;

use crate::card::{write_card, FIRST_VQ_REPORT, TRAIN_REPORT};
use crate::common::RuntimeArgs;

/// What to train.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// The VQ tokenizer (4x down-sampling: 64 px -> 16x16 tokens, 32 px -> 8x8).
    Vq(TrainVqArgs),
    /// Retrain only the decoder of a trained VQ on its own frozen tokens (every token stays the
    /// same, so GPTs trained on them stay valid).
    VqDecoder(TrainVqDecoderArgs),
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
    /// The whole family from scratch: data (when missing), vq, evaluator, target, drafter,
    /// draft-small, upsampler, then `mulo eval` of the target and the drafter, model cards and
    /// family.json.
    All(TrainAllArgs),
}

/// A stage of `mulo train all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// The VQ tokenizer.
    Vq,
    /// The VQ decoder fine-tuned for both resolutions (encoder, codebook and tokens kept).
    VqDecoder,
    /// The evaluator CNN.
    Evaluator,
    /// The target GPT.
    Target,
    /// The drafter GPT.
    Drafter,
    /// The small high-resolution draft model.
    DraftSmall,
    /// The up-sampler.
    Upsampler,
    /// `mulo vq-probe` of the VQ, `mulo eval` of the target (with the sample grid) and of the
    /// drafter.
    Eval,
    /// Re-render every MODEL_CARD.md from the reports on disk.
    Cards,
}

const STAGES: [Stage; 9] = [
    Stage::Vq,
    Stage::VqDecoder,
    Stage::Evaluator,
    Stage::Target,
    Stage::Drafter,
    Stage::DraftSmall,
    Stage::Upsampler,
    Stage::Eval,
    Stage::Cards,
];

/// Arguments of `mulo train all`.
#[derive(Debug, Args)]
pub struct TrainAllArgs {
    /// Family directory to write: one subdirectory per model, family.json, samples.png.
    #[arg(long, default_value = "models/emoji", value_name = "DIR")]
    pub family: PathBuf,
    /// Data directory (built with `mulo data emoji` first when it holds no meta.json; default
    /// ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Run only these stages (comma-separated, in the fixed order); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Stage>,
    /// Skip a model whose directory already holds a train_report.json (to continue an
    /// interrupted run).
    #[arg(long)]
    pub skip_existing: bool,
    /// Continue each model's training from its last checkpoint in the work directory (with
    /// --skip-existing: carry an interrupted `train all` on where it stopped).
    #[arg(long)]
    pub resume: bool,
    /// Images per method in the evaluation stage.
    #[arg(long, default_value_t = 256)]
    pub eval_n: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "MULO_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Torch intra-op threads (default: torch's choice, one per core).
    #[arg(long, env = "MULO_THREADS")]
    pub threads: Option<i32>,
}

#[derive(Debug, clap::Parser)]
#[command(name = "mulo")]
struct StageCli {
    #[command(subcommand)]
    top: StageTop,
}

#[derive(Debug, clap::Subcommand)]
enum StageTop {
    #[command(subcommand)]
    Train(TrainCommand),
    Eval(crate::eval::EvalArgs),
    VqProbe(crate::vq_probe::VqProbeArgs),
    #[command(subcommand)]
    Data(crate::data::DataCommand),
}

/// Parses and runs `mulo <argv...>` as one stage, recording the command line.
fn run_argv(argv: &[String]) -> Result<()> {
    let line = std::iter::once("mulo".to_string())
        .chain(argv.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    println!("==> {line}");
    let cli = <StageCli as clap::Parser>::try_parse_from(
        std::iter::once("mulo".to_string()).chain(argv.iter().cloned()),
    )
    .with_context(|| format!("internal stage command '{line}'"))?;
    match cli.top {
        StageTop::Train(c) => run_stage(c, &line),
        StageTop::Eval(a) => crate::eval::run(a),
        StageTop::VqProbe(a) => crate::vq_probe::run(a),
        StageTop::Data(c) => crate::data::run(c),
    }
}

fn run_all(a: TrainAllArgs) -> Result<()> {
    let fam = a.family.clone();
    let data = a.data.clone().unwrap_or_else(|| home_cache("data/emoji"));
    let s = |p: &Path| p.display().to_string();
    let mut runtime = vec!["--device".to_string(), a.device.clone()];
    if let Some(t) = a.threads {
        runtime.extend(["--threads".to_string(), t.to_string()]);
    }
    if !data.join("meta.json").is_file() {
        run_argv(&["data".into(), "emoji".into(), "--out".into(), s(&data)])?;
    }
    std::fs::create_dir_all(&fam).with_context(|| s(&fam))?;
    let family_file = mulo_engine::family::FamilyFile {
        name: "emoji".into(),
        scale: 2,
        target: "target".into(),
        drafter: "drafter".into(),
        upsampler: "upsampler".into(),
        downsampler: mulo_engine::family::Downsampler::VqArea,
        vq: "vq".into(),
        draft_small: Some("draft-small".into()),
        evaluator: Some("evaluator".into()),
        text_encoder: None,
    };
    let path = fam.join(mulo_engine::family::FAMILY_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&family_file)? + "\n")
        .with_context(|| s(&path))?;
    let vq = fam.join("vq");
    for stage in STAGES {
        if !a.only.is_empty() && !a.only.contains(&stage) {
            continue;
        }
        let (sub, dir) = match stage {
            Stage::Vq => ("vq", vq.clone()),
            Stage::VqDecoder => ("vq-decoder", vq.clone()),
            Stage::Evaluator => ("evaluator", fam.join("evaluator")),
            Stage::Target => ("target", fam.join("target")),
            Stage::Drafter => ("drafter", fam.join("drafter")),
            Stage::DraftSmall => ("draft-small", fam.join("draft-small")),
            Stage::Upsampler => ("upsampler", fam.join("upsampler")),
            Stage::Eval => {
                run_eval_stage(&fam, &data, a.eval_n, &runtime)?;
                continue;
            }
            Stage::Cards => {
                for role in [
                    "vq",
                    "evaluator",
                    "target",
                    "drafter",
                    "draft-small",
                    "upsampler",
                ] {
                    let dir = fam.join(role);
                    if dir.join(TRAIN_REPORT).is_file() {
                        write_card(&dir, role)?;
                        println!("==> wrote {}", dir.join("MODEL_CARD.md").display());
                    }
                }
                continue;
            }
        };
        // The decoder stage writes into the VQ directory and keeps the VQ's report aside.
        let done = if stage == Stage::VqDecoder {
            FIRST_VQ_REPORT
        } else {
            TRAIN_REPORT
        };
        if a.skip_existing && dir.join(done).is_file() {
            println!("==> keeping {} (it has {TRAIN_REPORT})", dir.display());
            continue;
        }
        let mut argv = vec![
            "train".to_string(),
            sub.to_string(),
            "--data".into(),
            s(&data),
            "--out".into(),
            s(&dir),
        ];
        if matches!(
            stage,
            Stage::VqDecoder
                | Stage::Target
                | Stage::Drafter
                | Stage::DraftSmall
                | Stage::Upsampler
        ) {
            argv.extend(["--vq".into(), s(&vq)]);
        }
        if a.resume {
            argv.push("--resume".into());
        }
        argv.extend(runtime.iter().cloned());
        run_argv(&argv)?;
    }
    Ok(())
}

/// `mulo vq-probe` of the VQ and `mulo eval` of the target (writing the sample grid) and of the
/// drafter; re-renders their cards.
fn run_eval_stage(fam: &Path, data: &Path, n: usize, runtime: &[String]) -> Result<()> {
    let s = |p: &Path| p.display().to_string();
    let vq = fam.join("vq");
    let mut argv = vec![
        "vq-probe".to_string(),
        "--vq".into(),
        s(&vq),
        "--data".into(),
        s(data),
    ];
    argv.extend(["--json".into(), s(&vq.join(crate::card::VQ_PROBE_REPORT))]);
    argv.extend(runtime.iter().cloned());
    run_argv(&argv)?;
    write_card(&vq, "vq")?;
    for (method, role, grid) in [("ar", "target", true), ("drafter-ar", "drafter", false)] {
        let dir = fam.join(role);
        let mut argv = vec![
            "eval".to_string(),
            "--family".into(),
            s(fam),
            "--data".into(),
            s(data),
            "--method".into(),
            method.into(),
            "--n".into(),
            n.to_string(),
            "--json".into(),
            s(&dir.join(crate::card::EVAL_REPORT)),
        ];
        if grid {
            argv.extend(["--grid".into(), s(&fam.join("samples.png"))]);
        }
        argv.extend(runtime.iter().cloned());
        run_argv(&argv)?;
        write_card(&dir, role)?;
    }
    Ok(())
}

/// Arguments of `mulo train vq-decoder`.
#[derive(Debug, Args)]
pub struct TrainVqDecoderArgs {
    /// The trained VQ model (its encoder and codebook are kept).
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub vq: PathBuf,
    /// Model directory to write (may be the same as --vq).
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Share of the steps on 32 px images (spread evenly; the others use 64 px). The full VQ
    /// run leaves the 32 px reconstructions further behind, hence most steps at 32 px.
    #[arg(long, default_value_t = 0.85)]
    pub low_res_share: f64,
    /// Images per 64 px step (32 px steps use twice as many).
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// A new decoder width per level, trained from scratch (default: continue the decoder).
    #[arg(long, value_delimiter = ',')]
    pub decoder_ch_mult: Option<Vec<i64>>,
    #[command(flatten)]
    pub common: TrainCommon,
}

/// Arguments of `mulo train upsampler`.
///
/// `--data` is a `mulo data emoji` directory or any `mulo data images` set. Each image is
/// tokenised by `--vq` at the high resolution (low grid × scale tokens) and, area-down-sampled
/// by the scale, at the low resolution; the token pairs are cached in `--work` and reused while
/// the data, VQ, grid and scale are unchanged.
#[derive(Debug, Args)]
pub struct TrainUpsamplerArgs {
    /// The VQ model directory that tokenises the images (its codebook is copied in).
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub vq: PathBuf,
    /// Model directory to write.
    #[arg(long, default_value = "models/emoji/upsampler", value_name = "DIR")]
    pub out: PathBuf,
    /// Low-resolution token grid, the drafter's (default: image side / VQ factor / scale).
    #[arg(long, value_name = "G", value_parser = clap::value_parser!(i64).range(1..))]
    pub low_grid: Option<i64>,
    /// Up-sampling factor between the drafter's and the target's grid.
    #[arg(long, default_value_t = 2, value_parser = parse_scale)]
    pub scale: i64,
    /// Hidden channels.
    #[arg(long, default_value_t = 128)]
    pub channels: i64,
    /// Residual blocks at low resolution.
    #[arg(long, default_value_t = 4)]
    pub low_blocks: i64,
    /// Residual blocks at high resolution.
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
    #[command(flatten)]
    pub common: TrainCommon,
}

/// Arguments of `mulo train evaluator`.
#[derive(Debug, Args)]
pub struct TrainEvaluatorArgs {
    /// Model directory to write.
    #[arg(long, default_value = "models/emoji/evaluator", value_name = "DIR")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 3000)]
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
    /// Largest random shift of a training batch, in pixels (white fills the border).
    #[arg(long, default_value_t = 4)]
    pub max_shift: i64,
    /// Label smoothing of the cross-entropies.
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    #[command(flatten)]
    pub common: TrainCommon,
}

/// Arguments of `mulo train target|drafter|draft-small` (unset architecture flags take the role's
/// defaults).
#[derive(Debug, Args)]
pub struct TrainGptArgs {
    /// The trained VQ model directory.
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub vq: PathBuf,
    /// Model directory to write (default models/emoji/<role>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Hidden width.
    #[arg(long, default_value_t = 256)]
    pub dim: i64,
    /// Transformer blocks (default: 6 for the target, 3 for the drafter, 1 for draft-small).
    #[arg(long)]
    pub n_layer: Option<i64>,
    /// Image side in pixels (16, 32 or 64; default: 32 for the drafter, 64 for the target and
    /// draft-small). `mulo train drafter --image-size 16` makes an r = 4 drafter (4×4 tokens
    /// with the 4× VQ) for a 64 px target, with `mulo train upsampler --scale 4`.
    #[arg(long, value_parser = parse_image_size)]
    pub image_size: Option<usize>,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    pub n_head: i64,
    /// Caption word positions.
    #[arg(long, default_value_t = 16)]
    pub caption_len: usize,
    /// Width of the caption word embeddings.
    #[arg(long, default_value_t = 64)]
    pub caption_dim: i64,
    /// Optimizer steps (default 3000; the target 6000, extended from 3000. Without token noise
    /// the drafter over-fits by 3000: held-out NLL 4.95 there against 4.04 at 1250; with
    /// `--token-noise 0.4` it does not).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Train as a run first set to these lengths (comma-separated, increasing, below --steps)
    /// and then extended: the learning rate follows a run of each length up to it, then the
    /// next one's cosine from where that stands, as `--resume --steps N` does to a finished
    /// run. Default: 3000 for the target without --steps (the bundled target: 3000 steps,
    /// extended to 6000), else none.
    #[arg(long, value_delimiter = ',')]
    pub extend_from: Option<Vec<usize>>,
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
    /// Share of training sequences captioned by the emoji's name alone (the rest get the full
    /// caption: name, short names, subcategory words).
    #[arg(long, default_value_t = 0.5)]
    pub name_share: f64,
    /// Probability of replacing each caption word by <unk> in training (prompts meet words the
    /// vocabulary lacks).
    #[arg(long, default_value_t = 0.1)]
    pub unk_drop: f64,
    /// Training dropout of the input embeddings and the residual branches.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// How training sequences are drawn: `base` weighs every base emoji the same (its skin-tone
    /// variations share one draw), `category` every category the same (then every base emoji of
    /// it), `image` every image the same (People & Body, with its skin tones, is then 60% of the
    /// data).
    #[arg(long, value_enum, default_value_t = Balance::Image)]
    pub balance: Balance,
    /// Label smoothing of the training cross-entropy (0 = none; held-out NLL is never smoothed).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Decay of an exponential moving average of the weights, which is what the run writes and
    /// probes (0 = no average: the last weights).
    #[arg(long, default_value_t = 0.0)]
    pub ema: f64,
    /// Micro-batches of --batch sequences accumulated into each optimizer step (the effective
    /// batch is batch x accum).
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Probability that a training sequence shows its image mirrored left to right (tokenised
    /// once more at the start; never Flags or Symbols, which read wrong mirrored). 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub mirror: f64,
    /// Probability that an input image token (not a target) is replaced by a random code in
    /// training, so that the previous tokens cannot identify a memorised training image and the
    /// caption keeps a say in every token. 0 = plain teacher forcing. Default: 0.4 for the
    /// target and the drafter (drafter, 1000 steps: category adherence 43.4% at 0, 47.7% at 0.4,
    /// 43.0% at 0.6), 0 for draft-small (a draft model for SD, not prompted on its own).
    #[arg(long)]
    pub token_noise: Option<f64>,
    /// Pause after this many steps: save a checkpoint in --work and exit 0 without writing the
    /// model; continue with --resume.
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<usize>,
    /// Pause after this many minutes of this invocation, as --stop-at does: a long run spans
    /// several sessions (--resume restores the weights, Adam's moments and the average).
    #[arg(long, value_name = "MINUTES")]
    pub max_minutes: Option<f64>,
    /// Kind of the matmuls and attention in training (bf16 or fp32); weights, norms and the loss
    /// stay fp32. bf16 is several times faster on CPUs with AVX512-BF16 or AMX (and on GPUs);
    /// pick fp32 on CPUs without them.
    #[arg(long, default_value = "bf16")]
    pub compute: DType,
    /// RoPE at the caption positions: `keep` leaves them unrotated, so image tokens attend to
    /// caption words by content; `zero` zeroes their queries and keys as LlamaGen does (every
    /// caption word then gets the same attention score).
    /// (Measured on the drafter, 1250 steps: adherence 43.4% keep vs 44.1% zero: no gain.)
    #[arg(long, value_enum, default_value_t = ConditionRope::Zero)]
    pub condition_rope: ConditionRope,
    #[command(flatten)]
    pub common: TrainCommon,
}

/// RoPE at the caption positions of a trained GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConditionRope {
    /// Unrotated: content-dependent attention to caption words.
    Keep,
    /// Zeroed queries and keys (LlamaGen).
    Zero,
}

/// How `mulo train` GPTs draw their training sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Balance {
    /// Uniform over base emoji, then over its images.
    Base,
    /// Uniform over categories, then over base emoji, then over images.
    Category,
    /// Uniform over images.
    Image,
}

impl From<Balance> for mulo_train::trainers::Balance {
    fn from(b: Balance) -> Self {
        match b {
            Balance::Base => Self::Base,
            Balance::Category => Self::Category,
            Balance::Image => Self::Image,
        }
    }
}

/// Flags every `mulo train <model>` takes.
#[derive(Debug, Args)]
pub struct TrainCommon {
    /// Data directory from `mulo data emoji` (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Checkpoints and loss log (default ~/.cache/mulo/train/<model>).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Seed of the new weights and the batch order.
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

impl TrainCommon {
    /// The data directory (default ~/.cache/mulo/data/emoji).
    fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| home_cache("data/emoji"))
    }

    /// The work directory (default ~/.cache/mulo/train/<model>).
    fn work_dir(&self, model: &str) -> PathBuf {
        self.work
            .clone()
            .unwrap_or_else(|| home_cache(&format!("train/{model}")))
    }
}

fn home_cache(rel: &str) -> PathBuf {
    crate::common::cache_root().join(rel)
}

/// Arguments of `mulo train vq`.
#[derive(Debug, Args)]
pub struct TrainVqArgs {
    /// Model directory to write.
    #[arg(long, default_value = "models/emoji/vq", value_name = "DIR")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2500)]
    pub steps: usize,
    /// Share of the steps that train on 32 px images (spread evenly; the others use 64 px).
    #[arg(long, default_value_t = 0.667)]
    pub low_res_share: f64,
    /// Images per 64 px step (32 px steps use twice as many).
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Number of codes.
    #[arg(long, default_value_t = 2048)]
    pub codebook_size: i64,
    /// Width of one code.
    #[arg(long, default_value_t = 8)]
    pub embed_dim: i64,
    /// Base channels (a multiple of 32).
    #[arg(long, default_value_t = 64)]
    pub ch: i64,
    /// Channel multipliers per level (3 levels = 4x down-sampling).
    #[arg(long, default_value = "1,1,2", value_delimiter = ',')]
    pub ch_mult: Vec<i64>,
    /// Latent channels.
    #[arg(long, default_value_t = 64)]
    pub z_channels: i64,
    /// Residual blocks per encoder level (the decoder has one more).
    #[arg(long, default_value_t = 1)]
    pub num_res_blocks: i64,
    #[command(flatten)]
    pub common: TrainCommon,
}

/// Runs `mulo train`.
pub fn run(cmd: TrainCommand) -> Result<()> {
    run_stage(cmd, &crate::common::command_line())
}

/// Runs one training command, recording `command` as the command line that produced it.
fn run_stage(cmd: TrainCommand, command: &str) -> Result<()> {
    match cmd {
        TrainCommand::Vq(a) => run_vq(a, command),
        TrainCommand::VqDecoder(a) => run_vq_decoder(a, command),
        TrainCommand::Target(a) => run_gpt("target", 64, 6, a, command),
        TrainCommand::Drafter(a) => run_gpt("drafter", 32, 3, a, command),
        TrainCommand::DraftSmall(a) => run_gpt("draft-small", 64, 1, a, command),
        TrainCommand::Upsampler(a) => run_upsampler(a, command),
        TrainCommand::Evaluator(a) => run_evaluator(a, command),
        TrainCommand::All(a) => run_all(a),
    }
}

fn parse_image_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v @ (16 | 32 | 64)) => Ok(v),
        _ => Err(format!(
            "the image size must be 16, 32 or 64 pixels (the sizes `mulo data emoji` writes), got '{s}'"
        )),
    }
}

fn parse_scale(s: &str) -> Result<i64, String> {
    match s {
        "2" => Ok(2),
        "4" => Ok(4),
        _ => Err(format!("the scale must be 2 or 4, got '{s}'")),
    }
}

fn run_upsampler(a: TrainUpsamplerArgs, command: &str) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let vq_link = crate::common::relative_link(&a.out, &a.vq)?;
    let opts = UpsamplerTrainOptions {
        data: a.common.data_dir(),
        low_grid: a.low_grid,
        scale: a.scale,
        vq: a.vq.clone(),
        out: a.out.clone(),
        work: a.common.work_dir("upsampler"),
        channels: a.channels,
        low_blocks: a.low_blocks,
        high_blocks: a.high_blocks,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        seed: a.common.seed,
        resume: a.common.resume,
        dtype: a.common.store_dtype,
        vq_link: Some(vq_link),
    };
    let r = run_training(
        "upsampler",
        command,
        &opts,
        opts.steps,
        &opts.out,
        &a.common.runtime,
        train_upsampler,
    )?;
    let Some(r) = r else {
        return Ok(());
    };
    println!(
        "trained the x{s} up-sampler ({g}x{g} -> {h}x{h} tokens{t}) in {:.0} s ({} steps, {:.2} M parameters, final loss {:.4}): held-out token accuracy {:.1}% (repeating each low-res token: {:.1}%), NLL {:.4} nats; D_{s}(U_{s}(y)) = y for {:.1}% of low-res tokens (D_{s} of the real high-res tokens: {:.1}%) ({} held-out images); wrote {}",
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
        opts.out.display(),
        s = r.scale,
        g = r.low_grid,
        h = r.low_grid * r.scale,
        t = if r.tokenised { "" } else { ", cached tokens" },
    );
    Ok(())
}

/// Refuses a probability or share outside [0, 1], naming the flag.
fn check_share(flag: &str, share: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&share) {
        anyhow::bail!("invalid --{flag}: must be in [0, 1], got {share}");
    }
    Ok(())
}

fn run_evaluator(a: TrainEvaluatorArgs, command: &str) -> Result<()> {
    check_share("low-res-share", a.low_res_share)?;
    let opts = EvaluatorTrainOptions {
        data: a.common.data_dir(),
        out: a.out.clone(),
        work: a.common.work_dir("evaluator"),
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        low_res_share: a.low_res_share,
        channels: a.channels.clone(),
        max_shift: a.max_shift,
        label_smoothing: a.label_smoothing,
        seed: a.common.seed,
        resume: a.common.resume,
        dtype: a.common.store_dtype,
    };
    let r = run_training(
        "evaluator",
        command,
        &opts,
        opts.steps,
        &opts.out,
        &a.common.runtime,
        train_evaluator,
    )?;
    let Some(r) = r else {
        return Ok(());
    };
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
    role: &str,
    command: &str,
    opts: &O,
    steps: usize,
    out: &Path,
    runtime: &RuntimeArgs,
    train: F,
) -> Result<Option<R>>
where
    O: Serialize + Clone + Send + 'static,
    R: Serialize + Send + 'static,
    F: FnOnce(&O, tch::Device, &mut dyn FnMut(usize, usize, f64)) -> Result<R, TrainError>
        + Send
        + 'static,
{
    let runtime = runtime.clone();
    let worker = TorchWorker::spawn("torch", move || -> Result<(tch::Device, String)> {
        let device = runtime.setup()?;
        Ok((device, crate::common::machine_line(&runtime.device)))
    })?;
    let machine = worker.run(|s: &mut (tch::Device, String)| s.1.clone())?;
    let bar = progress_bar(steps);
    let pb = bar.clone();
    let o = opts.clone();
    let report = worker.run(move |s: &mut (tch::Device, String)| {
        let mut progress = |step: usize, _total: usize, loss: f64| {
            pb.set_position(step as u64);
            pb.set_message(format!("{loss:.4}"));
        };
        train(&o, s.0, &mut progress)
    })?;
    bar.finish_and_clear();
    let report = match report {
        Err(TrainError::Paused { step, total }) => {
            println!(
                "{role}: paused at step {step} of {total}; the checkpoint is saved, continue with --resume"
            );
            return Ok(None);
        }
        r => r?,
    };
    let path = out.join(TRAIN_REPORT);
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "command": command, "machine": machine, "options": opts, "report": &report,
    }))?;
    std::fs::write(&path, text + "\n").with_context(|| format!("{}", path.display()))?;
    write_card(out, role)?;
    Ok(Some(report))
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

fn run_gpt(
    role: &str,
    image_size: usize,
    layers: i64,
    a: TrainGptArgs,
    command: &str,
) -> Result<()> {
    // The bundled target: a 3000-step run extended to 6000 (docs/train.md).
    let (default_steps, default_extend) = match (role, a.steps) {
        ("target", None) => (6000, vec![3000]),
        _ => (3000, Vec::new()),
    };
    let token_noise = a
        .token_noise
        .unwrap_or(if role == "draft-small" { 0.0 } else { 0.4 });
    check_share("label-smoothing", a.label_smoothing)?;
    if !(0.0..1.0).contains(&a.ema) {
        bail!("invalid --ema: must be in [0, 1), got {}", a.ema);
    }
    if a.accum == 0 {
        bail!("invalid --accum: must be at least 1");
    }
    if a.max_minutes.is_some_and(|m| !m.is_finite() || m <= 0.0) {
        bail!("invalid --max-minutes: must be a positive number");
    }
    for (flag, v) in [
        ("cond-drop", a.cond_drop),
        ("name-share", a.name_share),
        ("unk-drop", a.unk_drop),
        ("dropout", a.dropout),
        ("mirror", a.mirror),
        ("token-noise", token_noise),
    ] {
        check_share(flag, v)?;
    }
    let opts = GptTrainOptions {
        data: a.common.data_dir(),
        vq: a.vq.clone(),
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("models/emoji/{role}"))),
        work: a.common.work_dir(role),
        image_size: a.image_size.unwrap_or(image_size),
        dim: a.dim,
        n_layer: a.n_layer.unwrap_or(layers),
        n_head: a.n_head,
        caption_len: a.caption_len,
        caption_dim: a.caption_dim,
        steps: a.steps.unwrap_or(default_steps),
        extend_from: a.extend_from.clone().unwrap_or(default_extend),
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        cond_drop: a.cond_drop,
        name_share: a.name_share,
        unk_drop: a.unk_drop,
        dropout: a.dropout,
        balance: a.balance.into(),
        label_smoothing: a.label_smoothing,
        ema: (a.ema > 0.0).then_some(a.ema),
        accum: a.accum,
        mirror: a.mirror,
        token_noise,
        stop: Stop {
            at_step: a.stop_at,
            after_seconds: a.max_minutes.map(|m| m * 60.0),
        },
        keep_condition_rope: a.condition_rope == ConditionRope::Keep,
        seed: a.common.seed,
        resume: a.common.resume,
        dtype: a.common.store_dtype,
        compute: a.compute,
        vq_link: Some("../vq".into()),
    };
    let report = run_training(
        role,
        command,
        &opts,
        opts.steps,
        &opts.out,
        &a.common.runtime,
        train_gpt,
    )?;
    let Some(report) = report else {
        return Ok(());
    };
    println!(
        "trained the {role} GPT in {:.0} s ({} steps, {:.2} M parameters, final loss {:.4}): held-out token NLL {:.4} nats with the full captions, {:.4} with the names alone; wrote {}",
        report.seconds,
        report.steps,
        report.parameters as f64 / 1e6,
        report.final_loss,
        report.heldout_nll,
        report.heldout_nll_name,
        opts.out.display()
    );
    Ok(())
}

fn run_vq_decoder(a: TrainVqDecoderArgs, command: &str) -> Result<()> {
    check_share("low-res-share", a.low_res_share)?;
    let opts = VqDecoderOptions {
        data: a.common.data_dir(),
        vq: a.vq.clone(),
        out: a.out.clone(),
        work: a.common.work_dir("vq-decoder"),
        steps: a.steps,
        low_res_share: a.low_res_share,
        batch: a.batch,
        lr: a.lr,
        decoder_ch_mult: a.decoder_ch_mult.clone(),
        seed: a.common.seed,
        resume: a.common.resume,
        dtype: a.common.store_dtype,
    };
    // The full VQ run's report is kept beside the decoder's (once: a second fine-tune of the
    // same directory replaces only the decoder's report).
    let first = opts.out.join(TRAIN_REPORT);
    if first.is_file() && opts.out == opts.vq && !opts.out.join(FIRST_VQ_REPORT).is_file() {
        std::fs::copy(&first, opts.out.join(FIRST_VQ_REPORT))
            .with_context(|| format!("{}", first.display()))?;
    }
    let r = run_training(
        "vq",
        command,
        &opts,
        opts.steps,
        &opts.out,
        &a.common.runtime,
        train_vq_decoder,
    )?;
    let Some(r) = r else {
        return Ok(());
    };
    println!(
        "trained the VQ decoder in {:.0} s ({} steps, final loss {:.4}): held-out PSNR {:.2} dB at 64 px (was {:.2}), {:.2} dB at 32 px (was {:.2}), codebook usage {:.1}%, tokens unchanged {:.2}% ({} held-out images); wrote {}",
        r.seconds,
        r.steps,
        r.final_loss,
        r.psnr64,
        r.psnr64_before,
        r.psnr32,
        r.psnr32_before,
        r.codebook_usage * 100.0,
        r.tokens_unchanged * 100.0,
        r.heldout_images,
        opts.out.display()
    );
    Ok(())
}

fn run_vq(a: TrainVqArgs, command: &str) -> Result<()> {
    let opts = VqTrainOptions {
        data: a.common.data_dir(),
        out: a.out.clone(),
        work: a.common.work_dir("vq"),
        steps: a.steps,
        low_res_share: a.low_res_share,
        batch: a.batch,
        lr: a.lr,
        seed: a.common.seed,
        resume: a.common.resume,
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
            dtype: a.common.store_dtype,
        },
        dtype: a.common.store_dtype,
    };
    opts.config.validate()?;
    check_share("low-res-share", a.low_res_share)?;
    let report = run_training(
        "vq",
        command,
        &opts,
        opts.steps,
        &opts.out,
        &a.common.runtime,
        train_vq,
    )?;
    let Some(report) = report else {
        return Ok(());
    };
    // A new VQ: the report of an earlier one a decoder fine-tune kept aside no longer applies.
    let stale = opts.out.join(FIRST_VQ_REPORT);
    if stale.is_file() {
        std::fs::remove_file(&stale).with_context(|| format!("{}", stale.display()))?;
    }
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
