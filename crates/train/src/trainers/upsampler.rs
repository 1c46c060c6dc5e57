//! Training the up-sampler `U_r` on (low-resolution tokens, high-resolution tokens) pairs of the
//! same images, from the emoji data or any `mulo data images` set, with any VQ, grid and scale.

use std::path::PathBuf;

use mulo_model::{DType, Upsampler, UpsamplerConfig, VqModel};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::token_pairs::{token_pairs, PairSpec};
use super::{adamw, parameter_count, sample_rows, step_rng, Recipe, Stop, Trainer};
use crate::error::TrainError;

/// Settings of an up-sampler training run.
#[derive(Debug, Clone, Serialize)]
pub struct UpsamplerTrainOptions {
    /// Data directory written by `mulo data emoji` or `mulo data images`.
    pub data: PathBuf,
    /// Low-resolution token grid (default: the data's image side over the VQ factor and scale).
    pub low_grid: Option<i64>,
    /// Up-sampling factor, 2 or 4.
    pub scale: i64,
    /// VQ model that tokenises the images (its codebook is copied into the up-sampler).
    pub vq: PathBuf,
    /// Model directory to write.
    pub out: PathBuf,
    /// Checkpoints and the loss log.
    pub work: PathBuf,
    /// Hidden channels.
    pub channels: i64,
    /// Residual blocks at low resolution.
    pub low_blocks: i64,
    /// Residual blocks at high resolution.
    pub high_blocks: i64,
    /// Optimizer steps.
    pub steps: usize,
    /// Image pairs per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the weights and of the batch order.
    pub seed: u64,
    /// Continue from the last checkpoint in `work`.
    pub resume: bool,
    /// Storage dtype of the written model.
    pub dtype: DType,
    /// Relative path of the VQ directory recorded in the written config.
    pub vq_link: Option<String>,
}

/// What an up-sampler training run measured on the held-out split.
#[derive(Debug, Clone, Serialize)]
pub struct UpsamplerReport {
    /// Steps run.
    pub steps: usize,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Parameters (the frozen codebook copy included).
    pub parameters: i64,
    /// Low-resolution grid side.
    pub low_grid: i64,
    /// Up-sampling factor.
    pub scale: i64,
    /// Whether the images were tokenised by this run (false: tokens read from the cache).
    pub tokenised: bool,
    /// Fraction of held-out high-resolution tokens that `U_r(low tokens)` gets right.
    pub heldout_token_accuracy: f64,
    /// The same for the naive proposal (each low-res token repeated over its r×r cell).
    pub repeat_token_accuracy: f64,
    /// Mean held-out token cross-entropy (nats).
    pub heldout_nll: f64,
    /// Fraction of held-out low-res tokens `y` with `D_r(U_r(y)) = y` (token-wise).
    pub roundtrip_agreement: f64,
    /// For reference: fraction of held-out low-res tokens equal to `D_r` of the image's own
    /// high-resolution tokens.
    pub downsample_agreement: f64,
    /// Held-out images.
    pub heldout_images: usize,
}

/// Trains the up-sampler; `progress(step, total, loss)` after every step.
pub fn train_upsampler(
    opts: &UpsamplerTrainOptions,
    device: Device,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<UpsamplerReport, TrainError> {
    let (vq, _) = VqModel::load(&opts.vq, device, Some(DType::Fp32))?;
    let spec = PairSpec {
        data: &opts.data,
        vq_dir: &opts.vq,
        low_grid: opts.low_grid,
        scale: opts.scale,
        cache: &opts.work,
    };
    let pairs = token_pairs(&spec, &vq, device)?;
    if pairs.train.is_empty() || pairs.heldout.is_empty() {
        return Err(TrainError::Train(format!(
            "{}: the up-sampler needs training and held-out images ({} and {})",
            opts.data.display(),
            pairs.train.len(),
            pairs.heldout.len()
        )));
    }
    let (low, high, train, heldout) = (&pairs.low, &pairs.high, &pairs.train, &pairs.heldout);
    let scale = opts.scale;
    let cfg = UpsamplerConfig {
        name: Some(format!("{}-upsampler-x{scale}", pairs.source)),
        codebook_size: vq.config().codebook_size,
        codebook_embed_dim: vq.config().codebook_embed_dim,
        scale,
        channels: opts.channels,
        low_blocks: opts.low_blocks,
        high_blocks: opts.high_blocks,
        dtype: opts.dtype,
        vq: opts.vq_link.clone(),
    };
    let mut ups = Upsampler::random(cfg, device, opts.seed as i64)?;
    ups.set_codebook(&vq.codes())?;
    let recipe = Recipe {
        lr: opts.lr,
        steps: opts.steps,
        extend_from: Vec::new(),
        warmup_div: 20,
        min_ratio: 0.05,
        adamw: adamw(0.99, opts.weight_decay),
        ckpt_every: 500,
        ema: None,
        stop: Stop::default(),
    };
    let mut trainer = Trainer::open(ups.var_store_mut(), &recipe, &opts.work, opts.resume)?;
    let v = vq.config().codebook_size;
    let mut last_loss = f64::NAN;
    for step in trainer.start..opts.steps {
        let mut rng = step_rng(opts.seed, step);
        let rows = sample_rows(&mut rng, train, opts.batch);
        let (x, y) = pair_batch(low, high, &rows, device);
        let logits = ups.logits(&x);
        let loss = logits
            .permute([0, 2, 3, 1])
            .reshape([-1, v])
            .cross_entropy_for_logits(&y.reshape([-1]));
        last_loss = trainer.update(ups.var_store(), step, &loss, progress)?;
    }
    trainer.finish(ups.var_store())?;
    ups.save(&opts.out, opts.dtype)?;
    // Measure the model as written.
    let saved = Upsampler::load(&opts.out, device)?;
    let mut sums = [0.0f64; 5];
    tch::no_grad(|| -> Result<(), TrainError> {
        for chunk in heldout.chunks(128) {
            let (x, y) = pair_batch(low, high, chunk, device);
            let logits = saved.logits(&x);
            let nll = logits
                .permute([0, 2, 3, 1])
                .reshape([-1, v])
                .cross_entropy_for_logits(&y.reshape([-1]));
            let pred = logits.argmax(1, false);
            let repeat = x
                .repeat_interleave_self_int(scale, Some(1), None)
                .repeat_interleave_self_int(scale, Some(2), None);
            let back = vq.downsample_tokens(&pred, scale)?;
            let own = vq.downsample_tokens(&y, scale)?;
            let mean_eq = |a: &Tensor, b: &Tensor| -> Result<f64, TrainError> {
                Ok(f64::try_from(
                    a.eq_tensor(b).to_kind(Kind::Float).mean(Kind::Float),
                )?)
            };
            let n = chunk.len() as f64;
            sums[0] += mean_eq(&pred, &y)? * n;
            sums[1] += mean_eq(&repeat, &y)? * n;
            sums[2] += f64::try_from(&nll)? * n;
            sums[3] += mean_eq(&back, &x)? * n;
            sums[4] += mean_eq(&own, &x)? * n;
        }
        Ok(())
    })?;
    let n = heldout.len().max(1) as f64;
    let parameters = parameter_count(saved.var_store());
    let report = UpsamplerReport {
        steps: opts.steps,
        seconds: trainer.seconds(),
        final_loss: last_loss,
        parameters,
        low_grid: low.size()[1],
        scale,
        tokenised: pairs.tokenised,
        heldout_token_accuracy: sums[0] / n,
        repeat_token_accuracy: sums[1] / n,
        heldout_nll: sums[2] / n,
        roundtrip_agreement: sums[3] / n,
        downsample_agreement: sums[4] / n,
        heldout_images: heldout.len(),
    };
    trainer.event(&serde_json::json!({"event": "eval", "report": &report}))?;
    Ok(report)
}

/// Low and high tokens of `rows` as int64 on `device`.
fn pair_batch(low: &Tensor, high: &Tensor, rows: &[i64], device: Device) -> (Tensor, Tensor) {
    let r = Tensor::from_slice(rows);
    let take = |t: &Tensor| t.index_select(0, &r).to_device(device).to_kind(Kind::Int64);
    (take(low), take(high))
}
