//! Several sequence groups in one forward: the inputs of every group packed into one token
//! sequence (no padding), their positions, their attention masks and where their keys and values
//! go in a shared KV cache.
//!
//! A group is one session's forward (its one cache row, two with CFG); groups differ in length,
//! positions and masks. The projections and the feed-forward run once over all packed tokens;
//! attention runs once per bucket: groups of equal input length whose cache rows follow each
//! other, packed next to each other, attend together against a view of their rows (keys past a
//! group's own width are masked), so each group's result equals its own forward up to float
//! rounding. Only a group whose own rows are not ascending and adjacent gathers them (a copy of
//! its keys and values per layer), alone.

use std::collections::HashSet;

use tch::{Kind, Tensor};

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

/// Groups of one input length on adjacent cache rows, attending together.
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

/// Whether `b` can attend in one bucket after `a`: the same input length, each on ascending
/// adjacent rows, `b`'s right after `a`'s.
fn adjacent(a: &BatchInput, b: &BatchInput) -> bool {
    a.positions.len() == b.positions.len()
        && row_access(&a.rows).is_some()
        && row_access(&b.rows).is_some()
        && a.rows.last().is_some_and(|&l| b.rows[0] == l + 1)
}

/// One attention call's fixed cost, in key columns read by one input of one row: a bucket
/// reads its widest group's width for every row, so a run of groups far apart in progress (AR
/// sessions at different rows of the grid) attends in several calls, each at its own width.
const CALL_COST_COLUMNS: i64 = 16;

/// `run` (groups of one input length on adjacent rows, in row order) cut into buckets that read
/// the fewest key columns, each bucket charged [`CALL_COST_COLUMNS`] besides.
fn split_by_width<'a>(run: &'a [usize], groups: &[BatchInput], widths: &[i64]) -> Vec<&'a [usize]> {
    let n = run.len();
    let s = groups[run[0]].positions.len() as i64;
    // best[j]: cost of the first j groups, cut[j]: where their last bucket starts.
    let (mut best, mut cut) = (vec![0i64; n + 1], vec![0usize; n + 1]);
    for j in 1..=n {
        let (mut rows, mut width) = (0i64, 0i64);
        best[j] = i64::MAX;
        for i in (0..j).rev() {
            rows += groups[run[i]].rows.len() as i64;
            width = width.max(widths[run[i]]);
            let cost = best[i] + CALL_COST_COLUMNS + s * rows * width;
            if cost < best[j] {
                (best[j], cut[j]) = (cost, i);
            }
        }
    }
    let mut out = Vec::new();
    let mut j = n;
    while j > 0 {
        out.push(&run[cut[j]..j]);
        j = cut[j];
    }
    out.reverse();
    out
}

/// The rows as a contiguous range `(first, n)` when they are one, else as an index tensor.
fn row_access(rows: &[i64]) -> Option<(i64, i64)> {
    let first = rows.first().copied().unwrap_or(0);
    rows.iter()
        .enumerate()
        .all(|(i, &r)| r == first + i as i64)
        .then_some((first, rows.len() as i64))
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
        // Packed by input length then cache row, so that each bucket's groups are one range.
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&i| (groups[i].positions.len(), groups[i].rows[0]));
        let mut spans: Vec<Option<GroupSpan>> = (0..groups.len()).map(|_| None).collect();
        let (mut xs, mut buckets, mut positions) = (vec![], vec![], vec![]);
        let (mut write_rows, mut write_positions) = (vec![], vec![]);
        let runs = order.chunk_by(|&a, &b| adjacent(&groups[a], &groups[b]));
        for same in runs.flat_map(|run| split_by_width(run, groups, &widths)) {
            let si = groups[same[0]].positions.len() as i64;
            let start = positions.len() as i64;
            let mut rows = vec![];
            for &i in same {
                let g = &groups[i];
                let n = g.rows.len() as i64;
                spans[i] = Some(GroupSpan {
                    start: positions.len() as i64,
                    n,
                    s: si,
                });
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
                access: row_access(&rows)
                    .ok_or_else(|| Tensor::from_slice(&rows).to_device(device)),
                width: same.iter().map(|&i| widths[i]).max().unwrap_or(1),
                mask: Tensor::new(),
            });
        }
        let on = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let max_position = write_positions.iter().copied().max().unwrap_or(0);
        let spans: Vec<GroupSpan> = spans.into_iter().flatten().collect();
        let mut plan = Self {
            x: Tensor::cat(&xs, 0).unsqueeze(0),
            positions: on(&positions),
            buckets,
            spans,
            write_rows: on(&write_rows),
            write_positions: on(&write_positions),
            max_position,
        };
        plan.set_masks(groups, &widths, cache);
        Ok(plan)
    }

    /// Every bucket's mask `[rows, 1, S, W]`, cut from one mask of all packed inputs: explicit or
    /// causal by position, AND the caption visibility of the input's row, OR the input's own
    /// column; nothing past its group's width.
    fn set_masks(&mut self, groups: &[BatchInput], widths: &[i64], cache: &KvCache) {
        let w = self.buckets.iter().map(|b| b.width).max().unwrap_or(1);
        let cols = cache.slots.narrow(0, 0, w).unsqueeze(0);
        let pos = self.positions.unsqueeze(1);
        let mut all = cols.le_tensor(&pos);
        let device = all.device();
        for ((g, span), &own) in groups.iter().zip(&self.spans).zip(widths) {
            if let Some(m) = &g.mask {
                let m = m.to_device(device).to_kind(Kind::Bool);
                let dest = all
                    .narrow(0, span.start, span.n * span.s)
                    .view([span.n, span.s, w]);
                // Past `own` (> every position of the group) the causal mask is false already.
                dest.narrow(2, 0, own)
                    .copy_(&m.expand([span.n, span.s, own], false));
            }
        }
        if let Some(v) = &cache.visible {
            all = all.logical_and(&v.index_select(0, &self.write_rows).narrow(1, 0, w));
        }
        let all = all.logical_or(&cols.eq_tensor(&pos));
        for b in &mut self.buckets {
            b.mask = all
                .narrow(0, b.start, b.rows * b.s)
                .narrow(1, 0, b.width)
                .reshape([b.rows, 1, b.s, b.width]);
        }
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
