//! Several sequence groups in one forward: the inputs of every group packed into one token
//! sequence (no padding), their positions, their attention masks and where their keys and values
//! go in a shared KV cache.
//!
//! A group is one session's forward (its one cache row, two with CFG); groups differ in length,
//! positions and masks. The projections and the feed-forward run once over all packed tokens;
//! attention runs once per input length: the groups of equal length are packed next to each
//! other and attend together, each against its own rows (keys past a group's own width are
//! masked), so each group's result equals its own forward up to float rounding.

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

/// Where one group's tokens sit in the packed sequence.
#[derive(Debug)]
struct GroupSpan {
    start: i64,
    n: i64,
    s: i64,
}

/// The groups of one input length, attending together.
#[derive(Debug)]
pub(crate) struct Bucket {
    /// First packed token; the bucket's rows follow each other, `s` tokens each.
    pub start: i64,
    /// Rows (sequences) and inputs per row.
    pub rows: i64,
    pub s: i64,
    /// Cache rows: `(first, n)` when contiguous (read by a view), else their indices.
    access: std::result::Result<(i64, i64), Tensor>,
    /// Cache columns the bucket reads.
    width: i64,
    /// Attention mask `[rows, 1, S, W]`.
    pub mask: Tensor,
}

impl Bucket {
    /// The bucket's first `width` columns of `buffer` `[rows, kv_heads, capacity, hd]`:
    /// `[rows, kv_heads, width, hd]`.
    pub(crate) fn read(&self, buffer: &Tensor) -> Tensor {
        let cols = buffer.narrow(2, 0, self.width);
        match &self.access {
            Ok((first, n)) => cols.narrow(0, *first, *n),
            Err(idx) => cols.index_select(0, idx),
        }
    }
}

/// A validated batch, laid out for the layers.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    /// Packed inputs `[1, T, dim]`.
    pub x: Tensor,
    /// Positions `[T]`.
    pub positions: Tensor,
    /// Attention buckets, in packed order.
    pub buckets: Vec<Bucket>,
    /// Each group's tokens, in the groups' order.
    spans: Vec<GroupSpan>,
    /// Row and position of every packed token.
    write_rows: Tensor,
    write_positions: Tensor,
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

/// Mask `[n, 1, S, W]` of one group of width `own` in a bucket of width `w`: explicit or causal,
/// AND its rows' caption visibility, OR each input's own column; nothing past `own`.
fn group_mask(g: &BatchInput, w: i64, own: i64, cache: &KvCache, device: Device) -> Tensor {
    let si = g.positions.len() as i64;
    let n = g.rows.len() as i64;
    let cols = cache.slots.narrow(0, 0, w).unsqueeze(0);
    let pos = Tensor::from_slice(&g.positions)
        .to_device(device)
        .unsqueeze(1);
    let base = match &g.mask {
        Some(m) => {
            let m = m.to_device(device).to_kind(Kind::Bool);
            if w > own {
                Tensor::cat(&[m, Tensor::zeros([si, w - own], (Kind::Bool, device))], 1)
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
    m.logical_or(&cols.eq_tensor(&pos).unsqueeze(0))
        .unsqueeze(1)
}

/// The rows as a contiguous range `(first, n)` when they are one, else as an index tensor.
fn row_access(rows: &[i64], device: Device) -> std::result::Result<(i64, i64), Tensor> {
    let first = rows.first().copied().unwrap_or(0);
    if rows.iter().enumerate().all(|(i, &r)| r == first + i as i64) {
        Ok((first, rows.len() as i64))
    } else {
        Err(Tensor::from_slice(rows).to_device(device))
    }
}

impl BatchPlan {
    /// Validates `groups` against `cache` and lays them out; `dim` is the model width.
    pub(crate) fn new(groups: &[BatchInput], dim: i64, cache: &KvCache) -> Result<Self> {
        if groups.is_empty() {
            return Err(invalid("forward with no input".into()));
        }
        let mut used = HashSet::new();
        let mut widths = Vec::with_capacity(groups.len());
        for g in groups {
            widths.push(check_group(g, dim, cache)?);
            if let Some(r) = g.rows.iter().find(|&&r| !used.insert(r)) {
                return Err(invalid(format!(
                    "cache row {r} is in two groups of one forward"
                )));
            }
        }
        let device = cache.slots.device();
        // Packed by input length, so that each length's groups are one range.
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&i| groups[i].positions.len());
        let mut spans: Vec<Option<GroupSpan>> = (0..groups.len()).map(|_| None).collect();
        let (mut xs, mut buckets, mut positions) = (vec![], vec![], vec![]);
        let (mut write_rows, mut write_positions) = (vec![], vec![]);
        for same in order.chunk_by(|&a, &b| groups[a].positions.len() == groups[b].positions.len())
        {
            let si = groups[same[0]].positions.len() as i64;
            let width = same.iter().map(|&i| widths[i]).max().unwrap_or(1);
            let start = positions.len() as i64;
            let (mut rows, mut masks) = (vec![], vec![]);
            for &i in same {
                let g = &groups[i];
                let n = g.rows.len() as i64;
                spans[i] = Some(GroupSpan {
                    start: positions.len() as i64,
                    n,
                    s: si,
                });
                masks.push(group_mask(g, width, widths[i], cache, device));
                xs.push(g.x.reshape([n * si, dim]));
                for &r in &g.rows {
                    rows.push(r);
                    positions.extend_from_slice(&g.positions);
                    write_rows.extend(std::iter::repeat_n(r, g.positions.len()));
                    write_positions.extend_from_slice(&g.positions);
                }
            }
            buckets.push(Bucket {
                start,
                rows: rows.len() as i64,
                s: si,
                access: row_access(&rows, device),
                width,
                mask: Tensor::cat(&masks, 0),
            });
        }
        let on = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let max_position = write_positions.iter().copied().max().unwrap_or(0);
        Ok(Self {
            x: Tensor::cat(&xs, 0).unsqueeze(0),
            positions: on(&positions),
            buckets,
            spans: spans.into_iter().flatten().collect(),
            write_rows: on(&write_rows),
            write_positions: on(&write_positions),
            max_position,
        })
    }

    /// Writes keys or values `[1, T, kv_heads, hd]` of the packed tokens into `buffer`
    /// `[rows, kv_heads, capacity, hd]` at their rows and positions.
    pub(crate) fn write(&self, buffer: &mut Tensor, kv: &Tensor) {
        let sz = kv.size();
        let flat = kv.reshape([sz[0] * sz[1], sz[2], sz[3]]);
        let _ = buffer.index_put_(
            &[Some(&self.write_rows), None, Some(&self.write_positions)],
            &flat.to_kind(buffer.kind()),
            false,
        );
    }

    /// Each group's slice `[rows, S_i, dim]` of the packed output `[1, T, dim]`, in the groups'
    /// order.
    pub(crate) fn split(&self, h: &Tensor) -> Vec<Tensor> {
        let dim = h.size()[2];
        self.spans
            .iter()
            .map(|g| h.narrow(1, g.start, g.n * g.s).view([g.n, g.s, dim]))
            .collect()
    }
}
