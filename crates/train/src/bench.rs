//! The benchmark's library (`mulo bench`): every chosen method over one prompt list, interleaved
//! image by image (AR always included as the reference), in process and optionally through the
//! services, then quality scored and one report row per method. The command line only parses
//! flags, starts the services, shows progress and prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mulo_core::{Condition, Method, MuloParams, SamplingParams};
use mulo_engine::{
    generate, DrafterRole, Engine, Family, GenerateRequest, Local, Member, MethodStats, Outcome,
    TorchWorker,
};
use mulo_model::evaluator::Evaluator;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::eval::{
    agreement, agreement_by_key, agreement_by_label, frechet_distance, label_ids, median,
    prompts_of, score_images, LabelAdherence, PromptRow,
};
use crate::trainers::EmojiTensors;
use crate::TrainError;

/// Pool size of `target_pooled_nll`: fixed (the defaults' `pool_k` until issue 19 moved it to
/// 128), so that the metric means the same in every run whatever the defaults are.
pub const QUALITY_POOL_K: usize = 256;

/// One method's row of the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchRow {
    /// Method name.
    pub method: String,
    /// `embedded` (every role in this process) or `distributed` (through the services).
    pub mode: String,
    /// Distributed rows: median latency over the same method's embedded median.
    pub latency_vs_embedded: Option<f64>,
    /// Distributed rows: bytes per image between the gateway and the roles (encoded messages,
    /// image decoding included) plus this client's request and response.
    pub wire_bytes_per_image: Option<f64>,
    /// Distributed pipelined `mulo` rows: the median latency of the same method with
    /// `pipeline=0` through the gateway over this row's.
    pub pipelining_gain: Option<f64>,
    /// Its parameters.
    pub params: BTreeMap<String, String>,
    /// The full spec (`mulo:tau=…`).
    pub spec: String,
    /// Images measured.
    pub n: usize,
    /// Median seconds per image (generation; VQ decoding excluded).
    pub latency_median_s: f64,
    /// 90th percentile seconds per image.
    pub latency_p90_s: f64,
    /// AR's median latency over this method's.
    pub speedup_vs_ar: f64,
    /// Target forward passes per image (prefill included).
    pub target_passes_per_image: f64,
    /// Drafter (or small draft model) forward passes per image.
    pub drafter_passes_per_image: f64,
    /// Tokens committed per target pass.
    pub tokens_per_target_pass: f64,
    /// Accepted share of the proposals.
    pub acceptance_rate: f64,
    /// Share of the image's tokens resampled by the target.
    pub resampled_fraction: f64,
    /// Largest island over the run.
    pub largest_island: usize,
    /// Images that fell back to AR.
    pub fallbacks: usize,
    /// FID-emoji against the real images (null with --no-quality).
    pub fid_emoji: Option<f64>,
    /// Category adherence (the issue's `adherence`).
    pub adherence: Option<f64>,
    /// Category adherence.
    pub adherence_category: Option<f64>,
    /// Subcategory adherence.
    pub adherence_subcategory: Option<f64>,
    /// Category adherence of the prompts of each expected category.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adherence_by_category: BTreeMap<String, LabelAdherence>,
    /// Category adherence of each prompt's images.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adherence_by_prompt: BTreeMap<String, LabelAdherence>,
    /// The target's mean NLL per token of this method's outputs (teacher-forced, the run's CFG
    /// and temperature, no top-k / top-p): SD equals AR's within noise, lossy methods are higher.
    pub target_nll: Option<f64>,
    /// Standard error of `target_nll` over the images.
    pub target_nll_se: Option<f64>,
    /// The target's mean pooled NLL per token: `-log` of its mass on the token's pool of its
    /// [`QUALITY_POOL_K`] nearest codes (a near miss inside the pool costs little).
    pub target_pooled_nll: Option<f64>,
    /// Fréchet distance of the evaluator features of this method's images to AR's images.
    pub fd_to_ar: Option<f64>,
    /// Fréchet distance between AR's images and a second AR set with other seeds: the noise
    /// floor of `fd_to_ar`.
    pub fd_ar_floor: Option<f64>,
    /// Median compute seconds per stage.
    pub stages_median_s: BTreeMap<String, f64>,
}

/// The report: `{"methods": [...]}` plus the run's settings.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The command that produced it.
    pub command: String,
    /// Sampling parameters of every method.
    pub sampling: SamplingParams,
    /// Device and threads.
    pub machine: String,
    /// One row per method.
    pub methods: Vec<BenchRow>,
}

/// One measured configuration: a method, in process or through the services.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    /// The method and its parameters.
    pub method: Method,
    /// Through the gateway (`true`) or in this process.
    pub remote: bool,
}

/// Generates through the services (the gateway): the outcome, with its latency measured by the
/// caller so that it includes the hops, and the bytes on the wire for the image.
pub trait RemoteGenerate {
    /// One generation; errors are reported as text (they come from another process).
    fn generate(&mut self, req: &GenerateRequest) -> Result<(Outcome, u64), String>;
}

/// What a run measures: the prompts, how many images, and the sampling of every method.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// The prompt list (measured image `j` uses row `j`, wrapping).
    pub prompts: Vec<PromptRow>,
    /// Images measured per variant.
    pub n: usize,
    /// Untimed warm-up images per variant, before the measured ones.
    pub warmup: usize,
    /// Seed of measured image `j` is `seed + j` (the same for every method).
    pub seed: u64,
    /// Sampling parameters of every method.
    pub sampling: SamplingParams,
}

/// The raw measurements, indexed like the variants.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Per variant, the stats of each measured image.
    pub stats: Vec<Vec<MethodStats>>,
    /// Per variant, the token grid of each measured image.
    pub tokens: Vec<Vec<Vec<i64>>>,
    /// Per variant, the bytes on the wire over all measured images.
    pub wire: Vec<u64>,
}

/// The quality of one variant: against the real images (FID-emoji, adherence) and relative to
/// the target (its NLL of the outputs, Fréchet distance to AR's own samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Quality {
    /// FID-emoji against the real images.
    pub fid: f64,
    /// Category adherence.
    pub category: f64,
    /// Subcategory adherence.
    pub subcategory: f64,
    /// Category adherence by expected category.
    pub by_category: BTreeMap<String, LabelAdherence>,
    /// Category adherence by prompt.
    pub by_prompt: BTreeMap<String, LabelAdherence>,
    /// The target's mean NLL per token of the outputs (teacher-forced, the run's CFG and
    /// temperature, no truncation).
    pub target_nll: f64,
    /// Standard error of `target_nll` over the images.
    pub target_nll_se: f64,
    /// The same with each token's pool of [`QUALITY_POOL_K`] nearest codes.
    pub target_pooled_nll: f64,
    /// Fréchet distance of the evaluator features to AR's samples.
    pub fd_to_ar: f64,
    /// Fréchet distance between AR's samples and a second AR set with other seeds (the noise
    /// floor of `fd_to_ar`).
    pub fd_ar_floor: f64,
}

/// Seeds of the second AR set (the floor of `fd_to_ar`) start this far from the run's.
pub const FLOOR_SEED_OFFSET: u64 = 1_000_003;

/// The prompt row of the `i`-th generation of a run whose first `warmup` ones are untimed:
/// measured image `j` uses row `j` (wrapping) and seed `seed + j`, as `mulo eval` does, so its
/// quality is scored against that row's labels; the warm-up reuses the first rows.
pub fn prompt_index(i: usize, warmup: usize, rows: usize) -> usize {
    i.checked_sub(warmup).unwrap_or(i) % rows.max(1)
}

/// The `pipeline=0` twin of every pipelined `mulo` method that is not in the list already: with
/// `--distributed` they run through the gateway only, for the gain from pipelining.
pub fn unpipelined(methods: &[Method]) -> Vec<Method> {
    let mut out: Vec<Method> = Vec::new();
    for m in methods {
        if let Method::Mulo(p) = m {
            if p.pipeline {
                let off = Method::Mulo(MuloParams {
                    pipeline: false,
                    ..*p
                });
                if !methods.contains(&off) && !out.contains(&off) {
                    out.push(off);
                }
            }
        }
    }
    out
}

/// Every method in process, and with `distributed` through the services too (plus the
/// unpipelined twins of pipelined `mulo` methods, through the services only).
pub fn variants(methods: &[Method], distributed: bool) -> Vec<Variant> {
    let local = methods.iter().map(|m| Variant {
        method: *m,
        remote: false,
    });
    let remote = methods
        .iter()
        .copied()
        .chain(unpipelined(methods))
        .filter(|_| distributed)
        .map(|method| Variant {
            method,
            remote: true,
        });
    local.chain(remote).collect()
}

/// The methods of a run: AR first, then the given ones (default set when none), then the sweep.
pub fn method_list(given: &[Method], sweep: Option<&str>) -> Result<Vec<Method>, TrainError> {
    let invalid = |e: String| TrainError::Eval(format!("invalid --sweep: {e}"));
    let mut out = vec![Method::Ar];
    let given: Vec<Method> = if given.is_empty() {
        ["sd", "lantern", "mulo"]
            .iter()
            .map(|n| Method::default_for(n))
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(e.to_string()))?
    } else {
        given.to_vec()
    };
    for m in given {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    let Some(sweep) = sweep else {
        return Ok(out);
    };
    let (key, values) = sweep.split_once('=').ok_or_else(|| {
        TrainError::Eval(format!("invalid --sweep '{sweep}': expected KEY=V1,V2,..."))
    })?;
    let base = match out.iter().find(|m| matches!(m, Method::Mulo(_))) {
        Some(m) => *m,
        None => Method::default_for("mulo").map_err(|e| invalid(e.to_string()))?,
    };
    for v in values.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        let mut m = base;
        m.set(key.trim(), v).map_err(|e| invalid(e.to_string()))?;
        m.validate().map_err(|e| invalid(e.to_string()))?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// The `q` quantile of `v` (nearest rank; 0 when empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Generates every image of the run, interleaved: image `i` with every variant before image
/// `i + 1`, so that drifts of the machine touch every method alike; warm-up images (untimed)
/// come first. `progress` is called after each image.
pub fn measure(
    settings: &BenchSettings,
    variants: &[Variant],
    local: &Local,
    with_drafter: bool,
    mut remote: Option<&mut dyn RemoteGenerate>,
    rt: &tokio::runtime::Runtime,
    progress: &mut dyn FnMut(),
) -> Result<Measured, TrainError> {
    let rows = &settings.prompts;
    let mut out = Measured {
        stats: vec![Vec::new(); variants.len()],
        tokens: vec![Vec::new(); variants.len()],
        wire: vec![0; variants.len()],
    };
    for i in 0..settings.n + settings.warmup {
        let image = i.checked_sub(settings.warmup);
        let row = prompt_index(i, settings.warmup, rows.len());
        let cond = Condition::Prompt(rows[row].prompt.clone());
        for (vi, v) in variants.iter().enumerate() {
            let req = GenerateRequest {
                id: format!("bench-{i}-{vi}"),
                condition: cond.clone(),
                sampling: settings.sampling,
                seed: settings.seed + image.unwrap_or(i) as u64,
                method: v.method,
            };
            let line = i % rows.len() + 2;
            let (outcome, bytes) = match (&mut remote, v.remote) {
                (Some(gw), true) => gw.generate(&req).map_err(|e| {
                    TrainError::Eval(format!(
                        "{} through the gateway on prompt {line}: {e}",
                        v.method
                    ))
                })?,
                _ => {
                    let drafter: Option<&dyn DrafterRole> = with_drafter.then_some(local);
                    let outcome = rt
                        .block_on(generate(drafter, local, &req, &mut |_| {}))
                        .map_err(|e| {
                            TrainError::Eval(format!("{} on prompt {line}: {e}", v.method))
                        })?;
                    (outcome, 0)
                }
            };
            if image.is_some() {
                out.stats[vi].push(outcome.stats);
                out.tokens[vi].push(outcome.tokens);
                out.wire[vi] += bytes;
            }
            progress();
        }
    }
    Ok(out)
}

/// AR over the run's prompts again with seeds `seed + FLOOR_SEED_OFFSET + j` (untimed): the
/// second sample set of `fd_ar_floor`. `progress` is called after each image.
pub fn ar_floor(
    settings: &BenchSettings,
    local: &Local,
    rt: &tokio::runtime::Runtime,
    progress: &mut dyn FnMut(),
) -> Result<Vec<Vec<i64>>, TrainError> {
    let rows = &settings.prompts;
    (0..settings.n)
        .map(|j| {
            let req = GenerateRequest {
                id: format!("bench-floor-{j}"),
                condition: Condition::Prompt(rows[j % rows.len()].prompt.clone()),
                sampling: settings.sampling,
                seed: settings.seed + FLOOR_SEED_OFFSET + j as u64,
                method: Method::Ar,
            };
            let out = rt
                .block_on(generate(None, local, &req, &mut |_| {}))
                .map_err(|e| TrainError::Eval(format!("AR floor image {j}: {e}")))?;
            progress();
            Ok(out.tokens)
        })
        .collect()
}

/// The evaluator and the features of the real images, held on the torch thread.
struct Reference {
    evaluator: Evaluator,
    real: Tensor,
}

/// Evaluator scores and the target's NLL of one set of grids.
struct Scored {
    features: Tensor,
    category: Vec<i64>,
    subcategory: Vec<i64>,
    nll: Vec<f64>,
    pooled_nll: Vec<f64>,
}

/// Decodes `grids` (image `j` of prompt row `j`), scores them with the evaluator and under the
/// target.
fn score_set(
    worker: &Arc<TorchWorker<Engine>>,
    reference: &Arc<std::sync::Mutex<Reference>>,
    settings: &BenchSettings,
    grids: Vec<Vec<i64>>,
) -> Result<Scored, TrainError> {
    let reference = reference.clone();
    let params = settings.sampling;
    let prompts: Vec<String> = (0..grids.len())
        .map(|j| settings.prompts[j % settings.prompts.len()].prompt.clone())
        .collect();
    worker.run(move |e: &mut Engine| {
        let images: Vec<Tensor> = grids
            .iter()
            .map(|g| e.decode_tensor(g))
            .collect::<Result<_, _>>()?;
        let r = reference
            .lock()
            .map_err(|_| TrainError::Eval("evaluator state poisoned".into()))?;
        let s = score_images(&r.evaluator, &Tensor::cat(&images, 0))?;
        let v = e
            .verifier
            .as_mut()
            .ok_or_else(|| TrainError::Eval("the bench needs the verifier role".into()))?;
        let pool_k = QUALITY_POOL_K;
        let mut nll = Vec::new();
        let mut pooled_nll = Vec::new();
        for (g, p) in grids.iter().zip(&prompts) {
            let t = v.score_target(&Condition::Prompt(p.clone()), g, &params, pool_k)?;
            nll.push(t.nll);
            pooled_nll.push(t.pooled_nll);
        }
        Ok::<_, TrainError>(Scored {
            features: s.features,
            category: s.category,
            subcategory: s.subcategory,
            nll,
            pooled_nll,
        })
    })?
}

/// Loads the evaluator, the prompts' labels and the real images' features on the torch thread.
fn reference(
    settings: &BenchSettings,
    family: &Family,
    worker: &Arc<TorchWorker<Engine>>,
    data_dir: PathBuf,
) -> Result<(Reference, Vec<(i64, i64)>), TrainError> {
    let target_cfg = mulo_model::ModelConfig::load_gpt(&family.path(Member::Target)?)?;
    let ev_dir = family.path(Member::Evaluator)?;
    let side = (target_cfg.grid.rows as i64)
        * worker
            .run(|e: &mut Engine| e.vq.as_ref().map_or(1, |v| v.config().downsample_factor()))?;
    let prompts = settings.prompts.clone();
    worker.run(move |e: &mut Engine| {
        let device = e
            .vq
            .as_ref()
            .map_or(tch::Device::Cpu, |v| v.var_store().device());
        let evaluator = Evaluator::load(&ev_dir, device)?;
        let labels = label_ids(&evaluator, &prompts)?;
        let data = EmojiTensors::load(&data_dir).map_err(|e| {
            TrainError::Eval(format!(
                "loading the real images (build them with `mulo data emoji`, or pass --no-quality): {}: {e}",
                data_dir.display()
            ))
        })?;
        let all: Vec<i64> = (0..data.meta.items.len() as i64).collect();
        let real = score_images(&evaluator, &data.batch(side as usize, &all, device))?;
        Ok::<_, TrainError>((
            Reference {
                evaluator,
                real: real.features,
            },
            labels,
        ))
    })?
}

/// Mean and standard error of the mean.
pub fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// The quality of every variant: FID-emoji and adherence against the real images of `data_dir`
/// (from `mulo data emoji`), the target's NLL of the outputs, and the Fréchet distance to AR's
/// samples (the first variant) next to the floor from `floor` (a second AR set, [`ar_floor`]).
pub fn quality(
    settings: &BenchSettings,
    measured: &Measured,
    floor: Vec<Vec<i64>>,
    family: &Family,
    worker: &Arc<TorchWorker<Engine>>,
    data_dir: PathBuf,
) -> Result<Vec<Quality>, TrainError> {
    let (reference, labels) = reference(settings, family, worker, data_dir)?;
    let reference = Arc::new(std::sync::Mutex::new(reference));
    let want = |f: fn(&(i64, i64)) -> i64| -> Vec<i64> {
        (0..settings.n)
            .map(|i| f(&labels[i % labels.len()]))
            .collect()
    };
    let (want_cat, want_sub) = (want(|l| l.0), want(|l| l.1));
    let sets: Vec<Scored> = measured
        .tokens
        .iter()
        .map(|grids| score_set(worker, &reference, settings, grids.clone()))
        .collect::<Result<_, _>>()?;
    let floor = score_set(worker, &reference, settings, floor)?;
    let r = reference
        .lock()
        .map_err(|_| TrainError::Eval("evaluator state poisoned".into()))?;
    let ar = &sets
        .first()
        .ok_or_else(|| TrainError::Eval("no variants".into()))?
        .features;
    let fd_ar_floor = frechet_distance(&floor.features, ar)?;
    let names = &r.evaluator.config().category_names;
    let prompts = prompts_of(&settings.prompts, settings.n);
    sets.iter()
        .map(|s| {
            let (target_nll, target_nll_se) = mean_se(&s.nll);
            Ok(Quality {
                fid: frechet_distance(&s.features, &r.real)?,
                category: agreement(&s.category, &want_cat),
                subcategory: agreement(&s.subcategory, &want_sub),
                by_category: agreement_by_label(&s.category, &want_cat, names),
                by_prompt: agreement_by_key(&s.category, &want_cat, &prompts),
                target_nll,
                target_nll_se,
                target_pooled_nll: mean_se(&s.pooled_nll).0,
                fd_to_ar: frechet_distance(&s.features, ar)?,
                fd_ar_floor,
            })
        })
        .collect()
}

/// Median latency of a variant's images.
fn median_latency(stats: &[MethodStats]) -> f64 {
    median(&stats.iter().map(|s| s.seconds).collect::<Vec<_>>())
}

/// Median compute seconds per stage over a variant's images (0 where an image lacks the stage).
fn stage_medians(st: &[MethodStats]) -> BTreeMap<String, f64> {
    let mut names: Vec<String> = st.iter().flat_map(|s| s.stages.keys().cloned()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|k| {
            let v: Vec<f64> = st
                .iter()
                .map(|s| s.stages.get(&k).copied().unwrap_or(0.0))
                .collect();
            (k, median(&v))
        })
        .collect()
}

/// Through the gateway: the same method's embedded median latency, and for a pipelined `mulo`
/// method the median of its `pipeline=0` twin (also through the gateway).
fn distributed_references(
    v: &Variant,
    variants: &[Variant],
    measured: &Measured,
) -> (Option<f64>, Option<f64>) {
    if !v.remote {
        return (None, None);
    }
    let find = |method: Method, remote: bool| {
        variants
            .iter()
            .position(|x| x.method == method && x.remote == remote)
            .map(|k| median_latency(&measured.stats[k]))
    };
    let embedded = find(v.method, false);
    let unpipelined = match v.method {
        Method::Mulo(p) if p.pipeline => find(
            Method::Mulo(MuloParams {
                pipeline: false,
                ..p
            }),
            true,
        ),
        _ => None,
    };
    (embedded, unpipelined)
}

/// One report row per variant; `quality` is empty when it was not measured. The first variant
/// must be AR (the reference of `speedup_vs_ar`).
pub fn report_rows(
    variants: &[Variant],
    measured: &Measured,
    quality: &[Quality],
) -> Vec<BenchRow> {
    let ar_median = measured.stats.first().map_or(0.0, |s| median_latency(s));
    let mut rows = Vec::new();
    for (vi, v) in variants.iter().enumerate() {
        let st = &measured.stats[vi];
        let n = st.len().max(1) as f64;
        let lat: Vec<f64> = st.iter().map(|s| s.seconds).collect();
        let tokens_total: usize = st.iter().map(|s| s.tokens).sum();
        let target: usize = st.iter().map(|s| s.target_passes).sum();
        let proposed: usize = st.iter().map(|s| s.proposed).sum();
        let accepted: usize = st.iter().map(|s| s.accepted).sum();
        let resampled: usize = st.iter().map(|s| s.resampled).sum();
        let med = median(&lat);
        let q = quality.get(vi);
        let (embedded, unpipelined) = distributed_references(v, variants, measured);
        let m = v.method;
        rows.push(BenchRow {
            pipelining_gain: unpipelined.filter(|_| med > 0.0).map(|off| off / med),
            method: m.name().to_string(),
            mode: if v.remote { "distributed" } else { "embedded" }.into(),
            latency_vs_embedded: embedded.filter(|e| *e > 0.0).map(|e| med / e),
            wire_bytes_per_image: v.remote.then(|| measured.wire[vi] as f64 / n),
            params: m
                .params()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            spec: if v.remote {
                format!("{m}@gateway")
            } else {
                m.to_string()
            },
            n: st.len(),
            latency_median_s: med,
            latency_p90_s: quantile(&lat, 0.9),
            speedup_vs_ar: if med > 0.0 { ar_median / med } else { 0.0 },
            target_passes_per_image: target as f64 / n,
            drafter_passes_per_image: st.iter().map(|s| s.drafter_passes).sum::<usize>() as f64 / n,
            tokens_per_target_pass: tokens_total as f64 / target.max(1) as f64,
            acceptance_rate: if proposed > 0 {
                accepted as f64 / proposed as f64
            } else {
                0.0
            },
            resampled_fraction: resampled as f64 / tokens_total.max(1) as f64,
            largest_island: st.iter().map(|s| s.largest_island).max().unwrap_or(0),
            fallbacks: st.iter().filter(|s| s.fallback.is_some()).count(),
            fid_emoji: q.map(|x| x.fid),
            adherence: q.map(|x| x.category),
            adherence_category: q.map(|x| x.category),
            adherence_subcategory: q.map(|x| x.subcategory),
            adherence_by_category: q.map(|x| x.by_category.clone()).unwrap_or_default(),
            adherence_by_prompt: q.map(|x| x.by_prompt.clone()).unwrap_or_default(),
            target_nll: q.map(|x| x.target_nll),
            target_nll_se: q.map(|x| x.target_nll_se),
            target_pooled_nll: q.map(|x| x.target_pooled_nll),
            fd_to_ar: q.map(|x| x.fd_to_ar),
            fd_ar_floor: q.map(|x| x.fd_ar_floor),
            stages_median_s: stage_medians(st),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_images_use_the_prompt_of_their_index() {
        // Two warm-up images, then image j = prompt j (the labels it is scored against).
        let got: Vec<usize> = (0..7).map(|i| prompt_index(i, 2, 4)).collect();
        assert_eq!(got, vec![0, 1, 0, 1, 2, 3, 0]);
        assert_eq!(prompt_index(0, 0, 1), 0);
    }

    #[test]
    fn method_lists_start_with_ar_and_add_the_sweep() {
        let l = method_list(&[], None).unwrap();
        let names: Vec<&str> = l.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["ar", "sd", "lantern", "mulo"]);
        let base = Method::parse("mulo:radius=2,tau=0.1").unwrap();
        // The sweep varies the first mulo method; a value equal to it adds nothing.
        let l = method_list(&[base], Some("tau=0.2, 0.3,0.1")).unwrap();
        assert_eq!(l.len(), 4, "{l:?}");
        assert_eq!(
            l[2].to_string(),
            Method::parse("mulo:radius=2,tau=0.2").unwrap().to_string()
        );
        assert!(method_list(&[], Some("tau=7")).is_err());
        assert!(method_list(&[], Some("tau")).is_err());
        assert!(method_list(&[], Some("gamma=3")).is_err());
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.9), 5.0);
    }

    #[test]
    fn pipelined_mulo_gets_its_unpipelined_twin_once() {
        let on = Method::parse("mulo:tau=0.1").unwrap();
        let off = Method::parse("mulo:tau=0.1,pipeline=0").unwrap();
        assert_eq!(unpipelined(&[Method::Ar, on, on]), vec![off]);
        assert!(unpipelined(&[on, off]).is_empty(), "already listed");
        assert!(unpipelined(&[Method::Ar, off]).is_empty());
    }

    #[test]
    fn variants_add_the_remote_runs_and_twins_only_when_distributed() {
        let on = Method::parse("mulo:tau=0.1").unwrap();
        let off = Method::parse("mulo:tau=0.1,pipeline=0").unwrap();
        let local = variants(&[Method::Ar, on], false);
        assert_eq!(local.len(), 2);
        assert!(local.iter().all(|v| !v.remote));
        let all = variants(&[Method::Ar, on], true);
        let remote: Vec<Method> = all.iter().filter(|v| v.remote).map(|v| v.method).collect();
        assert_eq!(remote, vec![Method::Ar, on, off]);
    }
}
