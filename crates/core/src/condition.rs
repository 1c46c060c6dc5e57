//! What an image is conditioned on.

use crate::params::ParamError;

/// The condition of one generation, before any model turns it into embeddings.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// A class id of a class-to-image (c2i) model.
    Class(u32),
    /// Precomputed caption features of a text-to-image (t2i) model (LlamaGen: flan-t5-xl features,
    /// left-padded), `len` rows of `dim` values, row-major, with an optional validity mask per row.
    CaptionFeatures {
        /// Row-major `[len, dim]` values.
        features: Vec<f32>,
        /// Number of rows (caption tokens).
        len: usize,
        /// Width of each row.
        dim: usize,
        /// `mask[i]` false hides caption row `i` from every other position (LlamaGen's `emb_masks`).
        mask: Option<Vec<bool>>,
    },
    /// Word ids of a caption for models that carry their own word embeddings (the emoji
    /// family): `ids.len()` = the model's condition length, left-padded, `mask[i]` false on padding.
    CaptionTokens {
        /// Word ids.
        ids: Vec<u32>,
        /// Validity of each id.
        mask: Vec<bool>,
    },
    /// A free-text prompt, for models that carry their own caption tokenizer.
    Prompt(String),
}

impl Condition {
    /// Checks the internal consistency of caption features (sizes, finiteness, mask length).
    pub fn validate(&self) -> Result<(), ParamError> {
        use crate::limits as l;
        match self {
            Condition::Class(_) => Ok(()),
            Condition::Prompt(p) => {
                if p.trim().is_empty() {
                    return Err(ParamError::new("prompt", "must not be empty"));
                }
                if p.len() > l::MAX_PROMPT_BYTES {
                    return Err(ParamError::new(
                        "prompt",
                        format!(
                            "must be at most {} bytes, got {}",
                            l::MAX_PROMPT_BYTES,
                            p.len()
                        ),
                    ));
                }
                Ok(())
            }
            Condition::CaptionTokens { ids, mask } => {
                l::at_most("caption_tokens", ids.len(), l::MAX_CAPTION_ROWS)?;
                if ids.is_empty() || ids.len() != mask.len() {
                    return Err(ParamError::new(
                        "caption_tokens",
                        format!("{} ids with {} mask entries", ids.len(), mask.len()),
                    ));
                }
                Ok(())
            }
            Condition::CaptionFeatures {
                features,
                len,
                dim,
                mask,
            } => {
                l::at_most("caption_features.len", *len, l::MAX_CAPTION_ROWS)?;
                l::at_most("caption_features.dim", *dim, l::MAX_CAPTION_DIM)?;
                l::at_most("caption_features", features.len(), l::MAX_CAPTION_VALUES)?;
                if *len == 0 || *dim == 0 || features.len() != len * dim {
                    return Err(ParamError::new(
                        "caption_features",
                        format!(
                            "expected {len} x {dim} = {} values, got {}",
                            len * dim,
                            features.len()
                        ),
                    ));
                }
                if let Some(i) = features.iter().position(|v| !v.is_finite()) {
                    return Err(ParamError::new(
                        "caption_features",
                        format!("value {i} is not finite"),
                    ));
                }
                if let Some(m) = mask {
                    if m.len() != *len {
                        return Err(ParamError::new(
                            "caption_mask",
                            format!("has {} entries but the features have {len} rows", m.len()),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_shapes_checked() {
        let ok = Condition::CaptionFeatures {
            features: vec![0.0; 6],
            len: 2,
            dim: 3,
            mask: Some(vec![false, true]),
        };
        ok.validate().unwrap();
        let bad = Condition::CaptionFeatures {
            features: vec![0.0; 5],
            len: 2,
            dim: 3,
            mask: None,
        };
        assert_eq!(bad.validate().unwrap_err().field, "caption_features");
        let bad_mask = Condition::CaptionFeatures {
            features: vec![0.0; 6],
            len: 2,
            dim: 3,
            mask: Some(vec![true]),
        };
        assert_eq!(bad_mask.validate().unwrap_err().field, "caption_mask");
        assert!(Condition::Prompt("  ".into()).validate().is_err());
        let long = Condition::Prompt("a".repeat(crate::limits::MAX_PROMPT_BYTES + 1));
        assert!(long.validate().unwrap_err().to_string().contains("at most"));
        let wide = Condition::CaptionFeatures {
            features: vec![0.0; 2 * 9000],
            len: 2,
            dim: 9000,
            mask: None,
        };
        assert_eq!(wide.validate().unwrap_err().field, "caption_features.dim");
    }
}
