//! Flags and helpers shared by the subcommands.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use mulo_core::{Condition, SamplingParams};

pub use mulo_server::RuntimeArgs;

/// Sampling flags; unset flags take the model's defaults.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Classifier-free guidance scale (values <= 1 disable guidance).
    #[arg(long = "cfg", env = "MULO_CFG", allow_negative_numbers = true)]
    pub cfg_scale: Option<f64>,
    /// Softmax temperature (0 = greedy).
    #[arg(long, env = "MULO_TEMPERATURE", allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Keep the K most likely tokens (0 = off, 1 = greedy).
    #[arg(long, env = "MULO_TOP_K")]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, env = "MULO_TOP_P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
}

impl SamplingArgs {
    /// Checks the given flags before any model is loaded (unset flags cannot be wrong).
    pub fn check(&self) -> Result<()> {
        self.resolve(SamplingParams::default()).map(|_| ())
    }

    /// The model's defaults overridden by the given flags, validated.
    pub fn resolve(&self, defaults: SamplingParams) -> Result<SamplingParams> {
        let p = SamplingParams {
            cfg_scale: self.cfg_scale.unwrap_or(defaults.cfg_scale),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
        };
        p.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(p)
    }
}

/// What to condition on: a prompt, a class id, or precomputed caption features.
#[derive(Debug, Clone, Args)]
pub struct ConditionArgs {
    /// Text prompt (for models that carry a caption tokenizer).
    #[arg(value_name = "PROMPT")]
    pub prompt: Option<String>,
    /// Class id of a class-conditional (c2i) model.
    #[arg(long = "class", value_name = "N", conflicts_with_all = ["prompt", "caption_features"])]
    pub class: Option<u32>,
    /// Precomputed caption features of a t2i model: .npy, float32, shape [T, caption_dim]
    /// (LlamaGen: 120 flan-t5-xl rows, left-padded).
    #[arg(long, value_name = "FILE.npy", conflicts_with = "prompt")]
    pub caption_features: Option<PathBuf>,
    /// Validity mask of the caption rows: .npy of shape [T] (bool, integer or float; nonzero =
    /// valid). Requires --caption-features.
    #[arg(long, value_name = "FILE.npy", requires = "caption_features")]
    pub caption_mask: Option<PathBuf>,
}

impl ConditionArgs {
    /// Reads the condition the flags describe.
    pub fn load(&self) -> Result<Condition> {
        if let Some(c) = self.class {
            return Ok(Condition::Class(c));
        }
        if let Some(path) = &self.caption_features {
            let (shape, features) = read_npy_f32(path)?;
            if shape.len() != 2 {
                bail!(
                    "{}: caption features must have shape [T, caption_dim], got {shape:?}",
                    path.display()
                );
            }
            let mask = match &self.caption_mask {
                Some(m) => {
                    let (mshape, values) = read_npy_f32(m)?;
                    let n: u64 = mshape.iter().product();
                    if n != shape[0] {
                        bail!(
                            "{}: caption mask has {n} entries, the features have {} rows",
                            m.display(),
                            shape[0]
                        );
                    }
                    Some(values.iter().map(|&v| v != 0.0).collect())
                }
                None => None,
            };
            let cond = Condition::CaptionFeatures {
                features,
                len: shape[0] as usize,
                dim: shape[1] as usize,
                mask,
            };
            cond.validate().map_err(|e| anyhow!("{e}"))?;
            return Ok(cond);
        }
        match &self.prompt {
            Some(p) => {
                let c = Condition::Prompt(p.clone());
                c.validate().map_err(|e| anyhow!("{e}"))?;
                Ok(c)
            }
            None => bail!("no condition: give a PROMPT, --class N or --caption-features FILE.npy"),
        }
    }
}

/// Reads a .npy array of any numeric or bool dtype as f32 values with its shape.
pub fn read_npy_f32(path: &Path) -> Result<(Vec<u64>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{}: not a .npy file", path.display()))?;
    let shape = npy.shape().to_vec();
    let order = npy.order();
    if order == npyz::Order::Fortran && shape.len() > 1 {
        bail!(
            "{}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
            path.display()
        );
    }
    let dtype = npy.dtype();
    let bad = |e: std::io::Error| anyhow!("{}: {e}", path.display());
    let descr = dtype.descr();
    let code = descr
        .trim_matches(['\'', '"'])
        .trim_start_matches(['<', '>', '|', '=']);
    let values: Vec<f32> = match code {
        "f4" => npy.into_vec::<f32>().map_err(bad)?,
        "f8" => npy
            .into_vec::<f64>()
            .map_err(bad)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "f2" => bail!(
            "{}: float16 arrays are not supported; save as float32",
            path.display()
        ),
        "b1" => npy
            .into_vec::<bool>()
            .map_err(bad)?
            .into_iter()
            .map(|v| if v { 1.0 } else { 0.0 })
            .collect(),
        "i8" => npy
            .into_vec::<i64>()
            .map_err(bad)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "i4" => npy
            .into_vec::<i32>()
            .map_err(bad)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "u1" => npy
            .into_vec::<u8>()
            .map_err(bad)?
            .into_iter()
            .map(f32::from)
            .collect(),
        other => bail!("{}: unsupported .npy dtype '{other}'", path.display()),
    };
    Ok((shape, values))
}

/// Reads a JSON array of token ids.
pub fn read_tokens(path: &Path) -> Result<Vec<i64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str::<Vec<i64>>(&text).map_err(|e| {
        anyhow!(
            "{}: expected a JSON array of integer token ids: {e}",
            path.display()
        )
    })
}

/// Writes token ids as a JSON array.
pub fn write_tokens(path: &Path, tokens: &[i64]) -> Result<()> {
    let text = serde_json::to_string(tokens)?;
    std::fs::write(path, text + "\n").with_context(|| format!("{}", path.display()))
}

/// Parses `16` or `16x24` (rows x cols).
pub fn parse_grid(s: &str) -> Result<mulo_core::GridSize, String> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("'{s}' is not a grid; use N or ROWSxCOLS"))
    };
    match s.split_once(['x', 'X']) {
        Some((r, c)) => Ok(mulo_core::GridSize {
            rows: parse(r)?,
            cols: parse(c)?,
        }),
        None => Ok(mulo_core::GridSize::square(parse(s)?)),
    }
}

/// Warns about checkpoint tensors a model did not use.
pub fn warn_unused(what: &Path, unused: &[String]) {
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
        eprintln!(
            "warning: {}: {} tensor(s) not used by the model: {}{}",
            what.display(),
            unused.len(),
            shown.join(", "),
            if unused.len() > 5 { ", ..." } else { "" }
        );
    }
}

/// `~/.cache/mulo`: fetched packages, data sets and training runs (never in the repository).
pub fn cache_root() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/mulo")
}

/// Starts the torch worker with the VQ model of `dir` loaded (warning about unused tensors).
pub fn vq_worker(
    dir: &Path,
    runtime: &RuntimeArgs,
) -> Result<mulo_engine::TorchWorker<mulo_model::VqModel>> {
    let dir = dir.to_path_buf();
    let runtime = runtime.clone();
    mulo_engine::TorchWorker::spawn("torch", move || -> Result<mulo_model::VqModel> {
        let device = runtime.setup()?;
        let (vq, unused) = mulo_model::VqModel::load(&dir, device, runtime.dtype_for(device))?;
        warn_unused(&dir, &unused);
        Ok(vq)
    })
}

/// This process's command line as a shell-like string (`mulo` and its arguments; arguments with
/// spaces are quoted).
pub fn command_line() -> String {
    let mut parts = vec!["mulo".to_string()];
    for a in std::env::args().skip(1) {
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            parts.push(format!("'{}'", a.replace('\'', "'\\''")));
        } else {
            parts.push(a);
        }
    }
    parts.join(" ")
}

/// A short description of where a run happens: device and torch threads.
pub fn machine_line(device: &str) -> String {
    format!(
        "device {device}, {} torch threads, {} logical CPUs",
        tch::get_num_threads(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

/// A text prompt through the model's own caption tokenizer (`tokenizer.json` in `model_dir`), when
/// it has one; other conditions are returned as they are.
pub fn tokenize_for(model_dir: &Path, cond: Condition) -> Result<Condition> {
    Ok(match mulo_engine::prompt::load_tokenizer(model_dir)? {
        Some(tok) => tokenize_with_warnings(&tok, cond),
        None => cond,
    })
}

/// Tokenizes a prompt condition, warning about unknown words and words past the caption length.
pub fn tokenize_with_warnings(
    tok: &mulo_core::caption::CaptionTokenizer,
    cond: Condition,
) -> Condition {
    let (cond, unknown, truncated) = mulo_engine::prompt::tokenize_prompt(tok, cond);
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} word(s) not in the model's caption vocabulary (mapped to <unk>): {}",
            unknown.len(),
            unknown.join(", ")
        );
    }
    if truncated > 0 {
        eprintln!(
            "warning: the prompt has {truncated} word(s) past the model's {} caption positions (dropped)",
            tok.max_len
        );
    }
    cond
}

/// The path of `target` relative to the directory `from` (both made absolute first), as a string
/// for config files.
pub fn relative_link(from: &Path, target: &Path) -> Result<String> {
    let abs = |p: &Path| -> Result<PathBuf> {
        std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))
    };
    let (from, target) = (abs(from)?, abs(target)?);
    let rel = pathdiff::diff_paths(&target, &from).unwrap_or(target);
    Ok(rel.to_string_lossy().into_owned())
}
