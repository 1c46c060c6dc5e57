//! LlamaGen-exact logit processing and seeded sampling.
//!
//! Processing (`autoregressive/models/generate.py`): CFG `u + (c − u)·s` when `s > 1`, division by
//! `max(temperature, 1e-5)`, top-k (logits below the k-th largest set to −inf, ties kept), top-p
//! (sorted descending, cumulative softmax, drop entries whose cumulative mass exceeds `p` shifted
//! right by one so the first one past the threshold stays), softmax.
//!
//! Sampling draws one uniform number per row from a per-request ChaCha generator on the host and
//! inverts the CDF on the device, so the same seed and parameters give the same tokens whatever else
//! runs in the process, and only the sampled ids travel back to the host.

use mulo_core::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Combines the CFG pair and applies temperature, top-k and top-p: `logits` `[B, R, V]` (B = 2 when
/// `params.uses_cfg()`, cond first) → processed logits `[R, V]`, filtered entries −inf.
pub fn process_logits(logits: &Tensor, params: &SamplingParams) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let l = if params.uses_cfg() && logits.size()[0] >= 2 {
        let c = logits.get(0);
        let u = logits.get(1);
        let diff = &c - &u;
        u + diff * params.cfg_scale
    } else {
        logits.get(0)
    };
    let mut l = l / params.effective_temperature();
    let v = l.size()[l.dim() - 1];
    if params.top_k > 0 {
        let k = (params.top_k as i64).clamp(1, v);
        let (top, _) = l.topk(k, -1, true, true);
        let kth = top.narrow(-1, k - 1, 1);
        l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if params.top_p < 1.0 {
        let (sorted, idx) = l.sort(-1, true);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let over = cum.gt(params.top_p);
        let first = over.narrow(-1, 0, 1).zeros_like();
        let shifted = Tensor::cat(&[first, over.narrow(-1, 0, v - 1)], -1);
        let remove = shifted.scatter(-1, &idx, &shifted);
        l = l.masked_fill(&remove, f64::NEG_INFINITY);
    }
    l
}

/// Processed probabilities `[R, V]`.
pub fn process_probs(logits: &Tensor, params: &SamplingParams) -> Tensor {
    process_logits(logits, params).softmax(-1, Kind::Float)
}

/// Samples one id per row of `probs` `[R, V]` by inverting the CDF at `uniforms[r]` (each in
/// (0, 1]); returns `[R]` int64 on the device. A zero-probability id is never returned.
pub fn sample_from_probs(probs: &Tensor, uniforms: &[f64]) -> Tensor {
    let v = probs.size()[1];
    let cdf = probs.cumsum(-1, Kind::Float);
    let total = cdf.narrow(-1, v - 1, 1);
    let u = Tensor::from_slice(uniforms)
        .to_kind(Kind::Float)
        .to_device(probs.device())
        .view([-1, 1]);
    let x = u * total;
    x.searchsorted(&cdf, false, false, "left", None::<Tensor>)
        .view([-1])
        .clamp_max(v - 1)
}

/// A per-request random source: one uniform in (0, 1] per sampled token (ChaCha8 seeded by the
/// request's seed, independent of every other request and of torch's global generator).
#[derive(Debug, Clone)]
pub struct TokenRng(ChaCha8Rng);

impl TokenRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// The next uniform in (0, 1].
    pub fn next_uniform(&mut self) -> f64 {
        1.0 - self.0.random::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).view([1, 1, -1])
    }

    fn vec1(x: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(x.reshape([-1])).unwrap()
    }

    fn p(cfg: f64, temp: f64, k: usize, top_p: f64) -> SamplingParams {
        SamplingParams {
            cfg_scale: cfg,
            temperature: temp,
            top_k: k,
            top_p,
        }
    }

    #[test]
    fn cfg_combines_cond_and_uncond() {
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 0.5, 0.5]).view([2, 1, 2]);
        let out = vec1(&process_logits(&logits, &p(3.0, 1.0, 0, 1.0)));
        // u + (c - u) * 3 = [0.5 + 0.5*3, 0.5 + 1.5*3]
        assert_eq!(out, vec![2.0, 5.0]);
        // cfg 1 ignores the second row entirely.
        let out = vec1(&process_logits(&logits, &p(1.0, 1.0, 0, 1.0)));
        assert_eq!(out, vec![1.0, 2.0]);
    }

    #[test]
    fn temperature_divides_and_zero_is_clamped() {
        let out = vec1(&process_logits(&t(&[1.0, 2.0]), &p(1.0, 2.0, 0, 1.0)));
        assert_eq!(out, vec![0.5, 1.0]);
        let probs = vec1(&process_probs(&t(&[1.0, 1.001]), &p(1.0, 0.0, 0, 1.0)));
        assert!(probs[1] > 0.999_99, "{probs:?}");
    }

    #[test]
    fn top_k_keeps_ties_and_the_k_largest() {
        let out = vec1(&process_logits(
            &t(&[3.0, 1.0, 2.0, 2.0, 0.0]),
            &p(1.0, 1.0, 2, 1.0),
        ));
        // k = 2: threshold is the 2nd largest (2.0); both 2.0 entries survive.
        assert_eq!(out[0], 3.0);
        assert_eq!(out[2], 2.0);
        assert_eq!(out[3], 2.0);
        assert!(out[1].is_infinite() && out[4].is_infinite());
        let out = vec1(&process_logits(&t(&[3.0, 1.0]), &p(1.0, 1.0, 10, 1.0)));
        assert_eq!(out, vec![3.0, 1.0], "k larger than V keeps all");
    }

    #[test]
    fn top_p_keeps_the_first_token_past_the_threshold() {
        // probs 0.5, 0.3, 0.2 (as logits of their logs).
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|x| x.ln()).collect();
        let probs = vec1(&process_probs(&t(&l), &p(1.0, 1.0, 0, 0.6)));
        // cumulative 0.5, 0.8, 1.0: > 0.6 at index 1 and 2, shifted → only index 2 removed.
        assert!((probs[0] - 0.625).abs() < 1e-6, "{probs:?}");
        assert!((probs[1] - 0.375).abs() < 1e-6);
        assert_eq!(probs[2], 0.0);
        let probs = vec1(&process_probs(&t(&l), &p(1.0, 1.0, 0, 0.4)));
        assert_eq!(probs, vec![1.0, 0.0, 0.0], "the top token always survives");
    }

    #[test]
    fn inverse_cdf_sampling_hits_only_supported_ids() {
        let probs = Tensor::from_slice(&[0.0f32, 0.25, 0.0, 0.75]).view([1, 4]);
        for (u, want) in [(1e-9, 1), (0.25, 1), (0.2500001, 3), (1.0, 3)] {
            let got = i64::try_from(sample_from_probs(&probs, &[u]).get(0)).unwrap();
            assert_eq!(got, want, "u = {u}");
        }
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = TokenRng::new(7);
        let mut b = TokenRng::new(7);
        let mut c = TokenRng::new(8);
        let xs: Vec<f64> = (0..1000).map(|_| a.next_uniform()).collect();
        assert!(xs.iter().all(|&x| x > 0.0 && x <= 1.0));
        assert!(xs
            .iter()
            .zip((0..1000).map(|_| b.next_uniform()))
            .all(|(x, y)| *x == y));
        assert_ne!(xs[0], c.next_uniform());
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }
}
