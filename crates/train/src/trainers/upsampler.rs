//! Training the up-sampler `U_2` on (32 px tokens, 64 px tokens) pairs of the same images.

use std::path::PathBuf;

use mulo_model::{DType, Upsampler, UpsamplerConfig, VqModel};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::gpt::tokenize_images;
use super::{adamw, parameter_count, sample_rows, step_rng, EmojiTensors, Recipe, Stop, Trainer};
use crate::data::emoji::Split;
use crate::error::TrainError;

/// Settings of an up-sampler training run.
#[derive(Debug, Clone, Serialize)]
pub struct UpsamplerTrainOptions {
    /// Data directory written by `mulo data emoji`.
    pub data: PathBuf,
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
    /// Fraction of held-out 64 px tokens that `U_2(32 px tokens)` gets right.
    pub heldout_token_accuracy: f64,
    /// The same for the naive proposal (each low-res token repeated over its 2×2 cell).
    pub repeat_token_accuracy: f64,
    /// Mean held-out token cross-entropy (nats).
    pub heldout_nll: f64,
    /// Fraction of held-out low-res tokens `y` with `D_2(U_2(y)) = y` (token-wise).
    pub roundtrip_agreement: f64,
    /// For reference: fraction of held-out low-res tokens equal to `D_2` of the image's own
    /// 64 px tokens.
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
    let data = EmojiTensors::load(&opts.data)?;
    let (vq, _) = VqModel::load(&opts.vq, device, Some(DType::Fp32))?;
    let f = vq.config().downsample_factor();
    let (lo_side, hi_side) = (32 / f, 64 / f);
    let low = tokenize_images(&vq, &data, 32, device)?.view([-1, lo_side, lo_side]);
    let high = tokenize_images(&vq, &data, 64, device)?.view([-1, hi_side, hi_side]);
    let train = data.train_rows()?;
    let heldout = data.indices(Split::Heldout);
    let cfg = UpsamplerConfig {
        name: Some("emoji-upsampler-x2".into()),
        codebook_size: vq.config().codebook_size,
        codebook_embed_dim: vq.config().codebook_embed_dim,
        scale: 2,
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
        let rows = sample_rows(&mut rng, &train, opts.batch);
        let r = Tensor::from_slice(&rows);
        let x = low.index_select(0, &r).to_device(device);
        let y = high.index_select(0, &r).to_device(device);
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
            let r = Tensor::from_slice(chunk);
            let x = low.index_select(0, &r).to_device(device);
            let y = high.index_select(0, &r).to_device(device);
            let logits = saved.logits(&x);
            let nll = logits
                .permute([0, 2, 3, 1])
                .reshape([-1, v])
                .cross_entropy_for_logits(&y.reshape([-1]));
            let pred = logits.argmax(1, false);
            let repeat = x
                .repeat_interleave_self_int(2, Some(1), None)
                .repeat_interleave_self_int(2, Some(2), None);
            let back = vq.downsample_tokens(&pred, 2)?;
            let own = vq.downsample_tokens(&y, 2)?;
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
