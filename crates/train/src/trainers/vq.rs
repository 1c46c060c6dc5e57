//! Training the VQ tokenizer on the emoji data (64 and 32 px, alternating).

use std::path::PathBuf;

use mulo_model::{DType, VqConfig, VqModel};
use rand::Rng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{adamw, psnr_u8, sample_rows, step_rng, EmojiTensors, Recipe, Stop, Trainer};
use crate::data::emoji::Split;
use crate::error::TrainError;

/// Settings of a VQ training run.
#[derive(Debug, Clone, Serialize)]
pub struct VqTrainOptions {
    /// Data directory written by `mulo data emoji`.
    pub data: PathBuf,
    /// Model directory to write.
    pub out: PathBuf,
    /// Checkpoints and the loss log.
    pub work: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Share of the steps that train on 32 px images (interleaved evenly; the rest use 64 px).
    pub low_res_share: f64,
    /// Images per 64 px step (32 px steps use twice as many).
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of the weights and of the batch order.
    pub seed: u64,
    /// Continue from the last checkpoint in `work`.
    pub resume: bool,
    /// Architecture.
    pub config: VqConfig,
    /// Storage dtype of the written model.
    pub dtype: DType,
}

/// What a VQ training run measured on the held-out split.
#[derive(Debug, Clone, Serialize)]
pub struct VqReport {
    /// Steps run (in total, resumed ones included).
    pub steps: usize,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Mean per-image PSNR of held-out reconstructions at 64 px (8-bit).
    pub psnr64: f64,
    /// The same at 32 px.
    pub psnr32: f64,
    /// Fraction of codes used when encoding the held-out images at 64 and 32 px.
    pub codebook_usage: f64,
    /// Held-out images.
    pub heldout_images: usize,
}

/// Whether step `step` trains on 32 px images: spreads `share` of the steps evenly.
fn is_low_res_step(step: usize, share: f64) -> bool {
    let share = share.clamp(0.0, 1.0);
    ((step + 1) as f64 * share).floor() > (step as f64 * share).floor()
}

/// Held-out PSNR at `size` px and the codes used, in batches of 64 images.
fn evaluate(
    vq: &VqModel,
    data: &EmojiTensors,
    size: usize,
    used: &Tensor,
    device: Device,
) -> Result<f64, TrainError> {
    let rows = data.indices(Split::Heldout);
    let mut total = 0.0;
    for chunk in rows.chunks(64) {
        let x = data.batch(size, chunk, device);
        let t = vq.encode(&x)?;
        let flat = t.reshape([-1]);
        let ones = Tensor::ones([flat.size()[0]], (Kind::Float, device));
        let mut used = used.shallow_clone();
        let _ = used.index_add_(0, &flat, &ones);
        let y = vq.decode(&t)?;
        total += psnr_u8(&y, &x) * chunk.len() as f64;
    }
    Ok(total / rows.len().max(1) as f64)
}

/// Where a VQ loses detail, on the held-out images (mean per-image PSNR, 8-bit, dB).
#[derive(Debug, Clone, Serialize)]
pub struct VqProbe {
    /// Held-out images.
    pub heldout_images: usize,
    /// Tokens encoded and decoded at 64 px (what `mulo train vq` reports).
    pub psnr64: f64,
    /// The same at 32 px.
    pub psnr32: f64,
    /// 64 px through the encoder and decoder without quantisation (an unlimited codebook).
    pub psnr64_unquantised: f64,
    /// The same at 32 px.
    pub psnr32_unquantised: f64,
    /// The 64 px image's tokens decoded and area-averaged to 32 px, against the 32 px image: what
    /// the 64 px token grid carries of the 32 px picture.
    pub psnr32_from_64px_tokens: f64,
}

/// Measures a VQ's held-out reconstruction with and without quantisation, in batches of 64.
pub fn probe_vq(vq: &VqModel, data: &EmojiTensors, device: Device) -> Result<VqProbe, TrainError> {
    let rows = data.indices(Split::Heldout);
    let mut sums = [0.0f64; 5];
    tch::no_grad(|| -> Result<(), TrainError> {
        for chunk in rows.chunks(64) {
            let (x64, x32) = (data.batch(64, chunk, device), data.batch(32, chunk, device));
            let y64 = vq.decode(&vq.encode(&x64)?)?;
            let down =
                y64.clamp(-1.0, 1.0)
                    .avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
            let got = [
                psnr_u8(&y64, &x64),
                psnr_u8(&vq.decode(&vq.encode(&x32)?)?, &x32),
                psnr_u8(&vq.reconstruct_unquantised(&x64)?, &x64),
                psnr_u8(&vq.reconstruct_unquantised(&x32)?, &x32),
                psnr_u8(&down, &x32),
            ];
            for (s, g) in sums.iter_mut().zip(got) {
                *s += g * chunk.len() as f64;
            }
        }
        Ok(())
    })?;
    let n = rows.len().max(1) as f64;
    Ok(VqProbe {
        heldout_images: rows.len(),
        psnr64: sums[0] / n,
        psnr32: sums[1] / n,
        psnr64_unquantised: sums[2] / n,
        psnr32_unquantised: sums[3] / n,
        psnr32_from_64px_tokens: sums[4] / n,
    })
}

/// Trains a VQ tokenizer; `progress(step, total, loss)` is called after every step.
pub fn train_vq(
    opts: &VqTrainOptions,
    device: Device,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<VqReport, TrainError> {
    let data = EmojiTensors::load(&opts.data)?;
    let train = data.train_rows()?;
    let mut vq = VqModel::random(opts.config.clone(), device, DType::Fp32, opts.seed as i64)?;
    let recipe = Recipe {
        lr: opts.lr,
        steps: opts.steps,
        extend_from: Vec::new(),
        warmup_div: 50,
        min_ratio: 0.05,
        adamw: adamw(0.99, 0.0),
        ckpt_every: 500,
        ema: None,
        stop: Stop::default(),
    };
    let mut trainer = Trainer::open(vq.var_store_mut(), &recipe, &opts.work, opts.resume)?;
    let v = opts.config.codebook_size;
    let mut counts = Tensor::zeros([v], (Kind::Float, device));
    let restart_every = 200;
    let mut last_loss = f64::NAN;
    for step in trainer.start..opts.steps {
        let mut rng = step_rng(opts.seed, step);
        let (size, n) = if is_low_res_step(step, opts.low_res_share) {
            (32, opts.batch * 2)
        } else {
            (64, opts.batch)
        };
        let x = data.batch(size, &sample_rows(&mut rng, &train, n), device);
        let (recon, codebook_loss, commit_loss, idx) = vq.forward_train(&x);
        let diff = &recon - &x;
        let rec = diff.abs().mean(Kind::Float) + diff.pow_tensor_scalar(2).mean(Kind::Float);
        let loss = &rec + &codebook_loss + &commit_loss * 0.25;
        last_loss = trainer.step(step, &loss)?;
        tch::no_grad(|| {
            let flat = idx.reshape([-1]);
            let ones = Tensor::ones([flat.size()[0]], (Kind::Float, device));
            let _ = counts.index_add_(0, &flat, &ones);
        });
        // Re-seed codes unused over the last window with latents of the current batch.
        if (step + 1) % restart_every == 0 && step < opts.steps * 4 / 5 {
            let dead = counts.eq(0.0).nonzero().view([-1]);
            let n_dead = dead.size()[0];
            if n_dead > 0 {
                let lat = vq.latents(&x);
                let pick: Vec<i64> = (0..n_dead)
                    .map(|_| rng.random_range(0..lat.size()[0]))
                    .collect();
                let vals = lat.index_select(0, &Tensor::from_slice(&pick).to_device(device));
                vq.set_codes(&dead, &vals);
            }
            let usage = 1.0 - n_dead as f64 / v as f64;
            trainer.event(&serde_json::json!({"step": step + 1, "event": "restart", "window_usage": usage, "restarted": n_dead}))?;
            counts = counts.zeros_like();
        }
        let extra = || {
            Ok(serde_json::json!({
                "rec": f64::try_from(&rec)?,
                "codebook": f64::try_from(&codebook_loss)?,
                "commit": f64::try_from(&commit_loss)?,
            }))
        };
        trainer.end_step(vq.var_store(), step, last_loss, extra, progress)?;
    }
    trainer.finish(vq.var_store())?;
    // Evaluate the model as written (stored dtype included), not the in-memory one.
    vq.save(&opts.out, opts.dtype)?;
    let (saved, _) = VqModel::load(&opts.out, device, Some(DType::Fp32))?;
    let used = Tensor::zeros([v], (Kind::Float, device));
    let (psnr64, psnr32) = tch::no_grad(|| -> Result<(f64, f64), TrainError> {
        Ok((
            evaluate(&saved, &data, 64, &used, device)?,
            evaluate(&saved, &data, 32, &used, device)?,
        ))
    })?;
    let codebook_usage = f64::try_from(used.gt(0.0).to_kind(Kind::Float).mean(Kind::Float))?;
    let report = VqReport {
        steps: opts.steps,
        seconds: trainer.seconds(),
        final_loss: last_loss,
        psnr64,
        psnr32,
        codebook_usage,
        heldout_images: data.indices(Split::Heldout).len(),
    };
    trainer.event(&serde_json::json!({"event": "eval", "report": &report}))?;
    Ok(report)
}

/// Settings of a decoder-only VQ training run (the tokens stay exactly as they are).
#[derive(Debug, Clone, Serialize)]
pub struct VqDecoderOptions {
    /// Data directory written by `mulo data emoji`.
    pub data: PathBuf,
    /// The trained VQ model whose encoder and codebook are kept.
    pub vq: PathBuf,
    /// Model directory to write.
    pub out: PathBuf,
    /// Checkpoints and the loss log.
    pub work: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Share of the steps on 32 px images (spread evenly).
    pub low_res_share: f64,
    /// Images per 64 px step (32 px steps use twice as many).
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// A different decoder width per level (trained from scratch); `None` continues the decoder.
    pub decoder_ch_mult: Option<Vec<i64>>,
    /// Seed of new weights and of the batch order.
    pub seed: u64,
    /// Continue from the last checkpoint in `work`.
    pub resume: bool,
    /// Storage dtype of the written model.
    pub dtype: DType,
}

/// What a decoder-only run measured on the held-out split.
#[derive(Debug, Clone, Serialize)]
pub struct VqDecoderReport {
    /// Steps run.
    pub steps: usize,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Whether the decoder continued from the input model (same architecture).
    pub warm_start: bool,
    /// Held-out PSNR of the input model at 64 px.
    pub psnr64_before: f64,
    /// The same at 32 px.
    pub psnr32_before: f64,
    /// Held-out PSNR of the written model at 64 px.
    pub psnr64: f64,
    /// The same at 32 px.
    pub psnr32: f64,
    /// Fraction of codes used on the held-out images at 64 and 32 px.
    pub codebook_usage: f64,
    /// Fraction of held-out tokens (64 and 32 px) the written model encodes as the input did.
    pub tokens_unchanged: f64,
    /// Held-out images.
    pub heldout_images: usize,
}

/// Trains the decoder (and `post_quant_conv`) of a trained VQ on its own frozen tokens: the
/// encoder, the codebook and therefore every token are unchanged, so models trained on the tokens
/// stay valid. `progress(step, total, loss)` after every step.
pub fn train_vq_decoder(
    opts: &VqDecoderOptions,
    device: Device,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<VqDecoderReport, TrainError> {
    let data = EmojiTensors::load(&opts.data)?;
    let train = data.indices(Split::Train);
    let heldout = data.indices(Split::Heldout);
    if train.is_empty() {
        return Err(TrainError::Train(
            "the data set has no training images".into(),
        ));
    }
    let (old, _) = VqModel::load(&opts.vq, device, Some(DType::Fp32))?;
    let mut cfg = old.config().clone();
    let warm_start = match &opts.decoder_ch_mult {
        Some(m) if *m != cfg.decoder_ch_mult => {
            cfg.decoder_ch_mult = m.clone();
            false
        }
        _ => true,
    };
    let mut vq = VqModel::random(cfg, device, DType::Fp32, opts.seed as i64)?;
    vq.copy_weights_from(&old, warm_start);
    let v = vq.config().codebook_size;
    let before = tch::no_grad(|| -> Result<(f64, f64), TrainError> {
        let used = Tensor::zeros([v], (Kind::Float, device));
        Ok((
            evaluate(&old, &data, 64, &used, device)?,
            evaluate(&old, &data, 32, &used, device)?,
        ))
    })?;
    let f = old.config().downsample_factor();
    let tok64 = super::gpt::tokenize_images(&old, &data, 64, device)?.view([-1, 64 / f, 64 / f]);
    let tok32 = super::gpt::tokenize_images(&old, &data, 32, device)?.view([-1, 32 / f, 32 / f]);
    let recipe = Recipe {
        lr: opts.lr,
        steps: opts.steps,
        extend_from: Vec::new(),
        warmup_div: 50,
        min_ratio: 0.05,
        adamw: adamw(0.99, 0.0),
        ckpt_every: 500,
        ema: None,
        stop: Stop::default(),
    };
    let mut trainer = Trainer::open(vq.var_store_mut(), &recipe, &opts.work, opts.resume)?;
    let mut last_loss = f64::NAN;
    for step in trainer.start..opts.steps {
        let mut rng = step_rng(opts.seed, step);
        let (size, n, tokens) = if is_low_res_step(step, opts.low_res_share) {
            (32, opts.batch * 2, &tok32)
        } else {
            (64, opts.batch, &tok64)
        };
        let rows = sample_rows(&mut rng, &train, n);
        let x = data.batch(size, &rows, device);
        let t = tokens
            .index_select(0, &Tensor::from_slice(&rows))
            .to_device(device);
        let diff = vq.decode_train(&t) - &x;
        let loss = diff.abs().mean(Kind::Float) + diff.pow_tensor_scalar(2).mean(Kind::Float);
        last_loss = trainer.update(vq.var_store(), step, &loss, progress)?;
    }
    trainer.finish(vq.var_store())?;
    vq.save(&opts.out, opts.dtype)?;
    let (saved, _) = VqModel::load(&opts.out, device, Some(DType::Fp32))?;
    let used = Tensor::zeros([v], (Kind::Float, device));
    let (psnr64, psnr32) = tch::no_grad(|| -> Result<(f64, f64), TrainError> {
        Ok((
            evaluate(&saved, &data, 64, &used, device)?,
            evaluate(&saved, &data, 32, &used, device)?,
        ))
    })?;
    let codebook_usage = f64::try_from(used.gt(0.0).to_kind(Kind::Float).mean(Kind::Float))?;
    let (mut same, mut total) = (0i64, 0i64);
    for (size, tokens) in [(64, &tok64), (32, &tok32)] {
        for chunk in heldout.chunks(128) {
            let now = saved
                .encode(&data.batch(size, chunk, device))?
                .to_device(Device::Cpu);
            let r = Tensor::from_slice(chunk);
            let was = tokens.index_select(0, &r);
            same += i64::try_from(now.eq_tensor(&was).sum(Kind::Int64))?;
            total += now.numel() as i64;
        }
    }
    let report = VqDecoderReport {
        steps: opts.steps,
        seconds: trainer.seconds(),
        final_loss: last_loss,
        warm_start,
        psnr64_before: before.0,
        psnr32_before: before.1,
        psnr64,
        psnr32,
        codebook_usage,
        tokens_unchanged: same as f64 / total.max(1) as f64,
        heldout_images: heldout.len(),
    };
    trainer.event(&serde_json::json!({"event": "eval", "report": &report}))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::is_low_res_step;

    #[test]
    fn low_res_steps_follow_the_share() {
        for (share, want) in [(0.0, 0), (0.5, 50), (2.0 / 3.0, 66), (1.0, 100)] {
            let n = (0..100).filter(|&s| is_low_res_step(s, share)).count();
            assert_eq!(n, want, "share {share}");
        }
        // Half: alternating, starting with 64 px.
        assert!(!is_low_res_step(0, 0.5) && is_low_res_step(1, 0.5));
    }
}
