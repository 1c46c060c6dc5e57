//! Scaffolding shared by the `mulo-drafter`, `mulo-verifier` and `mulo-gateway` binaries: flags,
//! the `Capabilities/Info` handshake, `grpc.health.v1`, server reflection and a graceful drain on
//! SIGTERM / Ctrl-C. The roles' own APIs are added by later work; today each service answers only
//! these.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use mulo_proto::v1::capabilities_server::{Capabilities, CapabilitiesServer};
use mulo_proto::v1::{InfoRequest, InfoResponse};
use tonic::{Request, Response, Status};

/// Flags every service takes.
#[derive(Debug, Clone, Parser)]
pub struct ServiceArgs {
    /// Address to listen on for gRPC.
    #[arg(long, env = "MULO_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MULO_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug)]
struct InfoService {
    role: &'static str,
}

#[tonic::async_trait]
impl Capabilities for InfoService {
    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            role: self.role.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            models: Vec::new(),
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

/// Serves a role until SIGTERM or Ctrl-C, then drains in-flight calls and returns.
pub async fn serve(role: &'static str, args: ServiceArgs) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .try_init();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<CapabilitiesServer<InfoService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mulo_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    tracing::info!(role, listen = %args.listen, "serving");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(CapabilitiesServer::new(InfoService { role }))
        .serve_with_shutdown(args.listen, shutdown_signal())
        .await
        .with_context(|| format!("serving on {}", args.listen))?;
    Ok(())
}

/// The whole `main` of a service binary.
pub fn main(role: &'static str) -> std::process::ExitCode {
    let args = ServiceArgs::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(role, args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
