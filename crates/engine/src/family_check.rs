//! Checks that the members of a family fit together, from their `config.json` files alone: one VQ
//! codebook for every token model and the up-sampler, grids related by the up-sampler's scale, the
//! same condition (classes, or caption rows of one width) for the target, the drafter and the small
//! draft model, and a text encoder whose features have that shape. Each mismatch is one line that
//! names the members and the numbers that disagree.

use std::path::Path;

use mulo_model::config::ConditionConfig;
use mulo_model::evaluator::EvaluatorConfig;
use mulo_model::text::TEXT_TOKENIZER_FILE;
use mulo_model::{GptConfig, ModelConfig, T5Config, UpsamplerConfig, VqConfig};

use crate::error::EngineError;
use crate::family::{Family, Member};

/// The configurations of a family's members, once they are known to fit.
#[derive(Debug, Clone)]
pub struct FamilyConfigs {
    /// The target GPT.
    pub target: GptConfig,
    /// The drafter GPT.
    pub drafter: GptConfig,
    /// The VQ model.
    pub vq: VqConfig,
    /// The up-sampler.
    pub upsampler: UpsamplerConfig,
    /// The small high-resolution draft model, if the family has one.
    pub draft_small: Option<GptConfig>,
    /// The text encoder, if the family has one.
    pub text_encoder: Option<T5Config>,
    /// The evaluator, if the family has one.
    pub evaluator: Option<EvaluatorConfig>,
}

fn bad(message: String) -> EngineError {
    EngineError::Family(message)
}

fn config<T>(
    fam: &Family,
    m: Member,
    load: fn(&Path) -> mulo_model::Result<T>,
) -> Result<T, EngineError> {
    let dir = fam.path(m)?;
    load(&dir).map_err(|e| bad(format!("the {}: {e}", m.name())))
}

fn optional<T>(
    fam: &Family,
    m: Member,
    load: fn(&Path) -> mulo_model::Result<T>,
) -> Result<Option<T>, EngineError> {
    if fam.has(m) {
        config(fam, m, load).map(Some)
    } else {
        Ok(None)
    }
}

/// Describes a GPT's condition for messages.
fn condition(c: &GptConfig) -> String {
    match c.condition {
        ConditionConfig::Class { num_classes } => format!("{num_classes} classes"),
        ConditionConfig::Caption { caption_dim } => {
            format!("caption rows [{}, {caption_dim}]", c.cls_token_num)
        }
    }
}

fn same_condition(a: &GptConfig, b: &GptConfig) -> bool {
    a.condition == b.condition
        && (matches!(a.condition, ConditionConfig::Class { .. })
            || a.cls_token_num == b.cls_token_num)
}

impl Family {
    /// Reads every member's config and checks that they fit (see the module docs).
    pub fn check(&self) -> Result<FamilyConfigs, EngineError> {
        let c = FamilyConfigs {
            target: config(self, Member::Target, ModelConfig::load_gpt)?,
            drafter: config(self, Member::Drafter, ModelConfig::load_gpt)?,
            vq: config(self, Member::Vq, ModelConfig::load_vq)?,
            upsampler: config(self, Member::Upsampler, ModelConfig::load_upsampler)?,
            draft_small: optional(self, Member::DraftSmall, ModelConfig::load_gpt)?,
            text_encoder: optional(self, Member::TextEncoder, ModelConfig::load_t5)?,
            evaluator: optional(self, Member::Evaluator, ModelConfig::load_evaluator)?,
        };
        self.check_codebook(&c)?;
        self.check_grids(&c)?;
        self.check_conditions(&c)?;
        Ok(c)
    }

    fn check_codebook(&self, c: &FamilyConfigs) -> Result<(), EngineError> {
        let codes = c.vq.codebook_size;
        let mut gpts = vec![("target", &c.target), ("drafter", &c.drafter)];
        if let Some(d) = &c.draft_small {
            gpts.push(("draft_small", d));
        }
        for (name, g) in gpts {
            if g.vocab_size != codes {
                return Err(bad(format!(
                    "codebook mismatch: the {name} has {} token ids but the VQ has {codes} codes",
                    g.vocab_size
                )));
            }
        }
        let u = &c.upsampler;
        if u.codebook_size != codes || u.codebook_embed_dim != c.vq.codebook_embed_dim {
            return Err(bad(format!(
                "codebook mismatch: the upsampler was made for a {} x {} codebook, the VQ has {codes} x {}",
                u.codebook_size, u.codebook_embed_dim, c.vq.codebook_embed_dim
            )));
        }
        Ok(())
    }

    fn check_grids(&self, c: &FamilyConfigs) -> Result<(), EngineError> {
        let r = self.file.scale;
        if c.upsampler.scale != r {
            return Err(bad(format!(
                "scale mismatch: family.json says {r}, the upsampler up-samples by {}",
                c.upsampler.scale
            )));
        }
        let (t, d) = (c.target.grid, c.drafter.grid);
        let r = r as usize;
        if t.rows != d.rows * r || t.cols != d.cols * r {
            return Err(bad(format!(
                "grids not related by the scale: the target's grid is {t}, the drafter's {d} x {r} = {}x{}",
                d.rows * r,
                d.cols * r
            )));
        }
        if let Some(s) = &c.draft_small {
            if s.grid != t {
                return Err(bad(format!(
                    "grid mismatch: the draft_small's grid is {}, the target's {t}",
                    s.grid
                )));
            }
        }
        Ok(())
    }

    fn check_conditions(&self, c: &FamilyConfigs) -> Result<(), EngineError> {
        let mut others = vec![("drafter", &c.drafter)];
        if let Some(d) = &c.draft_small {
            others.push(("draft_small", d));
        }
        for (name, g) in others {
            if !same_condition(&c.target, g) {
                return Err(bad(format!(
                    "condition mismatch: the target reads {}, the {name} {}",
                    condition(&c.target),
                    condition(g)
                )));
            }
        }
        let Some(e) = &c.text_encoder else {
            return Ok(());
        };
        let ConditionConfig::Caption { caption_dim } = c.target.condition else {
            return Err(bad(format!(
                "the target is class-conditioned ({}); a text encoder needs caption models",
                condition(&c.target)
            )));
        };
        if e.d_model != caption_dim || e.max_len != c.target.cls_token_num {
            return Err(bad(format!(
                "caption shape mismatch: the text encoder gives [{}, {}] features, the target reads {}",
                e.max_len,
                e.d_model,
                condition(&c.target)
            )));
        }
        let dir = self.path(Member::TextEncoder)?;
        if !dir.join(TEXT_TOKENIZER_FILE).is_file() {
            return Err(bad(format!(
                "the text encoder ({}) has no {TEXT_TOKENIZER_FILE}",
                dir.display()
            )));
        }
        Ok(())
    }
}
