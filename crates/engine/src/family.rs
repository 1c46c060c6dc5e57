//! A model family (DESIGN §3.3): `family.json` naming the target, the drafter, the up-sampler,
//! the down-sampler choice, the VQ model, the small high-res draft model and the evaluator, as
//! directories relative to the family directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// File name of a family description.
pub const FAMILY_FILE: &str = "family.json";

/// The down-sampler `D_r` a family uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Downsampler {
    /// VQ decode → area down-sample by `r` → VQ encode.
    VqArea,
}

/// The contents of `family.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyFile {
    /// Family name.
    pub name: String,
    /// Scale `r` between the target and the drafter grids.
    pub scale: i64,
    /// High-resolution target GPT.
    pub target: String,
    /// Low-resolution drafter GPT.
    pub drafter: String,
    /// Learned up-sampler `U_r`.
    pub upsampler: String,
    /// Down-sampler `D_r`.
    pub downsampler: Downsampler,
    /// VQ tokenizer shared by both resolutions.
    pub vq: String,
    /// Small high-resolution draft model (SD and LANTERN baselines); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_small: Option<String>,
    /// Evaluator CNN (FID-emoji and adherence); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluator: Option<String>,
    /// T5 text encoder turning prompts into the caption features of t2i GPTs; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<String>,
}

/// A loaded family description with its directory.
#[derive(Debug, Clone)]
pub struct Family {
    /// The family directory.
    pub dir: PathBuf,
    /// What `family.json` says.
    pub file: FamilyFile,
}

/// A member of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// The target GPT.
    Target,
    /// The drafter GPT.
    Drafter,
    /// The up-sampler.
    Upsampler,
    /// The VQ model.
    Vq,
    /// The small high-resolution draft model.
    DraftSmall,
    /// The evaluator.
    Evaluator,
    /// The T5 text encoder.
    TextEncoder,
}

impl Member {
    /// The member's name in messages and in `family.json`.
    pub fn name(self) -> &'static str {
        match self {
            Member::Target => "target",
            Member::Drafter => "drafter",
            Member::Upsampler => "upsampler",
            Member::Vq => "vq",
            Member::DraftSmall => "draft_small",
            Member::Evaluator => "evaluator",
            Member::TextEncoder => "text_encoder",
        }
    }
}

impl Family {
    /// Reads `<dir>/family.json`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join(FAMILY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            EngineError::Family(format!(
                "{}: {e} (a family directory holds family.json)",
                path.display()
            ))
        })?;
        let file: FamilyFile = serde_json::from_str(&text)
            .map_err(|e| EngineError::Family(format!("{}: {e}", path.display())))?;
        if !matches!(file.scale, 2 | 4) {
            return Err(EngineError::Family(format!(
                "{}: scale must be 2 or 4, got {}",
                path.display(),
                file.scale
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
        })
    }

    /// What `family.json` says about a member: `None` for an optional member it does not name.
    fn relative(&self, member: Member) -> Option<&String> {
        match member {
            Member::Target => Some(&self.file.target),
            Member::Drafter => Some(&self.file.drafter),
            Member::Upsampler => Some(&self.file.upsampler),
            Member::Vq => Some(&self.file.vq),
            Member::DraftSmall => self.file.draft_small.as_ref(),
            Member::Evaluator => self.file.evaluator.as_ref(),
            Member::TextEncoder => self.file.text_encoder.as_ref(),
        }
    }

    /// Whether `family.json` names the member (it may still hold no model).
    pub fn has(&self, member: Member) -> bool {
        self.relative(member).is_some()
    }

    /// The directory of a member; an error names the member when the family has none or it holds
    /// no model.
    pub fn path(&self, member: Member) -> Result<PathBuf, EngineError> {
        let Some(rel) = self.relative(member) else {
            return Err(EngineError::Family(format!(
                "family '{}' has no {} (its family.json names none)",
                self.file.name,
                member.name()
            )));
        };
        let p = self.dir.join(rel);
        if !p.join("config.json").is_file() {
            return Err(EngineError::Family(format!(
                "the {member:?} of family '{}' ({}) holds no model (config.json missing); train it with `mulo train`",
                self.file.name,
                p.display()
            )));
        }
        Ok(p)
    }
}

/// The bundled family: `$MULO_FAMILY`, else `models/emoji` under the working directory, else the
/// one in the source tree this binary was built from.
pub fn default_family_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("MULO_FAMILY") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("models/emoji");
    if local.join(FAMILY_FILE).is_file() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/emoji")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bundled_family_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/emoji");
        let f = Family::load(&dir).unwrap();
        assert_eq!(f.file.scale, 2);
        assert!(f.path(Member::Vq).is_ok());
    }

    #[test]
    fn bad_family_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = Family::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("family.json"), "{e}");
        std::fs::write(dir.path().join(FAMILY_FILE), r#"{"name": "x"}"#).unwrap();
        let e = Family::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("missing field"), "{e}");
        let text = r#"{"name": "x", "scale": 3, "target": "t", "drafter": "d", "upsampler": "u",
            "downsampler": "vq-area", "vq": "v", "draft_small": "s", "evaluator": "e"}"#;
        std::fs::write(dir.path().join(FAMILY_FILE), text).unwrap();
        let e = Family::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("scale must be 2 or 4"), "{e}");
        let ok = text.replace("\"scale\": 3", "\"scale\": 2");
        std::fs::write(dir.path().join(FAMILY_FILE), ok).unwrap();
        let f = Family::load(dir.path()).unwrap();
        let e = f.path(Member::Target).unwrap_err().to_string();
        assert!(
            e.contains("Target") && e.contains("config.json missing"),
            "{e}"
        );
    }
}
