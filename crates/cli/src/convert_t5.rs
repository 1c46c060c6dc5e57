//! `mulo convert t5`: a Hugging Face T5 / flan-t5 checkpoint directory to a mulo text encoder
//! directory (`config.json`, `model.safetensors` with the encoder's tensors under their Hugging
//! Face names, `tokenizer.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use mulo_engine::TorchWorker;
use mulo_model::t5::T5Activation;
use mulo_model::text::TEXT_TOKENIZER_FILE;
use mulo_model::{DType, ModelConfig, T5Config, TextEncoder};
use serde::Deserialize;
use tch::Tensor;

/// Arguments of `mulo convert t5`.
#[derive(Debug, Args)]
pub struct T5Args {
    /// Hugging Face checkpoint directory: config.json, tokenizer.json, and model.safetensors or
    /// shards (model-0000x-of-0000y.safetensors) with model.safetensors.index.json. A full
    /// T5ForConditionalGeneration checkpoint (flan-t5-xl) is fine: the decoder is dropped.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Output text encoder directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Caption rows per prompt: longer prompts are truncated, shorter ones padded (LlamaGen's
    /// t2i models: 120, their `cls_token_num`).
    #[arg(long, default_value_t = 120)]
    pub max_len: i64,
    /// Storage dtype of the converted weights (bf16 halves the size; fp16 overflows in T5).
    #[arg(long, default_value = "fp32")]
    pub dtype: DType,
}

/// The fields of a Hugging Face T5 `config.json` that the encoder needs.
#[derive(Debug, Deserialize)]
struct HfT5Config {
    model_type: String,
    vocab_size: i64,
    d_model: i64,
    d_kv: i64,
    d_ff: i64,
    num_layers: i64,
    num_heads: i64,
    #[serde(default = "default_buckets")]
    relative_attention_num_buckets: i64,
    #[serde(default = "default_distance")]
    relative_attention_max_distance: i64,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_ffn")]
    feed_forward_proj: String,
    #[serde(default)]
    _name_or_path: String,
}

fn default_buckets() -> i64 {
    32
}
fn default_distance() -> i64 {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ffn() -> String {
    "relu".into()
}

/// Hugging Face's `feed_forward_proj` ("gated-gelu", "relu", ...) as (activation, gated).
fn feed_forward(proj: &str) -> Result<(T5Activation, bool)> {
    let (gated, act) = match proj.strip_prefix("gated-") {
        Some(a) => (true, a),
        None => (false, proj),
    };
    let act = match (act, gated) {
        // Hugging Face maps "gated-gelu" to the tanh approximation (T5 v1.1).
        ("gelu", true) | ("gelu_new", _) => T5Activation::GeluTanh,
        ("gelu", false) => T5Activation::Gelu,
        ("relu", _) => T5Activation::Relu,
        ("silu" | "swish", _) => T5Activation::Silu,
        _ => bail!("feed_forward_proj '{proj}' is not supported (gated-gelu, gelu, relu, silu)"),
    };
    Ok((act, gated))
}

fn read_config(dir: &Path, a: &T5Args) -> Result<T5Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let hf: HfT5Config = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not a T5 config: {e}", path.display()))?;
    if !matches!(hf.model_type.as_str(), "t5" | "mt5") {
        bail!(
            "{}: model_type is '{}', expected 't5'",
            path.display(),
            hf.model_type
        );
    }
    let (activation, gated) = feed_forward(&hf.feed_forward_proj)?;
    let name = Path::new(&hf._name_or_path)
        .file_name()
        .or_else(|| dir.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cfg = T5Config {
        name,
        vocab_size: hf.vocab_size,
        d_model: hf.d_model,
        d_kv: hf.d_kv,
        d_ff: hf.d_ff,
        num_layers: hf.num_layers,
        num_heads: hf.num_heads,
        relative_attention_num_buckets: hf.relative_attention_num_buckets,
        relative_attention_max_distance: hf.relative_attention_max_distance,
        layer_norm_epsilon: hf.layer_norm_epsilon,
        activation,
        gated,
        max_len: a.max_len,
        dtype: a.dtype,
    };
    cfg.validate()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The safetensors files of a checkpoint directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text =
            std::fs::read_to_string(&index).with_context(|| format!("{}", index.display()))?;
        let idx: Index =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", index.display()))?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let bin = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".bin"));
    if bin {
        bail!(
            "{}: only pytorch_model*.bin weights; mulo reads safetensors. Re-save them with \
             transformers: T5EncoderModel.from_pretrained(DIR).save_pretrained(OUT)",
            dir.display()
        );
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// The encoder's tensors of every weight file, renamed to the encoder's names, in `kind`.
fn encoder_tensors(files: &[PathBuf], kind: tch::Kind) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for f in files {
        let tensors = Tensor::read_safetensors(f).map_err(|e| anyhow!("{}: {e}", f.display()))?;
        for (name, t) in tensors {
            let name = match name.as_str() {
                "encoder.embed_tokens.weight" => "shared.weight".to_string(),
                n if n == "shared.weight" || n.starts_with("encoder.") => name,
                _ => continue,
            };
            if !out.iter().any(|(n, _): &(String, Tensor)| *n == name) {
                out.push((name, t.to_kind(kind)));
            }
        }
    }
    Ok(out)
}

/// Runs `mulo convert t5`.
pub fn run(a: T5Args) -> Result<()> {
    if a.out.join("config.json").exists() || a.out.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model; choose an empty --out",
            a.out.display()
        );
    }
    let tokenizer = a.checkpoint.join(TEXT_TOKENIZER_FILE);
    if !tokenizer.is_file() {
        bail!(
            "{}: no tokenizer.json (the Hugging Face fast-tokenizer file); write one with \
             transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)",
            a.checkpoint.display()
        );
    }
    let cfg = read_config(&a.checkpoint, &a)?;
    let files = weight_files(&a.checkpoint)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let result = convert(&a, cfg, &files, &tokenizer)
        .map_err(|e| anyhow!("{}: {e}", a.checkpoint.display()));
    if result.is_err() {
        for f in ["config.json", "model.safetensors", TEXT_TOKENIZER_FILE] {
            let _ = std::fs::remove_file(a.out.join(f));
        }
        let _ = std::fs::remove_dir(&a.out);
    }
    println!("{}", result?);
    Ok(())
}

fn convert(a: &T5Args, cfg: T5Config, files: &[PathBuf], tokenizer: &Path) -> Result<String> {
    let out = a.out.clone();
    let kind = a.dtype.kind();
    let files = files.to_vec();
    ModelConfig::T5Encoder(cfg.clone()).save(&out)?;
    std::fs::copy(tokenizer, out.join(TEXT_TOKENIZER_FILE))
        .with_context(|| format!("copying {}", tokenizer.display()))?;
    let worker = TorchWorker::spawn("torch", || Ok::<_, anyhow::Error>(()))?;
    let (params, unused, vocab) = worker.run(move |_| -> Result<(i64, Vec<String>, usize)> {
        let tensors = encoder_tensors(&files, kind)?;
        let params: i64 = tensors.iter().map(|(_, t)| t.numel() as i64).sum();
        let path = mulo_model::config::weights_path(&out);
        Tensor::write_safetensors(&tensors, &path)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        drop(tensors);
        let (enc, unused) = TextEncoder::load(&out, tch::Device::Cpu, None)
            .map_err(|e| anyhow!("the weights do not fit config.json: {e}"))?;
        Ok((params, unused, enc.tokenizer().vocab_size()))
    })??;
    if !unused.is_empty() {
        bail!("tensors the encoder does not use: {}", unused.join(", "));
    }
    if vocab as i64 > cfg.vocab_size {
        bail!(
            "tokenizer.json has {vocab} tokens but the embedding only {} rows",
            cfg.vocab_size
        );
    }
    Ok(format!(
        "converted a T5 encoder ({} layers, width {}, {} heads, {:?}{}, {:.2}M parameters, \
         tokenizer of {vocab} tokens, {} caption rows) to {} ({})",
        cfg.num_layers,
        cfg.d_model,
        cfg.num_heads,
        cfg.activation,
        if cfg.gated { ", gated" } else { "" },
        params as f64 / 1e6,
        cfg.max_len,
        a.out.display(),
        a.dtype
    ))
}
