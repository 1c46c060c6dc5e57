//! The verifier's nearest-code table: one `[V, W]` table of each code's `W` nearest codes (itself
//! first), `W` the largest pool size a request may ask for (capped at V). Rows are sorted by
//! (distance, id), a total order, so the table of any `k <= W` is the first `k` columns of this
//! one: every `pool_k` and LANTERN `k` is a view of it. It is built once (at warm-up), so no
//! request — whatever `k` it asks for — builds a table on the torch thread or adds memory.

use std::rc::Rc;

use mulo_core::limits::{MAX_LANTERN_K, MAX_POOL_K};
use mulo_core::ParamError;
use tch::Tensor;

/// Columns of the table: the largest pool size a request may ask for.
pub const WIDTH: usize = if MAX_POOL_K > MAX_LANTERN_K {
    MAX_POOL_K
} else {
    MAX_LANTERN_K
};

/// The `[V, W]` table, on the host (LANTERN's proximity sets) and on the device (MuLo-SD's
/// pooled mass). Cheap to clone.
#[derive(Debug, Clone)]
pub struct NearestCodes {
    /// Row-major `[V, width]` code ids.
    host: Rc<Vec<u32>>,
    /// The same as int64 on the model's device.
    device: Rc<Tensor>,
    width: usize,
}

impl NearestCodes {
    /// The table from its row-major `[V, width]` ids, copied to `device`.
    pub fn new(host: Vec<u32>, width: usize, device: tch::Device) -> Self {
        let t: Vec<i64> = host.iter().map(|&x| i64::from(x)).collect();
        let v = host.len() / width.max(1);
        let dev = Tensor::from_slice(&t)
            .view([v as i64, width as i64])
            .to_device(device);
        Self {
            host: Rc::new(host),
            device: Rc::new(dev),
            width,
        }
    }

    /// `k` within its bound (1 to [`WIDTH`]), clamped to the table's width (a pool larger than
    /// the codebook is the whole codebook).
    pub fn columns(&self, field: &'static str, k: usize) -> Result<usize, ParamError> {
        mulo_core::limits::in_range(field, k, WIDTH)?;
        Ok(k.min(self.width))
    }

    /// The `[V, k]` table on the device (a view).
    pub fn device(&self, k: usize) -> Tensor {
        self.device.narrow(1, 0, k.min(self.width) as i64)
    }

    /// The `k` nearest codes of `code`, itself first.
    pub fn row(&self, code: usize, k: usize) -> &[u32] {
        let start = code * self.width;
        &self.host[start..start + k.min(self.width)]
    }

    /// Bytes the table holds (host and device).
    pub fn bytes(&self) -> usize {
        self.host.len() * (4 + 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mulo_core::spec::nearest_codes;

    /// Random code vectors (seeded) with a duplicate, so that ties occur.
    fn codes(v: usize, dim: usize) -> Vec<f32> {
        let mut x: u64 = 7;
        let mut out: Vec<f32> = (0..v * dim)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        out.copy_within(0..dim, dim);
        out
    }

    #[test]
    fn every_smaller_table_is_a_prefix_of_the_wide_one() {
        let (v, dim) = (40, 3);
        let c = codes(v, dim);
        let wide = NearestCodes::new(nearest_codes(&c, dim, v), v, tch::Device::Cpu);
        for k in [1, 2, 5, 17, v] {
            let own = nearest_codes(&c, dim, k);
            for code in 0..v {
                assert_eq!(wide.row(code, k), &own[code * k..(code + 1) * k], "k {k}");
            }
            let dev = Vec::<i64>::try_from(wide.device(k).contiguous().reshape([-1])).unwrap();
            let own: Vec<i64> = own.iter().map(|&x| i64::from(x)).collect();
            assert_eq!(dev, own, "k {k} on the device");
        }
    }

    #[test]
    fn k_is_bounded_then_clamped_to_the_codebook() {
        let t = NearestCodes::new(vec![0, 1, 1, 0], 2, tch::Device::Cpu);
        assert_eq!(t.columns("pool_k", 1).unwrap(), 1);
        assert_eq!(t.columns("pool_k", WIDTH).unwrap(), 2);
        for k in [0, WIDTH + 1] {
            assert_eq!(t.columns("pool_k", k).unwrap_err().field, "pool_k");
        }
    }
}
