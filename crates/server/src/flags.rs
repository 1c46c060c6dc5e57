//! The clap flag structs of the services: [`CommonArgs`] (every service), [`RoleArgs`]
//! (`mulo-drafter`, `mulo-verifier`) and [`GatewayArgs`] (`mulo-gateway`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser};

use mulo_engine::{BatchLimits, Batching};

use crate::metrics;
use crate::runtime::RuntimeArgs;

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
    /// PEM certificate chain to serve TLS with (with --tls-key). Unset: plaintext. Re-read when
    /// it changes on disk.
    #[arg(long, env = "MULO_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MULO_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: PEM CA bundle that must sign every client's certificate (the roles: the
    /// gateway's); clients without one are refused during the handshake. Needs --tls-cert.
    #[arg(
        long,
        env = "MULO_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// Address to serve grpc.health.v1 alone on, in plaintext (for probes that cannot speak
    /// TLS, e.g. Kubernetes' gRPC probes). Unset: health on the main port only.
    #[arg(long, env = "MULO_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
}

impl CommonArgs {
    /// The server's TLS, when --tls-cert is set.
    pub(crate) fn server_tls(&self) -> Result<Option<crate::tls::ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(crate::tls::ServerTls::new(crate::tls::ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        })?))
    }

    /// Starts the metrics endpoint when one is asked for.
    pub(crate) fn metrics(&self, service: &str) -> Result<()> {
        match self.metrics_listen {
            Some(addr) => metrics::install(service, addr),
            None => Ok(()),
        }
    }
}

/// Continuous batching of a process that runs roles: every role call waiting on the torch thread
/// joins the next batched forward pass of its model.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Sessions one batched forward pass serves at most (continuous batching across requests);
    /// 1 serves one session at a time.
    #[arg(long, env = "MULO_MAX_BATCH_SESSIONS", default_value_t = BatchLimits::default().max_sessions,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch_sessions: usize,
    /// Input tokens one batched forward pass holds at most (each session's new tokens times its
    /// rows, 2 with CFG); a single larger call still runs, alone.
    #[arg(long, env = "MULO_MAX_BATCH_TOKENS", default_value_t = BatchLimits::default().max_tokens,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch_tokens: usize,
    /// Role calls running or waiting on the torch thread at most; more are refused at once with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MULO_MAX_QUEUE", default_value_t = Batching::default().max_queue,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_queue: usize,
}

impl BatchArgs {
    /// The engine's batching settings.
    pub fn batching(&self) -> Batching {
        Batching {
            limits: BatchLimits {
                max_sessions: self.max_batch_sessions,
                max_tokens: self.max_batch_tokens,
            },
            max_queue: self.max_queue,
        }
    }

    /// The same settings as service flags (to start services with them).
    pub fn to_flags(&self) -> Vec<String> {
        vec![
            "--max-batch-sessions".into(),
            self.max_batch_sessions.to_string(),
            "--max-batch-tokens".into(),
            self.max_batch_tokens.to_string(),
            "--max-queue".into(),
            self.max_queue.to_string(),
        ]
    }
}

/// Flags of `mulo-drafter` and `mulo-verifier`.
#[derive(Debug, Clone, Parser)]
pub struct RoleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Sessions (requests) this replica holds at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MULO_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// Seconds after which an idle session (its gateway gone) is freed.
    #[arg(long, env = "MULO_SESSION_TTL", default_value_t = 60.0)]
    pub session_ttl: f64,
    /// Verifier only: also load the family's small draft model (the SD and LANTERN baselines).
    #[arg(long, env = "MULO_DRAFT_MODEL", default_value_t = true, action = clap::ArgAction::Set)]
    pub draft_model: bool,
    /// Verifier only, families with a T5 text encoder: the device it runs on (cpu, cuda, cuda:N;
    /// default: --device). Text prompts are encoded here once per request.
    #[arg(long, env = "MULO_TEXT_ENCODER_DEVICE", value_name = "DEVICE")]
    pub text_encoder_device: Option<String>,
    /// Verifier only: prompts whose caption features are kept (least recently used out first).
    #[arg(long, env = "MULO_TEXT_CACHE", default_value_t = mulo_engine::prompt::TEXT_CACHE_DEFAULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub text_cache: usize,
    /// Test-only fault hook: the Nth draft (drafter) or verify (verifier) call panics the torch
    /// thread, as a fatal libtorch error would.
    #[arg(long, hide = true, value_name = "N")]
    pub test_panic_after_calls: Option<u64>,
}

/// Bearer tokens at the gateway and their per-token limits.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Bearer tokens callers must send (`authorization: Bearer <token>`): a file of `name:token`
    /// lines, or a directory with one file per token named for it (a Kubernetes Secret mounted
    /// as a volume). Re-read when it changes. Unset: every caller is admitted.
    #[arg(long, env = "MULO_AUTH_TOKENS", value_name = "PATH")]
    pub auth_tokens: Option<std::path::PathBuf>,
    /// Requests per second one token may start on average (token bucket); 0 = no rate limit,
    /// else at least 0.001.
    #[arg(long, env = "MULO_TOKEN_RATE", default_value_t = 10.0)]
    pub token_rate: f64,
    /// Requests one token may start at once after being idle (the bucket's size).
    #[arg(long, env = "MULO_TOKEN_BURST", default_value_t = 20.0)]
    pub token_burst: f64,
    /// Requests of one token generated at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MULO_TOKEN_MAX_IN_FLIGHT", default_value_t = 16,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub token_max_in_flight: usize,
}

impl AuthArgs {
    /// The gateway's token check, when tokens are configured.
    pub fn auth(&self) -> Result<Option<crate::auth::Auth>> {
        let Some(path) = &self.auth_tokens else {
            return Ok(None);
        };
        if !(self.token_rate == 0.0 || (self.token_rate.is_finite() && self.token_rate >= 0.001)) {
            anyhow::bail!("invalid --token-rate: must be 0 (no limit) or at least 0.001");
        }
        if !(self.token_burst.is_finite() && self.token_burst >= 1.0) {
            anyhow::bail!("invalid --token-burst: must be a number >= 1");
        }
        let limits = crate::auth::TokenLimits {
            rate: self.token_rate,
            burst: self.token_burst,
            max_in_flight: self.token_max_in_flight,
        };
        Ok(Some(crate::auth::Auth::new(path.clone(), limits)?))
    }
}

/// TLS of the gateway's connections to the drafters and verifiers.
#[derive(Debug, Clone, Args)]
pub struct RolesTlsArgs {
    /// PEM CA bundle the roles' certificates must chain to; set: the gateway speaks TLS to the
    /// roles. Re-read when it changes (each new connection uses the files as they are).
    #[arg(long, env = "MULO_ROLES_CA", value_name = "FILE")]
    pub roles_ca: Option<PathBuf>,
    /// Mutual TLS: PEM client certificate the gateway presents to the roles (with --roles-key).
    #[arg(long, env = "MULO_ROLES_CERT", value_name = "FILE", requires_all = ["roles_key", "roles_ca"])]
    pub roles_cert: Option<PathBuf>,
    /// PEM key of --roles-cert.
    #[arg(
        long,
        env = "MULO_ROLES_KEY",
        value_name = "FILE",
        requires = "roles_cert"
    )]
    pub roles_key: Option<PathBuf>,
    /// Name the roles' certificates are checked against (default: the host of each endpoint;
    /// set it when endpoints resolve to pod IPs and the certificates name the Service).
    #[arg(
        long,
        env = "MULO_ROLES_SERVER_NAME",
        value_name = "NAME",
        requires = "roles_ca"
    )]
    pub roles_server_name: Option<String>,
}

impl RolesTlsArgs {
    /// The client TLS of the channels to the roles, when --roles-ca is set.
    pub fn client_tls(&self) -> Result<Option<crate::tls::ClientTls>> {
        let Some(ca) = &self.roles_ca else {
            return Ok(None);
        };
        Ok(Some(crate::tls::ClientTls::new(crate::tls::ClientFiles {
            ca: ca.clone(),
            cert: self.roles_cert.clone(),
            key: self.roles_key.clone(),
            server_name: self.roles_server_name.clone(),
        })?))
    }
}

/// Flags of `mulo-gateway`.
#[derive(Debug, Clone, Parser)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub roles_tls: RolesTlsArgs,
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
    /// Seconds a request may take when its client sets no deadline or a longer one; past it the
    /// request fails DEADLINE_EXCEEDED and its sessions are freed. Client deadlines above 3600 s
    /// are refused (INVALID_ARGUMENT).
    #[arg(
        long,
        env = "MULO_REQUEST_TIMEOUT",
        default_value_t = 600.0,
        value_name = "SECONDS"
    )]
    pub request_timeout: f64,
    /// Seconds between re-resolutions of the endpoint names given to --drafter and --verifier
    /// (pods joining or leaving a headless Service); 0 = resolve once at start-up. A name that
    /// does not resolve keeps the previous addresses.
    #[arg(long, env = "MULO_RESOLVE_INTERVAL", default_value_t = 30.0)]
    pub resolve_interval: f64,
    /// Also serve HTTP on this address (`host:port`; port 0 picks one): an OpenAI-style
    /// `POST /v1/images/generations`, `GET /v1/models`, `/healthz`, `/readyz` and a live page at
    /// `/` (docs/http.md). Same tokens and limits as gRPC; HTTPS with the --tls-cert files.
    /// Off when unset.
    #[arg(long, env = "MULO_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<std::net::SocketAddr>,
}
