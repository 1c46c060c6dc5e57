//! Prompts to caption features the way LlamaGen's text-to-image sampling makes them: the prompt is
//! lower-cased with its whitespace collapsed, tokenized by a Hugging Face tokenizer
//! (`tokenizer.json`, with the end-of-sequence token it appends) to at most `max_len` tokens, run
//! through the T5 encoder with the padding masked, and the valid rows moved to the end (LlamaGen's
//! left padding), the padding rows zeroed.
//!
//! LlamaGen also cleans captions (URLs, HTML, runs of punctuation; PixArt's `clean_caption`); that
//! step is not reproduced, so a prompt with such content gives other features than LlamaGen's.

use std::path::{Path, PathBuf};

use mulo_core::Condition;
use tch::{Device, Tensor};

use crate::config::DType;
use crate::error::{ModelError, Result};
use crate::t5::T5Encoder;

/// File name of the Hugging Face tokenizer beside a text encoder's `config.json`.
pub const TEXT_TOKENIZER_FILE: &str = "tokenizer.json";

/// A Hugging Face tokenizer with LlamaGen's length and padding convention.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
    pad_id: u32,
}

/// One tokenized prompt: `max_len` ids (right-padded) and how many are tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// Ids, padding after the tokens.
    pub ids: Vec<i64>,
    /// Tokens before the padding (the end-of-sequence token included).
    pub valid: usize,
}

/// The normalisation applied before tokenizing: lower case, whitespace collapsed and trimmed.
pub fn normalize_prompt(prompt: &str) -> String {
    prompt
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl TextTokenizer {
    /// Reads a Hugging Face `tokenizer.json`; prompts become at most `max_len` ids.
    pub fn load(path: &Path, max_len: usize) -> Result<Self> {
        let err = |message: String| ModelError::Json {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(err(
                "no such file (a text encoder needs the Hugging Face tokenizer.json)".into(),
            ));
        }
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| err(format!("not a Hugging Face tokenizer.json: {e}")))?;
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| err(format!("truncation to {max_len} tokens: {e}")))?;
        inner.with_padding(None);
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        Ok(Self {
            inner,
            max_len,
            pad_id,
        })
    }

    /// Tokens of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokens per prompt after padding.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes one prompt (normalised first).
    pub fn encode(&self, prompt: &str) -> Result<PromptTokens> {
        let text = normalize_prompt(prompt);
        let enc = self
            .inner
            .encode(text.as_str(), true)
            .map_err(|e| ModelError::InvalidInput(format!("tokenizing '{text}': {e}")))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let valid = ids.len().min(self.max_len);
        ids.truncate(valid);
        ids.resize(self.max_len, i64::from(self.pad_id));
        Ok(PromptTokens { ids, valid })
    }
}

/// A tokenizer and a T5 encoder: prompts to LlamaGen caption features.
#[derive(Debug)]
pub struct TextEncoder {
    tokenizer: TextTokenizer,
    model: T5Encoder,
    dir: PathBuf,
}

/// The dtype a T5 encoder runs in when `wanted`: fp32 on the CPU (half precision is slow there)
/// and instead of fp16 (T5's activations overflow it); bf16 and fp32 on CUDA as asked.
pub fn encoder_dtype(wanted: DType, device: Device) -> DType {
    match (wanted, device) {
        (_, Device::Cpu) | (DType::Fp16, _) => DType::Fp32,
        (d, _) => d,
    }
}

impl TextEncoder {
    /// Loads a text encoder directory (`config.json`, `model.safetensors`, `tokenizer.json`);
    /// returns it and the names of weight-file tensors it did not use. It runs in `dtype` (else
    /// its config's) except in fp32 on the CPU and instead of fp16 ([`encoder_dtype`]).
    pub fn load(dir: &Path, device: Device, dtype: Option<DType>) -> Result<(Self, Vec<String>)> {
        let stored = crate::ModelConfig::load_t5(dir)?.dtype;
        let dtype = encoder_dtype(dtype.unwrap_or(stored), device);
        let (model, unused) = T5Encoder::load(dir, device, Some(dtype))?;
        let max_len = usize::try_from(model.config().max_len)
            .map_err(|_| ModelError::Config("max_len must be positive".into()))?;
        let tokenizer = TextTokenizer::load(&dir.join(TEXT_TOKENIZER_FILE), max_len)?;
        Ok((
            Self {
                tokenizer,
                model,
                dir: dir.to_path_buf(),
            },
            unused,
        ))
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The encoder.
    pub fn model(&self) -> &T5Encoder {
        &self.model
    }

    /// Width of one feature row.
    pub fn feature_dim(&self) -> usize {
        self.model.config().d_model as usize
    }

    /// Caption features of each prompt in LlamaGen's layout: `max_len` rows, the valid ones last,
    /// the padding rows zero and masked.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<Condition>> {
        let len = self.tokenizer.max_len();
        let toks = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<i64> = toks.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let mask: Vec<i64> = toks
            .iter()
            .flat_map(|t| (0..len).map(move |i| i64::from(i < t.valid)))
            .collect();
        let b = toks.len() as i64;
        let ids = Tensor::from_slice(&ids).view([b, len as i64]);
        let mask = Tensor::from_slice(&mask).view([b, len as i64]);
        let out = self.model.forward(&ids, &mask)?.to_device(Device::Cpu);
        let dim = self.feature_dim();
        let values = Vec::<f32>::try_from(out.flatten(0, -1))
            .map_err(|e| ModelError::InvalidInput(format!("reading features: {e}")))?;
        Ok(toks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                left_padded(
                    &values[i * len * dim..(i + 1) * len * dim],
                    t.valid,
                    len,
                    dim,
                )
            })
            .collect())
    }
}

/// LlamaGen's left padding of right-padded encoder rows: the `valid` rows move to the end, the
/// rest are zero and masked.
fn left_padded(rows: &[f32], valid: usize, len: usize, dim: usize) -> Condition {
    let pad = len - valid;
    let mut features = vec![0.0f32; len * dim];
    features[pad * dim..].copy_from_slice(&rows[..valid * dim]);
    Condition::CaptionFeatures {
        features,
        len,
        dim,
        mask: Some((0..len).map(|i| i >= pad).collect()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_encoder_avoids_fp16_and_half_precision_on_the_cpu() {
        let cuda = Device::Cuda(0);
        assert_eq!(encoder_dtype(DType::Fp16, cuda), DType::Fp32);
        assert_eq!(encoder_dtype(DType::Bf16, cuda), DType::Bf16);
        assert_eq!(encoder_dtype(DType::Fp32, cuda), DType::Fp32);
        for d in [DType::Fp16, DType::Bf16, DType::Fp32] {
            assert_eq!(encoder_dtype(d, Device::Cpu), DType::Fp32);
        }
    }

    #[test]
    fn prompts_are_lower_cased_and_collapsed() {
        assert_eq!(normalize_prompt("  A Red\tApple \n"), "a red apple");
    }

    #[test]
    fn left_padding_moves_valid_rows_last_and_zeroes_the_rest() {
        let rows: Vec<f32> = (0..8).map(|v| v as f32 + 1.0).collect(); // 4 rows of 2
        let Condition::CaptionFeatures { features, mask, .. } = left_padded(&rows, 3, 4, 2) else {
            panic!("not features")
        };
        assert_eq!(features, vec![0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(mask, Some(vec![false, true, true, true]));
    }

    #[test]
    fn a_missing_tokenizer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = TextTokenizer::load(&dir.path().join("tokenizer.json"), 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
