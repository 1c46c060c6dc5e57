//! `mulo family new`: assemble a model family from model directories, and the family view of
//! `mulo info`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use mulo_engine::family::{Downsampler, Family, FamilyFile, Member, FAMILY_FILE};
use mulo_engine::family_check::FamilyConfigs;
use mulo_model::config::ConditionConfig;

use crate::common::relative_link;

/// `mulo family` commands.
#[derive(Debug, Subcommand)]
pub enum FamilyCommand {
    /// Assemble a family from model directories: check that they fit, write family.json.
    New(FamilyNewArgs),
}

/// Arguments of `mulo family new`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example (docs/family.md):\n  mulo family new --out fam --target m/stage2 --drafter m/stage1 --vq m/vq \\\n    --upsampler m/up --text-encoder m/t5"
)]
pub struct FamilyNewArgs {
    /// Family directory to write family.json into (created if missing). Members are recorded
    /// relative to it, so move the family together with its models.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Family name (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// High-resolution target GPT.
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// Low-resolution drafter GPT (grid = the target's / the up-sampler's scale).
    #[arg(long, value_name = "DIR")]
    pub drafter: PathBuf,
    /// VQ model of both resolutions.
    #[arg(long, value_name = "DIR")]
    pub vq: PathBuf,
    /// Up-sampler from the drafter's grid to the target's (its scale is the family's).
    #[arg(long, value_name = "DIR")]
    pub upsampler: PathBuf,
    /// Small high-resolution draft model for the SD and LANTERN baselines (optional).
    #[arg(long, value_name = "DIR")]
    pub draft_small: Option<PathBuf>,
    /// T5 text encoder from `mulo convert t5`, for text prompts to caption models (optional).
    #[arg(long, value_name = "DIR")]
    pub text_encoder: Option<PathBuf>,
    /// Evaluator CNN (optional; FID and adherence in `mulo eval` and `mulo bench` need it).
    #[arg(long, value_name = "DIR")]
    pub evaluator: Option<PathBuf>,
}

fn link(out: &Path, dir: &Path, what: &str) -> Result<String> {
    if !dir.join("config.json").is_file() {
        bail!(
            "the {what} ({}) holds no model (no config.json)",
            dir.display()
        );
    }
    relative_link(out, dir)
}

fn optional_link(out: &Path, dir: &Option<PathBuf>, what: &str) -> Result<Option<String>> {
    dir.as_ref().map(|d| link(out, d, what)).transpose()
}

/// Runs `mulo family`.
pub fn run(cmd: FamilyCommand) -> Result<()> {
    let FamilyCommand::New(a) = cmd;
    let path = a.out.join(FAMILY_FILE);
    if path.exists() {
        bail!("{} exists; choose another --out", path.display());
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let result = write(&a, &path);
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&a.out);
    }
    let (family, configs) = result?;
    println!("{}", describe(&family, &configs));
    println!("wrote {}", path.display());
    Ok(())
}

fn write(a: &FamilyNewArgs, path: &Path) -> Result<(Family, FamilyConfigs)> {
    let out = &a.out;
    let up = mulo_model::ModelConfig::load_upsampler(&a.upsampler)
        .map_err(|e| anyhow!("the upsampler: {e}"))?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => std::fs::canonicalize(out)?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "family".into()),
    };
    let file = FamilyFile {
        name,
        scale: up.scale,
        target: link(out, &a.target, "target")?,
        drafter: link(out, &a.drafter, "drafter")?,
        upsampler: link(out, &a.upsampler, "upsampler")?,
        downsampler: Downsampler::VqArea,
        vq: link(out, &a.vq, "vq")?,
        draft_small: optional_link(out, &a.draft_small, "draft_small")?,
        evaluator: optional_link(out, &a.evaluator, "evaluator")?,
        text_encoder: optional_link(out, &a.text_encoder, "text_encoder")?,
    };
    std::fs::write(path, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("{}", path.display()))?;
    let family = Family::load(out)?;
    let configs = family.check()?;
    Ok((family, configs))
}

/// What a family holds and how its members fit, for `family new` and `mulo info`.
pub fn describe(f: &Family, c: &FamilyConfigs) -> String {
    let dir = |m: Member| {
        f.path(m)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "—".into())
    };
    let cond = match c.target.condition {
        ConditionConfig::Class { num_classes } => format!("{num_classes} classes"),
        ConditionConfig::Caption { caption_dim } => {
            format!("caption rows [{}, {caption_dim}]", c.target.cls_token_num)
        }
    };
    let prompts = match (&c.text_encoder, c.target.caption_vocab) {
        (Some(_), _) => "text prompts through the T5 text encoder",
        (None, Some(_)) => "text prompts through the models' word tokenizer",
        (None, None) if matches!(c.target.condition, ConditionConfig::Caption { .. }) => {
            "caption features only (--caption-features; no text encoder)"
        }
        _ => "class ids",
    };
    let mut lines = vec![
        format!(
            "family '{}' (x{} up-sampling, {})",
            f.file.name,
            f.file.scale,
            f.dir.display()
        ),
        format!(
            "  target       {} grid, {} layers x {}: {}",
            c.target.grid,
            c.target.n_layer,
            c.target.dim,
            dir(Member::Target)
        ),
        format!(
            "  drafter      {} grid, {} layers x {}: {}",
            c.drafter.grid,
            c.drafter.n_layer,
            c.drafter.dim,
            dir(Member::Drafter)
        ),
        format!(
            "  vq           {} codes x {}: {}",
            c.vq.codebook_size,
            c.vq.codebook_embed_dim,
            dir(Member::Vq)
        ),
        format!(
            "  upsampler    x{}, {} channels: {}",
            c.upsampler.scale,
            c.upsampler.channels,
            dir(Member::Upsampler)
        ),
        format!(
            "  draft_small  {}",
            c.draft_small
                .as_ref()
                .map_or("none (no SD / LANTERN baselines)".into(), |d| format!(
                    "{} layers x {}: {}",
                    d.n_layer,
                    d.dim,
                    dir(Member::DraftSmall)
                ))
        ),
        format!(
            "  text_encoder {}",
            c.text_encoder.as_ref().map_or("none".into(), |e| format!(
                "T5 {} layers x {}: {}",
                e.num_layers,
                e.d_model,
                dir(Member::TextEncoder)
            ))
        ),
        format!(
            "  evaluator    {}",
            c.evaluator
                .as_ref()
                .map_or("none (quality metrics: no evaluator)".into(), |_| dir(
                    Member::Evaluator
                ))
        ),
        format!("  condition    {cond}; {prompts}"),
    ];
    lines.push("  the members fit: one codebook, grids related by the scale, one condition".into());
    lines.join("\n")
}
