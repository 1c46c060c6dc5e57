//! The pure parts of speculative decoding (DESIGN §2): pooled acceptance with a nearest-code table,
//! neighbourhood expansion clipped to the block, 8-connected islands and their per-pass query
//! schedule, and the classic rejection rules (SD's residual, LANTERN's proximity sets) on
//! probability vectors.

/// A block of the target grid under verification: `rows` high-res rows of `cols` tokens starting
/// at grid row `first_row`. Positions inside a block are block-local raster indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First grid row of the block.
    pub first_row: usize,
    /// Rows in the block.
    pub rows: usize,
    /// Columns of the grid.
    pub cols: usize,
}

impl Block {
    /// Positions in the block.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True when the block holds no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Grid raster index of block-local position `i`.
    pub fn grid_index(&self, i: usize) -> usize {
        self.first_row * self.cols + i
    }
}

/// The blocks of one MuLo-SD generation (DESIGN §2.2): each cycle drafts `block_rows` low-res
/// rows, i.e. `scale · block_rows` high-res rows; the last block holds what remains. Empty when
/// `scale` or `block_rows` is 0.
pub fn blocks(grid_rows: usize, cols: usize, scale: usize, block_rows: usize) -> Vec<Block> {
    let step = scale * block_rows;
    if step == 0 {
        return Vec::new();
    }
    (0..grid_rows)
        .step_by(step)
        .map(|first_row| Block {
            first_row,
            rows: step.min(grid_rows - first_row),
            cols,
        })
        .collect()
}

/// The `k` nearest codes of every code by L2 distance of the L2-normalised code vectors, itself
/// first: a `[V, k]` table, row-major. `codes` is `[V, dim]` row-major. Ties are broken by the
/// lower code id, so the table is deterministic.
pub fn nearest_codes(codes: &[f32], dim: usize, k: usize) -> Vec<u32> {
    if dim == 0 || k == 0 {
        return Vec::new();
    }
    let v = codes.len() / dim;
    let k = k.min(v);
    let normed: Vec<f32> = codes
        .chunks(dim)
        .flat_map(|c| {
            let n = c.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            c.iter().map(move |x| x / n)
        })
        .collect();
    let mut table = Vec::with_capacity(v * k);
    let mut dist: Vec<(f32, u32)> = Vec::with_capacity(v);
    for a in 0..v {
        let ca = &normed[a * dim..(a + 1) * dim];
        dist.clear();
        for b in 0..v {
            let cb = &normed[b * dim..(b + 1) * dim];
            let d: f32 = if a == b {
                f32::NEG_INFINITY // itself first, even with duplicate codes
            } else {
                ca.iter().zip(cb).map(|(x, y)| (x - y) * (x - y)).sum()
            };
            dist.push((d, b as u32));
        }
        let cmp = |x: &(f32, u32), y: &(f32, u32)| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1));
        if k < v {
            dist.select_nth_unstable_by(k - 1, cmp);
        }
        let top = &mut dist[..k];
        top.sort_by(cmp);
        table.extend(top.iter().map(|x| x.1));
    }
    table
}

/// Pooled acceptance (DESIGN §2.2 step 3): the processed probability mass `p` puts on the pool
/// `pool` (the draft token's `k` nearest codes, itself included) reaches `tau`.
pub fn pooled_accept(p: &[f32], pool: &[u32], tau: f64) -> bool {
    pooled_mass(p, pool) >= tau
}

/// The probability mass of `p` on `pool`.
pub fn pooled_mass(p: &[f32], pool: &[u32]) -> f64 {
    pool.iter()
        .map(|&v| f64::from(p.get(v as usize).copied().unwrap_or(0.0)))
        .sum()
}

/// Neighbourhood expansion (DESIGN §2.2 step 4): every block position within Chebyshev distance
/// `radius` of a rejected one, clipped to the block. `rejected` is a block mask.
pub fn expand(block: &Block, rejected: &[bool], radius: usize) -> Vec<bool> {
    let mut out = vec![false; block.len()];
    for (i, _) in rejected.iter().enumerate().filter(|(_, &r)| r) {
        let (r, c) = (i / block.cols, i % block.cols);
        let (r0, r1) = (r.saturating_sub(radius), (r + radius).min(block.rows - 1));
        let (c0, c1) = (c.saturating_sub(radius), (c + radius).min(block.cols - 1));
        for rr in r0..=r1 {
            for cc in c0..=c1 {
                out[rr * block.cols + cc] = true;
            }
        }
    }
    out
}

/// Classic rejection (`rejection = raster`): everything from the first rejected position on, in
/// raster order.
pub fn raster_reject(rejected: &[bool]) -> Vec<bool> {
    let first = rejected.iter().position(|&r| r).unwrap_or(rejected.len());
    (0..rejected.len()).map(|i| i >= first).collect()
}

/// The 8-connected components of a block mask, each as block positions in raster order; islands
/// are ordered by their first position.
pub fn islands(block: &Block, mask: &[bool]) -> Vec<Vec<usize>> {
    let mut label = vec![usize::MAX; mask.len()];
    let mut out: Vec<Vec<usize>> = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != usize::MAX {
            continue;
        }
        let id = out.len();
        let mut members = vec![start];
        label[start] = id;
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            let (r, c) = (i / block.cols, i % block.cols);
            for dr in -1i64..=1 {
                for dc in -1i64..=1 {
                    let (rr, cc) = (r as i64 + dr, c as i64 + dc);
                    if rr < 0 || cc < 0 || rr >= block.rows as i64 || cc >= block.cols as i64 {
                        continue;
                    }
                    let j = rr as usize * block.cols + cc as usize;
                    if mask[j] && label[j] == usize::MAX {
                        label[j] = id;
                        members.push(j);
                        stack.push(j);
                    }
                }
            }
        }
        members.sort_unstable();
        out.push(members);
    }
    out
}

/// The query schedule of island resampling (DESIGN §2.2 step 5): pass `t` queries the `t`-th
/// position (raster order) of every island that has one. Passes = the largest island's size.
pub fn pass_schedule(islands: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let passes = islands.iter().map(Vec::len).max().unwrap_or(0);
    (0..passes)
        .map(|t| {
            islands
                .iter()
                .filter_map(|isl| isl.get(t).copied())
                .collect()
        })
        .collect()
}

/// Where the KV refresh starts after a block was resampled (DESIGN §2.2 step 6): the cache entry
/// of grid position `j` was computed from the token value at `j` (and, through attention, from
/// every earlier one), so every entry at or after the first position whose token changed since it
/// was fed is stale. `changed` is a block mask; returns that first grid index, if any.
pub fn refresh_start(block: &Block, changed: &[bool]) -> Option<usize> {
    changed.iter().position(|&c| c).map(|i| block.grid_index(i))
}

/// SD's acceptance test for draft token `x`: accept when `u < min(1, p(x) / q(x))`, `u` uniform in
/// [0, 1).
pub fn sd_accept(p: &[f32], q: &[f32], x: usize, u: f64) -> bool {
    let px = f64::from(p.get(x).copied().unwrap_or(0.0));
    let qx = f64::from(q.get(x).copied().unwrap_or(0.0));
    if qx <= 0.0 {
        return px > 0.0;
    }
    u < (px / qx).min(1.0)
}

/// SD's residual distribution `norm(max(0, p − q))`; falls back to `p` when it is all zero.
pub fn sd_residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    let r: Vec<f32> = p
        .iter()
        .zip(q.iter().chain(std::iter::repeat(&0.0)))
        .map(|(a, b)| (a - b).max(0.0))
        .collect();
    let s: f64 = r.iter().map(|&x| f64::from(x)).sum();
    if s <= 0.0 {
        return p.to_vec();
    }
    r.iter().map(|&x| (f64::from(x) / s) as f32).collect()
}

/// LANTERN's proximity set of draft token `x` (DESIGN §2.4): `x` itself, then the largest prefix
/// of its nearest codes whose summed target mass stays `<= delta`. `pool` is `x`'s row of the
/// nearest-code table (`x` first, then its neighbours by distance, `k` in all), `p` the target's
/// processed distribution.
pub fn proximity_set(pool: &[u32], p: &[f32], delta: f64) -> Vec<u32> {
    let Some((&x, rest)) = pool.split_first() else {
        return Vec::new();
    };
    let mut set = vec![x];
    let mut mass = 0.0;
    for &v in rest {
        mass += f64::from(p.get(v as usize).copied().unwrap_or(0.0));
        if mass > delta {
            break;
        }
        set.push(v);
    }
    set
}

/// LANTERN's relaxed acceptance of draft token `x` with proximity set `set`: accept when
/// `u < min(1, p(set) / q(x))`.
pub fn lantern_accept(p: &[f32], q: &[f32], x: usize, set: &[u32], u: f64) -> bool {
    let pa = pooled_mass(p, set);
    let qx = f64::from(q.get(x).copied().unwrap_or(0.0));
    if qx <= 0.0 {
        return pa > 0.0;
    }
    u < (pa / qx).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block(rows: usize, cols: usize) -> Block {
        Block {
            first_row: 3,
            rows,
            cols,
        }
    }

    #[test]
    fn proximity_sets_are_mass_bounded_prefixes() {
        let p = [0.5f32, 0.05, 0.03, 0.2, 0.22];
        // x = 0, neighbours 1, 2, 3, 4 by distance.
        assert_eq!(proximity_set(&[0, 1, 2, 3, 4], &p, 0.1), vec![0, 1, 2]);
        assert_eq!(proximity_set(&[0, 1, 2, 3, 4], &p, 0.0), vec![0]);
        assert_eq!(
            proximity_set(&[0, 3, 1], &p, 0.1),
            vec![0],
            "a heavy first neighbour stops it"
        );
        assert_eq!(proximity_set(&[0, 1, 2, 3, 4], &p, 1.0).len(), 5);
        assert!(proximity_set(&[], &p, 1.0).is_empty());
        // Relaxed acceptance uses the set's mass.
        let q = [0.9f32, 0.0, 0.0, 0.05, 0.05];
        assert!(lantern_accept(&p, &q, 0, &[0, 1, 2], 0.6));
        assert!(!sd_accept(&p, &q, 0, 0.6));
    }

    #[test]
    fn nearest_codes_put_each_code_first_and_sort_by_distance() {
        // Directions on a circle: angles 0, 10, 25, 90 degrees.
        let codes: Vec<f32> = [0.0f32, 10.0, 25.0, 90.0]
            .iter()
            .flat_map(|d| {
                let r = d.to_radians();
                [r.cos(), r.sin()]
            })
            .collect();
        let t = nearest_codes(&codes, 2, 3);
        assert_eq!(t, vec![0, 1, 2, 1, 0, 2, 2, 1, 0, 3, 2, 1]);
        assert_eq!(nearest_codes(&codes, 2, 1), vec![0, 1, 2, 3]);
    }

    #[test]
    fn expansion_and_islands_on_a_small_block() {
        let b = block(3, 5);
        let mut rej = vec![false; 15];
        rej[7] = true; // row 1, col 2
        let x = expand(&b, &rej, 1);
        let set: Vec<usize> = (0..15).filter(|&i| x[i]).collect();
        assert_eq!(set, vec![1, 2, 3, 6, 7, 8, 11, 12, 13]);
        assert_eq!(expand(&b, &rej, 0), rej);
        let mut m = vec![false; 15];
        for i in [0, 6, 12, 4, 14] {
            m[i] = true;
        }
        // 0-6-12 touch diagonally; 4 and 14 are apart.
        assert_eq!(islands(&b, &m), vec![vec![0, 6, 12], vec![4], vec![14]]);
        assert_eq!(
            pass_schedule(&islands(&b, &m)),
            vec![vec![0, 4, 14], vec![6], vec![12]]
        );
        assert_eq!(raster_reject(&m)[..2], [true, true]);
        assert_eq!(refresh_start(&b, &m), Some(15));
    }

    #[test]
    fn blocks_tile_the_grid() {
        let b = blocks(16, 16, 2, 3);
        let rows: Vec<(usize, usize)> = b.iter().map(|b| (b.first_row, b.rows)).collect();
        assert_eq!(rows, vec![(0, 6), (6, 6), (12, 4)]);
        assert_eq!(b.iter().map(Block::len).sum::<usize>(), 256);
        assert_eq!(blocks(16, 16, 2, 2).len(), 4);
        assert!(blocks(16, 16, 2, 0).is_empty());
    }

    #[test]
    fn sd_residual_and_acceptance() {
        let p = [0.5f32, 0.3, 0.2];
        let q = [0.2f32, 0.6, 0.2];
        let r = sd_residual(&p, &q);
        assert!((r[0] - 1.0).abs() < 1e-6 && r[1] == 0.0 && r[2] == 0.0);
        assert!(sd_accept(&p, &q, 0, 0.999));
        assert!(sd_accept(&p, &q, 1, 0.49) && !sd_accept(&p, &q, 1, 0.51));
        assert_eq!(sd_residual(&p, &p), p.to_vec());
    }

    proptest! {
        #[test]
        fn expansion_covers_rejections_stays_in_block_and_reaches_back(
            rows in 1usize..6, cols in 1usize..9, radius in 0usize..4,
            bits in proptest::collection::vec(any::<bool>(), 54),
        ) {
            let b = block(rows, cols);
            let rej: Vec<bool> = bits[..b.len()].to_vec();
            let x = expand(&b, &rej, radius);
            prop_assert_eq!(x.len(), b.len());
            for i in 0..b.len() {
                if rej[i] { prop_assert!(x[i]); }
                // Every expanded position is within the radius of some rejection.
                if x[i] {
                    let (r, c) = (i / cols, i % cols);
                    prop_assert!((0..b.len()).any(|j| rej[j]
                        && (j / cols).abs_diff(r) <= radius && (j % cols).abs_diff(c) <= radius));
                }
            }
            // Positions before a rejection (same row, left) are included when radius > 0.
            if radius > 0 {
                for i in 0..b.len() {
                    if rej[i] && i % cols > 0 { prop_assert!(x[i - 1]); }
                }
            }
        }

        #[test]
        fn islands_are_the_8_connected_components_and_the_schedule_covers_them_once(
            rows in 1usize..6, cols in 1usize..9,
            bits in proptest::collection::vec(any::<bool>(), 54),
        ) {
            let b = block(rows, cols);
            let m: Vec<bool> = bits[..b.len()].to_vec();
            let isl = islands(&b, &m);
            let mut owner = vec![usize::MAX; b.len()];
            for (k, island) in isl.iter().enumerate() {
                for &i in island { prop_assert!(m[i]); owner[i] = k; }
            }
            for i in 0..b.len() {
                prop_assert_eq!(m[i], owner[i] != usize::MAX);
                for j in 0..b.len() {
                    let adjacent = i != j && (i / cols).abs_diff(j / cols) <= 1
                        && (i % cols).abs_diff(j % cols) <= 1;
                    if adjacent && m[i] && m[j] { prop_assert_eq!(owner[i], owner[j]); }
                }
            }
            // Distinct islands are not adjacent (components are maximal): checked above by
            // equality of owners of adjacent members. The schedule queries each position once.
            let sched = pass_schedule(&isl);
            let mut seen: Vec<usize> = sched.iter().flatten().copied().collect();
            seen.sort_unstable();
            let mut want: Vec<usize> = (0..b.len()).filter(|&i| m[i]).collect();
            want.sort_unstable();
            prop_assert_eq!(seen, want);
            prop_assert_eq!(sched.len(), isl.iter().map(Vec::len).max().unwrap_or(0));
            for pass in &sched {
                let mut owners: Vec<usize> = pass.iter().map(|&i| owner[i]).collect();
                owners.dedup();
                prop_assert_eq!(owners.len(), pass.len(), "one query per island per pass");
            }
        }

        #[test]
        fn pooled_acceptance_with_k_1_is_the_plain_probability_test(
            probs in proptest::collection::vec(0.0f32..1.0, 2..20), x in 0usize..20, tau in 0.0f64..1.0,
        ) {
            let x = x % probs.len();
            prop_assert_eq!(pooled_accept(&probs, &[x as u32], tau), f64::from(probs[x]) >= tau);
        }
    }
}
