//! Errors of the engine.

use mulo_core::ParamError;
use mulo_model::ModelError;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request parameter is invalid (the message names it).
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The model refused the input or failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A training or evaluation run failed (the message names the file or setting).
    #[error("training: {0}")]
    Train(String),
    /// A model family is missing or malformed (the message names the file or member).
    #[error("family: {0}")]
    Family(String),
    /// An evaluation run failed (the message names the file or setting).
    #[error("evaluation: {0}")]
    Eval(String),
    /// The torch worker thread is gone (it panicked or was shut down).
    #[error("the torch worker thread has stopped")]
    WorkerGone,
}
