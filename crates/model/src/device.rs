//! Device and dtype selection.

use tch::{Device, Kind};

use crate::config::DType;
use crate::error::{ModelError, Result};

/// Parses `cpu`, `cuda` or `cuda:N` and checks that the device exists.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    let dev = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0usize,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(ModelError::Device(format!(
                    "'{s}' is not a device; use cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if !tch::Cuda::is_available() {
        return Err(ModelError::Device(format!(
            "'{s}' requested but CUDA is not available in this build or on this machine"
        )));
    }
    let count = tch::Cuda::device_count() as usize;
    if dev >= count {
        return Err(ModelError::Device(format!(
            "'{s}' requested but only {count} CUDA device(s) are visible"
        )));
    }
    Ok(Device::Cuda(dev))
}

impl DType {
    /// The torch kind of this dtype.
    pub fn kind(self) -> Kind {
        match self {
            DType::Fp32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::Fp16 => Kind::Half,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let e = parse_device("gpu0").unwrap_err().to_string();
        assert!(e.contains("cpu, cuda or cuda:N"), "{e}");
        if !tch::Cuda::is_available() {
            assert!(parse_device("cuda:0").is_err());
        }
    }
}
