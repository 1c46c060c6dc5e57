//! `mulo info`: what a model directory holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use mulo_model::config::{weights_path, ConditionConfig};
use mulo_model::ModelConfig;
use serde::Deserialize;

/// Arguments of `mulo info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Model directory, or a family directory (family.json: its members and whether they fit).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the configuration and tensor summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
}

/// Tensor count, parameter count and dtypes from a safetensors header (no tensor is read).
fn weights_summary(path: &Path) -> Result<(usize, u64, BTreeMap<String, usize>, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let size = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100_000_000 {
        bail!(
            "{}: not a safetensors file (bad header length)",
            path.display()
        );
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head)?;
    let mut map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&head)
        .with_context(|| format!("{}: bad safetensors header", path.display()))?;
    map.remove("__metadata__");
    let mut params = 0u64;
    let mut dtypes = BTreeMap::new();
    for (name, v) in &map {
        let e: Entry = serde_json::from_value(v.clone())
            .with_context(|| format!("{}: bad header entry '{name}'", path.display()))?;
        params += e.shape.iter().product::<u64>();
        *dtypes.entry(e.dtype).or_insert(0) += 1;
    }
    Ok((map.len(), params, dtypes, size))
}

/// Runs `mulo info`.
pub fn run(args: InfoArgs) -> Result<()> {
    if args.dir.join(mulo_engine::family::FAMILY_FILE).is_file() {
        return family_info(&args);
    }
    let cfg = ModelConfig::load(&args.dir)?;
    let (tensors, params, dtypes, bytes) = weights_summary(&weights_path(&args.dir))?;
    if args.json {
        let v = serde_json::json!({
            "config": cfg,
            "weights": {"tensors": tensors, "parameters": params, "dtypes": dtypes, "bytes": bytes},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", args.dir.display());
    match &cfg {
        ModelConfig::Gpt(c) => {
            let cond = match c.condition {
                ConditionConfig::Class { num_classes } => {
                    format!("class ({num_classes} classes, c2i)")
                }
                ConditionConfig::Caption { caption_dim } => {
                    format!(
                        "caption features [{}, {caption_dim}] (t2i)",
                        c.cls_token_num
                    )
                }
            };
            println!(
                "  type        GPT{}",
                c.name
                    .as_ref()
                    .map(|n| format!(" '{n}'"))
                    .unwrap_or_default()
            );
            println!(
                "  layers      {} x width {}, {} heads ({} kv), head dim {}, SwiGLU {}",
                c.n_layer,
                c.dim,
                c.n_head,
                c.kv_heads(),
                c.head_dim(),
                c.ffn_hidden()
            );
            println!("  vocabulary  {}", c.vocab_size);
            println!("  grid        {} ({} tokens)", c.grid, c.grid.len());
            println!("  condition   {cond}");
            println!("  positions   {:?}", c.position_embedding);
            let elem = if c.dtype == mulo_model::DType::Fp32 {
                4
            } else {
                2
            };
            let mib = |b: i64| b as f64 / (1 << 20) as f64;
            println!(
                "  kv cache    {:.1} MiB per session with CFG ({:.1} MiB without), in {}",
                mib(c.kv_cache_bytes(2, elem)),
                mib(c.kv_cache_bytes(1, elem)),
                c.dtype
            );
            let s = c.default_sampling();
            println!(
                "  sampling    cfg {} temperature {} top-k {} top-p {}",
                s.cfg_scale, s.temperature, s.top_k, s.top_p
            );
            if let Some(vq) = &c.vq {
                println!("  vq          {vq}");
            }
        }
        ModelConfig::Vq(c) => {
            println!(
                "  type        VQ tokenizer{}",
                c.name
                    .as_ref()
                    .map(|n| format!(" '{n}'"))
                    .unwrap_or_default()
            );
            println!(
                "  codebook    {} x {} (l2-normalised: {})",
                c.codebook_size, c.codebook_embed_dim, c.codebook_l2_norm
            );
            println!(
                "  channels    ch {} x {:?}, z {}, {} res blocks per level",
                c.ch, c.encoder_ch_mult, c.z_channels, c.num_res_blocks
            );
            println!("  scale       {}x down-sampling", c.downsample_factor());
        }
        ModelConfig::Upsampler(c) => {
            println!(
                "  type        up-sampler{} (row-causal, x{})",
                c.name
                    .as_ref()
                    .map(|n| format!(" '{n}'"))
                    .unwrap_or_default(),
                c.scale
            );
            println!(
                "  layers      {} low-res + {} high-res blocks, {} channels",
                c.low_blocks, c.high_blocks, c.channels
            );
            println!(
                "  codebook    {} x {}",
                c.codebook_size, c.codebook_embed_dim
            );
            if let Some(vq) = &c.vq {
                println!("  vq          {vq}");
            }
        }
        ModelConfig::Evaluator(c) => {
            println!("  type        evaluator CNN (FID-emoji features, adherence)");
            println!(
                "  channels    {:?}, {} features",
                c.channels,
                c.channels.last().copied().unwrap_or(0)
            );
            println!(
                "  classes     {} categories, {} subcategories",
                c.categories, c.subcategories
            );
        }
        ModelConfig::T5Encoder(c) => {
            println!("  type        T5 text encoder '{}'", c.name);
            println!(
                "  layers      {} x width {}, {} heads of {}, feed-forward {} ({:?}{})",
                c.num_layers,
                c.d_model,
                c.num_heads,
                c.d_kv,
                c.d_ff,
                c.activation,
                if c.gated { ", gated" } else { "" }
            );
            println!("  vocabulary  {}", c.vocab_size);
            println!("  features    [{}, {}] per prompt", c.max_len, c.d_model);
        }
    }
    let dt: Vec<String> = dtypes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!(
        "  weights     {tensors} tensors, {:.2} M parameters, {} ({:.1} MB)",
        params as f64 / 1e6,
        dt.join(", "),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// `mulo info FAMILY`: the members, how they fit, or the first mismatch.
fn family_info(args: &InfoArgs) -> Result<()> {
    let family = mulo_engine::family::Family::load(&args.dir)?;
    let configs = family.check()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&family.file)?);
    } else {
        println!("{}", crate::family::describe(&family, &configs));
    }
    Ok(())
}
