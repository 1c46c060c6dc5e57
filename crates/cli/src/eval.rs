//! `mulo eval`: FID-emoji and adherence of a generation method over a prompt list.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mulo_core::{MuloParams, TokenGrid};
use mulo_engine::{
    default_family_dir, generate_ar, pool_table, target_nll, Family, Member, TargetNll, TorchWorker,
};
use mulo_model::evaluator::Evaluator;
use mulo_model::{image_io, Gpt, TextEncoder, VqModel};
use mulo_train::data::emoji::Split;
use mulo_train::eval::{
    agreement, agreement_by_key, agreement_by_label, frechet_distance, label_ids, median,
    prompts_of, read_prompts, score_images, EvalReport, MethodResult, PromptRow, RealAdherence,
};
use mulo_train::trainers::EmojiTensors;
use tch::{Device, Tensor};

use crate::common::{cache_root, RuntimeArgs, SamplingArgs};

/// What `mulo eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalMethod {
    /// The target GPT, one pass per token (the exact reference), at the target resolution.
    Ar,
    /// The drafter GPT alone, one pass per token, at the drafter resolution.
    DrafterAr,
}

impl EvalMethod {
    fn name(self) -> &'static str {
        match self {
            EvalMethod::Ar => "ar",
            EvalMethod::DrafterAr => "drafter-ar",
        }
    }

    fn member(self) -> Member {
        match self {
            EvalMethod::Ar => Member::Target,
            EvalMethod::DrafterAr => Member::Drafter,
        }
    }
}

/// Arguments of `mulo eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model family directory with family.json (default: the bundled emoji family).
    #[arg(long, env = "MULO_FAMILY", value_name = "DIR")]
    pub family: Option<PathBuf>,
    /// Methods to evaluate, comma-separated, in one run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ar")]
    pub method: Vec<EvalMethod>,
    /// Prompt list: TSV with the header prompt<TAB>category<TAB>subcategory (default: the
    /// committed prompts/emoji-eval.tsv).
    #[arg(long, value_name = "FILE.tsv")]
    pub prompts: Option<PathBuf>,
    /// Images per method (prompts are used in order, wrapping around).
    #[arg(long, default_value_t = 256)]
    pub n: usize,
    /// Report to write.
    #[arg(long, default_value = "eval.json", value_name = "OUT.json")]
    pub json: PathBuf,
    /// Seed of image i is seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data directory from `mulo data emoji`: all its images (at the method's resolution) are the
    /// real set of FID-emoji (default ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Also write a PNG grid: generated images (odd rows) above real images of the same prompts.
    #[arg(long, value_name = "FILE.png")]
    pub grid: Option<PathBuf>,
    /// Columns of the grid (it shows 2 x columns prompts of the first method).
    #[arg(long, default_value_t = 8)]
    pub grid_columns: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The committed prompt list (from the working directory, else from the source tree).
pub fn default_prompts() -> PathBuf {
    let local = PathBuf::from("prompts/emoji-eval.tsv");
    if local.is_file() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts/emoji-eval.tsv")
}

struct State {
    device: Device,
    family: Family,
    evaluator: Evaluator,
    vq: VqModel,
    data: EmojiTensors,
}

/// Runs `mulo eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    a.sampling.check()?;
    if a.n < 2 {
        bail!(
            "invalid --n: FID-emoji needs at least 2 images, got {}",
            a.n
        );
    }
    if a.grid_columns == 0 {
        bail!("invalid --grid-columns: must be at least 1");
    }
    let family_dir = a.family.clone().unwrap_or_else(default_family_dir);
    let family = Family::load(&family_dir)?;
    if !family.has(Member::Evaluator) {
        bail!(
            "no evaluator in family {}: `mulo eval` scores with one (add it with `mulo family new --evaluator DIR`; `mulo bench` still measures speed)",
            family_dir.display()
        );
    }
    let prompts_path = a.prompts.clone().unwrap_or_else(default_prompts);
    let rows = read_prompts(&prompts_path)?;
    let data_dir = a
        .data
        .clone()
        .unwrap_or_else(|| cache_root().join("data/emoji"));
    let runtime = a.runtime.clone();
    let fam = family.clone();
    let worker = TorchWorker::spawn("torch", move || -> Result<State> {
        let device = runtime.setup()?;
        let evaluator = Evaluator::load(&fam.path(Member::Evaluator)?, device)?;
        let (vq, _) = VqModel::load(&fam.path(Member::Vq)?, device, runtime.dtype_for(device))?;
        let data = EmojiTensors::load(&data_dir).with_context(|| {
            format!(
                "loading the real images (build them with `mulo data emoji`): {}",
                data_dir.display()
            )
        })?;
        Ok(State {
            device,
            family: fam,
            evaluator,
            vq,
            data,
        })
    })?;
    let labels = {
        let rows = rows.clone();
        worker.run(move |s: &mut State| label_ids(&s.evaluator, &rows))??
    };
    let mut report = EvalReport {
        command: Some(crate::common::command_line()),
        ..Default::default()
    };
    let mut grid_images: Option<Tensor> = None;
    for &method in &a.method {
        let (result, images) = eval_method(&worker, &a, method, &rows, &labels)?;
        println!(
            "{}: {} images at {} px, FID-emoji {:.2}, adherence category {:.1}%, subcategory {:.1}% ({:.1} s, median {:.2} s/image)",
            result.method,
            result.n,
            result.image_size,
            result.fid_emoji,
            result.adherence_category * 100.0,
            result.adherence_subcategory * 100.0,
            result.seconds,
            result.median_image_seconds
        );
        if let (Some(nll), Some(pooled)) = (result.target_nll, result.target_pooled_nll) {
            println!(
                "{}: the target's NLL per token of these images {nll:.3} nats, pooled {pooled:.3}",
                result.method
            );
        }
        print_ceiling(&result);
        report.methods.push(result);
        if grid_images.is_none() {
            grid_images = Some(images);
        }
    }
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.json, text + "\n").with_context(|| format!("{}", a.json.display()))?;
    if let (Some(path), Some(images)) = (&a.grid, grid_images) {
        let rows = rows.clone();
        let cols = a.grid_columns;
        let png = worker.run(move |s: &mut State| grid_png(s, &images, &rows, cols))??;
        std::fs::write(path, png).with_context(|| format!("{}", path.display()))?;
        println!("wrote {}", path.display());
    }
    println!("wrote {}", a.json.display());
    Ok(())
}

/// Prints the adherence of the prompts' real images and that of the trained and held-out prompts.
fn print_ceiling(r: &MethodResult) {
    let split = |k: &str| {
        r.adherence_by_split.get(k).map_or("-".to_string(), |a| {
            format!("{:.1}% of {}", a.adherence * 100.0, a.n)
        })
    };
    if let Some(real) = &r.real_adherence {
        println!(
            "{}: adherence on trained emoji {}, held-out {}; the prompts' own real images {:.1}% of {} (the evaluator's ceiling)",
            r.method,
            split("train"),
            split("heldout"),
            real.adherence_category * 100.0,
            real.n
        );
    }
}

/// Generates `a.n` images with `method`, scores them and returns the result and the images.
fn eval_method(
    worker: &TorchWorker<State>,
    a: &EvalArgs,
    method: EvalMethod,
    rows: &[PromptRow],
    labels: &[(i64, i64)],
) -> Result<(MethodResult, Tensor)> {
    let member = method.member();
    let runtime = a.runtime.clone();
    let (dir, params, size, tokens_per_image) = {
        let sampling = a.sampling.clone();
        worker.run(move |s: &mut State| -> Result<_> {
            let dir = s.family.path(member)?;
            let cfg = mulo_model::ModelConfig::load_gpt(&dir)?;
            let params = sampling.resolve(cfg.default_sampling())?;
            let f = s.vq.config().downsample_factor() as usize;
            Ok((dir, params, cfg.grid.rows * f, cfg.grid.len()))
        })??
    };
    let bar = ProgressBar::new(a.n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{} {{bar:40}} {{pos}}/{{len}} images  eta {{eta}}",
            method.name()
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let n = a.n;
    let seed = a.seed;
    let pb = bar.clone();
    let prompts: Vec<String> = (0..a.n)
        .map(|i| rows[i % rows.len()].prompt.clone())
        .collect();
    let with_t5 = worker.run(|s: &mut State| s.family.has(Member::TextEncoder))?;
    let conds = if with_t5 {
        encode_with_t5(worker, prompts, &a.runtime)?
    } else {
        tokenize_prompts(&dir, &prompts, method.name())?
    };
    let conds_for_nll = conds.clone();
    let started = Instant::now();
    let (images, times, grids, gpt_dir) = worker.run(move |s: &mut State| -> Result<_> {
        let (gpt, _) = Gpt::load(&dir, s.device, runtime.dtype_for(s.device))?;
        let g = gpt.config().grid;
        let mut images = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut grids = Vec::with_capacity(n);
        for (i, cond) in conds.iter().enumerate() {
            let t0 = Instant::now();
            let gen = generate_ar(&gpt, cond, &params, seed + i as u64, &mut |_, _| {})?;
            let t = Tensor::from_slice(&gen.tokens)
                .view([1, g.rows as i64, g.cols as i64])
                .to_device(s.device);
            images.push(s.vq.decode(&t)?.clamp(-1.0, 1.0));
            times.push(t0.elapsed().as_secs_f64());
            grids.push(gen.tokens);
            pb.set_position(i as u64 + 1);
        }
        Ok((Tensor::cat(&images, 0), times, grids, dir))
    })??;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let nlls = if member == Member::Target {
        let runtime = a.runtime.clone();
        worker.run(move |s: &mut State| -> Result<Vec<TargetNll>> {
            let (gpt, _) = Gpt::load(&gpt_dir, s.device, runtime.dtype_for(s.device))?;
            let cfg = gpt.config();
            let pools = pool_table(&s.vq.codes(), MuloParams::default().pool_k)?;
            grids
                .into_iter()
                .zip(&conds_for_nll)
                .map(|(tokens, cond)| {
                    let grid = TokenGrid::new(cfg.grid, tokens, cfg.vocab_size as usize)?;
                    Ok(target_nll(&gpt, cond, &grid, &params, &pools)?)
                })
                .collect()
        })??
    } else {
        Vec::new()
    };
    let mean = |f: fn(&TargetNll) -> f64| {
        (!nlls.is_empty()).then(|| nlls.iter().map(f).sum::<f64>() / nlls.len() as f64)
    };
    let prompts = prompts_of(rows, n);
    let Scored {
        fid,
        cat,
        sub,
        real,
        names,
        splits,
        named,
    } = worker.run({
        let images = images.shallow_clone();
        let prompts = prompts.clone();
        move |s: &mut State| -> Result<Scored> {
            let gen = score_images(&s.evaluator, &images)?;
            let all: Vec<i64> = (0..s.data.meta.items.len() as i64).collect();
            let real = s.data.batch(size, &all, s.device);
            let real_scores = score_images(&s.evaluator, &real)?;
            let (splits, named) = named_images(s, &prompts, &real_scores.category);
            Ok(Scored {
                fid: frechet_distance(&gen.features, &real_scores.features)?,
                cat: gen.category,
                sub: gen.subcategory,
                real: all.len(),
                names: s.evaluator.config().category_names.clone(),
                splits,
                named,
            })
        }
    })??;
    let want_cat: Vec<i64> = (0..n).map(|i| labels[i % labels.len()].0).collect();
    let want_sub: Vec<i64> = (0..n).map(|i| labels[i % labels.len()].1).collect();
    let real_adherence = real_adherence(&named, &want_cat, &names);
    let result = MethodResult {
        method: method.name().into(),
        params: serde_json::json!({
            "cfg": params.cfg_scale, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "seed": a.seed, "tokens_per_image": tokens_per_image,
        }),
        n,
        fid_emoji: fid,
        adherence_category: agreement(&cat, &want_cat),
        adherence_subcategory: agreement(&sub, &want_sub),
        adherence_by_category: agreement_by_label(&cat, &want_cat, &names),
        adherence_by_prompt: agreement_by_key(&cat, &want_cat, &prompts),
        adherence_by_split: agreement_by_key(&cat, &want_cat, &splits),
        real_adherence,
        image_size: size,
        real_images: real,
        target_nll: mean(|t| t.nll),
        target_pooled_nll: mean(|t| t.pooled_nll),
        seconds,
        median_image_seconds: median(&times),
    };
    Ok((result, images))
}

/// What the evaluator made of a method's images: FID-emoji, predicted category and subcategory
/// ids, the number of real images, the category names, the split of each image's prompt, and the
/// evaluator's category for the real image each prompt names (`None`: not an emoji name).
struct Scored {
    fid: f64,
    cat: Vec<i64>,
    sub: Vec<i64>,
    real: usize,
    names: Vec<String>,
    splits: Vec<String>,
    named: Vec<Option<i64>>,
}

/// For each prompt: the split of the emoji it names (`train`, `heldout`, or `other` when it names
/// none) and the evaluator's category of that emoji's real image (`real_category` is indexed by
/// data row).
fn named_images(
    s: &State,
    prompts: &[String],
    real_category: &[i64],
) -> (Vec<String>, Vec<Option<i64>>) {
    prompts
        .iter()
        .map(|p| match s.data.meta.named(p) {
            Some(it) => {
                let split = match it.split {
                    Split::Train => "train",
                    Split::Heldout => "heldout",
                };
                (split.to_string(), real_category.get(it.index).copied())
            }
            None => ("other".to_string(), None),
        })
        .unzip()
}

/// Category adherence of the real images the prompts name (`None` when no prompt names one).
fn real_adherence(
    named: &[Option<i64>],
    want_cat: &[i64],
    names: &[String],
) -> Option<RealAdherence> {
    let (got, want): (Vec<i64>, Vec<i64>) = named
        .iter()
        .zip(want_cat)
        .filter_map(|(g, w)| g.map(|g| (g, *w)))
        .unzip();
    (!got.is_empty()).then(|| RealAdherence {
        n: got.len(),
        adherence_category: agreement(&got, &want),
        adherence_by_category: agreement_by_label(&got, &want, names),
    })
}

/// A grid PNG: rows of generated images, each followed by a row of real images of the same
/// prompts (the image whose name matches the prompt, else one of the same subcategory).
fn grid_png(s: &mut State, images: &Tensor, rows: &[PromptRow], cols: usize) -> Result<Vec<u8>> {
    let n = (images.size()[0] as usize).min(2 * cols);
    let find_real = |row: &PromptRow| -> Option<i64> {
        let meta = &s.data.meta;
        meta.named(&row.prompt)
            .or_else(|| {
                meta.items
                    .iter()
                    .find(|it| it.subcategory == row.subcategory)
            })
            .map(|it| it.index as i64)
    };
    let blank = Tensor::ones([3, 64, 64], (tch::Kind::Float, s.device));
    let to64 = |t: Tensor| -> Tensor {
        if t.size()[2] == 64 {
            t
        } else {
            t.unsqueeze(0)
                .upsample_nearest2d([64, 64], None, None)
                .squeeze_dim(0)
        }
    };
    let mut grid_rows = Vec::new();
    for start in (0..n).step_by(cols) {
        let mut gen_row = Vec::new();
        let mut real_row = Vec::new();
        for i in start..start + cols {
            if i < n {
                gen_row.push(to64(images.get(i as i64)));
                let real = match find_real(&rows[i % rows.len()]) {
                    Some(r) => to64(s.data.batch(64, &[r], s.device).get(0)),
                    None => blank.shallow_clone(),
                };
                real_row.push(real);
            } else {
                gen_row.push(blank.shallow_clone());
                real_row.push(blank.shallow_clone());
            }
        }
        grid_rows.push(Tensor::cat(&gen_row, 2));
        grid_rows.push(Tensor::cat(&real_row, 2));
    }
    Ok(image_io::png_bytes(&Tensor::cat(&grid_rows, 1))?)
}

/// Caption features of `prompts` from the family's T5 text encoder, in chunks, on the torch thread.
fn encode_with_t5(
    worker: &TorchWorker<State>,
    prompts: Vec<String>,
    runtime: &RuntimeArgs,
) -> Result<Vec<mulo_core::Condition>> {
    let runtime = runtime.clone();
    worker.run(move |s: &mut State| -> Result<Vec<mulo_core::Condition>> {
        let dir = s.family.path(Member::TextEncoder)?;
        let (enc, _) = TextEncoder::load(&dir, s.device, runtime.dtype_for(s.device))?;
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(16) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            out.extend(tch::no_grad(|| enc.encode(&refs))?);
        }
        Ok(out)
    })?
}

/// Word ids of `prompts` through the caption tokenizer of the model in `dir`, warning once about
/// words it does not know.
fn tokenize_prompts(
    dir: &Path,
    prompts: &[String],
    model: &str,
) -> Result<Vec<mulo_core::Condition>> {
    let tokenizer = mulo_engine::prompt::load_tokenizer(dir)?.with_context(|| {
        format!(
            "{} has no caption tokenizer (tokenizer.json): it cannot take prompts",
            dir.display()
        )
    })?;
    let mut unknown = std::collections::BTreeSet::new();
    let conds: Vec<_> = prompts
        .iter()
        .map(|p| {
            let p = mulo_core::Condition::Prompt(p.clone());
            let (cond, unk, _) = mulo_engine::prompt::tokenize_prompt(&tokenizer, p);
            unknown.extend(unk);
            cond
        })
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} distinct prompt word(s) are not in the {model} caption vocabulary (mapped to <unk>)",
            unknown.len(),
        );
    }
    Ok(conds)
}
