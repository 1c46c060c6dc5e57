//! Teacher-forced scoring of a given token grid.

use mulo_core::{Condition, SamplingParams, TokenGrid};
use mulo_model::sampling::process_logits;
use mulo_model::Gpt;
use tch::{Kind, Tensor};

use crate::error::EngineError;

/// Per-position distributions of a teacher-forced pass (all on the CPU, fp32).
#[derive(Debug)]
pub struct Scores {
    /// Processed log-probabilities `[N, V]` (−inf where top-k / top-p removed an id).
    pub logprobs: Tensor,
    /// Raw logits of the conditional branch `[N, V]`.
    pub logits: Tensor,
    /// Raw logits of the unconditional branch `[N, V]` when CFG is on.
    pub logits_uncond: Option<Tensor>,
    /// Processed log-probability of each given token `[N]`.
    pub token_logprobs: Vec<f32>,
}

/// Scores `tokens` under the model: position `i` gets the processed distribution of token `i`
/// given the condition and tokens `0..i` (one prefill and one forward over the whole grid).
pub fn score_tokens(
    model: &Gpt,
    cond: &Condition,
    tokens: &TokenGrid,
    params: &SamplingParams,
) -> Result<Scores, EngineError> {
    params.validate()?;
    tch::no_grad(|| {
        let cfg = model.config();
        let cls = cfg.cls_token_num;
        let ids = tokens.to_i64();
        let n = ids.len() as i64;
        let cond = model.condition(cond, params.uses_cfg())?;
        let batch = cond.batch();
        let mut cache = model.new_cache(batch, cls + n)?;
        let first = model.prefill(&cond, &mut cache)?.unsqueeze(1);
        let logits = if n > 1 {
            let x = model.embed_tokens(&ids[..ids.len() - 1], batch)?;
            let positions: Vec<i64> = (cls..cls + n - 1).collect();
            let h = model.forward(&x, &positions, None, &mut cache)?;
            Tensor::cat(&[first, model.head(&h)], 1)
        } else {
            first
        };
        let logprobs = process_logits(&logits, params)
            .log_softmax(-1, Kind::Float)
            .to_device(tch::Device::Cpu);
        let idx = Tensor::from_slice(&ids).view([-1, 1]);
        let token_logprobs = Vec::<f32>::try_from(logprobs.gather(1, &idx, false).view([-1]))?;
        let logits = logits.to_device(tch::Device::Cpu);
        Ok(Scores {
            logprobs,
            logits_uncond: (batch > 1).then(|| logits.get(1)),
            logits: logits.get(0),
            token_logprobs,
        })
    })
}

/// How likely the target finds a token grid: its mean negative log-likelihood per token under the
/// processed distribution, and the pooled one (the mass on each token's pool of nearest codes).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TargetNll {
    /// Mean of `−log p_i(x_i)` over the grid (nats).
    pub nll: f64,
    /// Mean of `−log Σ_{v ∈ B_k(x_i)} p_i(v)` over the grid (nats): a near miss inside the pool
    /// MuLo accepts with costs little here, a miss costs as much as in `nll`.
    pub pooled_nll: f64,
}

/// [`TargetNll`] of `tokens` under `model` (teacher-forced, with the CFG scale and temperature
/// of `params` but without top-k / top-p truncation: a lossy method can commit a token outside
/// the truncated set, whose NLL would be infinite); `pools` is the `[V, k]` nearest-code table
/// (any device).
pub fn target_nll(
    model: &Gpt,
    cond: &Condition,
    tokens: &TokenGrid,
    params: &SamplingParams,
    pools: &Tensor,
) -> Result<TargetNll, EngineError> {
    let untruncated = SamplingParams {
        top_k: 0,
        top_p: 1.0,
        ..*params
    };
    let s = score_tokens(model, cond, tokens, &untruncated)?;
    let n = s.token_logprobs.len().max(1) as f64;
    let nll = -s.token_logprobs.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let ids = Tensor::from_slice(&tokens.to_i64());
    let pool = pools.to_device(tch::Device::Cpu).index_select(0, &ids);
    let mass = s.logprobs.exp().gather(1, &pool, false).sum_dim_intlist(
        [1i64].as_slice(),
        false,
        Kind::Double,
    );
    // A sum of probabilities can round above 1 (a pool of the whole codebook).
    let pooled_nll = f64::try_from(mass.clamp_max(1.0).log().mean(Kind::Double).neg())?;
    Ok(TargetNll { nll, pooled_nll })
}

/// The `[V, k]` table of each code's `k` nearest codes (itself first) by L2 distance of the
/// L2-normalised code vectors `codes` `[V, D]`, as the verifier's pools (`k` is clamped to `V`).
pub fn pool_table(codes: &Tensor, k: usize) -> Result<Tensor, EngineError> {
    let s = codes.size();
    let (v, d) = match s.as_slice() {
        [v, d] => (*v, *d),
        _ => {
            return Err(EngineError::Model(mulo_model::ModelError::InvalidInput(
                format!("codes must be [V, D], got {s:?}"),
            )))
        }
    };
    let k = k.clamp(1, v.max(1) as usize);
    let normed =
        mulo_model::vq::l2_normalize(&codes.to_kind(Kind::Float).to_device(tch::Device::Cpu));
    let flat = Vec::<f32>::try_from(normed.reshape([-1]))?;
    let table = mulo_core::spec::nearest_codes(&flat, d as usize, k);
    let t: Vec<i64> = table.iter().map(|&x| i64::from(x)).collect();
    Ok(Tensor::from_slice(&t).view([v, k as i64]))
}
