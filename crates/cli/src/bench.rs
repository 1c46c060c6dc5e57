//! `mulo bench`: every chosen method over one prompt list, interleaved image by image in one
//! process (AR always included as the reference), with speed and quality side by side.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mulo_core::{Condition, Method};
use mulo_engine::eval::{
    agreement, frechet_distance, label_ids, median, read_prompts, score_images,
};
use mulo_engine::train::EmojiTensors;
use mulo_engine::{
    default_family_dir, generate, Engine, Family, GenerateRequest, Local, Member, MethodStats,
    RoleSet, TorchWorker,
};
use mulo_model::evaluator::Evaluator;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::common::{cache_root, RuntimeArgs, SamplingArgs};

/// Arguments of `mulo bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model family directory with family.json (default: the bundled emoji family).
    #[arg(long, env = "MULO_FAMILY", value_name = "DIR")]
    pub family: Option<PathBuf>,
    /// A method to compare, `name:key=value,...` (repeat the flag; `ar` is always added):
    /// ar, sd:gamma=…, lantern:gamma=…,k=…,delta=…, mulo:tau=…,pool_k=…,radius=…,block_rows=…,
    /// zipar_window=…,rejection=local|raster,pipeline=1|0. Default: ar, sd, lantern and mulo at their defaults.
    #[arg(long = "method", value_name = "METHOD", value_parser = parse_method)]
    pub methods: Vec<Method>,
    /// Adds one `mulo` variant per value of a parameter, on top of the first `mulo` method (or
    /// its defaults), e.g. `tau=0.05,0.1,0.2`; the plot shows the sweep.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    pub sweep: Option<String>,
    /// Prompt list (TSV prompt<TAB>category<TAB>subcategory; default prompts/emoji-eval.tsv).
    #[arg(long, value_name = "FILE.tsv")]
    pub prompts: Option<PathBuf>,
    /// Images per method (prompts in order, wrapping around).
    #[arg(long, default_value_t = 32)]
    pub n: usize,
    /// Untimed warm-up images per method before the measured ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of image i is seed + i (the same for every method).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSON report to write.
    #[arg(long, default_value = "bench.json", value_name = "OUT.json")]
    pub json: PathBuf,
    /// Speed-vs-quality plot to write (PNG): speed-up against FID-emoji and adherence.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// Data directory from `mulo data emoji` (the real images of FID-emoji; default
    /// ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Skip FID-emoji and adherence (speed only; no evaluator or data needed).
    #[arg(long)]
    pub no_quality: bool,
    /// Also run every method through the three services as separate processes on loopback ports
    /// (mulo-drafter, mulo-verifier, mulo-gateway next to this executable; one torch thread per
    /// role, drafter and verifier pinned to different CPUs when `taskset` is there), interleaved
    /// with the in-process runs: rows `METHOD@gateway` with their latency against embedded mode
    /// and the bytes exchanged between gateway and roles per image. A pipelined `mulo` method
    /// also runs with `pipeline=0` through the gateway, for the gain from pipelining.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: do not pin the roles to CPUs.
    #[arg(long, requires = "distributed")]
    pub no_pin: bool,
    /// Run nothing: draw `--plot` from the JSON report of an earlier run.
    #[arg(long, value_name = "REPORT.json", requires = "plot")]
    pub replot: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The prompt row of the `i`-th generation of a run whose first `warmup` ones are untimed:
/// measured image `j` uses row `j` (wrapping) and seed `seed + j`, as `mulo eval` does, so its
/// quality is scored against that row's labels; the warm-up reuses the first rows.
fn prompt_index(i: usize, warmup: usize, rows: usize) -> usize {
    i.checked_sub(warmup).unwrap_or(i) % rows.max(1)
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::parse(s).map_err(|e| e.to_string())
}

/// The `pipeline=0` twin of every pipelined `mulo` method that is not in the list already: with
/// `--distributed` they run through the gateway only, for the gain from pipelining.
fn unpipelined(methods: &[Method]) -> Vec<Method> {
    let mut out: Vec<Method> = Vec::new();
    for m in methods {
        if let Method::Mulo(p) = m {
            if p.pipeline {
                let off = Method::Mulo(mulo_core::MuloParams {
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
    /// Median compute seconds per stage.
    pub stages_median_s: BTreeMap<String, f64>,
}

/// The report: `{"methods": [...]}` plus the run's settings.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The command that produced it.
    pub command: String,
    /// Sampling parameters of every method.
    pub sampling: mulo_core::SamplingParams,
    /// Device and threads.
    pub machine: String,
    /// One row per method.
    pub methods: Vec<BenchRow>,
}

/// The methods of a run: AR first, then the given ones (default set when none), then the sweep.
pub fn method_list(given: &[Method], sweep: Option<&str>) -> Result<Vec<Method>> {
    let mut out = vec![Method::Ar];
    let given: Vec<Method> = if given.is_empty() {
        ["sd", "lantern", "mulo"]
            .iter()
            .map(|n| Method::default_for(n))
            .collect::<Result<_, _>>()?
    } else {
        given.to_vec()
    };
    for m in given {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if let Some(sweep) = sweep {
        let (key, values) = sweep
            .split_once('=')
            .with_context(|| format!("invalid --sweep '{sweep}': expected KEY=V1,V2,..."))?;
        let base = out
            .iter()
            .find(|m| matches!(m, Method::Mulo(_)))
            .cloned()
            .unwrap_or(Method::default_for("mulo")?);
        for v in values.split(',').map(str::trim).filter(|v| !v.is_empty()) {
            let mut m = base;
            m.set(key.trim(), v)
                .map_err(|e| anyhow::anyhow!("invalid --sweep: {e}"))?;
            m.validate()
                .map_err(|e| anyhow::anyhow!("invalid --sweep: {e}"))?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i.min(s.len() - 1)]
}

struct Extra {
    evaluator: Option<Evaluator>,
    real: Option<Tensor>,
}

/// Runs `mulo bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if let (Some(report), Some(plot)) = (&a.replot, &a.plot) {
        #[derive(Deserialize)]
        struct Report {
            methods: Vec<BenchRow>,
        }
        let text = std::fs::read_to_string(report)
            .with_context(|| format!("reading {}", report.display()))?;
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a `mulo bench` report", report.display()))?;
        crate::plot::speed_quality(plot, &r.methods)?;
        println!("wrote {}", plot.display());
        return Ok(());
    }
    a.sampling.check()?;
    if a.n < 2 && !a.no_quality {
        bail!(
            "invalid --n: FID-emoji needs at least 2 images, got {}",
            a.n
        );
    }
    if a.n == 0 {
        bail!("invalid --n: must be at least 1");
    }
    let methods = method_list(&a.methods, a.sweep.as_deref())?;
    let family_dir = a.family.clone().unwrap_or_else(default_family_dir);
    let family = Family::load(&family_dir)?;
    let rows = read_prompts(
        &a.prompts
            .clone()
            .unwrap_or_else(crate::eval::default_prompts),
    )?;
    let target_dir = family.path(Member::Target)?;
    let target_cfg = mulo_model::ModelConfig::load_gpt(&target_dir)?;
    let params = a.sampling.resolve(target_cfg.default_sampling())?;
    let roles = RoleSet {
        drafter: methods.iter().any(|m| matches!(m, Method::Mulo(_))),
        verifier: true,
        draft_small: methods
            .iter()
            .any(|m| matches!(m, Method::Sd(_) | Method::Lantern(_))),
    };
    let runtime = a.runtime.clone();
    let fam = family.clone();
    let worker = Arc::new(TorchWorker::spawn("torch", move || -> Result<Engine> {
        let device = runtime.setup()?;
        Ok(Engine::load(
            &fam,
            roles,
            device,
            runtime.dtype_for(device),
            4,
        )?)
    })?);
    let machine = {
        let threads = a.runtime.threads;
        worker.run(move |e: &mut Engine| {
            let device =
                e.vq.as_ref()
                    .map(|v| format!("{:?}", v.var_store().device()))
                    .unwrap_or_default();
            format!(
                "device {device}, {} torch threads{}",
                tch::get_num_threads(),
                threads.map(|_| "").unwrap_or(" (default)")
            )
        })?
    };
    let local = Local::new(worker.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Every method in process, and with --distributed through the services too.
    let variants: Vec<(Method, bool)> = methods
        .iter()
        .map(|m| (*m, false))
        .chain(methods.iter().filter(|_| a.distributed).map(|m| (*m, true)))
        .chain(
            unpipelined(&methods)
                .into_iter()
                .filter(|_| a.distributed)
                .map(|m| (m, true)),
        )
        .collect();
    let cluster = if a.distributed {
        let threads = a.runtime.threads.unwrap_or(1);
        Some(rt.block_on(crate::cluster::Cluster::start(
            &family_dir,
            threads,
            !a.no_pin,
        ))?)
    } else {
        None
    };
    let mut gateway = match &cluster {
        Some(c) => {
            // The channel's connector needs the runtime.
            let _in_rt = rt.enter();
            Some(mulo_server::proto::gateway_client::GatewayClient::new(
                mulo_server::client::channel(&c.gateway)?,
            ))
        }
        None => None,
    };
    let machine = match &cluster {
        Some(c) => format!("{machine}; services: {}", c.placement),
        None => machine,
    };
    let mut wire: Vec<u64> = vec![0; variants.len()];
    let conds: Vec<Condition> = (0..a.n + a.warmup)
        .map(|i| Condition::Prompt(rows[prompt_index(i, a.warmup, rows.len())].prompt.clone()))
        .collect();
    let total = (a.n + a.warmup) * variants.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("bench {bar:40} {pos}/{len} images  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut stats: Vec<Vec<MethodStats>> = vec![Vec::new(); variants.len()];
    let mut tokens: Vec<Vec<Vec<i64>>> = vec![Vec::new(); variants.len()];
    // Interleaved: image i with every method before image i + 1, so that drifts of the machine
    // touch every method alike. Warm-up images (untimed) come first.
    for (i, cond) in conds.iter().enumerate() {
        let image = i.checked_sub(a.warmup);
        for (mi, (m, remote)) in variants.iter().enumerate() {
            let req = GenerateRequest {
                id: format!("bench-{i}-{mi}"),
                condition: cond.clone(),
                sampling: params,
                seed: a.seed + image.unwrap_or(i) as u64,
                method: *m,
            };
            let (out, bytes) = match (&mut gateway, remote) {
                (Some(gw), true) => rt.block_on(remote_generate(gw, &req)).with_context(|| {
                    format!("{m} through the gateway on prompt {}", i % rows.len() + 2)
                })?,
                _ => {
                    let drafter: Option<&dyn mulo_engine::DrafterRole> =
                        if roles.drafter { Some(&local) } else { None };
                    let out = rt
                        .block_on(generate(drafter, &local, &req, &mut |_| {}))
                        .with_context(|| format!("{m} on prompt {}", i % rows.len() + 2))?;
                    (out, 0)
                }
            };
            if image.is_some() {
                stats[mi].push(out.stats);
                tokens[mi].push(out.tokens);
                wire[mi] += bytes;
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    // Quality: decode every method's grids, score them against the real images.
    let quality: Vec<Option<(f64, f64, f64)>> = if a.no_quality {
        vec![None; variants.len()]
    } else {
        let data_dir = a
            .data
            .clone()
            .unwrap_or_else(|| cache_root().join("data/emoji"));
        let ev_dir = family.path(Member::Evaluator)?;
        let side = (target_cfg.grid.rows as i64)
            * worker.run(|e: &mut Engine| {
                e.vq.as_ref().map_or(1, |v| v.config().downsample_factor())
            })?;
        let labels = {
            let rows = rows.clone();
            let ev_dir = ev_dir.clone();
            worker.run(move |e: &mut Engine| -> Result<(Extra, Vec<(i64, i64)>)> {
                let device = e
                    .vq
                    .as_ref()
                    .map_or(tch::Device::Cpu, |v| v.var_store().device());
                let evaluator = Evaluator::load(&ev_dir, device)?;
                let labels = label_ids(&evaluator, &rows)?;
                let data = EmojiTensors::load(&data_dir).with_context(|| {
                    format!(
                        "loading the real images (build them with `mulo data emoji`, or pass --no-quality): {}",
                        data_dir.display()
                    )
                })?;
                let all: Vec<i64> = (0..data.meta.items.len() as i64).collect();
                let real = score_images(&evaluator, &data.batch(side as usize, &all, device))?;
                Ok((
                    Extra {
                        evaluator: Some(evaluator),
                        real: Some(real.features),
                    },
                    labels,
                ))
            })??
        };
        let (extra, labels) = labels;
        let extra = Arc::new(std::sync::Mutex::new(extra));
        let want_cat: Vec<i64> = (0..a.n).map(|i| labels[i % labels.len()].0).collect();
        let want_sub: Vec<i64> = (0..a.n).map(|i| labels[i % labels.len()].1).collect();
        let mut out = Vec::new();
        for grids in &tokens {
            let grids = grids.clone();
            let extra = extra.clone();
            let (fid, cat, sub) =
                worker.run(move |e: &mut Engine| -> Result<(f64, Vec<i64>, Vec<i64>)> {
                    let images: Vec<Tensor> = grids
                        .iter()
                        .map(|g| e.decode_tensor(g))
                        .collect::<Result<_, _>>()?;
                    let x = extra
                        .lock()
                        .map_err(|_| anyhow::anyhow!("evaluator state poisoned"))?;
                    let (Some(ev), Some(real)) = (&x.evaluator, &x.real) else {
                        bail!("evaluator missing");
                    };
                    let s = score_images(ev, &Tensor::cat(&images, 0))?;
                    Ok((
                        frechet_distance(&s.features, real)?,
                        s.category,
                        s.subcategory,
                    ))
                })??;
            out.push(Some((
                fid,
                agreement(&cat, &want_cat),
                agreement(&sub, &want_sub),
            )));
        }
        out
    };

    let ar_median = median(&stats[0].iter().map(|s| s.seconds).collect::<Vec<_>>());
    let mut report_rows = Vec::new();
    for (mi, (m, remote)) in variants.iter().enumerate() {
        let st = &stats[mi];
        let n = st.len().max(1) as f64;
        let lat: Vec<f64> = st.iter().map(|s| s.seconds).collect();
        let tokens_total: usize = st.iter().map(|s| s.tokens).sum();
        let target: usize = st.iter().map(|s| s.target_passes).sum();
        let proposed: usize = st.iter().map(|s| s.proposed).sum();
        let accepted: usize = st.iter().map(|s| s.accepted).sum();
        let resampled: usize = st.iter().map(|s| s.resampled).sum();
        let mut stage_names: Vec<String> =
            st.iter().flat_map(|s| s.stages.keys().cloned()).collect();
        stage_names.sort();
        stage_names.dedup();
        let stages_median_s = stage_names
            .into_iter()
            .map(|k| {
                let v: Vec<f64> = st
                    .iter()
                    .map(|s| s.stages.get(&k).copied().unwrap_or(0.0))
                    .collect();
                (k, median(&v))
            })
            .collect();
        let med = median(&lat);
        let q = quality[mi];
        // The same method's embedded row (its index among the embedded variants).
        let embedded_median = if *remote {
            variants
                .iter()
                .position(|(x, r)| x == m && !r)
                .map(|k| median(&stats[k].iter().map(|s| s.seconds).collect::<Vec<_>>()))
        } else {
            None
        };
        // Pipelined mulo through the gateway: the same method unpipelined, also through it.
        let pipelining_gain = match m {
            Method::Mulo(p) if *remote && p.pipeline => {
                let off = Method::Mulo(mulo_core::MuloParams {
                    pipeline: false,
                    ..*p
                });
                variants
                    .iter()
                    .position(|(x, r)| *x == off && *r)
                    .map(|k| median(&stats[k].iter().map(|s| s.seconds).collect::<Vec<_>>()))
                    .filter(|_| med > 0.0)
                    .map(|off_med| off_med / med)
            }
            _ => None,
        };
        report_rows.push(BenchRow {
            pipelining_gain,
            method: m.name().to_string(),
            mode: if *remote { "distributed" } else { "embedded" }.into(),
            latency_vs_embedded: embedded_median.filter(|e| *e > 0.0).map(|e| med / e),
            wire_bytes_per_image: remote.then(|| wire[mi] as f64 / n),
            params: m
                .params()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            spec: if *remote {
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
            fid_emoji: q.map(|x| x.0),
            adherence: q.map(|x| x.1),
            adherence_category: q.map(|x| x.1),
            adherence_subcategory: q.map(|x| x.2),
            stages_median_s,
        });
    }
    print_table(&report_rows);
    let report = BenchReport {
        command: crate::common::command_line(),
        sampling: params,
        machine,
        methods: report_rows,
    };
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.json, text + "\n").with_context(|| format!("{}", a.json.display()))?;
    println!("wrote {}", a.json.display());
    if let Some(path) = &a.plot {
        crate::plot::speed_quality(path, &report.methods)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One generation through the gateway: the outcome (latency measured here, so it includes the
/// hops) and the bytes on the wire (gateway ↔ roles, plus this request and its response).
async fn remote_generate(
    gw: &mut mulo_server::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    req: &GenerateRequest,
) -> Result<(mulo_engine::Outcome, u64)> {
    use mulo_server::convert::{condition_out, sampling_out, stats_in};
    use prost::Message;
    let msg = mulo_server::proto::GenerateRequest {
        request_id: req.id.clone(),
        condition: Some(
            condition_out(&req.condition).map_err(|e| anyhow::anyhow!("{}", e.message()))?,
        ),
        method: req.method.to_string(),
        sampling: Some(sampling_out(&req.sampling)),
        seed: req.seed,
        return_tokens: true,
        skip_png: true,
    };
    let sent = msg.encoded_len() as u64;
    let t = std::time::Instant::now();
    let r = gw
        .generate(msg)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.message()))?
        .into_inner();
    let seconds = t.elapsed().as_secs_f64();
    let bytes = sent + r.encoded_len() as u64 + r.stats.as_ref().map_or(0, |s| s.wire_bytes);
    let mut stats = stats_in(r.stats.unwrap_or_default());
    stats.seconds = seconds;
    Ok((
        mulo_engine::Outcome {
            tokens: r.tokens.iter().map(|&t| i64::from(t)).collect(),
            stats,
        },
        bytes,
    ))
}

fn opt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{:.*}", digits, x * scale))
}

fn print_table(rows: &[BenchRow]) {
    println!(
        "{:<44} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>6}",
        "method",
        "med s",
        "p90 s",
        "speedup",
        "tgt/img",
        "drf/img",
        "tok/tp",
        "acc%",
        "resmp%",
        "FID",
        "adh%"
    );
    for r in rows {
        println!(
            "{:<44} {:>8.3} {:>8.3} {:>6.2}x {:>7.1} {:>7.1} {:>6.2} {:>6.1} {:>6.1} {:>7} {:>6}",
            r.spec,
            r.latency_median_s,
            r.latency_p90_s,
            r.speedup_vs_ar,
            r.target_passes_per_image,
            r.drafter_passes_per_image,
            r.tokens_per_target_pass,
            100.0 * r.acceptance_rate,
            100.0 * r.resampled_fraction,
            opt(r.fid_emoji, 1.0, 2),
            opt(r.adherence, 100.0, 1)
        );
    }
    for r in rows.iter().filter(|r| r.mode == "distributed") {
        println!(
            "{}: latency {} of embedded mode, {} bytes on the wire per image",
            r.spec,
            r.latency_vs_embedded
                .map_or_else(|| "-".into(), |x| format!("{x:.3}x")),
            r.wire_bytes_per_image
                .map_or_else(|| "-".into(), |x| format!("{x:.0}"))
        );
        if let Some(g) = r.pipelining_gain {
            println!(
                "{}: pipelining gain {g:.2}x (the same method with pipeline=0 through the gateway over this one)",
                r.spec
            );
        }
    }
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
}
