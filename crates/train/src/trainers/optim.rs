//! The optimiser of every training loop, with state that a checkpoint keeps: AdamW (PyTorch's
//! update rule) whose moments and step count are saved and restored, so that `--resume` continues
//! Adam's statistics, and an exponential moving average (EMA) of the weights.

use std::collections::{BTreeMap, HashMap, HashSet};

use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

use crate::error::TrainError;

/// The trainable variables of `vs` by name, in name order.
fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let ptrs: HashSet<usize> = vs
        .trainable_variables()
        .iter()
        .map(|t| t.data_ptr() as usize)
        .collect();
    let named: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| ptrs.contains(&(t.data_ptr() as usize)))
        .collect();
    named.into_iter().collect()
}

/// One parameter and its Adam moments.
struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
}

/// AdamW over the trainable variables of a [`VarStore`], as `torch.optim.AdamW`: decoupled
/// weight decay, bias-corrected moments; parameters without a gradient are left alone.
pub(crate) struct AdamW {
    cfg: nn::AdamW,
    slots: Vec<Slot>,
    /// Updates applied so far (Adam's `t`).
    steps: i64,
}

/// Name of the tensor holding the number of updates in a saved state.
const STEPS: &str = "adam.steps";

impl AdamW {
    /// An optimiser over the trainable variables of `vs` with zero moments.
    pub fn new(vs: &VarStore, cfg: nn::AdamW) -> Self {
        let slots = trainable(vs)
            .into_iter()
            .map(|(name, param)| Slot {
                m: param.zeros_like(),
                v: param.zeros_like(),
                name,
                param,
            })
            .collect();
        Self {
            cfg,
            slots,
            steps: 0,
        }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// Scales the gradients so that their global L2 norm is at most `max`; returns the norm
    /// before scaling.
    pub fn clip_grad_norm(&mut self, max: f64) -> Result<f64, TrainError> {
        let grads: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad())
            .filter(Tensor::defined)
            .collect();
        let mut sq = 0.0;
        for g in &grads {
            sq += f64::try_from(g.pow_tensor_scalar(2).sum(Kind::Double))?;
        }
        let norm = sq.sqrt();
        if norm > max {
            let scale = max / (norm + 1e-6);
            tch::no_grad(|| {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_scalar_(scale);
                }
            });
        }
        Ok(norm)
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let c = self.cfg;
        let t = self.steps as f64;
        let bias1 = 1.0 - c.beta1.powf(t);
        let bias2 = 1.0 - c.beta2.powf(t);
        tch::no_grad(|| {
            for s in &mut self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let _ = s.param.g_mul_scalar_(1.0 - lr * c.wd);
                let _ = s.m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
                let _ =
                    s.v.g_mul_scalar_(c.beta2)
                        .g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = (s.v.sqrt() / bias2.sqrt()) + c.eps;
                let _ = s.param.g_sub_(&(&s.m / denom * (lr / bias1)));
            }
        });
    }

    /// The state to save: each parameter's moments and the update count.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("adam.m.{}", s.name), s.m.shallow_clone()),
                    (format!("adam.v.{}", s.name), s.v.shallow_clone()),
                ]
            })
            .collect();
        out.push((STEPS.into(), Tensor::from_slice(&[self.steps])));
        out
    }

    /// Restores a state written by [`AdamW::state`]; an error names a missing or mis-shaped
    /// tensor (a checkpoint of another model).
    pub fn load_state(&mut self, saved: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        let get = |name: &str, like: &Tensor| -> Result<Tensor, TrainError> {
            let t = saved.get(name).ok_or_else(|| {
                TrainError::Train(format!("optimizer state has no tensor '{name}'"))
            })?;
            if t.size() != like.size() {
                return Err(TrainError::Train(format!(
                    "optimizer state '{name}' has shape {:?}, the model {:?}",
                    t.size(),
                    like.size()
                )));
            }
            Ok(t.to_device(like.device()).to_kind(like.kind()))
        };
        for s in &mut self.slots {
            let m = get(&format!("adam.m.{}", s.name), &s.m)?;
            let v = get(&format!("adam.v.{}", s.name), &s.v)?;
            tch::no_grad(|| {
                s.m.copy_(&m);
                s.v.copy_(&v);
            });
        }
        let steps = saved
            .get(STEPS)
            .ok_or_else(|| TrainError::Train(format!("optimizer state has no '{STEPS}'")))?;
        self.steps = i64::try_from(steps.reshape([-1]).get(0))?;
        Ok(())
    }
}

/// An exponential moving average of the trainable weights: `ema ← d·ema + (1 − d)·w` after each
/// update, with `d = min(decay, (1 + t) / (10 + t))` so that early averages are not dominated by
/// the random initialisation.
pub(crate) struct Ema {
    decay: f64,
    params: Vec<(String, Tensor)>,
    shadow: Vec<Tensor>,
    updates: i64,
}

/// Name of the tensor holding the EMA's update count in a saved state.
const EMA_UPDATES: &str = "ema.updates";

impl Ema {
    /// An average of the trainable variables of `vs`, starting at their current values.
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let params = trainable(vs);
        let shadow = params.iter().map(|(_, p)| p.detach().copy()).collect();
        Self {
            decay,
            params,
            shadow,
            updates: 0,
        }
    }

    /// Folds the current weights into the average.
    pub fn update(&mut self) {
        let t = self.updates as f64;
        let d = self.decay.min((1.0 + t) / (10.0 + t));
        self.updates += 1;
        tch::no_grad(|| {
            for ((_, p), s) in self.params.iter().zip(&mut self.shadow) {
                let _ = s.g_mul_scalar_(d).g_add_(&(p * (1.0 - d)));
            }
        });
    }

    /// Runs `f` with the averaged weights in the model, then puts the trained weights back.
    pub fn with_average<R>(&self, f: impl FnOnce() -> R) -> R {
        let saved: Vec<Tensor> = self.params.iter().map(|(_, p)| p.detach().copy()).collect();
        self.copy_into_model();
        let r = f();
        tch::no_grad(|| {
            for ((_, p), s) in self.params.iter().zip(&saved) {
                p.shallow_clone().copy_(s);
            }
        });
        r
    }

    /// Replaces the model's weights by the average (at the end of a run).
    pub fn copy_into_model(&self) {
        tch::no_grad(|| {
            for ((_, p), s) in self.params.iter().zip(&self.shadow) {
                p.shallow_clone().copy_(s);
            }
        });
    }

    /// The state to save: the averaged weights and the update count.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(&self.shadow)
            .map(|((n, _), s)| (format!("ema.{n}"), s.shallow_clone()))
            .collect();
        out.push((EMA_UPDATES.into(), Tensor::from_slice(&[self.updates])));
        out
    }

    /// Whether a saved state holds an average.
    pub fn in_state(saved: &HashMap<String, Tensor>) -> bool {
        saved.contains_key(EMA_UPDATES)
    }

    /// Restores a state written by [`Ema::state`].
    pub fn load_state(&mut self, saved: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        for ((name, _), s) in self.params.iter().zip(&mut self.shadow) {
            let key = format!("ema.{name}");
            let t = saved
                .get(&key)
                .filter(|t| t.size() == s.size())
                .ok_or_else(|| {
                    TrainError::Train(format!("checkpoint has no tensor '{key}' of this model"))
                })?;
            tch::no_grad(|| s.copy_(&t.to_device(s.device()).to_kind(s.kind())));
        }
        let n = saved
            .get(EMA_UPDATES)
            .ok_or_else(|| TrainError::Train(format!("checkpoint has no '{EMA_UPDATES}'")))?;
        self.updates = i64::try_from(n.reshape([-1]).get(0))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::Device;

    /// Values from a local seeded generator: libtorch's global one is shared with the tests
    /// that run beside this one, so `manual_seed` + `randn` is not reproducible here.
    fn seeded(rng: &mut rand_chacha::ChaCha8Rng, shape: &[i64]) -> Tensor {
        use rand::Rng;
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_slice(&v).reshape(shape)
    }

    /// A small linear model and a fixed regression batch.
    fn model(seed: u64) -> (VarStore, nn::Linear, Tensor, Tensor) {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let vs = VarStore::new(Device::Cpu);
        // Its initial draw holds the global generator's lock so that seeded tests stay exact.
        let mut lin = mulo_model::seed::with_global_seed(0, || {
            nn::linear(vs.root() / "lin", 5, 3, Default::default())
        });
        tch::no_grad(|| {
            lin.ws.copy_(&seeded(&mut rng, &[3, 5]));
            if let Some(bs) = lin.bs.as_mut() {
                bs.copy_(&seeded(&mut rng, &[3]));
            }
        });
        let x = seeded(&mut rng, &[16, 5]);
        let y = seeded(&mut rng, &[16, 3]);
        (vs, lin, x, y)
    }

    fn loss(lin: &nn::Linear, x: &Tensor, y: &Tensor) -> Tensor {
        (lin.forward(x) - y).pow_tensor_scalar(2).mean(Kind::Float)
    }

    fn weights(vs: &VarStore) -> Vec<f32> {
        trainable(vs)
            .iter()
            .flat_map(|(_, t)| Vec::<f32>::try_from(t.reshape([-1])).unwrap())
            .collect()
    }

    const CFG: nn::AdamW = nn::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        wd: 0.05,
        eps: 1e-8,
        amsgrad: false,
    };

    #[test]
    fn matches_libtorch_adamw() {
        let (vs_a, lin_a, x, y) = model(3);
        let (vs_b, lin_b, _, _) = model(3);
        let mut ours = AdamW::new(&vs_a, CFG);
        let mut theirs = CFG.build(&vs_b, 0.01).unwrap();
        for step in 0..20 {
            let lr = 0.01 * (1.0 + step as f64 / 10.0);
            ours.zero_grad();
            loss(&lin_a, &x, &y).backward();
            ours.step(lr);
            theirs.set_lr(lr);
            theirs.zero_grad();
            loss(&lin_b, &x, &y).backward();
            theirs.step();
        }
        let (a, b) = (weights(&vs_a), weights(&vs_b));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn a_restored_state_continues_exactly() {
        // Ten steps straight through against five, save, restore into a fresh optimiser, five.
        let run = |split: bool| {
            let (vs, lin, x, y) = model(5);
            let mut opt = AdamW::new(&vs, CFG);
            for i in 0..10 {
                if split && i == 5 {
                    let state: HashMap<String, Tensor> = opt
                        .state()
                        .into_iter()
                        .map(|(n, t)| (n, t.copy()))
                        .collect();
                    opt = AdamW::new(&vs, CFG);
                    opt.load_state(&state).unwrap();
                }
                opt.zero_grad();
                loss(&lin, &x, &y).backward();
                opt.step(0.05);
            }
            weights(&vs)
        };
        assert_eq!(run(false), run(true));
        // Restarting the moments instead (the old resume) gives other weights.
        let (vs, lin, x, y) = model(5);
        let mut opt = AdamW::new(&vs, CFG);
        for i in 0..10 {
            if i == 5 {
                opt = AdamW::new(&vs, CFG);
            }
            opt.zero_grad();
            loss(&lin, &x, &y).backward();
            opt.step(0.05);
        }
        assert_ne!(weights(&vs), run(false));
    }

    #[test]
    fn clipping_bounds_the_gradient_norm() {
        let (vs, lin, x, y) = model(7);
        let mut opt = AdamW::new(&vs, CFG);
        opt.zero_grad();
        (loss(&lin, &x, &y) * 1000.0).backward();
        let before = opt.clip_grad_norm(1.0).unwrap();
        assert!(before > 1.0);
        let after = opt.clip_grad_norm(f64::INFINITY).unwrap();
        assert!((after - 1.0).abs() < 1e-3, "{after}");
    }

    #[test]
    fn ema_averages_and_swaps_back() {
        let (vs, lin, x, y) = model(9);
        let mut opt = AdamW::new(&vs, CFG);
        let start = weights(&vs);
        let mut ema = Ema::new(&vs, 0.5);
        for _ in 0..5 {
            opt.zero_grad();
            loss(&lin, &x, &y).backward();
            opt.step(0.1);
            ema.update();
        }
        let trained = weights(&vs);
        let averaged = ema.with_average(|| weights(&vs));
        assert_eq!(weights(&vs), trained, "the trained weights come back");
        assert_ne!(
            averaged, trained,
            "the average differs from the last iterate"
        );
        assert_ne!(averaged, start, "and from the start");
        let state: HashMap<String, Tensor> = ema.state().into_iter().collect();
        let mut again = Ema::new(&vs, 0.5);
        again.load_state(&state).unwrap();
        assert_eq!(again.with_average(|| weights(&vs)), averaged);
        ema.copy_into_model();
        assert_eq!(weights(&vs), averaged);
    }
}
