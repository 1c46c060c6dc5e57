//! mulo's services (DESIGN §5): the drafter and verifier roles behind gRPC, the gateway that runs
//! the engine's coordinator over gRPC clients of them, and what every service shares — flags, the
//! `Capabilities/Info` handshake, `grpc.health.v1`, server reflection and a graceful drain on
//! SIGTERM / Ctrl-C.

pub mod auth;
pub mod client;
pub mod convert;
pub mod drafter;
pub mod failover;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod runtime;
pub mod telemetry;
pub mod tls;
pub mod verifier;

mod bootstrap;
mod flags;
mod resolution;
mod role_base;

pub use bootstrap::{
    load_engine, main_gateway, main_role, serve_gateway, serve_role, set_batching,
};
pub use flags::{BatchArgs, CommonArgs, GatewayArgs, RoleArgs};
pub use mulo_proto::v1 as proto;
pub use resolution::expand;
pub use runtime::RuntimeArgs;

/// Set when SIGTERM / Ctrl-C arrived: the process drains (reported by every `Status` call).
pub static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
