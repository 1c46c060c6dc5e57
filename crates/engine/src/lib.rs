//! mulo's engine: the torch worker thread that owns every model of a process, the drafter and
//! verifier roles, and the coordinator that runs every generation method through them.

pub mod ar;
pub mod batching;
pub mod coordinator;
pub mod drafter;
pub mod error;
pub mod family;
pub mod family_check;
pub mod pool_tables;
pub mod prompt;
pub mod resample;
pub mod roles;
pub mod score;
pub mod session;
pub mod verifier;
pub mod worker;

pub use ar::{generate_ar, Generation, GenerationStats};
pub use batching::{BatchLimits, BatchStats};
pub use coordinator::{generate, BlockEvent, GenerateRequest, MethodStats, Outcome};
pub use error::EngineError;
pub use family::{default_family_dir, Family, Member};
pub use roles::{
    Batching, DrafterRole, Engine, LoadedModel, Local, RoleSet, TextOptions, VerifierRole,
};
pub use score::{pool_table, score_tokens, target_nll, Scores, TargetNll};
pub use session::{SessionRef, SessionSpec};
pub use worker::TorchWorker;
