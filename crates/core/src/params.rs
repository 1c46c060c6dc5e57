//! Sampling parameters and their validation.

use serde::{Deserialize, Serialize};

/// A parameter that failed validation: names the field and says why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct ParamError {
    /// The offending field, as users spell it (`top_p`, `temperature`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl ParamError {
    /// A new error for `field`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// How the target's next-token distribution is processed before sampling, exactly as LlamaGen:
/// CFG combine `u + s·(c − u)` (only when `cfg_scale > 1`), division by `max(temperature, 1e-5)`,
/// top-k (ties with the k-th logit kept), then top-p (nucleus, the first token past the threshold
/// kept), then softmax.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Classifier-free guidance scale; values `<= 1` disable guidance (no unconditional batch).
    pub cfg_scale: f64,
    /// Softmax temperature; 0 acts as greedy (LlamaGen clamps it to 1e-5).
    pub temperature: f64,
    /// Keep only the `top_k` largest logits; 0 disables the filter.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; 1 disables the filter.
    pub top_p: f64,
}

impl Default for SamplingParams {
    /// LlamaGen's class-to-image defaults.
    fn default() -> Self {
        Self {
            cfg_scale: 4.0,
            temperature: 1.0,
            top_k: 2000,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    /// True when the `[cond; uncond]` CFG batch is used.
    pub fn uses_cfg(&self) -> bool {
        self.cfg_scale > 1.0
    }

    /// The divisor applied to logits (LlamaGen: `max(temperature, 1e-5)`).
    pub fn effective_temperature(&self) -> f64 {
        self.temperature.max(1e-5)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ParamError> {
        use crate::limits::{at_most, MAX_CFG_SCALE, MAX_TEMPERATURE, MAX_TOP_K};
        if !(0.0..=MAX_CFG_SCALE).contains(&self.cfg_scale) {
            return Err(ParamError::new(
                "cfg_scale",
                format!(
                    "must be in [0, {MAX_CFG_SCALE}] (<= 1 disables guidance), got {}",
                    self.cfg_scale
                ),
            ));
        }
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(ParamError::new(
                "temperature",
                format!(
                    "must be in [0, {MAX_TEMPERATURE}], got {}",
                    self.temperature
                ),
            ));
        }
        at_most("top_k", self.top_k, MAX_TOP_K)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ParamError::new(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_use_cfg() {
        let p = SamplingParams::default();
        p.validate().unwrap();
        assert!(p.uses_cfg());
    }

    #[test]
    fn bad_values_name_their_field() {
        let base = SamplingParams::default();
        let cases = [
            (
                SamplingParams {
                    cfg_scale: -1.0,
                    ..base
                },
                "cfg_scale",
            ),
            (
                SamplingParams {
                    cfg_scale: f64::NAN,
                    ..base
                },
                "cfg_scale",
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: 101.0,
                    ..base
                },
                "temperature",
            ),
            (
                SamplingParams {
                    cfg_scale: f64::INFINITY,
                    ..base
                },
                "cfg_scale",
            ),
            (
                SamplingParams {
                    top_k: (1 << 20) + 1,
                    ..base
                },
                "top_k",
            ),
            (SamplingParams { top_p: 0.0, ..base }, "top_p"),
            (SamplingParams { top_p: 1.5, ..base }, "top_p"),
        ];
        for (p, field) in cases {
            let e = p.validate().unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.to_string().contains(field));
        }
    }

    #[test]
    fn cfg_only_above_one_and_temperature_clamped() {
        let p = SamplingParams {
            cfg_scale: 1.0,
            temperature: 0.0,
            ..Default::default()
        };
        assert!(!p.uses_cfg());
        assert_eq!(p.effective_temperature(), 1e-5);
    }
}
