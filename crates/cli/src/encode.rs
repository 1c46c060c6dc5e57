//! `mulo encode`: image to token grid with a VQ model.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mulo_model::{image_io, VqModel};

use crate::common::{vq_worker, write_tokens, RuntimeArgs};

/// Arguments of `mulo encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// VQ model directory.
    #[arg(long, env = "MULO_VQ", value_name = "DIR")]
    pub vq: PathBuf,
    /// Image to encode (PNG; transparency is composited on white). Its sides must be multiples of
    /// the VQ's down-sampling factor.
    #[arg(long, value_name = "FILE.png")]
    pub image: PathBuf,
    /// Where to write the tokens: a JSON array of ints in raster order.
    #[arg(long, value_name = "FILE.json")]
    pub tokens_out: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Runs `mulo encode`.
pub fn run(args: EncodeArgs) -> Result<()> {
    let worker = vq_worker(&args.vq, &args.runtime)?;
    let image = args.image.clone();
    let (tokens, rows, cols) = worker.run(move |vq: &mut VqModel| -> Result<_> {
        let device = vq.var_store().device();
        let img = image_io::load_image(&image)?.unsqueeze(0).to_device(device);
        let t = vq.encode(&img)?;
        let s = t.size();
        let tokens = Vec::<i64>::try_from(t.reshape([-1]).to_device(tch::Device::Cpu))?;
        Ok((tokens, s[1], s[2]))
    })??;
    write_tokens(&args.tokens_out, &tokens)?;
    println!(
        "encoded {} into a {rows}x{cols} grid; wrote {}",
        args.image.display(),
        args.tokens_out.display()
    );
    Ok(())
}
