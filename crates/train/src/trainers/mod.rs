//! Training in Rust with tch, with the same model code as inference: learning-rate schedule,
//! loss logs, checkpoints and resume, and the emoji data in tensors.

pub mod evaluator;
pub mod gpt;
mod optim;
pub mod token_pairs;
pub mod upsampler;
pub mod vq;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::data::emoji::{DataError, Meta, Split};
use crate::error::TrainError;
use optim::{AdamW, Ema};

/// Linear warm-up to `peak_lr`, then cosine decay to `peak_lr · min_ratio` at `total` steps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Schedule {
    /// Learning rate after warm-up.
    pub peak_lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate at `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.peak_lr * self.min_ratio;
        min + (self.peak_lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The learning rate of a run that was extended: one [`Schedule`] per length the run was set to,
/// each used from the end of the one before. A run of `total` steps extended from `a` follows
/// an `a`-step schedule up to step `a`, then the `total`-step one from where it stands there
/// (what `--resume --steps total` does to a finished `a`-step run).
#[derive(Debug, Clone)]
pub struct Schedules(Vec<Schedule>);

impl Schedules {
    /// The schedules of a `total`-step run first set to each length of `extend_from`
    /// (increasing, each below `total`); warm-up `length / warmup_div` for each.
    pub fn new(
        peak_lr: f64,
        total: usize,
        extend_from: &[usize],
        warmup_div: usize,
        min_ratio: f64,
    ) -> Result<Self, TrainError> {
        let increasing = extend_from.windows(2).all(|w| w[0] < w[1]);
        if !increasing || extend_from.iter().any(|&a| a == 0 || a >= total) {
            return Err(TrainError::Train(format!(
                "--extend-from {extend_from:?}: lengths must increase and lie between 0 and --steps {total}"
            )));
        }
        let schedule = |len: usize| Schedule {
            peak_lr,
            warmup: (len / warmup_div.max(1)).max(1),
            total: len,
            min_ratio,
        };
        Ok(Self(
            extend_from
                .iter()
                .chain([&total])
                .map(|&len| schedule(len))
                .collect(),
        ))
    }

    /// Learning rate at `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let last = &self.0[self.0.len() - 1];
        self.0
            .iter()
            .find(|s| step < s.total)
            .unwrap_or(last)
            .lr(step)
    }

    /// Steps of the whole run.
    pub fn total(&self) -> usize {
        self.0[self.0.len() - 1].total
    }
}

/// A JSON-lines loss log, appended to on resume.
#[derive(Debug)]
pub struct TrainLog {
    file: std::io::BufWriter<std::fs::File>,
}

impl TrainLog {
    /// Opens `path` (truncating unless `append`).
    pub fn open(path: &Path, append: bool) -> Result<Self, TrainError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
        })
    }

    /// Writes one record.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{record}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Train(format!("writing the loss log: {e}")))
    }
}

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Train(format!("{}: {e}", path.display()))
}

/// Where a training run keeps its checkpoint: `<dir>/checkpoint.safetensors` + `checkpoint.json`.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointInfo {
    step: usize,
}

impl Checkpoints {
    /// Checkpoints under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Saves the variables (`checkpoint-<step>.safetensors`), the optimiser state
    /// (`optimizer-<step>.safetensors`: Adam's moments and, with EMA, the averaged weights) and
    /// then `checkpoint.json` naming the step: each written under a temporary name and renamed,
    /// the record last, so a crash at any point leaves the previous checkpoint whole. The files
    /// of earlier steps are removed after.
    pub fn save(
        &self,
        vs: &VarStore,
        optimizer: &[(String, Tensor)],
        step: usize,
    ) -> Result<(), TrainError> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let rename = |tmp: &Path, to: &Path| std::fs::rename(tmp, to).map_err(|e| io_err(to, e));
        let tmp = dir.join("checkpoint.tmp.safetensors");
        vs.save(&tmp)?;
        rename(&tmp, &dir.join(format!("checkpoint-{step}.safetensors")))?;
        let tmp = dir.join("optimizer.tmp.safetensors");
        Tensor::write_safetensors(optimizer, &tmp)?;
        rename(&tmp, &dir.join(format!("optimizer-{step}.safetensors")))?;
        let info = serde_json::to_string(&CheckpointInfo { step })
            .map_err(|e| TrainError::Train(e.to_string()))?;
        let tmp = dir.join("checkpoint.tmp.json");
        std::fs::write(&tmp, info).map_err(|e| io_err(&tmp, e))?;
        rename(&tmp, &dir.join("checkpoint.json"))?;
        self.remove_older_than(step);
        Ok(())
    }

    /// Removes the checkpoint files of other steps (and of the format without steps).
    fn remove_older_than(&self, step: usize) {
        let keep = [
            format!("checkpoint-{step}.safetensors"),
            format!("optimizer-{step}.safetensors"),
        ];
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = (name.starts_with("checkpoint") || name.starts_with("optimizer"))
                && name.ends_with(".safetensors")
                && !name.contains(".tmp.");
            if ours && !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Loads the variables of the last checkpoint, if any; returns its completed steps and the
    /// optimiser state (none in checkpoints written before it was kept: Adam then restarts).
    /// Checkpoints of the earlier format (`checkpoint.safetensors`, `optimizer.safetensors`)
    /// load too.
    pub fn load(&self, vs: &mut VarStore) -> Result<Option<Resumed>, TrainError> {
        let info = self.dir.join("checkpoint.json");
        if !info.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&info).map_err(|e| io_err(&info, e))?;
        let ci: CheckpointInfo = serde_json::from_str(&text)
            .map_err(|e| TrainError::Train(format!("{}: {e}", info.display())))?;
        let stepped = self.dir.join(format!("checkpoint-{}.safetensors", ci.step));
        let (weights, optimizer) = if stepped.exists() {
            (
                stepped,
                self.dir.join(format!("optimizer-{}.safetensors", ci.step)),
            )
        } else {
            (
                self.dir.join("checkpoint.safetensors"),
                self.dir.join("optimizer.safetensors"),
            )
        };
        vs.load(&weights)?;
        let optimizer = if optimizer.exists() {
            let t = Tensor::read_safetensors(&optimizer)
                .map_err(|e| TrainError::Train(format!("{}: {e}", optimizer.display())))?;
            Some(t.into_iter().collect())
        } else {
            None
        };
        Ok(Some(Resumed {
            step: ci.step,
            optimizer,
        }))
    }
}

/// What a checkpoint restores besides the weights.
#[derive(Debug)]
pub struct Resumed {
    /// Completed steps.
    pub step: usize,
    /// The optimiser state by tensor name, when the checkpoint has one.
    pub optimizer: Option<std::collections::HashMap<String, Tensor>>,
}

/// The optimiser settings of a training loop: AdamW, linear warm-up over `steps / warmup_div`
/// steps, cosine decay to `lr · min_ratio` (as [`Schedules`] when the run was extended from
/// shorter lengths), a checkpoint every `ckpt_every` steps.
#[derive(Debug, Clone)]
pub(crate) struct Recipe {
    pub lr: f64,
    pub steps: usize,
    pub extend_from: Vec<usize>,
    pub warmup_div: usize,
    pub min_ratio: f64,
    pub adamw: nn::AdamW,
    pub ckpt_every: usize,
    /// Decay of the exponential moving average of the weights (none: no average); with one, the
    /// held-out probes and the written model use the averaged weights.
    pub ema: Option<f64>,
    /// When to pause before the last step (a checkpoint, then [`TrainError::Paused`]).
    pub stop: Stop,
}

/// A budget for one invocation of a long run: pause (checkpoint and return) after a step or once
/// a wall-clock time has passed, so that a run spans several sessions with `--resume`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Stop {
    /// Pause once this many steps are done.
    pub at_step: Option<usize>,
    /// Pause at the first step that ends after this many seconds of this invocation.
    pub after_seconds: Option<f64>,
}

impl Stop {
    /// Whether to pause after `done` steps, `seconds` into this invocation.
    pub fn reached(&self, done: usize, seconds: f64) -> bool {
        self.at_step.is_some_and(|s| done >= s) || self.after_seconds.is_some_and(|t| seconds >= t)
    }
}

/// AdamW with β1 0.9, the given β2 and weight decay, ε 1e-8.
pub(crate) fn adamw(beta2: f64, wd: f64) -> nn::AdamW {
    nn::AdamW {
        beta1: 0.9,
        beta2,
        wd,
        eps: 1e-8,
        amsgrad: false,
    }
}

/// The random stream of one training step: the same for a step whether or not the run resumed.
pub(crate) fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(step as u64))
}

/// `n` rows drawn uniformly with replacement from `pool`.
pub(crate) fn sample_rows(rng: &mut ChaCha8Rng, pool: &[i64], n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| pool[rng.random_range(0..pool.len())])
        .collect()
}

/// `n` rows: a group drawn uniformly with replacement, then a row of it uniformly, so that every
/// group weighs the same whatever its size.
pub(crate) fn sample_grouped(rng: &mut ChaCha8Rng, groups: &[Vec<i64>], n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| {
            let g = &groups[rng.random_range(0..groups.len())];
            g[rng.random_range(0..g.len())]
        })
        .collect()
}

/// How a trainer draws its training rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Uniform over images (skin-tone variations make People & Body 60% of the draws).
    Image,
    /// Uniform over base emoji, then over its images (skin tones and vendors are variations of
    /// one emoji).
    Base,
    /// Uniform over categories, then over the category's base emoji, then over its images.
    Category,
}

/// Draws training rows by a [`Balance`]: a category, then a group (base emoji) of it, then a row
/// of the group, each uniformly.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    /// Category → groups → rows.
    categories: Vec<Vec<Vec<i64>>>,
}

impl Sampler {
    /// The sampler of the training split of `data`.
    pub fn new(data: &EmojiTensors, balance: Balance) -> Result<Self, TrainError> {
        let categories = match balance {
            Balance::Image => vec![data.train_rows()?.into_iter().map(|r| vec![r]).collect()],
            Balance::Base => vec![data.train_groups()?],
            Balance::Category => {
                let mut by: std::collections::BTreeMap<usize, Vec<Vec<i64>>> = Default::default();
                for g in data.train_groups()? {
                    let cat = data.meta.items[g[0] as usize].category_id;
                    by.entry(cat).or_default().push(g);
                }
                by.into_values().collect()
            }
        };
        Ok(Self { categories })
    }

    /// `n` rows (with replacement).
    pub fn sample(&self, rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
        match self.categories.as_slice() {
            [one] => sample_grouped(rng, one, n),
            all => (0..n)
                .flat_map(|_| {
                    let c = rng.random_range(0..all.len());
                    sample_grouped(rng, &all[c], 1)
                })
                .collect(),
        }
    }
}

/// Number of parameters in a variable store.
pub(crate) fn parameter_count(vs: &VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// The optimiser step, loss log, checkpoints and progress shared by every training loop.
pub(crate) struct Trainer {
    stop: Stop,
    opt: AdamW,
    ema: Option<Ema>,
    sched: Schedules,
    log: TrainLog,
    ckpt: Checkpoints,
    started: Instant,
    ckpt_every: usize,
    /// First step to run (after a resumed checkpoint).
    pub start: usize,
}

impl Trainer {
    /// Loads the last checkpoint of `work` into `vs` when `resume`, opens the loss log (appended
    /// on resume) and builds the optimiser.
    pub fn open(
        vs: &mut VarStore,
        recipe: &Recipe,
        work: &Path,
        resume: bool,
    ) -> Result<Self, TrainError> {
        let sched = Schedules::new(
            recipe.lr,
            recipe.steps,
            &recipe.extend_from,
            recipe.warmup_div,
            recipe.min_ratio,
        )?;
        let ckpt = Checkpoints::new(work);
        let resumed = if resume { ckpt.load(vs)? } else { None };
        std::fs::create_dir_all(work).map_err(|e| io_err(work, e))?;
        let mut log = TrainLog::open(&work.join("loss.jsonl"), resume)?;
        let mut opt = AdamW::new(vs, recipe.adamw);
        let mut ema = recipe.ema.map(|d| Ema::new(vs, d));
        let start = match resumed {
            None => 0,
            Some(Resumed {
                step,
                optimizer: Some(state),
            }) => {
                opt.load_state(&state)?;
                match (&mut ema, Ema::in_state(&state)) {
                    (Some(ema), true) => ema.load_state(&state)?,
                    (Some(_), false) => log.write(&serde_json::json!({"step": step, "event": "the checkpoint has no weight average: --ema starts it at the resumed weights"}))?,
                    (None, true) => log.write(&serde_json::json!({"step": step, "event": "the checkpoint's weight average is dropped (no --ema)"}))?,
                    (None, false) => {}
                }
                step
            }
            Some(Resumed {
                step,
                optimizer: None,
            }) => {
                log.write(&serde_json::json!({"step": step, "event": "resume without optimizer state: Adam's moments restart"}))?;
                step
            }
        };
        // Marks the piece for the run's history (pieces and seconds, `run_history`).
        log.write(&serde_json::json!({"event": "start", "step": start}))?;
        if let Some(at) = recipe.stop.at_step.filter(|&at| at <= start) {
            return Err(TrainError::Train(format!(
                "--stop-at {at} is not after the checkpoint's step {start}: nothing to run"
            )));
        }
        Ok(Self {
            stop: recipe.stop,
            opt,
            ema,
            sched,
            log,
            ckpt,
            started: Instant::now(),
            ckpt_every: recipe.ckpt_every,
            start,
        })
    }

    /// [`Trainer::step`] then [`Trainer::end_step`] without extra log fields; returns the loss.
    pub fn update(
        &mut self,
        vs: &VarStore,
        step: usize,
        loss: &Tensor,
        progress: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<f64, TrainError> {
        let value = self.step(step, loss)?;
        self.end_step(vs, step, value, || Ok(serde_json::Value::Null), progress)?;
        Ok(value)
    }

    /// One optimiser step on `loss` (lr from the schedule, gradient norm clipped at 1); returns
    /// the loss value.
    pub fn step(&mut self, step: usize, loss: &Tensor) -> Result<f64, TrainError> {
        self.zero_grad();
        loss.backward();
        self.apply(step)?;
        Ok(f64::try_from(loss)?)
    }

    /// Clears the gradients (before accumulating a step's micro-batches).
    pub fn zero_grad(&mut self) {
        self.opt.zero_grad();
    }

    /// The update of step `step` from the gradients accumulated since [`Trainer::zero_grad`]:
    /// norm clipped at 1, AdamW at the schedule's rate, then the weight average.
    pub fn apply(&mut self, step: usize) -> Result<(), TrainError> {
        self.opt.clip_grad_norm(1.0)?;
        self.opt.step(self.sched.lr(step));
        if let Some(ema) = &mut self.ema {
            ema.update();
        }
        Ok(())
    }

    /// Runs `f` with the weights the run will write: the average with EMA, else the current.
    pub fn with_final_weights<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.ema {
            Some(ema) => ema.with_average(f),
            None => f(),
        }
    }

    /// Closes a step: the log record every 25 steps (with `extra` fields), a checkpoint every
    /// `ckpt_every` steps, and `progress`.
    pub fn end_step(
        &mut self,
        vs: &VarStore,
        step: usize,
        loss: f64,
        extra: impl FnOnce() -> Result<serde_json::Value, TrainError>,
        progress: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<(), TrainError> {
        let done = step + 1;
        if done.is_multiple_of(25) || done == self.sched.total() {
            let mut rec = serde_json::json!({
                "step": done, "lr": self.sched.lr(step), "loss": loss, "seconds": self.seconds(),
            });
            if let (Some(r), serde_json::Value::Object(more)) = (rec.as_object_mut(), extra()?) {
                r.extend(more);
            }
            self.log.write(&rec)?;
        }
        if done.is_multiple_of(self.ckpt_every) {
            self.save(vs, done)?;
        }
        progress(done, self.sched.total(), loss);
        if done < self.sched.total() && self.stop.reached(done, self.seconds()) {
            if !done.is_multiple_of(self.ckpt_every) {
                self.save(vs, done)?;
            }
            self.log.write(
                &serde_json::json!({"step": done, "event": "paused", "seconds": self.seconds()}),
            )?;
            return Err(TrainError::Paused {
                step: done,
                total: self.sched.total(),
            });
        }
        Ok(())
    }

    /// Writes an event record to the loss log.
    pub fn event(&mut self, record: &serde_json::Value) -> Result<(), TrainError> {
        self.log.write(record)
    }

    /// Saves the final checkpoint, then puts the averaged weights in the model when the run
    /// keeps an average (what the caller writes next).
    pub fn finish(&self, vs: &VarStore) -> Result<(), TrainError> {
        self.save(vs, self.sched.total())?;
        if let Some(ema) = &self.ema {
            ema.copy_into_model();
        }
        Ok(())
    }

    fn save(&self, vs: &VarStore, done: usize) -> Result<(), TrainError> {
        let mut state = self.opt.state();
        if let Some(ema) = &self.ema {
            state.extend(ema.state());
        }
        self.ckpt.save(vs, &state, done)
    }

    /// Seconds since the run started.
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// The emoji data set as tensors (u8, NHWC, on the CPU) with its metadata.
#[derive(Debug)]
pub struct EmojiTensors {
    /// `[N, 64, 64, 3]`.
    pub images64: Tensor,
    /// `[N, 32, 32, 3]`.
    pub images32: Tensor,
    /// `[N, 16, 16, 3]`.
    pub images16: Tensor,
    /// Labels, captions and splits.
    pub meta: Meta,
}

impl EmojiTensors {
    /// Loads a directory written by `mulo data emoji`.
    pub fn load(dir: &Path) -> Result<Self, TrainError> {
        let meta = Meta::load(dir).map_err(|e: DataError| TrainError::Train(e.to_string()))?;
        let path = dir.join("emoji.safetensors");
        let mut tensors: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(&path)
                .map_err(|e| TrainError::Train(format!("{}: {e}", path.display())))?
                .into_iter()
                .collect();
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| TrainError::Train(format!("{}: no tensor '{name}'", path.display())))
        };
        Ok(Self {
            images64: take("images64")?,
            images32: take("images32")?,
            images16: take("images16")?,
            meta,
        })
    }

    /// Row indices of the training split; an error when it is empty.
    pub fn train_rows(&self) -> Result<Vec<i64>, TrainError> {
        let rows = self.indices(Split::Train);
        if rows.is_empty() {
            return Err(TrainError::Train(
                "the data set has no training images".into(),
            ));
        }
        Ok(rows)
    }

    /// Training rows grouped by base emoji (its skin-tone variations and both vendors' images
    /// form one group), groups in data-set order; an error when there are none.
    pub fn train_groups(&self) -> Result<Vec<Vec<i64>>, TrainError> {
        let mut order: Vec<&str> = Vec::new();
        let mut groups: std::collections::HashMap<&str, Vec<i64>> = Default::default();
        for item in self.meta.items.iter().filter(|i| i.split == Split::Train) {
            groups
                .entry(item.base.as_str())
                .or_insert_with(|| {
                    order.push(item.base.as_str());
                    Vec::new()
                })
                .push(item.index as i64);
        }
        if order.is_empty() {
            return Err(TrainError::Train(
                "the data set has no training images".into(),
            ));
        }
        Ok(order.into_iter().filter_map(|b| groups.remove(b)).collect())
    }

    /// Row indices of one split.
    pub fn indices(&self, split: Split) -> Vec<i64> {
        self.meta
            .items
            .iter()
            .filter(|i| i.split == split)
            .map(|i| i.index as i64)
            .collect()
    }

    /// Images of `size` px at `rows`, as float NCHW in [-1, 1] on `device`.
    pub fn batch(&self, size: usize, rows: &[i64], device: Device) -> Tensor {
        let src = match size {
            64 => &self.images64,
            32 => &self.images32,
            _ => &self.images16,
        };
        let idx = Tensor::from_slice(rows);
        src.index_select(0, &idx)
            .to_device(device)
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            .g_div_scalar(127.5)
            .g_sub_scalar(1.0)
    }
}

/// Mean per-image PSNR (dB) between images in [-1, 1], both rounded to 8 bits first.
pub fn psnr_u8(a: &Tensor, b: &Tensor) -> f64 {
    let q = |t: &Tensor| {
        t.clamp(-1.0, 1.0)
            .g_add_scalar(1.0)
            .g_mul_scalar(127.5)
            .round()
    };
    let mse = (q(a) - q(b))
        .pow_tensor_scalar(2)
        .mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float)
        .clamp_min(1e-10);
    let psnr = (mse.reciprocal() * (255.0f64 * 255.0)).log10() * 10.0;
    f64::try_from(psnr.mean(Kind::Float)).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_schedules_follow_each_length_in_turn() {
        let s = |warmup, total| Schedule {
            peak_lr: 1.0,
            warmup,
            total,
            min_ratio: 0.1,
        };
        let plan = Schedules::new(1.0, 6000, &[3000], 20, 0.1).unwrap();
        assert_eq!(plan.total(), 6000);
        for step in [0, 149, 150, 2999] {
            assert_eq!(plan.lr(step), s(150, 3000).lr(step), "step {step}");
        }
        for step in [3000, 4500, 5999, 7000] {
            assert_eq!(plan.lr(step), s(300, 6000).lr(step), "step {step}");
        }
        // The jump at the extension: from the 3000-step floor up into the 6000-step cosine.
        assert!(plan.lr(2999) < 0.11 && plan.lr(3000) > 0.5);
        let plain = Schedules::new(1.0, 6000, &[], 20, 0.1).unwrap();
        assert_eq!(plain.lr(1000), s(300, 6000).lr(1000));
        for bad in [&[6000][..], &[0], &[4000, 2000], &[2000, 2000]] {
            assert!(Schedules::new(1.0, 6000, bad, 20, 0.1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            peak_lr: 1.0,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn grouped_sampling_weighs_groups_not_rows() {
        // One group of one row and one of nine: each group is drawn half the time.
        let groups = vec![vec![0], (1..10).collect::<Vec<i64>>()];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let rows = sample_grouped(&mut rng, &groups, 20_000);
        let alone = rows.iter().filter(|&&r| r == 0).count() as f64 / rows.len() as f64;
        assert!((alone - 0.5).abs() < 0.02, "{alone}");
        assert!((1..10).all(|r| rows.contains(&r)));
        // One row per group is the plain uniform draw over rows.
        let single: Vec<Vec<i64>> = (0..10).map(|r| vec![r]).collect();
        let rows = sample_grouped(&mut rng, &single, 20_000);
        let first = rows.iter().filter(|&&r| r == 0).count() as f64 / rows.len() as f64;
        assert!((first - 0.1).abs() < 0.02, "{first}");
    }

    #[test]
    fn category_sampling_weighs_categories_then_emoji() {
        // Category 0: one emoji of one image; category 1: two emoji, of one and of four images.
        let s = Sampler {
            categories: vec![vec![vec![0]], vec![vec![1], vec![2, 3, 4, 5]]],
        };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let rows = s.sample(&mut rng, 40_000);
        let share = |f: &dyn Fn(i64) -> bool| {
            rows.iter().filter(|&&r| f(r)).count() as f64 / rows.len() as f64
        };
        assert!((share(&|r| r == 0) - 0.5).abs() < 0.02);
        assert!((share(&|r| r == 1) - 0.25).abs() < 0.02);
        assert!((share(&|r| r == 5) - 0.0625).abs() < 0.01);
    }

    #[test]
    fn psnr_of_identical_and_offset_images() {
        let a = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        assert!(psnr_u8(&a, &a) > 90.0);
        // An offset of 10 levels: 20·log10(255/10) = 28.13 dB.
        let b = &a + 10.0 / 127.5;
        assert!((psnr_u8(&a, &b) - 28.13).abs() < 0.01);
    }
}
