//! Process start-up and serving: the `main` of every service ([`main_role`], [`main_gateway`]),
//! telemetry and metrics set-up, loading the models on their torch thread, and the gRPC server
//! with health, reflection, `Capabilities/Info` and the graceful drain on SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mulo_core::limits::MAX_MESSAGE_BYTES;
use mulo_engine::prompt::TEXT_CACHE_DEFAULT;
use mulo_engine::{
    default_family_dir, Batching, Engine, Family, Local, Member, RoleSet, TextOptions, TorchWorker,
};
use mulo_proto::v1::capabilities_server::{Capabilities, CapabilitiesServer};
use mulo_proto::v1::{InfoRequest, InfoResponse};
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};

use crate::flags::{CommonArgs, GatewayArgs, RoleArgs};
use crate::resolution::{expand, is_name, re_resolve};
use crate::runtime::RuntimeArgs;
use crate::{client, drafter, gateway, metrics, telemetry, verifier, DRAINING};

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

/// Serves `role` with health, reflection and Info plus the routes `add` puts on (and, for the
/// gateway, its HTTP API on `http`'s address), until SIGTERM or Ctrl-C; then stops accepting and
/// lets in-flight calls finish.
async fn serve(
    role: &'static str,
    net: &CommonArgs,
    worker: &Arc<TorchWorker<Engine>>,
    add: impl FnOnce(Routes) -> Routes,
    http: Option<(SocketAddr, gateway::GatewayService)>,
) -> Result<()> {
    let tls = net.server_tls()?.map(Arc::new);
    // Health says SERVING only once this answers: nothing listens before the warm-up is done.
    let models = warm_up(role, worker).await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let (reflection, reflection_alpha) = reflection()?;
    // Every call is bounded in time (streams until their first message).
    let cap = Duration::from_secs_f64(mulo_core::limits::MAX_DEADLINE_SECONDS);
    let router = tonic::transport::Server::builder()
        .timeout(cap)
        .trace_fn(telemetry::server_span)
        .layer(metrics::RpcMetricsLayer)
        .add_service(health.clone())
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(CapabilitiesServer::new(InfoService { role, models }));
    let router = add(router);
    let listen = net.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr()?;
    if let Some(addr) = net.health_listen {
        serve_health(addr, health).await?;
    }
    let http = match http {
        Some((addr, gw)) => Some(serve_http(addr, gw, &reporter, tls.clone()).await?),
        None => None,
    };
    tracing::info!(role, %bound, tls = tls.is_some(), mtls = net.tls_client_ca.is_some(), "serving");
    // The address a test or a supervisor started with port 0 connects to.
    println!("mulo-{role} listening on {bound}");
    let incoming = match tls {
        Some(tls) => Incoming::Tls(tls.incoming(listener)),
        None => Incoming::Plain(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        ),
    };
    run_until_stopped(role, router, incoming, reporter, worker).await?;
    if let Some(task) = http {
        // The HTTP requests in flight finish as the gRPC calls did.
        let _ = task.await;
    }
    Ok(())
}

/// Binds the gateway's HTTP API on `addr` (HTTPS with the gRPC port's certificate), ready when
/// the gRPC port's health says so; prints `mulo-gateway serving HTTP on URL` for a supervisor or
/// a test that asked for port 0.
async fn serve_http(
    addr: SocketAddr,
    gw: gateway::GatewayService,
    reporter: &tonic_health::server::HealthReporter,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (--http-listen)"))?;
    let bound = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
    let router = crate::http::HttpApi::new(gw, health).router();
    tracing::info!(%bound, scheme, "serving HTTP");
    println!("mulo-gateway serving HTTP on {scheme}://{bound}");
    Ok(crate::http::serve(listener, tls, router))
}

/// Runs every model once and returns what `Capabilities/Info` reports of them.
async fn warm_up(
    role: &'static str,
    worker: &Arc<TorchWorker<Engine>>,
) -> Result<Vec<mulo_proto::v1::ModelInfo>> {
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
    Ok(worker
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
        .collect())
}

type Reflection<T> = tonic_reflection::server::v1::ServerReflectionServer<T>;
type ReflectionAlpha<T> = tonic_reflection::server::v1alpha::ServerReflectionServer<T>;

/// Server reflection in both versions: grpcurl and current tools ask v1, older tools and
/// Python's grpcio-reflection ask v1alpha.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<(
    Reflection<impl tonic_reflection::server::v1::ServerReflection>,
    ReflectionAlpha<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mulo_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .build_v1()
        .context("building the reflection service")?;
    let alpha = builder()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    Ok((v1, alpha))
}

/// The connections a service accepts: TLS or plaintext.
enum Incoming {
    Tls(
        tokio_stream::wrappers::ReceiverStream<
            std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        >,
    ),
    Plain(tonic::transport::server::TcpIncoming),
}

/// Serves until SIGTERM / Ctrl-C: then reports NOT_SERVING (probes and balancers stop sending),
/// stops accepting, lets the calls in flight (streams included) finish and returns. When the
/// torch thread dies (panic): the same, but the calls it held have failed already (the gateway
/// moves them), and it returns an error after FATAL_GRACE so that the process exits non-zero and
/// Kubernetes restarts it.
async fn run_until_stopped(
    role: &'static str,
    router: Routes,
    incoming: Incoming,
    reporter: tonic_health::server::HealthReporter,
    worker: &Arc<TorchWorker<Engine>>,
) -> Result<()> {
    let failed = worker.failed();
    let drain = async move {
        tokio::select! {
            () = shutdown_signal() => {},
            () = torch_failed(failed) => tracing::error!(
                role,
                "the torch thread died (panic or fatal libtorch error): health NOT_SERVING, exiting"
            ),
        }
        DRAINING.store(true, std::sync::atomic::Ordering::Relaxed);
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    let failed = worker.failed();
    let grace = async move {
        torch_failed(failed).await;
        tokio::time::sleep(FATAL_GRACE).await;
    };
    let served = async move {
        match incoming {
            Incoming::Tls(s) => router.serve_with_incoming_shutdown(s, drain).await,
            Incoming::Plain(s) => router.serve_with_incoming_shutdown(s, drain).await,
        }
    };
    tokio::select! {
        r = served => r.context("serving")?,
        () = grace => {}
    }
    if *worker.failed().borrow() {
        bail!("the torch thread died (a panic or a fatal libtorch error); exiting so that the replica is restarted");
    }
    Ok(())
}

/// Serves `grpc.health.v1` alone, in plaintext, on `addr` (for probes that cannot speak TLS,
/// such as Kubernetes' gRPC probes); it reports what the main port's health reports.
async fn serve_health<S>(addr: SocketAddr, health: S) -> Result<()>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (--health-listen)"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving health in plaintext");
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let r = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = r {
            tracing::error!(%e, "the health port stopped");
        }
    });
    Ok(())
}

/// Time a process whose torch thread died keeps answering (NOT_SERVING, every call failing
/// UNAVAILABLE) before it exits, so that health watchers and the gateway see the state.
const FATAL_GRACE: Duration = Duration::from_secs(2);

/// Resolves when the torch thread has died of a panic (never, if it ends cleanly).
async fn torch_failed(mut failed: tokio::sync::watch::Receiver<bool>) {
    if failed.wait_for(|f| *f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn family(dir: &Option<PathBuf>) -> Result<Family> {
    let dir = dir.clone().unwrap_or_else(default_family_dir);
    Family::load(&dir).with_context(|| format!("model family {}", dir.display()))
}

/// Loads the roles of `fam` on one torch thread (the device, dtype and threads of `runtime`),
/// each holding up to `sessions` sessions.
pub fn load_engine(
    fam: &Family,
    roles: RoleSet,
    runtime: &RuntimeArgs,
    sessions: usize,
) -> Result<Arc<TorchWorker<Engine>>> {
    load_engine_with_text(fam, roles, runtime, sessions, None, TEXT_CACHE_DEFAULT)
}

/// Sets the batch limits and the call-queue bound of a loaded engine.
pub fn set_batching(worker: &TorchWorker<Engine>, batching: Batching) -> Result<()> {
    worker.run(move |e: &mut Engine| e.set_batching(batching))?;
    Ok(())
}

/// [`load_engine`] with the text encoder on `text_device` (default: the runtime's device) caching
/// `text_cache` prompts.
pub fn load_engine_with_text(
    fam: &Family,
    roles: RoleSet,
    runtime: &RuntimeArgs,
    sessions: usize,
    text_device: Option<String>,
    text_cache: usize,
) -> Result<Arc<TorchWorker<Engine>>> {
    let runtime = runtime.clone();
    let fam = fam.clone();
    Ok(Arc::new(TorchWorker::spawn_rounds(
        "torch",
        move || -> Result<Engine> {
            let device = runtime.setup()?;
            let text = TextOptions {
                device: text_device
                    .as_deref()
                    .map(mulo_model::parse_device)
                    .transpose()
                    .context("--text-encoder-device")?,
                cache: text_cache,
            };
            Ok(Engine::load_with_text(
                &fam,
                roles,
                device,
                runtime.dtype_for(device),
                sessions,
                text,
            )?)
        },
    )?))
}

/// A role call's deadline within its bound (INVALID_ARGUMENT past 3600 s, as at the gateway).
fn bounded_deadline(req: Request<()>) -> Result<Request<()>, Status> {
    let cap = Duration::from_secs_f64(mulo_core::limits::MAX_DEADLINE_SECONDS);
    crate::convert::deadline_in(req.metadata(), cap)?;
    Ok(req)
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
    let worker = load_engine_with_text(
        &fam,
        roles,
        &args.runtime,
        args.max_sessions,
        args.text_encoder_device.clone(),
        args.text_cache,
    )?;
    set_batching(&worker, args.batch.batching())?;
    let local = Local::new(worker.clone());
    expire_idle(worker.clone(), args.session_ttl);
    if role == "drafter" {
        let svc = drafter::DrafterService::new(local, args.max_sessions)
            .await?
            .panic_after(args.test_panic_after_calls);
        serve(
            role,
            &args.common,
            &worker,
            |r| {
                r.add_service(tonic::service::interceptor::InterceptedService::new(
                    mulo_proto::v1::drafter_server::DrafterServer::new(svc)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    bounded_deadline,
                ))
            },
            None,
        )
        .await
    } else {
        let svc = verifier::VerifierService::new(local, args.max_sessions)
            .await?
            .panic_after(args.test_panic_after_calls);
        serve(
            role,
            &args.common,
            &worker,
            |r| {
                r.add_service(tonic::service::interceptor::InterceptedService::new(
                    mulo_proto::v1::verifier_server::VerifierServer::new(svc)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    bounded_deadline,
                ))
            },
            None,
        )
        .await
    }
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
    let max = mulo_core::limits::MAX_DEADLINE_SECONDS;
    if !(args.request_timeout > 0.0 && args.request_timeout <= max) {
        bail!("invalid --request-timeout: must be more than 0 and at most {max} seconds");
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
        pixels_per_token: mulo_model::ModelConfig::load_vq(&fam.path(Member::Vq)?)?
            .downsample_factor() as usize,
    };
    if let Some(tls) = args.roles_tls.client_tls()? {
        client::use_role_tls(tls)?;
    }
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
    let vq = load_engine(&fam, none, &args.runtime, 1)?;
    let own = vq.clone();
    let svc = gateway::GatewayService::new(
        info,
        drafters,
        verifiers,
        gateway::GatewayLimits {
            max_in_flight: args.max_in_flight,
            max_migrations: args.max_migrations,
            request_timeout: Duration::from_secs_f64(args.request_timeout),
            auth: args.auth.auth()?.map(Arc::new),
        },
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
    let http = args.http_listen.map(|a| (a, svc.clone()));
    serve(
        "gateway",
        &args.common,
        &own,
        |r| {
            r.add_service(
                mulo_proto::v1::gateway_server::GatewayServer::new(svc)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        },
        http,
    )
    .await
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
