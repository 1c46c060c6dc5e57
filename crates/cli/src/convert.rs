//! `mulo convert llamagen`: LlamaGen `.pt` checkpoints to the project format.
//!
//! A bundled Python script (numpy only, no torch import, refuses any class but tensors and plain
//! containers) turns the pickle into a raw safetensors file; everything else — inferring the
//! architecture from tensor shapes, checking every tensor, writing `config.json` and the weights —
//! happens here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mulo_core::{GridSize, SamplingParams};
use mulo_engine::TorchWorker;
use mulo_model::config::{ConditionConfig, PositionEmbedding};
use mulo_model::{DType, Gpt, GptConfig, ModelConfig, VqConfig, VqModel};
use tch::Tensor;

use crate::common::parse_grid;

const SCRIPT: &str = include_str!("../python/torch_to_safetensors.py");

/// `mulo convert` sources.
#[derive(Debug, Subcommand)]
pub enum ConvertCommand {
    /// Convert a LlamaGen checkpoint (c2i GPT, t2i GPT or VQ tokenizer).
    Llamagen(LlamagenArgs),
    /// Convert a Hugging Face T5 / flan-t5 checkpoint directory into a text encoder (its encoder
    /// half and tokenizer.json), for t2i families (docs/byom.md).
    T5(crate::convert_t5::T5Args),
}

/// Kind of LlamaGen checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Class-conditional GPT (`c2i_*.pt`).
    C2i,
    /// Text-conditional GPT (`t2i_*.pt`).
    T2i,
    /// VQ tokenizer (`vq_ds16_*.pt`).
    Vq,
}

/// LlamaGen GPT presets: (name, n_layer, n_head, dim).
const PRESETS: &[(&str, i64, i64, i64)] = &[
    ("GPT-B", 12, 12, 768),
    ("GPT-L", 24, 16, 1024),
    ("GPT-XL", 36, 20, 1280),
    ("GPT-XXL", 48, 24, 1536),
    ("GPT-XXXL", 48, 40, 2560),
    ("GPT-1B", 22, 32, 2048),
    ("GPT-3B", 24, 32, 3200),
    ("GPT-7B", 32, 32, 4096),
];

fn parse_preset(s: &str) -> Result<String, String> {
    PRESETS
        .iter()
        .find(|p| p.0.eq_ignore_ascii_case(s))
        .map(|p| p.0.to_string())
        .ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            format!("unknown preset '{s}'; one of {}", names.join(", "))
        })
}

/// Arguments of `mulo convert llamagen`.
#[derive(Debug, Args)]
pub struct LlamagenArgs {
    /// What the checkpoint holds.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The LlamaGen checkpoint (torch.save zip format).
    #[arg(long, value_name = "FILE.pt")]
    pub checkpoint: PathBuf,
    /// Output model directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// GPT preset giving the head count (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-1B, GPT-3B,
    /// GPT-7B); the grid then defaults to 16 (LlamaGen's 256 px models).
    #[arg(long, value_parser = parse_preset, conflicts_with = "n_head")]
    pub preset: Option<String>,
    /// Attention heads (not stored in the checkpoint).
    #[arg(long)]
    pub n_head: Option<i64>,
    /// Token grid as N or ROWSxCOLS (not stored in the checkpoint): 16 for 256 px, 24 for 384 px,
    /// 32 for 512 px with a 16x VQ.
    #[arg(long, value_parser = parse_grid)]
    pub grid: Option<GridSize>,
    /// VQ model directory to record in the GPT's config, relative to --out (e.g. ../vq).
    #[arg(long, value_name = "REL")]
    pub vq: Option<String>,
    /// Storage dtype of the converted weights.
    #[arg(long, default_value = "fp32")]
    pub dtype: DType,
    /// Python with numpy used to read the pickle (default: $MULO_PYTHON, then the venv made by
    /// scripts/setup-torch.sh, then python3).
    #[arg(long, env = "MULO_PYTHON")]
    pub python: Option<PathBuf>,
}

fn python(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match option_env!("MULO_TORCH_PYTHON") {
        Some(p) if Path::new(p).exists() => PathBuf::from(p),
        _ => PathBuf::from("python3"),
    }
}

/// Runs the bundled reader: checkpoint → raw safetensors at `dst`.
fn unpickle(py: &Path, checkpoint: &Path, dst: &Path) -> Result<String> {
    if !checkpoint.is_file() {
        bail!("{}: no such file", checkpoint.display());
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("torch_to_safetensors.py");
    std::fs::write(&script, SCRIPT)?;
    let out = Command::new(py)
        .arg(&script)
        .arg(checkpoint)
        .arg(dst)
        .output()
        .with_context(|| format!("cannot run {}", py.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("unknown error");
        bail!("{}: {}", checkpoint.display(), last.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

type Shapes = HashMap<String, Vec<i64>>;

fn shape<'a>(shapes: &'a Shapes, name: &str, file: &Path) -> Result<&'a Vec<i64>> {
    shapes
        .get(name)
        .ok_or_else(|| anyhow!("{}: missing tensor '{name}'", file.display()))
}

fn count(shapes: &Shapes, f: impl Fn(i64) -> String) -> i64 {
    (0..).take_while(|&i| shapes.contains_key(&f(i))).count() as i64
}

fn gpt_config(a: &LlamagenArgs, shapes: &Shapes) -> Result<GptConfig> {
    let file = &a.checkpoint;
    let emb = shape(shapes, "tok_embeddings.weight", file)?;
    let (vocab, dim) = (emb[0], emb[1]);
    let n_layer = count(shapes, |i| format!("layers.{i}.attention.wqkv.weight"));
    if n_layer == 0 {
        bail!(
            "{}: missing tensor 'layers.0.attention.wqkv.weight'",
            file.display()
        );
    }
    let (n_head, default_grid) = match (&a.preset, a.n_head) {
        (Some(p), _) => {
            let Some(&(name, l, h, d)) = PRESETS.iter().find(|x| x.0 == p) else {
                bail!("unknown preset {p}");
            };
            if l != n_layer || d != dim {
                bail!(
                    "{}: has {n_layer} layers of width {dim}, but preset {name} is {l} layers of width {d}",
                    file.display()
                );
            }
            (h, Some(GridSize::square(16)))
        }
        (None, Some(h)) => (h, None),
        (None, None) => {
            bail!("the head count is not stored in a checkpoint: pass --preset or --n-head")
        }
    };
    let grid = match (a.grid, default_grid) {
        (Some(g), _) => g,
        (None, Some(g)) => {
            eprintln!("note: assuming a {g} token grid (LlamaGen 256 px); pass --grid for other sizes");
            g
        }
        (None, None) => bail!("the token grid is not stored in a checkpoint: pass --grid (16 for 256 px, 32 for 512 px)"),
    };
    if n_head <= 0 || dim % n_head != 0 {
        bail!("--n-head {n_head} does not divide the width {dim}");
    }
    let hd = dim / n_head;
    let qkv_rows = shape(shapes, "layers.0.attention.wqkv.weight", file)?[0];
    let kv2 = qkv_rows / hd - n_head;
    if qkv_rows % hd != 0 || kv2 <= 0 || kv2 % 2 != 0 {
        bail!(
            "{}: wqkv has {qkv_rows} rows, which does not fit {n_head} heads of width {hd}",
            file.display()
        );
    }
    let n_kv = kv2 / 2;
    let (condition, cls_token_num, sampling) = match a.kind {
        Kind::C2i => {
            let t = shape(shapes, "cls_embedding.embedding_table.weight", file)?;
            (
                ConditionConfig::Class {
                    num_classes: t[0] - 1,
                },
                1,
                SamplingParams::default(),
            )
        }
        Kind::T2i => {
            let fc1 = shape(shapes, "cls_embedding.cap_proj.fc1.weight", file)?;
            let un = shape(shapes, "cls_embedding.uncond_embedding", file)?;
            (
                ConditionConfig::Caption {
                    caption_dim: fc1[1],
                },
                un[0],
                SamplingParams {
                    cfg_scale: 7.5,
                    temperature: 1.0,
                    top_k: 1000,
                    top_p: 1.0,
                },
            )
        }
        Kind::Vq => unreachable_kind()?,
    };
    let position_embedding = if shapes.contains_key("abs_pe") {
        PositionEmbedding::Learned
    } else {
        PositionEmbedding::Rope2d
    };
    let mut cfg = GptConfig {
        name: a
            .checkpoint
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned()),
        dim,
        n_layer,
        n_head,
        n_kv_head: (n_kv != n_head).then_some(n_kv),
        multiple_of: 256,
        ffn_dim_multiplier: None,
        ffn_hidden: None,
        norm_eps: 1e-5,
        rope_base: 10000.0,
        vocab_size: vocab,
        condition,
        cls_token_num,
        grid,
        position_embedding,
        dtype: a.dtype,
        caption_vocab: None,
        sampling: Some(sampling),
        vq: a.vq.clone(),
    };
    let hidden = shape(shapes, "layers.0.feed_forward.w1.weight", file)?[0];
    if cfg.ffn_hidden() != hidden {
        cfg.ffn_hidden = Some(hidden);
    }
    cfg.validate()?;
    Ok(cfg)
}

fn unreachable_kind<T>() -> Result<T> {
    bail!("internal: a VQ checkpoint has no GPT config")
}

fn vq_config(a: &LlamagenArgs, shapes: &Shapes) -> Result<VqConfig> {
    let file = &a.checkpoint;
    let cb = shape(shapes, "quantize.embedding.weight", file)?;
    let ch = shape(shapes, "encoder.conv_in.weight", file)?[0];
    let z = shape(shapes, "encoder.conv_out.weight", file)?[0];
    let levels = count(shapes, |l| {
        format!("encoder.conv_blocks.{l}.res.0.conv1.weight")
    });
    let res = count(shapes, |j| {
        format!("encoder.conv_blocks.0.res.{j}.conv1.weight")
    });
    if levels == 0 || res == 0 {
        bail!(
            "{}: missing tensor 'encoder.conv_blocks.0.res.0.conv1.weight'",
            file.display()
        );
    }
    let mult = |name: String| -> Result<i64> { Ok(shape(shapes, &name, file)?[0] / ch) };
    let encoder_ch_mult = (0..levels)
        .map(|l| mult(format!("encoder.conv_blocks.{l}.res.0.conv1.weight")))
        .collect::<Result<Vec<_>>>()?;
    let mut decoder_ch_mult = (0..levels)
        .map(|i| mult(format!("decoder.conv_blocks.{i}.res.0.conv1.weight")))
        .collect::<Result<Vec<_>>>()?;
    decoder_ch_mult.reverse();
    let cfg = VqConfig {
        name: a
            .checkpoint
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned()),
        codebook_size: cb[0],
        codebook_embed_dim: cb[1],
        codebook_l2_norm: true,
        ch,
        encoder_ch_mult,
        decoder_ch_mult,
        z_channels: z,
        num_res_blocks: res,
        dtype: a.dtype,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Runs `mulo convert llamagen`.
pub fn run(cmd: ConvertCommand) -> Result<()> {
    let a = match cmd {
        ConvertCommand::Llamagen(a) => a,
        ConvertCommand::T5(a) => return crate::convert_t5::run(a),
    };
    let py = python(a.python.as_deref());
    let out = a.out.clone();
    if out.join("config.json").exists() || out.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model; choose an empty --out",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
    let result = convert(&a, &py);
    if result.is_err() {
        let _ = std::fs::remove_file(out.join("config.json"));
        let _ = std::fs::remove_file(out.join("model.safetensors"));
        let _ = std::fs::remove_dir(&out);
    }
    let summary = result?;
    println!("{summary}");
    Ok(())
}

fn convert(a: &LlamagenArgs, py: &Path) -> Result<String> {
    let raw = a.out.join("model.safetensors");
    let report = unpickle(py, &a.checkpoint, &raw)?;
    let worker = TorchWorker::spawn("torch", || Ok::<_, anyhow::Error>(()))?;
    let raw2 = raw.clone();
    let shapes: Shapes = worker.run(move |_| -> Result<Shapes> {
        let tensors =
            Tensor::read_safetensors(&raw2).map_err(|e| anyhow!("{}: {e}", raw2.display()))?;
        Ok(tensors.into_iter().map(|(n, t)| (n, t.size())).collect())
    })??;
    let out = a.out.clone();
    let dtype = a.dtype;
    let (config, unused) = match a.kind {
        Kind::C2i | Kind::T2i => {
            let cfg = gpt_config(a, &shapes)?;
            let config = ModelConfig::Gpt(cfg);
            config.save(&out)?;
            let unused = worker.run(move |_| -> Result<Vec<String>> {
                let (m, unused) = Gpt::load(&out, tch::Device::Cpu, Some(DType::Fp32))?;
                m.save(&out, dtype)?;
                Ok(unused)
            })??;
            (config, unused)
        }
        Kind::Vq => {
            let cfg = vq_config(a, &shapes)?;
            let config = ModelConfig::Vq(cfg);
            config.save(&out)?;
            let unused = worker.run(move |_| -> Result<Vec<String>> {
                let (m, unused) = VqModel::load(&out, tch::Device::Cpu, Some(DType::Fp32))?;
                m.save(&out, dtype)?;
                Ok(unused)
            })??;
            (config, unused)
        }
    };
    let summary = match &config {
        ModelConfig::Gpt(c) => format!(
            "converted a {} GPT: {} layers, width {}, {} heads ({} kv), vocab {}, grid {}, {} condition tokens",
            match c.condition {
                ConditionConfig::Class { .. } => "c2i",
                ConditionConfig::Caption { .. } => "t2i",
            },
            c.n_layer,
            c.dim,
            c.n_head,
            c.kv_heads(),
            c.vocab_size,
            c.grid,
            c.cls_token_num
        ),
        ModelConfig::Vq(c) => format!(
            "converted a VQ tokenizer: codebook {} x {}, ch {}, ch_mult {:?}, {}x down-sampling",
            c.codebook_size,
            c.codebook_embed_dim,
            c.ch,
            c.encoder_ch_mult,
            c.downsample_factor()
        ),
        other => format!("converted {}", other.kind_name()),
    };
    let dropped = if unused.is_empty() {
        String::new()
    } else {
        format!("; dropped unused tensors: {}", unused.join(", "))
    };
    Ok(format!(
        "{summary} ({dtype}) into {}{dropped} [reader: {report}]",
        a.out.display()
    ))
}
