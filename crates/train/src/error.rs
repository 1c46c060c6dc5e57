//! Errors of training, data building and evaluation.

use mulo_engine::EngineError;
use mulo_model::ModelError;

/// Everything training, evaluation and the benchmark can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A training run failed (the message names the file or setting).
    #[error("training: {0}")]
    Train(String),
    /// An evaluation run failed (the message names the file or setting).
    #[error("evaluation: {0}")]
    Eval(String),
    /// A run stopped early by its step or time budget, with a checkpoint to `--resume` from.
    #[error("paused at step {step} of {total}: the checkpoint is saved, continue with --resume")]
    Paused {
        /// Steps completed (and checkpointed).
        step: usize,
        /// Steps of the whole run.
        total: usize,
    },
    /// The engine (roles, family, worker) failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model refused the input or failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}
