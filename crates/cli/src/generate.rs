//! `mulo generate`: one image from a condition.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mulo_engine::{generate_ar, TorchWorker};
use mulo_model::{image_io, Gpt, VqModel};
use tch::Tensor;

use crate::common::{
    tokenize_for, tokenize_with_warnings, warn_unused, write_tokens, ConditionArgs, RuntimeArgs,
    SamplingArgs,
};

/// Arguments of `mulo generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json + model.safetensors of a GPT). Default: the target of
    /// --family.
    #[arg(long, env = "MULO_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Model family (family.json) whose target generates when --model is not given. Default: the
    /// bundled emoji family (models/emoji).
    #[arg(
        long,
        env = "MULO_FAMILY",
        value_name = "DIR",
        conflicts_with = "model"
    )]
    pub family: Option<PathBuf>,
    #[command(flatten)]
    pub condition: ConditionArgs,
    /// Decoding method with optional parameters, `name:key=value,...`: `ar` (one target pass per
    /// token, the exact reference), `sd:gamma=4` (lossless speculative sampling with the
    /// family's small draft model), `lantern:gamma=4,k=1000,delta=0.1` (relaxed SD), `mulo:tau=…,
    /// pool_k=…,radius=…,block_rows=…,zipar_window=…,rejection=local|raster,pipeline=1|0,
    /// resample=jacobi|sequential,jacobi_window=…,wavefront=…` (MuLo-SD). Methods other than `ar`
    /// need a family (not --model). See docs/methods.md for each parameter and its default.
    #[arg(long, default_value = "ar", value_parser = parse_method)]
    pub method: mulo_core::Method,
    /// Random seed: the same seed, model and parameters give the same tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// PNG to write (default image.png unless only --tokens-out is given).
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// Also write the tokens as a JSON array of ints in raster order.
    #[arg(long, value_name = "FILE.json")]
    pub tokens_out: Option<PathBuf>,
    /// Also write an acceptance map (PNG): the image with each token tinted by what happened to
    /// it (accepted draft, rejected and resampled, expanded around a rejection, or sampled by the
    /// target without a proposal) and a legend with the counts. Needs a family (not --model).
    #[arg(long, value_name = "FILE.png", conflicts_with_all = ["model", "gateway"])]
    pub map: Option<PathBuf>,
    /// Also run AR on the same prompt and seed in this process and print the speed-up of
    /// --method against it; both are timed after one untimed generation of each. Needs a family
    /// (not --model).
    #[arg(long, conflicts_with_all = ["model", "gateway"])]
    pub vs_ar: bool,
    /// VQ model directory that decodes the tokens (default: the model config's `vq`).
    #[arg(long, env = "MULO_VQ", value_name = "DIR")]
    pub vq: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Send the request to a running `mulo-gateway` at ADDR (`host:port`) instead of running the
    /// models here; the same seed and parameters give the same tokens either way.
    #[arg(long, env = "MULO_GATEWAY", value_name = "ADDR", conflicts_with_all = ["model", "family", "vq"])]
    pub gateway: Option<String>,
    /// With --gateway: PEM CA of the gateway's TLS certificate (speaks TLS; default plaintext).
    #[arg(
        long,
        env = "MULO_GATEWAY_CA",
        value_name = "FILE",
        requires = "gateway"
    )]
    pub gateway_ca: Option<PathBuf>,
    /// With --gateway: bearer token for a gateway with --auth-tokens.
    #[arg(long, env = "MULO_TOKEN", requires = "gateway", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn parse_method(s: &str) -> Result<mulo_core::Method, String> {
    mulo_core::Method::parse(s).map_err(|e| e.to_string())
}

/// The VQ directory for a model: an explicit one, else the config's `vq` relative to the model.
pub fn resolve_vq(
    model_dir: &Path,
    explicit: Option<&Path>,
    from_config: Option<&str>,
) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| from_config.map(|v| model_dir.join(v)))
}

struct State {
    gpt: Gpt,
    vq: Option<VqModel>,
}

/// Runs `mulo generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    args.sampling.check()?;
    let cond = args.condition.load()?;
    let out = match (&args.out, &args.tokens_out) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(PathBuf::from("image.png")),
    };
    if let Some(addr) = &args.gateway {
        return run_gateway(&args, addr, &cond, out);
    }
    let model_dir = match &args.model {
        Some(m) => m.clone(),
        None => {
            let dir = args
                .family
                .clone()
                .unwrap_or_else(mulo_engine::default_family_dir);
            return run_family(&args, &dir, cond, out);
        }
    };
    if args.method != mulo_core::Method::Ar {
        bail!(
            "--method {} needs a model family (drafter, up-sampler, draft model): pass --family DIR instead of --model",
            args.method
        );
    }
    let tokenizer_dir = model_dir.clone();
    let vq_flag = args.vq.clone();
    let runtime = args.runtime.clone();
    let want_png = out.is_some();
    let worker = TorchWorker::spawn("torch", move || -> Result<State> {
        let device = runtime.setup()?;
        let (gpt, unused) = Gpt::load(&model_dir, device, runtime.dtype_for(device))?;
        warn_unused(&model_dir, &unused);
        let vq = if want_png {
            let Some(dir) = resolve_vq(&model_dir, vq_flag.as_deref(), gpt.config().vq.as_deref())
            else {
                bail!(
                    "{} names no VQ model to decode with: pass --vq DIR, or only --tokens-out FILE",
                    model_dir.display()
                );
            };
            let (vq, unused) = VqModel::load(&dir, device, runtime.dtype_for(device))
                .with_context(|| format!("loading the VQ model {}", dir.display()))?;
            warn_unused(&dir, &unused);
            if vq.config().codebook_size != gpt.config().vocab_size {
                bail!(
                    "VQ codebook has {} codes but the model's vocabulary is {}",
                    vq.config().codebook_size,
                    gpt.config().vocab_size
                );
            }
            Some(vq)
        } else {
            None
        };
        Ok(State { gpt, vq })
    })?;

    // A text prompt goes through the model's own caption tokenizer, when it has one.
    let cond = tokenize_for(&tokenizer_dir, cond)?;
    let params = worker.run({
        let sampling = args.sampling.clone();
        move |s: &mut State| sampling.resolve(s.gpt.config().default_sampling())
    })??;
    let n = worker.run(|s: &mut State| s.gpt.config().grid.len())?;
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(n as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let seed = args.seed;
    let pb = bar.clone();
    let (generation, png) = worker.run(move |s: &mut State| -> Result<_> {
        let mut progress = |done: usize, _total: usize| pb.set_position(done as u64);
        let generation = generate_ar(&s.gpt, &cond, &params, seed, &mut progress)?;
        let png = match &s.vq {
            Some(vq) => {
                let g = s.gpt.config().grid;
                let t = Tensor::from_slice(&generation.tokens)
                    .view([1, g.rows as i64, g.cols as i64])
                    .to_device(s.gpt.device());
                let img = vq.decode(&t)?;
                Some(image_io::png_bytes(&img.get(0))?)
            }
            None => None,
        };
        Ok((generation, png))
    })??;
    bar.finish_and_clear();

    if let Some(path) = &args.tokens_out {
        write_tokens(path, &generation.tokens)?;
    }
    if let (Some(path), Some(bytes)) = (&out, png) {
        std::fs::write(path, bytes).with_context(|| format!("{}", path.display()))?;
    }
    let st = &generation.stats;
    let mut wrote: Vec<String> = Vec::new();
    wrote.extend(out.iter().map(|p| p.display().to_string()));
    wrote.extend(args.tokens_out.iter().map(|p| p.display().to_string()));
    println!(
        "{} tokens in {:.2} s: {:.1} tokens/s (method {}, {} target passes, seed {seed}); wrote {}",
        st.tokens,
        st.prefill_seconds + st.decode_seconds,
        st.tokens_per_second(),
        st.method,
        st.target_passes,
        wrote.join(", ")
    );
    Ok(())
}

/// Generation with a model family: every method through the coordinator and the in-process roles.
fn run_family(
    args: &GenerateArgs,
    dir: &Path,
    cond: mulo_core::Condition,
    out: Option<PathBuf>,
) -> Result<()> {
    use mulo_engine::{Engine, Family, Local, Member, RoleSet};
    let family = Family::load(dir)?;
    let target_cfg = mulo_model::ModelConfig::load_gpt(&family.path(Member::Target)?)?;
    let params = args.sampling.resolve(target_cfg.default_sampling())?;
    let roles = RoleSet {
        drafter: matches!(args.method, mulo_core::Method::Mulo(_)),
        verifier: true,
        draft_small: matches!(
            args.method,
            mulo_core::Method::Sd(_) | mulo_core::Method::Lantern(_)
        ),
    };
    let worker = mulo_server::load_engine(&family, roles, &args.runtime, 4)?;
    // Each role tokenizes the prompt with its own model's vocabulary; warn once, for the target's.
    if let Some(tok) = mulo_engine::prompt::load_tokenizer(&family.path(Member::Target)?)? {
        let _ = tokenize_with_warnings(&tok, cond.clone());
    }
    let local = Local::new(worker.clone());
    let req = mulo_engine::GenerateRequest {
        id: "generate".into(),
        condition: cond,
        sampling: params,
        seed: args.seed,
        method: args.method,
    };
    let n = target_cfg.grid.len();
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(n as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} tokens  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let pb = bar.clone();
    let drafter: Option<&dyn mulo_engine::DrafterRole> =
        if roles.drafter { Some(&local) } else { None };
    let ar = mulo_engine::GenerateRequest {
        id: "generate-ar".into(),
        method: mulo_core::Method::Ar,
        ..req.clone()
    };
    if args.vs_ar {
        // Both timed runs warm: one untimed generation of each first (lazy tables, caches).
        for r in [&req, &ar] {
            let warm = mulo_engine::GenerateRequest {
                id: format!("{}-warm-up", r.id),
                ..r.clone()
            };
            rt.block_on(mulo_engine::generate(drafter, &local, &warm, &mut |_| {}))?;
        }
    }
    let mut events: Vec<mulo_engine::BlockEvent> = Vec::new();
    let outcome = rt.block_on(mulo_engine::generate(drafter, &local, &req, &mut |e| {
        pb.set_position(e.committed as u64);
        events.push(e.clone());
    }))?;
    bar.finish_and_clear();
    let ar_seconds = if args.vs_ar {
        Some(
            rt.block_on(mulo_engine::generate(None, &local, &ar, &mut |_| {}))?
                .stats
                .seconds,
        )
    } else {
        None
    };
    if let Some(path) = &args.tokens_out {
        write_tokens(path, &outcome.tokens)?;
    }
    if out.is_some() || args.map.is_some() {
        let tokens = outcome.tokens.clone();
        let rgb = worker.run(move |e: &mut Engine| -> Result<image::RgbImage> {
            let img = e.decode_tensor(&tokens)?;
            Ok(image_io::to_rgb8(&img.get(0))?)
        })??;
        if let Some(path) = &out {
            let mut png = std::io::Cursor::new(Vec::new());
            rgb.write_to(&mut png, image::ImageFormat::Png)?;
            std::fs::write(path, png.into_inner())
                .with_context(|| format!("{}", path.display()))?;
        }
        if let Some(path) = &args.map {
            let fates = crate::map::fates(&events, n);
            let g = target_cfg.grid;
            crate::map::write_map(path, &rgb, g.rows, g.cols, &fates)?;
        }
    }
    let mut wrote: Vec<String> = Vec::new();
    wrote.extend(out.iter().map(|p| p.display().to_string()));
    wrote.extend(args.map.iter().map(|p| p.display().to_string()));
    wrote.extend(args.tokens_out.iter().map(|p| p.display().to_string()));
    println!(
        "{} (seed {}); wrote {}",
        outcome.stats.line(),
        args.seed,
        wrote.join(", ")
    );
    if let Some(ar) = ar_seconds {
        println!(
            "speed-up vs AR on the same prompt and seed: {:.2}x ({} {:.3} s, ar {:.3} s)",
            ar / outcome.stats.seconds.max(1e-9),
            outcome.stats.method,
            outcome.stats.seconds,
            ar
        );
    }
    Ok(())
}

/// `mulo generate --gateway ADDR`: the request through a running gateway, streamed for progress.
fn run_gateway(
    args: &GenerateArgs,
    addr: &str,
    cond: &mulo_core::Condition,
    out: Option<PathBuf>,
) -> Result<()> {
    use mulo_server::convert::{condition_out, stats_in};
    use mulo_server::proto::{generate_event, GenerateRequest, Sampling};
    let s = &args.sampling;
    let req = GenerateRequest {
        request_id: String::new(),
        condition: Some(condition_out(cond).map_err(|e| anyhow::anyhow!("{}", e.message()))?),
        method: args.method.to_string(),
        sampling: Some(Sampling {
            cfg_scale: s.cfg_scale,
            temperature: s.temperature,
            top_k: s.top_k.map(|k| k as u32),
            top_p: s.top_p,
        }),
        seed: args.seed,
        return_tokens: args.tokens_out.is_some(),
        skip_png: out.is_none(),
    };
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} tokens  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = rt.block_on(async {
        let mut client = mulo_server::client::gateway_client_tls(addr, args.gateway_ca.as_deref())?;
        let req = mulo_server::client::with_token(req, args.token.as_deref())?;
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(|e| anyhow::anyhow!("gateway {addr}: {}: {}", e.code(), e.message()))?
            .into_inner();
        while let Some(ev) = stream
            .message()
            .await
            .map_err(|e| anyhow::anyhow!("gateway {addr}: {}: {}", e.code(), e.message()))?
        {
            match ev.kind {
                Some(generate_event::Kind::Block(b)) => {
                    bar.set_length(u64::from(b.total));
                    bar.set_position(u64::from(b.committed));
                }
                Some(generate_event::Kind::Done(d)) => return Ok(d),
                None => {}
            }
        }
        bail!("gateway {addr}: the stream ended without a result")
    })?;
    bar.finish_and_clear();
    if let Some(path) = &args.tokens_out {
        let tokens: Vec<i64> = done.tokens.iter().map(|&t| i64::from(t)).collect();
        write_tokens(path, &tokens)?;
    }
    if let Some(path) = &out {
        std::fs::write(path, &done.png).with_context(|| format!("{}", path.display()))?;
    }
    let mut wrote: Vec<String> = Vec::new();
    wrote.extend(out.iter().map(|p| p.display().to_string()));
    wrote.extend(args.tokens_out.iter().map(|p| p.display().to_string()));
    let wire = done.stats.as_ref().map_or(0, |s| s.wire_bytes);
    let migrations = done.stats.as_ref().map_or(0, |s| s.migrations);
    let stats = stats_in(done.stats.unwrap_or_default());
    println!(
        "{} (seed {}, gateway {addr}, request {}, {wire} bytes between gateway and roles, {migrations} migrations); wrote {}",
        stats.line(),
        args.seed,
        done.request_id,
        wrote.join(", ")
    );
    Ok(())
}
