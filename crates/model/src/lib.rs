//! mulo's models on libtorch: the LlamaGen GPT (c2i and t2i) with a preallocated KV cache and
//! masked forwards at arbitrary positions, the LlamaGen VQ tokenizer, LlamaGen-exact sampling and
//! the project's checkpoint format (`config.json` + `model.safetensors` with LlamaGen names).

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod evaluator;
pub mod gpt;
pub mod image_io;
pub mod kv;
pub mod rope;
pub mod sampling;
pub mod seed;
pub mod t5;
pub mod text;
pub mod upsampler;
pub mod vq;

pub use batch::BatchInput;
pub use config::{DType, GptConfig, ModelConfig, VqConfig};
pub use device::parse_device;
pub use error::{ModelError, Result};
pub use gpt::Gpt;
pub use kv::KvCache;
pub use t5::{T5Config, T5Encoder};
pub use text::TextEncoder;
pub use upsampler::{Upsampler, UpsamplerConfig};
pub use vq::VqModel;
