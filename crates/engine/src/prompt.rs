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
