//! mulo's engine: the torch worker thread that owns every model of a process, and the generation
//! methods built on the models. (Later issues add the MuLo-SD roles and cycle here.)

pub mod ar;
pub mod data;
pub mod error;
pub mod eval;
pub mod family;
pub mod prompt;
pub mod score;
pub mod train;
pub mod worker;

pub use ar::{generate_ar, Generation, GenerationStats};
pub use error::EngineError;
pub use family::{default_family_dir, Family, Member};
pub use score::{score_tokens, Scores};
pub use worker::TorchWorker;
