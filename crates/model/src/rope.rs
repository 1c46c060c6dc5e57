//! LlamaGen's 2D rotary position embedding.
//!
//! Head dim `hd`: `freqs[m] = 1 / base^(2m / (hd/2))` for `m < hd/4`. Grid cell `(a, b)` gets the
//! angles `concat(a·freqs, b·freqs)` (`hd/2` angles), applied to interleaved pairs `(2m, 2m+1)`. The
//! table is indexed by absolute position; the first `cls_token_num` positions (the condition) have
//! `cos = sin = 0`, which zeroes their queries and keys (a LlamaGen quirk that must be kept for its
//! checkpoints; the project's own caption models may leave them unrotated instead).

use mulo_core::GridSize;
use tch::{Device, Kind, Tensor};

/// Cos and sin tables `[cls_token_num + rows·cols, hd/2]` in fp32.
#[derive(Debug)]
pub struct RopeTable {
    /// Cosines.
    pub cos: Tensor,
    /// Sines.
    pub sin: Tensor,
}

impl RopeTable {
    /// Builds the table on `device`. `zero_condition` gives the condition positions `cos = sin = 0`
    /// (LlamaGen); otherwise `cos = 1, sin = 0`, which leaves their queries and keys as they are.
    pub fn new(
        grid: GridSize,
        head_dim: i64,
        base: f64,
        cls_token_num: i64,
        zero_condition: bool,
        device: Device,
    ) -> Self {
        let half = head_dim / 2;
        let freqs = Tensor::arange_start_step(0, half, 2, (Kind::Float, Device::Cpu))
            .narrow(0, 0, half / 2)
            .divide_scalar(half as f64);
        let freqs = Tensor::from(base as f32).pow(&freqs).reciprocal();
        let rows = Tensor::arange(grid.rows as i64, (Kind::Float, Device::Cpu));
        let cols = Tensor::arange(grid.cols as i64, (Kind::Float, Device::Cpu));
        let fr = rows.outer(&freqs); // [rows, hd/4]
        let fc = cols.outer(&freqs); // [cols, hd/4]
        let q = half / 2;
        let grid_angles = Tensor::cat(
            &[
                fr.unsqueeze(1)
                    .expand([grid.rows as i64, grid.cols as i64, q], false),
                fc.unsqueeze(0)
                    .expand([grid.rows as i64, grid.cols as i64, q], false),
            ],
            -1,
        )
        .reshape([grid.len() as i64, half]);
        let zeros = Tensor::zeros([cls_token_num, half], (Kind::Float, Device::Cpu));
        let cond_cos = if zero_condition {
            zeros.shallow_clone()
        } else {
            zeros.ones_like()
        };
        let cos = Tensor::cat(&[cond_cos, grid_angles.cos()], 0).to_device(device);
        let sin = Tensor::cat(&[zeros, grid_angles.sin()], 0).to_device(device);
        Self { cos, sin }
    }

    /// Number of positions in the table.
    pub fn len(&self) -> i64 {
        self.cos.size()[0]
    }

    /// True when the table has no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotates `x` `[B, S, H, hd]` at absolute `positions`, `[S]` for every sequence or `[B, S]`
    /// per sequence (computed in fp32, cast back).
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        let sz = x.size();
        let (b, s, h, hd) = (sz[0], sz[1], sz[2], sz[3]);
        let xs = x.to_kind(Kind::Float).reshape([b, s, h, hd / 2, 2]);
        let x0 = xs.select(-1, 0);
        let x1 = xs.select(-1, 1);
        let pb = if positions.dim() == 2 { b } else { 1 };
        let flat = positions.reshape([-1]);
        let c = self.cos.index_select(0, &flat).view([pb, s, 1, hd / 2]);
        let sn = self.sin.index_select(0, &flat).view([pb, s, 1, hd / 2]);
        let o0 = &x0 * &c - &x1 * &sn;
        let o1 = &x1 * &c + &x0 * &sn;
        Tensor::stack(&[o0, o1], -1)
            .reshape([b, s, h, hd])
            .to_kind(x.kind())
    }
}
