//! The verifier's nearest-code tables (`[V, k]`, one per pool size `k`), bounded in number: the
//! tables built at warm-up (the configured defaults) stay, and at most [`MAX_EXTRA_TABLES`] others
//! are kept, least recently used out first. A request with an unusual `k` then costs the replica
//! one table build, never memory that grows with every new `k`.

use std::rc::Rc;

use mulo_core::limits::{MAX_LANTERN_K, MAX_POOL_K};
use mulo_core::ParamError;
use tch::Tensor;

/// Tables kept beside the pinned ones (warm-up's).
pub const MAX_EXTRA_TABLES: usize = 2;

/// One `[V, k]` table: on the host (LANTERN's proximity sets) and on the device (MuLo-SD's pooled
/// mass). Cheap to clone.
#[derive(Debug, Clone)]
pub struct PoolTable {
    /// Row-major `[V, k]` code ids.
    pub host: Rc<Vec<u32>>,
    /// The same as int64 on the model's device.
    pub device: Rc<Tensor>,
}

/// The tables by `k`: pinned ones first, then the others in order of use (most recent last).
#[derive(Debug, Default)]
pub struct PoolTables {
    pinned: Vec<(usize, PoolTable)>,
    recent: Vec<(usize, PoolTable)>,
}

impl PoolTables {
    /// The table of `k`, built by `build` when it is not kept; `pin` keeps it for good.
    /// `k` must be between 1 and the larger of the pool bounds (the caller clamps it to V).
    pub fn get<E: From<ParamError>>(
        &mut self,
        k: usize,
        pin: bool,
        build: impl FnOnce(usize) -> Result<PoolTable, E>,
    ) -> Result<PoolTable, E> {
        let max = MAX_POOL_K.max(MAX_LANTERN_K);
        mulo_core::limits::in_range("pool_k", k, max)?;
        if let Some((_, t)) = self.pinned.iter().find(|(x, _)| *x == k) {
            return Ok(t.clone());
        }
        let table = match self.recent.iter().position(|(x, _)| *x == k) {
            Some(i) => self.recent.remove(i).1,
            None => build(k)?,
        };
        if pin {
            self.pinned.push((k, table.clone()));
        } else {
            self.recent.push((k, table.clone()));
            if self.recent.len() > MAX_EXTRA_TABLES {
                self.recent.remove(0);
            }
        }
        Ok(table)
    }

    /// Tables kept now.
    pub fn len(&self) -> usize {
        self.pinned.len() + self.recent.len()
    }

    /// True when no table is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(k: usize) -> Result<PoolTable, ParamError> {
        Ok(PoolTable {
            host: Rc::new(vec![k as u32]),
            device: Rc::new(Tensor::from_slice(&[k as i64])),
        })
    }

    #[test]
    fn pinned_tables_stay_and_the_others_are_bounded() {
        let mut t = PoolTables::default();
        t.get(256, true, table).unwrap();
        t.get(1000, true, table).unwrap();
        let mut builds = 0;
        for k in [3, 4, 5, 6, 7, 3, 256, 1000] {
            t.get(k, false, |k| {
                builds += 1;
                table(k)
            })
            .unwrap();
            assert!(t.len() <= 2 + MAX_EXTRA_TABLES, "{}", t.len());
        }
        // 3..7 built once each, 3 again (evicted by then); the pinned ones never rebuilt.
        assert_eq!(builds, 6);
        assert_eq!(t.len(), 2 + MAX_EXTRA_TABLES);
        // The most recently used extra table is kept: no build.
        t.get(3, false, |_| -> Result<PoolTable, ParamError> {
            panic!("3 is kept")
        })
        .unwrap();
    }

    #[test]
    fn out_of_bound_k_is_refused_before_any_build() {
        let mut t = PoolTables::default();
        for k in [0, MAX_POOL_K.max(MAX_LANTERN_K) + 1] {
            let e = t
                .get(k, false, |_| -> Result<PoolTable, ParamError> {
                    panic!("no build for {k}")
                })
                .unwrap_err();
            assert_eq!(e.field, "pool_k");
        }
        assert!(t.is_empty());
    }
}
