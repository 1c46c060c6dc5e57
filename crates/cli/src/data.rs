//! `mulo data emoji`: build the emoji data set from the npm packages.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mulo_train::data::emoji;

use crate::common::cache_root;

/// Data sets `mulo data` builds.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Noto (google) and Twemoji (twitter) emoji at 64, 32 and 16 px with captions and labels.
    Emoji(EmojiArgs),
    /// Write the evaluation prompt list (TSV: prompt, category, subcategory) from a built data
    /// set: every held-out emoji and as many training emoji, by name.
    Prompts(PromptsArgs),
    /// Any folder of PNG / JPEG images (recursively) as square RGB shards with an index, for
    /// `mulo train upsampler` on a user's VQ (docs/byom.md).
    Images(ImagesArgs),
}

/// Arguments of `mulo data images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Folder searched recursively for .png, .jpg and .jpeg files.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Optional captions: JSONL lines {"file": "relative/path.png", "caption": "..."}.
    #[arg(long, value_name = "FILE.jsonl")]
    pub captions: Option<PathBuf>,
    /// Side of the output images in pixels (the target's resolution, e.g. 512 for LlamaGen's
    /// stage-2 model).
    #[arg(long)]
    pub size: u32,
    /// Output directory (shards, index.jsonl, meta.json).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// How non-square images become square: crop keeps the central square, pad adds white.
    #[arg(long, value_enum, default_value = "crop")]
    pub fit: FitArg,
    /// Images per shard file.
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
}

/// `--fit` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FitArg {
    /// Keep the central square.
    Crop,
    /// Pad the short side with white.
    Pad,
}

fn run_images(a: ImagesArgs) -> Result<()> {
    use mulo_train::data::images::{build_image_set, Fit, ImageSetOptions};
    let o = ImageSetOptions {
        dir: a.dir.clone(),
        captions: a.captions.clone(),
        size: a.size,
        out: a.out.clone(),
        fit: match a.fit {
            FitArg::Crop => Fit::Crop,
            FitArg::Pad => Fit::Pad,
        },
        shard_size: a.shard_size,
    };
    let bar = indicatif::ProgressBar::new(0);
    let meta = build_image_set(&o, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    for s in meta.skipped.iter().take(10) {
        eprintln!("skipped {}: {}", s.file, s.error);
    }
    println!(
        "wrote {} images of {}x{} px ({} train, {} held out) in {} shard(s) to {}; skipped {} unreadable file(s)",
        meta.count,
        meta.size,
        meta.size,
        meta.train,
        meta.heldout,
        meta.shards.len(),
        a.out.display(),
        meta.skipped.len()
    );
    Ok(())
}

/// Arguments of `mulo data prompts`.
#[derive(Debug, Args)]
pub struct PromptsArgs {
    /// Data directory from `mulo data emoji` (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// TSV file to write.
    #[arg(
        long,
        default_value = "prompts/emoji-eval.tsv",
        value_name = "FILE.tsv"
    )]
    pub out: PathBuf,
}

/// Arguments of `mulo data emoji`.
#[derive(Debug, Args)]
pub struct EmojiArgs {
    /// Tarball of emoji-datasource-google@16.0.0 (default: fetched with `npm pack` into --cache).
    #[arg(long, value_name = "FILE.tgz")]
    pub google: Option<PathBuf>,
    /// Tarball of emoji-datasource-twitter@16.0.0 (default: fetched with `npm pack` into --cache).
    #[arg(long, value_name = "FILE.tgz")]
    pub twitter: Option<PathBuf>,
    /// Where fetched tarballs are kept (default ~/.cache/mulo/npm).
    #[arg(long, env = "MULO_NPM_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Output directory (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Runs `mulo data`.
pub fn run(cmd: DataCommand) -> Result<()> {
    let a = match cmd {
        DataCommand::Emoji(a) => a,
        DataCommand::Prompts(p) => return run_prompts(p),
        DataCommand::Images(i) => return run_images(i),
    };
    let cache = a.cache.clone().unwrap_or_else(|| cache_root().join("npm"));
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| cache_root().join("data/emoji"));
    let mut sources = Vec::new();
    for (vendor, given) in [("google", &a.google), ("twitter", &a.twitter)] {
        let path = match given {
            Some(p) => p.clone(),
            None => emoji::fetch_tarball(vendor, &cache)?,
        };
        sources.push((vendor.to_string(), path));
    }
    let s = emoji::build(&sources, &out).context("building the emoji data set")?;
    let vendors: Vec<String> = s
        .per_vendor
        .iter()
        .map(|(v, n)| format!("{v} {n}"))
        .collect();
    println!(
        "built {} images ({}): {} train, {} held-out; {} categories, {} subcategories; wrote {}",
        s.train + s.heldout,
        vendors.join(", "),
        s.train,
        s.heldout,
        s.categories,
        s.subcategories,
        out.display()
    );
    Ok(())
}

fn run_prompts(a: PromptsArgs) -> Result<()> {
    let dir = a.data.unwrap_or_else(|| cache_root().join("data/emoji"));
    let meta = emoji::Meta::load(&dir)?;
    let rows = emoji::eval_prompts(&meta)?;
    let mut text = String::from(mulo_train::eval::PROMPT_HEADER);
    text.push('\n');
    for (p, c, s) in &rows {
        text.push_str(&format!("{p}\t{c}\t{s}\n"));
    }
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
    }
    std::fs::write(&a.out, text).with_context(|| format!("{}", a.out.display()))?;
    println!("wrote {} prompts to {}", rows.len(), a.out.display());
    Ok(())
}
