//! Errors of the model crate.

use std::path::PathBuf;

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong loading or running a model. Messages name the file, tensor or
/// field concerned.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A checkpoint lacks a tensor the model needs.
    #[error("{file}: missing tensor '{name}' (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint file.
        file: PathBuf,
        /// LlamaGen name of the tensor.
        name: String,
        /// Shape the model expects.
        expected: Vec<i64>,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("{file}: tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint file.
        file: PathBuf,
        /// LlamaGen name of the tensor.
        name: String,
        /// Shape the model expects.
        expected: Vec<i64>,
        /// Shape found in the file.
        actual: Vec<i64>,
    },
    /// A configuration value is unusable.
    #[error("invalid config: {0}")]
    Config(String),
    /// A request does not fit the model (shapes, ids, lengths).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A forward would write past the preallocated KV cache.
    #[error("KV cache capacity exceeded: position {position} does not fit a cache of {capacity} positions")]
    KvCapacity {
        /// The offending absolute position.
        position: i64,
        /// Positions the cache holds.
        capacity: i64,
    },
    /// The requested device is not available.
    #[error("device: {0}")]
    Device(String),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
