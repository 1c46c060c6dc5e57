//! Where and how the models of a process run (shared by `mulo` and the service binaries).

use anyhow::{bail, Result};
use clap::Args;
use mulo_model::{parse_device, DType};

/// Where and how models run.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "MULO_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weight and activation dtype: fp32, bf16 or fp16 (norms and logits stay fp32). Default: fp32
    /// on the CPU (half-precision matrix products are slow there), the dtype in the model's
    /// config.json on CUDA.
    #[arg(long, env = "MULO_DTYPE")]
    pub dtype: Option<DType>,
    /// Torch intra-op threads (default: torch's choice, one per core).
    #[arg(long, env = "MULO_THREADS")]
    pub threads: Option<i32>,
}

impl RuntimeArgs {
    /// Applies the thread count and resolves the device; call on the torch thread.
    pub fn setup(&self) -> Result<tch::Device> {
        if let Some(n) = self.threads {
            if n < 1 {
                bail!("invalid --threads: must be at least 1, got {n}");
            }
            tch::set_num_threads(n);
        }
        Ok(parse_device(&self.device)?)
    }

    /// The dtype models run in on `device`: the flag, else fp32 on the CPU, else `None` (each
    /// model's config.json).
    pub fn dtype_for(&self, device: tch::Device) -> Option<DType> {
        match (self.dtype, device) {
            (Some(d), _) => Some(d),
            (None, tch::Device::Cpu) => Some(DType::Fp32),
            (None, _) => None,
        }
    }
}
