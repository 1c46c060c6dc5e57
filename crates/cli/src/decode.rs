//! `mulo decode`: token grid to PNG with a VQ model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use mulo_core::GridSize;
use mulo_model::{image_io, VqModel};
use tch::Tensor;

use crate::common::{parse_grid, read_tokens, vq_worker, RuntimeArgs};

/// Arguments of `mulo decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// VQ model directory.
    #[arg(long, env = "MULO_VQ", value_name = "DIR")]
    pub vq: PathBuf,
    /// Token grid: a JSON array of ints in raster order.
    #[arg(long, value_name = "FILE.json")]
    pub tokens: PathBuf,
    /// PNG to write.
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
    /// Grid as N or ROWSxCOLS (default: square).
    #[arg(long, value_parser = parse_grid)]
    pub grid: Option<GridSize>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Runs `mulo decode`.
pub fn run(args: DecodeArgs) -> Result<()> {
    let tokens = read_tokens(&args.tokens)?;
    let grid = match args.grid {
        Some(g) => g,
        None => {
            let n = (tokens.len() as f64).sqrt().round() as usize;
            if n * n != tokens.len() || n == 0 {
                bail!(
                    "{}: {} tokens do not form a square grid; pass --grid ROWSxCOLS",
                    args.tokens.display(),
                    tokens.len()
                );
            }
            GridSize::square(n)
        }
    };
    if grid.len() != tokens.len() {
        bail!(
            "{}: {} tokens do not fill a {grid} grid",
            args.tokens.display(),
            tokens.len()
        );
    }
    let worker = vq_worker(&args.vq, &args.runtime)?;
    let png = worker.run(move |vq: &mut VqModel| -> Result<Vec<u8>> {
        let device = vq.var_store().device();
        let t = Tensor::from_slice(&tokens)
            .view([1, grid.rows as i64, grid.cols as i64])
            .to_device(device);
        let img = vq.decode(&t)?;
        Ok(image_io::png_bytes(&img.get(0))?)
    })??;
    std::fs::write(&args.out, png).with_context(|| format!("{}", args.out.display()))?;
    println!("decoded a {grid} grid; wrote {}", args.out.display());
    Ok(())
}
