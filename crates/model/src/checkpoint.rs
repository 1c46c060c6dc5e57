//! Reading and writing weights as safetensors with LlamaGen parameter names.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn::VarStore, Kind, Tensor};

use crate::config::{weights_path, DType, ModelConfig};
use crate::error::{ModelError, Result};

/// Converts `vs` to `dtype`, loads `<dir>/model.safetensors` into it and freezes it (loaded models
/// serve inference; training unfreezes). Returns the file's unused tensor names.
pub(crate) fn load_dir_weights(vs: &mut VarStore, dir: &Path, dtype: DType) -> Result<Vec<String>> {
    vs.set_kind(dtype.kind());
    let unused = load_into(vs, &weights_path(dir))?;
    vs.freeze();
    Ok(unused)
}

/// Writes `config` (with `dtype` as its stored dtype) and the weights of `vs` in `dtype` to `dir`.
pub(crate) fn save_dir(config: ModelConfig, vs: &VarStore, dir: &Path, dtype: DType) -> Result<()> {
    config.save(dir)?;
    save(vs, &weights_path(dir), dtype.kind())
}

/// Copies every variable of `vs` from the safetensors file at `path`, converting dtype and device.
///
/// A missing tensor or a tensor of another shape is an error naming it; tensors the model does not
/// use are returned (sorted) so that callers can warn about them.
pub fn load_into(vs: &VarStore, path: &Path) -> Result<Vec<String>> {
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let mut file: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file: {e}"),
        })?
        .into_iter()
        .collect();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in vars {
        let expected = var.size();
        let Some(src) = file.remove(&name) else {
            return Err(ModelError::MissingTensor {
                file: path.to_path_buf(),
                name,
                expected,
            });
        };
        let actual = src.size();
        if actual != expected {
            return Err(ModelError::ShapeMismatch {
                file: path.to_path_buf(),
                name,
                expected,
                actual,
            });
        }
        if !matches!(
            src.kind(),
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            return Err(ModelError::Config(format!(
                "{}: tensor '{name}' has dtype {:?}, expected a float type",
                path.display(),
                src.kind()
            )));
        }
        let src = src.to_kind(var.kind()).to_device(var.device());
        tch::no_grad(|| var.f_copy_(&src))?;
    }
    let mut unused: Vec<String> = file.into_keys().collect();
    unused.sort();
    Ok(unused)
}

/// Writes every variable of `vs` to `path`, converted to `kind`.
pub fn save(vs: &VarStore, path: &Path, kind: Kind) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let t = t.detach().to_kind(kind).to_device(tch::Device::Cpu);
            (n, t.contiguous())
        })
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    Tensor::write_safetensors(&vars, path).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: format!("cannot write safetensors: {e}"),
    })
}
