//! Plain autoregressive generation: one target pass per token, the exact reference.

use std::time::Instant;

use mulo_core::{Condition, SamplingParams};
use mulo_model::sampling::{process_probs, sample_from_probs, TokenRng};
use mulo_model::Gpt;
use serde::Serialize;
use tch::Tensor;

use crate::error::EngineError;

/// What one generation cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationStats {
    /// Method name (`ar`).
    pub method: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Target forward passes (prefill included).
    pub target_passes: usize,
    /// Seconds spent in the prefill.
    pub prefill_seconds: f64,
    /// Seconds spent decoding after the prefill.
    pub decode_seconds: f64,
    /// Bytes held by the session's KV cache.
    pub kv_bytes: i64,
}

impl GenerationStats {
    /// Tokens per second over prefill and decoding.
    pub fn tokens_per_second(&self) -> f64 {
        let t = self.prefill_seconds + self.decode_seconds;
        if t > 0.0 {
            self.tokens as f64 / t
        } else {
            0.0
        }
    }
}

/// A generated token grid and its stats.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Token ids in raster order.
    pub tokens: Vec<i64>,
    /// Cost of the generation.
    pub stats: GenerationStats,
}

/// Samples one token from logits `[B, V]` (B = 2 with CFG); the only host sync of a decode step.
fn sample_next(
    logits: &Tensor,
    params: &SamplingParams,
    rng: &mut TokenRng,
) -> Result<i64, EngineError> {
    let probs = process_probs(&logits.unsqueeze(1), params);
    let t = sample_from_probs(&probs, &[rng.next_uniform()]);
    Ok(i64::try_from(t.get(0))?)
}

/// Generates a full token grid autoregressively. `progress(done, total)` is called after every
/// token. The same model, condition, parameters and seed always give the same tokens.
pub fn generate_ar(
    model: &Gpt,
    cond: &Condition,
    params: &SamplingParams,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Generation, EngineError> {
    params.validate()?;
    tch::no_grad(|| {
        let cfg = model.config();
        let n = cfg.grid.len();
        let cls = cfg.cls_token_num;
        let start = Instant::now();
        let cond = model.condition(cond, params.uses_cfg())?;
        let batch = cond.batch();
        // The last token is never fed back: cls + n - 1 positions suffice.
        let mut cache = model.new_cache(batch, cls + n as i64 - 1)?;
        let mut rng = TokenRng::new(seed);
        let mut tokens = Vec::with_capacity(n);
        let logits = model.prefill(&cond, &mut cache)?;
        let mut tok = sample_next(&logits, params, &mut rng)?;
        tokens.push(tok);
        progress(1, n);
        let prefill_seconds = start.elapsed().as_secs_f64();
        let decode_start = Instant::now();
        for i in 1..n {
            let x = model.embed_tokens(&[tok], batch)?;
            let h = model.forward(&x, &[cls + i as i64 - 1], None, &mut cache)?;
            let logits = model.head(&h.select(1, 0));
            tok = sample_next(&logits, params, &mut rng)?;
            tokens.push(tok);
            progress(i + 1, n);
        }
        Ok(Generation {
            tokens,
            stats: GenerationStats {
                method: "ar".into(),
                tokens: n,
                target_passes: n,
                prefill_seconds,
                decode_seconds: decode_start.elapsed().as_secs_f64(),
                kv_bytes: cache.bytes(),
            },
        })
    })
}
