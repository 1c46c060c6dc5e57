//! `mulo vq-probe`: where a VQ tokenizer loses detail (held-out PSNR with and without quantisation).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mulo_model::VqModel;
use mulo_train::trainers::vq::probe_vq;
use mulo_train::trainers::EmojiTensors;

use crate::common::{cache_root, vq_worker, RuntimeArgs};

/// Arguments of `mulo vq-probe`.
#[derive(Debug, Args)]
pub struct VqProbeArgs {
    /// VQ model directory.
    #[arg(
        long,
        env = "MULO_VQ",
        value_name = "DIR",
        default_value = "models/emoji/vq"
    )]
    pub vq: PathBuf,
    /// Data directory from `mulo data emoji`: its held-out images are measured (default
    /// ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Report to write.
    #[arg(long, value_name = "OUT.json", default_value = "vq-probe.json")]
    pub json: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Runs `mulo vq-probe`.
pub fn run(a: VqProbeArgs) -> Result<()> {
    let data_dir = a
        .data
        .clone()
        .unwrap_or_else(|| cache_root().join("data/emoji"));
    let worker = vq_worker(&a.vq, &a.runtime)?;
    let probe = worker.run(move |vq: &mut VqModel| -> Result<_> {
        let data = EmojiTensors::load(&data_dir).with_context(|| {
            format!(
                "loading the images (build them with `mulo data emoji`): {}",
                data_dir.display()
            )
        })?;
        Ok(probe_vq(vq, &data, vq.var_store().device())?)
    })??;
    println!(
        "{} held-out images: PSNR 64 px {:.2} dB (unquantised {:.2}), 32 px {:.2} dB (unquantised {:.2}); 32 px from the 64 px tokens {:.2} dB",
        probe.heldout_images,
        probe.psnr64,
        probe.psnr64_unquantised,
        probe.psnr32,
        probe.psnr32_unquantised,
        probe.psnr32_from_64px_tokens
    );
    let text = serde_json::to_string_pretty(&probe)?;
    std::fs::write(&a.json, text + "\n").with_context(|| format!("{}", a.json.display()))?;
    println!("wrote {}", a.json.display());
    Ok(())
}
