//! Several sequence groups in one forward: the inputs of every group padded to one length, their
//! positions, their attention masks and where their keys and values go in a shared KV cache.
//!
//! A group is one session's forward (its one cache row, two with CFG); groups differ in length,
//! positions and masks. Padding queries attend to column 0 only, write nothing and are cut from
//! the output, so each group's result equals its own forward up to float rounding.

use std::collections::HashSet;

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::kv::KvCache;

/// One sequence group of a batched forward ([`crate::Gpt::forward_batch`]).
#[derive(Debug)]
pub struct BatchInput {
    /// Inputs `[rows.len(), S, dim]`.
    pub x: Tensor,
    /// The cache rows of its sequences (a session's one row, or two with CFG), distinct across the
    /// groups of a batch.
    pub rows: Vec<i64>,
    /// Absolute positions of the `S` inputs (the same in every row), distinct.
    pub positions: Vec<i64>,
    /// `[S, W]` bool: which cache columns each input attends to (as in [`crate::Gpt::forward`]);
    /// `None`: causal by position.
    pub mask: Option<Tensor>,
}

/// A validated batch, laid out for the layers.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    /// Inputs `[B, S, dim]`, zero-padded.
    pub x: Tensor,
    /// Positions `[B, S]` (0 for padding).
    pub positions: Tensor,
    /// Attention mask `[B, 1, S, W]`.
    pub mask: Tensor,
    /// Cache rows `[B]`; `None` when they are the cache's rows in order (no gather needed).
    pub rows: Option<Tensor>,
    /// Cache columns the batch reads.
    pub width: i64,
    /// Row and position of every real input, in `[B·S]` order of the real ones.
    pub write_rows: Tensor,
    pub write_positions: Tensor,
    /// Indices of the real inputs in `[B·S]`; `None` when nothing is padded.
    pub write_from: Option<Tensor>,
    /// `(first row, rows, S)` of each group in the batch.
    pub spans: Vec<(i64, i64, i64)>,
    /// Highest position written.
    pub max_position: i64,
}

fn invalid(msg: String) -> ModelError {
    ModelError::InvalidInput(msg)
}

/// Checks one group against the cache and the model width; returns its mask width.
fn check_group(g: &BatchInput, dim: i64, cache: &KvCache) -> Result<i64> {
    let (n, s) = (g.rows.len() as i64, g.positions.len() as i64);
    let xs = g.x.size();
    if n == 0 || s == 0 {
        return Err(invalid(
            "a batched forward group needs rows and inputs".into(),
        ));
    }
    if xs.len() != 3 || xs[0] != n || xs[1] != s || xs[2] != dim {
        return Err(invalid(format!(
            "forward input has shape {xs:?}, expected [{n}, {s}, {dim}]"
        )));
    }
    cache.check_rows(&g.rows)?;
    cache.check_positions(&g.positions)?;
    let mut seen = HashSet::new();
    if let Some(p) = g.positions.iter().find(|&&p| !seen.insert(p)) {
        return Err(invalid(format!(
            "position {p} appears twice in one forward"
        )));
    }
    let max_pos = g.positions.iter().copied().max().unwrap_or(0);
    match &g.mask {
        Some(m) => {
            let ms = m.size();
            if ms.len() != 2 || ms[0] != s || ms[1] > cache.capacity() || ms[1] <= max_pos {
                return Err(invalid(format!(
                    "attention mask has shape {ms:?}, expected [{s}, W] with {max_pos} < W <= {}",
                    cache.capacity()
                )));
            }
            Ok(ms[1])
        }
        None => Ok(max_pos + 1),
    }
}

/// Mask `[n, S, W]` of one group: explicit or causal, AND its rows' caption visibility, OR each
/// input's own column; padding inputs see column 0 only.
fn group_mask(g: &BatchInput, s: i64, w: i64, cache: &KvCache, device: Device) -> Tensor {
    let si = g.positions.len() as i64;
    let n = g.rows.len() as i64;
    let cols = cache.slots.narrow(0, 0, w).unsqueeze(0);
    let pos = Tensor::from_slice(&g.positions)
        .to_device(device)
        .unsqueeze(1);
    let base = match &g.mask {
        Some(m) => {
            let m = m.to_device(device).to_kind(Kind::Bool);
            let extra = w - m.size()[1];
            if extra > 0 {
                Tensor::cat(&[m, Tensor::zeros([si, extra], (Kind::Bool, device))], 1)
            } else {
                m
            }
        }
        None => cols.le_tensor(&pos),
    };
    let mut m = base.unsqueeze(0).expand([n, si, w], false);
    if let Some(v) = &cache.visible {
        let rows = Tensor::from_slice(&g.rows).to_device(device);
        m = m.logical_and(&v.index_select(0, &rows).narrow(1, 0, w).unsqueeze(1));
    }
    let m = m.logical_or(&cols.eq_tensor(&pos).unsqueeze(0));
    if si == s {
        return m;
    }
    let pad = Tensor::cat(
        &[
            Tensor::ones([s - si, 1], (Kind::Bool, device)),
            Tensor::zeros([s - si, w - 1], (Kind::Bool, device)),
        ],
        1,
    );
    Tensor::cat(&[m, pad.unsqueeze(0).expand([n, s - si, w], false)], 1)
}

/// Zero-pads `x` `[n, si, dim]` to `[n, s, dim]`.
fn pad_inputs(x: &Tensor, s: i64) -> Tensor {
    let sz = x.size();
    if sz[1] == s {
        return x.shallow_clone();
    }
    let zeros = Tensor::zeros([sz[0], s - sz[1], sz[2]], (x.kind(), x.device()));
    Tensor::cat(&[x.shallow_clone(), zeros], 1)
}

impl BatchPlan {
    /// Validates `groups` against `cache` and lays them out; `dim` is the model width.
    pub(crate) fn new(groups: &[BatchInput], dim: i64, cache: &KvCache) -> Result<Self> {
        if groups.is_empty() {
            return Err(invalid("forward with no input".into()));
        }
        let mut width = 0;
        let mut used = HashSet::new();
        for g in groups {
            width = width.max(check_group(g, dim, cache)?);
            if let Some(r) = g.rows.iter().find(|&&r| !used.insert(r)) {
                return Err(invalid(format!(
                    "cache row {r} is in two groups of one forward"
                )));
            }
        }
        let device = cache.slots.device();
        let s = groups
            .iter()
            .map(|g| g.positions.len() as i64)
            .max()
            .unwrap_or(1);
        let (mut xs, mut masks, mut positions, mut spans) = (vec![], vec![], vec![], vec![]);
        let (mut all_rows, mut write_rows, mut write_positions, mut write_from) =
            (vec![], vec![], vec![], vec![]);
        for g in groups {
            let (n, si) = (g.rows.len() as i64, g.positions.len() as i64);
            spans.push((all_rows.len() as i64, n, si));
            xs.push(pad_inputs(&g.x, s));
            masks.push(group_mask(g, s, width, cache, device));
            let mut padded = g.positions.clone();
            padded.resize(s as usize, 0);
            for &r in &g.rows {
                let b = all_rows.len() as i64;
                all_rows.push(r);
                positions.extend_from_slice(&padded);
                for (i, &p) in g.positions.iter().enumerate() {
                    write_rows.push(r);
                    write_positions.push(p);
                    write_from.push(b * s + i as i64);
                }
            }
        }
        let b = all_rows.len() as i64;
        let identity = all_rows.iter().copied().eq(0..cache.batch());
        let on = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let max_position = write_positions.iter().copied().max().unwrap_or(0);
        Ok(Self {
            x: Tensor::cat(&xs, 0),
            positions: on(&positions).view([b, s]),
            mask: Tensor::cat(&masks, 0).unsqueeze(1),
            rows: (!identity).then(|| on(&all_rows)),
            width,
            write_from: (write_from.len() as i64 != b * s).then(|| on(&write_from)),
            write_rows: on(&write_rows),
            write_positions: on(&write_positions),
            spans,
            max_position,
        })
    }

    /// Writes keys or values `[B, S, kv_heads, hd]` of the real inputs into `buffer`
    /// `[rows, kv_heads, capacity, hd]` at their rows and positions.
    pub(crate) fn write(&self, buffer: &mut Tensor, kv: &Tensor) {
        let sz = kv.size();
        let flat = kv.reshape([sz[0] * sz[1], sz[2], sz[3]]);
        let flat = match &self.write_from {
            Some(idx) => flat.index_select(0, idx),
            None => flat,
        };
        let _ = buffer.index_put_(
            &[Some(&self.write_rows), None, Some(&self.write_positions)],
            &flat.to_kind(buffer.kind()),
            false,
        );
    }

    /// The first `width` columns of `buffer` for the batch's rows: `[B, kv_heads, width, hd]`.
    pub(crate) fn read(&self, buffer: &Tensor) -> Tensor {
        let cols = buffer.narrow(2, 0, self.width);
        match &self.rows {
            Some(r) => cols.index_select(0, r),
            None => cols,
        }
    }

    /// Each group's slice `[rows, S_i, dim]` of the batch's output `[B, S, dim]`.
    pub(crate) fn split(&self, h: &Tensor) -> Vec<Tensor> {
        self.spans
            .iter()
            .map(|&(first, n, si)| h.narrow(0, first, n).narrow(1, 0, si))
            .collect()
    }
}
