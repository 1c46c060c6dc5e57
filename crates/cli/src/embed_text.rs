//! `mulo embed-text`: prompts to caption features with a text encoder, written as .npy (the input
//! of `mulo generate --caption-features`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use mulo_core::Condition;
use mulo_model::TextEncoder;
use npyz::WriterBuilder;

use crate::common::{warn_unused, RuntimeArgs};

/// Arguments of `mulo embed-text`.
#[derive(Debug, Args)]
pub struct EmbedTextArgs {
    /// Prompts to encode, one batch.
    #[arg(required = true, value_name = "PROMPT")]
    pub prompts: Vec<String>,
    /// Text encoder directory (from `mulo convert t5`).
    #[arg(long, env = "MULO_TEXT_ENCODER", value_name = "DIR")]
    pub encoder: PathBuf,
    /// Features, float32: [max_len, dim] for one prompt (what --caption-features reads),
    /// [prompts, max_len, dim] for several. LlamaGen's layout: the valid rows last, the padding
    /// rows zero.
    #[arg(long, value_name = "FILE.npy")]
    pub out: PathBuf,
    /// Validity mask, float32 (1 = a token row): [max_len] or [prompts, max_len].
    #[arg(long, value_name = "FILE.npy")]
    pub mask_out: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn write_npy(path: &Path, shape: &[u64], values: &[f32]) -> Result<()> {
    let mut bytes = Vec::new();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut bytes)
        .begin_nd()?;
    w.extend(values.iter().copied())?;
    w.finish()?;
    std::fs::write(path, bytes).with_context(|| format!("{}", path.display()))
}

/// Runs `mulo embed-text`.
pub fn run(a: EmbedTextArgs) -> Result<()> {
    let dir = a.encoder.clone();
    let runtime = a.runtime.clone();
    let worker = mulo_engine::TorchWorker::spawn("torch", move || -> Result<TextEncoder> {
        let device = runtime.setup()?;
        let (enc, unused) = TextEncoder::load(&dir, device, runtime.dtype_for(device))?;
        warn_unused(&dir, &unused);
        Ok(enc)
    })?;
    let prompts = a.prompts.clone();
    let conds = worker.run(move |enc: &mut TextEncoder| {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        enc.encode(&refs)
    })??;
    let (mut feats, mut masks, mut shape) = (Vec::new(), Vec::new(), (0, 0));
    for c in conds {
        let Condition::CaptionFeatures {
            features,
            len,
            dim,
            mask,
        } = c
        else {
            bail!("the text encoder returned no features");
        };
        feats.extend(features);
        masks.extend(
            mask.unwrap_or_default()
                .iter()
                .map(|&m| f32::from(u8::from(m))),
        );
        shape = (len as u64, dim as u64);
    }
    let n = a.prompts.len() as u64;
    let lead: Vec<u64> = if n == 1 { vec![] } else { vec![n] };
    write_npy(
        &a.out,
        &[lead.clone(), vec![shape.0, shape.1]].concat(),
        &feats,
    )?;
    if let Some(m) = &a.mask_out {
        write_npy(m, &[lead, vec![shape.0]].concat(), &masks)?;
    }
    println!(
        "encoded {n} prompt(s) to {} x {} features; wrote {}",
        shape.0,
        shape.1,
        a.out.display()
    );
    Ok(())
}
