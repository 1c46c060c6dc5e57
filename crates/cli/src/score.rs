//! `mulo score`: teacher-forced processed log-probabilities of a token grid.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use mulo_core::{SamplingParams, TokenGrid};
use mulo_engine::{score_tokens, TorchWorker};
use mulo_model::Gpt;
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

use crate::common::{
    read_tokens, tokenize_for, warn_unused, ConditionArgs, RuntimeArgs, SamplingArgs,
};

/// Arguments of `mulo score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Model directory (config.json + model.safetensors of a GPT).
    #[arg(long, env = "MULO_MODEL", value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub condition: ConditionArgs,
    /// The token grid: a JSON array of ints in raster order.
    #[arg(long, value_name = "FILE.json")]
    pub tokens: PathBuf,
    /// Where to write the scores (JSON).
    #[arg(long, value_name = "FILE.json")]
    pub out: PathBuf,
    /// Also write the raw logits (`logits`, and `logits_uncond` with CFG).
    #[arg(long)]
    pub logits: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `[N][V]` values written row by row; non-finite entries (ids removed by top-k/top-p) are `null`.
struct Matrix<'a> {
    data: &'a [f32],
    cols: usize,
}

struct Row<'a>(&'a [f32]);

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for v in self.0 {
            seq.serialize_element(&v.is_finite().then_some(*v))?;
        }
        seq.end()
    }
}

impl Serialize for Matrix<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.data.len() / self.cols.max(1)))?;
        for row in self.data.chunks(self.cols.max(1)) {
            seq.serialize_element(&Row(row))?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ScoreFile<'a> {
    model: String,
    grid: [usize; 2],
    vocab_size: usize,
    params: SamplingParams,
    tokens: &'a [i64],
    /// Processed log-probability of each given token (null where it was filtered out).
    token_logprobs: Vec<Option<f32>>,
    /// Sum of `token_logprobs` (null if any is null).
    total_logprob: Option<f64>,
    /// Processed log-probabilities `[N][V]`.
    logprobs: Matrix<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<Matrix<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logits_uncond: Option<Matrix<'a>>,
}

fn flat(t: &tch::Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.reshape([-1]))?)
}

/// Runs `mulo score`.
pub fn run(args: ScoreArgs) -> Result<()> {
    args.sampling.check()?;
    // A text prompt goes through the model's own caption tokenizer, as in `mulo generate`.
    let cond = tokenize_for(&args.model, args.condition.load()?)?;
    let tokens = read_tokens(&args.tokens)?;
    let model_dir = args.model.clone();
    let runtime = args.runtime.clone();
    let worker = TorchWorker::spawn("torch", move || -> Result<Gpt> {
        let device = runtime.setup()?;
        let (gpt, unused) = Gpt::load(&model_dir, device, runtime.dtype_for(device))?;
        warn_unused(&model_dir, &unused);
        Ok(gpt)
    })?;
    let sampling = args.sampling.clone();
    let want_logits = args.logits;
    let (params, grid, vocab, scores, tokens) =
        worker.run(move |gpt: &mut Gpt| -> Result<_> {
            let cfg = gpt.config();
            let params = sampling.resolve(cfg.default_sampling())?;
            let grid = TokenGrid::new(cfg.grid, tokens, cfg.vocab_size as usize)
                .map_err(|e| anyhow!("{e}"))?;
            let s = score_tokens(gpt, &cond, &grid, &params)?;
            let logprobs = flat(&s.logprobs)?;
            let logits = if want_logits {
                Some(flat(&s.logits)?)
            } else {
                None
            };
            let uncond = match (&s.logits_uncond, want_logits) {
                (Some(u), true) => Some(flat(u)?),
                _ => None,
            };
            Ok((
                params,
                cfg.grid,
                cfg.vocab_size as usize,
                (logprobs, logits, uncond, s.token_logprobs),
                grid.to_i64(),
            ))
        })??;
    let (logprobs, logits, uncond, token_lp) = scores;
    let token_logprobs: Vec<Option<f32>> = token_lp
        .iter()
        .map(|v| v.is_finite().then_some(*v))
        .collect();
    let total_logprob = token_logprobs
        .iter()
        .map(|v| v.map(f64::from))
        .sum::<Option<f64>>();
    let file = ScoreFile {
        model: args.model.display().to_string(),
        grid: [grid.rows, grid.cols],
        vocab_size: vocab,
        params,
        tokens: &tokens,
        token_logprobs,
        total_logprob,
        logprobs: Matrix {
            data: &logprobs,
            cols: vocab,
        },
        logits: logits.as_deref().map(|d| Matrix {
            data: d,
            cols: vocab,
        }),
        logits_uncond: uncond.as_deref().map(|d| Matrix {
            data: d,
            cols: vocab,
        }),
    };
    let f = std::fs::File::create(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let mut w = BufWriter::new(f);
    serde_json::to_writer(&mut w, &file)?;
    w.write_all(b"\n")?;
    w.flush()?;
    println!(
        "scored {} tokens: total log-probability {}; wrote {}",
        tokens.len(),
        total_logprob.map_or("-inf".to_string(), |v| format!("{v:.4}")),
        args.out.display()
    );
    Ok(())
}
