//! The bounds of every request parameter (docs/security.md lists them). The gateway enforces them
//! when it parses a request and the roles again on every call, so that no request — through the
//! gateway or straight to a role — can ask a replica for unbounded memory or time.

use crate::params::ParamError;

/// MuLo-SD's pool size `pool_k` at most: each distinct `k` costs the verifier a `[V, k]`
/// nearest-code table (V = 16384 for LlamaGen's tokenizer: 1024 → 128 MiB on the device).
pub const MAX_POOL_K: usize = 1024;
/// LANTERN's proximity-set size `k` at most (the same kind of table as `pool_k`).
pub const MAX_LANTERN_K: usize = 1024;
/// Draft tokens per target pass (`gamma`, SD and LANTERN) at most.
pub const MAX_GAMMA: usize = 16;
/// MuLo-SD's expansion radius at most.
pub const MAX_RADIUS: usize = 8;
/// Low-resolution rows drafted per cycle at most.
pub const MAX_BLOCK_ROWS: usize = 64;
/// ZipAR window (tokens of a low-resolution row) at most.
pub const MAX_ZIPAR_WINDOW: usize = 256;
/// Largest Jacobi window (positions per island per pass; 0 = the whole island).
pub const MAX_JACOBI_WINDOW: usize = 4096;
/// Largest wavefront lag (columns; 0 = no wavefront).
pub const MAX_WAVEFRONT: usize = 4096;
/// Classifier-free guidance scale at most.
pub const MAX_CFG_SCALE: f64 = 100.0;
/// Sampling temperature at most.
pub const MAX_TEMPERATURE: f64 = 100.0;
/// `top_k` at most (any value at or above the vocabulary keeps every token).
pub const MAX_TOP_K: usize = 1 << 20;
/// A text prompt's length in bytes (UTF-8) at most.
pub const MAX_PROMPT_BYTES: usize = 4096;
/// Caption feature rows (tokens) at most.
pub const MAX_CAPTION_ROWS: usize = 512;
/// Caption feature width at most.
pub const MAX_CAPTION_DIM: usize = 8192;
/// Caption feature values (rows × width) at most: 8 MiB of f32.
pub const MAX_CAPTION_VALUES: usize = 1 << 21;
/// Tokens of any list a call carries (a grid, proposals, positions to resample) at most.
pub const MAX_TOKENS: usize = 1 << 16;
/// A request's deadline at most, in seconds (also the gateway's default deadline).
pub const MAX_DEADLINE_SECONDS: f64 = 3600.0;
/// Bytes of one gRPC message at most, on every server and client (caption features at their
/// bound plus headroom).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Images one HTTP `POST /v1/images/generations` asks for (`n`).
pub const MAX_HTTP_IMAGES: usize = 8;
/// Bytes of an HTTP request body (a generation request is a few hundred bytes; a prompt is at
/// most [`MAX_PROMPT_BYTES`]).
pub const MAX_HTTP_BODY_BYTES: usize = 64 << 10;

/// `field` must be at most `max` (the error names the bound).
pub fn at_most(field: &'static str, value: usize, max: usize) -> Result<(), ParamError> {
    if value > max {
        return Err(ParamError::new(
            field,
            format!("must be at most {max}, got {value}"),
        ));
    }
    Ok(())
}

/// `field` must be between 1 and `max` (the error names the bound).
pub fn in_range(field: &'static str, value: usize, max: usize) -> Result<(), ParamError> {
    if value == 0 {
        return Err(ParamError::new(
            field,
            format!("must be at least 1 (and at most {max}), got 0"),
        ));
    }
    at_most(field, value, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_bound() {
        assert!(at_most("k", 8, 8).is_ok());
        let e = at_most("k", 9, 8).unwrap_err();
        assert_eq!(e.field, "k");
        assert!(e.to_string().contains("at most 8"), "{e}");
        let e = in_range("gamma", 0, 16).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        assert!(in_range("gamma", 17, 16).is_err());
        assert!(in_range("gamma", 16, 16).is_ok());
    }
}
