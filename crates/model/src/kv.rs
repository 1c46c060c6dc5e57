//! A preallocated KV cache written at absolute positions: one session's (one row, two with CFG)
//! or a role's pool whose rows the sessions share out, so that one forward serves several.

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// Keys and values of every layer for `batch` sequences (rows), preallocated once:
/// `[batch, kv_heads, capacity, head_dim]` per layer. A session owns one row (two with CFG: the
/// conditional and the unconditional half). Forwards write their inputs' K/V at the inputs'
/// absolute positions in their own rows; nothing is allocated per step.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    capacity: i64,
    batch: i64,
    /// `[capacity]` int64 slot indices on the device, to build masks without host round trips.
    pub(crate) slots: Tensor,
    /// `[batch, capacity]` bool: false for condition columns a row's caption mask hides; `None`
    /// while no row has a mask.
    pub(crate) visible: Option<Tensor>,
    filled: i64,
}

impl KvCache {
    pub(crate) fn new(
        layers: i64,
        batch: i64,
        kv_heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if capacity <= 0 || batch <= 0 {
            return Err(ModelError::InvalidInput(format!(
                "KV cache needs a positive capacity and batch, got {capacity} and {batch}"
            )));
        }
        let shape = [batch, kv_heads, capacity, head_dim];
        let mut keys = Vec::with_capacity(layers as usize);
        let mut values = Vec::with_capacity(layers as usize);
        for _ in 0..layers {
            keys.push(Tensor::f_zeros(shape, (kind, device))?);
            values.push(Tensor::f_zeros(shape, (kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            capacity,
            batch,
            slots: Tensor::arange(capacity, (Kind::Int64, device)),
            visible: None,
            filled: 0,
        })
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Rows (sequences) of the cache: 2 for one CFG pair, or a pool's rows.
    pub fn batch(&self) -> i64 {
        self.batch
    }

    /// One past the highest position written since the last reset or truncate (in any row).
    pub fn filled(&self) -> i64 {
        self.filled
    }

    /// Forgets every position at or after `len` (their slots are rewritten by later forwards).
    pub fn truncate(&mut self, len: i64) {
        self.filled = self.filled.min(len.max(0));
    }

    /// Forgets everything, including the caption masks.
    pub fn reset(&mut self) {
        self.filled = 0;
        self.visible = None;
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> i64 {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum()
    }

    /// Addresses of the key and value buffers: they never change over the cache's life (a decode
    /// step writes in place and allocates no KV memory).
    pub fn buffer_addresses(&self) -> Vec<usize> {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.data_ptr() as usize)
            .collect()
    }

    /// Largest absolute difference between the keys and values of the first `len` positions of
    /// this cache and `other` (same shapes): how far an incrementally maintained cache drifted
    /// from a fresh prefill. `f64::INFINITY` when the shapes differ.
    pub fn max_abs_diff(&self, other: &KvCache, len: i64) -> f64 {
        if self.keys.len() != other.keys.len() || len > self.capacity || len > other.capacity {
            return f64::INFINITY;
        }
        let mut worst = 0.0f64;
        for (a, b) in self
            .keys
            .iter()
            .chain(&self.values)
            .zip(other.keys.iter().chain(&other.values))
        {
            if a.size() != b.size() && a.size()[..2] != b.size()[..2] {
                return f64::INFINITY;
            }
            let d = (a.narrow(2, 0, len).to_kind(Kind::Float)
                - b.narrow(2, 0, len).to_kind(Kind::Float))
            .abs()
            .max();
            worst = worst.max(f64::try_from(d).unwrap_or(f64::INFINITY));
        }
        worst
    }

    /// Adds zeroed rows up to `batch` rows in all (a role's pool growing with its sessions); the
    /// rows there keep their keys, values and caption masks.
    pub fn grow(&mut self, batch: i64) -> Result<()> {
        let extra = batch - self.batch;
        if extra <= 0 {
            return Ok(());
        }
        let more = |t: &Tensor| -> Result<Tensor> {
            let mut shape = t.size();
            shape[0] = extra;
            let zeros = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
            Ok(Tensor::f_cat(&[t.shallow_clone(), zeros], 0)?)
        };
        // All new buffers first: a failed allocation leaves the cache as it was.
        let keys = self.keys.iter().map(more).collect::<Result<Vec<_>>>()?;
        let values = self.values.iter().map(more).collect::<Result<Vec<_>>>()?;
        self.keys = keys;
        self.values = values;
        if let Some(v) = &self.visible {
            let ones = Tensor::ones([extra, self.capacity], (Kind::Bool, v.device()));
            self.visible = Some(Tensor::cat(&[v.shallow_clone(), ones], 0));
        }
        self.batch = batch;
        Ok(())
    }

    /// A copy of `rows` as a cache of their own (to compare one session's part of a pool).
    pub fn extract_rows(&self, rows: &[i64]) -> KvCache {
        let device = self.slots.device();
        let idx = Tensor::from_slice(rows).to_device(device);
        let pick = |t: &Tensor| t.index_select(0, &idx);
        KvCache {
            keys: self.keys.iter().map(pick).collect(),
            values: self.values.iter().map(pick).collect(),
            capacity: self.capacity,
            batch: rows.len() as i64,
            slots: self.slots.shallow_clone(),
            visible: self.visible.as_ref().map(pick),
            filled: self.filled,
        }
    }

    /// Sets the caption visibility of `rows`: `mask` `[cls]` (false hides that condition column
    /// from every other position of the row), or every column visible.
    pub(crate) fn set_visible(&mut self, rows: &[i64], mask: Option<&Tensor>) {
        if mask.is_none() && self.visible.is_none() {
            return;
        }
        let device = self.slots.device();
        let visible = self
            .visible
            .get_or_insert_with(|| Tensor::ones([self.batch, self.capacity], (Kind::Bool, device)));
        let row = match mask {
            Some(m) => {
                let n = m.size()[0].min(self.capacity);
                let rest = Tensor::ones([self.capacity - n], (Kind::Bool, device));
                Tensor::cat(
                    &[
                        m.narrow(0, 0, n).to_kind(Kind::Bool).to_device(device),
                        rest,
                    ],
                    0,
                )
            }
            None => Tensor::ones([self.capacity], (Kind::Bool, device)),
        };
        let n = rows.len() as i64;
        let idx = Tensor::from_slice(rows).to_device(device);
        let _ = visible.index_copy_(0, &idx, &row.unsqueeze(0).expand([n, self.capacity], false));
    }

    pub(crate) fn check_rows(&self, rows: &[i64]) -> Result<()> {
        match rows.iter().find(|&&r| r < 0 || r >= self.batch) {
            Some(r) => Err(ModelError::InvalidInput(format!(
                "cache row {r} is outside the cache's {} rows",
                self.batch
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn check_positions(&self, positions: &[i64]) -> Result<()> {
        for &p in positions {
            if p < 0 || p >= self.capacity {
                return Err(ModelError::KvCapacity {
                    position: p,
                    capacity: self.capacity,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn mark_written(&mut self, positions: &[i64]) {
        if let Some(&m) = positions.iter().max() {
            self.filled = self.filled.max(m + 1);
        }
    }
}
