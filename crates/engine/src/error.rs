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
    /// A model's caption tokenizer cannot be read (the message names the file).
    #[error("caption tokenizer: {0}")]
    Tokenizer(String),
    /// A model family is missing or malformed (the message names the file or member).
    #[error("family: {0}")]
    Family(String),
    /// A stateful call does not match the role's session state (stale epoch, wrong committed
    /// length, nothing pending): the caller re-syncs (`FAILED_PRECONDITION`).
    #[error("session state: {0}")]
    Precondition(String),
    /// No session with that id on this role (expired, released or never opened).
    #[error("unknown session {0}")]
    UnknownSession(String),
    /// A role has no room for another session or a longer one (`RESOURCE_EXHAUSTED`).
    #[error("capacity: {0}")]
    Capacity(String),
    /// The role does not hold the model a call needs (e.g. SD without a draft model).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A remote role failed or could not be reached (the caller falls back or migrates).
    #[error("{peer}: {code}: {message}")]
    Peer {
        /// The peer's address.
        peer: String,
        /// The gRPC status code.
        code: String,
        /// The peer's message.
        message: String,
    },
    /// A batched pass shared by several calls failed (`INTERNAL`; the message is the model's).
    #[error("internal: {0}")]
    Internal(String),
    /// The torch worker thread is gone (it panicked or was shut down).
    #[error("the torch worker thread has stopped")]
    WorkerGone,
}
