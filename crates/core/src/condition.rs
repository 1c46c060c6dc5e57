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
        match self {
            Condition::Class(_) => Ok(()),
            Condition::Prompt(p) => {
                if p.trim().is_empty() {
                    Err(ParamError::new("prompt", "must not be empty"))
                } else {
                    Ok(())
                }
            }
            Condition::CaptionTokens { ids, mask } => {
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
    }
}
