//! `mulo bench`: every chosen method over one prompt list, interleaved image by image in one
//! process (AR always included as the reference), with speed and quality side by side.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mulo_core::Method;
use mulo_engine::{
    default_family_dir, Engine, Family, GenerateRequest, Local, Member, Outcome, RoleSet,
    TorchWorker,
};
use mulo_train::bench::{
    method_list, report_rows, variants, BenchReport, BenchRow, BenchSettings, RemoteGenerate,
};
use mulo_train::eval::read_prompts;
use serde::Deserialize;

use crate::common::{cache_root, RuntimeArgs, SamplingArgs};

/// Arguments of `mulo bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model family directory with family.json (default: the bundled emoji family).
    #[arg(long, env = "MULO_FAMILY", value_name = "DIR")]
    pub family: Option<PathBuf>,
    /// A method to compare, `name:key=value,...` (repeat the flag; `ar` is always added):
    /// ar, sd:gamma=…, lantern:gamma=…,k=…,delta=…, mulo:tau=…,pool_k=…,radius=…,block_rows=…,
    /// zipar_window=…,rejection=local|raster,pipeline=1|0,resample=jacobi|sequential,
    /// jacobi_window=…,wavefront=… (docs/methods.md). Default: ar, sd, lantern and mulo at their
    /// defaults.
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
    /// Plot to write (PNG): speed-up against FID-emoji and adherence; with --concurrency,
    /// throughput against the number of clients.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// Data directory from `mulo data emoji` (the real images of FID-emoji; default
    /// ~/.cache/mulo/data/emoji).
    #[arg(long, env = "MULO_EMOJI_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Skip every quality measure — FID-emoji, adherence, the target's NLLs, fd_to_ar and its
    /// floor (speed only; no evaluator or data needed, no second AR set).
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
    /// Closed-loop load instead of the interleaved comparison: for each method (AR first) and each
    /// listed number of clients C, C clients send their next request as soon as the previous one
    /// returns until --n images are done (after --warmup untimed ones); the report gives images/s,
    /// latency p50/p90 and the scaling against C = 1 (with --distributed, through the gateway
    /// too). No quality measures. Example: --concurrency 1,2,4,8.
    #[arg(long, value_delimiter = ',', value_name = "C1,C2,...",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub concurrency: Vec<usize>,
    /// Run nothing: draw `--plot` from the JSON report of an earlier run.
    #[arg(long, value_name = "REPORT.json", requires = "plot")]
    pub replot: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub batch: mulo_server::BatchArgs,
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::parse(s).map_err(|e| e.to_string())
}

/// Runs `mulo bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if let (Some(report), Some(plot)) = (&a.replot, &a.plot) {
        return replot(report, plot);
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
    // Every quality measure needs the family's evaluator; without one the bench measures speed.
    let no_quality = a.no_quality || !family.has(Member::Evaluator);
    if !a.no_quality && no_quality {
        println!(
            "quality: no evaluator in family {} (speed only: FID-emoji, adherence, the target's NLLs and fd_to_ar are not measured)",
            family_dir.display()
        );
    }
    let prompts = read_prompts(
        &a.prompts
            .clone()
            .unwrap_or_else(crate::eval::default_prompts),
    )?;
    let target_cfg = mulo_model::ModelConfig::load_gpt(&family.path(Member::Target)?)?;
    let settings = BenchSettings {
        prompts,
        n: a.n,
        warmup: a.warmup,
        seed: a.seed,
        sampling: a.sampling.resolve(target_cfg.default_sampling())?,
    };
    let roles = RoleSet {
        drafter: methods.iter().any(|m| matches!(m, Method::Mulo(_))),
        verifier: true,
        draft_small: methods
            .iter()
            .any(|m| matches!(m, Method::Sd(_) | Method::Lantern(_))),
    };
    if !a.concurrency.is_empty() {
        return crate::bench_load::run(&a, &methods, &settings, &family, &family_dir, roles);
    }
    let worker = mulo_server::load_engine(&family, roles, &a.runtime, 4)?;
    mulo_server::set_batching(&worker, a.batch.batching())?;
    let machine = machine(&worker, a.runtime.threads)?;
    let local = Local::new(worker.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let variants = variants(&methods, a.distributed);
    let cluster = if a.distributed {
        let threads = a.runtime.threads.unwrap_or(1);
        Some(rt.block_on(crate::cluster::Cluster::start(
            &family_dir,
            threads,
            !a.no_pin,
            &a.batch.to_flags(),
        ))?)
    } else {
        None
    };
    let mut gateway = match &cluster {
        Some(c) => {
            // The channel's connector needs the runtime.
            let _in_rt = rt.enter();
            Some(Gateway {
                rt: &rt,
                client: mulo_server::client::gateway_client(&c.gateway)?,
            })
        }
        None => None,
    };
    let machine = match &cluster {
        Some(c) => format!("{machine}; services: {}", c.placement),
        None => machine,
    };
    let floor_images = if no_quality { 0 } else { a.n };
    let total = (a.n + a.warmup) * variants.len() + floor_images;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("bench {bar:40} {pos}/{len} images  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let measured = mulo_train::bench::measure(
        &settings,
        &variants,
        &local,
        roles.drafter,
        gateway.as_mut().map(|g| g as &mut dyn RemoteGenerate),
        &rt,
        &mut || bar.inc(1),
    )?;
    let floor = if no_quality {
        Vec::new()
    } else {
        mulo_train::bench::ar_floor(&settings, &local, &rt, &mut || bar.inc(1))?
    };
    bar.finish_and_clear();
    let quality = if no_quality {
        Vec::new()
    } else {
        let data_dir = a
            .data
            .clone()
            .unwrap_or_else(|| cache_root().join("data/emoji"));
        mulo_train::bench::quality(&settings, &measured, floor, &family, &worker, data_dir)?
    };
    let report = BenchReport {
        command: crate::common::command_line(),
        sampling: settings.sampling,
        machine,
        methods: report_rows(&variants, &measured, &quality),
    };
    print_table(&report.methods);
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.json, text + "\n").with_context(|| format!("{}", a.json.display()))?;
    println!("wrote {}", a.json.display());
    if let Some(path) = &a.plot {
        crate::plot::speed_quality(path, &report.methods)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `--replot`: draws the plot of an earlier run's report.
fn replot(report: &Path, plot: &Path) -> Result<()> {
    /// The interleaved bench's report, or the load report of `--concurrency`.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Report {
        Bench {
            methods: Vec<BenchRow>,
        },
        Load {
            load: Vec<mulo_train::load::LoadRow>,
        },
    }
    let text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let r: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a `mulo bench` report", report.display()))?;
    match r {
        Report::Bench { methods } => crate::plot::speed_quality(plot, &methods)?,
        Report::Load { load } => crate::plot_load::throughput(plot, &load)?,
    }
    println!("wrote {}", plot.display());
    Ok(())
}

/// The report's machine line: device and torch threads.
pub(crate) fn machine(worker: &TorchWorker<Engine>, threads: Option<i32>) -> Result<String> {
    Ok(worker.run(move |e: &mut Engine| {
        let device =
            e.vq.as_ref()
                .map(|v| format!("{:?}", v.var_store().device()))
                .unwrap_or_default();
        format!(
            "device {device}, {} torch threads{}",
            tch::get_num_threads(),
            threads.map(|_| "").unwrap_or(" (default)")
        )
    })?)
}

/// The gateway of a `--distributed` run, called on the run's runtime.
struct Gateway<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: mulo_server::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
}

impl RemoteGenerate for Gateway<'_> {
    fn generate(&mut self, req: &GenerateRequest) -> Result<(Outcome, u64), String> {
        self.rt
            .block_on(remote_generate(&mut self.client, req))
            .map_err(|e| format!("{e:#}"))
    }
}

/// One generation through the gateway: the outcome (latency measured here, so it includes the
/// hops) and the bytes on the wire (gateway ↔ roles, plus this request and its response).
pub(crate) async fn remote_generate(
    gw: &mut mulo_server::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    req: &GenerateRequest,
) -> Result<(Outcome, u64)> {
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
        Outcome {
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
        "{:<44} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6}",
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
        "adh%",
        "tNLL",
        "tpNLL",
        "FD-AR"
    );
    for r in rows {
        println!(
            "{:<44} {:>8.3} {:>8.3} {:>6.2}x {:>7.1} {:>7.1} {:>6.2} {:>6.1} {:>6.1} {:>7} {:>6} {:>6} {:>6} {:>6}",
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
            opt(r.adherence, 100.0, 1),
            opt(r.target_nll, 1.0, 2),
            opt(r.target_pooled_nll, 1.0, 2),
            opt(r.fd_to_ar, 1.0, 2)
        );
    }
    if let Some(floor) = rows.iter().find_map(|r| r.fd_ar_floor) {
        println!(
            "tNLL: the target's NLL per token of each method's images (tpNLL: of the token's pool); FD-AR: Frechet distance to AR's images, noise floor {floor:.2} (two AR sets)"
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
