//! Training the evaluator CNN (category and subcategory of real emoji images).

use std::path::PathBuf;

use mulo_model::evaluator::{Evaluator, EvaluatorConfig};
use mulo_model::DType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use super::{sample_rows, step_rng, EmojiTensors, Recipe, Stop, Trainer};
use crate::data::emoji::Split;
use crate::error::TrainError;

/// Settings of an evaluator training run.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluatorTrainOptions {
    /// Data directory written by `mulo data emoji`.
    pub data: PathBuf,
    /// Model directory to write.
    pub out: PathBuf,
    /// Checkpoints and the loss log.
    pub work: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Share of training steps shown at 32 px (resized back), so 32 px samples can be judged.
    /// Half of the steps also mirror the images left to right.
    pub low_res_share: f64,
    /// Channels of the four stages.
    pub channels: Vec<i64>,
    /// Largest random shift of a batch, in pixels of its resolution (white fills the border).
    pub max_shift: i64,
    /// Label smoothing of both cross-entropies.
    pub label_smoothing: f64,
    /// Seed of the weights and the batch order.
    pub seed: u64,
    /// Continue from the last checkpoint in `work`.
    pub resume: bool,
    /// Storage dtype.
    pub dtype: DType,
}

/// Held-out accuracies of the written evaluator.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluatorReport {
    /// Steps run.
    pub steps: usize,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Category accuracy on held-out real images at 64 px.
    pub category_accuracy: f64,
    /// Subcategory accuracy on held-out real images at 64 px.
    pub subcategory_accuracy: f64,
    /// Category accuracy on held-out real images at 32 px.
    pub category_accuracy_32: f64,
    /// Subcategory accuracy on held-out real images at 32 px.
    pub subcategory_accuracy_32: f64,
    /// Held-out images.
    pub heldout_images: usize,
}

fn labels(data: &EmojiTensors, rows: &[i64], device: Device) -> (Tensor, Tensor) {
    let cat: Vec<i64> = rows
        .iter()
        .map(|&r| data.meta.items[r as usize].category_id as i64)
        .collect();
    let sub: Vec<i64> = rows
        .iter()
        .map(|&r| data.meta.items[r as usize].subcategory_id as i64)
        .collect();
    (
        Tensor::from_slice(&cat).to_device(device),
        Tensor::from_slice(&sub).to_device(device),
    )
}

/// Shifts a batch `[B, 3, H, W]` by a random offset of at most `max` pixels in each direction,
/// filling the uncovered border with white.
fn shift(x: &Tensor, max: i64, rng: &mut ChaCha8Rng) -> Tensor {
    if max <= 0 {
        return x.shallow_clone();
    }
    let s = x.size();
    let (dy, dx) = (rng.random_range(0..=2 * max), rng.random_range(0..=2 * max));
    x.pad([max, max, max, max], "constant", Some(1.0))
        .narrow(2, dy, s[2])
        .narrow(3, dx, s[3])
}

/// Held-out (category, subcategory) accuracy at `size` px.
fn accuracy(
    ev: &Evaluator,
    data: &EmojiTensors,
    size: usize,
    device: Device,
) -> Result<(f64, f64), TrainError> {
    let rows = data.indices(Split::Heldout);
    let (mut c_ok, mut s_ok) = (0i64, 0i64);
    tch::no_grad(|| -> Result<(), TrainError> {
        for chunk in rows.chunks(128) {
            let out = ev.forward(&data.batch(size, chunk, device));
            let (c, s) = labels(data, chunk, device);
            c_ok += i64::try_from(out.category.argmax(1, false).eq_tensor(&c).sum(Kind::Int64))?;
            s_ok += i64::try_from(
                out.subcategory
                    .argmax(1, false)
                    .eq_tensor(&s)
                    .sum(Kind::Int64),
            )?;
        }
        Ok(())
    })?;
    let n = rows.len().max(1) as f64;
    Ok((c_ok as f64 / n, s_ok as f64 / n))
}

/// Trains the evaluator; `progress(step, total, loss)` after every step.
pub fn train_evaluator(
    opts: &EvaluatorTrainOptions,
    device: Device,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<EvaluatorReport, TrainError> {
    let data = EmojiTensors::load(&opts.data)?;
    let train = data.train_rows()?;
    let cfg = EvaluatorConfig {
        channels: opts.channels.clone(),
        categories: data.meta.categories.len() as i64,
        subcategories: data.meta.subcategories.len() as i64,
        category_names: data.meta.categories.clone(),
        subcategory_names: data.meta.subcategories.clone(),
        dtype: opts.dtype,
    };
    let mut ev = Evaluator::random(cfg, device, opts.seed as i64)?;
    let recipe = Recipe {
        lr: opts.lr,
        steps: opts.steps,
        extend_from: Vec::new(),
        warmup_div: 20,
        min_ratio: 0.02,
        adamw: nn::AdamW::default(),
        ckpt_every: 250,
        ema: None,
        stop: Stop::default(),
    };
    let mut trainer = Trainer::open(ev.var_store_mut(), &recipe, &opts.work, opts.resume)?;
    let mut last_loss = f64::NAN;
    for step in trainer.start..opts.steps {
        let mut rng = step_rng(opts.seed, step);
        let rows = sample_rows(&mut rng, &train, opts.batch);
        let size = if rng.random::<f64>() < opts.low_res_share {
            32
        } else {
            64
        };
        let x = data.batch(size, &rows, device);
        // Mirror half of the batches: a category does not change with left and right.
        let x = if rng.random::<bool>() { x.flip([3]) } else { x };
        let x = shift(&x, opts.max_shift, &mut rng);
        let (c, s) = labels(&data, &rows, device);
        let out = ev.forward(&x);
        let ce = |logits: &Tensor, target: &Tensor| {
            logits
                .log_softmax(-1, Kind::Float)
                .cross_entropy_loss::<Tensor>(
                    target,
                    None,
                    tch::Reduction::Mean,
                    -100,
                    opts.label_smoothing,
                )
        };
        let loss = ce(&out.category, &c) + ce(&out.subcategory, &s);
        last_loss = trainer.update(ev.var_store(), step, &loss, progress)?;
    }
    trainer.finish(ev.var_store())?;
    ev.save(&opts.out, opts.dtype)?;
    let saved = Evaluator::load(&opts.out, device)?;
    let (category_accuracy, subcategory_accuracy) = accuracy(&saved, &data, 64, device)?;
    let (category_accuracy_32, subcategory_accuracy_32) = accuracy(&saved, &data, 32, device)?;
    let report = EvaluatorReport {
        steps: opts.steps,
        seconds: trainer.seconds(),
        final_loss: last_loss,
        category_accuracy,
        subcategory_accuracy,
        category_accuracy_32,
        subcategory_accuracy_32,
        heldout_images: data.indices(Split::Heldout).len(),
    };
    trainer.event(&serde_json::json!({"event": "eval", "report": &report}))?;
    Ok(report)
}
