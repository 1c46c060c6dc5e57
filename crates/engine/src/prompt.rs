//! Text prompts for models that carry their own caption tokenizer (`tokenizer.json` beside the
//! model's `config.json`).

use std::path::Path;

use mulo_core::caption::CaptionTokenizer;
use mulo_core::Condition;

use crate::error::EngineError;

/// File name of a caption model's tokenizer, next to its `config.json`.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The tokenizer of a model directory, if it has one.
pub fn load_tokenizer(model_dir: &Path) -> Result<Option<CaptionTokenizer>, EngineError> {
    let path = model_dir.join(TOKENIZER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
}

/// Replaces a [`Condition::Prompt`] by the caption tokens of `tokenizer`; returns the condition and
/// the words that were unknown (mapped to `<unk>`) or cut for length.
pub fn tokenize_prompt(
    tokenizer: &CaptionTokenizer,
    cond: Condition,
) -> (Condition, Vec<String>, usize) {
    match cond {
        Condition::Prompt(text) => {
            let e = tokenizer.encode(&text);
            (
                Condition::CaptionTokens {
                    ids: e.ids,
                    mask: e.mask,
                },
                e.unknown,
                e.truncated,
            )
        }
        other => (other, Vec::new(), 0),
    }
}

/// Cached prompts of a [`PromptEncoder`] unless the role is told otherwise.
pub const TEXT_CACHE_DEFAULT: usize = 64;

/// A family's T5 text encoder with a bounded least-recently-used cache of caption features by
/// normalised prompt, so that a prompt asked again is not encoded again.
pub struct PromptEncoder {
    encoder: mulo_model::TextEncoder,
    cache: lru::LruCache<String, Condition>,
}

impl std::fmt::Debug for PromptEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptEncoder")
            .field("cached", &self.cache.len())
            .field("capacity", &self.cache.cap())
            .finish()
    }
}

impl PromptEncoder {
    /// `encoder` with room for `capacity` prompts (at least 1).
    pub fn new(encoder: mulo_model::TextEncoder, capacity: usize) -> Self {
        let cap =
            std::num::NonZeroUsize::new(capacity.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            encoder,
            cache: lru::LruCache::new(cap),
        }
    }

    /// The caption features of `prompt` ([`Condition::CaptionFeatures`]), from the cache or the
    /// encoder.
    pub fn features(&mut self, prompt: &str) -> Result<Condition, EngineError> {
        let key = mulo_model::text::normalize_prompt(prompt);
        if let Some(c) = self.cache.get(&key) {
            metrics::counter!(mulo_core::metrics::TEXT_ENCODINGS, "cache" => "hit").increment(1);
            return Ok(c.clone());
        }
        let encoded = tch::no_grad(|| self.encoder.encode(&[key.as_str()]))?;
        let cond = encoded.into_iter().next().ok_or_else(|| {
            EngineError::Tokenizer(format!("the text encoder returned nothing for '{key}'"))
        })?;
        metrics::counter!(mulo_core::metrics::TEXT_ENCODINGS, "cache" => "miss").increment(1);
        self.cache.put(key, cond.clone());
        Ok(cond)
    }

    /// Prompts cached now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The encoder.
    pub fn encoder(&self) -> &mulo_model::TextEncoder {
        &self.encoder
    }
}

/// A text prompt as caption features when `encoder` is given; any other condition, or without an
/// encoder, unchanged. The second value is `Some` when the prompt was encoded.
pub fn encode_prompt(
    cond: &Condition,
    encoder: Option<&mut PromptEncoder>,
) -> Result<(Condition, Option<Condition>), EngineError> {
    match (cond, encoder) {
        (Condition::Prompt(p), Some(e)) => {
            let f = e.features(p)?;
            Ok((f.clone(), Some(f)))
        }
        _ => Ok((cond.clone(), None)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use mulo_model::t5::T5Activation;
    use mulo_model::{DType, T5Config, T5Encoder, TextEncoder};

    /// A tiny random T5 with a word-level tokenizer.json, loaded as a text encoder.
    fn encoder(dir: &Path) -> TextEncoder {
        let cfg = T5Config {
            name: "tiny".into(),
            vocab_size: 8,
            d_model: 16,
            d_kv: 4,
            d_ff: 24,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            activation: T5Activation::GeluTanh,
            gated: true,
            max_len: 6,
            dtype: DType::Fp32,
        };
        let m = T5Encoder::random(cfg, tch::Device::Cpu, 4).unwrap();
        m.save(dir, DType::Fp32).unwrap();
        let vocab = r#"{"<pad>":0,"</s>":1,"<unk>":2,"red":3,"apple":4,"blue":5,"dog":6,"a":7}"#;
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordLevel","vocab":{vocab},"unk_token":"<unk>"}}}}"#
        );
        std::fs::write(dir.join(mulo_model::text::TEXT_TOKENIZER_FILE), json).unwrap();
        TextEncoder::load(dir, tch::Device::Cpu, None).unwrap().0
    }

    fn features(c: &Condition) -> Vec<f32> {
        match c {
            Condition::CaptionFeatures { features, .. } => features.clone(),
            other => panic!("not features: {other:?}"),
        }
    }

    #[test]
    fn prompts_become_features_once_and_the_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let enc = encoder(dir.path());
        let direct = enc.encode(&["a red apple"]).unwrap();
        let mut p = PromptEncoder::new(enc, 2);
        let first = p.features("a red apple").unwrap();
        assert_eq!(features(&first), features(&direct[0]));
        // The same prompt, written differently, is the cached entry.
        assert_eq!(p.features("  A RED   apple").unwrap(), first);
        assert_eq!(p.cached(), 1);
        let dog = p.features("a blue dog").unwrap();
        assert_ne!(features(&dog), features(&first));
        p.features("red dog").unwrap();
        assert_eq!(p.cached(), 2, "the cache holds at most its capacity");
        // Other conditions pass through; without an encoder a prompt does too.
        let class = Condition::Class(3);
        assert_eq!(
            encode_prompt(&class, Some(&mut p)).unwrap(),
            (class.clone(), None)
        );
        let text = Condition::Prompt("a dog".into());
        assert_eq!(encode_prompt(&text, None).unwrap(), (text.clone(), None));
        let (c, encoded) = encode_prompt(&text, Some(&mut p)).unwrap();
        assert_eq!(encoded, Some(c.clone()));
        assert!(matches!(
            c,
            Condition::CaptionFeatures {
                len: 6,
                dim: 16,
                ..
            }
        ));
    }
}
