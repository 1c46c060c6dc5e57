//! mulo's services (DESIGN §5): the drafter and verifier roles behind gRPC, the gateway that runs
//! the engine's coordinator over gRPC clients of them, and what every service shares — flags, the
//! `Capabilities/Info` handshake, `grpc.health.v1`, server reflection and a graceful drain on
//! SIGTERM / Ctrl-C.

pub mod client;
pub mod convert;
pub mod drafter;
pub mod failover;
pub mod gateway;
pub mod metrics;
pub mod runtime;
pub mod telemetry;
pub mod verifier;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use mulo_engine::{default_family_dir, Engine, Family, Local, Member, RoleSet, TorchWorker};
use mulo_proto::v1::capabilities_server::{Capabilities, CapabilitiesServer};
use mulo_proto::v1::{InfoRequest, InfoResponse};
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};

pub use mulo_proto::v1 as proto;

/// Set when SIGTERM / Ctrl-C arrived: the process drains (reported by every `Status` call).
pub static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What the drafter and verifier services share: the in-process role, its session limit and the
/// codebook hash of the capability handshake.
#[derive(Debug, Clone)]
pub(crate) struct RoleBase {
    pub(crate) local: Local,
    pub(crate) max_sessions: usize,
    pub(crate) codebook_hash: String,
}

impl RoleBase {
    async fn new(local: Local, max_sessions: usize) -> Result<Self, mulo_engine::EngineError> {
        let codebook_hash = local
            .worker()
            .call(|e: &mut Engine| e.codebook_hash())
            .await??;
        Ok(Self {
            local,
            max_sessions,
            codebook_hash,
        })
    }
}

/// `Release` of a role: frees the session on the torch thread (idempotent).
async fn release_session(
    local: &Local,
    id: String,
    drafter: bool,
) -> Result<tonic::Response<proto::ReleaseResponse>, Status> {
    let released = local
        .worker()
        .call(move |e: &mut Engine| {
            if drafter {
                e.drafter.as_mut().is_some_and(|d| d.release(&id))
            } else {
                e.verifier.as_mut().is_some_and(|v| v.release(&id))
            }
        })
        .await
        .map_err(|e| convert::status(&e))?;
    Ok(tonic::Response::new(proto::ReleaseResponse { released }))
}

/// `Status` of a role: its live sessions and limit, and whether it drains.
async fn role_status(
    local: &Local,
    max_sessions: usize,
    drafter: bool,
) -> Result<tonic::Response<proto::StatusResponse>, Status> {
    let (d, v) = local
        .worker()
        .call(|e: &mut Engine| e.live_sessions())
        .await
        .map_err(|e| convert::status(&e))?;
    Ok(tonic::Response::new(proto::StatusResponse {
        live_sessions: if drafter { d } else { v } as u32,
        max_sessions: max_sessions as u32,
        in_flight: 0,
        draining: DRAINING.load(std::sync::atomic::Ordering::Relaxed),
    }))
}
pub use runtime::RuntimeArgs;

/// Flags every service takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Address to listen on for gRPC.
    #[arg(long, env = "MULO_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MULO_LOG", default_value = "info")]
    pub log: String,
    /// Model family directory with family.json (default: the bundled emoji family).
    #[arg(long, env = "MULO_FAMILY", value_name = "DIR")]
    pub family: Option<PathBuf>,
    /// OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. http://otel-collector:4317
    /// (also OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; OTEL_SERVICE_NAME renames the service). Unset:
    /// no export, logs only.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Address to serve Prometheus metrics on over HTTP (GET /metrics), e.g. 0.0.0.0:9090.
    /// Unset: no metrics endpoint.
    #[arg(long, env = "MULO_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl CommonArgs {
    /// Starts the metrics endpoint when one is asked for.
    fn metrics(&self, service: &str) -> Result<()> {
        match self.metrics_listen {
            Some(addr) => metrics::install(service, addr),
            None => Ok(()),
        }
    }
}

/// Flags of `mulo-drafter` and `mulo-verifier`.
#[derive(Debug, Clone, Parser)]
pub struct RoleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Sessions (requests) this replica holds at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MULO_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// Seconds after which an idle session (its gateway gone) is freed.
    #[arg(long, env = "MULO_SESSION_TTL", default_value_t = 60.0)]
    pub session_ttl: f64,
    /// Verifier only: also load the family's small draft model (the SD and LANTERN baselines).
    #[arg(long, env = "MULO_DRAFT_MODEL", default_value_t = true, action = clap::ArgAction::Set)]
    pub draft_model: bool,
}

/// Flags of `mulo-gateway`.
#[derive(Debug, Clone, Parser)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Drafter endpoints (`host:port`, comma-separated or repeated; a name resolving to several
    /// addresses, like a headless Service, gives one endpoint per address); none = every request
    /// runs as AR on a verifier.
    #[arg(long = "drafter", env = "MULO_DRAFTERS", value_delimiter = ',')]
    pub drafters: Vec<String>,
    /// Verifier endpoints (`host:port`, comma-separated or repeated; names expand as for
    /// --drafter); at least one. A request whose replica is lost moves to the next one.
    #[arg(
        long = "verifier",
        env = "MULO_VERIFIERS",
        value_delimiter = ',',
        required = true
    )]
    pub verifiers: Vec<String>,
    /// Requests generated at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MULO_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Times one request may move to another verifier replica when the one serving it is lost
    /// (it is re-prefilled there with the committed tokens); past that it fails UNAVAILABLE.
    #[arg(long, env = "MULO_MAX_MIGRATIONS", default_value_t = 2)]
    pub max_migrations: u32,
    /// Seconds between re-resolutions of the endpoint names given to --drafter and --verifier
    /// (pods joining or leaving a headless Service); 0 = resolve once at start-up. A name that
    /// does not resolve keeps the previous addresses.
    #[arg(long, env = "MULO_RESOLVE_INTERVAL", default_value_t = 30.0)]
    pub resolve_interval: f64,
}

#[derive(Debug)]
struct InfoService {
    role: &'static str,
    models: Vec<mulo_proto::v1::ModelInfo>,
}

#[tonic::async_trait]
impl Capabilities for InfoService {
    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            role: self.role.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            models: self.models.clone(),
        }))
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: draining");
}

/// A service's router: every route counted and timed by [`metrics::RpcMetricsLayer`].
type Routes =
    Router<tower::layer::util::Stack<metrics::RpcMetricsLayer, tower::layer::util::Identity>>;

/// Serves `role` with health, reflection and Info plus the routes `add` puts on, until SIGTERM
/// or Ctrl-C; then stops accepting and lets in-flight calls finish.
async fn serve(
    role: &'static str,
    listen: SocketAddr,
    worker: &Arc<TorchWorker<Engine>>,
    add: impl FnOnce(Routes) -> Routes,
) -> Result<()> {
    // Health says SERVING only once this answers: nothing listens before the warm-up is done.
    let t = std::time::Instant::now();
    worker
        .call(|e: &mut Engine| e.warm_up())
        .await?
        .context("warming up the models")?;
    tracing::info!(
        role,
        seconds = t.elapsed().as_secs_f64(),
        "models warmed up"
    );
    let models = worker
        .call(|e: &mut Engine| e.models())
        .await?
        .into_iter()
        .map(|m| mulo_proto::v1::ModelInfo {
            id: m.id,
            model_type: m.model_type,
            grid_rows: m.rows as u32,
            grid_cols: m.cols as u32,
            vocab_size: m.vocab as u32,
            dtype: m.dtype,
            device: m.device,
        })
        .collect();
    let (reporter, health) = tonic_health::server::health_reporter();
    // Reflection in both versions: grpcurl and current tools ask v1, older tools and Python's
    // grpcio-reflection ask v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mulo_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    let router = tonic::transport::Server::builder()
        .trace_fn(telemetry::server_span)
        .layer(metrics::RpcMetricsLayer)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(CapabilitiesServer::new(InfoService { role, models }));
    let router = add(router);
    tracing::info!(role, %listen, "serving");
    // On SIGTERM: report NOT_SERVING (probes and balancers stop sending), stop accepting, let
    // the calls in flight (streams included) finish, then return.
    let drain = async move {
        shutdown_signal().await;
        DRAINING.store(true, std::sync::atomic::Ordering::Relaxed);
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    router
        .serve_with_shutdown(listen, drain)
        .await
        .with_context(|| format!("serving on {listen}"))?;
    Ok(())
}

fn family(dir: &Option<PathBuf>) -> Result<Family> {
    let dir = dir.clone().unwrap_or_else(default_family_dir);
    Family::load(&dir).with_context(|| format!("model family {}", dir.display()))
}

/// Loads the roles on one torch thread.
fn engine(
    fam: &Family,
    roles: RoleSet,
    runtime: &RuntimeArgs,
    sessions: usize,
) -> Result<Arc<TorchWorker<Engine>>> {
    let runtime = runtime.clone();
    let fam = fam.clone();
    Ok(Arc::new(TorchWorker::spawn(
        "torch",
        move || -> Result<Engine> {
            let device = runtime.setup()?;
            Ok(Engine::load(
                &fam,
                roles,
                device,
                runtime.dtype_for(device),
                sessions,
            )?)
        },
    )?))
}

/// Frees idle sessions every quarter of the TTL.
fn expire_idle(worker: Arc<TorchWorker<Engine>>, ttl: f64) {
    let ttl = Duration::from_secs_f64(ttl.max(0.01));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(ttl / 4).await;
            let freed = worker
                .call(move |e: &mut Engine| {
                    e.drafter.as_mut().map_or(0, |d| d.expire(ttl))
                        + e.verifier.as_mut().map_or(0, |v| v.expire(ttl))
                })
                .await;
            match freed {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "freed idle sessions"),
                Err(_) => break,
            }
        }
    });
}

/// The drafter or verifier service until SIGTERM.
pub async fn serve_role(role: &'static str, args: RoleArgs) -> Result<()> {
    let service = if role == "drafter" {
        "mulo-drafter"
    } else {
        "mulo-verifier"
    };
    let tel = telemetry::init(
        service,
        &args.common.log,
        args.common.otlp_endpoint.as_deref(),
    )?;
    let r = match args.common.metrics(service) {
        Ok(()) => serve_role_inner(role, args).await,
        Err(e) => Err(e),
    };
    tel.shutdown().await;
    r
}

async fn serve_role_inner(role: &'static str, args: RoleArgs) -> Result<()> {
    if args.max_sessions == 0 {
        bail!("invalid --max-sessions: must be at least 1");
    }
    if !args.session_ttl.is_finite() || args.session_ttl <= 0.0 {
        bail!("invalid --session-ttl: must be a positive number of seconds");
    }
    let fam = family(&args.common.family)?;
    let roles = match role {
        "drafter" => RoleSet {
            drafter: true,
            verifier: false,
            draft_small: false,
        },
        _ => RoleSet {
            drafter: false,
            verifier: true,
            draft_small: args.draft_model && fam.path(Member::DraftSmall).is_ok(),
        },
    };
    let worker = engine(&fam, roles, &args.runtime, args.max_sessions)?;
    let local = Local::new(worker.clone());
    expire_idle(worker.clone(), args.session_ttl);
    if role == "drafter" {
        let svc = drafter::DrafterService::new(local, args.max_sessions).await?;
        serve(role, args.common.listen, &worker, |r| {
            r.add_service(mulo_proto::v1::drafter_server::DrafterServer::new(svc))
        })
        .await
    } else {
        let svc = verifier::VerifierService::new(local, args.max_sessions).await?;
        serve(role, args.common.listen, &worker, |r| {
            r.add_service(mulo_proto::v1::verifier_server::VerifierServer::new(svc))
        })
        .await
    }
}

/// One endpoint per address: a DNS name that resolves to several addresses (a Kubernetes
/// headless Service: one per pod) becomes one endpoint each, so requests spread over the pods and
/// each pod gets its own channel; a name that does not resolve yet is kept as it is (its channel
/// resolves it when it connects). Duplicates are dropped, order is kept.
pub async fn expand(endpoints: &[String]) -> Vec<String> {
    resolve(endpoints, false).await.unwrap_or_default()
}

/// Is `endpoint` a name to resolve (not an address literal)?
fn is_name(endpoint: &str) -> bool {
    let bare = endpoint
        .trim()
        .split_once("://")
        .map_or(endpoint.trim(), |(_, rest)| rest);
    bare.parse::<SocketAddr>().is_err()
}

/// [`expand`]; with `strict`, `None` when some name does not resolve (a re-resolution then keeps
/// the addresses it had rather than dropping the name's).
async fn resolve(endpoints: &[String], strict: bool) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for e in endpoints {
        let e = e.trim();
        if e.is_empty() {
            continue;
        }
        let bare = e.split_once("://").map_or(e, |(_, rest)| rest);
        let resolved: Vec<String> = if bare.parse::<SocketAddr>().is_ok() {
            vec![bare.to_string()]
        } else {
            match tokio::net::lookup_host(bare).await {
                Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
                Err(_) if strict => return None,
                Err(_) => vec![bare.to_string()],
            }
        };
        let resolved = if resolved.is_empty() {
            if strict {
                return None;
            }
            vec![bare.to_string()]
        } else {
            resolved
        };
        if resolved.len() > 1 && !strict {
            tracing::info!(
                name = e,
                addresses = resolved.len(),
                "endpoint name resolved"
            );
        }
        for r in resolved {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    Some(out)
}

/// The gateway service until SIGTERM.
pub async fn serve_gateway(args: GatewayArgs) -> Result<()> {
    let tel = telemetry::init(
        "mulo-gateway",
        &args.common.log,
        args.common.otlp_endpoint.as_deref(),
    )?;
    let r = match args.common.metrics("mulo-gateway") {
        Ok(()) => serve_gateway_inner(args).await,
        Err(e) => Err(e),
    };
    tel.shutdown().await;
    r
}

async fn serve_gateway_inner(args: GatewayArgs) -> Result<()> {
    if args.max_in_flight == 0 {
        bail!("invalid --max-in-flight: must be at least 1");
    }
    let fam = family(&args.common.family)?;
    let target = mulo_model::ModelConfig::load_gpt(&fam.path(Member::Target)?)?;
    let info = gateway::FamilyInfo {
        name: fam.file.name.clone(),
        rows: target.grid.rows,
        cols: target.grid.cols,
        sampling: target.default_sampling(),
        condition: match target.condition {
            mulo_model::config::ConditionConfig::Class { .. } => "class".into(),
            mulo_model::config::ConditionConfig::Caption { .. } => "caption".into(),
        },
    };
    let drafters = expand(&args.drafters)
        .await
        .iter()
        .map(|a| client::RemoteDrafter::new(a))
        .collect::<Result<Vec<_>, _>>()?;
    let verifiers = expand(&args.verifiers)
        .await
        .iter()
        .map(|a| client::RemoteVerifier::new(a))
        .collect::<Result<Vec<_>, _>>()?;
    // Its own VQ decoder, for the image when no drafter answers.
    let none = RoleSet {
        drafter: false,
        verifier: false,
        draft_small: false,
    };
    let vq = engine(&fam, none, &args.runtime, 1)?;
    let own = vq.clone();
    let svc = gateway::GatewayService::new(
        info,
        drafters,
        verifiers,
        args.max_in_flight,
        args.max_migrations,
        Some(vq),
    );
    if args.resolve_interval > 0.0
        && args
            .drafters
            .iter()
            .chain(&args.verifiers)
            .any(|e| is_name(e))
    {
        re_resolve(
            svc.state(),
            args.drafters.clone(),
            args.verifiers.clone(),
            Duration::from_secs_f64(args.resolve_interval.max(0.1)),
        );
    }
    serve("gateway", args.common.listen, &own, |r| {
        r.add_service(mulo_proto::v1::gateway_server::GatewayServer::new(svc))
    })
    .await
}

/// Re-resolves the endpoint names every `every` and swaps in the new addresses when they changed.
fn re_resolve(
    state: Arc<gateway::GatewayState>,
    drafters: Vec<String>,
    verifiers: Vec<String>,
    every: Duration,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let (Some(d), Some(v)) = (
                resolve(&drafters, true).await,
                resolve(&verifiers, true).await,
            ) else {
                tracing::warn!(
                    "an endpoint name did not resolve: keeping the replicas as they are"
                );
                continue;
            };
            if v.is_empty() {
                continue;
            }
            match state.set_endpoints(&d, &v) {
                Ok(true) => tracing::info!(drafters = ?d, verifiers = ?v, "replicas re-resolved"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%e, "re-resolved replicas refused"),
            }
        }
    });
}

fn run(f: impl std::future::Future<Output = Result<()>>) -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole `main` of `mulo-drafter` / `mulo-verifier`.
pub fn main_role(role: &'static str) -> std::process::ExitCode {
    let args = RoleArgs::parse();
    run(serve_role(role, args))
}

/// The whole `main` of `mulo-gateway`.
pub fn main_gateway() -> std::process::ExitCode {
    let args = GatewayArgs::parse();
    run(serve_gateway(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoint_names_expand_to_their_addresses() {
        let got = expand(&["127.0.0.1:7000".into(), " 127.0.0.1:7000".into()]).await;
        assert_eq!(got, vec!["127.0.0.1:7000".to_string()]);
        let got = expand(&["localhost:7001".into()]).await;
        assert!(!got.is_empty());
        for a in &got {
            let a: SocketAddr = a.parse().unwrap();
            assert!(a.ip().is_loopback() && a.port() == 7001, "{a}");
        }
        // Unresolvable names stay for the channel to resolve later; a re-resolution keeps what it
        // had instead.
        let got = expand(&["no-such-host.invalid:7002".into()]).await;
        assert_eq!(got, vec!["no-such-host.invalid:7002".to_string()]);
        assert_eq!(
            resolve(&["no-such-host.invalid:7002".into()], true).await,
            None
        );
        assert!(is_name("localhost:7001") && is_name("http://verifier:50062"));
        assert!(!is_name("127.0.0.1:7001") && !is_name("http://[::1]:7001"));
    }
}
